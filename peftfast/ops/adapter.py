"""Fused bottleneck Adapter op: ``h = res + s · act(x Wdᵀ + bd) Wuᵀ + bu`` with backends Triton, cpp and torch.

``res`` is ``x`` for sequential adapters (Houlsby, Pfeiffer) and the sublayer output for parallel ones. All
backends keep the same memory contract: saved for backward are ``x`` and the M × H pre-activation ``z`` only; the
activation output and the up-projection output are never kept. Backend ``cpp`` (``auto`` on CPU when
``peftfast._C`` is built) runs ``torch.ops.peftfast.adapter_fwd`` / ``adapter_bwd`` (csrc/adapter.cpp): ATen GEMMs
in the tensors' dtype, as the torch backend rounds them, with ``act(z)`` and, backward, ``dz = s·u⊙act'(z)``,
``act(z)`` and ``Σ act(z)⊙u`` in one fp32 row-wise pass (``u = dout·Wu`` kept in fp32, as the Triton kernel keeps
it); the weight gradients are the same GEMMs on ``dz`` and ``act(z)`` as the other backends'.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton

from peftfast.ops import _direct, _library
from peftfast.ops._backend import interpreting, resolve_backend
from peftfast.ops._counters import launching
from peftfast.ops._direct import out_view

ACTIVATIONS = {"relu": 0, "gelu": 1, "silu": 2, "gelu_tanh": 3}
MAX_BOTTLENECK = 256


# ----------------------------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------------------------
def _act(z: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return F.relu(z)
    if act == "gelu":
        return F.gelu(z)
    if act == "silu":
        return F.silu(z)
    return F.gelu(z, approximate="tanh")


def _act_backward(grad: torch.Tensor, z: torch.Tensor, act: str) -> torch.Tensor:
    """``grad ⊙ act'(z)`` in one fused ATen op (the ones autograd itself uses)."""
    if act == "relu":
        return torch.ops.aten.threshold_backward(grad, z, 0)
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    return torch.ops.aten.gelu_backward(grad, z, approximate="tanh" if act == "gelu_tanh" else "none")


# ----------------------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------------------
def _cfg(bm: int, bk: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


ADAPTER_CONFIGS = [_cfg(64, 64, 64, 4, 3), _cfg(64, 64, 128, 8, 3), _cfg(128, 64, 64, 8, 3), _cfg(64, 32, 64, 4, 4),
                   _cfg(64, 32, 32, 4, 3)]
INTERP_ADAPTER = {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32}


def smem_estimate(cfg: triton.Config, elt: int, block_h: int, arch: int, backward: bool) -> int:
    """Upper estimate of shared memory (checked against AOT compiles in ``tests/test_adapter_aot.py``): the
    pipelined buffers of the down loop (x / dz tiles and a [BLOCK_K, BLOCK_H] weight tile) plus those of the up
    loop ([BLOCK_H, BLOCK_N] weight tiles and, backward, the [BLOCK_M, BLOCK_N] gradient tiles)."""
    kw = cfg.kwargs
    stages = cfg.num_stages if arch >= 90 else max(cfg.num_stages - 1, 1)
    down = (kw["BLOCK_M"] + block_h) * kw["BLOCK_K"]
    up = (block_h + (kw["BLOCK_M"] if backward else 0)) * kw["BLOCK_N"]
    return (down + up) * elt * stages


def _prune(configs, named_args, **kwargs):
    from peftfast.ops import _triton_launch as L

    bh = kwargs["BLOCK_H"]
    elt = named_args["wd_ptr"].element_size()
    limit, arch = L._device_smem(), L._device_arch()
    backward = "ADD_G" in kwargs

    def need(c):
        return smem_estimate(c, elt, bh, arch, backward)

    # the [BLOCK_M, BLOCK_H] fp32 accumulators live in registers: cap them at 64 x 256 per program
    fits = [c for c in configs if c.kwargs["BLOCK_M"] * bh <= 64 * 256 and need(c) <= limit]
    return fits or [min(configs, key=need)]


@functools.cache
def _tuned(name: str):
    from peftfast.kernels import adapter as K

    fn = K._adapter_fwd_kernel if name == "fwd" else K._adapter_bwd_kernel
    # every store is idempotent (ds holds per-program partials), so autotuning reruns need no restore
    return triton.autotune(ADAPTER_CONFIGS, key=["K", "N", "H"], prune_configs_by={"early_config_prune": _prune})(fn)


def _block_h(h: int) -> int:
    return max(16, triton.next_power_of_2(h))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _launch(name: str, args: tuple, meta: dict, m: int) -> None:
    from peftfast.kernels import adapter as K

    kernel = K._adapter_fwd_kernel if name == "fwd" else K._adapter_bwd_kernel
    with launching(f"_adapter_{name}_kernel"):
        if interpreting():
            kernel[(triton.cdiv(m, INTERP_ADAPTER["BLOCK_M"]),)](*args, **meta, **INTERP_ADAPTER)
        else:
            _tuned(name)[lambda c: (triton.cdiv(m, c["BLOCK_M"]),)](*args, **meta)


def _triton_forward(x2d, res2d, wd, bd, wu, bu, scale_t, act):
    m, k = x2d.shape
    n, h = wu.shape
    z = torch.empty((m, h), device=x2d.device, dtype=x2d.dtype)
    out = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype)
    dummy = z
    args = (x2d, x2d.stride(0), x2d.stride(1), res2d, res2d.stride(0), res2d.stride(1), wd, wd.stride(0),
            wd.stride(1), bd if bd is not None else dummy, wu, wu.stride(0), wu.stride(1),
            bu if bu is not None else dummy, z, z.stride(0), z.stride(1), out, out.stride(0), out.stride(1),
            m, k, n, h, scale_t)
    meta = dict(HAS_BD=bd is not None, HAS_BU=bu is not None, ACT=ACTIVATIONS[act], BLOCK_H=_block_h(h),
                DOT_PRECISION=_precision(wd.dtype))
    _launch("fwd", args, meta, m)
    return out, z


