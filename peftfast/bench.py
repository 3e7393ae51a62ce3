"""Exact measurements (saved-activation bytes, work ops) and the ``peftfast bench`` training comparison.

``peftfast bench`` builds a random-weight model from a preset (published configs of Llama 3.2 1B, Llama 3 8B,
Mistral 7B, Qwen2.5 7B, Gemma 2 9B, BERT base; ``--layers`` truncates the depth) or a local config, or loads a local
checkpoint's weights (``--random-weights``: its shape only), and trains the
same steps on the same data with the reference (PEFT LoRA, PEFT prefix tuning, or peftfast adapters on their eager
path), with peftfast, and with the installed baselines (``peft+compile``, Liger, Unsloth). Each variant first runs alone
(one model alive at a time: its memory is its own). On CPU (``--interleave``, the default there) the timed steps
then run in turn, one step of each variant after the other with every model alive and each on its own RNG stream,
so the load of other processes on a shared machine slows them alike (run one after the other, the tokens/s ratio
of the tiny default moved between 0.8x and 1.36x in three runs; in turn, 1.03x-1.06x). It reports tokens/s
(median, p20-p80 over the timed steps), memory (CUDA allocator peak; on CPU the exact saved-activation bytes and the
process RSS peak) and the loss agreement with the reference. ``--batch-size auto``
(CUDA only) takes the largest power-of-two batch at which one reference step fits; on CPU it is refused.

Saved activations are counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd keeps for
backward, parameters and buffers excluded, deduplicated by storage (a storage saved twice is held once). Work ops are
aten ops seen by a ``TorchDispatchMode`` that are neither views nor bare allocations, plus Triton launches (the aten
ops a launch dispatches inside the CPU interpreter are not counted: on a GPU a launch is one op).
"""

from __future__ import annotations

import copy
import csv
import ctypes
import functools
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peftfast.ops import _counters
from peftfast.patching.core import DEFAULT_RECOMPUTE

_ALLOC_ONLY = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
_NO_WORK = {"detach", "alias", "lift_fresh", "_local_scalar_dense_noop"}


# ----------------------------------------------------------------------------------------------------------------
# exact counters
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SavedBytes:
    total: int
    by_shape: dict[str, int]


