"""The MoE experts' grouped Triton kernels (the gate/up GEMM with the activation in its epilogue included) compile
for sm_80 and sm_90 (no GPU needed), with the configurations the launcher picks on a GPU for Qwen3-30B-A3B's expert
shapes (hidden 2048, expert intermediate 768, 128 experts, r=16) and gpt-oss-20b's (hidden and intermediate 2880, 32
experts, transposed stacks with biases, the interleaved clamped SwiGLU), fit shared memory without spilling, and use
tensor cores (none under fp32 ``ieee`` products, and none in the element-wise gate kernels)."""

from unittest import mock

import pytest

from peftfast.ops import moe as M
from peftfast.testing import aot

HW_SMEM = {80: 163 * 1024, 90: 227 * 1024}
_S, _H, _I, _E, _R = 32768, 2048, 768, 128, 16  # 4096 tokens x top-8
_OSS_H, _OSS_E = 2880, 32  # gpt-oss-20b: hidden = expert intermediate


def _gpu_config(fn, *args, prec: str | None = None) -> dict:
    """The launcher's choice on a GPU (for fp32, under ``prec``: torch's allow_tf32 on or off)."""
    with mock.patch.object(M, "interpreting", lambda: False):
        if prec is None:
            return fn(*args)
        with mock.patch.object(M, "_dot_precision", lambda _dt: prec):
            return fn(*args)


def _gemm_args(p: str, n: int, k: int, e: int = _E, transposed: bool = False, out: str | None = None) -> dict:
    """x [S or T, k], w3 [E, n, k] (a view of [E, k, n] stacks when ``transposed``), L [S, r], PEFT's lora_B read as
    [E, n, r], a bias [E, n], the routing weights [S], token-major slots [S], out [S, n] (``out``: another dtype)."""
    wn, wk = (1, n) if transposed else (k, 1)
    return dict(x_ptr=p, stride_xm=k, stride_xk=1, gather_ptr="*i64", w_ptr=p, stride_we=n * k, stride_wn=wn,
                stride_wk=wk, l_ptr=p, stride_lm=_R, stride_lr=1, r_ptr=p, stride_re=1, stride_rn=_R * e,
                stride_rr=e, bias_ptr=p, stride_be=n, stride_bn=1, rscale_ptr=p, scatter_ptr="*i64", out_ptr=out or p,
                stride_om=n, stride_on=1,
                tile_expert_ptr="*i64", tile_row_ptr="*i64", tile_end_ptr="*i64", N=n, K=k, RANK=_R, scale=2.0)


def _wgrad_args(p: str, ni: int, n: int, ones: bool = False) -> dict:
    """P [S, ni] (a stride-0 column of ones for the bias gradients), Q [S, n]."""
    pm, pi = (0, 0) if ones else (ni, 1)
    return dict(p_ptr=p, stride_pm=pm, stride_pi=pi, q_ptr=p, stride_qm=n, stride_qn=1, gather_ptr="*i64",
                bounds_ptr="*i64", out_ptr="*fp32", stride_oe=ni * n, stride_oi=n, stride_on=1, NI=ni, N=n, scale=2.0)


def _glu_args(p: str, fwd: bool) -> dict:
    """gpt-oss's gate and up: the even and odd columns of h [S, 2I]; dg and du likewise into dh."""
    i = _OSS_H
    gu = dict(g_ptr=p, stride_gm=2 * i, stride_gc=2, u_ptr=p, stride_um=2 * i, stride_uc=2, cols=i, alpha=1.702,
              limit=7.0)
    if fwd:
        return dict(**gu, a_ptr=p, stride_am=i)
    return dict(da_ptr=p, stride_dam=i, **gu, dg_ptr=p, stride_dgm=2 * i, stride_dgc=2, du_ptr=p, stride_dum=2 * i,
                stride_duc=2)


def _glu_gemm_args(p: str, i: int, k: int, e: int, transposed: bool) -> dict:
    """The gate/up GEMM with the activation in its epilogue: x [T, k] gathered, w3 [E, 2i, k] (a view of [E, k, 2i]
    when ``transposed``), L [S, r], lora_B read as [E, 2i, r], a bias [E, 2i]; gd [S, i] fp32, the sorted routing
    weights, the routing gradient's per-block parts [S, i / 64] fp32, a [S, i], h (or dh) [S, 2i]."""
    wn, wk = (1, 2 * i) if transposed else (k, 1)
    return dict(x_ptr=p, stride_xm=k, stride_xk=1, gather_ptr="*i64", w_ptr=p, stride_we=2 * i * k, stride_wn=wn,
                stride_wk=wk, l_ptr=p, stride_lm=_R, stride_lr=1, r_ptr=p, stride_re=1, stride_rn=_R * e,
                stride_rr=e, bias_ptr=p, stride_be=2 * i, stride_bn=1, gd_ptr="*fp32", stride_gdm=i, stride_gdn=1,
                rw_ptr=p, rp_ptr="*fp32", stride_rpm=i // 64, stride_rpn=1, a_ptr=p, stride_am=i, stride_an=1,
                h_ptr=p, stride_hm=2 * i, stride_hn=1,
                tile_expert_ptr="*i64", tile_row_ptr="*i64", tile_end_ptr="*i64", INTER=i, K=k, RANK=_R, scale=2.0,
                alpha=1.702, limit=7.0)


