"""Two-layer MLPs (GPT-2, BERT, CLIP-style): the activation keeps only its input, the down projection's copy of its
output is rebuilt in backward.

Against the unpatched model in the same run: the same loss and gradients of every trainable parameter (dropout
included, through the shared-seed reference), exactly fewer saved bytes (counted with saved-tensor hooks), and a
reason in the report wherever the replacement is not used.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from _models import batch, clone, loss_and_grads, max_rel_err, peft_model, saved_shapes, use_shared_seed_dropout
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from torch import nn
from transformers import activations

import peftfast
from peftfast.bench import saved_activation_bytes
from peftfast.modules import dense_mlp as dense_mod
from peftfast.ops.dense_mlp import ACTS, act_forward, dense_act

TOL = 2e-5


def _mlp_entries(model) -> list:
    return [e for e in peftfast.report(model).modules if e.kind == "mlp"]


def _params(model) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


# ----------------------------------------------------------------------------------------------------------------
# the activation
# ----------------------------------------------------------------------------------------------------------------
REFERENCE_ACTS = {  # transformers' own modules, each computing one of ACTS
    "gelu": activations.GELUActivation(),
    "gelu_tanh": activations.NewGELUActivation(),
    "silu": activations.SiLUActivation(),
    "quick_gelu": activations.QuickGELUActivation(),
}


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dense_act_matches_transformers_and_keeps_only_its_input(act, dtype):
    y = (torch.randn(37, 80, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    dh = torch.randn(37, 80, dtype=torch.float64).to(dtype)
    got_shapes = saved_shapes(lambda: dense_act(y, act), [])
    h = dense_act(y, act)
    (dy,) = torch.autograd.grad(h, y, dh)
    ref_mod = REFERENCE_ACTS[act]
    y64 = y.detach().double().requires_grad_()
    h64 = ref_mod(y64)
    (dy64,) = torch.autograd.grad(h64, y64, dh.double())
    # the error of transformers' module in this dtype, against fp64: ours may make at most twice it
    y_lp = y.detach().clone().requires_grad_()
    h_lp = ref_mod(y_lp)
    (dy_lp,) = torch.autograd.grad(h_lp, y_lp, dh)
    eps = torch.finfo(dtype).eps
    for got, lp, want in ((h, h_lp, h64), (dy, dy_lp, dy64)):
        err = (got.double() - want).abs().max().item()
        ref_err = (lp.double() - want).abs().max().item()
        assert err <= max(2 * ref_err, 32 * eps * want.abs().max().item()), (err, ref_err)
    assert got_shapes == [(37, 80)]  # y only
    assert len(saved_shapes(lambda: ref_mod(y), [])) >= (2 if act in ("gelu_tanh", "quick_gelu") else 1)
    with torch.no_grad():  # the rebuild backward runs is the forward, bit for bit
        assert torch.equal(act_forward(y, act), h)


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        act_forward(torch.ones(2), "relu")


@pytest.mark.parametrize("act, want", [
    (activations.NewGELUActivation(), "gelu_tanh"), (activations.FastGELUActivation(), "gelu_tanh"),
    (activations.GELUTanh(), "gelu_tanh"), (activations.GELUActivation(), "gelu"),
    (activations.GELUActivation(use_gelu_python=True), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
    (nn.SiLU(), "silu"), (activations.QuickGELUActivation(), "quick_gelu"), (F.gelu, "gelu"),
    (nn.ReLU(), None), (nn.Tanh(), None), (activations.ClippedGELUActivation(-10, 10), None),
])
def test_dense_activation_names(act, want):
    assert dense_mod.dense_activation(act) == want


# ----------------------------------------------------------------------------------------------------------------
# models: GPT-2 (c_fc/c_proj Conv1D, gelu_new), BERT and RoBERTa (intermediate/output, GELU)
# ----------------------------------------------------------------------------------------------------------------
def _trains_as(model, ref, data, p: float) -> tuple[torch.Tensor, dict]:
    """``model``'s loss and the gradient of every trainable parameter match ``ref``'s (dropout ``p`` through shared
    seeds); returns ``model``'s."""
    if p:
        use_shared_seed_dropout(ref, model, p)
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    errs = {n: max_rel_err(grads[n], ref_grads[n]) for n in grads}
    assert max(errs.values()) <= TOL, max(errs.items(), key=lambda kv: kv[1])
    return loss, grads


