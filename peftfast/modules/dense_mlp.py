"""Forward replacements for two-layer MLPs, ``out = tail(down(act(up(x))))``, that keep only the pre-activation.

Two forms, found by attribute names and confirmed by a probe of the class's own code:

* one module (``mlp``): GPT-2 / GPT-Neo / GPTBigCode (``c_fc``, ``act``, ``c_proj``, tail ``dropout``), CLIP /
  SigLIP / Phi-2 / ViT-style vision MLPs (``fc1``, ``activation_fn``, ``fc2``), GPT-NeoX (``dense_h_to_4h``,
  ``act``, ``dense_4h_to_h``); the replacement is bound as the module's ``forward``;
* a BERT-style layer (``ffn``): ``intermediate.dense`` + ``intermediate.intermediate_act_fn``, then ``output(h,
  x)`` (dense, dropout, residual LayerNorm), as in BERT, RoBERTa, XLM-R, ELECTRA and their copies; the replacement
  is bound as the layer's ``feed_forward_chunk``, which the layer's forward calls (chunked or not);
* an ``intermediate`` module alone (``intermediate``: DeBERTa, Swin, VideoMAE, ViLT, whose layers call it and
  ``output`` inline): its ``forward`` registers ``h`` with the model's rebuild scope
  (``peftfast.ops.recompute.rebuild_scope``, opened around the layer stack by ``patch``), so ``output.dense``
  beside it keeps a recipe instead of ``h``;
* a whole layer that holds ``fc1`` / ``activation_fn`` / ``fc2`` beside its attention and computes them inline
  (``inline``: BART, mBART, Pegasus, Marian, Blenderbot, M2M100, Whisper, ...), or T5's feed-forward module
  (``wi`` or ``wi_0``/``wi_1``, ``act``, dropout, ``wo``: T5, mT5, UMT5, LongT5, Flan-T5): nothing of the module
  is replaced; the activation module's own ``forward`` becomes the same activation keeping only its input (T5
  v1.1's ``gelu_new`` is a chain of ops that keeps four copies), with its output registered with the rebuild
  scope, so whatever saves it (``fc2``; T5's gating product) keeps a recipe instead. No probe is needed: the layer's
  code runs as before, and a rebuilt ``h`` is the activation of the kept input, bit for bit (the scope checks that
  ``h`` was not modified in place).

The probe (at patch time, on the module itself): with each child swapped for a recording stub (distinct
non-linear element-wise maps), the class's own code must call each stub once, in the order
``up -> act -> down (-> tail)``, and return what that composition returns. No transformers source is copied or
compared: a class that computes anything else fails the probe and keeps its forward, with the reason in the report.

The projections and the tail run as modules (PEFT LoRA layers, patched or not, ``Conv1D``, hooks, ZeRO-3 gathering
all as before); only the activation changes: :func:`peftfast.ops.dense_mlp.dense_act` keeps just its input, and
the down projection's saved copy of ``h`` is rebuilt in backward (``recompute`` other than ``"none"``). Where
neither pays (a frozen down projection keeps no input, and a one-op GELU keeps only its input already), the MLP is
left alone with that reason.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from peftfast.modules._bind import bind_forward, first_reason, in_both_modes, unbind_forward, zero3_partitioned
from peftfast.modules._tally import Tallied, tally
from peftfast.modules.mlp import gate_activation
from peftfast.ops.dense_mlp import act_forward, dense_act, up_act_rerun
from peftfast.ops.recompute import rebuildable, rebuilding, why_not_rebuild, worth_rebuilding


@dataclass(frozen=True)
class Layout:
    """Where a two-layer MLP keeps its pieces: attribute names on the module (``kind="mlp"``), or on a BERT-style
    layer's ``intermediate`` (up, act) and the layer's ``output`` (``kind="ffn"``, down = ``output.dense``)."""

    kind: str
    up: str
    act: str
    down: str
    tail: str | None = None


MLP_LAYOUTS = (
    Layout("mlp", "c_fc", "act", "c_proj", "dropout"),
    Layout("mlp", "c_fc", "act", "c_proj"),
    Layout("mlp", "fc1", "activation_fn", "fc2"),
    Layout("mlp", "dense_h_to_4h", "act", "dense_4h_to_h"),
)
FFN_LAYOUT = Layout("ffn", "dense", "intermediate_act_fn", "output")
# an ``intermediate`` module alone (DeBERTa, Swin, VideoMAE, ViLT, YOLOS: the layer calls it and ``output`` inline):
# its output is registered with the model's rebuild scope, and ``output.dense`` beside it keeps a recipe
INTERMEDIATE_LAYOUT = Layout("intermediate", "dense", "intermediate_act_fn", "output.dense")
# the attribute names of a whole layer's attention: such a layer's fc1/activation_fn/fc2 are computed inline
_ATTENTION = ("self_attn", "attention", "attn", "encoder_attn")
# the activation forms transformers computes as chains of element-wise ops, each keeping its operands
_COMPOSITE = {"NewGELUActivation", "FastGELUActivation", "QuickGELUActivation"}


def dense_activation(act) -> str | None:
    """``gelu`` / ``gelu_tanh`` / ``silu`` / ``quick_gelu`` for the activations transformers' MLPs use, else None:
    the gated MLPs' (:func:`peftfast.modules.mlp.gate_activation`), the functions themselves, and the forms
    transformers computes as chains of ops."""
    if act is torch.nn.functional.gelu:
        return "gelu"
    if act is torch.nn.functional.silu:
        return "silu"
    known = gate_activation(act)
    if known is not None:
        return known
    name = type(act).__name__
    if name in ("NewGELUActivation", "FastGELUActivation"):
        return "gelu_tanh"  # the same tanh approximation as transformers' chain of ops
    if name == "GELUActivation" and getattr(getattr(act, "act", None), "__name__", "") == "_gelu_python":
        return "gelu"
    if name == "QuickGELUActivation":
        return "quick_gelu"
    return None


def _composite(act) -> bool:
    """The activation runs as several autograd ops (so keeps more than its input)."""
    inner = getattr(act, "act", None)
    return type(act).__name__ in _COMPOSITE or getattr(inner, "__name__", "") in ("_gelu_python", "_gelu_tanh_python")


def layouts_of(module: nn.Module) -> list[Layout]:
    """The two-layer MLP layouts whose attributes ``module`` has (not yet probed), most specific first."""
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    if isinstance(inter, nn.Module) and isinstance(out, nn.Module) and hasattr(type(module), "feed_forward_chunk") \
            and isinstance(getattr(inter, "dense", None), nn.Module) and hasattr(inter, "intermediate_act_fn") \
            and isinstance(getattr(out, "dense", None), nn.Module):
        return [FFN_LAYOUT]
    if isinstance(getattr(module, "dense", None), nn.Module) and hasattr(module, "intermediate_act_fn"):
        return [INTERMEDIATE_LAYOUT]
    found = [lay for lay in MLP_LAYOUTS
             if all(isinstance(getattr(module, a, None), nn.Module) for a in (lay.up, lay.down))
             and hasattr(module, lay.act)
             and (lay.tail is None or isinstance(getattr(module, lay.tail, None), nn.Module))]
    if found and any(isinstance(getattr(module, a, None), nn.Module) for a in _ATTENTION):
        return [Layout("inline", lay.up, lay.act, lay.down) for lay in found if lay.tail is None][:1]
    if not found and hasattr(module, "act") and isinstance(getattr(module, "wo", None), nn.Module):
        # T5's DenseActDense (wi) and DenseGatedActDense (wi_0 through the activation, times wi_1)
        up = next((a for a in ("wi_0", "wi") if isinstance(getattr(module, a, None), nn.Module)), None)
        return [Layout("inline", up, "act", "wo")] if up else []
    return found


def _parts(module: nn.Module, lay: Layout, consumer: nn.Module | None = None) -> tuple:
    """(up, act, the module the activation output goes to, the projection that reads it); for an ``intermediate``
    module the reader is ``consumer`` (its layer's ``output.dense``), called by the layer itself."""
    if lay.kind == "intermediate":
        return module.dense, module.intermediate_act_fn, None, consumer
    if lay.kind == "inline":
        down = getattr(module, lay.down)
        return getattr(module, lay.up), getattr(module, lay.act), down, down
    if lay.kind == "ffn":
        inter = module.intermediate
        return inter.dense, inter.intermediate_act_fn, module.output, module.output.dense
    down = getattr(module, lay.down)
    return getattr(module, lay.up), getattr(module, lay.act), down, down


@dataclass
class DenseMLPState(Tallied):
    name: str
    layout: Layout
    act: str  # one of peftfast.ops.dense_mlp.ACTS
    act_type: type
    rebuild: bool  # rebuild h in backward (patch(recompute=...) other than "none")
    previous_forward: object | None
    rerun: bool = False  # keep x, not the pre-activation: backward runs up again (recompute="up" or later)
    fused_calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    deferred: Counter = field(default_factory=Counter)


class _Stub(nn.Module):
    """Stands in for one piece during the probe: a fixed non-linear element-wise map that records its calls."""

    def __init__(self, tag: str, log: list, fn):
        super().__init__()
        self.tag, self.log, self.fn = tag, log, fn

    def forward(self, x, *rest):
        self.log.append((self.tag, x, rest))
        return self.fn(x, *rest)


_MAPS = {  # distinct maps, so that a different order or a missing piece changes the result
    "up": lambda x: x * 1.5 + 0.25,
    "act": lambda x: x * x + 0.5,
    "down": lambda x: x * -0.75 + 1.0,
    "tail": lambda x: x * 2.0 - 0.125,
    "output": lambda h, res: h * 0.5 + res * 3.0,
}


def probe(module: nn.Module, lay: Layout) -> str | None:
    """None when the class's own code computes ``tail(down(act(up(x))))`` (``output(act(up(x)), x)`` for a
    BERT-style layer) with each piece called once, in training mode and in eval mode, else why not (see the module
    docstring)."""
    up = _parts(module, lay)[0]
    w = next((p for p in up.parameters()), None)
    dev = w.device if w is not None and w.is_floating_point() else torch.device("cpu")
    if dev.type == "meta":
        return "meta-device weights (nothing to probe)"
    return first_reason(in_both_modes(module, lambda: _probe(module, lay, dev), dev))


def _probe(module: nn.Module, lay: Layout, dev: torch.device) -> str | None:
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)).to(device=dev, dtype=torch.float32)
    log: list = []
    if lay.kind == "intermediate":
        owners = [(module, "dense", "up"), (module, "intermediate_act_fn", "act")]
        run = functools.partial(type(module).forward, module)
        expect = _MAPS["act"](_MAPS["up"](x))
        order = ["up", "act"]
    elif lay.kind == "ffn":
        owners = [(module.intermediate, "dense", "up"), (module.intermediate, "intermediate_act_fn", "act"),
                  (module, "output", "output")]
        run = functools.partial(type(module).feed_forward_chunk, module)
        expect = _MAPS["output"](_MAPS["act"](_MAPS["up"](x)), x)
        order = ["up", "act", "output"]
    else:
        owners = [(module, lay.up, "up"), (module, lay.act, "act"), (module, lay.down, "down")]
        if lay.tail:
            owners.append((module, lay.tail, "tail"))
        run = functools.partial(type(module).forward, module)
        expect = _MAPS["down"](_MAPS["act"](_MAPS["up"](x)))
        if lay.tail:
            expect = _MAPS["tail"](expect)
        order = [o[2] for o in owners]
    saved = [(owner, attr, owner._modules.get(attr), owner.__dict__.get(attr)) for owner, attr, _ in owners]
    try:
        for owner, attr, tag in owners:
            owner.__dict__.pop(attr, None)
            owner._modules[attr] = _Stub(tag, log, _MAPS[tag])
        with torch.no_grad():
            got = run(x)
    except Exception as exc:  # the class's code does something a two-layer MLP does not
        return f"probe failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    finally:
        for owner, attr, mod, plain in saved:
            if mod is not None:
                owner._modules[attr] = mod
            else:
                owner._modules.pop(attr, None)
                if plain is not None:
                    owner.__dict__[attr] = plain
    if [t for t, _, _ in log] != order:
        return f"its code calls {'/'.join(t for t, _, _ in log) or 'nothing'}, not {' -> '.join(order)} once each"
    if not isinstance(got, torch.Tensor) or got.shape != expect.shape or not torch.allclose(got, expect):
        return "its code computes something else than a two-layer MLP"
    return None


