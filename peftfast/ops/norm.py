"""Fused RMSNorm, residual-add + RMSNorm and LayerNorm ops, with backends Triton, cpp (RMSNorm) and torch.

``rms_norm`` follows one of three Hugging Face forms (``FORMS``); each matches its eager module's rounding:

    "llama"  y = w · round_x(x · rstd)          Llama, Mistral, Qwen2/3, Phi-3 (``weight * h.to(input_dtype)``;
                                                 y has the promoted dtype of x and w, as in eager)
    "gemma"  y = round_x((1 + w) · x · rstd)     Gemma, Gemma 2/3 (fp32 product, cast once)
    "olmo2"  y = round_x(w · x · rstd)           OLMo-2/3, GPT-OSS (fp32 product, cast once)

``add_rms_norm`` computes ``h = x + residual; y = rms_norm(h)`` in one launch and returns ``(y, h)``; the decoder
block wiring that uses it (pre-norm blocks pass ``h`` on as the next residual) comes with the block-fusion work.
``layer_norm`` is ``nn.LayerNorm`` over the last dim, computed in fp32.

Memory contract, both backends: saved for backward are the norm's input (``h`` for ``add_rms_norm``, which is an
output the next block keeps anyway) and the per-row fp32 statistics (rstd; mean and rstd for LayerNorm), plus the
weight. No fp32 copy of x and no normalised output is kept: the backward recomputes them. The weight gradient is
computed only when the weight requires grad, from per-program fp32 partial sums (deterministic, no atomics).

Backend ``cpp`` (``auto`` on CPU when ``peftfast._C`` is built) runs the RMSNorm ops on the C++ kernels of
``csrc/norm.cpp`` (``torch.ops.peftfast.rms_norm_fwd`` / ``rms_norm_bwd``): the Triton kernels' maths and rounding
points, one pass per row in fp32, the same saved tensors. LayerNorm has no C++ kernel (ATen's is already fused on
CPU): ``cpp`` runs it on the torch backend.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from peftfast.ops import _direct, _library
from peftfast.ops._backend import interpreting, resolve_backend
from peftfast.ops._counters import launching
from peftfast.ops._direct import out_view

FORMS: dict[str, tuple[bool, bool]] = {"llama": (False, True), "gemma": (True, False), "olmo2": (False, False)}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

MAX_BLOCK_N = 8192  # widest row held whole in registers (16 warps: 16 fp32 values a thread per row tensor)
CHUNK_N = 4096  # wider rows are swept in chunks of this many columns
ROW_TILE = 4096  # narrow rows: a program takes ROW_TILE // BLOCK_N rows, so small launches stay busy
MAX_BLOCK_M = 16
DW_BLOCK_M, DW_BLOCK_N, DW_WARPS, DW_STAGES = 16, 256, 8, 1  # ``_norm_dw_kernel`` tiles (chunked rows only)


@dataclass(frozen=True)
class NormConfig:
    block_m: int
    block_n: int
    chunked: bool
    num_warps: int
    # no software pipelining of the row loops: it would stage whole rows in shared memory (96 KB for two bf16
    # 8192-wide operands at 3 stages) and cut occupancy, which is what hides latency in these memory-bound kernels
    num_stages: int = 1


def norm_config(n: int) -> NormConfig:
    """Tiles and warps for rows of ``n`` columns (shared by every norm kernel, forward and backward)."""
    block_n = triton.next_power_of_2(n)
    chunked = block_n > MAX_BLOCK_N
    if chunked:
        block_n = CHUNK_N
    block_m = 1 if chunked else max(1, min(MAX_BLOCK_M, ROW_TILE // block_n))
    elems = block_m * block_n
    warps = 16 if elems >= 8192 else 8 if elems >= 2048 else 4
    return NormConfig(block_m, block_n, chunked, warps)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _max_programs(device: torch.device) -> int:
    """Programs a weight-gradient reduction spreads over: a few waves on a GPU; two in the interpreter, so that
    small tests still sum several rows per program and several partials."""
    if device.type != "cuda":
        return 2
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _split_rows(m: int, block_m: int, programs: int) -> tuple[int, int]:
    """(rows per program, a multiple of ``block_m``; number of programs) covering ``m`` rows."""
    blocks = triton.cdiv(m, block_m)
    per = triton.cdiv(blocks, max(1, min(blocks, programs))) * block_m
    return per, triton.cdiv(m, per)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as [M, n] rows with a unit column stride and one row stride (kernels take a single row stride).

    A view when the layout allows it (contiguous, row slices, expanded gradients); else a contiguous copy: a
    strided last dim or leading dims that do not flatten to one stride cannot be addressed by the kernels.
    """
    if t.stride(-1) == 1 or t.shape[-1] == 1:
        try:
            return t.view(-1, n)
        except RuntimeError:
            pass
    return t.contiguous().view(-1, n)


