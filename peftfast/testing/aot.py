"""Ahead-of-time compilation of every Triton kernel config that peftfast can launch, for real GPU targets.

No GPU is needed: ``triton.compile`` lowers each kernel to PTX and runs ``ptxas`` for ``sm_80`` (A100) and
``sm_90`` (H100). Each result reports the shared memory the kernel needs, whether it uses tensor cores
(``mma.sync`` / ``wgmma.mma_async`` in the PTX), and registers and stack bytes (spills) per thread from
``cuobjdump``. Argument specialisation (16-byte divisibility, unit strides as constants) is derived exactly as
``@triton.jit`` derives it at launch, from the arguments the launchers pass for contiguous tensors of a
Llama-7B-sized layer, so each compiled kernel is the one the autotuner would benchmark on that GPU.

    python -m peftfast.testing.aot                  # table of every kernel x variant x config x arch
    python -m peftfast.testing.aot --tier fast      # the subset the default test suite compiles
    python -m peftfast.testing.aot --json --arch 90 --kernel gemm

Compilation runs in worker subprocesses (``--worker``) without ``TRITON_INTERPRET``: with the interpreter on,
``@triton.jit`` yields interpreter functions that cannot be compiled, so the kernels are imported afresh there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

ARCHS = (80, 90)
KERNELS = {"gemm": "_lora_gemm_kernel", "down": "_lora_down_kernel", "da": "_lora_da_kernel"}
_MARK = "AOT-RESULT "
# representative problem: a Llama-7B-sized layer at 8192 tokens (multiples of 16 get Triton's divisibility hint)
_M, _K, _N = 8192, 4096, 4096
_ELT = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclasses.dataclass(frozen=True, eq=False)
class Job:
    """One compile. ``args`` holds the runtime arguments (pointers as ``"*bf16"``), ``meta`` the non-tile
    constexprs, ``tiles`` the autotune config's; ``slow`` jobs are left to the ``-m slow`` test tier."""

    kernel: str
    variant: str
    dtype: str
    arch: int
    tiles: dict[str, int]
    num_warps: int
    num_stages: int
    meta: dict[str, Any]
    args: dict[str, Any]
    slow: bool = False

    @property
    def config(self) -> str:
        short = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK", "GROUP_M": "G"}
        parts = [f"{short.get(k, k)}{v}" for k, v in self.tiles.items()]
        return " ".join([*parts, f"w{self.num_warps}", f"s{self.num_stages}"])

    @property
    def key(self) -> str:
        return f"{self.kernel}|{self.variant}|{self.dtype}|{self.config}|sm_{self.arch}"

    def expected_tensor_cores(self) -> str:
        """``wgmma``, ``mma.sync`` or ``none``, from the target and the shape of the kernel's dots.

        ``ieee`` fp32 must not touch tensor cores (they would round to TF32). Hopper's warpgroup MMA needs >= 4
        warps and an M tile that is a multiple of 64; M is BLOCK_M, except in the dA kernel where it is BLOCK_R
        and in a GEMM whose only dots are its masked low-rank epilogue (no dense input, dropout): SUB_M, the rows
        of its slabs.
        """
        if "BLOCK_M" not in self.tiles and self.kernel != "_lora_da_kernel":
            return "none"  # element-wise / row-wise kernels have no dot
        if self.meta.get("DOT_PRECISION") == "ieee" and self.dtype == "fp32":
            return "none"
        if self.arch < 90 or self.num_warps < 4:
            return "mma.sync"
        m_tile = self.meta["BLOCK_R"] if self.kernel == "_lora_da_kernel" else self.tiles["BLOCK_M"]
        if self.kernel == "_lora_gemm_kernel" and self.meta.get("NUM_IN") == 0 and self.meta.get("HAS_DROPOUT"):
            m_tile = self.meta["SUB_M"]
        return "wgmma" if m_tile % 64 == 0 else "mma.sync"


class _Ptr(str):
    """A pointer argument as the launcher's early_config_prune sees it (it asks only for the element size)."""

    def element_size(self) -> int:
        return _ELT[self[1:]]


