"""Fused attention benchmarks.

--cpu (exact, any machine): one decoder layer's attention of a GQA Llama shape (hidden 1024, 8 query heads of 128,
      2 KV heads) on a padded batch (4 rows of 64, lengths 25-100 %): bytes saved for backward and work ops, the
      transformers SDPA path (with its 4-D mask and repeat_kv) vs peftfast's attention (ATen path and the Triton
      kernels in the CPU interpreter).
--gpu (CUDA): forward and forward+backward TFLOP/s of the Triton kernel vs SDPA's flash / efficient / cuDNN
      backends, FlexAttention and flash-attn when installed; head dims 64 and 128, causal and not, S = 512..16k
      with batch = 16k / S; multi-head latent attention (q/k heads 192, v heads 128) against v zero-padded and SDPA;
      then a padded batch (lengths uniform in 25-100 % of S) vs the same tokens packed, against transformers' SDPA
      path with its mask. JSON + PNG.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _padded_lengths(b: int, s: int, seed: int = 0) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [int(x) for x in torch.randint(max(1, s // 4), s + 1, (b,), generator=g)]


def counts(method: str, b: int = 4, s: int = 64) -> dict:
    """Saved bytes and work ops of one attention call fwd+bwd on a padded GQA batch."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from peftfast.bench import count_work_ops, saved_activation_bytes
    from peftfast.modules.attention import segment_ids
    from peftfast.ops.attention import flash_attention

    dtype = torch.float16 if method == "peftfast-triton" else torch.bfloat16
    hq, hk, d = 8, 2, 128
    torch.manual_seed(0)
    q = torch.randn(b, s, hq, d, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, s, hk, d, dtype=dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(b, s, hk, d, dtype=dtype).transpose(1, 2).requires_grad_()
    mask2d = torch.zeros(b, s, dtype=torch.bool)
    for i, n in enumerate(_padded_lengths(b, s)):
        mask2d[i, :n] = True

    class _M(torch.nn.Module):
        is_causal = True
        num_key_value_groups = hq // hk

    if method == "sdpa":
        causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
        mask4d = causal[None, None] & mask2d[:, None, None, :]

        def fwd():
            return sdpa_attention_forward(_M(), q, k, v, mask4d, scaling=1 / math.sqrt(d))[0]
    else:
        qseg, kseg, _ = segment_ids(q, k, mask2d, {})
        backend = "triton" if method == "peftfast-triton" else "torch"

        def fwd():
            return flash_attention(q, k, v, causal=True, qseg=qseg, kseg=kseg, backend=backend)

    out, saved = saved_activation_bytes(fwd, exclude=[q, k, v])
    _, ops_b = count_work_ops(lambda: out.float().sum().backward())
    _, ops_f = count_work_ops(fwd)
    return {"method": method, "saved_bytes_beyond_qkv": saved.total, "saved_shapes": saved.by_shape,
            "work_ops_fwd_bwd": ops_f.total + ops_b.total, "launches": dict(ops_f.launches + ops_b.launches)}


def run_cpu(out_path: str) -> list[dict]:
    from peftfast.bench import _versions, git_commit

    rows = [counts("sdpa"), counts("peftfast-torch")]
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "import json, bench_attention as b; print(json.dumps(b.counts('peftfast-triton')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, check=True)
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'method':<16}{'saved beyond q/k/v (KB)':>26}{'work ops fwd+bwd':>18}")
    for r in rows:
        print(f"{r['method']:<16}{r['saved_bytes_beyond_qkv'] / 1024:>26.1f}{r['work_ops_fwd_bwd']:>18}")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    commit = git_commit()  # before opening: a truncated tracked file would read as "+dirty"
    with open(out_path, "w") as f:
        json.dump({"rows": rows, "versions": _versions(), "commit": commit,
                   "shape": "4 x 64 padded (25-100 %), 8 q heads / 2 kv heads of 128, causal"}, f, indent=2)
    return rows


