"""Forward replacement for gated MLPs (Llama/Mistral/Qwen2/Qwen3/Gemma/Phi-3-style ``gate_proj``/``up_proj``/
``down_proj`` + ``act_fn``) whose three projections are patched PEFT LoRA layers: one fused LoRA-MLP op.

Calls the fused op cannot serve exactly (a disabled or merged adapter, several active adapters, autocast, extra
arguments, unequal gate/up ranks) run the module's own forward, which still uses the fused LoRA layers, and are
counted with their reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from peftfast.modules import lora as lora_mod
from peftfast.modules._bind import bind_forward, call_original, unbind_forward
from peftfast.modules._tally import Tallied, tally
from peftfast.ops.mlp import lora_mlp

_PROJ = ("gate_proj", "up_proj", "down_proj")


def gate_activation(act: nn.Module) -> str | None:
    """``silu`` / ``gelu`` / ``gelu_tanh`` for the activation modules transformers uses, else None."""
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if name in ("PytorchGELUTanh", "GELUTanh"):
        return "gelu_tanh"
    if name == "GELUActivation" and getattr(act, "act", None) is torch.nn.functional.gelu:
        return "gelu"
    return None


def is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, p, None), nn.Module) for p in _PROJ) and hasattr(module, "act_fn")


def why_not(module: nn.Module) -> str | None:
    """None if this gated MLP can run as one fused LoRA-MLP op (its projections already patched), else why not."""
    if not is_gated_mlp(module):
        return "not a gated MLP (gate_proj/up_proj/down_proj + act_fn)"
    missing = [p for p in _PROJ if getattr(getattr(module, p), "_peftfast", None) is None]
    if missing:
        return f"{', '.join(missing)} not patched fused LoRA layer(s)"
    if gate_activation(module.act_fn) is None:
        return f"activation {type(module.act_fn).__name__} is not SiLU/GELU"
    if module._forward_hooks or module._forward_pre_hooks:
        return "the MLP has forward hooks"
    return None


@dataclass
class MLPState(Tallied):
    name: str
    backend: str
    previous_forward: object | None
    recompute: bool = False  # backward runs the gate/up forward again instead of keeping g and u
    fused_calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)  # block-level reasons (the projections still run fused)
    deferred: Counter = field(default_factory=Counter)  # adapter states the LoRA layers themselves report


def _plan(module: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict):
    """The three projections' plans, or (kind, reason): kind "fallback" is a block-level reason, "defer" an
    adapter state (disabled, merged, several active) that the projections handle and report themselves."""
    if args or kwargs:
        return "fallback", "extra forward arguments"
    if torch.is_autocast_enabled(x.device.type):
        return "fallback", "autocast is on (the projections run one by one)"
    plans = []
    for p in _PROJ:
        layer = getattr(module, p)
        if getattr(layer, "_peftfast", None) is None:
            return "fallback", f"{p} is no longer patched"
        if layer._forward_hooks or layer._forward_pre_hooks:
            return "defer", f"{p} has forward hooks (e.g. PEFT's mixed-adapter batch)"
        pl = lora_mod._plan(layer, (), {})
        if pl is None:
            return "defer", f"{p}: adapter disabled, merged or inactive"
        if isinstance(pl, str):
            return "defer", f"{p}: {pl}"
        plans.append(pl)
    g, u, d = plans
    if (g.rank, g.p, g.lora_dtype) != (u.rank, u.p, u.lora_dtype):
        return "fallback", "gate/up LoRA rank, dropout or dtype differ"
    if not getattr(module.gate_proj._peftfast.config, "group_siblings", True):
        return "fallback", "group_siblings=False"
    return plans


def _proj(layer: nn.Module, plan) -> tuple:
    w, b, a, bm, lb, s = lora_mod._member_tensors(layer, plan)
    return w, b, a, bm, s, lb


def fused_mlp_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Drop-in ``forward`` for a gated MLP whose projections are patched LoRA layers (bound by ``patch``)."""
    st: MLPState = self._peftfast_mlp
    plans = _plan(self, x, args, kwargs)
    if isinstance(plans, tuple):
        kind, reason = plans
        if kind == "fallback":
            tally(st.tally_key, "fallbacks", reason)
        else:
            tally(st.tally_key, "deferred", reason)
        return call_original(self, st, x, *args, **kwargs)
    for p in ("gate_proj", "up_proj"):
        lora_mod._check_input(getattr(self, p), x)
    tally(st.tally_key, "fused_calls")  # not `+= 1`: see peftfast.modules._tally
    for p in _PROJ:  # the projections run fused too, inside the block op
        tally(getattr(self, p)._peftfast.tally_key, "fused_calls")
    gate, up, down = (_proj(getattr(self, n), pl) for n, pl in zip(_PROJ, plans))
    # the gate's dropout segment as in the layers' sibling group, so masks do not depend on fuse_mlp
    grp = self.gate_proj._peftfast.group
    seg = self.gate_proj._peftfast.index if grp is not None and self.up_proj in grp.members else 0
    return lora_mlp(x, gate, up, down, act=gate_activation(self.act_fn), dropout_p=plans[0].p,
                    down_dropout_p=plans[2].p, gate_segment=seg, recompute=st.recompute, backend=st.backend,
                    name=st.name)


def install(module: nn.Module, name: str, backend: str, recompute: bool = False) -> None:
    st = getattr(module, "_peftfast_mlp", None)
    if st is not None:
        st.backend, st.recompute = backend, recompute
        return
    bind_forward(module, "_peftfast_mlp", MLPState(name=name, backend=backend, previous_forward=None,
                                                   recompute=recompute), fused_mlp_forward)


def uninstall(module: nn.Module) -> None:
    unbind_forward(module, "_peftfast_mlp")
