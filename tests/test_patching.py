"""PEFT semantics through ``peftfast.patch`` / ``report`` / ``unpatch`` on a tiny random-weight Llama.

Every comparison is patched vs unpatched PEFT on the same model (``patch`` is in place and leaves the weights alone,
so a reference taken before patching, or after ``unpatch``, is PEFT's own result). The default CPU backend (torch)
runs everything except the launch-count test, which runs the Triton kernels in the interpreter on a 1-layer model.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peftfast
from peftfast.modules import lora as lora_mod
from peftfast.ops._counters import count_launches

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYER = "base_model.model.model.layers"
VOCAB = 97
ATOL = RTOL = 1e-5  # fp32: the fused path only reorders a few additions


# ----------------------------------------------------------------------------------------------------------------
# builders and helpers
# ----------------------------------------------------------------------------------------------------------------
def tiny_llama(layers: int = 2, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """LlamaForCausalLM with hidden 32, 4 heads / 2 kv heads (k/v are 16 wide), intermediate 64, vocab 97."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(dtype)


def randomize_lora_b(model: nn.Module) -> None:
    """PEFT initialises ``B`` to zero, which would make every LoRA term vanish; draw it non-zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0.0, 0.2)


def lora_llama(layers: int = 2, dtype: torch.dtype = torch.float32, targets: list[str] | None = None,
               **cfg) -> PeftModel:
    """The tiny Llama with a LoRA adapter ``default`` (r=4, alpha=8 unless overridden) on ``targets``."""
    kw = dict(r=4, lora_alpha=8, target_modules=targets or TARGETS)
    model = get_peft_model(tiny_llama(layers, dtype), LoraConfig(**{**kw, **cfg}))
    randomize_lora_b(model)
    return model


def add_adapter(model: PeftModel, name: str, **cfg) -> None:
    kw = dict(r=4, lora_alpha=16, target_modules=TARGETS)
    model.add_adapter(name, LoraConfig(**{**kw, **cfg}))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f"lora_B.{name}." in pname:
                p.normal_(0.0, 0.2)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every PEFT ``lora.Linear`` of ``model`` by qualified name."""
    cls = lora_mod._peft_lora_linear_cls()
    return {n: m for n, m in model.named_modules() if type(m) is cls}


def logits(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def differ(a: torch.Tensor, b: torch.Tensor, by: float = 1e-3) -> None:
    """Guards a comparison against a vacuous pass: the two settings must really give different outputs."""
    assert (a.float() - b.float()).abs().max().item() > by


def fused_calls(model: nn.Module) -> int:
    return sum(m._peftfast.fused_calls for m in lora_layers(model).values() if hasattr(m, "_peftfast"))


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7))


@pytest.fixture
def group_spy(monkeypatch) -> list[int]:
    """Records the member count of every grouped op call the patched layers make."""
    sizes: list[int] = []
    real = lora_mod.lora_linear_group

    def spy(x, ws, *args, **kwargs):
        sizes.append(len(ws))
        return real(x, ws, *args, **kwargs)

    monkeypatch.setattr(lora_mod, "lora_linear_group", spy)
    return sizes


# ----------------------------------------------------------------------------------------------------------------
# patch / unpatch leave the model alone
# ----------------------------------------------------------------------------------------------------------------
def test_patch_keeps_object_parameters_and_state_dict(ids):
    model = lora_llama()
    params = list(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = logits(model, ids)

    assert peftfast.patch(model) is model
    layers = lora_layers(model)
    assert len(layers) == 14 and all("forward" in m.__dict__ for m in layers.values())
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in params]
    assert all(p is q for (_, p), (_, q) in zip(after, params))
    new_state = model.state_dict()
    assert list(new_state) == list(state)
    assert all(torch.equal(new_state[k], v) for k, v in state.items())

    got = logits(model, ids)
    assert fused_calls(model) == 14
    close(got, ref)
    assert list(model.state_dict()) == list(state)  # running the fused path adds nothing either


def test_optimizer_created_before_patch_updates_same_params(ids):
    model = lora_llama()
    ref_model = copy.deepcopy(model)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (model, ref_model)]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    peftfast.patch(model)

    for m, opt in zip((model, ref_model), opts):
        opt.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert fused_calls(model) == 14 and fused_calls(ref_model) == 0
    ref_params = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        close(p, ref_params[n])
    # the step reached every LoRA weight through the optimizer made before patching
    assert all(not torch.equal(model.get_parameter(n), p0) for n, p0 in before.items())


