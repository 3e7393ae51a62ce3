"""The ``"peftfast"`` transformers attention implementation: fused attention for padded, packed and prefixed batches.

Registered with ``transformers.AttentionInterface`` and, for its masks, with ``AttentionMaskInterface`` (the
flash-attention mask builder, without its host read under ``torch.compile``): the function then receives a 2-D
padding mask (or None), never a 4-D one. Padding, packed documents (``cu_seq_lens_*`` flash kwargs or
``position_ids`` that restart at 0) and prefix keys become segment ids for the kernel. Calls asking for what the
kernel does not do fall back to SDPA with an explicit mask, counted per module with their reason (under
``torch.compile``: once per compilation, see ``peftfast.modules._tally``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from peftfast.modules._tally import Tallied, tally
from peftfast.ops.attention import ALL_SEGMENTS, check_inputs, flash_attention
from peftfast.ops.recompute import offered

NAME = "peftfast"
_UNSUPPORTED_KWARGS = ("cache", "head_mask")
# families whose attention declares no flash support only because it adds a position bias to the scores, which the
# kernel takes (each checked against eager attention, loss and gradients, padded source and target:
# test_attention.py); the others that declare none need masks a padding mask cannot say (Gemma 3's image tokens)
POSITION_BIAS_FAMILIES = frozenset({"t5", "mt5", "umt5", "switch_transformers", "longt5"})


@dataclass
class AttentionStats(Tallied):
    fused_calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)


def _stats(module: nn.Module) -> AttentionStats:
    st = getattr(module, "_peftfast_attn", None)
    if st is None:  # an attention module ``install`` did not see (added later): created on its first call
        st = module.__dict__["_peftfast_attn"] = AttentionStats()
    return st


def _segments_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Document ids [B, S] of packed rows: a new document starts wherever the position restarts at 0."""
    restart = (position_ids[:, 1:] == 0).to(torch.int32)
    return torch.cat([torch.zeros_like(restart[:, :1]), torch.cumsum(restart, dim=1, dtype=torch.int32)], dim=1)


def _segments_from_cu(cu: torch.Tensor, total: int) -> torch.Tensor:
    idx = torch.arange(total, device=cu.device)
    return (torch.searchsorted(cu[1:].to(idx.dtype), idx, right=True)).to(torch.int32)[None]


_last: list = []  # (key, result) of the last segment_ids call: every layer of a forward passes the same tensors


def _version(t) -> int | None:
    # inference tensors keep no version counter (identity alone then)
    return None if not isinstance(t, torch.Tensor) or t.is_inference() else t._version


