"""PEFT prompt-learning methods (prefix tuning, prompt tuning, P-tuning) through ``peftfast.patch`` / ``unpatch``.

These models have no LoRA layers: ``patch`` leaves their parameters and PEFT's prompt encoders alone and fuses the
frozen base they train through: the attention on peftfast's fused kernel (prefix keys, padding), and for Llama the
RoPE, RMSNorms, frozen MLPs and residual-add blocks (BERT's LayerNorms stay ATen's off CUDA, with that reason): the
same losses and gradients as PEFT before patching and after ``unpatch``, and a ``report`` that says exactly that. Tiny
random-weight Llama (``CAUSAL_LM``) and BERT (``SEQ_CLS``) in fp32, dropout off, a padded batch. A LoRA model on
q/v (query/value) of the same families is the control: there ``patch`` does act, quietly, and the comparison still
holds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import peft
import pytest
import torch
import transformers
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import peftfast

VOCAB = 64
LAYERS = 2
RTOL = 1e-5  # fp32; patch must not change these models at all, so this is generous

FAMILIES = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}
METHODS: dict[str, Callable[[str], object]] = {
    "prefix": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=4),
    "prompt": lambda task: PromptTuningConfig(task_type=task, num_virtual_tokens=4),
    "p_tuning": lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=4, encoder_hidden_size=16),
}


# ----------------------------------------------------------------------------------------------------------------
# builders and helpers
# ----------------------------------------------------------------------------------------------------------------
def base_model(family: str) -> nn.Module:
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, attention_dropout=0.0,
            attn_implementation="eager", pad_token_id=0))
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        pad_token_id=0, attn_implementation="eager"))


def prompt_model(family: str, method: str) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(base_model(family), METHODS[method](FAMILIES[family]))
    return model.train()


def lora_model(family: str) -> nn.Module:
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj"] if family == "llama" else ["query", "value"]
    model = get_peft_model(base_model(family), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                          target_modules=targets, task_type=FAMILIES[family]))
    with torch.no_grad():  # PEFT starts B at zero, which would hide the LoRA term
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return model.train()


def batch(family: str) -> dict[str, torch.Tensor]:
    """Two rows of 7 tokens, the first right-padded after 5; padded positions carry no label (causal LM)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100) if family == "llama" else torch.tensor([0, 2])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model: nn.Module, data: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # any stray randomness draws the same numbers in every run
    loss = model(**data).loss
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
            grads[n] = p.grad.detach().clone()
    return loss.detach(), grads


def assert_close(got: tuple, want: tuple) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0.0)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        scale = ref_grads[n].abs().max().item()  # relative to the tensor's largest element
        torch.testing.assert_close(g, ref_grads[n], rtol=RTOL, atol=RTOL * scale, msg=lambda m, n=n: f"{n}: {m}")


def module_attrs(model: nn.Module) -> dict[str, set[str]]:
    return {name: set(mod.__dict__) for name, mod in model.named_modules()}


