"""Fused Adapter on a real GPU (``PEFTFAST_GPU_TESTS=1 python -m pytest -m gpu``): compiled kernels vs fp64 and
the eager error in the same dtype."""

import pytest
import torch
import torch.nn.functional as F
from _gpu import GPU_MARKS

pytestmark = GPU_MARKS
ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("m,k,h,parallel", [(4099, 1024, 64, False), (777, 4096, 256, True), (37, 80, 24, False)])
def test_fused_adapter_within_twice_eager_error(dtype, act, m, k, h, parallel):
    from peftfast.ops.adapter import adapter_forward

    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * s).to(dtype).requires_grad_()

    x, wd, bd, wu, bu = rnd(m, k), rnd(h, k, s=k**-0.5), rnd(h), rnd(k, h, s=h**-0.5), rnd(k)
    scale = torch.tensor(0.5, device="cuda", dtype=dtype, requires_grad=True)
    res = rnd(m, k) if parallel else None
    leaves = [t for t in (x, wd, bd, wu, bu, scale, res) if t is not None]
    dy = torch.randn(m, k, device="cuda", generator=g).to(dtype)

    def eager(ts, dt):
        x, wd, bd, wu, bu, s, *r = [t.to(dt) for t in ts]
        return (r[0] if r else x) + s * F.linear(ACTS[act](F.linear(x, wd, bd)), wu) + bu

    def run(fn, ls):
        for t in ls:
            t.grad = None
        y = fn()
        y.backward(dy.to(y.dtype))
        return [y.detach().double()] + [t.grad.double() for t in ls]

    got = run(lambda: adapter_forward(x, wd, bd, wu, bu, scale, act=act, residual=res, backend="triton"), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = run(lambda: eager(ref_leaves, torch.float64), ref_leaves)
    low = run(lambda: eager(leaves, dtype), leaves)
    for a, e, r in zip(got, low, ref):
        sc = r.abs().max().clamp_min(1e-6)
        err, base = ((a - r).abs().max() / sc).item(), ((e - r).abs().max() / sc).item()
        assert err <= 2 * base + (1e-5 if dtype == torch.float32 else 1e-3), (err, base)
