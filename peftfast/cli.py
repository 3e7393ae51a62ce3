"""The ``peftfast`` command: ``peftfast bench`` and ``peftfast info``."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="peftfast", description="Fused kernels for PEFT fine-tuning.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="train a few steps with PEFT and with peftfast.patch, side by side")
    b.add_argument("--model", default="tiny", help="preset: tiny (default) or llama-layer")
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--rank", type=int, default=16)
    b.add_argument("--dropout", type=float, default=0.05)
    b.add_argument("--seq-len", type=int, default=None)
    b.add_argument("--batch-size", type=int, default=None)
    b.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    b.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    b.add_argument("--device", default="cuda" if _cuda() else "cpu")
    b.add_argument("--out", default=None, help="directory for bench.json, bench.csv and bench.png")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    sub.add_parser("info", help="versions, live backends, GPU")
    return ap


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "info":
        from peftfast.info import info_lines

        print("\n".join(info_lines()))
        return 0
    from peftfast.bench import BenchConfig, BenchError, format_table, run_bench, write_outputs

    if args.steps < 1:
        print("peftfast bench: --steps must be at least 1", file=sys.stderr)
        return 2
    cfg = BenchConfig(model=args.model, steps=args.steps, rank=args.rank, dropout=args.dropout, seq_len=args.seq_len,
                      batch_size=args.batch_size, dtype=args.dtype, backend=args.backend, device=args.device)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"\r{msg:<40}", end="", file=sys.stderr, flush=True)

    try:
        res = run_bench(cfg, progress)
    except BenchError as exc:
        print(f"peftfast bench: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print("\r" + " " * 40 + "\r", end="", file=sys.stderr)
    print(format_table(res))
    if args.out:
        for p in write_outputs(res, args.out):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
