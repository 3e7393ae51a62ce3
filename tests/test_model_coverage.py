"""Model coverage: every family users fine-tune, tiny random config, PEFT LoRA on all linear layers.

Per family: patched vs unpatched give the same loss and every trainable gradient (fp32; dropout 0 and 0.1 with the
reference replaying the fused path's masks), and the patch report lists exactly what was fused and why the rest
was not. A transformers release that renames a module or changes a formula fails here, not silently.
"""

import pytest
import torch
from _models import batch, clone, loss_and_grads, max_rel_err, peft_model, use_shared_seed_dropout

import peftfast

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "glm4", "gpt2", "bert",
            "roberta", "t5", "bart", "gpt_neox", "phi", "falcon", "modernbert"]
# block modules fused per family besides the attention implementation: gated and two-layer MLPs, RoPE, norms (on
# CPU LayerNorms run ATen's op, their outputs registered to be rebuilt where saved), residual-add blocks
EXPECTED_BLOCKS = {
    "llama": ("mlp", "rope", "norm", "block"), "mistral": ("mlp", "rope", "norm", "block"),
    "qwen2": ("mlp", "rope", "norm", "block"), "qwen3": ("mlp", "rope", "norm", "block"),
    "gemma": ("mlp", "rope", "norm", "block"), "gemma2": ("mlp", "rope", "norm", "block"),
    "gemma3": ("mlp", "rope", "norm", "block"), "phi3": ("mlp", "rope", "norm", "block"),
    "glm4": ("mlp", "rope", "norm", "block"), "gpt2": ("mlp", "norm"),
    "bert": ("mlp", "norm"), "roberta": ("mlp", "norm"),
    # encoder-decoders: T5 v1.0's ReLU MLP keeps nothing extra (not fused), BART's inline MLPs are
    "t5": ("norm",), "bart": ("mlp", "norm"),
    # parallel residual (attention and MLP off the same input): the blocks' adds stay unfused
    "gpt_neox": ("mlp", "rope", "norm"), "phi": ("mlp", "rope", "norm"),  # RoPE behind a packed query_key_value
    "falcon": ("mlp", "rope", "norm"),  # FalconLinear bases (bias added after the product) on the nn.Linear path
    "modernbert": ("mlp", "rope", "norm"),  # its packed GLU MLP (Wi/act/drop/Wo) on the packed LoRA-MLP op; Wqkv
}


def _falcon_calls_interface() -> bool:
    """transformers 5.17's Falcon computes its own attention; later releases call the attention interface."""
    from transformers.models.falcon.modeling_falcon import FalconAttention

    from peftfast.modules.attention import _class_calls_interface

    return _class_calls_interface(FalconAttention)


# families whose attention the peftfast implementation does not serve (T5 is served since its position bias is)
OWN_ATTENTION: set[str] = set() if _falcon_calls_interface() else {"falcon"}
ENCODER_DECODERS = {"t5", "bart"}
CAUSAL_LMS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "glm4"]
TOL = 2e-5


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("arch", FAMILIES)
def test_loss_and_gradients_match_unpatched(arch, p):
    model = peft_model(arch, lora_dropout=p)
    ref = clone(model)
    peftfast.patch(model)
    if p:
        use_shared_seed_dropout(ref, model, p)
    data = batch(arch)
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys() and grads
    errs = {n: max_rel_err(grads[n], ref_grads[n]) for n in grads}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL, (worst, errs[worst])
    rep = peftfast.report(model)
    for name, r in rep.runtime(model).items():
        assert r["fused"] > 0 and not r["fallbacks"], (name, r)
    for name, r in rep.module_runtime(model).items():
        assert r["fused"] > 0 and not r["fallbacks"], (name, r)


