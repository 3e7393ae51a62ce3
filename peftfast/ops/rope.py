"""Rotary position embedding on q and k as one op (Triton on CUDA, C++ on CPU, else ATen).

Same maths as transformers' ``apply_rotary_pos_emb`` (``cos``/``sin`` from the model's rotary module, partial rotary
when ``cos`` is narrower than the head), in the pair layouts ``LAYOUTS`` name: rotate-half (Llama and most
families), interleaved pairs with interleaved ``cos`` (Cohere), interleaved pairs with ``cos`` halved and repeated
(GLM, GLM-4), and interleaved pairs written out as rotate-half halves (DeepSeek V3's MLA and the families that copy
it: ``apply_rotary_pos_emb_interleave``). Saved for backward: ``cos`` and ``sin``
only (the model holds them anyway); q and k are not kept, and no rotate-half temporaries are made. Registered as
``torch.ops.peftfast.rope`` (fake kernel and autograd included), so ``torch.compile`` traces it without a break.
"""

from __future__ import annotations

import torch
import triton

from peftfast import _ext
from peftfast.ops import _direct
from peftfast.ops._backend import interpreting, resolve_backend
from peftfast.ops._counters import launching

# pair layouts (kernels/rope.py): rotate-half; interleaved (2i, 2i+1) with cos[2i], cos[2i+1]; interleaved with cos[i];
# interleaved pairs in, rotate-half halves out, cos[i] (DeepSeek's apply_rotary_pos_emb_interleave)
LAYOUTS = ("half", "pairs", "pairs_half_cos", "deinterleave")