def _gemm_args(dt: str, *, num_in: int, rank: int, nseg: int, dropout: bool) -> dict[str, Any]:
    """``_triton_launch.gemm`` arguments: forward (``num_in`` <= 1) or dx (``num_in`` = 0 or 3)."""
    ptr = "*" + dt
    if nseg == 1:  # forward: P0 = x [M, K], Q0 = Wᵀ (view of W [N, K]), L = xa [M, r], R = B [N, r]
        m, n, red = _M, _N, _K
        dense = [(ptr, red, 1, ptr, 1, red, red)] * num_in
        lr = dict(stride_lm=rank, stride_lr=1, stride_rn=rank, stride_rr=1)
    else:  # dx: P_i = dy_i [M, N_i], Q_i = W_i [N_i, K], L = G [M, R_TOT], R = A_catᵀ (view of A_cat [R_TOT, K])
        m, n, red = _M, _K, _N
        dense = [(ptr, red, 1, ptr, n, 1, red)] * num_in
        lr = dict(stride_lm=rank * nseg, stride_lr=1, stride_rn=1, stride_rr=n)
    dense += [(ptr, 0, 0, ptr, 0, 0, 0)] * (3 - num_in)  # the launcher's filler: ``out`` with zero strides
    v: dict[str, Any] = {}
    for i, (pp, spm, spk, qp, sqk, sqn, kk) in enumerate(dense):
        v.update({f"p{i}_ptr": pp, f"stride_p{i}m": spm, f"stride_p{i}k": spk, f"q{i}_ptr": qp,
                  f"stride_q{i}k": sqk, f"stride_q{i}n": sqn, f"K{i}": kk})
    v.update(l_ptr=ptr, r_ptr=ptr, **lr)
    v.update(bias_ptr=ptr, lbias_ptr=ptr, out_ptr=ptr, stride_om=n, stride_on=1, M=m, N=n, R_TOT=rank * nseg,
             RANK=rank, l_scale=2.0 if nseg == 1 else 1.0, seed=1234567 if dropout else 0,
             p=0.1 if dropout else 0.0, keep_scale=1.0 / 0.9 if dropout else 1.0)
    return v


def _down_args(dt: str, *, rank: int, nseg: int, dropout: bool, a_transposed: bool = False) -> dict[str, Any]:
    """``_triton_launch.down``: forward ``xa = drop(x) A_catᵀ``, or (``a_transposed``) backward ``G_i = dy_i B_i``."""
    ptr, r_tot = "*" + dt, rank * nseg
    a_strides = dict(stride_ar=1, stride_ak=rank) if a_transposed else dict(stride_ar=_K, stride_ak=1)
    return dict(x_ptr=ptr, stride_xm=_K, stride_xk=1, a_ptr=ptr, **a_strides, out_ptr=ptr, stride_om=r_tot,
                stride_or=1, M=_M, K=_K, R_TOT=r_tot, RANK=rank, seed=1234567 if dropout else 0,
                p=0.1 if dropout else 0.0, out_scale=1.0 / 0.9 if dropout else 2.0)


def _da_args(dt: str, *, rank: int, nseg: int, dropout: bool) -> dict[str, Any]:
    """``_triton_launch.da``: dA partials from (x, G), or dBᵀ from (dy, xa_i) without dropout."""
    ptr, r_tot = "*" + dt, rank * nseg
    return dict(x_ptr=ptr, stride_xm=_K, stride_xk=1, g_ptr=ptr, stride_gm=r_tot, stride_gr=1, out_ptr="*fp32",
                stride_os=r_tot * _K, stride_or=_K, stride_ok=1, M=_M, K=_K, R_TOT=r_tot, RANK=rank,
                ROWS_PER_SPLIT=1024, seed=1234567 if dropout else 0, p=0.1 if dropout else 0.0,
                out_scale=1.0 / 0.9 if dropout else 2.0)


def _autotuner(kernel: str) -> Any:
    from peftfast.ops import _triton_launch as L

    return L._tuned({v: k for k, v in KERNELS.items()}[kernel])


