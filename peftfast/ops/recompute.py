"""Saved tensors that backward rebuilds instead of keeping: cheap outputs whose consumers save them.

A norm's output feeds GEMMs (the q/k/v group, the gate/up group) that keep it for their weight gradients, while the
norm itself keeps only its input and the row statistics. ``rebuilding(target, rebuild, sources)`` runs a forward
region in which any tensor autograd saves that is ``target`` or a view of its storage is replaced by a recipe: the
``sources`` (kept anyway, e.g. the norm input the norm op already saved) and ``rebuild`` (run under ``no_grad`` in
backward, once per use, never kept beyond it). For a pre-norm block this drops two hidden-state tensors per token
and layer for two element-wise norm passes in backward.

``rebuild`` must reproduce ``target`` exactly (the same deterministic op on the same inputs): the consumers'
gradients are then bit-for-bit those of the saved tensor. The region nests inside other saved-tensor hooks (e.g.
``save_on_cpu`` or a memory counter): tensors it does not rebuild, and the recipe's sources, go through the outer
hooks. It steps aside, running the region as is, where rebuilding would not pay or not be sound: for targets
under :data:`MIN_REBUILD_BYTES` (a few tokens: the hooks' host time outweighs the bytes), under ``torch.compile``
(the compiler picks what to save and recompute), inside activation checkpointing (only the region's inputs are kept
there already, and checkpointing's own hooks must see every saved tensor), without grad mode, and where
saved-tensor hooks are disabled.

``rebuilding_offered(rebuild, sources, fn)`` does the same for tensors that only a callee knows: the q, k, v a
fused attention hands its kernel (after the projections, the RoPE and the layout changes of the model's own
attention code). That callee wraps its kernel call in ``offered(q, k, v)``: inside a region, what the kernel saves
of those three is replaced by one recipe, ``rebuild(*sources)``, which in backward reruns the forward up to that
point in :func:`capture` mode, where ``offered`` hands the tensors back by raising instead of running the kernel.
The caller must make that rerun reproduce the tensors bit for bit (restored RNG state for dropout seeds, no cache
writes); a rerun that never reaches ``offered``, or reaches it with other shapes, is an error, never a silent
mismatch.

The LoRA projections that feed the offered tensors keep their skinny ``dropout(x)·Aᵀ`` in the same region for free:
each asks for a :func:`low_rank_slot` (in forward order) and saves none; the slot holds the product until the region
ends, then lets it go if the offer was taken. In backward the rerun passes through the same projections in the same
order, and each hands its product to its slot (:func:`deposit_low_rank`), which the projection's backward takes, so
nothing is computed twice. Where the offer was not taken (no rerun will come), the slots keep the products.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

_CHECKPOINT_MODULE = "torch.utils.checkpoint"

# Below this size a region keeps its tensors as they are. What rebuilding saves is the target's bytes; what it costs
# does not shrink with them: the region's saved-tensor hooks make a Python call for every tensor saved inside it, each
# way, and backward runs the recipe (one more op, or a GEMM for the MLP's up projection). On CPU that is 0.1-0.3 ms per
# layer and step, more than a whole layer of a 16-token step takes there; on a GPU the same host time is what a
# small step waits on. 64 KiB is 16 tokens of a 1024-wide fp32 model, 8 of a 4096-wide bf16 one.
MIN_REBUILD_BYTES = 64 * 1024


def _outer_hooks() -> tuple[Callable, Callable] | None | str:
    """The innermost saved-tensor hooks now active, None when there are none, or a reason not to rebuild."""
    try:  # private torch API (present since torch 2.1): without it, nesting cannot be checked, so do not rebuild
        if not torch._C._autograd._saved_tensors_hooks_is_enabled():
            return "saved-tensor hooks are disabled here"
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError):
        return "this torch cannot list the active saved-tensor hooks"
    if top is None:
        return None
    pack, unpack = top
    if getattr(pack, "__module__", None) == _CHECKPOINT_MODULE:
        return "activation checkpointing is active"
    return pack, unpack


def _single_storage(t: torch.Tensor) -> bool:
    """``t`` owns all of a fresh storage in row-major order, so a view's (size, stride, offset) maps onto a rebuilt
    copy of ``t`` unchanged."""
    return t.is_contiguous() and t.storage_offset() == 0 and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _packed_sources(sources: Sequence[torch.Tensor], outer_pack: Callable | None) -> list:
    """The recipe's sources as the outer hooks keep them (detached where there are none)."""
    return [outer_pack(s) if outer_pack is not None else s.detach() for s in sources]


