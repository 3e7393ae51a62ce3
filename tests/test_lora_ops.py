"""Parity of the fused LoRA op (every backend) against an fp64 reference, its memory contract and input checks.

backend="triton" runs the Triton kernels in the CPU interpreter (conftest sets TRITON_INTERPRET=1). The interpreter
returns garbage for ``tl.dot`` on bf16 inputs, so bf16 is tested on the torch and cpp backends only. backend="cpp"
runs the C++ kernels of ``peftfast._C`` through the registered ops ``torch.ops.peftfast.lora_group_fwd/bwd``.
"""

import pytest
import torch
import torch.nn.functional as F

from peftfast import _ext
from peftfast.ops import _counters
from peftfast.ops.lora import dropout_keep_mask, lora_linear, lora_linear_group

CPP = pytest.param("cpp", marks=pytest.mark.skipif(not _ext.available(), reason=f"peftfast._C: {_ext.status()}"))
BACKENDS = ["torch", "triton", CPP]


def _make(ms, k, ns, r, dtype, *, bias=True, lbias=False, lora_dtype=None, x_shape=None):
    lora_dtype = lora_dtype or dtype
    x = torch.randn(*(x_shape or (ms,)), k, dtype=dtype).requires_grad_()
    ws = [(torch.randn(n, k) / k**0.5).to(dtype) for n in ns]
    bs = [torch.randn(n, dtype=dtype).requires_grad_() if bias else None for n in ns]
    lbs = [torch.randn(n, dtype=lora_dtype).requires_grad_() if lbias else None for n in ns]
    as_ = [(torch.randn(r, k) / k**0.5).to(lora_dtype).requires_grad_() for _ in ns]
    bms = [(torch.randn(n, r) * 0.5).to(lora_dtype).requires_grad_() for n in ns]
    scales = [2.0, 0.5, 1.25, 3.0][: len(ns)]
    return x, ws, bs, lbs, as_, bms, scales


def _leaves(x, bs, lbs, as_, bms):
    return [t for t in [x, *bs, *lbs, *as_, *bms] if t is not None and t.requires_grad]


def _reference(x, ws, bs, lbs, as_, bms, scales, p, masks, dtype=torch.float64):
    """The maths computed as PEFT's eager path does it, in ``dtype`` (fp64 = the reference)."""
    outs = []
    for i in range(len(ws)):
        xc = x.to(dtype)
        y = F.linear(xc, ws[i].to(dtype), None if bs[i] is None else bs[i].to(dtype))
        xd = xc if p == 0 else xc * masks[i].view(xc.shape).to(dtype) / (1 - p)
        low = F.linear(F.linear(xd, as_[i].to(dtype)), bms[i].to(dtype), None if lbs[i] is None else lbs[i].to(dtype))
        outs.append(y + low * scales[i])
    return outs


def _run(fn, leaves, grads):
    for t in leaves:
        t.grad = None
    ys = fn()
    torch.autograd.backward(ys, grads)
    return [y.detach() for y in ys], [t.grad.clone() if t.grad is not None else None for t in leaves]