def launcher_prune(kernel: str, configs: Sequence[Any], args: dict[str, Any], meta: dict[str, Any],
                   arch: int) -> list[Any]:
    """The configs the launcher's own autotuner prune keeps for these arguments on a GPU of ``arch``."""
    from unittest import mock

    from peftfast.ops import _triton_launch as L

    prune = _autotuner(kernel).early_config_prune
    named = {k: _Ptr(v) if isinstance(v, str) else v for k, v in args.items()}
    # the prune reads the current device's shared-memory limit; answer for the target instead
    with mock.patch.object(L, "_device_smem", lambda: L.SMEM_LIMIT[arch]), \
            mock.patch.object(L, "_device_arch", lambda: arch):
        return list(prune(list(configs), named, **meta))


def launcher_smem(job: Job) -> int:
    """The launcher's shared-memory estimate for this job's config, arguments and target."""
    import triton

    from peftfast.ops import _triton_launch as L

    cfg = triton.Config(dict(job.tiles), num_warps=job.num_warps, num_stages=job.num_stages)
    named = {k: _Ptr(v) if isinstance(v, str) else v for k, v in job.args.items()}
    name = {v: k for k, v in KERNELS.items()}[job.kernel]
    return L.launch_smem(name, cfg, named, job.meta, job.arch)


def _gemm_meta(num_in: int, nseg: int, dropout: bool, block_r: int, bias: bool = False, lbias: bool = False,
               accumulate: bool = False) -> dict[str, Any]:
    from peftfast.ops._triton_launch import GEMM_SUB_M

    return dict(NUM_IN=num_in, HAS_LORA=True, NSEG=nseg, HAS_DROPOUT=dropout, HAS_BIAS=bias, HAS_LBIAS=lbias,
                ACCUMULATE=accumulate, BLOCK_R=block_r, SUB_M=GEMM_SUB_M)


def _skinny_meta(nseg: int, dropout: bool, block_r: int) -> dict[str, Any]:
    return dict(NSEG=nseg, HAS_DROPOUT=dropout, BLOCK_R=block_r)


# (kernel, variant, constexprs, argument builder, dtypes); ranks: forward 16 (BLOCK_R 16) and 64 (the GEMM's
# largest BLOCK_R); q/k/v groups of rank 16 (skinny BLOCK_R 64) and 64 (skinny BLOCK_R 128, GEMM BLOCK_R 64)
_VARIANTS: list[tuple[str, str, dict[str, Any], Any, tuple[str, ...]]] = [
    ("_lora_gemm_kernel", "fwd", _gemm_meta(1, 1, False, 16, bias=True),
     lambda dt: _gemm_args(dt, num_in=1, rank=16, nseg=1, dropout=False), ("bf16", "fp16", "fp32")),
    ("_lora_gemm_kernel", "fwd-r64", _gemm_meta(1, 1, False, 64, bias=True, lbias=True),
     lambda dt: _gemm_args(dt, num_in=1, rank=64, nseg=1, dropout=False), ("bf16", "fp32")),
    ("_lora_gemm_kernel", "cublas-fwd", _gemm_meta(0, 1, False, 16, lbias=True, accumulate=True),
     lambda dt: _gemm_args(dt, num_in=0, rank=16, nseg=1, dropout=False), ("bf16",)),
    ("_lora_gemm_kernel", "dx-qkv", _gemm_meta(3, 3, False, 64),
     lambda dt: _gemm_args(dt, num_in=3, rank=64, nseg=3, dropout=False), ("bf16", "fp32")),
    ("_lora_gemm_kernel", "dx-qkv-dropout", _gemm_meta(3, 3, True, 64),
     lambda dt: _gemm_args(dt, num_in=3, rank=64, nseg=3, dropout=True), ("bf16", "fp32")),
    ("_lora_gemm_kernel", "cublas-dx-qkv-dropout", _gemm_meta(0, 3, True, 64, accumulate=True),
     lambda dt: _gemm_args(dt, num_in=0, rank=64, nseg=3, dropout=True), ("bf16",)),
    ("_lora_down_kernel", "fwd-qkv-dropout", _skinny_meta(3, True, 64),
     lambda dt: _down_args(dt, rank=16, nseg=3, dropout=True), ("bf16", "fp32")),
    ("_lora_down_kernel", "fwd-qkv-dropout-r64", _skinny_meta(3, True, 128),
     lambda dt: _down_args(dt, rank=64, nseg=3, dropout=True), ("bf16",)),
    ("_lora_down_kernel", "bwd-G", _skinny_meta(1, False, 16),
     lambda dt: _down_args(dt, rank=16, nseg=1, dropout=False, a_transposed=True), ("bf16",)),
    ("_lora_da_kernel", "dA-qkv-dropout", _skinny_meta(3, True, 64),
     lambda dt: _da_args(dt, rank=16, nseg=3, dropout=True), ("bf16", "fp32")),
    ("_lora_da_kernel", "dA-qkv-dropout-r64", _skinny_meta(3, True, 128),
     lambda dt: _da_args(dt, rank=64, nseg=3, dropout=True), ("bf16",)),
    ("_lora_da_kernel", "dB", _skinny_meta(1, False, 16),
     lambda dt: _da_args(dt, rank=16, nseg=1, dropout=False), ("bf16",)),
]
# fp32 also runs with ``ieee`` dots (torch's default, allow_tf32 off) for these variants
_IEEE_VARIANTS = {"fwd", "dx-qkv-dropout", "fwd-qkv-dropout", "dA-qkv-dropout"}
# left to the slow tier with every ieee variant and the dropout GEMMs on all but the smallest tile: BLOCK_R 128
# changes only the skinny kernels' small operand, whose 16-bit BLOCK_R 64 twins stay in the fast tier
_SLOW_VARIANTS = {"fwd-qkv-dropout-r64", "dA-qkv-dropout-r64"}


