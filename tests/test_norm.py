"""Fused RMSNorm / add + RMSNorm / LayerNorm: op parity against fp64 (both backends), rounding against Hugging Face's
eager modules, the saved-for-backward contract, launches, which modules qualify, and model-level patching."""

from __future__ import annotations

import copy
import functools
import pickle
import types

import pytest
import torch
from _models import BUILDERS, batch, cpp_or_skip, peft_model
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
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from peftfast.bench import count_work_ops
from peftfast.modules import norm as norm_mod
from peftfast.ops import _counters
from peftfast.ops import norm as N
from peftfast.ops.norm import add_rms_norm, layer_norm, rms_norm
from peftfast.patching.norms import install_norms, uninstall_norms

BACKENDS = ["torch", "triton"]


SHAPES = ["2d", "3d", "rows", "3d-step"]


def _compare(got, ref, eager, dtype, what):
    for i, (a, r) in enumerate(zip(got, ref)):
        err = _err(a, r)
        bound = FP32_TOL if dtype == torch.float32 else 2 * _err(eager[i], r) + LOW_ATOL
        assert err <= bound, f"{what}: output {i}: error {err:.2e} > {bound:.2e}"


# ----------------------------------------------------------------------------------------------------------------
# op parity
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_fp64(backend, dtype, form, shape):
    x = _input(shape, dtype)
    w = _weight(x.shape[-1], dtype, form)
    g = torch.randn(x.shape).to(dtype)
    got = _run(lambda a, b: rms_norm(a, b, EPS, form=form, backend=backend), [x, w], [g])
    ref = _run(lambda a, b: _ref_rms(a, b, form), [x.detach().double().requires_grad_(),
                                                  w.detach().double().requires_grad_()], [g.double()])
    hf = _hf_module(form, w.detach())
    eager = _run(lambda a, b: torch.func.functional_call(hf, {"weight": b}, (a,)), [x, w], [g])
    assert got[0].shape == x.shape
    _compare(got, ref, eager, dtype, f"rms_norm {form}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["llama", "gemma"])
@pytest.mark.parametrize("shape", ["2d", "rows", "3d-step"])
def test_add_rms_norm_matches_fp64(backend, dtype, form, shape):
    x = _input(shape, dtype)
    res = _input(shape, dtype)
    w = _weight(x.shape[-1], dtype, form)
    gy, gh = torch.randn(x.shape).to(dtype), torch.randn(x.shape).to(dtype)
    y, h = add_rms_norm(x, res, w, EPS, form=form, backend=backend)
    assert torch.equal(h, x + res), "h must be the eager add, rounded the same way"
    got = _run(lambda a, r, b: add_rms_norm(a, r, b, EPS, form=form, backend=backend), [x, res, w], [gy, gh])
    ref, eager_fn = _add_rms_references(h, w, form, gy, gh)
    eager = _run(eager_fn, [x, res, w], [gy, gh])
    _compare(got, ref, eager, dtype, f"add_rms_norm {form}")


def _ref_ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    y = xc * torch.rsqrt((xc * xc).mean(-1, keepdim=True) + EPS) * w
    return y if b is None else y + b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,bias", [(s, True) for s in SHAPES] + [("2d", False)])
def test_layer_norm_matches_fp64(backend, dtype, shape, bias):
    x = _input(shape, dtype)
    n = x.shape[-1]
    x = x * 2 + 3 if shape == "2d" else x  # a large mean: the two-pass variance must not cancel
    w = _weight(n, dtype)
    b = (torch.randn(n) * 0.5).to(dtype).requires_grad_() if bias else None
    g = torch.randn(x.shape).to(dtype)
    params = [w] + ([b] if bias else [])
    got = _run(lambda a, *p: layer_norm(a, p[0], p[1] if bias else None, EPS, backend=backend), [x, *params], [g])
    ref64 = [t.detach().double().requires_grad_() for t in (x, *params)]
    ref = _run(lambda a, *p: _ref_ln(a, p[0], p[1] if bias else None), ref64, [g.double()])
    eager = _run(lambda a, *p: torch.nn.functional.layer_norm(a, (n,), p[0], p[1] if bias else None, EPS),
                 [x, *params], [g])
    _compare(got, ref, eager, dtype, "layer_norm")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_forward_rounds_like_the_hf_module(form, dtype):
    """The torch backend runs HF's own ops (bit-identical); the kernels differ only where fp32 statistics do."""
    x = torch.randn(5, 7, 80).to(dtype)
    w = _weight(80, dtype, form).detach()
    want = _hf_module(form, w)(x)
    assert torch.equal(rms_norm(x, w, EPS, form=form, backend="torch"), want)
    got = rms_norm(x, w, EPS, form=form, backend="triton")
    assert got.dtype == want.dtype
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(1.0)
    assert ((got.float() - want.float()).abs() <= ulp).all()
    assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_form_with_fp32_weight_promotes_like_hf(backend):
    x = torch.randn(6, 40).to(torch.bfloat16)
    w = _weight(40, torch.float32).detach()
    want = _hf_module("llama", w)(x)
    got = rms_norm(x, w, EPS, backend=backend)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# rows wider than one block: chunked kernels and the column-parallel weight-gradient kernel
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(N, "MAX_BLOCK_N", 32)
    monkeypatch.setattr(N, "CHUNK_N", 32)
    monkeypatch.setattr(N, "DW_BLOCK_N", 32)
    monkeypatch.setattr(N, "DW_BLOCK_M", 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["llama", "gemma", "olmo2", "add-llama", "layer"])
def test_chunked_rows(small_chunks, dtype, op):
    assert N.norm_config(80).chunked
    x = torch.randn(11, 100).to(dtype).requires_grad_()[:, 10:90]  # 80 columns: chunks of 32, 32 and 16
    w = _weight(80, dtype, op.removeprefix("add-"))
    g = torch.randn(x.shape).to(dtype)
    with _counters.count_launches() as launches:
        if op == "layer":
            b = torch.randn(80).to(dtype).requires_grad_()
            got = _run(lambda a, p, q: layer_norm(a, p, q, EPS, backend="triton"), [x, w, b], [g])
            want = _run(lambda a, p, q: layer_norm(a, p, q, EPS, backend="torch"), [x, w, b], [g])
        elif op.startswith("add"):
            r = torch.randn(11, 80).to(dtype)
            got = _run(lambda a, rr, p: add_rms_norm(a, rr, p, EPS, backend="triton"), [x, r, w], [g, g])
            want = _run(lambda a, rr, p: add_rms_norm(a, rr, p, EPS, backend="torch"), [x, r, w], [g, g])
        else:
            got = _run(lambda a, p: rms_norm(a, p, EPS, form=op, backend="triton"), [x, w], [g])
            want = _run(lambda a, p: rms_norm(a, p, EPS, form=op, backend="torch"), [x, w], [g])
    tol = 2e-6 if dtype == torch.float32 else 8e-3
    for a, b in zip(got, want):
        assert _err(a, b) <= tol
    assert launches["_norm_dw_kernel"] == 1 and sum(launches.values()) == 3


def test_real_wide_rows_use_chunks():
    n = 8200
    assert N.norm_config(n).chunked and not N.norm_config(8192).chunked
    x = torch.randn(3, n, requires_grad=True)
    w = _weight(n, torch.float32)
    g = torch.randn(3, n)
    got = _run(lambda a, p: rms_norm(a, p, EPS, backend="triton"), [x, w], [g])
    ref = _run(lambda a, p: _ref_rms(a, p, "llama"), [x.detach().double().requires_grad_(),
                                                      w.detach().double().requires_grad_()], [g.double()])
    for a, r in zip(got, ref):
        assert _err(a, r) <= FP32_TOL


# ----------------------------------------------------------------------------------------------------------------
# gradients that are not needed are not computed; memory contract; launches
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["rms", "add", "layer"])
def test_frozen_weight_gets_no_gradient_and_none_is_computed(backend, op):
    x = _input("2d", torch.bfloat16)
    w = _weight(80, torch.bfloat16).requires_grad_(False)
    b = torch.zeros(80, dtype=torch.bfloat16, requires_grad=False)
    fns = {"rms": lambda a, ww: rms_norm(a, ww, EPS, backend=backend),
           "add": lambda a, ww: add_rms_norm(a, a.detach(), ww, EPS, backend=backend)[0],
           "layer": lambda a, ww: layer_norm(a, ww, b, EPS, backend=backend)}
    y = fns[op](x, w)
    _, ops = count_work_ops(lambda: y.float().sum().backward())
    assert w.grad is None and x.grad is not None
    assert ops.aten["sum"] == 1, "only the loss's own sum: no weight-gradient reduction"
    w.requires_grad_(True)
    y = fns[op](x, w)
    _, ops_trained = count_work_ops(lambda: y.float().sum().backward())
    assert w.grad is not None
    assert ops_trained.aten["sum"] > ops.aten["sum"], "the weight gradient is a reduction the frozen path skips"


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_without_grad_gets_only_the_weight_gradient(backend):
    x = torch.randn(37, 80)
    w = _weight(80, torch.float32)
    g = torch.randn(37, 80)
    rms_norm(x, w, EPS, backend=backend).backward(g)
    w64 = w.detach().double().requires_grad_()
    _ref_rms(x.double(), w64, "llama").backward(g.double())
    assert x.grad is None and _err(w.grad, w64.grad) <= FP32_TOL


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_for_backward_is_input_and_row_statistics(backend):
    dt = torch.bfloat16
    x = (torch.randn(3, 7, 48).to(dt) * 1).requires_grad_()
    w = _weight(48, dt)
    m = 21
    # RMSNorm: x (a view of it, no copy), the weight, rstd
    y, saved = _saved(lambda: rms_norm(x, w, EPS, backend=backend))
    assert len(saved) == 3
    sx, sw, rstd = saved
    assert _same_storage(sx, x) and sx.shape == (m, 48) and sw is w
    assert rstd.shape == (m,) and rstd.dtype == torch.float32
    # add + RMSNorm: h (the output the next block keeps), the weight, rstd; neither x nor the residual
    res = torch.randn(3, 7, 48).to(dt).requires_grad_()
    (y, h), saved = _saved(lambda: add_rms_norm(x, res, w, EPS, backend=backend))
    assert len(saved) == 3 and _same_storage(saved[0], h) and saved[1] is w
    assert saved[2].shape == (m,) and saved[2].dtype == torch.float32
    # LayerNorm: x, weight, bias, mean, rstd
    b = torch.randn(48).to(dt).requires_grad_()
    y, saved = _saved(lambda: layer_norm(x, w, b, EPS, backend=backend))
    assert len(saved) == 5 and _same_storage(saved[0], x) and saved[1] is w and saved[2] is b
    assert all(s.shape == (m,) and s.dtype == torch.float32 for s in saved[3:])


