"""Fused LoRA-MLP (``down(act(gate(x)) · up(x))`` as one op): parity against fp64, memory contract, launches and
model integration (SwiGLU Llama/Mistral/Qwen2, GeGLU Gemma)."""

import pytest
import torch
import torch.nn.functional as F
from _models import (
    assert_trains_as,
    batch,
    clone,
    cpp_or_skip,
    loss_and_grads,
    max_rel_err,
    nonzero_lora_b,
    peft_model,
    saved_shapes,
    use_shared_seed_dropout,
)
from torch import nn

import peftfast
from peftfast.bench import count_work_ops
from peftfast.ops import _counters
from peftfast.ops._backend import resolve_backend
from peftfast.ops.lora import dropout_keep_mask, tensor_seeds
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
    return saved_shapes(fn, [t for p in projs for t in p if isinstance(t, torch.Tensor)])


@pytest.mark.parametrize("backend", [*BACKENDS, "cpp"])
@pytest.mark.parametrize("gate_segment", [0, 1])
def test_recompute_gives_the_same_values_and_keeps_less(backend, gate_segment):
    """recompute="up": backward rebuilds u from x and the kept x·A_upᵀ, so u is not saved; "gate_up" (or True):
    backward runs the gate/up forward again (same seeds, same kernels), so g, u and x·[A_gate; A_up]ᵀ are not saved.
    Outputs and every gradient are those of the run that keeps everything: the same bits on the C++ and ATen paths
    (the same ATen calls), within fp32 rounding on Triton (u from the plain LoRA GEMM, not the fused gate/up one)."""
    cpp_or_skip(backend)
    m, k, i, r = 37, 40, 56, 8
    x, gate, up, down = _case(m, k, i, r, torch.float32, lbias=True)
    up[5] = torch.randn(i).requires_grad_()  # a lora_bias on the rebuilt projection too
    leaves = _tensors(x, gate, up, down)
    dy = torch.randn(m, k)
    runs = {}
    for recompute in (False, "up", True):
        def fn(recompute=recompute):
            return lora_mlp(x, gate, up, down, act="gelu_tanh", dropout_p=0.2, down_dropout_p=0.3, seed=5,
                            down_seed=6, gate_segment=gate_segment, recompute=recompute, backend=backend)

        runs[recompute] = _grads(fn, leaves, dy), _saved_shapes(fn, gate, up, down)
    kept, saved_kept = runs[False]
    for recompute, dropped in (("up", [(m, i)]), (True, [(m, 2 * r), (m, i), (m, i)])):
        again, saved_again = runs[recompute]
        if backend == "triton" and recompute == "up":
            assert max(max_rel_err(b, a) for a, b in zip(kept, again)) <= 1e-6
        else:
            assert all(torch.equal(a, b) for a, b in zip(kept, again)), recompute
        want = list(saved_kept)
        for shape in dropped:
            want.remove(shape)
        assert saved_again == want, recompute


def test_recompute_setting_is_checked():
    x, gate, up, down = _case(5, 8, 12, 2, torch.float32)
    with pytest.raises(ValueError, match=r"layers.0.mlp: unknown recompute 'gate'; choose one of \['none', 'up', "
                                         r"'gate_up'\] or a bool"):
        lora_mlp(x, gate, up, down, recompute="gate", name="layers.0.mlp")


def test_triton_launches_with_recompute():
    x, gate, up, down = _case(37, 40, 56, 8, torch.float32)
    y = lora_mlp(x, gate, up, down, dropout_p=0.1, recompute=True, backend="triton")
    with _counters.count_launches() as bwd:
        y.sum().backward()
    # the forward's x·A_catᵀ and gate/up GEMM (which writes h too: no act_mul forward), then the backward as usual
    assert dict(bwd) == {"_lora_gate_up_act_kernel": 1, "_act_mul_bwd_kernel": 1, "_lora_down_kernel": 4,
                         "_lora_gemm_kernel": 2, "_lora_da_kernel": 5}


def test_triton_launches_with_recompute_up():
    x, gate, up, down = _case(37, 40, 56, 8, torch.float32)
    y = lora_mlp(x, gate, up, down, dropout_p=0.1, recompute="up", backend="triton")
    with _counters.count_launches() as bwd:
        y.sum().backward()
    # as without recompute, plus one GEMM launch: u = x·W_upᵀ with its LoRA epilogue from the kept x·A_upᵀ (no
    # dropout mask drawn again, no x·Aᵀ launch)
    assert dict(bwd) == {"_act_mul_fwd_kernel": 1, "_act_mul_bwd_kernel": 1, "_lora_down_kernel": 3,
                         "_lora_gemm_kernel": 3, "_lora_da_kernel": 5}


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


