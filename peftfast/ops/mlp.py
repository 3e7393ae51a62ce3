"""Fused LoRA-MLP: ``down(act(gate(x)) · up(x))`` with LoRA (and dropout) on all three projections, one op.

Saved for backward: the block input ``x`` (once for gate and up), the gate/up pre-activations ``g`` and ``u``, and
the skinny ``x·A_catᵀ`` / ``h·A_downᵀ`` products. The activation output ``act(g)`` and the down projection's input
``h = act(g)·u`` are never kept: backward rebuilds ``h`` from ``g`` and ``u`` (one element-wise pass). PEFT keeps
``g``, ``act(g)``, ``u``, ``h`` and, with dropout, a dropout copy of ``x`` per projection and of ``h``. With
``recompute`` trades backward GEMMs for saved values (:data:`MLP_RECOMPUTE`): ``"up"`` (``patch(recompute="up")``)
keeps g but not u, which backward rebuilds from x and the kept skinny product (I values per token fewer for one
dense GEMM of hidden·I per token); ``"gate_up"`` or ``True`` (``patch(recompute="mlp")``) keeps neither g, u nor
``x·A_catᵀ``: backward runs the gate/up forward again (2·I values per token fewer for the gate/up GEMM pair; the same
seed and kernels give the same values).

Triton forward: one skinny launch for ``x·A_catᵀ``, then one GEMM launch (``_lora_gate_up_act_kernel``) that
accumulates ``x·W_gᵀ`` and ``x·W_uᵀ`` from shared x tiles, adds both LoRA epilogues and writes g, u and
``h = act(g)·u`` in one pass (no separate activation launch, no re-read of g and u), then the down projection.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton

from peftfast.ops import _direct, _library
from peftfast.ops._backend import interpreting, resolve_backend
from peftfast.ops._counters import launching
from peftfast.ops._direct import out_view
from peftfast.ops.lora import (
    _check_group,
    _dora_out,
    _dot_precision,
    _TorchImpl,
    _TritonImpl,
    dense_strategy,
    draw_seed,
    group_backward,
    group_forward,
    regenerated_keep_masks,
    seed_tensor,
    traced_seeds,
)

GATE_ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_BLOCK = 1024
# what a gated-MLP op rebuilds in backward instead of keeping: nothing, the up projection's output u, or g and u
MLP_RECOMPUTE = ("none", "up", "gate_up")


def recompute_mode(recompute: bool | str | None, label: str) -> str:
    """``recompute`` as one of :data:`MLP_RECOMPUTE` (``True`` is ``"gate_up"``, ``False``/``None`` ``"none"``)."""
    if recompute is True:
        return "gate_up"
    if recompute is False or recompute is None:
        return "none"
    if isinstance(recompute, str) and recompute in MLP_RECOMPUTE:
        return recompute
    raise ValueError(f"peftfast: {label}: unknown recompute {recompute!r}; choose one of {list(MLP_RECOMPUTE)} "
                     "or a bool")


def _act(g: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if act == "gelu_tanh" else "none")


# ----------------------------------------------------------------------------------------------------------------
# cpp backend: torch.ops.peftfast.act_mul_fwd / act_mul_bwd (csrc/mlp.cpp): fp32 inside, one rounding per output,
# any strides. Fake kernels (torch.compile) and the forward op's autograd, registered when peftfast._C is loaded.
# ----------------------------------------------------------------------------------------------------------------
def _register_cpp_ops() -> None:
    @torch.library.register_fake("peftfast::act_mul_fwd")
    def _(g, u, act):
        return torch.empty_like(g)

    @torch.library.register_fake("peftfast::act_mul_bwd")
    def _(dh, g, u, act):
        return torch.empty_like(g), torch.empty_like(g)

    def setup_context(ctx, inputs, output):
        g, u, act = inputs
        ctx.save_for_backward(g, u)  # h = act(g)·u is not kept: the backward recomputes act(g)
        ctx.act = act

    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dg, du = _direct.undifferentiated(torch.ops.peftfast.act_mul_bwd, dh, g, u, ctx.act)
        need = ctx.needs_input_grad
        return (dg if need[0] else None), (du if need[1] else None), None

    torch.library.register_autograd("peftfast::act_mul_fwd", backward, setup_context=setup_context)

    def no_double_backward(ctx, *grads):
        raise RuntimeError("peftfast: act(g)·u does not support double backward (create_graph=True); "
                           "use backend='torch'")

    torch.library.register_autograd("peftfast::act_mul_bwd", no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


# the schemas of csrc/ops.cpp, declared here in a process without peftfast._C
_ACT_SCHEMAS = ("act_mul_fwd(Tensor g, Tensor u, str act) -> Tensor",
                "act_mul_bwd(Tensor dh, Tensor g, Tensor u, str act) -> (Tensor, Tensor)")
_LIB: torch.library.Library | None = None
_ATEN_OPS = False  # the schemas defined here (no peftfast._C): their CPU kernel is the torch backend


def _register() -> None:
    """The act · u ops' CUDA (Triton) kernels, fake kernels and autograd (see :mod:`peftfast.ops._library`)."""
    global _LIB, _ATEN_OPS
    _LIB, _ATEN_OPS = _library.register(
        _ACT_SCHEMAS,
        {"act_mul_fwd": lambda g, u, act: _act(g, act) * u, "act_mul_bwd": _torch_act_mul_backward},
        {"act_mul_fwd": lambda g, u, act: _triton_act_mul(g, u, act),
         "act_mul_bwd": lambda dh, g, u, act: _triton_act_mul_backward(dh, g, u, act)})
    _register_cpp_ops()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [M, I] rows with a unit column stride (a view where possible: the halves of a packed [g | u] are)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.shape[-1] <= 1 or t2.stride(-1) == 1 else t2.contiguous()


def _act_grid(m: int, cols: int) -> tuple[int, int]:
    return m, triton.cdiv(max(cols, 1), _BLOCK)


def act_mul(g: torch.Tensor, u: torch.Tensor, act: str, backend: str) -> torch.Tensor:
    """``act(g) · u`` (g, u [..., I] of one dtype); backend ``cpp`` runs the C++ kernel, differentiable. Row-strided
    g and u (the halves of a packed gate/up output) are read in place."""
    if _library.through_op(backend):  # the C++ kernel, or the Triton one as one node under torch.compile
        return _direct.undifferentiated(torch.ops.peftfast.act_mul_fwd, g, u, act)
    if backend != "triton":
        return _act(g, act) * u
    return _triton_act_mul(g, u, act)