def test_hf_eager_rmsnorm_saves_more():
    """The baseline this replaces: HF's eager LlamaRMSNorm keeps an fp32 copy of x and the normalised output."""
    x = (torch.randn(21, 48).to(torch.bfloat16) * 1).requires_grad_()
    hf = _hf_module("llama", _weight(48, torch.bfloat16).detach()).requires_grad_(True)
    _, saved = _saved(lambda: hf(x))
    big = {s.untyped_storage().data_ptr(): s.untyped_storage().nbytes() for s in saved if s.numel() == x.numel()}
    assert sum(big.values()) == 3 * x.numel() * 2  # fp32 copy (2 hidden vectors) + bf16 normalised (1)


@pytest.mark.parametrize("op,fwd,bwd", [("rms", "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"),
                                        ("add", "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"),
                                        ("layer", "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel")])
def test_one_launch_each_way(op, fwd, bwd):
    x = _input("3d", torch.float16)
    w = _weight(48, torch.float16)
    b = torch.randn(48).half().requires_grad_()
    with _counters.count_launches() as f:
        if op == "rms":
            y = rms_norm(x, w, EPS, backend="triton")
        elif op == "add":
            y = sum(add_rms_norm(x, x.detach() * 2, w, EPS, backend="triton"))
        else:
            y = layer_norm(x, w, b, EPS, backend="triton")
    with _counters.count_launches() as bk:
        y.float().sum().backward()
    assert dict(f) == {fwd: 1} and dict(bk) == {bwd: 1}
    with _counters.count_launches() as t:
        rms_norm(x, w, EPS, backend="torch").sum().backward()
    assert not t


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    x = torch.empty(0, 7, 80, requires_grad=True)
    w = _weight(80, torch.float32)
    y = rms_norm(x, w, EPS, backend=backend)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(80))
    b = torch.zeros(80, requires_grad=True)
    layer_norm(x, w, b, EPS, backend=backend).sum().backward()
    assert torch.equal(b.grad, torch.zeros(80))