def test_save_pretrained_writes_the_same_adapter(tmp_path, ids):
    model = lora_llama()
    model.save_pretrained(tmp_path / "before")
    peftfast.patch(model)
    logits(model, ids)
    model.save_pretrained(tmp_path / "after")

    a = load_file(tmp_path / "before" / "adapter_model.safetensors")
    b = load_file(tmp_path / "after" / "adapter_model.safetensors")
    assert len(a) == 28 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("before", "after")]
    assert cfg[0] == cfg[1]


def test_patch_twice_is_harmless(ids):
    model = lora_llama()
    ref = logits(model, ids)
    peftfast.patch(model)
    text = str(peftfast.report(model))
    out1 = logits(model, ids)
    peftfast.patch(model)
    assert str(peftfast.report(model)) == text
    assert len(peftfast.report(model).patched) == 14
    out2 = logits(model, ids)
    assert torch.equal(out1, out2)
    close(out2, ref)
    # the second patch must not wrap the first one's fused forward as "the previous forward"
    assert all(m._peftfast.previous_forward is None for m in lora_layers(model).values())
    peftfast.unpatch(model)
    assert all("forward" not in m.__dict__ for m in lora_layers(model).values())
    assert torch.equal(logits(model, ids), ref)


def test_unpatch_restores_the_exact_forward(ids):
    model = lora_llama()
    ref = logits(model, ids)
    peftfast.patch(model)
    logits(model, ids)
    assert peftfast.unpatch(model) is model
    for m in lora_layers(model).values():
        assert "forward" not in m.__dict__ and not hasattr(m, "_peftfast")
    assert torch.equal(logits(model, ids), ref)  # PEFT's own forward again, bit for bit
    assert peftfast.report(model).entries == []


def test_instance_forward_from_before_patch_is_restored(ids):
    model = lora_llama().eval()
    layer = lora_layers(model)[f"{LAYER}.0.self_attn.o_proj"]
    calls = []

    def wrapper(x, *args, **kwargs):
        calls.append(kwargs.get("adapter_names"))
        return type(layer).forward(layer, x, *args, **kwargs)

    layer.forward = wrapper
    ref = logits(model, ids)
    calls.clear()
    peftfast.patch(model)
    assert layer.forward is not wrapper
    close(logits(model, ids), ref)
    assert calls == [] and layer._peftfast.fused_calls == 1
    # a call the fused path cannot serve goes to the forward that was there before
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        layer(x, adapter_names=["default", "__base__"])
    assert calls == [["default", "__base__"]]
    peftfast.unpatch(model)
    assert layer.__dict__["forward"] is wrapper
    assert torch.equal(logits(model, ids), ref)


def test_deepcopy_of_a_patched_model_runs_on_its_own_weights(ids):
    model = lora_llama()
    ref = logits(model, ids)
    with model.disable_adapter():
        base = logits(model, ids)
    peftfast.patch(model)
    clone = copy.deepcopy(model)
    close(logits(clone, ids), ref)
    with torch.no_grad():
        for n, p in clone.named_parameters():
            if "lora_B" in n:
                p.zero_()
    close(logits(clone, ids), base)  # the clone's fused forwards read the clone's LoRA weights ...
    close(logits(model, ids), ref)  # ... and the original's still read its own
    assert fused_calls(clone) == 28 and fused_calls(model) == 14
    for layer in lora_layers(clone).values():
        grp = layer._peftfast.group
        assert grp is None or grp.members[layer._peftfast.index] is layer


def test_pickled_patched_model_loads_and_runs(ids):
    """``torch.save(model)`` / ``torch.load`` (and multiprocessing) pickle the model with its bound forwards."""
    model = lora_llama(layers=1)
    peftfast.patch(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    ref = logits(model, ids)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    close(logits(loaded, ids), ref)
    assert fused_calls(loaded) == 7


def test_inference_mode(ids):
    """Inference loops often run under ``torch.inference_mode``, whose tensors have no version counter."""
    model = lora_llama()
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
    peftfast.patch(model)
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    close(got, ref)
    assert fused_calls(model) == 14


def test_patch_without_lora_layers_warns_and_changes_nothing(ids):
    model = tiny_llama()
    ref = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="no PEFT LoRA layers, PEFT prompt learning or peftfast adapters"):
        assert peftfast.patch(model) is model
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(logits(model, ids), ref)
    assert peftfast.report(model).entries == []


