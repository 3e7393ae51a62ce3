"""Forward replacement for gated MLPs (Llama/Mistral/Qwen2/Qwen3/Gemma-style ``gate_proj``/``up_proj``/
``down_proj`` + ``act_fn``; LFM2's ``w1``/``w3``/``w2`` around a functional SiLU): one fused LoRA-MLP op where the
three projections are patched PEFT LoRA layers (the NF4 LoRA-MLP op where their bases are NF4), one frozen-MLP op
where all three are plain frozen ``nn.Linear`` (the base of a model tuned elsewhere: LoRA on the attention only,
prompt learning, bottleneck adapters).

Packed gated MLPs (Phi-3, GLM, GLM-4: one ``gate_up_proj`` of width 2·I, chunked into gate and up, then
``down_proj``; ModernBERT: ``Wi``, ``act``, ``drop``, ``Wo``) run the packed LoRA-MLP op where both projections are
patched LoRA layers. Which classes compute
``down(act(gate) · up)`` from ``[gate | up] = gate_up(x)`` is decided by a probe of the class's own code (its
children swapped for recording stubs, as for the two-layer MLPs of ``peftfast.modules.dense_mlp``), not by name.

Calls the fused op cannot serve exactly (a disabled or merged adapter, several active adapters, autocast, extra
arguments, unequal gate/up ranks; for a frozen MLP, projections that now train or carry hooks) run the module's
own forward, which still uses the fused LoRA layers, and are counted with their reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peftfast.modules import lora as lora_mod
from peftfast.modules import nf4 as nf4_mod
from peftfast.modules._bind import (
    ZERO3_REASON,
    arm_zero3,
    bind_forward,
    call_original,
    first_param_partitioned,
    first_reason,
    in_both_modes,
    unbind_forward,
    user_hooks,
    zero3_detach,
    zero3_late,
    zero3_partitioned,
    zero3_register,
    zero3_registered,
)
from peftfast.modules._tally import Tallied, tally
from peftfast.ops.mlp import dora_mlp, frozen_mlp, lora_mlp, lora_packed_mlp
from peftfast.ops.nf4 import nf4_dora_mlp, nf4_lora_mlp
from peftfast.ops.recompute import worth_rebuilding

_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GatedLayout:
    """The child names of a gated MLP ``down(act(gate(x)) · up(x))``; ``act`` the activation module's attribute, or
    None where the class's code applies a functional activation, which the probe finds (LFM2:
    ``w2(F.silu(w1(x)) * w3(x))``)."""

    gate: str
    up: str
    down: str
    act: str | None

    @property
    def projs(self) -> tuple[str, str, str]:
        return self.gate, self.up, self.down


GATED_LAYOUTS = (GatedLayout("gate_proj", "up_proj", "down_proj", "act_fn"),  # Llama and most decoders
                 GatedLayout("w1", "w3", "w2", None))  # LFM2
_FUNCTIONAL_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


@dataclass(frozen=True)
class PackedLayout:
    """The child names of a packed gated MLP: ``down(drop(act(g) · u))`` with ``[g | u] = gate_up(x)``; ``drop`` an
    ``nn.Dropout`` on the down projection's input (fused while it drops nothing: p 0 or eval mode)."""

    gate_up: str
    down: str
    acts: tuple[str, ...]
    drop: str | None = None

    @property
    def projs(self) -> tuple[str, str]:
        return self.gate_up, self.down


PACKED_LAYOUTS = (PackedLayout("gate_up_proj", "down_proj", ("activation_fn", "act_fn")),  # Phi-3, GLM, GLM-4
                  PackedLayout("Wi", "Wo", ("act",), "drop"))  # ModernBERT


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


def gated_layout(module: nn.Module) -> GatedLayout | None:
    """The first of :data:`GATED_LAYOUTS` whose children ``module`` has (the probe confirms what its code computes)."""
    mods = module._modules
    for lay in GATED_LAYOUTS:
        if all(isinstance(mods.get(p), nn.Module) for p in lay.projs) and (lay.act is None or hasattr(module, lay.act)):
            return lay
    return None


def is_gated_mlp(module: nn.Module) -> bool:
    return gated_layout(module) is not None


def gated_projs(module: nn.Module) -> tuple[str, str, str]:
    """The gate, up and down child names of a gated MLP (``is_gated_mlp``)."""
    return gated_layout(module).projs


