"""Tiny random-weight Hugging Face models with PEFT LoRA adapters, and helpers to compare patched and reference runs.

Builders make models with hidden size 32, two layers and a vocabulary of 128 from transformers configs (no weights
are downloaded). Every bias is re-drawn non-zero (transformers initialises them to zero, which would hide a fused
path that drops a bias), and LoRA ``B`` (plus its bias with ``lora_bias=True``) is drawn non-zero so that the
gradients reach ``A`` (PEFT initialises ``B`` to zero).

``SharedSeedDropout`` turns an unpatched PEFT model into an exact dropout reference for a patched one: see
``use_shared_seed_dropout``.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable, Iterator

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from peftfast.modules.nf4 import is_nf4_lora
from peftfast.ops._backend import resolve_backend
from peftfast.ops.lora import _torch_keep_mask, draw_seed, dropout_keep_mask

VOCAB = 128
SEQ = 9
BATCH = 2


# ----------------------------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------------------------
def _decoder_kwargs(hidden: int, layers: int) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                tie_word_embeddings=False, attn_implementation="eager", bos_token_id=0, eos_token_id=1,
                pad_token_id=None)


def llama(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """LlamaForCausalLM (grouped-query attention: q 32 wide, k/v 16 wide)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**_decoder_kwargs(hidden, layers), **overrides}))