def test_unknown_backend_raises_before_touching_the_model():
    model = lora_llama()
    with pytest.raises(ValueError, match="unknown backend 'cuda-fast'"):
        peftfast.patch(model, backend="cuda-fast")
    assert all("forward" not in m.__dict__ for m in lora_layers(model).values())


# ----------------------------------------------------------------------------------------------------------------
# report: what was patched, what was skipped and why, runtime fallbacks
# ----------------------------------------------------------------------------------------------------------------
def test_report_lists_layers_and_skips_with_reasons(ids):
    # embed_tokens gets a lora.Embedding; an inactive aLoRA adapter (a LoRA variant not fused) on down_proj makes
    # those layers ineligible; layer 0's o_proj has a trainable base weight
    model = lora_llama(targets=[*TARGETS, "embed_tokens"])
    add_adapter(model, "alora", alora_invocation_tokens=[1, 2], target_modules=["down_proj"],
                task_type="CAUSAL_LM")
    lora_layers(model)[f"{LAYER}.0.self_attn.o_proj"].base_layer.weight.requires_grad_(True)
    ref = logits(model, ids)
    peftfast.patch(model)
    rep = peftfast.report(model)

    peft_names = [n for n, m in model.named_modules() if n.endswith(tuple([*TARGETS, "embed_tokens"]))
                  and hasattr(m, "lora_A")]
    assert [e.name for e in rep.entries] == peft_names and len(peft_names) == 15
    skipped = {e.name: e.reason for e in rep.skipped}
    assert set(skipped) == {"base_model.model.model.embed_tokens", f"{LAYER}.0.self_attn.o_proj",
                            f"{LAYER}.0.mlp.down_proj", f"{LAYER}.1.mlp.down_proj"}
    assert "Embedding" in skipped["base_model.model.model.embed_tokens"]
    assert "trainable" in skipped[f"{LAYER}.0.self_attn.o_proj"]
    assert "ALoraLinearVariant" in skipped[f"{LAYER}.0.mlp.down_proj"]
    for text in (str(rep), rep.format(model)):
        lines = [ln for ln in text.splitlines() if ln.strip().startswith("skipped")]
        assert len(lines) == 4
        for name, reason in skipped.items():
            assert sum(name + ":" in ln and reason in ln for ln in lines) == 1
    assert len(rep.patched) == 11
    # skipped layers still run PEFT's forward; nothing fell back at run time
    close(logits(model, ids), ref)
    assert "fallback" not in rep.format(model)
    assert all(r["fallbacks"] == {} for r in rep.runtime(model).values())


