"""Fused RoPE for an attention module: its own forward runs with ``apply_rotary_pos_emb`` served by peftfast.

transformers' attention forwards call the module-level ``apply_rotary_pos_emb`` of their modeling file. A patched
instance runs a copy of its class's ``forward`` whose code reads that global under a per-instance alias name (set in
the modeling module at install, removed at uninstall), bound to the fused op: the module's own function is never
replaced, so other instances, models and threads see the original, nothing of transformers' source is copied, and
``torch.compile`` traces the call like any other (no lock, no global swapped during the call). Where another
instance-level ``forward`` was installed first (e.g. accelerate hooks) the global is swapped around the call under a
lock instead (eager only). ``why_not`` probes the model's function numerically against the fused op once, in each
of its pair layouts (rotate-half; Cohere's and GLM's interleaved pairs; gpt-oss's rotate-half with half-width
``cos``/``sin`` tables, which the patched call widens to the rotate-half tables, ``[c | c]``, a B·S·D copy per
layer), and the layout that matches is the one the patched calls use; a transformers release that changes the maths
is refused with a reason rather than mis-fused.

With ``patch(recompute="attn")`` the patched forward is also where backward reruns the attention up to its kernel
(``peftfast.ops.recompute.rebuilding_offered``): from the module's input, under the forward's RNG state, without
the cache, so the fused attention kernel keeps no q, k, v; in fused blocks that input is itself the norm output
backward rebuilds. The q/k/v LoRA projections keep no ``dropout(x)·Aᵀ`` either: the rerun makes it again on its
way and hands it to their backward (``peftfast.ops.recompute.low_rank_slot``). Any RoPE attention patched here,
fused block or not (Gemma 2, Phi-3), gets it.
"""

from __future__ import annotations

import dis
import functools
import sys
import threading
import types
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from peftfast.modules._bind import CACHE_KWARGS, bind_forward, unbind_forward, zero3_partitioned
from peftfast.modules._tally import Tallied, muted, tally
from peftfast.ops.recompute import capture, rebuilding_offered, restored_rng, rng_state, why_not_rebuild
from peftfast.ops.rope import LAYOUTS, rope

_GLOBAL = "apply_rotary_pos_emb"
# the module-level RoPE functions a forward may call, each served by the fused op in the layout its probe finds:
# DeepSeek V3's MLA (and GLM-4 MoE lite, Mistral 4, LongCat, ...) call the second where config.rope_interleave
_GLOBALS = (_GLOBAL, "apply_rotary_pos_emb_interleave")
_lock = threading.RLock()
_probed: dict[int, tuple[str | None, str]] = {}  # id of a model's function -> (reason, pair layout)


def _module_of(attn: nn.Module):
    return sys.modules.get(type(attn).__module__)


def _probe(fn, name: str = _GLOBAL) -> str | None:
    """None if ``fn`` (the model's ``name``) computes what the fused op does, in one of its pair layouts
    (``peftfast.ops.rope.LAYOUTS``: rotate-half, Cohere's interleaved pairs, GLM's, DeepSeek's de-interleaving), on
    a random probe."""
    key = id(fn)
    if key not in _probed:
        _probed[key] = _probe_layouts(fn, name)
    return _probed[key][0]


def _layout(fn) -> str:
    """The pair layout ``fn`` was found to compute (rotate-half where the probe found none)."""
    _probe(fn)
    return _probed[id(fn)][1]


HALF_TABLE = "half_table"  # rotate-half, cos/sin given at half the head width (gpt-oss)


def _widen(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t], dim=-1)


