"""Fused attention on a real GPU (``PEFTFAST_GPU_TESTS=1 python -m pytest -m gpu``): compiled kernels against an
fp32 reference, error ≤ 2x that of PyTorch's own computation in the same dtype."""

import math

import pytest
import torch
from _attention_ref import reference_attention as _ref
from _gpu import GPU_MARKS

pytestmark = GPU_MARKS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 80, 128, 256])
@pytest.mark.parametrize("causal,softcap,window,seg", [(True, None, None, None), (False, None, None, None),
                                                       (True, 30.0, 128, None), (True, None, None, "padding"),
                                                       (False, None, (65, 65), "padding")])  # ModernBERT local
def test_triton_attention_within_twice_torch_error(dtype, d, causal, softcap, window, seg):
    from peftfast.ops.attention import flash_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    b, hq, hk, s = 2, 8, 2, 777
    q, k, v = (torch.randn(b, s, h, d, device="cuda", generator=g).transpose(1, 2).to(dtype).requires_grad_()
               for h in (hq, hk, hk))
    qseg = kseg = None
    if seg:
        kseg = torch.zeros(b, s, dtype=torch.int32, device="cuda")
        kseg[0, 500:] = -1
        qseg = kseg.clone()
        qseg[qseg == -1] = -3
    scale = 1 / math.sqrt(d)
    dy = torch.randn(b, s, hq, d, device="cuda", generator=g).to(dtype)
    window, right = window if isinstance(window, tuple) else (window, None)

    def run(fn, leaves):
        for t in leaves:
            t.grad = None
        o = fn()
        o.backward(dy.to(o.dtype))
        return [o.detach().float()] + [t.grad.float() for t in leaves]

    got = run(lambda: flash_attention(q, k, v, causal=causal, scale=scale, softcap=softcap, window=window,
                                      window_right=right, qseg=qseg, kseg=kseg, backend="triton"), [q, k, v])
    rl = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = run(lambda: _ref(*rl, causal, scale, softcap, window, qseg, kseg, torch.float32, window_right=right), rl)
    low = run(lambda: _ref(q, k, v, causal, scale, softcap, window, qseg, kseg, dtype, window_right=right),
              [q, k, v])
    for a, e, r in zip(got, low, ref):
        assert (a - r).abs().max() <= 2 * (e - r).abs().max() + 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("trainable", [False, True])
def test_triton_attention_with_a_score_bias(dtype, d, trainable):
    """T5's shape: a position bias [1, H, S, S] shared by the batch, padding; the bias's gradient when it trains."""
    from peftfast.ops.attention import flash_attention

    g = torch.Generator(device="cuda").manual_seed(1)
    b, h, s = 2, 8, 515
    q, k, v = (torch.randn(b, s, h, d, device="cuda", generator=g).transpose(1, 2).to(dtype).requires_grad_()
               for _ in range(3))
    bias = (torch.randn(1, h, s, s, device="cuda", generator=g) * 3).to(dtype).requires_grad_(trainable)
    kseg = torch.zeros(b, s, dtype=torch.int32, device="cuda")
    kseg[1, 400:] = -1
    qseg = kseg.clone()
    qseg[qseg == -1] = -3
    dy = torch.randn(b, s, h, d, device="cuda", generator=g).to(dtype)
    leaves = [q, k, v] + ([bias] if trainable else [])

    def run(fn, ls):
        for t in ls:
            t.grad = None
        o = fn()
        o.backward(dy.to(o.dtype))
        return [o.detach().float()] + [t.grad.float() for t in ls]

    got = run(lambda: flash_attention(q, k, v, scale=1.0, qseg=qseg, kseg=kseg, bias=bias, backend="triton"), leaves)
    rl = [t.detach().float().requires_grad_() for t in leaves]
    rb = rl[3] if trainable else bias.detach().float()
    ref = run(lambda: _ref(*rl[:3], False, 1.0, None, None, qseg, kseg, torch.float32, bias=rb), rl)
    low = run(lambda: _ref(q, k, v, False, 1.0, None, None, qseg, kseg, dtype, bias=bias), leaves)
    for a, e, r in zip(got, low, ref):
        assert (a - r).abs().max() <= 2 * (e - r).abs().max() + 1e-3
