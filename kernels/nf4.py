"""Triton kernels for NF4 (QLoRA 4-bit NormalFloat) base weights: dequantization and the fused NF4 LoRA GEMMs.

Layout (bitsandbytes' for a row-major ``[N, K]`` weight, ``K % QBLOCK == 0``)::

    q      [N, K/2]        uint8; W[n, 2j] in the high nibble of q[n, j], W[n, 2j+1] in the low nibble
    absmax [N, K/QBLOCK]   fp32, one scale per block of QBLOCK (64) consecutive elements of a row
    code   [16]            the NF4 table
    W[n, k] = code[nibble(n, k)] * absmax[n, k // QBLOCK]      (fp32, rounded once to the compute dtype)

The fused GEMMs dequantize a tile of W in registers inside their reduction loop, so no 16-bit copy of W ever exists
in memory; they read 0.5 byte per weight (plus 4/QBLOCK byte of absmax) instead of 2. When a W tile lies within one
block column (forward: QBLOCK % BLOCK_K == 0; dx: QBLOCK % BLOCK_N == 0, the launchers' configs) its absmax is one
vector load per row; otherwise a per-element gather.

    forward  y  = x @ Wᵀ + b + s * (xa @ Bᵀ + bB)                     (_nf4_lora_fwd_kernel; xa = drop(x) Aᵀ)
    backward dx = dy @ W + keep ⊙ (G @ A) / (1 - p)                    (_nf4_lora_dx_kernel; G = s dy B)

The rank-r products (xa, G, dA, dB) run on the kernels of ``peftfast.kernels.lora``; the dropout mask is the
segment-0 Philox stream of ``_keep``, regenerated, never stored. ``tl.dot`` accumulates in fp32.
"""

import triton
import triton.language as tl

from peftfast.kernels.lora import _grouped_tile, _keep, _lowrank_tile
from peftfast.kernels.norm import _cast