def _tflops(b, h, s, d, causal, ms, bwd):
    flops = 4 * b * s * s * h * d * (0.5 if causal else 1.0)
    return flops * (3.5 if bwd else 1.0) / ms / 1e9


def run_gpu(out_dir: str | None) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        print("bench_attention --gpu: no CUDA GPU available on this machine", file=sys.stderr)
        raise SystemExit(2)
    import torch.nn.functional as F
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from peftfast.bench import _versions, git_commit
    from peftfast.modules.attention import segment_ids
    from peftfast.ops.attention import flash_attention

    rows = []
    dev, dt, hq = "cuda", torch.bfloat16, 16
    candidates = {"peftfast": None, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                  "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention)
    except Exception:
        flex = None
    try:
        from flash_attn import flash_attn_func
    except Exception:
        flash_attn_func = None
    for d in (64, 128):
        for causal in (True, False):
            for s in (512, 1024, 2048, 4096, 8192, 16384):
                b = max(1, 16384 // s)
                q = torch.randn(b, hq, s, d, device=dev, dtype=dt, requires_grad=True)
                k = torch.randn(b, hq, s, d, device=dev, dtype=dt, requires_grad=True)
                v = torch.randn(b, hq, s, d, device=dev, dtype=dt, requires_grad=True)
                fns = {}
                for name, be in candidates.items():
                    if be is None:
                        fns[name] = lambda: flash_attention(q, k, v, causal=causal, backend="triton")
                    else:
                        def call(be=be):
                            with sdpa_kernel(be):
                                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        fns[name] = call
                if flex is not None:
                    bm = create_block_mask((lambda b_, h_, qi, ki: qi >= ki) if causal else (lambda *a: True),
                                           None, None, s, s, device=dev)
                    fns["flex"] = lambda bm=bm: flex(q, k, v, block_mask=bm)
                if flash_attn_func is not None:
                    fns["flash-attn"] = lambda: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2), causal=causal)
                for name, fn in fns.items():
                    try:
                        o = fn()
                        g = torch.randn_like(o)
                        fwd = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])

                        def fb(fn=fn, g=g):
                            q.grad = k.grad = v.grad = None
                            fn().backward(g)
                        both = triton.testing.do_bench(fb, quantiles=[0.5, 0.2, 0.8])
                    except Exception as exc:  # a backend that refuses this shape is reported, not fatal
                        rows.append({"d": d, "causal": causal, "s": s, "method": name, "error": str(exc)[:200]})
                        continue
                    rows.append({"d": d, "causal": causal, "s": s, "b": b, "method": name, "fwd_ms": fwd[0],
                                 "fwd_tflops": _tflops(b, hq, s, d, causal, fwd[0], False), "fwdbwd_ms": both[0],
                                 "fwdbwd_tflops": _tflops(b, hq, s, d, causal, both[0], True)})
                    print(f"d={d} causal={causal} S={s:<6} {name:<15} fwd {rows[-1]['fwd_tflops']:6.1f} "
                          f"fwd+bwd {rows[-1]['fwdbwd_tflops']:6.1f} TFLOP/s")
    # multi-head latent attention (DeepSeek-V2/V3): q/k heads 192 wide, v heads 128; the kernels take v as it is,
    # against v zero-padded to 192 and the output sliced back (what transformers does for flash-attention 2) and
    # SDPA's backends (which of them take unequal head dims is the backend's business: refusals are recorded)
    for s in (2048, 4096):
        b = max(1, 16384 // s)
        q = torch.randn(b, hq, s, 192, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(b, hq, s, 192, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(b, hq, s, 128, device=dev, dtype=dt, requires_grad=True)
        mla = {"peftfast": lambda: flash_attention(q, k, v, causal=True, backend="triton"),
               "peftfast v padded": lambda: flash_attention(q, k, F.pad(v, (0, 64)), causal=True,
                                                            backend="triton")[..., :128]}
        for name, be in candidates.items():
            if be is not None:
                def call(be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                mla[name] = call
        for name, fn in mla.items():
            try:
                o = fn()
                g = torch.randn_like(o)

                def fb(fn=fn, g=g):
                    q.grad = k.grad = v.grad = None
                    fn().backward(g)
                both = triton.testing.do_bench(fb, quantiles=[0.5, 0.2, 0.8])
            except Exception as exc:
                rows.append({"case": f"mla-{name}", "s": s, "error": str(exc)[:200]})
                continue
            flops = 2 * b * s * s * hq * (192 + 128) * 0.5 * 3.5
            rows.append({"case": f"mla-{name}", "s": s, "b": b, "fwdbwd_ms": both[0],
                         "fwdbwd_tflops": flops / both[0] / 1e9})
            print(f"MLA 192/128 S={s:<6} {name:<18} fwd+bwd {both[0]:8.3f} ms {rows[-1]['fwdbwd_tflops']:6.1f} TFLOP/s")
    # padded vs packed against transformers' SDPA path with its 4-D mask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    s, d, hk = 4096, 128, 4
    b = 4
    lengths = _padded_lengths(b, s)
    mask2d = torch.zeros(b, s, dtype=torch.bool, device=dev)
    for i, n in enumerate(lengths):
        mask2d[i, :n] = True
    q = torch.randn(b, s, hq, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_()
    k = torch.randn(b, s, hk, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_()
    v = torch.randn(b, s, hk, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_()
    qseg, kseg, _ = segment_ids(q, k, mask2d, {})
    mask4d = torch.tril(torch.ones(s, s, dtype=torch.bool, device=dev))[None, None] & mask2d[:, None, None, :]

    class _M(torch.nn.Module):
        is_causal = True
        num_key_value_groups = hq // hk

    total = sum(lengths)
    qp = torch.randn(1, total, hq, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_()
    kp = torch.randn(1, total, hk, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_()
    vp = torch.randn(1, total, hk, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_()
    pos = torch.cat([torch.arange(n, device=dev) for n in lengths])[None]
    from peftfast.modules.attention import _segments_from_positions

    seg = _segments_from_positions(pos)
    cases = {
        "hf-sdpa padded": lambda: sdpa_attention_forward(_M(), q, k, v, mask4d)[0],
        "peftfast padded": lambda: flash_attention(q, k, v, causal=True, qseg=qseg, kseg=kseg, backend="triton"),
        "peftfast packed": lambda: flash_attention(qp, kp, vp, causal=True, qseg=seg, kseg=seg, backend="triton"),
    }
    for name, fn in cases.items():
        o = fn()
        g = torch.randn_like(o)

        def fb(fn=fn, g=g):
            for t in (q, k, v, qp, kp, vp):
                t.grad = None
            fn().backward(g)
        ms = triton.testing.do_bench(fb, quantiles=[0.5, 0.2, 0.8])
        rows.append({"case": name, "tokens": total, "fwdbwd_ms": ms[0], "tokens_per_s": total / ms[0] * 1e3})
        print(f"{name:<18} {ms[0]:8.3f} ms  {total / ms[0] * 1e3:,.0f} real tokens/s")
    name = torch.cuda.get_device_name().replace(" ", "-")
    out_dir = out_dir or os.path.join(HERE, "results", f"{datetime.date.today()}-{name}")
    os.makedirs(out_dir, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "versions": _versions(), "commit": git_commit()}
    with open(os.path.join(out_dir, "attention.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    _plot(rows, os.path.join(out_dir, "attention.png"), meta)
    return rows


def _plot(rows: list[dict], path: str, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("fwd_tflops", "fwdbwd_tflops")):
        for method in sorted({r["method"] for r in rows if "method" in r and key in r}):
            pts = sorted((r["s"], r[key]) for r in rows if r.get("method") == method and r.get("d") == 128
                         and r.get("causal") and key in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_title(f"hd128 causal {key.split('_')[0]}", fontsize=9)
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=7)
    fig.suptitle(f"attention, bf16, {meta['device']} ({meta['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    from _cli import main

    sys.exit(main(__doc__, run_cpu, run_gpu, "cpu-attention.json"))
