"""LoRA on mixture-of-experts stacks (PEFT ``target_parameters``): one experts module, PEFT vs patched.

--cpu (exact, any machine, ~2 min): two experts modules at a third of their model's widths, LoRA r=16 on
      ``gate_up_proj`` and ``down_proj``, fp32, 512 tokens: Qwen3-MoE's (Qwen3-30B-A3B: hidden 768, expert
      intermediate 256, 64 experts, top-8) and gpt-oss's (gpt-oss-20b: hidden and intermediate 960, 32 experts,
      top-4; transposed stacks with biases, interleaved clamped SwiGLU). Bytes saved for backward (parameters
      excluded): PEFT with transformers' default ``grouped_mm`` experts implementation and with ``eager`` (its
      parametrization keeps a merged copy of each stack either way), patched with ``recompute="none"`` (keeps the
      gate/up output) and the default ``recompute="up"`` (reruns the gate/up GEMMs in backward); median fwd+bwd
      time, interleaved runs. Writes ``results/cpu-moe.json``.
--gpu: Qwen3-30B-A3B (hidden 2048, 768, 128 experts, top-8), Mixtral-8x7B (4096, 14336, 8 experts, top-2) and
      gpt-oss-20b (2880, 2880, 32 experts, top-4) expert widths, bf16, 4096 tokens: fwd+bwd time (median, p20, p80)
      and peak CUDA memory above the module's weights, PEFT with each transformers experts implementation it
      supports, and patched. Writes ``<out>/moe.json`` and ``.png``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cli import HERE, main  # noqa: E402

CPU_SHAPES = {"qwen3-30b-a3b/3": dict(family="qwen3_moe", hidden=768, inter=256, experts=64, top_k=8, tokens=512),
              "gpt-oss-20b/3": dict(family="gpt_oss", hidden=960, inter=960, experts=32, top_k=4, tokens=512)}
GPU_SHAPES = {"qwen3-30b-a3b": dict(family="qwen3_moe", hidden=2048, inter=768, experts=128, top_k=8, tokens=4096),
              "mixtral-8x7b": dict(family="qwen3_moe", hidden=4096, inter=14336, experts=8, top_k=2, tokens=4096),
              "gpt-oss-20b": dict(family="gpt_oss", hidden=2880, inter=2880, experts=32, top_k=4, tokens=4096)}


def _experts_module(shape: dict, impl: str):
    """A bare experts module of ``shape['family']``: Qwen3-MoE's (Mixtral's layout) or gpt-oss's."""
    if shape["family"] == "gpt_oss":
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        cfg = GptOssConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                           num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
        cls = GptOssExperts
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        cfg = Qwen3MoeConfig(hidden_size=shape["hidden"], moe_intermediate_size=shape["inter"],
                             num_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
        cls = Qwen3MoeExperts
    cfg._experts_implementation = impl
    return cls(cfg)


def build(shape: dict, variant: str, device: str, dtype, impl: str = "eager", r: int = 16):
    """(experts module wrapped by PEFT, patched unless ``variant == "peft"``; x; top-k index and weights)."""
    import torch
    from peft import LoraConfig, get_peft_model

    import peftfast

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.experts = _experts_module(shape, impl)
    with torch.no_grad():
        for p in holder.experts.parameters():
            p.normal_(0.0, 0.02)
    holder.to(device=device, dtype=dtype)
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, target_modules=[],
                                              target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                                              init_lora_weights=False))
    model.train()
    if variant != "peft":
        peftfast.patch(model, recompute="none" if variant == "patched (recompute=none)" else "up")
        assert all(e.patched for e in peftfast.report(model).modules if e.kind == "experts")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape["tokens"], shape["hidden"], generator=g).to(device=device, dtype=dtype)
    x.requires_grad_()
    logits = torch.randn(shape["tokens"], shape["experts"], generator=g)
    w, idx = torch.topk(torch.softmax(logits, -1), shape["top_k"], dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(device=device, dtype=dtype)
    return model, x, idx.to(device), w


def _experts(model):
    return model.base_model.model.experts


VARIANTS = {"peft [grouped_mm]": ("peft", "grouped_mm"), "peft [eager]": ("peft", "eager"),
            "patched (recompute=none)": ("patched (recompute=none)", "eager"),
            "patched (recompute=up)": ("patched (recompute=up)", "eager")}


def run_cpu(out_path: str) -> list[dict]:
    import torch

    from peftfast.bench import _versions, git_commit, saved_activation_bytes

    torch.set_num_threads(min(2, torch.get_num_threads()))
    all_rows = []
    for name, shape in CPU_SHAPES.items():
        built = {label: build(shape, v, "cpu", torch.float32, impl=impl) for label, (v, impl) in VARIANTS.items()}
        rows = []
        for v, (model, x, idx, w) in built.items():
            params = [*model.parameters(), *model.buffers()]
            _, saved = saved_activation_bytes(lambda model=model, x=x, idx=idx, w=w: _experts(model)(x, idx, w),
                                              params)
            rows.append({"shape": name, "variant": v, "saved_bytes": saved.total, "saved_by_shape": saved.by_shape})
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(5):  # interleaved: this machine's speed drifts
            for v, (model, x, idx, w) in built.items():
                x.grad = None
                t0 = time.perf_counter()
                _experts(model)(x, idx, w).square().mean().backward()
                times[v].append(time.perf_counter() - t0)
        for row in rows:
            row["fwd_bwd_ms"] = sorted(times[row["variant"]])[2] * 1e3
        peft = rows[0]
        print(f"{name}: experts {shape}, LoRA r=16 on both stacks, fp32, CPU")
        print(f"{'variant':<28} {'saved MB':>9} {'vs PEFT':>8} {'fwd+bwd ms':>11} {'speed vs PEFT':>14}")
        for row in rows:
            ratio = row["saved_bytes"] / peft["saved_bytes"]
            speed = peft["fwd_bwd_ms"] / row["fwd_bwd_ms"]
            print(f"{row['variant']:<28} {row['saved_bytes'] / 2**20:9.2f} {ratio:7.3f}x {row['fwd_bwd_ms']:11.1f} "
                  f"{speed:13.2f}x")
        all_rows += rows
        built = None
    rows = all_rows
    meta = {"device": "cpu", "versions": _versions(), "commit": git_commit(), "shapes": CPU_SHAPES, "rank": 16,
            "dtype": "float32"}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


def run_gpu(out_dir: str | None) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        print("bench_moe --gpu: no CUDA GPU available on this machine", file=sys.stderr)
        raise SystemExit(2)
    import triton.testing

    from peftfast.bench import _versions, git_commit

    rows = []
    for name, shape in GPU_SHAPES.items():
        for variant, impl in (("peft", "eager"), ("peft", "grouped_mm"), ("patched (recompute=up)", "eager")):
            label = f"{variant} [{impl}]" if variant == "peft" else variant
            try:
                model, x, idx, w = build(shape, variant, "cuda", torch.bfloat16, impl=impl)
                dy = torch.randn_like(x)
                mod = _experts(model)

                def step(mod=mod, x=x, idx=idx, w=w, dy=dy):
                    x.grad = None
                    mod(x, idx, w).backward(dy)

                step()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                peak = torch.cuda.max_memory_allocated() - base
                med, p20, p80 = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
                row = {"shape": name, "variant": label, "ms": med, "ms_p20": p20, "ms_p80": p80,
                       "peak_extra_mb": peak / 2**20}
                print(f"{name:<14} {label:<24} {med:9.2f} ms ({p20:.2f}-{p80:.2f})  peak +{peak / 2**20:9.1f} MB")
            except Exception as exc:  # e.g. PEFT's merged stacks do not fit: recorded, not hidden
                row = {"shape": name, "variant": label, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                print(f"{name:<14} {label:<24} failed: {row['error']}")
            rows.append(row)
            model = x = idx = w = dy = mod = None
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name().replace(" ", "-")
    out_dir = out_dir or os.path.join(HERE, "results", f"{datetime.date.today()}-{dev}")
    os.makedirs(out_dir, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "versions": _versions(), "commit": git_commit(),
            "shapes": GPU_SHAPES, "rank": 16, "dtype": "bfloat16"}
    with open(os.path.join(out_dir, "moe.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    for ax, key, title in ((axes[0], "ms", "fwd+bwd ms (median)"), (axes[1], "peak_extra_mb", "peak MB above weights")):
        for i, label in enumerate(labels):
            vals = [next((r.get(key, 0) for r in rows if r["shape"] == s and r["variant"] == label), 0)
                    for s in GPU_SHAPES]
            ax.bar([j + 0.8 / len(labels) * i for j in range(len(GPU_SHAPES))], vals, 0.8 / len(labels), label=label)
        ax.set_xticks([j + 0.4 - 0.4 / len(labels) for j in range(len(GPU_SHAPES))])
        ax.set_xticklabels(list(GPU_SHAPES))
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"MoE experts LoRA r=16, bf16, {meta['device']} ({meta['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "moe.png"), dpi=110)
    return rows


if __name__ == "__main__":
    raise SystemExit(main(__doc__, run_cpu, run_gpu, "cpu-moe.json"))