def _autocast_state(device_type: str) -> tuple:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _run_recipe(rebuild: Callable, packed: Sequence, outer_unpack: Callable | None, autocast: tuple):
    """``rebuild`` on the unpacked sources, without grad and under the forward's autocast state (backward runs
    outside the forward's autocast region)."""
    srcs = [outer_unpack(s) if outer_unpack is not None else s for s in packed]
    device, enabled, dtype = autocast
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
        return rebuild(*srcs)


def _pass_on(t: torch.Tensor, outer_pack: Callable | None):
    """A saved tensor a region does not rebuild: to the outer hooks, or kept (detached: a saved output returned as
    itself would make a node -> tensor -> node cycle that leaks the graph when no backward follows; autograd
    restores the saved tensor's history on unpack)."""
    return (outer_pack(t),) if outer_pack is not None else t.detach()


def _passed_back(p, outer_unpack: Callable | None) -> torch.Tensor:
    return outer_unpack(p[0]) if outer_unpack is not None else p


class _Recipe:
    """What a saved view of the target holds instead of the target's storage."""

    __slots__ = ("_shared", "size", "stride", "offset")

    def __init__(self, shared: _Shared, t: torch.Tensor):
        self._shared, self.size, self.stride, self.offset = shared, tuple(t.shape), t.stride(), t.storage_offset()

    def unpack(self) -> torch.Tensor:
        return self._shared.rebuilt().as_strided(self.size, self.stride, self.offset)


class _Shared:
    """One target: its packed sources and the rebuilt tensor while some consumer's backward still uses it."""

    __slots__ = ("rebuild", "sources", "outer_unpack", "autocast", "last", "__weakref__")

    def __init__(self, rebuild, sources, outer_unpack, autocast):
        self.rebuild, self.sources, self.outer_unpack, self.autocast = rebuild, sources, outer_unpack, autocast
        self.last: weakref.ref | None = None

    def rebuilt(self) -> torch.Tensor:
        out = self.last() if self.last is not None else None
        if out is None:  # several consumers (ungrouped q/k/v layers) share one rebuild while it is alive
            out = _run_recipe(self.rebuild, self.sources, self.outer_unpack, self.autocast)
            self.last = weakref.ref(out)
        return out


def _plan() -> tuple[str | None, tuple[Callable, Callable] | None]:
    """(why a region runs as is, or None; the outer saved-tensor hooks to nest in, or None)."""
    if torch.compiler.is_compiling():
        return "torch.compile decides what its graph saves", None
    if not torch.is_grad_enabled():
        return "grad mode is off (nothing is saved)", None
    outer = _outer_hooks()
    return (outer, None) if isinstance(outer, str) else (None, outer)


def worth_rebuilding(t: torch.Tensor | int) -> bool:
    """Whether a region that rebuilds ``t``, or rebuilds from it, pays: ``t`` (a tensor, or a number of bytes)
    holds at least :data:`MIN_REBUILD_BYTES` (read at each call)."""
    n = t if isinstance(t, int) else t.numel() * t.element_size()
    return n >= MIN_REBUILD_BYTES


def why_not_rebuild() -> str | None:
    """None when a ``rebuilding`` region would rebuild here, else why it runs as is."""
    return _plan()[0]