# (variant, family, STORE_H, GRAD): the forward that keeps no h (the default), the one that keeps it
# (``recompute=False``) and backward's rerun writing a and dh; Qwen3-MoE's SiLU on [gate | up] halves, gpt-oss's
# interleaved clamped SwiGLU with biases on transposed stacks
GLU_GEMMS = [(f"{fam}_{mode}", fam, mode == "keep", mode == "grad") for fam in ("qwen", "oss")
             for mode in ("fwd", "keep", "grad")]
# (variant, N, K, GATHER, HAS_LORA, HAS_BIAS, experts, transposed): the gate/up GEMM, the down GEMM, a rank-r product
# (x·A_guᵀ, dy·B_d), dx; gpt-oss's biased gate/up and down on transposed stacks, and its width-1 dy·b_d product
GEMMS = [("gate_up", 2 * _I, _H, True, True, False, _E, False), ("down", _H, _I, False, True, False, _E, False),
         ("rank", _R, _H, True, False, False, _E, False), ("dx", _H, 2 * _I, False, True, False, _E, False),
         ("oss_gate_up", 2 * _OSS_H, _OSS_H, True, True, True, _OSS_E, True),
         ("oss_down", _OSS_H, _OSS_H, False, True, True, _OSS_E, True),
         ("oss_dy_bias", 1, _OSS_H, True, False, False, _OSS_E, False)]
# (variant, NI, N, GATHER, ones): dB_gu [E, 2I, r], dA_gu [E, r, H] (x gathered; dB_d's [E, r, H] likewise, dy
# gathered), a trainable down stack [E, I, H] (dy gathered), a trainable gate/up bias (the column sums of dh) and
# down bias (the routing weights' column against dy, gathered)
WGRADS = [("dB", 2 * _I, _R, False, False), ("dA", _R, _H, True, False), ("dW", _I, _H, True, False),
          ("oss_dbias", 1, 2 * _OSS_H, False, True), ("oss_dbias_d", 1, _OSS_H, True, False)]


def _route_args(p: str, e: int) -> dict:
    """The routing prologue over S rows and ``e`` experts: ids, counts, perm, tokens, maps and bounds int64."""
    i64 = "*i64"
    return dict(sorted_ptr=i64, counts_ptr=i64, perm_ptr=i64, w_ptr=p, tok_ptr=i64, ws_ptr=p, tile_expert_ptr=i64,
                tile_row_ptr=i64, tile_end_ptr=i64, bounds_ptr=i64, ok_ptr=i64, S=_S, E=e, NT=_S // 64 + e, TOP_K=8,
                steps=_S.bit_length() + 1)


