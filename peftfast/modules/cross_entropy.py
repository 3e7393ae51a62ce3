"""Model-level fused loss: ``*ForCausalLM.forward`` (and ``*ForMaskedLM.forward``) that computes the loss from the
last hidden states, no logits.

``install(model, config)`` binds ``fused_causal_lm_forward`` to the instance (``model.forward``, a picklable
``functools.partial``); ``uninstall`` restores exactly what was there. On a call with ``labels`` and
``logits_to_keep=0`` the replacement runs the inner decoder (``model.model``) as the original forward does, then
``fused_linear_cross_entropy`` with the LM head's weight, bias and, for a PEFT ``lora.Linear`` head with one active,
unmerged adapter, its LoRA A/B/scaling: the ``tokens × vocab`` logits are never materialised. It returns a
``CausalLMOutputWithPast`` with ``loss`` set and ``logits=None`` (``LossPatchConfig(keep_logits=True)`` adds
detached logits, computed without autograd). Calls without labels, and every call the fused path cannot serve
exactly, go to the original forward; the latter are counted with their reason.

Semantics are ``ForCausalLMLoss``'s: labels shifted by one with ``ignore_index`` padding unless ``shift_labels``
is passed, fp32 loss, mean over non-ignored tokens or ``sum / num_items_in_batch`` under gradient accumulation.

Masked LMs (BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT, ELECTRA's generator; ``MASKED_LM``) take
``fused_masked_lm_forward``: their head is a per-position transform (dense → activation → LayerNorm) then a vocabulary
projection, and their loss ``CrossEntropyLoss()`` over the labelled positions only; so the transform runs on the
labelled rows alone (about 15% of the tokens in MLM training) and the projection goes into the fused cross-entropy.
Same loss (fp32: the original computes it in the logits' dtype), gradients within rounding; the transform's FLOPs and
saved tensors shrink with the labelled share, and the ``tokens × vocab`` logits (30522 per token for BERT, 40 hidden
vectors at hidden 768) are never made. Under ``torch.compile`` the rows are not selected (a data-dependent shape):
the transform runs on every row and the fused loss skips the unlabelled ones.

Encoder-decoder LMs (T5, mT5, UMT5, LongT5, BART, mBART, Pegasus, Pegasus-X, Marian, Blenderbot, PLBart, M2M100 /
NLLB, BigBird-Pegasus, MVP, LED, Whisper; ``SEQ2SEQ``) take ``fused_seq2seq_forward``: their forward computes
``lm_head(decoder output, rescaled as the class does) [+ final_logits_bias]`` (Whisper's head is ``proj_out``) and
``CrossEntropyLoss()`` against the
unshifted labels. The replacement runs the class's own forward without labels (the decoder inputs shifted from the
labels as it would shift them, the cache switched off where it would), while a pre-hook on ``lm_head`` takes its
input and hands the head a single zero row instead: the head then returns its whole bias (``lm_head`` bias, LoRA
bias, ``final_logits_bias``: whatever the class adds, with autograd to each), and the fused cross-entropy computes the
loss from the taken input, the head's weight (and LoRA) and that bias. Every other output field is the original's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers.modeling_outputs as _model_outputs
from torch import nn

from peftfast.modules._bind import bind_forward, call_original, unbind_forward, zero3_partitioned
from peftfast.modules._tally import Tallied, tally
from peftfast.ops.cross_entropy import fused_linear_cross_entropy


def _plain(model: nn.Module) -> tuple[float | None, float]:
    return None, 1.0


def _gemma_softcap(model: nn.Module) -> tuple[float | None, float]:
    cap = getattr(model.config, "final_logit_softcapping", None)
    return (float(cap) if cap is not None else None), 1.0


def _cohere(model: nn.Module) -> tuple[float | None, float]:
    return None, float(model.logit_scale)


def _granite(model: nn.Module) -> tuple[float | None, float]:
    return None, 1.0 / float(model.config.logits_scaling)


# classes whose forward is "decoder → slice → lm_head → (scale | softcap) → ForCausalLMLoss": (softcap, logit_scale)
RECIPES: dict[str, Callable[[nn.Module], tuple[float | None, float]]] = {
    "LlamaForCausalLM": _plain, "MistralForCausalLM": _plain, "Qwen2ForCausalLM": _plain,
    "Qwen3ForCausalLM": _plain, "GemmaForCausalLM": _plain, "Phi3ForCausalLM": _plain,
    "Gemma2ForCausalLM": _gemma_softcap, "Gemma3ForCausalLM": _gemma_softcap,
    "CohereForCausalLM": _cohere, "GraniteForCausalLM": _granite,
    "PhiForCausalLM": _plain, "Olmo2ForCausalLM": _plain, "Starcoder2ForCausalLM": _plain,
    "StableLmForCausalLM": _plain, "SmolLM3ForCausalLM": _plain, "MinistralForCausalLM": _plain,
    "Ministral3ForCausalLM": _plain, "GlmForCausalLM": _plain, "Glm4ForCausalLM": _plain, "OlmoForCausalLM": _plain,
    "Olmo3ForCausalLM": _plain, "Exaone4ForCausalLM": _plain, "NemotronForCausalLM": _plain,
    "HeliumForCausalLM": _plain, "Qwen3_5ForCausalLM": _plain, "Ernie4_5ForCausalLM": _plain,
    "SeedOssForCausalLM": _plain, "ArceeForCausalLM": _plain, "ApertusForCausalLM": _plain,
    "HunYuanDenseV1ForCausalLM": _plain, "Jais2ForCausalLM": _plain, "PersimmonForCausalLM": _plain,
    "DiffLlamaForCausalLM": _plain, "Cohere2ForCausalLM": _cohere, "VaultGemmaForCausalLM": _gemma_softcap,
    "GraniteSWAForCausalLM": _granite,
    # the same body with another backbone attribute or argument list: served through their own signature
    "GPT2LMHeadModel": _plain, "GPTNeoXForCausalLM": _plain, "FalconForCausalLM": _plain,
    # mixtures of experts: the same body, plus the router's load-balancing loss when router logits are requested
    # (such calls go to the original forward)
    **dict.fromkeys(_MOE := ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
                             "GptOssForCausalLM", "PhimoeForCausalLM"), _plain),
}
# RECIPES classes served by ``fused_bound_causal_forward``: their backbone attribute
BACKBONES: dict[str, str] = {"GPT2LMHeadModel": "transformer", "GPTNeoXForCausalLM": "gpt_neox",
                             "FalconForCausalLM": "transformer",
                             **dict.fromkeys(_MOE, "model")}
# the output class, where not CausalLMOutputWithPast
_OUTPUTS = {"GPT2LMHeadModel": "CausalLMOutputWithCrossAttentions",
            "FalconForCausalLM": "CausalLMOutputWithCrossAttentions",
            **dict.fromkeys(_MOE, "MoeCausalLMOutputWithPast")}
_PARAMS = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "labels", "use_cache",
           "logits_to_keep")
# transformers 5.24 renamed the cache argument and output field ``past_key_values`` to ``cache`` (the old keyword is
# still accepted, with a deprecation warning): both forms of the signature are served
_CACHE_NAMES = ("past_key_values", "cache")
_CACHE_AT = _PARAMS.index("past_key_values")


def _forward_params(cls: type) -> tuple[str, ...] | None:
    """The leading parameters of ``cls.forward`` in the supported order (its own cache name), or None."""
    params = tuple(inspect.signature(cls.forward).parameters)[1:len(_PARAMS) + 1]
    if len(params) == len(_PARAMS) and params[_CACHE_AT] in _CACHE_NAMES and \
            all(a == b for i, (a, b) in enumerate(zip(params, _PARAMS)) if i != _CACHE_AT):
        return params
    return None


@dataclass
class LossPatchConfig:
    """Options of the fused loss path. ``keep_logits``: also return detached logits (costs their memory)."""

    backend: str = "auto"
    keep_logits: bool = False
    chunk_size: int | None = None


@dataclass
class LossState(Tallied):
    """Kept on the patched model as ``model._peftfast_loss`` (not in ``state_dict``)."""

    config: LossPatchConfig
    previous_forward: object | None
    params: tuple[str, ...] = _PARAMS  # the class forward's leading parameters (its cache argument's name)
    kind: str = "causal"  # "bound" (``BACKBONES``), "masked" (``MASKED_LM``), "seq2seq" (``SEQ2SEQ``)
    out_fields: tuple[str, ...] = ()  # "bound": the output fields besides loss and logits
    taken: list | None = None  # "seq2seq": the lm_head inputs of the fused call in progress
    fused_calls: int = 0
    no_label_calls: int = 0
    eval_calls: int = 0  # labelled calls in eval mode: served by the original forward, which returns logits
    fallbacks: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class HeadTensors:
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    lora_scale: float = 1.0
    lora_bias: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# eligibility
# ----------------------------------------------------------------------------------------------------------------
def _has_hooks(mod: nn.Module) -> bool:
    """Whether hooks other than peftfast's own pre-hooks (the seq2seq path's ``_take_head_input``, a LoRA head's
    ZeRO-3 registration) run around ``mod``."""
    from peftfast.modules.lora import _zero3_register_hook

    pre = [h for h in mod._forward_pre_hooks.values() if not _is_take(h) and h is not _zero3_register_hook]
    return bool(mod._forward_hooks or pre or hasattr(mod, "_hf_hook"))


def _peft_types():
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper
    except Exception:  # pragma: no cover - peft is a dependency
        return None, None, None
    return LoraLayer, LoraLinear, ModulesToSaveWrapper


def _check_weight(w: torch.Tensor) -> str | None:
    if zero3_partitioned(w):
        return "lm_head weight is a DeepSpeed ZeRO-3 parameter (gathered by lm_head's own hooks)"
    if not isinstance(w, torch.Tensor) or w.is_meta or w.dim() != 2:
        return "lm_head weight is not a materialised 2-D tensor"
    return None


def head_tensors(head: nn.Module, training: bool) -> HeadTensors | str:
    """The tensors the fused loss reads in place of ``head(hidden)``, or why it cannot (checked on every call:
    adapters can be switched, merged, disabled or gain hooks at any time)."""
    lora_layer_t, lora_linear_t, mts_t = _peft_types()
    if _has_hooks(head):
        return "lm_head has forward hooks"
    if mts_t is not None and isinstance(head, mts_t):
        if head.disable_adapters or not head.active_adapters:
            head = head.original_module
        elif head.active_adapters[0] in head.modules_to_save:
            head = head.modules_to_save[head.active_adapters[0]]
        else:
            return "modules_to_save wrapper without a module for the active adapter"
        if _has_hooks(head):
            return "lm_head has forward hooks"
    if lora_layer_t is not None and isinstance(head, lora_layer_t):
        if type(head) is not lora_linear_t:
            return f"lm_head is a {type(head).__name__} (only PEFT lora.Linear is fused)"
        base = head.get_base_layer()
        if type(base) is not nn.Linear or _has_hooks(base):
            return f"lm_head base layer {type(base).__name__} is not a plain nn.Linear"
        if getattr(head, "fan_in_fan_out", False):
            return "lm_head LoRA has fan_in_fan_out"
        why = _check_weight(base.weight)
        if why:
            return why
        if head.disable_adapters or head.merged:
            return HeadTensors(base.weight, base.bias)
        active = [a for a in head.active_adapters if a in head.lora_A]
        if not active:
            return HeadTensors(base.weight, base.bias)
        if len(active) > 1:
            return f"lm_head has {len(active)} active LoRA adapters"
        name = active[0]
        if name in getattr(head, "lora_variant", {}) or getattr(head, "use_dora", {}).get(name, False):
            return f"lm_head adapter {name!r} uses a LoRA variant (e.g. DoRA)"
        a, b = head.lora_A[name], head.lora_B[name]
        if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None:
            return f"lm_head adapter {name!r}: lora_A/lora_B are not bias-free nn.Linear"
        if _has_hooks(a) or _has_hooks(b):
            return f"lm_head adapter {name!r}: lora_A/lora_B have forward hooks"
        drop = head.lora_dropout[name]
        if type(drop) not in (nn.Dropout, nn.Identity):
            return f"lm_head adapter {name!r}: dropout module {type(drop).__name__}"
        if isinstance(drop, nn.Dropout) and drop.p > 0 and drop.training and training:
            return f"lm_head adapter {name!r} has LoRA dropout {drop.p} in training (not fused)"
        return HeadTensors(base.weight, base.bias, a.weight, b.weight, float(head.scaling[name]), b.bias)
    if type(head) is not nn.Linear:
        return f"lm_head is a {type(head).__name__}, not nn.Linear (quantized or custom)"
    why = _check_weight(head.weight)
    return why or HeadTensors(head.weight, head.bias)


def _standard_loss(lm: nn.Module) -> bool:
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except Exception:  # pragma: no cover
        return False
    return lm.loss_function is ForCausalLMLoss


def causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module inside ``model`` (a ``PeftModel``'s base model, or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__name__.startswith("Peft"):
        return get_base()
    return model


def _loss_vocab(lm: nn.Module) -> int:
    """The vocabulary size the class's forward hands its loss (``self.vocab_size`` for Gemma, Nemotron, VaultGemma
    and the mixtures of experts)."""
    name = type(lm).__name__
    return lm.vocab_size if name.startswith(("Gemma", "Nemotron", "VaultGemma")) or name in _MOE else \
        lm.config.vocab_size


def _replaced_forward_reason(inst) -> str:
    # the replacement copies the original's names (functools.wraps); its code object still tells where it is from
    code = getattr(getattr(inst, "__func__", inst), "__code__", None)
    parts = code.co_filename.replace("\\", "/").split("/") if code is not None else []
    if "trl" in parts[:-1]:
        # TRL's SFTTrainer (1.x) binds its own chunked LM-head loss to the model: the loss is already computed
        # without the full logits, by TRL
        name = getattr(code, "co_qualname", code.co_name)
        return f"forward is TRL's own ({name} in trl/{parts[-1]}: SFTTrainer's chunked LM-head loss)"
    return "forward is already replaced on the instance (e.g. accelerate hooks)"


def why_not(model: nn.Module) -> str | None:
    """None if ``model`` (a ``*ForCausalLM`` or ``*ForMaskedLM``, or a PEFT model around one) can take the fused
    loss, else a reason."""
    lm = causal_lm(model)
    name = type(lm).__name__
    if name not in RECIPES and name not in MASKED_LM and name not in SEQ2SEQ:
        return (f"{name} is not a supported *ForCausalLM ({', '.join(sorted(RECIPES))}), *ForMaskedLM "
                f"({', '.join(sorted(MASKED_LM))}) or encoder-decoder LM ({', '.join(sorted(SEQ2SEQ))})")
    inst = lm.__dict__.get("forward")
    if inst is not None and getattr(lm, "_peftfast_loss", None) is None:
        return _replaced_forward_reason(inst)
    if hasattr(lm, "_hf_hook"):
        return "model has accelerate hooks (device_map / offloading)"
    if name in MASKED_LM:
        return _why_not_masked(lm)
    if name in SEQ2SEQ:
        return _why_not_seq2seq(lm)
    backbone = BACKBONES.get(name, "model")
    if not isinstance(getattr(lm, backbone, None), nn.Module) or not isinstance(getattr(lm, "lm_head", None),
                                                                                 nn.Module):
        return f"{name} has no .{backbone} decoder / .lm_head"
    if not _standard_loss(lm):
        return "model uses a custom loss_function"
    if name in BACKBONES:
        why = _bound_reason(lm, getattr(lm, backbone), ("labels", "logits_to_keep"))
        if why:
            return why
    elif _forward_params(type(lm)) is None:
        params = tuple(inspect.signature(type(lm).forward).parameters)[1:]
        return f"{name}.forward has an unexpected signature {params}"
    head = head_tensors(lm.lm_head, training=False)
    if isinstance(head, str):
        return head
    vocab = _loss_vocab(lm)
    if head.weight.shape[0] != vocab:
        return f"lm_head has {head.weight.shape[0]} outputs but the loss uses vocab_size {vocab}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# the forward replacement
# ----------------------------------------------------------------------------------------------------------------
def _original(model: nn.Module, st: LossState, args, kwargs):
    return call_original(model, st, *args, **kwargs)


def _call_reason(model: nn.Module, keep) -> str | None:
    if isinstance(keep, torch.Tensor) or keep != 0:
        return "logits_to_keep != 0"
    if not _standard_loss(model):
        return "model uses a custom loss_function"
    return None


def _serve(model: nn.Module, st: LossState, labels, keep, head: nn.Module) -> HeadTensors | None:
    """The head's tensors when this call takes the fused loss, else None (counted: no labels, evaluation, or the
    fallback's reason) and the original forward serves it. ``keep``: ``logits_to_keep`` (None: a masked LM, whose
    forward has neither it nor ``loss_function``)."""
    if labels is None:
        tally(st.tally_key, "no_label_calls")
        return None
    if not model.training and not st.config.keep_logits:
        # evaluation usually wants the logits (metrics, generation); there is no backward to save memory for
        tally(st.tally_key, "eval_calls")
        return None
    reason = None if keep is None else _call_reason(model, keep)
    ht = None
    if reason is None:
        ht = head_tensors(head, model.training)
        if isinstance(ht, str):
            reason = ht.replace("lm_head", "MLM decoder") if st.kind == "masked" else \
                ht.replace("lm_head", SEQ2SEQ[type(model).__name__].head) if st.kind == "seq2seq" else ht
    if reason is not None:
        tally(st.tally_key, "fallbacks", reason)
        return None
    return ht


def fused_causal_lm_forward(model: nn.Module, *args, **kwargs):
    """Drop-in ``forward`` for the supported ``*ForCausalLM`` classes (bound to the instance by ``install``)."""
    st: LossState = model._peftfast_loss
    names = st.params
    cache = names[_CACHE_AT]
    if len(args) > len(names):
        tally(st.tally_key, "fallbacks", "unexpected positional arguments")
        return _original(model, st, args, kwargs)
    if cache != "past_key_values" and "past_key_values" in kwargs:  # the deprecated name, as the class accepts it
        if cache in kwargs or len(args) > _CACHE_AT:  # the class forward warns and picks one
            tally(st.tally_key, "fallbacks", f"both past_key_values and {cache} given")
            return _original(model, st, args, kwargs)
        kwargs = {cache if k == "past_key_values" else k: v for k, v in kwargs.items()}
    p = dict(zip(names, args))
    rest = {}
    for k, v in kwargs.items():
        if k in names:
            if k in p:
                raise TypeError(f"forward() got multiple values for argument {k!r}")
            p[k] = v
        else:
            rest[k] = v
    p.setdefault("logits_to_keep", 0)
    head = _serve(model, st, p.get("labels"), p["logits_to_keep"], model.lm_head)
    if head is None:
        return _original(model, st, args, kwargs)

    return_dict = rest.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    outputs = model.model(input_ids=p.get("input_ids"), attention_mask=p.get("attention_mask"),
                          position_ids=p.get("position_ids"), inputs_embeds=p.get("inputs_embeds"),
                          use_cache=p.get("use_cache"), **{cache: p.get(cache)}, **rest)
    loss, logits = _causal_loss(model, st, head, outputs.last_hidden_state, p["labels"], rest)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                 attentions=outputs.attentions, **{cache: getattr(outputs, cache)})
    return out if return_dict else out.to_tuple()


def _bind_call(model: nn.Module, skip: tuple[str, ...], args, kwargs) -> tuple[dict, dict] | None:
    """(named arguments but ``skip`` kept in it, ``**kwargs``) of a call as the class forward binds it; None when it
    does not bind (the original forward then raises its own error)."""
    sig, _, var_kw = _signature_parts(type(model), skip)
    try:
        bound = sig.bind(model, *args, **kwargs)
    except TypeError:
        return None
    p = dict(bound.arguments)
    p.pop(next(iter(sig.parameters)))
    return p, (dict(p.pop(var_kw, {})) if var_kw else {})


def _bind_labelled(model: nn.Module, args, kwargs) -> tuple[dict, dict, torch.Tensor | None] | None:
    """(named arguments but ``labels``, ``**kwargs``, labels) of a call as the class forward binds it; None when it
    does not bind."""
    bound = _bind_call(model, ("labels",), args, kwargs)
    if bound is None:
        return None
    p, extra = bound
    return p, extra, p.pop("labels", None)


def _output_class(name: str) -> type:
    # imported with the module: an import inside a compiled forward is a graph break under torch < 2.12's Dynamo
    return getattr(_model_outputs, _OUTPUTS.get(name, "CausalLMOutputWithPast"))


def fused_bound_causal_forward(model: nn.Module, *args, **kwargs):
    """Drop-in ``forward`` for the ``BACKBONES`` causal LMs (GPT-2, GPT-NeoX, Falcon): their own argument list, bound by
    their signature and handed on to the backbone by name, as their forward does."""
    st: LossState = model._peftfast_loss
    bound = _bind_call(model, ("labels", "logits_to_keep"), args, kwargs)
    if bound is None:
        return _original(model, st, args, kwargs)
    p, extra = bound
    labels = p.pop("labels", None)
    head = _serve(model, st, labels, p.pop("logits_to_keep", 0), model.lm_head)
    if head is None:
        return _original(model, st, args, kwargs)
    if "output_router_logits" in p or hasattr(model.config, "output_router_logits"):
        router = p.get("output_router_logits")
        if router is None:
            router = getattr(model.config, "output_router_logits", False)
        if router:  # the loss then adds the router's load-balancing term, which the original forward computes
            tally(st.tally_key, "fallbacks", "output_router_logits (the router's auxiliary loss)")
            return _original(model, st, args, kwargs)
        if "output_router_logits" in p:
            p["output_router_logits"] = False  # resolved as the original forward resolves it

    named_rd = "return_dict" in p  # Falcon names it and hands it on: its backbone then returns the output class
    return_dict = p.pop("return_dict", None) if named_rd else extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    name = type(model).__name__
    outputs = getattr(model, BACKBONES[name])(**p, **extra, **({"return_dict": True} if named_rd else {}))
    loss, logits = _causal_loss(model, st, head, outputs[0], labels, extra)
    out_cls = _output_class(name)
    out = out_cls(loss=loss, logits=logits, **{f: getattr(outputs, f, None) for f in st.out_fields})
    return out if return_dict else out.to_tuple()


def _causal_loss(model: nn.Module, st: LossState, head: HeadTensors, hidden: torch.Tensor, labels: torch.Tensor,
                 kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, logits): the fused loss, with detached logits under ``keep_logits``; where the dtypes rule the fused
    op out, the logits and loss as the original forward computes them from these hidden states."""
    loss = _loss(model, st, head, hidden, labels, kwargs)
    if loss is None:
        tally(st.tally_key, "fallbacks", "hidden dtype differs from lm_head weight dtype")
        logits = _logits(model, hidden)
        return model.loss_function(logits, labels, _loss_vocab(model), **kwargs), logits
    tally(st.tally_key, "fused_calls")
    if not st.config.keep_logits:
        return loss, None
    with torch.no_grad():
        return loss, _logits(model, hidden)


