"""Training-loop integration on CPU: a patched PEFT LoRA model trains exactly like the unpatched one inside the
loops people use — HF ``Trainer`` (gradient accumulation, gradient checkpointing, checkpoint/resume,
``save_pretrained``), TRL ``SFTTrainer`` (padded, packed, padding-free), a plain PyTorch loop, ``torch.compile``,
accelerate DDP and FSDP2 over two gloo processes, DeepSpeed ZeRO-2 and ZeRO-3 likewise.

Everything runs in fp32 on tiny random-weight Llamas (``_models``). Comparisons use ``max_rel_err`` per tensor
(``FP32_TOL``). Optimizers use ``eps=1e-4``: with Adam's default 1e-8, an element whose gradient is ~0 takes a whole
``lr`` step in the direction of its fp32 rounding noise, so two runs whose gradients agree to 1e-7 end up whole steps
apart in a few weights (see ``_models.train_steps``). Every test also checks that the fused path really ran
(per-layer call counters, no fallbacks), so a silent fallback to PEFT's forward cannot pass.

The distributed tests run this file as a script (``python tests/test_integration.py _dist_worker OUT``, likewise
``_ds_worker``) in two
processes with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR=127.0.0.1``/a free port, as ``torchrun`` would set them.
"""

from __future__ import annotations

import copy
import inspect
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from _models import OpCalls, batch, llama, loss_and_grads, max_rel_err, peft_model, trainable

import peftfast

FP32_TOL = 1e-5
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def lora_llama(dropout: float = 0.0, layers: int = 2, patch: bool = False):
    """r=4 all-linear LoRA on a tiny Llama, B drawn non-zero (so A trains from step one), train mode."""
    model = peft_model("llama", r=4, lora_alpha=8, lora_dropout=dropout, model_kwargs={"layers": layers})
    return peftfast.patch(model) if patch else model


def adapter_llama(fused: bool = True):
    """A tiny Llama (one layer) with Houlsby adapters (after attention and FFN, with their own LayerNorm); the
    up-projections are drawn non-zero, so both projections train from the first step."""
    torch.manual_seed(0)
    model = llama(layers=1)
    peftfast.add_adapters(model, peftfast.AdapterConfig(placement="houlsby", bottleneck_size=8, activation="silu",
                                                        layer_norm=True))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in trainable(model).items():
            if ".up." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peftfast.set_adapter_backend(model, fused=fused)
    return model


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable(model).items()}


def assert_same_weights(got: dict, want: dict, tol: float = FP32_TOL) -> None:
    """Per tensor ``max_rel_err(got, want) <= tol`` (gradients, or weights that must match exactly)."""
    assert got.keys() == want.keys()
    worst = max(want, key=lambda n: max_rel_err(got[n], want[n]))
    assert max_rel_err(got[worst], want[worst]) <= tol, f"{worst}: {max_rel_err(got[worst], want[worst]):.2e}"


def assert_same_training(got: dict, want: dict, init: dict, lr: float = 1e-2) -> None:
    """Two trainings from ``init`` took the same steps: per tensor, the update differs from the reference update by
    at most 1e-4 of its norm and 1e-3 * lr per element (as in test_lora_models). Comparing whole weights instead
    would let the unchanged initial values hide a wrong update."""
    assert got.keys() == want.keys() == init.keys()
    for n in want:
        step, ref_step = got[n] - init[n], want[n] - init[n]
        assert ref_step.norm() > 0, f"{n} did not train"
        diff = step - ref_step
        rel = (diff.norm() / ref_step.norm()).item()
        assert rel <= 1e-4 and diff.abs().max() <= 1e-3 * lr, (n, rel, diff.abs().max().item())


def assert_losses_close(got: list[float], want: list[float], tol: float = FP32_TOL) -> None:
    assert len(got) == len(want) > 0
    for i, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= tol * abs(b), f"step {i}: {a} vs {b}"


def fused_counts(model) -> set[int]:
    """The set of fused-call counts over all patched LoRA layers; asserts that no call fell back to PEFT."""
    rt = peftfast.report(model).runtime(model)
    assert rt, "the model has no patched layers"
    assert all(not r["fallbacks"] for r in rt.values()), {n: r["fallbacks"] for n, r in rt.items() if r["fallbacks"]}
    return {r["fused"] for r in rt.values()}