def test_linear_subclasses_run_fused_only_where_their_forward_is_linear(ids):
    """An nn.Linear subclass that only changes initialisation, or Falcon's FalconLinear (bias added after the
    product), runs fused; one with another forward is skipped with the reason, and keeps its own forward."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    class InitOnly(nn.Linear):
        pass

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = lora_llama(layers=1)
    layers = lora_layers(model)
    swaps = {"q_proj": FalconLinear, "k_proj": InitOnly, "v_proj": Scaled}
    for name, cls in swaps.items():
        layer = layers[f"{LAYER}.0.self_attn.{name}"]
        old = layer.base_layer
        new = cls(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.normal_(0.0, 0.1)
        new.requires_grad_(False)
        layer.base_layer = new
    ref = logits(model, ids)
    peftfast.patch(model)
    rep = peftfast.report(model)
    skipped = {e.name: e.reason for e in rep.skipped}
    assert set(skipped) == {f"{LAYER}.0.self_attn.v_proj"}
    assert "base layer Scaled is not nn.Linear" in skipped[f"{LAYER}.0.self_attn.v_proj"]
    close(logits(model, ids), ref)
    runtime = rep.runtime(model)
    for name in ("q_proj", "k_proj"):
        assert runtime[f"{LAYER}.0.self_attn.{name}"]["fused"] > 0


def test_dora_model_runs_fused_layer_by_layer(ids):
    """DoRA layers run on the fused DoRA path: no sibling group; the MLP, all three projections DoRA without
    dropout, on the DoRA MLP op; attention, RoPE, norms, blocks fused. An MLP mixing DoRA and plain LoRA projections
    stays unfused with the reason."""
    model = lora_llama(layers=1, use_dora=True)
    ref = logits(model, ids)
    peftfast.patch(model)
    rep = peftfast.report(model)
    assert len(rep.patched) == 7 and not rep.skipped and not any(e.group for e in rep.entries)
    assert {e.kind for e in rep.modules if e.patched} == {"attention", "rope", "norm", "block", "mlp"}
    close(logits(model, ids), ref)
    assert fused_calls(model) == 7
    assert rep.module_runtime(model)[f"{LAYER}.0.mlp"] == {"fused": 1, "fallbacks": {}, "deferred": {}}
    mixed = lora_llama(layers=1, use_dora=True, targets=["q_proj", "v_proj", "gate_proj", "up_proj"])
    mixed.add_adapter("plain", LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]))
    peftfast.patch(mixed)
    (mlp,) = [e for e in peftfast.report(mixed).modules if e.kind == "mlp"]
    assert not mlp.patched and "DoRA" in mlp.reason, mlp


def test_layer_that_became_ineligible_is_unpatched_by_a_second_patch(ids):
    model = lora_llama()
    ref = logits(model, ids)
    peftfast.patch(model)
    layer = lora_layers(model)[f"{LAYER}.1.mlp.up_proj"]
    layer.base_layer.weight.requires_grad_(True)
    peftfast.patch(model)
    assert "forward" not in layer.__dict__ and not hasattr(layer, "_peftfast")
    rep = peftfast.report(model)
    assert [e.name for e in rep.skipped] == [f"{LAYER}.1.mlp.up_proj"]
    close(logits(model, ids), ref)
    # gate_proj lost its sibling: it runs alone now
    assert lora_layers(model)[f"{LAYER}.1.mlp.gate_proj"]._peftfast.group is None


@pytest.mark.parametrize("which", ["self_attn.o_proj", "self_attn.k_proj"])
def test_base_weight_unfrozen_after_patch_falls_back(ids, which):
    """A call the fused path cannot serve exactly must run PEFT's forward (and be counted), not raise."""
    model = lora_llama(layers=1)
    ref = logits(model, ids)
    peftfast.patch(model)
    layer = lora_layers(model)[f"{LAYER}.0.{which}"]
    layer.base_layer.weight.requires_grad_(True)
    out = model(input_ids=ids).logits
    close(out.detach(), ref)
    out.sum().backward()
    assert layer.base_layer.weight.grad is not None
    (reason, count), = layer._peftfast.fallbacks.items()
    assert count == 1 and "trainable" in reason
    # the other layers (k_proj's siblings q/v included) still run fused
    assert fused_calls(model) == 6


def test_mixed_adapter_batch_falls_back_with_reason(ids):
    model = lora_llama().eval()
    add_adapter(model, "b")
    names = ["b", "__base__"]
    ref_mixed = logits(model, ids, adapter_names=names)
    ref = logits(model, ids)
    differ(ref_mixed, ref)
    peftfast.patch(model)
    close(logits(model, ids, adapter_names=names), ref_mixed)
    rep = peftfast.report(model)
    runtime = rep.runtime(model)
    assert len(runtime) == 14
    assert all(r["fallbacks"] == {"mixed-adapter batch (adapter_names=...)": 1} and r["fused"] == 0
               for r in runtime.values())
    lines = [ln for ln in rep.format(model).splitlines() if ln.strip().startswith("fallback")]
    assert len(lines) == 14 and all("1 call(s): mixed-adapter batch" in ln for ln in lines)
    assert "fallback" not in str(rep)  # without the model, the report has only what patch decided
    # the same on a single layer called directly
    layer = lora_layers(model)[f"{LAYER}.0.self_attn.q_proj"]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        got = layer(x, adapter_names=names)
        peftfast.unpatch(model)
        want = layer(x, adapter_names=names)
    close(got, want)