def test_bad_inputs_name_the_module():
    x = torch.randn(4, 80)
    w = torch.ones(80)
    with pytest.raises(ValueError, match="'blk.norm'.*80 features.*\\(81,\\)"):
        rms_norm(x, torch.ones(81), EPS, name="blk.norm")
    with pytest.raises(TypeError, match="'n'.*floating-point"):
        rms_norm(x.long(), w, EPS, name="n")
    with pytest.raises(TypeError, match="float64 is not supported"):
        rms_norm(x.double(), w.double(), EPS)
    with pytest.raises(ValueError, match="unknown form"):
        rms_norm(x, w, EPS, form="t5")
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, x[:2], w, EPS)
    with pytest.raises(ValueError, match="bias"):
        layer_norm(x, w, torch.ones(3), EPS)


# ----------------------------------------------------------------------------------------------------------------
# which modules qualify
# ----------------------------------------------------------------------------------------------------------------
class MyRMSNorm(nn.Module):
    """A copy of Llama's norm under another name, argument name and comments: recognised by its formula."""

    def __init__(self, n: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Docstrings, annotations and comments do not matter."""
        input_dtype = inputs.dtype
        inputs = inputs.to(torch.float32)  # upcast
        variance = inputs.pow(2).mean(-1, keepdim=True)
        inputs = inputs * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * inputs.to(input_dtype)


class ScaledRMSNorm(MyRMSNorm):
    def forward(self, inputs):
        input_dtype = inputs.dtype
        inputs = inputs.to(torch.float32)
        variance = inputs.pow(2).mean(-1, keepdim=True)
        inputs = inputs * torch.rsqrt(variance + self.variance_epsilon)
        return 2 * self.weight * inputs.to(input_dtype)


class ExtraArgRMSNorm(MyRMSNorm):
    def forward(self, inputs, scale=None):
        return super().forward(inputs)


class PermutedLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _hf(module: str, cls: str, *args):
    import importlib

    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)(*args)


def test_recognised_forms():
    for module, cls, form in [("llama", "LlamaRMSNorm", "llama"), ("mistral", "MistralRMSNorm", "llama"),
                              ("qwen2", "Qwen2RMSNorm", "llama"), ("qwen3", "Qwen3RMSNorm", "llama"),
                              ("phi3", "Phi3RMSNorm", "llama"), ("gemma", "GemmaRMSNorm", "gemma"),
                              ("gemma2", "Gemma2RMSNorm", "gemma"), ("gemma3", "Gemma3RMSNorm", "gemma"),
                              ("olmo2", "Olmo2RMSNorm", "olmo2"), ("t5", "T5LayerNorm", "t5"),
                              ("mt5", "MT5LayerNorm", "t5"), ("longt5", "LongT5LayerNorm", "t5"),
                              ("cohere", "CohereLayerNorm", "cohere"), ("cohere2", "Cohere2LayerNorm", "cohere")]:
        mod = _hf(module, cls, 16)
        assert norm_mod.why_not(mod) is None, cls
        assert norm_mod.rms_form(mod)[0] == form, cls
    assert norm_mod.why_not(MyRMSNorm(16)) is None and norm_mod.rms_form(MyRMSNorm(16)) == ("llama", "variance_epsilon")
    assert norm_mod.why_not(nn.LayerNorm(16)) is None and norm_mod.why_not(nn.LayerNorm(16, bias=False)) is None


def test_unknown_forms_are_skipped_with_a_reason():
    fused_forms = "not a formula peftfast fuses"
    cases = [
        (_hf("gemma3n", "Gemma3nRMSNorm", 16), fused_forms),  # pow(-0.5), optional scale
        (_hf("qwen3_next", "Qwen3NextRMSNormGated", 16), "gate"),
        (ScaledRMSNorm(16), fused_forms),
        (ExtraArgRMSNorm(16), "inputs, scale"),
        (nn.LayerNorm(16, elementwise_affine=False), "affine"),
        (nn.LayerNorm((4, 16)), "2 dims"),
        (PermutedLayerNorm(16), "overrides"),
        (nn.RMSNorm(16), "torch.nn.RMSNorm"),
        (LlamaRMSNorm(16).double(), "float64"),
        (nn.Linear(4, 4), "not a recognised norm"),
    ]
    for mod, why in cases:
        reason = norm_mod.why_not(mod)
        assert reason is not None and why in reason, (type(mod).__name__, reason)
    tensor_eps = LlamaRMSNorm(16)
    tensor_eps.variance_epsilon = torch.tensor(1e-6)
    assert "not a number" in norm_mod.why_not(tensor_eps)
    foreign = LlamaRMSNorm(16)
    foreign.forward = lambda x: x
    assert "replaced on the instance" in norm_mod.why_not(foreign)
    offloaded = LlamaRMSNorm(16)
    offloaded._hf_hook = object()
    offloaded.forward = types.MethodType(LlamaRMSNorm.forward, offloaded)
    assert "accelerate" in norm_mod.why_not(offloaded)


def test_previous_instance_forward_is_restored_exactly():
    mod = LlamaRMSNorm(16)
    prev = types.MethodType(LlamaRMSNorm.forward, mod)
    mod.forward = prev
    report = install_norms(nn.Sequential(mod))
    assert report == [("0", None)] and isinstance(mod.forward, functools.partial)
    assert uninstall_norms(nn.Sequential(mod)) == ["0"]
    assert mod.__dict__["forward"] is prev and not hasattr(mod, "_peftfast_norm")


def test_patched_module_errors_name_it_and_read_eps_at_call_time():
    model = nn.Sequential()
    model.add_module("norm", LlamaRMSNorm(16, eps=1e-6))
    install_norms(model, "triton")
    with pytest.raises(ValueError, match="'norm': input has 17 features"):
        model.norm(torch.randn(2, 17))
    with pytest.raises(TypeError, match="'norm': forward takes one tensor"):
        model.norm(torch.randn(2, 16), torch.randn(2, 16))
    x = torch.randn(3, 16) * 1e-3
    model.norm.variance_epsilon = 1.0  # changed after patching: must be honoured
    torch.testing.assert_close(model.norm(hidden_states=x), LlamaRMSNorm.forward(model.norm, x))
    install_norms(model, "torch")  # idempotent: only the backend changes
    assert model.norm._peftfast_norm.backend == "torch" and model.norm.forward.args == (model.norm,)
    uninstall_norms(model)
    assert "forward" not in model.norm.__dict__


def test_patched_module_pickles_and_deepcopies():
    mod = GemmaRMSNorm(16)
    with torch.no_grad():
        mod.weight.normal_()
    install_norms(nn.Sequential(mod), "triton")
    x = torch.randn(3, 16)
    for clone in (pickle.loads(pickle.dumps(mod)), copy.deepcopy(mod)):
        assert clone.forward.args[0] is clone and clone._peftfast_norm.form == "gemma"
        torch.testing.assert_close(clone(x), mod(x))


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------
def _model(arch: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[arch]().to(dtype)
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma) and LayerNorm biases at 0: make them matter
        for mod in model.modules():
            if norm_mod.is_norm(mod):
                mod.weight.add_(torch.randn_like(mod.weight) * 0.3)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.normal_(0.0, 0.3)
    return model.train()


def _loss_grads(model, data):
    model.zero_grad(set_to_none=True)
    loss = model(**data).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got: dict, want: dict, rtol: float = 1e-4) -> None:
    assert got.keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=1e-6 * scale, msg=k)


NUM_NORMS = {"llama": 5, "qwen2": 5, "gemma": 5, "bert": 6}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(NUM_NORMS))
def test_model_parity_and_exact_restore(arch, backend):
    model = _model(arch)
    data = batch(arch)
    loss0, grads0 = _loss_grads(model, data)
    report = install_norms(model, backend)
    assert len(report) == NUM_NORMS[arch] and all(reason is None for _, reason in report), report
    loss1, grads1 = _loss_grads(model, data)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    _assert_grads_close(grads1, grads0)
    twin = copy.deepcopy(model)
    norms = [m for m in twin.modules() if norm_mod.is_norm(m)]
    assert all(m.forward.args[0] is m for m in norms)
    torch.testing.assert_close(_loss_grads(twin, data)[0], loss1, rtol=0, atol=0)
    assert sorted(uninstall_norms(model)) == sorted(name for name, _ in report)
    assert not any("forward" in m.__dict__ or "_peftfast_norm" in m.__dict__ for m in model.modules())
    loss2, grads2 = _loss_grads(model, data)
    assert torch.equal(loss2, loss0) and all(torch.equal(grads2[k], grads0[k]) for k in grads0)


def test_lora_model_keeps_norms_frozen():
    model = peft_model("llama")
    data = batch("llama")
    loss0, grads0 = _loss_grads(model, data)
    install_norms(model, "triton")
    loss1, grads1 = _loss_grads(model, data)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    _assert_grads_close(grads1, grads0)
    assert all(m.weight.grad is None for m in model.modules() if norm_mod.is_norm(m))


def test_bf16_model_torch_backend_is_bit_identical():
    model = _model("llama", torch.bfloat16)
    data = batch("llama")
    with torch.no_grad():
        want = model(**data).logits
        install_norms(model, "torch")
        assert torch.equal(model(**data).logits, want)
        install_norms(model, "triton")
        got = model(**data).logits
    assert _err(got, want.double()) < 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_t5_form_is_the_llama_form_when_dtypes_agree(backend, monkeypatch):
    """T5LayerNorm casts to the weight's dtype: with input and weight in one dtype that is the llama form (the torch
    backend's output bit-identical; gradients of the input and weight within rounding); a call that mixes dtypes runs
    the module's own forward, whose output dtype follows the weight."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    for dtype in (torch.float32, torch.bfloat16):
        ref = T5LayerNorm(80, eps=1e-6).to(dtype)
        with torch.no_grad():
            ref.weight.normal_(1.0, 0.2)
        mod = copy.deepcopy(ref)
        assert install_norms(nn.Sequential(mod), backend) == [("0", None)] and mod._peftfast_norm.form == "t5"
        x = torch.randn(3, 5, 80).to(dtype)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        got, want = mod(xs[0]), ref(xs[1])
        g = torch.randn_like(want)
        got.backward(g)
        want.backward(g)
        assert got.dtype == want.dtype == dtype
        if backend == "torch":
            assert torch.equal(got, want)
        assert _err(got, want.double()) < 2 * torch.finfo(dtype).eps
        assert _err(xs[0].grad, xs[1].grad.double()) < 8 * torch.finfo(dtype).eps
        assert _err(mod.weight.grad, ref.weight.grad.double()) < 8 * torch.finfo(dtype).eps
    for w_dtype, x_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        ref = T5LayerNorm(80).to(w_dtype)
        mod = copy.deepcopy(ref)
        install_norms(nn.Sequential(mod), backend)
        x = torch.randn(4, 80).to(x_dtype)
        monkeypatch.setattr(norm_mod, "rms_norm", None)  # the fused op must not run
        out = mod(x)
        monkeypatch.undo()
        assert out.dtype == w_dtype and torch.equal(out, ref(x))


# ----------------------------------------------------------------------------------------------------------------
# the model's rebuild scope: norm outputs saved outside fused blocks (the next layer's q/k/v in BERT and GPT-2, the
# attention and MLP of a decoder block left unfused: Gemma 2 / Phi-3 blocks here, their block forwards unbound) are
# rebuilt in backward
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "gpt2", "gemma2", "phi3"])
def test_scope_rebuilds_norm_outputs_outside_fused_blocks(arch):
    from _models import clone, loss_and_grads, max_rel_err, use_shared_seed_dropout

    import peftfast
    from peftfast.bench import saved_activation_bytes
    from peftfast.modules import block as block_mod
    from peftfast.patching.core import _backbone

    model = peft_model(arch, lora_dropout=0.1)
    ref = clone(model)
    peftfast.patch(model)
    unbound = [block_mod.uninstall(m) for m in model.modules() if block_mod.is_block(m)]  # their own forwards
    assert all(unbound) and bool(unbound) == (arch in ("gemma2", "phi3"))
    without = copy.deepcopy(model)  # the same patch, its norms registering with no scope around them
    assert norm_mod.uninstall_scope(_backbone(without))
    use_shared_seed_dropout(ref, model, 0.1)
    data = batch(arch)
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= 2e-5 * abs(ref_loss.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= 2e-5
    totals = []
    for m in (without, model):
        torch.manual_seed(0)
        totals.append(saved_activation_bytes(lambda m=m: m(**data).loss, [*m.parameters(), *m.buffers()])[1].total)
    # per layer two norm outputs whose consumers keep them (q/k/v and the MLP input), less the first layer's input
    # norm (it normalises the frozen embeddings: no gradient, so its input is not kept to rebuild from); the last
    # norm feeds the head, outside the scope
    hidden, layers = model.get_base_model().config.hidden_size, 2
    assert totals[0] - totals[1] == (2 * layers - 1) * data["input_ids"].numel() * hidden * 4, totals


def test_scope_is_off_with_recompute_none_and_removed_by_unpatch():
    import peftfast
    from peftfast.patching.core import _backbone

    model = peft_model("bert")
    peftfast.patch(model, recompute="none")
    backbone = _backbone(model)
    assert "_peftfast_scope" not in backbone.__dict__
    norms = [e for e in peftfast.report(model).modules if e.kind == "norm"]
    assert norms and all(not e.patched and "recompute='none' keeps its output" in e.reason for e in norms)
    peftfast.patch(model)
    assert "_peftfast_scope" in backbone.__dict__ and "forward" in backbone.__dict__
    assert all(e.patched for e in peftfast.report(model).modules if e.kind == "norm")
    peftfast.unpatch(model)
    assert "_peftfast_scope" not in backbone.__dict__ and "forward" not in backbone.__dict__


def test_no_rebuild_of_zero3_partitioned_norm_outputs(monkeypatch):
    """A norm whose weights DeepSpeed ZeRO-3 partitions (marked by ``ds_id``) registers no rebuild of its output:
    the rebuild would run in a consumer's backward, where ZeRO-3 has not gathered the norm's weights. The consumers
    then keep that output, exactly one hidden-wide tensor more, and the gradients stay those of the unpatched
    model."""
    import peftfast
    from peftfast.bench import saved_activation_bytes
    from peftfast.modules import _bind

    # ZeRO-3 checks run only once DeepSpeed is imported (nothing else sets ds_id): as if it were, whatever ran before
    monkeypatch.setattr(_bind, "deepspeed_imported", lambda: True)
    model = peft_model("gpt2")
    ref = copy.deepcopy(model)
    peftfast.patch(model)
    data = batch("gpt2")
    params = [*model.parameters(), *model.buffers()]
    _, before = saved_activation_bytes(lambda: model(**data).loss, params)
    ln = model.base_model.model.transformer.h[1].ln_1
    ln.weight.ds_id = 3  # as deepspeed.initialize marks the parameters it partitions
    _, after = saved_activation_bytes(lambda: model(**data).loss, params)
    assert after.total - before.total == data["input_ids"].numel() * ln.weight.numel() * 4
    for m in (model, ref):
        m.zero_grad()
        m(**data).loss.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("backend", [*BACKENDS, "cpp"])
@pytest.mark.parametrize("op", ["rms", "layer"])
def test_outputs_can_be_modified_in_place(backend, op):
    """A norm's output is a tensor of its own, not a view made inside the op's autograd Function (which autograd
    forbids modifying in place): a model may scale it with ``*=`` and backpropagate through it."""
    cpp_or_skip(backend)
    w = _weight(48, torch.float32).requires_grad_()
    run = (lambda a: rms_norm(a, w, EPS, backend=backend)) if op == "rms" else \
        (lambda a: layer_norm(a, w, None, EPS, backend=backend))
    x = _input("3d", torch.float32).detach().requires_grad_()
    y = run(x)
    y.mul_(3.0)
    y.sum().backward()
    want = x.detach().clone().requires_grad_()
    run(want).sum().backward()
    assert _err(x.grad, 3.0 * want.grad) <= 1e-6



def _cohere_norm(n: int, dtype: torch.dtype) -> nn.Module:
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm

    mod = CohereLayerNorm(n, eps=EPS)
    with torch.no_grad():
        mod.weight.normal_(1.0, 0.3)
    return mod.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)],
                         ids=["fp32", "bf16-fp32-weight", "bf16", "fp16"])