def _triton_backward(g2d, z, x2d, wd, wu, scale_t, act, add_g, need_dx, need_ds):
    m, h = z.shape
    n = wu.shape[0]
    k = wd.shape[1]
    dz = torch.empty_like(z)
    a = torch.empty_like(z)
    dx = torch.empty((m, k), device=z.device, dtype=x2d.dtype) if need_dx else dz
    bm = INTERP_ADAPTER["BLOCK_M"] if interpreting() else min(c.kwargs["BLOCK_M"] for c in ADAPTER_CONFIGS)
    ds = torch.zeros(triton.cdiv(m, bm), device=z.device, dtype=torch.float32) if need_ds else scale_t
    args = (g2d, g2d.stride(0), g2d.stride(1), z, z.stride(0), z.stride(1), wd, wd.stride(0), wd.stride(1),
            wu, wu.stride(0), wu.stride(1), dz, dz.stride(0), dz.stride(1), a, a.stride(0), a.stride(1),
            dx, dx.stride(0), dx.stride(1), ds, m, k, n, h, scale_t)
    meta = dict(ADD_G=add_g, NEED_DX=need_dx, NEED_DS=need_ds, ACT=ACTIVATIONS[act], BLOCK_H=_block_h(h),
                DOT_PRECISION=_precision(wd.dtype))
    _launch("bwd", args, meta, m)
    return dz, a, (dx if need_dx else None), (ds.sum() if need_ds else None)