def test_two_active_adapters_fall_back_with_reason(ids):
    model = lora_llama()
    add_adapter(model, "b")
    ref_one = logits(model, ids)
    model.base_model.set_adapter(["default", "b"])
    ref_two = logits(model, ids)
    model.base_model.set_adapter("default")
    differ(ref_one, ref_two)

    peftfast.patch(model)
    close(logits(model, ids), ref_one)
    assert fused_calls(model) == 14
    model.base_model.set_adapter(["default", "b"])
    close(logits(model, ids), ref_two)
    runtime = peftfast.report(model).runtime(model)
    assert all(r["fallbacks"] == {"2 active adapters (the fused path serves one)": 1} for r in runtime.values())
    model.base_model.set_adapter("b")  # a single active adapter again: fused, with b's weights and scale
    model.base_model.set_adapter("default")
    close(logits(model, ids), ref_one)
    assert fused_calls(model) == 28


def test_switching_to_another_single_adapter_stays_fused(ids):
    model = lora_llama()
    add_adapter(model, "b", r=8, lora_alpha=4)
    model.base_model.set_adapter("b")
    ref_b = logits(model, ids)
    model.base_model.set_adapter("default")
    peftfast.patch(model)
    model.base_model.set_adapter("b")
    close(logits(model, ids), ref_b)
    assert fused_calls(model) == 14
    assert all(r["fallbacks"] == {} for r in peftfast.report(model).runtime(model).values())


def test_dora_adapter_activated_after_patch_runs_fused(ids):
    """A DoRA adapter added and activated after ``patch`` runs on the fused DoRA path of the layer patched for
    plain LoRA (the plan is made per call), with PEFT's outputs; under autocast it falls back, with the reason."""
    model = lora_llama(layers=1)
    peftfast.patch(model)
    add_adapter(model, "dora", use_dora=True, target_modules=["o_proj"])
    model.base_model.set_adapter("dora")
    got = logits(model, ids)
    o_proj = f"{LAYER}.0.self_attn.o_proj"
    assert peftfast.report(model).runtime(model)[o_proj]["fused"] == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits(model, ids)
    assert peftfast.report(model).runtime(model)[o_proj]["fallbacks"] == {"DoRA under autocast": 1}
    peftfast.unpatch(model)
    close(got, logits(model, ids))


# ----------------------------------------------------------------------------------------------------------------
# PEFT semantics kept by the fused path
# ----------------------------------------------------------------------------------------------------------------
def test_disable_adapter_gives_base_outputs(ids):
    model = lora_llama()
    ref = logits(model, ids)
    with model.disable_adapter():
        ref_base = logits(model, ids)
    differ(ref, ref_base)
    peftfast.patch(model)
    with model.disable_adapter():
        close(logits(model, ids), ref_base)
    rt = peftfast.report(model).runtime(model)
    assert all(r["base_only"] == 1 and r["fused"] == 0 for r in rt.values())
    close(logits(model, ids), ref)
    assert fused_calls(model) == 14


def test_merged_adapter_then_unmerged(ids):
    model = lora_llama()
    ref = logits(model, ids)
    model.merge_adapter()
    ref_merged = logits(model, ids)
    model.unmerge_adapter()
    peftfast.patch(model)
    model.merge_adapter()
    got = logits(model, ids)
    close(got, ref_merged)
    close(got, ref, atol=1e-4, rtol=1e-4)  # merging is the same function up to rounding
    assert fused_calls(model) == 0  # a merged layer runs its base layer only, never adding LoRA twice
    assert all(r["base_only"] == 1 for r in peftfast.report(model).runtime(model).values())
    model.unmerge_adapter()
    close(logits(model, ids), ref, atol=1e-4, rtol=1e-4)
    assert fused_calls(model) == 14


def test_rslora_scaling(ids):
    model = lora_llama(r=4, lora_alpha=8, use_rslora=True)
    layer = lora_layers(model)[f"{LAYER}.0.mlp.up_proj"]
    assert layer.scaling["default"] == pytest.approx(8 / 2)
    ref = model(input_ids=ids, labels=ids)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    peftfast.patch(model)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    close(out.logits, ref.logits)
    assert len(ref_grads) == 28
    for n, g in ref_grads.items():
        close(model.get_parameter(n).grad, g)
    assert fused_calls(model) == 14