def _logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What the original forward computes as logits (used for ``keep_logits`` and dtype fallbacks)."""
    logits = model.lm_head(hidden)
    softcap, scale = RECIPES[type(model).__name__](model)
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _loss(model, st: LossState, head: HeadTensors, hidden: torch.Tensor, labels: torch.Tensor, kwargs: dict):
    ignore_index = kwargs.get("ignore_index", -100)
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    softcap, scale = RECIPES[type(model).__name__](model)
    return _head_loss(st, head, hidden, shift_labels.to(hidden.device), ignore_index, softcap, scale,
                      kwargs.get("num_items_in_batch"))


def _head_loss(st: LossState, head: HeadTensors, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int,
               softcap: float | None, scale: float, num_items) -> torch.Tensor | None:
    """The fused cross-entropy of ``head(hidden)`` against ``labels`` (None when the dtypes rule it out)."""
    w, b, a, bm = head.weight, head.bias, head.lora_a, head.lora_b
    dev = hidden.device.type
    autocast = torch.is_autocast_enabled(dev)
    if autocast:
        # what autocast does to the head's F.linear calls: every operand in the autocast dtype
        dt = torch.get_autocast_dtype(dev)
        hidden, w = hidden.to(dt), w.to(dt)
        b = b.to(dt) if b is not None else None
        a, bm = (a.to(dt), bm.to(dt)) if a is not None else (None, None)
    elif hidden.dtype != w.dtype:
        return None
    if head.lora_bias is not None:  # PEFT's lora_bias: s · bB joins the bias (autograd reaches bB through it)
        lb = head.lora_bias.to(w.dtype) * head.lora_scale
        b = lb if b is None else b + lb
    if a is not None and a.dtype not in (w.dtype, torch.float32):
        a, bm = a.to(w.dtype), bm.to(w.dtype)
    with torch.autocast(dev, enabled=False) if autocast else contextlib.nullcontext():
        return fused_linear_cross_entropy(
            hidden, w, labels, bias=b, lora_A=a, lora_B=bm, lora_scale=head.lora_scale,
            ignore_index=ignore_index, softcap=softcap, logit_scale=scale, num_items_in_batch=num_items,
            backend=st.config.backend, chunk_size=st.config.chunk_size)


# ----------------------------------------------------------------------------------------------------------------
# masked LMs
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskedHead:
    """A masked LM's pieces: ``logits = decoder(transform(encoder(...)[0]))``; ``whole`` is the head module the
    original forward calls (checked against transform → decoder by the install probe), None where the forward
    calls the pieces itself."""

    encoder: str
    transform: Callable[[torch.Tensor], torch.Tensor]
    decoder: nn.Module
    whole: nn.Module | None = None
    # the loss is the model's ``loss_function`` (transformers' ForMaskedLMLoss: ``num_items_in_batch`` honoured)
    # rather than a plain CrossEntropyLoss(); ``sparse``: the forward runs the head on labelled rows only
    loss_function: bool = False
    sparse: bool = False


def _act_of(head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``gelu`` that a RoBERTa-style head's forward calls: the one its own module imported."""
    return sys.modules[type(head).__module__].gelu