def rows(n: int = 8, seq: int = 9) -> list[dict[str, torch.Tensor]]:
    """A map-style dataset the Trainer's default collator stacks (equal lengths, no padding)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 128, (seq,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def hf_train(model, out_dir, resume: str | None = None, train_dataset: list | None = None, **kw):
    """Train with HF ``Trainer`` (on ``rows()`` by default); returns the trainer (loss per optimizer step in
    ``log_history``)."""
    from transformers import Trainer, TrainingArguments

    args = dict(output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                adam_epsilon=1e-4, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="steps",
                logging_steps=1, disable_tqdm=True, seed=5, data_seed=7)
    trainer = Trainer(model=model, args=TrainingArguments(**{**args, **kw}),
                      train_dataset=rows() if train_dataset is None else train_dataset)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def logged_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ----------------------------------------------------------------------------------------------------------------
# 1. Hugging Face Trainer
# ----------------------------------------------------------------------------------------------------------------
def test_trainer_gradient_accumulation_matches_peft(tmp_path):
    """batch 2 x accumulation 2, four optimizer steps: the same losses and final LoRA weights as unpatched PEFT."""
    ref = lora_llama()
    init = weights(ref)
    fast = peftfast.patch(copy.deepcopy(ref))
    t_ref = hf_train(ref, tmp_path / "ref", gradient_accumulation_steps=2)
    t_fast = hf_train(fast, tmp_path / "fast", gradient_accumulation_steps=2)
    assert t_fast.state.global_step == 4
    assert_losses_close(logged_losses(t_fast), logged_losses(t_ref))
    assert_same_training(weights(fast), weights(ref), init)
    assert fused_counts(fast) == {8}  # 4 steps x 2 micro-batches, every layer on the fused path


def test_trainer_fused_causal_loss_matches_peft(tmp_path):
    """``fuse_loss=True`` under ``Trainer``: the patched forward shows the original signature (Trainer keeps only the
    batch columns it names: a bare ``(*args, **kwargs)`` lost ``input_ids``), accumulation 2, same training."""
    from peftfast.patching.loss import loss_stats

    ref = lora_llama()
    init = weights(ref)
    fast = peftfast.patch(copy.deepcopy(ref), fuse_loss=True)
    lm = fast.get_base_model()
    assert "forward" in lm.__dict__ and inspect.signature(lm.forward) == inspect.signature(ref.get_base_model().forward)
    t_ref = hf_train(ref, tmp_path / "ref", gradient_accumulation_steps=2)
    t_fast = hf_train(fast, tmp_path / "fast", gradient_accumulation_steps=2)
    assert_losses_close(logged_losses(t_fast), logged_losses(t_ref))
    assert_same_training(weights(fast), weights(ref), init)
    assert loss_stats(fast) == {"fused": 8, "no_labels": 0, "eval": 0, "fallbacks": {}}


def test_trainer_masked_lm_fused_loss_matches_peft(tmp_path):
    """BERT masked-LM training (a third of the positions labelled) with ``fuse_loss=True``: batch 2 x accumulation 2,
    four steps, the same losses and LoRA weights as unpatched PEFT, every training call on the fused loss."""
    from peftfast.patching.loss import loss_stats

    ref = peft_model("bert", r=4, lora_alpha=8)
    init = weights(ref)
    fast = peftfast.patch(copy.deepcopy(ref), fuse_loss=True)
    data = rows()
    for r in data:
        r["labels"] = torch.where(torch.arange(r["labels"].numel()) % 3 == 0, r["labels"], -100)
    t_ref = hf_train(ref, tmp_path / "ref", gradient_accumulation_steps=2, train_dataset=data)
    t_fast = hf_train(fast, tmp_path / "fast", gradient_accumulation_steps=2, train_dataset=data)
    assert_losses_close(logged_losses(t_fast), logged_losses(t_ref))
    assert_same_training(weights(fast), weights(ref), init)
    assert loss_stats(fast) == {"fused": 8, "no_labels": 0, "eval": 0, "fallbacks": {}}


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_trainer_seq2seq_fused_loss_matches_peft(tmp_path, arch):
    """T5 / BART (a ``PeftModelForSeq2SeqLM``) with ``fuse_loss=True``: targets shorter than the sources, one padded
    position, batch 2 x accumulation 2, four steps: the same losses and LoRA weights as unpatched PEFT, every
    training call on the fused loss."""
    from peftfast.patching.loss import loss_stats

    ref = peft_model(arch, r=4, lora_alpha=8)
    init = weights(ref)
    fast = peftfast.patch(copy.deepcopy(ref), fuse_loss=True)
    data = rows()
    for r in data:
        r["labels"] = r["input_ids"][1:6].flip(0).clone()
        r["labels"][-1] = -100
    t_ref = hf_train(ref, tmp_path / "ref", gradient_accumulation_steps=2, train_dataset=data)
    t_fast = hf_train(fast, tmp_path / "fast", gradient_accumulation_steps=2, train_dataset=data)
    assert_losses_close(logged_losses(t_fast), logged_losses(t_ref))
    assert_same_training(weights(fast), weights(ref), init)
    assert loss_stats(fast) == {"fused": 8, "no_labels": 0, "eval": 0, "fallbacks": {}}


def test_trainer_gradient_checkpointing_matches_no_checkpointing(tmp_path):
    """Non-reentrant checkpointing recomputes every block's forward on the fused path and, with dropout 0.1, the
    recompute regenerates the same masks (seeds come from torch's RNG, which checkpointing restores): the weights
    are exactly those of a run without checkpointing."""
    plain = lora_llama(dropout=0.1, patch=True)
    ckpt = copy.deepcopy(plain)
    hf_train(plain, tmp_path / "plain")
    hf_train(ckpt, tmp_path / "ckpt", gradient_checkpointing=True,
             gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_weights(weights(ckpt), weights(plain), tol=1e-6)
    assert fused_counts(plain) == {4}
    assert fused_counts(ckpt) == {8}  # forward + recompute in backward, both fused


def test_trainer_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    """Four steps saving every two; a fresh patched model (LoRA weights scrambled) resumed from checkpoint-2 ends with
    the uninterrupted run's weights: adapter, optimizer, scheduler and RNG (dropout 0.1) state all come back."""
    whole = lora_llama(dropout=0.1, patch=True)
    resumed = copy.deepcopy(whole)
    hf_train(whole, tmp_path, save_strategy="steps", save_steps=2)
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    with torch.no_grad():
        for p in trainable(resumed).values():
            p.normal_()  # only the checkpoint can bring the weights back
    t = hf_train(resumed, tmp_path / "resume", resume=str(ckpt))
    assert t.state.global_step == 4
    assert_same_weights(weights(resumed), weights(whole), tol=1e-6)
    assert fused_counts(resumed) == {2}  # steps 3 and 4 only, on the fused path


_RELOAD = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base_dir, adapter_dir, data_path, out_path = sys.argv[1:5]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
with torch.no_grad():
    logits = model(**torch.load(data_path)).logits
assert "peftfast" not in sys.modules
torch.save(logits, out_path)
"""


def test_save_pretrained_reloads_without_peftfast(tmp_path):
    """Train two steps patched, ``save_pretrained``; a fresh process that never imports peftfast loads the base model
    and the adapter with PEFT and gets the patched model's eval logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    peftfast.patch(model)
    data = batch("llama")
    opt = torch.optim.AdamW(trainable(model).values(), lr=1e-2)
    for _ in range(2):  # B leaves zero, so the adapter changes the logits
        model(**data).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        want = model(input_ids=data["input_ids"]).logits
    assert fused_counts(model) == {3}  # two training forwards and the eval forward, fused
    torch.save({"input_ids": data["input_ids"]}, tmp_path / "data.pt")
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path / "base"), str(tmp_path / "adapter"),
                           str(tmp_path / "data.pt"), str(tmp_path / "logits.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    assert max_rel_err(got, want) < FP32_TOL
    peftfast.unpatch(model)
    with torch.no_grad():  # the adapter did change the model: the comparison is not trivially base vs base
        assert max_rel_err(model.get_base_model()(input_ids=data["input_ids"]).logits, want) < FP32_TOL
        with model.disable_adapter():
            assert max_rel_err(model(input_ids=data["input_ids"]).logits, want) > 1e-4


# ----------------------------------------------------------------------------------------------------------------
# 2. TRL SFTTrainer
# ----------------------------------------------------------------------------------------------------------------
WORDS = "the a cat dog sat ran on under mat log big small red blue and then".split()


@pytest.fixture(scope="module")
def sft_data():
    """A word-level tokenizer built in memory and 16 short texts of 3-11 words (so batches pad, packs restart)."""
    pytest.importorskip("trl", reason="TRL is not installed (add trl and datasets to the dev extras)")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 12, (16,), generator=g)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=g)) for n in lengths]
    return tok, Dataset.from_dict({"text": texts})


SFT_MODES = {
    # fp32, no checkpointing: exact comparison
    "padded": dict(max_length=32),
    "packing": dict(packing=True, max_length=32),  # BFD packing: one row, position_ids restart, padding-free
    "padding_free": dict(padding_free=True, max_length=None),  # TRL requires max_length=None without packing
}