def rebuilding(target: torch.Tensor, rebuild: Callable[..., torch.Tensor], sources: Sequence[torch.Tensor],
               fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)``, with every saved view of ``target`` replaced by ``rebuild(*sources)`` in backward.

    ``sources`` must already be kept by the graph (rebuilding then saves ``target``'s bytes outright); ``rebuild``
    must return a tensor equal to ``target`` (same shape, dtype, values). Returns ``fn``'s result.
    """
    reason, outer = _plan()
    if reason is not None or not _single_storage(target) or not worth_rebuilding(target):
        return fn(*args, **kwargs)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)
    storage, dtype = target.untyped_storage().data_ptr(), target.dtype
    holder: list[_Shared] = []  # created at the first save of the target, so unused regions cost nothing

    def pack(t: torch.Tensor):
        if t.dtype == dtype and t.untyped_storage().data_ptr() == storage and t.device == target.device:
            if not holder:
                holder.append(_Shared(rebuild, _packed_sources(sources, outer_pack), outer_unpack,
                                      _autocast_state(target.device.type)))
            return _Recipe(holder[0], t)
        return _pass_on(t, outer_pack)

    def unpack(p):
        return p.unpack() if isinstance(p, _Recipe) else _passed_back(p, outer_unpack)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# outputs made anywhere in a scope and saved by consumers further on (norm outputs of unfused blocks)
# ----------------------------------------------------------------------------------------------------------------
class _Target:
    __slots__ = ("ref", "version", "dtype", "device", "rebuild", "sources", "shared")

    def __init__(self, target: torch.Tensor, rebuild: Callable, sources: Sequence[torch.Tensor]):
        self.ref, self.version = weakref.ref(target), target._version
        self.dtype, self.device = target.dtype, target.device
        self.rebuild, self.sources = rebuild, tuple(sources)
        self.shared: _Shared | None = None


class _Scope:
    """One :func:`rebuild_scope`: its registered targets by storage, and the hooks it nests in."""

    __slots__ = ("targets", "outer")

    def __init__(self, outer: tuple[Callable, Callable] | None):
        self.targets: dict[int, _Target] = {}
        self.outer = outer if outer is not None else (None, None)

    def pack(self, t: torch.Tensor):
        tg = self.targets.get(t.untyped_storage().data_ptr()) if self.targets else None
        # the same tensor (alive) or a view of it made since (views share the version counter), not written since
        if tg is not None and tg.ref() is not None and t.dtype == tg.dtype and t.device == tg.device \
                and t._version == tg.version:
            if tg.shared is None:  # the first save: the sources are packed now, once, by this scope: a source
                # that is a target itself (the norm output an up projection's rerun starts from) becomes its recipe
                tg.shared = _Shared(tg.rebuild, [self.pack(s) for s in tg.sources], self.unpack,
                                    _autocast_state(tg.device.type))
            return _Recipe(tg.shared, t)
        return _pass_on(t, self.outer[0])

    def unpack(self, p):
        return p.unpack() if isinstance(p, _Recipe) else _passed_back(p, self.outer[1])


def rebuild_scope(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` in a scope where what autograd saves of a tensor registered with :func:`rebuildable`
    (after its registration, anywhere inside ``fn``) is not kept: backward runs the registered recipe instead.

    For outputs whose consumers are not known where they are made: a LayerNorm's output feeds the next layer's
    q/k/v (BERT, GPT-2), or an unfused block's attention. Steps aside where :func:`rebuilding` does; regions opened
    inside (fused blocks, the two-layer MLPs, checkpointed layers) see the scope's hooks as their outer hooks.
    """
    reason, outer = _plan()
    if reason is not None:
        return fn(*args, **kwargs)
    scope = _Scope(outer)
    stack = _local.__dict__.setdefault("scopes", [])
    stack.append(scope)
    try:
        with torch.autograd.graph.saved_tensors_hooks(scope.pack, scope.unpack):
            return fn(*args, **kwargs)
    finally:
        stack.pop()
        scope.targets.clear()  # recipes already made keep their own sources


def rebuildable(target: torch.Tensor, rebuild: Callable[..., torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """Inside a :func:`rebuild_scope`: saved views of ``target`` become ``rebuild(*sources)`` in backward (see
    :func:`rebuilding` for what ``rebuild`` and ``sources`` must be). A no-op outside one, without grad, under
    ``torch.compile`` and for targets that do not own their storage."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():  # first: Dynamo would trace the thread-local
        return
    stack = getattr(_local, "scopes", None)
    if not stack or not _single_storage(target) or not worth_rebuilding(target):
        return
    stack[-1].targets[target.untyped_storage().data_ptr()] = _Target(target, rebuild, sources)


# ----------------------------------------------------------------------------------------------------------------
# tensors a callee offers (the fused attention's q, k, v)
# ----------------------------------------------------------------------------------------------------------------
_local = threading.local()  # .pending: regions waiting for their offer (innermost last); .capturing: a rerun is on


class _Captured(Exception):
    """Raised by ``offered`` during a rerun: carries the offered tensors out of the model's forward code."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]):
        super().__init__("peftfast: captured the offered tensors")
        self.tensors = tensors


def _covers_storage(t: torch.Tensor) -> bool:
    """``t`` is all of its storage (dense, any order of dimensions): saved views of that storage map onto a
    rebuilt copy laid out like ``t``."""
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return False
    expect = 1  # dense, non-overlapping: the strides, smallest first, are the running products of the sizes
    for stride, size in sorted((st, d) for d, st in zip(t.shape, t.stride()) if d != 1):
        if stride != expect:
            return False
        expect *= size
    return True


class _Layout:
    __slots__ = ("ptr", "dtype", "device", "size", "stride")

    def __init__(self, t: torch.Tensor):
        self.ptr, self.dtype, self.device = t.untyped_storage().data_ptr(), t.dtype, t.device
        self.size, self.stride = tuple(t.shape), t.stride()


class _GroupRecipe:
    __slots__ = ("_group", "index", "size", "stride", "offset")

    def __init__(self, group: _Group, index: int, t: torch.Tensor):
        self._group, self.index = group, index
        self.size, self.stride, self.offset = tuple(t.shape), t.stride(), t.storage_offset()

    def unpack(self) -> torch.Tensor:
        return self._group.rebuilt(self.index).as_strided(self.size, self.stride, self.offset)


class _Group:
    """One region: its recipe, the layouts of the offered tensors, and their rebuilt copies while some saved view
    of them has not been unpacked in this backward yet."""

    __slots__ = ("rebuild", "sources", "packed", "outer", "autocast", "layouts", "recipes", "live", "pending", "slots")

    def __init__(self, rebuild: Callable[..., tuple[torch.Tensor, ...]], sources: Sequence[torch.Tensor]):
        self.rebuild, self.sources, self.packed, self.outer = rebuild, tuple(sources), None, None
        self.autocast = None
        self.layouts: list[_Layout] = []
        self.recipes, self.live, self.pending = 0, None, 0
        self.slots: list[LowRankSlot] = []

    def match(self, t: torch.Tensor) -> int | None:
        ptr = t.untyped_storage().data_ptr()
        for i, lay in enumerate(self.layouts):
            if lay.ptr == ptr and lay.dtype == t.dtype and lay.device == t.device:
                return i
        return None

    def rebuilt(self, index: int) -> torch.Tensor:
        if self.live is None:  # one rerun serves every saved view (the kernel's backward unpacks them together)
            before = getattr(_local, "rerun", None)
            _local.rerun = [self.slots, 0]  # the projections on the way deposit their low-rank products
            try:
                got = tuple(_run_recipe(self.rebuild, self.packed, self.outer[1], self.autocast))
            finally:
                _local.rerun = before
            if len(got) != len(self.layouts):
                raise RuntimeError(f"peftfast: the backward rerun offered {len(got)} tensors, the forward "
                                   f"{len(self.layouts)}")
            self.live, self.pending = tuple(self._laid_out(i, t) for i, t in enumerate(got)), self.recipes
        out = self.live[index]
        self.pending -= 1
        if self.pending <= 0:
            self.live = None
        return out

    def _laid_out(self, i: int, t: torch.Tensor) -> torch.Tensor:
        lay = self.layouts[i]
        if tuple(t.shape) != lay.size or t.dtype != lay.dtype or t.device != lay.device:
            raise RuntimeError(f"peftfast: the backward rerun offered tensor {i} as {tuple(t.shape)} {t.dtype}, "
                               f"the forward as {lay.size} {lay.dtype}")
        if t.stride() == lay.stride and _covers_storage(t):
            return t
        out = torch.empty_strided(lay.size, lay.stride, dtype=t.dtype, device=t.device)
        return out.copy_(t)

    def register(self, tensors: tuple[torch.Tensor, ...], outer) -> bool:
        if self.layouts or not all(_covers_storage(t) for t in tensors) or \
                len({t.untyped_storage().data_ptr() for t in tensors}) != len(tensors):
            return False
        self.layouts, self.outer = [_Layout(t) for t in tensors], outer if outer is not None else (None, None)
        self.packed = _packed_sources(self.sources, self.outer[0])
        self.sources = ()
        self.autocast = _autocast_state(tensors[0].device.type)
        return True

    def pack(self, t: torch.Tensor):
        i = self.match(t)
        if i is not None:
            self.recipes += 1
            return _GroupRecipe(self, i, t)
        return _pass_on(t, self.outer[0])

    def unpack(self, p):
        return p.unpack() if isinstance(p, _GroupRecipe) else _passed_back(p, self.outer[1])


def rebuilding_offered(rebuild: Callable[..., tuple[torch.Tensor, ...]], sources: Sequence[torch.Tensor],
                       fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)``, where what a kernel saves of the tensors offered to it (``offered``) inside ``fn``
    is not kept: backward gets them from ``rebuild(*sources)`` (run under ``no_grad``; it must return the offered
    tensors' values, in order, e.g. by rerunning ``fn``'s forward in :func:`capture`). ``sources`` must be kept by
    the graph anyway. The first ``offered`` inside ``fn`` takes the region; later ones run as is. Runs as is where
    the sources are small (:func:`worth_rebuilding`: the offered tensors are about their size)."""
    if _plan()[0] is not None or not all(worth_rebuilding(s) for s in sources):
        return fn(*args, **kwargs)
    stack = _local.__dict__.setdefault("pending", [])
    group = _Group(rebuild, sources)
    stack.append(group)
    try:
        return fn(*args, **kwargs)
    finally:
        stack.pop()
        if group.layouts:  # the offer was taken: the rerun will deposit what the slots hold now
            for slot in group.slots:
                slot.rerun, slot.xa = True, None
        elif group.slots:  # no rerun will come: kept after all, through the outer hooks as any saved tensor is
            outer = _plan()[1]
            for slot in group.slots:
                slot.keep(outer)


class LowRankSlot:
    """Where a LoRA projection inside a ``rebuilding_offered`` region finds, in backward, the ``dropout(x)·Aᵀ`` it did
    not save: held here until the region ends; after it, deposited by the region's rerun if the offer was taken."""

    __slots__ = ("xa", "rerun", "shape", "packed", "unpack")

    def __init__(self):
        self.xa: torch.Tensor | None = None
        self.rerun, self.shape, self.packed, self.unpack = False, None, None, None

    def hold(self, xa: torch.Tensor) -> None:
        """The forward's product (the projection saves none)."""
        self.xa, self.shape = xa, tuple(xa.shape)

    def keep(self, outer: tuple[Callable, Callable] | None) -> None:
        """The region ended without its offer taken: keep the product as a saved tensor (outer hooks see it)."""
        if self.xa is not None and outer is not None:
            self.packed, self.unpack, self.xa = outer[0](self.xa), outer[1], None

    def take(self) -> torch.Tensor | None:
        """The product for this backward (None if no rerun deposited it: the caller computes it)."""
        if self.packed is not None:
            return self.unpack(self.packed)
        xa = self.xa
        if self.rerun:
            self.xa = None  # deposited for this backward only; a second backward's rerun deposits again
        return xa


def low_rank_slot() -> LowRankSlot | None:
    """A slot for the ``dropout(x)·Aᵀ`` of the LoRA projection about to run (in grad mode) when a
    ``rebuilding_offered`` region is waiting for its offer; None elsewhere (the projection saves it as usual)."""
    stack = getattr(_local, "pending", None)
    if not stack or torch.compiler.is_compiling() or not torch.is_grad_enabled() or getattr(_local, "capturing", False):
        return None
    group = stack[-1]
    if group is None:
        return None
    slot = LowRankSlot()
    group.slots.append(slot)
    return slot


def capturing() -> bool:
    """A region's backward rerun is running (its LoRA projections hand their products over: ``deposit_low_rank``)."""
    return getattr(_local, "capturing", False)


def deposit_low_rank(xa: torch.Tensor) -> None:
    """In a region's rerun, hand ``xa`` to the slot the forward's projection at this point of the order took."""
    if torch.compiler.is_compiling():
        return
    rerun = getattr(_local, "rerun", None)
    if rerun is None or not getattr(_local, "capturing", False):
        return
    slots, i = rerun
    if i >= len(slots) or slots[i].shape not in (None, tuple(xa.shape)):
        raise RuntimeError("peftfast: the backward rerun ran other LoRA projections than the forward "
                           f"(projection {i}: {tuple(xa.shape)}; the forward had {len(slots)})")
    slots[i].xa = xa
    rerun[1] = i + 1


@contextlib.contextmanager
def offered(*tensors: torch.Tensor) -> Iterator[None]:
    """Around a kernel call on ``tensors``: in a ``rebuilding_offered`` region, what the kernel saves of them is
    rebuilt in backward; in :func:`capture` mode, hands the tensors to the rerun instead (raises); else nothing."""
    if getattr(_local, "capturing", False):
        raise _Captured(tensors)
    stack = getattr(_local, "pending", None)
    group = stack[-1] if stack else None
    if group is None:
        yield
        return
    reason, outer = _plan()
    if reason is not None or not group.register(tensors, outer):
        yield
        return
    stack[-1] = None  # taken: later offers in this region run as is
    with torch.autograd.graph.saved_tensors_hooks(group.pack, group.unpack):
        yield


def rng_state(device: torch.device) -> tuple:
    """What dropout seeds are drawn from (``peftfast.ops.lora.draw_seed``): torch's CPU generator and, on CUDA, the
    device's; for :func:`restored_rng` in a rerun."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), device, cuda


@contextlib.contextmanager
def restored_rng(state: tuple) -> Iterator[None]:
    """Inside: the generators as ``rng_state`` found them; after: as they were before (a forked stream)."""
    cpu, device, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else [], device_type="cuda"):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def capture(fn: Callable[..., Any], *args, **kwargs) -> tuple[torch.Tensor, ...]:
    """Run ``fn`` until its first ``offered``; return the offered tensors."""
    before = getattr(_local, "capturing", False)
    _local.capturing = True
    try:
        fn(*args, **kwargs)
    except _Captured as got:
        return got.tensors
    finally:
        _local.capturing = before
    raise RuntimeError("peftfast: the backward rerun of the forward never reached the kernel that saved its tensors")


__all__ = ["MIN_REBUILD_BYTES", "capture", "capturing", "deposit_low_rank", "low_rank_slot", "offered", "rebuild_scope",
           "rebuildable", "rebuilding", "rebuilding_offered", "restored_rng", "rng_state", "why_not_rebuild",
           "worth_rebuilding"]