def _compare(backend, x, ws, bs, lbs, as_, bms, scales, p, seed=1234):
    m = x.reshape(-1, x.shape[-1]).shape[0]
    masks = dropout_keep_mask(seed, len(ws), m, x.shape[-1], p, device=x.device, backend=backend) if p else None
    leaves = _leaves(x, bs, lbs, as_, bms)
    grads = [torch.randn(*x.shape[:-1], w.shape[0], dtype=x.dtype) for w in ws]
    got_y, got_g = _run(lambda: lora_linear_group(x, ws, bs, as_, bms, scales, lora_biases=lbs, dropout_p=p, seed=seed,
                                                  backend=backend), leaves, grads)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    rx = next(it) if x.requires_grad else x.detach().double()
    rb = [next(it) if b is not None and b.requires_grad else b for b in bs]
    rlb = [next(it) if b is not None and b.requires_grad else b for b in lbs]
    ra = [next(it) for _ in as_]
    rbm = [next(it) for _ in bms]
    ref_y, ref_g = _run(lambda: _reference(rx, ws, rb, rlb, ra, rbm, scales, p, masks), ref_leaves,
                        [g.double() for g in grads])
    return got_y, got_g, ref_y, ref_g, masks, grads


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "ms,k,ns,r,p,bias,lbias",
    [
        (37, 80, [96], 8, 0.0, True, False),
        (37, 80, [96], 8, 0.3, True, True),
        (5, 33, [17], 3, 0.3, False, False),
        (19, 40, [24], 12, 0.0, True, False),
        (21, 48, [40], 80, 0.2, False, False),  # rank loops over several BLOCK_R chunks
        (37, 80, [96, 48, 48], 8, 0.3, True, False),  # q/k/v with GQA widths
        (23, 64, [32, 48], 16, 0.0, False, True),
        (17, 32, [16, 24, 40, 8], 4, 0.25, True, False),  # more members than one dx launch sums
    ],
)
def test_fp32_parity(backend, ms, k, ns, r, p, bias, lbias):
    t = _make(ms, k, ns, r, torch.float32, bias=bias, lbias=lbias)
    got_y, got_g, ref_y, ref_g, *_ = _compare(backend, *t, p)
    for a, b in zip(got_y + got_g, ref_y + ref_g):
        assert a.dtype == torch.float32
        assert _rel(a, b) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_noncontiguous_x(backend):
    k, n, r = 40, 24, 8
    _, ws, bs, lbs, as_, bms, sc = _make(10, k, [n, 16], r, torch.float32)
    base = torch.randn(2, 7, 2 * k)
    x3 = base[..., ::2].detach().requires_grad_()  # strided last dim, leading dims kept
    assert not x3.is_contiguous()
    got_y, got_g, ref_y, ref_g, *_ = _compare(backend, x3, ws, bs, lbs, as_, bms, sc, 0.3)
    assert got_y[0].shape == (2, 7, n)
    for a, b in zip(got_y + got_g, ref_y + ref_g):
        assert _rel(a, b) < 2e-5
    xt = torch.randn(k, 13).t().detach().requires_grad_()  # column-major 2-D input
    got_y, got_g, ref_y, ref_g, *_ = _compare(backend, xt, ws, bs, lbs, as_, bms, sc, 0.0)
    for a, b in zip(got_y + got_g, ref_y + ref_g):
        assert _rel(a, b) < 2e-5


@pytest.mark.parametrize("strategy", ["fused", "cublas"])
def test_triton_dense_strategies(monkeypatch, strategy):
    monkeypatch.setenv("PEFTFAST_LORA_GEMM", strategy)
    t = _make(37, 80, [96, 48, 48], 8, torch.float32, bias=True, lbias=True)
    got_y, got_g, ref_y, ref_g, *_ = _compare("triton", *t, 0.3)
    for a, b in zip(got_y + got_g, ref_y + ref_g):
        assert _rel(a, b) < 2e-5


