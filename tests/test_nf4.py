"""NF4 base weights (QLoRA): quantize/dequantize kernels, the fused NF4 LoRA linear on every backend, quantize_base
on PEFT models, patching, and bitsandbytes interop. Triton kernels run in the interpreter (conftest)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _models import saved_shapes
from torch import nn

import peftfast
from peftfast.modules.nf4 import NF4Linear
from peftfast.ops import nf4 as O
from peftfast.ops.lora import dropout_keep_mask

CODE64 = torch.tensor(O.NF4_CODE, dtype=torch.float64)
NEED_C = pytest.mark.skipif(not O.have_ops(), reason="peftfast._C with the NF4 ops is not built")
BACKENDS = ["torch", "triton"] + (["cpp"] if O.have_ops() else [])


def _ref_quantize(w: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force reference: nearest table value by distance (ties to the lower code), packed high nibble first."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // bs, bs)
    absmax = blocks.abs().amax(-1)
    norm = torch.where(absmax[..., None] > 0, blocks / absmax.clamp_min(1e-38)[..., None], torch.zeros_like(blocks))
    dist = (norm[..., None] - CODE64.float()).abs()
    idx = dist.argmin(-1).reshape(n, k)  # argmin returns the first (lower) index on a tie
    return (idx[:, 0::2] * 16 + idx[:, 1::2]).to(torch.uint8), absmax


def _ref_dequantize(q: torch.Tensor, absmax: torch.Tensor, bs: int) -> torch.Tensor:
    hi, lo = (q >> 4).long(), (q & 15).long()
    idx = torch.stack([hi, lo], -1).reshape(q.shape[0], -1)
    return (CODE64.float()[idx] * absmax.repeat_interleave(bs, dim=1)).double()


# ----------------------------------------------------------------------------------------------------------------
# quantize / dequantize
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_round_trip_exact_on_every_code(backend: str) -> None:
    if backend == "cpp" and not O.have_ops():
        pytest.skip("peftfast._C with the NF4 ops is not built")
    bs, n, k = 64, 6, 192
    codes = torch.randint(0, 16, (n, k))
    codes[:, ::bs] = 15  # each block holds a ±1 so its absmax is exactly the block scale
    codes[1, 64] = 0
    codes[0, :16] = torch.arange(16)
    scales = torch.rand(n, k // bs) * 3 + 0.1
    w = CODE64.float()[codes] * scales.repeat_interleave(bs, 1)
    w[1, 64] = -scales[1, 1]
    w[5, 128:192] = 0.0  # an all-zero block: absmax 0, codes of 0.0
    q, am = O.quantize_nf4(w, bs, backend=backend)
    rq, ram = _ref_quantize(w, bs)
    assert torch.equal(q, rq) and torch.equal(am, ram)
    assert set((torch.cat([q >> 4, q & 15])).unique().tolist()) == set(range(16))
    for be in BACKENDS:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            got = O.dequantize_nf4(q, am, bs, dt, backend=be)
            assert got.dtype == dt and torch.equal(got, w.to(dt)), (be, dt)


def test_quantize_backends_agree_and_error_matches_theory() -> None:
    torch.manual_seed(1)
    n, k, bs = 64, 4096, 64
    w = torch.randn(n, k)
    q, am = O.quantize_nf4(w, bs, backend="torch")
    rq, ram = _ref_quantize(w, bs)
    assert torch.equal(q, rq) and torch.equal(am, ram)
    if O.have_ops():
        assert all(torch.equal(a, b) for a, b in zip(O.quantize_nf4(w, bs, backend="cpp"), (q, am)))
    for src in (torch.float16, torch.bfloat16):  # 16-bit weights quantize exactly as their fp32 values
        w16 = w.to(src)
        assert all(torch.equal(a, b) for a, b in zip(O.quantize_nf4(w16, bs), O.quantize_nf4(w16.float(), bs)))
    err = O.dequantize_nf4(q, am, bs).double() - w.double()
    # every element within half the gap to its neighbouring codes (nearest-value rounding)
    norm = (w / am.repeat_interleave(bs, 1)).double()
    idx = torch.stack([(q >> 4), (q & 15)], -1).reshape(n, k).long()
    gaps = torch.diff(CODE64)
    lo_gap = torch.cat([gaps[:1], gaps])[idx]
    hi_gap = torch.cat([gaps, gaps[-1:]])[idx]
    d = norm - CODE64[idx]
    assert bool(((d <= hi_gap / 2 + 1e-6) & (d >= -lo_gap / 2 - 1e-6)).all())
    # mean squared error vs the theoretical value for N(0, 1) weights in blocks of 64: the block maximum M has
    # CDF (2Φ(m)-1)^64 and is stored exactly; the other 63 are N(0,1) truncated to (-M, M), quantized to M·NF4
    m = torch.linspace(1.0, 6.0, 801, dtype=torch.float64)
    phi = lambda t: 0.5 * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    pdf_m = torch.gradient((2 * phi(m) - 1) ** bs, spacing=(m,))[0]
    u = torch.linspace(-1, 1, 4001, dtype=torch.float64)
    qu = CODE64[(u[:, None] - CODE64).abs().argmin(-1)]
    cond = []
    for mm in m:
        dens = torch.exp(-0.5 * (u * mm) ** 2)
        cond.append(torch.trapezoid(dens * ((u - qu) * mm) ** 2, u) / torch.trapezoid(dens, u))
    mse_theory = float(torch.trapezoid(pdf_m * torch.stack(cond), m)) * (bs - 1) / bs
    mse = float((err ** 2).mean())
    assert abs(mse / mse_theory - 1) < 0.05, (mse, mse_theory)
    assert abs(float(err.mean())) < 4 * math.sqrt(mse / err.numel())  # unbiased


def test_double_quant_absmax() -> None:
    torch.manual_seed(2)
    w = torch.randn(80, 640) * torch.linspace(0.1, 3, 80)[:, None]
    q, am = O.quantize_nf4(w, 64)
    q2, code2, scale2, offset = O.double_quantize(am)
    assert q2.dtype == torch.uint8 and q2.numel() == am.numel() and scale2.numel() == math.ceil(am.numel() / 256)
    back = O.dequantize_absmax(q2, code2, scale2, offset, tuple(am.shape))
    # half a step of the 8-bit code: scale2 / 254 per block of 256
    step = scale2.repeat_interleave(256)[: am.numel()].reshape(am.shape) / 127
    assert bool(((back - am).abs() <= step / 2 + 1e-6).all())
    assert torch.allclose(offset, am.mean())
    wd = O.dequantize_nf4(q, back, 64).double()
    err_plain = (O.dequantize_nf4(q, am, 64).double() - w).pow(2).mean()
    assert (wd - w).pow(2).mean() < 1.05 * err_plain


def test_dequantize_triton_noncontiguous_absmax_and_bad_inputs() -> None:
    w = torch.randn(9, 128)
    q, am = O.quantize_nf4(w, 32)
    ref = _ref_dequantize(q, am, 32).float()
    assert torch.equal(O.dequantize_nf4(q, am, 32, backend="triton"), ref)
    with pytest.raises(ValueError, match="not divisible into blocks of 64"):
        O.quantize_nf4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="uint8"):
        O.dequantize_nf4(q.float(), am, 32)
    with pytest.raises(ValueError, match="absmax must be fp32"):
        O.dequantize_nf4(q, am[:, :2], 32)


@NEED_C
def test_opcheck_every_nf4_op() -> None:
    torch.manual_seed(3)
    m, k, n, r = 7, 128, 10, 3
    w = torch.randn(n, k)
    q, am = torch.ops.peftfast.nf4_quantize(w, 64)
    torch.library.opcheck(torch.ops.peftfast.nf4_quantize.default, (w, 64))
    torch.library.opcheck(torch.ops.peftfast.nf4_quantize.default, (w.bfloat16(), 64))
    torch.library.opcheck(torch.ops.peftfast.nf4_dequantize.default, (q, am, 64, torch.bfloat16))
    x = torch.randn(m, k, requires_grad=True)
    a = torch.randn(r, k, requires_grad=True)
    b = torch.randn(n, r, requires_grad=True)
    bias = torch.randn(n, requires_grad=True)
    lb = torch.randn(n, requires_grad=True)
    seed = torch.tensor([5], dtype=torch.int64)
    for p in (0.0, 0.3):
        torch.library.opcheck(torch.ops.peftfast.nf4_lora_fwd.default, (x, q, am, bias, lb, a, b, 0.5, p, seed, 64, 0))
        xa = torch.ops.peftfast.nf4_lora_fwd(x, q, am, None, None, a, b, 0.5, p, seed, 64, 0)[1].detach()
        dy = torch.randn(m, n)
        common = (x.detach(), xa, dy, q, am, a.detach(), b.detach(), 0.5, p, seed, 64, 0)
        torch.library.opcheck(torch.ops.peftfast.nf4_lora_bwd.default, (*common, True, True, True))
        torch.library.opcheck(torch.ops.peftfast.nf4_lora_bwd.default, (*common, False, True, False))


# ----------------------------------------------------------------------------------------------------------------
# the fused NF4 LoRA linear: every backend against fp64
# ----------------------------------------------------------------------------------------------------------------
def _eager(x, w, bias, a, b, lb, s, keep, p):
    """PEFT's maths in the inputs' precision (the error budget) or fp64 (the reference)."""
    xd = x if keep is None else x * keep.to(x.dtype) / (1 - p)
    return nn.functional.linear(x, w, bias) + s * (nn.functional.linear(nn.functional.linear(xd, a), b) + lb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_nf4_lora_linear_matches_fp64(backend: str, dtype: torch.dtype, p: float) -> None:
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("interpreter defect: tl.dot on bf16 returns garbage (compiled for sm_80/90 in test_nf4_aot)")
    if backend == "torch" and dtype == torch.float16:
        pytest.skip("ATen CPU fp16 GEMMs are covered by the cpp backend; torch runs fp32 and bf16")
    torch.manual_seed(4)
    m, k, n, r, s, seed = 37, 192, 75, 5, 0.7, 1234
    w = torch.randn(n, k) * 0.2
    q, am = O.quantize_nf4(w, 64)
    wd = _ref_dequantize(q, am, 64)
    xs = torch.randn(m, 2 * k, dtype=dtype)[:, ::2]  # non-contiguous input
    x = xs.detach().requires_grad_()
    a = (torch.randn(r, k) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(n, r) * 0.3).to(dtype).requires_grad_()
    bias = torch.randn(n, dtype=dtype).requires_grad_()
    lb = torch.randn(n, dtype=dtype).requires_grad_()
    y = O.nf4_lora_linear(x, q, am, bias, a, b, s, lora_bias=lb, dropout_p=p, seed=seed, backend=backend,
                          chunk=700)
    keep = dropout_keep_mask(seed, 1, m, k, p, device="cpu", backend=backend)[0] if p > 0 else None
    dy = torch.randn(m, n, dtype=dtype)
    got = (y, *torch.autograd.grad(y, (x, a, b, bias, lb), dy))
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b, bias, lb)]
    yr = _eager(leaves[0], wd, leaves[3], leaves[1], leaves[2], leaves[4], s, keep, p)
    ref = (yr, *torch.autograd.grad(yr, leaves, dy.double()))
    low = [t.detach().clone().requires_grad_() for t in (x, a, b, bias, lb)]
    ye = _eager(low[0], wd.to(dtype), low[3], low[1], low[2], low[4], s, keep, p)
    eager = (ye, *torch.autograd.grad(ye, low, dy))
    for name, g, rf, e in zip(("y", "dx", "dA", "dB", "dbias", "dlbias"), got, ref, eager):
        assert g.dtype == dtype and g.shape == rf.shape, name
        err = (g.double() - rf).abs().max().item()
        budget = 2 * (e.double() - rf).abs().max().item() + (1e-5 if dtype == torch.float32 else 0) * rf.abs().max()
        assert err <= budget, (name, err, budget)


def test_backends_share_dropout_and_chunking_does_not_matter() -> None:
    torch.manual_seed(5)
    m, k, n, r = 21, 128, 40, 4
    q, am = O.quantize_nf4(torch.randn(n, k), 64)
    x = torch.randn(m, k)
    a, b = torch.randn(r, k), torch.randn(n, r)
    outs = {}
    for be in BACKENDS:
        for chunk in (0, 300):
            outs[be, chunk] = O.nf4_lora_linear(x, q, am, None, a, b, 0.5, dropout_p=0.5, seed=77, backend=be,
                                                chunk=chunk)
        assert torch.allclose(outs[be, 0], outs[be, 300], atol=1e-5, rtol=1e-5)
    if "cpp" in BACKENDS:  # the same Philox masks: the same outputs
        assert torch.allclose(outs["cpp", 0], outs["triton", 0], atol=1e-4, rtol=1e-4)
    # the drop happened (output differs from no-dropout)
    assert not torch.allclose(outs["torch", 0], O.nf4_lora_linear(x, q, am, None, a, b, 0.5, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_quant_and_mixed_lora_dtype(backend: str) -> None:
    torch.manual_seed(6)
    m, k, n, r = 13, 128, 24, 8
    w = torch.randn(n, k)
    q, am = O.quantize_nf4(w, 64)
    dq = O.double_quantize(am)
    am2 = O.dequantize_absmax(*dq, tuple(am.shape))
    x = torch.randn(m, k, dtype=torch.float16, requires_grad=True)  # fp16 base compute, fp32 LoRA (PEFT default)
    a = torch.randn(r, k, requires_grad=True)
    b = torch.randn(n, r, requires_grad=True)
    y = O.nf4_lora_linear(x, q, dq, None, a, b, 2.0, backend=backend)
    y.float().pow(2).sum().backward()
    x64 = x.detach().double().requires_grad_()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    yr = x64 @ _ref_dequantize(q, am2, 64).t() + 2.0 * (x64 @ a64.t() @ b64.t())
    yr.pow(2).sum().backward()
    assert y.dtype == torch.float16
    assert torch.allclose(y.double(), yr, rtol=2e-3, atol=2e-2)
    for g, rg in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert torch.allclose(g.double(), rg, rtol=5e-3, atol=5e-2 * rg.abs().max().item() / 100)


# ----------------------------------------------------------------------------------------------------------------
# quantize_base on PEFT models, patching
# ----------------------------------------------------------------------------------------------------------------
def _tiny_llama(dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    for name, prm in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(prm, std=0.1)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_tiny_llama_patched_nf4_matches_dequantized_model(backend: str) -> None:
    torch.manual_seed(7)
    model = _tiny_llama()
    rep = peftfast.quantize_base(model)
    assert len(rep.layers) == 7 and rep.bytes_per_param == pytest.approx(0.5625)
    assert rep.bytes_before == 4 * rep.params
    assert all(isinstance(m.get_base_layer(), NF4Linear) for n, m in model.named_modules() if n.endswith("_proj")
               and hasattr(m, "lora_A"))
    ref = copy.deepcopy(model)
    assert peftfast.dequantize_base(ref) == 7
    ids = torch.randint(0, 96, (2, 11))
    l_ref, g_ref = _loss_and_grads(ref, ids)
    l_unp, g_unp = _loss_and_grads(model, ids)  # PEFT's own forward over NF4Linear (dequantize + F.linear)
    # the rest of the block (attention, RoPE, norms) has its own tests: keep the interpreter on the LoRA layers
    peftfast.patch(model, backend=backend, fuse_attention=False, fuse_rope=False, fuse_norms=False)
    text = peftfast.report(model).format(model)
    assert text.count("[NF4 base]") == 7 and "[group" not in text
    entries = peftfast.report(model).entries
    assert all(e.patched and e.nf4 and e.group is None for e in entries)
    mlp = [e for e in peftfast.report(model).modules if e.kind == "mlp"]
    assert len(mlp) == 1 and mlp[0].patched  # the NF4 LoRA-MLP op
    l_pat, g_pat = _loss_and_grads(model, ids)
    fused = peftfast.report(model).runtime(model)
    assert all(r["fused"] >= 1 and not r["fallbacks"] for r in fused.values())
    for lo in (l_unp, l_pat):
        assert torch.allclose(lo, l_ref, rtol=1e-5, atol=1e-5)
    for g in (g_unp, g_pat):
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            assert torch.allclose(g[name], g_ref[name], rtol=1e-4, atol=1e-6), name
    peftfast.unpatch(model)
    assert all("forward" not in m.__dict__ for m in model.modules() if hasattr(m, "lora_A"))
    l_back, _ = _loss_and_grads(model, ids)
    assert torch.allclose(l_back, l_ref, rtol=1e-5, atol=1e-5)


def test_nf4_layer_dropout_and_eval_on_the_fused_path() -> None:
    torch.manual_seed(8)
    model = _tiny_llama(dropout=0.2)
    peftfast.quantize_base(model, double_quant=True)
    peftfast.patch(model)
    ids = torch.randint(0, 96, (2, 7))
    torch.manual_seed(1)
    l1, g1 = _loss_and_grads(model, ids)
    torch.manual_seed(1)
    l2, g2 = _loss_and_grads(model, ids)
    assert torch.equal(l1, l2) and all(torch.equal(g1[n], g2[n]) for n in g1)  # seeds from torch's RNG
    model.eval()
    with torch.no_grad():
        out_p = model(input_ids=ids).logits
    peftfast.unpatch(model)
    with torch.no_grad():
        out_u = model(input_ids=ids).logits
    assert torch.allclose(out_p, out_u, rtol=1e-4, atol=1e-5)


def _big_peft(in_f: int = 2048, out_f: int = 512, target: tuple = ("fc1", "fc2")):
    from peft import LoraConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(in_f, out_f)
            self.fc2 = nn.Linear(out_f, out_f)
            self.emb = nn.Embedding(10, in_f)

        def forward(self, x):
            return self.fc2(self.fc1(x))

    return get_peft_model(Net().to(torch.bfloat16), LoraConfig(r=8, target_modules=list(target)))


def test_bytes_per_param_targets() -> None:
    plain = peftfast.quantize_base(_big_peft())
    dq = peftfast.quantize_base(_big_peft(), double_quant=True)
    print(f"\nNF4 bytes/param: plain {plain.bytes_per_param:.5f}, double quant {dq.bytes_per_param:.5f}")
    assert plain.bytes_per_param <= 0.5625 and dq.bytes_per_param <= 0.52
    assert plain.bytes_before == 2 * plain.params and plain.bytes_after < plain.bytes_before / 3.5
    assert "bytes/param" in str(dq) and "fc1" in str(dq)


def test_bad_inputs_leave_the_model_untouched() -> None:
    from peft import LoraConfig, get_peft_model

    def nf4_count(m):
        return sum(isinstance(x, NF4Linear) for x in m.modules())

    model = _big_peft(in_f=96, out_f=64)  # fc1 has in_features 96: not divisible into blocks of 64
    with pytest.raises(ValueError, match=r"fc1.*in_features=96 is not divisible into blocks of 64"):
        peftfast.quantize_base(model)
    assert nf4_count(model) == 0
    rep = peftfast.quantize_base(model, block_size=32)
    assert len(rep.layers) == 2
    with pytest.raises(ValueError, match="fc1: base layer is already NF4-quantized"):
        peftfast.quantize_base(model, block_size=32)
    with pytest.raises(ValueError, match="bits=8"):
        peftfast.quantize_base(model, bits=8)
    emb = get_peft_model(_big_peft(in_f=128).base_model.model, LoraConfig(r=4, target_modules=["emb", "fc1"]))
    with pytest.raises(ValueError, match=r"emb: base layer .*Embedding is not a plain nn.Linear"):
        peftfast.quantize_base(emb)
    assert nf4_count(emb) == 0
    frozen = _big_peft(in_f=128)
    frozen.base_model.model.fc2.base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="fc2: base weight is trainable"):
        peftfast.quantize_base(frozen)
    assert nf4_count(frozen) == 0
    patched = _big_peft(in_f=128)
    peftfast.patch(patched)
    with pytest.raises(ValueError, match="the model is patched"):
        peftfast.quantize_base(patched)
    x = torch.randn(3, 128, dtype=torch.float32)
    q = _big_peft(in_f=128)
    peftfast.quantize_base(q)
    peftfast.patch(q)
    with pytest.raises(TypeError, match="compute dtype torch.bfloat16"):
        q(x)


# ----------------------------------------------------------------------------------------------------------------
# bitsandbytes interop
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft_bnb_class", [False, True])
@pytest.mark.parametrize("nested", [False, True])
def test_peft_over_bitsandbytes_linear4bit_runs_fused(nested: bool, peft_bnb_class: bool) -> None:
    import bitsandbytes as bnb  # a dev dependency: missing, this fails rather than skips
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(9)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = bnb.nn.Linear4bit(128, 48, bias=True, quant_type="nf4", compute_dtype=torch.float32,
                                        compress_statistics=nested)
            lin = nn.Linear(128, 48)
            self.fc.load_state_dict(lin.state_dict())

        def forward(self, x):
            return self.fc(x)

    net = Net().to("cpu")  # bitsandbytes quantizes on the move
    net.is_loaded_in_4bit = peft_bnb_class  # what a from_pretrained(quantization_config=...) model carries
    model = get_peft_model(net, LoraConfig(r=4, target_modules=["fc"], lora_dropout=0.0))
    layer = model.base_model.model.fc
    assert type(layer).__module__ == ("peft.tuners.lora.bnb" if peft_bnb_class else "peft.tuners.lora.layer")
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(5, 128, requires_grad=True)
    y_ref = model(x)
    gx_ref, ga_ref = torch.autograd.grad(y_ref.pow(2).sum(), (x, layer.lora_A["default"].weight))
    peftfast.patch(model)
    assert peftfast.report(model).entries[0].patched and peftfast.report(model).entries[0].nf4
    y = model(x)
    gx, ga = torch.autograd.grad(y.pow(2).sum(), (x, layer.lora_A["default"].weight))
    assert layer._peftfast.fused_calls == 1
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gx, gx_ref, rtol=1e-4, atol=1e-5) and torch.allclose(ga, ga_ref, rtol=1e-4, atol=1e-5)


def test_small_blocks_take_the_gathered_absmax_path() -> None:
    """block_size 16 < the interpreter's 32-wide tiles: the kernels gather absmax per element instead."""
    torch.manual_seed(10)
    m, k, n, r = 19, 96, 45, 3
    q, am = O.quantize_nf4(torch.randn(n, k), 16)
    x = torch.randn(m, k, requires_grad=True)
    a = torch.randn(r, k, requires_grad=True)
    b = torch.randn(n, r, requires_grad=True)
    outs = []
    for be in ("torch", "triton"):
        y = O.nf4_lora_linear(x, q, am, None, a, b, 0.5, block_size=16, backend=be)
        outs.append((y, *torch.autograd.grad(y.pow(2).sum(), (x, a, b))))
    x64 = x.detach().double().requires_grad_()
    yr = x64 @ _ref_dequantize(q, am, 16).t() + 0.5 * (x64 @ a.detach().double().t() @ b.detach().double().t())
    assert torch.allclose(outs[1][0].double(), yr, rtol=1e-5, atol=1e-4)
    for t, g in zip(outs[0], outs[1]):
        assert torch.allclose(t, g, rtol=1e-4, atol=1e-3)


