"""Fused LoRA-MLP: ``down(act(gate(x)) · up(x))`` with LoRA (and dropout) on all three projections, one op.

Saved for backward: the block input ``x`` (once for gate and up), the gate/up pre-activations ``g`` and ``u``, and
the skinny ``x·A_catᵀ`` / ``h·A_downᵀ`` products. The activation output ``act(g)`` and the down projection's input
``h = act(g)·u`` are never kept: backward rebuilds ``h`` from ``g`` and ``u`` (one element-wise pass). PEFT keeps
``g``, ``act(g)``, ``u``, ``h`` and, with dropout, a dropout copy of ``x`` per projection and of ``h``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton

from peftfast import _ext
from peftfast.ops._backend import interpreting, resolve_backend
from peftfast.ops._counters import launching
from peftfast.ops.lora import _check_group, draw_seed, group_backward, group_forward, seed_tensor

GATE_ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_BLOCK = 1024


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
        dg, du = torch.ops.peftfast.act_mul_bwd(dh, g, u, ctx.act)
        need = ctx.needs_input_grad
        return (dg if need[0] else None), (du if need[1] else None), None

    torch.library.register_autograd("peftfast::act_mul_fwd", backward, setup_context=setup_context)

    def no_double_backward(ctx, *grads):
        raise RuntimeError("peftfast: act(g)·u does not support double backward (create_graph=True); "
                           "use backend='torch'")

    torch.library.register_autograd("peftfast::act_mul_bwd", no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


if _ext.available():
    _register_cpp_ops()


def act_mul(g: torch.Tensor, u: torch.Tensor, act: str, backend: str) -> torch.Tensor:
    """``act(g) · u`` (g, u [..., I] of one dtype); backend ``cpp`` runs the C++ kernel, differentiable."""
    if backend == "cpp":
        return torch.ops.peftfast.act_mul_fwd(g, u, act)
    if backend != "triton":
        return _act(g, act) * u
    from peftfast.kernels import mlp as K

    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    n = g.numel()
    with launching("_act_mul_fwd_kernel"):
        K._act_mul_fwd_kernel[(triton.cdiv(n, _BLOCK),)](g, u, h, n, ACT=GATE_ACTS[act], BLOCK=_BLOCK,
                                                         num_warps=4 if not interpreting() else 1)
    return h


def act_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) of ``h = act(g) · u``: ``dg = dh · u · act'(g)``, ``du = dh · act(g)`` in one pass."""
    if backend == "cpp":
        return torch.ops.peftfast.act_mul_bwd(dh, g, u, act)
    if backend != "triton":
        a = _act(g, act)
        du = dh * a
        dgu = dh * u
        if act == "silu":
            dg = torch.ops.aten.silu_backward(dgu, g)
        else:
            dg = torch.ops.aten.gelu_backward(dgu, g, approximate="tanh" if act == "gelu_tanh" else "none")
        return dg, du
    from peftfast.kernels import mlp as K

    dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    with launching("_act_mul_bwd_kernel"):
        K._act_mul_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dh, g, u, dg, du, n, ACT=GATE_ACTS[act], BLOCK=_BLOCK,
                                                         num_warps=4 if not interpreting() else 1)
    return dg, du


class _LoRAMLPFunction(torch.autograd.Function):
    """``flat`` = the gate/up group's Ws, bs, bBs, As, Bs (2 each, in segment order: ``gate_segment`` says where
    the gate is), then the down projection's (1 each)."""

    @staticmethod
    def forward(ctx, x, act, s_gu, s_d, p_gu, p_d, seed_gu, seed_d, backend, gate_segment, *flat):
        flat_gu, flat_d = flat[:10], flat[10:]
        x2d = x.reshape(-1, x.shape[-1])
        ys, xa_gu = group_forward(x2d, s_gu, p_gu, seed_gu, backend, 2, flat_gu)
        g, u = ys[gate_segment], ys[1 - gate_segment]
        h = act_mul(g, u, act, backend)
        (y,), xa_d = group_forward(h, s_d, p_d, seed_d, backend, 1, flat_d)
        ctx.save_for_backward(x2d, xa_gu, g, u, xa_d, *flat)
        ctx.meta = (act, s_gu, s_d, p_gu, p_d, seed_gu, seed_d, backend, gate_segment, x.shape)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        act, s_gu, s_d, p_gu, p_d, seed_gu, seed_d, backend, gate_segment, x_shape = ctx.meta
        x2d, xa_gu, g, u, xa_d, *flat = ctx.saved_tensors
        flat_gu, flat_d = flat[:10], flat[10:]
        need = ctx.needs_input_grad
        flat_need = need[10:]
        h = act_mul(g, u, act, backend)  # rebuilt, never saved
        dy2 = dy.reshape(x2d.shape[0], -1)
        dh, grads_d = group_backward(h, xa_d, flat_d, s_d, p_d, seed_d, backend, 1, True, flat_need[10:], [dy2])
        del h
        dg, du = act_mul_backward(dh, g, u, act, backend)
        del dh
        dgu = [dg, du] if gate_segment == 0 else [du, dg]
        dx, grads_gu = group_backward(x2d, xa_gu, flat_gu, s_gu, p_gu, seed_gu, backend, 2, need[0],
                                      flat_need[:10], dgu)
        return (None if dx is None else dx.view(x_shape), *([None] * 9), *grads_gu, *grads_d)


LoRAProj = tuple  # (weight [N, K], bias | None, lora_A [r, K], lora_B [N, r], scale, lora_bias | None)


def lora_mlp(x: torch.Tensor, gate: Sequence, up: Sequence, down: Sequence, *, act: str = "silu",
             dropout_p: float = 0.0, down_dropout_p: float | None = None, seed: int | None = None,
             down_seed: int | None = None, gate_segment: int = 0, backend: str = "auto",
             name: str = "") -> torch.Tensor:
    """``down(act(gate(x)) · up(x))`` where each projection is ``(W, b, A, B, scale, lora_bias)`` of a LoRA linear.

    gate/up share a rank and a dropout probability (one grouped pass over ``x``); the down projection may have
    its own (``down_dropout_p``, default ``dropout_p``). ``act``: silu (SwiGLU), gelu or gelu_tanh (GeGLU).
    ``gate_segment`` (0 or 1) is the gate's dropout segment in the gate/up group, so the masks match those of the
    same layers run as a sibling group.
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
    be = resolve_backend(backend, x.device)
    if be == "cpp":
        # seeds stay tensors on the registered-op path: no .item(), so torch.compile traces straight through
        seed, down_seed = seed_tensor(seed, x.device, dropout_p), seed_tensor(down_seed, x.device, p_d)
    else:
        seed = int(seed) if seed is not None else draw_seed(x.device) if dropout_p > 0.0 else 0
        down_seed = int(down_seed) if down_seed is not None else draw_seed(x.device) if p_d > 0.0 else 0
    if gate_segment not in (0, 1):
        raise ValueError(f"peftfast: {name}: gate_segment must be 0 or 1")
    first, second = ((wg, bg, lbg, ag, bmg, sg), (wu, bu, lbu, au, bmu, su))[:: 1 if gate_segment == 0 else -1]
    flat = [*(t for pair in zip(first[:5], second[:5]) for t in pair), wd, bd, lbd, ad, bmd]
    return _LoRAMLPFunction.apply(x, act, (float(first[5]), float(second[5])), (float(sd),), float(dropout_p),
                                  float(p_d), seed, down_seed, be, gate_segment, *flat)


__all__ = ["GATE_ACTS", "act_mul", "act_mul_backward", "lora_mlp"]