def _low_precision_check(backend, dtype, lora_dtype=None):
    t = _make(37, 80, [96, 48], 8, dtype, bias=True, lora_dtype=lora_dtype)
    x, ws, bs, lbs, as_, bms, sc = t
    got_y, got_g, ref_y, ref_g, masks, grads = _compare(backend, *t, 0.2)
    # what plain PyTorch makes of the same maths in the same dtypes (PEFT's eager path)
    leaves = _leaves(x, bs, lbs, as_, bms)
    ld = lora_dtype or dtype

    def eager():
        outs = []
        for i in range(len(ws)):
            y = F.linear(x, ws[i], bs[i])
            xd = x.to(ld) * masks[i].view(x.shape).to(ld) / (1 - 0.2)
            outs.append((y + F.linear(F.linear(xd, as_[i]), bms[i]) * sc[i]).to(dtype))
        return outs

    eag_y, eag_g = _run(eager, leaves, grads)
    for a, e, b in zip(got_y + got_g, eag_y + eag_g, ref_y + ref_g):
        assert a.dtype == e.dtype
        err, err_eager = (a.double() - b).abs().max().item(), (e.double() - b).abs().max().item()
        assert err <= 2 * err_eager + 1e-3 * b.abs().max().item(), (err, err_eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_within_twice_pytorch_error(backend):
    _low_precision_check(backend, torch.float16)


@pytest.mark.parametrize("backend", ["torch", CPP])
def test_bf16_within_twice_pytorch_error(backend):
    _low_precision_check(backend, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_lora_over_fp16_base(backend):
    _low_precision_check(backend, torch.float16, lora_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_statistics_and_seeds(backend):
    p = 0.3
    m = dropout_keep_mask(7, 2, 64, 512, p, device="cpu", backend=backend)
    rate = m.float().mean(dim=(1, 2))
    sd = (p * (1 - p) / (64 * 512)) ** 0.5
    assert ((rate - (1 - p)).abs() < 5 * sd).all(), rate
    assert (m[0] != m[1]).float().mean() > 0.3  # segments get independent masks
    assert torch.equal(m, dropout_keep_mask(7, 2, 64, 512, p, device="cpu", backend=backend))
    assert not torch.equal(m, dropout_keep_mask(8, 2, 64, 512, p, device="cpu", backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_deterministic_and_independent_of_global_rng(backend):
    x, ws, bs, lbs, as_, bms, sc = _make(37, 80, [96], 8, torch.float32)
    leaves = _leaves(x, bs, lbs, as_, bms)
    g = [torch.randn(37, 96)]
    first = _run(lambda: lora_linear_group(x, ws, bs, as_, bms, sc, dropout_p=0.4, seed=5, backend=backend), leaves, g)

    def shuffled():
        ys = lora_linear_group(x, ws, bs, as_, bms, sc, dropout_p=0.4, seed=5, backend=backend)
        torch.manual_seed(999)  # backward must regenerate the mask from the seed, not from the global RNG
        torch.rand(100)
        return ys

    second = _run(shuffled, leaves, g)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)
    other = lora_linear_group(x, ws, bs, as_, bms, sc, dropout_p=0.4, seed=6, backend=backend)[0]
    assert not torch.allclose(other, first[0][0])
    nodrop = lora_linear_group(x, ws, bs, as_, bms, sc, dropout_p=0.0, seed=5, backend=backend)[0]
    ref = _reference(x.detach(), ws, bs, lbs, as_, bms, sc, 0.0, None, dtype=torch.float64)[0]
    assert _rel(nodrop.detach(), ref.detach()) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_tensors_are_x_and_xa_only(backend):
    x, ws, bs, lbs, as_, bms, sc = _make(37, 80, [96, 48, 48], 8, torch.float32)
    params = {t.untyped_storage().data_ptr() for t in [*ws, *bs, *as_, *bms]}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = lora_linear_group(x, ws, bs, as_, bms, sc, dropout_p=0.1, backend=backend)
    seeds = [t for t in saved if t.dtype == torch.int64]
    assert all(t.numel() == 1 for t in seeds)  # the registered op keeps its dropout seed as an 8-byte tensor
    saved = [t for t in saved if t.dtype != torch.int64]
    storages = {t.untyped_storage().data_ptr(): t for t in saved}
    assert len(storages) == 2, [tuple(t.shape) for t in saved]
    assert x.untyped_storage().data_ptr() in storages  # x itself, saved once for three members, not a copy
    xa = [t for p, t in storages.items() if p != x.untyped_storage().data_ptr()][0]
    assert tuple(xa.shape) == (37, 3 * 8)
    sum(y.sum() for y in ys).backward()


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("backend,dtype,lora_dtype", [
    *((be, torch.float32, None) for be in ("torch", "triton")),
    ("torch", torch.float16, torch.float32),  # fp32 LoRA over an fp16 base
    *(pytest.param("cpp", dt, ldt, marks=CPP.marks) for dt, ldt in [(torch.float32, None),
                                                                   (torch.float16, torch.float32)]),
])
def test_keep_xa_false_keeps_only_x_and_the_same_gradients(backend, p, dtype, lora_dtype):
    """keep_xa=False: only x is kept (no x·A_catᵀ); backward rebuilds it from x and the seed, so outputs and every
    gradient are bit-for-bit those of keep_xa=True (dropout, GQA widths, LoRA and base dtypes apart)."""
    x, ws, bs, lbs, as_, bms, sc = _make(37, 80, [96, 48, 48], 8, dtype, lbias=True, lora_dtype=lora_dtype)
    leaves = _leaves(x, bs, lbs, as_, bms)
    grads = [torch.randn(37, w.shape[0], dtype=dtype) for w in ws]
    params = {t.untyped_storage().data_ptr() for t in [*ws, *bs, *lbs, *as_, *bms]}
    got = {}
    for keep in (True, False):
        saved = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in params and t.dtype != torch.int64 and t.numel():
                saved.append(t)
            return t

        def fn():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return lora_linear_group(x, ws, bs, as_, bms, sc, lora_biases=lbs, dropout_p=p, seed=77,
                                         backend=backend, keep_xa=keep)

        got[keep] = _run(fn, leaves, grads), {t.untyped_storage().data_ptr() for t in saved}
    assert got[False][1] == {x.untyped_storage().data_ptr()}
    assert len(got[True][1]) == 2
    (y1, g1), (y0, g0) = got[True][0], got[False][0]
    assert all(torch.equal(a, b) for a, b in zip(y1, y0))
    assert all(torch.equal(a, b) for a, b in zip(g1, g0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_input_grad(backend):
    x, ws, bs, lbs, as_, bms, sc = _make(9, 32, [16], 4, torch.float32)
    x.requires_grad_(False)
    y = lora_linear(x, ws[0], bs[0], as_[0], bms[0], sc[0], dropout_p=0.2, backend=backend)
    y.sum().backward()
    assert x.grad is None and as_[0].grad is not None and bms[0].grad is not None and bs[0].grad is not None


def test_triton_launch_counts():
    x, ws, bs, lbs, as_, bms, sc = _make(9, 32, [16, 8, 8], 4, torch.float32)
    with _counters.count_launches() as fwd:
        ys = lora_linear_group(x, ws, bs, as_, bms, sc, dropout_p=0.1, backend="triton")
    assert dict(fwd) == {"_lora_down_kernel": 1, "_lora_gemm_kernel": 3}
    with _counters.count_launches() as bwd:
        sum(y.sum() for y in ys).backward()
    # G per member, one dx launch for all members, one dA launch, dB per member
    assert dict(bwd) == {"_lora_down_kernel": 3, "_lora_gemm_kernel": 1, "_lora_da_kernel": 4}


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda t: t.update(x=torch.randn(5, 31)), ValueError, "31 features"),
        (lambda t: t.update(a=torch.randn(4, 31)), ValueError, "lora_A"),
        (lambda t: t.update(b=torch.randn(15, 4)), ValueError, "lora_B"),
        (lambda t: t.update(x=torch.randn(5, 32, dtype=torch.float64)), TypeError, "dtype"),
        (lambda t: t.update(a=torch.randn(300, 32), b=torch.randn(16, 300)), ValueError, "rank 300"),
        (lambda t: t.update(p=1.0), ValueError, "dropout"),
        (lambda t: t["w"].requires_grad_(), ValueError, "requires grad"),
    ],
)
def test_bad_input_names_the_module(mutate, exc, match):
    t = {"x": torch.randn(5, 32), "w": torch.randn(16, 32), "a": torch.randn(4, 32), "b": torch.randn(16, 4), "p": 0.0}
    mutate(t)
    with pytest.raises(exc, match=match) as info:
        lora_linear(t["x"], t["w"], None, t["a"], t["b"], 1.0, dropout_p=t["p"], name="model.layers.3.q_proj")
    assert "model.layers.3.q_proj" in str(info.value)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4), torch.randn(3, 1), 1.0,
                    backend="cuda-magic")


# ----------------------------------------------------------------------------------------------------------------
# DoRA: PEFT's weight-decomposed LoRA on the fused op
# ----------------------------------------------------------------------------------------------------------------
def _peft_dora(k, n, r, dtype, *, p=0.0, bias=True, fan_in_fan_out=False, lora_dtype=None, seed=0):
    """A PEFT DoRA linear (magnitude initialised from the weight norm, then moved off it, LoRA B non-zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    holder = torch.nn.Module()
    holder.fc = Conv1D(n, k) if fan_in_fan_out else torch.nn.Linear(k, n, bias=bias)
    holder.fc.weight.data.normal_(0.0, k**-0.5)
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["fc"],
                                              use_dora=True, fan_in_fan_out=fan_in_fan_out))
    layer = model.base_model.model.fc
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 0.3)
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(n) + 0.5)
    model.to(dtype)
    if lora_dtype is not None:
        for name, prm in model.named_parameters():
            if "lora_" in name:
                prm.data = prm.data.to(lora_dtype)
    return model.train()


def _dora_leaves(model):
    return {n: prm for n, prm in model.named_parameters() if prm.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dora_weight_norm_without_forming_b_a(dtype):
    """‖W + s·B A‖ per output row from rank-r products equals the norm of the formed matrix (fp64), and in low
    precision errs no more than twice what PEFT's formed-matrix norm in that dtype does."""
    from peftfast.ops.lora import dora_weight_norm

    g = torch.Generator().manual_seed(3)
    n, k, r, s = 37, 80, 6, 1.7
    w, a, b = torch.randn(n, k, generator=g), torch.randn(r, k, generator=g) * 0.2, torch.randn(n, r, generator=g)
    ref = torch.linalg.norm(w.double() + s * b.double() @ a.double(), dim=1)
    got = dora_weight_norm(w.to(dtype), a.to(dtype), b.to(dtype), s).double()
    assert not got.requires_grad
    if dtype == torch.float64:
        assert torch.allclose(got, ref, rtol=1e-12)
        return
    peft = torch.linalg.norm(w.to(dtype) + s * (b.to(dtype) @ a.to(dtype)), dim=1).double()
    assert (got - ref).abs().max() <= 2 * (peft - ref).abs().max() + 1e-6 * ref.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,bias,fan_in_fan_out", [(0.0, True, False), (0.0, False, True), (0.25, True, False),
                                                   (0.25, False, True)])