@pytest.mark.parametrize("arch", FAMILIES)
def test_patch_report(arch):
    model = peft_model(arch)
    before = model.get_base_model().config._attn_implementation
    peftfast.patch(model)
    rep = peftfast.report(model)
    text = rep.format(model)
    lora = {n for n, m in model.named_modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")}
    assert {e.name for e in rep.entries} == lora and not rep.skipped, text
    fused_kinds = {e.kind for e in rep.modules if e.patched}
    attention = set() if arch in OWN_ATTENTION else {"attention"}
    assert fused_kinds == {*EXPECTED_BLOCKS[arch], *attention}, text
    n_layers = 4 if arch in ENCODER_DECODERS else 2  # two layers in each stack
    for kind in ("mlp", "rope", "block"):
        if kind in EXPECTED_BLOCKS[arch]:
            assert sum(e.kind == kind and e.patched for e in rep.modules) == n_layers, text
    norms = [e for e in rep.modules if e.kind == "norm"]
    assert norms and all(e.patched for e in norms), text
    if attention:
        assert model.get_base_model().config._attn_implementation == "peftfast"
    else:
        (entry,) = [e for e in rep.modules if e.kind == "attention"]
        assert "_supports_flash_attn=False" in entry.reason or "computes its own attention" in entry.reason, text
    for e in rep.modules:
        assert e.patched or (e.reason and "\n" not in e.reason), text
    if arch in ENCODER_DECODERS:  # self-attention q/k/v grouped, cross-attention (q and k/v read other states) not
        groups = {e.group for e in rep.entries if e.group}
        assert len(groups) == 4 and not any("EncDecAttention" in g or "encoder_attn" in g for g in groups), text
    assert rep.summary().startswith(f"peftfast: patched {len(lora)} LoRA layer(s)")
    peftfast.unpatch(model)
    if attention:  # restored to what the builder chose
        assert model.get_base_model().config._attn_implementation == before != "peftfast"
    assert peftfast.report(model).entries == []
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("arch", [*CAUSAL_LMS, "gpt2", "bert", "roberta", "t5", "bart", "gpt_neox", "phi",
                                  "falcon", "modernbert"])
def test_fused_loss_opt_in_matches_unpatched(arch):
    """``fuse_loss=True``: the loss comes from fused linear cross-entropy, with no logits, and matches."""
    model = peft_model(arch, target_modules="all-linear")
    ref = clone(model)
    peftfast.patch(model, fuse_loss=True)
    data = batch(arch)
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= TOL
    assert model(**data).logits is None
    rt = peftfast.report(model).module_runtime(model)
    (stats,) = [r for n, r in rt.items() if n.endswith("(loss)")]
    assert stats["fused"] >= 1 and not stats["fallbacks"]
    model.eval()
    assert model(**data).logits is not None  # evaluation keeps the logits


@pytest.mark.parametrize("sparse", [False, True])
def test_modernbert_fused_mlm_loss_honours_num_items_and_sparse_prediction(sparse):
    """ModernBERT's masked-LM loss is the model's ``loss_function`` (ForMaskedLMLoss): the fused loss takes
    ``num_items_in_batch`` as it does (sum / num_items under gradient accumulation), with ``sparse_prediction`` or
    not; kept logits (``keep_logits``) are the original's, the labelled rows only when sparse."""
    model = peft_model("modernbert", model_kwargs=dict(sparse_prediction=sparse))
    ref = clone(model)
    peftfast.patch(model, fuse_loss=True)
    data = {**batch("modernbert"), "num_items_in_batch": torch.tensor(7)}
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    mean_loss, _ = loss_and_grads(ref, batch("modernbert"))
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item()) and abs(loss - mean_loss) > 1e-2
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= TOL
    from peftfast.patching.loss import install_loss

    assert install_loss(model, keep_logits=True) == (True, None)
    with torch.no_grad():
        torch.manual_seed(0)
        got = model(**data).logits
        torch.manual_seed(0)
        want = ref(**data).logits
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def _padded_parity(model, arch: str, p: float, *, seq: int, pad_from: int, unlabelled: bool,
                   fp64: bool = False) -> dict[str, dict]:
    """Patch ``model`` and match its loss and every gradient against an unpatched clone (dropout masks replayed) on a
    batch whose second row is padded from ``pad_from`` (unlabelled there too where ``unlabelled``); returns the
    attention modules' runtime stats. With ``fp64`` the gradients are held to the eager bound instead: their largest
    error against the unpatched model in fp64 at most twice the unpatched fp32 model's (for models whose gradients
    are small enough that two fp32 roundings apart can pass ``TOL`` while each is as close to the truth)."""
    ref = clone(model)
    ref64 = clone(model).double() if fp64 else None
    peftfast.patch(model)
    if p:
        use_shared_seed_dropout(ref, model, p)
        if fp64:
            use_shared_seed_dropout(ref64, model, p)
    data = batch(arch, seq=seq)
    data["attention_mask"] = torch.ones_like(data["input_ids"])
    data["attention_mask"][1, pad_from:] = 0
    if unlabelled:
        data["labels"][1, pad_from:] = -100
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    if fp64:
        truth = loss_and_grads(ref64, data)[1]
        ours, eager = (max(max_rel_err(g[n], truth[n]) for n in truth) for g in (grads, ref_grads))
        assert 0 < eager <= TOL and ours <= 2 * eager, (ours, eager)
    else:
        assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= TOL
    return {n: r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith("(attention)")}


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_modernbert_local_layers_run_the_kernel_with_their_bidirectional_window(p):
    """ModernBERT's local layers attend within |i - j| <= local_attention / 2 on both sides: the kernels take the
    window on both sides of a non-causal query (``window_right``). Loss and every gradient match the unpatched model,
    padding included (padded positions unlabelled), and every layer, local and global, runs the kernel. With a
    one-sided window (before a273729) the local layers attended to every later key: wrong outputs."""
    model = peft_model("modernbert", lora_dropout=p,
                       model_kwargs=dict(global_attn_every_n_layers=2, local_attention=4, layers=3))
    attn = _padded_parity(model, "modernbert", p, seq=16, pad_from=12, unlabelled=True)
    assert any(".layers.1." in n for n in attn) and len(attn) == 3, attn
    assert all(r["fused"] == 1 and not r["fallbacks"] for r in attn.values()), attn


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("arch", ["t5gemma", "gemma3-bidirectional"])
def test_bidirectional_windows_keep_each_models_eager_bound(arch, p):
    """Non-causal sliding windows run the kernel with each model's eager bound: T5Gemma's encoder builds its mask
    with transformers' bidirectional window builder (|i - j| <= sliding_window) but hands the attention function
    ``sliding_window`` itself, one less than the flash-style window that builder means (ModernBERT hands it plus
    one); Gemma 3 with bidirectional attention (EmbeddingGemma) masks |i - j| < sliding_window and says so. Both
    match their unpatched loss and gradients with padding, every call fused (before, T5Gemma's local layers took the
    fallback with the flash-style window: wrong by one key on each side)."""
    name, kw = ("gemma3", dict(use_bidirectional_attention=True, sliding_window=3)) if arch != "t5gemma" \
        else ("t5gemma", {})
    model = peft_model(name, lora_dropout=p, model_kwargs=kw)
    # (a window one key off on each side, the bug this guards against, gives errors of order 1e-2); T5Gemma against
    # fp64, padded where no query row of its windows is left without a key (eager fp64 turns such rows into NaN)
    t5 = name == "t5gemma"
    attn = _padded_parity(model, name, p, seq=14, pad_from=12 if t5 else 10, unlabelled=not t5, fp64=t5)
    assert len(attn) == (6 if name == "t5gemma" else 2), attn
    assert all(r["fused"] == 1 and not r["fallbacks"] for r in attn.values()), attn
    bounds = {n: m.__dict__.get("_peftfast_bidir_window") for n, m in model.named_modules()
              if "_peftfast_bidir_window" in m.__dict__}
    if name == "t5gemma":  # the encoder's two self-attentions (the full layer's is never handed a window)
        assert bounds == {f"base_model.model.model.encoder.layers.{i}.self_attn": 3 for i in (0, 1)}, bounds
    else:
        assert bounds == {}, bounds