def _gated_act(module: nn.Module, lay: GatedLayout) -> str | None:
    """The activation of a gated MLP: its module's (``gate_activation``), or the functional one its probe found."""
    if lay.act is not None:
        return gate_activation(getattr(module, lay.act))
    st = module.__dict__.get("_peftfast_mlp")
    return st.act if st is not None and st.act is not None else _probe_functional_act(module, lay)


def _projections_reason(module: nn.Module, projs: tuple, dora_ok: bool = False,
                        unpatched_note: str = "") -> str | None:
    """Why these projections cannot run inside one MLP op: not patched LoRA layers, or DoRA adapters (on some of
    them only, or on any where ``dora_ok`` is False: the packed MLP)."""
    missing = [p for p in projs if getattr(getattr(module, p), "_peftfast", None) is None]
    if missing:
        return f"{', '.join(missing)} not patched fused LoRA layer(s){unpatched_note}"
    dora = [p for p in projs if getattr(getattr(module, p), "lora_variant", None)]
    if dora and (not dora_ok or len(dora) != len(projs)):
        return f"{', '.join(dora)} carry DoRA adapters (fused layer by layer)"
    return None


def _act_reason(module: nn.Module, lay: GatedLayout) -> str | None:
    if lay.act is None:
        return None if _probe_functional_act(module, lay) is not None else \
            f"its code applies no SiLU/GELU between {lay.gate} and {lay.up} that the probe finds"
    act = getattr(module, lay.act)
    return None if gate_activation(act) is not None else f"activation {type(act).__name__} is not SiLU/GELU"


def why_not(module: nn.Module) -> str | None:
    """None if this gated MLP can run as one fused LoRA-MLP op (its projections already patched), else why not."""
    lay = gated_layout(module)
    if lay is None:
        return "not a gated MLP (gate_proj/up_proj/down_proj + act_fn, or w1/w3/w2)"
    why = _projections_reason(module, lay.projs, dora_ok=True)
    if why is not None:
        return why
    why = _act_reason(module, lay)
    if why is not None:
        return why
    if user_hooks(module, own=(_zero3_register_hook,)):
        return "the MLP has forward hooks"
    return probe_gated(module)


def packed_layout(module: nn.Module) -> PackedLayout | None:
    """The first of :data:`PACKED_LAYOUTS` whose children ``module`` has (the probe confirms what its code
    computes), else None."""
    if is_gated_mlp(module):
        return None
    for lay in PACKED_LAYOUTS:
        if all(isinstance(getattr(module, p, None), nn.Module) for p in lay.projs) and \
                _act_attr(module, lay) is not None and \
                (lay.drop is None or isinstance(getattr(module, lay.drop, None), nn.Module)):
            return lay
    return None


def _act_attr(module: nn.Module, lay: PackedLayout) -> str | None:
    return next((a for a in lay.acts if isinstance(getattr(module, a, None), nn.Module)), None)


def is_packed_gated_mlp(module: nn.Module) -> bool:
    """A packed gated MLP by its children's names (:data:`PACKED_LAYOUTS`)."""
    return packed_layout(module) is not None


class _Stub(nn.Module):
    def __init__(self, tag: str, log: list, fn):
        super().__init__()
        self.tag, self.log, self.fn = tag, log, fn

    def forward(self, x, *rest):
        self.log.append(self.tag)
        return self.fn(x)


def _run_stubbed(module: nn.Module, maps: dict, x: torch.Tensor, log: list):
    """The class's own forward on ``x`` with the children named in ``maps`` swapped for recording stubs."""
    saved = {a: module._modules.get(a) for a in maps}
    try:
        for a, fn in maps.items():
            module._modules[a] = _Stub(a, log, fn)
        with torch.no_grad():
            return type(module).forward(module, x)
    finally:
        for a, m in saved.items():
            module._modules[a] = m


_GATE_MAP, _UP_MAP, _ACT_MAP, _DOWN_MAP = (lambda x: x * 1.5 + 0.25, lambda x: x * x - 0.5, lambda x: x * x + 0.75,
                                          lambda x: x * -0.5 + 1.0)


