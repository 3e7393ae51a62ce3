"""Forward replacements for Hugging Face RMSNorm modules and ``nn.LayerNorm``, and the check of which ones qualify.

An RMSNorm class is recognised by its name (``*RMSNorm``, also ``*LayerNorm`` classes that are RMS norms, such as
T5's) and accepted only when its ``forward`` (with ``_norm``, which Gemma's calls) is, after removing docstrings,
annotations and the argument's name, the source of a form the fused op reproduces exactly:

    "llama"  LlamaRMSNorm and its copies (Mistral, Qwen2/3, Phi-3, ... 140 classes in transformers 5), Llama-4
    "gemma"  GemmaRMSNorm and its copies (Gemma 2/3, Qwen3-Next, ...)
    "olmo2"  Olmo2RMSNorm / GPT-OSS ``(weight * h).to(input_dtype)`` and Helium's ``weight.to(float32)`` spelling
    "t5"     T5LayerNorm and its copies (mT5, UMT5, LongT5, Pix2Struct, ...): it casts the normalised input to the
             weight's dtype where the llama form casts to the input's, so it is the llama form whenever input and
             weight share a dtype (a bf16 model, or fp32 weights with an fp32 residual stream under autocast);
             calls that mix dtypes run the module's own forward
    "cohere" CohereLayerNorm (Cohere, Cohere 2: Command R, Aya): a LayerNorm without bias computed in fp32 and cast
             back to the input's dtype, which is what the layer-norm op computes (fp32 statistics, the weight upcast);
             eager keeps fp32 copies of its input for backward, the op the input and two fp32 row statistics

Anything else (Gemma-3n's ``pow(-0.5)`` with an optional scale, norms with a gate
argument or grouped statistics) is skipped with its reason rather than guessed.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftfast.modules._bind import bind_forward, call_original, unbind_forward, zero3_partitioned
from peftfast.ops.norm import SUPPORTED_DTYPES, layer_norm, rms_norm
from peftfast.ops.recompute import rebuild_scope, rebuildable, worth_rebuilding

__all__ = ["NormState", "ScopeState", "cohere_norm_forward", "install", "install_scope", "is_norm",
           "layer_norm_forward", "rms_form", "rms_norm_forward", "uninstall", "uninstall_scope", "why_not"]

_EPS = "EPS"  # placeholder for ``self.eps`` / ``self.variance_epsilon`` in the canonical sources
_ARG = "x"
# canonical sources (normalised as ``_normalise`` does); the key of each is the form the op implements
_KNOWN_SOURCES: dict[str, tuple[str, ...]] = {
    "llama": ("""
def forward(self, x):
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + self.EPS)
    return self.weight * x.to(input_dtype)
""", """
def forward(self, x):
    output = self._norm(x.float()).type_as(x)
    return output * self.weight
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.EPS)
"""),
    "gemma": ("""
def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.EPS)
""",),
    "olmo2": ("""
def forward(self, x):
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + self.EPS)
    return (self.weight * x).to(input_dtype)
""", """
def forward(self, x):
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + self.EPS)
    return (self.weight.to(torch.float32) * x).to(input_dtype)
""", """
def forward(self, x):
    output = self._norm(x.float())
    output = output * self.weight.float()
    return output.type_as(x)
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.EPS)
"""),
    # a LayerNorm without bias in fp32, cast back to the input's dtype: runs on the layer-norm op (kind "layer")
    "cohere": ("""
def forward(self, x):
    input_dtype = x.dtype
    x = x.to(torch.float32)
    mean = x.mean(-1, keepdim=True)
    variance = (x - mean).pow(2).mean(-1, keepdim=True)
    x = (x - mean) * torch.rsqrt(variance + self.EPS)
    x = self.weight.to(torch.float32) * x
    return x.to(input_dtype)
""",),
    "t5": ("""
def forward(self, x):
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + self.EPS)
    if self.weight.dtype in [torch.float16, torch.bfloat16]:
        x = x.to(self.weight.dtype)
    return self.weight * x
