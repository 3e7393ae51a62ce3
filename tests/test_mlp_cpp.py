"""C++ gated-activation product (backend ``cpp``, csrc/mlp.cpp): opcheck of the registered ops, ``act(g)·u`` and
its gradients against fp64, the torch backend and the Triton kernels in the interpreter, any strides, and patched
tiny SwiGLU / GeGLU models running their MLP activation on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _models import OpCalls, batch, loss_and_grads, peft_model

import peftfast
from peftfast import _ext
from peftfast.ops import mlp as M
from peftfast.ops.mlp import act_mul, act_mul_backward

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"peftfast._C not built: {_ext.status()}")

ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_TOL = 2e-6


def _pair(kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """g and u (views of leaves that require grad): contiguous, 3-D, column slices, transposed, and one of each
    layout (g sliced, u transposed). g is spread over the activation's curved part and its tails."""
    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(dtype).requires_grad_()

    if kind == "2d":
        return leaf(37, 56, scale=3), leaf(37, 56)
    if kind == "3d":
        return leaf(3, 7, 41, scale=3), leaf(3, 7, 41)
    if kind == "sliced":
        return leaf(37, 70, scale=3)[:, 5:61], leaf(37, 70)[:, 3:59]
    if kind == "transposed":
        return leaf(56, 37, scale=3).t(), leaf(56, 37).t()
    return leaf(37, 70, scale=3)[:, 5:61], leaf(56, 37).t()


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()


def _fwd_bwd(fn, g, u, dh):
    h = fn(g, u)
    dg, du = torch.autograd.grad(h, (g, u), dh)
    return [h.detach().double(), dg.double(), du.double()]


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(act, dtype):
    g, u = _pair("mixed", dtype)
    torch.library.opcheck(torch.ops.peftfast.act_mul_fwd, (g, u, act))  # with the registered autograd
    three_d = (torch.randn(3, 5, 7).to(dtype), torch.randn(3, 5, 7).to(dtype), act)
    torch.library.opcheck(torch.ops.peftfast.act_mul_fwd, three_d)
    dh = torch.randn(37, 56).to(dtype)
    torch.library.opcheck(torch.ops.peftfast.act_mul_bwd, (dh, g.detach(), u.detach(), act))


@pytest.mark.parametrize("act", list(ACTS))
def test_fp64_kernels_match_the_maths(act):
    g = torch.randn(13, 29, dtype=torch.float64) * 4
    u, dh = torch.randn(13, 29, dtype=torch.float64), torch.randn(13, 29, dtype=torch.float64)
    g.requires_grad_()
    u.requires_grad_()
    want = _fwd_bwd(lambda a, b: ACTS[act](a) * b, g, u, dh)
    got = _fwd_bwd(lambda a, b: torch.ops.peftfast.act_mul_fwd(a, b, act), g, u, dh)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["2d", "3d", "sliced", "transposed", "mixed"])
def test_matches_fp64_and_torch_backend(act, dtype, kind):
    g, u = _pair(kind, dtype)
    assert (g.is_contiguous() and u.is_contiguous()) == (kind in ("2d", "3d"))
    dh = torch.randn(g.shape).to(dtype)
    with OpCalls() as calls:
        got = _fwd_bwd(lambda a, b: act_mul(a, b, act, "cpp"), g, u, dh)
    assert calls.count() == {"act_mul_fwd": 1, "act_mul_bwd": 1}
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    ref = _fwd_bwd(lambda a, b: ACTS[act](a) * b, g64, u64, dh.double())
    eager = _fwd_bwd(lambda a, b: ACTS[act](a) * b, g, u, dh)
    # the torch backend's own backward (the one the LoRA-MLP op calls)
    tb = [act_mul(g.detach(), u.detach(), act, "torch").double(),
          *(t.double() for t in act_mul_backward(dh, g.detach(), u.detach(), act, "torch"))]
    # act_mul_backward on backend cpp is the same kernel the autograd runs
    direct = act_mul_backward(dh, g.detach(), u.detach(), act, "cpp")
    assert torch.equal(direct[0].double(), got[1]) and torch.equal(direct[1].double(), got[2])
    eps = torch.finfo(dtype).eps
    for i, (a, r) in enumerate(zip(got, ref)):
        err = _err(a, r)
        bound = FP32_TOL if dtype == torch.float32 else 2 * _err(eager[i], r) + 1e-3
        assert err <= bound, (i, err, bound)
        assert _err(a, tb[i]) <= 2 * _err(tb[i], r) + eps, (i, "cpp vs torch backend")
    assert got[0].shape == g.shape


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_triton_interpreter(act, dtype):
    """fp32 inside and one rounding per output on both: equal up to the exp/erf/tanh implementations."""
    g, u = _pair("2d", dtype)
    dh = torch.randn(g.shape).to(dtype)
    g, u = g.detach(), u.detach()
    cpp = [act_mul(g, u, act, "cpp"), *act_mul_backward(dh, g, u, act, "cpp")]
    tri = [act_mul(g, u, act, "triton"), *act_mul_backward(dh, g, u, act, "triton")]
    tol = 4 * FP32_TOL if dtype == torch.float32 else torch.finfo(dtype).eps
    for i, (a, b) in enumerate(zip(cpp, tri)):
        assert _err(a, b) <= tol, (i, _err(a, b))


