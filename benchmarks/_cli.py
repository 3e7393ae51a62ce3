"""The command line the ``bench_*.py`` scripts share: ``--cpu`` (exact counts), ``--gpu`` (timings), ``--out``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))


def main(doc: str, run_cpu: Callable[[str], object], run_gpu: Callable[[str | None], object], cpu_json: str,
         argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="exact CPU memory and op counts")
    ap.add_argument("--gpu", action="store_true", help="GPU timings (needs CUDA)")
    ap.add_argument("--out", default=None, help="output directory (GPU) / JSON path (CPU)")
    args = ap.parse_args(argv)
    if args.gpu:
        run_gpu(args.out)
    if args.cpu or not args.gpu:
        run_cpu(args.out or os.path.join(HERE, "results", cpu_json))
    return 0
