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

from peftfast.kernels.lora import _grouped_tile, _lowrank_tile


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
def _act_mul_fwd_kernel(g_ptr, sg, u_ptr, su, h_ptr, sh, cols, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """``h = act(g) · u`` over [M, I] rows; each tensor has its own row stride (unit column stride), so the
    halves of a packed ``[g | u]`` are read in place; grid (M, cdiv(I, BLOCK))."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < cols
    g = tl.load(g_ptr + row * sg + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * sh + offs, (_gate_act(g, ACT) * u).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _act_mul_bwd_kernel(dh_ptr, sdh, g_ptr, sg, u_ptr, su, dg_ptr, sdg, du_ptr, sdu, cols, ACT: tl.constexpr,
                        BLOCK: tl.constexpr):
    """``dg = dh · u · act'(g)``, ``du = dh · act(g)``; reads dh, g, u once, writes dg and du (row-strided, as the
    forward; dg and du may be the halves of one packed gradient); grid (M, cdiv(I, BLOCK))."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < cols
    dh = tl.load(dh_ptr + row * sdh + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * sg + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(dg_ptr + row * sdg + offs, (dh * u * _gate_act_grad(g, ACT)).to(dg_ptr.dtype.element_ty), mask=ok)
    tl.store(du_ptr + row * sdu + offs, (dh * _gate_act(g, ACT)).to(du_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _lora_epilogue(acc, scale, xa_ptr, stride_xam, stride_xar, b_ptr, stride_bn, stride_br, bias_ptr, lbias_ptr,
                   offs_m, offs_n, M, N, RANK, HAS_BIAS: tl.constexpr, HAS_LBIAS: tl.constexpr,
                   BLOCK_R: tl.constexpr, LORA_PRECISION: tl.constexpr):
    """``acc + scale · (xa·Bᵀ + lbias) + bias`` for one projection's fp32 tile ``acc = x·Wᵀ``.

    The low-rank term goes straight into the accumulator, (acc / s + xa·Bᵀ) · s, instead of acc + s · (xa·Bᵀ):
    equal up to fp32 rounding, and no third fp32 tile is live (with one, the large tiles spill registers). Bias and
    LoRA bias follow in the order _lora_gemm_kernel adds them.
    """
    n_ok = offs_n < N
    if scale != 0.0:
        acc = _lowrank_tile(acc * (1.0 / scale), xa_ptr, stride_xam, stride_xar, b_ptr, stride_bn, stride_br, offs_m,
                            offs_n, M, N, 0, RANK, BLOCK_R, LORA_PRECISION) * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LBIAS:
        acc += (tl.load(lbias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32) * scale)[None, :]
    return acc


@triton.jit
def _lora_gate_up_act_kernel(
    x_ptr, stride_xm, stride_xk,
    wg_ptr, stride_wgn, stride_wgk,
    wu_ptr, stride_wun, stride_wuk,
    xag_ptr, xau_ptr, stride_xam, stride_xar,
    bg_ptr, stride_bgn, stride_bgr,
    bu_ptr, stride_bun, stride_bur,
    biasg_ptr, biasu_ptr, lbiasg_ptr, lbiasu_ptr,
    g_ptr, u_ptr, h_ptr, stride_om, stride_on,
    M, N, K, RANK,
    scale_g, scale_u,
    ACT: tl.constexpr, HAS_BIAS_G: tl.constexpr, HAS_BIAS_U: tl.constexpr,
    HAS_LBIAS_G: tl.constexpr, HAS_LBIAS_U: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """Gate and up LoRA projections with the gated activation in the epilogue, one pass over ``x``:

        g = x @ W_gᵀ + b_g + scale_g * (xa_g @ B_gᵀ + bB_g)        [M, N]   (stored: saved for backward)
        u = x @ W_uᵀ + b_u + scale_u * (xa_u @ B_uᵀ + bB_u)        [M, N]   (stored: saved for backward)
        h = act(g) · u                                             [M, N]   (stored: the down projection's input)

    x [M, K] and W_g, W_u [N, K] by strides; xa_g, xa_u [M, RANK] are the gate/up column blocks of the grouped
    ``x·A_catᵀ`` (dropout already applied there, so the epilogue needs no mask); B_g, B_u [N, RANK]. g, u and h
    share one layout. Each K step loads the x tile once and feeds two MMAs into two fp32 accumulators. g and u
    are rounded to the output dtype before ``act``, so h is bit-identical to what the element-wise kernel
    computes from the stored g and u; g and u match the separate LoRA GEMMs up to fp32 rounding order.
    Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), grouped for L2 reuse.
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    wg_ptrs = wg_ptr + offs_k[:, None].to(tl.int64) * stride_wgk + offs_n[None, :] * stride_wgn
    wu_ptrs = wu_ptr + offs_k[:, None].to(tl.int64) * stride_wuk + offs_n[None, :] * stride_wun

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        xt = xt.to(wg.dtype)
        acc_g = tl.dot(xt, wg, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(xt, wu.to(wg.dtype), acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wgk
        wu_ptrs += BLOCK_K * stride_wuk

    # g is finished, rounded and stored before u's epilogue, so only acc_u and the 16-bit g are live there
    out_mask = m_ok[:, None] & n_ok[None, :]
    out_offs = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    acc_g = _lora_epilogue(acc_g, scale_g, xag_ptr, stride_xam, stride_xar, bg_ptr, stride_bgn, stride_bgr, biasg_ptr,
                           lbiasg_ptr, offs_m, offs_n, M, N, RANK, HAS_BIAS_G, HAS_LBIAS_G, BLOCK_R, LORA_PRECISION)
    g = acc_g.to(g_ptr.dtype.element_ty)
    tl.store(g_ptr + out_offs, g, mask=out_mask)
    acc_u = _lora_epilogue(acc_u, scale_u, xau_ptr, stride_xam, stride_xar, bu_ptr, stride_bun, stride_bur, biasu_ptr,
                           lbiasu_ptr, offs_m, offs_n, M, N, RANK, HAS_BIAS_U, HAS_LBIAS_U, BLOCK_R, LORA_PRECISION)
    u = acc_u.to(u_ptr.dtype.element_ty)
    tl.store(u_ptr + out_offs, u, mask=out_mask)
    h = _gate_act(g.to(tl.float32), ACT) * u.to(tl.float32)
    tl.store(h_ptr + out_offs, h.to(h_ptr.dtype.element_ty), mask=out_mask)
