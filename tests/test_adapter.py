"""Fused bottleneck Adapters: op parity (both backends) against fp64, memory contract, model API, save/load."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from _adapter_cases import _leaves, _tensors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import peftfast
from peftfast.ops import _counters
from peftfast.ops.adapter import adapter_forward

BACKENDS = ["torch", "triton"]
ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def _reference(x, wd, bd, wu, bu, s, res, act, dtype):
    x, wd, bd, wu, bu, s, res = [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (x, wd, bd, wu, bu, s, res)]
    out = (x if res is None else res) + s * F.linear(ACTS[act](F.linear(x, wd, bd)), wu)
    return out if bu is None else out + bu


def _grads(fn, leaves, g):
    for t in leaves:
        t.grad = None
    y = fn()
    y.backward(g)
    return [y.detach().double()] + [t.grad.double() for t in leaves]


def _check(backend, act, tensors, dtype, tol=None):
    leaves = _leaves(*tensors)
    y0 = _reference(*tensors, act, torch.float64)
    g = torch.randn(y0.shape).to(dtype)
    got = _grads(lambda: adapter_forward(*tensors[:6], act=act, residual=tensors[6], backend=backend), leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    ref_t = [next(it) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in tensors]
    ref = _grads(lambda: _reference(*ref_t, act, torch.float64), ref_leaves, g.double())
    if tol is None:  # low precision: within 2x the error of PyTorch's eager computation in that dtype
        eager = _grads(lambda: _reference(*tensors, act, dtype), leaves, g)
    for i, (a, r) in enumerate(zip(got, ref)):
        scale = r.abs().max().clamp_min(1e-6)
        err = ((a - r).abs().max() / scale).item()
        bound = tol if tol is not None else 2 * ((eager[i] - r).abs().max() / scale).item() + 2e-3
        assert err <= bound, (i, err, bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("m,k,h,bias,learned,parallel", [
    (37, 80, 24, True, False, False),
    (5, 33, 3, False, True, False),
    (37, 80, 24, True, True, True),
    (19, 48, 64, True, False, False),
])
def test_fp32_parity(backend, act, m, k, h, bias, learned, parallel):
    t = _tensors(m, k, h, torch.float32, bias=bias, learned=learned, parallel=parallel)
    _check(backend, act, t, torch.float32, tol=3e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_noncontiguous_input_and_wide_bottleneck(backend):
    base = torch.randn(3, 11, 160)
    x = base[:, :, ::2].requires_grad_()  # stride 2 in the feature dim, 3-D
    wd = (torch.randn(256, 80) / 9).requires_grad_()
    wu = (torch.randn(80, 256) / 16).requires_grad_()
    t = (x, wd, None, wu, None, 1.5, None)
    _check(backend, "silu", t, torch.float32, tol=3e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_output_width_differs_from_input(backend):
    t = _tensors(23, 40, 8, torch.float32, parallel=True, n=56)
    _check(backend, "relu", t, torch.float32, tol=3e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_within_twice_eager_error(backend):
    t = _tensors(37, 80, 24, torch.float16, learned=True)
    _check(backend, "gelu", t, torch.float16)


def test_bf16_within_twice_eager_error_torch_backend():
    t = _tensors(37, 80, 24, torch.bfloat16)
    _check("torch", "silu", t, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_without_grad_gives_weight_grads(backend):
    x, wd, bd, wu, bu, s, _ = _tensors(13, 32, 8, torch.float32)
    x = x.detach()
    adapter_forward(x, wd, bd, wu, bu, s, act="gelu", backend=backend).sum().backward()
    assert all(t.grad is not None for t in (wd, bd, wu, bu))


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_input_and_preactivation_only(backend):
    x, wd, bd, wu, bu, _, _ = _tensors(37, 80, 24, torch.float32)
    params = {t.untyped_storage().data_ptr() for t in (wd, bd, wu, bu)}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.numel() > 1:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        adapter_forward(x, wd, bd, wu, bu, 0.5, act="gelu", backend=backend)
    assert sorted(saved) == sorted([(37, 80), (37, 24)])
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the eager chain keeps more
        _reference(x, wd, bd, wu, bu, 0.5, None, "gelu", torch.float32)
    assert len(saved) > 2


def test_triton_launch_counts():
    x, wd, bd, wu, bu, s, _ = _tensors(37, 80, 24, torch.float32, learned=True)
    with _counters.count_launches() as launches:
        y = adapter_forward(x, wd, bd, wu, bu, s, act="relu", backend="triton")
        y.sum().backward()
    assert dict(launches) == {"_adapter_fwd_kernel": 1, "_adapter_bwd_kernel": 1}


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda t: (t[0][:, :40], *t[1:]), ValueError, "input has 40 features"),
    (lambda t: (t[0], t[1], t[2], t[3][:, :5], *t[4:]), ValueError, "does not match bottleneck"),
    (lambda t: (t[0].double(), *t[1:]), TypeError, "share one dtype"),
])
def test_bad_input_names_the_adapter(mutate, exc, match):
    t = mutate(_tensors(7, 80, 24, torch.float32)[:6])
    with pytest.raises(exc, match=f"adapter 'blk3'.*{match}"):
        adapter_forward(*t, act="relu", name="blk3")


def test_bad_activation_and_config():
    with pytest.raises(ValueError, match="unknown activation"):
        adapter_forward(*_tensors(7, 16, 4, torch.float32)[:6], act="tanh")
    with pytest.raises(ValueError, match="placement"):
        peftfast.AdapterConfig(placement="middle")
    with pytest.raises(ValueError, match="bottleneck_size"):
        peftfast.AdapterConfig(bottleneck_size=300)


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------
def _llama(cls=LlamaForCausalLM, cfg_cls=LlamaConfig):
    torch.manual_seed(0)
    return cls(cfg_cls(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2))


def _gpt_neox():
    """GPT-NeoX: the attention child is ``attention`` and the residual parallel (attention and MLP off one input)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                            num_attention_heads=4, max_position_embeddings=64, hidden_dropout=0.0,
                                            attention_dropout=0.0))