def test_triton_traced_seeds_take_the_registered_ops_with_the_same_values(monkeypatch):
    """Under ``torch.compile`` the Triton backend's seeds are tensors (eager reads the CUDA generator's offset, which
    Dynamo cannot trace) and its projections run on the registered LoRA ops, gate/up as one grouped op and then the
    act · u op instead of the fused gate/up GEMM. Here with Dynamo's flag set by hand, the registered ops' CPU
    kernels (C++, the Triton kernels' Philox masks) standing in for their CUDA ones: the same output and gradients as
    the eager Triton path for the same seeds, through the routes named (the act · u ops, no fused gate/up kernel)."""
    cpp_or_skip("cpp")
    x, gate, up, down = _case(37, 40, 56, 8, torch.float32)
    leaves = _tensors(x, gate, up, down)
    res = {}
    for traced in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda traced=traced: traced)
        for t in leaves:
            t.grad = None

        def step():
            y = lora_mlp(x, gate, up, down, dropout_p=0.2, seed=123, down_seed=456, backend="triton")
            y.square().sum().backward()
            return y

        y, count = count_work_ops(step)
        res[traced] = [y.detach()] + [t.grad.clone() for t in leaves]
        ops, launches = count.aten, count.launches
        if traced:
            # no Triton launch of ours left for Dynamo to trace: act · u too runs on its registered ops
            assert not launches, dict(launches)
            assert ops["lora_group_fwd"] == 2 and ops["lora_group_bwd"] == 2, ops
            assert ops["act_mul_fwd"] == 2 and ops["act_mul_bwd"] == 1, ops  # forward, and h rebuilt in backward
        else:
            assert launches["_lora_gate_up_act_kernel"] == 1 and "lora_group_fwd" not in ops, ops
    errs = [max_rel_err(got, want) for got, want in zip(res[True], res[False])]
    assert max(errs) <= 2e-5, errs  # rounding only: other kernels (another mask: order 1)


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
@pytest.mark.parametrize("arch", ["llama", "gemma", "phi3", "glm"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_model_parity_with_fused_mlp(arch, p):
    """Gated MLPs (Llama, Gemma) and packed ones (Phi-3, GLM: one ``gate_up_proj``) run as one op: loss and every
    gradient as PEFT's, with LoRA dropout replayed from the fused path's seeds."""
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
    # the projections count their calls as fused inside the block op
    projs = [r["fused"] for n, r in rep.runtime(model).items() if ".mlp." in n]
    assert len(projs) == 2 * (2 if arch in ("phi3", "glm") else 3) and set(projs) == {1}


def _mlp_saved_bytes(arch: str) -> tuple[dict[str, int], torch.Tensor]:
    """Bytes one MLP (hidden 64, 16 tokens, LoRA dropout 0.1) keeps for backward: PEFT, patched with the MLP left
    to its layers (``fuse_mlp=False``), patched with ``recompute="norms"`` and patched (the default, "up")."""
    from peftfast.bench import saved_activation_bytes

    model = peft_model(arch, lora_dropout=0.1, model_kwargs=dict(hidden=64, layers=1))
    params = [*model.parameters()]
    sizes = {}
    for label in ("peft", "layers", "norms", "mlp"):
        if label == "layers":
            peftfast.patch(model, fuse_mlp=False)
        elif label == "norms":
            peftfast.patch(model, recompute="norms")
        elif label == "mlp":
            peftfast.patch(model)
        mlp = model.base_model.model.model.layers[0].mlp
        h = torch.randn(1, 16, 64, requires_grad=True)
        _, saved = saved_activation_bytes(lambda: mlp(h * 1), exclude=params)
        sizes[label] = saved.total
    return sizes, h


def test_fused_mlp_saves_less_than_layerwise_and_peft():
    sizes, h = _mlp_saved_bytes("llama")
    m, hidden, inter, r = 16, 64, 128, 8
    elt = 4
    # fused MLP: x, g, u (+ skinny products), by default (recompute="up") not u; layer-wise also keeps act(g) and
    # h; PEFT adds dropout copies
    assert sizes["norms"] == elt * (m * hidden + 2 * m * inter + m * 3 * r)
    assert sizes["mlp"] == elt * (m * hidden + m * inter + m * 3 * r)
    # the registered LoRA op (CPU path: tensor_seeds) also keeps its 8-byte dropout seed tensor: one per grouped call
    seed_bytes = 8 * 2 if tensor_seeds(resolve_backend("auto", h.device), h.device) else 0
    assert sizes["layers"] - sizes["norms"] == elt * 2 * m * inter + seed_bytes
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


# ----------------------------------------------------------------------------------------------------------------
# frozen gated MLP (the base of a model tuned elsewhere): frozen_mlp and its patch
# ----------------------------------------------------------------------------------------------------------------
def _frozen_case(m, k, i, dtype, bias, noncontig=False):
    gen = torch.Generator().manual_seed(3)

    def lin(n, kk):
        w = (torch.randn(n, kk, generator=gen) / kk**0.5).to(dtype)
        return w, (torch.randn(n, generator=gen) * 0.5).to(dtype) if bias else None

    if noncontig:  # a transposed view: last-dim stride != 1
        x = torch.randn(k, m, generator=gen).to(dtype).t().requires_grad_()
    else:
        x = torch.randn(3, m, k, generator=gen).to(dtype)[1].requires_grad_()
    return x, lin(i, k), lin(i, k), lin(k, i)


def _frozen_ref(x, gate, up, down, act, dtype):
    def lin(t, p):
        return F.linear(t, p[0].to(dtype), None if p[1] is None else p[1].to(dtype))

    return lin(ACTS[act](lin(x, gate)) * lin(x, up), down)


def _frozen_run(fn, x, dy):
    x.grad = None
    y = fn()
    y.backward(dy)
    return y.detach().double(), x.grad.double()


@pytest.mark.parametrize("backend", [*BACKENDS, "cpp"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bias,recompute,noncontig", [(True, False, False), (False, True, True), (True, True, False),
                                                      (True, "up", True)])
def test_frozen_mlp_fp32_parity(backend, act, bias, recompute, noncontig):
    """Output and input gradient against fp64 at odd shapes; no weight gets a gradient."""
    from peftfast.ops.mlp import frozen_mlp

    cpp_or_skip(backend)
    x, gate, up, down = _frozen_case(37, 40, 56, torch.float32, bias, noncontig)
    dy = torch.randn(37, 40)
    got = _frozen_run(lambda: frozen_mlp(x, gate, up, down, act=act, recompute=recompute, backend=backend), x, dy)
    xr = x.detach().double().requires_grad_()
    ref = _frozen_run(lambda: _frozen_ref(xr, gate, up, down, act, torch.float64), xr, dy.double())
    for a, r in zip(got, ref):
        assert max_rel_err(a, r) <= 3e-6
    assert all(t is None or t.grad is None for p in (gate, up, down) for t in p)


@pytest.mark.parametrize("backend", [*BACKENDS, "cpp"])
def test_frozen_mlp_fp16_within_twice_eager_error(backend):
    from peftfast.ops.mlp import frozen_mlp

    cpp_or_skip(backend)
    x, gate, up, down = _frozen_case(37, 80, 72, torch.float16, True)
    dy = torch.randn(37, 80).half()
    got = _frozen_run(lambda: frozen_mlp(x, gate, up, down, act="gelu_tanh", backend=backend), x, dy)
    eager = _frozen_run(lambda: _frozen_ref(x, gate, up, down, "gelu_tanh", torch.float16), x, dy)
    xr = x.detach().double().requires_grad_()
    ref = _frozen_run(lambda: _frozen_ref(xr, gate, up, down, "gelu_tanh", torch.float64), xr, dy.double())
    for a, e, r in zip(got, eager, ref):
        assert max_rel_err(a, r) <= 2 * max_rel_err(e, r) + 1e-4


@pytest.mark.parametrize("backend", [*BACKENDS, "cpp"])
def test_frozen_mlp_saves_g_and_u_or_less(backend):
    """Eager autograd keeps g, act(g) and u; the op keeps g and u, with recompute="up" x and g, with "gate_up" (or
    True) x alone."""
    from peftfast.ops.mlp import frozen_mlp

    cpp_or_skip(backend)
    m, k, i = 37, 40, 56
    x, gate, up, down = _frozen_case(m, k, i, torch.float32, True)
    assert _saved_shapes(lambda: _frozen_ref(x, gate, up, down, "silu", torch.float32), gate, up, down) == \
        [(m, i)] * 3
    assert _saved_shapes(lambda: frozen_mlp(x, gate, up, down, backend=backend), gate, up, down) == [(m, i)] * 2
    assert _saved_shapes(lambda: frozen_mlp(x, gate, up, down, recompute="up", backend=backend),
                         gate, up, down) == [(m, k), (m, i)]
    for recompute in (True, "gate_up"):
        assert _saved_shapes(lambda: frozen_mlp(x, gate, up, down, recompute=recompute, backend=backend),
                             gate, up, down) == [(m, k)]


def test_frozen_mlp_bad_input():
    from peftfast.ops.mlp import frozen_mlp

    x, gate, up, down = _frozen_case(7, 16, 24, torch.float32, True)
    with pytest.raises(ValueError, match="blk.mlp: unknown gate activation 'relu'"):
        frozen_mlp(x, gate, up, down, act="relu", name="blk.mlp")
    with pytest.raises(ValueError, match=r"blk.mlp: up weight has shape \(20, 16\), expected \(24, 16\)"):
        frozen_mlp(x, gate, (torch.randn(20, 16), None), down, name="blk.mlp")
    with pytest.raises(ValueError, match=r"blk.mlp: down bias has shape \(3,\)"):
        frozen_mlp(x, gate, up, (down[0], torch.randn(3)), name="blk.mlp")
    with pytest.raises(TypeError, match="blk.mlp: input dtype torch.float64 differs"):
        frozen_mlp(x.double(), gate, up, down, name="blk.mlp")
    with pytest.raises(ValueError, match="blk.mlp: projection weights require grad"):
        frozen_mlp(x, (gate[0].requires_grad_(), gate[1]), up, down, name="blk.mlp")
    with torch.no_grad():  # no gradient will be asked for: a trainable weight is fine
        frozen_mlp(x, gate, up, down)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("recompute", ["norms", "mlp"])
def test_attention_only_lora_gets_its_frozen_mlps_fused(arch, recompute):
    """LoRA on q/v only (PEFT's default targets for Llama): each MLP is a frozen base module; patch runs it on the
    frozen-MLP op with the same loss and LoRA gradients, and it keeps less for backward than before."""
    from peftfast.bench import saved_activation_bytes

    model = peft_model(arch, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    ref = clone(model)
    params = [*model.parameters()]
    data = batch(arch)
    _, before = saved_activation_bytes(lambda: model(**data).loss, exclude=params)
    peftfast.patch(model, recompute=recompute)
    rep = peftfast.report(model)
    mlps = [e for e in rep.modules if e.kind == "mlp"]
    assert len(mlps) == 2 and all(e.patched for e in mlps), rep.format()
    use_shared_seed_dropout(ref, model, 0.1)
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys() and all(".lora_" in n for n in grads)
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-5
    runtime = rep.module_runtime(model)
    assert [r["fused"] for n, r in runtime.items() if n.endswith(".mlp")] == [1, 1]
    _, after = saved_activation_bytes(lambda: model(**data).loss, exclude=params)
    tokens, inter = data["input_ids"].numel(), model.config.intermediate_size
    # per layer, eager keeps g, act(g), u; the op g and u, or (recompute="mlp") only x, rebuilt from the norm input
    # by the fused block: one [tokens, inter] fp32 tensor fewer per layer at least, three with recompute="mlp"
    fewer = 4 * tokens * inter * (3 if recompute == "mlp" else 1) * 2
    assert before.total - after.total >= fewer, (before.total, after.total)


def test_frozen_mlp_fallbacks_autocast_and_unpatch():
    model = peft_model("llama", target_modules=["q_proj", "v_proj"])
    data = batch("llama")
    peftfast.patch(model)
    layers = model.base_model.model.model.layers
    mlp_name = "base_model.model.model.layers.0.mlp"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = clone(model)
        peftfast.unpatch(ref)
        torch.manual_seed(0)
        want = ref(**data).logits
        torch.manual_seed(0)
        got = model(**data).logits
    assert got.dtype == want.dtype
    assert max_rel_err(got, want) <= 2e-2  # bf16: the same casts, another op order
    assert peftfast.report(model).module_runtime(model)[mlp_name] == {"fused": 1, "fallbacks": {}, "deferred": {}}
    layers[0].mlp.up_proj.weight.requires_grad_(True)  # trained now: the op computes no weight gradient
    loss, grads = loss_and_grads(model, data)
    assert "base_model.model.model.layers.0.mlp.up_proj.weight" in grads
    rt = peftfast.report(model).module_runtime(model)
    assert rt[mlp_name]["fallbacks"] == {
        "up_proj trains (requires_grad): the frozen-MLP op computes no weight gradients": 1}
    peftfast.patch(model)
    entry = next(e for e in peftfast.report(model).modules if e.name == mlp_name)
    assert not entry.patched and entry.reason.startswith("up_proj trains")
    assert "forward" not in layers[0].mlp.__dict__ and "forward" in layers[1].mlp.__dict__
    peftfast.patch(model, fuse_mlp=False)
    assert {e.reason for e in peftfast.report(model).modules if e.kind == "mlp"} == {"fuse_mlp=False"}
    assert all("forward" not in layer.mlp.__dict__ for layer in layers)
    peftfast.patch(model)
    peftfast.unpatch(model)
    assert all("forward" not in layer.mlp.__dict__ for layer in layers)


def test_frozen_mlp_with_a_quantized_or_custom_projection_is_reported():
    class MyLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 1.0

    model = peft_model("llama", target_modules=["q_proj"])
    mlp = model.base_model.model.model.layers[1].mlp
    old = mlp.down_proj
    mlp.down_proj = MyLinear(old.in_features, old.out_features, bias=old.bias is not None).requires_grad_(False)
    peftfast.patch(model)
    reasons = {e.name: e.reason for e in peftfast.report(model).modules if e.kind == "mlp"}
    assert reasons == {"base_model.model.model.layers.0.mlp": None,
                       "base_model.model.model.layers.1.mlp": "down_proj is a MyLinear, not a plain nn.Linear"}


def test_frozen_mlp_compiles_without_breaks_in_its_code():
    """``torch.compile`` (aot_eager) of an attention-only LoRA model: the frozen-MLP forward and op trace without a
    graph break in their files, with the eager loss and gradients."""
    import os

    import torch._dynamo
    from torch._dynamo.backends.debugging import ExplainWithBackend

    model = peft_model("llama", target_modules=["q_proj", "v_proj"], model_kwargs={"layers": 1})
    peftfast.patch(model, recompute="mlp")
    data = batch("llama")
    e_loss, e_grads = loss_and_grads(model, data)
    torch._dynamo.reset()
    explain = ExplainWithBackend("aot_eager")
    try:
        c_loss, c_grads = loss_and_grads(model, data, call=torch.compile(model, backend=explain))
        out = explain.output()
    finally:
        torch._dynamo.reset()
    assert abs(c_loss.item() - e_loss.item()) <= 1e-5 * abs(e_loss.item())
    assert max(max_rel_err(c_grads[n], e_grads[n]) for n in e_grads) <= 1e-5
    ours = {os.path.join(os.path.dirname(peftfast.__file__), *p.split("/")) for p in ("modules/mlp.py", "ops/mlp.py")}
    breaks = [br.reason for br in out.break_reasons
              if any(os.path.abspath(f.filename) in ours for f in br.user_stack)]
    assert breaks == []
    (rt,) = [r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith(".mlp")]
    assert rt["fused"] == 2 and not rt["fallbacks"]  # the eager call and the one traced


def test_frozen_mlp_registers_zero3_partitioned_weights():
    """DeepSpeed ZeRO-3 gathers a module's parameters around its own forward only, and the frozen-MLP op reads its
    projections' weights directly: once one is partitioned (marked by ``ds_id``), the MLP registers them as DeepSpeed
    external parameters of its own at its next call (before DeepSpeed's pre-hook) and keeps running fused."""
    pytest.importorskip("deepspeed")
    model = peft_model("llama", target_modules=["q_proj", "v_proj"])
    data = batch("llama")
    layers = model.base_model.model.model.layers
    peftfast.patch(model)
    mlp = layers[1].mlp
    mlp.down_proj.weight.ds_id = 7  # as deepspeed.initialize marks the parameters it partitions
    model(**data)
    rt = peftfast.report(model).module_runtime(model)
    assert rt["base_model.model.model.layers.1.mlp"] == {"fused": 1, "fallbacks": {}, "deferred": {}}
    assert rt["base_model.model.model.layers.0.mlp"] == {"fused": 1, "fallbacks": {}, "deferred": {}}
    assert set(mlp._external_params) == {id(mlp.down_proj.weight)}
    assert not getattr(layers[0].mlp, "_external_params", {})
    peftfast.patch(model)
    reasons = {e.name: e.reason for e in peftfast.report(model).modules if e.kind == "mlp"}
    assert reasons == {"base_model.model.model.layers.0.mlp": None, "base_model.model.model.layers.1.mlp": None}
    peftfast.unpatch(model)
    assert not mlp._external_params and not mlp._forward_pre_hooks


# ----------------------------------------------------------------------------------------------------------------
# packed gated MLP (one gate_up_proj: Phi-3, GLM): lora_packed_mlp and its patch
# ----------------------------------------------------------------------------------------------------------------
def _packed_case(m, k, i, r, dtype, *, bias=True, lbias=False):
    x = torch.randn(m, k).to(dtype).requires_grad_()
    return x, _proj(2 * i, k, r, dtype, bias, lbias, 2.0), _proj(k, i, r, dtype, bias, lbias, 1.5)


def _packed_reference(x, gate_up, down, act, masks, p, p_d, dtype):
    mgu, md = masks if masks is not None else (None, None)
    g, u = _lin(x, gate_up, mgu, p, dtype).chunk(2, dim=-1)
    return _lin(ACTS[act](g) * u, down, md, p_d, dtype)


def _check_packed(backend, act, x, gate_up, down, *, p=0.0, p_d=0.0, tol=None, dtype=torch.float32,
                  recompute=False):
    from peftfast.ops.mlp import lora_packed_mlp

    m, k = x.shape
    i = gate_up[0].shape[0] // 2
    seed, dseed = 77, 78
    masks = None
    if p or p_d:  # one mask over x for the whole gate_up adapter, as PEFT's one dropout module draws it
        masks = (dropout_keep_mask(seed, 1, m, k, p, device=x.device, backend=backend)[0] if p else None,
                 dropout_keep_mask(dseed, 1, m, i, p_d, device=x.device, backend=backend)[0] if p_d else None)
    leaves = _tensors(x, gate_up, down)
    dy = torch.randn(m, k).to(dtype)
    got = _grads(lambda: lora_packed_mlp(x, gate_up, down, act=act, dropout_p=p, down_dropout_p=p_d, seed=seed,
                                         down_seed=dseed, recompute=recompute, backend=backend), leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    rx = next(it)
    rgu, rd = _double(gate_up, it), _double(down, it)
    for rp, pr in ((rgu, gate_up), (rd, down)):
        rp[0] = pr[0].double()
    ref = _grads(lambda: _packed_reference(rx, rgu, rd, act, masks, p, p_d, torch.float64), ref_leaves, dy.double())
    if tol is None:
        eager = _grads(lambda: _packed_reference(x, gate_up, down, act, masks, p, p_d, dtype), leaves, dy)
    for j, (a, r) in enumerate(zip(got, ref)):
        scale = r.abs().max().clamp_min(1e-6)
        err = ((a - r).abs().max() / scale).item()
        bound = tol if tol is not None else 2 * ((eager[j] - r).abs().max() / scale).item() + 2e-3
        assert err <= bound, (j, err, bound)
    return got


@pytest.mark.parametrize("backend", [*BACKENDS, "cpp"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("m,k,i,r,p,p_d,bias,lbias", [
    (37, 40, 56, 8, 0.0, 0.0, True, False),
    (19, 24, 40, 4, 0.3, 0.2, False, True),
])
def test_packed_fp32_parity(backend, act, m, k, i, r, p, p_d, bias, lbias):
    """``down(act(g)·u)`` of ``[g | u] = gate_up(x)``: output and the gradients of x and every LoRA weight and bias
    against fp64, with one dropout mask over x for the packed adapter and its own for the down projection."""
    cpp_or_skip(backend)
    x, gate_up, down = _packed_case(m, k, i, r, torch.float32, bias=bias, lbias=lbias)
    _check_packed(backend, act, x, gate_up, down, p=p, p_d=p_d, tol=3e-5)


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float16), ("torch", torch.bfloat16),
                                           ("cpp", torch.bfloat16)])
def test_packed_low_precision_within_twice_eager_error(backend, dtype):
    cpp_or_skip(backend)
    x, gate_up, down = _packed_case(37, 40, 56, 8, dtype)
    _check_packed(backend, "silu", x, gate_up, down, p=0.1, p_d=0.1, dtype=dtype)


@pytest.mark.parametrize("backend", [*BACKENDS, "cpp"])
def test_packed_saves_x_gate_up_and_skinny_products_and_recompute_keeps_less(backend):
    """Kept: x, ``[g | u]`` (one tensor: the halves are views of it) and the two rank-r products; never act(g), h
    or a dropout copy. With ``recompute="up"`` g alone instead of ``[g | u]``; with ``"gate_up"`` the gate_up output
    and its product go too; the same values either way."""
    from peftfast.ops.mlp import lora_packed_mlp

    cpp_or_skip(backend)
    m, k, i, r = 37, 40, 56, 8
    x, gate_up, down = _packed_case(m, k, i, r, torch.float32, lbias=True)
    leaves = _tensors(x, gate_up, down)
    dy = torch.randn(m, k)
    runs = {}
    for recompute in (False, "up", True):
        def fn(recompute=recompute):
            return lora_packed_mlp(x, gate_up, down, act="gelu", dropout_p=0.2, down_dropout_p=0.3, seed=5,
                                   down_seed=6, recompute=recompute, backend=backend)

        shapes = [s for s in _saved_shapes(fn, gate_up, down) if s != (1,)]  # the C++ ops' seed tensors
        runs[recompute] = _grads(fn, leaves, dy), shapes
    (kept, saved_kept), (half, saved_half), (again, saved_again) = runs[False], runs["up"], runs[True]
    assert saved_kept == sorted([(m, k), (m, r), (m, 2 * i), (m, r)])
    assert saved_half == sorted([(m, k), (m, r), (m, i), (m, r)])
    assert saved_again == sorted([(m, k), (m, r)])
    assert all(torch.equal(a, b) for a, b in zip(kept, again))
    # u from a GEMM over the up rows of W alone: the same values up to fp32 rounding (bit-equal where the BLAS
    # blocks the K loop alike)
    assert max(max_rel_err(b, a) for a, b in zip(kept, half)) <= 1e-6


def test_packed_bad_input():
    from peftfast.ops.mlp import lora_packed_mlp

    x, gate_up, down = _packed_case(5, 8, 6, 2, torch.float32)
    odd = [torch.randn(11, 8), None, *gate_up[2:]]
    odd[3] = torch.randn(11, 2)
    with pytest.raises(ValueError, match="layers.0.mlp: gate_up has 11 outputs"):
        lora_packed_mlp(x, odd, down, name="layers.0.mlp")
    with pytest.raises(ValueError, match="unknown gate activation"):
        lora_packed_mlp(x, gate_up, down, act="relu")
    with pytest.raises(ValueError, match="down.*input has 6 features"):
        lora_packed_mlp(x, gate_up, [torch.randn(8, 5), None, torch.randn(2, 5), torch.randn(8, 2), 1.0, None])


def test_packed_mlp_saves_less_than_layerwise_and_peft():
    sizes, h = _mlp_saved_bytes("phi3")
    m, hidden, inter, r = 16, 64, 128, 8
    seed_bytes = 8 * 2 if tensor_seeds(resolve_backend("auto", h.device), h.device) else 0
    # packed op: x, [g | u], two skinny products; layer-wise keeps act(g) and h (the down projection's input) too,
    # and the registered LoRA op's 8-byte seed tensor per layer (the packed op keeps its seeds as integers)
    assert sizes["norms"] == 4 * (m * hidden + 2 * m * inter + 2 * m * r)
    assert sizes["mlp"] == 4 * (m * hidden + m * inter + 2 * m * r)  # the default, "up": g, a copy of [g | u]'s half
    assert sizes["layers"] - sizes["norms"] == 4 * 2 * m * inter + seed_bytes
    assert sizes["peft"] > sizes["layers"]


def test_packed_mlp_probe_refuses_another_formula_and_unpatch_restores():
    """The probe runs the class's own code: a packed MLP computing ``act(up) · gate`` keeps its forward, with the
    reason in the report; an unchanged one is fused, and ``unpatch`` restores its forward."""
    from torch import nn

    from peftfast.modules.mlp import why_not_packed

    model = peft_model("phi3")
    mlp = model.base_model.model.model.layers[0].mlp

    class Swapped(type(mlp)):
        def forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.activation_fn(up) * gate)

    peftfast.patch(model)
    assert why_not_packed(mlp) is None
    mlp.__class__ = Swapped
    assert "computes something else" in why_not_packed(mlp)
    peftfast.patch(model)
    (entry,) = [e for e in peftfast.report(model).modules if e.name.endswith("layers.0.mlp")]
    assert not entry.patched and "computes something else" in entry.reason
    assert isinstance(mlp.gate_up_proj, nn.Module) and "forward" not in mlp.__dict__
    peftfast.unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m).__name__ == "Phi3MLP")


