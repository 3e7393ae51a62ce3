"""``generate`` on patched models: evaluation loops sample from the model they train, between training steps.

A patched model must decode as the unpatched one does: the prompt's forward (left-padded rows, so per-row position
offsets and masked keys), then one-token steps against a growing KV cache, where the attention sees more keys than
queries and RoPE rotates at each row's own position. Greedy decoding and beam search (which reorders the cache) give
the same tokens, and the logits of every step agree to fp32 rounding; the fused paths are asserted to have served
those calls (counters, no fallbacks), so a silent fallback cannot pass. Encoder-decoder models decode through fused
cross-attention over a padded source. A loop that trains, generates in eval mode and trains on matches the
unpatched loop step for step, and ``unpatch`` gives the unpatched model's tokens back.
"""

from __future__ import annotations

import pytest
import torch
from _models import SEQ2SEQ_ARCHS, VOCAB, max_rel_err, peft_model, train_steps

import peftfast

NEW_TOKENS = 6
LOGIT_TOL = 1e-5
# decoder-only families through their fused blocks (Gemma 2: softcaps and a sliding window shorter than the
# prompt; Qwen3: q/k norms; Phi-3: packed q/k/v and gate/up; GPT-2: Conv1D layers, learned positions) and
# encoder-decoder ones (T5: relative position bias; BART: learned positions, final-logits bias)
ARCHS = ["llama", "gemma2", "qwen3", "phi3", "gpt2", "t5", "bart"]


