"""Triton FlashAttention-style kernels (forward, dK/dV, dQ) for fine-tuning batches.

    q [B, HQ, SQ, D], k [B, HK, SK, D]     any strides (the model's transposed views: no copies); HQ = GROUP * HK
    v [B, HK, SK, DV]                       DV ≤ D (DeepSeek's multi-head latent attention: D = 192, DV = 128)
    o [B, SQ, HQ, DV]                       written in the layout transformers' attention functions return
    lse [B, HQ, SQ] fp32                    log-sum-exp per query row: with o, all the backward needs
    qseg [B, SQ], kseg [B, SK] int32        optional segment ids: a query sees a key only when their ids are equal
                                            (packed documents, padding: query -1 sees nothing, key -1 is never
                                            seen) or when the key id is -2 (prefix keys: seen by every query)

    bias [B|1, HQ|1, SQ|1, SK|1]            optional additive score bias (T5's relative position bias), any strides
                                            (0 for a broadcast dimension); its gradient, when asked for, is dS
                                            written by the dQ kernel to a dense fp32 [B, HQ, SQ, SK] buffer

    s = scale · q kᵀ;  s = c · tanh(s / c) with a softcap c;  s = s + bias;  masks: causal aligned bottom-right
    (key j ≤ query i + SK − SQ), sliding window (i' = i + SK − SQ: key j > i' − W before the query and
    j < i' + WR after it; one-sided windows pass WR = SQ + SK, ModernBERT's bidirectional one WR = W), segments;
    p = softmax(s)
    with dropout: o = (p ⊙ keep / (1 − p_drop)) v, keep regenerated from (seed, b, h, i, j) by Philox

    backward (FA2): Δ = rowsum(dO ⊙ O);  dP = dO vᵀ (dropout-masked);  dS = P ⊙ (dP − Δ) (= dbias; then ⊙ softcap
                    derivative)
                    dV = Pᵀ dO, dK = scale · dSᵀ q  per KV block, looping over the GROUP query heads that share it
                    dQ = scale · dS k               per query block: no atomics, deterministic

Memory: forward keeps O and lse only (no S × S matrix, no repeated K/V for grouped-query attention; a bias is the
caller's tensor, read per tile: T5 shares one [1, H, S, S] bias across its layers, where eager attention keeps the
S × S probabilities, their dropout mask and the dropped copy per layer). Fully
masked query rows give 0, not NaN. fp32 softmax statistics and accumulation; int64 offsets.

Work: tiles outside the causal / window band (both sides of a bidirectional window) are never visited; with
segment ids, neither are tiles outside
krange [B, cdiv(SQ, BLOCK_M), 2] (per query block: the hull [lo, hi) of the key positions its queries can see) and
qrange [B, cdiv(SK, BLOCK_N), 2] (per key block: the hull of the queries that can see it), which the launcher
derives from the ids: packed rows skip the other documents' tiles, padded rows the padding's.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _scores(q, k_t, offs_m, offs_n, qs, kseg_row_ptr, bias_bh_ptr, sbm, sbn, SQ, SK, OFFSET, scale, softcap, window,
            window_right, IS_CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Masked scores [BLOCK_M, BLOCK_N] (−inf where masked) and, with a softcap, tanh(raw / c) for backward."""
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale
    t = s
    if HAS_SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    if HAS_BIAS:
        s += tl.load(bias_bh_ptr + offs_m[:, None].to(tl.int64) * sbm + offs_n[None, :].to(tl.int64) * sbn,
                     mask=(offs_m < SQ)[:, None] & (offs_n < SK)[None, :], other=0.0).to(tl.float32)
    ok = (offs_n < SK)[None, :]
    if IS_CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + OFFSET)
    if HAS_WINDOW:
        ok = ok & (offs_n[None, :] > offs_m[:, None] + OFFSET - window)
        ok = ok & (offs_n[None, :] < offs_m[:, None] + OFFSET + window_right)
    if HAS_SEG:
        ks = tl.load(kseg_row_ptr + offs_n, mask=offs_n < SK, other=-1)
        ok = ok & ((ks[None, :] == qs[:, None]) | (ks[None, :] == -2))
    return tl.where(ok, s, float("-inf")), t


@triton.jit
def _keep(seed, bh, offs_m, offs_n, SQ, SK, p_drop):
    lin = (bh.to(tl.int64) * SQ + offs_m[:, None].to(tl.int64)) * SK + offs_n[None, :].to(tl.int64)
    return tl.rand(seed, lin) >= p_drop