def _triton_act_mul(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    from peftfast.kernels import mlp as K

    g2, u2 = _rows(g), _rows(u)
    m, cols = g2.shape
    h = torch.empty(g.shape, device=g.device, dtype=g.dtype)
    if h.numel():
        with launching("_act_mul_fwd_kernel"):
            K._act_mul_fwd_kernel[_act_grid(m, cols)](g2, g2.stride(0), u2, u2.stride(0), h, cols, cols,
                                                      ACT=GATE_ACTS[act], BLOCK=_BLOCK,
                                                      num_warps=4 if not interpreting() else 1)
    return h


def act_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str, backend: str,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) of ``h = act(g) · u``: ``dg = dh · u · act'(g)``, ``du = dh · act(g)`` in one pass. ``out``: two
    [M, I] row-strided views to write them into (the Triton kernel writes there directly: the halves of one
    packed gradient; other backends copy)."""
    if _library.through_op(backend):
        dg, du = _direct.undifferentiated(torch.ops.peftfast.act_mul_bwd, dh, g, u, act)
        return _into(out, dg, du)
    if backend != "triton":
        return _into(out, *_torch_act_mul_backward(dh, g, u, act))
    return _triton_act_mul_backward(dh, g, u, act, out)


def _torch_act_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    du = dh * _act(g, act)
    dgu = dh * u
    if act == "silu":
        return torch.ops.aten.silu_backward(dgu, g), du
    return torch.ops.aten.gelu_backward(dgu, g, approximate="tanh" if act == "gelu_tanh" else "none"), du


def _triton_act_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str,
                             out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from peftfast.kernels import mlp as K

    dh2, g2, u2 = _rows(dh), _rows(g), _rows(u)
    m, cols = g2.shape
    if out is not None and all(t.dim() == 2 and (t.shape[-1] <= 1 or t.stride(-1) == 1) for t in out):
        dg, du = out
    else:
        dg, du = torch.empty(g.shape, device=g.device, dtype=g.dtype), torch.empty(u.shape, device=u.device,
                                                                                   dtype=u.dtype)
    dg2, du2 = _rows(dg), _rows(du)
    if g2.numel():
        with launching("_act_mul_bwd_kernel"):
            K._act_mul_bwd_kernel[_act_grid(m, cols)](dh2, dh2.stride(0), g2, g2.stride(0), u2, u2.stride(0), dg2,
                                                      dg2.stride(0), du2, du2.stride(0), cols, ACT=GATE_ACTS[act],
                                                      BLOCK=_BLOCK, num_warps=4 if not interpreting() else 1)
    return _into(out, dg, du)


def _into(out, dg: torch.Tensor, du: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du), copied into ``out`` where given and not already there."""
    if out is None:
        return dg, du
    for dst, src in zip(out, (dg, du)):
        if dst is not src:
            dst.copy_(src)
    return out


# ----------------------------------------------------------------------------------------------------------------
# triton backend forward: gate/up GEMM with the LoRA and the gated activation in its epilogue
# ----------------------------------------------------------------------------------------------------------------
def _gu_cfg(num_warps: int, num_stages: int, **kw: int) -> triton.Config:
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


# Two fp32 accumulators per tile, so no 128x256 tile (it would need 256 accumulator registers a thread); every
# config fits sm_80 (163 KB) and sm_90 (227 KB) in 16-bit dtypes, fp32 ones are pruned by shared memory.
GATE_UP_CONFIGS = [
    _gu_cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _gu_cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _gu_cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _gu_cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    _gu_cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
]
INTERP_GATE_UP = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def gate_up_smem(cfg: triton.Config, named_args: dict, meta: dict, arch: int) -> int:
    """Shared-memory estimate (bytes) of one ``_lora_gate_up_act_kernel`` config: ``_triton_launch``'s GEMM
    estimate with a B operand twice BLOCK_N wide (the W_g and W_u tiles are pipelined side by side)."""
    from peftfast.ops import _triton_launch as L

    kw = dict(cfg.kwargs)
    kw["BLOCK_N"] = 2 * kw["BLOCK_N"]
    wide = triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return L.smem_estimate(wide, named_args["wg_ptr"].element_size(), "BLOCK_M", "BLOCK_N", arch=arch,
                           epilogue_r=meta["BLOCK_R"], lora_elt=named_args["bg_ptr"].element_size(),
                           out_elt=named_args["g_ptr"].element_size())


def _prune_gate_up(configs, named_args, **meta):
    from peftfast.ops import _triton_launch as L

    limit, arch = L._device_smem(), L._device_arch()

    def need(c):
        return gate_up_smem(c, named_args, meta, arch)

    kept = [c for c in configs if need(c) <= limit]
    return kept or [min(configs, key=need)]


@functools.cache
def _tuned_gate_up():
    from peftfast.kernels import mlp as K

    return triton.autotune(GATE_UP_CONFIGS, key=["N", "K", "RANK", "ACT"],
                           prune_configs_by={"early_config_prune": _prune_gate_up})(K._lora_gate_up_act_kernel)