def _bert(cls=BertForSequenceClassification, cfg_cls=BertConfig):
    torch.manual_seed(0)
    return cls(cfg_cls(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       max_position_embeddings=64))


def _loss(model, ids):
    if hasattr(model, "classifier"):
        return model(input_ids=ids, attention_mask=(ids > 3).long(), labels=torch.tensor([0, 1])).loss
    return model(input_ids=ids, labels=ids).loss


def _perturb(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".peftfast_adapters." in n and p.requires_grad and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = _loss(model, ids)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


FAMILIES = {
    "llama": lambda: _llama(),
    "mistral": lambda: _llama(MistralForCausalLM, MistralConfig),
    "qwen2": lambda: _llama(Qwen2ForCausalLM, Qwen2Config),
    "gpt_neox": _gpt_neox,
    "bert": lambda: _bert(),
    "roberta": lambda: _bert(RobertaForSequenceClassification, RobertaConfig),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_model_identity_at_init_and_fused_matches_eager(family, placement):
    model = FAMILIES[family]()
    ids = torch.randint(4, 64, (2, 11))
    ids[1, 8:] = 1
    ref = _loss(model, ids).item()
    ref_hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].detach()
    cfg = peftfast.AdapterConfig(placement=placement, reduction_factor=4, activation="gelu",
                                 layer_norm=placement == "parallel", learned_scaling=placement == "houlsby")
    peftfast.add_adapters(model, cfg, train_head=family in ("bert", "roberta"))
    assert _loss(model, ids).item() == pytest.approx(ref, abs=1e-6)  # zero up-projection: the identity
    n_blocks = 3 * (2 if placement == "houlsby" else 1)
    adapters = [n for n, p in model.named_parameters() if p.requires_grad and ".peftfast_adapters." in n]
    assert len({n.split(".adapters.")[0] for n in adapters}) == n_blocks
    _perturb(model)
    fused_loss, fused = _loss_and_grads(model, ids)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert (hidden - ref_hidden).abs().max() > 1e-2  # the adapters now change the model
    peftfast.set_adapter_backend(model, fused=False)
    eager_loss, eager = _loss_and_grads(model, ids)
    assert fused_loss == pytest.approx(eager_loss, rel=1e-5)
    assert fused.keys() == eager.keys()
    for n in fused:
        assert torch.allclose(fused[n], eager[n], rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
@pytest.mark.parametrize("recompute", ["norms", "up", "mlp"])
def test_patch_fuses_the_frozen_base_around_adapters(family, placement, recompute):
    """``patch`` on an adapter model (no LoRA) fuses the frozen base the adapters train through (attention; for
    Llama also RoPE, the RMSNorms, the frozen MLPs and the blocks' residual adds, around the adapters' hooks): the
    same loss and adapter gradients as before, less saved for backward, and ``unpatch`` restores the model."""
    from peftfast.bench import saved_activation_bytes

    model = FAMILIES[family]()
    ids = torch.randint(4, 64, (2, 11))
    ids[1, 8:] = 1
    cfg = peftfast.AdapterConfig(placement=placement, bottleneck_size=8, activation="silu",
                                 layer_norm=placement == "houlsby")
    peftfast.add_adapters(model, cfg, train_head=family == "bert")
    _perturb(model)
    params = [*model.parameters()]
    ref_loss, ref = _loss_and_grads(model, ids)
    _, ref_saved = saved_activation_bytes(lambda: _loss(model, ids), exclude=params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # patched: no "returning it unchanged"
        peftfast.patch(model, recompute=recompute)
    rep = peftfast.report(model)
    fused = {e.kind for e in rep.modules if e.patched}
    # BERT: the attention, and its LayerNorms for the rebuild of their outputs (its MLPs are frozen with a one-op
    # GELU: nothing to drop, with that reason, unless recompute="up" or later drops the pre-activation and reruns the
    # up projection)
    bert = {"attention", "norm"} if recompute == "norms" else {"attention", "norm", "mlp"}
    assert fused == ({"attention", "rope", "norm", "block", "mlp"} if family == "llama" else bert), rep.format()
    assert any("patch fuses the frozen base around them" in n for n in rep.notes)
    loss, got = _loss_and_grads(model, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert got.keys() == ref.keys()
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-6 * ref[n].abs().max().item()), n
    runtime = rep.module_runtime(model)
    assert runtime and all(r["fused"] > 0 and not r["fallbacks"] for r in runtime.values()), runtime
    # less saved: BERT's eager attention keeps its probabilities; Llama's frozen MLPs keep g, act(g) and u eagerly,
    # the frozen-MLP op g and u ("up": g; "mlp": nothing), and no block that an adapter hooks keeps more
    _, saved = saved_activation_bytes(lambda: _loss(model, ids), exclude=params)
    assert saved.total < ref_saved.total
    peftfast.unpatch(model)
    assert not any(e.patched for e in peftfast.report(model).modules)
    loss, got = _loss_and_grads(model, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    # patched, then its adapters removed: patching again finds nothing to tune and undoes the earlier fusions
    peftfast.patch(model, recompute=recompute)
    peftfast.remove_adapters(model)
    with pytest.warns(UserWarning, match="no PEFT LoRA layers, PEFT prompt learning or peftfast adapters"):
        peftfast.patch(model)
    assert peftfast.report(model).modules == []
    assert all("forward" not in m.__dict__ for m in model.modules())  # no forward replaced on any instance
    assert (model.config._attn_implementation == "peftfast") is False


def test_triton_backend_in_a_model():
    model = _llama()
    ids = torch.randint(0, 64, (2, 9))
    peftfast.add_adapters(model, peftfast.AdapterConfig(placement="houlsby", bottleneck_size=8, activation="silu"))
    _perturb(model)
    peftfast.set_adapter_backend(model, fused=True, backend="triton")
    with _counters.count_launches() as launches:
        loss, got = _loss_and_grads(model, ids)
    assert launches["_adapter_fwd_kernel"] == 6 and launches["_adapter_bwd_kernel"] == 6
    peftfast.set_adapter_backend(model, fused=False)
    ref_loss, ref = _loss_and_grads(model, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-6), n


def test_freezing_head_and_also_train_with_peft_lora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peftfast.add_adapters(model, peftfast.AdapterConfig(), also_train=("lora_",))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".peftfast_adapters." in n or "lora_" in n for n in trainable)
    assert any("lora_A" in n for n in trainable)
    peftfast.patch(model)  # fused LoRA inside, adapters outside: both live
    assert peftfast.report(model).summary().startswith("peftfast: patched 6")
    ids = torch.randint(0, 64, (2, 9))
    _perturb(model)
    loss, grads = _loss_and_grads(model, ids)
    peftfast.unpatch(model)
    peftfast.set_adapter_backend(model, fused=False)
    ref_loss, ref = _loss_and_grads(model, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for n in ref:
        assert torch.allclose(grads[n], ref[n], rtol=1e-4, atol=1e-6), n


def test_named_adapters_switch_save_load_and_remove(tmp_path):
    model = _bert()
    ids = torch.randint(4, 64, (2, 11))
    base_out = model(input_ids=ids).logits.detach()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    peftfast.add_adapters(model, peftfast.AdapterConfig(placement="houlsby", bottleneck_size=6), "a",
                          train_head=True)
    _perturb(model)
    out_a = model(input_ids=ids).logits.detach()
    peftfast.add_adapters(model, peftfast.AdapterConfig(placement="pfeiffer", reduction_factor=8), "b")
    assert peftfast.adapter_names(model) == ["a", "b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)  # only the active adapter trains
    _perturb(model)
    out_b = model(input_ids=ids).logits.detach()
    assert not torch.allclose(out_a, out_b)
    peftfast.set_active_adapter(model, "a")
    assert torch.equal(model(input_ids=ids).logits, out_a)
    peftfast.save_adapters(model, str(tmp_path / "a"), "a")
    fresh = _bert()
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        peftfast.set_active_adapter(fresh, "zzz")
    peftfast.load_adapters(fresh, str(tmp_path / "a"))
    assert torch.allclose(fresh(input_ids=ids).logits, out_a, atol=1e-6)
    peftfast.remove_adapters(model, "a")
    assert peftfast.adapter_names(model) == ["b"]
    assert torch.equal(model(input_ids=ids).logits, out_b)
    peftfast.remove_adapters(model)
    assert torch.equal(model(input_ids=ids).logits, base_out)
    assert set(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


def test_layer_selection_and_bad_requests(tmp_path):
    model = _llama()
    peftfast.add_adapters(model, peftfast.AdapterConfig(layers=[0, 2], leave_out=[2]))
    names = {n.split(".peftfast_adapters.")[0] for n, _ in model.named_parameters() if ".peftfast_adapters." in n}
    assert names == {"model.layers.0"}
    with pytest.raises(ValueError, match="already exists"):
        peftfast.add_adapters(model, peftfast.AdapterConfig())
    with pytest.raises(ValueError, match="out of range"):
        peftfast.add_adapters(model, peftfast.AdapterConfig(layers=[7]), "other")
    with pytest.raises(ValueError, match="no transformer blocks"):
        peftfast.add_adapters(torch.nn.Linear(4, 4), peftfast.AdapterConfig())
    peftfast.save_adapters(model, str(tmp_path))
    small = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="saved for hidden 48"):
        peftfast.load_adapters(small, str(tmp_path))


def test_gradient_checkpointing_and_deepcopy():
    import copy

    model = _llama()
    peftfast.add_adapters(model, peftfast.AdapterConfig(placement="houlsby", bottleneck_size=8))
    _perturb(model)
    ids = torch.randint(0, 64, (2, 9))
    loss, ref = _loss_and_grads(model, ids)
    clone = copy.deepcopy(model)
    clone.gradient_checkpointing_enable()
    clone.train()
    loss2, got = _loss_and_grads(clone, ids)
    assert loss2 == pytest.approx(loss, rel=1e-6)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-5, atol=1e-7), n