# ----------------------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------------------
def _kernels():
    from peftfast.kernels import norm as K

    return K


def _reduce_partials(part: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if part is None else part.sum(0).to(dtype)


def _launch_dw(dy2d, x2d, mean, rstd, *, center: bool, round_normed: bool, need_dw: bool, need_db: bool):
    """Weight / bias gradient partials of chunked rows with ``_norm_dw_kernel``; returns the [P, N] fp32 buffers."""
    m, n = x2d.shape
    col_blocks = triton.cdiv(n, DW_BLOCK_N)
    per, progs = _split_rows(m, DW_BLOCK_M, max(1, _max_programs(x2d.device) // col_blocks))
    dw = torch.empty((progs, n), device=x2d.device, dtype=torch.float32) if need_dw else None
    db = torch.empty((progs, n), device=x2d.device, dtype=torch.float32) if need_db else None
    some = dw if dw is not None else db
    with launching("_norm_dw_kernel"):
        _kernels()._norm_dw_kernel[(col_blocks, progs)](
            dy2d, dy2d.stride(0), x2d, x2d.stride(0), mean if mean is not None else rstd, rstd,
            dw if dw is not None else some, db if db is not None else some, some.stride(0), m, n, per,
            CENTER=center, ROUND_NORMED=round_normed, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_M=DW_BLOCK_M, BLOCK_N=DW_BLOCK_N, RNE_BF16=interpreting(), num_warps=DW_WARPS,
            num_stages=DW_STAGES)
    return dw, db


def _triton_rms_fwd(x2d, r2d, h2d, w, y2d, rstd, eps, add_one, round_normed) -> None:
    m, n = x2d.shape
    cfg = norm_config(n)
    has_res = r2d is not None
    r2d = r2d if has_res else x2d
    h2d = h2d if has_res else y2d
    with launching("_rms_norm_fwd_kernel"):
        _kernels()._rms_norm_fwd_kernel[(triton.cdiv(m, cfg.block_m),)](
            x2d, x2d.stride(0), r2d, r2d.stride(0), h2d, h2d.stride(0), w, y2d, y2d.stride(0), rstd, m, n, eps,
            HAS_RESIDUAL=has_res, ADD_ONE=add_one, ROUND_NORMED=round_normed,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CHUNKED=cfg.chunked, RNE_BF16=interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _triton_rms_bwd(dy2d, x2d, w, rstd, dh2d, add_one, round_normed, need_dx, need_dw):
    m, n = x2d.shape
    cfg = norm_config(n)
    fused_dw = need_dw and not cfg.chunked
    dx = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype) if need_dx else None
    part = None
    if need_dx or fused_dw:
        programs = _max_programs(x2d.device) if fused_dw else triton.cdiv(m, cfg.block_m)
        per, progs = _split_rows(m, cfg.block_m, programs)
        part = torch.empty((progs, n), device=x2d.device, dtype=torch.float32) if fused_dw else None
        dx_arg = dx if dx is not None else x2d
        dh_arg = dh2d if dh2d is not None else dx_arg
        part_arg = part if part is not None else rstd
        with launching("_rms_norm_bwd_kernel"):
            _kernels()._rms_norm_bwd_kernel[(progs,)](
                dy2d, dy2d.stride(0), x2d, x2d.stride(0), w, rstd, dh_arg, dh_arg.stride(0), dx_arg,
                dx_arg.stride(0), part_arg, part.stride(0) if part is not None else 0, m, n, per,
                HAS_DH=dh2d is not None, NEED_DX=need_dx, NEED_DW=fused_dw, ADD_ONE=add_one,
                ROUND_NORMED=round_normed, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CHUNKED=cfg.chunked,
                RNE_BF16=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if need_dw and cfg.chunked:
        part, _ = _launch_dw(dy2d, x2d, None, rstd, center=False, round_normed=round_normed, need_dw=True,
                             need_db=False)
    return dx, _reduce_partials(part, w.dtype)


def _triton_ln_fwd(x2d, w, b, y2d, mean, rstd, eps) -> None:
    m, n = x2d.shape
    cfg = norm_config(n)
    with launching("_layer_norm_fwd_kernel"):
        _kernels()._layer_norm_fwd_kernel[(triton.cdiv(m, cfg.block_m),)](
            x2d, x2d.stride(0), w, b if b is not None else w, y2d, y2d.stride(0), mean, rstd, m, n, eps,
            HAS_BIAS=b is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CHUNKED=cfg.chunked,
            RNE_BF16=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _triton_ln_bwd(dy2d, x2d, w, b, mean, rstd, need_dx, need_dw, need_db):
    m, n = x2d.shape
    cfg = norm_config(n)
    fused = (need_dw or need_db) and not cfg.chunked
    dx = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype) if need_dx else None
    dw = db = None
    if need_dx or fused:
        programs = _max_programs(x2d.device) if fused else triton.cdiv(m, cfg.block_m)
        per, progs = _split_rows(m, cfg.block_m, programs)
        dw = torch.empty((progs, n), device=x2d.device, dtype=torch.float32) if fused and need_dw else None
        db = torch.empty((progs, n), device=x2d.device, dtype=torch.float32) if fused and need_db else None
        dx_arg = dx if dx is not None else x2d
        some = dw if dw is not None else db if db is not None else rstd
        with launching("_layer_norm_bwd_kernel"):
            _kernels()._layer_norm_bwd_kernel[(progs,)](
                dy2d, dy2d.stride(0), x2d, x2d.stride(0), w, mean, rstd, dx_arg, dx_arg.stride(0),
                dw if dw is not None else some, db if db is not None else some, some.stride(0) if fused else 0,
                m, n, per, NEED_DX=need_dx, NEED_DW=fused and need_dw, NEED_DB=fused and need_db,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CHUNKED=cfg.chunked, RNE_BF16=interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if (need_dw or need_db) and cfg.chunked:
        dw, db = _launch_dw(dy2d, x2d, mean, rstd, center=True, round_normed=False, need_dw=need_dw,
                            need_db=need_db)
    return dx, _reduce_partials(dw, w.dtype), _reduce_partials(db, b.dtype if b is not None else w.dtype)


# ----------------------------------------------------------------------------------------------------------------
# torch backend (same saved tensors; fp32 inside)
# ----------------------------------------------------------------------------------------------------------------
def _torch_rms_fwd(x2d, w, eps, add_one, round_normed, out_dtype):
    # the ops (and their order) of HF's eager modules, so this backend's forward matches them bit for bit
    xf = x2d.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    n = xf * rstd[:, None]
    if round_normed:
        y = w * n.to(x2d.dtype)
    else:
        y = (n * ((1.0 + w.float()) if add_one else w.float())).to(out_dtype)
    return y, rstd


def _torch_rms_bwd(dy2d, x2d, w, rstd, dh2d, add_one, round_normed, need_dx, need_dw):
    n = x2d.float() * rstd[:, None]
    dyf = dy2d.float()
    dx = dw = None
    if need_dx:
        g = dyf * ((1.0 + w.float()) if add_one else w.float())
        dx = (g - n * (g * n).mean(-1, keepdim=True)) * rstd[:, None]
        if dh2d is not None:
            dx += dh2d
        dx = dx.to(x2d.dtype)
    if need_dw:
        nw = n.to(x2d.dtype).float() if round_normed else n
        dw = (dyf * nw).sum(0).to(w.dtype)
    return dx, dw


def _torch_ln_fwd(x2d, w, b, eps, out_dtype):
    xf = x2d.float()
    mean = xf.mean(-1)
    xc = xf - mean[:, None]
    rstd = torch.rsqrt((xc * xc).mean(-1) + eps)
    y = xc * rstd[:, None] * w.float()
    if b is not None:
        y += b.float()
    return y.to(out_dtype), mean, rstd


def _torch_ln_bwd(dy2d, x2d, w, b, mean, rstd, need_dx, need_dw, need_db):
    xhat = (x2d.float() - mean[:, None]) * rstd[:, None]
    dyf = dy2d.float()
    dx = dw = db = None
    if need_dx:
        g = dyf * w.float()
        dx = (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)) * rstd[:, None]
        dx = dx.to(x2d.dtype)
    if need_dw:
        dw = (dyf * xhat).sum(0).to(w.dtype)
    if need_db:
        db = dyf.sum(0).to(b.dtype)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------------------
# cpp backend: fake kernels of the C++ ops (so torch.compile traces them), registered when peftfast._C is loaded
# ----------------------------------------------------------------------------------------------------------------
def _register_cpp_fakes() -> None:
    def stat_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("peftfast::rms_norm_fwd")
    def _(x, residual, weight, eps, add_one, round_normed):
        ydt = torch.promote_types(x.dtype, weight.dtype) if round_normed else x.dtype
        m = 1
        for d in x.shape[:-1]:
            m = m * d
        h = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
        return x.new_empty(x.shape, dtype=ydt), h, x.new_empty((m,), dtype=stat_dtype(x))

    @torch.library.register_fake("peftfast::rms_norm_bwd")
    def _(dy, x, weight, rstd, dh, add_one, round_normed, need_dx, need_dw):
        dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
        return dx, weight.new_empty(weight.shape) if need_dw else weight.new_empty((0,))

    torch.library.register_autograd("peftfast::rms_norm_bwd", _no_double_backward("RMSNorm"),
                                    setup_context=lambda ctx, inputs, output: None)


# the schemas of csrc/ops.cpp, declared here in a process without peftfast._C
_RMS_SCHEMAS = (
    "rms_norm_fwd(Tensor x, Tensor? residual, Tensor weight, float eps, bool add_one, bool round_normed) -> "
    "(Tensor, Tensor, Tensor)",
    "rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor? dh, bool add_one, bool round_normed, "
    "bool need_dx, bool need_dw) -> (Tensor, Tensor)",
)


def _rms_fwd_impl(backend: str):
    """``rms_norm_fwd``'s kernel on ``backend`` ("triton": the CUDA kernel; "torch": the CPU one without ``_C``)."""

    def impl(x, residual, weight, eps, add_one, round_normed):
        lead, n = x.shape[:-1], x.shape[-1]
        out_dtype = torch.promote_types(x.dtype, weight.dtype) if round_normed else x.dtype
        x2d = _rows(x, n)
        r2d = _rows(residual, n) if residual is not None else None
        if backend == "triton":
            m = x2d.shape[0]
            y = torch.empty((*lead, n), device=x.device, dtype=out_dtype)
            rstd = torch.empty((m,), device=x.device, dtype=torch.float32)
            h = torch.empty((*lead, n), device=x.device, dtype=x.dtype) if r2d is not None else x.new_empty((0,))
            if m > 0:
                _triton_rms_fwd(x2d, r2d, h.view(-1, n) if r2d is not None else None, weight, y.view(-1, n), rstd,
                                eps, add_one, round_normed)
            return y, h, rstd
        h2d = x2d + r2d if r2d is not None else None
        y2d, rstd = _torch_rms_fwd(h2d if h2d is not None else x2d, weight, eps, add_one, round_normed, out_dtype)
        return y2d.reshape(*lead, n), h2d.view(*lead, n) if h2d is not None else x.new_empty((0,)), rstd

    return impl


def _rms_bwd_impl(backend: str):
    """``rms_norm_bwd``'s kernel on ``backend`` (as ``_rms_fwd_impl``)."""

    def impl(dy, x, weight, rstd, dh, add_one, round_normed, need_dx, need_dw):
        n = x.shape[-1]
        x2d = _rows(x, n)
        if x2d.shape[0] == 0:
            dx, dw = x2d.new_zeros(x2d.shape), weight.new_zeros(weight.shape)
        else:
            fn = _triton_rms_bwd if backend == "triton" else _torch_rms_bwd
            dx, dw = fn(_rows(dy, n), x2d, weight, rstd, _rows(dh, n) if dh is not None else None, add_one,
                        round_normed, need_dx, need_dw)
        return (dx.view(x.shape) if need_dx else x.new_empty((0,)),
                dw if need_dw else weight.new_empty((0,)))

    return impl


def _ln_fwd_impl(backend: str):
    """``layer_norm_fwd``'s kernel on ``backend`` (x [M, N] rows; mean and rstd fp32)."""

    def impl(x, weight, bias, eps, out_dtype):
        if backend != "triton":
            return _torch_ln_fwd(x, weight, bias, eps, out_dtype)
        m, n = x.shape
        y = torch.empty((m, n), device=x.device, dtype=out_dtype)
        mean = torch.empty((m,), device=x.device, dtype=torch.float32)
        rstd = torch.empty((m,), device=x.device, dtype=torch.float32)
        if m > 0:
            _triton_ln_fwd(x, weight, bias, y, mean, rstd, eps)
        return y, mean, rstd

    return impl


def _ln_bwd_impl(backend: str):
    """``layer_norm_bwd``'s kernel on ``backend``: (dx, dw, db), each empty where not asked for."""

    def impl(dy, x, weight, bias, mean, rstd, need_dx, need_dw, need_db):
        if x.shape[0] == 0:
            dx, dw = torch.zeros_like(x), torch.zeros_like(weight)
            db = torch.zeros_like(bias) if bias is not None else None
        else:
            fn = _triton_ln_bwd if backend == "triton" else _torch_ln_bwd
            dx, dw, db = fn(dy, x, weight, bias, mean, rstd, need_dx, need_dw, need_db and bias is not None)
        return (dx if need_dx else x.new_empty((0,)), dw if need_dw else x.new_empty((0,)),
                db if need_db and bias is not None else x.new_empty((0,)))  # three empties: outputs may not alias

    return impl


# backend -> (forward, backward) kernels of the LayerNorm ops, which the eager Function calls directly
_LN_KERNELS = {b: (_ln_fwd_impl(b), _ln_bwd_impl(b)) for b in ("triton", "torch")}
# LayerNorm has no C++ kernel (ATen's is one fused op on CPU): its ops are declared here in every process
_LN_SCHEMAS = (
    "layer_norm_fwd(Tensor x, Tensor weight, Tensor? bias, float eps, ScalarType out_dtype) -> (Tensor, Tensor, "
    "Tensor)",
    "layer_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor? bias, Tensor mean, Tensor rstd, bool need_dx, "
    "bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)",
)


def _register() -> None:
    """The norm ops' CUDA (Triton) kernels, fake kernels and backward guards (see :mod:`peftfast.ops._library`);
    without ``peftfast._C`` also the RMSNorm ops' schemas, with ATen CPU kernels."""
    global _LIB, _LN_LIB, _ATEN_OPS
    _LIB, _ATEN_OPS = _library.register(
        _RMS_SCHEMAS, {"rms_norm_fwd": _rms_fwd_impl("torch"), "rms_norm_bwd": _rms_bwd_impl("torch")},
        {"rms_norm_fwd": _rms_fwd_impl("triton"), "rms_norm_bwd": _rms_bwd_impl("triton")})
    names = ("layer_norm_fwd", "layer_norm_bwd")
    _LN_LIB, _ = _library.register(_LN_SCHEMAS, dict(zip(names, _LN_KERNELS["torch"])),
                                   dict(zip(names, _LN_KERNELS["triton"])), ext_declares=False)
    _register_cpp_fakes()

    @torch.library.register_fake("peftfast::layer_norm_fwd")
    def _(x, weight, bias, eps, out_dtype):
        stat = (x.shape[0],)
        return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(stat, dtype=torch.float32), x.new_empty(
            stat, dtype=torch.float32)

    @torch.library.register_fake("peftfast::layer_norm_bwd")
    def _(dy, x, weight, bias, mean, rstd, need_dx, need_dw, need_db):
        return (x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
                weight.new_empty(weight.shape) if need_dw else x.new_empty((0,)),
                bias.new_empty(bias.shape) if need_db and bias is not None else x.new_empty((0,)))

    torch.library.register_autograd("peftfast::layer_norm_bwd", _no_double_backward("LayerNorm"),
                                    setup_context=lambda ctx, inputs, output: None)


def _no_double_backward(what: str):
    def guard(ctx, *grads):
        raise RuntimeError(f"peftfast: the fused {what} does not support double backward (create_graph=True); "
                           "use backend='torch'")

    return guard


_LIB = _LN_LIB = None
_ATEN_OPS = False  # the RMSNorm ops' schemas defined here (no peftfast._C): their CPU kernel is the torch backend
_register()


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------
class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps: float, form: str, backend: str):
        add_one, round_normed = FORMS[form]
        lead, n = x.shape[:-1], x.shape[-1]
        # promote_types is an aten op: skip it in the common case of one dtype
        mixed = round_normed and weight.dtype != x.dtype
        out_dtype = torch.promote_types(x.dtype, weight.dtype) if mixed else x.dtype
        if _library.through_op(backend):
            # the registered op (the C++ kernel, or the Triton one on CUDA under torch.compile) takes [..., N] with
            # any strides: x itself is saved (no copy, whatever its layout)
            backend = "cpp"
            y, h, rstd = _direct.undifferentiated(torch.ops.peftfast.rms_norm_fwd,
                                                  x, residual, weight, eps, add_one, round_normed)
            h = h if residual is not None else None
            ctx.save_for_backward(h if h is not None else x, weight, rstd)
            ctx.form, ctx.backend, ctx.lead, ctx.has_res = form, backend, lead, residual is not None
            ctx.set_materialize_grads(False)
            return y if h is None else (y, h)
        x2d = _rows(x, n)
        m = x2d.shape[0]
        r2d = _rows(residual, n) if residual is not None else None
        if backend == "triton":
            y = torch.empty((*lead, n), device=x.device, dtype=out_dtype)
            rstd = torch.empty((m,), device=x.device, dtype=torch.float32)
            h = torch.empty((*lead, n), device=x.device, dtype=x.dtype) if residual is not None else None
            h2d = h.view(-1, n) if h is not None else None
            if m > 0:
                _triton_rms_fwd(x2d, r2d, h2d, weight, y.view(-1, n), rstd, eps, add_one, round_normed)
        else:
            h2d = x2d + r2d if residual is not None else None
            y2d, rstd = _torch_rms_fwd(h2d if h2d is not None else x2d, weight, eps, add_one, round_normed,
                                       out_dtype)
            y = out_view(y2d, *lead, n)  # a view would refuse in-place changes (h stays one: it is saved)
            h = h2d.view(*lead, n) if h2d is not None else None
        # h is an output (the next residual) and kept by the graph anyway: saving it adds nothing
        ctx.save_for_backward(h if h is not None else x2d, weight, rstd)
        ctx.form, ctx.backend, ctx.lead, ctx.has_res = form, backend, lead, residual is not None
        ctx.set_materialize_grads(False)
        return y if h is None else (y, h)

    @staticmethod
    def backward(ctx, dy, dh=None):
        xs, weight, rstd = ctx.saved_tensors
        add_one, round_normed = FORMS[ctx.form]
        if ctx.backend == "cpp":
            return _cpp_rms_backward(ctx, dy, dh, xs, weight, rstd, add_one, round_normed)
        n = xs.shape[-1]
        xs = xs.view(-1, n)
        need = ctx.needs_input_grad  # x, residual, weight
        need_dx = need[0] or need[1]
        dh2d = _rows(dh, n) if dh is not None else None
        if dy is None:  # only h was used downstream
            dx, dw = dh2d, None
        else:
            dy2d = _rows(dy, n)
            fn = _triton_rms_bwd if ctx.backend == "triton" else _torch_rms_bwd
            if xs.shape[0] == 0:
                dx = torch.empty_like(xs) if need_dx else None
                dw = torch.zeros_like(weight) if need[2] else None
            else:
                dx, dw = fn(dy2d, xs, weight, rstd, dh2d, add_one, round_normed, need_dx, need[2])
        if dx is not None:
            dx = dx.view(*ctx.lead, n)
        return (dx if need[0] else None, dx if ctx.has_res and need[1] else None, dw, None, None, None)


def _cpp_rms_backward(ctx, dy, dh, xs, weight, rstd, add_one, round_normed):
    need = ctx.needs_input_grad  # x, residual, weight
    need_dx = need[0] or (ctx.has_res and need[1])
    if dy is None:  # only h was used downstream
        dx, dw = dh, None
    else:
        dx, dw = _direct.undifferentiated(torch.ops.peftfast.rms_norm_bwd, dy, xs, weight, rstd, dh, add_one,
                                          round_normed, need_dx, need[2])
        dx = dx if need_dx else None
        dw = dw if need[2] else None
    return (dx if need[0] else None, dx if ctx.has_res and need[1] else None, dw, None, None, None)


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, out_dtype: torch.dtype, backend: str):
        lead, n = x.shape[:-1], x.shape[-1]
        x2d = _rows(x, n)
        if backend == "triton" and torch.compiler.is_compiling():  # one opaque node (see ops/_library.py)
            backend = "op"
            y2d, mean, rstd = torch.ops.peftfast.layer_norm_fwd(x2d, weight, bias, eps, out_dtype)
        else:  # the ops' kernels themselves (cpp: LayerNorm has no C++ kernel, the torch one runs)
            backend = "triton" if backend == "triton" else "torch"
            y2d, mean, rstd = _LN_KERNELS[backend][0](x2d, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x2d, weight, bias, mean, rstd)
        ctx.backend, ctx.lead = backend, lead
        ctx.set_materialize_grads(False)
        return out_view(y2d, *lead, n)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:
            return None, None, None, None, None, None
        need = ctx.needs_input_grad  # x, weight, bias
        n = x2d.shape[1]
        args = (_rows(dy, n), x2d, weight, bias, mean, rstd, need[0], need[1], bias is not None and need[2])
        if ctx.backend == "op":
            dx, dw, db = _direct.undifferentiated(torch.ops.peftfast.layer_norm_bwd, *args)
        else:
            dx, dw, db = _LN_KERNELS[ctx.backend][1](*args)
        return ((dx.view(*ctx.lead, n) if need[0] else None), (dw if need[1] else None),
                (db if bias is not None and need[2] else None), None, None, None)


# ----------------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------------
def _check(x: torch.Tensor, weight: torch.Tensor, others: dict, name: str, what: str) -> None:
    where = f"peftfast {what} {name!r}"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{where}: expected a floating-point tensor, got {got}")
    if x.dim() == 0:
        raise ValueError(f"{where}: input must have at least one dimension")
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"{where}: input has {n} features, the weight has shape {tuple(weight.shape)}")
    for label, t in (("input", x), ("weight", weight), *((k, v) for k, v in others.items() if v is not None)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where}: {label} dtype {t.dtype} is not supported (float32, float16, bfloat16)")
        if t.device != x.device:
            raise ValueError(f"{where}: {label} is on {t.device}, the input on {x.device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, form: str = "llama", backend: str = "auto",
             name: str = "rms_norm") -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` [..., N] in Hugging Face's ``form`` (see the module doc)."""
    if form not in FORMS:
        raise ValueError(f"peftfast rms_norm {name!r}: unknown form {form!r}; choose one of {list(FORMS)}")
    _check(x, weight, {}, name, "rms_norm")
    return _RMSNormFunction.apply(x, None, weight, float(eps), form, resolve_backend(backend, x.device))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 form: str = "llama", backend: str = "auto",
                 name: str = "add_rms_norm") -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual; y = rms_norm(h)`` in one launch; returns ``(y, h)``. ``h`` is rounded to x's dtype as
    the eager add rounds it. Saved for backward: h and rstd. Both inputs get the gradient ``dh + ∂y/∂h · dy``.
    Pre-norm decoder blocks call it for ``residual + attn_out`` then ``post_attention_layernorm``
    (``peftfast.modules.block``)."""
    if form not in FORMS:
        raise ValueError(f"peftfast add_rms_norm {name!r}: unknown form {form!r}; choose one of {list(FORMS)}")
    _check(x, weight, {"residual": residual}, name, "add_rms_norm")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"peftfast add_rms_norm {name!r}: residual {tuple(residual.shape)} {residual.dtype} does "
                         f"not match the input {tuple(x.shape)} {x.dtype}")
    return _RMSNormFunction.apply(x, residual, weight, float(eps), form, resolve_backend(backend, x.device))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, *,
               out_dtype: torch.dtype | None = None, backend: str = "auto", name: str = "layer_norm") -> torch.Tensor:
    """``nn.LayerNorm`` over the last dim of ``x`` [..., N] (fp32 statistics); the output has ``out_dtype``
    (default: x's dtype; float32 reproduces autocast, which runs layer_norm in fp32)."""
    _check(x, weight, {"bias": bias}, name, "layer_norm")
    if bias is not None and bias.shape != weight.shape:
        raise ValueError(f"peftfast layer_norm {name!r}: bias {tuple(bias.shape)} does not match the weight "
                         f"{tuple(weight.shape)}")
    out_dtype = out_dtype or x.dtype
    return _LayerNormFunction.apply(x, weight, bias, float(eps), out_dtype, resolve_backend(backend, x.device))


__all__ = ["FORMS", "NormConfig", "add_rms_norm", "layer_norm", "norm_config", "rms_norm"]