def _force_attn_implementation(model, name: str) -> None:
    """Set ``name`` on every config of ``model``, as ``set_attn_implementation`` would where it accepts it (Gemma 2's
    SDPA, which transformers 5.17 picks by default and later releases refuse)."""
    try:
        model.base_model.model.set_attn_implementation(name)
    except ValueError:
        for m in model.modules():
            if getattr(getattr(m, "config", None), "_attn_implementation", None) is not None:
                m.config._attn_implementation = name


def _sdpa_dropping_softcap(module, query, key, value, attention_mask, **kwargs):
    """transformers 5.17's SDPA function: takes ``softcap`` and ignores it (later releases raise)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("softcap", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@pytest.mark.parametrize("sdpa", ["installed", "dropping (5.17)"])
def test_a_model_that_ran_sdpa_gets_the_softcap_sdpa_dropped_and_a_note_saying_so(sdpa, monkeypatch):
    """transformers 5.17's SDPA takes Gemma 2's ``softcap`` and drops it (and 5.17 picks SDPA for Gemma 2 by
    default). Patched, the kernel applies it as eager attention does: the loss and gradients follow the eager model,
    not the unpatched SDPA run, and the report says so; ``unpatch`` puts SDPA back. Where the installed SDPA refuses
    the softcap, the unpatched model does not run at all and the patched one needs no note. (A softcap of 1 makes a
    dropped one visible: the SDPA run's gradients are off eager's by far more than the tolerance.)"""
    if sdpa != "installed":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", _sdpa_dropping_softcap)
    model = peft_model("gemma2", lora_dropout=0.0, model_kwargs=dict(attn_logit_softcapping=1.0))
    eager = clone(model)
    _force_attn_implementation(model, "sdpa")
    data = batch("gemma2")
    ref_loss, ref_grads = loss_and_grads(eager, data)
    try:
        sdpa_loss, sdpa_grads = loss_and_grads(model, data)
    except ValueError as exc:
        assert sdpa == "installed" and "softcap" in str(exc), exc
        sdpa_loss = None
    peftfast.patch(model)
    notes = [n for n in peftfast.report(model).notes if n.startswith("attention:")]
    if sdpa_loss is None:
        assert not notes, notes
    else:
        assert max(max_rel_err(sdpa_grads[n], ref_grads[n]) for n in ref_grads) > 50 * TOL
        (note,) = notes
        assert "ignores attn_logit_softcapping=1.0" in note and "follow eager attention" in note, note
    loss, grads = loss_and_grads(model, data)
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= TOL
    attn = {n: r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith("(attention)")}
    assert len(attn) == 2 and all(r["fused"] == 1 and not r["fallbacks"] for r in attn.values()), attn
    peftfast.unpatch(model)
    assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {"sdpa"}
    if sdpa_loss is not None:
        assert loss_and_grads(model, data)[0].item() == sdpa_loss.item()
    # an eager model, or one without a softcap, gets no such note
    assert not [n for n in peftfast.report(peftfast.patch(eager)).notes if n.startswith("attention:")]
    plain = peft_model("llama", lora_dropout=0.0)
    _force_attn_implementation(plain, "sdpa")
    assert not [n for n in peftfast.report(peftfast.patch(plain)).notes if n.startswith("attention:")]


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("arch,encoder", [("switch", None), ("longt5", "local"), ("longt5", "transient-global")])
def test_t5_relatives_run_the_kernel_with_their_position_bias(arch, encoder, p):
    """SwitchTransformers and LongT5 add T5's position bias to the scores, which the kernel takes (the families
    declare no flash attention for that alone). Switch's encoder hands over a ``[B, 1, 1, S]`` extended padding mask
    of its own making, read as the key-padding mask it is; LongT5's encoder computes its own local or
    transient-global attention, which stays its own and is not listed, while its decoder's self- and
    cross-attention run the kernel. Loss and every gradient match the unpatched model, source padded."""
    # LoRA on the attention projections: with a few tokens some of Switch's experts see none, and get no gradient
    model = peft_model(arch, lora_dropout=p, target_modules=["q", "k", "v", "o"],
                       model_kwargs={} if encoder is None else dict(encoder_attention_type=encoder))
    attn = _padded_parity(model, arch, p, seq=13, pad_from=10, unlabelled=False)
    assert len(attn) == (6 if arch == "switch" else 4), attn
    assert any(".encoder." in n for n in attn) == (arch == "switch"), attn
    assert all(r["fused"] == 1 and not r["fallbacks"] for r in attn.values()), attn


@pytest.mark.parametrize("layout", [dict(new_decoder_architecture=True, num_kv_heads=2),
                                    dict(parallel_attn=False, multi_query=False), dict(alibi=True)])
def test_falcon_layouts_match_and_alibi_keeps_its_attention_with_the_reason(layout):
    """Falcon-40B's grouped layout and the sequential one run fused and match; ALiBi Falcon (Falcon-RW) folds its
    position bias into the 4-D mask, which the flash-style path drops: its attention stays the model's, with the
    reason, while its LoRA layers, MLPs and norms are fused."""
    model = peft_model("falcon", model_kwargs=layout, lora_dropout=0.1)
    ref = clone(model)
    peftfast.patch(model)
    use_shared_seed_dropout(ref, model, 0.1)
    data = batch("falcon")
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= TOL
    rep = peftfast.report(model)
    assert len(rep.patched) == 8 and not rep.skipped
    (attn,) = [e for e in rep.modules if e.kind == "attention"]
    if not _falcon_calls_interface():
        assert not attn.patched and "computes its own attention" in attn.reason
    elif layout.get("alibi"):
        assert not attn.patched and "ALiBi" in attn.reason and "config.alibi=True" in attn.reason
    else:
        assert attn.patched