def _as_bhsd(t: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """A [B, H, S, D] view of q/k (given as [B, H, S, D] for unsqueeze_dim=1 or [B, S, H, D] for 2)."""
    return t if unsqueeze_dim == 1 else t.transpose(1, 2)


def _cs_strides(c: torch.Tensor) -> tuple[int, int, int]:
    return (0 if c.shape[0] == 1 else c.stride(0)), c.stride(1), c.stride(2)


def _launch(q, k, cos, sin, unsqueeze_dim, backward, layout="half"):
    qv, kv = _as_bhsd(q, unsqueeze_dim), _as_bhsd(k, unsqueeze_dim)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    qov, kov = _as_bhsd(qo, unsqueeze_dim), _as_bhsd(ko, unsqueeze_dim)
    b, hq, s, d = qv.shape
    hk = kv.shape[1]
    rot = cos.shape[-1]
    block_h = 4 if interpreting() else min(16, triton.next_power_of_2(max(hq, hk)))
    grid = (b * s, triton.cdiv(hq, block_h) + triton.cdiv(hk, block_h))
    from peftfast.kernels import rope as K

    with launching("_rope_kernel"):
        K._rope_kernel[grid](
            qv, *qv.stride(), kv, *kv.stride(), qov, *qov.stride(), kov, *kov.stride(),
            cos, *_cs_strides(cos), sin, *_cs_strides(sin), s, hq, hk, rot, d,
            BACKWARD=backward, LAYOUT=LAYOUTS.index(layout), BLOCK_H=block_h,
            BLOCK_HALF=max(1, triton.next_power_of_2(rot // 2)),
            BLOCK_D=triton.next_power_of_2(max(d - rot, 1)), num_warps=1 if interpreting() else 4,
        )
    return qo, ko


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
            layout: str = "half") -> torch.Tensor:
    """The torch backend: one fp32 computation per tensor, rounded once (cos/sin already unsqueezed)."""
    rot = cos.shape[-1]
    half = rot // 2
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x[..., :rot].to(ct)
    c, s = cos.to(ct), sin.to(ct)
    # the de-interleaving layout reads interleaved pairs and writes halves; its backward (the transpose) the reverse
    halves_in = layout == "half" or (layout == "deinterleave" and backward)
    halves_out = layout == "half" or (layout == "deinterleave" and not backward)
    if halves_in:
        x1, x2 = xf[..., :half], xf[..., half:]
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    if layout == "half":
        c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    elif layout == "pairs":
        c1, c2, s1, s2 = c[..., 0::2], c[..., 1::2], s[..., 0::2], s[..., 1::2]
    else:
        c1 = c2 = c[..., :half]
        s1 = s2 = s[..., :half]
    if backward:
        y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    y = torch.cat((y1, y2), dim=-1) if halves_out else torch.stack((y1, y2), dim=-1).flatten(-2)
    if rot == x.shape[-1]:
        return y.to(x.dtype)
    return torch.cat((y.to(x.dtype), x[..., rot:]), dim=-1)


def _seq_major(t: torch.Tensor, unsqueeze_dim: int) -> bool:
    """True for a [B, H, S, D] view of [B, S, H, D] memory: the layout of the models' q/k projections."""
    return unsqueeze_dim == 1 and t.transpose(1, 2).is_contiguous() and not t.is_contiguous()


def _apply(q, k, cos, sin, unsqueeze_dim: int, backward: bool, backend: str, layout: str = "half"):
    if backend == "triton":
        return _launch(q, k, cos, sin, unsqueeze_dim, backward, layout)
    if backend == "cpp" and layout == "half":  # csrc/rope.cpp: one pass, the torch backend's maths and layouts
        qo, ko = _direct.undifferentiated(torch.ops.peftfast.rope_rotate, 
            _as_bhsd(q, unsqueeze_dim), _as_bhsd(k, unsqueeze_dim), cos, sin, backward,
            unsqueeze_dim == 2 or _seq_major(q, 1), unsqueeze_dim == 2 or _seq_major(k, 1))
        return _as_bhsd(qo, unsqueeze_dim), _as_bhsd(ko, unsqueeze_dim)
    outs = []
    for t in (q, k):
        if _seq_major(t, unsqueeze_dim):
            # rotate in the projections' own [B, S, H, D] order: the result keeps their layout, so the attention
            # output is sequence-major too and the o-projection's input is a view of it (one copy of the hidden
            # states fewer, in forward and among what backward keeps)
            outs.append(_rotate(t.transpose(1, 2), cos.unsqueeze(2), sin.unsqueeze(2), backward, layout)
                        .transpose(1, 2))
        else:
            outs.append(_rotate(t, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim), backward, layout))
    return tuple(outs)


def _bhsd_out(x: torch.Tensor, seq_major: bool) -> torch.Tensor:
    """An output like ``x``, with [B, S, H, D] memory where ``seq_major`` (what the torch backend and
    ``peftfast::rope_rotate`` allocate)."""
    return x.new_empty(x.transpose(1, 2).shape).transpose(1, 2) if seq_major else x.new_empty(x.shape)


def _like_torch(t: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """The torch backend's output layout (see ``_apply``)."""
    return _bhsd_out(t, _seq_major(t, unsqueeze_dim))


# A registered op (not a Python autograd.Function), so torch.compile traces it as one node with the fake kernel
# below. ``backward=True`` applies the inverse rotation (the transpose of the forward's linear map). ``backend``:
# triton, cpp (the C++ kernel peftfast::rope_rotate, same output layouts as torch; rotate-half only, the other
# layouts run the torch maths) or torch. ``layout``: one of LAYOUTS.
@torch.library.custom_op("peftfast::rope", mutates_args=(), schema="(Tensor q, Tensor k, Tensor cos, Tensor sin, "
                         "int unsqueeze_dim, bool backward, str backend, str layout=\"half\") -> (Tensor, Tensor)")
def _rope_op(q, k, cos, sin, unsqueeze_dim, backward, backend, layout="half"):
    return _apply(q, k, cos, sin, unsqueeze_dim, backward, backend, layout)


@_rope_op.register_fake
def _(q, k, cos, sin, unsqueeze_dim, backward, backend, layout="half"):
    if backend == "triton":  # the kernel writes into empty_like: the inputs' strides
        return torch.empty_like(q), torch.empty_like(k)
    return _like_torch(q, unsqueeze_dim), _like_torch(k, unsqueeze_dim)


if _ext.available():  # the C++ kernel's fake (its autograd is peftfast::rope's, which calls it)
    torch.library.register_fake("peftfast::rope_rotate")(
        lambda q, k, cos, sin, backward, q_seq_major, k_seq_major: (_bhsd_out(q, q_seq_major),
                                                                    _bhsd_out(k, k_seq_major)))


def _setup(ctx, inputs, output) -> None:
    q, k, cos, sin, unsqueeze_dim, _, backend, *layout = inputs
    ctx.save_for_backward(cos, sin)
    ctx.meta = (unsqueeze_dim, backend, q.shape, k.shape, q.dtype, k.dtype, layout[0] if layout else "half")


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    unsqueeze_dim, backend, q_shape, k_shape, q_dtype, k_dtype, layout = ctx.meta
    if dq is None:
        dq = torch.zeros(q_shape, dtype=q_dtype, device=cos.device)
    if dk is None:
        dk = torch.zeros(k_shape, dtype=k_dtype, device=cos.device)
    gq, gk = _rope_op(dq, dk, cos, sin, unsqueeze_dim, True, backend, layout)
    return gq, gk, None, None, None, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, unsqueeze_dim: int = 1,
         backend: str = "auto", name: str = "rope", layout: str = "half") -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb`` fused: q [B, HQ, S, D], k [B, HK, S, D] (unsqueeze_dim=1; [B, S, H, D] with 2),
    cos/sin [B or 1, S, R] with R ≤ D even, pairs as ``layout`` says (``LAYOUTS``). Returns the rotated (q, k);
    gradients flow to q and k."""
    where = f"peftfast: {name}"
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"{where}: unsqueeze_dim must be 1 or 2, got {unsqueeze_dim}")
    if layout not in LAYOUTS:
        raise ValueError(f"{where}: unknown RoPE layout {layout!r}; choose one of {LAYOUTS}")
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        raise ValueError(f"{where}: expected 4-D q/k and matching 3-D cos/sin, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    qv, kv = _as_bhsd(q, unsqueeze_dim), _as_bhsd(k, unsqueeze_dim)
    rot = cos.shape[-1]
    if rot % 2 or rot > q.shape[-1] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{where}: rotary dim {rot} must be even and ≤ head dim {q.shape[-1]} (k: {k.shape[-1]})")
    if qv.shape[0] != kv.shape[0] or qv.shape[2] != kv.shape[2] or cos.shape[1] != qv.shape[2] or \
            cos.shape[0] not in (1, qv.shape[0]):
        raise ValueError(f"{where}: batch/sequence sizes of q {tuple(q.shape)}, k {tuple(k.shape)} and cos "
                         f"{tuple(cos.shape)} do not match")
    be = resolve_backend(backend, q.device)
    return _direct.call(torch.ops.peftfast.rope.default, _setup, _backward,
                        (q, k, cos, sin, unsqueeze_dim, False, be if be in ("triton", "cpp") else "torch", layout),
                        (-1, -1))


__all__ = ["LAYOUTS", "rope"]
