"""``peftfast.training``: layer-wise LR decay groups and the gradual-unfreezing schedule (plain loop and Trainer).

Tiny random-weight models: a 3-block Llama (LoRA on all linear layers, or full fine-tuning) and a 3-block BERT
sequence classifier (full fine-tuning, which has embeddings, blocks and a pooler/classifier head to schedule).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerState,
    TrainingArguments,
)

import peftfast
from peftfast.training import GradualUnfreezing, find_blocks, layerwise_lr_groups

L = 3  # blocks in every tiny model
VOCAB = 64
BASE_LR, DECAY = 1e-3, 0.5


# ----------------------------------------------------------------------------------------------------------------
# builders and helpers
# ----------------------------------------------------------------------------------------------------------------
def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def lora_llama() -> nn.Module:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # PEFT starts B at zero, which would leave A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return model


def tiny_bert() -> BertForSequenceClassification:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=3, attn_implementation="eager")
    return BertForSequenceClassification(cfg)


def block_of(name: str) -> int | None:
    """Block index from a parameter name of the tiny models (``layers.i.`` / ``layer.i.``)."""
    parts = name.split(".")
    for key in ("layers", "layer", "h"):
        if key in parts:
            i = parts.index(key)
            if i + 1 < len(parts) and parts[i + 1].isdigit():
                return int(parts[i + 1])
    return None


def expected_lr(name: str) -> float:
    i = block_of(name)
    if i is not None:
        return BASE_LR * DECAY ** (L - 1 - i)
    return BASE_LR * DECAY**L if "embed" in name else BASE_LR


def check_groups(model: nn.Module, groups: list[dict], weight_decay: float) -> dict[str, dict]:
    """Every trainable param exactly once, no frozen one, non-empty groups, LR by position, no-decay by name."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[str, dict] = {}
    for g in groups:
        assert set(g) >= {"params", "lr", "weight_decay", "name"}
        assert g["params"], g["name"]
        for p in g["params"]:
            n = names[id(p)]
            assert n not in seen, f"{n} in two groups"
            seen[n] = g
    assert set(seen) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n, g in seen.items():
        assert g["lr"] == pytest.approx(expected_lr(n), rel=1e-12), n
        no_decay = any(k in n for k in ("bias", "norm", "LayerNorm", "ln_"))
        assert g["name"].endswith("/no_decay") == no_decay, n
        assert g["weight_decay"] == (0.0 if no_decay else weight_decay), n
    return seen


# ----------------------------------------------------------------------------------------------------------------
# layerwise_lr_groups
# ----------------------------------------------------------------------------------------------------------------
def test_find_blocks_llama_bert_gpt2_through_peft():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=L, n_head=4))
    assert find_blocks(lora_llama())[0] == "base_model.model.model.layers"
    assert find_blocks(tiny_bert())[0] == "bert.encoder.layer"
    assert find_blocks(gpt2)[0] == "transformer.h"
    with pytest.raises(ValueError, match="no transformer block list"):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


def test_lr_groups_lora_llama():
    model = lora_llama()
    groups = layerwise_lr_groups(model, BASE_LR, DECAY, weight_decay=0.1)
    seen = check_groups(model, groups, 0.1)
    assert all("lora_" in n for n in seen)
    # LoRA all-linear leaves embeddings and lm_head frozen: one group per block, no bias/norm among LoRA weights
    assert [g["name"] for g in groups] == ["layer.0", "layer.1", "layer.2"]
    assert [g["lr"] for g in groups] == pytest.approx([BASE_LR * 0.25, BASE_LR * 0.5, BASE_LR])
    torch.optim.AdamW(groups)  # the extra "name" key is accepted by torch optimizers


def test_lr_groups_bert_full_finetuning():
    model = tiny_bert()
    groups = layerwise_lr_groups(model, BASE_LR, DECAY, weight_decay=0.01)
    seen = check_groups(model, groups, 0.01)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["embeddings", "embeddings/no_decay"] + [
        f"layer.{i}{s}" for i in range(L) for s in ("", "/no_decay")] + ["head", "head/no_decay"]
    assert by_name["embeddings"]["lr"] == pytest.approx(BASE_LR * DECAY**L)
    assert by_name["layer.2"]["lr"] == BASE_LR and by_name["head"]["lr"] == BASE_LR
    assert by_name["layer.1/no_decay"]["lr"] == pytest.approx(BASE_LR * DECAY)
    assert seen["bert.pooler.dense.weight"]["name"] == "head"
    assert seen["classifier.bias"]["name"] == "head/no_decay"
    assert seen["bert.embeddings.LayerNorm.weight"]["name"] == "embeddings/no_decay"


