"""The MoE experts' grouped Triton kernels compile for sm_80 and sm_90 (no GPU needed), with the configurations the
launcher picks on a GPU for Qwen3-30B-A3B's expert shapes (hidden 2048, expert intermediate 768, 128 experts, r=16),
fit shared memory without spilling, and use tensor cores (none under fp32 ``ieee`` products)."""

from unittest import mock

import pytest

from peftfast.ops import moe as M
from peftfast.testing import aot

HW_SMEM = {80: 163 * 1024, 90: 227 * 1024}
_S, _H, _I, _E, _R = 32768, 2048, 768, 128, 16  # 4096 tokens x top-8


def _gpu_config(fn, *args) -> dict:
    with mock.patch.object(M, "interpreting", lambda: False):
        return fn(*args)


def _gemm_args(p: str, n: int, k: int) -> dict:
    """x [S or T, k], w3 [E, n, k] (row-major expert stacks), L [S, r], PEFT's lora_B read as [E, n, r]."""
    return dict(x_ptr=p, stride_xm=k, stride_xk=1, gather_ptr="*i64", w_ptr=p, stride_we=n * k, stride_wn=k,
                stride_wk=1, l_ptr=p, stride_lm=_R, stride_lr=1, r_ptr=p, stride_re=1, stride_rn=_R * _E,
                stride_rr=_E, out_ptr=p, stride_om=n, stride_on=1, tile_expert_ptr="*i64", tile_row_ptr="*i64",
                tile_end_ptr="*i64", N=n, K=k, RANK=_R, scale=2.0)


def _wgrad_args(p: str, ni: int, n: int) -> dict:
    return dict(p_ptr=p, stride_pm=ni, stride_pi=1, q_ptr=p, stride_qm=n, stride_qn=1, gather_ptr="*i64",
                bounds_ptr="*i64", out_ptr="*fp32", stride_oe=ni * n, stride_oi=n, stride_on=1, NI=ni, N=n, scale=2.0)


# (variant, N, K, GATHER, HAS_LORA): the gate/up GEMM, the down GEMM, a rank-r product (x·A_guᵀ, dy·B_d)
GEMMS = [("gate_up", 2 * _I, _H, True, True), ("down", _H, _I, False, True), ("rank", _R, _H, True, False),
         ("dx", _H, 2 * _I, False, True)]
# (variant, NI, N, GATHER): dB_gu [E, 2I, r], dA_gu [E, r, H] (x gathered), a trainable down stack [E, H, I]
WGRADS = [("dB", 2 * _I, _R, False), ("dA", _R, _H, True), ("dW", _H, _I, False)]


def _plan() -> list[aot.Job]:
    """16-bit dtypes; fp32 with TF32 (torch's allow_tf32) and with IEEE products (the launcher's default for fp32,
    as torch's own matmul: no tensor cores)."""
    import torch

    jobs = []
    for arch in aot.ARCHS:
        for dt, torch_dt, prec in (("bf16", torch.bfloat16, "tf32"), ("fp16", torch.float16, "tf32"),
                                   ("fp32", torch.float32, "tf32"), ("fp32", torch.float32, "ieee")):
            p = "*" + dt
            for variant, n, k, gather, lora in GEMMS:
                cfg = _gpu_config(M._gemm_config, n, torch_dt)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                tiles = {"BLOCK_M": 64, **cfg}
                meta = dict(GATHER=gather, HAS_LORA=lora, BLOCK_R=16, DOT_PRECISION=prec, LORA_PRECISION=prec)
                jobs.append(aot.Job("_moe_grouped_gemm_kernel", f"{variant}-{prec}", dt, arch, tiles, warps, stages,
                                    meta, _gemm_args(p, n, k)))
            for variant, ni, n, gather in WGRADS:
                cfg = _gpu_config(M._wgrad_config, ni, n, torch_dt)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                jobs.append(aot.Job("_moe_grouped_wgrad_kernel", f"{variant}-{prec}", dt, arch, cfg, warps, stages,
                                    dict(GATHER=gather, DOT_PRECISION=prec), _wgrad_args(p, ni, n)))
    return jobs


PLAN = _plan()


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {r["key"]: r for r in aot.run(PLAN)}


@pytest.mark.parametrize("job", PLAN, ids=lambda j: f"{j.kernel[12:-7]}-{j.variant}-{j.dtype}-sm{j.arch}")
def test_moe_kernels_compile_with_tensor_cores(job: aot.Job, results: dict[str, dict]) -> None:
    res = results[job.key]
    assert res["error"] is None, res["error"]
    assert res["ptx_target"] == ("sm_90a" if job.arch == 90 else f"sm_{job.arch}")
    assert res["shared"] <= HW_SMEM[job.arch], (job.key, res["shared"])
    if "stack_bytes" in res:
        assert res["stack_bytes"] == 0, f"{job.key} spills {res['stack_bytes']} B a thread"
    if job.meta["DOT_PRECISION"] == "ieee":  # fp32 products exact to IEEE: tensor cores would round to TF32
        assert not res["mma_sync"] and not res["wgmma"], f"{job.key}: tensor cores under ieee"
        return
    assert res["mma_sync"] or res["wgmma"], f"{job.key}: no tensor-core instruction in the PTX"
    if job.arch == 90 and job.kernel == "_moe_grouped_gemm_kernel" and not job.variant.startswith("rank"):
        assert res["wgmma"], f"{job.key}: a 64-row tile with 4 warps should use wgmma on sm_90"


def test_launcher_configs_are_the_planned_ones() -> None:
    """The plan reads the launcher's GPU choices: wide products get wide tiles, rank-r ones 16-wide."""
    import torch

    assert _gpu_config(M._gemm_config, 2 * _I, torch.bfloat16)["BLOCK_N"] == 128
    assert _gpu_config(M._gemm_config, _R, torch.bfloat16)["BLOCK_N"] == 16
    assert _gpu_config(M._wgrad_config, _R, _H, torch.bfloat16)["BLOCK_I"] == 16
    assert _gpu_config(M._wgrad_config, _H, _I, torch.float32)["BLOCK_N"] == 32
    assert M._block_m() == 16  # the interpreter's (these tests run with TRITON_INTERPRET=1)
    with mock.patch.object(M, "interpreting", lambda: False):
        assert M._block_m() == 64