def sft_run(sft_data, tmp_path, patch: bool, **kw):
    """Three SFTTrainer steps on a fresh tiny Llama with TRL's own LoRA wrapping.

    Returns (losses, final LoRA weights, initial LoRA weights, trainer)."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tok, ds = sft_data
    torch.manual_seed(0)
    args = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                adam_epsilon=1e-4, bf16=False, gradient_checkpointing=False, report_to=[], use_cpu=True,
                logging_steps=1, save_strategy="no", disable_tqdm=True, seed=1, data_seed=1)
    trainer = SFTTrainer(model=llama(vocab_size=128), args=SFTConfig(**{**args, **kw}), train_dataset=ds,
                         processing_class=tok,
                         # init_lora_weights=False: random B, so A gets a gradient from step one
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                init_lora_weights=False))
    init = weights(trainer.model)
    if patch:
        peftfast.patch(trainer.model)
    trainer.train()
    return logged_losses(trainer), weights(trainer.model), init, trainer


@pytest.mark.parametrize("mode", list(SFT_MODES))
def test_sft_trainer_patched_matches_peft(sft_data, tmp_path, mode):
    """``SFTTrainer(model=<instance>, peft_config=LoraConfig(...))``, then ``peftfast.patch(trainer.model)``: the same
    per-step losses and final LoRA weights as the unpatched run, padded, packed and padding-free."""
    kw = SFT_MODES[mode]
    l_ref, w_ref, init, _ = sft_run(sft_data, tmp_path / "ref", patch=False, **kw)
    l_fast, w_fast, init_fast, trainer = sft_run(sft_data, tmp_path / "fast", patch=True, **kw)
    assert_same_weights(init_fast, init, tol=0.0)  # both runs start from the same LoRA weights
    first = next(iter(trainer.get_train_dataloader()))
    if mode == "padded":
        assert not bool(first["attention_mask"].all())  # the batch really is padded
    else:  # one flattened row whose position_ids restart at every document
        assert first["input_ids"].shape[0] == 1 and "attention_mask" not in first
        assert int((first["position_ids"][0, 1:] == 0).sum()) >= 3
    assert len(l_fast) == 3
    assert_losses_close(l_fast, l_ref)
    assert_same_training(w_fast, w_ref, init)
    assert fused_counts(trainer.model) == {3}


def test_sft_trainer_own_fused_lm_head_is_named_in_the_report(sft_data, tmp_path):
    """TRL 1.x binds its own chunked LM-head loss to the model's forward: ``fuse_loss=True`` steps aside and the
    report says it is TRL's (older TRL leaves the forward alone and the fused loss is installed)."""
    import trl.trainer.utils as trl_utils
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tok, ds = sft_data
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, bf16=False,
                     report_to=[], use_cpu=True, save_strategy="no", max_length=32)
    trainer = SFTTrainer(model=llama(vocab_size=128), args=args, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=4, target_modules="all-linear"))
    peftfast.patch(trainer.model, fuse_loss=True)
    entry = next(e for e in peftfast.report(trainer.model).modules if e.kind == "loss")
    if hasattr(trl_utils, "add_fused_lm_head"):
        assert not entry.patched and "TRL's own" in entry.reason and "_fused_forward" in entry.reason
    else:
        assert entry.patched, entry.reason
    assert fused_counts(trainer.model) == {0}  # the LoRA layers are patched all the same (no call yet)


def test_sft_trainer_defaults_bf16_autocast_and_checkpointing(sft_data, tmp_path):
    """TRL's defaults on CPU (``bf16=True`` autocast, gradient checkpointing on): losses within bf16 rounding of the
    unpatched run, and checkpointing recomputes on the fused path."""
    from trl import SFTConfig

    defaults = SFTConfig(output_dir=str(tmp_path), use_cpu=True)
    assert defaults.bf16 and defaults.gradient_checkpointing  # what this test is about
    kw = dict(bf16=True, gradient_checkpointing=True, learning_rate=1e-3, max_length=32)
    l_ref, *_ = sft_run(sft_data, tmp_path / "ref", patch=False, **kw)
    l_fast, *_, trainer = sft_run(sft_data, tmp_path / "fast", patch=True, **kw)
    assert_losses_close(l_fast, l_ref, tol=1e-3)  # bf16 logits: within a quarter of a bf16 ulp (2^-8 relative)
    assert fused_counts(trainer.model) == {6}  # 3 forwards + 3 recomputes


def grpo_run(sft_data, tmp_path, patch: bool):
    """Three GRPOTrainer steps (TRL's LoRA wrapping, no vLLM): each step samples two completions per prompt with the
    training model's own ``generate``, scores them, and takes a policy-gradient step. Returns (per-step logs, final
    LoRA weights, initial LoRA weights, trainer)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    tok, _ = sft_data
    texts = ["the cat sat on", "a dog ran", "big red log and then", "the small mat"] * 2
    prompts = Dataset.from_dict({"prompt": texts})

    def reward(completions, **kwargs):
        return [c.count("cat") + 0.1 * len(c.split()) + 0.05 * c.count("red") for c in completions]

    torch.manual_seed(0)
    model = llama(vocab_size=128)
    with torch.no_grad():  # peaked next-token distributions: which tokens are sampled depends on the logits
        model.lm_head.weight.mul_(40.0)
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=5, learning_rate=1e-2, adam_epsilon=1e-4, bf16=False, report_to=[],
                      use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=1, data_seed=1,
                      gradient_checkpointing=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompts,
                          processing_class=tok, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                       init_lora_weights=False))
    init = weights(trainer.model)
    if patch:
        peftfast.patch(trainer.model)
    trainer.train()
    logs = [{k: h[k] for k in ("grad_norm", "reward", "entropy")} for h in trainer.state.log_history if "loss" in h]
    return logs, weights(trainer.model), init, trainer


def test_grpo_trainer_generates_and_trains_as_unpatched(sft_data, tmp_path):
    """TRL's ``GRPOTrainer`` without vLLM samples completions with the model it trains, then scores and trains on
    them: on a patched model the same completions come out (same rewards), with the same entropies and gradient
    norms, and the same LoRA weights after three steps; the fused layers served generation and training alike
    (``sft_data`` skips where TRL is not installed)."""
    want, w_ref, init, _ = grpo_run(sft_data, tmp_path / "ref", patch=False)
    got, w_fast, init_fast, trainer = grpo_run(sft_data, tmp_path / "fast", patch=True)
    assert_same_weights(init_fast, init, tol=0.0)
    assert len(got) == len(want) == 3
    for step, (a, b) in enumerate(zip(got, want)):
        assert a["reward"] == b["reward"], (step, a, b)  # the same sampled completions
        assert abs(a["entropy"] - b["entropy"]) <= 1e-5 * abs(b["entropy"]), (step, a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(b["grad_norm"], 1e-3), (step, a, b)
    assert any(b["grad_norm"] > 0 for b in want)  # a step that moved the weights
    assert_same_weights(w_fast, w_ref, tol=1e-4)
    counts = fused_counts(trainer.model)
    assert min(counts) > 3 * 2, counts  # per step: generation's forwards, then the loss's


def dpo_run(sft_data, tmp_path, patch: bool, **kw):
    """Three DPOTrainer steps (TRL's LoRA wrapping: the reference log-probabilities come from the same model with
    its adapter disabled) on prompt / chosen / rejected triples. Returns (per-step logs, final LoRA weights,
    initial LoRA weights, trainer)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    tok, _ = sft_data
    rows = [("the cat sat on", "the mat", "a log"), ("a dog ran", "under the log", "on"),
            ("big red log and then", "the cat sat", "small blue dog ran on the mat"), ("the small mat", "sat", "and")]
    data = Dataset.from_dict({k: [r[i] for r in rows] * 2 for i, k in enumerate(("prompt", "chosen", "rejected"))})
    torch.manual_seed(0)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     adam_epsilon=1e-4, bf16=False, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                     disable_tqdm=True, seed=1, data_seed=1, gradient_checkpointing=False, max_length=32, **kw)
    trainer = DPOTrainer(model=llama(vocab_size=128), args=args, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False))
    init = weights(trainer.model)
    if patch:
        peftfast.patch(trainer.model)
    trainer.train()
    keys = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
    logs = [{k: h[k] for k in keys if k in h} for h in trainer.state.log_history if "loss" in h]
    return logs, weights(trainer.model), init, trainer