@pytest.mark.parametrize("mlp_dropout", [0.0, 0.1])
def test_modernbert_packed_mlp_runs_the_packed_op_unless_its_dropout_drops(mlp_dropout):
    """ModernBERT's MLP (``Wo(drop(act(input) * gate))``, ``input, gate = Wi(x).chunk(2)``) is a packed gated MLP
    under other names: fused, with PEFT's loss and gradients; with ``mlp_dropout`` > 0 in training its calls run the
    class's forward, counted with the reason, and still match (the same RNG draws in the same order); in eval mode
    the dropout drops nothing and the op serves them."""
    model = peft_model("modernbert", model_kwargs=dict(mlp_dropout=mlp_dropout), lora_dropout=0.1)
    ref = clone(model)
    peftfast.patch(model)
    entries = [e for e in peftfast.report(model).modules if e.kind == "mlp"]
    assert len(entries) == 2 and all(e.patched for e in entries), peftfast.report(model).format()
    use_shared_seed_dropout(ref, model, 0.1)
    data = batch("modernbert")
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= 2e-5
    runtime = [r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith(".mlp")]
    if mlp_dropout:
        reason = "drop drops its input (p=0.1): the packed op has no dropout there"
        assert all(r["fused"] == 0 and r["fallbacks"] == {reason: 1} for r in runtime), runtime
        model.eval()
        with torch.no_grad():
            model(**data)
        runtime = [r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith(".mlp")]
    assert all(r["fused"] == 1 for r in runtime), runtime


