"""Fused LoRA-MLP (``down(act(gate(x)) · up(x))`` as one op): parity against fp64, memory contract, launches and
model integration (SwiGLU Llama/Mistral/Qwen2, GeGLU Gemma)."""

import pytest
import torch
import torch.nn.functional as F
from _models import batch, clone, loss_and_grads, max_rel_err, peft_model, use_shared_seed_dropout

import peftfast
from peftfast.ops import _counters
from peftfast.ops._backend import resolve_backend
from peftfast.ops.lora import dropout_keep_mask
from peftfast.ops.mlp import lora_mlp

BACKENDS = ["torch", "triton"]
ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def _proj(n, k, r, dtype, bias, lbias, scale):
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    b = torch.randn(n).to(dtype).requires_grad_() if bias else None
    a = (torch.randn(r, k) / k**0.5).to(dtype).requires_grad_()
    bm = (torch.randn(n, r) * 0.3).to(dtype).requires_grad_()
    lb = torch.randn(n).to(dtype).requires_grad_() if lbias else None
    return [w, b, a, bm, scale, lb]


def _case(m, k, i, r, dtype, *, bias=True, lbias=False, r_down=None):
    x = torch.randn(m, k).to(dtype).requires_grad_()
    gate = _proj(i, k, r, dtype, bias, lbias, 2.0)
    up = _proj(i, k, r, dtype, bias, False, 0.5)
    down = _proj(k, i, r_down or r, dtype, bias, lbias, 1.5)
    return x, gate, up, down


def _tensors(x, *projs):
    return [x] + [t for p in projs for t in (p[1], p[2], p[3], p[5]) if t is not None]


def _lin(x, proj, mask, p, dtype):
    w, b, a, bm, s, lb = proj
    xd = x if mask is None else x * mask.to(dtype) / (1 - p)
    low = F.linear(F.linear(xd, a.to(dtype)), bm.to(dtype), None if lb is None else lb.to(dtype))
    return F.linear(x, w.to(dtype), None if b is None else b.to(dtype)) + s * low


def _reference(x, gate, up, down, act, masks, p, p_d, dtype):
    mg, mu, md = masks if masks is not None else (None, None, None)
    h = ACTS[act](_lin(x, gate, mg, p, dtype)) * _lin(x, up, mu, p, dtype)
    return _lin(h, down, md, p_d, dtype)


def _grads(fn, leaves, dy):
    for t in leaves:
        t.grad = None
    y = fn()
    y.backward(dy)
    return [y.detach().double()] + [t.grad.double() for t in leaves]


def _double(proj, it):
    return [next(it) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in proj]