def saved_activation_bytes(fn: Callable[[], object],
                           exclude: list[torch.Tensor] | tuple = ()) -> tuple[object, SavedBytes]:
    """Run ``fn`` (a forward) and measure what autograd still keeps for backward when it returns, without
    ``exclude`` (parameters): each storage once, however many saved tensors view it.

    A tensor saved by a node that is gone by then (a graph branch the forward discarded, e.g. a norm computed and
    detached) is not kept and not counted; since its storage may have been freed and its address reused, storages
    are told apart by what is alive at the end, not by the address they had when saved.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    held: list[tuple[weakref.ref, str]] = []

    def pack(t: torch.Tensor):
        # detached, not t itself: a saved *output* returned as-is makes a node -> tensor -> grad_fn cycle through
        # C++ that Python's gc cannot break, leaking the whole graph (and every weight it saved) when the forward
        # is not followed by a backward; the detached view shares the storage, so backward is unchanged. The
        # graph holds this detached tensor exactly as long as the node that saved it.
        d = t.detach()
        if t.untyped_storage().data_ptr() not in skip:
            held.append((weakref.ref(d), f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}"))
        return d

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    seen: dict[int, int] = {}
    shapes: Counter[str] = Counter()
    for ref, shape in held:
        d = ref()
        if d is None:
            continue
        st = d.untyped_storage()
        ptr = st.data_ptr()  # alive storages do not share addresses (empty ones hold no bytes)
        if ptr not in seen and st.nbytes() > 0:
            seen[ptr] = st.nbytes()
            shapes[shape] += st.nbytes()
    return out, SavedBytes(total=sum(seen.values()), by_shape=dict(shapes))


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _counters.inside_launch() and not func.is_view:
            name = func.overloadpacket.__name__
            if name not in _ALLOC_ONLY and name not in _NO_WORK:
                self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class OpCount:
    aten: Counter = field(default_factory=Counter)
    launches: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.launches.values())


def count_work_ops(fn: Callable[[], object]) -> tuple[object, OpCount]:
    """Run ``fn`` and count its work ops (aten ops that are neither views nor bare allocations, plus launches)."""
    counter = _OpCounter()
    with _counters.count_launches() as launches, counter:
        out = fn()
    return out, OpCount(aten=counter.ops, launches=Counter(launches))


# ----------------------------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """A model shape (random init, no weights): a transformers config class, its fields, default batch x seq."""

    config_class: str
    fields: dict
    seq_len: int
    batch_size: int
    source: str


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# the published configs' numbers (meta-device parameter counts equal the published totals; tests check them)
PRESETS: dict[str, Preset] = {
    # default: Llama-shaped, small enough to train a few steps on a 2-core CPU in seconds
    "tiny": Preset("LlamaConfig", dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                       max_position_embeddings=4096), 128, 2, "built-in"),
    # one decoder layer of Llama-3.2-1B widths with a small vocabulary
    "llama-layer": Preset("LlamaConfig", dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=1,
                                              num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
                                              max_position_embeddings=4096), 64, 1, "built-in"),
    "llama-3.2-1b": Preset("LlamaConfig", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True), 1024, 2,
        "meta-llama/Llama-3.2-1B (1,235,814,400 parameters)"),
    "llama-3-8b": Preset("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False), 1024, 2, "meta-llama/Meta-Llama-3-8B (8,030,261,248 parameters)"),
    "mistral-7b": Preset("MistralConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=32000, max_position_embeddings=32768, sliding_window=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False), 1024, 2, "mistralai/Mistral-7B-v0.1 (7,241,732,096 parameters)"),
    "qwen2.5-7b": Preset("Qwen2Config", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False), 1024, 2, "Qwen/Qwen2.5-7B (7,615,616,512 parameters)"),
    # one packed gate_up_proj and one qkv_proj per layer (the packed LoRA-MLP op)
    "phi-3-mini": Preset("Phi3Config", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        vocab_size=32064, max_position_embeddings=4096, original_max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-5, sliding_window=2047, tie_word_embeddings=False, pad_token_id=32000, bos_token_id=1,
        eos_token_id=32000), 1024, 2, "microsoft/Phi-3-mini-4k-instruct (3,821,079,552 parameters)"),
    "gemma-2-9b": Preset("Gemma2Config", dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
        head_dim=256, vocab_size=256000, max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6, tie_word_embeddings=True), 1024, 2, "google/gemma-2-9b (9,241,705,984 parameters)"),
    # mixtures of experts: LoRA on the attention's linears and on the expert stacks (target_parameters), which
    # PEFT adapts only without LoRA dropout (--dropout 0)
    "tiny-moe": Preset("Qwen3MoeConfig", dict(hidden_size=256, intermediate_size=704, moe_intermediate_size=128,
                                              num_experts=16, num_experts_per_tok=4, num_hidden_layers=4,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                              vocab_size=1024, max_position_embeddings=4096), 128, 2, "built-in"),
    "tiny-gpt-oss": Preset("GptOssConfig", dict(hidden_size=256, intermediate_size=256, num_local_experts=16,
                                                num_experts_per_tok=4, num_hidden_layers=4, num_attention_heads=4,
                                                num_key_value_heads=2, head_dim=64, vocab_size=1024,
                                                sliding_window=64, max_position_embeddings=4096), 128, 2,
                           "built-in"),
    "qwen3-30b-a3b": Preset("Qwen3MoeConfig", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False), 1024, 2, "Qwen/Qwen3-30B-A3B (30,532,122,624 parameters)"),
    # biased, transposed expert stacks with gpt-oss's interleaved clamped SwiGLU; attention sinks; YaRN RoPE
    "gpt-oss-20b": Preset("GptOssConfig", dict(
        hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
        head_dim=64, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088, sliding_window=128,
        max_position_embeddings=131072, rope_theta=150000.0, attention_bias=True, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                 "beta_slow": 1.0, "truncate": False,
                                                 "original_max_position_embeddings": 4096}), 1024, 2,
        "openai/gpt-oss-20b (20,914,757,184 parameters)"),
    "mixtral-8x7b": Preset("MixtralConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False), 1024, 2,
        "mistralai/Mixtral-8x7B-v0.1 (46,702,792,704 parameters)"),
    "bert-base": Preset("BertConfig", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=30522,
        max_position_embeddings=512, type_vocab_size=2), 512, 8,
        "google-bert/bert-base-uncased (BertForMaskedLM: 109,514,298 parameters)"),
    # encoder-decoder LMs: --seq-len is the source length, --target-len the target's (default a quarter of it)
    "t5-base": Preset("T5Config", dict(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12,
        relative_attention_num_buckets=32, dropout_rate=0.1, feed_forward_proj="relu", decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1), 512, 4, "google-t5/t5-base (T5ForConditionalGeneration: 222,903,552 "
        "parameters)"),
    "bart-base": Preset("BartConfig", dict(
        vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
        decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2), 512, 4,
        "facebook/bart-base (BartForConditionalGeneration: 139,420,416 parameters)"),
    # speech encoder-decoders: the source is a 30 s log-mel window (2 frames per encoder position, --seq-len fixed
    # at the encoder's positions), the target transcript tokens (--target-len, default 128)
    "whisper-small": Preset("WhisperConfig", dict(
        vocab_size=51865, num_mel_bins=80, d_model=768, encoder_layers=12, decoder_layers=12,
        encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
        max_source_positions=1500, max_target_positions=448, pad_token_id=50257, bos_token_id=50257,
        eos_token_id=50257, decoder_start_token_id=50258), 1500, 4,
        "openai/whisper-small (WhisperForConditionalGeneration: 241,734,912 parameters)"),
    "whisper-large-v3": Preset("WhisperConfig", dict(
        vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=32,
        encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
        max_source_positions=1500, max_target_positions=448, pad_token_id=50256, bos_token_id=50257,
        eos_token_id=50257, decoder_start_token_id=50258), 1500, 4,
        "openai/whisper-large-v3 (WhisperForConditionalGeneration: 1,543,490,560 parameters)"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("lora", "qlora", "dora", "qdora", "adapter", "prefix")
LORA_METHODS = ("lora", "qlora", "dora", "qdora")  # PEFT LoRA adapters (dora, qdora: use_dora=True)
BASELINES = ("peft", "peft+compile", "liger", "unsloth")
# model types trained as masked LMs; every other config is built as a causal LM
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "deberta", "deberta-v2"}
# encoder-decoders kinds: text (ids in, "seq2seq") and speech (log-mel features in, "speech")
SEQ2SEQ_KINDS = ("seq2seq", "speech")


def _is_encoder(hf) -> bool:
    """A masked-LM encoder (BERT-like, ModernBERT, NomicBERT, ...): one of :data:`ENCODER_TYPES`, or a model type
    transformers builds as a masked LM and not as a causal LM (BERT and RoBERTa are both, hence the list)."""
    mt = getattr(hf, "model_type", "")
    if mt in ENCODER_TYPES:
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES and mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


class BenchError(ValueError):
    """A bad ``peftfast bench`` request (reported as one line, exit code 2)."""


@dataclass
class BenchConfig:
    model: str = "tiny"
    method: str = "lora"
    steps: int = 5
    rank: int = 16
    dropout: float = 0.05
    targets: str = "all-linear"  # LoRA target modules (lora/qlora): all-linear or comma-separated module names
    seq_len: int | None = None
    target_len: int | None = None  # encoder-decoder models: the target length (None: a quarter of seq_len, >= 2)
    batch_size: int | str | None = None  # an int, "auto" (CUDA only) or None (the preset's)
    layers: int | None = None
    packed: bool = False  # documents of 25-100% of seq_len packed per row (position_ids restart at 0)
    padded: bool = False  # the same documents one per row, right-padded (attention_mask): packing's comparison
    grad_ckpt: bool = False
    fuse_loss: bool = True  # patch(fuse_loss=True) for causal LMs: the loss never materialises the logits
    # patch(recompute=...) settings, one peftfast row each: the first is labelled "peftfast", the others
    # "peftfast recompute=<setting>"
    recompute: tuple[str, ...] = ("up", "norms", "attn", "mlp")
    baselines: tuple[str, ...] = ("peft",)
    dtype: str = "fp32"
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    compile_backend: str = "inductor"
    num_virtual_tokens: int = 16
    force: bool = False  # skip the memory fit check
    # timed steps taken in turn by every variant at once (None: on CPU, where other load comes and goes, when all
    # the variants fit in memory together); memory is still measured with each variant alone
    interleave: bool | None = None
    random_weights: bool = False  # a local checkpoint's shape only: its weights are not loaded


@dataclass
class MethodResult:
    method: str
    step_ms_median: float
    step_ms_p20: float
    step_ms_p80: float
    tokens_per_s: float  # median over the timed steps
    tokens_per_s_p20: float
    tokens_per_s_p80: float
    saved_mb: float | None  # exact saved-activation bytes of one step (None: not measured, e.g. compiled)
    saved_hvec_per_token_layer: float | None
    work_ops_per_step: int | None
    peak_mb: float | None  # CUDA: allocator peak during training; CPU: process RSS at its highest over the steps
    peak_kind: str
    losses: list[float]
    max_abs_loss_diff_vs_peft: float = 0.0  # against the reference run (PEFT; eager adapters for --method adapter)
    max_rel_loss_diff_vs_peft: float = 0.0


@dataclass
class Setup:
    """What a run is built from, resolved once from the config."""

    hf: object  # the transformers config (depth already truncated)
    kind: str  # "decoder", "encoder", "seq2seq" or "speech" (an encoder-decoder over log-mel features)
    name: str
    full_layers: int
    seq: int
    batch: int | str
    target: int | None = None  # encoder-decoders: the target length
    estimate: dict = field(default_factory=dict)
    report: str = ""
    layer_counts: tuple | None = None  # meta-device counts at 1 and 2 layers (estimate_bytes)
    weights: str | None = None  # a local checkpoint directory whose weights every variant loads (None: random init)
    notes: list[str] = field(default_factory=list)  # what the run left out, with the reason (printed as notes)


# ----------------------------------------------------------------------------------------------------------------
# resolving and checking the request
# ----------------------------------------------------------------------------------------------------------------
# what makes a directory a checkpoint (weights beside config.json), in the file names transformers saves
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def checkpoint_weights(model: str) -> str | None:
    """``model`` when it is a local directory holding a transformers checkpoint's weights, else None."""
    if os.path.isdir(model) and any(os.path.isfile(os.path.join(model, f)) for f in _WEIGHT_FILES):
        return model
    return None


def _load_config(model: str):
    """A preset's config, or a local HF config directory / JSON file / checkpoint (never the network)."""
    import transformers

    if model in PRESETS:
        p = PRESETS[model]
        return getattr(transformers, p.config_class)(**p.fields), p
    if not os.path.exists(model):
        raise BenchError(f"unknown preset {model!r}; choose one of: {', '.join(PRESETS)} "
                         "(or give a local config directory or JSON file)")
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        raise BenchError(f"{model} is a directory without config.json")
    try:
        hf = transformers.AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/JSONDecodeError/validation errors
        raise BenchError(f"cannot read a transformers config from {model}: {_one_line(exc)}") from None
    return hf, None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# an encoder-decoder config's decoder depth (its num_hidden_layers is the encoder's)
