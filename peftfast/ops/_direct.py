"""Eager calls of registered peftfast ops with their registered autograd, minus ``torch.library``'s per-call wrapping.

An op whose autograd is registered with ``torch.library.register_autograd`` (or defined by ``custom_op``) runs, when
an input requires grad, through a Python autograd kernel that flattens every argument with pytree, wraps Tensor[]
arguments, fills schema defaults and recomputes the dispatch key set: on CPU about 0.1 ms a call for a two-tensor op
and 0.3-0.4 ms for ``lora_group_fwd``'s lists, several times the op itself at small shapes (decode-sized batches,
small models), where it made the patched model slower than PEFT's eager one.

:func:`call` runs the op below the Autograd key inside one plain ``autograd.Function`` and calls the *same*
``setup_context`` / ``backward`` the op registers, with ``ctx.needs_input_grad`` structured as the op's inputs (one
list per Tensor[] argument), so saved tensors, gradients and saved-tensor hooks are exactly those of the registered
path. Under ``torch.compile`` it calls the registered op itself (Dynamo traces that, with its fake kernel), and
dispatch modes (op counters, fake tensors) still see the op, which runs below autograd as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def out_view(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """``t.view(*shape)`` for an ``autograd.Function``'s forward to return, as a tensor autograd does not track as a
    view. A view made inside a custom Function may not be modified in place (autograd raises: it could not rebase
    the Function's backward), and models do modify projection outputs in place (Gemma 3n scales one with ``*=``).
    The result has a version counter of its own: only for a tensor that nothing the Function saves aliases, or an
    in-place change would reach backward unnoticed."""
    return torch.ops.aten._unsafe_view.default(t, shape)


class _Direct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, *flat):
        op, setup, _, sizes, out_sizes = spec
        args = _group(flat, sizes)
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args)
        setup(ctx, args, out)
        ctx.peftfast_direct = spec
        return tuple(_flatten(out if isinstance(out, tuple) else (out,), out_sizes))

    @staticmethod
    def backward(ctx, *grads):
        _, _, backward, sizes, out_sizes = ctx.peftfast_direct
        grouped = _group(grads, out_sizes)
        prev = ctx.needs_input_grad
        ctx.needs_input_grad = tuple(_group(prev[1:], sizes))
        try:
            result = backward(ctx, *grouped)
        finally:
            ctx.needs_input_grad = prev
        if not isinstance(result, tuple):
            result = (result,)
        flat: list[Any] = [None]
        for size, g in zip(sizes, result):
            if size < 0:
                flat.append(g)
            else:
                flat.extend(g if g is not None else [None] * size)
        return tuple(flat)


def _group(flat, sizes) -> list:
    """``flat`` back into one entry per argument: a list of ``n`` items where ``sizes`` says ``n >= 0``."""
    out, i = [], 0
    for size in sizes:
        if size < 0:
            out.append(flat[i])
            i += 1
        else:
            out.append(list(flat[i:i + size]))
            i += size
    return out


def _flatten(items, sizes) -> list:
    """Inverse of :func:`_group`: one entry per item, a list's elements in its place."""
    flat: list = []
    for size, item in zip(sizes, items):
        if size < 0:
            flat.append(item)
        else:
            flat.extend(item)
    return flat


def call(op: torch._ops.OpOverload, setup: Callable, backward: Callable, args: tuple, out_lists: tuple[int, ...]):
    """``op(*args)`` differentiable by ``setup``/``backward`` (those registered for it). ``args`` must give every
    schema argument (defaults included, as ``setup`` receives them); ``out_lists``: per output, its length if it is
    a Tensor[] (else -1). Returns what the op returns (lists as lists)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return undifferentiated(op, *args)  # nothing to record: past the Python autograd kernel (eager)
    sizes = tuple(len(a) if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else -1 for a in args)
    outs = _Direct.apply((op, setup, backward, sizes, out_lists), *_flatten(args, sizes))
    grouped = _group(outs, out_lists)
    return tuple(grouped) if len(out_lists) > 1 else grouped[0]


def undifferentiated(op, *args):
    """``op(*args)`` for an op whose registered autograd only guards against double backward, called where grad
    mode is off (a backward without ``create_graph``, ``no_grad``): straight to its kernel, without the Python
    autograd kernel ``torch.library`` wraps around it (about 20 us a call on CPU). With grad mode on (double
    backward) and under ``torch.compile`` it is the registered op as before, guard included."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