@pytest.mark.parametrize("recompute", ["norms", "none"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_loss_gradients_and_saved_bytes_match_unpatched(arch, p, recompute):
    model = peft_model(arch, lora_dropout=p)
    ref = clone(model)
    peftfast.patch(model, recompute=recompute)
    off = clone(ref)  # every other fusion, without the two-layer MLPs: isolates what they save
    peftfast.patch(off, recompute=recompute, fuse_mlp=False)
    entries = _mlp_entries(model)
    fused = recompute != "none" or arch == "gpt2"  # BERT's one-op GELU gains only by the rebuild
    assert len(entries) == 2 and all(e.patched == fused for e in entries), peftfast.report(model).format()
    if not fused:
        assert all("recompute='none' keeps the down projection's input" in e.reason for e in entries)
        return
    data = batch(arch)
    _trains_as(model, ref, data, p)
    for r in peftfast.report(model).module_runtime(model).values():
        assert r["fused"] > 0 and not r["fallbacks"], r
    # exactly the I-wide tensors the MLP no longer keeps, per layer and token: the down projection's input h
    # (rebuilt), and for gelu_new its chain's three extra operands
    torch.manual_seed(0)
    _, got = saved_activation_bytes(lambda: model(**data).loss, _params(model))
    torch.manual_seed(0)
    _, before = saved_activation_bytes(lambda: off(**data).loss, _params(off))
    tokens, inter, layers = data["input_ids"].numel(), 2 * 32 if arch == "bert" else 4 * 32, 2
    per = {"gpt2": 4 if recompute != "none" else 3, "bert": 1}[arch]
    assert before.total - got.total == per * tokens * inter * layers * 4, (before.total, got.total)


@pytest.mark.parametrize("recompute", ["up", "mlp"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_up_rerun_trains_up_when_its_input_needs_no_gradient(recompute, p):
    """LoRA on the MLPs alone (GPT-2's c_fc/c_proj): layer 0's MLP reads a tensor that needs no gradient (frozen
    embeddings and attention), so the up projection's rerun is the only path to its LoRA weights; they get PEFT's
    gradients, every layer fused (before, autograd saw an output needing no gradient and gave them none)."""
    model = peft_model("gpt2", lora_dropout=p, target_modules=r".*\.mlp\.(c_fc|c_proj)")
    ref = clone(model)
    peftfast.patch(model, recompute=recompute)
    assert all(e.patched for e in _mlp_entries(model)), peftfast.report(model).format()
    _trains_as(model, ref, batch("gpt2"), p)
    for r in peftfast.report(model).module_runtime(model).values():
        assert r["fused"] > 0 and not r["fallbacks"], r


def test_roberta_and_gradient_checkpointing_and_chunked_feed_forward():
    """RoBERTa (a copy of BERT's layer), under gradient checkpointing (the rebuild steps aside) and with
    ``chunk_size_feed_forward`` (the layer calls the chunk function once per chunk)."""
    for arch, kwargs, ckpt in (("roberta", {}, False), ("bert", {"chunk_size_feed_forward": 3}, False),
                               ("gpt2", {}, True)):
        model = peft_model(arch, model_kwargs=kwargs)
        ref = clone(model)
        if ckpt:
            for m in (model, ref):
                m.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
        peftfast.patch(model)
        assert all(e.patched for e in _mlp_entries(model)), peftfast.report(model).format()
        data = batch(arch)
        loss, grads = loss_and_grads(model, data)
        ref_loss, ref_grads = loss_and_grads(ref, data)
        assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item()), arch
        assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= TOL, arch
        fused = [r["fused"] for n, r in peftfast.report(model).module_runtime(model).items() if "attention" not in n]
        want = 3 if kwargs else 1  # seq 8 in chunks of 3
        assert fused and all(f >= want for f in fused), (arch, fused)


def test_frozen_mlps_of_prompt_learning():
    """GPT-2 under prefix tuning: frozen projections, but gelu_new's chain keeps 4·I, the replacement I. BERT's
    one-op GELU with a frozen output.dense keeps only its input already: left alone with that reason."""
    for arch, fused in (("gpt2", True), ("bert", False)):
        from _models import BUILDERS

        torch.manual_seed(0)
        base = BUILDERS[arch]()
        task = "CAUSAL_LM" if arch == "gpt2" else "FEATURE_EXTRACTION"
        model = get_peft_model(base, PrefixTuningConfig(task_type=task, num_virtual_tokens=3))
        model.train()
        ref = clone(model)
        peftfast.patch(model, recompute="norms")
        entries = _mlp_entries(model)
        assert len(entries) == 2 and all(e.patched == fused for e in entries), peftfast.report(model).format()
        if not fused:
            assert all("the frozen down projection keeps no input" in e.reason for e in entries)
            continue
        data = batch(arch)
        loss, grads = loss_and_grads(model, data)
        ref_loss, ref_grads = loss_and_grads(ref, data)
        assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
        assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= TOL
        mlp = model.get_base_model().transformer.h[0].mlp
        x = torch.randn(2, 5, 32, requires_grad=True)
        shapes = saved_shapes(lambda: mlp(x), _params(model))
        ref_shapes = saved_shapes(lambda: type(mlp).forward(mlp, x), _params(model))
        wide = [s for s in shapes if s[-1] == 128]
        assert wide == [(2, 5, 128)], shapes  # the pre-activation only
        assert sum(s[-1] == 128 for s in ref_shapes) >= 3, ref_shapes
        peftfast.patch(model)  # the default, recompute="up": not even the pre-activation (c_fc runs again)
        assert not [s for s in saved_shapes(lambda: mlp(x), _params(model)) if s[-1] == 128]


# ----------------------------------------------------------------------------------------------------------------
# CLIP-style fc1/activation_fn/fc2 with QuickGELU, and what the probe refuses
# ----------------------------------------------------------------------------------------------------------------
class ClipLikeMLP(nn.Module):
    def __init__(self, hidden=24, inter=56, act=None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, inter), nn.Linear(inter, hidden)
        self.activation_fn = act if act is not None else activations.QuickGELUActivation()

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class ResidualMLP(ClipLikeMLP):
    def forward(self, x):  # not a two-layer MLP: the probe must see the extra residual
        return self.fc2(self.activation_fn(self.fc1(x))) + x


class TwiceMLP(ClipLikeMLP):
    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(self.fc1(x) * 0 + x)))


class Holder(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp


def _lora(mlp: nn.Module, **kw) -> nn.Module:
    torch.manual_seed(3)
    model = get_peft_model(Holder(mlp), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], **kw))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            for b in m.lora_B.values():
                nn.init.normal_(b.weight, std=0.2)
    model.train()
    return model


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_clip_style_quick_gelu_mlp(p):
    model = _lora(ClipLikeMLP(), lora_dropout=p)
    ref = clone(model)
    peftfast.patch(model, recompute="norms")  # the default ("up") also drops y: test_recompute_up_... below
    (entry,) = _mlp_entries(model)
    assert entry.patched, peftfast.report(model).format()
    if p:
        use_shared_seed_dropout(ref, model, p)
    x = torch.randn(3, 7, 24, dtype=torch.float32)[:, ::2]  # non-contiguous rows
    outs = []
    for m in (model, ref):
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)
        out = m.base_model.model.mlp(xi)
        out.square().sum().backward()
        outs.append((out.detach(), xi.grad, {n: q.grad for n, q in m.named_parameters() if q.requires_grad}))
    (o, dx, g), (ro, rdx, rg) = outs
    assert max_rel_err(o, ro) <= TOL and max_rel_err(dx, rdx) <= TOL
    assert max(max_rel_err(g[n], rg[n]) for n in g) <= TOL
    mlp = model.base_model.model.mlp
    xg = x.clone().requires_grad_()
    _, saved = saved_activation_bytes(lambda: mlp(xg), _params(model))
    _, ref_saved = saved_activation_bytes(lambda: type(mlp).forward(mlp, xg), _params(model))

    def wide(sb) -> int:
        return sum(n for k, n in sb.by_shape.items() if k.split(":")[0].endswith(" 56)"))

    one = 3 * 4 * 56 * 4
    assert wide(saved) == one, saved  # y, once (QuickGELU's and the rebuild's source)
    assert wide(ref_saved) == 3 * one, ref_saved  # y, sigmoid(1.702 y), fc2's input h