def test_cohere_layer_norm_runs_the_layer_norm_op(backend, dtype, wdtype):
    """Cohere's LayerNorm (no bias; fp32 maths, the input's dtype out, whatever the weight's) on the layer-norm op:
    within fp32 rounding of an fp64 reference (2x eager's error in 16 bits), input and weight gradients included;
    the ATen path is bit-identical to the module; the op keeps the input and two fp32 row statistics where eager
    keeps fp32 copies of the input."""
    n = 48
    ref_mod = _cohere_norm(n, wdtype)
    mod = copy.deepcopy(ref_mod)
    norm_mod.install(mod, "layers.0.input_layernorm", backend)
    assert mod._peftfast_norm.kind == "layer" and mod._peftfast_norm.form == "cohere"
    x = _input("3d", dtype)
    gy = torch.randn(3, 7, n).to(dtype)
    got = _run(lambda a, w: mod(a), [x, mod.weight], [gy])
    eager = _run(lambda a, w: ref_mod(a), [x, ref_mod.weight], [gy])
    x64 = x.detach().double().requires_grad_()
    ref64 = copy.deepcopy(ref_mod).double()
    ref = _run(lambda a, w: ref64(a), [x64, ref64.weight], [gy.double()])
    assert mod(x).dtype == ref_mod(x).dtype == dtype
    _compare(got, ref, eager, dtype if wdtype == dtype else torch.bfloat16, "cohere")
    if backend == "torch":
        assert torch.equal(mod(x), ref_mod(x))
    _, saved = _saved(lambda: mod(x))
    _, saved_eager = _saved(lambda: ref_mod(x))
    fp32_rows = 2 * x.numel() // n * 4
    assert sum(t.numel() * t.element_size() for t in saved if t is not mod.weight) == \
        x.numel() * x.element_size() + fp32_rows
    assert sum(t.numel() * t.element_size() for t in saved_eager if t is not ref_mod.weight) >= 2 * x.numel() * 4
    assert norm_mod.uninstall(mod) and "forward" not in mod.__dict__


