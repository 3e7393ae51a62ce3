"""Per-instance ``forward`` binding shared by the module-level features (MLP, RoPE, norms)."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

_T = TypeVar("_T")

# the names transformers gives a layer's cache argument ("cache": transformers >= 5.24)
CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")

ZERO3_REASON = "DeepSpeed ZeRO-3 parameters (each module's own hooks gather them: its original forward runs)"


def base_of(layer: nn.Module) -> nn.Module:
    """PEFT's ``get_base_layer()`` through the ``base_layer`` children themselves: every call of every patched layer
    asks several times, and PEFT's ``hasattr`` loop goes through ``nn.Module.__getattr__`` (a raised and caught
    AttributeError for the innermost layer)."""
    base = layer
    while (child := base._modules.get("base_layer")) is not None:
        base = child
    return base


def in_both_modes(module: nn.Module, probe: Callable[[], _T], device: torch.device | None = None) -> list[_T]:
    """``probe()`` (a patch-time probe of ``module``'s class code) with ``module`` and its children in training
    mode, then in eval mode (each restored after): its two results, training mode's first.

    A dropout the class's own code applies (``F.dropout(..., training=self.training)``: Seed-OSS's residual
    dropout) acts only in training mode, and ``from_pretrained`` hands models over in eval mode, so a probe in the
    mode at hand could pass a forward that training would not reproduce. The CPU RNG (and ``device``'s, on CUDA)
    is forked: what the probe draws leaves the user's streams alone."""
    was = {m: m.training for m in module.modules()}
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device is not None and device.type == "cuda" else []
    out = []
    try:
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            for mode in (True, False):
                for m in was:  # the stubs a probe swaps in start in training mode: they never draw
                    m.training = mode
                out.append(probe())
    finally:
        for m, mode in was.items():
            m.training = mode
    return out


def first_reason(reasons: list[str | None]) -> str | None:
    """The reason of :func:`in_both_modes`' two results: eval mode's, else training mode's named as such; or None."""
    train, evaluate = reasons
    if evaluate is None and train is not None:
        return f"in training mode, {train}"
    return evaluate


def zero3_partitioned(*params) -> bool:
    """Whether any of ``params`` is a DeepSpeed ZeRO-3 parameter (it carries ``ds_id`` once ``deepspeed.initialize``
    or ``zero.Init`` has partitioned it).

    ZeRO-3 gathers a module's own parameters in hooks around that module's forward and backward and frees them
    after; a fused forward that reads its children's parameters directly (sibling groups, the LoRA-MLP, a fused
    block) or rebuilds a norm in backward would read an empty shard, so such calls step aside for the original
    forward, whose module calls trigger the hooks.
    """
    if not deepspeed_imported():
        return False
    return any(p is not None and hasattr(p, "ds_id") for p in params)


def deepspeed_imported() -> bool:
    """Whether DeepSpeed is imported: nothing else gives a parameter its ``ds_id``, so every per-call ZeRO-3 check
    and hook can be skipped until it is."""
    return "deepspeed" in sys.modules


def arm_zero3(module: nn.Module, state, hook) -> None:
    """Where DeepSpeed is imported, put ``hook`` (a ZeRO-3 registration pre-hook) first in line on ``module`` and run
    it once now (patched after ``deepspeed.initialize``: it registers at once and removes itself). Patched before
    DeepSpeed is imported, the module's forward calls the hook itself at its first call that finds partitioned
    parameters: that call runs the original forward and the fused path serves the later ones."""
    if deepspeed_imported() and state.zero3_hook is None and state.zero3_params is None:
        state.zero3_hook = module.register_forward_pre_hook(hook, prepend=True)
        hook(module, ())


def zero3_late(module: nn.Module, state, hook, reason: str) -> None:
    """After a call that ZeRO-3 parameters sent to the original forward (``reason`` is ``ZERO3_REASON``) on a module
    with no pre-hook armed (patched before DeepSpeed was imported): run ``hook`` now, registering them for the later
    calls."""
    if reason is ZERO3_REASON and state.zero3_hook is None and state.zero3_params is None:
        hook(module, ())


def zero3_registered(state, params: list) -> None:
    """Keep the parameters ``params`` registered for ``state``'s module and remove its pre-hook: registered once for
    good, the hook would only cost every later call of the module (a pre-hook takes ``nn.Module``'s slow call path)."""
    state.zero3_params = params
    if state.zero3_hook is not None:
        state.zero3_hook.remove()  # safe inside the hook: nn.Module iterates a copy of its hooks
        state.zero3_hook = None


def user_hooks(module: nn.Module, own=()) -> bool:
    """Whether ``module`` has forward hooks other than ``own`` (peftfast's) and DeepSpeed ZeRO-3's gathering hooks.

    DeepSpeed's are left to the ZeRO-3 checks: a fused path reads partitioned parameters only where the module that
    runs it registered them (:func:`zero3_register`), which stands in for the hooks of the modules it skips.
    """
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for h in hooks.values():
            if h not in own and not getattr(h, "__module__", "").startswith("deepspeed."):
                return True
    return False


def first_param_partitioned(module: nn.Module | None) -> bool:
    """Whether the first parameter of ``module`` (recursively) is ZeRO-3 partitioned: a per-call check."""
    return module is not None and deepspeed_imported() and hasattr(next(module.parameters(), None), "ds_id")


def zero3_register(module: nn.Module) -> list:
    """Register every partitioned parameter of ``module`` (its children's included) as a DeepSpeed external
    parameter of ``module``, so ZeRO-3 gathers them around its forward and backward; returns them.

    Call it before DeepSpeed's own pre-hook of ``module`` (from a pre-hook registered with ``prepend=True``): then
    the set ``module`` fetches is the same from DeepSpeed's first traced step on.
    """
    return zero3_register_params(module, module.parameters())


def zero3_register_params(module: nn.Module, params) -> list:
    """:func:`zero3_register` for the given parameters only (e.g. a block's two norm weights, not its sublayers')."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    params = [p for p in params if hasattr(p, "ds_id")]
    for p in params:
        register_external_parameter(module, p)
    return params


def zero3_detach(module: nn.Module, state) -> None:
    """Remove ``state.zero3_hook`` and undo the registration of ``state.zero3_params`` (a patched module's state)."""
    if state.zero3_hook is not None:
        state.zero3_hook.remove()
    zero3_unregister(module, state.zero3_params)
    state.zero3_hook = state.zero3_params = None


def zero3_unregister(module: nn.Module, params) -> None:
    """Undo :func:`zero3_register` (what DeepSpeed has since dropped is skipped)."""
    if not params:
        return
    from deepspeed.runtime.zero.partition_parameters import unregister_external_parameter

    ext = getattr(module, "_external_params", {})
    for p in params:
        if id(p) in ext:
            unregister_external_parameter(module, p)


def bind_forward(module: nn.Module, state_attr: str, state, fn, method: str = "forward") -> None:
    """Record ``state`` (which must have ``previous_forward``, filled here) and bind ``fn(module, ...)`` as
    ``module.<method>`` (``forward``, or e.g. a BERT layer's ``feed_forward_chunk``).

    A ``functools.partial`` of a module-level function, not a closure or bound method: deepcopy and pickle carry it
    to the copied module.
    """
    state.previous_forward = module.__dict__.get(method)
    setattr(module, state_attr, state)
    bound = functools.partial(fn, module)
    try:
        # what callers read off the forward stays the original's: HF Trainer keeps only the batch columns named in
        # ``inspect.signature(model.forward)``, and a bare ``(*args, **kwargs)`` would make it drop ``input_ids``
        bound.__signature__ = inspect.signature(getattr(module, method))
    except (TypeError, ValueError):  # a callable without a signature: the partial's own
        pass
    setattr(module, method, bound)


def call_original(module: nn.Module, state, *args, **kwargs):
    """Run the forward that was there before :func:`bind_forward` (the class's when there was none)."""
    if state.previous_forward is not None:
        return state.previous_forward(*args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


def unbind_forward(module: nn.Module, state_attr: str, method: str = "forward"):
    """Undo :func:`bind_forward`: the previous instance-level method (or none) comes back. Returns the state."""
    st = module.__dict__.pop(state_attr, None)
    if st is None:
        return None
    if st.previous_forward is not None:
        setattr(module, method, st.previous_forward)
    else:
        module.__dict__.pop(method, None)
    return st
