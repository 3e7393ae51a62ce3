"""The LoRA-MLP's element-wise activation kernels compile for sm_80 and sm_90 (no GPU needed)."""

import pytest

from peftfast.ops import mlp as M
from peftfast.testing import aot


def _plan() -> list[aot.Job]:
    jobs = []
    for arch in aot.ARCHS:
        for dt in ("bf16", "fp16", "fp32"):
            for act in M.GATE_ACTS.values():
                p = "*" + dt
                fwd = dict(g_ptr=p, u_ptr=p, h_ptr=p, numel=2**33)  # > 2**31 elements: int64 offsets
                bwd = dict(dh_ptr=p, g_ptr=p, u_ptr=p, dg_ptr=p, du_ptr=p, numel=2**33)
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
