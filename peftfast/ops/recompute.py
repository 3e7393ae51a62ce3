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
hooks. It steps aside, running the region as is, where rebuilding would not pay or not be sound: under
``torch.compile`` (the compiler picks what to save and recompute), inside activation checkpointing (only the
region's inputs are kept there already, and checkpointing's own hooks must see every saved tensor), without grad
mode, and where saved-tensor hooks are disabled.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

_CHECKPOINT_MODULE = "torch.utils.checkpoint"


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
            srcs = [self.outer_unpack(s) if self.outer_unpack is not None else s for s in self.sources]
            device, enabled, dtype = self.autocast  # backward runs outside the forward's autocast region
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = self.rebuild(*srcs)
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
    if reason is not None or not _single_storage(target):
        return fn(*args, **kwargs)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)
    storage, dtype = target.untyped_storage().data_ptr(), target.dtype
    holder: list[_Shared] = []  # created at the first save of the target, so unused regions cost nothing

    def pack(t: torch.Tensor):
        if t.dtype == dtype and t.untyped_storage().data_ptr() == storage and t.device == target.device:
            if not holder:
                srcs = [outer_pack(s) if outer_pack is not None else s.detach() for s in sources]
                dev = target.device.type
                autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
                holder.append(_Shared(rebuild, srcs, outer_unpack, autocast))
            return _Recipe(holder[0], t)
        if outer_pack is not None:
            return (outer_pack(t),)
        # detached: a saved output returned as itself would make a node -> tensor -> node cycle that leaks the
        # graph when no backward follows; autograd restores the saved tensor's history on unpack
        return t.detach()

    def unpack(p):
        if isinstance(p, _Recipe):
            return p.unpack()
        if outer_unpack is not None:
            return outer_unpack(p[0])
        return p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(*args, **kwargs)


__all__ = ["rebuilding", "why_not_rebuild"]