def _widened(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[t | t]`` in ``dtype``, made once per table: a model's layers share one pair of half-width tables per
    forward, so the layers after the first reuse (and keep for backward) the first one's copy instead of a B·S·D
    copy each. The copy lives on the table (as long as it does) and is remade if the table is written to."""
    if t.requires_grad or torch.compiler.is_compiling():  # compiled graphs share the one cat themselves
        return _widen(t).to(dtype)
    memo = t.__dict__.get("_peftfast_wide")
    if memo is not None and memo[0] == t._version and memo[1].dtype == dtype:
        return memo[1]
    wide = _widen(t).to(dtype)
    t.__dict__["_peftfast_wide"] = (t._version, wide)
    return wide


def _probe_layouts(fn, name: str = _GLOBAL) -> tuple[str | None, str]:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 1, 5, 8, generator=g,
                                                                                    dtype=torch.float64)
    tables = {rot: (torch.randn(2, 5, rot, generator=g, dtype=torch.float64),
                    torch.randn(2, 5, rot, generator=g, dtype=torch.float64)) for rot in (8, 4)}
    first = None
    for layout in LAYOUTS:
        reason = None
        for rot, (cos, sin) in tables.items():
            try:
                want = fn(q, k, cos, sin)
            except Exception as exc:  # e.g. a form without partial rotary: accept if the full-width probe matched
                if rot == 8:
                    return _probe_half_table(fn, q, k, *tables[4]) or (
                        f"{name} raised on a probe ({type(exc).__name__})", "half")
                break
            got = rope(q, k, cos, sin, backend="torch", layout=layout)
            if not all(torch.allclose(a, b, atol=1e-12) for a, b in zip(got, want)):
                reason = (f"{name} computes something else than the rotate-half or interleaved RoPE (rotary dim "
                          f"{rot})")
                break
        if reason is None:
            return None, layout
        first = first or reason
    return first, "half"


def _probe_half_table(fn, q, k, cos, sin) -> tuple[None, str] | None:
    """(None, HALF_TABLE) when ``fn`` takes half-width tables and computes rotate-half with ``[c | c]``, ``[s | s]``
    (gpt-oss: ``x1·c - x2·s | x2·c + x1·s``), else None."""
    try:
        want = fn(q, k, cos, sin)
    except Exception:
        return None
    got = rope(q, k, _widen(cos), _widen(sin), backend="torch", layout="half")
    return (None, HALF_TABLE) if all(torch.allclose(a, b, atol=1e-12) for a, b in zip(got, want)) else None


def _unfused(fn):
    """The model's own function behind ``fn`` (the module global, swapped by a call on the lock path)."""
    return fn.keywords["original"] if isinstance(fn, functools.partial) and fn.func is _fused else fn


def _present(mod) -> list[str]:
    """The RoPE functions of ``_GLOBALS`` that the modeling module ``mod`` defines."""
    return [n for n in _GLOBALS if getattr(mod, n, None) is not None]


def why_not(attn: nn.Module) -> str | None:
    """None if this attention module's RoPE can be fused, else a one-line reason: every RoPE function of its
    modeling file that a forward may call must pass its probe."""
    mod = _module_of(attn)
    names = _present(mod)
    if not names:
        return ("its modeling file has no apply_rotary_pos_emb (no RoPE, or another form: e.g. DeepSeek-V2's "
                "complex apply_rotary_emb)")
    return next((r for r in (_probe(_unfused(getattr(mod, n)), n) for n in names) if r is not None), None)


@dataclass
class RoPEState(Tallied):
    name: str
    backend: str
    previous_forward: object | None
    owner: type | None = None  # the attention class whose forward is re-bound (None: the global-swap path)
    # patch(recompute="attn"): backward reruns this attention up to its kernel instead of the kernel keeping q, k, v
    rebuild_qkv: bool = False
    fused_calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)

    def _register(self) -> None:
        super()._register()
        self.forward_fn, self.release = _rebind(self) if self.owner is not None else (None, None)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for k in ("forward_fn", "release"):  # rebuilt for the copy's own key
            state.pop(k, None)
        return state


def _fused(q, k, cos, sin, *args, original, key: int, backend: str, name: str, layout: str = "half", **kwargs):
    unsqueeze_dim = kwargs.pop("unsqueeze_dim", 1)
    if len(args) == 1 and isinstance(args[0], int) and not kwargs:
        unsqueeze_dim, args = args[0], ()
    if args or kwargs or cos.dim() != 3 or q.dim() != 4 or unsqueeze_dim not in (1, 2) or (
            layout == HALF_TABLE and 2 * cos.shape[-1] != q.shape[-1]):
        tally(key, "fallbacks", "unexpected apply_rotary_pos_emb arguments")
        return original(q, k, cos, sin, *args, unsqueeze_dim=unsqueeze_dim, **kwargs)
    tally(key, "fused_calls")
    if layout == HALF_TABLE:
        cos, sin, layout = _widened(cos, q.dtype), _widened(sin, q.dtype), "half"
    return rope(q, k, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim=unsqueeze_dim, backend=backend, name=name,
                layout=layout)


def _alias(key: int, name: str) -> str:
    return f"__peftfast_{name}_{key}__"


