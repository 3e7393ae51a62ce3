"""C++ bottleneck Adapter kernels (backend ``cpp``, csrc/adapter.cpp): opcheck of the registered ops, outputs and
every gradient against fp64, the torch backend and the Triton kernels in the interpreter, the memory contract (x and
z saved, nothing else), and a model whose adapters run on them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _adapter_cases import _leaves, _tensors
from _models import OpCalls
from transformers import LlamaConfig, LlamaForCausalLM

import peftfast
from peftfast import _ext
from peftfast.ops import adapter as A
from peftfast.ops.adapter import adapter_forward

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"peftfast._C not built: {_ext.status()}")

ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
FP32_TOL = 3e-5


def _reference(x, wd, bd, wu, bu, s, res, act, dtype):
    x, wd, bd, wu, bu, s, res = [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (x, wd, bd, wu, bu, s, res)]
    out = (x if res is None else res) + s * F.linear(ACTS[act](F.linear(x, wd, bd)), wu)
    return out if bu is None else out + bu


def _grads(fn, leaves, g):
    y = fn()
    return [y.detach().double()] + [t.double() for t in torch.autograd.grad(y, leaves, g)]


def _err(got, ref) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-6)).item()


def _run(backend, act, t, g):
    return _grads(lambda: adapter_forward(*t[:6], act=act, residual=t[6], backend=backend), _leaves(*t), g)


def _check(act, t, dtype):
    """cpp against fp64 (FP32_TOL in fp32; 2x the eager error + 2e-3 in fp16 / bf16), and no further from the
    torch backend than that backend is from fp64 plus one rounding."""
    leaves = _leaves(*t)
    g = torch.randn(_reference(*t, act, torch.float64).shape).to(dtype)
    with OpCalls() as calls:
        got = _run("cpp", act, t, g)
    assert calls.count() == {"adapter_fwd": 1, "adapter_bwd": 1}
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    it = iter(ref_leaves)
    ref_t = [next(it) if isinstance(x, torch.Tensor) and x.requires_grad else x for x in t]
    ref = _grads(lambda: _reference(*ref_t, act, torch.float64), ref_leaves, g.double())
    eager = _grads(lambda: _reference(*t, act, dtype), leaves, g)
    tb = _run("torch", act, t, g)
    eps = torch.finfo(dtype).eps
    for i, (a, r) in enumerate(zip(got, ref)):
        err = _err(a, r)
        bound = FP32_TOL if dtype == torch.float32 else 2 * _err(eager[i], r) + 2e-3
        assert err <= bound, (i, err, bound)
        assert _err(a, tb[i]) <= 2 * _err(tb[i], r) + eps + (FP32_TOL if dtype == torch.float32 else 0), i


# ----------------------------------------------------------------------------------------------------------------
# the registered ops
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,act", [(torch.float32, "relu"), (torch.bfloat16, "gelu_tanh")])
def test_opcheck(dtype, act):
    x, wd, bd, wu, bu, _, res = [t.detach() if isinstance(t, torch.Tensor) else t
                                 for t in _tensors(9, 20, 6, dtype, parallel=True, n=12)]
    s = torch.tensor([0.7])
    fwd, bwd = torch.ops.peftfast.adapter_fwd, torch.ops.peftfast.adapter_bwd
    torch.library.opcheck(fwd, (x, res, wd, bd, wu, bu, s, act))
    wu_seq = (torch.randn(20, 6) / 3).to(dtype)
    torch.library.opcheck(fwd, (x.t().contiguous().t(), None, wd, None, wu_seq, None, s, act))
    _, z = fwd(x, res, wd, bd, wu, bu, s, act)
    torch.library.opcheck(bwd, (torch.randn(9, 12).to(dtype), z, wd, wu, s, act, False, True, True))
    torch.library.opcheck(bwd, (torch.randn(9, 20).to(dtype), z, wd, wu_seq, s, act, True, True, False))
    torch.library.opcheck(bwd, (torch.randn(9, 12).to(dtype), z, wd, wu, s, act, False, False, False))


@pytest.mark.parametrize("act", list(ACTS))
def test_fp64_kernels_match_the_maths(act):
    x, wd, bd, wu, bu, s, res = _tensors(11, 24, 7, torch.float64, learned=True, parallel=True, n=17)
    with torch.no_grad():
        s.fill_(0.75)  # the op reads the scaling as fp32: a value fp32 holds exactly
    g = torch.randn(11, 17, dtype=torch.float64)
    want = _grads(lambda: _reference(x, wd, bd, wu, bu, s, res, act, torch.float64), [x, wd, bd, wu, bu, s, res], g)
    got = _grads(lambda: adapter_forward(x, wd, bd, wu, bu, s, act=act, residual=res, backend="cpp"),
                 [x, wd, bd, wu, bu, s, res], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


# ----------------------------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------------------------
CASES = [  # m, k, h, bias, learned, parallel, n, lead, strided
    (37, 80, 24, True, False, False, None, None, False),
    (5, 33, 3, False, True, False, None, None, False),
    (37, 80, 24, True, True, True, None, None, False),
    (23, 40, 8, True, False, True, 56, None, False),
    (None, 40, 16, True, True, False, None, (3, 11), True),
]
# every dtype with every activation, twice, on different cases; every case with several dtypes and activations
PARITY = [(dtype, act, CASES[c]) for di, dtype in enumerate([torch.float32, torch.float16, torch.bfloat16])
          for ai, act in enumerate(ACTS) for c in {ai % 5, (ai + di + 1) % 5}]


@pytest.mark.parametrize("dtype,act,case", PARITY)
def test_matches_fp64_and_torch_backend(dtype, act, case):
    m, k, h, bias, learned, parallel, n, lead, strided = case
    t = _tensors(m, k, h, dtype, bias=bias, learned=learned, parallel=parallel, n=n, lead=lead, strided=strided)
    _check(act, t, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_matches_triton_interpreter(dtype, act):
    t = _tensors(37, 48, 24, dtype, learned=True, parallel=act == "relu")
    g = torch.randn(37, 48).to(dtype)
    cpp, tri = _run("cpp", act, t, g), _run("triton", act, t, g)
    # fp32: the interpreter's dot products sum in another order; fp16: z is rounded by two different GEMMs
    tol = 2e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    for i, (a, b) in enumerate(zip(cpp, tri)):
        assert _err(a, b) <= tol, (i, _err(a, b))


# ----------------------------------------------------------------------------------------------------------------
# what is computed and kept
# ----------------------------------------------------------------------------------------------------------------
def test_saves_input_and_preactivation_only():
    x, wd, bd, wu, bu, s, _ = _tensors(37, 80, 24, torch.bfloat16, learned=True)
    params = {t.untyped_storage().data_ptr() for t in (wd, bd, wu, bu)}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.numel() > 1:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        adapter_forward(x, wd, bd, wu, bu, s, act="gelu", backend="cpp")
    assert sorted(tuple(t.shape) for t in saved) == [(37, 24), (37, 80)]
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)


def test_only_needed_gradients_are_computed():
    x, wd, bd, wu, bu, s, _ = _tensors(13, 32, 8, torch.float32, learned=True)
    y = adapter_forward(x.detach(), wd, bd, wu, bu, s.detach(), act="gelu", backend="cpp")
    with OpCalls() as calls:
        y.sum().backward()
    (name, args), = calls.calls
    assert name == "adapter_bwd" and args[-3:] == (True, False, False)  # sequential: add grad; no dx, no ds
    assert all(t.grad is not None for t in (wd, bd, wu, bu)) and s.grad is None


def test_double_backward_is_a_clear_error():
    x, wd, bd, wu, bu, s, _ = _tensors(9, 16, 4, torch.float32)
    (dx,) = torch.autograd.grad(adapter_forward(x, wd, bd, wu, bu, s, backend="cpp").square().sum(), x,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="Adapter does not support double backward"):
        dx.sum().backward()


def test_compiles_without_graph_breaks(monkeypatch):
    # the op itself must trace whole; backend resolution (peftfast/_ext.py, shared by every op) is taken as given
    monkeypatch.setattr(A, "resolve_backend", lambda backend, device: "cpp")
    x, wd, bd, wu, bu, s, _ = _tensors(9, 16, 4, torch.float32, learned=True)
    leaves = [x, wd, bd, wu, bu, s]

    def fn(*t):
        return adapter_forward(*t, act="gelu_tanh", backend="cpp")

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    g = torch.randn(9, 16)
    got = _grads(lambda: compiled(*leaves), leaves, g)
    want = _grads(lambda: fn(*leaves), leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_input_gives_clear_errors():
    x, wd, bd, wu, bu, _, _ = [t.detach() if isinstance(t, torch.Tensor) else t
                               for t in _tensors(7, 16, 4, torch.float32)]
    s = torch.tensor([0.5])
    fwd, bwd = torch.ops.peftfast.adapter_fwd, torch.ops.peftfast.adapter_bwd
    with pytest.raises(RuntimeError, match="adapter_fwd: unknown activation 'tanh'"):
        fwd(x, None, wd, bd, wu, bu, s, "tanh")
    with pytest.raises(RuntimeError, match="adapter_fwd: x must be \\[M, 16\\]"):
        fwd(x[:, :15], None, wd, bd, wu, bu, s, "relu")
    with pytest.raises(RuntimeError, match="adapter_fwd: input and adapter weights must share one dtype"):
        fwd(x, None, wd.double(), bd, wu, bu, s, "relu")
    with pytest.raises(RuntimeError, match="adapter_fwd: up bias must be \\[16\\]"):
        fwd(x, None, wd, bd, wu, bu[:3], s, "relu")
    with pytest.raises(RuntimeError, match="adapter_fwd: a sequential adapter must map 16"):
        fwd(x, None, wd, bd, wu[:9], None, s, "relu")
    with pytest.raises(RuntimeError, match="adapter_fwd: scale must be a one-element tensor"):
        fwd(x, None, wd, bd, wu, bu, torch.ones(2), "relu")
    _, z = fwd(x, None, wd, bd, wu, bu, s, "relu")
    with pytest.raises(RuntimeError, match="adapter_bwd: grad must be \\[7, 16\\] Float"):
        bwd(x[:3], z, wd, wu, s, "relu", True, True, False)
    with pytest.raises(ValueError, match="adapter 'blk3'.*input has 15 features"):
        adapter_forward(x[:, :15], wd, bd, wu, bu, 0.5, backend="cpp", name="blk3")


# ----------------------------------------------------------------------------------------------------------------
# a model
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_model_adapters_run_on_cpp(placement):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 64, (2, 9))
    peftfast.add_adapters(model, peftfast.AdapterConfig(placement=placement, bottleneck_size=8, activation="silu",
                                                        learned_scaling=placement == "houlsby"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".peftfast_adapters." in name and p.requires_grad and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)

    def loss_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    peftfast.set_adapter_backend(model, fused=True)  # auto: cpp on CPU
    with OpCalls() as calls:
        loss, got = loss_grads()
    n_blocks = 2 * (2 if placement == "houlsby" else 1)
    assert calls.count() == {"adapter_fwd": n_blocks, "adapter_bwd": n_blocks}
    peftfast.set_adapter_backend(model, fused=False)
    ref_loss, ref = loss_grads()
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-6), n
