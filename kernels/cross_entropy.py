"""Triton kernels for the fused linear cross-entropy (the LM head and its loss without a tokens × vocab tensor).

Notation (one chunk of ``M`` tokens; the launcher walks the ``N_tok`` tokens chunk by chunk):

    h      [M, K]       last hidden states of the chunk (K = hidden size), any 2-D strides
    W      [N, K]       LM head weight (N = vocabulary), any strides; b [N] its bias
    xa     [M, R]       h Aᵀ for a LoRA adapter on the LM head (A [R, K], B [N, R], scaling s)
    y      [M]          labels; rows equal to ``ignore_index`` are ignored

    logits    u   = (h Wᵀ + b + s · xa Bᵀ) · logit_scale
              z   = c · tanh(u / c)   with softcap c (Gemma 2), else z = u
    loss      ℓ_m = lse_m − (1 − ε) z_{m,y_m} − (ε / N) Σ_n z_{m,n},   lse_m = log Σ_n exp z_{m,n}
    gradient  D   = ∂ℓ/∂u = (softmax(z) − (1 − ε) onehot(y) − ε / N) ⊙ (1 − (z / c)²) · logit_scale

``_flce_logits_kernel`` is the GEMM with everything up to z in its epilogue; it also reduces each BLOCK_N column
block of a row to (max, Σ exp(z − max), Σ z) and picks z_{m,y_m}, so ``_flce_lse_kernel`` gets each row's
log-sum-exp and loss from an [M, N / BLOCK_N] combine instead of another pass over z. ``_flce_grad_kernel`` turns z
into D (one read of z, one write of D in the GEMM dtype) and, with a LoRA adapter, reduces ``G = D B`` [M, R] on
the fly, so the low-rank part of dh never re-reads D. The launcher finishes with cuBLAS:
dh = D W + s · G A, dW = Dᵀ h, dB = s · Dᵀ xa, dA = s · Gᵀ h.

Memory: per chunk one fp32 [M, N] z (overwritten by D when W is fp32) and, for 16-bit W, one [M, N] D in W's
dtype; never an N_tok × N tensor. ``tl.dot`` accumulates in fp32; offsets along M and N are int64.
"""

import triton
import triton.language as tl

from peftfast.kernels.lora import _grouped_tile