def probe_gated(module: nn.Module) -> str | None:
    """None when the class's own code computes ``down(act(gate(x)) · up(x))``, each child called once, in training
    mode and in eval mode; else why not. Children named like Llama's do not make a Llama MLP: Seed-OSS drops out
    the output in training, Gemma 3n sparsifies the gate before its activation. The children are swapped for
    distinct non-linear element-wise stubs, so another formula changes the result."""
    lay = gated_layout(module)
    act = _gated_act(module, lay)
    return first_reason(in_both_modes(module, lambda: _probe_gated(module, lay, act)))


def _probe_functional_act(module: nn.Module, lay: GatedLayout) -> str | None:
    """The functional activation (``silu`` / ``gelu`` / ``gelu_tanh``) with which the class's code computes
    ``down(act(gate(x)) · up(x))``, the same in training and in eval mode; or None."""
    found = in_both_modes(module, lambda: next((a for a in _FUNCTIONAL_ACTS if _probe_gated(module, lay, a) is None),
                                               None))
    return found[1] if found[0] == found[1] else None


def _probe_gated(module: nn.Module, lay: GatedLayout, act: str | None) -> str | None:
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    maps = {lay.gate: _GATE_MAP, lay.up: _UP_MAP, lay.down: _DOWN_MAP}
    act_fn = _ACT_MAP
    if lay.act is not None:
        maps[lay.act] = _ACT_MAP
    elif act is None:
        return "no activation to probe"
    else:
        act_fn = _FUNCTIONAL_ACTS[act]
    expect = _DOWN_MAP(act_fn(_GATE_MAP(x)) * _UP_MAP(x))
    log: list = []
    try:
        got = _run_stubbed(module, maps, x, log)
    except Exception as exc:  # the class's code does something a gated MLP does not
        return f"probe failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    if sorted(log) != sorted(maps):
        return f"its code calls {'/'.join(log) or 'nothing'}, not {', '.join(maps)} once each"
    if not isinstance(got, torch.Tensor) or got.shape != expect.shape or not torch.allclose(got, expect):
        act_name = lay.act or act
        return f"its code computes something else than {lay.down}({act_name}({lay.gate}(x)) * {lay.up}(x))"
    return None


def probe_packed(module: nn.Module) -> str | None:
    """None when the class's own code computes ``down(act(g) · u)`` from ``[g | u] = gate_up(x)`` (the first half
    the gate; with the layout's dropout between, as the identity it is while it drops nothing), each child called
    once, in that order, in training mode and in eval mode; else why not. The children are swapped for stubs,
    distinct non-linear element-wise maps (gate_up: two of them side by side), so another order, another split or
    another formula changes the result."""
    return first_reason(in_both_modes(module, lambda: _probe_packed(module)))


def _probe_packed(module: nn.Module) -> str | None:
    lay = packed_layout(module)
    act_attr = _act_attr(module, lay)
    maps = {lay.gate_up: lambda x: torch.cat([x * 1.5 + 0.25, x * x - 0.5], dim=-1),
            act_attr: lambda x: x * x + 0.75}
    if lay.drop is not None:
        maps[lay.drop] = lambda x: x
    maps[lay.down] = lambda x: x * -0.5 + 1.0
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    gu = maps[lay.gate_up](x)
    expect = maps[lay.down](maps[act_attr](gu[..., :4]) * gu[..., 4:])
    log: list = []
    try:
        got = _run_stubbed(module, maps, x, log)
    except Exception as exc:  # the class's code does something a packed gated MLP does not
        return f"probe failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    order = list(maps)
    if log != order:
        return f"its code calls {'/'.join(log) or 'nothing'}, not {' -> '.join(order)} once each"
    if not isinstance(got, torch.Tensor) or got.shape != expect.shape or not torch.allclose(got, expect):
        return f"its code computes something else than {lay.down}(act(gate) * up) of [gate | up] = {lay.gate_up}(x)"
    return None


def why_not_packed(module: nn.Module) -> str | None:
    """None if this packed gated MLP can run as one packed LoRA-MLP op (both projections patched), else why not."""
    lay = packed_layout(module)
    if lay is None:
        return "not a packed gated MLP (gate_up_proj + activation + down_proj, or ModernBERT's Wi/act/drop/Wo)"
    why = _projections_reason(module, lay.projs, unpatched_note=" (a frozen packed MLP is not fused)")
    if why is not None:
        return why
    if any(nf4_mod.is_nf4_lora(getattr(module, p)) for p in lay.projs):
        return "NF4 bases: the packed projections run one by one on the NF4 op"
    act = getattr(module, _act_attr(module, lay))
    if gate_activation(act) is None:
        return f"activation {type(act).__name__} is not SiLU/GELU"
    if lay.drop is not None and type(getattr(module, lay.drop)) not in (nn.Dropout, nn.Identity):
        return f"{lay.drop} is a {type(getattr(module, lay.drop)).__name__}, not nn.Dropout"
    if user_hooks(module, own=(_zero3_register_hook,)):
        return "the MLP has forward hooks"
    return probe_packed(module)