def _bert_head(lm: nn.Module) -> MaskedHead:
    pred = lm.cls.predictions
    return MaskedHead("bert", pred.transform, pred.decoder, lm.cls)


def _roberta_head(lm: nn.Module) -> MaskedHead:
    h = lm.lm_head
    act = _act_of(h)
    return MaskedHead("roberta", lambda x: h.layer_norm(act(h.dense(x))), h.decoder, h)


def _distilbert_head(lm: nn.Module) -> MaskedHead:
    return MaskedHead("distilbert", lambda x: lm.vocab_layer_norm(lm.activation(lm.vocab_transform(x))),
                      lm.vocab_projector)


def _electra_head(lm: nn.Module) -> MaskedHead:
    return MaskedHead("electra", lm.generator_predictions, lm.generator_lm_head)


def _modernbert_head(lm: nn.Module) -> MaskedHead:
    # forward: model → [labelled rows if sparse_prediction] → decoder(head(·)) → loss_function(logits, labels, V)
    return MaskedHead("model", lm.head, lm.decoder, loss_function=True, sparse=bool(lm.sparse_prediction))


# classes whose forward is "encoder → head → CrossEntropyLoss()(logits.view(-1, V), labels.view(-1))"
MASKED_LM: dict[str, Callable[[nn.Module], MaskedHead]] = {
    "BertForMaskedLM": _bert_head, "RobertaForMaskedLM": _roberta_head, "XLMRobertaForMaskedLM": _roberta_head,
    "CamembertForMaskedLM": _roberta_head, "DistilBertForMaskedLM": _distilbert_head,
    "ElectraForMaskedLM": _electra_head, "ModernBertForMaskedLM": _modernbert_head,
}