def test_lr_groups_only_trainable_and_decay_one():
    model = tiny_bert()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(("bert.encoder.layer.2.", "classifier.")))
    groups = layerwise_lr_groups(model, BASE_LR, 1.0)
    check_groups_names = {g["name"] for g in groups}
    assert check_groups_names == {"layer.2", "layer.2/no_decay", "head", "head/no_decay"}
    assert all(g["lr"] == BASE_LR for g in groups)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == sum(p.requires_grad for p in model.parameters())


def test_lr_groups_adapter_submodules_in_blocks():
    """Trainable params registered inside blocks (bottleneck adapters) land in their block's group."""
    model = tiny_llama()
    model.requires_grad_(False)
    for layer in model.model.layers:
        layer.adapter = nn.Sequential(nn.Linear(32, 4), nn.ReLU(), nn.Linear(4, 32))
    groups = layerwise_lr_groups(model, BASE_LR, DECAY)
    for g in groups:
        i = int(g["name"].split("/")[0].split(".")[1])
        assert g["lr"] == pytest.approx(BASE_LR * DECAY ** (L - 1 - i))
        assert {id(p) for p in g["params"]} <= {id(p) for p in model.model.layers[i].adapter.parameters()}
    assert sum(len(g["params"]) for g in groups) == 4 * L


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5, math.nan])
def test_lr_groups_bad_decay(decay):
    with pytest.raises(ValueError, match="decay must be in"):
        layerwise_lr_groups(tiny_bert(), BASE_LR, decay)


def test_lr_groups_no_trainable_or_no_blocks():
    model = tiny_bert().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        layerwise_lr_groups(model, BASE_LR, DECAY)
    with pytest.raises(ValueError, match="no transformer block list"):
        layerwise_lr_groups(nn.Sequential(nn.Linear(2, 2)), BASE_LR, DECAY)


def test_exported_from_package():
    assert peftfast.training.layerwise_lr_groups is layerwise_lr_groups


# ----------------------------------------------------------------------------------------------------------------
# GradualUnfreezing: plain loop
# ----------------------------------------------------------------------------------------------------------------
def bert_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (4, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def llama_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "labels": ids.clone()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unfrozen_position_ok(name: str, k_blocks: int, embeddings: bool) -> bool:
    i = block_of(name)
    if i is not None:
        return i >= L - k_blocks
    return embeddings if "embeddings" in name else True


def test_gradual_unfreezing_full_finetuning_loop():
    model = tiny_bert()
    data = bert_batch()
    every = 2
    sched = GradualUnfreezing(model, every=every)
    opt = torch.optim.AdamW(sched.parameters(), lr=1e-2, weight_decay=0.1)
    all_names = [n for n, _ in model.named_parameters()]
    assert sched.num_unfrozen_blocks == 0
    for step in range((L + 2) * every):
        k = min(L, step // every)
        embeddings = step // every > L
        assert sched.num_unfrozen_blocks == k
        unfrozen = set(sched.unfrozen_param_names())
        assert unfrozen == {n for n in all_names if unfrozen_position_ok(n, k, embeddings)}
        assert {n for n, p in model.named_parameters() if p.requires_grad} == unfrozen
        before = snapshot(model)
        opt.zero_grad(set_to_none=True)
        model(**data).loss.backward()
        opt.step()
        for n, p in model.named_parameters():
            if n in unfrozen:
                assert p.grad is not None, n
            else:  # no update at all, weight decay and Adam moments included
                assert p.grad is None and torch.equal(p, before[n]), n
        assert not torch.equal(model.classifier.weight, before["classifier.weight"])
        if k:
            top = f"bert.encoder.layer.{L - k}.attention.self.query.weight"
            assert not torch.equal(dict(model.named_parameters())[top], before[top])
        sched.step()
    assert sched.num_unfrozen_blocks == L and sched.embeddings_unfrozen


def test_gradual_unfreezing_lora_toggles_only_lora():
    model = lora_llama()
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    data = llama_batch()
    sched = GradualUnfreezing(model, every=1)
    opt = torch.optim.AdamW(sched.parameters(), lr=1e-2)
    # no trainable head (lm_head is not a LoRA target): the top block trains from the start
    for step in range(L + 1):
        k = min(L, step + 1)
        assert sched.num_unfrozen_blocks == k
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(sched.unfrozen_param_names()) <= lora
        assert trainable == {n for n in lora if block_of(n) >= L - k}
        before = snapshot(model)
        opt.zero_grad(set_to_none=True)
        model(**data).loss.backward()
        opt.step()
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]) == (n not in trainable), n
        sched.step()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora


def test_gradual_unfreezing_filter_epoch_unit_and_start_frozen():
    model = tiny_bert()
    # schedule only the attention weights; the rest stays frozen and untouched throughout
    sched = GradualUnfreezing(model, every=1, unit="epoch", start_frozen=False,
                              trainable_filter=lambda n, p: "attention" in n)
    assert all(p.requires_grad for p in model.parameters())  # start_frozen=False: nothing frozen yet
    sched.apply()
    # nothing selected after the last block: the top block starts unfrozen
    assert sched.num_unfrozen_blocks == 1
    assert {n for n, p in model.named_parameters() if p.requires_grad and "attention" in n} == set(
        sched.unfrozen_param_names())
    sched.step()  # unit="epoch": steps do not count
    assert sched.num_unfrozen_blocks == 1
    sched.epoch_end()
    assert sched.num_unfrozen_blocks == 2
    unfrozen = set(sched.unfrozen_param_names())
    assert unfrozen and all("attention" in n and block_of(n) >= 1 for n in unfrozen)
    assert model.classifier.weight.requires_grad  # not scheduled: left as it was


def test_gradual_unfreezing_bad_arguments():
    with pytest.raises(ValueError, match="every"):
        GradualUnfreezing(tiny_bert(), every=0)
    with pytest.raises(ValueError, match="unit"):
        GradualUnfreezing(tiny_bert(), every=1, unit="batch")
    with pytest.raises(ValueError, match="no trainable"):
        GradualUnfreezing(tiny_bert().requires_grad_(False), every=1)


def test_callback_events_follow_trainer_counters():
    """Trainer events set the count from state.global_step / state.epoch, so repeated events never double-count."""
    sched = GradualUnfreezing(tiny_bert(), every=2)
    state = TrainerState(global_step=4)
    sched.on_step_end(None, state, None)
    sched.on_step_end(None, state, None)
    assert sched.num_unfrozen_blocks == 2
    sched.on_epoch_end(None, state, None)  # unit="step": epochs do not count
    assert sched.num_unfrozen_blocks == 2
    ep = GradualUnfreezing(tiny_bert(), every=1, unit="epoch")
    ep.on_epoch_end(None, TrainerState(epoch=0.5), None)  # a first epoch cut short by max_steps still counts
    ep.on_epoch_end(None, TrainerState(epoch=0.5), None)
    assert ep.num_unfrozen_blocks == 1


# ----------------------------------------------------------------------------------------------------------------
# GradualUnfreezing: Hugging Face Trainer callback
# ----------------------------------------------------------------------------------------------------------------
def llama_dataset(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (8,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def trainer_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                save_strategy="no", logging_strategy="no", learning_rate=1e-2, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


@pytest.mark.parametrize("unit, every, blocks", [("step", 3, 2), ("epoch", 1, 3)])
def test_trainer_callback(tmp_path, unit, every, blocks):
    """Full fine-tuning of the Llama (lm_head is the head); 4 rows / batch 2 = 2 steps per epoch, 6 steps."""
    model = tiny_llama()
    before = snapshot(model)
    sched = GradualUnfreezing(model, every=every, unit=unit)
    trainer = Trainer(model=model, args=trainer_args(tmp_path), train_dataset=llama_dataset(), callbacks=[sched])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "GradualUnfreezing" in str(w.message)]
    assert trainer.state.global_step == 6
    assert sched.num_unfrozen_blocks == blocks
    assert not sched.embeddings_unfrozen
    after = dict(model.named_parameters())
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not after["model.embed_tokens.weight"].requires_grad
    for i in range(L):
        w = f"model.layers.{i}.self_attn.q_proj.weight"
        # blocks unfrozen before the last step trained (so the Trainer's optimizer held them); the others did not
        assert torch.equal(after[w], before[w]) == (i < L - (blocks - 1)), w
        assert after[w].requires_grad == (i >= L - blocks)
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])


def test_trainer_callback_added_late_warns(tmp_path):
    """Frozen before the Trainer built its optimizer: those params can never train, and the schedule says so."""
    model = tiny_llama()
    sched = GradualUnfreezing(model, every=3)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=llama_dataset())
    trainer.add_callback(sched)  # too late for on_init_end
    with pytest.warns(UserWarning, match="not in the Trainer's optimizer"):
        trainer.train()
