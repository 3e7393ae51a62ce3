"""Fused LoRA linear benchmarks.

--cpu (exact, any machine): per decoder layer of a Llama-shaped model (hidden 1024, intermediate 3584, 8 heads of
      128, 2 KV heads; r=16 on all seven projections; SDPA), PEFT vs patched, dropout 0.05 and 0: activation bytes
      saved for backward per token (in hidden-vector equivalents) and work ops per layer (fwd+bwd aten ops that are
      neither views nor bare allocations, plus Triton launches). The patched path is measured with the torch backend
      (ATen), with the C++ kernels of ``peftfast._C`` (cpp) and with the Triton kernels (run by the CPU interpreter
      in a subprocess; fp16 there, as the interpreter's bf16 ``tl.dot`` is broken; op and byte counts do not depend
      on values); ``peftfast-cpp:norms`` / ``:attn`` / ``:mlp`` are the C++ path with ``patch(recompute="norms")`` /
      ``"attn"`` / ``"mlp"`` (the others use the default, ``"up"``). Then one training step (fwd+bwd) of that layer at
      512 tokens in fp32, PEFT vs patched (cpp, cpp:norms, cpp:attn, cpp:mlp and torch), interleaved in the same
      process: median and p20/p80 over repeated steps. Last, the host's cost per call: one small LoRA layer (8 tokens x
      256 features, where the GEMMs take microseconds), PEFT vs patched, fwd+bwd and no-grad forward. And DoRA
      (``use_dora=True``): one 1024 -> 3584 layer at 512 tokens, fp32, PEFT's DoRA vs the patched one, fwd+bwd time
      (interleaved) and bytes saved for backward, dropout 0 and 0.05.
--gpu (CUDA): fused LoRA linear fwd+bwd vs PEFT's lora.Linear vs a frozen nn.Linear on Llama-3-8B shapes, median
      and p20/p80 of ``triton.testing.do_bench``, TFLOP/s and peak memory, for both dense strategies; DoRA layers
      (PEFT vs patched) on the same shapes in bf16.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import subprocess
import sys

from _cli import backward_step, peft_lora_layer

HERE = os.path.dirname(os.path.abspath(__file__))
PEFT_REFERENCE = {"0.05": {"hvec": 55, "ops": 235}, "0.0": {"hvec": 36, "ops": None}}  # the CPU figures


# ----------------------------------------------------------------------------------------------------------------
# CPU: exact per-layer counts
# ----------------------------------------------------------------------------------------------------------------
def _patch(model, method: str) -> None:
    """``peftfast-<backend>[:<recompute>]``: patch with that backend and recompute setting (default: patch's)."""
    import peftfast
    from peftfast.patching.core import DEFAULT_RECOMPUTE

    backend, _, recompute = method.removeprefix("peftfast-").partition(":")
    peftfast.patch(model, backend=backend, recompute=recompute or DEFAULT_RECOMPUTE)


def layer_counts(method: str, dropout: float, tokens: int = 32, targets: str = "all-linear") -> dict:
    """Saved hidden-vector equivalents per token and work ops of one decoder layer, fwd+bwd. ``targets``:
    ``all-linear`` or ``q,v`` (PEFT's default Llama targets: the MLP stays a frozen base module)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftfast.bench import count_work_ops, saved_activation_bytes

    dtype = torch.float16 if method == "peftfast-triton" else torch.bfloat16
    cfg = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=3584, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    tm = "all-linear" if targets == "all-linear" else [f"{t}_proj" for t in targets.split(",")]
    model = get_peft_model(LlamaForCausalLM(cfg).to(dtype),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=tm))
    if method != "peft":
        _patch(model, method)
    model.train()
    inner = model.base_model.model.model
    layer = inner.layers[0]
    h = torch.randn(1, tokens, cfg.hidden_size, dtype=dtype, requires_grad=True)
    pos = torch.arange(tokens)[None]
    emb = inner.rotary_emb(h, pos)
    exclude = [*model.parameters(), *model.buffers(), h, *emb]

    def fwd_bwd():
        out, saved = saved_activation_bytes(lambda: layer(h, position_embeddings=emb, position_ids=pos), exclude)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
        return saved

    saved, ops = count_work_ops(fwd_bwd)
    elt = torch.finfo(dtype).bits // 8
    return {"method": method, "dropout": dropout, "targets": targets,
            "hvec_per_token": saved.total / (tokens * cfg.hidden_size * elt), "work_ops": ops.total,
            "triton_launches": dict(ops.launches)}


def cpu_step_times(dropout: float = 0.05, tokens: int = 512, steps: int = 12, warmup: int = 3) -> list[dict]:
    """Step time (fwd+bwd of one Llama-shaped decoder layer, fp32) for PEFT and the patched layer on each CPU
    backend, interleaved round by round in one process so that machine load hits every method alike."""
    import statistics
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftfast import _ext

    cfg = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=3584, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=2, attn_implementation="sdpa")
    cpp = ["peftfast-cpp", "peftfast-cpp:norms", "peftfast-cpp:attn", "peftfast-cpp:mlp"]
    methods = ["peft", "peftfast-torch"] + (cpp if _ext.available() else [])
    models, layers = {}, {}
    for m in methods:
        torch.manual_seed(0)
        model = get_peft_model(LlamaForCausalLM(cfg),
                               LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear"))
        if m != "peft":
            _patch(model, m)
        model.train()
        models[m], layers[m] = model, model.base_model.model.model.layers[0]
    inner = models["peft"].base_model.model.model
    h = torch.randn(1, tokens, cfg.hidden_size, requires_grad=True)
    pos = torch.arange(tokens)[None]
    emb = inner.rotary_emb(h, pos)
    g = torch.randn(1, tokens, cfg.hidden_size)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(warmup + steps):
        for m in methods:
            t0 = time.perf_counter()
            out = layers[m](h, position_embeddings=emb, position_ids=pos)
            (out[0] if isinstance(out, tuple) else out).backward(g)
            if i >= warmup:
                times[m].append((time.perf_counter() - t0) * 1e3)
            h.grad = None
            models[m].zero_grad(set_to_none=True)
    rows = []
    for m in methods:
        q = statistics.quantiles(times[m], n=5)
        rows.append({"method": m, "dropout": dropout, "tokens": tokens, "step_ms_median": statistics.median(times[m]),
                     "step_ms_p20": q[0], "step_ms_p80": q[3], "threads": torch.get_num_threads()})
    return rows


def host_overhead(tokens: int = 8, features: int = 256, rank: int = 16, rounds: int = 15,
                  calls: int = 400) -> list[dict]:
    """Per-call time of one LoRA layer at a shape where the arithmetic is negligible (``tokens`` x ``features``,
    fp32, one thread): what a call costs the host beyond its GEMMs, which decides throughput wherever kernels are
    short (small batches and models on a GPU, decoding). PEFT's ``lora.Linear`` vs the patched one (C++ kernels),
    dropout 0 and 0.05, fwd+bwd and a no-grad forward; interleaved round by round, median and p20/p80 per call."""
    import statistics
    import time

    import torch

    import peftfast
    from peftfast import _ext

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layers = {}
        for p in (0.0, 0.05):
            for method in ("peft", "peftfast-cpp") if _ext.available() else ("peft",):
                torch.manual_seed(0)
                holder = torch.nn.Module()
                holder.fc = torch.nn.Linear(features, features)
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=p,
                                                          target_modules=["fc"]))
                if method != "peft":
                    peftfast.patch(model, backend="cpp")
                model.train()
                layers[method, p] = model.base_model.model.fc
        x = torch.randn(tokens, features, requires_grad=True)
        dy = torch.randn(tokens, features)

        def fwd_bwd(layer):
            x.grad = None
            layer(x).backward(dy)

        def no_grad(layer):
            with torch.no_grad():
                layer(x)

        times: dict[tuple, list[float]] = {}
        for i in range(rounds + 2):
            for key, layer in layers.items():
                for mode, fn in (("fwd+bwd", fwd_bwd), ("no-grad fwd", no_grad)):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn(layer)
                    if i >= 2:  # two warm-up rounds
                        times.setdefault((*key, mode), []).append((time.perf_counter() - t0) / calls * 1e6)
    finally:
        torch.set_num_threads(threads)
    rows = []
    for (method, p, mode), ts in times.items():
        q = statistics.quantiles(ts, n=5)
        rows.append({"method": method, "dropout": p, "mode": mode, "us_median": statistics.median(ts),
                     "us_p20": q[0], "us_p80": q[3], "tokens": tokens, "features": features, "rank": rank})
    return rows


def dora_layer(k: int = 1024, n: int = 3584, tokens: int = 512, rank: int = 16, rounds: int = 12,
               device: str = "cpu", dtype_name: str = "fp32") -> list[dict]:
    """PEFT's DoRA linear vs the patched one (one layer, ``use_dora=True``), dropout 0 and 0.05: fwd+bwd time
    (interleaved round by round; CUDA: ``triton.testing.do_bench``) and bytes saved for backward."""
    import statistics
    import time

    import torch
    from peft import LoraConfig, get_peft_model

    import peftfast
    from peftfast.bench import saved_activation_bytes

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    rows = []
    for p in (0.0, 0.05):
        layers = {}
        for method in ("peft", "peftfast"):
            torch.manual_seed(0)
            holder = torch.nn.Module()
            holder.fc = torch.nn.Linear(k, n, bias=False)
            model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=p,
                                                      target_modules=["fc"], use_dora=True))
            model.to(device=device, dtype=dt).train()
            if method == "peftfast":
                peftfast.patch(model)
            layers[method] = (model, model.base_model.model.fc)
        x = torch.randn(tokens, k, device=device, dtype=dt, requires_grad=True)
        dy = torch.randn(tokens, n, device=device, dtype=dt)

        def step(layer):
            x.grad = None
            layer(x).backward(dy)

        times: dict[str, list[float]] = {m: [] for m in layers}
        if device == "cuda":
            import triton.testing

            for m, (_, layer) in layers.items():
                times[m] = [triton.testing.do_bench(functools.partial(step, layer))]
        else:
            for i in range(rounds + 2):
                for m, (_, layer) in layers.items():
                    t0 = time.perf_counter()
                    step(layer)
                    if i >= 2:
                        times[m].append((time.perf_counter() - t0) * 1e3)
        for m, (model, layer) in layers.items():
            _, saved = saved_activation_bytes(lambda layer=layer: layer(x), exclude=[*model.parameters()])
            ts = times[m]
            q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
            rows.append({"method": m, "dropout": p, "ms_median": statistics.median(ts), "ms_p20": q[0],
                         "ms_p80": q[3], "saved_mb": saved.total / 2**20, "shape": f"{k}->{n}", "tokens": tokens,
                         "rank": rank, "dtype": dtype_name, "device": device})
    return rows


def _print_dora(rows: list[dict]) -> None:
    r0 = rows[0]
    print(f"\nDoRA layer {r0['shape']}, {r0['tokens']} tokens, r={r0['rank']}, {r0['dtype']} on {r0['device']}: "
          "fwd+bwd and bytes saved")
    for r in rows:
        base = next(b for b in rows if b["method"] == "peft" and b["dropout"] == r["dropout"])
        print(f"{r['method']:<10} dropout {r['dropout']:<5} median {r['ms_median']:8.2f} ms  p20 {r['ms_p20']:8.2f}  "
              f"p80 {r['ms_p80']:8.2f}  {r['ms_median'] / base['ms_median']:.2f}x PEFT   saved "
              f"{r['saved_mb']:7.2f} MB  {r['saved_mb'] / base['saved_mb']:.2f}x")


def run_cpu(out_path: str) -> list[dict]:
    from peftfast import _ext

    rows = []
    for dropout in (0.05, 0.0):
        rows.append(layer_counts("peft", dropout))
        rows.append(layer_counts("peftfast-torch", dropout))
        if _ext.available():
            rows.append(layer_counts("peftfast-cpp", dropout))
            rows.append(layer_counts("peftfast-cpp:norms", dropout))
            rows.append(layer_counts("peftfast-cpp:attn", dropout))
            rows.append(layer_counts("peftfast-cpp:mlp", dropout))
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        code = f"import json, bench_lora as b; print(json.dumps(b.layer_counts('peftfast-triton', {dropout})))"
        res = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    # LoRA on q and v only: the MLP is a frozen base module (patch runs it on the frozen-MLP op)
    for method in ("peft", "peftfast-torch") + (("peftfast-cpp", "peftfast-cpp:mlp") if _ext.available() else ()):
        rows.append(layer_counts(method, 0.05, targets="q,v"))
    peft = {(r["dropout"], r["targets"]): r for r in rows if r["method"] == "peft"}
    print(f"{'method':<17}{'targets':>11}{'dropout':>8}{'saved hvec/token':>18}{'vs PEFT':>9}{'work ops':>10}"
          f"{'vs PEFT':>9}  launches")
    for r in rows:
        base = peft[r["dropout"], r["targets"]]
        print(f"{r['method']:<17}{r['targets']:>11}{r['dropout']:>8}{r['hvec_per_token']:>18.1f}"
              f"{r['hvec_per_token'] / base['hvec_per_token']:>8.2f}x{r['work_ops']:>10}"
              f"{r['work_ops'] / base['work_ops']:>8.2f}x  {sum(r['triton_launches'].values())}")
    print(f"issue's PEFT figures for this shape: {PEFT_REFERENCE['0.05']['hvec']} hvec/token at dropout 0.05, "
          f"{PEFT_REFERENCE['0.0']['hvec']} at 0, {PEFT_REFERENCE['0.05']['ops']} work ops")
    steps = cpu_step_times()
    peft_ms = next(r["step_ms_median"] for r in steps if r["method"] == "peft")
    print(f"\none decoder-layer training step, fp32, {steps[0]['tokens']} tokens, dropout {steps[0]['dropout']}, "
          f"{steps[0]['threads']} threads (interleaved, same process)")
    for r in steps:
        print(f"{r['method']:<17} median {r['step_ms_median']:8.1f} ms  p20 {r['step_ms_p20']:8.1f}  "
              f"p80 {r['step_ms_p80']:8.1f}  {r['step_ms_median'] / peft_ms:.2f}x PEFT")
    overhead = host_overhead()
    r0 = overhead[0]
    print(f"\nper call of one LoRA layer, {r0['tokens']} tokens x {r0['features']} features, r={r0['rank']}, fp32, "
          "1 thread (host overhead; interleaved)")
    peft_us = {(r["dropout"], r["mode"]): r["us_median"] for r in overhead if r["method"] == "peft"}
    for r in overhead:
        ratio = r["us_median"] / peft_us[r["dropout"], r["mode"]]
        print(f"{r['method']:<14} dropout {r['dropout']:<5} {r['mode']:<12} median {r['us_median']:7.1f} us  "
              f"p20 {r['us_p20']:7.1f}  p80 {r['us_p80']:7.1f}  {ratio:.2f}x PEFT")
    dora = dora_layer()
    _print_dora(dora)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    from peftfast.bench import _versions, git_commit

    commit = git_commit()  # before opening: a truncated tracked file would read as "+dirty"
    with open(out_path, "w") as f:
        json.dump({"rows": rows, "step_times": steps, "host_overhead": overhead, "dora": dora, "versions": _versions(),
                   "commit": commit,
                   "shape": "llama hidden 1024, inter 3584, 8x128 heads, 2 kv heads, r=16 all-linear, 32 tokens"},
                  f, indent=2)
    print(f"wrote {out_path}")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# GPU timings
# ----------------------------------------------------------------------------------------------------------------
SHAPES_8B = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]


def run_gpu(out_dir: str | None, tokens: int = 8192) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        print("bench_lora --gpu: no CUDA GPU available on this machine", file=sys.stderr)
        raise SystemExit(2)
    import triton.testing

    import peftfast
    from peftfast.bench import _versions, git_commit
    from peftfast.ops.lora import lora_linear

    dev, dt = "cuda", torch.bfloat16
    rows = []
    for k, n in SHAPES_8B:
        for r in (16, 64):
            for p in (0.0, 0.05):
                torch.manual_seed(0)
                base = torch.nn.Linear(k, n, bias=False, device=dev, dtype=dt).requires_grad_(False)
                peft_layer = peft_lora_layer(base, r, p)
                peft_layer.to(device=dev, dtype=dt).train()
                torch.nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.01)
                a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
                x = torch.randn(tokens, k, device=dev, dtype=dt, requires_grad=True)
                dy = torch.randn(tokens, n, device=dev, dtype=dt)
                s = peft_layer.scaling["default"]

                step = functools.partial(backward_step, x, dy)

                cases = {
                    "frozen nn.Linear": step(lambda: base(x)),
                    "peft lora.Linear": step(lambda: peft_layer(x)),
                }
                for strategy in ("fused", "cublas"):
                    def fused(strategy=strategy):
                        os.environ["PEFTFAST_LORA_GEMM"] = strategy
                        return lora_linear(x, base.weight, None, a, b, s, dropout_p=p, backend="triton")
                    cases[f"peftfast ({strategy})"] = step(fused)
                flops = 2 * tokens * k * n * 2 + 2 * tokens * r * (k + n) * 3
                for name, fn in cases.items():
                    fn()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
                    rows.append({"shape": f"{k}->{n}", "rank": r, "dropout": p, "method": name, "ms": med,
                                 "ms_p20": p20, "ms_p80": p80, "tflops": flops / med / 1e9,
                                 "peak_mb": torch.cuda.max_memory_allocated() / 2**20})
                    print(f"{k:>5}->{n:<6} r={r:<3} p={p:<4} {name:<22} {med:8.3f} ms  "
                          f"{flops / med / 1e9:6.1f} TFLOP/s")
                os.environ.pop("PEFTFAST_LORA_GEMM", None)
    dora = [row for k, n in SHAPES_8B for row in dora_layer(k, n, tokens=tokens, device=dev, dtype_name="bf16")]
    _print_dora(dora)
    name = torch.cuda.get_device_name().replace(" ", "-")
    out_dir = out_dir or os.path.join(HERE, "results", f"{datetime.date.today()}-{name}")
    os.makedirs(out_dir, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
            "versions": _versions(), "commit": git_commit(), "tokens": tokens, "peftfast": peftfast.__version__}
    with open(os.path.join(out_dir, "lora_linear.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "dora": dora}, f, indent=2)
    _plot(rows, os.path.join(out_dir, "lora_linear.png"), meta)
    return rows


def _plot(rows: list[dict], path: str, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["shape"], r["rank"], r["dropout"]) for r in rows}, key=str)
    methods = sorted({r["method"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.9), 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [next((r["ms"] for r in rows if (r["shape"], r["rank"], r["dropout"]) == k and r["method"] == m), 0)
                for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([f"{s}\nr{r} p{p}" for s, r, p in keys], fontsize=7)
    ax.set_ylabel("fwd+bwd ms (median)")
    ax.set_title(f"LoRA linear, {meta['tokens']} tokens, bf16, {meta['device']} ({meta['commit']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    from _cli import main

    sys.exit(main(__doc__, run_cpu, run_gpu, "cpu-lora-layer.json"))