def test_nf4_model_compiles_without_graph_breaks_in_our_ops() -> None:
    """The NF4 LoRA layers run the registered op (C++ on CPU) with a tensor seed: Dynamo keeps one graph."""
    import os

    import torch._dynamo
    from _models import batch, peft_model

    model = peft_model("llama", lora_dropout=0.1, model_kwargs=dict(layers=1))
    peftfast.quantize_base(model, block_size=16)
    peftfast.patch(model)
    assert peftfast.report(model).patched
    torch._dynamo.reset()
    try:
        exp = torch._dynamo.explain(model)(**batch("llama"))
    finally:
        torch._dynamo.reset()
    pkg = os.path.dirname(os.path.abspath(peftfast.__file__))
    ours = [br.reason for br in exp.break_reasons
            if any(os.path.abspath(f.filename).startswith(pkg) for f in br.user_stack)]
    assert not ours, ours[:3]


# ----------------------------------------------------------------------------------------------------------------
# the gated LoRA-MLP over three NF4 bases
# ----------------------------------------------------------------------------------------------------------------
def _nf4_proj(n, k, r, dtype, *, bias, lbias, p, double=False, scale=0.5):
    q, am = O.quantize_nf4(torch.randn(n, k) * 0.2, 64)
    absmax = O.double_quantize(am) if double else am
    return [q, absmax, 64, torch.randn(n, dtype=dtype).requires_grad_() if bias else None,
            (torch.randn(r, k) * 0.3).to(dtype).requires_grad_(), (torch.randn(n, r) * 0.3).to(dtype).requires_grad_(),
            scale, torch.randn(n, dtype=dtype).requires_grad_() if lbias else None, p]


