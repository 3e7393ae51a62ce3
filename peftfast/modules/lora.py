"""Forward replacement for PEFT ``lora.Linear`` layers, running them on the fused LoRA op.

The replacement is bound to the layer instance (``layer.forward``); parameters, their names, ``state_dict`` and
optimizer references are untouched. Every call that the fused path cannot serve exactly goes to PEFT's own forward
and is counted with its reason, which ``peftfast.report`` shows.

Siblings that read the same input (q/k/v, gate/up, BERT's query/key/value) form a ``SiblingGroup``: the first
member called with ``x`` runs all members in one grouped op (one pass over ``x`` for every ``A`` product, ``x``
saved once) and hands the other outputs to the siblings when they are called with the same tensor. A group whose
computed outputs go untaken (its siblings read other inputs, e.g. a cross-attention that ``patch`` did not recognise
by name, or skip their call) splits for good at the first such miss: its members then run one by one.

Under DeepSpeed ZeRO-3 a layer's parameters live in its children (``base_layer``, ``lora_A``, ``lora_B``), each
gathered by hooks around that child's own forward, which the fused path never calls. So where DeepSpeed is imported,
``install`` puts a forward pre-hook first in line on the layer: the first call that finds partitioned parameters
registers every one of them as an external parameter of the layer, before DeepSpeed's own pre-hook runs, so
DeepSpeed gathers them around the layer's forward and backward from the first traced step on (one fixed set per
layer, the same every step); the hook then removes itself. Patched before DeepSpeed is imported, the layer carries no
hook (it would put every call on ``nn.Module``'s slow path): its first call that finds partitioned parameters runs
PEFT's forward and registers them, and the fused path serves the later calls. Each layer then runs alone: a sibling
group or the LoRA-MLP op would read other modules' parameters.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from peftfast.modules import nf4 as nf4_mod
from peftfast.modules._bind import (
    ZERO3_REASON,
    arm_zero3,
    base_of,
    bind_forward,
    call_original,
    unbind_forward,
    user_hooks,
    zero3_detach,
    zero3_late,
    zero3_partitioned,
    zero3_register,
    zero3_registered,
)
from peftfast.modules._tally import Tallied, tally
from peftfast.ops.lora import MAX_RANK, dora_linear, lora_linear_group

try:  # transformers is a dependency, but keep the module importable without it
    from transformers.pytorch_utils import Conv1D as _HFConv1D

    _BASE_TYPES: tuple[type, ...] = (nn.Linear, _HFConv1D)
except Exception:  # pragma: no cover
    _BASE_TYPES = (nn.Linear,)


def _linear_equivalent(base: nn.Module) -> bool:
    """Subclasses of nn.Linear that only change initialisation (ESMFold's) or whose forward computes ``x Wᵀ + b``
    in another order (Falcon's ``FalconLinear``: the bias added after the product) run as nn.Linear: the fused op's
    result differs from theirs by the rounding of one addition, as nn.Linear's own does."""
    cls = type(base)
    if not isinstance(base, nn.Linear):
        return False
    if cls.forward is nn.Linear.forward:
        return True
    return f"{cls.__module__}.{cls.__qualname__}" in _LINEAR_FORWARDS


_LINEAR_FORWARDS = frozenset({"transformers.models.falcon.modeling_falcon.FalconLinear"})


def _peft_lora_linear_cls():
    from peft.tuners.lora.layer import Linear

    return Linear


def _is_dora(variant) -> bool:
    """PEFT's DoRA variant of a linear layer, exactly (its subclasses and other variants compute something else)."""
    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:  # pragma: no cover - an older PEFT
        return False
    return type(variant) is DoraLinearVariant or variant is DoraLinearVariant


def _dora_reason(layer: nn.Module, name: str) -> str | None:
    """Why adapter ``name`` of ``layer`` (a DoRA adapter) cannot run on the fused DoRA path, or None."""
    mag = getattr(layer, "lora_magnitude_vector", {})
    dora = mag[name] if name in mag else None
    if dora is None or type(dora).__name__ != "DoraLinearLayer" or not isinstance(getattr(dora, "weight", None),
                                                                                  torch.Tensor):
        return f"adapter {name!r}: DoRA without PEFT's DoraLinearLayer magnitude"
    if layer.lora_B[name].bias is not None:
        return f"adapter {name!r}: DoRA with a LoRA bias (lora_bias=True)"
    if getattr(layer, "ephemeral_gpu_offload", False):
        return f"adapter {name!r}: DoRA with ephemeral_gpu_offload"
    return None


@dataclass
class LoRAPatchConfig:
    """Options of the fused LoRA path."""

    backend: str = "auto"
    group_siblings: bool = True


@dataclass
class LoRAState(Tallied):
    """What peftfast keeps on a patched layer (as ``layer._peftfast``); none of it is in ``state_dict``."""

    name: str
    config: LoRAPatchConfig
    previous_forward: object | None  # an instance-level forward that was there before patching, if any
    group: SiblingGroup | None = None
    index: int = 0
    fused_calls: int = 0
    base_only_calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    zero3_params: list | None = None  # registered as DeepSpeed external parameters of the layer (ZeRO-3)
    zero3_hook: object | None = None  # the handle of the pre-hook that registers them


def _version(x: torch.Tensor) -> int | None:
    # inference tensors keep no version counter, and Dynamo cannot read one: identity alone matches them (inside a
    # compiled region the siblings' calls follow each other with no in-place write to their shared input between)
    if torch.compiler.is_compiling() or x.is_inference():
        return None
    return x._version


class SiblingGroup:
    """Layers of one parent module that read the same input; serves their outputs from one grouped op."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self._x: torch.Tensor | None = None
        self._version = -1
        self._grad = False
        self._outs: list[torch.Tensor | None] = []
        self.split = False  # set at the first outputs computed for siblings that never took them
        self.caller = None  # the state of the member whose call is computing the group (its plan is at hand)

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        if self._x is not x or _version(x) != self._version or torch.is_grad_enabled() != self._grad:
            return None
        out = self._outs[index]
        if out is None:
            return None
        self._outs[index] = None
        if all(o is None for o in self._outs):
            self.clear()
        return out

    def put(self, index: int, x: torch.Tensor, outs) -> torch.Tensor:
        if any(o is not None for o in self._outs):  # the last grouped call's extra work went unused
            self.split = True
        self._x, self._version, self._grad = x, _version(x), torch.is_grad_enabled()
        self._outs = list(outs)
        self._outs[index] = None
        return outs[index]

    def clear(self) -> None:
        self._x, self._outs = None, []


# ----------------------------------------------------------------------------------------------------------------
# eligibility
# ----------------------------------------------------------------------------------------------------------------
def _base_weight(base: nn.Module):
    # _parameters read directly (nn.Module.__getattr__ is slow); a base whose weight is not a parameter: getattr
    w = base._parameters.get("weight")
    return w if w is not None else base.weight


def base_weight_nk(layer: nn.Module, base: nn.Module | None = None) -> torch.Tensor:
    """The frozen base weight as an ``[out, in]`` view (GPT-2 ``Conv1D`` stores ``[in, out]``); ``base``: the
    layer's base layer where the caller has it."""
    w = _base_weight(base if base is not None else base_of(layer))
    return w.t() if getattr(layer, "fan_in_fan_out", False) else w


def has_hooks(layer: nn.Module) -> bool:
    """Whether a patched LoRA layer has forward hooks besides peftfast's own and DeepSpeed ZeRO-3's."""
    return user_hooks(layer, own=(_zero3_register_hook,))


def why_not(layer: nn.Module) -> str | None:
    """None if ``layer`` can run on the fused LoRA path, else a one-line reason."""
    cls = _peft_lora_linear_cls()
    nf4 = nf4_mod.is_nf4_lora(layer)  # NF4 bases (NF4Linear, bitsandbytes nf4) run on the fused NF4 op
    if type(layer) is not cls and not nf4:
        return f"{type(layer).__module__}.{type(layer).__name__} is not a plain PEFT lora.Linear"
    base = layer.get_base_layer()
    if nf4 and nf4_mod.why_not_base(base) is not None:
        return nf4_mod.why_not_base(base)
    if type(base) not in _BASE_TYPES and not nf4 and not _linear_equivalent(base):
        return f"base layer {type(base).__name__} is not nn.Linear or Conv1D (quantized or custom)"
    if zero3_partitioned(base.weight) and (nf4 or getattr(layer, "fan_in_fan_out", False)):
        return f"base weight: {ZERO3_REASON}; the fused path gathers nn.Linear bases only"
    if user_hooks(base) or hasattr(base, "_hf_hook"):
        return "base layer has forward hooks (e.g. accelerate offloading)"
    w = base.weight
    # a ZeRO-3 partitioned weight holds an empty shard between gatherings; its whole shape is ds_shape
    dim = len(w.ds_shape) if zero3_partitioned(w) else w.dim() if isinstance(w, torch.Tensor) else -1
    if not isinstance(w, torch.Tensor) or w.is_meta or dim != 2:
        return "base weight is not a materialised 2-D tensor"
    if w.requires_grad:
        return "base weight is trainable (the fused path trains only LoRA weights and biases)"
    variants = getattr(layer, "lora_variant", None) or {}
    others = {k: v for k, v in variants.items() if not _is_dora(v)}
    if others:
        names = ", ".join(sorted(f"{k}: {type(v).__name__}" for k, v in others.items()))
        return f"LoRA variant ({names}) is not fused"
    for name in variants:
        why = _dora_reason(layer, name)
        if why is not None:
            return why
    if any(v for k, v in getattr(layer, "use_dora", {}).items() if k not in variants):
        return "DoRA flagged without PEFT's DoRA variant (an older PEFT) is not fused"
    for name, a in layer.lora_A.items():
        b = layer.lora_B[name]
        if type(a) is not nn.Linear or type(b) is not nn.Linear:
            return f"adapter {name!r}: lora_A/lora_B are not nn.Linear"
        if a.bias is not None:
            return f"adapter {name!r}: lora_A has a bias"
        if not 1 <= a.out_features <= MAX_RANK:
            return f"adapter {name!r}: rank {a.out_features} exceeds {MAX_RANK}"
        drop = layer.lora_dropout[name]
        if type(drop) not in (nn.Dropout, nn.Identity):
            return f"adapter {name!r}: dropout module {type(drop).__name__} is not nn.Dropout"
        if user_hooks(a) or user_hooks(b):
            return f"adapter {name!r}: lora_A/lora_B have forward hooks"
    return None


@dataclass(frozen=True)
class _Plan:
    adapter: str
    rank: int
    p: float
    lora_dtype: torch.dtype
    dora: bool = False  # PEFT's DoRA variant: runs alone on dora_linear (no sibling group, no block op)


_PLANS: dict[tuple, _Plan] = {}  # one frozen plan per distinct value: none is built per call


def _plan(layer: nn.Module, args: tuple, kwargs: dict, gathered: bool = False) -> _Plan | str | None:
    """The fused plan for this call, None for a base-only call, or a fallback reason (``gathered``: the caller's
    module registered this layer's ZeRO-3 parameters, see ``zero3_register``)."""
    if args or kwargs:
        if "adapter_names" in kwargs:
            return "mixed-adapter batch (adapter_names=...)"
        return "extra forward arguments"
    if layer.disable_adapters or layer.merged:
        return None
    mods = layer._modules  # children read directly: this runs on every call (nn.Module.__getattr__ is slow)
    lora_a = mods["lora_A"]._modules
    active = layer.active_adapters
    if len(active) == 1:
        name = active[0]
        if name not in lora_a:
            return None
    else:
        active = [a for a in active if a in lora_a]
        if not active:
            return None
        if len(active) > 1:
            return f"{len(active)} active adapters (the fused path serves one)"
        name = active[0]
    variant = getattr(layer, "lora_variant", {}).get(name)
    dora = variant is not None
    if dora and (not _is_dora(variant) or _dora_reason(layer, name) is not None):
        return f"adapter {name!r} uses a LoRA variant"
    w = _base_weight(base_of(layer))
    if w.requires_grad:
        return "base weight is trainable (the fused path trains only LoRA weights and biases)"
    a = lora_a[name]
    aw = a._parameters["weight"]
    if zero3_partitioned(
            w, aw, mods["lora_B"]._modules[name]._parameters["weight"],
            *((mods["lora_magnitude_vector"][name].weight,) if dora else ())):
        st = getattr(layer, "_peftfast", None)
        if not gathered and (st is None or st.zero3_params is None):  # DeepSpeed gathers nothing for the fused path
            return ZERO3_REASON
    drop = mods["lora_dropout"]._modules[name]
    p = float(drop.p) if drop.training and isinstance(drop, nn.Dropout) else 0.0
    if dora and not layer.training:
        p = 0.0  # PEFT's DoRA reuses the base output outside training, whatever its dropout module
    key = (name, aw.shape[0], p, aw.dtype, dora)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(*key)
    return plan


def _check_input(layer: nn.Module, x: torch.Tensor) -> None:
    st = layer._peftfast
    in_f = layer.in_features
    if x.shape[-1] != in_f:
        raise ValueError(
            f"peftfast: {st.name}: input has {x.shape[-1]} features in its last dimension, expected {in_f}"
        )
    w = _base_weight(base_of(layer))
    if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"peftfast: {st.name}: input dtype {x.dtype} does not match the base weight dtype {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"peftfast: {st.name}: input is on {x.device}, the layer on {w.device}")


def _member_tensors(layer: nn.Module, plan: _Plan):
    mods = layer._modules
    name = plan.adapter
    a = mods["lora_A"]._modules[name]._parameters
    b = mods["lora_B"]._modules[name]._parameters
    base = base_of(layer)
    params = base._parameters
    bias = params["bias"] if "bias" in params else getattr(base, "bias", None)
    return base_weight_nk(layer, base), bias, a["weight"], b["weight"], b.get("bias"), float(layer.scaling[name])


def _run(layers: list[nn.Module], plans: list[_Plan], x: torch.Tensor, backend: str, name: str):
    if len(layers) == 1:
        w, b, a, bm, lb, s = _member_tensors(layers[0], plans[0])
        ws, bs, as_, bms, lbs, scales = [w], [b], [a], [bm], [lb], [s]
    else:
        ws, bs, as_, bms, lbs, scales = zip(*(_member_tensors(m, pl) for m, pl in zip(layers, plans)))
    p = plans[0].p
    seed = None  # drawn by the op: a traced tensor op under torch.compile, no host round trip on CUDA
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # what autocast would do to F.linear: every operand in the autocast dtype, computed outside autocast
        dt = torch.get_autocast_dtype(dev)

        def cast(ts):
            return [t.to(dt) if t is not None else None for t in ts]

        x, ws, bs, as_, bms, lbs = x.to(dt), cast(ws), cast(bs), cast(as_), cast(bms), cast(lbs)
        with torch.autocast(dev, enabled=False):
            return lora_linear_group(x, ws, bs, as_, bms, scales, lora_biases=lbs, dropout_p=p, seed=seed,
                                     backend=backend, name=name)
    return lora_linear_group(x, ws, bs, as_, bms, scales, lora_biases=lbs, dropout_p=p, seed=seed,
                             backend=backend, name=name)


def _run_dora(layer: nn.Module, plan: _Plan, x: torch.Tensor, st: LoRAState) -> torch.Tensor:
    mods = layer._modules
    a, b = mods["lora_A"][plan.adapter], mods["lora_B"][plan.adapter]
    mag = mods["lora_magnitude_vector"][plan.adapter].weight
    return dora_linear(x, base_weight_nk(layer), base_of(layer).bias, a.weight, b.weight,
                       float(layer.scaling[plan.adapter]), mag, dropout_p=plan.p, backend=st.config.backend,
                       name=st.name)


def _group_plans(group: SiblingGroup, plan: _Plan) -> list[_Plan] | None:
    """Plans of every sibling when all can run together with ``plan``; else None."""
    plans = []
    for m in group.members:
        st = getattr(m, "_peftfast", None)
        if st is None or nf4_mod.is_nf4_base(base_of(m)):
            return None
        pl = plan if st is group.caller else _plan(m, (), {})
        if not isinstance(pl, _Plan) or pl.dora or \
                (pl.rank, pl.p, pl.lora_dtype) != (plan.rank, plan.p, plan.lora_dtype):
            return None
        plans.append(pl)
    return plans


def fused_lora_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Drop-in ``forward`` for a PEFT ``lora.Linear`` (bound to the instance by ``patch``)."""
    st: LoRAState = self._peftfast
    grp = st.group
    if grp is not None and not args and not kwargs:
        # a sibling's call computed this output for the same input moments ago, after checking every member's plan
        out = grp.take(st.index, x)
        if out is not None:
            tally(st.tally_key, "fused_calls")
            return out
    plan = _plan(self, args, kwargs)
    if plan is None or isinstance(plan, str):
        if plan is None:
            tally(st.tally_key, "base_only_calls")
        else:
            tally(st.tally_key, "fallbacks", plan)
            zero3_late(self, st, _zero3_register_hook, plan)
        return call_original(self, st, x, *args, **kwargs)
    nf4 = nf4_mod.is_nf4_base(base_of(self))
    if plan.dora and torch.is_autocast_enabled(x.device.type):
        tally(st.tally_key, "fallbacks", "DoRA under autocast")
        return call_original(self, st, x, *args, **kwargs)
    if nf4:  # one layer at a time on the fused NF4 ops (never grouped)
        why = nf4_mod.call_reason(self, x)
        if why is not None:
            tally(st.tally_key, "fallbacks", why)
            return call_original(self, st, x, *args, **kwargs)
        tally(st.tally_key, "fused_calls")
        run = nf4_mod.run_dora if plan.dora else nf4_mod.run_lora
        return run(self, plan.adapter, plan.p, x, st.config.backend, st.name)
    _check_input(self, x)
    if plan.dora:
        tally(st.tally_key, "fused_calls")
        return _run_dora(self, plan, x, st)
    # counted through tally: a plain `+= 1` makes Dynamo guard on the value and recompile on every call
    tally(st.tally_key, "fused_calls")
    if grp is not None and st.config.group_siblings and st.zero3_params is None:
        grp.caller = st
        plans = _group_plans(grp, plan) if not grp.split else None
        if plans is not None:
            for m in grp.members:
                if m is not self:
                    _check_input(m, x)
            outs = _run(grp.members, plans, x, st.config.backend, st.name)
            return grp.put(st.index, x, outs)
    return _run([self], [plan], x, st.config.backend, st.name)[0]


def _zero3_register_hook(layer: nn.Module, args) -> None:
    """Forward pre-hook (first in line, see ``arm_zero3``): register the layer's partitioned parameters with DeepSpeed
    once, then remove itself."""
    # every call of every layer passes here until then: plain dict reads, not module getattr
    st = layer.__dict__.get("_peftfast")
    if st is None or st.zero3_params is not None:
        return
    base = layer._modules.get("base_layer")
    if base is None or not hasattr(base._parameters.get("weight"), "ds_id"):
        return
    if nf4_mod.is_nf4_base(base_of(layer)) or getattr(layer, "fan_in_fan_out", False):
        # Conv1D: the fused op would save a transposed view of the gathered weight, which outlives its gathering
        return
    zero3_registered(st, zero3_register(layer))


def install(layer: nn.Module, name: str, config: LoRAPatchConfig) -> None:
    """Bind the fused forward to ``layer`` (idempotent: a second call only updates the config)."""
    st = getattr(layer, "_peftfast", None)
    if st is not None:
        st.config = config
        return
    st = LoRAState(name=name, config=config, previous_forward=None)
    bind_forward(layer, "_peftfast", st, fused_lora_forward)
    arm_zero3(layer, st, _zero3_register_hook)


def uninstall(layer: nn.Module) -> None:
    """Restore the layer's forward exactly as it was before ``install``."""
    st = unbind_forward(layer, "_peftfast")
    if st is not None:
        zero3_detach(layer, st)
    if st is not None and st.group is not None:
        st.group.clear()
