"""Fused linear cross-entropy benchmarks (LM head + causal-LM loss, frozen head, optionally LoRA on it).

--cpu (exact, any machine): 2 × 128 tokens, hidden 256, vocabulary 4096, chunks of 64 tokens (a quarter of the
      tokens; the default at this toy size would be one chunk), fwd+bwd of the head and the loss:
      transformers' own path (``lm_head`` then ``ForCausalLMLoss``) vs the fused op (torch backend, and Triton in the
      CPU interpreter), without and with a rank-16 LoRA on the head: bytes saved for backward (parameters excluded),
      the largest fresh allocation any op makes (the transient peak the logits cause), and work ops (aten ops that are
      neither views nor bare allocations, plus Triton launches).
--gpu (CUDA): the same comparison on a Llama-3-8B head (8192 tokens, hidden 4096, vocabulary 128256, bf16; LoRA r=16
      in fp32 as PEFT creates it): median and p20/p80 of ``triton.testing.do_bench`` for fwd+bwd, peak memory above
      the inputs; JSON + PNG.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _problem(tokens: int, hidden: int, vocab: int, lora: bool, dtype, device: str, lora_dtype=None):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    b, t = 2, tokens // 2

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    lora_dtype = lora_dtype or dtype
    p = {"hidden": rnd(b, t, hidden).requires_grad_(), "weight": rnd(vocab, hidden, scale=hidden**-0.5),
         "labels": torch.randint(0, vocab, (b, t), generator=g).to(device)}
    p["labels"][0, :5] = -100
    if lora:
        p["lora_A"] = rnd(16, hidden, scale=hidden**-0.5, dt=lora_dtype).requires_grad_()
        p["lora_B"] = rnd(vocab, 16, scale=0.1, dt=lora_dtype).requires_grad_()
    return p


def _hf_loss(p, vocab: int):
    import torch.nn.functional as F
    from transformers.loss.loss_utils import ForCausalLMLoss

    h = p["hidden"] * 1  # a non-leaf input, as the decoder's output is
    logits = F.linear(h, p["weight"])
    if "lora_A" in p:  # what PEFT's lora.Linear adds, in the adapter dtype, cast back
        low = F.linear(F.linear(h.to(p["lora_A"].dtype), p["lora_A"]), p["lora_B"]) * 2.0
        logits = (logits + low).to(h.dtype)
    return ForCausalLMLoss(logits, p["labels"], vocab)


def _fused_loss(p, backend: str, chunk_size: int | None = None):
    import torch.nn.functional as F

    from peftfast.ops.cross_entropy import fused_linear_cross_entropy

    h = p["hidden"] * 1
    shift = F.pad(p["labels"], (0, 1), value=-100)[..., 1:]
    return fused_linear_cross_entropy(h, p["weight"], shift, lora_A=p.get("lora_A"), lora_B=p.get("lora_B"),
                                      lora_scale=2.0, backend=backend, chunk_size=chunk_size)


def counts(method: str, lora: bool, tokens: int = 256, hidden: int = 256, vocab: int = 4096, chunk: int = 64) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from peftfast.bench import count_work_ops, saved_activation_bytes

    dtype = torch.float16 if method == "fused-triton" else torch.bfloat16
    p = _problem(tokens, hidden, vocab, lora, dtype, "cpu")
    params = [p["weight"], *([p["lora_A"], p["lora_B"]] if lora else [])]

    def fn():
        return _hf_loss(p, vocab) if method == "hf" else _fused_loss(p, method.removeprefix("fused-"), chunk)

    class Largest(TorchDispatchMode):
        """The largest fresh allocation an op makes (views and in-place results reuse their input's storage)."""

        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            from torch.utils._pytree import tree_leaves

            from peftfast.ops import _counters

            out = func(*args, **(kwargs or {}))
            if not _counters.inside_launch():  # the interpreter's own numpy copies are not GPU memory
                seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor)}
                for o in tree_leaves(out):
                    if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in seen:
                        Largest.biggest = max(Largest.biggest, o.untyped_storage().nbytes())
            return out

    with Largest():  # one forward serves all three counts (the interpreter is slow)
        (loss, ops_f), saved = saved_activation_bytes(lambda: count_work_ops(fn), exclude=params)
        _, ops_b = count_work_ops(lambda: loss.backward())
    elt = dtype.itemsize
    return {"method": method, "lora": lora, "saved_bytes": saved.total, "saved_shapes": saved.by_shape,
            "saved_logits_equiv": saved.total / (tokens * vocab * elt),
            "largest_tensor_bytes": Largest.biggest, "largest_logits_equiv": Largest.biggest / (tokens * vocab * elt),
            "work_ops_fwd": ops_f.total, "work_ops_fwd_bwd": ops_f.total + ops_b.total,
            "triton_launches": dict(ops_f.launches + ops_b.launches)}


