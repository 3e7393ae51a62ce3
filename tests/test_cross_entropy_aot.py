"""The fused linear cross-entropy kernels compile for sm_80 and sm_90 at every config the launcher can pick, fit
shared memory, use tensor cores for their products, and do not spill (see ``tests/test_lora_aot.py`` for the
machinery).

The logits GEMM is autotuned over ``LOGITS_CONFIGS`` (``IEEE_CONFIGS`` for fp32 without TF32), pruned by the
launcher's shared-memory estimate; the gradient kernel runs fixed tiles per fused rank width (``grad_tiles``),
each compiled here. The row-wise kernels have no product: the lse/loss combine always, the gradient kernel without
a LoRA adapter (then it is a softmax-gradient pass); there the check is that they compile, fit and carry no MMA.
The default tier covers the 16-bit model dtypes the loss meets in training (bf16 base, PEFT's fp32 LoRA adapters);
fp16, fp32 (TF32 and ieee) and rank 64 bf16 adapters on the logits GEMM run with ``-m slow``.
"""

import pytest
import triton

from peftfast.ops import cross_entropy as C
from peftfast.testing import aot

HW_SMEM = {80: 163 * 1024, 90: 227 * 1024}
M, K, N = 512, 4096, 128256  # a Llama-3-8B head at the default chunk size


def _logits_args(dt: str, lora_dt: str, r: int) -> dict:
    p, lp = "*" + dt, "*" + lora_dt
    nb = triton.cdiv(N, 64)
    return dict(h_ptr=p, stride_hm=K, stride_hk=1, w_ptr=p, stride_wn=K, stride_wk=1, bias_ptr=p, xa_ptr=lp,
                stride_xam=r, stride_xar=1, lb_ptr=lp, stride_lbn=r, stride_lbr=1, labels_ptr="*i64", z_ptr="*fp32",
                stride_zm=N, stride_zn=1, pmax_ptr="*fp32", psum_ptr="*fp32", pz_ptr="*fp32", stride_pm=nb,
                stride_pb=1, tgt_ptr="*fp32", M=M, N=N, K=K, R=r, lora_scale=2.0, logit_scale=1.0, softcap=30.0)


def _grad_args(d_dt: str, lora_dt: str, r: int) -> dict:
    return dict(z_ptr="*fp32", stride_zm=N, stride_zn=1, d_ptr="*" + d_dt, stride_dm=N, stride_dn=1,
                lse_ptr="*fp32", labels_ptr="*i64", lb_ptr="*" + lora_dt, stride_lbn=r, stride_lbr=1,
                g_ptr="*fp32", stride_gs=M * r, stride_gm=r, stride_gr=1, M=M, N=N, R=r, COLS_PER_SPLIT=4096,
                ignore_index=-100, one_minus_eps=0.9, eps_over_n=1e-7, logit_scale=1.0, inv_softcap=1 / 30)


def _lse_args() -> dict:
    nb = triton.cdiv(N, 64)
    return dict(pmax_ptr="*fp32", psum_ptr="*fp32", pz_ptr="*fp32", stride_pm=nb, stride_pb=1, tgt_ptr="*fp32",
                labels_ptr="*i64", lse_ptr="*fp32", loss_ptr="*fp32", M=M, N=N, NB=nb, ignore_index=-100,
                one_minus_eps=0.9, eps_over_n=1e-7)


def _logits_meta(lora: bool, prec: str, lora_prec: str, r: int = 16) -> dict:
    return dict(HAS_BIAS=lora, HAS_LORA=lora, HAS_SOFTCAP=lora, NEED_ZSUM=lora, BLOCK_R=C._logits_block_r(r),
                DOT_PRECISION=prec, LORA_PRECISION=lora_prec)


def _grad_meta(lora: bool, lora_prec: str, r: int, store_f32: bool) -> dict:
    return dict(HAS_SOFTCAP=True, HAS_LORA=lora, STORE_F32=store_f32, BLOCK_R=C._block_r(r), LORA_PRECISION=lora_prec)