def _layout_reason(module: nn.Module, lay: Layout, rebuild: bool, consumer: nn.Module | None,
                   scoped: bool, rerun: bool = False) -> str | None:
    _, act, _, down = _parts(module, lay, consumer)
    if dense_activation(act) is None:
        what = type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", type(act).__name__)
        return f"activation {what} is not GELU/SiLU/QuickGELU"
    if isinstance(act, nn.Module) and (act._forward_hooks or act._forward_pre_hooks):
        return "the activation has forward hooks"
    if lay.kind == "ffn" and (module.intermediate._forward_hooks or module.intermediate._forward_pre_hooks):
        return "intermediate has forward hooks"
    if lay.kind == "inline":
        if not isinstance(act, nn.Module):
            return (f"{lay.act} is a function, not a module: the inline {lay.up} -> {lay.act} -> {lay.down} of "
                    f"{type(module).__name__} has no forward to replace")
        if "forward" in act.__dict__ and not isinstance(act.__dict__.get("_peftfast_dense"), DenseMLPState):
            return f"{lay.act} has an instance-level forward of its own"
        rerun = False  # the module calls its up projection itself: nothing here can run it again in backward
    method = _method(lay)
    if lay.kind != "inline" and method in module.__dict__ and \
            not isinstance(module.__dict__.get("_peftfast_dense"), DenseMLPState):
        return f"the module has an instance-level {method} of its own"
    if lay.kind in ("intermediate", "inline"):
        if down is None:
            return "no output.dense beside it in its layer (the reader of its output is unknown)"
        rebuild = rebuild and scoped
    trains = any(p.requires_grad for p in down.parameters())
    if not _composite(act) and not (rebuild and trains) and not rerun:
        if not trains:
            why = "the frozen down projection keeps no input"
        elif lay.kind in ("intermediate", "inline") and scoped is False:
            why = (f"{'output.dense' if lay.kind == 'intermediate' else lay.down} keeps its input (no rebuild scope: "
                   "recompute='none' or not in a transformers model)")
        else:
            why = "recompute='none' keeps the down projection's input"
        return f"nothing to drop: {why}, and {type(act).__name__} keeps only its input already"
    return None if lay.kind == "inline" else probe(module, lay)