_SIGNATURES: dict = {}  # (class, skip) -> parts: a plain dict, not a functools cache, which Dynamo would trace
# through with a warning in every compiled forward


def _signature_parts(cls: type, skip: tuple[str, ...] = ("labels",)) -> tuple[inspect.Signature, tuple[str, ...],
                                                                             str | None]:
    """(signature, the arguments handed on to the backbone: all named ones but ``skip``, the ``**kwargs`` name) of
    ``cls.forward``."""
    key = (cls, skip)
    if key not in _SIGNATURES:
        sig = inspect.signature(cls.forward)
        params = list(sig.parameters.values())[1:]
        var_kw = next((q.name for q in params if q.kind is q.VAR_KEYWORD), None)
        named = tuple(q.name for q in params if q.kind is q.POSITIONAL_OR_KEYWORD and q.name not in skip)
        _SIGNATURES[key] = sig, named, var_kw
    return _SIGNATURES[key]


def _bound_reason(lm: nn.Module, backbone: nn.Module, skip: tuple[str, ...]) -> str | None:
    """None when ``lm.forward`` takes ``skip`` and hands every other named argument to a backbone that takes it by
    that name, else why not."""
    name = type(lm).__name__
    sig, named, _ = _signature_parts(type(lm), skip)
    absent = [a for a in skip if a not in sig.parameters]
    if absent:
        return f"{name}.forward takes no {', '.join(absent)}"
    params = inspect.signature(type(backbone).forward).parameters
    # output_router_logits: transformers' MoE backbones read it from **kwargs (their output-capturing decorators)
    by_kwargs = {"output_router_logits"} if any(q.kind is q.VAR_KEYWORD for q in params.values()) else set()
    missing = [a for a in named if a not in params and a not in by_kwargs]
    if missing or ("return_dict" in named and "return_dict" not in params):
        return f"{name}.forward has arguments its backbone does not take by name ({', '.join(missing or named)})"
    return None