@pytest.mark.parametrize("cls, why", [(ResidualMLP, "computes something else"), (TwiceMLP, "its code calls")])
def test_probe_refuses_other_forwards(cls, why):
    model = _lora(cls())
    peftfast.patch(model)
    (entry,) = _mlp_entries(model)
    assert not entry.patched and why in entry.reason and "\n" not in entry.reason, entry


def _inline_patched(arch: str, **model_kwargs):
    """(PEFT model, its patched copy, batch): four MLP entries all patched, the same loss and gradients."""
    import _models as M

    ref = M.peft_model(arch, r=4, lora_alpha=8, model_kwargs=model_kwargs)
    model = peftfast.patch(clone(ref))
    entries = _mlp_entries(model)
    assert len(entries) == 4 and all(e.patched for e in entries), entries
    data = M.batch(arch)
    loss, grads = M.loss_and_grads(model, data)
    want, ref_grads = M.loss_and_grads(ref, data)
    assert max_rel_err(loss, want) <= TOL
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in ref_grads) <= TOL
    return ref, model, data


def _wide(model, data, width: int = 64) -> int:
    """Bytes of the ``width``-wide (intermediate) tensors kept for backward."""
    _, sb = saved_activation_bytes(lambda: model(**data).loss, list(model.parameters()))
    return sum(n for k, n in sb.by_shape.items() if k.split(":")[0].endswith(f" {width})"))


def test_bart_style_layers_inline_mlp_keeps_the_pre_activation_only():
    """BART's layers compute fc1 -> activation_fn -> fc2 inline beside their attention: the layer stays as it is, its
    activation module keeps only its input and registers its output with the rebuild scope, so fc2's LoRA keeps a
    recipe instead of a second intermediate-wide tensor. Same loss and gradients; recompute='none' says why not;
    unpatch restores the activation modules."""
    ref, model, data = _inline_patched("bart")
    rt = peftfast.report(model).module_runtime(model)
    acts = {n: r for n, r in rt.items() if n.endswith("activation_fn")}
    assert len(acts) == 4 and all(r["fused"] == 1 and not r["fallbacks"] for r in acts.values()), acts

    assert 2 * _wide(model, data) == _wide(ref, data) > 0  # each layer's pre-activation, not also its output
    peftfast.unpatch(model)
    assert not any("_peftfast_dense" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    lean = peftfast.patch(clone(ref), recompute="none")
    assert all("fc2 keeps its input (no rebuild scope" in e.reason for e in _mlp_entries(lean))


@pytest.mark.parametrize("ffn, kept", [("gated-gelu", (3, 7)), ("gelu", (1, 2))])
def test_t5_feed_forward_activation_keeps_its_input_only(ffn, kept):
    """T5's feed-forward modules (Flan-T5's gated ``gelu_new``, whose chain of ops keeps four copies; plain GELU): the
    module's code runs as before, its activation keeps only its input and its output is rebuilt for whoever saved it
    (the gating product, or ``wo``). Same loss and gradients; per layer ``kept`` = (patched, PEFT) intermediate-wide
    tensors: wi_0's output, wi_1's and the product ``wo`` reads, instead of those, the activation's four and its
    output; or GELU's input instead of its input and output."""
    import _models as M

    ref, model, data = _inline_patched("t5", feed_forward_proj=ffn)
    assert kept[1] * _wide(model, data) == kept[0] * _wide(ref, data) > 0  # d_ff = 2 x d_model = 64
    peftfast.unpatch(model)
    assert not any("_peftfast_dense" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    relu = peftfast.patch(M.peft_model("t5", r=4, lora_alpha=8))  # T5 v1.0: ReLU keeps its output, fc2 reads it
    assert all("activation ReLU is not GELU/SiLU/QuickGELU" in e.reason for e in _mlp_entries(relu))


def test_unsupported_activation_and_instance_forward_are_reported():
    model = _lora(ClipLikeMLP(act=nn.ReLU()))
    peftfast.patch(model)
    assert "activation ReLU is not GELU/SiLU/QuickGELU" in _mlp_entries(model)[0].reason
    mlp = ClipLikeMLP()
    mlp.forward = lambda x: mlp.fc2(mlp.fc1(x))
    model = _lora(mlp)
    peftfast.patch(model)
    assert "instance-level forward of its own" in _mlp_entries(model)[0].reason


def test_call_time_fallbacks_keep_results():
    """A hook added to the activation after patch, or an activation swapped for another class: the module's own
    forward runs, counted with the reason."""
    model = _lora(ClipLikeMLP())
    peftfast.patch(model)
    mlp = model.base_model.model.mlp
    x = torch.randn(2, 5, 24)
    want = type(mlp).forward(mlp, x)
    handle = mlp.activation_fn.register_forward_hook(lambda m, i, o: o * 2)
    assert torch.allclose(mlp(x), type(mlp).forward(mlp, x))
    handle.remove()
    mlp.activation_fn = activations.NewGELUActivation()
    mlp(x)
    mlp.activation_fn = activations.QuickGELUActivation()
    assert torch.allclose(mlp(x), want, atol=1e-6)
    fb = peftfast.report(model).module_runtime(model)["base_model.model.mlp"]["fallbacks"]
    assert fb == {"the activation has forward hooks": 1, "the activation is now a NewGELUActivation": 1}, fb


def test_unpatch_copy_and_pickle():
    model = peft_model("bert")
    peftfast.patch(model)
    data = batch("bert")
    torch.manual_seed(0)
    want = model(**data).loss
    cp = copy.deepcopy(model)
    torch.manual_seed(0)
    assert torch.equal(cp(**data).loss, want)
    layer = cp.get_base_model().bert.encoder.layer[0]
    assert layer.feed_forward_chunk.args[0] is layer  # bound to the copy, not to the original
    restored = pickle.loads(pickle.dumps(model))
    torch.manual_seed(0)
    assert torch.equal(restored(**data).loss, want)
    for m in (model, peft_model("gpt2")):
        peftfast.patch(m)
        peftfast.unpatch(m)
        assert not any("forward" in mod.__dict__ or "feed_forward_chunk" in mod.__dict__ or
                       "_peftfast_dense" in mod.__dict__ for mod in m.modules())


def test_fuse_mlp_false_and_repatch():
    model = peft_model("gpt2")
    peftfast.patch(model, fuse_mlp=False)
    assert all(not e.patched and e.reason == "fuse_mlp=False" for e in _mlp_entries(model))
    assert not any("_peftfast_dense" in m.__dict__ for m in model.modules())
    peftfast.patch(model)
    peftfast.patch(model, recompute="none")  # re-applied: gelu_new still pays without the rebuild
    states = [m.__dict__["_peftfast_dense"] for m in model.modules() if "_peftfast_dense" in m.__dict__]
    assert len(states) == 2 and not any(s.rebuild for s in states)
    mlp = model.get_base_model().transformer.h[0].mlp
    assert mlp.forward.func is dense_mod.dense_mlp_forward and mlp.__dict__["_peftfast_dense"].previous_forward is None


@pytest.mark.parametrize("recompute", ["norms", "mlp"])
def test_torch_compile_without_graph_breaks(recompute):
    """``torch.compile`` (aot_eager) of a patched BERT: one graph, no break, loss and gradients as eager (the
    rebuild and the up projection's rerun step aside under the compiler, which picks what to save itself)."""
    import torch._dynamo
    from torch._dynamo.backends.debugging import ExplainWithBackend

    model = peft_model("bert", lora_dropout=0.1)
    peftfast.patch(model, recompute=recompute)
    data = batch("bert")
    eager_loss, eager_grads = loss_and_grads(model, data)
    explain = ExplainWithBackend("aot_eager")
    torch._dynamo.reset()
    try:
        loss, grads = loss_and_grads(model, data, call=torch.compile(model, backend=explain))
        out = explain.output()
    finally:
        torch._dynamo.reset()
    assert out.graph_break_count == 0 and out.graph_count == 1, [b.reason for b in out.break_reasons]
    assert abs(loss.item() - eager_loss.item()) <= TOL * abs(eager_loss.item())
    assert max(max_rel_err(grads[n], eager_grads[n]) for n in grads) <= TOL


# ----------------------------------------------------------------------------------------------------------------
# an intermediate module alone (DeBERTa-v2: the layer calls intermediate and output inline), through the model's
# rebuild scope
# ----------------------------------------------------------------------------------------------------------------
def _deberta(p: float = 0.1):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    cfg = DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          max_position_embeddings=64, num_labels=3)
    model = get_peft_model(DebertaV2ForSequenceClassification(cfg), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=p, target_modules=["query_proj", "key_proj", "value_proj", "dense"]))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            for b in m.lora_B.values():
                nn.init.normal_(b.weight, std=0.2)
    model.train()
    data = {"input_ids": torch.randint(2, 100, (2, 9), generator=torch.Generator().manual_seed(1)),
            "labels": torch.tensor([0, 2])}
    return model, data


