"""Exact measurements (saved-activation bytes, work ops) and the ``peftfast bench`` training comparison.

Saved activations are counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd keeps for
backward, parameters and buffers excluded, deduplicated by storage (a storage saved twice is held once). Work ops are
aten ops seen by a ``TorchDispatchMode`` that are neither views nor bare allocations, plus Triton launches (the aten
ops a launch dispatches inside the CPU interpreter are not counted: on a GPU a launch is one op).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peftfast.ops import _counters

_ALLOC_ONLY = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
_NO_WORK = {"detach", "alias", "lift_fresh", "_local_scalar_dense_noop"}


# ----------------------------------------------------------------------------------------------------------------
# exact counters
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SavedBytes:
    total: int
    by_shape: dict[str, int]


def saved_activation_bytes(fn: Callable[[], object],
                           exclude: list[torch.Tensor] | tuple = ()) -> tuple[object, SavedBytes]:
    """Run ``fn`` (a forward) and measure what autograd saves for backward, without ``exclude`` (parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    shapes: Counter[str] = Counter()

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and ptr not in seen and st.nbytes() > 0:
            seen[ptr] = st.nbytes()
            shapes[f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}"] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, SavedBytes(total=sum(seen.values()), by_shape=dict(shapes))


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _counters.inside_launch() and not func.is_view:
            name = func.overloadpacket.__name__
            if name not in _ALLOC_ONLY and name not in _NO_WORK:
                self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class OpCount:
    aten: Counter = field(default_factory=Counter)
    launches: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.launches.values())


def count_work_ops(fn: Callable[[], object]) -> tuple[object, OpCount]:
    """Run ``fn`` and count its work ops (aten ops that are neither views nor bare allocations, plus launches)."""
    counter = _OpCounter()
    with _counters.count_launches() as launches, counter:
        out = fn()
    return out, OpCount(aten=counter.ops, launches=Counter(launches))


# ----------------------------------------------------------------------------------------------------------------
# presets and the training comparison
# ----------------------------------------------------------------------------------------------------------------
PRESETS: dict[str, dict] = {
    # default: Llama-shaped, small enough to train a few steps on a 2-core CPU in seconds
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, seq_len=128, batch_size=2),
    # one decoder layer of the shape the LoRA issue measures (Llama-3.2-1B-like widths)
    "llama-layer": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=1, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=1024, seq_len=64, batch_size=1),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class BenchError(ValueError):
    """A bad ``peftfast bench`` request (reported as one line, exit code 2)."""


@dataclass
class BenchConfig:
    model: str = "tiny"
    steps: int = 5
    rank: int = 16
    dropout: float = 0.05
    seq_len: int | None = None
    batch_size: int | None = None
    dtype: str = "fp32"
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0


@dataclass
class MethodResult:
    method: str
    step_ms_median: float
    step_ms_p20: float
    step_ms_p80: float
    tokens_per_s: float
    saved_mb: float
    saved_hvec_per_token_layer: float
    work_ops_per_step: int
    losses: list[float]
    max_abs_loss_diff_vs_peft: float = 0.0