def _mlp_leaves(x, *projs):
    return [x] + [t for pr in projs for t in (pr[3], pr[4], pr[5], pr[7]) if t is not None]


def _layerwise(x, gate, up, down, act, seeds, backend):
    """The three NF4 LoRA layers one by one with the eager activation between them (what patch ran before)."""
    def lin(t, pr, seed):
        q, am, bs, bias, a, b, s, lb, p = pr
        return O.nf4_lora_linear(t, q, am, bias, a, b, s, lora_bias=lb, dropout_p=p, seed=seed, block_size=bs,
                                 backend=backend)

    fn = {"silu": nn.functional.silu, "gelu_tanh": lambda t: nn.functional.gelu(t, approximate="tanh")}[act]
    return lin(fn(lin(x, gate, seeds[0])) * lin(x, up, seeds[1]), down, seeds[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act,double,recompute", [("silu", False, False), ("gelu_tanh", True, True),
                                                   ("silu", True, "up")])
def test_nf4_lora_mlp_matches_the_layers_one_by_one(backend: str, act: str, double: bool,
                                                   recompute: bool | str) -> None:
    """Same seeds, same kernels: the op gives the layer-by-layer output and every gradient (x, biases, A, B, LoRA
    biases; ranks and dropout differing per projection), and keeps neither act(g) nor h (with recompute="up", nor u
    and the up product; with True, nor g, u and the gate/up products)."""
    torch.manual_seed(9)
    m, k, i = 37, 128, 192
    x = torch.randn(m, 2 * k)[:, ::2].requires_grad_()  # non-contiguous
    gate = _nf4_proj(i, k, 4, torch.float32, bias=True, lbias=True, p=0.25, double=double, scale=2.0)
    up = _nf4_proj(i, k, 8, torch.float32, bias=False, lbias=False, p=0.1, double=double)
    down = _nf4_proj(k, i, 5, torch.float32, bias=True, lbias=False, p=0.3, double=double, scale=1.5)
    leaves = _mlp_leaves(x, gate, up, down)
    dy = torch.randn(m, k)
    seeds = (11, 12, 13)
    runs = []
    for fn in (lambda: O.nf4_lora_mlp(x, gate, up, down, act=act, seeds=seeds, recompute=recompute, backend=backend,
                                      chunk=5000),
               lambda: _layerwise(x, gate, up, down, act, seeds, backend)):
        y = fn()
        runs.append((y, *torch.autograd.grad(y, leaves, dy)))
    for j, (a, b) in enumerate(zip(*runs)):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * b.abs().max().clamp_min(1e-3), j
    params = [t for pr in (gate, up, down) for t in pr if isinstance(t, torch.Tensor)]
    params += [t for pr in (gate, up, down) if isinstance(pr[1], tuple) for t in pr[1]]
    fused = saved_shapes(lambda: O.nf4_lora_mlp(x, gate, up, down, act=act, seeds=seeds, recompute=recompute,
                                                 backend=backend), params)
    layers = saved_shapes(lambda: _layerwise(x, gate, up, down, act, seeds, backend), params)
    kept = [(m, k), (m, 5)] + {False: [(m, 4), (m, 8), (m, i), (m, i)], "up": [(m, 4), (m, i)], True: []}[recompute]
    assert [s for s in fused if s != (1,)] == sorted(kept)  # (1,): a registered op's seed tensor
    # the layers also keep act(g) and u for the product, h for the down projection; x once per layer on ATen
    for shape in [(m, i), (m, i)]:
        layers.remove(shape)
    fewer = {False: 0, "up": m * i, True: 2 * m * i}[recompute]
    assert sum(math.prod(s) for s in layers) >= sum(math.prod(s) for s in fused) + fewer


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_nf4_lora_mlp_fp16_within_twice_eager_error(backend: str) -> None:
    torch.manual_seed(10)
    m, k, i = 21, 128, 128
    x = torch.randn(m, k, dtype=torch.float16).requires_grad_()
    gate, up = (_nf4_proj(i, k, 4, torch.float16, bias=True, lbias=False, p=0.0) for _ in range(2))
    down = _nf4_proj(k, i, 4, torch.float16, bias=False, lbias=True, p=0.0)
    leaves = _mlp_leaves(x, gate, up, down)
    dy = torch.randn(m, k, dtype=torch.float16)
    y = O.nf4_lora_mlp(x, gate, up, down, backend=backend)
    got = (y, *torch.autograd.grad(y, leaves, dy))

    def eager(xx, projs, dtype):
        def lin(t, pr):
            q, am, bs, bias, a, b, s, lb, _ = pr
            w = _ref_dequantize(q, am, bs).to(dtype)
            return _eager(t, w, bias, a, b, lb if lb is not None else 0.0, s, None, 0.0)

        g, u, d = projs
        return lin(nn.functional.silu(lin(xx, g)) * lin(xx, u), d)

    def cast(pr, dtype, it):
        return [next(it) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in pr]

    out = {}
    for dtype in (torch.float64, torch.float16):
        lv = [t.detach().to(dtype).requires_grad_() for t in leaves]
        it = iter(lv[1:])
        projs = [cast(pr, dtype, it) for pr in (gate, up, down)]
        ye = eager(lv[0], projs, dtype)
        out[dtype] = (ye, *torch.autograd.grad(ye, lv, dy.to(dtype)))
    for j, (g, r, e) in enumerate(zip(got, out[torch.float64], out[torch.float16])):
        assert g.dtype == torch.float16
        err, budget = (g.double() - r).abs().max().item(), 2 * (e.double() - r).abs().max().item() + 1e-3
        assert err <= budget, (j, err, budget)


