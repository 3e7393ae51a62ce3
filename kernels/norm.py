"""Triton kernels for fused RMSNorm (optionally with the residual add before it) and LayerNorm, forward and backward.

Notation: rows ``x`` [M, N] (any row stride, unit column stride), weight ``w`` [N], all statistics in fp32.

    RMSNorm     rstd = 1 / sqrt(mean(x²) + eps)             (M fp32, saved)
                n    = x · rstd
                y    = w · round_x(n)          ROUND_NORMED   (Llama, Mistral, Qwen2/3, Phi-3: HF casts n first)
                y    = (1 + w) · n             ADD_ONE        (Gemma 1/2/3: scale in fp32, round once)
                y    = w · n                   neither        (OLMo-2, GPT-OSS: scale in fp32, round once)
                with HAS_RESIDUAL:  h = round(x + r) is written and normalised in place of x
    backward    g    = dy · w'  (w' = 1 + w or w)
                dx   = rstd · (g - n · mean(g · n))  (+ dh, the gradient of the residual output h)
                dw   = Σ_rows dy · n'   (n' = round_x(n) with ROUND_NORMED, else n)

    LayerNorm   mean, rstd = 1 / sqrt(var + eps)             (2 M fp32, saved)
                x̂ = (x - mean) · rstd,   y = w · x̂ + b
    backward    g  = dy · w
                dx = rstd · (g - mean(g) - x̂ · mean(g · x̂))
                dw = Σ_rows dy · x̂,   db = Σ_rows dy

Memory: the forward saves nothing but its input (or ``h``) and the per-row fp32 statistics: no fp32 copy of x and
no normalised output. HF's eager RMSNorm keeps the fp32 copy, and the normalised output when the weight trains: 2
or 3 hidden vectors per token in 16-bit dtypes, against 1 here. The backward recomputes n / x̂ in registers.

Tiling: each program owns BLOCK_M rows of BLOCK_N ≥ N columns held in registers (one pass over x, one over dy).
Rows wider than the launcher's largest block (CHUNKED) are swept in BLOCK_N chunks: twice (RMSNorm) or three times
(LayerNorm) in the forward, twice in the backward, and the weight gradients then come from ``_norm_dw_kernel``.
Weight gradients are per-program fp32 partial sums ([programs, N], summed by the launcher): deterministic, no
atomics. Row offsets are int64. Every downcast rounds to nearest-even (RNE_BF16: by hand, for the CPU interpreter).
"""

import triton
import triton.language as tl


