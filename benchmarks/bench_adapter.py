"""Fused bottleneck Adapter benchmarks.

--cpu (exact, any machine): one Pfeiffer adapter (hidden 1024, bottleneck 64, GELU) on 32 tokens, fwd+bwd: bytes
      saved for backward (parameters excluded) and work ops (aten ops that are neither views nor bare allocations,
      plus Triton launches), eager PyTorch adapter (as AdapterHub runs it) vs fused (torch backend, and Triton in
      the CPU interpreter).
--gpu (CUDA): fused vs eager fwd+bwd on Llama-3-8B widths (8192 tokens, hidden 4096, bottleneck 64 and 256; bf16):
      median and p20/p80 of ``triton.testing.do_bench``, peak memory; JSON + PNG.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def counts(method: str, hidden: int = 1024, width: int = 64, tokens: int = 32) -> dict:
    import torch

    import peftfast
    from peftfast.bench import count_work_ops, saved_activation_bytes

    dtype = torch.float16 if method == "fused-triton" else torch.bfloat16
    torch.manual_seed(0)
    ad = peftfast.BottleneckAdapter(hidden, peftfast.AdapterConfig(bottleneck_size=width, activation="gelu"),
                                    dtype=dtype)
    torch.nn.init.normal_(ad.up.weight, std=0.02)
    ad.fused = method != "eager"
    ad.backend = "triton" if method == "fused-triton" else "torch"
    x = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
    params = list(ad.parameters())
    y, saved = saved_activation_bytes(lambda: ad(x * 1), exclude=params)  # x * 1: a non-leaf input, as in a model
    _, ops_b = count_work_ops(lambda: y.sum().backward())
    _, ops_f = count_work_ops(lambda: ad(x * 1))
    return {"method": method, "saved_hvec_per_token": saved.total / (tokens * hidden * dtype.itemsize),
            "saved_shapes": saved.by_shape, "work_ops_fwd": ops_f.total, "work_ops_fwd_bwd": ops_f.total + ops_b.total,
            "triton_launches": dict(ops_f.launches + ops_b.launches)}


def run_cpu(out_path: str) -> list[dict]:
    from peftfast.bench import _versions, git_commit

    rows = [counts("eager"), counts("fused-torch")]
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "import json, bench_adapter as b; print(json.dumps(b.counts('fused-triton')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, check=True)
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'method':<14}{'saved hvec/token':>18}{'work ops fwd+bwd':>18}")
    for r in rows:
        print(f"{r['method']:<14}{r['saved_hvec_per_token']:>18.3f}{r['work_ops_fwd_bwd']:>18}")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    commit = git_commit()  # before opening: a truncated tracked file would read as "+dirty"
    with open(out_path, "w") as f:
        json.dump({"rows": rows, "versions": _versions(), "commit": commit,
                   "shape": "pfeiffer adapter, hidden 1024, bottleneck 64, gelu, 32 tokens"}, f, indent=2)
    return rows


def run_gpu(out_dir: str | None, tokens: int = 8192, hidden: int = 4096) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        print("bench_adapter --gpu: no CUDA GPU available on this machine", file=sys.stderr)
        raise SystemExit(2)
    import triton.testing

    import peftfast
    from peftfast.bench import _versions, git_commit

    rows = []
    for width in (64, 256):
        for act in ("relu", "gelu"):
            torch.manual_seed(0)
            ad = peftfast.BottleneckAdapter(hidden, peftfast.AdapterConfig(bottleneck_size=width, activation=act),
                                            device="cuda", dtype=torch.bfloat16)
            torch.nn.init.normal_(ad.up.weight, std=0.02)
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn_like(x)
            for fused in (False, True):
                ad.fused = fused

                def step():
                    x.grad = None
                    ad(x).backward(dy)

                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                med, p20, p80 = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
                name = "fused" if fused else "eager"
                rows.append({"width": width, "act": act, "method": name, "ms": med, "ms_p20": p20, "ms_p80": p80,
                             "peak_mb": torch.cuda.max_memory_allocated() / 2**20})
                print(f"H={width:<4} {act:<5} {name:<6} {med:8.3f} ms ({p20:.3f}-{p80:.3f})")
    name = torch.cuda.get_device_name().replace(" ", "-")
    out_dir = out_dir or os.path.join(HERE, "results", f"{datetime.date.today()}-{name}")
    os.makedirs(out_dir, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "versions": _versions(), "commit": git_commit(),
            "tokens": tokens, "hidden": hidden}
    with open(os.path.join(out_dir, "adapter.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["width"], r["act"]) for r in rows})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, method in enumerate(("eager", "fused")):
        vals = [next(r["ms"] for r in rows if (r["width"], r["act"]) == k and r["method"] == method) for k in keys]
        ax.bar([j + 0.4 * i for j in range(len(keys))], vals, 0.4, label=method)
    ax.set_xticks([j + 0.2 for j in range(len(keys))])
    ax.set_xticklabels([f"H={w} {a}" for w, a in keys])
    ax.set_ylabel("fwd+bwd ms (median)")
    ax.set_title(f"Adapter, {tokens} tokens x {hidden}, bf16, {meta['device']} ({meta['commit']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "adapter.png"), dpi=110)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    from _cli import main

    sys.exit(main(__doc__, run_cpu, run_gpu, "cpu-adapter.json"))
