"""Inputs shared by the fused-Adapter op tests (``test_adapter.py``, ``test_adapter_cpp.py``)."""

from __future__ import annotations

import torch


def _tensors(m, k, h, dtype, *, bias=True, learned=False, parallel=False, n=None, lead=None, strided=False):
    """x [*lead or m, k] (stride 2 in the feature dim when ``strided``), W_down [h, k], b_down, W_up [n, h], b_up,
    the scaling (a learned 0-d tensor or 0.7) and, for parallel adapters, the residual; all requiring grad."""
    n = n or k
    if strided:
        x = torch.randn(*(lead or (m,)), 2 * k).to(dtype).requires_grad_()[..., ::2]
    else:
        x = torch.randn(*(lead or (m,)), k).to(dtype).requires_grad_()
    wd = (torch.randn(h, k) / k**0.5).to(dtype).requires_grad_()
    wu = (torch.randn(n, h) / h**0.5).to(dtype).requires_grad_()
    bd = torch.randn(h).to(dtype).requires_grad_() if bias else None
    bu = torch.randn(n).to(dtype).requires_grad_() if bias else None
    s = torch.tensor(0.7, dtype=dtype, requires_grad=True) if learned else 0.7
    res = torch.randn(*x.shape[:-1], n).to(dtype).requires_grad_() if parallel else None
    return x, wd, bd, wu, bu, s, res


def _leaves(*tensors):
    """The tensors among ``tensors`` that require grad (the ones a test takes gradients of)."""
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