def _matches_and_saves(model, ref, before, data) -> list[int]:
    """``model`` trains as ``ref`` (dropout 0.1 through shared seeds); returns the bytes ``before`` and ``model``
    keep for backward."""
    use_shared_seed_dropout(ref, model, 0.1)
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= TOL
    totals = []
    for m in (before, model):
        torch.manual_seed(0)
        totals.append(saved_activation_bytes(lambda m=m: m(**data).loss, _params(m))[1].total)
    return totals


def test_deberta_intermediate_through_the_rebuild_scope():
    model, data = _deberta()
    ref = clone(model)
    peftfast.patch(model, recompute="norms")  # "up" also reruns intermediate.dense (tested below)
    off = clone(ref)
    peftfast.patch(off, fuse_mlp=False)
    rep = peftfast.report(model)
    entries = _mlp_entries(model)
    assert [e.name.rsplit(".", 2)[-2:] for e in entries] == [["0", "intermediate"], ["1", "intermediate"]]
    assert all(e.patched for e in entries), rep.format()
    # q/k/v share one grouped op; DeBERTa's disentangled attention is its own: reported, not claimed
    assert {e.group for e in rep.entries if e.name.endswith("_proj")} == {
        f"base_model.model.deberta.encoder.layer.{i}.attention.self.{{key_proj,query_proj,value_proj}}"
        for i in range(2)}
    (att,) = [e for e in rep.modules if e.kind == "attention"]
    assert not att.patched and "computes its own attention" in att.reason
    totals = _matches_and_saves(model, ref, off, data)
    assert totals[0] - totals[1] == 2 * 18 * 64 * 4, totals  # output.dense's copy of h, per layer and token