def test_nf4_lora_mlp_bad_input_names_the_projection() -> None:
    x = torch.randn(3, 128)
    gate = _nf4_proj(64, 128, 4, torch.float32, bias=False, lbias=False, p=0.0)
    up = _nf4_proj(64, 128, 4, torch.float32, bias=False, lbias=False, p=0.0)
    down = _nf4_proj(128, 64, 4, torch.float32, bias=False, lbias=False, p=0.0)
    with pytest.raises(ValueError, match="blk.mlp up: lora_A"):
        O.nf4_lora_mlp(x, gate, [*up[:4], torch.randn(4, 64), *up[5:]], down, name="blk.mlp")
    with pytest.raises(ValueError, match="blk.mlp gate: input has 96 features, the NF4 weight 128"):
        O.nf4_lora_mlp(torch.randn(3, 96), gate, up, down, name="blk.mlp")
    with pytest.raises(ValueError, match="blk.mlp: NF4 widths do not chain"):
        O.nf4_lora_mlp(x, gate, _nf4_proj(128, 128, 4, torch.float32, bias=False, lbias=False, p=0.0), down,
                       name="blk.mlp")
    with pytest.raises(ValueError, match="blk.mlp: unknown gate activation"):
        O.nf4_lora_mlp(x, gate, up, down, act="relu", name="blk.mlp")


