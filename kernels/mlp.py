"""Triton kernels for the gated MLP activation of the fused LoRA-MLP (SwiGLU / GeGLU), forward and backward.

    g, u   [M, I]   gate and up projections (pre-activation; saved by the LoRA-MLP op)
    h      [M, I]   h = act(g) · u, the down projection's input (never saved: recomputed in backward)
    dh     [M, I]   gradient of h
    dg = dh · u · act'(g),  du = dh · act(g)          (one pass; h is rebuilt by the same kernel's forward)

Element-wise in fp32 registers; flat 1-D offsets in int64 (M · I passes 2**31 at long contexts).
ACT: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation).
"""

import triton
import triton.language as tl


@triton.jit
def _gate_act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        t = 2.0 / (1.0 + tl.exp(-2.0 * (0.7978845608028654 * (g + 0.044715 * g * g * g)))) - 1.0
        return 0.5 * g * (1.0 + t)


@triton.jit
def _gate_act_grad(g, ACT: tl.constexpr):
    if ACT == 0:
        sig = 1.0 / (1.0 + tl.exp(-g))
        return sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:
        return 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476)) + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    else:
        t = 2.0 / (1.0 + tl.exp(-2.0 * (0.7978845608028654 * (g + 0.044715 * g * g * g)))) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)


@triton.jit
def _act_mul_fwd_kernel(g_ptr, u_ptr, h_ptr, numel, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """``h = act(g) · u`` over contiguous [M, I] tensors; grid (cdiv(numel, BLOCK),)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, (_gate_act(g, ACT) * u).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _act_mul_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, numel, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """``dg = dh · u · act'(g)``, ``du = dh · act(g)``; reads dh, g, u once, writes dg and du."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    dh = tl.load(dh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(dg_ptr + offs, (dh * u * _gate_act_grad(g, ACT)).to(dg_ptr.dtype.element_ty), mask=ok)
    tl.store(du_ptr + offs, (dh * _gate_act(g, ACT)).to(du_ptr.dtype.element_ty), mask=ok)
