"""What the ``bench_*.py`` scripts share: their command line (``--cpu`` exact counts, ``--gpu`` timings, ``--out``),
the PEFT layer they compare against and the timed fwd+bwd step."""

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


def backward_step(x, dy, f: Callable[[], object]) -> Callable[[], None]:
    """A timed fwd+bwd of ``f`` (a closure over ``x``) with output gradient ``dy``; x's gradient is reset first."""

    def run() -> None:
        x.grad = None
        f().backward(dy)

    return run


def peft_lora_layer(base, r: int, p: float):
    """PEFT's own ``lora.Linear`` around ``base``, built through ``get_peft_model`` (the layer's constructor
    signature changes across PEFT versions; this path does not)."""
    import torch
    from peft import LoraConfig, get_peft_model

    holder = torch.nn.Module()
    holder.fc = base
    get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["fc"]))
    return holder.fc