def _frozen_reason(module: nn.Module, gathered: bool = True, projs: tuple | None = None) -> str | None:
    """Why the projections of a gated MLP are not plain frozen linears the frozen-MLP op can read, or None
    (``gathered``: ZeRO-3 partitioned projections are gathered for the op; see ``_zero3_register_hook``; ``projs``:
    their names where the caller has them)."""
    projs = projs or gated_projs(module)
    for p in projs:
        layer = getattr(module, p)
        if not isinstance(layer, nn.Linear) or type(layer).forward is not nn.Linear.forward:
            return f"{p} is a {type(layer).__name__}, not a plain nn.Linear"
        if user_hooks(layer):
            return f"{p} has forward hooks"
        params = [layer.weight, layer.bias]
        if any(t is not None and t.requires_grad for t in params):
            return f"{p} trains (requires_grad): the frozen-MLP op computes no weight gradients"
        if not gathered and zero3_partitioned(*params):
            return ZERO3_REASON
    if len({getattr(module, p).weight.dtype for p in projs}) != 1:
        return "gate/up/down weights differ in dtype"
    return None


def why_not_frozen(module: nn.Module) -> str | None:
    """None if this gated MLP of frozen ``nn.Linear`` projections can run as one frozen-MLP op, else why not."""
    lay = gated_layout(module)
    if lay is None:
        return "not a gated MLP (gate_proj/up_proj/down_proj + act_fn, or w1/w3/w2)"
    return _act_reason(module, lay) or _frozen_reason(module) or probe_gated(module)


@dataclass
class MLPState(Tallied):
    name: str
    backend: str
    previous_forward: object | None
    recompute: str = "none"  # what backward rebuilds instead of keeping (peftfast.ops.mlp.MLP_RECOMPUTE)
    frozen: bool = False  # plain frozen projections (the frozen-MLP op), not patched LoRA layers
    layout: PackedLayout | None = None  # a packed gated MLP's child names (the packed LoRA-MLP op), found at install
    gated: GatedLayout | None = None  # a gated MLP's child names, found at install
    act: str | None = None  # a gated MLP's activation where its code applies a functional one (found at install)
    fused_calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)  # block-level reasons (the projections still run fused)
    deferred: Counter = field(default_factory=Counter)  # adapter states the LoRA layers themselves report
    zero3_params: list | None = None  # the projections' parameters, registered with DeepSpeed on the MLP (ZeRO-3)
    zero3_hook: object | None = None

    @property
    def packed(self) -> bool:
        return self.layout is not None