def test_dpo_trainer_with_disabled_adapter_reference_trains_as_unpatched(sft_data, tmp_path):
    """TRL's ``DPOTrainer`` with a ``peft_config`` computes the reference log-probabilities with the adapter
    disabled and the policy's with it on, from one model: patched, the same losses, rewards, log-probabilities and
    gradient norms at each step, and the same LoRA weights after three; the fused layers ran both passes."""
    want, w_ref, init, _ = dpo_run(sft_data, tmp_path / "ref", patch=False)
    got, w_fast, init_fast, trainer = dpo_run(sft_data, tmp_path / "fast", patch=True)
    assert_same_weights(init_fast, init, tol=0.0)
    assert len(got) == len(want) == 3 and all(len(g) == 6 for g in got), got
    for step, (a, b) in enumerate(zip(got, want)):
        for k in b:
            assert abs(a[k] - b[k]) <= 1e-4 * max(abs(b[k]), 1e-2), (step, k, a[k], b[k])
    # rewards are beta·(policy − reference) log-probabilities: non-zero, the reference pass really ran without LoRA
    assert all(abs(b["rewards/chosen"]) > 1e-4 for b in want), want
    assert_same_weights(w_fast, w_ref, tol=1e-4)
    rt = peftfast.report(trainer.model).runtime(trainer.model)
    # each step: the policy's forward on the fused path, the reference's on the base-only path
    assert {(r["fused"], r["base_only"]) for r in rt.values()} == {(3, 3)} and len(rt) == 14, rt


# ----------------------------------------------------------------------------------------------------------------
# 3. plain PyTorch loop
# ----------------------------------------------------------------------------------------------------------------
def test_plain_loop_adamw_same_losses():
    ref = lora_llama()
    init = weights(ref)
    fast = peftfast.patch(copy.deepcopy(ref))
    data = batch("llama")
    losses = {}
    for name, model in (("ref", ref), ("fast", fast)):
        opt = torch.optim.AdamW(trainable(model).values(), lr=1e-2, eps=1e-4, weight_decay=0.01)
        losses[name] = []
        for _ in range(5):
            loss = model(**data).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    assert_losses_close(losses["fast"], losses["ref"])
    assert losses["ref"][-1] < losses["ref"][0] - 0.05  # it trained
    assert_same_training(weights(fast), weights(ref), init)
    assert fused_counts(fast) == {5}


# ----------------------------------------------------------------------------------------------------------------
# 4. torch.compile
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled_run():
    """Eager vs ``torch.compile(backend="aot_eager")`` loss and grads (dropout 0.1: the seed draws must follow the
    RNG stream as in eager), and the break reasons of that same compilation (no second tracing for ``explain``)."""
    import torch._dynamo
    from torch._dynamo.backends.debugging import ExplainWithBackend

    model = lora_llama(dropout=0.1, layers=1, patch=True)
    data = batch("llama")

    eager = loss_and_grads(model, data, seed=11)
    torch._dynamo.reset()
    explain = ExplainWithBackend("aot_eager")
    compiled = torch.compile(model, backend=explain)
    try:
        first = loss_and_grads(model, data, seed=11, call=compiled)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        second = loss_and_grads(model, data, seed=11, call=compiled)  # cached graphs (guards pass) give the same result
        recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames
        out = explain.output()
    finally:
        torch._dynamo.reset()
    return dict(model=model, eager=eager, compiled=[first, second], explanation=out, recompiles=recompiles)


def test_compile_matches_eager(compiled_run):
    e_loss, e_grads = compiled_run["eager"]
    for loss, grads in compiled_run["compiled"]:
        assert abs(loss.item() - e_loss.item()) <= FP32_TOL * abs(e_loss.item())
        assert_same_weights(grads, e_grads)
    # every layer on the fused path: eager counts each call, a compiled call site counts once per compilation (the
    # counters must not make Dynamo guard on their values, or every call would recompile)
    assert fused_counts(compiled_run["model"]) == {2}
    assert compiled_run["recompiles"] == 0


def test_compile_with_gradient_checkpointing_matches_eager():
    """``Trainer(torch_compile=True, gradient_checkpointing=True)`` in one model: the checkpointed layers recompute
    inside the compiled step, their dropout seeds drawn again from the restored RNG state. The compiled loss and
    gradients are the eager patched model's bit for bit (dropout 0.1), and no graph break lies in peftfast code."""
    import torch._dynamo
    from torch._dynamo.backends.debugging import ExplainWithBackend

    model = lora_llama(dropout=0.1, layers=2)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    peftfast.patch(model)
    data = batch("llama")
    e_loss, e_grads = loss_and_grads(model, data, seed=11)
    torch._dynamo.reset()
    explain = ExplainWithBackend("aot_eager")
    try:
        c_loss, c_grads = loss_and_grads(model, data, seed=11, call=torch.compile(model, backend=explain))
        breaks = _our_breaks(explain.output())
    finally:
        torch._dynamo.reset()
    assert torch.equal(c_loss, e_loss) and all(torch.equal(c_grads[n], e_grads[n]) for n in e_grads)
    assert not breaks, breaks
    # forward, then the recompute of each checkpointed layer in backward (a compiled call site counts once)
    assert min(fused_counts(model)) >= 2, fused_counts(model)


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compile_inductor_matches_eager(dropout, monkeypatch):
    """The default backend on CPU (C++ codegen). With dropout, inductor draws random numbers its own way (our seed
    draw runs inside its graph), so eager RNG must be requested (``fallback_random``) to compare masks."""
    import torch._dynamo
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    model = lora_llama(dropout=dropout, layers=1, patch=True)
    data = batch("llama")

    e_loss, e_grads = loss_and_grads(model, data, seed=11)
    torch._dynamo.reset()
    try:
        c_loss, c_grads = loss_and_grads(model, data, seed=11, call=torch.compile(model))
    finally:
        torch._dynamo.reset()
    assert abs(c_loss.item() - e_loss.item()) <= FP32_TOL * abs(e_loss.item())
    assert_same_weights(c_grads, e_grads)
    assert fused_counts(model) == {2}


def _our_breaks(explanation) -> list[str]:
    pkg = os.path.dirname(os.path.abspath(peftfast.__file__))
    out = []
    for br in explanation.break_reasons:
        frames = [f for f in br.user_stack if os.path.abspath(f.filename).startswith(pkg)]
        if frames:
            out.append(f"{frames[-1].filename.removeprefix(pkg)}:{frames[-1].lineno}: {br.reason.splitlines()[0]}")
    return out


def test_compile_has_no_graph_breaks_in_our_ops(compiled_run):
    """Our LoRA, MLP, norm, RoPE and attention ops are registered torch ops (or traceable code) and draw their
    dropout seeds as tensors, so Dynamo keeps the whole patched model in one graph."""
    breaks = _our_breaks(compiled_run["explanation"])
    assert not breaks, f"{len(breaks)} graph break(s) in peftfast code, e.g. {breaks[:3]}"
    assert compiled_run["explanation"].graph_count >= 1


# ----------------------------------------------------------------------------------------------------------------
# 5. distributed: accelerate DDP and FSDP2 over two CPU (gloo) processes
# ----------------------------------------------------------------------------------------------------------------
DIST_STEPS, DIST_BATCH, WORLD = 3, 4, 2


def _dist_ids() -> torch.Tensor:
    return torch.randint(2, 128, (DIST_BATCH, 9), generator=torch.Generator().manual_seed(5))