def find_layout(module: nn.Module, rebuild: bool = True, consumer: nn.Module | None = None,
                scoped: bool = False, rerun: bool = False) -> Layout | str:
    """The first layout of ``module`` that runs on the replacement and keeps less for it, else a one-line reason
    (that of the first candidate). ``consumer`` and ``scoped`` matter for an ``intermediate`` module only: the
    projection that reads its output, and whether the model runs in a rebuild scope; ``rerun``: the pre-activation
    is not kept either (``recompute="up"`` or a later setting)."""
    reasons = []
    for lay in layouts_of(module):
        why = _layout_reason(module, lay, rebuild, consumer, scoped, rerun)
        if why is None:
            return lay
        reasons.append(why)
    if not reasons:
        return "not a two-layer MLP (c_fc/c_proj, fc1/fc2, dense_h_to_4h/dense_4h_to_h, or intermediate/output)"
    return reasons[0]


def is_dense_mlp(module: nn.Module) -> bool:
    return bool(layouts_of(module))


def why_not(module: nn.Module, rebuild: bool = True, consumer: nn.Module | None = None,
            scoped: bool = False, rerun: bool = False) -> str | None:
    """None if this two-layer MLP runs on the replacement and keeps less for it, else a one-line reason."""
    lay = find_layout(module, rebuild, consumer, scoped, rerun)
    return lay if isinstance(lay, str) else None