def gate_up_act(x2d: torch.Tensor, w_g: torch.Tensor, w_u: torch.Tensor, xa_g: torch.Tensor, xa_u: torch.Tensor,
                b_g: torch.Tensor, b_u: torch.Tensor, scale_g: float, scale_u: float,
                bias_g: torch.Tensor | None, bias_u: torch.Tensor | None, lbias_g: torch.Tensor | None,
                lbias_u: torch.Tensor | None, act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Triton launch: ``g = x W_gᵀ + b_g + s_g (xa_g B_gᵀ + bB_g)``, ``u`` likewise, ``h = act(g) · u``.

    x2d [M, K], W [I, K] (any strides), xa_g / xa_u [M, r] (same strides, e.g. column blocks of ``x·A_catᵀ``),
    B [I, r]. Returns contiguous (g, u, h) [M, I] in x's dtype. g and u equal the separate LoRA GEMMs' outputs up
    to fp32 rounding order and are rounded before ``act``, so h is exactly ``act_mul(g, u)``. Versus the unfused
    forward it saves one launch and the re-read of g and u (2·M·I elements), and reads each x tile once for both.
    """
    from peftfast.kernels import mlp as K

    if xa_g.stride() != xa_u.stride():
        raise ValueError("peftfast: gate_up_act: xa_g and xa_u must share strides")
    m, n, k = x2d.shape[0], w_g.shape[0], x2d.shape[1]
    rank = b_g.shape[1]
    g = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype)
    u, h = torch.empty_like(g), torch.empty_like(g)
    if m == 0 or n == 0:
        return g, u, h
    args = (x2d, x2d.stride(0), x2d.stride(1), w_g, w_g.stride(0), w_g.stride(1), w_u, w_u.stride(0),
            w_u.stride(1), xa_g, xa_u, xa_g.stride(0), xa_g.stride(1), b_g, b_g.stride(0), b_g.stride(1),
            b_u, b_u.stride(0), b_u.stride(1),
            *(t if t is not None else g for t in (bias_g, bias_u, lbias_g, lbias_u)),
            g, u, h, g.stride(0), g.stride(1), m, n, k, rank, float(scale_g), float(scale_u))
    meta = dict(ACT=GATE_ACTS[act], HAS_BIAS_G=bias_g is not None, HAS_BIAS_U=bias_u is not None,
                HAS_LBIAS_G=lbias_g is not None, HAS_LBIAS_U=lbias_u is not None,
                BLOCK_R=min(64, max(16, 1 << (max(rank, 1) - 1).bit_length())),
                DOT_PRECISION=_dot_precision(x2d.dtype), LORA_PRECISION=_dot_precision(b_g.dtype))
    with launching("_lora_gate_up_act_kernel"):
        if interpreting():
            c = INTERP_GATE_UP
            grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
            K._lora_gate_up_act_kernel[grid](*args, **meta, **c)
        else:
            _tuned_gate_up()[lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)](*args, **meta)
    return g, u, h


def _triton_gate_up_forward(x2d, scales, p, seed, gate_segment, act, flat_gu):
    """Grouped gate/up forward on the Triton backend: (g, u, h, xa) with xa = drop(x)·[A_0; A_1]ᵀ [M, 2r]."""
    ws, bs, lbs, as_, bmats = (flat_gu[i * 2:(i + 1) * 2] for i in range(5))
    rank = as_[0].shape[0]
    xa = _TritonImpl.down(x2d, torch.cat(as_, dim=0), rank, 2, p, seed, 1.0)
    gs, us = gate_segment, 1 - gate_segment
    g, u, h = gate_up_act(x2d, ws[gs], ws[us], xa[:, gs * rank:(gs + 1) * rank], xa[:, us * rank:(us + 1) * rank],
                          bmats[gs], bmats[us], scales[gs], scales[us], bs[gs], bs[us], lbs[gs], lbs[us], act)
    return g, u, h, xa


class _LoRAMLPFunction(torch.autograd.Function):
    """``flat`` = the gate/up group's Ws, bs, bBs, As, Bs (2 each, in segment order: ``gate_segment`` says where
    the gate is), then the down projection's (1 each). ``recompute`` (:data:`MLP_RECOMPUTE`): with ``"up"`` u is not
    saved (backward rebuilds it from x and the kept ``x·A_upᵀ``); with ``"gate_up"``, g, u and ``x·A_catᵀ`` are not
    saved: backward runs the same gate/up forward again (same seed, same kernels: the same values)."""

    @staticmethod
    def forward(ctx, x, act, s_gu, s_d, p_gu, p_d, seed_gu, seed_d, backend, gate_segment, recompute, *flat):
        flat_gu, flat_d = flat[:10], flat[10:]
        x2d = x.reshape(-1, x.shape[-1])
        g, u, h, xa_gu = _gate_up(x2d, act, s_gu, p_gu, seed_gu, backend, gate_segment, flat_gu)
        (y,), xa_d = group_forward(h, s_d, p_d, seed_d, backend, 1, flat_d)
        if recompute == "gate_up":
            ctx.save_for_backward(x2d, xa_d, *flat)
        elif recompute == "up":
            ctx.save_for_backward(x2d, xa_gu, g, xa_d, *flat)
        else:
            ctx.save_for_backward(x2d, xa_gu, g, u, xa_d, *flat)
        ctx.meta = (act, s_gu, s_d, p_gu, p_d, seed_gu, seed_d, backend, gate_segment, x.shape, recompute)
        return out_view(y, *x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        act, s_gu, s_d, p_gu, p_d, seed_gu, seed_d, backend, gate_segment, x_shape, recompute = ctx.meta
        if recompute == "gate_up":
            x2d, xa_d, *flat = ctx.saved_tensors
            g, u, h, xa_gu = _gate_up(x2d, act, s_gu, p_gu, seed_gu, backend, gate_segment, flat[:10])
        else:
            if recompute == "up":
                x2d, xa_gu, g, xa_d, *flat = ctx.saved_tensors
                u = _rebuild_member(x2d, xa_gu, flat[:10], s_gu, 1 - gate_segment, backend)
            else:
                x2d, xa_gu, g, u, xa_d, *flat = ctx.saved_tensors
            h = act_mul(g, u, act, backend)  # rebuilt, never saved
        flat_gu, flat_d = flat[:10], flat[10:]
        need = ctx.needs_input_grad
        flat_need = need[11:]
        dy2 = dy.reshape(x2d.shape[0], -1)
        dh, grads_d = group_backward(h, xa_d, flat_d, s_d, p_d, seed_d, backend, 1, True, flat_need[10:], [dy2])
        del h
        dg, du = act_mul_backward(dh, g, u, act, backend)
        del dh, g, u
        dgu = [dg, du] if gate_segment == 0 else [du, dg]
        dx, grads_gu = group_backward(x2d, xa_gu, flat_gu, s_gu, p_gu, seed_gu, backend, 2, need[0],
                                      flat_need[:10], dgu)
        return (None if dx is None else dx.view(x_shape), *([None] * 10), *grads_gu, *grads_d)


def _rebuild_proj(x2d, xa_i, w, b, lbias, b_mat, scale, backend):
    """One LoRA linear's output ``x·Wᵀ + b + s·(xa_i·Bᵀ + b_B)`` from the kept skinny product ``xa_i`` (its dropout
    is in it), in backward: the same dense and low-rank terms as the forward, one GEMM of x's rows."""
    # cpp: the C++ forward's own ATen calls, same order; under torch.compile the ATen ones too, which Dynamo traces
    # (a Triton launch here would break the compiled backward), at the cost of rounding-level differences
    triton = backend == "triton" and not torch.compiler.is_compiling()
    return (_TritonImpl if triton else _TorchImpl).fwd(x2d, w, b, xa_i, b_mat, scale, lbias)


def _rebuild_member(x2d, xa, flat2, scales, i, backend):
    """Member ``i`` of a two-member group's :func:`group_forward` (``flat2`` = its Ws, bs, bBs, As, Bs; ``xa`` the
    kept ``x·A_catᵀ``), rebuilt by :func:`_rebuild_proj`."""
    rank = flat2[6].shape[0]
    return _rebuild_proj(x2d, xa[:, i * rank:(i + 1) * rank], flat2[i], flat2[2 + i], flat2[4 + i], flat2[8 + i],
                         scales[i], backend)


def _gate_up(x2d, act, s_gu, p_gu, seed_gu, backend, gate_segment, flat_gu):
    """(g, u, h = act(g)·u, x·A_catᵀ) of the gate/up group: deterministic, so backward may run it again."""
    if backend == "triton" and dense_strategy() == "fused" and not isinstance(seed_gu, torch.Tensor):
        # (a tensor seed, under torch.compile: the registered grouped op below, then the act · u kernel)
        return _triton_gate_up_forward(x2d, s_gu, p_gu, seed_gu, gate_segment, act, flat_gu)
    # cuBLAS dense strategy, torch and cpp: grouped LoRA forward, then the element-wise act · u
    ys, xa_gu = group_forward(x2d, s_gu, p_gu, seed_gu, backend, 2, flat_gu)
    g, u = ys[gate_segment], ys[1 - gate_segment]
    return g, u, act_mul(g, u, act, backend), xa_gu