def test_dora_layer_matches_peft(backend, p, bias, fan_in_fan_out):
    """A patched DoRA layer gives PEFT's output and the gradients of the input, the base bias, LoRA A and B and the
    DoRA magnitude (fp32; with dropout, PEFT's dropout replaying the fused path's masks), odd shapes, 3-D input."""
    from _models import clone, use_shared_seed_dropout

    import peftfast

    model = _peft_dora(80, 37, 5, torch.float32, p=p, bias=bias, fan_in_fan_out=fan_in_fan_out)
    ref = clone(model)
    peftfast.patch(model, backend=backend)
    assert peftfast.report(model).entries[0].patched
    if p:
        use_shared_seed_dropout(ref, model, p, backend=backend)
    x = torch.randn(2, 19, 80)
    dy = torch.randn(2, 19, 37)
    outs = []
    for m in (model, ref):
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        y = m.base_model.model.fc(xi)
        y.backward(dy)
        outs.append([y.detach(), xi.grad] + [prm.grad for prm in _dora_leaves(m).values()])
    assert len(outs[0]) == 2 + 3 and all(t is not None for t in outs[0])  # y, dx, then A, B, magnitude
    for got, want in zip(*outs):
        assert torch.allclose(got, want, atol=2e-5 * want.abs().max().item(), rtol=1e-4), (got - want).abs().max()
    rt = peftfast.report(model).runtime(model)
    assert all(r["fused"] == 1 and not r["fallbacks"] for r in rt.values()), rt