@triton.jit
def _softcap_tanh(u):
    """tanh(u) from one exp of a non-positive argument (no overflow for any u)."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _flce_logits_kernel(
    h_ptr, stride_hm, stride_hk,
    w_ptr, stride_wn, stride_wk,
    bias_ptr,
    xa_ptr, stride_xam, stride_xar,
    lb_ptr, stride_lbn, stride_lbr,
    labels_ptr,
    z_ptr, stride_zm, stride_zn,
    pmax_ptr, psum_ptr, pz_ptr, stride_pm, stride_pb,
    tgt_ptr,
    M, N, K, R,
    lora_scale, logit_scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_ZSUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """z [M, N] fp32 tile by tile, plus per (row, column block) partials and the target logit.

    pmax/psum/pz [M, ≥ cdiv(N, BLOCK_N)] get, in column ``pid_n``, the block's max, Σ exp(z − max) and Σ z;
    tgt [M] gets z_{m,y_m} from the block holding y_m. Grid: cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N), grouped along
    M so that consecutive programs reuse W tiles from L2 (W is the big operand: N × K against the chunk's M × K).
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :].to(tl.int64) * stride_hk
    w_ptrs = w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        h = tl.load(h_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(h.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        # the scaling rides on the small xa tile, so the low-rank product accumulates into acc (no second
        # BLOCK_M × BLOCK_N fp32 tile in registers)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            lb = tl.load(lb_ptr + offs_r[:, None] * stride_lbr + offs_n[None, :] * stride_lbn,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot((xa.to(tl.float32) * lora_scale).to(lb.dtype), lb, acc, input_precision=LORA_PRECISION)
    z = acc * logit_scale
    if HAS_SOFTCAP:
        z = softcap * _softcap_tanh(z / softcap)
    tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn, z,
             mask=m_ok[:, None] & n_ok[None, :])

    zm = tl.where(n_ok[None, :], z, float("-inf"))
    bmax = tl.max(zm, axis=1)
    bsum = tl.sum(tl.exp(zm - bmax[:, None]), axis=1)
    p_off = offs_m * stride_pm + pid_n * stride_pb
    tl.store(pmax_ptr + p_off, bmax, mask=m_ok)
    tl.store(psum_ptr + p_off, bsum, mask=m_ok)
    if NEED_ZSUM:
        tl.store(pz_ptr + p_off, tl.sum(tl.where(n_ok[None, :], z, 0.0), axis=1), mask=m_ok)
    lab = tl.load(labels_ptr + offs_m, mask=m_ok, other=-1).to(tl.int64)
    hit = (offs_n[None, :] == lab[:, None]) & n_ok[None, :]
    found = tl.sum(hit.to(tl.int32), axis=1) > 0
    tl.store(tgt_ptr + offs_m, tl.sum(tl.where(hit, z, 0.0), axis=1), mask=m_ok & found)


@triton.jit
def _flce_lse_kernel(
    pmax_ptr, psum_ptr, pz_ptr, stride_pm, stride_pb,
    tgt_ptr, labels_ptr, lse_ptr, loss_ptr,
    M, N, NB, ignore_index, one_minus_eps, eps_over_n,
    NEED_ZSUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Per row: lse from the NB column-block partials of ``_flce_logits_kernel``, then the loss row
    ℓ = lse − (1 − ε) z_y − (ε / N) Σ z (0 where ignored, NaN where the label is outside [0, N)).

    Only the first NB partial columns are read (those the chosen logits config wrote). Grid (cdiv(M, BLOCK_M),).
    """
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    zsum = tl.zeros((BLOCK_M,), tl.float32)
    for b0 in range(0, NB, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask = m_ok[:, None] & (offs_b[None, :] < NB)
        off = offs_m[:, None] * stride_pm + offs_b[None, :] * stride_pb
        bmax = tl.load(pmax_ptr + off, mask=mask, other=float("-inf"))
        bsum = tl.load(psum_ptr + off, mask=mask, other=0.0)
        new_max = tl.maximum(run_max, tl.max(bmax, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows past M: keep exp() away from NaN
        run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(bsum * tl.exp(bmax - safe[:, None]), axis=1)
        run_max = new_max
        if NEED_ZSUM:
            zsum += tl.sum(tl.load(pz_ptr + off, mask=mask, other=0.0), axis=1)
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + offs_m, lse, mask=m_ok)
    lab = tl.load(labels_ptr + offs_m, mask=m_ok, other=ignore_index).to(tl.int64)
    in_range = (lab >= 0) & (lab < N)
    tgt = tl.load(tgt_ptr + offs_m, mask=m_ok & in_range, other=0.0)
    loss = lse - one_minus_eps * tgt
    if NEED_ZSUM:
        loss -= eps_over_n * zsum
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(loss_ptr + offs_m, tl.where(lab != ignore_index, loss, 0.0), mask=m_ok)


@triton.jit
def _flce_grad_kernel(
    z_ptr, stride_zm, stride_zn,
    d_ptr, stride_dm, stride_dn,
    lse_ptr, labels_ptr,
    lb_ptr, stride_lbn, stride_lbr,
    g_ptr, stride_gs, stride_gm, stride_gr,
    M, N, R, COLS_PER_SPLIT,
    ignore_index, one_minus_eps, eps_over_n, logit_scale, inv_softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_LORA: tl.constexpr, STORE_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """D = ∂ℓ/∂u for BLOCK_M rows and one split of the columns; with HAS_LORA also G partials = D B.

    z [M, N] fp32 (read), D [M, N] in d's dtype (may be z itself: every element is read before it is written by
    the same program), STORE_F32 additionally writes fp32 D over z. Rows labelled ``ignore_index`` get D = 0.
    g [SPLIT, M, R] fp32 receives this split's D B; the launcher sums the splits in a fixed order (no atomics).
    Grid (cdiv(M, BLOCK_M), SPLIT); SPLIT · COLS_PER_SPLIT ≥ N with COLS_PER_SPLIT a multiple of BLOCK_N.
    Memory-bound: one read of z, one write of D per element (plus the small B tiles).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    lab = tl.load(labels_ptr + offs_m, mask=m_ok, other=ignore_index).to(tl.int64)
    row_ok = m_ok & (lab != ignore_index)
    lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0)
    offs_r = tl.arange(0, BLOCK_R)
    g_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_lo = pid_s.to(tl.int64) * COLS_PER_SPLIT
    n_hi = tl.minimum(n_lo + COLS_PER_SPLIT, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_hi
        mask = m_ok[:, None] & n_ok[None, :]
        z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn, mask=mask, other=0.0)
        d = tl.exp(z - lse[:, None]) - eps_over_n
        d = tl.where(offs_n[None, :] == lab[:, None], d - one_minus_eps, d)
        if HAS_SOFTCAP:
            zc = z * inv_softcap
            d = d * (1.0 - zc * zc)
        d = tl.where(row_ok[:, None] & n_ok[None, :], d * logit_scale, 0.0)
        if STORE_F32:
            tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn, d, mask=mask)
        tl.store(d_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn, d.to(d_ptr.dtype.element_ty),
                 mask=mask)
        if HAS_LORA:
            lb = tl.load(lb_ptr + offs_n[:, None] * stride_lbn + offs_r[None, :] * stride_lbr,
                         mask=n_ok[:, None] & (offs_r[None, :] < R), other=0.0)
            g_acc = tl.dot(d.to(lb.dtype), lb, g_acc, input_precision=LORA_PRECISION)
    if HAS_LORA:
        tl.store(g_ptr + pid_s.to(tl.int64) * stride_gs + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                 g_acc, mask=m_ok[:, None] & (offs_r[None, :] < R))