class _FrozenMLPFunction(torch.autograd.Function):
    """``down(act(gate(x)) · up(x))`` over frozen projections: only ``dx`` flows back. Saves g and u (with
    ``recompute="up"`` x and g: backward runs the up GEMM again; with ``"gate_up"`` x alone: both GEMMs), never
    ``act(g)`` or ``h``; the weights are the modules' parameters, not copies."""

    @staticmethod
    def forward(ctx, x, wg, bg, wu, bu, wd, bd, act, backend, recompute):
        x2d = x.reshape(-1, x.shape[-1])
        g, u = F.linear(x2d, wg, bg), F.linear(x2d, wu, bu)
        y = F.linear(act_mul(g, u, act, backend), wd, bd)  # grad mode is off here: h is freed right after
        if recompute == "gate_up":
            ctx.save_for_backward(x2d, wg, bg, wu, bu, wd)
        elif recompute == "up":
            ctx.save_for_backward(x2d, g, wg, wu, bu, wd)
        else:
            ctx.save_for_backward(g, u, wg, wu, wd)
        ctx.meta = (act, backend, recompute, x.shape)
        return out_view(y, *x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        act, backend, recompute, x_shape = ctx.meta
        if not ctx.needs_input_grad[0]:
            return (None,) * 10
        if recompute == "gate_up":
            x2d, wg, bg, wu, bu, wd = ctx.saved_tensors
            g, u = F.linear(x2d, wg, bg), F.linear(x2d, wu, bu)
            del x2d
        elif recompute == "up":
            x2d, g, wg, wu, bu, wd = ctx.saved_tensors
            u = F.linear(x2d, wu, bu)
            del x2d
        else:
            g, u, wg, wu, wd = ctx.saved_tensors
        dh = dy.reshape(-1, dy.shape[-1]).mm(wd)
        dg, du = act_mul_backward(dh, g, u, act, backend)
        del dh, g, u
        dx = dg.mm(wg).addmm_(du, wu)
        return (dx.view(x_shape), *([None] * 9))


FrozenProj = tuple  # (weight [N, K], bias | None) of a frozen nn.Linear


def frozen_mlp(x: torch.Tensor, gate: Sequence, up: Sequence, down: Sequence, *, act: str = "silu",
               recompute: bool | str = False, backend: str = "auto", name: str = "") -> torch.Tensor:
    """``down(act(gate(x)) · up(x))`` where each projection is ``(W, b)`` of a frozen linear (no LoRA on it).

    The frozen MLP of a model tuned elsewhere (prefix/prompt tuning, bottleneck adapters, LoRA on attention only):
    autograd's eager graph keeps g, ``act(g)`` and u (3·I values per token) for the input gradient; this op keeps
    g and u (2·I); with ``recompute="up"`` g and x (x is rebuilt from the norm input by a fused block) for one
    more up GEMM in backward; with ``"gate_up"`` (or ``True``) nothing but x (the MLP then keeps nothing of its own)
    for one more gate/up GEMM pair. The GEMMs are ATen's (cuBLAS,
    oneDNN); ``act(g)·u`` and its backward are one pass each on the ``cpp`` / ``triton`` backends. The weights
    must not require grad (no weight gradient is computed).
    """
    label = name or "frozen_mlp"
    if act not in GATE_ACTS:
        raise ValueError(f"peftfast: {label}: unknown gate activation {act!r}; choose one of {list(GATE_ACTS)}")
    (wg, bg), (wu, bu), (wd, bd) = gate, up, down
    hidden, inter = x.shape[-1], wg.shape[0]
    out = wd.shape[0] if wd.dim() == 2 else -1
    for what, w, b, shape in (("gate", wg, bg, (inter, hidden)), ("up", wu, bu, (inter, hidden)),
                              ("down", wd, bd, (out, inter))):
        if w.dim() != 2 or tuple(w.shape) != shape:
            raise ValueError(f"peftfast: {label}: {what} weight has shape {tuple(w.shape)}, expected {shape} for an "
                             f"input with {hidden} features and an intermediate width of {inter}")
        if b is not None and tuple(b.shape) != shape[:1]:
            raise ValueError(f"peftfast: {label}: {what} bias has shape {tuple(b.shape)}, expected {shape[:1]}")
    tensors = [t for t in (wg, bg, wu, bu, wd, bd) if t is not None]
    if any(t.dtype != x.dtype for t in tensors):
        raise TypeError(f"peftfast: {label}: input dtype {x.dtype} differs from the projections' "
                        f"{sorted({str(t.dtype) for t in tensors})}")
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"peftfast: {label}: input is on {x.device}, the projections elsewhere")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError(f"peftfast: {label}: projection weights require grad; frozen_mlp computes no weight "
                         "gradients (use lora_mlp, or the module's own forward)")
    mode = recompute_mode(recompute, label)
    be = resolve_backend(backend, x.device)
    return _FrozenMLPFunction.apply(x, wg, bg, wu, bu, wd, bd, act, be, mode)


def _seeds(seed, down_seed, p: float, p_d: float, backend: str, device: torch.device) -> tuple:
    """The gate/up (or gate_up) and down projections' dropout seeds, drawn in that order where not given. On the
    registered ops' CPU path and on the Triton backend under ``torch.compile`` (:func:`~peftfast.ops.lora.
    traced_seeds`) they stay tensors: no ``.item()``, so Dynamo traces straight through, the projections then on the
    registered LoRA ops."""
    if traced_seeds(backend, device):
        return seed_tensor(seed, device, p), seed_tensor(down_seed, device, p_d)
    seed = int(seed) if seed is not None else draw_seed(device) if p > 0.0 else 0
    return seed, int(down_seed) if down_seed is not None else draw_seed(device) if p_d > 0.0 else 0


LoRAProj = tuple  # (weight [N, K], bias | None, lora_A [r, K], lora_B [N, r], scale, lora_bias | None)