@triton.jit
def _cast(v, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """``v.to(dtype)`` for fp32 ``v``. RNE_BF16 rounds fp32 → bf16 to nearest-even in integer ops first: GPUs round
    so in hardware, but the CPU interpreter truncates, which would double the rounding error the tests bound."""
    if RNE_BF16 and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _rms_scale(n, w, x_dtype: tl.constexpr, ADD_ONE: tl.constexpr, ROUND_NORMED: tl.constexpr,
               RNE_BF16: tl.constexpr):
    """``y`` in fp32 from the normalised rows ``n`` and the fp32 weight (HF's cast order, see the module doc)."""
    if ROUND_NORMED:
        n = _cast(n, x_dtype, RNE_BF16).to(tl.float32)
    if ADD_ONE:
        w = w + 1.0
    return n * w[None, :]


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, stride_xm,
    r_ptr, stride_rm,
    h_ptr, stride_hm,
    w_ptr,
    y_ptr, stride_ym,
    rstd_ptr,
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr, ADD_ONE: tl.constexpr, ROUND_NORMED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKED: tl.constexpr, RNE_BF16: tl.constexpr,
):
    """``y = rmsnorm(x)`` (or ``h = x + r; y = rmsnorm(h)`` with HAS_RESIDUAL) for BLOCK_M rows; writes rstd."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if not CHUNKED:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
            # rounded as the eager ``residual + hidden`` rounds it: the norm sees the h the next block receives
            x = _cast(x.to(tl.float32) + r.to(tl.float32), h_ptr.dtype.element_ty, RNE_BF16)
            tl.store(h_ptr + rows[:, None] * stride_hm + cols[None, :], x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = _rms_scale(xf * rstd[:, None], w, x.dtype, ADD_ONE, ROUND_NORMED, RNE_BF16)
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], _cast(y, y_ptr.dtype.element_ty, RNE_BF16),
                 mask=mask)
    else:
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < N)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(r_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
                x = _cast(x.to(tl.float32) + r.to(tl.float32), h_ptr.dtype.element_ty, RNE_BF16)
                tl.store(h_ptr + rows[:, None] * stride_hm + cols[None, :], x, mask=mask)
            xf = x.to(tl.float32)
            ss += tl.sum(xf * xf, axis=1)
        rstd = tl.rsqrt(ss / N + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
            if HAS_RESIDUAL:
                # recomputed rather than re-read from h: other threads of this program wrote h, unsynchronised
                r = tl.load(r_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
                x = _cast(x.to(tl.float32) + r.to(tl.float32), h_ptr.dtype.element_ty, RNE_BF16)
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = _rms_scale(x.to(tl.float32) * rstd[:, None], w, x.dtype, ADD_ONE, ROUND_NORMED, RNE_BF16)
            tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], _cast(y, y_ptr.dtype.element_ty, RNE_BF16),
                     mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, stride_dym,
    x_ptr, stride_xm,
    w_ptr, rstd_ptr,
    dh_ptr, stride_dhm,
    dx_ptr, stride_dxm,
    dw_ptr, stride_dwp,
    M, N, rows_per_program,
    HAS_DH: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, ADD_ONE: tl.constexpr,
    ROUND_NORMED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKED: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    """dx (+ dh) for rows [pid · rows_per_program, +rows_per_program) and, unless CHUNKED, this program's dw partial
    sum (row ``pid`` of dw [programs, N], fp32). ``x`` is the normalised input (``h`` for the residual op)."""
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if not CHUNKED:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if ADD_ONE:
            w = tl.where(col_ok, w + 1.0, 0.0)
        dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(0, rows_per_program, BLOCK_M):
            rows = row_start + i + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            n = x.to(tl.float32) * rstd[:, None]
            if NEED_DW:
                if ROUND_NORMED:
                    dw_acc += dy * _cast(n, x.dtype, RNE_BF16).to(tl.float32)
                else:
                    dw_acc += dy * n
            if NEED_DX:
                g = dy * w[None, :]
                c = tl.sum(g * n, axis=1) / N
                dx = (g - n * c[:, None]) * rstd[:, None]
                if HAS_DH:
                    dx += tl.load(dh_ptr + rows[:, None] * stride_dhm + cols[None, :], mask=mask,
                                  other=0.0).to(tl.float32)
                tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :],
                         _cast(dx, dx_ptr.dtype.element_ty, RNE_BF16), mask=mask)
        if NEED_DW:
            tl.store(dw_ptr + pid.to(tl.int64) * stride_dwp + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    else:
        for i in range(0, rows_per_program, BLOCK_M):
            rows = row_start + i + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            c = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < N
                mask = row_ok[:, None] & col_ok[None, :]
                x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
                dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
                w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                if ADD_ONE:
                    w = tl.where(col_ok, w + 1.0, 0.0)
                c += tl.sum(dy.to(tl.float32) * w[None, :] * x.to(tl.float32), axis=1)
            c = c * rstd / N
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < N
                mask = row_ok[:, None] & col_ok[None, :]
                x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
                dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
                w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                if ADD_ONE:
                    w = w + 1.0
                n = x.to(tl.float32) * rstd[:, None]
                dx = (dy.to(tl.float32) * w[None, :] - n * c[:, None]) * rstd[:, None]
                if HAS_DH:
                    dx += tl.load(dh_ptr + rows[:, None] * stride_dhm + cols[None, :], mask=mask,
                                  other=0.0).to(tl.float32)
                tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :],
                         _cast(dx, dx_ptr.dtype.element_ty, RNE_BF16), mask=mask)


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, stride_xm,
    w_ptr, b_ptr,
    y_ptr, stride_ym,
    mean_ptr, rstd_ptr,
    M, N, eps,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKED: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    """``y = (x - mean) · rstd · w + b`` for BLOCK_M rows; writes mean and rstd (two-pass variance, in fp32)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if not CHUNKED:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        y = xc * rstd[:, None] * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], _cast(y, y_ptr.dtype.element_ty, RNE_BF16),
                 mask=mask)
    else:
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < N)[None, :]
            acc += tl.sum(tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask,
                                  other=0.0).to(tl.float32), axis=1)
        mean = acc / N
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < N)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            acc += tl.sum(xc * xc, axis=1)
        rstd = tl.rsqrt(acc / N + eps)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None] * tl.load(w_ptr + cols, mask=col_ok,
                                                              other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], _cast(y, y_ptr.dtype.element_ty, RNE_BF16),
                     mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr, stride_dym,
    x_ptr, stride_xm,
    w_ptr, mean_ptr, rstd_ptr,
    dx_ptr, stride_dxm,
    dw_ptr, db_ptr, stride_dwp,
    M, N, rows_per_program,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKED: tl.constexpr, RNE_BF16: tl.constexpr,
):
    """dx for rows [pid · rows_per_program, +rows_per_program) and, unless CHUNKED, this program's dw / db partial
    sums (row ``pid`` of dw / db [programs, N], fp32)."""
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if not CHUNKED:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(0, rows_per_program, BLOCK_M):
            rows = row_start + i + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if NEED_DW:
                dw_acc += dy * xhat
            if NEED_DB:
                db_acc += dy
            if NEED_DX:
                g = dy * w[None, :]
                c1 = tl.sum(g, axis=1) / N
                c2 = tl.sum(g * xhat, axis=1) / N
                dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
                tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :],
                         _cast(dx, dx_ptr.dtype.element_ty, RNE_BF16), mask=mask)
        if NEED_DW:
            tl.store(dw_ptr + pid.to(tl.int64) * stride_dwp + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
        if NEED_DB:
            tl.store(db_ptr + pid.to(tl.int64) * stride_dwp + cols, tl.sum(db_acc, axis=0), mask=col_ok)
    else:
        for i in range(0, rows_per_program, BLOCK_M):
            rows = row_start + i + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            c1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            c2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < N
                mask = row_ok[:, None] & col_ok[None, :]
                x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
                dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
                g = dy.to(tl.float32) * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                c1 += tl.sum(g, axis=1)
                c2 += tl.sum(g * tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0), axis=1)
            c1 = c1 / N
            c2 = c2 / N
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < N
                mask = row_ok[:, None] & col_ok[None, :]
                x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
                dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
                g = dy.to(tl.float32) * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
                dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
                tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :],
                         _cast(dx, dx_ptr.dtype.element_ty, RNE_BF16), mask=mask)


