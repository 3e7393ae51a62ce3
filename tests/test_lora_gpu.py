"""Fused LoRA on a real GPU: compiled Triton kernels against an fp64 reference and PEFT's eager error.

Run with ``PEFTFAST_GPU_TESTS=1 python -m pytest -m gpu`` (``benchmarks/run_gpu.sh``); the interpreter is off then.
"""

import pytest
import torch
import torch.nn.functional as F
from _gpu import GPU_MARKS

pytestmark = GPU_MARKS

DEV = "cuda"


def _case(m, k, ns, r, dtype, bias, lora_dtype=None):
    lora_dtype = lora_dtype or dtype
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(m, k, device=DEV, generator=g).to(dtype).requires_grad_()
    ws = [(torch.randn(n, k, device=DEV, generator=g) / k**0.5).to(dtype) for n in ns]
    bs = [torch.randn(n, device=DEV, generator=g).to(dtype).requires_grad_() if bias else None for n in ns]
    as_ = [(torch.randn(r, k, device=DEV, generator=g) / k**0.5).to(lora_dtype).requires_grad_() for _ in ns]
    bms = [(torch.randn(n, r, device=DEV, generator=g) * 0.3).to(lora_dtype).requires_grad_() for n in ns]
    dys = [torch.randn(m, n, device=DEV, generator=g).to(dtype) for n in ns]
    return x, ws, bs, as_, bms, [2.0, 0.5, 1.5][: len(ns)], dys


def _eager(x, ws, bs, as_, bms, scales, masks, p, dtype):
    outs = []
    for i, w in enumerate(ws):
        xc = x.to(dtype)
        xd = xc if p == 0 else xc * masks[i].to(dtype) / (1 - p)
        low = F.linear(F.linear(xd, as_[i].to(dtype)), bms[i].to(dtype))
        outs.append(F.linear(xc, w.to(dtype), None if bs[i] is None else bs[i].to(dtype)) + low * scales[i])
    return outs


def _grads(fn, leaves, dys):
    for t in leaves:
        t.grad = None
    ys = fn()
    torch.autograd.backward(ys, dys)
    return [y.detach().double() for y in ys] + [t.grad.double() for t in leaves]


@pytest.mark.parametrize("strategy", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k,ns,r,p,bias", [
    (1000, 1024, [1024], 16, 0.0, False), (777, 4096, [1024], 64, 0.05, True),
    (513, 1024, [1024, 256, 256], 16, 0.1, True), (37, 80, [96], 8, 0.3, False),
])
def test_triton_within_twice_eager_error(monkeypatch, strategy, dtype, m, k, ns, r, p, bias):
    from peftfast.ops.lora import dropout_keep_mask, lora_linear_group

    monkeypatch.setenv("PEFTFAST_LORA_GEMM", strategy)
    x, ws, bs, as_, bms, scales, dys = _case(m, k, ns, r, dtype, bias)
    leaves = [t for t in [x, *bs, *as_, *bms] if t is not None]
    seed = 4321
    masks = dropout_keep_mask(seed, len(ns), m, k, p, device=x.device, backend="triton") if p else None
    masks = [masks[i] for i in range(len(ns))] if p else None
    got = _grads(lambda: lora_linear_group(x, ws, bs, as_, bms, scales, dropout_p=p, seed=seed, backend="triton"),
                 leaves, dys)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    rx = next(it)
    rb = [next(it) if b is not None else None for b in bs]
    ra, rbm = [next(it) for _ in as_], [next(it) for _ in bms]
    ref = _grads(lambda: _eager(rx, ws, rb, ra, rbm, scales, masks, p, torch.float64), ref_leaves,
                 [d.double() for d in dys])
    eager = _grads(lambda: _eager(x, ws, bs, as_, bms, scales, masks, p, dtype), leaves, dys)
    for a, e, f in zip(got, eager, ref):
        scale = f.abs().max().clamp_min(1e-6)
        err, base = ((a - f).abs().max() / scale).item(), ((e - f).abs().max() / scale).item()
        assert err <= 2 * base + (1e-5 if dtype == torch.float32 else 1e-3), (err, base)


def test_dropout_mask_rate_and_seed_on_gpu():
    from peftfast.ops.lora import dropout_keep_mask

    a = dropout_keep_mask(7, 2, 4096, 1024, 0.1, device=torch.device(DEV), backend="triton")
    b = dropout_keep_mask(7, 2, 4096, 1024, 0.1, device=torch.device(DEV), backend="triton")
    assert torch.equal(a, b)
    assert abs(a.float().mean().item() - 0.9) < 2e-3
    assert not torch.equal(a[0], a[1])


