"""Fused RoPE for an attention module: its own forward runs with ``apply_rotary_pos_emb`` served by peftfast.

transformers' attention forwards call the module-level ``apply_rotary_pos_emb`` of their modeling file. The
patched instance's forward swaps that global for the fused op for the duration of its own call only (other
instances and models called after it see the original), so the patch stays per instance and nothing of
transformers' source is copied. An unpatched model running in another thread inside that window would compute the
same maths through the fused op. ``why_not`` probes the model's function numerically against the
fused op once, so a transformers release that changes the maths is refused with a reason rather than silently
mis-fused.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from peftfast.modules._bind import bind_forward, unbind_forward
from peftfast.ops.rope import rope

_GLOBAL = "apply_rotary_pos_emb"
_lock = threading.RLock()
_probed: dict[int, str | None] = {}


def _module_of(attn: nn.Module):
    return sys.modules.get(type(attn).__module__)


def _probe(fn) -> str | None:
    """None if ``fn`` (the model's apply_rotary_pos_emb) computes what the fused op does on a random probe."""
    key = id(fn)
    if key not in _probed:
        g = torch.Generator().manual_seed(0)
        q, k = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 1, 5, 8, generator=g,
                                                                                        dtype=torch.float64)
        reason = None
        for rot in (8, 4):
            cos, sin = torch.randn(2, 5, rot, generator=g, dtype=torch.float64), torch.randn(2, 5, rot, generator=g,
                                                                                               dtype=torch.float64)
            try:
                want = fn(q, k, cos, sin)
            except Exception as exc:  # e.g. a form without partial rotary: accept if the full-width probe matched
                if rot == 8:
                    reason = f"{_GLOBAL} raised on a probe ({type(exc).__name__})"
                break
            got = rope(q, k, cos, sin, backend="torch")
            if not all(torch.allclose(a, b, atol=1e-12) for a, b in zip(got, want)):
                reason = f"{_GLOBAL} computes something else than the rotate-half RoPE (rotary dim {rot})"
                break
        _probed[key] = reason
    return _probed[key]


def why_not(attn: nn.Module) -> str | None:
    """None if this attention module's RoPE can be fused, else a one-line reason."""
    mod = _module_of(attn)
    fn = getattr(mod, _GLOBAL, None)
    if fn is None:
        return "its modeling file has no apply_rotary_pos_emb (no RoPE, or another form)"
    if isinstance(fn, functools.partial) and fn.func is _fused:
        fn = fn.keywords["original"]
    return _probe(fn)


@dataclass
class RoPEState:
    name: str
    backend: str
    previous_forward: object | None
    fused_calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)


def _fused(q, k, cos, sin, *args, original, state: RoPEState, **kwargs):
    unsqueeze_dim = kwargs.pop("unsqueeze_dim", 1)
    if len(args) == 1 and isinstance(args[0], int) and not kwargs:
        unsqueeze_dim, args = args[0], ()
    if args or kwargs or cos.dim() != 3 or q.dim() != 4 or unsqueeze_dim not in (1, 2):
        state.fallbacks["unexpected apply_rotary_pos_emb arguments"] += 1
        return original(q, k, cos, sin, *args, unsqueeze_dim=unsqueeze_dim, **kwargs)
    state.fused_calls += 1
    return rope(q, k, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim=unsqueeze_dim, backend=state.backend,
                name=state.name)


def fused_rope_attention_forward(self: nn.Module, *args, **kwargs):
    """``forward`` of a patched attention module: the original, with the fused RoPE in its modeling file."""
    st: RoPEState = self._peftfast_rope
    forward = st.previous_forward or functools.partial(type(self).forward, self)
    mod = _module_of(self)
    with _lock:
        original = getattr(mod, _GLOBAL)
        setattr(mod, _GLOBAL, functools.partial(_fused, original=original, state=st))
    try:
        return forward(*args, **kwargs)
    finally:
        with _lock:
            setattr(mod, _GLOBAL, original)


def install(attn: nn.Module, name: str, backend: str) -> None:
    st = getattr(attn, "_peftfast_rope", None)
    if st is not None:
        st.backend = backend
        return
    bind_forward(attn, "_peftfast_rope", RoPEState(name=name, backend=backend, previous_forward=None),
                 fused_rope_attention_forward)


def uninstall(attn: nn.Module) -> None:
    unbind_forward(attn, "_peftfast_rope")


def is_rope_attention(module: nn.Module) -> bool:
    """Attention modules of RoPE families: q/k projections and a modeling file with apply_rotary_pos_emb."""
    has_proj = (hasattr(module, "q_proj") and hasattr(module, "k_proj")) or hasattr(module, "qkv_proj")
    return has_proj and getattr(_module_of(module), _GLOBAL, None) is not None
