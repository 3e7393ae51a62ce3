"""Triton kernels for the fused LoRA linear (forward and backward).

Notation (one LoRA "group" of ``NSEG`` segments that read the same input ``x``):

    x      [M, K]          the layer input, any 2-D strides
    W_i    [N_i, K]        frozen base weight of member ``i`` (any strides, so GPT-2 ``Conv1D`` needs no copy)
    A_cat  [R_TOT, K]      the members' LoRA ``A`` matrices stacked, ``R_TOT = NSEG * RANK``
    B_i    [N_i, RANK]     LoRA ``B`` of member ``i``
    keep_s [M, K]          dropout keep-mask of segment ``s``; never stored, regenerated from ``(seed, s, m, k)``

    forward   xa[:, s]  = (keep_s * x / (1 - p)) @ A_sᵀ                                  (_lora_down_kernel)
              y_i       = x @ W_iᵀ + b_i + scale_i * (xa_i @ B_iᵀ + bB_i)                 (_lora_gemm_kernel)
    backward  G[:, s]   = scale_s * dy_s @ B_s                                            (_lora_down_kernel)
              dx        = Σ_i dy_i @ W_i + Σ_s keep_s * (G_s @ A_s) / (1 - p)             (_lora_gemm_kernel)
              dA_s      = G_sᵀ @ (keep_s * x) / (1 - p)                                   (_lora_da_kernel)

Memory: the only activations the backward needs are ``x`` (saved once for all members) and ``xa`` (M × R_TOT).
No dropout copy of ``x``, no dropout mask, no M × N intermediate and no fp32 copy of anything M × K is ever
materialised: the dropout mask lives in registers, the LoRA product rides in the epilogue of the big GEMM.

Offsets are computed in int64 wherever a tensor may pass 2**31 elements. ``tl.dot`` accumulates in fp32.
"""

import triton
import triton.language as tl


@triton.jit
def _keep(seed, seg, offs_m, offs_k, M, K, p):
    """Dropout keep-mask (True = kept) of segment ``seg`` at rows ``offs_m`` and columns ``offs_k``.

    A counter-based Philox stream keyed by ``seed`` and the int64 linear index ``(seg * M + m) * K + k``, so the
    forward and the backward (and every kernel) regenerate the identical mask without storing it.
    """
    lin = (seg * M + offs_m[:, None].to(tl.int64)) * K + offs_k[None, :].to(tl.int64)
    return tl.rand(seed, lin) >= p


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP_M neighbouring row blocks walk the column blocks
    together, so consecutive programs share operand tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    return first_m + ((pid % num_in_group) % group_size), (pid % num_in_group) // group_size