def _llama_bf16(dropout: float):
    """A 2-layer bf16 Llama on the GPU with LoRA r=16 on all linears, and a batch of 2 x 97 token ids."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(DEV, torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear"))
    return model, torch.randint(0, 512, (2, 97), device=DEV)


def test_patched_llama_parity_bf16():
    import peftfast

    model, ids = _llama_bf16(0.0)
    for n, prm in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(prm, std=0.02)

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref = run()
    peftfast.patch(model)
    assert peftfast.report(model).summary().startswith("peftfast: patched")
    loss, got = run()
    peftfast.unpatch(model)
    assert abs(loss - ref_loss) < 2e-2 * abs(ref_loss)
    for n in ref:
        err = ((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-8)).item()
        assert err < 5e-2, n


def test_recompute_settings_keep_gradients_bit_for_bit_on_gpu():
    """The Triton norm, LoRA, RoPE and gate/up kernels rebuild the very tensors the forward made (q/k/v included,
    with the CUDA generator's state restored for the dropout seeds): same loss, same gradients. "up" (and "attn",
    which includes it) rebuilds u with the LoRA GEMM kernel rather than the fused gate/up one: bit for bit between
    the two, within bf16 rounding of the others."""
    import peftfast

    model, ids = _llama_bf16(0.05)
    got = {}
    for setting in ("none", "norms", "up", "attn", "mlp"):
        peftfast.patch(model, recompute=setting)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        got[setting] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for setting, same_as in (("norms", "none"), ("mlp", "none"), ("attn", "up")):
        assert torch.equal(got[setting][0], got[same_as][0])
        assert all(torch.equal(got[setting][1][n], g) for n, g in got[same_as][1].items()), setting
    assert torch.equal(got["up"][0], got["none"][0])  # the forward is the same either way
    for n, g in got["none"][1].items():
        err = ((got["up"][1][n].float() - g.float()).norm() / g.float().norm().clamp_min(1e-8)).item()
        assert err < 1e-2, n


@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32])
def test_dora_layer_within_twice_peft_error(lora_dtype):
    """A patched DoRA layer (bf16 base; adapters in bf16 or PEFT's default fp32) on the Triton path: output and the
    gradients of x, A, B and the magnitude err against an fp64 PEFT layer no more than twice PEFT's own."""
    from peft import LoraConfig, get_peft_model

    import peftfast

    def build(dtype, ldt, patch):
        torch.manual_seed(0)
        holder = torch.nn.Module()
        holder.fc = torch.nn.Linear(4096, 1024, bias=False)
        model = get_peft_model(holder, LoraConfig(r=16, lora_alpha=32, target_modules=["fc"], use_dora=True))
        with torch.no_grad():
            model.base_model.model.fc.lora_B["default"].weight.normal_(0.0, 0.02)
        model.to(device=DEV, dtype=dtype)
        for name, prm in model.named_parameters():
            if "lora_" in name:
                prm.data = prm.data.to(ldt)
        if patch:
            peftfast.patch(model)
        return model.train().base_model.model.fc

    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(777, 4096, device=DEV, generator=g)
    dy = torch.randn(777, 1024, device=DEV, generator=g)
    res = []
    for layer, dt in ((build(torch.float64, torch.float64, False), torch.float64),
                      (build(torch.bfloat16, lora_dtype, True), torch.bfloat16),
                      (build(torch.bfloat16, lora_dtype, False), torch.bfloat16)):
        xi = x.to(dt).requires_grad_()
        y = layer(xi)
        y.backward(dy.to(y.dtype))
        res.append([y.detach().double(), xi.grad.double()]
                   + [prm.grad.double() for prm in layer.parameters() if prm.requires_grad])
    for r, got, eager in zip(*res):
        assert (got - r).abs().max() <= 2 * (eager - r).abs().max() + 1e-3 * r.abs().max()


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("recompute", ["none", "up", "gate_up"])
def test_dora_mlp_within_twice_eager_error(p, recompute):
    """The DoRA MLP op (bf16, fp32 adapters, hidden 1024, intermediate 2816, 1000 tokens), without and with dropout
    on the Triton path: output and the gradients of x, A, B and the magnitudes against fp64 PEFT maths on the op's
    own masks, within twice the error of the same maths in plain bf16 PyTorch."""
    from peftfast.ops.lora import dropout_keep_mask
    from peftfast.ops.mlp import dora_mlp

    m, k, inter, r = 1000, 1024, 2816, 16
    g = torch.Generator(device=DEV).manual_seed(3)

    def proj(n, kk, scale):
        w = (torch.randn(n, kk, device=DEV, generator=g) / kk**0.5).bfloat16()
        a = (torch.randn(r, kk, device=DEV, generator=g) / kk**0.5).requires_grad_()
        b = (torch.randn(n, r, device=DEV, generator=g) * 0.05).requires_grad_()
        jitter = 1 + 0.2 * torch.rand(n, device=DEV, generator=g)
        mag = (torch.linalg.norm(w.float(), dim=1) * jitter).requires_grad_()
        return [w, None, a, b, scale, mag]

    gate, up, down = proj(inter, k, 2.0), proj(inter, k, 2.0), proj(k, inter, 2.0)
    x = torch.randn(m, k, device=DEV, generator=g).bfloat16().requires_grad_()
    dy = torch.randn(m, k, device=DEV, generator=g).bfloat16()
    leaves = [x] + [t for q in (gate, up, down) for t in (q[2], q[3], q[5])]
    keep_gu = dropout_keep_mask(11, 2, m, k, p, device=DEV, backend="triton") if p else None
    keep_d = dropout_keep_mask(12, 1, m, inter, p, device=DEV, backend="triton")[0] if p else None

    def maths(dt):
        def lin(t, q, keep):
            w, _, a, b, s, mag = q
            w, a, b, mag = w.to(dt), a.to(dt), b.to(dt), mag.to(dt)
            scale = mag / torch.linalg.norm(w + s * b @ a, dim=1).detach()
            td = t if keep is None else t * keep.to(dt) / (1 - p)
            return F.linear(t, w) + (scale - 1) * F.linear(td, w) + scale * s * F.linear(F.linear(td, a), b)

        xx = x.to(dt)
        kg, ku = (None, None) if keep_gu is None else (keep_gu[0], keep_gu[1])
        return lin(F.silu(lin(xx, gate, kg)) * lin(xx, up, ku), down, keep_d)

    def run(fn, dt):
        for t in leaves:
            t.grad = None
        y = fn()
        y.backward(dy.to(dt))
        return [y.detach().double()] + [t.grad.double() for t in leaves]

    exact = run(lambda: maths(torch.float64), torch.float64)
    eager = run(lambda: maths(torch.bfloat16), torch.bfloat16)
    ours = run(lambda: dora_mlp(x, gate, up, down, dropout_p=p, seed=11, down_seed=12, recompute=recompute,
                                backend="triton"), torch.bfloat16)
    for j, (r_, got, ref) in enumerate(zip(exact, ours, eager)):
        assert (got - r_).abs().max() <= 2 * (ref - r_).abs().max() + 1e-3 * r_.abs().max(), (
            j, (got - r_).abs().max().item(), (ref - r_).abs().max().item())


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cpp_autograd_node_equals_the_python_function_on_gpu(p, monkeypatch):
    """On CUDA the eager call runs ``peftfast::lora_group``'s C++ autograd node around the Triton-backed
    ``lora_group_fwd`` / ``lora_group_bwd``: outputs and every gradient equal the Python Function's bit for bit."""
    from peftfast.ops import lora as lora_ops
    from peftfast.ops.lora import lora_linear_group

    def run(cpp):
        monkeypatch.setattr(lora_ops, "_CPP_AUTOGRAD", cpp)
        x, ws, bs, as_, bms, scales, dys = _case(77, 96, (64, 32), 8, torch.bfloat16, True, torch.float32)
        ys = lora_linear_group(x, ws, bs, as_, bms, scales, dropout_p=p, seed=5, backend="triton")
        name = ys[0].grad_fn.next_functions[0][0].name() if ys[0].grad_fn.name() == "ViewBackward0" else \
            ys[0].grad_fn.name()
        leaves = [x, *bs, *as_, *bms]
        return [y.detach() for y in ys], torch.autograd.grad(ys, leaves, dys), name

    (yc, gc, nc), (yp, gp, np_) = run(True), run(False)
    assert "LoRAGroupFunction" in nc and "_LoRAGroupOpFunction" in np_
    assert all(torch.equal(a, b) for a, b in zip(yc, yp))
    assert all(torch.equal(a, b) for a, b in zip(gc, gp))
