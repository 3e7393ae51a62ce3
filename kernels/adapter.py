"""Triton kernels for the fused bottleneck Adapter (Houlsby / Pfeiffer / parallel), forward and backward.

Notation (``H`` = bottleneck width, at most 256, held whole in registers):

    x      [M, K]      adapter input (any 2-D strides)
    res    [M, N]      residual added to the output (``x`` itself for sequential adapters, N = K)
    Wd     [H, K]      down-projection, bd [H]
    Wu     [N, H]      up-projection,   bu [N]
    s                  scaling, read from a 1-element tensor (a learned scalar gets its gradient from ``ds``)

    forward   z  = x @ Wdᵀ + bd                     (saved: M × H, the only activation besides x)
              h  = res + s · act(z) @ Wuᵀ + bu        one launch: z stays in registers between the two products
    backward  u  = dh @ Wu                          (M × H, fp32 in registers)
              dz = s · u ⊙ act'(z)                   (written, M × H: the weight gradients need it)
              a  = act(z)                           (written, M × H, recomputed from z)
              dx = dz @ Wd  (+ dh when res is x)     one launch, one pass over dh and one write of dx
              ds = Σ a ⊙ u  (per program partials)   when the scaling is learned

Memory: neither act(z) nor the up-projection output nor any M × K intermediate is saved; the backward's M × H
buffers are transient. ``tl.dot`` accumulates in fp32; offsets along M are int64.

ACT: 0 relu, 1 gelu (erf), 2 silu, 3 gelu (tanh approximation).
"""

import triton
import triton.language as tl


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(z, 0.0)
    elif ACT == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        return z / (1.0 + tl.exp(-z))
    else:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return 0.5 * z * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        return (z > 0.0).to(tl.float32)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:
        sig = 1.0 / (1.0 + tl.exp(-z))
        return sig * (1.0 + z * (1.0 - sig))
    else:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        dinner = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner


@triton.jit
def _adapter_fwd_kernel(
    x_ptr, stride_xm, stride_xk,
    res_ptr, stride_resm, stride_resn,
    wd_ptr, stride_wdh, stride_wdk,
    bd_ptr,
    wu_ptr, stride_wun, stride_wuh,
    bu_ptr,
    z_ptr, stride_zm, stride_zh,
    out_ptr, stride_om, stride_on,
    M, K, N, H, scale_ptr,
    HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``z = x Wdᵀ + bd`` then ``out = res + s·act(z) Wuᵀ + bu`` for one BLOCK_M row block; grid (cdiv(M, BLOCK_M),).

    Reads x and res once, writes z (M × H) and out; act(z) never leaves registers.
    """
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr).to(tl.float32)  # a pointer, so a learned scaling needs no host sync
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BLOCK_H)
    m_ok = offs_m < M
    h_ok = offs_h < H
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wd = tl.load(wd_ptr + offs_h[None, :] * stride_wdh + offs_k[:, None].to(tl.int64) * stride_wdk,
                     mask=h_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x.to(wd.dtype), wd, acc, input_precision=DOT_PRECISION)
    if HAS_BD:
        acc += tl.load(bd_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_h[None, :] * stride_zh,
             acc.to(z_ptr.dtype.element_ty), mask=m_ok[:, None] & h_ok[None, :])
    # round z as stored, so the backward's recomputation from the saved z sees the same activation
    z = acc.to(z_ptr.dtype.element_ty).to(tl.float32)
    a = _act(z, ACT)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        wu = tl.load(wu_ptr + offs_n[None, :].to(tl.int64) * stride_wun + offs_h[:, None] * stride_wuh,
                     mask=n_ok[None, :] & h_ok[:, None], other=0.0)
        up = tl.dot(a.to(wu.dtype), wu, input_precision=DOT_PRECISION) * scale
        if HAS_BU:
            up += tl.load(bu_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        r = tl.load(res_ptr + offs_m[:, None] * stride_resm + offs_n[None, :].to(tl.int64) * stride_resn,
                    mask=mask, other=0.0)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :].to(tl.int64) * stride_on,
                 (r.to(tl.float32) + up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adapter_bwd_kernel(
    g_ptr, stride_gm, stride_gn,
    z_ptr, stride_zm, stride_zh,
    wd_ptr, stride_wdh, stride_wdk,
    wu_ptr, stride_wun, stride_wuh,
    dz_ptr, stride_dzm, stride_dzh,
    a_ptr, stride_am, stride_ah,
    dx_ptr, stride_dxm, stride_dxk,
    ds_ptr,
    M, K, N, H, scale_ptr,
    ADD_G: tl.constexpr, NEED_DX: tl.constexpr, NEED_DS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Row-block backward: ``dz``, ``a = act(z)`` (for dWu), ``dx = dz Wd (+ g)`` and ``ds`` partials.

    g [M, N] is read once (for ``u = g Wu``; a second time only when ADD_G folds the residual gradient into dx);
    grid (cdiv(M, BLOCK_M),). The weight gradients (reductions over M) are GEMMs the launcher runs on dz and a.
    """
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr).to(tl.float32)  # a pointer, so a learned scaling needs no host sync
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BLOCK_H)
    m_ok = offs_m < M
    h_ok = offs_h < H
    mh = m_ok[:, None] & h_ok[None, :]
    u = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :].to(tl.int64) * stride_gn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(wu_ptr + offs_n[:, None].to(tl.int64) * stride_wun + offs_h[None, :] * stride_wuh,
                     mask=n_ok[:, None] & h_ok[None, :], other=0.0)
        u = tl.dot(g.to(wu.dtype), wu, u, input_precision=DOT_PRECISION)
    z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_h[None, :] * stride_zh, mask=mh, other=0.0)
    z = z.to(tl.float32)
    a = _act(z, ACT)
    dz = u * _act_grad(z, ACT) * scale
    dz = tl.where(mh, dz, 0.0)
    tl.store(dz_ptr + offs_m[:, None] * stride_dzm + offs_h[None, :] * stride_dzh, dz.to(dz_ptr.dtype.element_ty),
             mask=mh)
    tl.store(a_ptr + offs_m[:, None] * stride_am + offs_h[None, :] * stride_ah, a.to(a_ptr.dtype.element_ty),
             mask=mh)
    if NEED_DS:
        tl.store(ds_ptr + pid, tl.sum(tl.sum(tl.where(mh, a * u, 0.0), axis=1), axis=0))
    if NEED_DX:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            wd = tl.load(wd_ptr + offs_h[:, None] * stride_wdh + offs_k[None, :].to(tl.int64) * stride_wdk,
                         mask=h_ok[:, None] & k_ok[None, :], other=0.0)
            dx = tl.dot(dz.to(wd.dtype), wd, input_precision=DOT_PRECISION)
            mask = m_ok[:, None] & k_ok[None, :]
            if ADD_G:
                dx += tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_k[None, :].to(tl.int64) * stride_gn,
                              mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :].to(tl.int64) * stride_dxk,
                     dx.to(dx_ptr.dtype.element_ty), mask=mask)