def _check(backend, act, x, gate, up, down, *, p=0.0, p_d=0.0, gate_segment=0, tol=None, dtype=torch.float32):
    m, k = x.shape
    seed, dseed = 1234, 99
    masks = None
    if p or p_d:
        gu = dropout_keep_mask(seed, 2, m, k, p, device=x.device, backend=backend) if p else None
        d = dropout_keep_mask(dseed, 1, m, gate[0].shape[0], p_d, device=x.device, backend=backend)[0] if p_d else None
        masks = (gu[gate_segment] if p else None, gu[1 - gate_segment] if p else None, d)
    leaves = _tensors(x, gate, up, down)
    dy = torch.randn(m, k).to(dtype)
    got = _grads(lambda: lora_mlp(x, gate, up, down, act=act, dropout_p=p, down_dropout_p=p_d, seed=seed,
                                  down_seed=dseed, gate_segment=gate_segment, backend=backend), leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    rx = next(it)
    rg, ru, rd = _double(gate, it), _double(up, it), _double(down, it)
    for rp, pr in ((rg, gate), (ru, up), (rd, down)):
        rp[0] = pr[0].double()
    ref = _grads(lambda: _reference(rx, rg, ru, rd, act, masks, p, p_d, torch.float64), ref_leaves, dy.double())
    if tol is None:
        eager = _grads(lambda: _reference(x, gate, up, down, act, masks, p, p_d, dtype), leaves, dy)
    for j, (a, r) in enumerate(zip(got, ref)):
        scale = r.abs().max().clamp_min(1e-6)
        err = ((a - r).abs().max() / scale).item()
        bound = tol if tol is not None else 2 * ((eager[j] - r).abs().max() / scale).item() + 2e-3
        assert err <= bound, (j, err, bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("m,k,i,r,p,p_d,bias,lbias,seg", [
    (37, 40, 56, 8, 0.0, 0.0, True, False, 0),
    (19, 24, 40, 4, 0.3, 0.2, False, True, 1),
    (5, 16, 24, 3, 0.0, 0.25, True, True, 0),
])
def test_fp32_parity(backend, act, m, k, i, r, p, p_d, bias, lbias, seg):
    x, gate, up, down = _case(m, k, i, r, torch.float32, bias=bias, lbias=lbias)
    _check(backend, act, x, gate, up, down, p=p, p_d=p_d, gate_segment=seg, tol=3e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_down_rank_differs_and_input_without_grad(backend):
    x, gate, up, down = _case(13, 24, 40, 8, torch.float32, r_down=16)
    x.requires_grad_(False)
    leaves = _tensors(x, gate, up, down)[1:]
    lora_mlp(x, gate, up, down, backend=backend).sum().backward()
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_within_twice_eager_error(backend):
    x, gate, up, down = _case(37, 40, 56, 8, torch.float16)
    _check(backend, "silu", x, gate, up, down, p=0.1, dtype=torch.float16)


def test_bf16_within_twice_eager_error_torch_backend():
    x, gate, up, down = _case(37, 40, 56, 8, torch.bfloat16)
    _check("torch", "gelu_tanh", x, gate, up, down, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_input_preactivations_and_skinny_products_only(backend):
    m, k, i, r = 37, 40, 56, 8
    x, gate, up, down = _case(m, k, i, r, torch.float32)
    saved = _saved_shapes(lambda: lora_mlp(x, gate, up, down, dropout_p=0.1, backend=backend), gate, up, down)
    # x, x·[A_gate; A_up]ᵀ, g, u, h·A_downᵀ: no act(g), no h, no dropout copy or mask
    assert saved == sorted([(m, k), (m, 2 * r), (m, i), (m, i), (m, r)])


def _saved_shapes(fn, *projs) -> list[tuple]:
    """Shapes of what ``fn``'s graph saves for backward, the projections' parameters excluded (sorted)."""
    params = {t.untyped_storage().data_ptr() for p in projs for t in p if isinstance(t, torch.Tensor)}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sorted(saved)


@pytest.mark.parametrize("backend", [*BACKENDS, "cpp"])
def test_recompute_gives_the_same_values_and_keeps_only_x_and_the_down_products(backend):
    """recompute=True: backward runs the gate/up forward again (same seeds, same kernels), so outputs and every
    gradient are the same bits; g, u and x·[A_gate; A_up]ᵀ are not saved."""
    if backend == "cpp" and resolve_backend("auto", torch.device("cpu")) != "cpp":
        pytest.skip("peftfast._C is not built")
    m, k, i, r = 37, 40, 56, 8
    x, gate, up, down = _case(m, k, i, r, torch.float32, lbias=True)
    leaves = _tensors(x, gate, up, down)
    dy = torch.randn(m, k)
    runs = {}
    for recompute in (False, True):
        def fn(recompute=recompute):
            return lora_mlp(x, gate, up, down, act="gelu_tanh", dropout_p=0.2, down_dropout_p=0.3, seed=5,
                            down_seed=6, gate_segment=1, recompute=recompute, backend=backend)

        runs[recompute] = _grads(fn, leaves, dy), _saved_shapes(fn, gate, up, down)
    (kept, saved_kept), (again, saved_again) = runs[False], runs[True]
    assert all(torch.equal(a, b) for a, b in zip(kept, again))
    for shape in [(m, 2 * r), (m, i), (m, i)]:
        saved_kept.remove(shape)
    assert saved_again == saved_kept


def test_triton_launches_with_recompute():
    x, gate, up, down = _case(37, 40, 56, 8, torch.float32)
    y = lora_mlp(x, gate, up, down, dropout_p=0.1, recompute=True, backend="triton")
    with _counters.count_launches() as bwd:
        y.sum().backward()
    # the forward's x·A_catᵀ and gate/up GEMM (which writes h too: no act_mul forward), then the backward as usual
    assert dict(bwd) == {"_lora_gate_up_act_kernel": 1, "_act_mul_bwd_kernel": 1, "_lora_down_kernel": 4,
                         "_lora_gemm_kernel": 2, "_lora_da_kernel": 5}


def test_triton_launches():
    x, gate, up, down = _case(37, 40, 56, 8, torch.float32)
    with _counters.count_launches() as fwd:
        y = lora_mlp(x, gate, up, down, dropout_p=0.1, backend="triton")
    # xa for gate/up and for down; one gate/up GEMM that also applies act(g)·u; the down GEMM; no act_mul launch
    assert dict(fwd) == {"_lora_down_kernel": 2, "_lora_gate_up_act_kernel": 1, "_lora_gemm_kernel": 1}
    with _counters.count_launches() as bwd:
        y.sum().backward()
    # h rebuilt once; down: G, dx GEMM, dA, dB; act backward; gate/up: 2 G, dx GEMM, one dA for both, 2 dB
    assert dict(bwd) == {"_act_mul_fwd_kernel": 1, "_act_mul_bwd_kernel": 1, "_lora_down_kernel": 3,
                         "_lora_gemm_kernel": 2, "_lora_da_kernel": 5}


def test_triton_cublas_strategy_keeps_separate_activation(monkeypatch):
    """With PEFTFAST_LORA_GEMM=cublas the dense products come from cuBLAS, so act(g)·u stays a separate pass."""
    monkeypatch.setenv("PEFTFAST_LORA_GEMM", "cublas")
    x, gate, up, down = _case(37, 40, 56, 8, torch.float32)
    with _counters.count_launches() as fwd:
        lora_mlp(x, gate, up, down, backend="triton")
    assert dict(fwd) == {"_lora_down_kernel": 2, "_lora_gemm_kernel": 3, "_act_mul_fwd_kernel": 1}
    monkeypatch.delenv("PEFTFAST_LORA_GEMM")
    _check("triton", "gelu", x, gate, up, down, tol=3e-5)


# ----------------------------------------------------------------------------------------------------------------
# the gate/up GEMM with act(g)·u in its epilogue (Triton forward)
# ----------------------------------------------------------------------------------------------------------------
def _gate_up_case(dtype, *, bias, lbias, noncontig):
    m, k, i, r = 37, 80, 72, 8
    x = torch.randn(m, k).to(dtype)
    gate = _proj(i, k, r, dtype, bias, lbias, 2.0)
    up = _proj(i, k, r, dtype, bias, lbias, 0.75)
    if noncontig:  # x a column slice of a wider buffer; W_up stored [K, I] as by GPT-2 Conv1D (fan_in_fan_out)
        x = torch.randn(m, k + 7).to(dtype)[:, 3:3 + k]
        up[0] = up[0].t().contiguous().t()
    return x, gate, up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("p,bias,lbias,seg,noncontig", [
    (0.0, True, False, 0, False),
    (0.2, False, True, 1, True),
])
def test_gate_up_act_kernel(dtype, act, p, bias, lbias, seg, noncontig):
    """g, u and h = act(g)·u of the fused kernel: against fp64 and against the unfused launches (grouped LoRA
    GEMMs, then the element-wise act kernel), which it must match to fp32 accumulation order."""
    from peftfast.ops import mlp as M
    from peftfast.ops.lora import group_forward

    x, gate, up = _gate_up_case(dtype, bias=bias, lbias=lbias, noncontig=noncontig)
    m, k = x.shape
    first, second = (gate, up) if seg == 0 else (up, gate)
    flat = [first[0], second[0], first[1], second[1], first[5], second[5], first[2], second[2], first[3], second[3]]
    flat = [t.detach() if t is not None else None for t in flat]
    scales = (first[4], second[4])
    seed = 4321
    g, u, h, xa = M._triton_gate_up_forward(x, scales, p, seed, seg, act, flat)
    assert g.dtype == u.dtype == h.dtype == dtype and g.shape == u.shape == h.shape == (m, 72)

    # unfused: same xa, g and u to fp32 accumulation order (one rounding apart at most), h from the act kernel
    ys, xa_ref = group_forward(x, scales, p, seed, "triton", 2, flat)
    g_ref, u_ref = ys[seg], ys[1 - seg]
    torch.testing.assert_close(xa, xa_ref, rtol=0, atol=0)
    rtol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(g, g_ref, rtol=rtol, atol=rtol * g_ref.abs().max().item())
    torch.testing.assert_close(u, u_ref, rtol=rtol, atol=rtol * u_ref.abs().max().item())
    torch.testing.assert_close(h, M.act_mul(g, u, act, "triton"), rtol=0, atol=0)  # same rounding of g, u
    h_ref = M.act_mul(g_ref, u_ref, act, "triton")
    torch.testing.assert_close(h, h_ref, rtol=2 * rtol, atol=2 * rtol * h_ref.abs().max().item())

    # fp64 reference with the kernels' own dropout masks
    keep = dropout_keep_mask(seed, 2, m, k, p, device=x.device, backend="triton") if p else None
    x64 = x.double()

    def lin64(proj, segment):
        w, b, a, bm, s, lb = (t.detach().double() if isinstance(t, torch.Tensor) else t for t in proj)
        xd = x64 if keep is None else x64 * keep[segment].double() / (1 - p)
        low = xd @ a.T @ bm.T + (0 if lb is None else lb)
        return x64 @ w.T + (0 if b is None else b) + s * low

    def lin(proj, segment):  # plain PyTorch in the test dtype, for the low-precision error bound
        w, b, a, bm, s, lb = (t.detach() if isinstance(t, torch.Tensor) else t for t in proj)
        xd = x if keep is None else x * keep[segment].to(dtype) / (1 - p)
        return F.linear(x, w, b) + s * F.linear(F.linear(xd, a), bm, lb)

    g64, u64 = lin64(gate, seg), lin64(up, 1 - seg)
    g_e, u_e = lin(gate, seg), lin(up, 1 - seg)
    for got, eager, ref in ((g, g_e, g64), (u, u_e, u64), (h, ACTS[act](g_e) * u_e, ACTS[act](g64) * u64)):
        scale = ref.abs().max()
        err = ((got.double() - ref).abs().max() / scale).item()
        eager_err = ((eager.double() - ref).abs().max() / scale).item()
        # at most twice PyTorch's error; the floor covers fp32 accumulation order (eager fp32 can be near exact)
        bound = max(2 * eager_err, 1e-6)
        assert err <= bound, (err, eager_err)


def test_gate_up_act_kernel_zero_lora_scale():
    """A LoRA scaling of 0 (alpha = 0) drops the low-rank term and its LoRA bias: no 0 · inf from the folding."""
    from peftfast.ops import mlp as M

    x, gate, up = _gate_up_case(torch.float32, bias=True, lbias=True, noncontig=False)
    gate[3] = gate[3].detach() * 1e30  # a huge B would show through any non-zero factor
    g, u, h = M.gate_up_act(x, gate[0], up[0], torch.randn(37, 8), torch.randn(37, 8), gate[3], up[3].detach(), 0.0,
                            0.75, gate[1].detach(), up[1].detach(), gate[5].detach(), up[5].detach(), "silu")
    torch.testing.assert_close(g, F.linear(x, gate[0], gate[1].detach()), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(u).all() and torch.isfinite(h).all()


@pytest.mark.parametrize("act", list(ACTS))
def test_fused_forward_parity_odd_shape(act):
    """lora_mlp on the Triton backend at K=80, I=72 (ragged tiles), dropout, LoRA biases, gate in segment 1:
    output and every gradient against fp64."""
    x, gate, up, down = _case(37, 80, 72, 8, torch.float32, bias=True, lbias=True)
    _check("triton", act, x, gate, up, down, p=0.2, p_d=0.1, gate_segment=1, tol=3e-5)


def test_fused_forward_fp16_gelu_within_twice_eager_error():
    x, gate, up, down = _case(37, 80, 72, 8, torch.float16, lbias=True)
    _check("triton", "gelu_tanh", x, gate, up, down, p=0.1, gate_segment=1, dtype=torch.float16)


def test_bad_input():
    x, gate, up, down = _case(7, 16, 24, 4, torch.float32)
    with pytest.raises(ValueError, match="blk.mlp.*unknown gate activation"):
        lora_mlp(x, gate, up, down, act="relu", name="blk.mlp")
    bad_up = list(up)
    bad_up[0] = torch.randn(20, 16)
    bad_up[1] = None
    bad_up[3] = torch.randn(20, 4)
    with pytest.raises(ValueError, match="gate and up widths differ"):
        lora_mlp(x, gate, bad_up, down, name="blk.mlp")
    with pytest.raises(ValueError, match="blk.mlp down"):
        lora_mlp(x, gate, up, [torch.randn(16, 20), *down[1:]], name="blk.mlp")


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_model_parity_with_fused_mlp(arch, p):
    model = peft_model(arch, lora_dropout=p)
    ref = clone(model)
    peftfast.patch(model)
    rep = peftfast.report(model)
    mlps = [e for e in rep.modules if e.kind == "mlp"]
    assert len(mlps) == 2 and all(e.patched for e in mlps), rep.format()
    if p:
        use_shared_seed_dropout(ref, model, p)
    data = batch(arch)
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-5
    assert all(r["fused"] == 1 and not r["fallbacks"] for n, r in rep.module_runtime(model).items()
               if n.endswith(".mlp"))


def test_fused_mlp_saves_less_than_layerwise_and_peft():
    from peftfast.bench import saved_activation_bytes

    model = peft_model("llama", lora_dropout=0.1, model_kwargs=dict(hidden=64, layers=1))
    params = [*model.parameters()]
    sizes = {}
    for label in ("peft", "layers", "mlp"):
        if label == "layers":
            peftfast.patch(model, fuse_mlp=False)
        elif label == "mlp":
            peftfast.patch(model)
        mlp = model.base_model.model.model.layers[0].mlp
        h = torch.randn(1, 16, 64, requires_grad=True)
        _, saved = saved_activation_bytes(lambda: mlp(h * 1), exclude=params)
        sizes[label] = saved.total
    m, hidden, inter, r = 16, 64, 128, 8
    elt = 4
    # fused MLP: x, g, u (+ skinny products); layer-wise also keeps act(g) and h; PEFT adds dropout copies
    assert sizes["mlp"] == elt * (m * hidden + 2 * m * inter + m * 3 * r)
    # the registered LoRA op (backend cpp) also keeps its 8-byte dropout seed tensor: one per grouped call
    seed_bytes = 8 * 2 if resolve_backend("auto", h.device) == "cpp" else 0
    assert sizes["layers"] - sizes["mlp"] == elt * 2 * m * inter + seed_bytes
    assert sizes["peft"] > sizes["layers"]


def test_mlp_fallbacks_and_report():
    model = peft_model("llama")
    data = batch("llama")
    peftfast.patch(model)
    mlp_name = "base_model.model.model.layers.0.mlp"
    with model.disable_adapter():
        model(**data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**data)
    rt = peftfast.report(model).module_runtime(model)[mlp_name]
    assert rt["fused"] == 0
    assert rt["deferred"] == {"gate_proj: adapter disabled, merged or inactive": 1}
    assert rt["fallbacks"] == {"autocast is on (the projections run one by one)": 1}
    text = peftfast.report(model).format(model)
    assert f"fused    {mlp_name} (mlp)" in text and "fallback" in text and "autocast" in text
    peftfast.patch(model, fuse_mlp=False)
    assert all(not e.patched and e.reason == "fuse_mlp=False" for e in peftfast.report(model).modules
               if e.kind == "mlp")
    assert "_peftfast_mlp" not in model.base_model.model.model.layers[0].mlp.__dict__
    peftfast.patch(model)
    peftfast.unpatch(model)
    assert "forward" not in model.base_model.model.model.layers[0].mlp.__dict__