def test_intermediate_without_a_scope_is_reported():
    model, _ = _deberta(0.0)
    peftfast.patch(model, recompute="none")
    entries = _mlp_entries(model)
    assert entries and all(not e.patched and "no rebuild scope" in e.reason for e in entries), entries


# ----------------------------------------------------------------------------------------------------------------
# recompute="up" (and the settings after it): the pre-activation is not kept either; backward runs the up projection
# again, once
# ----------------------------------------------------------------------------------------------------------------
def _up_fused_calls(model) -> list[int]:
    rt = peftfast.report(model).runtime(model)
    return [r["fused"] for n, r in rt.items() if n.endswith((".c_fc", "intermediate.dense"))]


@pytest.mark.parametrize("p,setting", [(0.0, "mlp"), (0.1, "mlp"), (0.1, "up")])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_recompute_up_keeps_x_and_reruns_up_once(arch, p, setting):
    model = peft_model(arch, lora_dropout=p)
    ref = clone(model)
    norms = clone(model)
    peftfast.patch(model, recompute=setting)
    peftfast.patch(norms, recompute="norms")
    assert all(e.patched for e in _mlp_entries(model)) and all(st.rerun for st in (
        m.__dict__["_peftfast_dense"] for m in model.modules() if "_peftfast_dense" in m.__dict__))
    data = batch(arch)
    loss, grads = _trains_as(model, ref, data, p)
    # the up projection ran twice in the step: its forward and one rerun in backward (shared by the down
    # projection's rebuild of h and the activation's backward)
    assert _up_fused_calls(model) == [2, 2]
    # the same RNG stream as recompute="norms" (the reruns fork it): the same losses and gradients, bit for bit
    n_loss, n_grads = loss_and_grads(norms, data)
    assert torch.equal(loss, n_loss) and all(torch.equal(grads[n], n_grads[n]) for n in n_grads)
    # what is no longer kept: y = up(x), I per token and layer (x is the norm's output, rebuilt), and up's rank-r
    # dropout(x)·Aᵀ (the forward ran it without grad)
    got, before = [], []
    for m, out in ((model, got), (norms, before)):
        torch.manual_seed(0)
        out.append(saved_activation_bytes(lambda m=m: m(**data).loss, _params(m))[1])
    tokens, inter = data["input_ids"].numel(), 2 * 32 if arch == "bert" else 4 * 32
    key = f"({data['input_ids'].shape[0]}, {data['input_ids'].shape[1]}, {inter}):float32"
    assert before[0].by_shape[key] - got[0].by_shape.get(key, 0) == 2 * tokens * inter * 4
    assert before[0].total - got[0].total >= 2 * tokens * (inter + 8) * 4