""",),
}


@dataclass
class NormState:
    """What ``install_norms`` recorded on a patched norm module (``module._peftfast_norm``)."""

    name: str
    backend: str
    kind: str  # "rms" or "layer"
    form: str | None  # the RMSNorm form; None for LayerNorm
    eps_attr: str
    previous_forward: object | None
    # register the output with the model's rebuild scope: consumers outside a fused block (the next layer's q/k/v in
    # BERT/GPT-2, an unfused block's attention or MLP) then keep no copy of it; backward reruns the norm
    rebuild: bool = False


class _Normaliser(ast.NodeTransformer):
    """Strips docstrings and annotations, renames the input argument to ``x`` and the eps attribute to ``EPS``
    (comments and layout are gone with the round trip through the AST)."""

    def __init__(self) -> None:
        self.arg: str | None = None
        self.eps_attrs: set[str] = set()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        # decorators are kept: one could change what forward computes, so a decorated forward matches no form
        node.returns = None
        for a in node.args.args:
            a.annotation = None
        self.arg = node.args.args[1].arg if len(node.args.args) > 1 else None
        if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            node.body = node.body[1:] or [ast.Pass()]
        self.generic_visit(node)
        if len(node.args.args) > 1:
            node.args.args[1].arg = _ARG
        return node

    def visit_Name(self, node: ast.Name) -> ast.Name:
        if node.id == self.arg:
            node.id = _ARG
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in ("eps", "variance_epsilon"):
            self.eps_attrs.add(node.attr)
            node.attr = _EPS
        return node


def _normalise(sources: list[str]) -> tuple[str, set[str]]:
    """One line-joined text of every function in ``sources``, and the eps attribute names they read."""
    norm = _Normaliser()
    out = []
    for src in sources:
        for node in ast.parse(textwrap.dedent(src)).body:
            out.append(ast.unparse(norm.visit(node)))
    return "\n".join(out), norm.eps_attrs


_CANONICAL = {_normalise([s])[0]: form for form, srcs in _KNOWN_SOURCES.items() for s in srcs}


@functools.cache
def _class_form(cls: type) -> tuple[str | None, str]:
    """(form, eps attribute) of an RMSNorm class from its ``forward`` (+ ``_norm``) source; (None, reason) else."""
    fwd = getattr(cls, "forward", None)
    if fwd is None or fwd is nn.Module.forward:
        return None, "has no forward"
    try:
        params = list(inspect.signature(fwd).parameters.values())[1:]
    except (TypeError, ValueError):
        return None, "forward has no inspectable signature"
    if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        return None, f"forward takes {', '.join(p.name for p in params) or 'no arguments'}, not one tensor"
    funcs = [fwd] + ([cls._norm] if callable(getattr(cls, "_norm", None)) else [])
    try:
        sources = [inspect.getsource(f) for f in funcs]
    except (OSError, TypeError):
        return None, "forward source unavailable, so its formula cannot be checked"
    try:
        text, eps_attrs = _normalise(sources)
    except SyntaxError:
        return None, "forward source does not parse"
    form = _CANONICAL.get(text)
    if form is None and len(funcs) > 1:  # a ``_norm`` that forward does not call does not matter
        text, eps_attrs = _normalise(sources[:1])
        form = _CANONICAL.get(text)
    if form is None:
        return None, ("forward is not a formula peftfast fuses (the llama / gemma / olmo2 / t5 RMSNorm forms, Cohere's "
                      "LayerNorm)")
    if len(eps_attrs) != 1:
        return None, "forward reads both eps and variance_epsilon"
    return form, eps_attrs.pop()


def is_norm(module: nn.Module) -> bool:
    """A norm module ``install_norms`` considers: ``nn.LayerNorm``, ``nn.RMSNorm``, or a class named ``*RMSNorm*`` /
    ``*LayerNorm`` with a ``weight`` and an ``eps`` / ``variance_epsilon`` attribute."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    name = type(module).__name__
    return (("RMSNorm" in name or name.endswith("LayerNorm")) and hasattr(module, "weight")
            and (hasattr(module, "variance_epsilon") or hasattr(module, "eps")))


def rms_form(module: nn.Module) -> tuple[str | None, str]:
    """(form, eps attribute name) of an RMSNorm module, or (None, reason)."""
    return _class_form(type(module))