def prompts(arch: str, seq: int = 7, bsz: int = 3) -> dict[str, torch.Tensor]:
    """Token ids and the 2-D mask: decoder prompts padded on the left by 0, 3 and 1 tokens (the side generation
    pads), sources of encoder-decoder models on the right."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (bsz, seq), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 1)[:bsz]):
        if pad:
            if arch in SEQ2SEQ_ARCHS:
                mask[row, -pad:] = 0
            else:
                mask[row, :pad] = 0
        ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def generate(model, data: dict, **kwargs):
    with torch.no_grad():
        return model.generate(**data, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kwargs)


def assert_same_generation(got, want) -> None:
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    assert len(got.logits) == len(want.logits) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        err = max_rel_err(a, b)
        assert err <= LOGIT_TOL, f"step {step}: logits differ by {err:.2e} (relative to their max)"


def assert_fused_decoding(model, calls: int) -> None:
    """Every LoRA layer ran fused ``calls`` times or more, every fused attention served its calls, nothing fell
    back."""
    rep = peftfast.report(model)
    lora = rep.runtime(model)
    assert lora and all(not r["fallbacks"] for r in lora.values()), lora
    assert all(r["fused"] >= calls for r in lora.values()), {n: r["fused"] for n, r in lora.items()}
    attention = {n: r for n, r in rep.module_runtime(model).items() if n.endswith("(attention)")}
    assert attention and all(r["fused"] >= calls and not r["fallbacks"] for r in attention.values()), attention


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_unpatched(arch):
    model = peft_model(arch, lora_dropout=0.1).eval()  # eval: dropout off, as generate runs it
    data = prompts(arch)
    want = generate(model, data)
    peftfast.patch(model)
    got = generate(model, data)
    assert_same_generation(got, want)
    # one forward per new token (decoder-only: the prompt's, then cached steps); the encoder's layers and the
    # cross-attention's k/v projections run once
    assert_fused_decoding(model, calls=1)
    counts = {n: r["fused"] for n, r in peftfast.report(model).runtime(model).items()}
    assert max(counts.values()) == NEW_TOKENS, counts
    peftfast.unpatch(model)
    assert_same_generation(generate(model, data), want)


def _adapter_llama():
    from _models import llama

    torch.manual_seed(0)
    model = llama()
    peftfast.add_adapters(model)
    with torch.no_grad():  # adapters start as the identity (zero up-projection), which would hide them
        for name, p in model.named_parameters():
            if "adapter" in name and p.dim() == 2:
                p.normal_(0.0, 0.1)
    return model


def _deepseek_mla():
    """DeepSeek-V3's multi-head latent attention: its cache holds the compressed latent and the rotated key slice,
    rotated in the interleaved form (``rope_interleave``) by the fused RoPE at each row's position."""
    from peft import LoraConfig, get_peft_model
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_group=1, topk_group=1, max_position_embeddings=64, rope_interleave=True)
    model = get_peft_model(DeepseekV3ForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return model


METHODS = {
    "dora": lambda: peft_model("llama", use_dora=True),
    "nf4": lambda: peft_model("llama"),  # quantize_base below
    "adapters": _adapter_llama,
    "sliding-window": lambda: peft_model("mistral", model_kwargs={"sliding_window": 3}),
    "deepseek-mla": _deepseek_mla,
}


@pytest.mark.parametrize("method", list(METHODS))
def test_generation_of_other_methods_matches_unpatched(method):
    """DoRA, LoRA over NF4 base weights, bottleneck adapters, a window shorter than the prompt (Mistral), and
    DeepSeek-V3's latent attention with its interleaved RoPE (whose fused calls are counted too)."""
    model = METHODS[method]().eval()
    if method == "nf4":
        peftfast.quantize_base(model, block_size=16)
    data = prompts("llama")
    want = generate(model, data)
    peftfast.patch(model)
    assert_same_generation(generate(model, data), want)
    if method == "adapters":
        attention = {n: r for n, r in peftfast.report(model).module_runtime(model).items() if "(attention)" in n}
        assert attention and all(r["fused"] == NEW_TOKENS and not r["fallbacks"] for r in attention.values())
    else:
        assert_fused_decoding(model, calls=NEW_TOKENS)
    if method == "deepseek-mla":
        rope = {n: r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith("(rope)")}
        assert len(rope) == 2 and all(r["fused"] == NEW_TOKENS and not r["fallbacks"] for r in rope.values()), rope


def test_beam_search_reorders_the_cache_as_unpatched():
    model = peft_model("llama").eval()
    data = prompts("llama")
    want = generate(model, data, num_beams=3)
    peftfast.patch(model)
    got = generate(model, data, num_beams=3)
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    assert_fused_decoding(model, calls=NEW_TOKENS - 1)


def test_generation_without_a_cache_matches_unpatched():
    """``use_cache=False``: every step re-runs the whole padded sequence, through the training-shaped path."""
    model = peft_model("qwen3").eval()
    data = prompts("qwen3")
    want = generate(model, data, use_cache=False)
    peftfast.patch(model)
    assert_same_generation(generate(model, data, use_cache=False), want)
    assert_fused_decoding(model, calls=NEW_TOKENS)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_train_generate_train_matches_unpatched(dropout):
    """The evaluation loop's pattern: steps in training mode, ``generate`` in eval mode, steps again. The fused
    path's saved-tensor regions and dropout seeds must come out of ``generate`` as they went in."""
    data = {k: v[:2] for k, v in prompts("llama").items()}
    labels = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    batch = {**data, "labels": labels}

    def loop(model) -> tuple[list[float], torch.Tensor]:
        first = train_steps(model, batch, steps=2, seed=3)
        model.eval()
        out = generate(model, data)
        model.train()
        return first + train_steps(model, batch, steps=2, seed=4), out

    # SDPA, transformers' default: the left padding's last position predicts the first real token, and SDPA gives a
    # query that sees no key a zero output, as the fused kernel does (eager attention averages the masked keys)
    sdpa = {"attn_implementation": "sdpa"}
    ref = peft_model("llama", lora_dropout=dropout, model_kwargs=sdpa)
    fast = peft_model("llama", lora_dropout=dropout, model_kwargs=sdpa)
    if dropout:  # the unpatched reference draws the fused path's masks (one seed stream for both)
        from _models import use_shared_seed_dropout

        peftfast.patch(fast)
        use_shared_seed_dropout(ref, fast, dropout)
    else:
        peftfast.patch(fast)
    want_losses, want_out = loop(ref)
    got_losses, got_out = loop(fast)
    for i, (a, b) in enumerate(zip(got_losses, want_losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {i}: {a} vs {b}"
    assert torch.equal(got_out.sequences, want_out.sequences)
    assert_fused_decoding(fast, calls=4)


def test_prefix_tuning_generation_matches_unpatched():
    """PEFT prefix tuning through ``generate``. With transformers 5.17 the virtual tokens' keys sit ahead of the
    prompt's in the cache; 5.24 and later prefer generate's own ``cache`` argument to the ``past_key_values`` PEFT
    (0.21) passes and warn that they ignore it, so patched and unpatched models alike then decode without them
    (a PEFT/transformers mismatch: training forwards still take the prefix)."""
    from _models import llama
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.eval()
    # unpadded prompts: PEFT (0.21) hands generate a mask that covers the virtual tokens while transformers (5.2x)
    # may decode without them in the cache, and the two mask builders then read that mask differently
    data = {k: v[:1] for k, v in prompts("llama").items()}
    want = generate(model, data)
    peftfast.patch(model)
    assert_same_generation(generate(model, data), want)
    attention = {n: r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith("(attention)")}
    assert attention and all(r["fused"] >= NEW_TOKENS and not r["fallbacks"] for r in attention.values()), attention