def _masked_probe(head: MaskedHead) -> str | None:
    """None when the head module computes exactly ``decoder(transform(x))`` on a random input (both calls under
    one RNG seed, so LoRA dropout in the head draws the same masks), else why not."""
    w = head.decoder.weight if isinstance(getattr(head.decoder, "weight", None), torch.Tensor) else None
    if head.whole is None or w is None:
        return None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, w.shape[1], generator=gen).to(device=w.device, dtype=w.dtype)
    cuda = [w.device] if w.device.type == "cuda" else []
    outs = []
    with torch.no_grad():
        for f in (head.whole, lambda t: head.decoder(head.transform(t))):
            with torch.random.fork_rng(devices=cuda, device_type="cuda"):
                torch.manual_seed(0)
                outs.append(f(x))
    if not isinstance(outs[0], torch.Tensor) or outs[0].shape != outs[1].shape or not torch.equal(*outs):
        return f"{type(head.whole).__name__}.forward is not dense → activation → LayerNorm → decoder (probe)"
    return None


def _why_not_masked(lm: nn.Module) -> str | None:
    name = type(lm).__name__
    try:
        head = MASKED_LM[name](lm)
    except AttributeError as exc:
        return f"{name} lacks the masked-LM head it should have ({exc})"
    encoder = getattr(lm, head.encoder, None)
    if not isinstance(encoder, nn.Module) or not isinstance(head.decoder, nn.Module):
        return f"{name} has no .{head.encoder} encoder / decoder module"
    why = _bound_reason(lm, encoder, ("labels",))
    if why:
        return why
    if head.loss_function:
        try:
            from transformers.loss.loss_utils import ForMaskedLMLoss
        except Exception:  # pragma: no cover
            ForMaskedLMLoss = None
        if ForMaskedLMLoss is None or lm.loss_function is not ForMaskedLMLoss:
            return "model uses a custom loss_function"
        if head.sparse and getattr(lm, "sparse_pred_ignore_index", -100) != -100:
            return f"sparse_pred_ignore_index {lm.sparse_pred_ignore_index} is not the loss's ignore index -100"
    if name == "DistilBertForMaskedLM":
        fn = getattr(lm, "mlm_loss_fct", None)
        if type(fn) is not nn.CrossEntropyLoss or fn.weight is not None or fn.ignore_index != -100 or \
                fn.reduction != "mean" or fn.label_smoothing != 0.0:
            return "mlm_loss_fct is not a default nn.CrossEntropyLoss()"
    ht = head_tensors(head.decoder, training=False)
    if isinstance(ht, str):
        return ht.replace("lm_head", "MLM decoder")
    if ht.weight.shape[0] != lm.config.vocab_size:
        return f"MLM decoder has {ht.weight.shape[0]} outputs but the loss uses vocab_size {lm.config.vocab_size}"
    return _masked_probe(head)