def _dist_train(model, ids, reduce=None) -> list[float]:
    opt = torch.optim.AdamW(trainable(model).values(), lr=1e-2, eps=1e-4)
    losses = []
    for _ in range(DIST_STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(reduce(loss.detach()) if reduce else loss.item())
    return losses


def gpt2_rerun():
    """A one-layer GPT-2 (r=4 all-linear LoRA) patched with ``recompute="mlp"``: backward reruns the MLP's up
    projection and backpropagates through that rerun (reentrant, as activation checkpointing does)."""
    return peftfast.patch(peft_model("gpt2", r=4, lora_alpha=8, model_kwargs={"layers": 1}), recompute="mlp")


def _dist_worker(out_path: str) -> None:
    """One rank: DDP through ``Accelerator``, then FSDP2 (``fully_shard``) patched before and after sharding."""
    import torch.distributed as dist
    from accelerate import Accelerator
    from torch.distributed.fsdp import fully_shard

    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    shard = _dist_ids().chunk(world)[rank]
    res: dict = {"world": world, "distributed_type": str(acc.distributed_type), "backend": dist.get_backend()}

    def ddp_train(model) -> tuple[str, list[float]]:
        ddp, opt = acc.prepare(model, torch.optim.AdamW(trainable(model).values(), lr=1e-2, eps=1e-4))
        losses = []
        for _ in range(DIST_STEPS):
            loss = ddp(input_ids=shard, labels=shard).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(acc.reduce(loss.detach(), "mean").item())
        return type(ddp).__name__, losses

    model = lora_llama(layers=1, patch=True)
    wrapper, losses = ddp_train(model)
    res["ddp"] = dict(wrapper=wrapper, losses=losses, weights=weights(model), fused=fused_counts(model))
    model = gpt2_rerun()
    _, losses = ddp_train(model)
    res["ddp_gpt2_rerun"] = dict(losses=losses, weights=weights(model), fused=fused_counts(model))

    def mean(t: torch.Tensor) -> float:
        dist.all_reduce(t)
        return t.item() / world

    for order in ("patch_then_shard", "shard_then_patch"):
        model = lora_llama(layers=1, patch=order == "patch_then_shard")
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        if order == "shard_then_patch":
            peftfast.patch(model)
        losses = _dist_train(model, shard, reduce=mean)
        full = {n: p.full_tensor().detach() for n, p in trainable(model).items()}  # collective: every rank calls it
        res[order] = dict(wrapper=type(model).__name__, sharded=type(next(iter(trainable(model).values()))).__name__,
                          losses=losses, weights=full, fused=fused_counts(model))
    # the two-layer MLP's up-projection rerun inside FSDP2's per-block gather (patched, then sharded)
    model = gpt2_rerun()
    for block in model.base_model.model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    losses = _dist_train(model, shard, reduce=mean)
    full = {n: p.full_tensor().detach() for n, p in trainable(model).items()}
    res["fsdp_gpt2_rerun"] = dict(wrapper=type(model).__name__, losses=losses, weights=full,
                                  fused=fused_counts(model))
    if rank == 0:
        torch.save(res, out_path)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out, worker: str = "_dist_worker") -> tuple[bool, str]:
    """Two ranks of ``worker`` with the env torchrun sets; (all ranks exited 0, their logs)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(WORLD),
           "OMP_NUM_THREADS": "1"}  # two ranks on two cores: one thread each
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), worker, str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs, deadline = [], time.monotonic() + 300
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    # deprecation chatter (DeepSpeed calls torch.distributed APIs that warn on every call) would push a rank's real
    # error out of the kept tail
    noise = ("is deprecated", "return func(*args, **kwargs)", "warnings.warn(")
    kept = ["\n".join(ln for ln in log.splitlines() if not any(n in ln for n in noise)) for log in logs]
    codes = [p.returncode for p in procs]
    return all(c == 0 for c in codes), f"exit codes {codes}\n" + "\n".join(log[-4000:] for log in kept)


def _run_ranks(tmp_path_factory, worker: str) -> dict:
    """The two-rank job's results, the single-process run over the full batch, and its initial weights."""
    out = tmp_path_factory.mktemp(worker) / "result.pt"
    ok, logs = _launch(out, worker)
    # retried once: the free port taken between probing and binding; or a rank aborting in C++ at teardown
    # ("terminate called without an active exception", gloo's threads: seen once in a full-suite CI run of the
    # DeepSpeed worker, never in standalone runs). A second failure fails with both ranks' exit codes and logs.
    if not ok and ("Address already in use" in logs or "terminate called" in logs):
        ok, logs = _launch(out, worker)
    assert ok, logs
    single = lora_llama(layers=1, patch=True)
    init = weights(single)
    return dict(dist=torch.load(out, weights_only=False), losses=_dist_train(single, _dist_ids()),
                weights=weights(single), init=init)


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    return _run_ranks(tmp_path_factory, "_dist_worker")


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_up_projection_rerun_under_ddp_and_fsdp2_matches_single_process(dist_run, wrapper):
    """The two-layer MLP's up-projection rerun (``recompute="mlp"``) runs inside backward: DDP's gradient hooks fire
    in that reentrant backward, and FSDP2 (``fully_shard`` per block and at the root) has the block's shards
    gathered for it. The same losses and weights as one process on the whole batch, every LoRA call fused."""
    single = gpt2_rerun()
    init = weights(single)
    losses = _dist_train(single, _dist_ids())
    run = dist_run["dist"]["ddp_gpt2_rerun" if wrapper == "ddp" else "fsdp_gpt2_rerun"]
    if wrapper == "fsdp":
        assert run["wrapper"].startswith("FSDP")
    assert_losses_close(run["losses"], losses)
    assert_same_training(run["weights"], weights(single), init)
    # per step: each layer's forward, and the up projection (c_fc) once more in backward
    assert run["fused"] == {DIST_STEPS, 2 * DIST_STEPS}


def test_ddp_two_cpu_processes_matches_single_process(dist_run):
    """Each rank trains on half the batch; DDP averages the gradients, so the all-reduced loss trajectory and the
    weights are those of one process on the whole batch."""
    res = dist_run["dist"]
    assert res["world"] == WORLD and res["backend"] == "gloo" and res["distributed_type"].endswith("MULTI_CPU")
    ddp = res["ddp"]
    assert ddp["wrapper"] == "DistributedDataParallel"
    assert_losses_close(ddp["losses"], dist_run["losses"])
    assert_same_training(ddp["weights"], dist_run["weights"], dist_run["init"])
    assert ddp["fused"] == {DIST_STEPS}


@pytest.mark.parametrize("order", ["patch_then_shard", "shard_then_patch"])
def test_fsdp2_two_cpu_processes_matches_single_process(dist_run, order):
    """FSDP2 (``fully_shard`` per decoder layer and at the root) on gloo: parameters are DTensor shards, gathered for
    each forward; patched before or after sharding, the loss trajectory and gathered weights match one process."""
    res = dist_run["dist"][order]
    assert res["wrapper"].startswith("FSDP") and res["sharded"] == "DTensor"
    assert_losses_close(res["losses"], dist_run["losses"])
    assert_same_training(res["weights"], dist_run["weights"], dist_run["init"])
    assert res["fused"] == {DIST_STEPS}


# ----------------------------------------------------------------------------------------------------------------
# 6. DeepSpeed ZeRO-2 and ZeRO-3 over two CPU (gloo) processes
# ----------------------------------------------------------------------------------------------------------------
# name: (ZeRO stage, patch(recompute=...) or None for the unpatched model, when patched: before or after
# ``deepspeed.initialize``, or before it as if DeepSpeed were not imported yet)
ZERO_RUNS = {
    "zero2": (2, "norms", "before"), "zero3_peft": (3, None, "before"), "zero3": (3, "up", "before"),
    "zero3_attn": (3, "attn", "before"), "zero3_after": (3, "norms", "after"), "zero3_unimported": (3, "up", "unseen")}