def test_empty_and_bad_inputs():
    e = torch.empty(0, 8)
    assert act_mul(e, e, "silu", "cpp").shape == (0, 8)
    assert [t.shape for t in act_mul_backward(e, e, e, "silu", "cpp")] == [(0, 8), (0, 8)]
    g = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="act_mul_fwd: gate \\[4, 8\\] and up \\[4, 7\\] shapes differ"):
        torch.ops.peftfast.act_mul_fwd(g, g[:, :7], "silu")
    with pytest.raises(RuntimeError, match="act_mul_fwd: gate Float and up BFloat16 dtypes differ"):
        torch.ops.peftfast.act_mul_fwd(g, g.bfloat16(), "silu")
    with pytest.raises(RuntimeError, match="act_mul_fwd: dtype Long is not supported"):
        torch.ops.peftfast.act_mul_fwd(g.long(), g.long(), "silu")
    with pytest.raises(RuntimeError, match="act_mul_bwd: unknown activation 'swish'"):
        torch.ops.peftfast.act_mul_bwd(g, g, g, "swish")
    with pytest.raises(RuntimeError, match="act_mul_bwd: grad \\[4, 7\\] Float does not match"):
        torch.ops.peftfast.act_mul_bwd(g[:, :7], g, g, "silu")


def test_double_backward_is_a_clear_error():
    g, u = _pair("2d", torch.float32)
    (dg,) = torch.autograd.grad(act_mul(g, u, "silu", "cpp").sum(), g, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        dg.sum().backward()


def test_compiles_without_graph_breaks():
    g = torch.randn(5, 24, requires_grad=True)
    u = torch.randn(5, 24, requires_grad=True)

    def fn(a, b):
        return act_mul(a, b, "gelu_tanh", "cpp") * 2

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    dh = torch.randn(5, 24)
    for a, b in zip(_fwd_bwd(compiled, g, u, dh), _fwd_bwd(fn, g, u, dh)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("arch,act", [("llama", "silu"), ("gemma", "gelu_tanh")])
def test_patched_model_runs_the_activation_on_cpp(arch, act):
    """peftfast.patch on CPU (backend auto): the fused LoRA-MLP computes act(g)·u with the C++ kernel, forward and
    in backward (where h is rebuilt), and the loss and LoRA gradients match the unpatched model."""
    model = peft_model(arch)
    data = batch(arch)

    loss0, grads0 = loss_and_grads(model, data)
    peftfast.patch(model)
    assert all(e.patched for e in peftfast.report(model).modules if e.kind == "mlp")
    seen = []
    real = M.act_mul
    M.act_mul = lambda g, u, a, backend: seen.append((a, backend)) or real(g, u, a, backend)
    try:
        with OpCalls() as calls:
            loss1, grads1 = loss_and_grads(model, data)
    finally:
        M.act_mul = real
    assert set(seen) == {(act, "cpp")}
    assert calls.count()["act_mul_fwd"] == 4 and calls.count()["act_mul_bwd"] == 2  # 2 layers: forward + rebuilt h
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    assert grads1.keys() == grads0.keys()
    scale = max(g.abs().max().item() for g in grads0.values())
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-4, atol=1e-5 * scale, msg=k)


def test_every_simd_level_passes_the_cpu_kernel_tests():
    """The element-wise C++ loops (gated activation, RMSNorm, Adapter, NF4, RoPE) are compiled for the baseline ISA
    and for AVX2+FMA and picked at run time (csrc/simd.h): this process tested AVX2+FMA where the CPU has it, and the
    same kernel tests run again on the baseline loops in a process capped by PEFTFAST_CPU_SIMD=scalar (AVX-512 CPUs
    run the AVX2+FMA loops too: only the Philox masks have an AVX-512 path, tested in test_lora_cpp)."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    files = [os.path.join(here, f) for f in ("test_mlp_cpp.py", "test_norm_cpp.py", "test_adapter_cpp.py",
                                             "test_nf4.py",
                                             "test_rope.py::test_cpp_kernel_matches_the_torch_backend_on_any_strides")]
    for cap in ["scalar"]:
        env = {**os.environ, "PEFTFAST_CPU_SIMD": cap}
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
                              "not opcheck and not every_simd_level", *files], env=env, capture_output=True,
                             text=True, timeout=600, cwd=here)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
        assert " passed" in out.stdout.splitlines()[-1], out.stdout[-500:]
        level = subprocess.run([sys.executable, "-c", "from peftfast import _ext; print(_ext.build_info()['simd'])"],
                               env=env, capture_output=True, text=True, timeout=120)
        assert level.stdout.split()[-1] == cap, level.stderr[-2000:]