def _scaled_vs_reference(model: PeftModel, ids: torch.Tensor, change: Callable[[PeftModel], None]):
    """(patched, unpatched) logits after ``change`` is applied to the patched model at run time."""
    unchanged = logits(model, ids)
    peftfast.patch(model)
    logits(model, ids)
    change(model)
    got = logits(model, ids)
    assert fused_calls(model) == 28
    peftfast.unpatch(model)
    want = logits(model, ids)
    differ(want, unchanged)
    return got, want


def test_set_scale_on_patched_layers(ids):
    def change(m):
        for name, layer in lora_layers(m).items():
            layer.set_scale("default", 0.25 if "self_attn" in name else 3.0)

    close(*_scaled_vs_reference(lora_llama(), ids, change))


def test_scale_layer_and_unscale_on_patched_layers(ids):
    def change(m):
        layers = lora_layers(m)
        layers[f"{LAYER}.0.self_attn.k_proj"].scale_layer(4.0)  # one member of a sibling group only
        layers[f"{LAYER}.1.mlp.down_proj"].scale_layer(-2.0)
        layers[f"{LAYER}.1.mlp.gate_proj"].scale_layer(0.5)
        layers[f"{LAYER}.1.mlp.gate_proj"].unscale_layer(None)

    close(*_scaled_vs_reference(lora_llama(), ids, change))


def test_bf16_base_keeps_fp32_lora_weights(ids):
    model = lora_llama(dtype=torch.bfloat16)
    layer = lora_layers(model)[f"{LAYER}.0.self_attn.q_proj"]
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype default
    exact, exact_grads = _loss_and_grads(copy.deepcopy(model).double(), ids, autocast=False)
    ref, ref_grads = _loss_and_grads(model, ids, autocast=False)
    peftfast.patch(model)
    got, got_grads = _loss_and_grads(model, ids, autocast=False)
    assert got.dtype == ref.dtype == torch.bfloat16
    assert fused_calls(model) == 14
    err_ref = (ref.double() - exact).abs().max().item()
    err_got = (got.double() - exact).abs().max().item()
    assert err_got <= 2 * err_ref + 1e-3, (err_got, err_ref)
    close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert len(got_grads) == 28 and all(g.dtype == torch.float32 for g in got_grads.values())
    assert grads_error(got_grads, exact_grads) <= 2 * grads_error(ref_grads, exact_grads) + 1e-3


