"""Triton kernels for LoRA on mixture-of-experts stacks: grouped GEMMs over rows sorted by expert, one launch each.

The rows routed to the experts (S = tokens · top-k) are sorted by expert; expert e owns rows
``bounds[e]:bounds[e+1]``. A tile map (built on the device, no host sync) gives each M tile of ``BLOCK_M`` rows one
expert: ``tile_expert[t]`` (-1: no tile), its first row and its end row, so no tile straddles two experts.

``_moe_grouped_gemm_kernel``, for each tile of expert e and rows m::

    out[m, n] = Σ_k x[src(m), k] · W[e, n, k]  (+ scale · Σ_j L[m, j] · R[e, n, j])  (+ bias[e, n])

``src(m) = gather[m]`` (the token of sorted row m: the gather of the hidden states is never written out) or m.
W, R: any strides, so one kernel serves x·W_guᵀ, a·W_dᵀ, dy·W_d, dh·W_gu and both LoRA factor products, with PEFT's
[out, r·E] ``lora_B`` read in place. The low-rank term joins the fp32 accumulator in the epilogue: the output is
written once, and no merged W + s·B·A (E·N·K) is ever formed.

``_moe_grouped_wgrad_kernel``, per expert e: ``out[e, i, n] = scale · Σ_{m of e} P[m, i] · Q[src(m), n]`` (fp32),
the per-expert weight gradients (LoRA factors; base stacks that train), reduced over the expert's rows in
``BLOCK_M`` steps; grid (E, cdiv(NI, BLOCK_I), cdiv(N, BLOCK_N)). With P a stride-0 column of ones it is the
per-expert bias gradient (a column sum over the expert's rows, deterministic). W may be stored in another dtype
than x (fp32 stacks under autocast): each tile is cast on load, so the stack is never copied whole.

``_moe_glu_fwd_kernel`` / ``_moe_glu_bwd_kernel``: the gated activation between the two GEMMs where the MLP kernels'
``act_mul`` does not serve it: gate and up read with any column stride (gpt-oss interleaves them: ``h[:, 0::2]``,
``h[:, 1::2]``, read in place) and gpt-oss's clamped SwiGLU (ACT 3)::

    g' = min(g, limit),  u' = clamp(u, -limit, limit),  a = (u' + 1) · g' · σ(alpha · g')
    dg = da · (u' + 1) · (σ + alpha · g' · σ · (1 - σ)) · [g <= limit],   du = da · g' · σ · [|u| <= limit]

(ACT 0-2: silu, gelu, gelu-tanh times u, as ``peftfast.kernels.mlp``). Element-wise in fp32; dg and du are written
into the gradient of h in its own layout, so no de-interleaved copy of h or of its gradient exists. They serve the
path that keeps h for backward (``recompute=False``).

``_moe_gate_up_glu_kernel``: the gate/up GEMM with that activation in its epilogue (halves: gate and up in two
accumulators; interleaved: one twice as wide, split after the epilogue), writing a [S, I] and, where backward keeps
it, h; in backward's rerun it takes the activation's upstream gradient too and writes a, dh and each row's part of
the routing weights' ``Σ a·gd``, so h [S, 2I] is never written or read back in between, nor a read again for the
routing gradient.

``_moe_route_kernel``: the routing prologue, one launch instead of some thirty small torch ops. From the rows'
permutation ``perm`` that sorts the flat expert ids (stable) it writes each sorted row's token ``perm // top_k`` and
routing weight ``w[perm]``, and (program 0) the per-expert counts, ``bounds`` and the tile map: tile t belongs to the
first expert whose cumulative tile count passes t, its first row is ``bounds[e] + (t − first tile of e)·BLOCK_M``.
In the forward the counts come from the sorted ids themselves (two binary searches per expert), with a flag saying
whether every id is in ``[0, E)``; backward passes the forward's counts.

Row offsets are int64 (S · K passes 2**31 at 128 experts, top-8 and long batches).
"""

import triton
import triton.language as tl