def segment_ids(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
    """(qseg, kseg, reason): segment ids for the kernel, or a reason to fall back.

    Eager: computed once per forward rather than per layer (the layers hand over the same mask / position
    tensors), and ``None`` when the batch has neither padding nor packing, which reads the mask on the host (a
    device sync on GPUs) but lets the kernel skip the segment test. Under ``torch.compile`` the ids are built from
    tensor ops only, with no host read and no cache: a given mask or position tensor always yields segment ids
    (all zeros when nothing is packed or padded; the same attention, through the segment-aware kernel).
    """
    if torch.compiler.is_compiling():
        return _segment_ids(query, key, attention_mask, kwargs, traced=True)
    srcs = (attention_mask, kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k"), kwargs.get("position_ids"))
    cache_key = (tuple(id(t) for t in srcs), tuple(_version(t) for t in srcs), query.shape[0],
                 query.shape[2], key.shape[2], query.device)
    if _last and _last[0][0] == cache_key and all(a is b for a, b in zip(_last[0][1], srcs)):
        return _last[0][2]
    result = _segment_ids(query, key, attention_mask, kwargs)
    _last[:] = [(cache_key, srcs, result)]
    return result


def _segment_ids(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict,
                 traced: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
    """``traced``: no data-dependent shortcut (no host read): see :func:`segment_ids`."""
    b, sq, sk = query.shape[0], query.shape[2], key.shape[2]
    seg = None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if b != 1:
            return None, None, "cu_seq_lens with batch > 1"
        if cu_k is not None and cu_k is not cu and (traced or not torch.equal(cu_k, cu)):
            # under torch.compile the tensors are compared by identity (transformers' collator passes one tensor)
            return None, None, "cu_seq_lens_k is not cu_seq_lens_q (different query/key lengths)"
        seg = _segments_from_cu(cu, sq)
    else:
        pos = kwargs.get("position_ids")
        if pos is not None and pos.dim() == 2 and pos.shape[-1] == sq and sq > 1:
            seg = _segments_from_positions(pos.expand(b, -1))
            if not traced and not bool(seg[:, -1].any()):
                seg = None  # no row restarts: one document per row
    mask, why = key_padding(attention_mask, b, sk, traced)
    if why is not None:
        return None, None, why
    if mask is not None:
        if not traced and bool(mask.all()):
            mask = None
    if seg is None and mask is None:
        return None, None, None
    prefix = sk - sq
    qseg = seg if seg is not None else torch.zeros((b, sq), dtype=torch.int32, device=query.device)
    qseg = qseg.to(torch.int32)
    # prefix keys (PEFT prefix tuning, a cache) are seen by every document of the row
    kseg = torch.cat([torch.full((b, prefix), ALL_SEGMENTS, dtype=torch.int32, device=query.device), qseg], dim=1)
    if mask is not None:
        kseg = torch.where(mask, kseg, torch.full_like(kseg, -1))
        qseg = torch.where(mask[:, prefix:], qseg, torch.full_like(qseg, -3))  # padding queries see nothing: 0
    return qseg.contiguous(), kseg.contiguous(), None


def key_padding(mask: torch.Tensor | None, b: int, sk: int, traced: bool = False
                ) -> tuple[torch.Tensor | None, str | None]:
    """(bool [B, SK] of the keys kept, or None; reason): the 2-D padding mask the flash-style mask builder gives, or
    a key-padding mask some models still build themselves as ``[B, 1, 1, SK]`` (SwitchTransformers' encoder: the
    extended mask, 0 kept, the dtype's minimum masked; or bool, True kept), broadcast over heads and queries, so it
    says no more than a 2-D one. An additive one is taken only where its kept entries are exactly 0 (a bias
    would be lost otherwise), which is read on the host, so not under ``torch.compile``."""
    if mask is None:
        return None, None
    shape = tuple(mask.shape)
    if mask.dim() == 4 and shape[1:3] == (1, 1) and shape[0] in (1, b) and shape[3] == sk:
        if mask.dtype == torch.bool:
            return mask[:, 0, 0].expand(b, sk), None
        if not mask.is_floating_point() or traced:
            return None, f"attention mask of shape {shape} ({mask.dtype}{', traced' if traced else ''})"
        keep = mask[:, 0, 0] > torch.finfo(mask.dtype).min / 2
        if bool((mask[:, 0, 0][keep] != 0).any()):
            return None, f"additive attention mask of shape {shape} with values other than 0 and -inf"
        return keep.expand(b, sk), None
    if mask.dim() != 2 or shape[0] != b or shape[1] != sk:
        return None, f"attention mask of shape {shape} (expected a 2-D [B, {sk}] mask)"
    return mask.bool(), None


def cross_segment_ids(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                      kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
    """(qseg, kseg, reason) for cross-attention (decoder queries over encoder keys): the mask pads keys only.

    Every query sees every key the encoder mask keeps, whatever its own position or padding, as eager attention
    computes it (transformers' flash-attention path instead masks queries with the tail of the key mask).
    """
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        return None, None, "packed sequences (cu_seq_lens) in cross-attention"
    b, sq, sk = query.shape[0], query.shape[2], key.shape[2]
    mask, why = key_padding(attention_mask, b, sk, torch.compiler.is_compiling())
    if why is not None:
        return None, None, why
    if mask is None:
        return None, None, None
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None, None, None
    kseg = torch.where(mask, 0, -1).to(torch.int32).contiguous()
    return torch.zeros((b, sq), dtype=torch.int32, device=query.device), kseg, None


def _window_right(window, causal: bool) -> int | None:
    """transformers' sliding window bounds the keys on both sides of a non-causal query (ModernBERT's local layers:
    |i - j| < window), the keys before it only in a causal layer (Mistral, Gemma 2)."""
    return int(window) if window and not causal else None


def _inclusive_window_stacks(inner: nn.Module) -> list[str]:
    """Names of the modules whose own code builds transformers' bidirectional sliding-window mask
    (``create_bidirectional_sliding_window_mask``): eager attention below them sees |i - j| <= config.sliding_window.
    Most layers hand the attention function that plus one, the flash-style window (ModernBERT, UltraBERT,
    EmbeddingGemma 2), but T5Gemma's encoder hands ``sliding_window`` itself, so its eager and flash attention differ
    by one key on each side. The eager mask is what the model computed before the patch: a layer handed exactly
    its config's ``sliding_window`` gets one more (the value is recorded per layer; one handed anything else, e.g. a
    per-layer window, keeps it)."""
    out = []
    for name, m in inner.named_modules():
        fn = getattr(type(m), "forward", None)
        code = getattr(inspect.unwrap(fn), "__code__", None) if callable(fn) else None
        if code is not None and "create_bidirectional_sliding_window_mask" in code.co_names:
            out.append(name)
    return out


def _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, window, softcap, qseg, kseg,
              cross=False, sinks=None, position_bias=None, head_mask=None, want_weights=False):
    """SDPA with an explicit boolean mask expressing the same visibility; computed op by op where SDPA cannot say
    it: a softcap, attention sinks (``s_aux``: one learned logit per head that joins every row's softmax and is
    then dropped, as gpt-oss computes it), an additive ``position_bias``, a ``head_mask``, or weights asked for."""
    from peftfast.ops.attention import _allowed

    b, hq, sq, d = query.shape
    hk, sk = key.shape[1], key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:  # a mask built for another implementation
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(
            attention_mask.dtype).min / 2
    else:
        if qseg is None and attention_mask is not None and attention_mask.dim() == 2:
            # fewer keys than queries leaves no prefix to align: the mask can only pad keys, as in cross-attention
            ids = cross_segment_ids if cross or sk < sq else segment_ids
            qseg, kseg, _ = ids(query, key, attention_mask, {})
        mask = _allowed(0, sq, sq, sk, is_causal, window or None, qseg, kseg, query.device,
                        _window_right(window, is_causal))
    k = key.repeat_interleave(hq // hk, 1) if hq != hk else key
    v = value.repeat_interleave(hq // hk, 1) if hq != hk else value
    scale = scaling if scaling is not None else d**-0.5
    if softcap is None and sinks is None and position_bias is None and head_mask is None and not want_weights:
        # an additive mask keeps fully masked (padding) rows finite, as transformers' own SDPA path does
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=bias, dropout_p=dropout,
                                                               scale=scale)
        weights = None
    else:
        s = torch.matmul(query, k.transpose(-1, -2)) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if position_bias is not None:
            s = s + position_bias
        s = s.masked_fill(~mask, float("-inf"))
        if sinks is not None:
            s = torch.cat([s, sinks.reshape(1, -1, 1, 1).expand(b, hq, sq, 1).to(s.dtype)], dim=-1)
        weights = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(query.dtype)
        if sinks is not None:
            weights = weights[..., :-1]
        if head_mask is not None:
            weights = weights * head_mask
        weights = torch.nn.functional.dropout(weights, p=dropout, training=dropout > 0)
        out = torch.matmul(weights, v)
    return out.transpose(1, 2).contiguous(), weights


def peftfast_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function: q/k/v [B, H, S, D] → ([B, S, H, D], None)."""
    st = _stats(module)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = kwargs.get("sliding_window")
    if window and not causal and window == module.__dict__.get("_peftfast_bidir_window"):
        window += 1  # handed the mask builder's bound itself (T5Gemma): see _inclusive_window_stacks
    softcap = kwargs.get("softcap")
    reason = None
    if kwargs.get("output_attentions"):
        reason = "output_attentions=True (the fused kernel returns no weights)"
    elif any(kwargs.get(k) is not None for k in _UNSUPPORTED_KWARGS):
        reason = f"unsupported argument {next(k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None)}"
    else:
        reason = check_inputs(query, key, value, bias=kwargs.get("position_bias"))
    qseg = kseg = None
    cross = module.__dict__.get("_peftfast_cross", False)
    if reason is None and cross:
        causal = False  # keys from another sequence: no order between them and the queries
        qseg, kseg, reason = cross_segment_ids(query, key, attention_mask, kwargs)
    elif reason is None and key.shape[-2] < query.shape[-2] and not causal:
        reason = f"{key.shape[-2]} keys for {query.shape[-2]} queries in a module not known as cross-attention"
    elif reason is None:
        qseg, kseg, reason = segment_ids(query, key, attention_mask, kwargs)
    if reason is not None:
        tally(st.tally_key, "fallbacks", reason)
        sinks = kwargs.get("s_aux", kwargs.get("sinks"))
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, causal, window, softcap, qseg,
                         kseg, cross, sinks=sinks, position_bias=kwargs.get("position_bias"),
                         head_mask=kwargs.get("head_mask"), want_weights=bool(kwargs.get("output_attentions")))
    tally(st.tally_key, "fused_calls")
    query, key, value = _compact(query, key, value)
    # a fused block with recompute="attn" rebuilds q, k, v in backward rather than the kernel keeping them; only
    # without past keys (prefix tuning, a filled cache), which a rerun without the cache would not reproduce
    rebuildable = key.shape[-2] == query.shape[-2] and not cross and not torch.compiler.is_compiling()
    region = offered(query, key, value) if rebuildable else contextlib.nullcontext()
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    with region:
        out = flash_attention(query, key, value, causal=causal, scale=scaling, softcap=softcap,
                              window=int(window) if window else None, window_right=_window_right(window, causal),
                              qseg=qseg, kseg=kseg, dropout_p=float(dropout),
                              backend=getattr(module, "_peftfast_attn_backend", "auto"), name=type(module).__name__,
                              return_lse=sinks is not None, bias=kwargs.get("position_bias"))
    if sinks is not None:
        # a sink logit per head joins every row's softmax and is dropped: the kept weights shrink by
        # exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink); autograd carries it into lse's and the sinks'
        # gradients (a row that sees no key stays 0, as in eager attention, where the sink takes all its weight)
        out, lse = out
        keep = torch.sigmoid(lse - sinks.reshape(1, -1, 1).to(lse.dtype))  # [B, H, S]
        out = out * keep.transpose(1, 2).unsqueeze(-1).to(out.dtype)
    return out, None


def _compact(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v with any of them copied out of a larger storage that the others do not share.

    The kernel keeps q, k, v for backward, and a kept view keeps its whole storage: GPT-2's q is a view of the
    fused q|k|v projection output, while its k and v come back from the KV cache as copies (transformers fills a
    cache in training too unless ``use_cache=False``), so the view alone would keep 3 x hidden values per token for
    a hidden's worth of q. Views that share one storage (no cache) are kept as they are: that storage is all of
    q, k and v.
    """
    if torch.compiler.is_compiling():  # storages are not traceable; the compiler picks what its graph saves anyway
        return tensors
    ptrs = [t.untyped_storage().data_ptr() for t in tensors]
    out = []
    for i, t in enumerate(tensors):
        alone = ptrs.count(ptrs[i]) == 1
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        out.append(_dense_copy(t) if alone and not whole and t.requires_grad else t)
    return tuple(out)


def _dense_copy(t: torch.Tensor) -> torch.Tensor:
    """A dense copy of ``t`` with its dimensions laid out in the view's order (q of GPT-2 stays sequence-major,
    so the attention output is too and reaches the output projection without another copy)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    back = sorted(range(t.dim()), key=lambda d: order[d])
    return t.permute(order).contiguous().permute(back)


def padding_mask(*args, attention_mask: torch.Tensor | None = None, kv_length: int | None = None, **kwargs):
    """The ``"peftfast"`` mask builder: the 2-D padding mask (or None), as transformers' flash-attention builder.

    Eager: that builder itself (it returns None for an all-ones mask, reading the mask on the host). Under
    ``torch.compile`` the mask is only sliced to the last ``kv_length`` keys, never read: an all-ones mask reaches
    the attention function, which turns it into segment ids like any other (same result, no graph break).
    """
    if not torch.compiler.is_compiling():
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        flash_mask = ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"]
        return flash_mask(*args, attention_mask=attention_mask, kv_length=kv_length, **kwargs)
    if attention_mask is None or kv_length is None:
        return attention_mask
    return attention_mask[:, -kv_length:]


def register() -> None:
    """Register ``"peftfast"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, peftfast_attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)


def base_model_of(model: nn.Module) -> nn.Module | None:
    """The transformers ``PreTrainedModel`` inside ``model`` (a PeftModel's base), or None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner if hasattr(inner, "set_attn_implementation") else None


# the attribute names transformers gives decoder cross-attention (BART, mBART, Marian, Pegasus, M2M100/NLLB,
# Whisper, Speech2Text, Moonshine, MusicGen: encoder_attn; BERT-style decoders: crossattention; T5: EncDecAttention)
_CROSS_NAMES = ("encoder_attn", "crossattention", "cross_attn", "cross_attention", "encdecattention",
                "encoder_decoder_attention")


def is_cross_attention(name: str) -> bool:
    """The module at dotted ``name`` is a decoder's cross-attention (its keys come from the encoder)."""
    return name.rsplit(".", 1)[-1].lower() in _CROSS_NAMES


def _calls_interface(model: nn.Module) -> bool:
    """Some method of a module class of ``model`` reads transformers' ``ALL_ATTENTION_FUNCTIONS`` (a global name
    of its code: the forward itself, or a helper it delegates to); only the model families' own classes are read
    (not PreTrainedModel, which names it to switch implementations, nor torch's or PEFT's)."""
    return any(_class_calls_interface(type(m)) for m in model.modules())


def _class_calls_interface(cls: type) -> bool:
    """A method of ``cls`` or of a transformers class it inherits from reads ``ALL_ATTENTION_FUNCTIONS``."""
    return _reads_interface(cls, tuple(k.__module__ for k in cls.__mro__))


@functools.cache
def _reads_interface(cls: type, modules: tuple[str, ...]) -> bool:
    """(cached per class and the modules its bases say they come from)"""
    for k in cls.__mro__:
        if not k.__module__.startswith("transformers.models."):
            continue
        for fn in vars(k).values():
            fn = getattr(fn, "__func__", fn)  # classmethods and staticmethods
            code = getattr(inspect.unwrap(fn), "__code__", None) if callable(fn) else None
            if code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names:
                return True
    return False


def why_not(inner: nn.Module) -> str | None:
    """None when ``inner`` (a transformers ``PreTrainedModel``) computes its attention through transformers'
    ``AttentionInterface`` with flash-style inputs, else the reason the peftfast attention would not serve it.

    ``_supports_attention_backend`` is True on the classes transformers vouches for and False where a model
    computes its own attention; the many that never set it (BART, Whisper, Marian, Qwen3.5, StableLM, ...) inherit
    ``PreTrainedModel``'s False, so for those the model's own code decides: some attention module must call the
    interface, and the model must accept flash attention; T5 and its copies (``POSITION_BIAS_FAMILIES``) declare
    ``_supports_flash_attn = False`` for the position bias they add to the scores, which the kernel adds itself.
    """
    cls = type(inner)
    name = cls.__name__
    own = f"{name} computes its own attention (not through transformers' AttentionInterface)"
    if not getattr(cls, "_supports_attention_backend", False):
        declared = next((k for k in cls.__mro__ if "_supports_attention_backend" in vars(k)), None)
        if declared is not None and declared.__name__ != "PreTrainedModel":
            return own  # the model says so itself
        if not _calls_interface(inner):
            return own
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if getattr(cls, "_supports_flash_attn", True) is False and model_type not in POSITION_BIAS_FAMILIES:
        # the flash-attention mask builder, which the peftfast implementation uses, gives a 2-D padding mask only
        return (f"{name} declares no flash-style attention (_supports_flash_attn=False: its scores or masks need "
                "more than a padding mask, e.g. Gemma 3's bidirectional image tokens, Doge's dynamic mask)")
    if getattr(getattr(inner, "config", None), "alibi", False) is True:
        # Falcon-RW and the like fold their ALiBi bias into the 4-D mask, which the flash-style mask builder drops
        return f"{name} adds ALiBi position biases through its 4-D attention mask (config.alibi=True)"
    for n, m in inner.named_modules():
        # a decoder's self-attention left is_causal=False (Pegasus-X) is causal only through a 4-D mask, which the
        # flash-style path never gets: it would attend to later tokens
        if getattr(m, "is_decoder", False) is True and getattr(m, "is_causal", None) is False \
                and not is_cross_attention(n):
            return f"{n} is a decoder self-attention with is_causal=False (its causality lives in a 4-D mask)"
    return None


def install(model: nn.Module, backend: str) -> str | None:
    """Switch the model to the peftfast attention; None on success, else the reason it stays as it is."""
    inner = base_model_of(model)
    if inner is None:
        return "not a transformers model (no set_attn_implementation)"
    why = why_not(inner)
    if why is not None:
        return why
    register()
    previous = inner.config._attn_implementation
    if previous != NAME:
        try:
            inner.set_attn_implementation(NAME)
        except Exception as exc:  # the architecture does not take attention implementations by name
            return f"{type(inner).__name__} refuses a custom attention implementation ({type(exc).__name__})"
        model.__dict__["_peftfast_attn_previous"] = previous
    # stacks that keep a copy of the config (T5's encoder and decoder under transformers 5.17) are not switched by
    # set_attn_implementation there: switched here, each restored by uninstall
    switched = model.__dict__.setdefault("_peftfast_attn_subconfigs", [])
    seen = {id(inner.config)}
    for m in inner.modules():
        cfg = getattr(m, "config", None)
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
            continue
        seen.add(id(cfg))
        old = cfg._attn_implementation
        if old != NAME and old == previous:
            cfg._attn_implementation = NAME
            switched.append((cfg, old))
    def attention_like(m: nn.Module) -> bool:
        return hasattr(m, "is_causal") or type(m).__name__.endswith("Attention")

    inclusive = _inclusive_window_stacks(inner)
    for name, m in inner.named_modules():
        if attention_like(m):
            m.__dict__["_peftfast_attn_backend"] = backend
            stack = next((s for s in inclusive if name.startswith(s + ".") or not s), None)
            sw = getattr(getattr(m, "config", None), "sliding_window", None)
            if stack is not None and isinstance(sw, int) and sw > 0 and not getattr(m, "is_causal", False):
                m.__dict__["_peftfast_bidir_window"] = sw
            if is_cross_attention(name):
                m.__dict__["_peftfast_cross"] = True
            # stats up front (outside any compiled region) for the modules the attention function is called with:
            # the innermost ones (BERT's BertAttention only wraps BertSelfAttention, which gets the calls)
            # (not those that compute their own, as LongT5's local encoder attention: they never call it)
            if not any(attention_like(c) for c in m.modules() if c is not m) and _class_calls_interface(type(m)):
                m.__dict__.setdefault("_peftfast_attn", AttentionStats())
    return None


def dropped_softcap(model: nn.Module) -> str | None:
    """A note where the implementation ``install`` replaced was SDPA on a model whose attention softcaps its logits.

    transformers' SDPA path takes ``softcap`` and drops it (Gemma 2, T5Gemma and VaultGemma default to SDPA under
    transformers 5.17; later releases refuse SDPA for them). The fused kernel, and its fallback, apply the softcap,
    as eager and flash attention do: the patched losses follow eager attention, not the unpatched SDPA run's.
    """
    if model.__dict__.get("_peftfast_attn_previous") != "sdpa" or (inner := base_model_of(model)) is None:
        return None
    if not _sdpa_drops_softcap():  # it refuses it (later transformers): the unpatched model did not run at all
        return None
    found = (getattr(m, "attn_logit_softcapping", None) for m in inner.modules())
    caps = sorted({float(c) for c in found if isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0})
    if not caps:
        return None
    return (f"attention: the model ran 'sdpa', which ignores attn_logit_softcapping={', '.join(map(str, caps))}; the "
            "fused kernel applies it, as eager attention does, so losses follow eager attention, not the unpatched "
            "SDPA run")


def _sdpa_drops_softcap() -> bool:
    """Whether transformers' registered SDPA function runs with a ``softcap`` (dropping it) rather than refusing it:
    asked of the function itself, on one 1 x 8 query, since the answer changed between releases."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    probe = nn.Module()
    probe.is_causal = False
    q = torch.zeros(1, 1, 1, 8)
    try:
        ALL_ATTENTION_FUNCTIONS["sdpa"](probe, q, q, q, None, dropout=0.0, scaling=1.0, softcap=1.0)
    except Exception:
        return False
    return True


def uninstall(model: nn.Module) -> None:
    previous = model.__dict__.pop("_peftfast_attn_previous", None)
    for cfg, old in model.__dict__.pop("_peftfast_attn_subconfigs", []):
        cfg._attn_implementation = old
    inner = base_model_of(model)
    if inner is None:
        return
    if previous is not None:
        try:
            inner.set_attn_implementation(previous)
        except Exception:  # a setting this transformers refuses to set now (e.g. Gemma 2's SDPA, set by hand)
            for m in inner.modules():
                cfg = getattr(m, "config", None)
                if cfg is not None and getattr(cfg, "_attn_implementation", None) == NAME:
                    cfg._attn_implementation = previous
    for m in inner.modules():
        m.__dict__.pop("_peftfast_attn_backend", None)
        m.__dict__.pop("_peftfast_bidir_window", None)
        m.__dict__.pop("_peftfast_cross", None)
        m.__dict__.pop("_peftfast_attn", None)