def _plan(module: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, projs: tuple = _PROJ):
    """The projections' plans (``projs``: the three of a gated MLP, or gate_up/down of a packed one), or (kind,
    reason): kind "fallback" is a block-level reason, "defer" an adapter state (disabled, merged, several active)
    that the projections handle and report themselves."""
    packed = len(projs) == 2
    if args or kwargs:
        return "fallback", "extra forward arguments"
    mods = module._modules  # children read directly (nn.Module.__getattr__ is slow): this runs on every call
    nf4 = [nf4_mod.is_nf4_lora(mods[p]) if p in mods else False for p in projs]
    if any(nf4) and not all(nf4):
        return "fallback", "gate/up/down mix NF4 and other base weights"
    if not nf4[0] and torch.is_autocast_enabled(x.device.type):
        return "fallback", "autocast is on (the projections run one by one)"
    z3 = _partitioned(module)
    if z3 and module.__dict__["_peftfast_mlp"].zero3_params is None:  # DeepSpeed gathers them for each projection
        return "fallback", ZERO3_REASON
    plans = []
    for p in projs:
        layer = mods[p] if p in mods else getattr(module, p)
        if getattr(layer, "_peftfast", None) is None:
            return "fallback", f"{p} is no longer patched"
        if lora_mod.has_hooks(layer):
            return "defer", f"{p} has forward hooks (e.g. PEFT's mixed-adapter batch)"
        pl = lora_mod._plan(layer, (), {}, gathered=z3)
        if pl is None:
            return "defer", f"{p}: adapter disabled, merged or inactive"
        if isinstance(pl, str):
            return "defer", f"{p}: {pl}"
        if pl.dora and packed:
            return "defer", f"{p}: DoRA adapter (runs layer by layer)"
        if nf4[0] and (why := _nf4_call_reason(layer, x)) is not None:
            return "defer", f"{p}: {why}"
        plans.append(pl)
    if any(pl.dora for pl in plans):  # the DoRA MLP ops (dense or NF4): all three DoRA
        if not all(pl.dora for pl in plans):
            return "defer", "gate/up/down mix DoRA and plain LoRA adapters (they run layer by layer)"
        if nf4[0] and torch.is_autocast_enabled(x.device.type):
            return "defer", "DoRA under autocast (the layers run PEFT's forward)"
    if nf4[0] or packed:  # NF4: three NF4 LoRA ops chained; packed: no sibling group to agree with
        return plans
    g, u, d = plans
    if (g.rank, g.p, g.lora_dtype) != (u.rank, u.p, u.lora_dtype):
        return "fallback", "gate/up LoRA rank, dropout or dtype differ"
    if not getattr(mods[projs[0]]._peftfast.config, "group_siblings", True):
        return "fallback", "group_siblings=False"
    return plans


def _nf4_call_reason(layer: nn.Module, x: torch.Tensor) -> str | None:
    """Why this NF4 projection's own forward should serve the call (it then raises or falls back itself)."""
    why = nf4_mod.call_reason(layer, x)
    if why is None and not torch.is_autocast_enabled(x.device.type):
        cdt = nf4_mod.nf4_state(layer.get_base_layer())[3]
        if cdt is not None and x.dtype != cdt:
            why = f"input dtype {x.dtype} is not the NF4 compute dtype {cdt}"
    return why


def _nf4_proj(layer: nn.Module, plan, dtype: torch.dtype | None) -> tuple:
    """The projection as :func:`peftfast.ops.nf4.nf4_lora_mlp` takes it (float tensors cast to ``dtype`` when
    autocast is on, as the layer's own NF4 op does)."""
    base = layer.get_base_layer()
    q, am, bs, cdt = nf4_mod.nf4_state(base)
    a, b = layer.lora_A[plan.adapter], layer.lora_B[plan.adapter]
    bias, aw, bw, lb = (t if t is None or dtype is None else t.to(dtype)
                        for t in (base.bias, a.weight, b.weight, b.bias))
    if bias is not None and dtype is None and cdt is not None and bias.dtype != cdt:
        bias = bias.to(cdt)  # bitsandbytes adds its bias in the compute dtype (the input's: see _nf4_call_reason)
    return q, am, bs, bias, aw, bw, float(layer.scaling[plan.adapter]), lb, plan.p


def _nf4_dora_proj(layer: nn.Module, plan) -> tuple:
    """A QDoRA projection as :func:`peftfast.ops.nf4.nf4_dora_mlp` takes it (no autocast: the MLP defers then)."""
    q, am, bs, bias, aw, bw, scale, _, p = _nf4_proj(layer, plan, None)
    return q, am, bs, bias, aw, bw, scale, layer.lora_magnitude_vector[plan.adapter].weight, p


def _dora_proj(layer: nn.Module, plan) -> tuple:
    """``(W, b, A, B, scale, magnitude)`` of a DoRA projection, as :func:`peftfast.ops.mlp.dora_mlp` takes it (no LoRA
    bias: the DoRA path refuses one at patch time)."""
    w, b, a, bm, _, s = lora_mod._member_tensors(layer, plan)
    return w, b, a, bm, s, layer.lora_magnitude_vector[plan.adapter].weight


def _proj(layer: nn.Module, plan) -> tuple:
    w, b, a, bm, lb, s = lora_mod._member_tensors(layer, plan)
    return w, b, a, bm, s, lb