# ----------------------------------------------------------------------------------------------------------------
# prompt methods x model families
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patch_keeps_losses_and_gradients(family, method):
    model = prompt_model(family, method)
    data = batch(family)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and any(n.startswith("prompt_encoder.") for n in trainable)
    params = {n: p for n, p in model.named_parameters()}
    attrs = module_attrs(model)
    try:
        ref = loss_and_grads(model, data)
    except ValueError as exc:  # PEFT's own forward, before any patch
        if "does not support past key values" not in str(exc):
            raise
        pytest.skip(f"PEFT {peft.__version__} itself cannot run this model under transformers "
                    f"{transformers.__version__} (it looks for a past_key_values argument, which 5.24 renamed to "
                    "cache), so there is no reference to compare with")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the attention is fused: no "returning it unchanged" warning
        assert peftfast.patch(model) is model
    # the same parameter objects, values and trainability; no LoRA layer, the base's modules fused around the prompt
    assert {n: p for n, p in model.named_parameters()} == params
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert not any(hasattr(m, "_peftfast") for m in model.modules())
    assert model.get_base_model().config._attn_implementation == "peftfast"
    assert_close(loss_and_grads(model, data), ref)
    rep = peftfast.report(model)
    runtime = rep.module_runtime(model)
    assert runtime and all(r["fused"] > 0 and not r["fallbacks"] for r in runtime.values()), runtime
    fused = {e.kind for e in rep.modules if e.patched}
    # BERT: its frozen two-layer MLPs keep only their input at the default recompute="up" (the up projection reruns)
    assert fused == ({"attention", "rope", "norm", "block", "mlp"} if family == "llama" else {"attention", "norm",
                                                                                               "mlp"}), rep.format()

    peftfast.unpatch(model)
    assert model.get_base_model().config._attn_implementation == "eager"
    assert module_attrs(model) == attrs
    assert_close(loss_and_grads(model, data), ref)
    assert_close(loss_and_grads(model, data), ref)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_report_on_prompt_models(family, method):
    model = prompt_model(family, method)
    empty = peftfast.report(model)
    assert empty.entries == [] and empty.runtime(model) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        peftfast.patch(model, backend="torch")
    rep = peftfast.report(model)
    assert rep.entries == [] and rep.patched == [] and rep.skipped == []
    assert rep.backend == "torch"
    assert rep.runtime(model) == {}
    if family == "llama":
        assert rep.summary() == ("peftfast: patched 0 LoRA layer(s) (0 sibling group(s)), skipped 0; fused 2/2 mlp, "
                                 "2/2 rope, 1/1 attention, 5/5 norm, 2/2 block, 0/1 loss; backend=torch, "
                                 "recompute=up")
    else:  # the attention, the LayerNorms (their outputs rebuilt where saved) and, at the default recompute="up",
        # each two-layer MLP, which keeps only its input (the frozen up projection runs again in backward)
        assert rep.summary() == ("peftfast: patched 0 LoRA layer(s) (0 sibling group(s)), skipped 0; "
                                 "fused 2/2 mlp, 1/1 attention, 5/5 norm, 0/1 loss; backend=torch, recompute=up")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            peftfast.patch(model, backend="torch", recompute="norms")
        rep = peftfast.report(model)  # without the rerun, each two-layer MLP is left alone with its reason
        assert rep.summary() == ("peftfast: patched 0 LoRA layer(s) (0 sibling group(s)), skipped 0; "
                                 "fused 0/2 mlp, 1/1 attention, 5/5 norm, 0/1 loss; backend=torch")
        assert {e.reason for e in rep.modules if e.kind == "mlp"} == {
            "nothing to drop: the frozen down projection keeps no input, and GELUActivation keeps only its input "
            "already"}
    # the prompt-learning adapter is left to PEFT with a one-line reason, never silently
    (note,) = rep.notes
    assert note.startswith("adapter 'default' (") and "PEFT's own path" in note
    assert rep.format().startswith(rep.summary() + "\n  note     " + note + "\n")
    assert "  fused    attention implementation (attention)" in rep.format().splitlines()
    peftfast.unpatch(model)
    assert peftfast.report(model).entries == []


def test_patch_warns_once_per_call_when_nothing_is_patched(recwarn):
    model = prompt_model("llama", "prompt")
    off = dict(fuse_attention=False, fuse_rope=False, fuse_norms=False, fuse_mlp=False)
    peftfast.patch(model, **off)
    peftfast.patch(model, **off)
    assert [str(w.message) for w in recwarn.list if issubclass(w.category, UserWarning)] == [
        "peftfast.patch: nothing in the model could be fused (peftfast.report(model) gives each reason); returning "
        "it unchanged"] * 2
    assert {e.reason for e in peftfast.report(model).modules} == {
        "fuse_rope=False", "fuse_attention=False", "fuse_norms=False", "fuse_mlp=False",
        "fuse_loss=False (opt-in: training calls return logits=None)"}


# ----------------------------------------------------------------------------------------------------------------
# control: LoRA on q/v of the same families is patched (no warning) and still matches
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_control_is_patched_quietly(family):
    model = lora_model(family)
    data = batch(family)
    ref = loss_and_grads(model, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftfast.patch(model, backend="torch")
    assert not [w for w in caught if "no PEFT LoRA layers" in str(w.message)]
    rep = peftfast.report(model)
    assert len(rep.patched) == 2 * LAYERS and not rep.skipped
    assert_close(loss_and_grads(model, data), ref)
    assert all(r["fused"] > 0 for r in rep.runtime(model).values())
    peftfast.unpatch(model)
    assert_close(loss_and_grads(model, data), ref)
