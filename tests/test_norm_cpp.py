"""C++ RMSNorm / add + RMSNorm kernels (backend ``cpp``, csrc/norm.cpp): opcheck of the registered ops, parity
against fp64, the torch backend (HF's eager ops) and the Triton kernels in the interpreter, the saved-for-backward
contract, thread-count independence, torch.compile tracing and a patched tiny Llama running its norms on them."""

from __future__ import annotations

import pytest
import torch
from _models import BUILDERS, OpCalls, batch
from _norm_cases import (
    DTYPES,
    EPS,
    FORMS,
    FP32_TOL,
    LOW_ATOL,
    _add_rms_references,
    _err,
    _hf_module,
    _input,
    _one_thread,  # noqa: F401 (the module's autouse fixture, imported to be used)
    _ref_rms,
    _run,
    _saved,
    _weight,
)

from peftfast import _ext
from peftfast.modules import norm as norm_mod
from peftfast.ops import norm as N
from peftfast.ops.norm import add_rms_norm, rms_norm
from peftfast.patching.norms import install_norms, uninstall_norms

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"peftfast._C not built: {_ext.status()}")

SHAPES = ["2d", "3d", "rows", "3d-step", "transposed"]


def _check_all(got, ref, eager, torch_be, dtype, what):
    """cpp within FP32_TOL (fp32) or 2x the eager error (+LOW_ATOL) of fp64, and no further from the torch backend
    than that backend is from fp64 plus one rounding."""
    eps = torch.finfo(dtype).eps
    for i, (a, r) in enumerate(zip(got, ref)):
        err = _err(a, r)
        bound = FP32_TOL if dtype == torch.float32 else 2 * _err(eager[i], r) + LOW_ATOL
        assert err <= bound, f"{what}: output {i}: error {err:.2e} > {bound:.2e}"
        gap = _err(a, torch_be[i])
        assert gap <= 2 * _err(torch_be[i], r) + eps, f"{what}: output {i}: cpp vs torch backend {gap:.2e}"


# ----------------------------------------------------------------------------------------------------------------
# the registered ops
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,add_one,round_normed", [(torch.bfloat16, False, True), (torch.float32, True, False),
                                                         (torch.float16, False, False)])
def test_opcheck(dtype, add_one, round_normed):
    x = torch.randn(4, 10, 33).to(dtype)[:, ::2]
    r = torch.randn(4, 5, 33).to(dtype)
    w = torch.randn(33).to(dtype)
    fwd, bwd = torch.ops.peftfast.rms_norm_fwd, torch.ops.peftfast.rms_norm_bwd
    for res in (None, r):
        torch.library.opcheck(fwd, (x, res, w, EPS, add_one, round_normed))
    _, _, rstd = fwd(x, None, w, EPS, add_one, round_normed)
    dy = torch.randn(4, 5, 33).to(dtype)
    for dh, need_dx, need_dw in [(None, True, True), (r, True, False), (None, False, True), (r, False, False)]:
        torch.library.opcheck(bwd, (dy, x, w, rstd, dh, add_one, round_normed, need_dx, need_dw))
    # Llama's form with an fp32 weight on a bf16 input: y and dy are fp32
    w32 = torch.randn(33)
    y, _, rstd = fwd(x, None, w32, EPS, False, True)
    assert y.dtype == torch.promote_types(dtype, torch.float32)
    torch.library.opcheck(fwd, (x, None, w32, EPS, False, True))
    torch.library.opcheck(bwd, (torch.randn(y.shape, dtype=y.dtype), x, w32, rstd, None, False, True, True, True))