@triton.jit
def _kv_range(start_m, SQ, SK, OFFSET, window, window_right, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks a query block can see (masked blocks outside it are skipped)."""
    lo = 0
    hi = SK
    if IS_CAUSAL:
        hi = tl.minimum(SK, start_m + BLOCK_M + OFFSET)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m + OFFSET - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, start_m + BLOCK_M - 1 + OFFSET + window_right)
    return lo, hi


@triton.jit
def _segment_range(range_ptr, b, lo, hi, BLOCK: tl.constexpr):
    """[lo, hi) narrowed to this program's segment range (``key_ranges`` / ``query_ranges`` in the launcher: the
    hull of the positions its block can see), lo kept a multiple of BLOCK; tiles of other documents and of padding
    are skipped."""
    r_ptr = range_ptr + (b.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * 2
    lo = tl.maximum(lo, (tl.load(r_ptr) // BLOCK) * BLOCK)
    hi = tl.minimum(hi, tl.load(r_ptr + 1))
    return lo, hi


@triton.jit
def _value_dims(offs_d, d_ok, DV, BLOCK_DV: tl.constexpr, SAME_DV: tl.constexpr):
    """Offsets and mask of v's (and o's, dO's, dV's) head dim: q/k's own where v is as wide (separate ones cost the
    dK/dV kernel registers it spilled)."""
    if SAME_DV:
        return offs_d, d_ok
    offs_dv = tl.arange(0, BLOCK_DV)
    return offs_dv, offs_dv < DV


@triton.jit
def _attn_fwd_kernel(
    q_ptr, sqb, sqh, sqm, sqd,
    k_ptr, skb, skh, skn, skd,
    v_ptr, svb, svh, svn, svd,
    o_ptr, sob, som, soh, sod,
    lse_ptr, qseg_ptr, kseg_ptr, krange_ptr,
    bias_ptr, sbb, sbh, sbm, sbn,
    SQ, SK, HQ, GROUP, D, DV, scale, softcap, window, window_right, seed, p_drop,
    IS_CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SAME_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax forward for one (query block, batch·head); grid (cdiv(SQ, BLOCK_M), B·HQ). q/k heads are D
    wide, v/o heads DV (≤ D: multi-head latent attention's narrower values)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    OFFSET = SK - SQ
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_dv, dv_ok = _value_dims(offs_d, d_ok, DV, BLOCK_DV, SAME_DV)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None].to(tl.int64) * sqm
                + offs_d[None, :] * sqd, mask=(offs_m[:, None] < SQ) & d_ok[None, :], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    kseg_row = kseg_ptr + b.to(tl.int64) * SK
    bias_bh = bias_ptr + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    qs = tl.zeros((BLOCK_M,), dtype=tl.int32)
    if HAS_SEG:
        qs = tl.load(qseg_ptr + b.to(tl.int64) * SQ + offs_m, mask=offs_m < SQ, other=-3)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    lo, hi = _kv_range(start_m, SQ, SK, OFFSET, window, window_right, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_SEG:
        lo, hi = _segment_range(krange_ptr, b, lo, hi, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        k_t = tl.load(k_base + offs_n[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                      mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s, _ = _scores(q, k_t, offs_m, offs_n, qs, kseg_row, bias_bh, sbm, sbn, SQ, SK, OFFSET, scale, softcap, window,
                       window_right, IS_CAUSAL, HAS_SEG, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            p = tl.where(_keep(seed, bh, offs_m, offs_n, SQ, SK, p_drop), p / (1.0 - p_drop), 0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn + offs_dv[None, :] * svd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), 0.0)
    tl.store(lse_ptr + bh.to(tl.int64) * SQ + offs_m, lse, mask=offs_m < SQ)
    tl.store(o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None].to(tl.int64) * som
             + offs_dv[None, :] * sod, o.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < SQ) & dv_ok[None, :])


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, sqb, sqh, sqm, sqd,
    k_ptr, skb, skh, skn, skd,
    v_ptr, svb, svh, svn, svd,
    do_ptr, sdob, sdom, sdoh, sdod,
    dk_ptr, sdkb, sdkh, sdkn, sdkd,
    dv_ptr, sdvb, sdvh, sdvn, sdvd,
    lse_ptr, delta_ptr, qseg_ptr, kseg_ptr, qrange_ptr,
    bias_ptr, sbb, sbh, sbm, sbn,
    SQ, SK, HQ, HK, GROUP, D, DV, scale, softcap, window, window_right, seed, p_drop,
    IS_CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SAME_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one (key block, batch·kv head), summed over the GROUP query heads; grid (cdiv(SK, BLOCK_N), B·HK)."""
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = bhk // HK
    hk = bhk % HK
    OFFSET = SK - SQ
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_dv, dv_ok = _value_dims(offs_d, d_ok, DV, BLOCK_DV, SAME_DV)
    n_ok = offs_n < SK
    k = tl.load(k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[:, None].to(tl.int64) * skn
                + offs_d[None, :] * skd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + offs_n[:, None].to(tl.int64) * svn
                + offs_dv[None, :] * svd, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    k_t = tl.trans(k)
    v_t = tl.trans(v)
    kseg_row = kseg_ptr + b.to(tl.int64) * SK
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    # query rows that can see this key block
    m_lo = 0
    m_hi = SQ
    if IS_CAUSAL:
        m_lo = tl.maximum(0, start_n - OFFSET)
    if HAS_WINDOW:
        m_hi = tl.minimum(SQ, start_n + BLOCK_N - OFFSET + window)
        m_lo = tl.maximum(m_lo, start_n - OFFSET - window_right + 1)
    m_lo = (m_lo // BLOCK_M) * BLOCK_M
    if HAS_SEG:
        m_lo, m_hi = _segment_range(qrange_ptr, b, m_lo, m_hi, BLOCK_M)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * HQ + h
        bias_bh = bias_ptr + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < SQ
            q = tl.load(q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None].to(tl.int64) * sqm
                        + offs_d[None, :] * sqd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_ptr + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
                         + offs_m[:, None].to(tl.int64) * sdom + offs_dv[None, :] * sdod,
                         mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
            lse = tl.load(lse_ptr + bh.to(tl.int64) * SQ + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(delta_ptr + bh.to(tl.int64) * SQ + offs_m, mask=m_ok, other=0.0)
            qs = tl.zeros((BLOCK_M,), dtype=tl.int32)
            if HAS_SEG:
                qs = tl.load(qseg_ptr + b.to(tl.int64) * SQ + offs_m, mask=m_ok, other=-3)
            s, t = _scores(q, k_t, offs_m, offs_n, qs, kseg_row, bias_bh, sbm, sbn, SQ, SK, OFFSET, scale, softcap,
                           window, window_right, IS_CAUSAL, HAS_SEG, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, DOT_PRECISION)
            p = tl.exp(s - lse[:, None])
            dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                keep = _keep(seed, bh, offs_m, offs_n, SQ, SK, p_drop)
                pd = tl.where(keep, p / (1.0 - p_drop), 0.0)
                dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
            else:
                pd = p
            dv = tl.dot(tl.trans(pd.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk = tl.dot(tl.trans((ds * scale).to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
    tl.store(dk_ptr + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + offs_n[:, None].to(tl.int64) * sdkn
             + offs_d[None, :] * sdkd, dk.to(dk_ptr.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(dv_ptr + b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh + offs_n[:, None].to(tl.int64) * sdvn
             + offs_dv[None, :] * sdvd, dv.to(dv_ptr.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, sqb, sqh, sqm, sqd,
    k_ptr, skb, skh, skn, skd,
    v_ptr, svb, svh, svn, svd,
    do_ptr, sdob, sdom, sdoh, sdod,
    dq_ptr, sdqb, sdqh, sdqm, sdqd,
    lse_ptr, delta_ptr, qseg_ptr, kseg_ptr, krange_ptr,
    bias_ptr, sbb, sbh, sbm, sbn, dbias_ptr,
    SQ, SK, HQ, GROUP, D, DV, scale, softcap, window, window_right, seed, p_drop,
    IS_CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SAME_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ of one (query block, batch·head); grid (cdiv(SQ, BLOCK_M), B·HQ). With HAS_DBIAS also dS of the visited
    tiles into dbias [B, HQ, SQ, SK] fp32 (zero-filled by the launcher: tiles never visited are fully masked)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    OFFSET = SK - SQ
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_dv, dv_ok = _value_dims(offs_d, d_ok, DV, BLOCK_DV, SAME_DV)
    m_ok = offs_m < SQ
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None].to(tl.int64) * sqm
                + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
    do = tl.load(do_ptr + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh + offs_m[:, None].to(tl.int64) * sdom
                 + offs_dv[None, :] * sdod, mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * SQ + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * SQ + offs_m, mask=m_ok, other=0.0)
    qs = tl.zeros((BLOCK_M,), dtype=tl.int32)
    if HAS_SEG:
        qs = tl.load(qseg_ptr + b.to(tl.int64) * SQ + offs_m, mask=m_ok, other=-3)
    k_base = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    kseg_row = kseg_ptr + b.to(tl.int64) * SK
    bias_bh = bias_ptr + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi = _kv_range(start_m, SQ, SK, OFFSET, window, window_right, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_SEG:
        lo, hi = _segment_range(krange_ptr, b, lo, hi, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v_t = tl.load(v_base + offs_n[None, :].to(tl.int64) * svn + offs_dv[:, None] * svd,
                      mask=n_ok[None, :] & dv_ok[:, None], other=0.0)
        s, t = _scores(q, tl.trans(k), offs_m, offs_n, qs, kseg_row, bias_bh, sbm, sbn, SQ, SK, OFFSET, scale,
                       softcap, window, window_right, IS_CAUSAL, HAS_SEG, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS,
                       DOT_PRECISION)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            dp = tl.where(_keep(seed, bh, offs_m, offs_n, SQ, SK, p_drop), dp / (1.0 - p_drop), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_DBIAS:  # the bias is added after the softcap: its gradient is dS before the softcap's derivative
            tl.store(dbias_ptr + (bh.to(tl.int64) * SQ + offs_m[:, None].to(tl.int64)) * SK
                     + offs_n[None, :].to(tl.int64), ds, mask=m_ok[:, None] & n_ok[None, :])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot((ds * scale).to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + offs_m[:, None].to(tl.int64) * sdqm
             + offs_d[None, :] * sdqd, dq.to(dq_ptr.dtype.element_ty), mask=qd_mask)
