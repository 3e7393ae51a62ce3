"""The ``peftfast`` command: ``peftfast bench`` and ``peftfast info``."""

from __future__ import annotations

import argparse
import sys


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Bad arguments end in one line on stderr and exit code 2 (argparse's default prints the whole usage)."""

    def error(self, message: str):
        raise _UsageError(message)


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or 'auto', got {text!r}") from None


def _recompute(text: str) -> tuple[str, ...]:
    from peftfast.patching.core import RECOMPUTE

    settings = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in settings if t not in RECOMPUTE]
    if not settings or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(RECOMPUTE)}, got {text!r}")
    return settings


def _parser() -> argparse.ArgumentParser:
    from peftfast.bench import BASELINES, METHODS, PRESETS, BenchConfig

    ap = _Parser(prog="peftfast", description="Fused kernels for PEFT fine-tuning.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    b = sub.add_parser("bench", help="train a few steps with PEFT, peftfast and other baselines, side by side")
    b.add_argument("--model", default="tiny",
                   help=f"preset ({', '.join(PRESETS)}; random weights from the published shapes), a local HF "
                        "config directory / config JSON file, or a local checkpoint directory (its weights are loaded)")
    b.add_argument("--random-weights", action="store_true",
                   help="with a local checkpoint: random weights of its shape instead of loading them")
    b.add_argument("--layers", type=int, default=None, help="keep only the first N layers (run big presets on "
                                                            "small machines)")
    b.add_argument("--method", default="lora",
                   help=f"{', '.join(METHODS)} (lora: PEFT LoRA on all linear layers; dora: the same with "
                        "use_dora=True; adapter: peftfast.add_adapters; prefix: PEFT prefix tuning; qlora: LoRA over "
                        "NF4 base weights from peftfast.quantize_base; qdora: DoRA over bitsandbytes NF4 Linear4bit)")
    b.add_argument("--rank", type=int, default=16, help="LoRA rank; adapter bottleneck size")
    b.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    b.add_argument("--targets", default="all-linear",
                   help="LoRA target modules for lora/qlora/dora/qdora: all-linear (default) or comma-separated names, "
                        "e.g. q_proj,v_proj (the MLPs then stay frozen base modules)")
    b.add_argument("--num-virtual-tokens", type=int, default=16, help="prefix length for --method prefix")
    b.add_argument("--seq-len", type=int, default=None,
                   help="sequence length (encoder-decoder models: the source's; Whisper's is fixed)")
    b.add_argument("--target-len", type=int, default=None,
                   help="encoder-decoder models (t5-base, bart-base, whisper-small, ...): the target length "
                        "(default: a quarter of --seq-len; 128 for Whisper)")
    b.add_argument("--batch-size", type=_batch_size, default=None,
                   help="an integer, or auto: the largest power of two that fits (CUDA only)")
    b.add_argument("--packed", action="store_true",
                   help="documents of 25-100%% of --seq-len packed per row, position_ids restarting at 0")
    b.add_argument("--padded", action="store_true",
                   help="the same documents one per row, right-padded: the comparison for --packed (tokens/s "
                        "counts real tokens only)")
    b.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    b.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time the variants one step each in turn, all in memory at once (default: on CPU only, "
                        "where other load comes and goes); peak memory is measured with each variant alone either "
                        "way")
    b.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant) in every run")
    b.add_argument("--no-fuse-loss", dest="fuse_loss", action="store_false",
                   help="patch without the fused linear cross-entropy (the default fuses it for causal LMs)")
    default_recompute = ",".join(BenchConfig.recompute)
    b.add_argument("--recompute", default=default_recompute, type=_recompute,
                   help="patch(recompute=...) settings to run, one peftfast row each, comma-separated: none, norms "
                        "(patch's default: norm outputs rebuilt in backward), attn (also q/k/v projections and "
                        "RoPE), mlp (also the gate/up GEMM); default: " + default_recompute)
    b.add_argument("--baselines", default="peft",
                   help=f"comma-separated, from {','.join(BASELINES)}; those not installed or not runnable here are "
                        "skipped with the reason (peft, the reference, always runs)")
    b.add_argument("--compile-backend", default="inductor", help="torch.compile backend for peft+compile")
    b.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    b.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    b.add_argument("--device", default="cuda" if _cuda() else "cpu")
    b.add_argument("--force", action="store_true", help="skip the check that the run fits in memory")
    b.add_argument("--out", default=None, help="directory for bench.json, bench.csv and bench.png")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("info", help="versions, live backends, GPU")
    return ap


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class _Progress:
    """A one-line progress bar on stderr (carriage returns, no extra dependency)."""

    def __init__(self, quiet: bool):
        self.quiet, self.width = quiet, 0

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            self.width = max(self.width, len(msg))
            print(f"\r{msg:<{self.width}}", end="", file=sys.stderr, flush=True)

    def clear(self) -> None:
        if not self.quiet and self.width:
            print("\r" + " " * self.width + "\r", end="", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        print(f"peftfast: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.cmd == "info":
        from peftfast.info import info_lines

        print("\n".join(info_lines()))
        return 0
    from peftfast.bench import BenchConfig, BenchError, format_table, run_bench, write_outputs

    cfg = BenchConfig(model=args.model, method=args.method, steps=args.steps, rank=args.rank, dropout=args.dropout,
                      targets=args.targets, seq_len=args.seq_len, target_len=args.target_len,
                      batch_size=args.batch_size, layers=args.layers, packed=args.packed,
                      padded=args.padded, grad_ckpt=args.grad_ckpt, fuse_loss=args.fuse_loss, recompute=args.recompute,
                      baselines=tuple(b.strip() for b in args.baselines.split(",") if b),
                      dtype=args.dtype, backend=args.backend, device=args.device,
                      compile_backend=args.compile_backend, num_virtual_tokens=args.num_virtual_tokens,
                      force=args.force, interleave=args.interleave, random_weights=args.random_weights)
    progress = _Progress(args.quiet)
    try:
        res = run_bench(cfg, progress)
    except BenchError as exc:
        progress.clear()
        print(f"peftfast bench: {exc}", file=sys.stderr)
        return 2
    progress.clear()
    print(format_table(res))
    if args.out:
        for p in write_outputs(res, args.out):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