def fused_masked_lm_forward(model: nn.Module, *args, **kwargs):
    """Drop-in ``forward`` for the ``MASKED_LM`` classes (bound to the instance by ``install``)."""
    st: LossState = model._peftfast_loss
    bound = _bind_labelled(model, args, kwargs)
    if bound is None:
        return _original(model, st, args, kwargs)  # raises the original's own error
    p, extra, labels = bound
    head = MASKED_LM[type(model).__name__](model)
    ht = _serve(model, st, labels, None, head.decoder)
    if ht is None:
        return _original(model, st, args, kwargs)

    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    outputs = getattr(model, head.encoder)(**p, return_dict=True, **extra)
    hidden = outputs[0]
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.to(hidden.device).reshape(-1)
    if not torch.compiler.is_compiling():
        # the head is per position and the loss reads labelled rows only: transform just those (one sync to size
        # them); with none labelled every row stays and the loss is NaN, as CrossEntropyLoss gives
        rows = (lab != -100).nonzero().squeeze(1)
        if 0 < rows.numel() < lab.numel():
            h, lab = h.index_select(0, rows), lab.index_select(0, rows)
    z = head.transform(h)
    # ForMaskedLMLoss: sum / num_items_in_batch where the trainer passes it (gradient accumulation), else the mean
    num_items = extra.get("num_items_in_batch") if head.loss_function else None
    loss = _head_loss(st, ht, z, lab, -100, None, 1.0, num_items)
    if loss is None:  # a dtype the fused op cannot take: finish as the original would, from these rows
        tally(st.tally_key, "fallbacks", "hidden dtype differs from MLM decoder weight dtype")
        logits_z = head.decoder(z)
        loss = model.loss_function(logits_z, lab, model.config.vocab_size, **extra) if head.loss_function else \
            nn.functional.cross_entropy(logits_z, lab)
    else:
        tally(st.tally_key, "fused_calls")
    logits = None
    if st.config.keep_logits:
        with torch.no_grad():
            kept = hidden
            if head.sparse:  # the original's logits: the labelled rows only
                flat = hidden.reshape(-1, hidden.shape[-1])
                kept = flat[labels.to(hidden.device).reshape(-1) != -100]
            logits = head.decoder(head.transform(kept))
    from transformers.modeling_outputs import MaskedLMOutput

    out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out if return_dict else out.to_tuple()


