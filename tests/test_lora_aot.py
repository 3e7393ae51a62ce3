"""Every Triton kernel config peftfast can launch compiles for real GPUs (sm_80 A100, sm_90 H100), without a GPU.

``peftfast.testing.aot`` compiles each (kernel, variant, dtype, autotune config, arch) to PTX and a cubin in worker
subprocesses (the suite runs the kernels in the interpreter, which cannot compile). Per compile we check: a cubin
for the right target, shared memory within what the GPU can give one block (so the autotuner never meets
OutOfResources), and tensor-core instructions (``mma.sync``; ``wgmma`` on sm_90 where the tile shape allows).

The default tier compiles every autotune config of every kernel in 16-bit and fp32 (TF32) variants, in about
two minutes on two cores. The GEMM's dropout epilogue on all but the smallest tile takes 10-60 s of ptxas per
compile, so those compiles, the ``ieee`` fp32 variants and the skinny kernels at BLOCK_R 128 run with
``pytest -m slow``. Compiles go through Triton's cache, so re-runs only recompile what changed.
"""

import pytest

from peftfast.ops import _triton_launch as L
from peftfast.testing import aot

# shared memory one block may opt into: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB (CUDA programming guide)
HW_SMEM = {80: 163 * 1024, 90: 227 * 1024}
FAST = aot.plan(tier="fast")
SLOW = aot.plan(tier="slow")


def _id(job: aot.Job) -> str:
    return f"{job.kernel[6:-7]}-{job.variant}-{job.dtype}-{job.config.replace(' ', '_')}-sm{job.arch}"


def _compile(jobs: list[aot.Job]) -> dict[str, dict]:
    results = aot.run(jobs)
    return {r["key"]: r for r in results}


@pytest.fixture(scope="module")
def fast_results() -> dict[str, dict]:
    return _compile(FAST)


@pytest.fixture(scope="module")
def slow_results() -> dict[str, dict]:
    return _compile(SLOW)


def _check(job: aot.Job, res: dict) -> None:
    assert res["error"] is None, res["error"]
    assert res["cubin_bytes"] > 0
    assert res["ptx_target"] == ("sm_90a" if job.arch == 90 else f"sm_{job.arch}")
    limit = HW_SMEM[job.arch]
    assert res["shared"] <= limit, (
        f"{job.key} needs {res['shared']} B ({res['shared'] / 1024:.0f} KB) of shared memory; "
        f"sm_{job.arch} allows {limit} B ({limit // 1024} KB) per block"
    )
    if job.kernel == "_lora_gemm_kernel" and "dropout" in job.variant and job.dtype == "bf16":
        # the masked low-rank epilogue runs over row slabs: at most 296 B of register spills a thread (BM128 BN256
        # w8 on sm_80); as one whole-tile pass next to the accumulator it spilled up to 10 KB
        assert res.get("stack_bytes", 0) <= 320, f"{job.key}: {res.get('stack_bytes')} B of register spills"
    want, got = job.expected_tensor_cores(), aot.tensor_cores(res)
    if want == "wgmma":
        assert res["wgmma"], f"{job.key}: expected wgmma on sm_90, PTX uses {got}"
    elif want == "mma.sync" and job.arch >= 90:
        assert res["wgmma"] or res["mma_sync"], f"{job.key}: no tensor-core MMA in the PTX"
    elif want == "mma.sync":
        assert res["mma_sync"] and not res["wgmma"], f"{job.key}: expected mma.sync, PTX uses {got}"
    else:  # ieee fp32: a tensor-core MMA would round the inputs to TF32
        assert not res["wgmma"] and not res["mma_sync"], f"{job.key}: ieee precision compiled to {got}"


@pytest.mark.parametrize("job", FAST, ids=_id)
def test_kernel_config_compiles(job: aot.Job, fast_results: dict[str, dict]) -> None:
    _check(job, fast_results[job.key])


