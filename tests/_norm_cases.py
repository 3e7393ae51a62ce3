"""Inputs, references and helpers shared by the norm tests (``test_norm.py``: torch/Triton backends;
``test_norm_cpp.py``: the C++ kernels)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

from peftfast.ops import norm as N

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMS = list(N.FORMS)
HF_CLASS = {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm, "olmo2": Olmo2RMSNorm}
EPS = 1e-5
LOW_ATOL = 1e-3  # added to 2x the eager module's own error in fp16 / bf16
FP32_TOL = 2e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: intra-op threads only add synchronisation (50x slower matmuls on a loaded 2-core machine)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _input(kind: str, dtype: torch.dtype) -> torch.Tensor:
    """A fresh input requiring grad: contiguous 2-D / 3-D, rows of a wider tensor (row stride 100), a step along
    the sequence (leading dims that do not flatten) or a transposed view (column stride 37)."""
    if kind == "2d":
        return torch.randn(37, 80).to(dtype).requires_grad_()
    if kind == "3d":
        return torch.randn(3, 7, 48).to(dtype).requires_grad_()
    if kind == "rows":
        return torch.randn(37, 100).to(dtype).requires_grad_()[:, 10:90]
    if kind == "transposed":
        return torch.randn(80, 37).to(dtype).requires_grad_().t()
    return torch.randn(4, 10, 33).to(dtype).requires_grad_()[:, ::2]


def _weight(n: int, dtype: torch.dtype, form: str = "llama") -> torch.Tensor:
    w = torch.randn(n) * 0.3 + (0.0 if form == "gemma" else 1.0)
    return w.to(dtype).requires_grad_()


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()


def _ref_rms(x: torch.Tensor, w: torch.Tensor, form: str) -> torch.Tensor:
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return n * (1 + w) if form == "gemma" else n * w


def _run(fn, inputs, grads):
    """Outputs and input gradients of ``fn(*inputs)`` for output gradients ``grads``, all as fp64."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    want = [t for t in inputs if t.requires_grad]
    got = torch.autograd.grad(outs, want, grads[:len(outs)])
    return [o.detach().double() for o in outs] + [g.double() for g in got]


def _hf_module(form: str, w: torch.Tensor) -> nn.Module:
    mod = HF_CLASS[form](w.shape[0], eps=EPS).to(w.dtype)
    with torch.no_grad():
        mod.weight.copy_(w)
    return mod


def _add_rms_references(h: torch.Tensor, w: torch.Tensor, form: str, gy: torch.Tensor, gh: torch.Tensor):
    """fp64 reference of ``add_rms_norm`` from the rounded h it returned (what the model carries on): outputs
    (y, h) and gradients (dx = dres = dh + ∂y/∂h · dy, dw); and the eager function (add, then the HF module)."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = _ref_rms(h64, w64, form)
    dh, dw = torch.autograd.grad((y64, h64), (h64, w64), (gy.double(), gh.double()))
    hf = _hf_module(form, w.detach())

    def eager_fn(a, r, b):
        hh = a + r
        return torch.func.functional_call(hf, {"weight": b}, (hh,)), hh

    return [y64.detach(), h64.detach(), dh, dh, dw], eager_fn


def _saved(fn):
    """``fn()`` and every tensor its graph saved for backward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved
