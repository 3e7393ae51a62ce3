"""Forward replacement for mixture-of-experts stacks tuned with PEFT's ``LoraConfig(target_parameters=...)``.

transformers 5 keeps a MoE block's experts as 3-D parameters on one module (``MixtralExperts``, ``Qwen3MoeExperts``,
``OlmoeExperts``, DeepSeek's, ...: ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], ``act_fn``), called as
``experts(hidden_states, top_k_index, top_k_weights)``. PEFT adapts such a parameter with a ``ParamWrapper`` around
the module (one per targeted parameter, nested), which parametrizes the stack as ``W + s·B·A`` for each forward: a
merged copy of the whole stack per projection and layer, kept by the experts' matmuls for backward.

The outermost wrapper's forward is replaced by :func:`peftfast.ops.moe.experts_lora`, which reads the stacks and the
LoRA factors in place and keeps no merged weight (and, at ``recompute`` "up" or above, no gate/up output either).
Which classes compute ``Σ_k w·(down(glu(gate_up(x) + b_gu)) + b_d)`` is decided by a probe of the class's own forward
(its configured experts implementation) against the op on the module's weights, not by name. The gate is
``act(gate)·up`` over ``[gate | up]`` halves for classes with transformers' default ``_apply_gate``; for a class with
its own, gpt-oss's clamped SwiGLU (``alpha``/``limit`` attributes) on interleaved or halved columns, whichever the
probe finds the class computing (gpt-oss; the OpenAI privacy filter). Expert biases are read in place.
Calls the op cannot serve exactly (adapters disabled or merged, several active adapters on one stack, extra
arguments) run PEFT's forward and are counted. Under ``torch.compile`` the op is one traced node (registered with
fake kernels; the CPU path's per-expert host read stays inside it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from peftfast.modules._bind import (
    ZERO3_REASON,
    bind_forward,
    call_original,
    in_both_modes,
    unbind_forward,
    user_hooks,
    zero3_partitioned,
)
from peftfast.modules._tally import Tallied, tally
from peftfast.modules.mlp import gate_activation
from peftfast.ops._backend import resolve_backend
from peftfast.ops.moe import ExpertGate, ExpertStack, experts_lora

STACKS = ("gate_up_proj", "down_proj")


@dataclass
class ExpertsState(Tallied):
    name: str
    backend: str
    previous_forward: object | None
    recompute: bool = True  # backward runs the gate/up GEMMs again instead of keeping their output
    gate: ExpertGate = field(default_factory=ExpertGate)
    transposed: bool = False
    fused_calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)


_WRAPPER_CLS: list = []  # PEFT's ParamWrapper (or None), looked up once; a plain global, which Dynamo reads as a
# constant, where a functools.cache wrapper would be traced through with a warning on every compiled forward


def _wrapper_cls():
    if not _WRAPPER_CLS:
        try:
            from peft.tuners.lora.layer import ParamWrapper
        except Exception:  # an older PEFT without target_parameters
            ParamWrapper = None
        _WRAPPER_CLS.append(ParamWrapper)
    return _WRAPPER_CLS[0]


def is_param_wrapper(mod: nn.Module) -> bool:
    cls = _wrapper_cls()
    return cls is not None and isinstance(mod, cls)


def chain(mod: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The nested ``ParamWrapper`` s from ``mod`` inwards, and the module they wrap."""
    wrappers = []
    while is_param_wrapper(mod):
        wrappers.append(mod)
        mod = mod.base_layer
    return wrappers, mod


def roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost ``ParamWrapper`` of each wrapped module in ``model`` (the one its parent calls)."""
    inner = set()
    out = []
    for name, mod in model.named_modules():
        if is_param_wrapper(mod) and id(mod) not in inner:
            out.append((name, mod))
            inner.update(id(w) for w in chain(mod)[0][1:])
    return out


def is_experts(mod: nn.Module) -> bool:
    """Whether this wrapper chain adapts an experts module (a gate_up_proj/down_proj stack), not another parameter
    (a router's weight: PEFT's own path, reported among the LoRA layers)."""
    wrappers, base = chain(mod)
    return any(w.parameter_name in STACKS for w in wrappers) or any(
        isinstance(getattr(base, p, None), torch.Tensor) for p in STACKS)


def _flag(base: nn.Module, attr: str, default: bool) -> bool:
    return bool(getattr(base, attr, default))


def _apply_gate_is_default(base: nn.Module) -> bool:
    fn = getattr(type(base), "_apply_gate", None)
    if fn is None:
        return True
    try:
        from transformers.integrations.moe import _default_apply_gate
    except Exception:  # pragma: no cover - transformers without the experts interface has no _apply_gate either
        return False
    return fn is _default_apply_gate


def _layout(base: nn.Module) -> str | None:
    """Why the wrapped module is not a gated expert stack the op reads, or None."""
    cls = type(base).__name__
    gu, dn = getattr(base, "gate_up_proj", None), getattr(base, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor)):
        return f"{cls} has no gate_up_proj/down_proj parameter stacks (experts without a gate, or separate stacks)"
    if gu.is_meta or dn.is_meta:
        return f"{cls}: expert stacks are not materialised (meta tensors)"
    if zero3_partitioned(gu, dn):
        return f"expert stacks: {ZERO3_REASON}"
    if gu.dim() != 3 or dn.dim() != 3:
        return f"{cls}: gate_up_proj {tuple(gu.shape)} / down_proj {tuple(dn.shape)} are not 3-D expert stacks"
    transposed = _flag(base, "is_transposed", False)
    for p, w in (("gate_up_proj", gu), ("down_proj", dn)):
        b = _bias(base, p)
        want = (w.shape[0], w.shape[2] if transposed else w.shape[1])
        if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != want):
            return f"{cls}: {p}_bias is not an [E, out] = {want} tensor"
        if b is not None and (b.dtype != w.dtype or b.device != w.device or zero3_partitioned(b)):
            return f"{cls}: {p}_bias differs from its stack in dtype or device, or is partitioned"
    if _flag(base, "has_bias", False) and (_bias(base, "gate_up_proj") is None or _bias(base, "down_proj") is None):
        return f"{cls}: has_bias without gate_up_proj_bias/down_proj_bias tensors"
    if not _flag(base, "has_gate", True):
        return f"{cls}: ungated experts are not fused"
    if _flag(base, "has_post_expert_norm", False):
        return f"{cls}: a norm after each expert is not fused"
    if _flag(base, "_is_expert_parallel", False):
        return f"{cls}: expert parallelism (sentinel expert ids) is not fused"
    if not _gates(base):
        if _apply_gate_is_default(base):
            act = getattr(base, "act_fn", None)
            return f"{cls}: activation {type(act).__name__} is not SiLU/GELU"
        return f"{cls}: its own _apply_gate is neither act(gate)·up nor a clamped SwiGLU with alpha/limit"
    if len({gu.dtype, dn.dtype}) != 1 or gu.device != dn.device:
        return f"{cls}: gate_up_proj and down_proj differ in dtype or device"
    return None


def _bias(base: nn.Module, stack: str) -> torch.Tensor | None:
    return getattr(base, f"{stack}_bias", None)


def _gates(base: nn.Module) -> list[ExpertGate]:
    """The gates the op could compute for this class, most likely first; the probe keeps the one its forward
    computes. transformers' default ``_apply_gate`` is ``act_fn(gate)·up`` over halves; an own one with numeric
    ``alpha`` and ``limit`` (gpt-oss's clamped SwiGLU) may interleave or halve the columns."""
    if _apply_gate_is_default(base):
        act = gate_activation(getattr(base, "act_fn", None)) if getattr(base, "act_fn", None) is not None else None
        return [ExpertGate(act)] if act is not None else []
    alpha, limit = getattr(base, "alpha", None), getattr(base, "limit", None)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (alpha, limit)):
        return []
    interleaved = not _flag(base, "is_concatenated", True)
    return [ExpertGate("clamped_swiglu", interleaved=il, alpha=float(alpha), limit=float(limit))
            for il in (interleaved, not interleaved)]


def _adapter_reason(w: nn.Module) -> str | None:
    for name, a in w.lora_A.items():
        b = w.lora_B[name]
        if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
            return f"{w.parameter_name}: adapter {name!r} is not plain bias-free lora_A/lora_B"
        if type(w.lora_dropout[name]) is not nn.Identity:
            return f"{w.parameter_name}: adapter {name!r} has LoRA dropout"
        if (getattr(w, "lora_variant", None) or {}).get(name) is not None:
            return f"{w.parameter_name}: adapter {name!r} uses a LoRA variant"
        if user_hooks(a) or user_hooks(b):
            return f"{w.parameter_name}: adapter {name!r} has forward hooks"
    return None


def why_not(mod: nn.Module) -> str | None:
    """None if this outermost ``ParamWrapper`` (and those inside it) can run as one experts-LoRA op, else why not."""
    wrappers, base = chain(mod)
    if not wrappers:
        return "not a PEFT ParamWrapper"
    names = [w.parameter_name for w in wrappers]
    other = [n for n in names if n not in STACKS]
    if other:
        return f"LoRA on {type(base).__name__}.{'/'.join(other)}: only gate_up_proj/down_proj expert stacks are fused"
    if len(set(names)) != len(names):
        return "several ParamWrappers adapt one parameter"
    why = _layout(base)
    if why is not None:
        return why
    if any(user_hooks(m) for m in (*wrappers, base)):
        return "the experts module or its wrappers have forward hooks"
    for w in wrappers:
        why = _adapter_reason(w)
        if why is not None:
            return why
    found = probe(base)
    return found if isinstance(found, str) else None


def probe(base: nn.Module) -> ExpertGate | str:
    """:func:`probe_mode` in training mode and in eval mode: the gate both find, or why not."""
    train, evaluate = in_both_modes(base, lambda: probe_mode(base), base.gate_up_proj.device)
    if isinstance(evaluate, str):
        return evaluate
    if train != evaluate:
        return f"in training mode, {train}" if isinstance(train, str) else \
            f"{type(base).__name__}'s forward computes another gate in training mode than in eval mode"
    return evaluate


def probe_mode(base: nn.Module) -> ExpertGate | str:
    """The :class:`ExpertGate` with which the class's own forward (its configured experts implementation) computes
    ``Σ_k w_k · (down(glu(gate_up(x) + b_gu)) + b_d)`` on the module's own stacks and biases, as :func:`experts_lora`
    does; else why not. Four tokens, two routed experts each: a few expert products. For a clamped gate the last
    token is scaled so that its gate/up outputs pass the limit: the probe then tells the clamps (and the column
    layout) apart."""
    gu, dn = base.gate_up_proj, base.down_proj
    e = gu.shape[0]
    transposed = _flag(base, "is_transposed", False)
    hid = gu.shape[1] if transposed else gu.shape[2]
    gen = torch.Generator(device="cpu").manual_seed(0)
    k = min(2, e)
    x = torch.randn(4, hid, generator=gen).to(device=gu.device, dtype=gu.dtype)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(4)]).to(gu.device)
    wts = torch.rand(4, k, generator=gen).to(device=gu.device, dtype=gu.dtype)
    stacks = ExpertStack(gu, bias=_bias(base, "gate_up_proj")), ExpertStack(dn, bias=_bias(base, "down_proj"))
    cls = type(base).__name__
    why = f"{cls}'s forward computes something else than Σ w·down(glu(gate_up)) (biases included)"
    for gate in _gates(base):
        xp = x
        if gate.act == "clamped_swiglu":
            with torch.no_grad():
                w = gu[idx[-1, 0]]
                h = (x[-1:].float() @ (w.float() if transposed else w.float().t())).abs().max()
            if h > 0:
                xp = torch.cat([x[:-1], x[-1:] * (4 * gate.limit / h).to(x.dtype)])
        try:
            with torch.no_grad():
                want = type(base).forward(base, xp, idx, wts)
                got = experts_lora(xp, idx, wts, *stacks, act=gate, transposed=transposed, backend="torch")
        except Exception as exc:  # the class's code does something else (another signature or layout)
            return f"probe failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        if not isinstance(want, torch.Tensor) or want.shape != got.shape:
            return f"{cls}'s forward returns another shape than Σ w·down(glu(gate_up))"
        scale = want.float().abs().max().clamp_min(1e-30)
        tol = 1e-4 if gu.dtype in (torch.float32, torch.float64) else 3e-2
        if ((want.float() - got.float()).abs().max() / scale).item() <= tol:
            return gate
    return why