def mistral(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """MistralForCausalLM."""
    from transformers import MistralConfig, MistralForCausalLM

    kw = {**_decoder_kwargs(hidden, layers), "sliding_window": None, "head_dim": hidden // 4}
    return MistralForCausalLM(MistralConfig(**{**kw, **overrides}))


def qwen2(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """Qwen2ForCausalLM (its q/k/v projections have biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**{**_decoder_kwargs(hidden, layers), **overrides}))


def gemma(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """GemmaForCausalLM (GeGLU MLP with the tanh-approximate GELU, ``1 + w`` RMSNorm)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    kw = {**_decoder_kwargs(hidden, layers), "head_dim": hidden // 4, "hidden_activation": "gelu_pytorch_tanh"}
    return GemmaForCausalLM(GemmaConfig(**{**kw, **overrides}))


def gemma2(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """Gemma2ForCausalLM (attention and final-logit softcapping, sliding window on alternate layers)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    kw = {**_decoder_kwargs(hidden, layers), "head_dim": hidden // 4, "sliding_window": 4, "query_pre_attn_scalar": 8,
          "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    return Gemma2ForCausalLM(Gemma2Config(**{**kw, **overrides}))


def gemma3(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """Gemma3ForCausalLM (text): q/k RMSNorm, local/global RoPE bases, sliding window."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kw = {**_decoder_kwargs(hidden, layers), "head_dim": hidden // 4, "sliding_window": 4, "query_pre_attn_scalar": 8}
    return Gemma3ForCausalLM(Gemma3TextConfig(**{**kw, **overrides}))


def qwen3(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """Qwen3ForCausalLM (q/k RMSNorm before RoPE)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    kw = {**_decoder_kwargs(hidden, layers), "head_dim": hidden // 4}
    return Qwen3ForCausalLM(Qwen3Config(**{**kw, **overrides}))


def phi3(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """Phi3ForCausalLM (fused qkv_proj and gate_up_proj, partial rotary)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    kw = {**_decoder_kwargs(hidden, layers), "partial_rotary_factor": 0.5, "pad_token_id": 0}
    return Phi3ForCausalLM(Phi3Config(**{**kw, **overrides}))


def glm(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """GlmForCausalLM (packed gate_up_proj, interleaved partial RoPE)."""
    from transformers import GlmConfig, GlmForCausalLM

    kw = {**_decoder_kwargs(hidden, layers), "head_dim": hidden // 4, "pad_token_id": 0}
    return GlmForCausalLM(GlmConfig(**{**kw, **overrides}))


def glm4(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """Glm4ForCausalLM (GLM's packed MLP and partial RoPE, sandwich norms around attention and MLP)."""
    from transformers import Glm4Config, Glm4ForCausalLM

    kw = {**_decoder_kwargs(hidden, layers), "head_dim": hidden // 4, "pad_token_id": 0}
    return Glm4ForCausalLM(Glm4Config(**{**kw, **overrides}))


def gpt2(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """GPT2LMHeadModel (``Conv1D`` layers store ``[in, out]`` weights: PEFT sets ``fan_in_fan_out``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = dict(vocab_size=VOCAB, n_positions=64, n_embd=hidden, n_layer=layers, n_head=4, resid_pdrop=0.0,
              embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1, attn_implementation="eager")
    return GPT2LMHeadModel(GPT2Config(**{**kw, **overrides}))


def gpt_neox(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """GPTNeoXForCausalLM (Pythia): parallel residual, so layer 0's MLP reads ``norm(embeddings)``, which needs no
    gradient; a two-layer MLP (dense_h_to_4h/dense_4h_to_h), fused q/k/v, partial rotary."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
              intermediate_size=2 * hidden, max_position_embeddings=64, attention_dropout=0.0, hidden_dropout=0.0,
              bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, attn_implementation="eager")
    return GPTNeoXForCausalLM(GPTNeoXConfig(**{**kw, **overrides}))


def phi(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """PhiForCausalLM (Phi-2): attention and a two-layer MLP (fc1/fc2) in parallel off one LayerNorm, partial
    rotary, a dense output projection."""
    from transformers import PhiConfig, PhiForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64,
              resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=1,
              tie_word_embeddings=False, attn_implementation="eager")
    return PhiForCausalLM(PhiConfig(**{**kw, **overrides}))


def falcon(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """FalconForCausalLM (Falcon-7B layout): ``FalconLinear`` projections (the bias added after the product), fused
    query_key_value with multi-query attention, attention and a two-layer MLP in parallel off one LayerNorm."""
    from transformers import FalconConfig, FalconForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
              multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=True, alibi=False,
              max_position_embeddings=64, attention_dropout=0.0, hidden_dropout=0.0, bos_token_id=0,
              eos_token_id=1, tie_word_embeddings=False, attn_implementation="eager")
    return FalconForCausalLM(FalconConfig(**{**kw, **overrides}))


def t5gemma(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """T5GemmaForConditionalGeneration: a Gemma 2 encoder-decoder; the encoder's local layers use a bidirectional
    sliding window (eager: |i - j| <= sliding_window), the decoder's a causal one; softcapped attention logits."""
    from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration

    stack = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, sliding_window=3,
                 layer_types=["sliding_attention", "full_attention"][:layers], attention_dropout=0.0,
                 dropout_rate=0.0, attn_implementation="eager")
    stack.update(overrides)
    # eager at the top too: transformers 5.17 otherwise picks SDPA for the whole model, which drops the softcap
    return T5GemmaForConditionalGeneration(T5GemmaConfig(encoder=stack, decoder=dict(stack), vocab_size=VOCAB,
                                                         dropout_rate=0.0, attention_dropout=0.0,
                                                         attn_implementation="eager"))


def _t5_like(hidden: int, layers: int) -> dict:
    return dict(vocab_size=VOCAB, d_model=hidden, d_kv=hidden // 4, d_ff=2 * hidden, num_layers=layers,
                num_decoder_layers=layers, num_heads=4, dropout_rate=0.0, relative_attention_num_buckets=8,
                decoder_start_token_id=0, pad_token_id=0, attn_implementation="eager")


def switch(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """SwitchTransformersForConditionalGeneration: T5's position bias, every second feed-forward a mixture of four
    experts; its encoder hands the attention function a ``[B, 1, 1, S]`` extended padding mask it builds itself."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    kw = dict(_t5_like(hidden, layers), num_experts=4, expert_capacity=64, encoder_sparse_step=2,
              decoder_sparse_step=2, router_jitter_noise=0.0)
    return SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**{**kw, **overrides}))


def longt5(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """LongT5ForConditionalGeneration: its encoder computes its own local or transient-global attention, its
    decoder T5's (position bias, through the attention interface)."""
    from transformers import LongT5Config, LongT5ForConditionalGeneration

    kw = dict(_t5_like(hidden, layers), local_radius=3, global_block_size=4, encoder_attention_type="local")
    return LongT5ForConditionalGeneration(LongT5Config(**{**kw, **overrides}))


def bert(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """BertForMaskedLM (query/key/value form a sibling group)."""
    from transformers import BertConfig, BertForMaskedLM

    kw = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
              intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, pad_token_id=0, attn_implementation="eager")
    return BertForMaskedLM(BertConfig(**{**kw, **overrides}))


def roberta(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """RobertaForMaskedLM."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    kw = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
              intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, pad_token_id=1, attn_implementation="eager")
    return RobertaForMaskedLM(RobertaConfig(**{**kw, **overrides}))


def modernbert(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """ModernBertForMaskedLM: a packed GLU MLP (``Wi`` chunked into input and gate, ``act``, ``drop``, ``Wo``),
    RoPE, pre-norm layers without biases."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    kw = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
              intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=1, cls_token_id=1, sep_token_id=1, global_attn_every_n_layers=1,
              attn_implementation="eager")
    return ModernBertForMaskedLM(ModernBertConfig(**{**kw, **overrides}))


def t5(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """T5ForConditionalGeneration (tied: the decoder output is rescaled by ``d_model ** -0.5`` before the head)."""
    from transformers import T5Config, T5ForConditionalGeneration

    kw = dict(vocab_size=VOCAB, d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=layers, num_heads=4,
              dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(T5Config(**{**kw, **overrides}))


def bart(hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """BartForConditionalGeneration (a random ``final_logits_bias`` buffer, added after the head)."""
    from transformers import BartConfig, BartForConditionalGeneration

    kw = dict(vocab_size=VOCAB, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * hidden,
              decoder_ffn_dim=2 * hidden, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
              activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    model = BartForConditionalGeneration(BartConfig(**{**kw, **overrides}))
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.5)
    return model


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "llama": llama, "mistral": mistral, "qwen2": qwen2, "qwen3": qwen3, "gemma": gemma, "gemma2": gemma2,
    "gemma3": gemma3, "phi3": phi3, "glm": glm, "glm4": glm4, "gpt2": gpt2, "bert": bert, "roberta": roberta, "t5": t5,
    "bart": bart, "gpt_neox": gpt_neox, "phi": phi, "falcon": falcon, "t5gemma": t5gemma, "switch": switch,
    "longt5": longt5, "modernbert": modernbert,
}
SEQ2SEQ_ARCHS = ("t5", "bart", "t5gemma", "switch", "longt5")


def peft_model(arch: str, *, seed: int = 0, base_dtype: torch.dtype = torch.float32,
               model_kwargs: dict | None = None, **lora_kwargs) -> nn.Module:
    """A tiny ``arch`` model wrapped by ``get_peft_model`` with ``LoraConfig(r=8, lora_alpha=16, all-linear, ...)``.

    The base model is cast to ``base_dtype`` first, so a bf16 base gets fp32 adapters as in PEFT's default
    (``autocast_adapter_dtype``). Base biases and LoRA ``B`` (and LoRA biases) are random and non-zero; the model
    is in training mode.
    """
    torch.manual_seed(seed)
    model = BUILDERS[arch](**(model_kwargs or {})).to(torch.float32)
    with torch.no_grad():
        for mod in model.modules():
            bias = getattr(mod, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.normal_(0.0, 0.1)
    model.to(base_dtype)
    cfg = dict(target_modules="all-linear", r=8, lora_alpha=16, lora_dropout=0.0)
    cfg.update(lora_kwargs)
    if arch == "gpt2":
        cfg.setdefault("fan_in_fan_out", True)
    if arch in SEQ2SEQ_ARCHS:
        cfg.setdefault("task_type", "SEQ_2_SEQ_LM")
    model = get_peft_model(model, LoraConfig(**cfg))
    with torch.no_grad():
        for layer in lora_layers(model):
            for b in layer.lora_B.values():
                b.weight.normal_(0.0, 0.2)
                if b.bias is not None:
                    b.bias.normal_(0.0, 0.2)
    model.train()
    return model


def lora_layers(model: nn.Module) -> Iterator[nn.Module]:
    from peft.tuners.lora.layer import LoraLayer

    return (m for m in model.modules() if isinstance(m, LoraLayer))


def batch(arch: str, *, seq: int = SEQ, bsz: int = BATCH, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids and labels (a loss comes out of ``model(**batch).loss``); BERT masks a few label positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (bsz, seq), generator=g)
    out = {"input_ids": ids, "labels": ids.clone()}
    if arch in ("bert", "roberta", "modernbert"):
        out["labels"][:, ::3] = -100
    if arch in SEQ2SEQ_ARCHS:  # a target shorter than the source, padded at the end of one row
        out["labels"] = torch.randint(2, VOCAB, (bsz, max(2, seq - 3)), generator=g)
        out["labels"][0, -2:] = -100
    return out


# ----------------------------------------------------------------------------------------------------------------
# running and comparing
# ----------------------------------------------------------------------------------------------------------------
def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model: nn.Module, data: dict, seed: int = 123,
                   call=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradient of every trainable parameter, with ``torch.manual_seed(seed)`` before the forward;
    ``call`` runs the forward instead of ``model`` (e.g. ``torch.compile(model)``)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = (model if call is None else call)(**data).loss
    loss.backward()
    grads = {}
    for n, p in trainable(model).items():
        assert p.grad is not None, f"{n} got no gradient"
        grads[n] = p.grad.detach().clone()
    return loss.detach(), grads


def train_steps(model: nn.Module, data: dict, steps: int = 4, seed: int = 7, lr: float = 1e-2,
                eps: float = 1e-4) -> list[float]:
    """``steps`` AdamW steps after ``torch.manual_seed(seed)``; returns the losses.

    ``eps=1e-4`` rather than 1e-8: with a tiny ``eps`` Adam's step ``m / sqrt(v)`` is a whole ``lr`` step even for
    an element whose gradient is ~0, whose sign is then fp32 rounding noise, and two runs that agree to 1e-6 in
    their gradients differ by whole steps in a few elements.
    """
    opt = torch.optim.AdamW(trainable(model).values(), lr=lr, weight_decay=0.01, eps=eps)
    torch.manual_seed(seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(**data).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def cpp_or_skip(backend: str) -> None:
    """Skip a ``backend="cpp"`` case where ``peftfast._C`` is not built (CI builds it)."""
    import pytest

    if backend == "cpp" and resolve_backend("auto", torch.device("cpu")) != "cpp":
        pytest.skip("peftfast._C is not built")


def assert_trains_as(model: nn.Module, ref: nn.Module, data: dict, grad_tol: float = 2e-5,
                     loss_tol: float = 1e-5) -> None:
    """``model``'s loss (relative ``loss_tol``) and every trainable gradient (``max_rel_err`` ≤ ``grad_tol``) match
    ``ref``'s on ``data``."""
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= loss_tol * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    worst = max(grads, key=lambda n: max_rel_err(grads[n], ref_grads[n]))
    assert max_rel_err(grads[worst], ref_grads[worst]) <= grad_tol, (worst, max_rel_err(grads[worst], ref_grads[worst]))


def nonzero_lora_b(model: nn.Module, std: float = 0.2) -> nn.Module:
    """Draw every LoRA ``B`` (PEFT starts them at zero, which would hide the LoRA term and ``A``'s gradient)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    return model


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (in fp64)."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------------------------
# shared-seed dropout reference
# ----------------------------------------------------------------------------------------------------------------
class _SeedGroup:
    """Seed bookkeeping of one sibling group: one seed per round, drawn when the round's first member runs."""

    def __init__(self, size: int):
        self.size = size
        self.seed: int | None = None
        self.used: set[int] = set()

    def seed_for(self, index: int) -> int:
        if self.seed is None or index in self.used:  # a new round starts (the fused path draws here)
            self.seed, self.used = draw_seed(), set()
        self.used.add(index)
        seed = self.seed
        if len(self.used) == self.size:
            self.seed = None
        return seed


class SharedSeedDropout(nn.Module):
    """Dropout whose masks are exactly those the fused path regenerates from its seeds.

    ``group`` (a ``_SeedGroup``) with member ``index``: the mask is segment ``index`` of the group's seed;
    ``group=None``: draws its own seed per call and uses segment 0.
    """

    def __init__(self, p: float, group: _SeedGroup | None, index: int, backend: str):
        super().__init__()
        self.p, self.group, self.index, self.backend = p, group, index, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.group is None:
            seed, seg, nseg = draw_seed(), 0, 1
        else:
            seed, seg, nseg = self.group.seed_for(self.index), self.index, self.group.size
        shape = (x.numel() // x.shape[-1], x.shape[-1])
        if self.backend == "torch":
            keep = _torch_keep_mask(seed, seg, shape, self.p, x.device, x.dtype)
        else:
            keep = dropout_keep_mask(seed, nseg, *shape, self.p, device=x.device, backend=self.backend)[seg]
            keep = keep.to(x.dtype)
        return x * keep.view(x.shape) / (1.0 - self.p)


def use_shared_seed_dropout(reference: nn.Module, patched: nn.Module, p: float, backend: str = "auto") -> None:
    """Replace every ``lora_dropout`` module of ``reference`` (an unpatched copy of ``patched``'s model) with a
    ``SharedSeedDropout`` that follows ``patched``'s sibling groups (read from ``layer._peftfast``, matched by module
    name). Grouping is off for the whole model when ``patch(..., group_siblings=False)`` was used."""
    if backend == "auto":  # the masks of the backend `patch(backend="auto")` picked for these (CPU) tensors
        backend = resolve_backend("auto", next(patched.parameters()).device)
    groups: dict[int, _SeedGroup] = {}
    ref_mods = dict(reference.named_modules())
    n = 0
    for name, mod in patched.named_modules():
        st = getattr(mod, "_peftfast", None)
        if st is None:
            continue
        grp = st.group if st.config.group_siblings else None
        sg = None
        if grp is not None:
            sg = groups.setdefault(id(grp), _SeedGroup(len(grp.members)))
        ref = ref_mods[name]
        for adapter in list(ref.lora_dropout.keys()):
            ref.lora_dropout[adapter] = SharedSeedDropout(p, sg, st.index if sg is not None else 0, backend)
        n += 1
    assert n > 0, "the patched model has no patched layers"
    for name, mod in patched.named_modules():
        # a DoRA gated MLP on the DoRA MLP op draws one seed for gate and up (segments 0 and 1), as a sibling group
        mst = mod.__dict__.get("_peftfast_mlp")
        gate = getattr(mod, "gate_proj", None)
        if mst is None or mst.frozen or mst.packed or not getattr(gate, "lora_variant", None) or is_nf4_lora(gate):
            continue  # (DoRA projections over NF4 run layer by layer)
        sg = _SeedGroup(2)
        for index, proj in enumerate(("gate_proj", "up_proj")):
            ref = ref_mods[f"{name}.{proj}"]
            for adapter in list(ref.lora_dropout.keys()):
                ref.lora_dropout[adapter] = SharedSeedDropout(p, sg, index, backend)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


class OpCalls(TorchDispatchMode):
    """Counts the peftfast ops that run, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "peftfast":
            self.calls.append((func._opname, args))
        return func(*args, **(kwargs or {}))

    def count(self) -> collections.Counter:
        return collections.Counter(name for name, _ in self.calls)


def saved_shapes(fn: Callable[[], object], exclude) -> list[tuple]:
    """Shapes of what ``fn``'s graph saves for backward, tensors sharing a storage with ``exclude`` (parameters)
    left out, sorted."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sorted(saved)