@triton.jit
def _nf4_codes(q_ptr, stride_qn, code_ptr, n_idx, k_idx, mask):
    """fp32 ``NF4[code(n_idx, k_idx)]`` for broadcastable index tiles from ``q_ptr`` (0 where ``mask`` is false).

    The byte of a pair is loaded once per element (the duplicate address is served by L1) and the nibble chosen by
    the parity of k; the 16-entry table is a gather that stays in L1.
    """
    byte = tl.load(q_ptr + n_idx * stride_qn + k_idx // 2, mask=mask, other=0).to(tl.int32)
    nib = (byte >> ((1 - (k_idx % 2)) * 4).to(tl.int32)) & 15
    return tl.load(code_ptr + nib)


@triton.jit
def _nf4_tile(q_ptr, stride_qn, am_ptr, stride_an, code_ptr, n_idx, k_idx, mask, QBLOCK: tl.constexpr):
    """fp32 ``W[n_idx, k_idx]`` with a per-element absmax gather (the general case)."""
    am = tl.load(am_ptr + n_idx * stride_an + k_idx // QBLOCK, mask=mask, other=0.0)
    return _nf4_codes(q_ptr, stride_qn, code_ptr, n_idx, k_idx, mask) * am


@triton.jit
def _nf4_dequant_kernel(
    q_ptr, stride_qn, am_ptr, stride_an, code_ptr, out_ptr, stride_on, N, K,
    QBLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RNE_BF16: tl.constexpr,
):
    """``out[N, K] = W`` in out's dtype. Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)); reads 0.5 + 4/QBLOCK bytes and
    writes one element per weight (memory-bound). RNE_BF16: round to bf16 by hand (the CPU interpreter truncates)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = _nf4_tile(q_ptr, stride_qn, am_ptr, stride_an, code_ptr, offs_n[:, None], offs_k[None, :], mask, QBLOCK)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], _cast(w, out_ptr.dtype.element_ty, RNE_BF16),
             mask=mask)


@triton.jit
def _nf4_lora_fwd_kernel(
    x_ptr, stride_xm, stride_xk,
    q_ptr, stride_qn, am_ptr, stride_an, code_ptr,
    l_ptr, stride_lm, stride_lr,
    r_ptr, stride_rn, stride_rr,
    bias_ptr, lbias_ptr,
    out_ptr, stride_om, stride_on,
    M, N, K, R,
    l_scale,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LBIAS: tl.constexpr, QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """``out[M, N] = x @ Wᵀ + bias + l_scale * (L @ Rᵀ + lbias)`` with W dequantized tile by tile from NF4.

    x [M, K] (any strides), L = xa [M, R], R = B [N, R]. Grid: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), grouped.
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K).to(tl.int64)
    # the W tile is addressed from a 64-bit row base with 32-bit offsets inside it (at most BLOCK_N * K/2 bytes):
    # 64-bit index tiles there made Triton 3.6 spill registers
    n_loc = tl.arange(0, BLOCK_N)
    k_loc = tl.arange(0, BLOCK_K)
    q_rows = q_ptr + (pid_n.to(tl.int64) * BLOCK_N) * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        if QBLOCK % BLOCK_K == 0:  # the tile lies in one block column: one absmax per row of W, a vector load
            am = tl.load(am_ptr + offs_n * stride_an + k0 // QBLOCK, mask=offs_n < N, other=0.0)
            # k0 is a multiple of BLOCK_K, so even: k_loc has the parity (nibble) of the global k
            w = _nf4_codes(q_rows + k0 // 2, stride_qn, code_ptr, n_loc[None, :], k_loc[:, None], w_mask) * \
                am[None, :]
        else:
            w = _nf4_tile(q_ptr, stride_qn, am_ptr, stride_an, code_ptr, offs_n[None, :], offs_k[:, None], w_mask,
                          QBLOCK)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_LORA:  # likewise from the tile's 64-bit corner
        m0 = pid_m.to(tl.int64) * BLOCK_M
        n0 = pid_n.to(tl.int64) * BLOCK_N
        acc += _lowrank_tile(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), l_ptr + m0 * stride_lm, stride_lm,
                             stride_lr, r_ptr + n0 * stride_rn, stride_rn, stride_rr, tl.arange(0, BLOCK_M), n_loc,
                             M - m0, N - n0, 0, R, BLOCK_R, LORA_PRECISION) * l_scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_LBIAS:
        acc += (tl.load(lbias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32) * l_scale)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _nf4_lora_dx_kernel(
    dy_ptr, stride_dm, stride_dn,
    q_ptr, stride_qn, am_ptr, stride_an, code_ptr,
    g_ptr, stride_gm, stride_gr,
    a_ptr, stride_ak, stride_ar,
    out_ptr, stride_om, stride_ok,
    M, N, K, R,
    seed, p, keep_scale,
    HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr, QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """``out[M, K] = dy @ W + keep ⊙ (G @ A) * keep_scale`` with W dequantized tile by tile from NF4.

    dy [M, N], G [M, R] (pre-scaled by the LoRA scaling), A passed as Aᵀ strides ([K, R]); ``keep`` is the
    regenerated segment-0 dropout mask of x's coordinates (m, k). Output tiles are BLOCK_M × BLOCK_N columns of K
    (BLOCK_N names the output tile width as in the forward); the reduction runs over N in BLOCK_K steps.
    """
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_rb = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        offs_n = n0 + offs_rb
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        if QBLOCK % BLOCK_N == 0:  # the output columns lie in one block column: one absmax per row of W
            am = tl.load(am_ptr + offs_n * stride_an + (pid_k * BLOCK_N) // QBLOCK, mask=offs_n < N, other=0.0)
            w = _nf4_codes(q_ptr, stride_qn, code_ptr, offs_n[:, None], offs_k[None, :], w_mask) * am[:, None]
        else:
            w = _nf4_tile(q_ptr, stride_qn, am_ptr, stride_an, code_ptr, offs_n[:, None], offs_k[None, :], w_mask,
                          QBLOCK)
        acc = tl.dot(dy, w.to(dy.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_LORA:
        part = _lowrank_tile(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), g_ptr, stride_gm, stride_gr, a_ptr,
                             stride_ak, stride_ar, offs_m, offs_k, M, K, 0, R, BLOCK_R, LORA_PRECISION)
        if HAS_DROPOUT:
            acc += tl.where(_keep(seed, 0, offs_m, offs_k, M, K, p), part * keep_scale, 0.0)
        else:
            acc += part
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok, acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))
