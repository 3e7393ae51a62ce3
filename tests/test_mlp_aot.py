"""The LoRA-MLP's Triton kernels (element-wise activation, gate/up GEMM with the activation epilogue) compile for
sm_80 and sm_90 (no GPU needed)."""

from unittest import mock

import pytest
import triton

from peftfast.ops import mlp as M
from peftfast.testing import aot


def _plan() -> list[aot.Job]:
    jobs = []
    for arch in aot.ARCHS:
        for dt in ("bf16", "fp16", "fp32"):
            for act in M.GATE_ACTS.values():
                p = "*" + dt
                # a packed [g | u] of 2**20 rows x 2 x 14336: row offsets pass 2**31 elements (int64 rows)
                fwd = dict(g_ptr=p, sg=28672, u_ptr=p, su=28672, h_ptr=p, sh=14336, cols=14336)
                bwd = dict(dh_ptr=p, sdh=14336, g_ptr=p, sg=28672, u_ptr=p, su=28672, dg_ptr=p, sdg=28672, du_ptr=p,
                           sdu=28672, cols=14336)
                for kernel, args in (("_act_mul_fwd_kernel", fwd), ("_act_mul_bwd_kernel", bwd)):
                    jobs.append(aot.Job(kernel, f"act{act}", dt, arch, {"BLOCK": M._BLOCK}, 4, 1,
                                        {"ACT": act, "DOT_PRECISION": "tf32"}, args))
    return jobs


PLAN = _plan()


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {r["key"]: r for r in aot.run(PLAN)}


@pytest.mark.parametrize("job", PLAN, ids=lambda j: f"{j.kernel[9:-7]}-{j.variant}-{j.dtype}-sm{j.arch}")
def test_act_kernels_compile(job: aot.Job, results: dict[str, dict]) -> None:
    res = results[job.key]
    assert res["error"] is None, res["error"]
    assert res["ptx_target"] == ("sm_90a" if job.arch == 90 else f"sm_{job.arch}")
    assert res["shared"] <= 48 * 1024


def test_unknown_kernel_name() -> None:
    with pytest.raises(KeyError, match="no kernel '_nope'"):
        aot.kernel_function("_nope")


# ----------------------------------------------------------------------------------------------------------------
# gate/up GEMM with the LoRA and the gated activation in its epilogue (_lora_gate_up_act_kernel)
# ----------------------------------------------------------------------------------------------------------------
HW_SMEM = {80: 163 * 1024, 90: 227 * 1024}
_M, _K, _I, _R = 8192, 4096, 11008, 16  # Llama-7B MLP at 8192 tokens, LoRA rank 16


def _gate_up_args(dt: str) -> dict:
    p = "*" + dt
    return dict(x_ptr=p, stride_xm=_K, stride_xk=1, wg_ptr=p, stride_wgn=_K, stride_wgk=1, wu_ptr=p, stride_wun=_K,
                stride_wuk=1, xag_ptr=p, xau_ptr=p, stride_xam=2 * _R, stride_xar=1, bg_ptr=p, stride_bgn=_R,
                stride_bgr=1, bu_ptr=p, stride_bun=_R, stride_bur=1, biasg_ptr=p, biasu_ptr=p, lbiasg_ptr=p,
                lbiasu_ptr=p, g_ptr=p, u_ptr=p, h_ptr=p, stride_om=_I, stride_on=1, M=_M, N=_I, K=_K, RANK=_R,
                scale_g=2.0, scale_u=0.5)


def _gate_up_kept(dt: str, meta: dict, arch: int) -> list:
    """The configs the launcher's prune keeps on ``arch`` (it asks the device for its limit: answer for arch)."""
    from peftfast.ops import _triton_launch as L

    named = {k: aot._Ptr(v) if isinstance(v, str) else v for k, v in _gate_up_args(dt).items()}
    with mock.patch.object(L, "_device_smem", lambda: L.SMEM_LIMIT[arch]), \
            mock.patch.object(L, "_device_arch", lambda: arch):
        return M._prune_gate_up(list(M.GATE_UP_CONFIGS), named, **meta)


def _gate_up_plan() -> list[aot.Job]:
    """Every config the autotuner may try, per target: bf16 (silu) and fp32/TF32 (gelu_tanh), all biases on;
    erf-GELU and fp16 (the same code as bf16 in the main loop) on the smallest tile."""
    jobs = []
    for arch in aot.ARCHS:
        for dt, act, only_smallest in (("bf16", 0, False), ("fp32", 2, False), ("fp16", 1, True)):
            meta = dict(ACT=act, HAS_BIAS_G=True, HAS_BIAS_U=True, HAS_LBIAS_G=True, HAS_LBIAS_U=False, BLOCK_R=16,
                        DOT_PRECISION="tf32", LORA_PRECISION="tf32")
            kept = _gate_up_kept(dt, meta, arch)
            if only_smallest:
                kept = [min(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
            for c in kept:
                jobs.append(aot.Job("_lora_gate_up_act_kernel", f"act{act}", dt, arch, dict(c.kwargs), c.num_warps,
                                    c.num_stages, meta, _gate_up_args(dt)))
    return jobs


GATE_UP_PLAN = _gate_up_plan()


@pytest.fixture(scope="module")
def gate_up_results() -> dict[str, dict]:
    return {r["key"]: r for r in aot.run(GATE_UP_PLAN)}


@pytest.mark.parametrize("job", GATE_UP_PLAN, ids=lambda j: f"{j.variant}-{j.dtype}-{j.config.replace(' ', '_')}-"
                                                            f"sm{j.arch}")
def test_gate_up_act_kernel_compiles(job: aot.Job, gate_up_results: dict[str, dict]) -> None:
    res = gate_up_results[job.key]
    assert res["error"] is None, res["error"]
    assert res["ptx_target"] == ("sm_90a" if job.arch == 90 else f"sm_{job.arch}")
    assert res["shared"] <= HW_SMEM[job.arch], (job.key, res["shared"])
    cfg = triton.Config(dict(job.tiles), num_warps=job.num_warps, num_stages=job.num_stages)
    named = {k: aot._Ptr(v) if isinstance(v, str) else v for k, v in job.args.items()}
    estimate = M.gate_up_smem(cfg, named, job.meta, job.arch)
    assert estimate >= res["shared"], f"{job.key}: launcher estimate {estimate} < compiled {res['shared']}"
    if job.arch == 90 and "stack_bytes" in res:  # Hopper: two accumulators in registers without spilling
        assert res["stack_bytes"] == 0, f"{job.key} spills {res['stack_bytes']} B a thread"
    want = job.expected_tensor_cores()
    if want == "wgmma":
        assert res["wgmma"], f"{job.key}: expected wgmma, PTX uses {aot.tensor_cores(res)}"
    else:
        assert want == "mma.sync" and res["mma_sync"], f"{job.key}: no mma.sync in the PTX"


def test_gate_up_plan_covers_every_config() -> None:
    """16-bit dtypes compile every config on both targets; fp32 what the prune keeps, and it keeps some."""
    every = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
             for c in M.GATE_UP_CONFIGS}
    for arch in aot.ARCHS:
        for dt in ("bf16", "fp32"):
            got = {(j.tiles["BLOCK_M"], j.tiles["BLOCK_N"], j.tiles["BLOCK_K"], j.num_warps, j.num_stages)
                   for j in GATE_UP_PLAN if j.arch == arch and j.dtype == dt}
            assert got == every if dt == "bf16" else 0 < len(got) <= len(every), (arch, dt, got)