def _renamed(code: types.CodeType, aliases: dict[str, str]) -> types.CodeType:
    """``code`` (and the code objects nested in it) with each global of ``aliases`` (name -> alias) read as its
    alias."""
    consts = tuple(_renamed(c, aliases) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    names = tuple(aliases.get(n, n) for n in code.co_names)
    return code.replace(co_names=names, co_consts=consts)


def _reads_global_only(code: types.CodeType, names: tuple[str, ...]) -> bool:
    """True if every use of the names in ``code`` (and nested code) is a global read, so renaming them is exact."""
    ok = all(i.opname == "LOAD_GLOBAL" for i in dis.get_instructions(code) if i.argval in names)
    return ok and all(_reads_global_only(c, names) for c in code.co_consts if isinstance(c, types.CodeType))


def _drop_alias(globals_: dict, aliases) -> None:
    for alias in aliases:
        globals_.pop(alias, None)


def _served(st: RoPEState, original) -> functools.partial:
    """What a patched call reads for one of the model's RoPE functions: the fused op in the layout its probe found."""
    return functools.partial(_fused, original=original, key=st.tally_key, backend=st.backend, name=st.name,
                             layout=_layout(original))


def _rebind(st: RoPEState):
    """The owner's forward with ``apply_rotary_pos_emb`` read from a per-instance alias in its modeling module.

    The alias (``functools.partial(_fused, ...)`` of constants only, so the module's globals keep no reference to
    the model) is set here, outside any traced call, and removed when the state goes; the module's own
    ``apply_rotary_pos_emb`` is never touched, so other instances, models and threads see the original.
    """
    mod = sys.modules.get(st.owner.__module__)
    if mod is None:
        return None, None
    aliases = {n: _alias(st.tally_key, n) for n in _present(mod)}
    new = _renamed_function(st.owner.forward, aliases, vars(mod))
    if new is None:
        return None, None
    g = vars(mod)
    for n, alias in aliases.items():
        g[alias] = _served(st, _unfused(g[n]))
    release = weakref.finalize(st, _drop_alias, g, tuple(aliases.values()))
    return new, release


def _copy_function(fn: types.FunctionType, code: types.CodeType, closure: tuple | None) -> types.FunctionType:
    new = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__, new.__doc__ = fn.__qualname__, fn.__doc__
    new.__dict__.update(fn.__dict__)
    return new


def _renamed_function(fn, aliases: dict[str, str], module_globals: dict) -> types.FunctionType | None:
    """A copy of ``fn`` whose reads of the RoPE globals (in ``module_globals``) read their aliases (``aliases``:
    name -> alias).

    A decorated forward (``functools.wraps`` wrappers such as transformers' ``deprecate_kwarg``, which renamed
    ``past_key_values`` to ``cache`` in 5.24) is copied layer by layer: each wrapper keeps its own code and gets a
    closure whose cell holding the wrapped function holds the renamed copy instead, so the wrapper still runs.
    None where neither form applies (the caller then swaps the global around each call).
    """
    if not isinstance(fn, types.FunctionType):
        return None
    if fn.__globals__ is module_globals and any(n in fn.__code__.co_names for n in aliases):
        return _copy_function(fn, _renamed(fn.__code__, aliases), fn.__closure__) \
            if _reads_global_only(fn.__code__, tuple(aliases)) else None
    inner = getattr(fn, "__wrapped__", None)
    cells = fn.__closure__ or ()
    held = [i for i, c in enumerate(cells) if _cell_holds(c, inner)]
    if inner is None or len(held) != 1:
        return None
    renamed = _renamed_function(inner, aliases, module_globals)
    if renamed is None:
        return None
    closure = tuple(types.CellType(renamed) if i == held[0] else c for i, c in enumerate(cells))
    new = _copy_function(fn, fn.__code__, closure)
    new.__wrapped__ = renamed
    return new


def _cell_holds(cell: types.CellType, obj) -> bool:
    try:
        return obj is not None and cell.cell_contents is obj
    except ValueError:  # an empty cell
        return False


def _refresh_alias(st: RoPEState) -> None:
    """Re-point the alias at the current backend/name (a changed alias fails Dynamo's guard: recompiled, not stale)."""
    mod = sys.modules[st.owner.__module__]  # not forward.__globals__: a decorator's module for a wrapped forward
    g = vars(mod)
    for n in _present(mod):
        g[_alias(st.tally_key, n)] = _served(st, _unfused(g[n]))


def fused_rope_attention_forward(self: nn.Module, *args, **kwargs):
    """``forward`` of a patched attention module: the original, with the fused RoPE in place of the model's."""
    st: RoPEState = self._peftfast_rope
    # not under ZeRO-3: the rerun in backward would call the projections when their parameters are freed
    if st.rebuild_qkv and why_not_rebuild() is None and not zero3_partitioned(next(self.parameters(), None)):
        by_name = "hidden_states" in kwargs
        h = kwargs["hidden_states"] if by_name else args[0] if args else None
        if isinstance(h, torch.Tensor):
            # the attention kernel keeps no q, k, v: backward reruns this forward from its input up to the kernel
            # (projections under the same RNG state, hence the same LoRA dropout seeds; RoPE). The rerun gets no
            # cache, which the first forward only appends to; h itself is not held (in a fused block it is the
            # norm output that backward rebuilds).
            rest = {k: (None if k in CACHE_KWARGS else v) for k, v in kwargs.items() if k != "hidden_states"}
            rerun = functools.partial(_rerun_inputs, self, by_name, args if by_name else args[1:], rest,
                                      rng_state(h.device))
            return rebuilding_offered(rerun, (h,), _rope_forward, self, *args, **kwargs)
    return _rope_forward(self, *args, **kwargs)


def _rerun_inputs(self: nn.Module, by_name: bool, args: tuple, kwargs: dict, rng: tuple, h: torch.Tensor):
    """The (q, k, v) this attention handed its kernel in forward, again from its input ``h`` (in backward, under
    no_grad; its calls are not counted)."""
    with muted(), restored_rng(rng):
        if by_name:
            return capture(_rope_forward, self, *args, hidden_states=h, **kwargs)
        return capture(_rope_forward, self, h, *args, **kwargs)


def _rope_forward(self: nn.Module, *args, **kwargs):
    st: RoPEState = self._peftfast_rope
    if st.forward_fn is not None and st.previous_forward is None:
        return st.forward_fn(self, *args, **kwargs)
    # another instance-level forward was there first (e.g. accelerate hooks): swap the module global around the
    # call (eager only: Dynamo does not trace the lock)
    forward = st.previous_forward or functools.partial(type(self).forward, self)
    mod = _module_of(self)
    with _lock:
        originals = {n: getattr(mod, n) for n in _present(mod)}
        for n, original in originals.items():
            setattr(mod, n, _served(st, original))
    try:
        return forward(*args, **kwargs)
    finally:
        with _lock:
            for n, original in originals.items():
                setattr(mod, n, original)


def install(attn: nn.Module, name: str, backend: str, rebuild_qkv: bool = False) -> None:
    st = getattr(attn, "_peftfast_rope", None)
    if st is not None:
        st.rebuild_qkv = rebuild_qkv
        if st.backend != backend:
            st.backend = backend
            if st.forward_fn is not None:
                _refresh_alias(st)
        return
    previous = attn.__dict__.get("forward")
    st = RoPEState(name=name, backend=backend, previous_forward=None, owner=type(attn) if previous is None else None,
                   rebuild_qkv=rebuild_qkv)
    bind_forward(attn, "_peftfast_rope", st, fused_rope_attention_forward)


def uninstall(attn: nn.Module) -> None:
    st = unbind_forward(attn, "_peftfast_rope")
    if st is not None and st.release is not None:
        st.release()


def is_rope_attention(module: nn.Module) -> bool:
    """Attention modules of RoPE families: q/k projections (or a packed one: Phi-3's ``qkv_proj``, GPT-NeoX's
    ``query_key_value``, ModernBERT's ``Wqkv``) and a modeling file with one of the RoPE functions of ``_GLOBALS``;
    and every multi-head latent attention (``kv_a_proj_with_mqa``: MLA always rotates a slice of q and k), so that one
    whose RoPE takes another form (DeepSeek-V2's complex ``apply_rotary_emb``) is reported with that reason."""
    if hasattr(module, "kv_a_proj_with_mqa"):
        return True
    has_proj = (hasattr(module, "q_proj") and hasattr(module, "k_proj")) or \
        any(hasattr(module, p) for p in ("qkv_proj", "query_key_value", "Wqkv"))
    return has_proj and bool(_present(_module_of(module)))