# ----------------------------------------------------------------------------------------------------------------
# cpp backend: fake kernels of the C++ ops (so torch.compile traces them), registered when peftfast._C is loaded
# ----------------------------------------------------------------------------------------------------------------
def _register_cpp_fakes() -> None:
    @torch.library.register_fake("peftfast::adapter_fwd")
    def _(x, residual, wd, bd, wu, bu, scale, act):
        return x.new_empty((x.shape[0], wu.shape[0])), x.new_empty((x.shape[0], wd.shape[0]))

    @torch.library.register_fake("peftfast::adapter_bwd")
    def _(grad, z, wd, wu, scale, act, add_grad, need_dx, need_ds):
        m, h = z.shape
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        dx = z.new_empty((m, wd.shape[1])) if need_dx else z.new_empty((0,))
        ds = z.new_empty((), dtype=acc) if need_ds else z.new_empty((0,), dtype=acc)
        return z.new_empty((m, h)), z.new_empty((m, h)), dx, ds

    def no_double_backward(ctx, *grads):
        raise RuntimeError("peftfast: the fused Adapter does not support double backward (create_graph=True); "
                           "use backend='torch'")

    torch.library.register_autograd("peftfast::adapter_bwd", no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def _torch_op_forward(x, residual, wd, bd, wu, bu, scale, act):
    """``adapter_fwd``'s ATen CPU kernel where ``peftfast._C`` is not loaded."""
    z = F.linear(x, wd, bd)
    out = (x if residual is None else residual) + F.linear(_act(z, act), wu) * scale.to(z.dtype)
    return (out if bu is None else out + bu), z


def _torch_op_backward(grad, z, wd, wu, scale, act, add_grad, need_dx, need_ds):
    """``adapter_bwd``'s ATen CPU kernel where ``peftfast._C`` is not loaded."""
    a = _act(z, act)
    u = grad.matmul(wu)
    dz = _act_backward(u * scale.to(u.dtype), z, act)
    dx = (dz.matmul(wd) + grad if add_grad else dz.matmul(wd)) if need_dx else z.new_empty((0,))
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32  # as the C++ kernel (and the fake)
    ds = (a.to(acc) * u.to(acc)).sum() if need_ds else z.new_empty((0,), dtype=acc)
    return dz, a, dx, ds


def _triton_op_backward(grad, z, wd, wu, scale, act, add_grad, need_dx, need_ds):
    dz, a, dx, ds = _triton_backward(grad, z, z, wd, wu, scale, act, add_grad, need_dx, need_ds)
    return (dz, a, dx if need_dx else z.new_empty((0,)),
            ds if need_ds else z.new_empty((0,), dtype=torch.float32))


# the schemas of csrc/ops.cpp, declared here in a process without peftfast._C
_SCHEMAS = (
    "adapter_fwd(Tensor x, Tensor? residual, Tensor wd, Tensor? bd, Tensor wu, Tensor? bu, Tensor scale, str act) "
    "-> (Tensor, Tensor)",
    "adapter_bwd(Tensor grad, Tensor z, Tensor wd, Tensor wu, Tensor scale, str act, bool add_grad, bool need_dx, "
    "bool need_ds) -> (Tensor, Tensor, Tensor, Tensor)",
)
_LIB, _ATEN_OPS = _library.register(
    _SCHEMAS, {"adapter_fwd": _torch_op_forward, "adapter_bwd": _torch_op_backward},
    {"adapter_fwd": lambda x, res, wd, bd, wu, bu, scale, act: _triton_forward(x, x if res is None else res, wd, bd,
                                                                                wu, bu, scale, act),
     "adapter_bwd": _triton_op_backward})
_register_cpp_fakes()


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------
class _AdapterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, res, wd, bd, wu, bu, scale, act: str, backend: str):
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1])
        res2d = x2d if res is None else res.reshape(-1, res.shape[-1])
        scale_t = scale.detach().reshape(1).float() if isinstance(scale, torch.Tensor) else \
            torch.full((1,), float(scale), device=x.device, dtype=torch.float32)
        if _library.through_op(backend):  # the C++ kernel, or the Triton one as one node under torch.compile
            backend = "cpp"
            out, z = _direct.undifferentiated(torch.ops.peftfast.adapter_fwd,
                                              x2d, None if res is None else res2d, wd, bd, wu, bu, scale_t, act)
        elif backend == "triton":
            out, z = _triton_forward(x2d, res2d, wd, bd, wu, bu, scale_t, act)
        else:
            z = F.linear(x2d, wd, bd)
            a = _act(z, act)
            if isinstance(scale, torch.Tensor):
                out = res2d + F.linear(a, wu) * scale_t.to(a.dtype)
            else:
                out = torch.addmm(res2d, a, wu.t(), alpha=float(scale))
            if bu is not None:
                out = out.add_(bu)
        ctx.save_for_backward(x2d, z, wd, wu, scale_t)
        ctx.act, ctx.backend, ctx.lead = act, backend, lead
        ctx.sequential = res is None
        ctx.has_bd, ctx.has_bu = bd is not None, bu is not None
        ctx.learned = isinstance(scale, torch.Tensor)
        ctx.scale_meta = (tuple(scale.shape), scale.dtype) if ctx.learned else None
        ctx.scale_value = None if ctx.learned else float(scale)
        return out_view(out, *lead, wu.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2d, z, wd, wu, scale_t = ctx.saved_tensors
        need = ctx.needs_input_grad  # x, res, wd, bd, wu, bu, scale
        g2d = grad.reshape(-1, grad.shape[-1])
        need_ds = ctx.learned and need[6]
        need_dx = need[0]
        if ctx.backend == "triton":
            dz, a, dx, ds = _triton_backward(g2d, z, x2d, wd, wu, scale_t, ctx.act, ctx.sequential, need_dx, need_ds)
        elif ctx.backend == "cpp":
            dz, a, dx, ds = _direct.undifferentiated(torch.ops.peftfast.adapter_bwd, g2d, z, wd, wu, scale_t, ctx.act,
                                                     ctx.sequential, need_dx, need_ds)
            dx = dx if need_dx else None
            ds = ds if need_ds else None
        else:
            a = _act(z, ctx.act)
            u = g2d.matmul(wu)
            dz = _act_backward(u * scale_t.to(u.dtype) if ctx.learned else u * ctx.scale_value, z, ctx.act)
            dx = None
            if need_dx:
                dx = dz.matmul(wd)
                if ctx.sequential:
                    dx = dx + g2d
            ds = (a.float() * u.float()).sum() if need_ds else None
        s = scale_t.to(wu.dtype) if ctx.learned else ctx.scale_value
        dres = g2d.view(*ctx.lead, -1) if (not ctx.sequential and need[1]) else None
        dwd = dz.t().matmul(x2d.to(dz.dtype)) if need[2] else None
        dbd = dz.sum(0) if (ctx.has_bd and need[3]) else None
        dwu = g2d.t().matmul(a) * s if need[4] else None
        dbu = g2d.sum(0) if (ctx.has_bu and need[5]) else None
        if ds is not None:
            ds = ds.reshape(ctx.scale_meta[0]).to(ctx.scale_meta[1])
        return (None if dx is None else dx.view(*ctx.lead, -1), dres, dwd, dbd, dwu, dbu, ds, None, None)


def _check(x, wd, bd, wu, bu, res, act, name) -> None:
    where = f"peftfast adapter {name!r}"
    if act not in ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {act!r}; choose one of {list(ACTIVATIONS)}")
    if wd.dim() != 2 or wu.dim() != 2:
        raise ValueError(f"{where}: projections must be 2-D (got {tuple(wd.shape)} and {tuple(wu.shape)})")
    h, k = wd.shape
    if x.shape[-1] != k:
        raise ValueError(f"{where}: input has {x.shape[-1]} features, the down-projection expects {k}")
    if wu.shape[1] != h:
        raise ValueError(f"{where}: up-projection {tuple(wu.shape)} does not match bottleneck {h}")
    if h > MAX_BOTTLENECK:
        raise ValueError(f"{where}: bottleneck {h} > {MAX_BOTTLENECK} is not supported by the fused kernel")
    n = wu.shape[0]
    if res is None and n != k:
        raise ValueError(f"{where}: a sequential adapter must map {k} features back to {k}, not {n}")
    if res is not None and res.shape != (*x.shape[:-1], n):
        raise ValueError(f"{where}: residual shape {tuple(res.shape)} != {(*x.shape[:-1], n)}")
    for t, what in ((bd, "down bias"), (bu, "up bias")):
        if t is not None and t.shape != ((h,) if what == "down bias" else (n,)):
            raise ValueError(f"{where}: {what} has shape {tuple(t.shape)}")
    dtypes = {t.dtype for t in (x, wd, wu, bd, bu, res) if t is not None}
    if len(dtypes) != 1:
        raise TypeError(f"{where}: input and adapter weights must share one dtype, got {sorted(map(str, dtypes))}")


def adapter_forward(x: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor | None, wu: torch.Tensor,
                    bu: torch.Tensor | None, scale: float | torch.Tensor, *, act: str = "relu",
                    residual: torch.Tensor | None = None, backend: str = "auto", name: str = "adapter") -> torch.Tensor:
    """``residual + scale · act(x Wdᵀ + bd) Wuᵀ + bu`` (``residual`` defaults to ``x``), fused.

    x [..., K]; wd [H, K]; wu [N, H]; H ≤ 256. ``scale`` is a float or a learned 1-element tensor. Saves x and the
    M × H pre-activation for backward.
    """
    _check(x, wd, bd, wu, bu, residual, act, name)
    be = resolve_backend(backend, x.device)
    return _AdapterFunction.apply(x, residual, wd, bd, wu, bu, scale, act, be)
