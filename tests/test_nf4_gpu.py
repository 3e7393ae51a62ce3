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