def test_dora_triton_traced_seed_rebuilds_the_same_dropped_input(monkeypatch):
    """DoRA with dropout on the Triton backend under ``torch.compile`` (Dynamo's flag set by hand) keeps its seed a
    tensor and rebuilds the dropped input through the registered mask op (here its C++ CPU kernel, the Triton
    kernels' Philox stream): the output and gradients of the eager Triton path with an int seed, and one
    ``dropout_keep_mask`` op call, which the eager path does not make."""
    from _models import cpp_or_skip, max_rel_err

    from peftfast.bench import count_work_ops
    from peftfast.ops.lora import dora_linear

    cpp_or_skip("cpp")
    torch.manual_seed(0)
    x = torch.randn(2, 19, 80, requires_grad=True)
    w = torch.randn(37, 80) / 9
    a = (torch.randn(5, 80) / 9).requires_grad_()
    b = (torch.randn(37, 5) * 0.3).requires_grad_()
    mag = (torch.rand(37) + 0.5).requires_grad_()
    res = {}
    for traced in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda traced=traced: traced)
        for t in (x, a, b, mag):
            t.grad = None

        def step():
            y = dora_linear(x, w, None, a, b, 1.5, mag, dropout_p=0.3, seed=77, backend="triton")
            y.square().sum().backward()
            return y

        y, count = count_work_ops(step)
        assert count.aten["dropout_keep_mask"] == (1 if traced else 0), count.aten
        res[traced] = [y.detach(), x.grad, a.grad, b.grad, mag.grad]
    errs = [max_rel_err(got, want) for got, want in zip(res[True], res[False])]
    assert max(errs) <= 1e-5, errs


