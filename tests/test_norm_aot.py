"""The norm kernels compile for sm_80 and sm_90 at the config the launcher picks for each hidden size (768, 2048,
4096, 8192, and 16384, whose rows are swept in chunks), bf16 and fp32, within shared memory and without register
spills (see ``tests/test_lora_aot.py`` for the machinery). Norms have no dot, so no tensor-core check."""

import pytest

from peftfast.ops import norm as N
from peftfast.testing import aot

HW_SMEM = {80: 163 * 1024, 90: 227 * 1024}
M = 8192
HIDDEN = (768, 2048, 4096, 8192, 16384)


def _rows(prefix: str, dt: str, n: int) -> dict:
    return {f"{prefix}_ptr": "*" + dt, f"stride_{prefix}m": n}


def _args(kernel: str, dt: str, n: int, wdt: str | None = None) -> dict:
    """Arguments as the launchers pass them for contiguous [M, n] tensors; every optional operand present
    (``wdt``: the weight's dtype where it differs, Cohere's fp32 weight under a bf16 input)."""
    ptr = "*" + dt
    if kernel == "_rms_norm_fwd_kernel":
        return dict(**_rows("x", dt, n), r_ptr=ptr, stride_rm=n, h_ptr=ptr, stride_hm=n, w_ptr=ptr,
                    **_rows("y", dt, n), rstd_ptr="*fp32", M=M, N=n, eps=1e-6)
    if kernel == "_rms_norm_bwd_kernel":
        return dict(dy_ptr=ptr, stride_dym=n, **_rows("x", dt, n), w_ptr=ptr, rstd_ptr="*fp32", dh_ptr=ptr,
                    stride_dhm=n, dx_ptr=ptr, stride_dxm=n, dw_ptr="*fp32", stride_dwp=n, M=M, N=n,
                    rows_per_program=16)
    wptr = "*" + (wdt or dt)
    if kernel == "_layer_norm_fwd_kernel":
        return dict(**_rows("x", dt, n), w_ptr=wptr, b_ptr=wptr, **_rows("y", dt, n), mean_ptr="*fp32",
                    rstd_ptr="*fp32", M=M, N=n, eps=1e-5)
    if kernel == "_layer_norm_bwd_kernel":
        return dict(dy_ptr=ptr, stride_dym=n, **_rows("x", dt, n), w_ptr=wptr, mean_ptr="*fp32", rstd_ptr="*fp32",
                    dx_ptr=ptr, stride_dxm=n, dw_ptr="*fp32", db_ptr="*fp32", stride_dwp=n, M=M, N=n,
                    rows_per_program=16)
    return dict(dy_ptr=ptr, stride_dym=n, **_rows("x", dt, n), mean_ptr="*fp32", rstd_ptr="*fp32",
                dw_ptr="*fp32", db_ptr="*fp32", stride_dwp=n, M=M, N=n, rows_per_program=512)


def _meta(kernel: str, variant: str, cfg: N.NormConfig) -> dict:
    rows = dict(BLOCK_M=cfg.block_m, CHUNKED=cfg.chunked, RNE_BF16=False)
    if kernel == "_rms_norm_fwd_kernel":
        return dict(HAS_RESIDUAL=True, ADD_ONE=variant == "gemma", ROUND_NORMED=variant == "llama", **rows)
    if kernel == "_rms_norm_bwd_kernel":
        return dict(HAS_DH=True, NEED_DX=True, NEED_DW=not cfg.chunked, ADD_ONE=variant == "gemma",
                    ROUND_NORMED=variant == "llama", **rows)
    if kernel == "_layer_norm_fwd_kernel":
        return dict(HAS_BIAS=variant != "cohere", **rows)
    if kernel == "_layer_norm_bwd_kernel":
        return dict(NEED_DX=True, NEED_DW=not cfg.chunked, NEED_DB=not cfg.chunked and variant != "cohere", **rows)
    return dict(CENTER=variant == "layer", ROUND_NORMED=variant == "llama", NEED_DW=True,
                NEED_DB=variant == "layer", BLOCK_M=N.DW_BLOCK_M, RNE_BF16=False)


def _plan() -> list[aot.Job]:
    kernels = [("_rms_norm_fwd_kernel", "llama"), ("_rms_norm_fwd_kernel", "gemma"),
               ("_rms_norm_bwd_kernel", "llama"), ("_layer_norm_fwd_kernel", "layer"),
               ("_layer_norm_bwd_kernel", "layer")]
    jobs = []
    for arch in aot.ARCHS:
        for dt in ("bf16", "fp32"):
            for n in HIDDEN:
                cfg = N.norm_config(n)
                for kernel, variant in kernels:
                    if variant == "gemma" and n != 4096:  # one size: the flags change a few element-wise ops
                        continue
                    jobs.append(aot.Job(kernel, f"{variant}-N{n}", dt, arch, {"BLOCK_N": cfg.block_n},
                                        cfg.num_warps, cfg.num_stages, _meta(kernel, variant, cfg),
                                        _args(kernel, dt, n)))
                if dt == "bf16" and n in (4096, 8192):  # Cohere's LayerNorm: no bias, an fp32 weight
                    for kernel in ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel"):
                        jobs.append(aot.Job(kernel, f"cohere-N{n}", dt, arch, {"BLOCK_N": cfg.block_n},
                                            cfg.num_warps, cfg.num_stages, _meta(kernel, "cohere", cfg),
                                            _args(kernel, dt, n, wdt="fp32")))
                if cfg.chunked:  # wide rows take their weight gradients from the column-parallel kernel
                    for variant in ("llama", "layer"):
                        jobs.append(aot.Job("_norm_dw_kernel", f"{variant}-N{n}", dt, arch,
                                            {"BLOCK_N": N.DW_BLOCK_N}, N.DW_WARPS, N.DW_STAGES,
                                            _meta("_norm_dw_kernel", variant, cfg), _args("_norm_dw_kernel", dt, n)))
    return jobs


PLAN = _plan()


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {r["key"]: r for r in aot.run(PLAN)}


@pytest.mark.parametrize("job", PLAN, ids=lambda j: f"{j.kernel[1:-7]}-{j.variant}-{j.dtype}-sm{j.arch}")
def test_norm_kernel_compiles(job: aot.Job, results: dict[str, dict]) -> None:
    res = results[job.key]
    assert res["error"] is None, res["error"]
    assert res["ptx_target"] == ("sm_90a" if job.arch == 90 else f"sm_{job.arch}")
    assert res["shared"] <= HW_SMEM[job.arch], f"{job.key}: {res['shared']} B of shared memory"
    assert res.get("stack_bytes", 0) == 0, f"{job.key}: {res['stack_bytes']} B of register spills"


def test_plan_covers_every_config_of_these_sizes() -> None:
    planned = {(j.tiles["BLOCK_N"], j.meta["BLOCK_M"], j.meta["CHUNKED"], j.num_warps, j.num_stages)
               for j in PLAN if j.kernel != "_norm_dw_kernel"}
    for n in HIDDEN:
        cfg = N.norm_config(n)
        assert (cfg.block_n, cfg.block_m, cfg.chunked, cfg.num_warps, cfg.num_stages) in planned
    assert [N.norm_config(n).chunked for n in HIDDEN] == [False, False, False, False, True]