_DECODER_LAYERS = ("num_decoder_layers", "decoder_layers")


def _set_layers(hf, layers: int) -> None:
    """Cut ``hf`` to ``layers`` layers (per stack: an encoder-decoder's encoder and decoder alike)."""
    hf.num_hidden_layers = layers
    if isinstance(getattr(hf, "layer_types", None), list):  # per-layer attention kinds (Gemma 2, Qwen2, ...)
        hf.layer_types = (hf.layer_types * layers)[:layers]
    if getattr(hf, "is_encoder_decoder", False):
        for name in _DECODER_LAYERS:
            if isinstance(getattr(hf, name, None), int):
                setattr(hf, name, layers)


def _truncate(hf, layers: int | None) -> int:
    full = getattr(hf, "num_hidden_layers", None)
    if not isinstance(full, int) or full < 1:
        raise BenchError(f"config {type(hf).__name__} has no num_hidden_layers; it is not a transformer peftfast "
                         "bench can build")
    if getattr(hf, "is_encoder_decoder", False):
        dec = next((getattr(hf, n) for n in _DECODER_LAYERS if isinstance(getattr(hf, n, None), int)), full)
        if dec != full:
            raise BenchError(f"{type(hf).__name__} has {full} encoder and {dec} decoder layers: bench builds "
                             "encoder-decoder models with equal depths")
    if layers is not None:
        if not 1 <= layers <= full:
            raise BenchError(f"--layers must be in 1..{full} for this model, got {layers}")
        _set_layers(hf, layers)
    return full


