"""Fused RMSNorm / add + RMSNorm / LayerNorm benchmarks.

--cpu (exact, any machine): hidden 1024, 32 tokens, bf16, fwd+bwd, with the norm weight trainable (full fine-tuning)
      and frozen (LoRA): bytes saved for backward (parameters excluded, in hidden vectors per token) and work ops
      (aten ops that are neither views nor bare allocations, plus Triton launches). Eager Hugging Face modules
      (LlamaRMSNorm; ``residual + x`` then LlamaRMSNorm; nn.LayerNorm) vs the fused ops (torch backend, and Triton
      in the CPU interpreter, and the C++ kernels of peftfast._C when built). Then CPU wall time of RMSNorm and
      add + RMSNorm fwd+bwd at 2048 tokens x hidden 2048 (bf16 and fp32, this machine's threads): median and p20/p80
      of eager, the torch backend and the C++ kernels (``cpp``), with the bytes each saves for backward.
--gpu (CUDA): the same ops fwd+bwd at 8192 tokens x hidden 2048 / 4096 / 8192 / 16384 (chunked rows), bf16: median
      and p20/p80 of ``triton.testing.do_bench``, effective bandwidth of the fused op, peak memory; JSON + PNG.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = ("rmsnorm", "add+rmsnorm", "layernorm")


def _setup(op: str, method: str, hidden: int, tokens: int, dtype, device: str, train_weight: bool):
    """(step function returning the outputs whose sum is the loss, inputs, parameters) for one op and method."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from peftfast.ops.norm import add_rms_norm, layer_norm, rms_norm

    torch.manual_seed(0)
    backend = {"fused-triton": "triton", "fused-cpp": "cpp"}.get(method, "torch")
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    if op == "layernorm":
        mod = torch.nn.LayerNorm(hidden, device=device, dtype=dtype)
        with torch.no_grad():
            mod.bias.normal_()
    else:
        mod = LlamaRMSNorm(hidden, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        mod.weight.normal_(1.0, 0.2)
    mod.requires_grad_(train_weight)
    eps = mod.eps if op == "layernorm" else mod.variance_epsilon

    if op == "rmsnorm":
        def step(a, b):
            return (mod(a),) if method == "eager" else (rms_norm(a, mod.weight, eps, backend=backend),)
    elif op == "add+rmsnorm":
        def step(a, b):
            if method == "eager":
                h = b + a
                return mod(h), h
            return add_rms_norm(a, b, mod.weight, eps, backend=backend)
    else:
        def step(a, b):
            return (mod(a),) if method == "eager" else (layer_norm(a, mod.weight, mod.bias, eps, backend=backend),)
    return step, (x, r), list(mod.parameters())


def counts(method: str, hidden: int = 1024, tokens: int = 32) -> list[dict]:
    import torch

    from peftfast.bench import count_work_ops, saved_activation_bytes

    dtype = torch.bfloat16
    rows = []
    for op in OPS:
        for train in (True, False):
            step, (x, r), params = _setup(op, method, hidden, tokens, dtype, "cpu", train)
            # x * 1: non-leaf inputs, as inside a model
            outs, saved = saved_activation_bytes(lambda: step(x * 1, r * 1), exclude=params)
            _, ops_b = count_work_ops(lambda: torch.autograd.backward(outs, [torch.ones_like(o) for o in outs]))
            _, ops_f = count_work_ops(lambda: step(x * 1, r * 1))
            rows.append({"op": op, "weight": "trainable" if train else "frozen", "method": method,
                         "saved_hvec_per_token": saved.total / (tokens * hidden * dtype.itemsize),
                         "saved_shapes": saved.by_shape, "work_ops_fwd": ops_f.total - 2,  # less the two x * 1
                         "work_ops_fwd_bwd": ops_f.total - 2 + ops_b.total,
                         "triton_launches": dict(ops_f.launches + ops_b.launches)})
    return rows


def cpu_times(tokens: int = 2048, hidden: int = 2048, reps: int = 15) -> list[dict]:
    """Median / p20 / p80 wall time (ms) of fwd+bwd on CPU for eager, the torch backend and the C++ kernels, and the
    bytes each keeps for backward (parameters excluded), for RMSNorm and add + RMSNorm."""
    import time

    import torch

    from peftfast import _ext
    from peftfast.bench import saved_activation_bytes

    methods = ["eager", "fused-torch"] + (["fused-cpp"] if _ext.available() else [])
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for op in OPS[:2]:
            for train in (True, False):
                for method in methods:
                    step, (x, r), params = _setup(op, method, hidden, tokens, dtype, "cpu", train)
                    grads = [torch.randn_like(x) for _ in range(2)]

                    def fwd_bwd():
                        x.grad = r.grad = None
                        outs = step(x, r)
                        torch.autograd.backward(outs, grads[:len(outs)])

                    fwd_bwd()
                    times = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        fwd_bwd()
                        times.append((time.perf_counter() - t0) * 1e3)
                    times.sort()
                    outs, saved = saved_activation_bytes(lambda: step(x * 1, r * 1), exclude=params)
                    del outs
                    rows.append({"op": op, "dtype": str(dtype).removeprefix("torch."),
                                 "weight": "trainable" if train else "frozen", "method": method,
                                 "ms": times[len(times) // 2], "ms_p20": times[len(times) // 5],
                                 "ms_p80": times[(4 * len(times)) // 5], "saved_mb": saved.total / 2**20})
    print(f"\nCPU fwd+bwd, {tokens} tokens x hidden {hidden}, {torch.get_num_threads()} threads")
    print(f"{'op':<13}{'dtype':<10}{'weight':<11}{'method':<13}{'median ms':>11}{'p20-p80':>17}{'saved MB':>10}")
    for r in rows:
        print(f"{r['op']:<13}{r['dtype']:<10}{r['weight']:<11}{r['method']:<13}{r['ms']:>11.2f}"
              f"{r['ms_p20']:>8.2f}-{r['ms_p80']:<8.2f}{r['saved_mb']:>10.2f}")
    return rows


def run_cpu(out_path: str) -> list[dict]:
    from peftfast import _ext
    from peftfast.bench import _versions, git_commit

    rows = counts("eager") + counts("fused-torch") + (counts("fused-cpp") if _ext.available() else [])
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "import json, bench_norm as b; print(json.dumps(b.counts('fused-triton')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, check=True)
    rows += json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{'op':<13}{'weight':<11}{'method':<14}{'saved hvec/token':>18}{'work ops fwd+bwd':>18}")
    for r in sorted(rows, key=lambda r: (OPS.index(r["op"]), r["weight"])):
        print(f"{r['op']:<13}{r['weight']:<11}{r['method']:<14}{r['saved_hvec_per_token']:>18.3f}"
              f"{r['work_ops_fwd_bwd']:>18}")
    times = cpu_times()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    commit = git_commit()  # before opening: a truncated tracked file would read as "+dirty"
    with open(out_path, "w") as f:
        json.dump({"rows": rows, "cpu_times": times, "versions": _versions(), "commit": commit,
                   "shape": "hidden 1024, 32 tokens, bf16; LlamaRMSNorm / residual add + LlamaRMSNorm / nn.LayerNorm"},
                  f, indent=2)
    return rows


def _ideal_bytes(op: str, tokens: int, hidden: int, elt: int) -> int:
    """Bytes a fused fwd+bwd must move: forward reads x (and r), writes y (and h); backward reads x or h and dy
    (and dh), writes dx. Weights and per-row statistics are negligible."""
    per_row = {"rmsnorm": 5, "add+rmsnorm": 8, "layernorm": 5}[op]
    return per_row * tokens * hidden * elt


def run_gpu(out_dir: str | None, tokens: int = 8192) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        print("bench_norm --gpu: no CUDA GPU available on this machine", file=sys.stderr)
        raise SystemExit(2)
    import triton.testing

    from peftfast.bench import _versions, git_commit

    dtype = torch.bfloat16
    rows = []
    for op in OPS:
        for hidden in (2048, 4096, 8192, 16384):
            for train in (True, False):
                for method in ("eager", "fused-triton"):
                    step, (x, r), _ = _setup(op, method, hidden, tokens, dtype, "cuda", train)
                    grads = [torch.randn_like(x) for _ in range(2)]

                    def fwd_bwd():
                        x.grad = r.grad = None
                        outs = step(x, r)
                        torch.autograd.backward(outs, grads[:len(outs)])

                    fwd_bwd()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    med, p20, p80 = triton.testing.do_bench(fwd_bwd, quantiles=[0.5, 0.2, 0.8])
                    gbs = _ideal_bytes(op, tokens, hidden, dtype.itemsize) / (med * 1e-3) / 1e9
                    rows.append({"op": op, "hidden": hidden, "weight": "trainable" if train else "frozen",
                                 "method": method, "ms": med, "ms_p20": p20, "ms_p80": p80, "ideal_gb_per_s": gbs,
                                 "peak_mb": torch.cuda.max_memory_allocated() / 2**20})
                    print(f"{op:<12} N={hidden:<6} {rows[-1]['weight']:<10} {method:<13} {med:8.3f} ms "
                          f"({p20:.3f}-{p80:.3f})  {gbs:7.0f} GB/s ideal")
    name = torch.cuda.get_device_name().replace(" ", "-")
    out_dir = out_dir or os.path.join(HERE, "results", f"{datetime.date.today()}-{name}")
    os.makedirs(out_dir, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "versions": _versions(), "commit": git_commit(),
            "tokens": tokens, "dtype": "bf16"}
    with open(os.path.join(out_dir, "norm.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OPS), figsize=(13, 3.6))
    for ax, op in zip(axes, OPS):
        keys = sorted({(r["hidden"], r["weight"]) for r in rows if r["op"] == op})
        for i, method in enumerate(("eager", "fused-triton")):
            vals = [next(r["ms"] for r in rows if r["op"] == op and (r["hidden"], r["weight"]) == k
                         and r["method"] == method) for k in keys]
            ax.bar([j + 0.4 * i for j in range(len(keys))], vals, 0.4, label=method)
        ax.set_xticks([j + 0.2 for j in range(len(keys))])
        ax.set_xticklabels([f"{h}\n{w[:5]}" for h, w in keys], fontsize=7)
        ax.set_title(op, fontsize=9)
        ax.set_ylabel("fwd+bwd ms (median)")
    axes[0].legend()
    fig.suptitle(f"norms, {tokens} tokens, bf16, {meta['device']} ({meta['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "norm.png"), dpi=110)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    from _cli import main

    sys.exit(main(__doc__, run_cpu, run_gpu, "cpu-norm.json"))
