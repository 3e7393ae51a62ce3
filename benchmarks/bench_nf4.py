"""NF4 (QLoRA) base-weight benchmarks.

--cpu (any machine): bytes per parameter of NF4 storage (plain and double-quantized) measured on the quantized
      buffers of Llama-3-8B-shaped projections, and one LoRA layer step (fwd+bwd, median of repeats) at hidden 1024,
      bf16: PEFT over a bf16 nn.Linear, peftfast fused over bf16, PEFT over an NF4 base (dequantize + F.linear per
      call) and peftfast's fused NF4 path (C++ when peftfast._C is built); QDoRA (DoRA over bitsandbytes NF4,
      when it imports): PEFT vs patched, one layer, step time and bytes saved for backward.
--gpu (CUDA): NF4 dequantize GB/s against the device's peak (spec sheet where known, else a measured copy), and
      fused NF4-LoRA linear fwd+bwd vs the bf16 fused LoRA linear vs PEFT over a bf16 nn.Linear vs PEFT over
      bitsandbytes Linear4bit (when installed), on Llama-3-8B shapes: median and p20/p80 ms, peak memory; QDoRA
      (PEFT's DoRA over bitsandbytes vs patched) on the q and gate shapes when bitsandbytes is installed.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import statistics
import sys
import time

from _cli import backward_step, peft_lora_layer

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES_8B = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (in, out): q/o, k/v, gate/up, down
PEAK_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100-SXM4-80GB": 2039,
            "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "A100 80GB PCIe": 1935}


# ----------------------------------------------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------------------------------------------
def _median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def run_cpu(out_path: str) -> dict:
    import torch

    import peftfast
    from peftfast.modules.nf4 import NF4Linear

    torch.manual_seed(0)
    storage = []
    for k, n in SHAPES_8B[:2]:
        lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        for dq in (False, True):
            q = NF4Linear.from_linear(lin, double_quant=dq)
            storage.append({"shape": f"{k}->{n}", "double_quant": dq, "bytes_per_param": q.nbytes() / (k * n),
                            "bf16_bytes_per_param": 2.0})
            print(f"NF4 storage {k:>5}->{n:<5} double_quant={dq!s:<5} {q.nbytes() / (k * n):.5f} bytes/param "
                  f"({8 * q.nbytes() / (k * n):.3f} bits; bf16: 16)")
    tokens, hidden, r = 256, 1024, 16
    steps = []
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    for name in ("peft bf16", "peftfast bf16", "peft nf4", "peftfast nf4"):
        torch.manual_seed(0)
        base = torch.nn.Linear(hidden, hidden, bias=False, dtype=torch.bfloat16).requires_grad_(False)
        layer = peft_lora_layer(base, r, 0.05).to(torch.bfloat16).train()
        holder = torch.nn.Module()
        holder.layer = layer
        if "nf4" in name:
            layer.base_layer = NF4Linear.from_linear(base)
        if name.startswith("peftfast"):
            peftfast.patch(holder)

        def step(layer=layer):
            x.grad = None
            layer(x).backward(dy)

        ms = _median_ms(step, 7)
        steps.append({"method": name, "ms": ms})
        print(f"LoRA layer step (tokens {tokens}, hidden {hidden}, r {r}, bf16, CPU): {name:<15} {ms:8.2f} ms")
    qdora = qdora_rows("cpu", torch.bfloat16, [(hidden, hidden)], tokens, r, reps=15)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    from peftfast.bench import _versions, git_commit

    res = {"storage": storage, "layer_step": steps, "qdora": qdora, "versions": _versions(), "commit": git_commit(),
           "threads": torch.get_num_threads()}
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {out_path}")
    return res


def _bnb_dora(k: int, n: int, r: int, p: float, dev: str, dt):
    """PEFT's QDoRA layer: ``use_dora=True`` over a bitsandbytes NF4 ``Linear4bit`` [k -> n] (random weights),
    in a holder module; lora_B and the magnitude moved off their initial values."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model

    holder = torch.nn.Module()
    holder.fc = bnb.nn.Linear4bit(k, n, bias=False, quant_type="nf4", compute_dtype=dt)
    holder.fc.load_state_dict({"weight": (torch.randn(n, k) / k ** 0.5).to(dt)})
    holder = holder.to(dev)  # bitsandbytes quantizes on the move
    pm = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["fc"],
                                           use_dora=True))
    layer = pm.base_model.model.fc
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 0.01)
        layer.lora_magnitude_vector["default"].weight.mul_(1.1)
    return pm.train()


