"""The activation of a two-layer MLP, ``down(act(up(x)))`` (BERT, RoBERTa, GPT-2, CLIP, Phi-2, GPT-NeoX), kept
as small as backward allows.

Backward of ``h = act(y)`` needs only ``y`` (the pre-activation). What keeps more:

* transformers computes GPT-2's ``gelu_new`` (and ``gelu_fast``, ``gelu_python``, ``quick_gelu``) as a chain of
  element-wise ops, each keeping its operands: the tanh forms keep four tensors of the intermediate width I per
  token (``y``, tanh's output and both factors of the last product), QuickGELU two;
* the down projection keeps ``h`` (I per token) when its weights train: LoRA's ``A`` gradient reads its input.

:func:`dense_act` computes each activation as one ATen op (``F.gelu`` with or without ``approximate="tanh"``,
``F.silu``) or, for QuickGELU, one autograd function, each keeping only ``y``; :func:`act_forward` is the same
computation without autograd, which backward runs to rebuild ``h`` for the down projection instead of keeping it
(``peftfast.ops.recompute.rebuilding``: the rebuilt ``h`` equals the forward's bit for bit). Per token and layer
that keeps I values where eager PyTorch keeps 2·I (GELU, LoRA on the down projection) to 5·I (``gelu_new``). The
composite forms and these differ by rounding only: they compute the same function.

With ``recompute="up"`` or later (:func:`up_act_rerun`), not even ``y`` is kept: ``h = act(up(x))`` keeps ``x`` (which
the norm before it rebuilds in turn, where it is a registered norm output) and backward runs ``up`` again, once, under
the forward's RNG and autocast state (the same LoRA dropout masks, the same bits): the down projection's rebuild of
``h`` makes that rerun with grad and leaves its graph to the rerun's own backward. ``up`` is any module (a PEFT LoRA
layer, patched or not, ``Conv1D``): its parameter gradients come from a backward through the rerun, as reentrant
activation checkpointing computes them. Per token and layer that keeps H values instead of I (4·H in BERT and
GPT-2) for one more ``up`` GEMM in backward.

Element-wise ATen ops on the fly need no kernel of their own: the saving is in what is kept, not in the launches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from peftfast.ops.mlp import GATE_ACTS, _act
from peftfast.ops.recompute import restored_rng, rng_state

ACTS = ("gelu", "gelu_tanh", "silu", "quick_gelu")
_QUICK = 1.702  # QuickGELU: y·sigmoid(1.702·y)


class _QuickGELUFunction(torch.autograd.Function):
    """``y·sigmoid(1.702·y)`` keeping ``y`` only (eager autograd keeps ``y`` and the sigmoid's output)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y)
        return y * torch.sigmoid(_QUICK * y)  # transformers' QuickGELUActivation, op for op

    @staticmethod
    def backward(ctx, dh: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        s = torch.sigmoid(_QUICK * y)
        return dh * (s + _QUICK * y * s * (1 - s))


def act_forward(y: torch.Tensor, act: str) -> torch.Tensor:
    """``act(y)``, the same ops :func:`dense_act` runs (backward's rebuild of ``h``; no autograd needed)."""
    if act == "quick_gelu":
        return y * torch.sigmoid(_QUICK * y)
    if act in GATE_ACTS:  # the gated MLP's one-op activations
        return _act(y, act)
    raise ValueError(f"peftfast.dense_act: unknown activation {act!r}; choose one of {ACTS}")


def dense_act(y: torch.Tensor, act: str) -> torch.Tensor:
    """``act(y)`` with autograd keeping ``y`` only (``act``: one of :data:`ACTS`)."""
    if act == "quick_gelu":
        return _QuickGELUFunction.apply(y) if torch.is_grad_enabled() and y.requires_grad else act_forward(y, act)
    return act_forward(y, act)


class UpActRerun:
    """``act(up(x))`` for backward to run again: the forward's RNG and autocast state, and the graph of the rerun
    that the down projection's rebuild of ``h`` makes, which :class:`_UpActFunction`'s backward then uses, so that
    ``up`` runs once in backward whoever asks first."""

    __slots__ = ("up", "act", "rng", "autocast", "x_grad", "graph", "params")

    def __init__(self, up: Callable[[torch.Tensor], torch.Tensor], act: str, x: torch.Tensor):
        dev = x.device.type
        self.up, self.act = up, act
        # up's trainable parameters are the Function's inputs too: where x needs no gradient (the first MLP of a
        # parallel-residual model such as GPT-NeoX or Phi-2, or one whose attention trains nothing) autograd would
        # otherwise see an output that needs none, and up's LoRA weights would get no gradient at all
        params = up.parameters() if isinstance(up, torch.nn.Module) else ()
        self.params = tuple(p for p in params if p.requires_grad)
        # as the forward saw it: a saved x that comes back rebuilt (a norm output's recipe) has no grad history
        self.x_grad = x.requires_grad
        self.rng = rng_state(x.device)  # before up's forward draws its dropout seeds
        self.autocast = dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
        self.graph: tuple[torch.Tensor, torch.Tensor] | None = None

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the leaf standing for ``x``, ``h``) with grad, as the forward computed ``h``."""
        dev, enabled, dtype = self.autocast
        xl = x.detach().requires_grad_(self.x_grad)
        with torch.enable_grad(), restored_rng(self.rng), torch.autocast(dev, dtype=dtype, enabled=enabled):
            return xl, act_forward(self.up(xl), self.act)

    def rebuild_h(self, x: torch.Tensor) -> torch.Tensor:
        """``h`` for the down projection's backward (a ``rebuilding`` recipe); keeps the rerun's graph."""
        self.graph = self.run(x)
        return self.graph[1].detach()


class _UpActFunction(torch.autograd.Function):
    """``act(up(x))`` keeping ``x`` only; backward reruns ``up`` (or takes the down projection's rerun). ``params``:
    up's trainable parameters, whose gradients come back through this node (from the rerun's graph)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rerun: UpActRerun, *params: torch.Tensor) -> torch.Tensor:
        ctx.rerun = rerun
        ctx.save_for_backward(x)
        return act_forward(rerun.up(x), rerun.act)

    @staticmethod
    @once_differentiable
    def backward(ctx, dh: torch.Tensor):
        rerun = ctx.rerun
        (x,) = ctx.saved_tensors
        xl, h = rerun.graph if rerun.graph is not None else rerun.run(x)
        rerun.graph = None
        need = ctx.needs_input_grad
        want_x = need[0] and xl.requires_grad
        wanted = ([xl] if want_x else []) + [p for p, n in zip(rerun.params, need[2:]) if n]
        grads = iter(torch.autograd.grad(h, wanted, dh, allow_unused=True) if wanted else ())
        gx = next(grads) if want_x else None
        return (gx, None, *(next(grads) if n else None for n in need[2:]))


def up_act_rerun(up: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, act: str) -> tuple[torch.Tensor,
                                                                                                UpActRerun]:
    """``(h, rerun)``: ``h = act(up(x))`` keeping only ``x``, and what rebuilds ``h`` for the down projection
    (``rerun.rebuild_h``). Call under grad mode, where ``x`` or ``up``'s parameters need gradients."""
    rerun = UpActRerun(up, act, x)
    return _UpActFunction.apply(x, rerun, *rerun.params), rerun


__all__ = ["ACTS", "UpActRerun", "act_forward", "dense_act", "up_act_rerun"]