def _configs(dt: str, meta: dict) -> list[triton.Config]:
    ieee = dt == "fp32" and meta["DOT_PRECISION"] == "ieee"
    return C.IEEE_CONFIGS if ieee else C.LOGITS_CONFIGS


def _kept(dt: str, args: dict, meta: dict, arch: int) -> list[triton.Config]:
    from unittest import mock

    from peftfast.ops import _triton_launch as L

    named = {k: aot._Ptr(v) if isinstance(v, str) else v for k, v in args.items()}
    with mock.patch.object(L, "_device_smem", lambda: L.SMEM_LIMIT[arch]), \
            mock.patch.object(L, "_device_arch", lambda: arch):
        return C._prune(list(_configs(dt, meta)), named, **meta)


# (variant, base dtype, lora dtype, rank, precision of the main dot, of the LoRA dot, slow)
LOGITS_VARIANTS = [
    ("plain", "bf16", "bf16", 0, "tf32", "tf32", False),
    ("lora-fp32-softcap-smooth", "bf16", "fp32", 16, "tf32", "ieee", False),
    ("lora-r64", "bf16", "bf16", 64, "tf32", "tf32", True),
    ("plain", "fp16", "fp16", 0, "tf32", "tf32", True),
    ("plain-tf32", "fp32", "fp32", 0, "tf32", "tf32", True),
    ("plain-ieee", "fp32", "fp32", 0, "ieee", "ieee", True),
    ("lora-ieee", "fp32", "fp32", 16, "ieee", "ieee", True),
]
# (variant, D dtype, lora dtype, rank, LoRA dot precision, STORE_F32, slow)
GRAD_VARIANTS = [
    ("plain", "bf16", "bf16", 0, "tf32", False, False),
    ("lora-fp32-r16", "bf16", "fp32", 16, "tf32", True, False),
    ("lora-r32", "bf16", "bf16", 32, "tf32", False, False),
    ("lora-r64", "bf16", "bf16", 64, "tf32", False, False),
    ("lora-fp32-r64", "bf16", "fp32", 64, "tf32", True, False),
    ("lora-fp32-r16-ieee", "bf16", "fp32", 16, "ieee", True, True),
    ("lora-r16", "fp16", "fp16", 16, "tf32", False, True),
    ("lora-r16", "fp32", "fp32", 16, "tf32", False, True),
]


def _plan() -> list[aot.Job]:
    jobs = []
    for arch in aot.ARCHS:
        for variant, dt, ldt, r, prec, lprec, slow in LOGITS_VARIANTS:
            args, meta = _logits_args(dt, ldt, max(r, 16)), _logits_meta(r > 0, prec, lprec, max(r, 16))
            for cfg in _kept(dt, args, meta, arch):
                jobs.append(aot.Job("_flce_logits_kernel", variant, dt, arch, dict(cfg.kwargs), cfg.num_warps,
                                    cfg.num_stages, meta, args, slow))
        for variant, dt, ldt, r, lprec, f32, slow in GRAD_VARIANTS:
            tiles = C.grad_tiles(C._block_r(r) if r else 0)
            meta, args = _grad_meta(r > 0, lprec, max(r, 16), f32), _grad_args(dt, ldt, max(r, 16))
            jobs.append(aot.Job("_flce_grad_kernel", variant, dt, arch, tiles, C.GRAD_WARPS, C.GRAD_STAGES, meta,
                                args, slow))
        for zsum in (False, True):
            jobs.append(aot.Job("_flce_lse_kernel", "zsum" if zsum else "plain", "fp32", arch, dict(C.LSE_TILES),
                                C.LSE_WARPS, C.LSE_STAGES, dict(NEED_ZSUM=zsum), _lse_args()))
    return jobs


PLAN = _plan()
FAST = [j for j in PLAN if not j.slow]
SLOW = [j for j in PLAN if j.slow]


@pytest.fixture(scope="module")
def fast_results() -> dict[str, dict]:
    return {r["key"]: r for r in aot.run(FAST)}


@pytest.fixture(scope="module")
def slow_results() -> dict[str, dict]:
    return {r["key"]: r for r in aot.run(SLOW)}