@pytest.mark.parametrize("recompute", ["norms", "up", "mlp"])
def test_qlora_model_mlp_runs_as_one_op(recompute: str) -> None:
    """quantize_base + patch: each gated MLP runs on the NF4 LoRA-MLP op with the losses and gradients of its three
    NF4 layers one by one (dropout included: the seeds are drawn in the same order) and keeps less for backward;
    under autocast it casts as the layers do."""
    from peftfast.bench import saved_activation_bytes

    torch.manual_seed(12)
    model = _tiny_llama(dropout=0.2)
    peftfast.quantize_base(model, double_quant=True)
    ref = copy.deepcopy(model)
    peftfast.patch(ref, fuse_mlp=False, recompute=recompute)
    peftfast.patch(model, recompute=recompute)
    (mlp,) = [e for e in peftfast.report(model).modules if e.kind == "mlp"]
    assert mlp.patched
    ids = torch.randint(0, 96, (2, 11))
    torch.manual_seed(3)
    loss, grads = _loss_and_grads(model, ids)
    torch.manual_seed(3)
    ref_loss, ref_grads = _loss_and_grads(ref, ids)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert torch.allclose(grads[n], ref_grads[n], rtol=1e-5, atol=1e-5 * ref_grads[n].abs().max().item()), n
    rt = peftfast.report(model).module_runtime(model)["base_model.model.model.layers.0.mlp"]
    assert rt == {"fused": 1, "fallbacks": {}, "deferred": {}}
    params = [*model.parameters(), *model.buffers()]
    saved = [saved_activation_bytes(lambda m=m: m(input_ids=ids, labels=ids).loss, exclude=params)[1].total
             for m in (model, ref)]
    inter = model.config.intermediate_size
    assert saved[1] - saved[0] >= 4 * ids.numel() * inter * {"norms": 2, "up": 3, "mlp": 4}[recompute]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(4)
        got = model(input_ids=ids).logits
        torch.manual_seed(4)
        want = ref(input_ids=ids).logits
    assert got.dtype == want.dtype and torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    # the training call, the measured forward and the autocast call
    assert peftfast.report(model).module_runtime(model)["base_model.model.model.layers.0.mlp"] == {
        "fused": 3, "fallbacks": {}, "deferred": {}}


def test_mlp_mixing_nf4_and_plain_bases_runs_layer_by_layer_with_reason() -> None:
    torch.manual_seed(13)
    model = _tiny_llama()
    peftfast.quantize_base(model)
    mlp = model.base_model.model.model.layers[0].mlp
    assert peftfast.dequantize_base(mlp.down_proj) == 1  # gate/up stay NF4
    peftfast.patch(model)
    (entry,) = [e for e in peftfast.report(model).modules if e.kind == "mlp"]
    assert not entry.patched and entry.reason == "gate/up/down mix NF4 and other base weights: they run one by one"
    ids = torch.randint(0, 96, (2, 7))
    _loss_and_grads(model, ids)
    assert all(r["fused"] == 1 for n, r in peftfast.report(model).runtime(model).items() if ".mlp." in n)