def qdora_rows(dev: str, dt, shapes, tokens: int, r: int, reps: int = 7) -> list[dict]:
    """QDoRA, one layer: PEFT over bitsandbytes ``Linear4bit`` (``use_dora=True``) vs the same model patched
    (``nf4_dora_linear``), dropout 0 and 0.05: fwd+bwd ms (CPU: the two interleaved step by step, median and p20/p80
    of ``reps``; CUDA: do_bench median and p20/p80, peak memory) and bytes saved for backward (exact, the NF4 state
    excluded). Empty, with the reason printed, where bitsandbytes does not import."""
    import copy

    import torch

    import peftfast
    from peftfast.bench import saved_activation_bytes

    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        print(f"QDoRA rows skipped: bitsandbytes does not import ({type(exc).__name__}: {exc})")
        return []
    rows = []
    for k, n in shapes:
        for p in (0.0, 0.05):
            torch.manual_seed(0)
            peft_model = _bnb_dora(k, n, r, p, dev, dt)
            fused = copy.deepcopy(peft_model)
            peftfast.patch(fused)
            x = torch.randn(tokens, k, device=dev, dtype=dt, requires_grad=True)
            dy = torch.randn(tokens, n, device=dev, dtype=dt)
            steps, got = {}, []
            for label, model in (("peft + bitsandbytes", peft_model), ("peftfast", fused)):
                layer = model.base_model.model.fc
                state = layer.get_base_layer().weight.quant_state
                keep = [*model.parameters(), state.absmax] + ([state.state2.absmax] if state.nested else [])
                _, saved = saved_activation_bytes(lambda layer=layer: layer(x * 1), exclude=keep)
                steps[label] = functools.partial(backward_step, x, dy)(lambda layer=layer: layer(x))
                got.append({"kind": "qdora_step", "shape": f"{k}->{n}", "rank": r, "dropout": p, "method": label,
                            "tokens": tokens, "saved_bytes": saved.total})
            if dev == "cuda":
                import triton.testing

                for row, step in zip(got, steps.values()):
                    step()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    row["ms"], row["ms_p20"], row["ms_p80"] = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
                    row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            else:  # interleaved, step by step: a busy CPU's drift hits both alike
                times = {label: [] for label in steps}
                for i in range(reps + 1):
                    for label, step in steps.items():
                        t0 = time.perf_counter()
                        step()
                        if i:
                            times[label].append((time.perf_counter() - t0) * 1e3)
                for row in got:
                    q = statistics.quantiles(times[row["method"]], n=5)
                    row["ms"], row["ms_p20"], row["ms_p80"] = statistics.median(times[row["method"]]), q[0], q[3]
            for row in got:
                print(f"QDoRA {k:>5}->{n:<6} p={p:<4} {row['method']:<20} {row['ms']:9.3f} ms  saved "
                      f"{row['saved_bytes'] / 2**20:8.2f} MB")
            rows += got
    return rows


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------
def run_gpu(out_dir: str | None, tokens: int = 8192) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        print("bench_nf4 --gpu: no CUDA GPU available on this machine", file=sys.stderr)
        raise SystemExit(2)
    import triton.testing

    import peftfast
    from peftfast.bench import _versions, git_commit
    from peftfast.modules.nf4 import NF4Linear
    from peftfast.ops import nf4 as O
    from peftfast.ops.lora import lora_linear

    dev, dt = "cuda", torch.bfloat16
    name = torch.cuda.get_device_name()
    spec = next((v for k, v in PEAK_GBS.items() if k in name), None)
    buf = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    copy_ms = triton.testing.do_bench(lambda: buf.clone())
    copy_gbs = 2 * buf.numel() / copy_ms / 1e6
    buf = None
    rows = []
    for k, n in SHAPES_8B:
        q, am = O.quantize_nf4(torch.randn(n, k, device=dev, dtype=dt))
        moved = q.numel() + am.numel() * 4 + n * k * 2
        for be in ("triton", "cpp") if O.have_ops() and peftfast._ext.has_cuda_kernels() else ("triton",):
            ms = triton.testing.do_bench(lambda be=be: O.dequantize_nf4(q, am, 64, dt, backend=be))
            rows.append({"kind": "dequant", "shape": f"{k}->{n}", "backend": be, "ms": ms,
                         "gbs": moved / ms / 1e6, "peak_gbs_spec": spec, "copy_gbs": copy_gbs})
            print(f"dequant {k:>5}->{n:<6} {be:<7} {ms:7.3f} ms {moved / ms / 1e6:7.0f} GB/s (spec {spec}, "
                  f"copy {copy_gbs:.0f})")
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001
        bnb = None
        print(f"bitsandbytes baseline skipped: {type(exc).__name__}: {exc}")
    r, p = 16, 0.05
    for k, n in SHAPES_8B:
        torch.manual_seed(0)
        base = torch.nn.Linear(k, n, bias=False, device=dev, dtype=dt).requires_grad_(False)
        peft_layer = peft_lora_layer(base, r, p).to(device=dev, dtype=dt).train()
        torch.nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.01)
        a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        s = peft_layer.scaling["default"]
        nf4 = NF4Linear.from_linear(base)
        qw, qam = nf4.weight, nf4.absmax
        x = torch.randn(tokens, k, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(tokens, n, device=dev, dtype=dt)

        step = functools.partial(backward_step, x, dy)

        cases = {
            "peft bf16": step(lambda: peft_layer(x)),
            "peftfast bf16 (fused)": step(lambda: lora_linear(x, base.weight, None, a, b, s, dropout_p=p,
                                                              backend="triton")),
            "peftfast nf4 (fused)": step(lambda: O.nf4_lora_linear(x, qw, qam, None, a, b, s, dropout_p=p,
                                                                   backend="triton")),
        }
        if bnb is not None:
            from peft import LoraConfig, get_peft_model

            holder = torch.nn.Module()
            holder.fc = bnb.nn.Linear4bit(k, n, bias=False, quant_type="nf4", compute_dtype=dt)
            holder.fc.load_state_dict({"weight": base.weight.detach().cpu()})
            holder = holder.to(dev)
            pm = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["fc"]))
            pm.train()
            cases["peft + bitsandbytes nf4"] = step(lambda: pm.base_model.model.fc(x))
        flops = 2 * tokens * k * n * 2 + 2 * tokens * r * (k + n) * 3
        for label, fn in cases.items():
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            rows.append({"kind": "lora_step", "shape": f"{k}->{n}", "rank": r, "dropout": p, "method": label,
                         "ms": med, "ms_p20": p20, "ms_p80": p80, "tflops": flops / med / 1e9,
                         "peak_mb": torch.cuda.max_memory_allocated() / 2**20})
            print(f"{k:>5}->{n:<6} {label:<26} {med:8.3f} ms  {flops / med / 1e9:6.1f} TFLOP/s  "
                  f"peak {torch.cuda.max_memory_allocated() / 2**20:8.0f} MB")
    rows += qdora_rows(dev, dt, SHAPES_8B[:1] + SHAPES_8B[2:3], tokens, r)
    out_dir = out_dir or os.path.join(HERE, "results", f"{datetime.date.today()}-{name.replace(' ', '-')}")
    os.makedirs(out_dir, exist_ok=True)
    meta = {"device": name, "capability": torch.cuda.get_device_capability(), "versions": _versions(),
            "commit": git_commit(), "tokens": tokens}
    with open(os.path.join(out_dir, "nf4.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    from _cli import main

    sys.exit(main(__doc__, run_cpu, run_gpu, "cpu-nf4.json"))