def test_cohere_model_norms_fused():
    """A Cohere model (parallel attention and MLP off one LayerNorm): its norms run fused, with the unpatched
    model's loss and gradients; the query/key norms of ``use_qk_norm`` ([heads, head_dim] weights) stay unfused with
    their reason; ``unpatch`` restores them."""
    from peft import LoraConfig, get_peft_model
    from transformers import CohereConfig, CohereForCausalLM

    import peftfast

    torch.manual_seed(0)
    cfg = CohereConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_qk_norm=True)
    model = get_peft_model(CohereForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "layernorm" in name:
                p.normal_(1.0 if "layernorm" in name else 0.0, 0.2)
    ref = copy.deepcopy(model)
    peftfast.patch(model)
    entries = peftfast.report(model).modules
    norms = {e.name.removeprefix("base_model.model.model."): e for e in entries if e.kind == "norm"}
    fused = sorted(n for n, e in norms.items() if e.patched)
    assert fused == ["layers.0.input_layernorm", "layers.1.input_layernorm", "norm"], norms
    qk = [e for n, e in norms.items() if n.split(".")[-1] in ("q_norm", "k_norm")]
    assert len(qk) == 4 and all(not e.patched and e.reason == "weight is not a 1-D tensor" for e in qk), qk
    data = batch("llama")
    loss, grads = _loss_grads(model, data)
    ref_loss, ref_grads = _loss_grads(ref, data)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grads_close(grads, ref_grads)
    peftfast.unpatch(model)
    assert not any("_peftfast_norm" in m.__dict__ for m in model.modules())