# ----------------------------------------------------------------------------------------------------------------
# QDoRA: DoRA over an NF4 base (bitsandbytes Linear4bit, as PEFT's QDoRA runs it)
# ----------------------------------------------------------------------------------------------------------------
def _bnb_dora(k: int, n: int, r: int, *, p: float = 0.0, nested: bool = False, bias: bool = True,
              dtype: torch.dtype = torch.float32, lora_dtype: torch.dtype | None = None, seed: int = 0):
    """A PEFT DoRA adapter (``use_dora=True``) over one bitsandbytes NF4 ``Linear4bit`` [k -> n] on CPU, with a
    non-zero lora_B and a magnitude moved off its initial ‖W‖ (else DoRA starts as the identity). bitsandbytes is a
    dev dependency: a missing one fails here rather than skipping."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = bnb.nn.Linear4bit(k, n, bias=bias, quant_type="nf4", compute_dtype=dtype,
                                        compress_statistics=nested)
            lin = nn.Linear(k, n, bias=bias)
            if bias:
                nn.init.normal_(lin.bias, std=0.2)
            self.fc.load_state_dict(lin.to(dtype).state_dict())

        def forward(self, x):
            return self.fc(x)

    model = get_peft_model(Net().to("cpu"), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["fc"],
                                                       lora_dropout=p, use_dora=True))
    layer = model.base_model.model.fc
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 0.2)
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(n) + 0.5)
    if lora_dtype is not None:
        for name, prm in model.named_parameters():
            if "lora_" in name:
                prm.data = prm.data.to(lora_dtype)
    return model.train()


def _dora_leaves(model) -> list[torch.Tensor]:
    return [prm for prm in model.parameters() if prm.requires_grad]  # lora_A, lora_B, magnitude


def _fp64_qdora(model, x: torch.Tensor, keep: torch.Tensor | None, p: float):
    """PEFT's DoRA maths in fp64 on the dequantized NF4 weight of ``model``'s layer (``keep``: the dropout mask
    the fused path drew, or None); returns y and the gradients of x, A, B and the magnitude for ``y.sum()``-free
    use: the caller backpropagates."""
    from peftfast.modules.nf4 import nf4_state

    layer = model.base_model.model.fc
    q, am, bs, _ = nf4_state(layer.get_base_layer())
    if not isinstance(am, torch.Tensor):
        am = O.dequantize_absmax(*am, (q.shape[0], q.shape[1] * 2 // bs))
    w = O.dequantize_nf4(q, am, bs, torch.float32).double()
    b0 = layer.get_base_layer().bias
    a = layer.lora_A["default"].weight.detach().double().requires_grad_()
    bm = layer.lora_B["default"].weight.detach().double().requires_grad_()
    mag = layer.lora_magnitude_vector["default"].weight.detach().double().requires_grad_()
    s = float(layer.scaling["default"])
    x64 = x.detach().double().requires_grad_()
    xd = x64 if keep is None else x64 * keep.view(x.shape).double() / (1 - p)
    scale = mag / torch.linalg.norm(w + s * bm.detach() @ a.detach(), dim=1)
    y = x64 @ w.t() + (scale - 1) * (xd @ w.t()) + scale * s * (xd @ a.t() @ bm.t())
    if b0 is not None:
        y = y + b0.detach().double()
    return y, (x64, a, bm, mag)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,nested,bias", [(0.0, False, True), (0.0, True, False), (0.25, False, False),
                                           (0.25, True, True)])
def test_qdora_layer_matches_peft_over_bitsandbytes(backend: str, p: float, nested: bool, bias: bool) -> None:
    """QDoRA on the fused NF4 op gives PEFT's output and the gradients of the input, LoRA A and B and the DoRA
    magnitude (fp32, odd shapes, 3-D input; with dropout PEFT's dropout replays the fused path's mask), with plain
    and double-quantized absmax; every call fused."""
    from _models import clone, use_shared_seed_dropout

    model = _bnb_dora(128, 37, 5, p=p, nested=nested, bias=bias)
    ref = clone(model)
    peftfast.patch(model, backend=backend)
    entry = peftfast.report(model).entries[0]
    assert entry.patched and entry.nf4, entry
    if p:
        use_shared_seed_dropout(ref, model, p, backend=backend)
    x = torch.randn(2, 9, 128)
    dy = torch.randn(2, 9, 37)
    outs = []
    for m in (model, ref):
        xi = x.clone().requires_grad_()
        torch.manual_seed(11)
        y = m(xi)
        y.backward(dy)
        outs.append([y.detach(), xi.grad] + [prm.grad for prm in _dora_leaves(m)])
    assert len(outs[0]) == 5 and all(t is not None for t in outs[0])
    for got, want in zip(*outs):
        assert torch.allclose(got, want, atol=2e-5 * want.abs().max().item(), rtol=1e-4), (got - want).abs().max()
    rt = peftfast.report(model).runtime(model)
    assert all(r["fused"] == 1 and not r["fallbacks"] for r in rt.values()), rt


@pytest.mark.parametrize("backend,dtype,lora_dtype", [("torch", torch.bfloat16, torch.float32),
                                                      pytest.param("cpp", torch.bfloat16, torch.float32,
                                                                   marks=NEED_C),
                                                      ("cpp", torch.bfloat16, None) if O.have_ops() else
                                                      ("torch", torch.bfloat16, None),
                                                      ("triton", torch.float16, None)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_qdora_low_precision_within_twice_peft_error(backend: str, dtype: torch.dtype, lora_dtype, p: float) -> None:
    """bf16/fp16 compute over NF4 (fp16 on the interpreter, whose bf16 dot is broken), LoRA weights in the compute
    dtype or fp32: the patched layer's output and gradients err against fp64 maths on the same NF4 codes (and the
    same dropout mask) no more than twice what PEFT's own QDoRA forward does."""
    from _models import clone, use_shared_seed_dropout

    model = _bnb_dora(128, 48, 8, p=p, dtype=dtype, lora_dtype=lora_dtype, seed=4)
    peft = clone(model)
    peftfast.patch(model, backend=backend)
    if p:
        use_shared_seed_dropout(peft, model, p, backend=backend)
    x = torch.randn(37, 128)
    dy = torch.randn(37, 48)
    res = []
    for m in (model, peft):
        xi = x.to(dtype).requires_grad_()
        torch.manual_seed(5)
        y = m(xi)
        y.backward(dy.to(y.dtype))
        res.append([y.detach().double(), xi.grad.double()] + [prm.grad.double() for prm in _dora_leaves(m)])
    torch.manual_seed(5)
    keep = None
    if p:  # the mask both drew: the patched layer's seed, drawn first from torch's RNG
        from peftfast.ops.lora import draw_seed

        keep = dropout_keep_mask(draw_seed(), 1, 37, 128, p, device="cpu", backend=backend)[0]
    y64, leaves = _fp64_qdora(model, x.to(dtype), keep, p)
    y64.backward(dy.double())
    exact = [y64.detach()] + [t.grad for t in leaves]
    assert peftfast.report(model).runtime(model)["base_model.model.fc"]["fused"] == 1
    for r, got, eager in zip(exact, *res):
        assert (got - r).abs().max() <= 2 * (eager - r).abs().max() + 1e-3 * r.abs().max(), (
            (got - r).abs().max(), (eager - r).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nf4_dora_weight_norm_by_row_chunks(backend: str) -> None:
    """‖W + s·B A‖ per row from NF4 codes, a few rows dequantized at a time: the fp64 norm of the formed matrix,
    whatever the chunk, and the same for double-quantized absmax as for its expanded fp32 form."""
    g = torch.Generator().manual_seed(6)
    n, k, r, s, bs = 37, 96, 6, 1.7, 32
    q, am = O.quantize_nf4(torch.randn(n, k, generator=g), bs)
    a, b = torch.randn(r, k, generator=g) * 0.2, torch.randn(n, r, generator=g)
    ref = torch.linalg.norm(_ref_dequantize(q, am, bs) + s * b.double() @ a.double(), dim=1)
    whole = O.nf4_dora_weight_norm(q, am, a, b, s, block_size=bs, backend=backend)
    parts = O.nf4_dora_weight_norm(q, am, a, b, s, block_size=bs, backend=backend, chunk=5 * k)  # 5 rows: 8 chunks
    assert whole.dtype == torch.float32 and not whole.requires_grad
    assert torch.allclose(whole.double(), ref, rtol=1e-6) and torch.allclose(parts, whole, rtol=1e-6, atol=0)
    dq = O.double_quantize(am)
    am_back = O.dequantize_absmax(*dq, am.shape)
    assert torch.equal(O.nf4_dora_weight_norm(q, dq, a, b, s, block_size=bs, backend=backend),
                       O.nf4_dora_weight_norm(q, am_back, a, b, s, block_size=bs, backend=backend))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_qdora_saves_less_than_peft(p: float) -> None:
    """Bytes kept for backward by one QDoRA layer, side by side with PEFT's over the same bitsandbytes layer.
    Without dropout: x, the rank-r product and one [M, N] output (for the magnitude's gradient). With dropout:
    besides, the dropped input (of the second NF4 GEMM), its rank-r product and its 1-byte mask, one [M, N] still;
    PEFT keeps two [M, N] outputs and more M x K inputs."""
    from peftfast.bench import saved_activation_bytes

    m, k, n, r = 16, 128, 96, 8
    sizes = {}
    for label in ("peft", "peftfast"):
        model = _bnb_dora(k, n, r, p=p)
        if label == "peftfast":
            peftfast.patch(model)
        x = torch.randn(m, k, requires_grad=True)
        state = model.base_model.model.fc.get_base_layer().weight.quant_state.absmax  # the NF4 scales, not activations
        _, saved = saved_activation_bytes(lambda: model(x * 1), exclude=[*model.parameters(), state])
        sizes[label] = saved.total
    small = 4 * 2 * n + 8 * 2  # the weight norm and mag (N each), the ops' seeds
    if p == 0.0:
        assert sizes["peftfast"] <= 4 * (m * k + m * r + m * n) + small, sizes
    else:
        assert sizes["peftfast"] <= 4 * (2 * m * k + 2 * m * r + m * n) + m * k + small, sizes
    assert sizes["peft"] >= sizes["peftfast"] + 4 * m * n, sizes


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_qdora_model_runs_every_layer_fused(p: float) -> None:
    """A tiny Llama on bitsandbytes NF4 bases with DoRA adapters, without and with dropout: the patched model's loss
    and every trainable gradient match PEFT's (its dropout replaying the fused masks), every LoRA layer runs fused
    and the MLP on the QDoRA MLP op."""
    import bitsandbytes as bnb
    from _models import clone, use_shared_seed_dropout
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(12)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False, attn_implementation="eager")
    base = LlamaForCausalLM(cfg)
    for name, mod in list(base.model.layers.named_modules()):
        for cname, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                q4 = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                       quant_type="nf4", compute_dtype=torch.float32)
                q4.load_state_dict(child.state_dict())
                setattr(mod, cname, q4)
    base = base.to("cpu")  # bitsandbytes quantizes on the move
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=p, use_dora=True,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    for name, prm in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(prm, std=0.1)
    ref = clone(model)
    peftfast.patch(model)
    rep = peftfast.report(model)
    assert len(rep.entries) == 7 and all(e.patched and e.nf4 for e in rep.entries)
    if p:
        use_shared_seed_dropout(ref, model, p)
    ids = torch.randint(0, 96, (2, 9))
    torch.manual_seed(3)
    l_pat, g_pat = _loss_and_grads(model, ids)
    torch.manual_seed(3)
    l_ref, g_ref = _loss_and_grads(ref, ids)
    assert torch.allclose(l_pat, l_ref, rtol=1e-5, atol=1e-6)
    assert g_pat.keys() == g_ref.keys() and any("magnitude" in k for k in g_pat)
    for name in g_ref:
        assert torch.allclose(g_pat[name], g_ref[name], rtol=1e-3, atol=1e-5 * g_ref[name].abs().max()), name
    rt = peftfast.report(model).runtime(model)
    lora_rt = {k: v for k, v in rt.items() if k.endswith("_proj")}
    assert len(lora_rt) == 7 and all(v["fused"] == 1 and not v["fallbacks"] for v in lora_rt.values()), rt
    mrt = peftfast.report(model).module_runtime(model)["base_model.model.model.layers.0.mlp"]
    assert mrt == {"fused": 1, "fallbacks": {}, "deferred": {}}, mrt
    peftfast.unpatch(model)
    torch.manual_seed(3)
    l_back, _ = _loss_and_grads(model, ids)
    assert torch.isfinite(l_back)