@pytest.mark.slow
@pytest.mark.parametrize("job", SLOW, ids=_id)
def test_kernel_config_compiles_slow_tier(job: aot.Job, slow_results: dict[str, dict]) -> None:
    _check(job, slow_results[job.key])


def _configs(configs) -> set[str]:
    return {aot.Job("", "", "", 0, dict(c.kwargs), c.num_warps, c.num_stages, {}, {}).config for c in configs}


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_plan_covers_every_config(arch: int) -> None:
    """Each 16-bit variant compiles every autotune config; fp32 ones exactly what the launcher's prune keeps."""
    jobs = [j for j in FAST + SLOW if j.arch == arch]
    assert len({j.key for j in FAST + SLOW}) == len(FAST) + len(SLOW)
    lists = {"_lora_gemm_kernel": L.GEMM_CONFIGS, "_lora_down_kernel": L.DOWN_CONFIGS,
             "_lora_da_kernel": L.DA_CONFIGS}
    required = {  # the launch paths: forward, backward dx (fused and cuBLAS strategy), xa / G, dA / dB
        "_lora_gemm_kernel": {"fwd", "fwd-r64", "cublas-fwd", "dx-qkv", "dx-qkv-dropout", "cublas-dx-qkv-dropout"},
        "_lora_down_kernel": {"fwd-qkv-dropout", "fwd-qkv-dropout-r64", "bwd-G"},
        "_lora_da_kernel": {"dA-qkv-dropout", "dA-qkv-dropout-r64", "dB"},
    }
    for kernel, variants in required.items():
        for variant in variants:
            got = {j.config for j in jobs if j.kernel == kernel and j.variant == variant and j.dtype == "bf16"}
            assert got == _configs(lists[kernel]), (kernel, variant)
    fwd16 = {j.config for j in jobs if j.kernel == "_lora_gemm_kernel" and j.variant == "fwd" and j.dtype == "fp16"}
    assert fwd16 == _configs(L.GEMM_CONFIGS)
    for job in jobs:
        if job.dtype == "fp32":
            kept = aot.launcher_prune(job.kernel, lists[job.kernel], job.args, job.meta, arch)
            assert job.config in _configs(kept)
    for kernel in lists:  # fp32 is covered too, on every target
        assert any(j.kernel == kernel and j.dtype == "fp32" for j in jobs), kernel


def test_launcher_prune_uses_the_target_limit() -> None:
    """The prune the plan borrows from the launcher depends on the target's shared memory, as on a real GPU."""
    args = dict(FAST[0].args)
    meta = next(j.meta for j in FAST if j.kernel == "_lora_gemm_kernel" and j.variant == "fwd")
    for key in ("p0_ptr", "q0_ptr", "out_ptr"):
        args[key] = "*fp32"
    kept86 = aot.launcher_prune("_lora_gemm_kernel", L.GEMM_CONFIGS, args, meta, 86)  # 99 KB per block
    kept90 = aot.launcher_prune("_lora_gemm_kernel", L.GEMM_CONFIGS, args, meta, 90)
    assert 0 < len(kept86) < len(kept90) <= len(L.GEMM_CONFIGS)


def test_launcher_estimate_bounds_compiled_shared_memory(fast_results: dict[str, dict]) -> None:
    """The prune's estimate is never below what the compiler allocates, so no kept config can run out of it."""
    under = [f"{job.key}: estimate {aot.launcher_smem(job)} < compiled {fast_results[job.key]['shared']}"
             for job in FAST if aot.launcher_smem(job) < fast_results[job.key]["shared"]]
    assert not under, "\n".join(under)


def test_compile_refuses_interpreter_functions() -> None:
    """In this process the kernels are interpreter functions: compiling them in-process must fail loudly."""
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_job(FAST[0])


def test_table_lists_every_result(fast_results: dict[str, dict]) -> None:
    table = aot.format_table(list(fast_results.values())).splitlines()
    assert len(table) == len(fast_results) + 2
    assert all(("wgmma" in row) == bool(fast_results[key].get("wgmma")) for row, key in zip(table[2:], fast_results))