def install(mod: nn.Module, name: str, backend: str, *, recompute: bool = True) -> None:
    _, base = chain(mod)
    st = mod.__dict__.get("_peftfast_moe")
    if st is not None:
        st.backend, st.recompute = backend, recompute
        return
    gate = probe(base)
    if isinstance(gate, str):
        raise ValueError(f"peftfast: {name}: {gate}")  # why_not said yes: the module changed in between
    st = ExpertsState(name=name, backend=backend, previous_forward=None, recompute=recompute, gate=gate,
                      transposed=_flag(base, "is_transposed", False))
    bind_forward(mod, "_peftfast_moe", st, _forward)


def uninstall(mod: nn.Module) -> None:
    unbind_forward(mod, "_peftfast_moe")


def _factors(w: nn.Module) -> tuple | str | None:
    """(A, B, scaling) of the one active adapter of this wrapper, None when it adds nothing to this call, or why the
    op cannot serve it."""
    if w.disable_adapters or w.merged:
        return "adapters disabled or merged"
    active = [a for a in w.active_adapters if a in w.lora_A]
    if not active:
        return None
    if len(active) > 1:
        return f"{w.parameter_name}: {len(active)} active adapters (the op serves one)"
    a = active[0]
    return w.lora_A[a].weight, w.lora_B[a].weight, float(w.scaling[a])


def _forward(self: nn.Module, hidden_states=None, top_k_index=None, top_k_weights=None, *args, **kwargs):
    st: ExpertsState = self.__dict__["_peftfast_moe"]
    why = None
    if args or kwargs or hidden_states is None or top_k_index is None or top_k_weights is None:
        why = "extra forward arguments"
    wrappers, base = chain(self)
    stacks = {}
    if why is None:
        for w in wrappers:
            f = _factors(w)
            if isinstance(f, str):
                why = f
                break
            stacks[w.parameter_name] = f
    if why is None and not hasattr(base, "gate_up_proj"):
        why = "the wrapped module changed since patch"
    if why is not None:
        tally(st.tally_key, "fallbacks", why)
        return call_original(self, st, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    gu, dn = (ExpertStack(getattr(base, p), *(stacks.get(p) or ()), bias=_bias(base, p)) for p in STACKS)
    hid = hidden_states.shape[-1]
    dev = hidden_states.device
    cdt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else gu.weight.dtype
    if hidden_states.dtype != cdt and not torch.is_autocast_enabled(dev.type):
        raise TypeError(f"peftfast: {st.name}: input dtype {hidden_states.dtype} does not match the expert stacks' "
                        f"{cdt}")
    if dev != gu.weight.device:
        raise ValueError(f"peftfast: {st.name}: input is on {dev}, the expert stacks on {gu.weight.device}")
    backend = resolve_backend(st.backend, dev)
    tally(st.tally_key, "fused_calls")
    with torch.autocast(dev.type, enabled=False):
        out = experts_lora(hidden_states.reshape(-1, hid), top_k_index.reshape(-1, top_k_index.shape[-1]),
                           top_k_weights.reshape(-1, top_k_weights.shape[-1]), gu, dn, act=st.gate,
                           transposed=st.transposed, recompute=st.recompute, compute_dtype=cdt,
                           backend=backend, name=st.name)
    return out.reshape(hidden_states.shape)