@triton.jit
def _norm_dw_kernel(
    dy_ptr, stride_dym,
    x_ptr, stride_xm,
    mean_ptr, rstd_ptr,
    dw_ptr, db_ptr, stride_dwp,
    M, N, rows_per_program,
    CENTER: tl.constexpr, ROUND_NORMED: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RNE_BF16: tl.constexpr,
):
    """Weight (and bias) gradient partials for rows too wide for one block: program (pid_n, pid_m) sums
    ``dy · n`` (and ``dy``) over rows [pid_m · rows_per_program, +rows_per_program) of columns
    [pid_n · BLOCK_N, +BLOCK_N) into row pid_m of dw / db [programs, N]. CENTER: LayerNorm's n = (x - mean) · rstd;
    else RMSNorm's n = x · rstd (rounded to x's dtype with ROUND_NORMED)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    row_start = pid_m.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, rows_per_program, BLOCK_M):
        rows = row_start + i + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_DW:
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            if CENTER:
                mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
                n = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
            else:
                n = x.to(tl.float32) * rstd[:, None]
                if ROUND_NORMED:
                    n = _cast(n, x.dtype, RNE_BF16).to(tl.float32)
            dw_acc += dy * n
        if NEED_DB:
            db_acc += dy
    if NEED_DW:
        tl.store(dw_ptr + pid_m.to(tl.int64) * stride_dwp + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if NEED_DB:
        tl.store(db_ptr + pid_m.to(tl.int64) * stride_dwp + cols, tl.sum(db_acc, axis=0), mask=col_ok)