# ----------------------------------------------------------------------------------------------------------------
# encoder-decoder LMs
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seq2SeqRecipe:
    """What a ``SEQ2SEQ`` class's forward does with ``labels`` besides the loss. ``shift``: how it makes the decoder
    inputs from them ("t5": ``self._shift_right``; "start": its module's ``shift_tokens_right(labels, pad,
    decoder_start)``; "pad": ``shift_tokens_right(labels, pad)``); ``no_cache``: whether labels switch ``use_cache``
    off; ``vocab``: the config field the loss reshapes the logits by (None: the logits' own width); ``head``: the
    output projection's attribute; ``label_limit``: the attribute bounding the labels' length (the class raises
    beyond it)."""

    shift: str
    no_cache: bool
    vocab: str | None = "vocab_size"
    head: str = "lm_head"
    label_limit: str | None = None


_T5 = Seq2SeqRecipe("t5", False, None)
_BART = Seq2SeqRecipe("start", True)
# classes whose forward is "encoder-decoder → [rescale] → lm_head [+ final_logits_bias] → CrossEntropyLoss()(logits,
# labels)" with decoder inputs shifted from the labels (bodies read in transformers 5.24; each tested against its
# unpatched forward)
SEQ2SEQ: dict[str, Seq2SeqRecipe] = {
    **dict.fromkeys(("T5ForConditionalGeneration", "MT5ForConditionalGeneration", "UMT5ForConditionalGeneration",
                     "LongT5ForConditionalGeneration"), _T5),
    **dict.fromkeys(("BartForConditionalGeneration", "PegasusForConditionalGeneration",
                     "PegasusXForConditionalGeneration", "BlenderbotForConditionalGeneration",
                     "BlenderbotSmallForConditionalGeneration", "BigBirdPegasusForConditionalGeneration",
                     "MvpForConditionalGeneration", "LEDForConditionalGeneration"), _BART),
    "MarianMTModel": Seq2SeqRecipe("start", True, "decoder_vocab_size"),
    "MBartForConditionalGeneration": Seq2SeqRecipe("pad", True),
    "PLBartForConditionalGeneration": Seq2SeqRecipe("pad", False),
    "M2M100ForConditionalGeneration": Seq2SeqRecipe("start", False),
    "WhisperForConditionalGeneration": Seq2SeqRecipe("start", False, head="proj_out",
                                                     label_limit="max_target_positions"),
}


def _seq2seq_head(lm: nn.Module) -> nn.Module | None:
    head = getattr(lm, SEQ2SEQ[type(lm).__name__].head, None)
    return head if isinstance(head, nn.Module) else None


def _decoder_inputs(lm: nn.Module, rec: Seq2SeqRecipe, labels: torch.Tensor) -> torch.Tensor:
    """The decoder inputs the class's forward makes from ``labels``."""
    if rec.shift == "t5":
        return lm._shift_right(labels)
    shift = sys.modules[type(lm).__module__].shift_tokens_right
    cfg = lm.config
    return shift(labels, cfg.pad_token_id, cfg.decoder_start_token_id) if rec.shift == "start" else \
        shift(labels, cfg.pad_token_id)


def _why_not_seq2seq(lm: nn.Module) -> str | None:
    name = type(lm).__name__
    rec = SEQ2SEQ[name]
    head = _seq2seq_head(lm)
    if head is None:
        return f"{name} has no .{rec.head}"
    params = inspect.signature(type(lm).forward).parameters
    need = ("labels", "decoder_input_ids", "decoder_inputs_embeds") + (("use_cache",) if rec.no_cache else ())
    missing = [a for a in need if a not in params]
    if missing:
        return f"{name}.forward takes no {', '.join(missing)}"
    if rec.shift == "t5" and not callable(getattr(lm, "_shift_right", None)) or \
            rec.shift != "t5" and not callable(getattr(sys.modules[type(lm).__module__], "shift_tokens_right", None)):
        return f"{name}: its label shift ({rec.shift}) is not where the class keeps it"
    if rec.label_limit and not isinstance(getattr(lm, rec.label_limit, None), int):
        return f"{name} has no {rec.label_limit}"
    ht = head_tensors(head, training=False)
    if isinstance(ht, str):
        return ht.replace("lm_head", rec.head)
    vocab = getattr(lm.config, rec.vocab, None) if rec.vocab else ht.weight.shape[0]
    if ht.weight.shape[0] != vocab:
        return f"{rec.head} has {ht.weight.shape[0]} outputs but the loss uses {rec.vocab} {vocab}"
    return None


def _take_head_input(st: LossState, _mod: nn.Module, inputs: tuple):
    """``lm_head`` pre-hook of a ``SEQ2SEQ`` model (registered once by ``install``; inert outside a fused call).

    In a fused call it keeps the head's input for the loss and hands the head one zero row instead: the head's
    output is then the whole bias the class adds (lm_head's, LoRA's, ``final_logits_bias``), with autograd to each.
    """
    if st.taken is None:
        return None
    st.taken.append(inputs[0])
    return (inputs[0].new_zeros(1, inputs[0].shape[-1]),) + tuple(inputs[1:])


def _is_take(hook) -> bool:
    return isinstance(hook, functools.partial) and hook.func is _take_head_input


def _own_hook(head: nn.Module) -> bool:
    return any(_is_take(h) for h in head._forward_pre_hooks.values())