ADAPTER_ZERO_RUNS = {"adapter_zero2": 2, "adapter_zero3": 3}  # name: ZeRO stage, fused bottleneck adapters
# ZeRO-3, patched (the default recompute) and not, on the other fused paths: Phi-3's packed qkv_proj / gate_up_proj
# (the packed LoRA-MLP op) in its fused block, and DoRA layers (the fused DoRA op)
OTHER_ZERO3_RUNS = {"phi3": ("phi3", {}), "dora": ("llama", {"use_dora": True})}


def _ds_engine(model, params, stage: int, micro_batch: int):
    """``deepspeed.initialize`` at ZeRO ``stage``; ZeRO-3 partitions every parameter (persistence threshold 0) and
    keeps none gathered beyond its module's forward and backward (no reuse distance, no live or prefetch budget: a
    tiny model would otherwise stay gathered whole, hiding a read of a released shard)."""
    import deepspeed

    zero = {"stage": stage, "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
            "stage3_max_live_parameters": 0, "stage3_prefetch_bucket_size": 0}
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "zero_optimization": zero}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-2, eps=1e-4),
                                      config=config)
    return engine


def _ds_train(engine, shard: torch.Tensor) -> list[float]:
    """DIST_STEPS steps on this rank's shard; the losses averaged over the ranks."""
    import torch.distributed as dist

    losses = []
    for _ in range(DIST_STEPS):
        loss = engine(input_ids=shard, labels=shard).loss
        engine.backward(loss)
        engine.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / dist.get_world_size())
    return losses


