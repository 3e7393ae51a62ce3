"""The fused Adapter kernels compile for sm_80 and sm_90 at every autotune config the launcher keeps, use tensor
cores and fit shared memory (see ``tests/test_lora_aot.py`` for the machinery)."""

import pytest
import triton

from peftfast.ops import adapter as A
from peftfast.testing import aot

HW_SMEM = {80: 163 * 1024, 90: 227 * 1024}
M, K = 8192, 4096


def _args(kernel: str, dt: str, h: int) -> dict:
    ptr = "*" + dt
    if kernel == "_adapter_fwd_kernel":
        return dict(x_ptr=ptr, stride_xm=K, stride_xk=1, res_ptr=ptr, stride_resm=K, stride_resn=1, wd_ptr=ptr,
                    stride_wdh=K, stride_wdk=1, bd_ptr=ptr, wu_ptr=ptr, stride_wun=h, stride_wuh=1, bu_ptr=ptr,
                    z_ptr=ptr, stride_zm=h, stride_zh=1, out_ptr=ptr, stride_om=K, stride_on=1, M=M, K=K, N=K, H=h,
                    scale_ptr="*fp32")
    return dict(g_ptr=ptr, stride_gm=K, stride_gn=1, z_ptr=ptr, stride_zm=h, stride_zh=1, wd_ptr=ptr, stride_wdh=K,
                stride_wdk=1, wu_ptr=ptr, stride_wun=h, stride_wuh=1, dz_ptr=ptr, stride_dzm=h, stride_dzh=1,
                a_ptr=ptr, stride_am=h, stride_ah=1, dx_ptr=ptr, stride_dxm=K, stride_dxk=1, ds_ptr="*fp32",
                M=M, K=K, N=K, H=h, scale_ptr="*fp32")


def _meta(kernel: str, h: int) -> dict:
    common = dict(ACT=1, BLOCK_H=h, DOT_PRECISION="tf32")
    if kernel == "_adapter_fwd_kernel":
        return dict(HAS_BD=True, HAS_BU=True, **common)
    return dict(ADD_G=True, NEED_DX=True, NEED_DS=True, **common)


def _kept(kernel: str, dt: str, h: int, arch: int) -> list[triton.Config]:
    from unittest import mock

    from peftfast.ops import _triton_launch as L

    named = {k: aot._Ptr(v) if isinstance(v, str) else v for k, v in _args(kernel, dt, h).items()}
    with mock.patch.object(L, "_device_smem", lambda: L.SMEM_LIMIT[arch]), \
            mock.patch.object(L, "_device_arch", lambda: arch):
        return A._prune(list(A.ADAPTER_CONFIGS), named, **_meta(kernel, h))


def _plan() -> list[aot.Job]:
    jobs = []
    for arch in aot.ARCHS:
        for kernel in ("_adapter_fwd_kernel", "_adapter_bwd_kernel"):
            for dt, hs in (("bf16", (64, 256)), ("fp32", (64,))):
                for h in hs:
                    for cfg in _kept(kernel, dt, h, arch):
                        jobs.append(aot.Job(kernel, f"H{h}", dt, arch, dict(cfg.kwargs), cfg.num_warps,
                                            cfg.num_stages, _meta(kernel, h), _args(kernel, dt, h)))
    return jobs


PLAN = _plan()


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {r["key"]: r for r in aot.run(PLAN)}


@pytest.mark.parametrize("job", PLAN, ids=lambda j: f"{j.kernel[9:-7]}-{j.variant}-{j.dtype}-{j.config}-sm{j.arch}")
def test_adapter_kernel_compiles(job: aot.Job, results: dict[str, dict]) -> None:
    res = results[job.key]
    assert res["error"] is None, res["error"]
    assert res["ptx_target"] == ("sm_90a" if job.arch == 90 else f"sm_{job.arch}")
    assert res["shared"] <= HW_SMEM[job.arch], f"{job.key}: {res['shared']} B of shared memory"
    assert res["mma_sync"] or res["wgmma"], f"{job.key}: no tensor-core MMA"
    if job.arch == 90 and job.expected_tensor_cores() == "wgmma":
        assert res["wgmma"], f"{job.key}: expected wgmma on sm_90"


def test_launcher_estimate_bounds_compiled_shared_memory(results: dict[str, dict]) -> None:
    for job in PLAN:
        est = A.smem_estimate(triton.Config(job.tiles, num_warps=job.num_warps, num_stages=job.num_stages),
                              aot._ELT[job.dtype], job.meta["BLOCK_H"], job.arch, "ADD_G" in job.meta)
        assert est >= results[job.key]["shared"], job.key


def test_every_16bit_config_is_kept_and_wide_bottlenecks_prune_big_tiles() -> None:
    for arch in aot.ARCHS:
        assert len(_kept("_adapter_fwd_kernel", "bf16", 64, arch)) == len(A.ADAPTER_CONFIGS)
        for kernel in ("_adapter_fwd_kernel", "_adapter_bwd_kernel"):
            wide = _kept(kernel, "bf16", 256, arch)
            assert wide and all(c.kwargs["BLOCK_M"] * 256 <= 64 * 256 for c in wide)
            assert len(wide) < len(A.ADAPTER_CONFIGS)