def fused_seq2seq_forward(model: nn.Module, *args, **kwargs):
    """Drop-in ``forward`` for the ``SEQ2SEQ`` classes (bound to the instance by ``install``)."""
    st: LossState = model._peftfast_loss
    st.taken = None  # what a compiled call that raised left behind: the head hook must be inert outside a fused call
    bound = _bind_labelled(model, args, kwargs)
    if bound is None:
        return _original(model, st, args, kwargs)  # raises the original's own error
    p, extra, labels = bound
    rec = SEQ2SEQ[type(model).__name__]
    head_mod = _seq2seq_head(model)
    ht = _serve(model, st, labels, None, head_mod) if head_mod is not None else None
    if ht is None:
        if head_mod is None:
            tally(st.tally_key, "fallbacks", f"{rec.head} is not a module")
        return _original(model, st, args, kwargs)
    if not _own_hook(head_mod):
        tally(st.tally_key, "fallbacks", f"{rec.head} was replaced after the loss was patched")
        return _original(model, st, args, kwargs)
    if rec.label_limit and labels.shape[-1] > getattr(model, rec.label_limit):
        return _original(model, st, args, kwargs)  # raises the class's own error

    if p.get("decoder_input_ids") is None and p.get("decoder_inputs_embeds") is None:
        p["decoder_input_ids"] = _decoder_inputs(model, rec, labels)
    if rec.no_cache:
        p["use_cache"] = False
    where = p if "return_dict" in _signature_parts(type(model), ("labels",))[1] else extra
    return_dict = where.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    where["return_dict"] = True

    st.taken = []
    if torch.compiler.is_compiling():
        # no try block: torch < 2.12's Dynamo cannot resume inside one after a graph break in the model's own code
        # (a call that raises leaves the list, which the next call's entry clears)
        out = _original(model, st, (), {**p, **extra})
        taken, st.taken = st.taken, None
    else:
        try:
            out = _original(model, st, (), {**p, **extra})
            taken = st.taken
        finally:
            st.taken = None
    bias = getattr(out, "logits", None)
    if len(taken) != 1 or not isinstance(bias, torch.Tensor) or bias.shape != (1, ht.weight.shape[0]):
        tally(st.tally_key, "fallbacks", f"{rec.head} was not called once on the decoder output")
        return _original(model, st, args, kwargs)
    hidden = taken[0]
    bias = bias.reshape(-1)
    if not torch.is_autocast_enabled(hidden.device.type) and bias.dtype != ht.weight.dtype:
        bias = bias.to(ht.weight.dtype)
    head = HeadTensors(ht.weight, bias, ht.lora_a, ht.lora_b, ht.lora_scale)
    loss = _head_loss(st, head, hidden, labels.to(hidden.device), -100, None, 1.0, None)
    if loss is None:  # a dtype the fused op cannot take: the original serves the call
        tally(st.tally_key, "fallbacks", f"hidden dtype differs from {rec.head} weight dtype")
        return _original(model, st, args, kwargs)
    tally(st.tally_key, "fused_calls")
    logits = None
    if st.config.keep_logits:
        with torch.no_grad():
            logits = nn.functional.linear(hidden, head.weight, bias)
            if head.lora_a is not None:
                logits = logits + nn.functional.linear(nn.functional.linear(hidden, head.lora_a), head.lora_b) * \
                    head.lora_scale
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    out = type(out)(loss=loss, logits=logits, **fields)
    return out if return_dict else out.to_tuple()


# ----------------------------------------------------------------------------------------------------------------
# install / uninstall
# ----------------------------------------------------------------------------------------------------------------
def install(model: nn.Module, config: LossPatchConfig) -> nn.Module:
    """Bind the fused forward to the ``*ForCausalLM`` inside ``model`` (idempotent: updates the config).
    Call ``why_not`` first. Returns the module that was patched."""
    lm = causal_lm(model)
    st = getattr(lm, "_peftfast_loss", None)
    if st is not None:
        st.config = config
        return lm
    if type(lm).__name__ in MASKED_LM:
        st = LossState(config=config, previous_forward=None, kind="masked")
        bind_forward(lm, "_peftfast_loss", st, fused_masked_lm_forward)
        return lm
    if type(lm).__name__ in SEQ2SEQ:
        st = LossState(config=config, previous_forward=None, kind="seq2seq")
        bind_forward(lm, "_peftfast_loss", st, fused_seq2seq_forward)
        # registered once, not per call: a hook registered inside a compiled forward breaks the graph
        _seq2seq_head(lm).register_forward_pre_hook(functools.partial(_take_head_input, st))
        return lm
    if type(lm).__name__ in BACKBONES:
        # the output's other fields, copied from the backbone's output (read here: dataclass introspection is not
        # traceable by torch.compile)
        fields = tuple(f.name for f in dataclasses.fields(_output_class(type(lm).__name__))
                       if f.name not in ("loss", "logits"))
        st = LossState(config=config, previous_forward=None, kind="bound", out_fields=fields)
        bind_forward(lm, "_peftfast_loss", st, fused_bound_causal_forward)
        return lm
    st = LossState(config=config, previous_forward=None, params=_forward_params(type(lm)) or _PARAMS)
    bind_forward(lm, "_peftfast_loss", st, fused_causal_lm_forward)
    return lm


def uninstall(model: nn.Module) -> None:
    """Restore the forward exactly as it was before ``install`` (and remove the seq2seq head pre-hook)."""
    lm = causal_lm(model)
    head = _seq2seq_head(lm) if type(lm).__name__ in SEQ2SEQ else None
    if unbind_forward(lm, "_peftfast_loss") is not None and head is not None:
        hooks = head._forward_pre_hooks
        for k in [k for k, h in hooks.items() if _is_take(h)]:
            del hooks[k]


def stats(model: nn.Module) -> dict | None:
    """Fused calls, calls without labels, and fallbacks with their counts; None if the loss is not patched."""
    st = getattr(causal_lm(model), "_peftfast_loss", None)
    if st is None:
        return None
    return {"fused": st.fused_calls, "no_labels": st.no_label_calls, "eval": st.eval_calls,
            "fallbacks": dict(st.fallbacks)}