@pytest.mark.parametrize("form", FORMS)
def test_fp64_kernels_match_the_maths(form):
    """In fp64 the kernels have nothing to round: they must equal the formula (and its autograd) to 1e-12."""
    add_one, round_normed = N.FORMS[form]
    x = torch.randn(3, 9, 40, dtype=torch.float64)
    r = torch.randn(3, 9, 40, dtype=torch.float64)
    w = torch.randn(40, dtype=torch.float64)
    dy, dh = torch.randn(3, 9, 40, dtype=torch.float64), torch.randn(3, 9, 40, dtype=torch.float64)
    y, h, rstd = torch.ops.peftfast.rms_norm_fwd(x, r, w, EPS, add_one, round_normed)
    assert rstd.dtype == torch.float64 and torch.equal(h, x + r)
    h64 = (x + r).requires_grad_()
    w64 = w.clone().requires_grad_()
    want = _ref_rms(h64, w64, form)
    dx_ref, dw_ref = torch.autograd.grad((want, h64), (h64, w64), (dy, dh))
    dx, dw = torch.ops.peftfast.rms_norm_bwd(dy, h, w, rstd, dh, add_one, round_normed, True, True)
    for got, ref in ((y, want), (dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(got, ref.detach(), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# parity through the public ops
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_cpp_matches_fp64_and_torch_backend(dtype, form, shape):
    x = _input(shape, dtype)
    w = _weight(x.shape[-1], dtype, form)
    g = torch.randn(x.shape).to(dtype)
    with OpCalls() as calls:
        got = _run(lambda a, b: rms_norm(a, b, EPS, form=form, backend="cpp"), [x, w], [g])
    assert calls.count() == {"rms_norm_fwd": 1, "rms_norm_bwd": 1}
    ref = _run(lambda a, b: _ref_rms(a, b, form), [x.detach().double().requires_grad_(),
                                                  w.detach().double().requires_grad_()], [g.double()])
    hf = _hf_module(form, w.detach())
    eager = _run(lambda a, b: torch.func.functional_call(hf, {"weight": b}, (a,)), [x, w], [g])
    torch_be = _run(lambda a, b: rms_norm(a, b, EPS, form=form, backend="torch"), [x, w], [g])
    assert got[0].shape == x.shape
    _check_all(got, ref, eager, torch_be, dtype, f"rms_norm {form} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", ["2d", "rows", "3d-step"])
def test_add_rms_norm_cpp_matches_fp64_and_torch_backend(dtype, form, shape):
    x, res = _input(shape, dtype), _input(shape, dtype)
    w = _weight(x.shape[-1], dtype, form)
    gy, gh = torch.randn(x.shape).to(dtype), torch.randn(x.shape).to(dtype)
    y, h = add_rms_norm(x, res, w, EPS, form=form, backend="cpp")
    assert torch.equal(h, x + res), "h must be the eager add, rounded the same way"
    got = _run(lambda a, r, b: add_rms_norm(a, r, b, EPS, form=form, backend="cpp"), [x, res, w], [gy, gh])
    ref, eager_fn = _add_rms_references(h, w, form, gy, gh)
    eager = _run(eager_fn, [x, res, w], [gy, gh])
    torch_be = _run(lambda a, r, b: add_rms_norm(a, r, b, EPS, form=form, backend="torch"), [x, res, w], [gy, gh])
    _check_all(got, ref, eager, torch_be, dtype, f"add_rms_norm {form} {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["llama", "gemma", "olmo2", "add-llama", "add-gemma"])
def test_cpp_matches_triton_interpreter(dtype, op):
    """Same rounding points as the Triton kernels: within one rounding of each other (fp32 statistics either way)."""
    form = op.removeprefix("add-")
    x = _input("rows", dtype)
    w = _weight(80, dtype, form)
    g = torch.randn(x.shape).to(dtype)
    if op.startswith("add"):
        r = torch.randn(37, 80).to(dtype).requires_grad_()
        outs = {be: _run(lambda a, rr, b: add_rms_norm(a, rr, b, EPS, form=form, backend=be), [x, r, w], [g, g])
                for be in ("cpp", "triton")}
    else:
        outs = {be: _run(lambda a, b: rms_norm(a, b, EPS, form=form, backend=be), [x, w], [g])
                for be in ("cpp", "triton")}
    tol = 4 * FP32_TOL if dtype == torch.float32 else torch.finfo(dtype).eps
    for i, (a, b) in enumerate(zip(outs["cpp"], outs["triton"])):
        assert _err(a, b) <= tol, (op, i, _err(a, b))


def test_llama_form_with_fp32_weight_promotes_like_hf():
    x = torch.randn(6, 40).to(torch.bfloat16).requires_grad_()
    w = _weight(40, torch.float32)
    hf = _hf_module("llama", w.detach())
    want = hf(x)
    got = rms_norm(x, w, EPS, backend="cpp")
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g = torch.randn(6, 40)
    dx, dw = torch.autograd.grad(got, (x, w), g)
    hf.weight.requires_grad_(True)
    dx_hf, dw_hf = torch.autograd.grad(hf(x), (x, hf.weight), g)
    assert dw.dtype == torch.float32 and dx.dtype == torch.bfloat16
    torch.testing.assert_close(dw, dw_hf, rtol=1e-5, atol=1e-5)
    assert _err(dx, dx_hf) <= 8e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_forward_within_one_ulp_of_the_hf_module(dtype):
    for form in FORMS:
        x = torch.randn(5, 7, 80).to(dtype)
        w = _weight(80, dtype, form).detach()
        want = _hf_module(form, w)(x)
        got = rms_norm(x, w, EPS, form=form, backend="cpp")
        ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(1.0)
        assert got.dtype == want.dtype and ((got.float() - want.float()).abs() <= ulp).all(), form
        assert (got != want).float().mean() < 0.01, form


# ----------------------------------------------------------------------------------------------------------------
# what is computed and kept
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["rms", "add"])
def test_weight_gradient_only_when_the_weight_needs_one(op):
    x = _input("2d", torch.bfloat16)
    w = _weight(80, torch.bfloat16).requires_grad_(False)

    def fn():
        return rms_norm(x, w, EPS, backend="cpp") if op == "rms" else add_rms_norm(x, x.detach(), w, EPS,
                                                                                 backend="cpp")[0]

    for trains in (False, True):
        w.requires_grad_(trains)
        x.grad = w.grad = None
        y = fn()
        with OpCalls() as calls:
            y.float().sum().backward()
        (name, args), = calls.calls
        assert name == "rms_norm_bwd" and args[-2:] == (True, trains)
        assert (w.grad is not None) == trains and x.grad is not None
    w.requires_grad_(True)
    x.requires_grad_(False)
    with OpCalls() as calls:
        rms_norm(x, w, EPS, backend="cpp").float().sum().backward()
    assert calls.calls[-1][1][-2:] == (False, True) and w.grad is not None


def test_saved_for_backward_is_input_and_row_statistics():
    """No copy of x, no fp32 copy, no normalised output: x (or h), the weight and M fp32 statistics."""
    x = _input("3d-step", torch.bfloat16)
    w = _weight(33, torch.bfloat16)
    y, saved = _saved(lambda: rms_norm(x, w, EPS, backend="cpp"))
    assert len(saved) == 3
    sx, sw, rstd = saved
    assert sx is x and sw is w and rstd.shape == (20,) and rstd.dtype == torch.float32
    res = _input("3d-step", torch.bfloat16)
    (y, h), saved = _saved(lambda: add_rms_norm(x, res, w, EPS, backend="cpp"))
    assert len(saved) == 3 and saved[0].untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
    assert saved[1] is w and saved[2].shape == (20,)


def test_results_do_not_depend_on_the_thread_count():
    x = torch.randn(301, 96).to(torch.bfloat16).requires_grad_()
    w = _weight(96, torch.bfloat16)
    g = torch.randn(301, 96).to(torch.bfloat16)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(_run(lambda a, b: rms_norm(a, b, EPS, backend="cpp"), [x, w], [g]))
    torch.set_num_threads(1)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_empty_input_and_only_h_used():
    x = torch.empty(0, 7, 80, requires_grad=True)
    w = _weight(80, torch.float32)
    y = rms_norm(x, w, EPS, backend="cpp")
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(80))
    x = torch.randn(5, 16, requires_grad=True)
    r = torch.randn(5, 16, requires_grad=True)
    w = _weight(16, torch.float32)
    _, h = add_rms_norm(x, r, w, EPS, backend="cpp")
    gh = torch.randn(5, 16)
    h.backward(gh)
    assert torch.equal(x.grad, gh) and torch.equal(r.grad, gh) and w.grad is None


def test_compiles_without_graph_breaks(monkeypatch):
    # the op itself must trace whole; backend resolution (peftfast/_ext.py, shared by every op) is taken as given
    monkeypatch.setattr(N, "resolve_backend", lambda backend, device: "cpp")
    x = torch.randn(2, 5, 48, requires_grad=True)
    r = torch.randn(2, 5, 48, requires_grad=True)
    w = _weight(48, torch.float32, "gemma")

    def fn(a, rr, b):
        y, h = add_rms_norm(a, rr, b, EPS, form="gemma", backend="cpp")
        return rms_norm(y, b, EPS, form="gemma", backend="cpp") * h

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = _run(compiled, [x, r, w], [torch.ones(2, 5, 48)])
    want = _run(fn, [x, r, w], [torch.ones(2, 5, 48)])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_double_backward_is_a_clear_error():
    x = torch.randn(5, 16, requires_grad=True)
    y = rms_norm(x, _weight(16, torch.float32), EPS, backend="cpp")
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="RMSNorm does not support double backward"):
        dx.sum().backward()


def test_bad_input_gives_clear_errors():
    x = torch.randn(4, 80)
    w = torch.ones(80)
    fwd, bwd = torch.ops.peftfast.rms_norm_fwd, torch.ops.peftfast.rms_norm_bwd
    with pytest.raises(RuntimeError, match="rms_norm_fwd: input has 80 features, the weight has shape \\[81\\]"):
        fwd(x, None, torch.ones(81), EPS, False, True)
    with pytest.raises(RuntimeError, match="rms_norm_fwd: input dtype Long is not supported"):
        fwd(x.long(), None, w, EPS, False, True)
    with pytest.raises(RuntimeError, match="rms_norm_fwd: residual \\[2, 80\\]"):
        fwd(x, x[:2], w, EPS, False, True)
    with pytest.raises(RuntimeError, match="rms_norm_fwd: the last dimension is empty"):
        fwd(torch.randn(4, 0), None, torch.ones(0), EPS, False, True)
    _, _, rstd = fwd(x, None, w, EPS, False, True)
    with pytest.raises(RuntimeError, match="rms_norm_bwd: rstd must be Float \\[4\\]"):
        bwd(x, x, w, rstd[:3], None, False, True, True, True)
    with pytest.raises(RuntimeError, match="rms_norm_bwd: grad \\[4, 79\\] does not match"):
        bwd(x[:, :79], x, w, rstd, None, False, True, True, True)
    # the public op names the module before anything reaches the kernel
    with pytest.raises(ValueError, match="'blk.norm'.*80 features"):
        rms_norm(x, torch.ones(81), EPS, backend="cpp", name="blk.norm")
    with pytest.raises(TypeError, match="float64 is not supported"):
        rms_norm(x.double(), w.double(), EPS, backend="cpp")


# ----------------------------------------------------------------------------------------------------------------
# a patched model
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_patched_model_runs_its_norms_on_cpp(arch):
    torch.manual_seed(0)
    model = BUILDERS[arch]()
    with torch.no_grad():  # norms start at 1 (0 for Gemma): make the weight matter
        for mod in model.modules():
            if norm_mod.is_norm(mod):
                mod.weight.add_(torch.randn_like(mod.weight) * 0.3)
    model.train()
    data = batch(arch)

    def loss_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**data).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss0, grads0 = loss_grads()
    report = install_norms(model)  # "auto": cpp on CPU with the extension built
    assert len(report) == 5 and all(reason is None for _, reason in report)
    with OpCalls() as calls:
        loss1, grads1 = loss_grads()
    assert calls.count() == {"rms_norm_fwd": 5, "rms_norm_bwd": 5}
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    assert grads1.keys() == grads0.keys()
    scale = max(g.abs().max().item() for g in grads0.values())
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-4, atol=1e-6 * scale, msg=k)
    uninstall_norms(model)