def _check_shape(hf, kind: str, seq: int, batch: int | str) -> None:
    hidden, heads = getattr(hf, "hidden_size", None), getattr(hf, "num_attention_heads", None)
    if not isinstance(hidden, int) or not isinstance(heads, int) or hidden < 1 or heads < 1:
        raise BenchError(f"impossible shape: hidden_size={hidden}, num_attention_heads={heads}")
    if getattr(hf, "head_dim", None) is None and hidden % heads:
        raise BenchError(f"impossible shape: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    kv = getattr(hf, "num_key_value_heads", None) or heads
    if heads % kv:
        raise BenchError(f"impossible shape: num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv}")
    if seq < 2 or (isinstance(batch, int) and batch < 1):
        raise BenchError(f"impossible shape: batch {batch} x seq {seq}")
    max_pos = getattr(hf, "max_position_embeddings", None)
    if kind in ("encoder", *SEQ2SEQ_KINDS) and isinstance(max_pos, int) and seq > max_pos:
        raise BenchError(f"impossible shape: seq {seq} > max_position_embeddings {max_pos} of this "
                         f"{'encoder' if kind == 'encoder' else 'encoder-decoder'}")


def resolve(cfg: BenchConfig) -> Setup:
    """Check the request and resolve the model config, its depth and the batch shape; raises ``BenchError``."""
    if cfg.method not in METHODS:
        raise BenchError(f"unknown method {cfg.method!r}; choose one of: {', '.join(METHODS)}")
    if cfg.dtype not in DTYPES:
        raise BenchError(f"unknown dtype {cfg.dtype!r}; choose one of: {', '.join(DTYPES)}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but no CUDA GPU is available")
    if cfg.steps < 1:
        raise BenchError("--steps must be at least 1")
    if not 1 <= cfg.rank <= 256:
        raise BenchError(f"--rank must be in 1..256, got {cfg.rank}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise BenchError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.targets != "all-linear" and cfg.method not in LORA_METHODS:
        raise BenchError(f"--targets applies to --method lora, qlora, dora and qdora, not {cfg.method}")
    if not _target_list(cfg.targets) and cfg.targets != "all-linear":
        raise BenchError("--targets needs all-linear or module names, e.g. q_proj,v_proj")
    if cfg.num_virtual_tokens < 1:
        raise BenchError(f"--num-virtual-tokens must be at least 1, got {cfg.num_virtual_tokens}")
    unknown = [b for b in cfg.baselines if b not in BASELINES]
    if unknown:
        raise BenchError(f"unknown baseline {unknown[0]!r}; choose from: {', '.join(BASELINES)}")
    if cfg.method == "qdora" and importlib.util.find_spec("bitsandbytes") is None:
        raise BenchError("--method qdora needs bitsandbytes (PEFT's DoRA reads bitsandbytes' NF4 Linear4bit, not "
                         "peftfast.quantize_base's layers): pip install bitsandbytes")
    if cfg.batch_size == "auto" and not cfg.device.startswith("cuda"):
        raise BenchError("--batch-size auto needs a CUDA GPU (it tries powers of two until out of memory); "
                         "give a number on CPU")
    hf, preset = _load_config(cfg.model)
    kind = ("speech" if isinstance(getattr(hf, "num_mel_bins", None), int) else "seq2seq") \
        if getattr(hf, "is_encoder_decoder", False) else \
        "encoder" if _is_encoder(hf) else "decoder"
    full = _truncate(hf, cfg.layers)
    seq = cfg.seq_len or (preset.seq_len if preset else 128)
    if kind == "speech":
        # the encoder takes its whole window, 2 log-mel frames per position (30 s: 3000 frames, 1500 positions)
        positions = getattr(hf, "max_source_positions", None)
        if not isinstance(positions, int) or positions < 1:
            raise BenchError(f"{type(hf).__name__} has no max_source_positions: bench cannot size its audio input")
        if cfg.seq_len not in (None, positions):
            raise BenchError(f"--seq-len {cfg.seq_len}: {type(hf).__name__}'s encoder takes a fixed window of "
                             f"{positions} positions ({2 * positions} log-mel frames); omit --seq-len")
        seq = positions
    batch = cfg.batch_size or (preset.batch_size if preset else 2)
    _check_shape(hf, kind, seq, batch)
    target = None
    if cfg.target_len is not None and kind not in SEQ2SEQ_KINDS:
        raise BenchError("--target-len applies to encoder-decoder models (T5, BART, Whisper, ...) only")
    if kind in SEQ2SEQ_KINDS:
        target = cfg.target_len or (min(128, hf.max_target_positions) if kind == "speech" else max(2, seq // 4))
        if target < 2:
            raise BenchError(f"impossible shape: --target-len {target} (at least 2)")
        max_target = getattr(hf, "max_target_positions", None)
        if isinstance(max_target, int) and target > max_target:
            raise BenchError(f"impossible shape: --target-len {target} > max_target_positions {max_target}")
        _check_shape(hf, kind, target, batch)
        for flag, on in (("--packed", cfg.packed), ("--padded", cfg.padded)):
            if on:
                raise BenchError(f"{flag} needs a decoder-only model (bench packs causal documents)")
        if cfg.method not in LORA_METHODS:
            raise BenchError(f"--method {cfg.method} is benchmarked on decoder or encoder models; encoder-decoder "
                             "models take lora, qlora, dora or qdora")
    if cfg.packed and cfg.padded:
        raise BenchError("--packed and --padded are two layouts of the same documents: choose one per run")
    if cfg.packed and kind == "encoder":
        raise BenchError("--packed needs a decoder model (an encoder's attention has no causal packing)")
    if cfg.padded and kind == "encoder":
        raise BenchError("--padded is the unpacked comparison of --packed, for decoder models")
    if (cfg.packed or cfg.padded) and seq < 4:
        raise BenchError(f"--{'packed' if cfg.packed else 'padded'} needs --seq-len of at least 4, got {seq}")
    if cfg.method == "prefix" and kind == "encoder":
        raise BenchError("--method prefix is benchmarked on decoder models only")
    if cfg.method == "prefix" and cfg.grad_ckpt:
        raise BenchError("--method prefix does not work with --grad-ckpt (PEFT refuses gradient checkpointing for "
                         "prefix tuning)")
    if cfg.method == "prefix" and cfg.packed:
        raise BenchError("--method prefix with --packed: PEFT prefix tuning passes a cache, which turns off "
                         "transformers' packed-sequence masks, so the PEFT baseline would attend across documents")
    name = cfg.model if preset else os.path.basename(os.path.normpath(cfg.model))
    weights = None if preset or cfg.random_weights else checkpoint_weights(cfg.model)
    if weights and getattr(hf, "quantization_config", None) is not None:
        qc = hf.quantization_config
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", type(qc).__name__)
        raise BenchError(f"{name} is a quantized checkpoint ({method}); bench loads full-precision weights and "
                         "quantizes them itself (--method qlora): give a full-precision checkpoint, or "
                         "--random-weights to use its shape only")
    return Setup(hf=hf, kind=kind, name=name, full_layers=full, seq=seq, batch=batch, weights=weights,
                 target=target)


# ----------------------------------------------------------------------------------------------------------------
# memory: estimate from a meta-device build, compare with what the device has
# ----------------------------------------------------------------------------------------------------------------
def available_bytes(device: str) -> int | None:
    """Free memory on ``device``: CUDA's free bytes, or the OS's MemAvailable on CPU (None if unknown)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _model_class(kind: str):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSpeechSeq2Seq,
    )

    return {"encoder": AutoModelForMaskedLM, "seq2seq": AutoModelForSeq2SeqLM,
            "speech": AutoModelForSpeechSeq2Seq}.get(kind, AutoModelForCausalLM)


_KIND_LM = {"encoder": "a masked", "decoder": "a causal", "seq2seq": "an encoder-decoder",
            "speech": "a speech encoder-decoder"}


def _meta_counts(setup: Setup, layers: int) -> tuple[int, int]:
    """(parameters, sum of in+out features of the linear layers) of the model cut to ``layers``, on the meta device."""
    hf = copy.deepcopy(setup.hf)
    _set_layers(hf, layers)
    try:
        with torch.device("meta"):
            model = _model_class(setup.kind).from_config(hf)
    except Exception as exc:  # an unsupported model type or a shape transformers rejects: bad input, one line
        raise BenchError(f"cannot build {setup.name} ({type(hf).__name__}) as {_KIND_LM[setup.kind]} LM: "
                         f"{_one_line(exc)}") from None
    linear_io = sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    return sum(p.numel() for p in model.parameters()), linear_io


def estimate_bytes(setup: Setup, cfg: BenchConfig, layers: int | None = None) -> dict:
    """Peak bytes of one run (one model is alive at a time) with ``layers`` layers (default: the setup's depth).

    Parameters are counted exactly from meta-device builds of 1 and 2 layers (every count is affine in the depth,
    so no full-size build is needed); LoRA training state (param, grad, Adam's two moments in fp32) for a rank-r
    adapter on every linear layer, which bounds adapters and prefixes too; activations at a deliberately high 64
    hidden vectors per token per layer (PEFT at dropout > 0 keeps ~55; see README), 4 with checkpointing; eager
    attention's score matrices; the logits in fp32 with their softmax and gradient.
    """
    if setup.layer_counts is None:
        setup.layer_counts = (_meta_counts(setup, 1), _meta_counts(setup, 2))
    (p1, l1), (p2, l2) = setup.layer_counts
    n = setup.hf.num_hidden_layers if layers is None else layers
    n_params, linear_io = p1 + (n - 1) * (p2 - p1), l1 + (n - 1) * (l2 - l1)
    elt = torch.finfo(DTYPES[cfg.dtype]).bits // 8
    batch = setup.batch if isinstance(setup.batch, int) else 1
    # an encoder-decoder's layers see the source, its decoder's the target (and cross-attend to the source)
    out_tokens = batch * (setup.target or setup.seq)
    tokens, hidden = batch * setup.seq + (out_tokens if setup.target else 0), setup.hf.hidden_size
    act = tokens * n * hidden * elt * (4 if cfg.grad_ckpt else 64)
    if _attn_impl(setup.hf, setup.kind) == "eager":
        act += batch * setup.hf.num_attention_heads * setup.seq ** 2 * elt * 2 * (1 if cfg.grad_ckpt else n)
    logits = out_tokens * getattr(setup.hf, "vocab_size", 0) * 4 * 3
    parts = dict(weights=n_params * elt, training_state=linear_io * cfg.rank * 4 * 4, activations=act, logits=logits)
    parts["total"] = int(sum(parts.values()) * 1.15) + 256 * 2**20  # allocator slack, runtime
    parts["params"] = n_params
    return parts


def check_fits(setup: Setup, cfg: BenchConfig) -> None:
    """Refuse (one line) a run that cannot fit in the device's free memory, suggesting ``--layers``."""
    setup.estimate = est = estimate_bytes(setup, cfg)
    free = available_bytes(cfg.device)
    if cfg.force or free is None or est["total"] <= free:
        return
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    n = setup.hf.num_hidden_layers
    fit = next((k for k in range(n - 1, 0, -1) if estimate_bytes(setup, cfg, k)["total"] <= free), None)
    where = "the GPU" if cfg.device.startswith("cuda") else "this machine"
    hint = (f"try --layers {fit} (about {gib(estimate_bytes(setup, cfg, fit)['total'])})" if fit else
            f"even --layers 1 needs about {gib(estimate_bytes(setup, cfg, 1)['total'])}: use a smaller preset "
            "or a GPU")
    raise BenchError(f"{setup.name} ({n} layers, {est['params'] / 1e9:.2f}B parameters, {cfg.dtype}) needs about "
                     f"{gib(est['total'])} but {where} has {gib(free)} free; {hint} (or --force)")


def largest_fitting_batch(try_batch: Callable[[int], None], limit: int = 4096) -> int:
    """The largest power of two ``b <= limit`` for which ``try_batch(b)`` does not run out of memory."""
    best, b = 0, 1
    while b <= limit:
        try:
            try_batch(b)
        except torch.OutOfMemoryError:
            break
        best, b = b, 2 * b
    _release_freed_memory()  # what the failed try allocated
    if best == 0:
        raise BenchError("--batch-size auto: even batch 1 runs out of memory; try --layers or --seq-len")
    return best


# ----------------------------------------------------------------------------------------------------------------
# models and data
# ----------------------------------------------------------------------------------------------------------------
def _attn_impl(hf, kind: str = "decoder") -> str:
    """The baselines' attention: SDPA where the model class takes it; transformers' eager path where SDPA has no
    logit softcapping (Gemma 2) or the class has no SDPA path at all (gpt-oss: attention sinks)."""
    if getattr(hf, "attn_logit_softcapping", None):
        return "eager"
    try:
        cls = _model_class(kind)._model_mapping[type(hf)]
    except Exception:  # a config the auto class does not map: from_config says so itself
        return "sdpa"
    return "sdpa" if getattr(cls, "_supports_sdpa", True) else "eager"


def _checkpoint_activations(model) -> None:
    """HF gradient checkpointing, non-reentrant: ``activation_checkpointing_enable`` where transformers has it (5.2x
    deprecates ``gradient_checkpointing_enable`` with a FutureWarning), the older name elsewhere (5.17)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _base_model(setup: Setup, cfg: BenchConfig):
    torch.manual_seed(cfg.seed)  # every variant starts from the same weights (and the same LoRA initialisation)
    if setup.weights:
        model = _load_checkpoint(setup, cfg)
    else:
        with torch.device(cfg.device):
            model = _model_class(setup.kind).from_config(copy.deepcopy(setup.hf), dtype=DTYPES[cfg.dtype],
                                                          attn_implementation=_attn_impl(setup.hf, setup.kind))
    model.config.use_cache = False
    if cfg.grad_ckpt:
        _checkpoint_activations(model)
    return model


def _load_checkpoint(setup: Setup, cfg: BenchConfig):
    """The checkpoint's weights in the (possibly truncated) config's model, on ``cfg.device`` in ``cfg.dtype``; the
    layers ``--layers`` cut off are not loaded, and weights the checkpoint lacks (e.g. an MLM head over a bare
    encoder) keep their seeded random initialisation, as transformers reports."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the truncated layers' weights are "unused" by design
    hf_logging.disable_progress_bar()  # one load per variant: bench's own progress line says what runs
    try:
        return _model_class(setup.kind).from_pretrained(
            setup.weights, config=copy.deepcopy(setup.hf), dtype=DTYPES[cfg.dtype], local_files_only=True,
            attn_implementation=_attn_impl(setup.hf, setup.kind), device_map=cfg.device)
    except Exception as exc:  # a broken or foreign checkpoint: bad input, one line
        raise BenchError(f"cannot load the weights of {setup.weights}: {_one_line(exc)} (--random-weights uses its "
                         "shape only)") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _wrap(model, setup: Setup, cfg: BenchConfig):
    """The method's unpatched form: PEFT LoRA / PEFT prefix tuning / peftfast adapters on the eager path."""
    import peftfast

    if cfg.method == "adapter":
        peftfast.add_adapters(model, peftfast.AdapterConfig(bottleneck_size=cfg.rank))
        peftfast.set_adapter_backend(model, fused=False)
        return model
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    # speech: no task type (PEFT's seq2seq wrapper hands the model input_ids, which Whisper does not take)
    task = {"decoder": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}.get(setup.kind)
    if cfg.method == "prefix":
        method = PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
    else:
        targets = "all-linear" if cfg.targets == "all-linear" else _target_list(cfg.targets)
        stacks, why = _expert_stacks(model, cfg)
        if why is not None:
            note = f"expert stacks ({', '.join(stacks)}) stay frozen: {why}"
            if note not in setup.notes:
                setup.notes.append(note)
            # PEFT's all-linear also wraps MoE parameters (expert stacks, routers), which refuse LoRA dropout and
            # DoRA: name the linear layers instead
            stacks, targets = [], _linear_leaves(model)
        method = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=cfg.dropout,
                            target_modules=targets, task_type=task, use_dora=cfg.method in ("dora", "qdora"),
                            **({"target_parameters": stacks} if stacks else {}))
        if cfg.method == "qdora":
            _to_bnb_nf4(model, cfg)
    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated ``is_gradient_checkpointing``: a FutureWarning per model built that
        # would break the progress line, about code that is neither the user's nor ours
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        # and, for nested expert-stack wrappers, about its own internal per-parameter rank patterns
        warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match",
                                category=RuntimeWarning)
        try:
            model = get_peft_model(model, method)
        except ValueError as exc:  # e.g. --targets naming modules the model does not have
            raise BenchError(f"PEFT refused the adapter: {_one_line(exc)}") from None
    if cfg.method == "prefix":
        return model
    if cfg.method == "qlora":  # NF4 base weights (block 64); PEFT's own forward dequantizes them per call
        peftfast.quantize_base(model)
    return model


def _expert_stacks(model, cfg: BenchConfig) -> tuple[list[str], str | None]:
    """The mixture-of-experts stacks (3-D ``gate_up_proj`` / ``down_proj`` parameters, as ``experts.gate_up_proj``)
    that ``--targets all-linear`` adapts through PEFT's ``target_parameters``, and why PEFT cannot adapt them here
    (LoRA dropout, DoRA, NF4 bases), or None."""
    found = sorted({f"{name.rpartition('.')[2]}.{p}" for name, mod in model.named_modules() if name
                    for p in ("gate_up_proj", "down_proj")
                    if isinstance(mod._parameters.get(p), torch.Tensor) and mod._parameters[p].dim() == 3})
    if not found or cfg.targets != "all-linear":
        return [], None
    from peft import LoraConfig

    why = None
    if "target_parameters" not in getattr(LoraConfig, "__dataclass_fields__", {}):
        why = "this PEFT has no LoraConfig(target_parameters=...) (PEFT >= 0.17 adapts expert stacks)"
    elif cfg.method != "lora":
        why = f"--method {cfg.method}: PEFT adapts expert stacks with plain LoRA only"
    elif cfg.dropout:
        why = f"PEFT adapts expert stacks only without LoRA dropout (--dropout {cfg.dropout:g}; pass --dropout 0)"
    return found, why


def _linear_leaves(model) -> list[str]:
    """The child names of every ``nn.Linear`` but the output head: what ``all-linear`` means for PEFT's modules."""
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rpartition(".")[2] for name, mod in model.named_modules()
                   if isinstance(mod, nn.Linear) and mod is not head})


def _to_bnb_nf4(model, cfg: BenchConfig) -> None:
    """QDoRA's base: every linear layer LoRA will target (all but the output head for all-linear, else those named
    by ``--targets``) as a bitsandbytes NF4 ``Linear4bit`` (block 64, compute in ``--dtype``), quantized on the move
    to the device, as ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4"))`` would give."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = _target_list(cfg.targets)
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is not nn.Linear or child is head or (names and child_name not in names):
                continue
            q4 = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                   compute_dtype=child.weight.dtype, quant_type="nf4", quant_storage=torch.uint8,
                                   device="meta")
            q4.weight = bnb.nn.Params4bit(child.weight.detach().to("cpu"), requires_grad=False, quant_type="nf4",
                                          quant_storage=torch.uint8)
            if child.bias is not None:
                q4.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            setattr(mod, child_name, q4.to(cfg.device))


def _target_list(targets: str) -> list[str]:
    return [t.strip() for t in targets.split(",") if t.strip()] if targets != "all-linear" else []


def _skip_reason(name: str, setup: Setup, cfg: BenchConfig) -> str | None:
    """Why baseline ``name`` cannot run here, or None."""
    import importlib.util

    if name == "peft+compile":
        if cfg.compile_backend == "inductor" and not cfg.device.startswith("cuda") and not shutil.which("g++") \
                and not shutil.which("cc"):
            return "torch.compile's inductor backend needs a C++ compiler on CPU (or pass --compile-backend)"
        return None
    pkg = {"liger": "liger_kernel", "unsloth": "unsloth"}[name]
    if importlib.util.find_spec(pkg) is None:
        return f"{pkg.replace('_', '-')} is not installed (pip install {pkg.replace('_', '-')})"
    if not cfg.device.startswith("cuda"):
        return f"{name} runs on CUDA GPUs only"
    if cfg.method != "lora":
        return f"{name} is compared with --method lora only"
    if name == "unsloth" and setup.kind != "decoder":
        return "unsloth supports decoder models only"
    if name == "liger" and setup.kind in SEQ2SEQ_KINDS:
        return "liger-kernel has no encoder-decoder models"
    return None


def _build(variant: str, setup: Setup, cfg: BenchConfig, recompute: str = DEFAULT_RECOMPUTE):
    """(module to call, module whose parameters train) for one variant (``recompute``: peftfast's setting)."""
    import peftfast

    if variant == "unsloth":
        return _build_unsloth(setup, cfg)
    base = _base_model(setup, cfg)
    if variant == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=base)
    model = _wrap(base, setup, cfg)
    if variant == "peftfast":
        if cfg.method == "adapter":
            peftfast.set_adapter_backend(model, fused=True, backend=cfg.backend)
        # the fused path of the LoRA layers, and for every method the frozen base's norms, RoPE and attention
        peftfast.patch(model, backend=cfg.backend, fuse_loss=cfg.fuse_loss, recompute=recompute)
    model.train()
    if variant == "peft+compile":
        return torch.compile(model, backend=cfg.compile_backend), model
    return model, model


def _build_unsloth(setup: Setup, cfg: BenchConfig):  # pragma: no cover - needs unsloth and a CUDA GPU
    import tempfile

    from unsloth import FastLanguageModel

    with tempfile.TemporaryDirectory() as tmp:
        base = _base_model(setup, cfg)
        base.save_pretrained(tmp)
        del base
        model, _ = FastLanguageModel.from_pretrained(tmp, max_seq_length=setup.seq, dtype=DTYPES[cfg.dtype],
                                                     load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=cfg.dropout,
        target_modules=_target_list(cfg.targets) or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"],
        use_gradient_checkpointing=cfg.grad_ckpt, random_state=cfg.seed)
    model.train()
    return model, model


def _doc_length(seq: int, gen: torch.Generator) -> int:
    """A document's length for ``--packed`` / ``--padded``: uniform over 25-100% of the sequence length."""
    return int(torch.randint(max(2, seq // 4), seq + 1, (1,), generator=gen))


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of a batch that are not padding (what tokens/s counts); an encoder-decoder batch's source and target
    tokens both count."""
    mask = batch.get("attention_mask")
    if "input_features" in batch:  # speech: one source token per encoder position (two log-mel frames)
        n = batch["input_features"].shape[0] * (batch["input_features"].shape[-1] // 2)
    else:
        n = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    if "decoder_input_ids" in batch:
        n += batch["decoder_input_ids"].numel()
    return n


def make_batches(setup: Setup, cfg: BenchConfig, batch: int, n: int = 2) -> list[dict[str, torch.Tensor]]:
    """Random token batches: causal LM or masked LM (15% of positions masked). ``packed``: rows filled with
    documents of 25-100% of the sequence length (the last one cut to fit), ``position_ids`` restarting at 0, no
    label on a document's first token; ``padded``: one such document per row, right-padded (``attention_mask``,
    no label on padding)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    vocab, seq = setup.hf.vocab_size, setup.seq
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        b: dict[str, torch.Tensor] = {"input_ids": ids}
        if setup.kind == "speech":  # log-mel features of the whole window (what a feature extractor makes: ~[-1, 1])
            feats = torch.randn(batch, setup.hf.num_mel_bins, 2 * seq, generator=gen).clamp_(-1.5, 1.5)
            b = {"input_features": feats.to(DTYPES[cfg.dtype])}
        if setup.kind in SEQ2SEQ_KINDS:
            # a source and a shorter target, with the decoder inputs a seq2seq collator prepares (the labels shifted
            # right after the decoder's start token)
            b["labels"] = torch.randint(0, vocab, (batch, setup.target), generator=gen)
            start = getattr(setup.hf, "decoder_start_token_id", None) or 0
            b["decoder_input_ids"] = torch.cat([torch.full((batch, 1), start), b["labels"][:, :-1]], dim=1)
        elif setup.kind == "encoder":
            masked = torch.rand(batch, seq, generator=gen) < 0.15
            masked[:, 0] = True  # at least one label per row
            b["labels"] = torch.where(masked, ids, torch.full_like(ids, -100))
            b["input_ids"] = torch.where(masked, torch.full_like(ids, min(103, vocab - 1)), ids)
        else:
            b["labels"] = ids.clone()
            if cfg.padded:
                mask = torch.zeros_like(ids)
                for r in range(batch):
                    mask[r, :_doc_length(seq, gen)] = 1
                b["attention_mask"] = mask
                b["input_ids"] = ids.masked_fill(mask == 0, 0)
                b["labels"] = ids.masked_fill(mask == 0, -100)
            if cfg.packed:
                pos = torch.empty_like(ids)
                for r in range(batch):
                    start = 0
                    while start < seq:
                        end = min(seq, start + _doc_length(seq, gen))
                        pos[r, start:end] = torch.arange(end - start)
                        b["labels"][r, start] = -100
                        start = end
                b["position_ids"] = pos
        out.append({k: v.to(cfg.device) for k, v in b.items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------------------
def _release_freed_memory() -> None:
    """Free what the previous run left, and hand glibc's freed pages back to the OS, so that the next run's RSS
    starts from the same floor (RSS otherwise keeps the high-water mark of every earlier run)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure_step(model, batch: dict, params) -> tuple[SavedBytes, OpCount]:
    (loss, saved) = saved_activation_bytes(lambda: model(**batch).loss, exclude=params)
    del loss
    _, ops = count_work_ops(lambda: model(**batch).loss.backward())
    model.zero_grad(set_to_none=True)
    return saved, ops


_TRAIN_SEED = 1234  # every variant trains on the same dropout RNG stream


class _Trainer:
    """One variant's optimizer and RNG stream, stepped alone or in turn with the others (``interleave``): each step
    runs under this variant's own generator state, so its losses do not depend on what ran in between."""

    def __init__(self, model, params, device: str):
        self.model, self.device = model, device
        self.opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)
        self.times: list[float] = []
        self.losses: list[float] = []
        self.rss = 0
        self._cuda = torch.device(device) if device.startswith("cuda") else None
        with torch.random.fork_rng(devices=[self._cuda] if self._cuda else [], device_type="cuda"):
            torch.manual_seed(_TRAIN_SEED)
            self._rng = self._rng_state()

    def _rng_state(self) -> tuple:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self._cuda) if self._cuda else None

    def step(self, batch: dict, timed: bool) -> None:
        with torch.random.fork_rng(devices=[self._cuda] if self._cuda else [], device_type="cuda"):
            cpu, cuda = self._rng
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self._cuda)
            _sync(self.device)
            t0 = time.perf_counter()
            loss = self.model(**batch).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            _sync(self.device)
            elapsed = time.perf_counter() - t0
            self._rng = self._rng_state()
        if timed:
            self.times.append(elapsed)
        self.losses.append(loss.detach().float().item())
        self.rss = max(self.rss, _rss_bytes() or 0)


def _bar(label: str, i: int, steps: int) -> str:
    done = round(20 * (i + 1) / (steps + 1))
    return f"{label:<13} [{'#' * done}{'.' * (20 - done)}] step {i}/{steps}"


def _train(model, params, batches, steps: int, device: str, progress: Callable[[str], None] | None,
           label: str) -> _Trainer:
    tr = _Trainer(model, params, device)
    for i in range(steps + 1):  # one warm-up step (autotuning, compilation, caches) that is not timed
        tr.step(batches[i % len(batches)], timed=i > 0)
        if progress:
            progress(_bar(label, i, steps))
    return tr


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(p20, median, p80)."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=5, method="inclusive")
    return q[0], statistics.median(xs), q[3]


def _built(variant: str, label: str, setup: Setup, cfg: BenchConfig, progress, recompute: str):
    if progress:
        progress(f"{label:<13} building the model")
    model, owner = _build(variant, setup, cfg, recompute)
    if variant == "peftfast" and not setup.report:
        setup.report = _patch_summary(owner, cfg)
    return model, owner


def _run_variant(variant: str, label: str, setup: Setup, cfg: BenchConfig, batches, tokens: list[int], progress,
                 recompute: str = DEFAULT_RECOMPUTE, steps: int | None = None) -> MethodResult:
    """One variant's training run, alone in the process (its peak memory is its own); ``tokens[i]``: the real
    (unpadded) tokens of ``batches[i]``; ``steps``: timed steps (default ``cfg.steps``)."""
    model, owner = _built(variant, label, setup, cfg, progress, recompute)
    params = [*owner.parameters(), *owner.buffers()]
    saved = ops = None
    if variant != "peft+compile":  # a compiled model's saved tensors/ops are the compiler's, not comparable
        saved, ops = _measure_step(model, batches[0], params)
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(torch.device(cfg.device))
    tr = _train(model, owner.parameters(), batches, cfg.steps if steps is None else steps, cfg.device, progress,
                label)
    peak = torch.cuda.max_memory_allocated(torch.device(cfg.device)) if cuda else tr.rss
    del model, owner, params
    _release_freed_memory()
    return _result(label, setup, cfg, tokens, len(batches), tr, saved, ops, peak, cuda)


def _result(label: str, setup: Setup, cfg: BenchConfig, tokens: list[int], n_batches: int, tr: _Trainer, saved, ops,
            peak, cuda: bool) -> MethodResult:
    elt = torch.finfo(DTYPES[cfg.dtype]).bits // 8
    times, losses = tr.times, tr.losses
    t20, tmed, t80 = _quantiles(times)
    # timed step i (after the warm-up) trained on batches[(i + 1) % n]; padding is not counted
    tps20, tpsmed, tps80 = _quantiles([tokens[(i + 1) % n_batches] / t for i, t in enumerate(times)])
    return MethodResult(
        method=label, step_ms_median=tmed * 1e3, step_ms_p20=t20 * 1e3, step_ms_p80=t80 * 1e3,
        tokens_per_s=tpsmed, tokens_per_s_p20=tps20, tokens_per_s_p80=tps80,
        saved_mb=saved.total / 2**20 if saved else None,
        saved_hvec_per_token_layer=(saved.total / (tokens[0] * setup.hf.num_hidden_layers * setup.hf.hidden_size * elt)
                                    if saved else None),
        work_ops_per_step=ops.total if ops else None, peak_mb=peak / 2**20 if peak else None,
        peak_kind="cuda allocator peak" if cuda else "process RSS peak", losses=losses)


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Train ``cfg.steps`` steps with the reference (PEFT, or eager adapters), with peftfast, and with each available
    baseline, from identical weights and data; returns the results (``format_table``/``write_outputs`` show them)."""
    with warnings.catch_warnings():
        # PEFT's prefix tuning hands transformers ``past_key_values``, which transformers 5 deprecates: a
        # FutureWarning per forward, about code that is neither the user's nor ours, would break the progress line
        warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
        return _run_bench(cfg, progress)


def _run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None) -> dict:
    import peftfast

    setup = resolve(cfg)
    check_fits(setup, cfg)
    if setup.batch == "auto":
        setup.batch = _auto_batch(setup, cfg, progress)
    _release_freed_memory()
    batches = make_batches(setup, cfg, setup.batch)
    tokens = [real_tokens(b) for b in batches]  # one host read per batch, outside every timed step
    ref_label = "eager" if cfg.method == "adapter" else "peft"
    plan = [("reference", ref_label, None)]
    # every method has rows per setting: adapters and prefix tuning keep frozen MLPs and blocks the settings change
    plan += [("peftfast", "peftfast" if i == 0 else f"peftfast recompute={r}", r) for i, r in enumerate(cfg.recompute)]
    skipped: dict[str, str] = {}
    for b in cfg.baselines:
        if b == "peft":
            continue  # the reference run
        why = _skip_reason(b, setup, cfg)
        if why:
            skipped[b] = why
        else:
            plan.append((b, b, None))
    results: list[MethodResult] = []
    setup.report = ""
    interleave = cfg.interleave
    if interleave is None:  # on CPU, where every variant's model fits in memory at once (big vocabularies do not)
        free = available_bytes(cfg.device)
        interleave = cfg.device == "cpu" and (free is None or len(plan) * setup.estimate["total"] <= 0.8 * free)
    for variant, label, recompute in plan:
        try:
            # interleaved: this pass measures memory and checks the variant runs; the timed steps come after
            results.append(_run_variant(variant, label, setup, cfg, batches, tokens, progress,
                                        recompute or DEFAULT_RECOMPUTE, steps=1 if interleave else None))
        except Exception as exc:
            if variant in ("reference", "peftfast"):
                raise
            # an optional third-party baseline that breaks is reported, not fatal
            skipped[variant] = f"failed: {type(exc).__name__}: {_one_line(exc, 200)}"
    if interleave:
        ran = {r.method for r in results}
        _interleaved(results, [(v, lb, rc) for v, lb, rc in plan if lb in ran], setup, cfg, batches, tokens,
                     progress)
    base = results[0].losses
    for r in results:
        r.max_abs_loss_diff_vs_peft = max(abs(a - b) for a, b in zip(r.losses, base))
        r.max_rel_loss_diff_vs_peft = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r.losses, base))
    return {
        "config": asdict(cfg), "model": setup.name, "kind": setup.kind, "layers": setup.hf.num_hidden_layers,
        "full_layers": setup.full_layers, "seq_len": setup.seq, "target_len": setup.target,
        "batch_size": setup.batch,
        "weights": setup.weights or "random",
        "tokens_per_step": round(statistics.mean(tokens)), "reference": ref_label,
        "device": device_name(cfg.device),
        "versions": bench_versions(), "commit": git_commit(), "report": setup.report, "skipped": skipped,
        "notes": list(setup.notes),
        "memory_estimate": setup.estimate, "peftfast_version": peftfast.__version__, "interleaved": interleave,
        "model_dropout": model_dropout(setup.hf), "results": [asdict(r) for r in results],
    }


_DROPOUT_FIELDS = ("attention_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob", "hidden_dropout",
                   "attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout", "dropout_rate", "activation_dropout")


def model_dropout(hf) -> dict[str, float]:
    """The base model's own non-zero dropout probabilities (config fields)."""
    out = {}
    for f in _DROPOUT_FIELDS:
        v = getattr(hf, f, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            out[f] = float(v)
    return out


def _interleaved(results: list[MethodResult], plan, setup: Setup, cfg: BenchConfig, batches, tokens: list[int],
                 progress) -> None:
    """Every variant alive at once, one training step each in turn (each on its own RNG stream): load changes on a
    shared machine then slow all of them alike, instead of whichever ran during a busy second. Replaces the step
    times and losses of ``results`` (same order as ``plan``); memory stays from their runs alone."""
    trainers = []
    for variant, label, recompute in plan:
        model, owner = _built(variant, label, setup, cfg, progress, recompute or DEFAULT_RECOMPUTE)
        trainers.append((owner, _Trainer(model, owner.parameters(), cfg.device)))
    for i in range(cfg.steps + 1):
        for _, tr in trainers:
            tr.step(batches[i % len(batches)], timed=i > 0)
        if progress:
            progress(_bar("all, in turn", i, cfg.steps))
    for k, (_, tr) in enumerate(trainers):
        r = results[k]
        fresh = _result(r.method, setup, cfg, tokens, len(batches), tr, None, None, None, False)
        for f in ("step_ms_median", "step_ms_p20", "step_ms_p80", "tokens_per_s", "tokens_per_s_p20",
                  "tokens_per_s_p80", "losses"):
            setattr(r, f, getattr(fresh, f))
    trainers.clear()
    _release_freed_memory()


def _auto_batch(setup: Setup, cfg: BenchConfig, progress) -> int:  # pragma: no cover - needs a CUDA GPU
    """Largest power-of-two batch at which one step of the reference (the hungrier run) fits."""
    model, owner = _build("reference", setup, cfg)

    def try_batch(b: int) -> None:
        if progress:
            progress(f"batch auto: trying {b}")
        try:
            model(**make_batches(setup, cfg, b, n=1)[0]).loss.backward()
            _sync(cfg.device)
        finally:
            owner.zero_grad(set_to_none=True)

    return largest_fitting_batch(try_batch)  # the model goes with this frame; run_bench collects it


def _patch_summary(model, cfg: BenchConfig) -> str:
    """What peftfast did to the benchmarked model."""
    import peftfast

    rep = peftfast.report(model)
    if cfg.method == "adapter":
        return (f"peftfast: bottleneck adapters on the fused op, {rep.summary().removeprefix('peftfast: ')} "
                "(reference: the same adapters on the eager path, unpatched)")
    return "; ".join([rep.summary(), *rep.notes])


# ----------------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for mod in ("triton", "transformers", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = "not installed"
    return out


def bench_versions() -> dict[str, str]:
    """``_versions`` plus Python, the platform and the optional baselines' packages."""
    import importlib.metadata
    import platform

    out = {"python": platform.python_version(), "platform": platform.platform(), **_versions()}
    for dist in ("accelerate", "trl", "liger-kernel", "unsloth"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def git_commit() -> str:
    """The short commit of the checkout this package runs from, with ``+dirty`` when tracked files differ from it
    (the figures then belong to uncommitted code), or ``unknown``."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        run = functools.partial(subprocess.run, cwd=here, capture_output=True, text=True, timeout=5)
        sha = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        if not sha:
            return "unknown"
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ----------------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------------
def _fmt(x, spec: str, na: str = "n/a") -> str:
    return na if x is None else format(x, spec)


def _ratio(a, b, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}x" if a is not None and b else ""


def format_table(res: dict) -> str:
    """The side-by-side table, the skipped baselines with their reasons, and what ``patch`` did."""
    mem_head = "peak MB" if res["results"][0]["peak_kind"].startswith("cuda") else "RSS MB"
    head = ["method", "tokens/s (p20-p80)", "step ms", "saved MB", mem_head, "work ops/step",
            f"max |Δloss| vs {res['reference']} (rel)"]
    rows = []
    for r in res["results"]:
        rows.append([r["method"], f"{r['tokens_per_s']:.0f} ({r['tokens_per_s_p20']:.0f}-{r['tokens_per_s_p80']:.0f})",
                     f"{r['step_ms_median']:.1f}", _fmt(r["saved_mb"], ".2f"), _fmt(r["peak_mb"], ".0f"),
                     _fmt(r["work_ops_per_step"], "d"),
                     f"{r['max_abs_loss_diff_vs_peft']:.2e} ({r['max_rel_loss_diff_vs_peft']:.1e})"])
    a = res["results"][0]
    for b in res["results"][1:]:  # each peftfast row against the reference
        if not b["method"].startswith("peftfast"):
            continue
        rows.append([f"ratio{b['method'].removeprefix('peftfast')}", _ratio(b["tokens_per_s"], a["tokens_per_s"]),
                     _ratio(b["step_ms_median"], a["step_ms_median"]), _ratio(b["saved_mb"], a["saved_mb"], 3),
                     _ratio(b["peak_mb"], a["peak_mb"]), _ratio(b["work_ops_per_step"], a["work_ops_per_step"]), ""])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    cfg = res["config"]
    depth = f"{res['layers']} layers" + (f" of {res['full_layers']}" if res["layers"] != res["full_layers"] else "")
    on = "" if cfg.get("targets", "all-linear") == "all-linear" else f" on {cfg['targets']}"
    what = {"lora": f"LoRA r={cfg['rank']}{on} dropout={cfg['dropout']}", "adapter": f"adapters h={cfg['rank']}",
            "qlora": f"QLoRA (NF4 base) r={cfg['rank']}{on} dropout={cfg['dropout']}",
            "dora": f"DoRA r={cfg['rank']}{on} dropout={cfg['dropout']}",
            "qdora": f"QDoRA (bitsandbytes NF4 base) r={cfg['rank']}{on} dropout={cfg['dropout']}",
            "prefix": f"prefix tuning ({cfg['num_virtual_tokens']} virtual tokens)"}[cfg["method"]]
    extras = "".join([", packed" if cfg["packed"] else "", ", padded" if cfg.get("padded") else "",
                      ", grad-ckpt" if cfg["grad_ckpt"] else ""])
    weights = "random weights" if res.get("weights", "random") == "random" else f"weights from {res['weights']}"
    shape = f"seq {res['seq_len']}" if not res.get("target_len") else \
        f"(source {res['seq_len']} + target {res['target_len']})"
    title = (f"peftfast bench: {res['model']} ({depth}, {weights}) {what} {cfg['dtype']} on {res['device']}, "
             f"batch {res['batch_size']} x {shape}{extras} = {res['tokens_per_step']} tokens/step, "
             f"{cfg['steps']} timed steps{' in turn' if res.get('interleaved') else ''}; commit {res['commit']}")
    lines = [title, line(head), line(["-" * w for w in widths]), *map(line, rows)]
    lines += [f"skipped {name}: {why}" for name, why in res["skipped"].items()]
    lines += [f"note: {n}" for n in res.get("notes", [])]
    if res.get("model_dropout"):
        probs = ", ".join(f"{k}={v:g}" for k, v in res["model_dropout"].items())
        lines.append(f"note: the model's own dropout ({probs}) draws its masks differently on each path (the fused "
                     "attention and the LoRA dropout draw their own seeds, which moves the RNG stream the model's "
                     "dropout reads), so the losses agree in distribution, not step by step")
    lines.append(res["report"])
    return "\n".join(lines)


CSV_KEYS = ["method", "tokens_per_s", "tokens_per_s_p20", "tokens_per_s_p80", "step_ms_median", "step_ms_p20",
            "step_ms_p80", "saved_mb", "saved_hvec_per_token_layer", "peak_mb", "peak_kind", "work_ops_per_step",
            "max_abs_loss_diff_vs_peft", "max_rel_loss_diff_vs_peft"]


def write_outputs(res: dict, out_dir: str) -> list[str]:
    """bench.json (everything: config, device, versions, commit, per-step losses), bench.csv (one row per method,
    with device and commit) and, with matplotlib, bench.png; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.csv")]
    with open(paths[0], "w") as f:
        json.dump(res, f, indent=2)
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*CSV_KEYS, "model", "device", "commit"])
        for r in res["results"]:
            w.writerow([*("" if r[k] is None else r[k] for k in CSV_KEYS), res["model"], res["device"],
                        res["commit"]])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return paths
    names = [r["method"].replace(" recompute=", "\nrecompute=\n") for r in res["results"]]  # no overlapping labels
    colors = ["#888888", "#2a7ab9", "#d98c1f", "#5aa469", "#a0522d"][: len(names)]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    panels = [("tokens_per_s", "tokens/s (median; higher is better)"), ("saved_mb", "saved activations MB"),
              ("peak_mb", res["results"][0]["peak_kind"] + " MB")]
    for ax, (key, title) in zip(axes, panels):
        ax.bar(names, [r[key] or 0 for r in res["results"]], color=colors)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    for r, c in zip(res["results"], colors):
        axes[3].plot(range(len(r["losses"])), r["losses"], marker="o", color=c, label=r["method"])
    axes[3].set_title("loss per step (step 0 = warm-up)", fontsize=9)
    axes[3].legend(fontsize=8)
    fig.suptitle(f"{res['model']} ({res['layers']} layers), {res['config']['method']}, batch {res['batch_size']} x "
                 f"seq {res['seq_len']} on {res['device']} — torch {res['versions']['torch']}, commit {res['commit']}",
                 fontsize=9)
    fig.tight_layout()
    png = os.path.join(out_dir, "bench.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [*paths, png]