def _plan() -> list[aot.Job]:
    """16-bit dtypes; fp32 with TF32 (torch's allow_tf32) and with IEEE products (the launcher's default for fp32,
    as torch's own matmul: no tensor cores)."""
    import torch

    jobs = []
    for arch in aot.ARCHS:
        for dt, torch_dt, prec in (("bf16", torch.bfloat16, "tf32"), ("fp16", torch.float16, "tf32"),
                                   ("fp32", torch.float32, "tf32"), ("fp32", torch.float32, "ieee")):
            p = "*" + dt
            for variant, n, k, gather, lora, bias, e, transposed in GEMMS:
                cfg = _gpu_config(M._gemm_config, n, torch_dt, prec=prec)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                tiles = {"BLOCK_M": 64, **cfg}
                # the down projection's rows scaled by their routing weights, it and dx stored in token-major slots
                meta = dict(GATHER=gather, HAS_LORA=lora, HAS_BIAS=bias, ROW_SCALE=variant.endswith("down"),
                            SCATTER=variant.endswith(("down", "dx")), BLOCK_R=16, DOT_PRECISION=prec,
                            LORA_PRECISION=prec)
                jobs.append(aot.Job("_moe_grouped_gemm_kernel", f"{variant}-{prec}", dt, arch, tiles, warps, stages,
                                    meta, _gemm_args(p, n, k, e, transposed, "*fp32" if meta["SCATTER"] else None)))
            for variant, ni, n, gather, ones in WGRADS:
                cfg = _gpu_config(M._wgrad_config, ni, n, torch_dt)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                jobs.append(aot.Job("_moe_grouped_wgrad_kernel", f"{variant}-{prec}", dt, arch, cfg, warps, stages,
                                    dict(GATHER=gather, DOT_PRECISION=prec), _wgrad_args(p, ni, n, ones)))
            for variant, fam, store_h, grad in GLU_GEMMS:
                oss = fam == "oss"
                i, k, e = (_OSS_H, _OSS_H, _OSS_E) if oss else (_I, _H, _E)
                cfg = _gpu_config(M._glu_gemm_config, i, torch_dt, grad, prec=prec)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                meta = dict(GATHER=True, HAS_LORA=True, HAS_BIAS=oss, INTERLEAVED=oss,
                            ACT=M.GLU_ACTS["clamped_swiglu" if oss else "silu"], STORE_H=store_h, GRAD=grad,
                            ROUTE_GRAD=grad, BLOCK_R=16, DOT_PRECISION=prec, LORA_PRECISION=prec)
                jobs.append(aot.Job("_moe_gate_up_glu_kernel", f"{variant}-{prec}", dt, arch, {"BLOCK_M": 64, **cfg},
                                    warps, stages, meta, _glu_gemm_args(p, i, k, e, oss)))
            if prec == "tf32":
                if dt == "bf16":  # the routing prologue: int64 ids, counts and maps; bf16 routing weights
                    for e in (_OSS_E, _E, 512):
                        block_e = max(16, 1 << (e - 1).bit_length())
                        for from_sorted in (True, False):
                            jobs.append(aot.Job("_moe_route_kernel", f"e{e}-{'fwd' if from_sorted else 'bwd'}", dt,
                                                arch, {}, 4, 1,
                                                dict(FROM_SORTED=from_sorted, BLOCK_M=64, BLOCK_E=block_e,
                                                     BLOCK_S=M._ROUTE_BLOCK_S, BLOCK_T=M._route_block_t(block_e)),
                                                _route_args(p, e)))
                for fwd in (True, False):
                    jobs.append(aot.Job(f"_moe_glu_{'fwd' if fwd else 'bwd'}_kernel", "oss", dt, arch, {}, 4, 1,
                                        dict(ACT=M.GLU_ACTS["clamped_swiglu"], BLOCK=1024), _glu_args(p, fwd)))
    return jobs


PLAN = _plan()


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {r["key"]: r for r in aot.run(PLAN)}


@pytest.mark.parametrize("job", PLAN, ids=lambda j: f"{j.kernel[5:-7]}-{j.variant}-{j.dtype}-sm{j.arch}")
def test_moe_kernels_compile_with_tensor_cores(job: aot.Job, results: dict[str, dict]) -> None:
    res = results[job.key]
    assert res["error"] is None, res["error"]
    assert res["ptx_target"] == ("sm_90a" if job.arch == 90 else f"sm_{job.arch}")
    assert res["shared"] <= HW_SMEM[job.arch], (job.key, res["shared"])
    if "stack_bytes" in res:
        assert res["stack_bytes"] == 0, f"{job.key} spills {res['stack_bytes']} B a thread"
    if job.kernel.startswith(("_moe_glu", "_moe_route")):  # element-wise, and the routing prologue
        assert not res["mma_sync"] and not res["wgmma"]
        return
    if job.meta["DOT_PRECISION"] == "ieee":  # fp32 products exact to IEEE: tensor cores would round to TF32
        assert not res["mma_sync"] and not res["wgmma"], f"{job.key}: tensor cores under ieee"
        return
    assert res["mma_sync"] or res["wgmma"], f"{job.key}: no tensor-core instruction in the PTX"
    if (job.arch == 90 and job.kernel in ("_moe_grouped_gemm_kernel", "_moe_gate_up_glu_kernel")
            and not job.variant.startswith(("rank", "oss_dy_bias"))):
        assert res["wgmma"], f"{job.key}: a 64-row tile with 4 warps should use wgmma on sm_90"


def test_launcher_configs_are_the_planned_ones() -> None:
    """The plan reads the launcher's GPU choices: wide products get wide tiles, rank-r ones 16-wide."""
    import torch

    assert _gpu_config(M._gemm_config, 2 * _I, torch.bfloat16)["BLOCK_N"] == 128
    assert _gpu_config(M._glu_gemm_config, _I, torch.bfloat16)["BLOCK_N"] == 64  # gate and up: 128 h columns
    assert _gpu_config(M._glu_gemm_config, _I, torch.bfloat16, True)["num_warps"] == 8
    assert _gpu_config(M._gemm_config, _R, torch.bfloat16)["BLOCK_N"] == 16
    assert _gpu_config(M._wgrad_config, _R, _H, torch.bfloat16)["BLOCK_I"] == 16
    assert _gpu_config(M._wgrad_config, _H, _I, torch.float32)["BLOCK_N"] == 32
    assert M._block_m() == 16  # the interpreter's (these tests run with TRITON_INTERPRET=1)
    with mock.patch.object(M, "interpreting", lambda: False):
        assert M._block_m() == 64
