"""NF4 on a real GPU: CUDA quantize/dequantize kernels of ``peftfast._C`` and the fused Triton NF4-LoRA GEMMs.

Run with ``PEFTFAST_GPU_TESTS=1 python -m pytest -m gpu`` (``benchmarks/run_gpu.sh``); the interpreter is off then.
"""

import pytest
import torch
import torch.nn.functional as F
from _gpu import GPU_MARKS

from peftfast import _ext
from peftfast.ops.nf4 import dequantize_nf4, nf4_lora_linear, quantize_nf4

pytestmark = GPU_MARKS

DEV = "cuda"


@pytest.mark.parametrize("shape", [(96, 128), (1000, 4096), (4096, 1024)])
def test_cuda_kernels_match_cpu_codes(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    q_cpu, am_cpu = quantize_nf4(w, backend="torch")
    backend = "cpp" if _ext.has_cuda_kernels() else "torch"
    q, am = quantize_nf4(w.to(DEV), backend=backend)
    assert torch.equal(q.cpu(), q_cpu) and torch.equal(am.cpu(), am_cpu)
    for be in ([backend, "triton"]):
        got = dequantize_nf4(q, am, dtype=torch.bfloat16, backend=be)
        want = dequantize_nf4(q_cpu, am_cpu, dtype=torch.bfloat16, backend="torch")
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("m, k, n", [(37, 128, 96), (512, 4096, 1024)])
def test_fused_nf4_lora_matches_dequantized_reference(m, k, n, p):
    g = torch.Generator(device=DEV).manual_seed(1)
    w = torch.randn(n, k, device=DEV, generator=g) / k**0.5
    q, am = quantize_nf4(w)
    wd = dequantize_nf4(q, am, dtype=torch.float64)
    x = torch.randn(m, k, device=DEV, generator=g).bfloat16().requires_grad_()
    a = (torch.randn(16, k, device=DEV, generator=g) / k**0.5).requires_grad_()
    b = (torch.randn(n, 16, device=DEV, generator=g) * 0.1).requires_grad_()
    dy = torch.randn(m, n, device=DEV, generator=g).bfloat16()
    y = nf4_lora_linear(x, q, am, None, a, b, 2.0, dropout_p=p, seed=7, backend="triton")
    y.backward(dy)
    from peftfast.ops.lora import dropout_keep_mask

    keep = dropout_keep_mask(7, 1, m, k, p, device=x.device, backend="triton")[0].double() if p else 1.0
    xr, ar, br = (t.detach().double().requires_grad_() for t in (x, a, b))
    yr = F.linear(xr, wd) + 2.0 * F.linear(F.linear(xr * keep / (1 - p), ar), br)
    yr.backward(dy.double())
    for got, want in ((y, yr), (x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err < 2e-2, err  # bf16 operands, fp32 accumulation


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("m, k, n", [(37, 128, 96), (1024, 4096, 1024)])
def test_qdora_within_twice_eager_error(m, k, n, p):
    """nf4_dora_linear on CUDA (Triton NF4 GEMMs, the norm from dequantized row chunks) against fp64 DoRA maths on
    the dequantized W with the same dropout mask: output and the gradients of x, A, B and the magnitude err no more
    than twice what the same maths in plain bf16 PyTorch (PEFT's eager QDoRA: W dequantized to bf16) does."""
    from peftfast.ops.lora import dropout_keep_mask
    from peftfast.ops.nf4 import nf4_dora_linear

    g = torch.Generator(device=DEV).manual_seed(2)
    q, am = quantize_nf4(torch.randn(n, k, device=DEV, generator=g) / k**0.5)
    x0 = torch.randn(m, k, device=DEV, generator=g).bfloat16()
    a0 = torch.randn(16, k, device=DEV, generator=g) / k**0.5
    b0 = torch.randn(n, 16, device=DEV, generator=g) * 0.1
    mag0 = torch.linalg.norm(dequantize_nf4(q, am, dtype=torch.float32), dim=1) * (1 + 0.2 * torch.rand(
        n, device=DEV, generator=g))
    dy = torch.randn(m, n, device=DEV, generator=g).bfloat16()
    keep = dropout_keep_mask(5, 1, m, k, p, device=DEV, backend="triton")[0] if p else None

    def maths(dt, wdt):
        x, a, b, mag = (t.detach().to(dt).requires_grad_() for t in (x0, a0, b0, mag0))
        w = dequantize_nf4(q, am, dtype=wdt).to(dt)
        xd = x if keep is None else x * keep.to(dt) / (1 - p)
        scale = mag / torch.linalg.norm(w + 2.0 * (b @ a).detach(), dim=1).detach()
        y = F.linear(x, w) + (scale - 1) * F.linear(xd, w) + scale * 2.0 * F.linear(F.linear(xd, a), b)
        y.backward(dy.to(dt))
        return [y.detach().double(), x.grad.double(), a.grad.double(), b.grad.double(), mag.grad.double()]

    exact = maths(torch.float64, torch.float32)
    eager = maths(torch.bfloat16, torch.bfloat16)
    x, a, b, mag = (t.detach().clone().requires_grad_() for t in (x0, a0, b0, mag0))
    y = nf4_dora_linear(x, q, am, None, a, b, 2.0, mag, dropout_p=p, seed=5, backend="triton")
    y.backward(dy)
    ours = [y.detach().double(), x.grad.double(), a.grad.double(), b.grad.double(), mag.grad.double()]
    for r, got, ref in zip(exact, ours, eager):
        assert (got - r).abs().max() <= 2 * (ref - r).abs().max() + 1e-3 * r.abs().max(), (
            (got - r).abs().max().item(), (ref - r).abs().max().item())


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_qdora_mlp_matches_the_layers_on_gpu(p):
    """The QDoRA MLP op on CUDA (Triton NF4 GEMMs, bf16, fp32 adapters) against the same three nf4_dora_linear
    layers one by one with the same seeds: output and every gradient agree to bf16 rounding."""
    from peftfast.ops.nf4 import nf4_dora_linear, nf4_dora_mlp

    g = torch.Generator(device=DEV).manual_seed(4)
    m, k, inter = 512, 1024, 2816

    def proj(n, kk):
        w = torch.randn(n, kk, device=DEV, generator=g) / kk**0.5
        q, am = quantize_nf4(w)
        mag = (torch.linalg.norm(w, dim=1) * 1.1).requires_grad_()
        a = (torch.randn(16, kk, device=DEV, generator=g) / kk**0.5).requires_grad_()
        b = (torch.randn(n, 16, device=DEV, generator=g) * 0.05).requires_grad_()
        return [q, am, 64, None, a, b, 2.0, mag, p]

    gate, up, down = proj(inter, k), proj(inter, k), proj(k, inter)
    x = torch.randn(m, k, device=DEV, generator=g).bfloat16().requires_grad_()
    dy = torch.randn(m, k, device=DEV, generator=g).bfloat16()
    leaves = [x] + [t for pr in (gate, up, down) for t in (pr[4], pr[5], pr[7])]

    def layers():
        def lin(t, pr, seed):
            q, am, bs, bias, a, b, s, mag, pp = pr
            return nf4_dora_linear(t, q, am, bias, a, b, s, mag, dropout_p=pp, seed=seed, backend="triton")
        return lin(F.silu(lin(x, gate, 1)) * lin(x, up, 2), down, 3)

    runs = []
    for fn in (lambda: nf4_dora_mlp(x, gate, up, down, seeds=(1, 2, 3), recompute="up", backend="triton"), layers):
        y = fn()
        runs.append([y.detach().float(), *(t.float() for t in torch.autograd.grad(y, leaves, dy))])
    for j, (a, b) in enumerate(zip(*runs)):
        assert ((a - b).norm() / b.norm().clamp_min(1e-8)).item() < 1e-2, j