def lora_mlp(x: torch.Tensor, gate: Sequence, up: Sequence, down: Sequence, *, act: str = "silu",
             dropout_p: float = 0.0, down_dropout_p: float | None = None, seed: int | None = None,
             down_seed: int | None = None, gate_segment: int = 0, recompute: bool | str = False,
             backend: str = "auto", name: str = "") -> torch.Tensor:
    """``down(act(gate(x)) · up(x))`` where each projection is ``(W, b, A, B, scale, lora_bias)`` of a LoRA linear.

    gate/up share a rank and a dropout probability (one grouped pass over ``x``); the down projection may have
    its own (``down_dropout_p``, default ``dropout_p``). ``act``: silu (SwiGLU), gelu or gelu_tanh (GeGLU).
    ``gate_segment`` (0 or 1) is the gate's dropout segment in the gate/up group, so the masks match those of the
    same layers run as a sibling group. ``recompute="up"`` keeps I fewer values per token (u) for one more dense
    up GEMM in backward; ``"gate_up"`` (or ``True``) 2·I fewer (g and u) for one more gate/up GEMM pair.
    """
    if act not in GATE_ACTS:
        raise ValueError(f"peftfast: {name or 'lora_mlp'}: unknown gate activation {act!r}; "
                         f"choose one of {list(GATE_ACTS)}")
    p_d = dropout_p if down_dropout_p is None else down_dropout_p
    (wg, bg, ag, bmg, sg, lbg), (wu, bu, au, bmu, su, lbu), (wd, bd, ad, bmd, sd, lbd) = gate, up, down
    _check_group(x, [wg, wu], [bg, bu], [ag, au], [bmg, bmu], [sg, su], [lbg, lbu], dropout_p, f"{name} gate/up")
    if wg.shape[0] != wu.shape[0]:
        raise ValueError(f"peftfast: {name}: gate and up widths differ ({wg.shape[0]} and {wu.shape[0]})")
    h_like = x.new_empty((1, wg.shape[0]))
    _check_group(h_like, [wd], [bd], [ad], [bmd], [sd], [lbd], p_d, f"{name} down")
    mode = recompute_mode(recompute, name or "lora_mlp")
    be = resolve_backend(backend, x.device)
    seed, down_seed = _seeds(seed, down_seed, dropout_p, p_d, be, x.device)
    if gate_segment not in (0, 1):
        raise ValueError(f"peftfast: {name}: gate_segment must be 0 or 1")
    first, second = ((wg, bg, lbg, ag, bmg, sg), (wu, bu, lbu, au, bmu, su))[:: 1 if gate_segment == 0 else -1]
    flat = [*(t for pair in zip(first[:5], second[:5]) for t in pair), wd, bd, lbd, ad, bmd]
    return _LoRAMLPFunction.apply(x, act, (float(first[5]), float(second[5])), (float(sd),), float(dropout_p),
                                  float(p_d), seed, down_seed, be, gate_segment, mode, *flat)