def build_model(cfg: BenchConfig):
    """A PEFT LoRA model on a random-weight Llama of the preset's shape (no download)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.model not in PRESETS:
        raise BenchError(f"unknown preset {cfg.model!r}; choose one of: {', '.join(PRESETS)}")
    if cfg.dtype not in DTYPES:
        raise BenchError(f"unknown dtype {cfg.dtype!r}; choose one of: {', '.join(DTYPES)}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but no CUDA GPU is available")
    if not 1 <= cfg.rank <= 256:
        raise BenchError(f"--rank must be in 1..256, got {cfg.rank}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise BenchError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    p = {k: v for k, v in PRESETS[cfg.model].items() if k not in ("seq_len", "batch_size")}
    torch.manual_seed(cfg.seed)
    hf = LlamaConfig(**p, max_position_embeddings=4096, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf).to(device=cfg.device, dtype=DTYPES[cfg.dtype])
    lora = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=cfg.dropout, target_modules="all-linear")
    return get_peft_model(model, lora), hf


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for mod in ("triton", "transformers", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = "not installed"
    return out


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _train(model, batches, steps: int, device: str, progress: Callable[[str], None] | None, label: str):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, losses = [], []
    torch.manual_seed(1234)  # same dropout RNG stream for both methods
    for i in range(steps + 1):  # one warm-up step (autotuning, caches) that is not timed
        ids = batches[i % len(batches)]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        if progress:
            progress(f"{label}: step {i}/{steps}")
    return times, losses


def _measure_step(model, ids, params) -> tuple[SavedBytes, OpCount]:
    def fwd():
        return model(input_ids=ids, labels=ids).loss

    (loss, saved) = saved_activation_bytes(fwd, exclude=params)
    _, ops = count_work_ops(lambda: (model(input_ids=ids, labels=ids).loss.backward()))
    del loss
    model.zero_grad(set_to_none=True)
    return saved, ops


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Train ``cfg.steps`` steps with plain PEFT and with ``peftfast.patch`` from identical weights and data."""
    import peftfast

    peft_model, hf = build_model(cfg)
    preset = PRESETS[cfg.model]
    seq = cfg.seq_len or preset["seq_len"]
    batch = cfg.batch_size or preset["batch_size"]
    if seq < 2 or batch < 1:
        raise BenchError(f"impossible shape: batch {batch} x seq {seq}")
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    batches = [torch.randint(0, hf.vocab_size, (batch, seq), generator=gen).to(cfg.device) for _ in range(2)]
    patched = copy.deepcopy(peft_model)
    peftfast.patch(patched, backend=cfg.backend)
    peft_model.train()
    patched.train()
    elt = torch.finfo(DTYPES[cfg.dtype]).bits // 8
    tokens = batch * seq
    results = []
    for label, model in (("peft", peft_model), ("peftfast", patched)):
        params = [*model.parameters(), *model.buffers()]
        saved, ops = _measure_step(model, batches[0], params)
        times, losses = _train(model, batches, cfg.steps, cfg.device, progress, label)
        q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
        med = statistics.median(times)
        results.append(MethodResult(
            method=label, step_ms_median=med * 1e3, step_ms_p20=q[0] * 1e3, step_ms_p80=q[3] * 1e3,
            tokens_per_s=tokens / med, saved_mb=saved.total / 2**20,
            saved_hvec_per_token_layer=saved.total / (tokens * hf.num_hidden_layers * hf.hidden_size * elt),
            work_ops_per_step=ops.total, losses=losses,
        ))
    base = results[0].losses
    for r in results:
        r.max_abs_loss_diff_vs_peft = max(abs(a - b) for a, b in zip(r.losses, base))
    return {
        "config": asdict(cfg), "tokens_per_step": tokens, "device": device_name(cfg.device), "versions": _versions(),
        "commit": git_commit(), "report": peftfast.report(patched).summary(),
        "results": [asdict(r) for r in results],
    }


def format_table(res: dict) -> str:
    head = ["method", "step ms (p20-p80)", "tokens/s", "saved MB", "saved hvec/tok/layer", "work ops/step",
            "max |Δloss| vs peft"]
    rows = []
    for r in res["results"]:
        rows.append([r["method"], f"{r['step_ms_median']:.1f} ({r['step_ms_p20']:.1f}-{r['step_ms_p80']:.1f})",
                     f"{r['tokens_per_s']:.0f}", f"{r['saved_mb']:.2f}", f"{r['saved_hvec_per_token_layer']:.1f}",
                     str(r["work_ops_per_step"]), f"{r['max_abs_loss_diff_vs_peft']:.2e}"])
    if len(res["results"]) == 2:
        a, b = res["results"]
        rows.append(["ratio", f"{b['step_ms_median'] / a['step_ms_median']:.2f}x", "",
                     f"{b['saved_mb'] / a['saved_mb']:.2f}x", "",
                     f"{b['work_ops_per_step'] / a['work_ops_per_step']:.2f}x",
                     ""])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    cfg = res["config"]
    title = (f"peftfast bench: {cfg['model']} LoRA r={cfg['rank']} dropout={cfg['dropout']} {cfg['dtype']} "
             f"on {res['device']}, {res['tokens_per_step']} tokens/step, {cfg['steps']} steps; "
             f"commit {res['commit']}")
    return "\n".join([title, line(head), line(["-" * w for w in widths]), *map(line, rows), res["report"]])


def write_outputs(res: dict, out_dir: str) -> list[str]:
    """JSON, CSV and (with matplotlib) a PNG of the comparison; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.csv")]
    with open(paths[0], "w") as f:
        json.dump(res, f, indent=2)
    keys = ["method", "step_ms_median", "step_ms_p20", "step_ms_p80", "tokens_per_s", "saved_mb",
            "saved_hvec_per_token_layer", "work_ops_per_step", "max_abs_loss_diff_vs_peft"]
    with open(paths[1], "w") as f:
        f.write(",".join(keys) + "\n")
        for r in res["results"]:
            f.write(",".join(str(r[k]) for k in keys) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return paths
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    names = [r["method"] for r in res["results"]]
    for ax, key, title in zip(axes, ["tokens_per_s", "saved_mb", "work_ops_per_step"],
                              ["tokens/s (higher is better)", "saved activations MB", "work ops per step"]):
        ax.bar(names, [r[key] for r in res["results"]], color=["#888888", "#2a7ab9"])
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{res['config']['model']} on {res['device']} ({res['commit']})", fontsize=9)
    fig.tight_layout()
    png = os.path.join(out_dir, "bench.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [*paths, png]