def fused_mlp_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Drop-in ``forward`` for a gated MLP whose projections are patched LoRA layers (bound by ``patch``)."""
    st: MLPState = self._peftfast_mlp
    lay = st.gated
    names = lay.projs
    act = gate_activation(getattr(self, lay.act)) if lay.act is not None else st.act
    plans = _plan(self, x, args, kwargs, names) if act is not None else ("fallback", "its activation changed")
    if isinstance(plans, tuple):
        kind, reason = plans
        if kind == "fallback":
            tally(st.tally_key, "fallbacks", reason)
        else:
            tally(st.tally_key, "deferred", reason)
        zero3_late(self, st, _zero3_register_hook, reason)
        return call_original(self, st, x, *args, **kwargs)
    mods = self._modules
    nf4 = nf4_mod.is_nf4_lora(mods[lay.gate])
    if not nf4:
        for p in (lay.gate, lay.up):
            lora_mod._check_input(mods[p], x)
    tally(st.tally_key, "fused_calls")  # not `+= 1`: see peftfast.modules._tally
    for p in names:  # the projections run fused too, inside the block op
        tally(mods[p]._peftfast.tally_key, "fused_calls")
    if nf4 and plans[0].dora:  # QDoRA: the NF4 DoRA MLP op
        projs = [_nf4_dora_proj(mods[n], pl) for n, pl in zip(names, plans)]
        return nf4_dora_mlp(x, *projs, act=act, recompute=_recompute(st, x), backend=st.backend, name=st.name)
    if nf4:
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        projs = [_nf4_proj(mods[n], pl, dt) for n, pl in zip(names, plans)]
        with torch.autocast(dev, enabled=False):
            return nf4_lora_mlp(x if dt is None else x.to(dt), *projs, act=act, recompute=_recompute(st, x),
                                backend=st.backend, name=st.name)
    if plans[0].dora:  # all three DoRA (_plan): the DoRA MLP op, gate/up masks as segments 0 and 1 of one seed
        projs = [_dora_proj(mods[n], pl) for n, pl in zip(names, plans)]
        return dora_mlp(x, *projs, act=act, dropout_p=plans[0].p, down_dropout_p=plans[2].p,
                        recompute=_recompute(st, x), backend=st.backend, name=st.name)
    gate, up, down = (_proj(mods[n], pl) for n, pl in zip(names, plans))
    # the gate's dropout segment as in the layers' sibling group, so masks do not depend on fuse_mlp
    gst = mods[lay.gate]._peftfast
    grp = gst.group
    seg = gst.index if grp is not None and mods[lay.up] in grp.members else 0
    return lora_mlp(x, gate, up, down, act=act, dropout_p=plans[0].p,
                    down_dropout_p=plans[2].p, gate_segment=seg, recompute=_recompute(st, x), backend=st.backend,
                    name=st.name)


def packed_mlp_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Drop-in ``forward`` for a packed gated MLP (``gate_up_proj``, Phi-3 / GLM; ModernBERT's ``Wi``/``Wo``) whose
    projections are patched LoRA layers (bound by ``patch``)."""
    st: MLPState = self._peftfast_mlp
    lay = st.layout
    drop = self._modules.get(lay.drop) if lay.drop is not None else None
    if any(p not in self._modules for p in lay.projs):
        plans = ("fallback", "its packed projections were removed")
    elif isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
        plans = ("fallback", f"{lay.drop} drops its input (p={drop.p}): the packed op has no dropout there")
    else:
        plans = _plan(self, x, args, kwargs, lay.projs)
    if isinstance(plans, tuple):
        kind, reason = plans
        tally(st.tally_key, "fallbacks" if kind == "fallback" else "deferred", reason)
        zero3_late(self, st, _zero3_register_hook, reason)
        return call_original(self, st, x, *args, **kwargs)
    lora_mod._check_input(getattr(self, lay.gate_up), x)
    tally(st.tally_key, "fused_calls")
    for p in lay.projs:
        tally(getattr(self, p)._peftfast.tally_key, "fused_calls")
    gate_up, down = (_proj(getattr(self, n), pl) for n, pl in zip(lay.projs, plans))
    act = gate_activation(getattr(self, _act_attr(self, lay)))
    return lora_packed_mlp(x, gate_up, down, act=act, dropout_p=plans[0].p, down_dropout_p=plans[1].p,
                           recompute=_recompute(st, x), backend=st.backend, name=st.name)