def _call_reason(module: nn.Module, st: DenseMLPState, act) -> str | None:
    if type(act) is not st.act_type:
        return f"the activation is now a {type(act).__name__}"
    if isinstance(act, nn.Module) and (act._forward_hooks or act._forward_pre_hooks):
        return "the activation has forward hooks"
    return None


def _fall_back(self: nn.Module, st: DenseMLPState, reason: str, *args, **kwargs):
    """Count the reason, then run what was bound before (the class's method when nothing was)."""
    tally(st.tally_key, "fallbacks", reason)
    if st.previous_forward is not None:
        return st.previous_forward(*args, **kwargs)
    return getattr(type(self), _method(st.layout))(self, *args, **kwargs)


def dense_mlp_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Drop-in ``forward`` of a one-module two-layer MLP (bound by ``patch``)."""
    st: DenseMLPState = self._peftfast_dense
    lay = st.layout
    act = getattr(self, lay.act)
    reason = "extra forward arguments" if args or kwargs else _call_reason(self, st, act)
    if reason is not None:
        return _fall_back(self, st, reason, x, *args, **kwargs)
    tally(st.tally_key, "fused_calls")  # not `+= 1`: see peftfast.modules._tally
    out = _down(st, getattr(self, lay.up), x, getattr(self, lay.down))
    return getattr(self, lay.tail)(out) if lay.tail else out


def dense_ffn_chunk(self: nn.Module, attention_output: torch.Tensor) -> torch.Tensor:
    """Drop-in ``feed_forward_chunk`` of a BERT-style layer (bound by ``patch``)."""
    st: DenseMLPState = self._peftfast_dense
    inter = self.intermediate
    act = inter.intermediate_act_fn
    reason = _call_reason(self, st, act)
    if reason is None and (inter._forward_hooks or inter._forward_pre_hooks):
        reason = "intermediate has forward hooks"
    if reason is not None:
        return _fall_back(self, st, reason, attention_output)
    tally(st.tally_key, "fused_calls")
    return _down(st, inter.dense, attention_output, self.output, attention_output)


def dense_intermediate_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Drop-in ``forward`` of an ``intermediate`` module (``act(dense(x))``; bound by ``patch``): the activation
    keeps its input only, and its output is registered with the model's rebuild scope for ``output.dense``."""
    st: DenseMLPState = self._peftfast_dense
    act = self.intermediate_act_fn
    reason = "extra forward arguments" if args or kwargs else _call_reason(self, st, act)
    if reason is not None:
        return _fall_back(self, st, reason, x, *args, **kwargs)
    tally(st.tally_key, "fused_calls")
    if _reruns(st, self.dense, x):
        h, rerun = up_act_rerun(self.dense, x, st.act)
        rebuildable(h, rerun.rebuild_h, (x,))
        return h
    y = self.dense(x)
    h = dense_act(y, st.act)
    if st.rebuild:
        rebuildable(h, functools.partial(act_forward, act=st.act), (y,))
    return h