def plan(archs: Iterable[int] = ARCHS, kernels: Iterable[str] | None = None, tier: str = "all") -> list[Job]:
    """Every (kernel, variant, dtype, config, arch) compile of the AOT check; ``tier`` is fast, slow or all.

    Each variant covers the configs its launcher's autotuner keeps after pruning on that target (for 16-bit
    dtypes on sm_80/sm_90: all of them). The slow tier holds the GEMMs with a dropout epilogue on all but the
    smallest tile (10-60 s of ptxas each), the ``ieee`` fp32 variants and the skinny kernels at BLOCK_R 128.
    """
    wanted = {KERNELS[k] for k in (kernels or KERNELS)}
    gemm_configs = _autotuner("_lora_gemm_kernel").configs
    smallest_gemm = min(gemm_configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    jobs: list[Job] = []
    for arch in archs:
        for kernel, variant, meta0, make_args, dtypes in _VARIANTS:
            if kernel not in wanted:
                continue
            configs = _autotuner(kernel).configs  # the list the launcher's autotuner actually tries
            for dtype in dtypes:
                for prec in ("tf32", "ieee") if dtype == "fp32" and variant in _IEEE_VARIANTS else ("tf32",):
                    meta = {**meta0, "DOT_PRECISION": prec}
                    if kernel == "_lora_gemm_kernel":
                        meta["LORA_PRECISION"] = prec
                    args = make_args(dtype)
                    name = f"{variant}-ieee" if prec == "ieee" else variant
                    for cfg in launcher_prune(kernel, configs, args, meta, arch):
                        big_dropout_gemm = (kernel == "_lora_gemm_kernel" and meta["HAS_DROPOUT"]
                                            and cfg is not smallest_gemm)
                        slow = big_dropout_gemm or prec == "ieee" or variant in _SLOW_VARIANTS
                        if tier == "all" or (tier == "slow") == slow:
                            jobs.append(Job(kernel, name, dtype, arch, dict(cfg.kwargs), cfg.num_warps,
                                            cfg.num_stages, meta, args, slow))
    return jobs


# ------------------------------------------------------------------------------------------------------------
# compiling (worker side)
# ------------------------------------------------------------------------------------------------------------
def _specialise(fn: Any, values: dict[str, Any], constexprs: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attrs as ``JITFunction.run`` derives them from these argument values."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature: dict[str, str] = {}
    consts: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    missing = [p.name for p in fn.params if p.name not in values and p.name not in constexprs]
    extra = set(values) - {p.name for p in fn.params}
    if missing or extra:
        raise TypeError(f"{fn.__name__}: argument builder out of date (missing {missing}, unknown {sorted(extra)})")
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            consts[name] = constexprs[name]
            continue
        val = values[name]
        if isinstance(val, str):  # a pointer; torch allocations are >= 256-byte aligned
            ty, spec = val, "D"
        else:
            ty, spec = native_specialize_impl(BaseBackend, val, False, not param.do_not_specialize,
                                              not param.do_not_specialize_on_alignment)
        signature[name] = ty
        if ty == "constexpr":  # integers equal to 1 (unit strides) become compile-time constants
            consts[name] = spec
        elif spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, consts, attrs


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers and stack bytes per thread (the stack holds ptxas' spills) from ``cuobjdump``."""
    from triton import knobs

    try:
        tool = knobs.nvidia.cuobjdump.path
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 timeout=60).stdout
    except Exception:  # pragma: no cover - informational only; depends on the Triton install
        return {}
    usage = {}
    for tok in out.split():
        for field, key in (("REG:", "regs"), ("STACK:", "stack_bytes")):
            if tok.startswith(field) and tok[len(field):].isdigit():
                usage[key] = int(tok[len(field):])
    return usage


KERNEL_MODULES = ("lora", "adapter", "mlp", "norm", "cross_entropy", "rope", "attention", "nf4", "moe")


def kernel_function(name: str) -> Any:
    """The ``@triton.jit`` function ``name`` from whichever ``peftfast.kernels`` module defines it."""
    import importlib

    for mod in KERNEL_MODULES:
        try:
            module = importlib.import_module(f"peftfast.kernels.{mod}")
        except ModuleNotFoundError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise KeyError(f"no kernel {name!r} in peftfast.kernels.{{{','.join(KERNEL_MODULES)}}}")


def compile_job(job: Job) -> dict[str, Any]:
    """Compile one job for its target in this process (which must not have TRITON_INTERPRET set)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel_function(job.kernel)
    if not isinstance(fn, JITFunction):
        raise RuntimeError("peftfast.kernels were imported with TRITON_INTERPRET set; compile in a subprocess "
                           "(peftfast.testing.aot.run does) or unset TRITON_INTERPRET")
    signature, consts, attrs = _specialise(fn, job.args, {**job.tiles, **job.meta})
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", job.arch, 32),
                              options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    seconds = time.perf_counter() - t0
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    return {
        "shared": int(compiled.metadata.shared),
        "cubin_bytes": len(cubin),
        "ptx_target": next((ln.split()[1] for ln in ptx.splitlines() if ln.startswith(".target")), None),
        "mma_sync": "mma.sync" in ptx,
        "wgmma": "wgmma.mma_async" in ptx,
        "seconds": seconds,
        **_resource_usage(cubin),
    }


def _result(job: Job, **fields: Any) -> dict[str, Any]:
    return {"key": job.key, "kernel": job.kernel, "variant": job.variant, "dtype": job.dtype, "arch": job.arch,
            "config": job.config, "expected": job.expected_tensor_cores(), "error": None, **fields}


def _worker() -> None:
    """Read one JSON job per line from stdin; answer each with one marked JSON line on stdout."""
    while line := sys.stdin.readline():
        job = Job(**json.loads(line))
        try:
            res = _result(job, **compile_job(job))
        except Exception as exc:  # reported per job, so one broken config does not hide the others
            res = _result(job, error=f"{type(exc).__name__}: {exc}"[-4000:])
        sys.stdout.write(_MARK + json.dumps(res) + "\n")
        sys.stdout.flush()


# ------------------------------------------------------------------------------------------------------------
# driving workers (caller side)
# ------------------------------------------------------------------------------------------------------------
def run(jobs: Sequence[Job], workers: int | None = None, cache_dir: str | None = None,
        job_timeout: float = 600.0) -> list[dict[str, Any]]:
    """Compile ``jobs`` in ``workers`` subprocesses (default: one per core); one result dict per job, in order.

    Workers pull jobs from a shared queue, so a few slow compiles do not idle the other cores. They run without
    ``TRITON_INTERPRET``; ``cache_dir`` sets their ``TRITON_CACHE_DIR`` (default: Triton's own cache, so repeated
    runs only recompile what changed).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = cache_dir
    n = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    todo: queue.Queue[int] = queue.Queue()
    for i in sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i])):  # long compiles first: a shorter tail
        todo.put(i)
    results: list[dict[str, Any] | None] = [None] * len(jobs)

    def spawn(log: Any) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "peftfast.testing.aot", "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env)

    def drive() -> None:
        with tempfile.TemporaryFile(mode="w+") as log:
            proc = spawn(log)
            try:
                while True:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    if proc.poll() is not None:  # the previous compile killed the worker: carry on with a new one
                        proc = spawn(log)
                    try:
                        proc.stdin.write(json.dumps(dataclasses.asdict(jobs[i])) + "\n")
                        proc.stdin.flush()
                    except OSError:
                        pass  # the worker died; _answer reports its stderr
                    results[i] = _answer(proc, jobs[i], log, job_timeout)
            finally:
                if proc.poll() is None:
                    proc.stdin.close()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()

    threads = [threading.Thread(target=drive, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r if r is not None else _result(jobs[i], error="not run") for i, r in enumerate(results)]


def _cost(job: Job) -> float:
    """Rough relative compile time: ptxas time grows with the unrolled Philox epilogue and the tile area."""
    t = job.tiles
    area = t.get("BLOCK_M", 64) * t.get("BLOCK_N", t.get("BLOCK_K", 64)) / 4096
    dropout = 8.0 if job.meta.get("HAS_DROPOUT") and job.kernel == "_lora_gemm_kernel" else 1.0
    return area * dropout * (2.0 if job.meta.get("DOT_PRECISION") == "ieee" else 1.0)


def _answer(proc: subprocess.Popen, job: Job, log: Any, timeout: float) -> dict[str, Any]:
    box: list[str] = []

    def read() -> None:
        while line := proc.stdout.readline():
            if line.startswith(_MARK):
                box.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        proc.kill()
        reader.join()
        return _result(job, error=f"compile exceeded {timeout:.0f} s")
    if box:
        return json.loads(box[0][len(_MARK):])
    log.seek(0)
    return _result(job, error=f"worker exited with {proc.wait()}: {log.read()[-4000:]}")


def tensor_cores(res: dict[str, Any]) -> str:
    """``wgmma``, ``mma.sync`` or ``none``: the tensor-core instruction a compiled kernel uses."""
    return "wgmma" if res.get("wgmma") else "mma.sync" if res.get("mma_sync") else "none"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown table of compile results."""
    head = ["kernel", "variant", "dtype", "config", "arch", "shared KB", "tensor cores", "regs", "stack B",
            "compile s"]
    rows = []
    for r in results:
        if r["error"]:
            rows.append([r["kernel"], r["variant"], r["dtype"], r["config"], f"sm_{r['arch']}", "-",
                         "ERROR: " + r["error"].strip().splitlines()[-1][:80], "-", "-", "-"])
        else:
            rows.append([r["kernel"], r["variant"], r["dtype"], r["config"], f"sm_{r['arch']}",
                         f"{r['shared'] / 1024:.1f}", tensor_cores(r), str(r.get("regs", "?")),
                         str(r.get("stack_bytes", "?")), f"{r['seconds']:.1f}"])
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    lines = [fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [fmt.format(*row) for row in rows])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: compile the plan and print a table (or JSON); exit status 1 if any compile failed."""
    ap = argparse.ArgumentParser(prog="python -m peftfast.testing.aot", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append", choices=ARCHS, help="target(s); default: all")
    ap.add_argument("--kernel", action="append", choices=tuple(KERNELS), help="kernel(s); default: all")
    ap.add_argument("--tier", choices=("fast", "slow", "all"), default="all", help="which test tier (default all)")
    ap.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    ap.add_argument("--workers", type=int, default=None, help="parallel compiler processes (default: one per core)")
    ap.add_argument("--use-cache", action="store_true",
                    help="reuse Triton's kernel cache (default: a fresh one, so compile times are real)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker()
        return 0
    jobs = plan(args.arch or ARCHS, args.kernel, args.tier)
    tmp = None if args.use_cache else tempfile.mkdtemp(prefix="peftfast-aot-")
    try:
        t0 = time.perf_counter()
        results = run(jobs, args.workers, cache_dir=tmp)
        wall = time.perf_counter() - t0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(format_table(results))
        print(f"\n{len(results)} compiles, {sum(bool(r['error']) for r in results)} errors, {wall:.0f} s wall")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