def test_qdora_bad_input_and_quantize_base_refusal() -> None:
    """A magnitude of the wrong shape names the op; quantize_base refuses DoRA layers (PEFT's DoRA forward cannot
    read NF4Linear's codes), converting nothing."""
    from peft import LoraConfig, get_peft_model

    q, am = O.quantize_nf4(torch.randn(24, 64), 32)
    x = torch.randn(3, 64)
    a, b = torch.randn(4, 64), torch.randn(24, 4)
    with pytest.raises(ValueError, match=r"peftfast: blk\.fc: DoRA magnitude has shape \(23,\)"):
        O.nf4_dora_linear(x, q, am, None, a, b, 1.0, torch.ones(23), block_size=32, name="blk.fc")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 24)

        def forward(self, x):
            return self.fc(x)

    model = get_peft_model(Net(), LoraConfig(r=4, target_modules=["fc"], use_dora=True))
    with pytest.raises(ValueError, match="fc: DoRA adapter; PEFT's DoRA forward cannot read an NF4Linear base"):
        peftfast.quantize_base(model, block_size=32)
    assert type(model.base_model.model.fc.get_base_layer()) is nn.Linear


def test_qdora_layer_compiles_as_one_graph() -> None:
    """QDoRA with dropout under torch.compile: the seed is drawn as a tensor op and shared by the mask and the fused
    NF4 op, the norm's row chunks are a traced loop: one graph, no break; the compiled (aot_eager) step gives the
    eager step's output and gradients for the same RNG state."""
    import torch._dynamo

    model = _bnb_dora(128, 48, 4, p=0.2)
    peftfast.patch(model)
    x = torch.randn(2, 5, 128)
    torch._dynamo.reset()
    try:
        exp = torch._dynamo.explain(model)(x)
        assert exp.graph_count == 1 and exp.graph_break_count == 0, exp.break_reasons[:3]
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        res = []
        for fn in (model, compiled):
            model.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            torch.manual_seed(4)
            y = fn(xi)
            y.pow(2).sum().backward()
            res.append([y.detach(), xi.grad] + [prm.grad for prm in _dora_leaves(model)])
    finally:
        torch._dynamo.reset()
    for got, want in zip(*res):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# the QDoRA gated MLP: three DoRA projections over NF4 bases as one op