def test_an_mlp_of_another_layout_is_reported_with_its_reason():
    """An MLP holding LoRA layers that is neither gate/up/down, gate_up/down nor a two-layer MLP keeps its forward
    (its LoRA layers fused one by one), with the reason in the report."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class ThreeWayMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.c(torch.relu(self.a(x)) + self.b(x))

    holder = nn.Module()
    holder.mlp = ThreeWayMLP()
    model = get_peft_model(holder, LoraConfig(r=2, target_modules=["a", "b", "c"]))
    peftfast.patch(model)
    rep = peftfast.report(model)
    (entry,) = [e for e in rep.modules if e.kind == "mlp"]
    assert not entry.patched and "ThreeWayMLP layout" in entry.reason and "not fused as a block" in entry.reason
    assert all(e.patched for e in rep.entries)


@pytest.mark.parametrize("act", list(ACTS))
def test_triton_act_mul_reads_and_writes_packed_halves_in_place(act):
    """The packed MLP's ``[g | u]`` halves (row stride 2·I) go to the Triton activation kernels as they are, and the
    backward writes dg and du straight into the halves of one ``[M, 2·I]`` gradient: the values of the contiguous
    case, no copy."""
    from peftfast.ops.mlp import act_mul, act_mul_backward

    g_ = torch.Generator().manual_seed(2)
    y, dh = torch.randn(37, 80, generator=g_), torch.randn(37, 40, generator=g_)
    g, u = y[:, :40], y[:, 40:]
    assert not g.is_contiguous()
    h = act_mul(g, u, act, "triton")
    assert torch.equal(h, act_mul(g.contiguous(), u.contiguous(), act, "triton"))
    assert torch.allclose(h, act_mul(g, u, act, "torch"), atol=1e-6)
    dy = torch.full((37, 80), float("nan"))
    dg, du = act_mul_backward(dh, g, u, act, "triton", out=(dy[:, :40], dy[:, 40:]))
    assert dg.data_ptr() == dy.data_ptr() and du.data_ptr() == dy[:, 40:].data_ptr()
    want = act_mul_backward(dh, g.contiguous(), u.contiguous(), act, "torch")
    assert torch.allclose(dy, torch.cat(want, dim=1), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# DoRA gated MLP (dora_mlp): three DoRA linears without dropout and act(g)·u as one op
# ----------------------------------------------------------------------------------------------------------------
def _dora_proj(n, k, r, dtype, bias, scale, lora_dtype=None):
    ldt = lora_dtype or dtype
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    b = torch.randn(n).to(dtype).requires_grad_() if bias else None
    a = (torch.randn(r, k) / k**0.5).to(ldt).requires_grad_()
    bm = (torch.randn(n, r) * 0.3).to(ldt).requires_grad_()
    mag = (torch.rand(n) + 0.5).to(ldt).requires_grad_()
    return [w, b, a, bm, scale, mag]


def _dora_case(m, k, i, r, dtype, lora_dtype=None):
    torch.manual_seed(21)
    x = torch.randn(m, k).to(dtype).requires_grad_()
    return (x, _dora_proj(i, k, r, dtype, True, 2.0, lora_dtype), _dora_proj(i, k, r, dtype, False, 0.5, lora_dtype),
            _dora_proj(k, i, r, dtype, True, 1.5, lora_dtype))


def _dora_leaves(x, *projs):
    return [x] + [t for p in projs for t in (p[1], p[2], p[3], p[5]) if t is not None]


def _dora_layerwise(x, gate, up, down, act, dtype=None):
    """The layers one by one on PEFT's DoRA maths (fp64 when ``dtype`` is float64): ``m/‖W + sBA‖ ⊙ (xWᵀ + s·xAᵀBᵀ)
    + b`` per projection, the norm detached."""
    def lin(t, p):
        w, b, a, bm, s, mag = p
        dt = dtype or t.dtype
        w, a, bm = w.to(dt), a.to(dt), bm.to(dt)
        norm = torch.linalg.norm(w + s * bm @ a, dim=1).detach()
        z = t @ w.t() + s * (t @ a.t()) @ bm.t()
        y = z * (mag.to(dt) / norm)
        return y + b.to(dt) if b is not None else y

    xx = x.to(dtype) if dtype is not None else x
    return lin(ACTS[act](lin(xx, gate)) * lin(xx, up), down)


@pytest.mark.parametrize("backend", [*BACKENDS, "cpp"])
@pytest.mark.parametrize("recompute", ["none", "up", "gate_up"])
def test_dora_mlp_fp32_parity(backend, recompute):
    """Output and the gradients of x, the biases, A, B and the three magnitudes against fp64, odd shapes; every
    recompute setting gives the same values."""
    from peftfast.ops.mlp import dora_mlp

    cpp_or_skip(backend)
    x, gate, up, down = _dora_case(37, 40, 56, 8, torch.float32)
    leaves = _dora_leaves(x, gate, up, down)
    dy = torch.randn(37, 40)
    got = _grads(lambda: dora_mlp(x, gate, up, down, act="gelu_tanh", recompute=recompute, backend=backend), leaves,
                 dy)
    ref = _grads(lambda: _dora_layerwise(x, gate, up, down, "gelu_tanh", torch.float64), leaves, dy.double())
    for j, (a, r) in enumerate(zip(got, ref)):
        assert max_rel_err(a, r) <= 3e-5, j


@pytest.mark.parametrize("backend,dtype,lora_dtype", [("torch", torch.bfloat16, torch.bfloat16),
                                                      ("cpp", torch.bfloat16, torch.float32),
                                                      ("triton", torch.float16, torch.float32)])
def test_dora_mlp_low_precision_within_twice_eager_error(backend, dtype, lora_dtype):
    """bf16 / fp16 bases, LoRA weights and magnitudes in the base dtype or fp32 (PEFT's autocast_adapter_dtype):
    within twice the error of the same maths run eagerly in the base dtype, against fp64."""
    from peftfast.ops.mlp import dora_mlp

    cpp_or_skip(backend)
    x, gate, up, down = _dora_case(37, 40, 56, 8, dtype, lora_dtype)
    leaves = _dora_leaves(x, gate, up, down)
    dy = torch.randn(37, 40).to(dtype)
    got = _grads(lambda: dora_mlp(x, gate, up, down, act="silu", backend=backend), leaves, dy)
    eager = _grads(lambda: _dora_layerwise(x, gate, up, down, "silu", dtype), leaves, dy)
    ref = _grads(lambda: _dora_layerwise(x, gate, up, down, "silu", torch.float64), leaves, dy.double())
    for j, (a, e, r) in enumerate(zip(got, eager, ref)):
        assert max_rel_err(a, r) <= 2 * max_rel_err(e, r) + 1e-3, j


@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_mlp_saves_pre_scale_outputs_only(backend):
    """Kept: x, the three rank-r products, z_g, z_u (I each; recompute="up": z_g only; "gate_up": neither) and z_d
    (the down projection's pre-scale output), with the three [N] scales; never g, u, act(g) or h, which the layers
    one by one keep besides."""
    from peftfast.ops.lora import dora_linear
    from peftfast.ops.mlp import dora_mlp

    m, k, i, r = 37, 40, 56, 8
    x, gate, up, down = _dora_case(m, k, i, r, torch.float32)
    params = [t for p in (gate, up, down) for t in p if isinstance(t, torch.Tensor)]
    scales = [(i,), (i,), (k,), (i,), (i,), (k,)]  # the norms and the magnitude/norm scales
    for recompute, wide in (("none", [(m, i), (m, i)]), ("up", [(m, i)]), ("gate_up", [])):
        saved = saved_shapes(lambda: dora_mlp(x, gate, up, down, recompute=recompute, backend=backend), params)
        skinny = [(m, 2 * r)] if recompute != "gate_up" else []
        assert saved == sorted([(m, k), (m, r), (m, k), *skinny, *wide, *scales]), (recompute, saved)

    def layerwise():
        def lin(t, p):
            return dora_linear(t, p[0], p[1], p[2], p[3], p[4], p[5], backend=backend)
        return lin(F.silu(lin(x, gate)) * lin(x, up), down)

    one_by_one = saved_shapes(layerwise, params)
    assert sum(s == (m, i) for s in one_by_one) >= 6  # z_g, g, z_u, u, act(g), h


def _dora_layerwise_dropout(x, gate, up, down, act, dtype, keeps, ps):
    """PEFT's DoRA-with-dropout maths layer by layer, ``x Wᵀ + b + (mag/‖W + sBA‖ − 1)·x_d Wᵀ + mag/‖·‖·s·x_d Aᵀ
    Bᵀ``, with the masks ``keeps`` (gate, up, down) and probabilities ``ps`` (gate/up, down), in ``dtype``."""
    def lin(t, p, keep, prob):
        w, b, a, bm, s, mag = p
        w, a, bm, mag = w.to(dtype), a.to(dtype), bm.to(dtype), mag.to(dtype)
        scale = mag / torch.linalg.norm(w + s * bm @ a, dim=1).detach()
        td = t * keep.to(dtype) / (1 - prob)
        y = t @ w.t() + (scale - 1) * (td @ w.t()) + scale * s * ((td @ a.t()) @ bm.t())
        return y + b.to(dtype) if b is not None else y

    xx = x.to(dtype)
    h = ACTS[act](lin(xx, gate, keeps[0], ps[0])) * lin(xx, up, keeps[1], ps[0])
    return lin(h, down, keeps[2], ps[1])


def _dora_dropout_masks(backend, m, k, i, ps, seeds=(123, 456)):
    gu = dropout_keep_mask(seeds[0], 2, m, k, ps[0], device="cpu", backend=backend)
    d = dropout_keep_mask(seeds[1], 1, m, i, ps[1], device="cpu", backend=backend)[0]
    return gu[0], gu[1], d


@pytest.mark.parametrize("backend", [*BACKENDS, "cpp"])
@pytest.mark.parametrize("recompute", ["none", "up", "gate_up"])
def test_dora_mlp_dropout_fp32_parity(backend, recompute):
    """With dropout (gate/up 0.25, down 0.1): output and the gradients of x, the biases, A, B and the magnitudes
    against fp64 PEFT maths on the op's own masks (gate and up segments 0 and 1 of ``seed``, down ``down_seed``);
    every recompute setting gives the same values."""
    from peftfast.ops.mlp import dora_mlp

    cpp_or_skip(backend)
    m, k, i, ps = 37, 40, 56, (0.25, 0.1)
    x, gate, up, down = _dora_case(m, k, i, 8, torch.float32)
    leaves = _dora_leaves(x, gate, up, down)
    dy = torch.randn(m, k)
    got = _grads(lambda: dora_mlp(x, gate, up, down, act="gelu_tanh", dropout_p=ps[0], down_dropout_p=ps[1],
                                  seed=123, down_seed=456, recompute=recompute, backend=backend), leaves, dy)
    keeps = _dora_dropout_masks(backend, m, k, i, ps)
    assert 0.6 < keeps[0].float().mean() < 0.9 and not torch.equal(keeps[0], keeps[1])
    ref = _grads(lambda: _dora_layerwise_dropout(x, gate, up, down, "gelu_tanh", torch.float64, keeps, ps), leaves,
                 dy.double())
    for j, (a, r) in enumerate(zip(got, ref)):
        assert max_rel_err(a, r) <= 3e-5, j


@pytest.mark.parametrize("backend,dtype,lora_dtype", [("torch", torch.bfloat16, torch.bfloat16),
                                                      ("cpp", torch.bfloat16, torch.float32),
                                                      ("triton", torch.float16, torch.float32)])
def test_dora_mlp_dropout_low_precision_within_twice_eager_error(backend, dtype, lora_dtype):
    """bf16 / fp16 with dropout: within twice the error of the same maths run eagerly in the base dtype, against
    fp64, on the same masks."""
    from peftfast.ops.mlp import dora_mlp

    cpp_or_skip(backend)
    m, k, i, ps = 37, 40, 56, (0.2, 0.2)
    x, gate, up, down = _dora_case(m, k, i, 8, dtype, lora_dtype)
    leaves = _dora_leaves(x, gate, up, down)
    dy = torch.randn(m, k).to(dtype)
    keeps = _dora_dropout_masks(backend, m, k, i, ps)
    got = _grads(lambda: dora_mlp(x, gate, up, down, act="silu", dropout_p=0.2, seed=123, down_seed=456,
                                  backend=backend), leaves, dy)
    eager = _grads(lambda: _dora_layerwise_dropout(x, gate, up, down, "silu", dtype, keeps, ps), leaves, dy)
    ref = _grads(lambda: _dora_layerwise_dropout(x, gate, up, down, "silu", torch.float64, keeps, ps), leaves,
                 dy.double())
    for j, (a, e, r) in enumerate(zip(got, eager, ref)):
        assert max_rel_err(a, r) <= 2 * max_rel_err(e, r) + 1e-3, j


@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_mlp_dropout_saves_no_dropped_input(backend):
    """With dropout the op keeps x, the rank-r products, z of each projection (for the magnitudes' gradients) and
    g and u (recompute="up": g; "gate_up": neither), with the [N] scales: no dropped input, no mask, no act(g) or
    h, which the DoRA layers one by one keep (a dropped input and a mask per projection)."""
    from peftfast.ops.lora import dora_linear
    from peftfast.ops.mlp import dora_mlp

    m, k, i, r = 37, 40, 56, 8
    x, gate, up, down = _dora_case(m, k, i, r, torch.float32)
    params = [t for p in (gate, up, down) for t in p if isinstance(t, torch.Tensor)]
    scales = [(i,), (i,), (k,), (i,), (i,), (k,)]
    for recompute, gu in (("none", [(m, i), (m, i)]), ("up", [(m, i)]), ("gate_up", [])):
        saved = saved_shapes(lambda: dora_mlp(x, gate, up, down, dropout_p=0.1, recompute=recompute,
                                              backend=backend), params)
        assert saved == sorted([(m, k), (m, 2 * r), (m, r), (m, i), (m, i), (m, k), *gu, *scales]), (recompute, saved)

    def layerwise():
        def lin(t, p):
            return dora_linear(t, p[0], p[1], p[2], p[3], p[4], p[5], dropout_p=0.1, backend=backend)
        return lin(F.silu(lin(x, gate)) * lin(x, up), down)

    one_by_one = saved_shapes(layerwise, params)
    assert sum(s == (m, k) for s in one_by_one) >= 4 and sum(s == (m, i) for s in one_by_one) >= 7, one_by_one


def test_dora_mlp_bad_input():
    from peftfast.ops.mlp import dora_mlp

    x, gate, up, down = _dora_case(5, 8, 12, 2, torch.float32)
    with pytest.raises(ValueError, match=r"layers.0.mlp: up DoRA magnitude has shape \(3,\)"):
        dora_mlp(x, gate, [*up[:5], torch.ones(3)], down, name="layers.0.mlp")
    with pytest.raises(ValueError, match="layers.0.mlp: unknown gate activation 'relu'"):
        dora_mlp(x, gate, up, down, act="relu", name="layers.0.mlp")
    with pytest.raises(ValueError, match="layers.0.mlp gate/up: base weight 0 requires grad"):
        dora_mlp(x, [gate[0].requires_grad_(), *gate[1:]], up, down, name="layers.0.mlp")


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dora_model_mlp_runs_as_one_op(p):
    """A DoRA Llama (all linear layers), without and with dropout: each MLP runs on the DoRA MLP op with PEFT's
    loss and gradients (PEFT's dropout replaying the op's masks) and keeps less than its layers one by one."""
    from peftfast.bench import saved_activation_bytes

    model = peft_model("llama", use_dora=True, lora_dropout=p)
    ref = clone(model)
    peftfast.patch(model)
    if p:
        use_shared_seed_dropout(ref, model, p)
    data = batch("llama")
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys() and any("magnitude" in n for n in grads)
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-5
    runtime = peftfast.report(model).module_runtime(model)
    mlps = [r for n, r in runtime.items() if n.endswith(".mlp")]
    assert len(mlps) == 2 and all(r["fused"] == 1 and not r["fallbacks"] and not r["deferred"] for r in mlps)
    params = [*model.parameters()]
    fused = saved_activation_bytes(lambda: model(**data).loss, exclude=params)[1].total
    peftfast.patch(model, fuse_mlp=False)
    layers = saved_activation_bytes(lambda: model(**data).loss, exclude=params)[1].total
    tokens, inter = data["input_ids"].numel(), model.config.intermediate_size
    # per layer at least g, u, act(g) and h no longer kept, and (the default recompute="up") z_u; with dropout u,
    # act(g) and the down projection's dropped input (I each), besides the gate/up dropped inputs and the masks
    assert layers - fused >= 2 * (3 if p else 5) * tokens * inter * 4, (layers, fused)


class _OutputDropoutMLP(nn.Module):
    """Llama's gated MLP plus a dropout its own code applies to the output in training (Seed-OSS's residual
    dropout): the same children, another computation once trained."""

    def forward(self, x):
        out = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return torch.nn.functional.dropout(out, p=0.25, training=self.training)


class _SparseGateMLP(nn.Module):
    """Gemma 3n-style: the gate is sparsified (its smaller half zeroed) before the activation, in either mode."""

    def forward(self, x):
        g = self.gate_proj(x)
        g = g * (g >= g.median(dim=-1, keepdim=True).values)
        return self.down_proj(self.act_fn(g) * self.up_proj(x))


def _swap_mlps(model, cls) -> list:
    mlps = [layer.mlp for layer in model.base_model.model.model.layers]
    for mlp in mlps:
        mlp.__class__ = type(cls.__name__, (cls, type(mlp)), {})
    return mlps


@pytest.mark.parametrize("targets", ["all-linear", "attention"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gated_mlp_probe_runs_the_class_code_in_both_modes(targets, mode):
    """Children named gate/up/down + act_fn are not enough: the class's code is probed in training and in eval mode
    (the model's mode at patch time does not matter: from_pretrained hands models over in eval mode), for the
    LoRA-MLP op and the frozen-MLP op alike. A dropout on the output in training keeps the class's forward, with
    the training-mode reason, and training then matches the unpatched model draw for draw; the probe leaves the
    user's RNG stream and every module's mode as they were."""
    lora = {} if targets == "all-linear" else {"target_modules": ["q_proj", "v_proj"]}
    model = peft_model("llama", **lora)
    ref = clone(model)
    _swap_mlps(model, _OutputDropoutMLP)
    _swap_mlps(ref, _OutputDropoutMLP)
    model.train(mode == "train")
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    peftfast.patch(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == modes
    entries = [e for e in peftfast.report(model).modules if e.kind == "mlp"]
    assert len(entries) == 2 and all(not e.patched for e in entries), peftfast.report(model).format()
    assert all(e.reason == "in training mode, its code computes something else than "
               "down_proj(act_fn(gate_proj(x)) * up_proj(x))" for e in entries), entries
    model.train()
    assert_trains_as(model, ref, batch("llama"))


def test_gated_mlp_probe_refuses_a_sparsified_gate():
    model = peft_model("llama")
    ref = clone(model)
    _swap_mlps(model, _SparseGateMLP)
    _swap_mlps(ref, _SparseGateMLP)
    peftfast.patch(model)
    entries = [e for e in peftfast.report(model).modules if e.kind == "mlp"]
    assert entries and all(not e.patched and e.reason == "its code computes something else than "
                           "down_proj(act_fn(gate_proj(x)) * up_proj(x))" for e in entries), entries
    data = batch("llama")
    assert max_rel_err(loss_and_grads(model, data)[0], loss_and_grads(ref, data)[0]) <= 1e-6


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gemma3n_sparse_gate_layers_keep_their_forward(backend):
    """Gemma 3n's MLPs are named like Llama's, but its first layers keep only the gate's top activations (a
    Gaussian cut-off, ``activation_sparsity_pattern``) before the activation: those keep their forward, with the
    probe's reason; the dense layers run on the op; loss and every gradient match the unpatched model. Its per-layer
    projection is scaled in place (``*=``), which the ATen path's LoRA output must allow."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    cfg = Gemma3nTextConfig(
        vocab_size=128, vocab_size_per_layer_input=128, hidden_size=32, hidden_size_per_layer_input=8,
        intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2, sliding_window=4,
        activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0], laurel_rank=4, altup_num_inputs=2,
        max_position_embeddings=64)
    torch.manual_seed(0)
    model = nonzero_lora_b(get_peft_model(Gemma3nForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear")))
    ref = clone(model)
    peftfast.patch(model, backend=backend)
    mlps = {e.name.split(".")[-2]: e for e in peftfast.report(model).modules if e.kind == "mlp"}
    assert {k: e.patched for k, e in mlps.items()} == {"0": False, "1": False, "2": True, "3": True}, mlps
    assert mlps["0"].reason == "its code computes something else than down_proj(act_fn(gate_proj(x)) * up_proj(x))"
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    data = {"input_ids": ids, "labels": ids}

    def loss_and_grads_of(m):  # some LoRA layers (AltUp's correction) get no gradient on this path: not asserted
        m.zero_grad(set_to_none=True)
        loss = m(**data).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads_of(model)
    ref_loss, ref_grads = loss_and_grads_of(ref)
    assert grads.keys() == ref_grads.keys() and len(grads) > 50
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= 5e-5
    runtime = peftfast.report(model).module_runtime(model)
    assert [runtime.get(f"base_model.model.model.layers.{i}.mlp", {}).get("fused") for i in range(4)] == \
        [None, None, 1, 1]


@pytest.mark.parametrize("backend", [*BACKENDS, "cpp"])
@pytest.mark.parametrize("op", ["lora", "frozen", "packed", "dora"])
def test_outputs_can_be_modified_in_place(op, backend):
    """The ops' autograd Functions return tensors of their own, never views made inside the Function, which
    autograd forbids modifying in place: a model may scale an MLP output with ``*=`` and backpropagate through it
    (Gemma 3n does, on a projection)."""
    from peftfast.ops.mlp import dora_mlp, frozen_mlp, lora_packed_mlp

    cpp_or_skip(backend)
    torch.manual_seed(0)
    if op == "frozen":
        x, gate, up, down = _frozen_case(7, 16, 24, torch.float32, True)
        run = lambda t: frozen_mlp(t, gate, up, down, backend=backend)  # noqa: E731
    elif op == "packed":
        x, gate_up, down = _packed_case(7, 16, 24, 4, torch.float32)
        run = lambda t: lora_packed_mlp(t, gate_up, down, backend=backend)  # noqa: E731
    elif op == "dora":
        x, gate, up, down = _dora_case(7, 16, 24, 4, torch.float32)
        run = lambda t: dora_mlp(t, gate, up, down, backend=backend)  # noqa: E731
    else:
        x, gate, up, down = _case(7, 16, 24, 4, torch.float32)
        run = lambda t: lora_mlp(t, gate, up, down, backend=backend)  # noqa: E731
    x3 = x.detach().view(1, *x.shape).requires_grad_()  # [B, S, K]: the output is reshaped back to x's dims
    y = run(x3)
    y.mul_(3.0).sum().backward()
    want = x3.detach().clone().requires_grad_()
    run(want).sum().backward()
    assert max_rel_err(x3.grad, 3.0 * want.grad) <= 1e-6


def _lfm2(**lora):
    from peft import LoraConfig, get_peft_model
    from transformers import Lfm2Config, Lfm2ForCausalLM

    cfg = Lfm2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, layer_types=["conv", "full_attention"],
                     block_auto_adjust_ff_dim=False)
    torch.manual_seed(0)
    return nonzero_lora_b(get_peft_model(Lfm2ForCausalLM(cfg), LoraConfig(r=4, **lora)))


@pytest.mark.parametrize("targets", ["all-linear", "attention"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lfm2_mlp_runs_on_the_op_with_its_functional_activation(targets, p):
    """LFM2's MLP is ``w2(F.silu(w1(x)) * w3(x))``: no activation module, so the probe finds which activation its code
    applies; with LoRA on w1/w3/w2 it runs the LoRA-MLP op (w1/w3 one sibling group), frozen (LoRA on the attention
    only) the frozen-MLP op, with PEFT's loss and gradients, dropout included."""
    lora = dict(target_modules="all-linear", lora_dropout=p) if targets == "all-linear" else \
        dict(target_modules=["q_proj", "v_proj"], lora_dropout=p)
    model = _lfm2(**lora)
    ref = clone(model)
    peftfast.patch(model)
    mlps = [e for e in peftfast.report(model).modules if e.kind == "mlp"]
    assert len(mlps) == 2 and all(e.patched for e in mlps), peftfast.report(model).format()
    assert all(model.get_submodule(e.name)._peftfast_mlp.act == "silu" for e in mlps)
    if p:
        use_shared_seed_dropout(ref, model, p)
    assert_trains_as(model, ref, batch("llama"), grad_tol=5e-5)  # fp32 rounding through the conv layer
    runtime = {n: r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith("feed_forward")}
    assert len(runtime) == 2 and all(r["fused"] == 1 and not r["fallbacks"] for r in runtime.values()), runtime


def test_a_w1_w3_w2_mlp_of_another_activation_is_refused():
    """Children named w1/w3/w2 with no activation module: the probe looks for SiLU/GELU between them and finds none
    in a ReLU MLP, which keeps its forward with that reason."""
    model = _lfm2(target_modules="all-linear")
    mlps = [layer.feed_forward for layer in model.base_model.model.model.layers]
    for mlp in mlps:
        mlp.__class__ = type("ReluMLP", (type(mlp),), {"forward": lambda self, x: self.w2(F.relu(self.w1(x)) *
                                                                                          self.w3(x))})
    peftfast.patch(model)
    entries = [e for e in peftfast.report(model).modules if e.kind == "mlp"]
    assert entries and all(not e.patched and e.reason == "its code applies no SiLU/GELU between w1 and w3 that the "
                           "probe finds" for e in entries), entries
