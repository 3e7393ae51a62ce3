"""The NF4 Triton kernels compile for sm_80 (A100) and sm_90 (H100) without a GPU: every autotune config of the fused
NF4 LoRA GEMMs (forward, and dx with the LoRA epilogue and dropout; bf16) on both targets, plus the largest LoRA
epilogue (r=64), an fp16 dx without dropout, and the dequantize kernel. Checked per compile: a cubin for the target,
shared memory within the per-block limit and within the launcher's prune estimate, tensor-core MMAs (``mma.sync``;
``wgmma`` or ``mma.sync`` on sm_90), and at most a few spilled registers. Machinery: ``peftfast.testing.aot`` (see
``tests/test_lora_aot.py``); the compiles run in two worker subprocesses without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftfast.ops import nf4 as O
from peftfast.testing import aot

HW_SMEM = {80: 163 * 1024, 90: 227 * 1024}
_M, _K, _N = 8192, 4096, 4096  # a Llama-7B-sized layer at 8192 tokens
_KIND = {"_nf4_lora_fwd_kernel": "fwd", "_nf4_lora_dx_kernel": "dx"}


def _args(kernel: str, dt: str, rank: int, dropout: bool) -> dict:
    ptr = "*" + dt
    q = dict(q_ptr="*u8", stride_qn=_K // 2, am_ptr="*fp32", stride_an=_K // 64, code_ptr="*fp32")
    if kernel == "_nf4_dequant_kernel":
        return dict(**q, out_ptr=ptr, stride_on=_K, N=_N, K=_K)
    if kernel == "_nf4_lora_fwd_kernel":
        return dict(x_ptr=ptr, stride_xm=_K, stride_xk=1, **q, l_ptr="*fp32", stride_lm=rank, stride_lr=1,
                    r_ptr="*fp32", stride_rn=rank, stride_rr=1, bias_ptr=ptr, lbias_ptr="*fp32", out_ptr=ptr,
                    stride_om=_N, stride_on=1, M=_M, N=_N, K=_K, R=rank, l_scale=2.0)
    return dict(dy_ptr=ptr, stride_dm=_N, stride_dn=1, **q, g_ptr="*fp32", stride_gm=rank, stride_gr=1,
                a_ptr="*fp32", stride_ak=1, stride_ar=_K, out_ptr=ptr, stride_om=_K, stride_ok=1, M=_M, N=_N, K=_K,
                R=rank, seed=1234567 if dropout else 0, p=0.1 if dropout else 0.0,
                keep_scale=1 / 0.9 if dropout else 1.0)


def _meta(kernel: str, dt: str, rank: int, dropout: bool) -> dict:
    prec = "tf32"  # fp32 compiles as under torch's default allow_tf32 for the LoRA (fp32) operands
    common = dict(QBLOCK=64, BLOCK_R=O._block_r(rank), DOT_PRECISION=prec, LORA_PRECISION=prec)
    if kernel == "_nf4_lora_fwd_kernel":
        return dict(HAS_LORA=True, HAS_BIAS=True, HAS_LBIAS=True, **common)
    return dict(HAS_LORA=True, HAS_DROPOUT=dropout, **common)


def _plan() -> list[aot.Job]:
    jobs = []
    for arch in aot.ARCHS:
        for kernel, variant, rank, dropout in (("_nf4_lora_fwd_kernel", "fwd-r16", 16, False),
                                               ("_nf4_lora_dx_kernel", "dx-dropout-r16", 16, True)):
            for cfg in O.gemm_configs(_KIND[kernel]):
                jobs.append(aot.Job(kernel, variant, "bf16", arch, dict(cfg.kwargs), cfg.num_warps, cfg.num_stages,
                                    _meta(kernel, "bf16", rank, dropout), _args(kernel, "bf16", rank, dropout)))
        for kernel, variant, dt, rank, dropout in (("_nf4_lora_fwd_kernel", "fwd-r64", "bf16", 64, False),
                                                   ("_nf4_lora_dx_kernel", "dx", "fp16", 16, False)):
            cfg = O.gemm_configs(_KIND[kernel])[0]
            jobs.append(aot.Job(kernel, variant, dt, arch, dict(cfg.kwargs), cfg.num_warps, cfg.num_stages,
                                _meta(kernel, dt, rank, dropout), _args(kernel, dt, rank, dropout)))
        t = dict(O.DEQUANT_TILE)
        warps = t.pop("num_warps")
        jobs.append(aot.Job("_nf4_dequant_kernel", "dequant", "bf16", arch, t, warps, 1,
                            dict(QBLOCK=64, RNE_BF16=False), _args("_nf4_dequant_kernel", "bf16", 0, False)))
    return jobs


PLAN = _plan()
_WORKER = r"""
import json, sys
from peftfast.testing import aot
aot.KERNEL_MODULES = (*aot.KERNEL_MODULES, "nf4")
for line in sys.stdin:
    d = json.loads(line)
    job = aot.Job(**d)
    try:
        res = aot.compile_job(job)
        res["error"] = None
    except Exception as exc:  # reported per job
        res = {"error": f"{type(exc).__name__}: {exc}"}
    print("NF4AOT " + json.dumps({"key": job.key, **res}), flush=True)