def _ds_worker(out_path: str) -> None:
    """One rank: each of ``ZERO_RUNS`` through ``deepspeed.initialize`` (CPU accelerator, gloo), patched before it as
    HF Trainer users do, or after it; ZeRO-3 partitions every parameter (persistence threshold 0), so none is
    gathered unless a module's hooks gather it."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = _dist_ids().chunk(world)[rank]
    res: dict = {"world": world, "backend": dist.get_backend()}
    from unittest import mock

    for name, (stage, recompute, when) in ZERO_RUNS.items():
        model = lora_llama(layers=1)
        if recompute is not None and when != "after":
            with mock.patch("peftfast.modules._bind.deepspeed_imported", lambda: when != "unseen"):
                peftfast.patch(model, recompute=recompute)
        params = list(trainable(model).values())
        engine = _ds_engine(model, params, stage, len(shard))
        if recompute is not None and when == "after":
            peftfast.patch(model, recompute=recompute)
        losses = _ds_train(engine, shard)
        partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
        with deepspeed.zero.GatheredParameters(params):  # ZeRO-3: the whole tensors on every rank (else a no-op)
            full = weights(model)
        runtime, skipped, external = {}, {}, {}
        if recompute is not None:
            rep = peftfast.report(model)
            runtime = {**rep.runtime(model), **rep.module_runtime(model)}
            skipped = {e.name: e.reason for e in [*rep.skipped, *rep.modules] if e.reason}
            # what each LoRA layer asked DeepSpeed to gather for it, and what is left of that after unpatch
            mods = {n: m for n, m in model.named_modules() if hasattr(m, "_peftfast_mlp") or
                    hasattr(m, "_peftfast_block") or (hasattr(m, "_peftfast") and hasattr(m, "lora_A"))}
            external = {n: len(getattr(m, "_external_params", {})) for n, m in mods.items()}
            peftfast.unpatch(model)
            external = {n: (k, len(getattr(mods[n], "_external_params", {}))) for n, k in external.items()}
        res[name] = dict(losses=losses, weights=full, partitioned=partitioned, runtime=runtime, skipped=skipped,
                         external=external)
        engine.destroy()
    for name, (arch, lora_kwargs) in OTHER_ZERO3_RUNS.items():
        for patched in (False, True):
            model = peft_model(arch, r=4, lora_alpha=8, model_kwargs={"layers": 1}, **lora_kwargs)
            init = weights(model)
            if patched:
                peftfast.patch(model)
            params = list(trainable(model).values())
            engine = _ds_engine(model, params, 3, len(shard))
            losses = _ds_train(engine, shard)
            with deepspeed.zero.GatheredParameters(params):
                full = weights(model)
            runtime = {}
            if patched:
                rep = peftfast.report(model)
                runtime = {**rep.runtime(model), **rep.module_runtime(model)}
            res[f"other_{name}_{'patched' if patched else 'peft'}"] = dict(losses=losses, weights=full, init=init,
                                                                            runtime=runtime)
            engine.destroy()
    for name, stage in ADAPTER_ZERO_RUNS.items():
        model = adapter_llama(fused=True)
        params = list(trainable(model).values())
        engine = _ds_engine(model, params, stage, len(shard))
        with OpCalls() as calls:
            losses = _ds_train(engine, shard)
        partitioned = all(hasattr(p, "ds_id") for p in params)
        with deepspeed.zero.GatheredParameters(params):
            full = weights(model)
        res[name] = dict(losses=losses, weights=full, partitioned=partitioned, ops=dict(calls.count()))
        engine.destroy()
    if rank == 0:
        torch.save(res, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    return _run_ranks(tmp_path_factory, "_ds_worker")


def test_deepspeed_zero2_runs_fused_and_matches_single_process(zero_run):
    """ZeRO-2 shards gradients and optimizer states, not parameters: the fused path serves every call."""
    res = zero_run["dist"]
    assert res["world"] == WORLD and res["backend"] == "gloo"
    z2 = res["zero2"]
    assert not z2["partitioned"]
    assert_losses_close(z2["losses"], zero_run["losses"])
    assert_same_training(z2["weights"], zero_run["weights"], zero_run["init"])
    lora = {n: r for n, r in z2["runtime"].items() if "fused" in r and "base_only" in r}
    assert lora and all(r["fused"] == DIST_STEPS and not r["fallbacks"] for r in lora.values())


_L0 = "base_model.model.model.layers.0."
# (registered, left after unpatch) per module: each attention LoRA layer its base weight, A and B; the MLP its three
# projections' (9); the projections themselves none, since the LoRA-MLP op runs them and they are never called; the
# fused block its two norm weights
_ZERO3_EXTERNAL = {**{f"{_L0}self_attn.{p}_proj": (3, 0) for p in "qkvo"}, f"{_L0}mlp": (9, 0),
                   **{f"{_L0}mlp.{p}_proj": (0, 0) for p in ("gate", "up", "down")}, _L0[:-1]: (2, 0)}


@pytest.mark.parametrize("name", ["zero3", "zero3_attn"])
def test_deepspeed_zero3_runs_fused_lora_and_trains_like_peft(zero_run, name):
    """ZeRO-3 partitions the parameters and gathers each module's own around its forward and backward. Each fused
    LoRA layer registers its children's parameters with DeepSpeed before DeepSpeed's first gathering for it (3 per
    layer here: base weight, A, B), so DeepSpeed gathers them around the layer's own forward and backward and the
    fused op serves every call, one layer at a time; the LoRA-MLP op and the fused block register what they read of
    other modules (the projections' parameters, the two norm weights) and run every call too. Training is that of
    the unpatched model under ZeRO-3 and of one process; ``unpatch`` unregisters every external parameter."""
    res = zero_run["dist"]
    run, peft = res[name], res["zero3_peft"]
    assert run["partitioned"] and peft["partitioned"]
    assert_losses_close(run["losses"], peft["losses"])
    assert_losses_close(run["losses"], zero_run["losses"])
    assert_same_training(run["weights"], zero_run["weights"], zero_run["init"])
    rt = run["runtime"]
    lora = {n: r for n, r in rt.items() if "base_only" in r}
    assert len(lora) == 7 and all(r["fused"] == DIST_STEPS and not r["fallbacks"] for r in lora.values()), lora
    mlp = next(r for n, r in rt.items() if n.endswith(".mlp"))
    assert mlp["fused"] == DIST_STEPS and not mlp["fallbacks"], mlp
    assert run["external"] == _ZERO3_EXTERNAL, run["external"]
    block = next(r for n, r in rt.items() if n.endswith("(block)"))
    assert block["fused"] == DIST_STEPS and not block["fallbacks"], block  # its norm rebuilds included


@pytest.mark.parametrize("name", list(OTHER_ZERO3_RUNS))
def test_deepspeed_zero3_other_fused_paths_train_like_peft(zero_run, name):
    """Under ZeRO-3 over two processes, Phi-3 (packed qkv_proj and gate_up_proj: the packed LoRA-MLP op, the fused
    block) and DoRA layers (the DoRA MLP op) train as the unpatched PEFT model does under ZeRO-3; every call is
    served, fused or stepping aside with a counted reason (never silently), and the LoRA layers run fused."""
    res = zero_run["dist"]
    peft, run = res[f"other_{name}_peft"], res[f"other_{name}_patched"]
    assert_losses_close(run["losses"], peft["losses"])
    assert_same_training(run["weights"], peft["weights"], peft["init"])
    lora = {n: r for n, r in run["runtime"].items() if "base_only" in r}
    assert lora and all(r["fused"] == DIST_STEPS and not r["fallbacks"] for r in lora.values()), lora
    rt = run["runtime"]
    # the packed LoRA-MLP op (Phi-3) and the DoRA MLP op register their projections' parameters (the magnitudes
    # too) and run every call
    mlps = [r for n, r in rt.items() if n.endswith(".mlp")]
    assert mlps and all(r["fused"] == DIST_STEPS and not r["fallbacks"] for r in mlps), rt
    blocks = [r for n, r in rt.items() if n.endswith("(block)")]
    assert blocks and all(r["fused"] == DIST_STEPS and not r["fallbacks"] for r in blocks), rt
    attention = [r for n, r in rt.items() if n.endswith(("(attention)", "(rope)"))]
    assert attention and all(r["fused"] == DIST_STEPS and not r["fallbacks"] for r in attention), rt


def test_deepspeed_zero3_patch_after_initialize_runs_fused_lora(zero_run):
    """Patched after ``deepspeed.initialize`` (parameters already partitioned, DeepSpeed's hooks in place): the LoRA
    layers and the LoRA-MLP register their parameters at patch time and run fused; blocks, whose patch-time probe
    needs the norm weights whole, are skipped with that reason; training is unchanged."""
    from peftfast.modules.block import PARTITIONED_REASON

    run = zero_run["dist"]["zero3_after"]
    assert_losses_close(run["losses"], zero_run["dist"]["zero3_peft"]["losses"])
    assert_same_training(run["weights"], zero_run["weights"], zero_run["init"])
    assert not {n for n in run["skipped"] if n.endswith("_proj")}, run["skipped"]
    lora = {n: r for n, r in run["runtime"].items() if "base_only" in r}
    assert len(lora) == 7 and all(r["fused"] == DIST_STEPS and not r["fallbacks"] for r in lora.values()), lora
    # patched on partitioned parameters, every layer registers at patch time (the MLP's projections too, though the
    # LoRA-MLP op runs them)
    proj = {f"{_L0}mlp.{p}_proj": (3, 0) for p in ("gate", "up", "down")}
    unfused_block = {k: v for k, v in _ZERO3_EXTERNAL.items() if k != _L0[:-1]}
    assert run["external"] == {**unfused_block, **proj}, run["external"]
    mlp = next(r for n, r in run["runtime"].items() if n.endswith(".mlp"))
    assert mlp["fused"] == DIST_STEPS and not mlp["fallbacks"], mlp
    assert any(r == PARTITIONED_REASON for r in run["skipped"].values()), run["skipped"]


def test_deepspeed_zero3_patched_before_deepspeed_is_imported_registers_at_the_first_step(zero_run):
    """Patched before DeepSpeed is imported (no registration pre-hook armed), then ``deepspeed.initialize``: the first
    step runs the original forwards, each call counted with the ZeRO-3 reason, and registers the parameters; every
    later step runs fused. Training is that of the unpatched model under ZeRO-3."""
    from peftfast.modules._bind import ZERO3_REASON

    run = zero_run["dist"]["zero3_unimported"]
    assert run["partitioned"]
    assert_losses_close(run["losses"], zero_run["dist"]["zero3_peft"]["losses"])
    assert_same_training(run["weights"], zero_run["weights"], zero_run["init"])
    once = {ZERO3_REASON: 1}
    lora = {n: r for n, r in run["runtime"].items() if "base_only" in r}
    assert len(lora) == 7 and all(r["fused"] == DIST_STEPS - 1 and r["fallbacks"] == once
                                  for r in lora.values()), lora
    mlp = next(r for n, r in run["runtime"].items() if n.endswith(".mlp"))
    assert mlp["fused"] == DIST_STEPS - 1 and mlp["fallbacks"] == once, mlp
    block = next(r for n, r in run["runtime"].items() if n.endswith("(block)"))
    assert block["fused"] == DIST_STEPS - 1 and block["fallbacks"] == once, block
    # the first step's MLP ran its projections, which registered their own parameters then
    proj = {f"{_L0}mlp.{p}_proj": (3, 0) for p in ("gate", "up", "down")}
    assert run["external"] == {**_ZERO3_EXTERNAL, **proj}, run["external"]


def _mark_zero3(model) -> None:
    """Give every parameter a ``ds_id``, the attribute by which peftfast tells a ZeRO-3 parameter (nothing is
    partitioned: this checks the registration plumbing in one process)."""
    for i, p in enumerate(model.parameters()):
        p.ds_id = i


def test_zero3_registration_plumbing_in_one_process():
    """A LoRA layer whose parameters carry ``ds_id`` registers every one of them as a DeepSpeed external parameter at
    its first call, before any other pre-hook, and the MLP its projections'; the sibling group then stays idle (each
    member runs alone), the LoRA-MLP op still serves the MLP, the outputs are unchanged, and ``unpatch`` removes the
    hooks and every registration. The hook is invisible to the LoRA-MLP's check for user hooks."""
    pytest.importorskip("deepspeed")
    from peftfast.modules import lora as lora_mod

    ids = _dist_ids()[:2]
    model = lora_llama(layers=1)
    ref = model(input_ids=ids).logits
    peftfast.patch(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert list(q._forward_pre_hooks.values())[0] is lora_mod._zero3_register_hook and not lora_mod.has_hooks(q)
    model(input_ids=ids)
    mlp = {n: r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith(".mlp")}
    assert [r["fused"] for r in mlp.values()] == [1], mlp  # without ds_id the LoRA-MLP op runs
    _mark_zero3(model)
    assert not getattr(q, "_external_params", {})
    out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    lora = {n: m for n, m in model.named_modules() if hasattr(m, "_peftfast") and hasattr(m, "lora_A")}
    assert len(lora) == 7
    # the attention's layers register their own parameters, the MLP its three projections' (which it runs itself)
    owners = [m for n, m in model.named_modules() if n.endswith(("_proj", ".mlp")) and ".mlp." not in n]
    assert len(owners) == 5
    for m in owners:
        assert {id(p) for p in m.parameters()} == set(m._external_params)
    assert q._peftfast.group is not None and not q._peftfast.group._outs  # the group computed nothing
    rt = peftfast.report(model).runtime(model)
    assert all(r["fused"] == 2 and not r["fallbacks"] for n, r in rt.items() if n in lora), rt
    assert not q._forward_pre_hooks  # registered for good: the hook removed itself
    # the fused block registers the two norm weights its add+norm op and its rebuilds read, and keeps running fused
    block = model.base_model.model.model.layers[0]
    norms = {id(block.input_layernorm.weight), id(block.post_attention_layernorm.weight)}
    assert set(block._external_params) == norms and not block._forward_pre_hooks
    fused = {n: r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith("(block)")}
    assert [(r["fused"], r["fallbacks"]) for r in fused.values()] == [(2, {})], fused
    mlp = {n: r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith(".mlp")}
    assert [(r["fused"], r["fallbacks"]) for r in mlp.values()] == [(2, {})], mlp
    peftfast.unpatch(model)
    for m in [*owners, block]:
        assert not m._external_params and not m._forward_pre_hooks


def test_zero3_patched_before_deepspeed_is_imported_registers_at_the_first_call(monkeypatch):
    """Patched while DeepSpeed is not imported (nothing can be partitioned yet), no pre-hook is armed: a pre-hook puts
    every call on ``nn.Module``'s slow path. The first call that finds ZeRO-3 parameters runs the original forward,
    counted with its reason, and registers them; the fused path serves every later call, outputs unchanged, and
    ``unpatch`` undoes every registration. Armed hooks remove themselves once they have registered."""
    pytest.importorskip("deepspeed")
    from peftfast.modules._bind import ZERO3_REASON

    ids = _dist_ids()[:2]
    model = lora_llama(layers=1)
    ref = model(input_ids=ids).logits
    with monkeypatch.context() as m:
        m.delitem(sys.modules, "deepspeed")
        peftfast.patch(model)
    layer = model.base_model.model.model.layers[0]
    lora = {n: m for n, m in model.named_modules() if hasattr(m, "_peftfast") and hasattr(m, "lora_A")}
    assert len(lora) == 7 and not any(m._forward_pre_hooks for m in [*lora.values(), layer.mlp])
    _mark_zero3(model)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    rep = peftfast.report(model)
    rt, mlp = rep.runtime(model), next(r for n, r in rep.module_runtime(model).items() if n.endswith(".mlp"))
    assert all(r["fused"] == 0 and r["fallbacks"] == {ZERO3_REASON: 1} for n, r in rt.items() if n in lora), rt
    assert (mlp["fused"], mlp["fallbacks"]) == (0, {ZERO3_REASON: 1}), mlp
    assert {id(p) for p in layer.mlp.parameters()} == set(layer.mlp._external_params)
    assert {id(p) for p in layer.self_attn.q_proj.parameters()} == set(layer.self_attn.q_proj._external_params)
    out = model(input_ids=ids).logits
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    rep = peftfast.report(model)
    rt, mlp = rep.runtime(model), next(r for n, r in rep.module_runtime(model).items() if n.endswith(".mlp"))
    attn = [n for n in lora if ".self_attn." in n]
    assert len(attn) == 4 and all(rt[n]["fused"] == 1 for n in attn), rt  # the MLP's projections run inside its op
    assert (mlp["fused"], mlp["fallbacks"]) == (1, {ZERO3_REASON: 1}), mlp
    block = next(r for n, r in rep.module_runtime(model).items() if n.endswith("(block)"))
    assert (block["fused"], block["fallbacks"]) == (1, {ZERO3_REASON: 1}), block
    assert len(layer._external_params) == 2  # the block's two norm weights
    peftfast.unpatch(model)
    for m in [*lora.values(), layer.mlp, layer]:
        assert not getattr(m, "_external_params", {}) and not m._forward_pre_hooks


def test_zero3_frozen_mlp_registers_its_projections_in_one_process():
    """The frozen-MLP op (the base of prompt tuning, adapters) under ZeRO-3: the MLP registers its three frozen
    projections' weights and keeps serving the calls; outputs unchanged; ``unpatch`` undoes the registration."""
    pytest.importorskip("deepspeed")
    model = adapter_llama(fused=True)  # bottleneck adapters train; the base, its MLP included, is frozen
    ids = _dist_ids()[:2]
    ref = model(input_ids=ids).logits
    peftfast.patch(model)
    mlp = model.model.layers[0].mlp
    _mark_zero3(model)
    out = model(input_ids=ids).logits
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert set(mlp._external_params) == {id(getattr(mlp, p).weight) for p in ("gate_proj", "up_proj", "down_proj")}
    rt = {n: r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith(".mlp")}
    assert [(r["fused"], r["fallbacks"]) for r in rt.values()] == [(1, {})], rt
    peftfast.unpatch(model)
    assert not mlp._external_params and not mlp._forward_pre_hooks


def test_zero3_conv1d_lora_is_refused_with_the_reason():
    """GPT-2's ``Conv1D`` bases under ZeRO-3: the fused op would save a transposed view of the gathered weight, so
    the layer is skipped at patch time with the reason."""
    pytest.importorskip("deepspeed")
    model = peft_model("gpt2", r=4, lora_alpha=8, model_kwargs={"layers": 1})
    _mark_zero3(model)
    rep = peftfast.report(peftfast.patch(model))
    reasons = {e.reason for e in rep.skipped if e.name.endswith(("c_attn", "c_proj", "c_fc"))}
    assert reasons and all("nn.Linear bases only" in r for r in reasons), reasons


@pytest.mark.parametrize("name", list(ADAPTER_ZERO_RUNS))
def test_deepspeed_runs_fused_adapters_and_matches_single_process(zero_run, name):
    """An adapter is a module of its own whose forward is the fused op on its own parameters, so ZeRO-3 gathers
    them around it (and ZeRO-2 does not partition them): the fused adapter op serves every call on both stages, and
    training matches the eager adapters in one process on the whole batch."""
    run = zero_run["dist"][name]
    assert run["partitioned"] == (ADAPTER_ZERO_RUNS[name] == 3)
    reference = adapter_llama(fused=False)
    init = weights(reference)
    with OpCalls() as calls:
        losses = _dist_train(reference, _dist_ids())
    assert not calls.count()  # the reference is the eager path
    assert_losses_close(run["losses"], losses)
    assert_same_training(run["weights"], weights(reference), init)
    # two adapters (after attention, after the FFN), one forward and one backward each per step
    assert run["ops"].get("adapter_fwd") == 2 * DIST_STEPS and run["ops"].get("adapter_bwd") == 2 * DIST_STEPS, run


if __name__ == "__main__":  # a rank: tiny shapes rebuild as in the pytest process (conftest)
    from peftfast.ops import recompute

    recompute.MIN_REBUILD_BYTES = 0
if __name__ == "__main__" and sys.argv[1:2] == ["_dist_worker"]:
    _dist_worker(sys.argv[2])
if __name__ == "__main__" and sys.argv[1:2] == ["_ds_worker"]:
    _ds_worker(sys.argv[2])
