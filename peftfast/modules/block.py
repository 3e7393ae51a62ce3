"""Pre-norm decoder blocks: the residual add before the MLP's input RMSNorm runs inside that norm's op.

A block of the Llama form computes ``r = x + attn(norm_in(x)); out = r + mlp(norm_mlp(r))``, eagerly as an add
that writes ``r`` and a norm that reads it back. With the norms fused (``patch(fuse_norms=True)``), the patched
block forward calls ``add_rms_norm(attn_out, x)`` instead: one op (one kernel on a GPU) writes ``r`` and
``norm_mlp(r)``, so each layer's forward saves a pass over the hidden states and an op; what is saved for backward
does not change (``r`` and the row statistics, as the fused norm keeps).

Which blocks (``LAYOUTS``): modules whose children are exactly ``input_layernorm``, ``self_attn``, ``mlp`` and the
named pieces of one layout: the Llama form (Llama, Mistral, Qwen2/2.5/3, Gemma, GLM) with ``post_attention_layernorm``
before the MLP; Phi-3's, whose residual dropouts act on the attention and MLP outputs before each add
(``r = x + f(attn(..))``, ``out = r + g(mlp(..))``); the sandwich norms of Gemma 2/3 and GLM-4, a norm on each output
before its add. The MLP's input norm must be a fused RMSNorm; the class ``forward`` must pass a probe run at patch
time: with the attention, the MLP and the output pieces swapped for recording stubs (distinct affine maps), the
class's own forward and the fused one return the same tensor, call each piece once and hand the attention the same
arguments. An MLP that returns a pair whose first item the block adds (gpt-oss's ``hidden, router_scores``) is
probed as such when the plain form does not match, and the fused forward takes that item. No transformers source is
copied or compared: a change of the block in transformers fails the probe, and
the block then keeps its own forward, with the reason in the report. The output pieces run as the modules they are
(a dropout draws its mask from torch's RNG in the same order as the class forward; a norm runs its fused op).

Under DeepSpeed ZeRO-3 the fused forward reads the two norm weights outside their modules (the add+norm op; the
norms' rebuilds in backward), so the block registers those two as its own external parameters (a pre-hook first in
line, or its first partitioned call where DeepSpeed was imported after ``patch``), and DeepSpeed gathers them around
the block's forward and backward; the sublayers go on gathering their own.
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from peftfast.modules._bind import (
    CACHE_KWARGS,
    ZERO3_REASON,
    arm_zero3,
    bind_forward,
    call_original,
    deepspeed_imported,
    first_reason,
    in_both_modes,
    unbind_forward,
    zero3_detach,
    zero3_late,
    zero3_partitioned,
    zero3_register_params,
    zero3_registered,
)
from peftfast.modules._tally import Tallied, tally
from peftfast.modules.norm import rms_norm_forward
from peftfast.ops.norm import add_rms_norm
from peftfast.ops.recompute import rebuilding

CHILDREN = frozenset({"input_layernorm", "self_attn", "mlp"})
PARTITIONED_REASON = ("norm weights are already DeepSpeed ZeRO-3 partitioned (the patch-time probe needs them whole): "
                      "patch before deepspeed.initialize to fuse the block")


@dataclass(frozen=True)
class Layout:
    """Child names of one block layout: ``mlp_norm`` normalises the MLP's input (and joins the residual add);
    ``attn_out`` / ``mlp_out`` (or None) act on the attention / MLP output before its residual add."""

    mlp_norm: str
    attn_out: str | None = None
    mlp_out: str | None = None

    def names(self) -> frozenset[str]:
        return frozenset(n for n in (self.mlp_norm, self.attn_out, self.mlp_out) if n is not None)


LAYOUTS = (
    Layout("post_attention_layernorm"),  # Llama, Mistral, Qwen2/2.5/3, Gemma, GLM
    Layout("post_attention_layernorm", "resid_attn_dropout", "resid_mlp_dropout"),  # Phi-3
    Layout("pre_feedforward_layernorm", "post_attention_layernorm", "post_feedforward_layernorm"),  # Gemma 2/3
    Layout("post_attention_layernorm", "post_self_attn_layernorm", "post_mlp_layernorm"),  # GLM-4
)


def layout_of(module: nn.Module) -> Layout | None:
    """The layout whose children ``module`` has exactly (peftfast's adapters aside), or None."""
    children = {n for n, _ in module.named_children()} - {"peftfast_adapters"}
    for lay in LAYOUTS:
        if children == CHILDREN | lay.names():
            return lay
    return None


@dataclass
class BlockState(Tallied):
    """What ``install`` keeps on a patched block (``module._peftfast_block``)."""

    name: str
    backend: str
    previous_forward: object | None
    defaults: dict  # the class forward's keyword defaults, handed to the attention as the forward itself does
    required: tuple[str, ...]  # its parameters without a default (besides hidden_states)
    layout: Layout = LAYOUTS[0]
    rebuild_norms: bool = True  # backward rebuilds the two norm outputs instead of their consumers keeping them
    mlp_pair: bool = False  # the MLP returns (hidden, extra), and the block adds the first (gpt-oss)
    fused_calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    zero3_params: list | None = None  # the two norm weights, registered with DeepSpeed on the block (ZeRO-3)
    zero3_hook: object | None = None


def is_block(module: nn.Module) -> bool:
    """A decoder block with the pre-norm layout's two norms (reported fused or not, with the reason)."""
    children = {n for n, _ in module.named_children()}
    return {"input_layernorm", "post_attention_layernorm"} <= children


def _signature(cls: type) -> tuple[dict, tuple[str, ...]] | str:
    """(keyword defaults, required names) of ``cls.forward`` after ``hidden_states``; or why it does not fit."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return "forward signature unavailable"
    if not params or params[0].name != "hidden_states":
        return "forward's first argument is not hidden_states"
    defaults, required = {}, []
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            required.append(p.name)
        else:
            defaults[p.name] = p.default
    return defaults, tuple(required)


def _checkpoints_class_forward(module: nn.Module) -> bool:
    """True when transformers checkpoints the layer by wrapping its class ``forward`` (transformers >= 5.2x), which
    an instance-level forward bypasses; older versions wrap ``__call__``, around any forward."""
    code = getattr(type(module).forward, "__code__", None)  # functools.wraps renames the wrapper, not its code
    return code is not None and code.co_name == "forward_with_checkpointing"


def fused_block_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Drop-in ``forward`` of a pre-norm decoder block (bound to the instance by ``patch``)."""
    st: BlockState = self._peftfast_block
    post = self._modules[st.layout.mlp_norm]
    nst = post.__dict__.get("_peftfast_norm")
    if args or nst is None or nst.kind != "rms" or any(r not in kwargs for r in st.required):
        tally(st.tally_key, "fallbacks", "positional arguments or the MLP's input norm is not fused")
        return call_original(self, st, hidden_states, *args, **kwargs)
    if st.zero3_params is None and deepspeed_imported() and \
            zero3_partitioned(post.weight, self._modules["input_layernorm"].weight):
        # the add+norm op reads the MLP norm's weight outside its module, and the rebuilt norm outputs read both
        # norms' weights in backward: ZeRO-3 gathers them for the block only once they are registered on it
        tally(st.tally_key, "fallbacks", ZERO3_REASON)
        zero3_late(self, st, _zero3_register_hook, ZERO3_REASON)
        return call_original(self, st, hidden_states, *args, **kwargs)
    if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled() and \
            _checkpoints_class_forward(self):
        # what transformers' checkpointing wrapper does around the class forward, here around the fused one: no
        # cache writes in a region that is recomputed, then the layer's own checkpoint function (without grad mode
        # there is no backward to replay, so the block runs as is, cache included, as transformers' wrapper does)
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if not getattr(self, "_can_checkpoint_with_cache", False):
            for name in CACHE_KWARGS:
                if kwargs.get(name) is not None:
                    kwargs[name] = None
        return self._gradient_checkpointing_func(functools.partial(_fused_body, self, **kwargs), hidden_states)
    return _fused_body(self, hidden_states, **kwargs)


def _fused_body(self: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    st: BlockState = self._peftfast_block
    lay = st.layout
    post = self._modules[lay.mlp_norm]
    nst = post._peftfast_norm
    residual = hidden_states
    h = self.input_layernorm(hidden_states)
    # every argument of the block goes to the attention by name, defaults included, as the block's own forward does
    attn_kwargs = {**st.defaults, **kwargs}
    ist = self.input_layernorm.__dict__.get("_peftfast_norm")
    if st.rebuild_norms and ist is not None and ist.kind == "rms":
        # the q/k/v projections keep no copy of the normed input: backward rebuilds it from the block input, which
        # the norm keeps anyway (with recompute="attn", the attention's rerun of q/k/v starts from that rebuild)
        rebuild = functools.partial(rms_norm_forward, self.input_layernorm)
        h = rebuilding(h, rebuild, (hidden_states,), self.self_attn, hidden_states=h, **attn_kwargs)[0]
    else:
        h = self.self_attn(hidden_states=h, **attn_kwargs)[0]
    if lay.attn_out is not None:
        h = self._modules[lay.attn_out](h)
    mlp_out = self._modules[lay.mlp_out] if lay.mlp_out is not None else None
    if h.shape != residual.shape or h.dtype != residual.dtype:
        tally(st.tally_key, "fallbacks", "attention output and residual differ in shape or dtype")
        r = residual + h
        m = self.mlp(post(r))
        m = m[0] if st.mlp_pair else m
        return r + (mlp_out(m) if mlp_out is not None else m)
    normed, r = add_rms_norm(h, residual, post.weight, getattr(post, nst.eps_attr), form=nst.form,
                             backend=nst.backend, name=nst.name)
    tally(st.tally_key, "fused_calls")
    if st.rebuild_norms:
        # likewise for the MLP's input, rebuilt from r (the norm op's saved input): add_rms_norm normalises the h it
        # writes exactly as the norm module's own rms_norm does
        m = rebuilding(normed, functools.partial(rms_norm_forward, post), (r,), self.mlp, normed)
    else:
        m = self.mlp(normed)
    m = m[0] if st.mlp_pair else m
    return r + (mlp_out(m) if mlp_out is not None else m)


class _Stub(nn.Module):
    """Stands in for the attention / MLP during the probe: a fixed affine map that records its arguments."""

    def __init__(self, mul: float, add: float, pair: bool):
        super().__init__()
        self.mul, self.add, self.pair, self.calls = mul, add, pair, []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out = x * self.mul + self.add
        return (out, None) if self.pair else out


def _same_call(a, b) -> bool:
    (args_a, kw_a), (args_b, kw_b) = a, b
    if len(args_a) != len(args_b) or kw_a.keys() != kw_b.keys():
        return False
    for k in kw_a:
        if k == "hidden_states":
            continue
        va, vb = kw_a[k], kw_b[k]
        if va is not vb and not (isinstance(va, (int, float, bool, str, type(None))) and va == vb):
            return False
    return True


def probe(module: nn.Module, defaults: dict, required: tuple[str, ...], layout: Layout = LAYOUTS[0],
          mlp_pair: bool = False) -> str | None:
    """None when the fused forward reproduces the class forward on ``module`` (see the module docstring), the MLP
    returning a ``(hidden, None)`` pair where ``mlp_pair``, in training mode and in eval mode."""
    w = module._modules[layout.mlp_norm].weight
    return first_reason(in_both_modes(module, lambda: _probe(module, defaults, required, layout, mlp_pair), w.device))


def _probe(module: nn.Module, defaults: dict, required: tuple[str, ...], layout: Layout, mlp_pair: bool
           ) -> str | None:
    post = module._modules[layout.mlp_norm]
    w = post.weight
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 3, w.shape[-1], generator=gen).to(device=w.device, dtype=w.dtype)
    token = object()  # an opaque extra argument: both forwards must pass it on untouched
    kwargs = {name: token for name in required}
    for name in defaults:
        kwargs[name] = token
    kwargs["peftfast_probe_extra"] = token
    sig = inspect.signature(type(module).forward)
    if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        kwargs.pop("peftfast_probe_extra")
    saved = dict(module._modules)
    had_state = "_peftfast_block" in module.__dict__
    if not had_state:  # the fused forward reads its state; a throwaway one for the probe
        module.__dict__["_peftfast_block"] = BlockState(name="probe", backend="auto", previous_forward=None,
                                                        defaults=defaults, required=required, layout=layout)
    st = module.__dict__["_peftfast_block"]
    pair_before, st.mlp_pair = st.mlp_pair, mlp_pair
    outs, calls = [], []
    try:
        for fn in (lambda: type(module).forward(module, x, **kwargs), lambda: fused_block_forward(module, x, **kwargs)):
            attn, mlp = _Stub(0.5, 0.25, True), _Stub(2.0, -1.0, mlp_pair)
            module._modules["self_attn"], module._modules["mlp"] = attn, mlp
            # the output pieces (dropouts, sandwich norms): distinct affine maps, so the probe sees where each acts
            outer = {n: _Stub(mul, add, False) for n, mul, add in ((layout.attn_out, 1.5, 0.125),
                                                                    (layout.mlp_out, 0.75, -0.5)) if n is not None}
            module._modules.update(outer)
            with torch.no_grad():
                outs.append(fn())
            calls.append((attn.calls, mlp.calls, [s.calls for s in outer.values()]))
    except Exception as exc:  # the class forward does something the fused one does not
        return f"probe failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    finally:
        module._modules.clear()
        module._modules.update(saved)
        st.mlp_pair = pair_before
        if not had_state:
            module.__dict__.pop("_peftfast_block", None)
    ref, got = outs
    if not isinstance(ref, torch.Tensor) or not isinstance(got, torch.Tensor) or ref.shape != got.shape:
        return "the block's forward does not return one tensor like the fused one"
    tol = 8 * torch.finfo(w.dtype).eps * max(1.0, ref.abs().max().item())
    if (ref.float() - got.float()).abs().max().item() > tol:
        return "the block's forward computes something else than r = x + attn(norm(x)); r + mlp(norm(r))"
    (attn_ref, mlp_ref, outer_ref), (attn_got, mlp_got, outer_got) = calls
    if len(attn_ref) != 1 or len(attn_got) != 1 or len(mlp_ref) != 1 or len(mlp_got) != 1:
        return "the block calls its attention or MLP other than once"
    if any(len(c) != 1 for c in (*outer_ref, *outer_got)):
        return f"the block calls {layout.attn_out} or {layout.mlp_out} other than once"
    if not _same_call(attn_ref[0], attn_got[0]):
        return "the block hands its attention other arguments than all of its own"
    return None


def why_not(module: nn.Module) -> str | None:
    """None if the block can run fused, else a one-line reason (computed once per module; probes its class)."""
    # peftfast's bottleneck adapters live beside the sublayers and act through forward hooks on the attention and
    # the MLP, which the fused forward calls as modules (hooks included), as the class forward does
    lay = layout_of(module)
    if lay is None:
        children = {n for n, _ in module.named_children()} - {"peftfast_adapters"}
        base = CHILDREN | LAYOUTS[0].names()
        extra = ", ".join(sorted(children - base)) or "none"
        missing = ", ".join(sorted(base - children)) or "none"
        return (f"block layout differs from input_layernorm/self_attn/post_attention_layernorm/mlp (extra: {extra}; "
                f"missing: {missing}) and from the Phi-3, Gemma 2/3 and GLM-4 layouts: its residual adds stay "
                "unfused")
    mlp_norm = module._modules[lay.mlp_norm]
    nst = mlp_norm.__dict__.get("_peftfast_norm")
    if nst is None or nst.kind != "rms":
        return f"{lay.mlp_norm} is not a fused RMSNorm"
    if nst.form == "t5":  # its output dtype follows the weight's: the fused add + norm keeps the input's
        return f"{lay.mlp_norm} has T5's form: the residual adds stay unfused"
    if zero3_partitioned(mlp_norm.weight, module.input_layernorm.weight):
        return PARTITIONED_REASON
    sig = _signature(type(module))
    if isinstance(sig, str):
        return sig
    found = _mlp_form(module, sig, lay)
    return found if isinstance(found, str) else None


def _mlp_form(module: nn.Module, sig: tuple[dict, tuple[str, ...]], lay: Layout) -> bool | str:
    """Whether the block's MLP is probed to return a pair (False: a tensor), or why neither form matches (the plain
    form's reason)."""
    why = probe(module, *sig, lay)
    if why is None:
        return False
    return True if probe(module, *sig, lay, mlp_pair=True) is None else why


def install(module: nn.Module, name: str, backend: str, rebuild_norms: bool = True) -> None:
    st = module.__dict__.get("_peftfast_block")
    if isinstance(st, BlockState):
        st.backend, st.rebuild_norms = backend, rebuild_norms
        return
    defaults, required = _signature(type(module))
    lay = layout_of(module)
    bind_forward(module, "_peftfast_block", BlockState(name=name, backend=backend, previous_forward=None,
                                                       defaults=defaults, required=required, layout=lay,
                                                       rebuild_norms=rebuild_norms,
                                                       mlp_pair=_mlp_form(module, (defaults, required), lay) is True),
                 fused_block_forward)
    arm_zero3(module, module.__dict__["_peftfast_block"], _zero3_register_hook)


def _zero3_register_hook(module: nn.Module, args) -> None:
    """Forward pre-hook, first in line (``arm_zero3``): under ZeRO-3, register the two norm weights the fused
    forward reads outside their modules (the add+norm op's, and both norms' in backward's rebuilds) as DeepSpeed
    external parameters of the block, once, so DeepSpeed gathers them around the block's forward and backward. Only
    those two: the sublayers keep gathering their own parameters around their own calls."""
    st = module.__dict__.get("_peftfast_block")
    if st is None or st.zero3_params is not None or not deepspeed_imported():
        return
    norms = [module._modules.get("input_layernorm"), module._modules.get(st.layout.mlp_norm)]
    weights = [n._parameters.get("weight") for n in norms if n is not None]
    if not any(hasattr(w, "ds_id") for w in weights):
        return
    zero3_registered(st, zero3_register_params(module, weights))


def uninstall(module: nn.Module) -> bool:
    st = module.__dict__.get("_peftfast_block")
    if not isinstance(st, BlockState):
        return False
    unbind_forward(module, "_peftfast_block")
    zero3_detach(module, st)
    return True


__all__ = ["LAYOUTS", "BlockState", "Layout", "fused_block_forward", "install", "is_block", "layout_of", "probe",
           "uninstall", "why_not"]