@triton.jit
def _lora_down_kernel(
    x_ptr, stride_xm, stride_xk,
    a_ptr, stride_ar, stride_ak,
    out_ptr, stride_om, stride_or,
    M, K, R_TOT, RANK,
    seed, p, out_scale,
    NSEG: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Skinny product ``out[M, R_TOT] = out_scale * (keep_s ⊙ x) @ A_catᵀ`` in one pass over ``x``.

    x [M, K] (any strides), A_cat [R_TOT, K], out [M, R_TOT]. Each segment ``s`` (columns ``s*RANK ..``) gets its
    own dropout mask; ``out_scale`` folds in ``1/(1-p)`` (forward) or the LoRA scaling (backward ``G``).
    Grid (cdiv(M, BLOCK_M), cdiv(R_TOT, BLOCK_R)): with R_TOT ≤ BLOCK_R (e.g. q/k/v at r ≤ 32) every segment is
    produced from one read of each x tile. Memory-bound: reads x once; writes only M × R_TOT.
    """
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_lo = pid_r * BLOCK_R
    offs_r = r_lo + tl.arange(0, BLOCK_R)
    seg_of_r = offs_r // RANK
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )
        a = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None].to(tl.int64) * stride_ak,
            mask=(offs_r[None, :] < R_TOT) & (offs_k[:, None] < K),
            other=0.0,
        )
        x = x.to(a.dtype)
        if HAS_DROPOUT:
            for s in tl.static_range(NSEG):
                # segments outside this program's rank chunk cost neither a mask nor an MMA
                if (s * RANK < r_lo + BLOCK_R) & ((s + 1) * RANK > r_lo):
                    xs = tl.where(_keep(seed, s, offs_m, offs_k, M, K, p), x, 0.0).to(a.dtype)
                    a_s = tl.where((seg_of_r == s)[None, :], a, 0.0).to(a.dtype)
                    acc += tl.dot(xs, a_s, input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(x, a, input_precision=DOT_PRECISION)
    acc = acc * out_scale
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or,
        acc.to(out_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_r[None, :] < R_TOT),
    )


@triton.jit
def _mm_accumulate(
    acc, p_ptr, stride_pm, stride_pk, q_ptr, stride_qk, stride_qn, offs_m, offs_n, M, N, KDIM,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``acc += P[offs_m, :KDIM] @ Q[:KDIM, offs_n]`` for one output tile; P and Q by strides."""
    offs_kb = tl.arange(0, BLOCK_K)
    p_ptrs = p_ptr + offs_m[:, None] * stride_pm + offs_kb[None, :].to(tl.int64) * stride_pk
    q_ptrs = q_ptr + offs_kb[:, None].to(tl.int64) * stride_qk + offs_n[None, :] * stride_qn
    for k0 in range(0, KDIM, BLOCK_K):
        k_ok = (k0 + offs_kb) < KDIM
        p = tl.load(p_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(p.to(q.dtype), q, acc, input_precision=DOT_PRECISION)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk
    return acc


@triton.jit
def _lowrank_tile(
    acc, l_ptr, stride_lm, stride_lr, r_ptr, stride_rn, stride_rr, offs_m, offs_n, M, N, R_LO, R_HI,
    BLOCK_R: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """``acc + L[offs_m, R_LO:R_HI] @ R[offs_n, R_LO:R_HI]ᵀ`` in fp32, BLOCK_R rank columns at a time (``acc`` a
    zero tile for the product alone; an epilogue may pass its live accumulator so no third fp32 tile is held)."""
    part = acc
    for r0 in range(R_LO, R_HI, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R_HI
        lt = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                     mask=(offs_m[:, None] < M) & r_ok[None, :], other=0.0)
        rt = tl.load(r_ptr + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn,
                     mask=r_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        part = tl.dot(lt.to(rt.dtype), rt, part, input_precision=LORA_PRECISION)
    return part


@triton.jit
def _lora_gemm_kernel(
    p0_ptr, stride_p0m, stride_p0k, q0_ptr, stride_q0k, stride_q0n, K0,
    p1_ptr, stride_p1m, stride_p1k, q1_ptr, stride_q1k, stride_q1n, K1,
    p2_ptr, stride_p2m, stride_p2k, q2_ptr, stride_q2k, stride_q2n, K2,
    l_ptr, stride_lm, stride_lr,
    r_ptr, stride_rn, stride_rr,
    bias_ptr, lbias_ptr,
    out_ptr, stride_om, stride_on,
    M, N, R_TOT, RANK,
    l_scale, seed, p, keep_scale,
    NUM_IN: tl.constexpr, HAS_LORA: tl.constexpr, NSEG: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LBIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr, SUB_M: tl.constexpr,
):
    """GEMM with a low-rank epilogue:

        out[M, N] (+)= Σ_{i<NUM_IN} P_i @ Q_i + Σ_s keep_s ⊙ (l_scale * L_s @ R_sᵀ) * keep_scale + bias + l_scale*lbias

    Forward: P0 = x, Q0 = Wᵀ (strides), L = xa, R = B, l_scale = LoRA scaling: one pass, no M × N intermediate.
    Backward dx: P_i = dy_i, Q_i = W_i (up to three members that share x, e.g. q/k/v), L = G (pre-scaled),
    R = A_catᵀ (strides), keep_s the regenerated dropout masks of the output coordinates (m, k).
    With NUM_IN = 0 and ACCUMULATE the kernel adds only the (masked) low-rank term into an existing ``out``
    (used when the dense product comes from cuBLAS). The big product stays tensor-core bound; the epilogue
    costs one extra ``BLOCK_M × BLOCK_R × BLOCK_N`` MMA per tile. With dropout the masked terms run after the
    dense tile is stored, over row slabs of SUB_M rows (each loaded, completed and stored again by this program):
    a whole-tile Philox mask per segment beside the live accumulator spilled kilobytes per thread (AOT, sm_80/90).
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on

    # the cuBLAS strategy's masked low-rank pass (nothing dense, no bias) touches ``out`` in slabs only
    SLABS_ONLY: tl.constexpr = HAS_LORA and HAS_DROPOUT and ACCUMULATE and NUM_IN == 0 and not HAS_BIAS and \
        not HAS_LBIAS
    if ACCUMULATE and not SLABS_ONLY:
        acc = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if NUM_IN >= 1:
        acc = _mm_accumulate(acc, p0_ptr, stride_p0m, stride_p0k, q0_ptr, stride_q0k, stride_q0n,
                             offs_m, offs_n, M, N, K0, BLOCK_K, DOT_PRECISION)
    if NUM_IN >= 2:
        acc = _mm_accumulate(acc, p1_ptr, stride_p1m, stride_p1k, q1_ptr, stride_q1k, stride_q1n,
                             offs_m, offs_n, M, N, K1, BLOCK_K, DOT_PRECISION)
    if NUM_IN >= 3:
        acc = _mm_accumulate(acc, p2_ptr, stride_p2m, stride_p2k, q2_ptr, stride_q2k, stride_q2n,
                             offs_m, offs_n, M, N, K2, BLOCK_K, DOT_PRECISION)

    if HAS_LORA and not HAS_DROPOUT:
        part = _lowrank_tile(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), l_ptr, stride_lm, stride_lr, r_ptr,
                             stride_rn, stride_rr, offs_m, offs_n, M, N, 0, R_TOT, BLOCK_R, LORA_PRECISION)
        acc += part * l_scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_LBIAS:
        acc += (tl.load(lbias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32) * l_scale)[None, :]
    if not SLABS_ONLY:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    if HAS_LORA and HAS_DROPOUT:
        tl.debug_barrier()  # the slabs are read back by other threads of this program than those that wrote them
        for m0 in range(0, BLOCK_M, SUB_M):
            offs_ms = pid_m.to(tl.int64) * BLOCK_M + m0 + tl.arange(0, SUB_M)
            slab_mask = (offs_ms[:, None] < M) & (offs_n[None, :] < N)
            slab_ptrs = out_ptr + offs_ms[:, None] * stride_om + offs_n[None, :] * stride_on
            slab = tl.load(slab_ptrs, mask=slab_mask, other=0.0).to(tl.float32)
            for s in tl.static_range(NSEG):
                part = _lowrank_tile(tl.zeros((SUB_M, BLOCK_N), dtype=tl.float32), l_ptr, stride_lm, stride_lr,
                                     r_ptr, stride_rn, stride_rr, offs_ms, offs_n, M, N, s * RANK, (s + 1) * RANK,
                                     BLOCK_R, LORA_PRECISION)
                keep = _keep(seed, s, offs_ms, offs_n, M, N, p)
                slab += tl.where(keep, part * (l_scale * keep_scale), 0.0)
            tl.store(slab_ptrs, slab.to(out_ptr.dtype.element_ty), mask=slab_mask)


@triton.jit
def _lora_da_kernel(
    x_ptr, stride_xm, stride_xk,
    g_ptr, stride_gm, stride_gr,
    out_ptr, stride_os, stride_or, stride_ok,
    M, K, R_TOT, RANK, ROWS_PER_SPLIT,
    seed, p, out_scale,
    NSEG: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partial LoRA-A gradient ``out[split, R_TOT, K] = out_scale * Σ_{m in split} G[m, s]ᵀ (keep_s ⊙ x[m, :])``.

    ``out_scale`` folds in ``1/(1-p)``; with x = dy, G = xa and no dropout the same kernel gives dBᵀ.

    Grid (cdiv(K, BLOCK_K), SPLIT): each program owns BLOCK_K columns of x and one slice of rows, reads that slice
    of x once for every segment (the dropout mask is regenerated in registers), and writes fp32 partials that the
    launcher sums in a fixed order (deterministic, no atomics). A third grid axis walks rank chunks of BLOCK_R.
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    r_lo = pid_r * BLOCK_R
    offs_r = r_lo + tl.arange(0, BLOCK_R)
    seg_of_r = offs_r // RANK
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    m_start = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_ok = offs_m < m_end
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                    mask=m_ok[:, None] & (offs_r[None, :] < R_TOT), other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        x = x.to(g.dtype)
        if HAS_DROPOUT:
            for s in tl.static_range(NSEG):
                if (s * RANK < r_lo + BLOCK_R) & ((s + 1) * RANK > r_lo):
                    gs = tl.where((seg_of_r == s)[None, :], g, 0.0).to(g.dtype)
                    xs = tl.where(_keep(seed, s, offs_m, offs_k, M, K, p), x, 0.0).to(g.dtype)
                    acc += tl.dot(tl.trans(gs), xs, input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(tl.trans(g), x, input_precision=DOT_PRECISION)
    acc = acc * out_scale
    tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + offs_r[:, None] * stride_or + offs_k[None, :] * stride_ok,
             acc, mask=(offs_r[:, None] < R_TOT) & (offs_k[None, :] < K))


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, seed, p, NSEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Materialise the keep-masks ``out[NSEG, M, K]`` (int8) that the other kernels regenerate; tests only."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    for s in tl.static_range(NSEG):
        keep = _keep(seed, s, offs_m, offs_k, M, K, p)
        tl.store(out_ptr + (s * M + offs_m[:, None]) * K + offs_k[None, :], keep.to(tl.int8), mask=ok)