def _loss_and_grads(model: nn.Module, ids: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cpu_autocast_bf16_on_fp32_model(ids):
    model = lora_llama()
    exact, exact_grads = _loss_and_grads(copy.deepcopy(model).double(), ids, autocast=False)
    ref, ref_grads = _loss_and_grads(model, ids, autocast=True)
    peftfast.patch(model)
    got, got_grads = _loss_and_grads(model, ids, autocast=True)
    assert fused_calls(model) == 14
    assert got.dtype == ref.dtype
    # error vs fp64 at most twice what PEFT's own autocast run makes (plus a small atol)
    err_ref = (ref.double() - exact).abs().max().item()
    err_got = (got.double() - exact).abs().max().item()
    assert err_got <= 2 * err_ref + 1e-3, (err_got, err_ref)
    close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert got_grads.keys() == ref_grads.keys() == exact_grads.keys() and len(got_grads) == 28
    assert all(g.dtype == torch.float32 for g in got_grads.values())  # LoRA weights and gradients stay fp32
    # rounding differences chain through the whole backward, so the rule is applied to the relative error of all
    # LoRA gradients together (per layer it is applied in test_cpu_autocast_bf16_single_layer)
    assert grads_error(got_grads, exact_grads) <= 2 * grads_error(ref_grads, exact_grads) + 1e-3


def grads_error(grads: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    """Root of the summed squared relative errors of every gradient."""
    return sum(((grads[n].double() - g).norm() ** 2 / g.norm() ** 2).item() for n, g in exact.items()) ** 0.5


@pytest.mark.parametrize("which", ["self_attn.q_proj", "self_attn.o_proj"])
def test_cpu_autocast_bf16_single_layer(which):
    model = lora_llama(layers=1)
    layer = lora_layers(model)[f"{LAYER}.0.{which}"]
    x = torch.randn(3, 5, 32)
    dy = torch.randn(3, 5, layer.out_features)

    def run(mod: nn.Module, x: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
        mod.zero_grad()
        x = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = mod(x)
        y.backward(dy.to(y.dtype))
        return [t.detach().double() for t in
                (y, x.grad, mod.lora_A["default"].weight.grad, mod.lora_B["default"].weight.grad)]

    exact = run(copy.deepcopy(layer).double(), x.double(), autocast=False)
    ref = run(layer, x, autocast=True)
    peftfast.patch(model)
    got = run(layer, x, autocast=True)
    assert layer._peftfast.fused_calls == 1
    for g, r, e in zip(got, ref, exact):
        err_ref, err_got = (r - e).abs().max().item(), (g - e).abs().max().item()
        assert err_got <= 2 * err_ref + 1e-3 * e.abs().max().item(), (err_got, err_ref)


def test_dropout_off_in_eval_and_active_in_train(ids):
    model = lora_llama(lora_dropout=0.5).eval()
    ref = logits(model, ids)
    peftfast.patch(model)
    a, b = logits(model, ids), logits(model, ids)
    assert torch.equal(a, b)
    close(a, ref)

    model.train()
    torch.manual_seed(1)
    t1 = logits(model, ids)
    torch.manual_seed(2)
    t2 = logits(model, ids)
    torch.manual_seed(1)
    t1_again = logits(model, ids)
    differ(t1, t2)
    differ(t1, ref)
    assert torch.equal(t1, t1_again)  # the masks come from torch's RNG: manual_seed reproduces them
    assert fused_calls(model) == 14 * 5
    assert all(r["fallbacks"] == {} for r in peftfast.report(model).runtime(model).values())


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["self_attn.q_proj", "self_attn.o_proj"])
def test_wrong_hidden_size_names_the_module(which):
    model = lora_llama(layers=1)
    peftfast.patch(model)
    layer = lora_layers(model)[f"{LAYER}.0.{which}"]
    with pytest.raises(ValueError, match=f"layers.0.{which}") as info:
        layer(torch.randn(2, 3, 31))
    assert "31" in str(info.value)


def test_dtype_mismatch_names_the_module():
    model = lora_llama(layers=1)
    peftfast.patch(model)
    layer = lora_layers(model)[f"{LAYER}.0.self_attn.k_proj"]
    with pytest.raises(TypeError, match=r"layers\.0\.self_attn\.k_proj.*float16"):
        layer(torch.randn(2, 3, 32, dtype=torch.float16))


# ----------------------------------------------------------------------------------------------------------------
# sibling grouping
# ----------------------------------------------------------------------------------------------------------------
def test_sibling_groups_in_report_and_one_grouped_call_per_group(ids, group_spy):
    model = lora_llama()
    ref = model(input_ids=ids, labels=ids)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    peftfast.patch(model, fuse_mlp=False)  # the LoRA-MLP op has its own test (tests/test_mlp.py)
    groups = {e.name: e.group for e in peftfast.report(model).entries}
    for i in range(2):
        p = f"{LAYER}.{i}"
        attn = {groups[f"{p}.self_attn.{n}"] for n in ("q_proj", "k_proj", "v_proj")}
        mlp = {groups[f"{p}.mlp.{n}"] for n in ("gate_proj", "up_proj")}
        assert len(attn) == len(mlp) == 1 and None not in attn | mlp and attn != mlp
        assert groups[f"{p}.self_attn.o_proj"] is None and groups[f"{p}.mlp.down_proj"] is None
    assert "(4 sibling group(s))" in str(peftfast.report(model))

    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert sorted(group_spy) == sorted([3, 1, 2, 1] * 2)  # q/k/v, o, gate/up, down per decoder layer
    assert all(m._peftfast.fused_calls == 1 for m in lora_layers(model).values())
    close(out.logits, ref.logits)
    grouped_grads = {n: model.get_parameter(n).grad.clone() for n in ref_grads}
    for n, g in ref_grads.items():
        close(grouped_grads[n], g)

    # ungrouped: one call per layer, same outputs and gradients
    model.zero_grad()
    group_spy.clear()
    peftfast.patch(model, group_siblings=False)
    out2 = model(input_ids=ids, labels=ids)
    out2.loss.backward()
    assert group_spy == [1] * 14
    close(out2.logits, out.logits, atol=1e-6, rtol=1e-6)
    for n, g in grouped_grads.items():
        close(model.get_parameter(n).grad, g, atol=1e-6, rtol=1e-6)


def test_triton_launches_per_forward_and_backward(ids):
    # 1 decoder layer; fused dense strategy: a call with n members launches 1 down + n GEMMs forward, and
    # backward n downs (dy Bᵀ), 1 dx GEMM when x needs a gradient, 1 dA and n dB kernels
    model = lora_llama(layers=1)
    ref = model(input_ids=ids, labels=ids)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # block ops have their own launch tests (test_mlp, test_rope, test_attention)
    peftfast.patch(model, backend="triton", fuse_mlp=False, fuse_rope=False, fuse_attention=False, fuse_norms=False)
    with count_launches() as fwd:
        out = model(input_ids=ids, labels=ids)
    # q/k/v: 1+3, o: 1+1, gate/up: 1+2, down: 1+1
    assert fwd == Counter({"_lora_down_kernel": 4, "_lora_gemm_kernel": 7})
    with count_launches() as bwd:
        out.loss.backward()
    # q/k/v read the normed embedding, which needs no gradient: no dx GEMM there
    # q/k/v: 3 down + 1 dA + 3 dB; o: 1+1+1+1; gate/up: 2+1+1+2; down: 1+1+1+1
    assert bwd == Counter({"_lora_down_kernel": 7, "_lora_gemm_kernel": 3, "_lora_da_kernel": 11})
    close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    for n, g in ref_grads.items():
        close(model.get_parameter(n).grad, g, atol=1e-4, rtol=1e-4)

    peftfast.patch(model, backend="triton", group_siblings=False, fuse_rope=False, fuse_attention=False,
                   fuse_norms=False)
    with count_launches() as ungrouped, torch.no_grad():
        out2 = model(input_ids=ids).logits
    assert ungrouped == Counter({"_lora_down_kernel": 7, "_lora_gemm_kernel": 7})
    close(out2, out.logits.detach(), atol=1e-5, rtol=1e-5)


def test_no_warning_on_a_lora_model():
    model = lora_llama(layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        peftfast.patch(model)


# ----------------------------------------------------------------------------------------------------------------
# sibling groups whose members read different inputs
# ----------------------------------------------------------------------------------------------------------------
class _TwoInputAttention(nn.Module):
    """q reads x, k and v read another tensor (a cross-attention under a name ``patch`` does not know)."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(16, 16) for _ in range(3))

    def forward(self, x, memory):
        return self.q_proj(x) * (self.k_proj(memory) + self.v_proj(memory)).mean(1, keepdim=True)


class _TwoInputHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _TwoInputAttention()

    def forward(self, x, memory):
        return self.attn(x, memory)


def test_group_whose_siblings_read_other_inputs_splits_at_the_first_miss(monkeypatch):
    """The first call computes q, k and v from x, then k comes with another input: that grouped call's k/v went
    unused, so the group splits for good and its members run one by one (the same outputs and gradients as PEFT
    throughout). Cross-attention modules known by name (BART's encoder_attn) form no group at all."""
    torch.manual_seed(0)
    ref = get_peft_model(_TwoInputHolder(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj",
                                                                                           "v_proj"]))
    for m in ref.modules():
        if hasattr(m, "lora_B"):
            nn.init.normal_(m.lora_B["default"].weight, std=0.2)
    model = peftfast.patch(copy.deepcopy(ref))
    grp = model.base_model.model.attn.q_proj._peftfast.group
    assert grp is not None and not grp.split
    widths: list[int] = []
    real_run = lora_mod._run
    monkeypatch.setattr(lora_mod, "_run", lambda members, *a: widths.append(len(members)) or real_run(members, *a))
    for step in range(2):
        x, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
        outs = []
        for m in (model, ref):
            m.zero_grad()
            y = m(x, mem)
            y.square().sum().backward()
            outs.append((y.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
        torch.testing.assert_close(outs[0][0], outs[1][0])
        for n, g in outs[1][1].items():
            torch.testing.assert_close(outs[0][1][n], g, msg=n)
        assert grp.split
    # step 0: x for all three, then memory for all three (v takes its output); step 1: one by one
    assert widths == [3, 3, 1, 1, 1]

    import _models as M

    bart = peftfast.patch(M.peft_model("bart", r=4, lora_alpha=8))
    for name, mod in bart.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj")):
            assert (mod._peftfast.group is None) == (".encoder_attn." in name), name