def _previous_forward_ok(module: nn.Module) -> str | None:
    prev = module.__dict__.get("forward")
    if prev is None or isinstance(getattr(module, "_peftfast_norm", None), NormState):
        return None
    if hasattr(module, "_hf_hook"):
        return "forward is wrapped by an accelerate hook (device map / offload)"
    cls_fwd = type(module).forward
    bound = getattr(prev, "__func__", None) is cls_fwd and getattr(prev, "__self__", None) is module
    partial = (isinstance(prev, functools.partial) and prev.func is cls_fwd and prev.args == (module,)
               and not prev.keywords)
    if not (bound or partial):
        return f"forward was replaced on the instance ({getattr(prev, '__qualname__', type(prev).__name__)})"
    return None


def why_not(module: nn.Module) -> str | None:
    """None if ``module`` can run the fused op with identical maths, else a one-line reason."""
    if not is_norm(module):
        return "not a recognised norm module"
    reason = _previous_forward_ok(module)
    if reason:
        return reason
    w = getattr(module, "weight", None)
    if isinstance(module, nn.LayerNorm):
        if type(module).forward is not nn.LayerNorm.forward:
            return f"{type(module).__name__} overrides nn.LayerNorm.forward"
        if len(module.normalized_shape) != 1:
            return f"normalizes over {len(module.normalized_shape)} dims (only the last dim is fused)"
        if w is None:
            return "no elementwise affine weight"
    elif isinstance(module, nn.RMSNorm):
        return "torch.nn.RMSNorm is not fused (its rounding differs from the Hugging Face forms)"
    else:
        form, attr = rms_form(module)
        if form is None:
            return attr
        eps = getattr(module, attr, None)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            return f"{attr} is {type(eps).__name__}, not a number"
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return "weight is not a 1-D tensor"
    if w.dtype not in SUPPORTED_DTYPES:
        return f"weight dtype {w.dtype} is not supported (float32, float16, bfloat16)"
    b = getattr(module, "bias", None)
    if isinstance(module, nn.LayerNorm) and b is not None and (b.dtype not in SUPPORTED_DTYPES or b.dim() != 1):
        return f"bias {tuple(b.shape)} {b.dtype} is not supported"
    return None


def _single_input(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    if len(args) + len(kwargs) != 1:
        st = module._peftfast_norm
        raise TypeError(f"peftfast norm {st.name!r}: forward takes one tensor, got {len(args)} positional and "
                        f"{sorted(kwargs)} keyword argument(s)")
    return args[0] if args else next(iter(kwargs.values()))


def rms_norm_forward(module: nn.Module, *args, **kwargs) -> torch.Tensor:
    """Drop-in ``forward`` for a recognised RMSNorm module (bound with ``functools.partial`` by ``install_norms``).

    Takes the input positionally or by its original keyword (``hidden_states`` / ``x``); reads eps at call time.
    """
    x = _single_input(module, args, kwargs)
    st: NormState = module._peftfast_norm
    form = st.form
    if form == "t5":
        if x.dtype != module.weight.dtype:  # T5's output dtype then follows the weight: its own forward keeps that
            return call_original(module, st, x)
        form = "llama"  # the same maths when the dtypes agree
    out = rms_norm(x, module.weight, getattr(module, st.eps_attr), form=form, backend=st.backend, name=st.name)
    if st.rebuild:
        _offer(module, x, out, rms_norm_forward)
    return out


def _offer(module: nn.Module, x: torch.Tensor, out: torch.Tensor, fn) -> None:
    """Register ``out`` as rebuilt from ``x`` where the norm's backward keeps ``x`` anyway (some input trains)."""
    # not under ZeRO-3: the rebuild runs in a consumer's backward, where the norm's own weights are not gathered
    if torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad) and \
            not zero3_partitioned(module.weight, getattr(module, "bias", None)):
        rebuildable(out, functools.partial(fn, module), (x,))


def layer_norm_forward(module: nn.Module, *args, **kwargs) -> torch.Tensor:
    """Drop-in ``forward`` for ``nn.LayerNorm`` over the last dim. Under CUDA autocast the output is float32, as
    autocast runs layer_norm in fp32 there (CPU autocast leaves it alone); the statistics are fp32 either way."""
    x = _single_input(module, args, kwargs)
    st: NormState = module._peftfast_norm
    if x.device.type != "cuda" and st.backend != "triton":  # ATen's LayerNorm is one fused op off CUDA already
        out = F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    else:
        out_dtype = torch.float32 if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") else None
        out = layer_norm(x, module.weight, module.bias, module.eps, out_dtype=out_dtype, backend=st.backend,
                         name=st.name)
    if st.rebuild:
        _offer(module, x, out, layer_norm_forward)
    return out