from peftfast.kernels.lora import _lowrank_tile
from peftfast.kernels.mlp import _gate_act, _gate_act_grad


@triton.jit
def _tile_rows(tile_expert_ptr, tile_row_ptr, tile_end_ptr, gather_ptr, BLOCK_M: tl.constexpr, GATHER: tl.constexpr):
    """This program's M tile (axis 0) of the tile map: (its expert, -1 for a spare tile; then, int64, its sorted rows'
    offsets, which are in range, the end row, and their source rows: the gathered tokens or the rows themselves)."""
    pid_m = tl.program_id(0)
    e = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
    row0 = tl.load(tile_row_ptr + pid_m).to(tl.int64)
    row_end = tl.load(tile_end_ptr + pid_m).to(tl.int64)
    offs_m = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    m_ok = offs_m < row_end
    if GATHER:
        src = tl.load(gather_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    else:
        src = offs_m
    return e, offs_m, m_ok, row_end, src


@triton.jit
def _expert_gemm_tile(x_ptr, stride_xm, stride_xk, src, m_ok, w_base, stride_wn, stride_wk, cols, c_ok, K,
                      BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """``x[src]·W_eᵀ`` for the tile's rows and ``WIDTH`` output columns ``cols`` of one expert, fp32."""
    acc = tl.zeros((BLOCK_M, WIDTH), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xt = tl.load(x_ptr + src[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_base + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn,
                     mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _expert_epilogue(acc, l_ptr, stride_lm, stride_lr, r_e, stride_rn, stride_rr, b_e, stride_bn, scale, offs_m,
                     row_end, cols, c_ok, N, RANK, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_R: tl.constexpr, LORA_PRECISION: tl.constexpr):
    """``acc (+ scale·L·R_e[cols]ᵀ) (+ bias_e[cols])`` (N: R_e's row count, for its mask)."""
    if HAS_LORA:
        if scale != 0.0:
            # (acc / s + L·Rᵀ) · s: the low-rank product accumulates into the live tile (no second fp32 tile)
            acc = _lowrank_tile(acc * (1.0 / scale), l_ptr, stride_lm, stride_lr, r_e, stride_rn, stride_rr, offs_m,
                                cols, row_end, N, 0, RANK, BLOCK_R, LORA_PRECISION) * scale
    if HAS_BIAS:
        acc += tl.load(b_e + cols * stride_bn, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _moe_grouped_gemm_kernel(
    x_ptr, stride_xm, stride_xk,
    gather_ptr,
    w_ptr, stride_we, stride_wn, stride_wk,
    l_ptr, stride_lm, stride_lr,
    r_ptr, stride_re, stride_rn, stride_rr,
    bias_ptr, stride_be, stride_bn,
    rscale_ptr, scatter_ptr,
    out_ptr, stride_om, stride_on,
    tile_expert_ptr, tile_row_ptr, tile_end_ptr,
    N, K, RANK, scale,
    GATHER: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROW_SCALE: tl.constexpr, SCATTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """Grouped ``x·W[e]ᵀ (+ scale·L·R[e]ᵀ) (+ bias[e])`` over expert-sorted rows; grid (tiles, cdiv(N, BLOCK_N)).
    ``ROW_SCALE``: each row times ``rscale[m]`` (the routing weight); ``SCATTER``: row m stored at ``scatter[m]``
    (its token-major slot), so the down projection's and dx's rows land where the sum over top-k reads them, with
    no scaled copy and no scatter copy of [S, N] in between."""
    e, offs_m, m_ok, row_end, src = _tile_rows(tile_expert_ptr, tile_row_ptr, tile_end_ptr, gather_ptr, BLOCK_M,
                                               GATHER)
    if e < 0:  # a spare tile of the map
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = _expert_gemm_tile(x_ptr, stride_xm, stride_xk, src, m_ok, w_ptr + e * stride_we, stride_wn, stride_wk,
                            offs_n, n_ok, K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    acc = _expert_epilogue(acc, l_ptr, stride_lm, stride_lr, r_ptr + e * stride_re, stride_rn, stride_rr,
                           bias_ptr + e * stride_be, stride_bn, scale, offs_m, row_end, offs_n, n_ok, N, RANK,
                           HAS_LORA, HAS_BIAS, BLOCK_R, LORA_PRECISION)
    if ROW_SCALE:
        acc *= tl.load(rscale_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    if SCATTER:
        dst = tl.load(scatter_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    else:
        dst = offs_m
    tl.store(out_ptr + dst[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_grouped_wgrad_kernel(
    p_ptr, stride_pm, stride_pi,
    q_ptr, stride_qm, stride_qn,
    gather_ptr, bounds_ptr,
    out_ptr, stride_oe, stride_oi, stride_on,
    NI, N, scale,
    GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``out[e] = scale · P[rows of e]ᵀ · Q[src(rows of e)]`` [I, N] per expert; grid (E, cdiv(I, BLOCK_I),
    cdiv(N, BLOCK_N)). An expert without rows writes zeros."""
    e = tl.program_id(0).to(tl.int64)
    start = tl.load(bounds_ptr + e).to(tl.int64)
    end = tl.load(bounds_ptr + e + 1).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = offs_i < NI
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_I, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_ok = offs_m < end
        pt = tl.load(p_ptr + offs_m[None, :] * stride_pm + offs_i[:, None] * stride_pi,
                     mask=i_ok[:, None] & m_ok[None, :], other=0.0)
        if GATHER:
            src = tl.load(gather_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
        else:
            src = offs_m
        qt = tl.load(q_ptr + src[:, None] * stride_qm + offs_n[None, :] * stride_qn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(pt.to(qt.dtype), qt, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + e * stride_oe + offs_i[:, None] * stride_oi + offs_n[None, :] * stride_on,
             (acc * scale).to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & n_ok[None, :])


@triton.jit
def _glu(g, u, alpha, limit, ACT: tl.constexpr):
    if ACT == 3:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        return (uc + 1.0) * (gc / (1.0 + tl.exp(-alpha * gc)))
    else:
        return _gate_act(g, ACT) * u


@triton.jit
def _moe_glu_fwd_kernel(
    g_ptr, stride_gm, stride_gc, u_ptr, stride_um, stride_uc, a_ptr, stride_am,
    cols, alpha, limit, ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    """``a = glu(g, u)`` [M, I] with g, u at any strides; grid (M, cdiv(I, BLOCK))."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < cols
    g = tl.load(g_ptr + row * stride_gm + offs * stride_gc, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_um + offs * stride_uc, mask=ok, other=0.0).to(tl.float32)
    tl.store(a_ptr + row * stride_am + offs, _glu(g, u, alpha, limit, ACT).to(a_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _glu_grad(da, g, u, alpha, limit, ACT: tl.constexpr):
    """(dg, du) of ``a = glu(g, u)`` for the upstream ``da`` (fp32 tiles)."""
    if ACT == 3:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        sig = 1.0 / (1.0 + tl.exp(-alpha * gc))
        dg = tl.where(g <= limit, da * (uc + 1.0) * (sig + alpha * gc * sig * (1.0 - sig)), 0.0)
        du = tl.where((u >= -limit) & (u <= limit), da * gc * sig, 0.0)
    else:
        dg = da * u * _gate_act_grad(g, ACT)
        du = da * _gate_act(g, ACT)
    return dg, du


@triton.jit
def _moe_glu_bwd_kernel(
    da_ptr, stride_dam, g_ptr, stride_gm, stride_gc, u_ptr, stride_um, stride_uc,
    dg_ptr, stride_dgm, stride_dgc, du_ptr, stride_dum, stride_duc,
    cols, alpha, limit, ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    """(dg, du) of ``a = glu(g, u)``, written at any strides (the gate and up columns of one dh); grid as the
    forward."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < cols
    da = tl.load(da_ptr + row * stride_dam + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_gm + offs * stride_gc, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_um + offs * stride_uc, mask=ok, other=0.0).to(tl.float32)
    dg, du = _glu_grad(da, g, u, alpha, limit, ACT)
    tl.store(dg_ptr + row * stride_dgm + offs * stride_dgc, dg.to(dg_ptr.dtype.element_ty), mask=ok)
    tl.store(du_ptr + row * stride_dum + offs * stride_duc, du.to(du_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _moe_gate_up_glu_kernel(
    x_ptr, stride_xm, stride_xk,
    gather_ptr,
    w_ptr, stride_we, stride_wn, stride_wk,
    l_ptr, stride_lm, stride_lr,
    r_ptr, stride_re, stride_rn, stride_rr,
    bias_ptr, stride_be, stride_bn,
    gd_ptr, stride_gdm, stride_gdn, rw_ptr,
    rp_ptr, stride_rpm, stride_rpn,
    a_ptr, stride_am, stride_an,
    h_ptr, stride_hm, stride_hn,
    tile_expert_ptr, tile_row_ptr, tile_end_ptr,
    INTER, K, RANK, scale, alpha, limit,
    GATHER: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, INTERLEAVED: tl.constexpr,
    ACT: tl.constexpr, STORE_H: tl.constexpr, GRAD: tl.constexpr, ROUTE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """The gate/up grouped GEMM with the activation in its epilogue; grid (tiles, cdiv(I, BLOCK_N)), I = ``INTER``.

    For the tile's expert e and columns j of a, the gate and up columns of h are ``2j`` and ``2j + 1``
    (``INTERLEAVED``: gpt-oss) or ``j`` and ``I + j`` (halves)::

        g = x·W[e, gate]ᵀ + s·L·R[e, gate]ᵀ + bias[e, gate],   u likewise              (rounded to a's dtype)
        a = glu(g, u)                                                                  [S, I]   (stored)
        STORE_H: h[:, gate] = g, h[:, up] = u                                          (kept for backward)
        GRAD:    da = round(gd · w_row);  dh[:, gate], dh[:, up] = ∂glu · da           (h_ptr is dh)
        ROUTE_GRAD: rp[m, pid_n] = Σ_j round(a)·gd    (this tile's part of the routing weight's gradient, fp32)

    Halves: each K step loads the (gathered) x tile once for two MMAs into two fp32 accumulators. Interleaved: one
    contiguous [BLOCK_K, 2·BLOCK_N] W tile (no strided loads) into one accumulator, whose columns are split into
    gate and up in registers after the epilogue and joined back for the stores. Against a GEMM and then element-wise
    kernels, the forward never writes h [S, 2I] unless backward keeps it nor reads it back (2·S·2I elements of
    traffic and one launch fewer), and backward's rerun (``recompute``) writes a and dh with no h between (3·S·2I
    elements and two launches fewer). g and u are rounded before ``glu`` as a stored h would be, so a and dh equal
    the unfused path's up to the GEMM's fp32 rounding order; ``da`` is rounded to a's dtype as the unfused path rounds
    ``gd · w``.
    """
    e, offs_m, m_ok, row_end, src = _tile_rows(tile_expert_ptr, tile_row_ptr, tile_end_ptr, gather_ptr, BLOCK_M,
                                               GATHER)
    if e < 0:  # a spare tile of the map
        return
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < INTER
    mask = m_ok[:, None] & n_ok[None, :]
    w_base = w_ptr + e * stride_we
    r_e = r_ptr + e * stride_re
    b_e = bias_ptr + e * stride_be
    h_rows = h_ptr + offs_m[:, None] * stride_hm
    if INTERLEAVED:
        # h columns [2·j0, 2·j0 + 2·BLOCK_N): gate and up alternate
        offs_c = 2 * pid_n * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
        c_ok = offs_c < 2 * INTER
        acc = _expert_gemm_tile(x_ptr, stride_xm, stride_xk, src, m_ok, w_base, stride_wn, stride_wk, offs_c, c_ok,
                                K, BLOCK_M, 2 * BLOCK_N, BLOCK_K, DOT_PRECISION)
        acc = _expert_epilogue(acc, l_ptr, stride_lm, stride_lr, r_e, stride_rn, stride_rr, b_e, stride_bn, scale,
                               offs_m, row_end, offs_c, c_ok, 2 * INTER, RANK, HAS_LORA, HAS_BIAS, BLOCK_R,
                               LORA_PRECISION)
        hq = acc.to(a_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(h_rows + offs_c[None, :] * stride_hn, hq.to(h_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & c_ok[None, :])
        g, u = tl.split(tl.reshape(hq.to(tl.float32), (BLOCK_M, BLOCK_N, 2)))
    else:
        col_u = offs_n + INTER
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xt = tl.load(x_ptr + src[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wg = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            wu = tl.load(w_base + offs_k[:, None] * stride_wk + col_u[None, :] * stride_wn,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_g = tl.dot(xt, wg.to(xt.dtype), acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(xt, wu.to(xt.dtype), acc_u, input_precision=DOT_PRECISION)
        acc_g = _expert_epilogue(acc_g, l_ptr, stride_lm, stride_lr, r_e, stride_rn, stride_rr, b_e, stride_bn, scale,
                                 offs_m, row_end, offs_n, n_ok, 2 * INTER, RANK, HAS_LORA, HAS_BIAS, BLOCK_R,
                                 LORA_PRECISION)
        acc_u = _expert_epilogue(acc_u, l_ptr, stride_lm, stride_lr, r_e, stride_rn, stride_rr, b_e, stride_bn, scale,
                                 offs_m, row_end, col_u, n_ok, 2 * INTER, RANK, HAS_LORA, HAS_BIAS, BLOCK_R,
                                 LORA_PRECISION)
        gq = acc_g.to(a_ptr.dtype.element_ty)
        uq = acc_u.to(a_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(h_rows + offs_n[None, :] * stride_hn, gq.to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(h_rows + col_u[None, :] * stride_hn, uq.to(h_ptr.dtype.element_ty), mask=mask)
        g = gq.to(tl.float32)
        u = uq.to(tl.float32)
    a = _glu(g, u, alpha, limit, ACT)
    tl.store(a_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an, a.to(a_ptr.dtype.element_ty),
             mask=mask)
    if GRAD:
        gd = tl.load(gd_ptr + offs_m[:, None] * stride_gdm + offs_n[None, :] * stride_gdn, mask=mask, other=0.0)
        w_row = tl.load(rw_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)
        da = (gd.to(tl.float32) * w_row[:, None]).to(a_ptr.dtype.element_ty).to(tl.float32)
        dg, du = _glu_grad(da, g, u, alpha, limit, ACT)
        if ROUTE_GRAD:  # a as stored, so the sum is the one over the stored a and gd (masked gd is 0)
            part = tl.sum(a.to(a_ptr.dtype.element_ty).to(tl.float32) * gd.to(tl.float32), axis=1)
            tl.store(rp_ptr + offs_m * stride_rpm + pid_n * stride_rpn, part, mask=m_ok)
        if INTERLEAVED:
            dh = tl.reshape(tl.join(dg, du), (BLOCK_M, 2 * BLOCK_N))
            tl.store(h_rows + offs_c[None, :] * stride_hn, dh.to(h_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & c_ok[None, :])
        else:
            tl.store(h_rows + offs_n[None, :] * stride_hn, dg.to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(h_rows + col_u[None, :] * stride_hn, du.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lower_bound(sorted_ptr, n, target, steps):
    """First index of each ``target`` lane in the ascending ``sorted[0:n]`` (n where all are below), vectorised
    over the lanes; ``steps`` >= the bit length of n (a runtime bound: no recompile as n grows)."""
    lo = tl.zeros(target.shape, dtype=tl.int64)
    hi = lo + n
    for _ in range(0, steps):
        active = lo < hi
        mid = (lo + hi) // 2
        below = tl.load(sorted_ptr + mid, mask=active, other=0) < target
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    return lo


@triton.jit
def _moe_route_kernel(
    sorted_ptr, counts_ptr, perm_ptr, w_ptr, tok_ptr, ws_ptr,
    tile_expert_ptr, tile_row_ptr, tile_end_ptr, bounds_ptr, ok_ptr,
    S, E, NT, TOP_K, steps,
    FROM_SORTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """The routing prologue over S = T·top_k rows and E experts; grid (max(1, cdiv(S, BLOCK_S)),).

    Every program: ``tok[i] = perm[i] // TOP_K`` and ``ws[i] = w[perm[i]]`` for its BLOCK_S sorted rows. Program 0:
    ``counts`` [E] (``FROM_SORTED``: written, from the sorted ids ``sorted[i] = ids[perm[i]]``, and ``ok`` = whether
    they all lie in [0, E); else read), ``bounds`` [E + 1] (exclusive prefix sums, then S), and the tile map [NT]
    (NT = cdiv(S, BLOCK_M) + E): expert (-1 for a spare tile), first row, end row. Expert e's tiles are
    ``cum[e] − tiles[e] ≤ t < cum[e]`` with ``tiles = cdiv(counts, BLOCK_M)`` and ``cum`` their inclusive prefix sum,
    so tile t's expert is the number of experts with ``cum[e] ≤ t``; E ≤ BLOCK_E lanes, tiles BLOCK_T at a time.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs < S
    p = tl.load(perm_ptr + offs, mask=s_ok, other=0).to(tl.int64)
    tl.store(tok_ptr + offs, p // TOP_K, mask=s_ok)
    tl.store(ws_ptr + offs, tl.load(w_ptr + p, mask=s_ok, other=0.0), mask=s_ok)
    if pid == 0:
        e = tl.arange(0, BLOCK_E)
        e_ok = e < E
        if FROM_SORTED:
            first = _lower_bound(sorted_ptr, S, e, steps)
            counts = _lower_bound(sorted_ptr, S, e + 1, steps) - first
            tl.store(counts_ptr + e, counts, mask=e_ok)
            ends = tl.load(sorted_ptr + tl.where(tl.arange(0, 2) == 0, 0, S - 1), mask=tl.arange(0, 2) < S,
                           other=0)
            ok = (tl.min(ends, 0) >= 0) & (tl.max(ends, 0) < E)
            tl.store(ok_ptr, ok.to(tl.int64))
        else:
            counts = tl.load(counts_ptr + e, mask=e_ok, other=0).to(tl.int64)
        counts = tl.where(e_ok, counts, 0)
        starts = tl.cumsum(counts, 0) - counts
        tl.store(bounds_ptr + e, starts, mask=e_ok)
        tl.store(bounds_ptr + E, tl.sum(counts, 0))
        tiles = (counts + BLOCK_M - 1) // BLOCK_M
        cum = tl.cumsum(tiles, 0)
        base = starts - (cum - tiles) * BLOCK_M  # tile t of expert e starts at row base[e] + t·BLOCK_M
        end = starts + counts
        for t0 in range(0, NT, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            ex = tl.sum(((cum[None, :] <= t[:, None]) & e_ok[None, :]).to(tl.int32), 1)
            hit = e[None, :] == ex[:, None]  # one-hot over the experts (no lane for a spare tile's E)
            spare = ex >= E
            row0 = tl.sum(tl.where(hit, base[None, :], 0), 1) + t * BLOCK_M
            row_end = tl.sum(tl.where(hit, end[None, :], 0), 1)
            t_ok = t < NT
            tl.store(tile_expert_ptr + t, tl.where(spare, -1, ex).to(tl.int64), mask=t_ok)
            tl.store(tile_row_ptr + t, tl.where(spare, 0, row0), mask=t_ok)
            tl.store(tile_end_ptr + t, tl.where(spare, 0, row_end), mask=t_ok)