def run_cpu(out_path: str) -> list[dict]:
    from peftfast.bench import _versions, git_commit

    rows = []
    for lora in (False, True):
        rows += [counts("hf", lora), counts("fused-torch", lora)]
        env = dict(os.environ, TRITON_INTERPRET="1")
        code = f"import json, bench_cross_entropy as b; print(json.dumps(b.counts('fused-triton', {lora})))"
        proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True,
                              check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'method':<14}{'lora':>6}{'saved MB':>10}{'saved (logits)':>16}{'largest MB':>12}"
          f"{'largest (logits)':>18}{'ops fwd+bwd':>13}")
    for r in rows:
        print(f"{r['method']:<14}{r['lora']!s:>6}{r['saved_bytes'] / 2**20:>10.2f}{r['saved_logits_equiv']:>16.3f}"
              f"{r['largest_tensor_bytes'] / 2**20:>12.2f}{r['largest_logits_equiv']:>18.3f}"
              f"{r['work_ops_fwd_bwd']:>13}")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    commit = git_commit()  # before opening: a truncated tracked file would read as "+dirty"
    with open(out_path, "w") as f:
        json.dump({"rows": rows, "versions": _versions(), "commit": commit,
                   "shape": "2 x 128 tokens, hidden 256, vocab 4096, chunk 64 tokens, frozen head; "
                            "LoRA r=16 scale 2 on the head; bf16 (hf, fused-torch), fp16 (fused-triton in the "
                            "interpreter); logits-equivalents are bytes / (tokens * vocab * element size)"},
                  f, indent=2)
    return rows


def _time_gpu(p: dict, method: str, vocab: int) -> tuple[float, float, float, int]:
    """(median, p20, p80) ms of fwd+bwd and the peak memory above what was allocated before the step."""
    import torch
    import triton.testing

    leaves = [p[k] for k in ("hidden", "lora_A", "lora_B") if k in p]

    def step():
        for x in leaves:
            x.grad = None
        loss = _hf_loss(p, vocab) if method == "hf" else _fused_loss(p, method.removeprefix("fused-"))
        loss.backward()

    step()  # warm-up: autotuning, cuBLAS handles
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    med, p20, p80 = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80, peak


def run_gpu(out_dir: str | None, tokens: int = 8192, hidden: int = 4096, vocab: int = 128256) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        print("bench_cross_entropy --gpu: no CUDA GPU available on this machine", file=sys.stderr)
        raise SystemExit(2)
    from peftfast.bench import _versions, git_commit

    rows = []
    for lora in (False, True):
        p = _problem(tokens, hidden, vocab, lora, torch.bfloat16, "cuda", lora_dtype=torch.float32)
        for method in ("hf", "fused-triton", "fused-torch"):
            med, p20, p80, peak = _time_gpu(p, method, vocab)
            flops = 2 * 2 * tokens * hidden * vocab  # the two big GEMMs of a frozen head: logits and dh
            rows.append({"lora": lora, "method": method, "ms": med, "ms_p20": p20, "ms_p80": p80,
                         "peak_extra_mb": peak / 2**20, "tflops": flops / (med * 1e-3) / 1e12})
            print(f"lora={lora!s:<5} {method:<13} {med:8.2f} ms ({p20:.2f}-{p80:.2f})  peak +{peak / 2**20:8.0f} MB")
        del p
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name().replace(" ", "-")
    out_dir = out_dir or os.path.join(HERE, "results", f"{datetime.date.today()}-{name}")
    os.makedirs(out_dir, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "versions": _versions(), "commit": git_commit(),
            "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": "bf16", "lora": "r=16 fp32, scale 2"}
    with open(os.path.join(out_dir, "cross_entropy.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    methods = ("hf", "fused-triton", "fused-torch")
    for ax, key, label in ((axes[0], "ms", "fwd+bwd ms (median)"), (axes[1], "peak_extra_mb", "peak extra MB")):
        for i, method in enumerate(methods):
            vals = [next(r[key] for r in rows if r["lora"] == lora and r["method"] == method) for lora in (False, True)]
            ax.bar([j + 0.27 * i for j in range(2)], vals, 0.27, label=method)
        ax.set_xticks([0.27, 1.27])
        ax.set_xticklabels(["frozen head", "LoRA r=16 on head"])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"LM head + CE, {tokens} tok x {hidden} -> {vocab}, bf16, {meta['device']} ({meta['commit']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cross_entropy.png"), dpi=110)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    from _cli import main

    sys.exit(main(__doc__, run_cpu, run_gpu, "cpu-cross-entropy.json"))