@pytest.mark.parametrize("backend,dtype,lora_dtype", [("torch", torch.bfloat16, None),
                                                      ("torch", torch.bfloat16, torch.float32),
                                                      pytest.param("cpp", torch.bfloat16, torch.float32,
                                                                   marks=CPP.marks),
                                                      ("triton", torch.float16, None)])
def test_dora_low_precision_within_twice_peft_error(backend, dtype, lora_dtype):
    """bf16/fp16 bases, LoRA weights in the same dtype or in fp32 (PEFT's default over a bf16 base): the patched
    layer's output and gradients err against fp64 no more than twice what PEFT's own DoRA forward does."""
    import peftfast

    model = _peft_dora(64, 48, 8, dtype, lora_dtype=lora_dtype)
    exact = _peft_dora(64, 48, 8, torch.float64)
    peft = _peft_dora(64, 48, 8, dtype, lora_dtype=lora_dtype)
    peftfast.patch(model, backend=backend)
    x = torch.randn(37, 64)
    dy = torch.randn(37, 48)
    res = []
    for m, dt in ((exact, torch.float64), (model, dtype), (peft, dtype)):
        xi = x.to(dt).requires_grad_()
        y = m.base_model.model.fc(xi)
        y.backward(dy.to(y.dtype))
        res.append([y.detach().double(), xi.grad.double()] + [prm.grad.double() for prm in _dora_leaves(m).values()])
    for r, got, eager in zip(*res):
        assert (got - r).abs().max() <= 2 * (eager - r).abs().max() + 1e-3 * r.abs().max(), (
            (got - r).abs().max(), (eager - r).abs().max())


def test_dora_saves_less_than_peft():
    """Without dropout the patched DoRA layer keeps x, the rank-r product and one [M, N] output (for the magnitude's
    gradient); PEFT keeps its base and LoRA outputs and the LoRA chain's inputs besides."""
    import peftfast
    from peftfast.bench import saved_activation_bytes

    m, k, n, r = 16, 64, 96, 8
    sizes = {}
    for label in ("peft", "peftfast"):
        model = _peft_dora(k, n, r, torch.float32)
        if label == "peftfast":
            peftfast.patch(model)
        x = torch.randn(m, k, requires_grad=True)
        _, saved = saved_activation_bytes(lambda: model.base_model.model.fc(x * 1),
                                          exclude=[*model.parameters()])
        sizes[label] = saved.total
    small = 4 * 2 * n + 8  # the weight norm and mag (N each), the registered op's seed
    assert sizes["peftfast"] <= 4 * (m * k + m * r + m * n) + small
    assert sizes["peft"] >= sizes["peftfast"] + 4 * m * n