def test_recompute_mlp_steps_aside_for_zero3_partitioned_up_projections(monkeypatch):
    """Up projections whose parameters DeepSpeed ZeRO-3 partitions (marked by ``ds_id``) are not run again in
    backward: the MLP keeps its pre-activation as with the default recompute."""
    from peftfast.modules import _bind

    # ZeRO-3 checks run only once DeepSpeed is imported (nothing else sets ds_id): as if it were, whatever ran before
    monkeypatch.setattr(_bind, "deepspeed_imported", lambda: True)
    model = peft_model("gpt2")
    peftfast.patch(model, recompute="mlp")
    for p in model.base_model.model.transformer.h[0].mlp.c_fc.parameters():
        p.ds_id = 1  # as deepspeed.initialize marks the parameters it partitions
    data = batch("gpt2")
    model(**data).loss.backward()
    from peftfast.modules._bind import ZERO3_REASON

    # layer 0's c_fc ran once, on PEFT's path (ZeRO-3 parameters), and was not rerun; layer 1's twice, fused
    assert _up_fused_calls(model) == [0, 2]
    rt = peftfast.report(model).runtime(model)
    assert rt["base_model.model.transformer.h.0.mlp.c_fc"]["fallbacks"] == {ZERO3_REASON: 1}


def test_recompute_mlp_steps_aside_under_checkpointing_and_for_deberta_intermediate():
    """Under gradient checkpointing the rerun steps aside (checkpointing keeps only block inputs); DeBERTa's lone
    ``intermediate`` module reruns its dense projection and registers h with the rebuild scope."""
    model = peft_model("gpt2")
    ref = clone(model)
    for m in (model, ref):
        m.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    peftfast.patch(model, recompute="mlp")
    data = batch("gpt2")
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= TOL
    assert _up_fused_calls(model) == [2, 2]  # checkpointing's own rerun, not ours (which would make it 3)

    model, data = _deberta()
    ref = clone(model)
    norms = clone(model)
    peftfast.patch(model, recompute="mlp")
    peftfast.patch(norms, recompute="norms")
    totals = _matches_and_saves(model, ref, norms, data)
    assert totals[0] - totals[1] >= 2 * 18 * 64 * 4, totals  # intermediate.dense's output y, per layer and token


def test_probe_runs_the_class_code_in_training_mode_too():
    """GPT-2's MLP with a dropout of its own code on the activation output (training only), patched in eval mode:
    the probe's training-mode run refuses it, so it keeps its forward with that reason and trains as unpatched."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    class DroppedActivation(GPT2MLP):
        def forward(self, hidden_states):
            h = F.dropout(self.act(self.c_fc(hidden_states)), p=0.25, training=self.training)
            return self.dropout(self.c_proj(h))

    model = peft_model("gpt2")
    for block in model.base_model.model.transformer.h:
        block.mlp.__class__ = DroppedActivation
    ref = clone(model)
    model.eval()
    peftfast.patch(model)
    entries = [e for e in peftfast.report(model).modules if e.kind == "mlp"]
    assert entries and all(not e.patched and e.reason.startswith("in training mode, ") for e in entries), entries
    model.train()
    _trains_as(model, ref, batch("gpt2"), 0.0)