class _PackedLoRAMLPFunction(torch.autograd.Function):
    """``down(act(g) · u)`` with ``[g | u] = gate_up(x)`` one LoRA linear of width 2·I (Phi-3, GLM). ``flat`` =
    the gate_up projection's W, b, bB, A, B, then the down projection's. Saves x, ``y = [g | u]`` (the halves are
    views of it) and the two skinny LoRA products; with ``recompute="up"`` g (a copy of the first half) instead of
    y (backward rebuilds u from x, the lower half of W and the kept product); with ``"gate_up"`` only x and the down
    product (backward runs the gate_up forward again: same seed, same kernels, same values). ``h = act(g)·u`` is
    rebuilt, never kept."""

    @staticmethod
    def forward(ctx, x, act, s_gu, s_d, p_gu, p_d, seed_gu, seed_d, backend, recompute, *flat):
        x2d = x.reshape(-1, x.shape[-1])
        (y,), xa_gu = group_forward(x2d, s_gu, p_gu, seed_gu, backend, 1, flat[:5])
        inter = y.shape[1] // 2
        h = act_mul(y[:, :inter], y[:, inter:], act, backend)
        (out,), xa_d = group_forward(h, s_d, p_d, seed_d, backend, 1, flat[5:])
        del h
        if recompute == "gate_up":
            ctx.save_for_backward(x2d, xa_d, *flat)
        elif recompute == "up":
            ctx.save_for_backward(x2d, xa_gu, y[:, :inter].clone(), xa_d, *flat)  # g alone, not all of y's storage
        else:
            ctx.save_for_backward(x2d, xa_gu, y, xa_d, *flat)
        ctx.meta = (act, s_gu, s_d, p_gu, p_d, seed_gu, seed_d, backend, x.shape, recompute)
        return out_view(out, *x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        act, s_gu, s_d, p_gu, p_d, seed_gu, seed_d, backend, x_shape, recompute = ctx.meta
        if recompute == "up":
            x2d, xa_gu, g, xa_d, *flat = ctx.saved_tensors
            inter = g.shape[1]
            w, b, lb, _, b_mat = flat[:5]
            u = _rebuild_proj(x2d, xa_gu, w[inter:], None if b is None else b[inter:],
                              None if lb is None else lb[inter:], b_mat[inter:], s_gu[0], backend)
        else:
            if recompute == "gate_up":
                x2d, xa_d, *flat = ctx.saved_tensors
                (y,), xa_gu = group_forward(x2d, s_gu, p_gu, seed_gu, backend, 1, flat[:5])
            else:
                x2d, xa_gu, y, xa_d, *flat = ctx.saved_tensors
            inter = y.shape[1] // 2
            g, u = y[:, :inter], y[:, inter:]
        h = act_mul(g, u, act, backend)  # rebuilt, never saved
        need = ctx.needs_input_grad
        flat_need = need[10:]
        dout2 = dout.reshape(x2d.shape[0], -1)
        dh, grads_d = group_backward(h, xa_d, flat[5:], s_d, p_d, seed_d, backend, 1, True, flat_need[5:], [dout2])
        del h
        dy = torch.empty((x2d.shape[0], 2 * inter), device=dh.device, dtype=g.dtype)
        act_mul_backward(dh, g, u, act, backend, out=(dy[:, :inter], dy[:, inter:]))  # written in place (Triton)
        del dh, g, u
        dx, grads_gu = group_backward(x2d, xa_gu, flat[:5], s_gu, p_gu, seed_gu, backend, 1, need[0],
                                      flat_need[:5], [dy])
        return (None if dx is None else dx.view(x_shape), *([None] * 9), *grads_gu, *grads_d)


def lora_packed_mlp(x: torch.Tensor, gate_up: Sequence, down: Sequence, *, act: str = "silu",
                    dropout_p: float = 0.0, down_dropout_p: float | None = None, seed: int | None = None,
                    down_seed: int | None = None, recompute: bool | str = False, backend: str = "auto",
                    name: str = "") -> torch.Tensor:
    """``down(act(g) · u)`` where ``[g | u] = gate_up(x)`` (the first half the gate, as Phi-3 and GLM chunk it) and
    each projection is ``(W, b, A, B, scale, lora_bias)`` of a LoRA linear (gate_up: one adapter over the 2·I
    outputs, one dropout mask, as PEFT applies it to the packed layer).

    Keeps x, ``[g | u]`` and the rank-r products, where eager autograd with PEFT keeps ``[g | u]``, ``act(g)``,
    ``h = act(g)·u`` (or, with dropout, its dropped copy and mask) as well: per token I values fewer, 2·I with
    dropout. ``recompute="up"`` keeps g rather than ``[g | u]`` for one more GEMM over the up half of the weight in
    backward; ``"gate_up"`` (or ``True``) keeps x alone for one more gate_up GEMM.
    """
    label = name or "lora_packed_mlp"
    if act not in GATE_ACTS:
        raise ValueError(f"peftfast: {label}: unknown gate activation {act!r}; choose one of {list(GATE_ACTS)}")
    p_d = dropout_p if down_dropout_p is None else down_dropout_p
    (wgu, bgu, agu, bmgu, sgu, lbgu), (wd, bd, ad, bmd, sd, lbd) = gate_up, down
    _check_group(x, [wgu], [bgu], [agu], [bmgu], [sgu], [lbgu], dropout_p, f"{label} gate_up")
    if wgu.shape[0] % 2:
        raise ValueError(f"peftfast: {label}: gate_up has {wgu.shape[0]} outputs, not an even 2 x intermediate")
    h_like = x.new_empty((1, wgu.shape[0] // 2))
    _check_group(h_like, [wd], [bd], [ad], [bmd], [sd], [lbd], p_d, f"{label} down")
    mode = recompute_mode(recompute, label)
    be = resolve_backend(backend, x.device)
    seed, down_seed = _seeds(seed, down_seed, dropout_p, p_d, be, x.device)
    return _PackedLoRAMLPFunction.apply(x, act, (float(sgu),), (float(sd),), float(dropout_p), float(p_d), seed,
                                        down_seed, be, mode, wgu, bgu, lbgu, agu, bmgu, wd, bd, lbd, ad,
                                        bmd)


# ----------------------------------------------------------------------------------------------------------------
# DoRA gated MLP: the three DoRA linears (no dropout) and act(g)·u as one op
# ----------------------------------------------------------------------------------------------------------------
def _dora_grads(dy: torch.Tensor, z: torch.Tensor, mag: torch.Tensor, norm: torch.Tensor, magnitude: torch.Tensor,
                bias: torch.Tensor | None, need_mag: bool, need_b: bool) -> tuple:
    """(dz, dmagnitude, dbias) of ``y = (z ⊙ magnitude/‖·‖ + b)``, the norm detached (as PEFT and the paper treat
    it): autograd's own steps for :func:`_dora_out`."""
    ct = torch.promote_types(z.dtype, mag.dtype)
    dyc = dy.to(ct)
    dz = (dyc * mag.to(ct)).to(z.dtype)
    dmag = (dyc * z.to(ct)).sum(0).to(magnitude.dtype) / norm.to(magnitude.dtype) if need_mag else None
    db = dyc.sum(0).to(bias.dtype) if need_b and bias is not None else None
    return dz, dmag, db


class _DoRAMLPFunction(torch.autograd.Function):
    """``down(act(gate(x)) · up(x))`` with a DoRA adapter (no dropout) on each projection: ``y_p = m_p ⊙ z_p + b_p``,
    ``z_p = x Wᵀ + s·x Aᵀ Bᵀ``, ``m_p = magnitude_p / ‖W + s·B A‖`` (rows; detached). ``flat``: the gate/up group's
    Ws, bs (None), bBs (None), As, Bs (gate first), then the down projection's. Saved: x, the rank-r products,
    z_g, z_u (``recompute="up"``: z_g only, z_u rebuilt from x; ``"gate_up"``: neither) and z_d, with the three
    ``[N]`` scales; g, u, ``act(g)`` and the down input h are rebuilt in backward (element-wise), where the layers one
    by one keep z and y of each projection, act's input and output, u and h."""

    @staticmethod
    def forward(ctx, x, act, s_gu, s_d, backend, recompute, bg, bu, bd, mag_g, mag_u, mag_d, *flat):
        from peftfast.ops.lora import dora_weight_norm

        flat_gu, flat_d = flat[:10], flat[10:]
        x2d = x.reshape(-1, x.shape[-1])
        ws = (flat[0], flat[1], flat[10])
        as_, bms = (flat[6], flat[7], flat[13]), (flat[8], flat[9], flat[14])
        scales = (*s_gu, *s_d)
        norms = [dora_weight_norm(w, a, b, sc) for w, a, b, sc in zip(ws, as_, bms, scales)]
        mags = [m / n.to(m.dtype) for m, n in zip((mag_g, mag_u, mag_d), norms)]
        (z_g, z_u), xa_gu = group_forward(x2d, s_gu, 0.0, 0, backend, 2, flat_gu)
        g, u = _dora_out(z_g, mags[0], bg, x.dtype), _dora_out(z_u, mags[1], bu, x.dtype)
        h = act_mul(g, u, act, backend)
        del g, u
        (z_d,), xa_d = group_forward(h, s_d, 0.0, 0, backend, 1, flat_d)
        del h
        y = _dora_out(z_d, mags[2], bd, x.dtype)
        kept = {"gate_up": (), "up": (xa_gu, z_g), "none": (xa_gu, z_g, z_u)}[recompute]
        ctx.save_for_backward(x2d, xa_d, z_d, bg, bu, bd, mag_g, mag_u, mag_d, *norms, *mags, *flat, *kept)
        ctx.meta = (act, s_gu, s_d, backend, recompute, x.shape, x.dtype)
        return out_view(y, *x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        act, s_gu, s_d, backend, recompute, x_shape, x_dtype = ctx.meta
        x2d, xa_d, z_d, bg, bu, bd, mag_g, mag_u, mag_d, *rest = ctx.saved_tensors
        norms, mags, flat, kept = rest[:3], rest[3:6], rest[6:21], rest[21:]
        flat_gu, flat_d = flat[:10], flat[10:]
        if recompute == "gate_up":
            (z_g, z_u), xa_gu = group_forward(x2d, s_gu, 0.0, 0, backend, 2, flat_gu)
        elif recompute == "up":
            xa_gu, z_g = kept
            z_u = _rebuild_member(x2d, xa_gu, flat_gu, s_gu, 1, backend)
        else:
            xa_gu, z_g, z_u = kept
        need = ctx.needs_input_grad
        dy2 = dy.reshape(x2d.shape[0], -1)
        dz_d, dmag_d, db_d = _dora_grads(dy2, z_d, mags[2], norms[2], mag_d, bd, need[11], need[8])
        del z_d
        g, u = _dora_out(z_g, mags[0], bg, x_dtype), _dora_out(z_u, mags[1], bu, x_dtype)
        h = act_mul(g, u, act, backend)  # rebuilt, never saved
        flat_need = need[12:]
        dh, grads_d = group_backward(h, xa_d, flat_d, s_d, 0.0, 0, backend, 1, True, flat_need[10:], [dz_d])
        del h, dz_d
        dg, du = act_mul_backward(dh, g, u, act, backend)
        del dh, g, u
        dz_g, dmag_g, db_g = _dora_grads(dg, z_g, mags[0], norms[0], mag_g, bg, need[9], need[6])
        dz_u, dmag_u, db_u = _dora_grads(du, z_u, mags[1], norms[1], mag_u, bu, need[10], need[7])
        del dg, du, z_g, z_u
        dx, grads_gu = group_backward(x2d, xa_gu, flat_gu, s_gu, 0.0, 0, backend, 2, need[0], flat_need[:10],
                                      [dz_g, dz_u])
        return (None if dx is None else dx.view(x_shape), None, None, None, None, None, db_g, db_u, db_d, dmag_g,
                dmag_u, dmag_d, *grads_gu, *grads_d)


def _dropped(x2d: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    return x2d * keep * (1.0 / (1.0 - p))


def _dora_drop_out(y1: torch.Tensor, z: torch.Tensor, mag: torch.Tensor, bias: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """PEFT's DoRA output with dropout, ``base(x) + (mag − 1)·(x_d Wᵀ) + mag·s·x_d Aᵀ Bᵀ``, as ``y₁ + b + (mag −
    1)·z`` from ``y₁ = x Wᵀ + s·x_d Aᵀ Bᵀ`` (the grouped LoRA forward with its own dropout) and ``z = x_d Wᵀ +
    s·x_d Aᵀ Bᵀ`` (z's, y₁'s and mag's dtypes promoted, as PEFT's eager maths), cast to ``dtype``."""
    ct = torch.promote_types(torch.promote_types(y1.dtype, z.dtype), mag.dtype)
    y = y1.to(ct) + (mag.to(ct) - 1) * z
    if bias is not None:
        y = y + bias
    return y.to(dtype)


def _dora_drop_grads(dy: torch.Tensor, z: torch.Tensor, mag: torch.Tensor, norm: torch.Tensor,
                     magnitude: torch.Tensor, bias: torch.Tensor | None, need_mag: bool, need_b: bool) -> tuple:
    """(dz, dmagnitude, dbias) of :func:`_dora_drop_out` (y₁'s gradient is ``dy`` itself), the norm detached: those
    of ``mag ⊙ z + b`` with ``mag − 1`` scaling z (the magnitude's and the bias's gradients do not depend on it)."""
    return _dora_grads(dy, z, mag - 1, norm, magnitude, bias, need_mag, need_b)


def _plus(a, b):
    return b if a is None else a if b is None else a + b


class _DoRADropoutMLPFunction(torch.autograd.Function):
    """:class:`_DoRAMLPFunction` with LoRA dropout (PEFT's DoRA-with-dropout maths on each projection): ``out_p =
    y₁ + b + (mag − 1)·z`` with ``y₁ = x Wᵀ + s·x_d Aᵀ Bᵀ`` from the grouped LoRA forward (its own masks: gate and
    up segments 0 and 1 of one seed, down its own seed) and ``z = x_d Wᵀ + s·x_d Aᵀ Bᵀ``, ``x_d`` rebuilt from the
    regenerated mask (never kept). Saved: x, the rank-r products, z of each projection (for the magnitudes'
    gradients), and g and u (``recompute="up"``: g only, u rebuilt from x with one dense GEMM; ``"gate_up"``:
    neither, the gate/up forward run again); h and the dropped inputs are rebuilt, where the layers one by one keep
    each dropped input and its mask, g, ``act(g)``, u and h besides. ``flat`` as :class:`_DoRAMLPFunction`'s."""

    @staticmethod
    def forward(ctx, x, act, s_gu, s_d, p_gu, p_d, seed_gu, seed_d, backend, recompute, bg, bu, bd, mag_g, mag_u,
                mag_d, *flat):
        from peftfast.ops.lora import dora_weight_norm

        flat_gu, flat_d = flat[:10], flat[10:]
        x2d = x.reshape(-1, x.shape[-1])
        ws, as_, bms = (flat[0], flat[1], flat[10]), (flat[6], flat[7], flat[13]), (flat[8], flat[9], flat[14])
        norms = [dora_weight_norm(w, a, b, sc) for w, a, b, sc in zip(ws, as_, bms, (*s_gu, *s_d))]
        mags = [m / n.to(m.dtype) for m, n in zip((mag_g, mag_u, mag_d), norms)]
        r = as_[0].shape[0]
        (y1_g, y1_u), xa_gu = group_forward(x2d, s_gu, p_gu, seed_gu, backend, 2, flat_gu)
        keep = regenerated_keep_masks(seed_gu, 2, x2d, p_gu, backend)
        z_g, z_u = (_rebuild_proj(_dropped(x2d, keep[i], p_gu), xa_gu[:, i * r:(i + 1) * r], ws[i], None, None,
                                  bms[i], s_gu[i], backend) for i in (0, 1))
        keep = None  # (captured by the generator above: a del there is DELETE_DEREF, which Dynamo cannot trace)
        g, u = _dora_drop_out(y1_g, z_g, mags[0], bg, x.dtype), _dora_drop_out(y1_u, z_u, mags[1], bu, x.dtype)
        del y1_g, y1_u
        h = act_mul(g, u, act, backend)
        (y1_d,), xa_d = group_forward(h, s_d, p_d, seed_d, backend, 1, flat_d)
        keep_d = regenerated_keep_masks(seed_d, 1, h, p_d, backend)[0]
        z_d = _rebuild_proj(_dropped(h, keep_d, p_d), xa_d, ws[2], None, None, bms[2], s_d[0], backend)
        del keep_d
        del h
        y = _dora_drop_out(y1_d, z_d, mags[2], bd, x.dtype)
        kept = {"gate_up": (), "up": (g,), "none": (g, u)}[recompute]
        ctx.save_for_backward(x2d, xa_gu, xa_d, z_g, z_u, z_d, bg, bu, bd, mag_g, mag_u, mag_d, *norms, *mags,
                              *flat, *kept)
        ctx.seeds = (seed_gu, seed_d)  # ints, or the cpp path's one-element CPU tensors (not activations)
        ctx.meta = (act, s_gu, s_d, p_gu, p_d, backend, recompute, x.shape, x.dtype)
        return out_view(y, *x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        act, s_gu, s_d, p_gu, p_d, backend, recompute, x_shape, x_dtype = ctx.meta
        seed_gu, seed_d = ctx.seeds
        x2d, xa_gu, xa_d, z_g, z_u, z_d, bg, bu, bd, mag_g, mag_u, mag_d, *rest = ctx.saved_tensors
        norms, mags, flat, kept = rest[:3], rest[3:6], rest[6:21], rest[21:]
        flat_gu, flat_d = flat[:10], flat[10:]
        r = flat[6].shape[0]
        if recompute == "none":
            g, u = kept
        else:
            if recompute == "up":
                (g,) = kept
                y1_u = _rebuild_member(x2d, xa_gu, flat_gu, s_gu, 1, backend)
            else:
                (y1_g, y1_u), _ = group_forward(x2d, s_gu, p_gu, seed_gu, backend, 2, flat_gu)
                g = _dora_drop_out(y1_g, z_g, mags[0], bg, x_dtype)
                del y1_g
            u = _dora_drop_out(y1_u, z_u, mags[1], bu, x_dtype)
            del y1_u
        need = ctx.needs_input_grad
        flat_need = need[16:]
        dy2 = dy.reshape(x2d.shape[0], -1)
        # down: y₁'s backward with its masked low-rank term, then z's on the dropped input, masked the same way
        dz_d, dmag_d, db_d = _dora_drop_grads(dy2, z_d, mags[2], norms[2], mag_d, bd, need[15], need[12])
        del z_d
        h = act_mul(g, u, act, backend)
        dh, grads_d = group_backward(h, xa_d, flat_d, s_d, p_d, seed_d, backend, 1, True, flat_need[10:], [dy2])
        keep_d = regenerated_keep_masks(seed_d, 1, h, p_d, backend)[0]
        dhd, grads_dd = group_backward(_dropped(h, keep_d, p_d), xa_d, flat_d, s_d, 0.0, 0, backend, 1, True,
                                       flat_need[10:], [dz_d])
        del h, dz_d
        dh = dh + _dropped(dhd, keep_d, p_d).to(dh.dtype)
        del dhd, keep_d
        grads_d = [_plus(a, b) for a, b in zip(grads_d, grads_dd)]
        dg, du = act_mul_backward(dh, g, u, act, backend)
        del dh, g, u
        dz_g, dmag_g, db_g = _dora_drop_grads(dg, z_g, mags[0], norms[0], mag_g, bg, need[13], need[10])
        dz_u, dmag_u, db_u = _dora_drop_grads(du, z_u, mags[1], norms[1], mag_u, bu, need[14], need[11])
        del z_g, z_u
        dx, grads_gu = group_backward(x2d, xa_gu, flat_gu, s_gu, p_gu, seed_gu, backend, 2, need[0],
                                      flat_need[:10], [dg, du])
        del dg, du
        grads_gu = list(grads_gu)
        keep = regenerated_keep_masks(seed_gu, 2, x2d, p_gu, backend)
        for i, dz in ((0, dz_g), (1, dz_u)):
            flat_i = [flat_gu[i], None, None, flat_gu[6 + i], flat_gu[8 + i]]
            need_i = [False, False, False, flat_need[6 + i], flat_need[8 + i]]
            dxd, gi = group_backward(_dropped(x2d, keep[i], p_gu), xa_gu[:, i * r:(i + 1) * r].contiguous(), flat_i,
                                     (s_gu[i],), 0.0, 0, backend, 1, need[0], need_i, [dz])
            if dxd is not None:
                dx = _plus(dx, _dropped(dxd, keep[i], p_gu).to(dxd.dtype))
            grads_gu[6 + i] = _plus(grads_gu[6 + i], gi[3])
            grads_gu[8 + i] = _plus(grads_gu[8 + i], gi[4])
        return (None if dx is None or not need[0] else dx.view(x_shape), None, None, None, None, None, None, None,
                None, None, db_g, db_u, db_d, dmag_g, dmag_u, dmag_d, *grads_gu, *grads_d)


DoRAProj = tuple  # (weight [N, K], bias | None, lora_A [r, K], lora_B [N, r], scale, magnitude [N])


def dora_mlp(x: torch.Tensor, gate: Sequence, up: Sequence, down: Sequence, *, act: str = "silu",
             dropout_p: float = 0.0, down_dropout_p: float | None = None, seed: int | torch.Tensor | None = None,
             down_seed: int | torch.Tensor | None = None, recompute: bool | str = False, backend: str = "auto",
             name: str = "") -> torch.Tensor:
    """``down(act(gate(x)) · up(x))`` where each projection is ``(W, b, A, B, scale, magnitude)`` of a PEFT DoRA
    linear: without dropout each output is ``magnitude/‖W + s·B A‖ ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b``, as
    :func:`peftfast.ops.lora.dora_linear` computes it layer by layer, but as one op: per token it keeps the
    pre-scale outputs of gate and up (I values each; ``recompute="up"`` the gate's alone, ``"gate_up"`` neither)
    and of down, never g, u, ``act(g)`` or h, which the layers one by one keep besides (4·I values per token more).
    With dropout (``dropout_p`` for gate/up, ``down_dropout_p`` for down, default the same; masks from ``seed``,
    gate and up segments 0 and 1, and ``down_seed``) PEFT's ``base(x) + (mag − 1)·x_d Wᵀ + mag·s·x_d Aᵀ Bᵀ`` per
    projection (:class:`_DoRADropoutMLPFunction`): it keeps z of each projection and g and u (``"up"``: g;
    ``"gate_up"``: neither), never the dropped inputs, their masks, ``act(g)`` or h. gate and up share one grouped
    pass over x (their ranks must be equal); the weights stay frozen."""
    label = name or "dora_mlp"
    p_d = dropout_p if down_dropout_p is None else down_dropout_p
    if act not in GATE_ACTS:
        raise ValueError(f"peftfast: {label}: unknown gate activation {act!r}; choose one of {list(GATE_ACTS)}")
    mode = recompute_mode(recompute, label)
    (wg, bg, ag, bmg, sg, mg), (wu, bu, au, bmu, su, mu), (wd, bd, ad, bmd, sd, md) = gate, up, down
    _check_group(x, [wg, wu], [bg, bu], [ag, au], [bmg, bmu], [sg, su], [None, None], dropout_p, f"{label} gate/up")
    if wg.shape[0] != wu.shape[0]:
        raise ValueError(f"peftfast: {label}: gate and up widths differ ({wg.shape[0]} and {wu.shape[0]})")
    _check_group(x.new_empty((1, wg.shape[0])), [wd], [bd], [ad], [bmd], [sd], [None], p_d, f"{label} down")
    for what, w, m in (("gate", wg, mg), ("up", wu, mu), ("down", wd, md)):
        if m.shape != (w.shape[0],) or m.device != x.device:
            raise ValueError(f"peftfast: {label}: {what} DoRA magnitude has shape {tuple(m.shape)} on {m.device}, "
                             f"expected ({w.shape[0]},) on {x.device}")
    be = resolve_backend(backend, x.device)
    flat = [wg, wu, None, None, None, None, ag, au, bmg, bmu, wd, None, None, ad, bmd]
    if dropout_p == 0.0 and p_d == 0.0:
        return _DoRAMLPFunction.apply(x, act, (float(sg), float(su)), (float(sd),), be, mode, bg, bu, bd, mg, mu, md,
                                      *flat)
    seed, down_seed = _seeds(seed, down_seed, dropout_p, p_d, be, x.device)
    return _DoRADropoutMLPFunction.apply(x, act, (float(sg), float(su)), (float(sd),), float(dropout_p), float(p_d),
                                         seed, down_seed, be, mode, bg, bu, bd, mg, mu, md, *flat)


__all__ = ["GATE_ACTS", "MLP_RECOMPUTE", "act_mul", "act_mul_backward", "dora_mlp", "frozen_mlp", "lora_mlp",
           "lora_packed_mlp"]


_register()