def dense_inline_act_forward(self: nn.Module, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Drop-in ``forward`` of the activation module of an ``inline`` layer (bound by ``patch``): the same activation,
    keeping ``y`` only, its output registered with the model's rebuild scope for the down projection."""
    st: DenseMLPState = self._peftfast_dense
    reason = "extra forward arguments" if args or kwargs else _call_reason(self, st, self)
    if reason is not None:
        return _fall_back(self, st, reason, y, *args, **kwargs)
    tally(st.tally_key, "fused_calls")
    h = dense_act(y, st.act)
    if st.rebuild:
        rebuildable(h, functools.partial(act_forward, act=st.act), (y,))
    return h


def _reruns(st: DenseMLPState, up: nn.Module, x: torch.Tensor) -> bool:
    """This call keeps ``x`` and runs ``up`` again in backward: ``recompute="up"`` or later, something upstream of ``h``
    needs a gradient, and saved tensors can be rebuilt here (not under torch.compile or activation checkpointing;
    not with DeepSpeed ZeRO-3 parameters either, whose fetch order a module run inside backward would change), and
    ``x`` is not small (``worth_rebuilding``)."""
    if not st.rerun or why_not_rebuild() is not None or not worth_rebuilding(x):
        return False
    params = list(up.parameters())
    return (x.requires_grad or any(p.requires_grad for p in params)) and not zero3_partitioned(*params)


def _down(st: DenseMLPState, up: nn.Module, x: torch.Tensor, down: nn.Module, *rest) -> torch.Tensor:
    """``down(act(up(x)), *rest)``: the activation keeps ``y = up(x)`` (with ``rerun``, ``x`` only), and what
    ``down`` saves of ``act(y)`` is rebuilt from it."""
    if _reruns(st, up, x):
        h, rerun = up_act_rerun(up, x, st.act)
        return rebuilding(h, rerun.rebuild_h, (x,), down, h, *rest)
    y = up(x)
    h = dense_act(y, st.act)
    if not st.rebuild:
        return down(h, *rest)
    return rebuilding(h, functools.partial(act_forward, act=st.act), (y,), down, h, *rest)


def _method(lay: Layout) -> str:
    return "feed_forward_chunk" if lay.kind == "ffn" else "forward"


def install(module: nn.Module, name: str, backend: str, rebuild: bool = True, consumer: nn.Module | None = None,
            scoped: bool = False, rerun: bool = False) -> None:
    """Bind the replacement (``why_not(module)`` must be None). ``backend`` is unused: the pieces are ATen ops and
    the projections' own paths."""
    uninstall(module)  # the layout found below may differ from the one bound before
    lay = find_layout(module, rebuild, consumer, scoped, rerun)
    if isinstance(lay, str):
        raise ValueError(f"peftfast: {name}: {lay}")
    act = _parts(module, lay, consumer)[1]
    if lay.kind in ("intermediate", "inline"):
        rebuild = rebuild and scoped
    state = DenseMLPState(name=name, layout=lay, act=dense_activation(act), act_type=type(act), rebuild=rebuild,
                          previous_forward=None, rerun=rerun and lay.kind != "inline")
    if lay.kind == "inline":  # the layer stays as it is: its activation module is the one bound
        bind_forward(act, "_peftfast_dense", state, dense_inline_act_forward)
        return
    fn = {"ffn": dense_ffn_chunk, "intermediate": dense_intermediate_forward}.get(lay.kind, dense_mlp_forward)
    bind_forward(module, "_peftfast_dense", state, fn, method=_method(lay))


def uninstall(module: nn.Module) -> bool:
    """Restore what ``install`` bound on ``module`` (or, for an ``inline`` layer, on its activation module)."""
    st = module.__dict__.get("_peftfast_dense")
    if not isinstance(st, DenseMLPState):
        inline = [lay for lay in layouts_of(module) if lay.kind == "inline"]
        act = getattr(module, inline[0].act, None) if inline else None
        return isinstance(act, nn.Module) and uninstall(act)
    unbind_forward(module, "_peftfast_dense", method=_method(st.layout))
    return True


__all__ = ["DenseMLPState", "Layout", "dense_activation", "find_layout", "install", "is_dense_mlp", "layouts_of",
           "probe", "uninstall", "why_not"]