# ----------------------------------------------------------------------------------------------------------------
def _qdora_proj(n, k, r, *, bias, p, double=False, scale=0.5):
    """(qweight, absmax, block, bias, A, B, scale, magnitude, p): the magnitude near ‖W_n‖ but not at it."""
    w = torch.randn(n, k) * 0.2
    q, am = O.quantize_nf4(w, 64)
    absmax = O.double_quantize(am) if double else am
    mag = (torch.linalg.norm(w, dim=1) * (torch.rand(n) * 0.4 + 0.8)).requires_grad_()
    b = torch.randn(n).requires_grad_() if bias else None
    return [q, absmax, 64, b, (torch.randn(r, k) * 0.1).requires_grad_(), (torch.randn(n, r) * 0.1).requires_grad_(),
            scale, mag, p]


def _qdora_leaves(x, *projs):
    return [x] + [t for pr in projs for t in (pr[3], pr[4], pr[5], pr[7]) if t is not None]


def _qdora_layerwise(x, gate, up, down, act, seeds, backend):
    def lin(t, pr, seed):
        q, am, bs, bias, a, b, s, mag, p = pr
        return O.nf4_dora_linear(t, q, am, bias, a, b, s, mag, dropout_p=p, seed=seed, block_size=bs, backend=backend)

    fn = {"silu": nn.functional.silu, "gelu_tanh": lambda t: nn.functional.gelu(t, approximate="tanh")}[act]
    return lin(fn(lin(x, gate, seeds[0])) * lin(x, up, seeds[1]), down, seeds[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps,recompute,double", [((0.0, 0.0, 0.0), "none", False), ((0.0, 0.0, 0.0), "up", True),
                                                 ((0.0, 0.0, 0.0), "gate_up", False),
                                                 ((0.25, 0.1, 0.3), "none", True), ((0.25, 0.1, 0.3), "up", False),
                                                 ((0.2, 0.2, 0.0), "gate_up", False)])
def test_nf4_dora_mlp_matches_the_layers_one_by_one(backend, ps, recompute, double) -> None:
    """Same seeds, same kernels: the QDoRA MLP op gives the output and every gradient (x, biases, A, B, magnitudes)
    of three nf4_dora_linear layers one by one, without and with dropout, every recompute setting."""
    torch.manual_seed(19)
    m, k, i = 37, 128, 192
    x = torch.randn(m, 2 * k)[:, ::2].requires_grad_()  # non-contiguous
    gate = _qdora_proj(i, k, 4, bias=True, p=ps[0], double=double, scale=2.0)
    up = _qdora_proj(i, k, 4, bias=False, p=ps[1], double=double)
    down = _qdora_proj(k, i, 5, bias=True, p=ps[2], double=double, scale=1.5)
    leaves = _qdora_leaves(x, gate, up, down)
    dy = torch.randn(m, k)
    seeds = (11, 12, 13)
    runs = []
    for fn in (lambda: O.nf4_dora_mlp(x, gate, up, down, act="gelu_tanh", seeds=seeds, recompute=recompute,
                                      backend=backend, chunk=5000),
               lambda: _qdora_layerwise(x, gate, up, down, "gelu_tanh", seeds, backend)):
        y = fn()
        runs.append((y, *torch.autograd.grad(y, leaves, dy)))
    for j, (a, b) in enumerate(zip(*runs)):
        assert a.shape == b.shape and (a - b).abs().max() <= 2e-5 * b.abs().max().clamp_min(1e-3), j


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_nf4_dora_mlp_keeps_no_activation_or_dropped_input(p: float) -> None:
    """Kept: x, the rank-r products, z of each projection and, with dropout, g and u (recompute="up": nothing of
    up; "gate_up": nothing of gate and up); never act(g), h or a dropped input, which the layers keep."""
    torch.manual_seed(20)
    m, k, i = 37, 128, 192
    x = torch.randn(m, k, requires_grad=True)
    projs = (_qdora_proj(i, k, 4, bias=True, p=p), _qdora_proj(i, k, 4, bias=False, p=p),
             _qdora_proj(k, i, 4, bias=True, p=p))
    params = [t for pr in projs for t in pr if isinstance(t, torch.Tensor)]
    scales = [(i,)] * 4 + [(k,)] * 2  # the norms and the magnitude/norm scales
    sizes = {}
    for recompute in ("none", "up", "gate_up"):
        saved = [s for s in saved_shapes(lambda: O.nf4_dora_mlp(x, *projs, seeds=(1, 2, 3), recompute=recompute),
                                         params) if s != (1,)]  # (1,): a registered op's seed tensor
        per_proj = [(m, i), (m, 4)] + ([(m, i)] if p else [])
        kept = {"none": per_proj * 2, "up": per_proj, "gate_up": []}[recompute]
        assert saved == sorted([(m, k), (m, k), (m, 4), *kept, *scales]), (recompute, saved)
        sizes[recompute] = sum(math.prod(s) for s in saved)
    layers = [s for s in saved_shapes(lambda: _qdora_layerwise(x, *projs, "silu", (1, 2, 3), "auto"), params)
              if s != (1,)]
    # the layers keep g or its input for act, act(g) and u for the product, the down input h; with dropout each
    # projection's dropped input (and its mask) besides
    assert sum(math.prod(s) for s in layers) >= sizes["none"] + (3 * m * i if not p else 3 * m * i + 2 * m * k)


def test_nf4_dora_mlp_bad_input() -> None:
    torch.manual_seed(21)
    x = torch.randn(5, 128)
    gate, up, down = (_qdora_proj(192, 128, 4, bias=False, p=0.0), _qdora_proj(192, 128, 4, bias=False, p=0.0),
                      _qdora_proj(128, 192, 4, bias=False, p=0.0))
    with pytest.raises(ValueError, match=r"layers.0.mlp: up DoRA magnitude has shape \(3,\)"):
        O.nf4_dora_mlp(x, gate, [*up[:7], torch.ones(3), 0.0], down, name="layers.0.mlp")
    with pytest.raises(ValueError, match="layers.0.mlp: unknown gate activation 'relu'"):
        O.nf4_dora_mlp(x, gate, up, down, act="relu", name="layers.0.mlp")
    with pytest.raises(ValueError, match="layers.0.mlp down: input has 128 features, the NF4 weight 192|widths"):
        O.nf4_dora_mlp(x, gate, up, _qdora_proj(128, 128, 4, bias=False, p=0.0), name="layers.0.mlp")