def cohere_norm_forward(module: nn.Module, *args, **kwargs) -> torch.Tensor:
    """Drop-in ``forward`` for a Cohere-form norm (a LayerNorm without bias over the last dim, fp32 maths, the
    input's dtype out): the layer-norm op, which keeps the input and the row statistics only."""
    x = _single_input(module, args, kwargs)
    st: NormState = module._peftfast_norm
    out = layer_norm(x, module.weight, None, getattr(module, st.eps_attr), out_dtype=x.dtype,
                     backend="torch" if x.device.type != "cuda" and st.backend != "triton" else st.backend,
                     name=st.name)
    if st.rebuild:
        _offer(module, x, out, cohere_norm_forward)
    return out


def install(module: nn.Module, name: str, backend: str, rebuild: bool = False) -> None:
    """Patch one module that ``why_not`` accepted (idempotent: a second call only updates the options)."""
    st = module.__dict__.get("_peftfast_norm")
    if isinstance(st, NormState):
        st.backend, st.rebuild = backend, rebuild
        return
    if isinstance(module, nn.LayerNorm):
        kind, form, eps_attr, fn = "layer", None, "eps", layer_norm_forward
    else:
        form, eps_attr = rms_form(module)
        kind, fn = ("layer", cohere_norm_forward) if form == "cohere" else ("rms", rms_norm_forward)
    bind_forward(module, "_peftfast_norm", NormState(name=name, backend=backend, kind=kind, form=form,
                                                     eps_attr=eps_attr, previous_forward=None, rebuild=rebuild), fn)


def uninstall(module: nn.Module) -> bool:
    """Restore the module's forward exactly (its previous instance attribute, or none); True if it was patched."""
    if not isinstance(module.__dict__.get("_peftfast_norm"), NormState):
        return False
    unbind_forward(module, "_peftfast_norm")
    return True


# ----------------------------------------------------------------------------------------------------------------
# the model's rebuild scope: the norms above register their outputs with it
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ScopeState:
    previous_forward: object | None


def scoped_forward(module: nn.Module, *args, **kwargs):
    """The backbone's forward inside a rebuild scope (``peftfast.ops.recompute.rebuild_scope``), unless its hidden
    states are known to be too small to rebuild (the scope's hooks would cost every saved tensor a Python call)."""
    if not torch.compiler.is_compiling() and _small_stack(module, args, kwargs):
        return call_original(module, module._peftfast_scope, *args, **kwargs)
    return rebuild_scope(call_original, module, module._peftfast_scope, *args, **kwargs)


def _small_stack(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether the stack's hidden states hold fewer than ``MIN_REBUILD_BYTES`` (``worth_rebuilding``): read from
    ``inputs_embeds``, or from ``input_ids`` and the input embedding's width and dtype; False where neither tells."""
    emb = kwargs.get("inputs_embeds")
    if isinstance(emb, torch.Tensor):
        return not worth_rebuilding(emb)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        return False
    try:
        table = module.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    w = getattr(table, "weight", None)
    if not isinstance(table, nn.Embedding) or not isinstance(w, torch.Tensor) or w.dim() != 2:
        return False  # a ZeRO-3 shard, or no plain table: not known
    return not worth_rebuilding(ids.numel() * w.shape[1] * w.element_size())


def install_scope(backbone: nn.Module) -> None:
    """Run ``backbone`` (a transformers model's decoder/encoder stack) inside a rebuild scope (idempotent)."""
    if not isinstance(backbone.__dict__.get("_peftfast_scope"), ScopeState):
        bind_forward(backbone, "_peftfast_scope", ScopeState(previous_forward=None), scoped_forward)


def uninstall_scope(backbone: nn.Module) -> bool:
    if not isinstance(backbone.__dict__.get("_peftfast_scope"), ScopeState):
        return False
    unbind_forward(backbone, "_peftfast_scope")
    return True