def _expected(job: aot.Job) -> str:
    """``wgmma``, ``mma.sync`` or ``none`` for this job's products."""
    if job.kernel == "_flce_lse_kernel":
        return "none"
    if job.kernel == "_flce_grad_kernel":
        if not job.meta["HAS_LORA"] or (job.meta["LORA_PRECISION"] == "ieee" and job.args["lb_ptr"] == "*fp32"):
            return "none"
        m_tile = job.tiles["BLOCK_M"]
    else:
        if job.meta["DOT_PRECISION"] == "ieee" and job.dtype == "fp32":
            return "none"
        m_tile = job.tiles["BLOCK_M"]
    if job.arch >= 90 and job.num_warps >= 4 and m_tile % 64 == 0:
        return "wgmma"
    return "mma.sync"


def _check(job: aot.Job, res: dict) -> None:
    assert res["error"] is None, res["error"]
    assert res["ptx_target"] == ("sm_90a" if job.arch == 90 else f"sm_{job.arch}")
    assert res["shared"] <= HW_SMEM[job.arch], f"{job.key}: {res['shared']} B of shared memory"
    assert res.get("stack_bytes", 0) == 0, f"{job.key}: {res['stack_bytes']} B of register spills"
    want = _expected(job)
    if want == "wgmma":
        assert res["wgmma"], f"{job.key}: expected wgmma on sm_90, PTX uses {aot.tensor_cores(res)}"
    elif want == "mma.sync":
        assert res["mma_sync"] or res["wgmma"], f"{job.key}: no tensor-core MMA"
    else:
        assert not res["mma_sync"] and not res["wgmma"], f"{job.key}: unexpected MMA"
    if job.kernel == "_flce_lse_kernel":
        return
    if job.kernel == "_flce_logits_kernel":
        est = C.smem_estimate(triton.Config(job.tiles, num_warps=job.num_warps, num_stages=job.num_stages),
                              aot._ELT[job.dtype], job.arch, block_r=job.meta["BLOCK_R"] if job.meta["HAS_LORA"] else 0,
                              lora_elt=aot._ELT[job.args["lb_ptr"][1:]])
    else:
        est = C.grad_smem_estimate(job.arch, lora_r=job.args["R"] if job.meta["HAS_LORA"] else 0,
                                   lora_elt=aot._ELT[job.args["lb_ptr"][1:]])
    assert est >= res["shared"], f"{job.key}: launcher estimate {est} B < compiled {res['shared']} B"


def _id(job: aot.Job) -> str:
    return f"{job.kernel[6:-7]}-{job.variant}-{job.dtype}-{job.config.replace(' ', '_')}-sm{job.arch}"


@pytest.mark.parametrize("job", FAST, ids=_id)
def test_flce_kernel_compiles(job: aot.Job, fast_results: dict[str, dict]) -> None:
    _check(job, fast_results[job.key])


@pytest.mark.slow
@pytest.mark.parametrize("job", SLOW, ids=_id)
def test_flce_kernel_compiles_slow_tier(job: aot.Job, slow_results: dict[str, dict]) -> None:
    _check(job, slow_results[job.key])


def test_every_16bit_logits_config_is_kept_and_fp32_prunes_on_sm80() -> None:
    for arch in aot.ARCHS:
        meta = _logits_meta(True, "tf32", "ieee")
        assert len(_kept("bf16", _logits_args("bf16", "fp32", 16), meta, arch)) == len(C.LOGITS_CONFIGS)
        ieee = _logits_meta(True, "ieee", "ieee")
        assert len(_kept("fp32", _logits_args("fp32", "fp32", 16), ieee, arch)) == len(C.IEEE_CONFIGS)
    fp32_sm80 = _kept("fp32", _logits_args("fp32", "fp32", 16), _logits_meta(False, "tf32", "tf32"), 80)
    assert 0 < len(fp32_sm80) < len(C.LOGITS_CONFIGS)
    assert C._block_r(C.MAX_FUSED_RANK) == 64  # the r64 variants above are the largest fused D B
