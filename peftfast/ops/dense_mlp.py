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

Element-wise ATen ops on the fly need no kernel of their own: the saving is in what is kept, not in the launches.
"""

from __future__ import annotations

import torch

from peftfast.ops.mlp import GATE_ACTS, _act

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


__all__ = ["ACTS", "act_forward", "dense_act"]