"""


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = []
    for w in range(2):
        jobs = PLAN[w::2]
        payload = "".join(json.dumps({f: getattr(j, f) for f in ("kernel", "variant", "dtype", "arch", "tiles",
                                                                "num_warps", "num_stages", "meta", "args")}) + "\n"
                          for j in jobs)
        p = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
        procs.append((p, payload))
    out: dict[str, dict] = {}
    for p, payload in procs:
        stdout, stderr = p.communicate(payload, timeout=900)
        for line in stdout.splitlines():
            if line.startswith("NF4AOT "):
                r = json.loads(line[7:])
                out[r["key"]] = r
        assert p.returncode == 0, stderr[-2000:]
    return out


@pytest.mark.parametrize("job", PLAN, ids=lambda j: f"{j.kernel[5:-7]}-{j.variant}-{j.dtype}-{j.config}-sm{j.arch}")
def test_nf4_kernel_compiles(job: aot.Job, results: dict[str, dict]) -> None:
    res = results[job.key]
    assert res["error"] is None, res["error"]
    assert res["cubin_bytes"] > 0
    assert res["ptx_target"] == ("sm_90a" if job.arch == 90 else f"sm_{job.arch}")
    assert res["shared"] <= HW_SMEM[job.arch], f"{job.key}: {res['shared']} B of shared memory"
    # a few spilled words of the dropout/LoRA epilogue (sm_80 at 128-row tiles) stay in L1; more would be a bug
    assert res.get("stack_bytes", 0) <= 32, f"{job.key}: {res['stack_bytes']} B of register spills"
    if job.kernel == "_nf4_dequant_kernel":
        return
    if job.arch == 90:
        assert res["wgmma"] or res["mma_sync"], f"{job.key}: no tensor-core MMA"
    else:
        assert res["mma_sync"] and not res["wgmma"], f"{job.key}: expected mma.sync"
    cfg = next(c for c in O.gemm_configs(_KIND[job.kernel]) if dict(c.kwargs) == job.tiles
               and c.num_warps == job.num_warps and c.num_stages == job.num_stages)
    est = O.smem_estimate(cfg, 2, arch=job.arch, block_r=job.meta["BLOCK_R"], lora_elt=4)
    assert est >= res["shared"], f"{job.key}: prune estimate {est} B < compiled {res['shared']} B"


def test_plan_covers_every_config_on_both_targets() -> None:
    for arch in aot.ARCHS:
        for kernel in ("_nf4_lora_fwd_kernel", "_nf4_lora_dx_kernel"):
            got = {j.config for j in PLAN if j.arch == arch and j.kernel == kernel and j.dtype == "bf16"}
            want = {aot.Job("", "", "", 0, dict(c.kwargs), c.num_warps, c.num_stages, {}, {}).config
                    for c in O.gemm_configs(_KIND[kernel])}
            assert want <= got, (arch, kernel)