def _recompute(st: MLPState, x: torch.Tensor) -> str:
    """The MLP's recompute mode for this call: none where its input is small (``worth_rebuilding``)."""
    if st.recompute == "none" or torch.compiler.is_compiling() or worth_rebuilding(x):
        return st.recompute
    return "none"


def frozen_mlp_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Drop-in ``forward`` for a gated MLP of frozen ``nn.Linear`` projections (bound by ``patch``)."""
    st: MLPState = self._peftfast_mlp
    lay = st.gated
    act = gate_activation(getattr(self, lay.act)) if lay.act is not None else st.act
    reason = "extra forward arguments" if args or kwargs else \
        _frozen_reason(self, st.zero3_params is not None, lay.projs)
    gate = self._modules[lay.gate]
    if reason is None and act is None:
        reason = "its activation changed"
    if reason is None and x.shape[-1] != gate.in_features:
        reason = f"input has {x.shape[-1]} features, {lay.gate} expects {gate.in_features}"
    if reason is not None:
        tally(st.tally_key, "fallbacks", reason)
        zero3_late(self, st, _zero3_register_hook, reason)
        return call_original(self, st, x, *args, **kwargs)
    projs = [(self._modules[p].weight, self._modules[p].bias) for p in lay.projs]
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # what autocast does to each F.linear: every operand in the autocast dtype (act and mul then run in it too)
        dt = torch.get_autocast_dtype(dev)
        x = x.to(dt)
        projs = [(w.to(dt), b.to(dt) if b is not None else None) for w, b in projs]
        with torch.autocast(dev, enabled=False):
            out = frozen_mlp(x, *projs, act=act, recompute=_recompute(st, x), backend=st.backend, name=st.name)
    elif x.dtype != projs[0][0].dtype:
        tally(st.tally_key, "fallbacks", f"input dtype {x.dtype} differs from the weights' {projs[0][0].dtype}")
        return call_original(self, st, x)
    else:
        out = frozen_mlp(x, *projs, act=act, recompute=_recompute(st, x), backend=st.backend, name=st.name)
    tally(st.tally_key, "fused_calls")
    return out


def install(module: nn.Module, name: str, backend: str, recompute: str = "none", frozen: bool = False,
            packed: bool = False) -> None:
    st = getattr(module, "_peftfast_mlp", None)
    if st is not None and (st.frozen, st.packed) != (frozen, packed):  # its projections gained or lost LoRA
        uninstall(module)
        st = None
    if st is not None:
        st.backend, st.recompute = backend, recompute
        _zero3_register_hook(module, ())
        return
    gated = None if packed else gated_layout(module)
    st = MLPState(name=name, backend=backend, previous_forward=None, recompute=recompute, frozen=frozen,
                  layout=packed_layout(module) if packed else None, gated=gated,
                  act=_probe_functional_act(module, gated) if gated is not None and gated.act is None else None)
    forward = packed_mlp_forward if packed else frozen_mlp_forward if frozen else fused_mlp_forward
    bind_forward(module, "_peftfast_mlp", st, forward)
    arm_zero3(module, st, _zero3_register_hook)


def uninstall(module: nn.Module) -> None:
    st = unbind_forward(module, "_peftfast_mlp")
    if st is not None:
        zero3_detach(module, st)


def _projs_of(module: nn.Module) -> tuple:
    st = module.__dict__.get("_peftfast_mlp")
    lay = (st.layout or st.gated) if st is not None else (packed_layout(module) or gated_layout(module))
    return lay.projs if lay is not None else _PROJ


def _partitioned(module: nn.Module) -> bool:
    return any(first_param_partitioned(module._modules.get(p)) for p in _projs_of(module))


def _zero3_register_hook(module: nn.Module, args) -> None:
    """Forward pre-hook, first in line (``arm_zero3``): under ZeRO-3, register the three projections' parameters as
    DeepSpeed external parameters of the MLP once, before DeepSpeed's own pre-hook, so that the one op reading all
    three finds them gathered in its forward and backward (as a LoRA layer does for its children)."""
    st = module.__dict__.get("_peftfast_mlp")
    if st is None or st.zero3_params is not None or not _partitioned(module):
        return
    for p in _projs_of(module):
        layer = getattr(module, p)
        if getattr(layer, "fan_in_fan_out", False) or nf4_mod.is_nf4_lora(layer):
            return  # a transposed view or NF4 state would outlive the gathering: the projections run one by one
    zero3_registered(st, zero3_register(module))
