"""Pre-norm decoder blocks: the residual add fused into the post-attention RMSNorm (``peftfast.modules.block``)."""

import pytest
import torch
from _models import assert_trains_as, batch, clone, loss_and_grads, max_rel_err, peft_model, use_shared_seed_dropout
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import peftfast
from peftfast.bench import count_work_ops, saved_activation_bytes
from peftfast.modules import block as block_mod
from peftfast.ops import _counters

TOL = 2e-5


def _blocks(model):
    return [(e.name, e.patched, e.reason) for e in peftfast.report(model).modules if e.kind == "block"]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "phi3", "gemma2", "gemma3", "glm4"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fused_blocks_keep_losses_and_gradients(arch, p):
    """Each layout (``block.LAYOUTS``): Llama's; Phi-3's residual dropouts; the sandwich norms of Gemma 2/3 and
    GLM-4, around attention and MLP: the same loss and every LoRA gradient, one fused call per block."""
    model = peft_model(arch, lora_dropout=p)
    ref = clone(model)
    peftfast.patch(model)
    if p:
        use_shared_seed_dropout(ref, model, p)
    blocks = _blocks(model)
    assert blocks and all(patched for _, patched, _ in blocks), blocks
    data = batch(arch)
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= TOL
    runtime = peftfast.report(model).module_runtime(model)
    stats = [r for k, r in runtime.items() if k.endswith("(block)")]
    assert len(stats) == len(blocks) and all(r["fused"] == 1 and not r["fallbacks"] for r in stats)


def test_fusion_removes_two_ops_per_layer():
    """The forward's add, and in backward the accumulation of r's two gradients (the op sums them itself). Without
    ``peftfast._C`` (not built, or built for another torch) the norm's ATen fallback runs the add and the sum as ops
    of their own: the same count either way."""
    from peftfast.ops._backend import resolve_backend

    model = peft_model("llama", lora_dropout=0.0)
    peftfast.patch(model, recompute="none")  # the norm rebuilds would add two ops per layer
    data = batch("llama")
    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]

    def ops():
        model.zero_grad(set_to_none=True)
        _, count = count_work_ops(lambda: model(**data).loss.backward())
        return count.total

    fused = ops()
    for m in layers:
        block_mod.uninstall(m)
    unfused = ops()
    assert unfused - fused == (2 * len(layers) if resolve_backend("auto", torch.device("cpu")) == "cpp" else 0)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_settings_keep_gradients_bit_for_bit_and_save_exactly_less(backend, dtype):
    """recompute="norms" rebuilds both norm outputs per block (the q/k/v group and the MLP no longer keep them);
    "up" also drops u (the MLP runs the up projection again in backward); "attn" also reruns norm, projections and
    RoPE in backward, so the attention keeps no q, k, v (and the q/k/v LoRA projections no x·Aᵀ: the rerun makes it
    again); "mlp" also drops g and x·A_catᵀ. The rebuilt tensors are the same bits (same dropout seeds), so every
    gradient is too."""
    model = peft_model("llama", lora_dropout=0.1, base_dtype=dtype)
    data = batch("llama")
    params = [*model.parameters(), *model.buffers()]
    got = {}
    for setting in ("none", "norms", "up", "attn", "mlp"):
        peftfast.patch(model, backend=backend, recompute=setting)
        loss, grads = loss_and_grads(model, data)
        torch.manual_seed(0)
        _, saved = saved_activation_bytes(lambda: model(**data).loss, exclude=params)
        got[setting] = loss, grads, saved.total
    for setting in ("norms", "up", "attn", "mlp"):
        assert torch.equal(got[setting][0], got["none"][0])
        assert all(torch.equal(got[setting][1][n], g) for n, g in got["none"][1].items())
    cfg = model.config
    tokens, layers = data["input_ids"].numel(), cfg.num_hidden_layers
    elt = torch.finfo(dtype).bits // 8
    lora_elt = model.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"].weight.element_size()
    r = model.peft_config["default"].r
    # layer 0's input norm reads the embedding output, which nothing else keeps: its recipe keeps that instead
    assert got["none"][2] - got["norms"][2] == (2 * layers - 1) * tokens * cfg.hidden_size * elt
    head = cfg.hidden_size // cfg.num_attention_heads
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head
    assert got["norms"][2] - got["up"][2] == layers * tokens * cfg.intermediate_size * elt
    assert got["up"][2] - got["attn"][2] == layers * tokens * (qkv * elt + _attn_low_rank(model) * lora_elt)
    assert got["attn"][2] - got["mlp"][2] == layers * tokens * (cfg.intermediate_size * elt + 2 * r * lora_elt)


def _attn_low_rank(model) -> int:
    """x·Aᵀ values per token that one layer's q/k/v LoRA projections keep unless recompute="attn" (Σ ranks; o_proj
    runs after the attention kernel, outside the rerun, and keeps its own)."""
    attn = model.base_model.model.model.layers[0].self_attn
    names = ("q_proj", "k_proj", "v_proj", "qkv_proj")
    return sum(getattr(attn, n).lora_A["default"].out_features for n in names if hasattr(attn, n))


def _calls(model) -> dict[str, int]:
    """Fused calls so far of every patched LoRA layer and fused module (counters accumulate over calls)."""
    rep = peftfast.report(model)
    out = {k: r["fused"] for k, r in rep.runtime(model).items()}
    out.update({k: r["fused"] for k, r in rep.module_runtime(model).items() if not k.endswith("(loss)")})
    return out


def _layouts(kind: str, data: dict) -> dict:
    ids = data["input_ids"]
    b, s = ids.shape
    if kind == "cache":  # a DynamicCache the forward appends to (what use_cache=True training does)
        return {**data, "use_cache": True}
    if kind == "packed":  # two documents per row, positions restarting at 0
        pos = torch.cat([torch.arange(s // 2), torch.arange(s - s // 2)]).expand(b, s)
        return {**data, "position_ids": pos}
    if kind == "padded":
        mask = torch.ones(b, s, dtype=torch.long)
        mask[0, -3:] = 0
        labels = data["labels"].masked_fill(mask == 0, -100)
        return {**data, "attention_mask": mask, "labels": labels}
    return data


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "mistral", "gemma2", "phi3", "glm"])
@pytest.mark.parametrize("kind", ["plain", "cache", "packed", "padded"])
def test_attn_rebuild_keeps_gradients_bit_for_bit(arch, kind):
    """recompute="attn" reruns the attention's inputs in backward, whatever the batch layout (a cache the forward fills,
    packed documents, padding): against "up" (the setting before it), the same loss and gradients bit for bit, q/k/v
    (and the q/k/v LoRA projections' x·Aᵀ) not kept, and the rerun counts no extra fused call. Gemma 2 (softcap, sliding
    window) and Phi-3 (one qkv_proj) keep unfused blocks: the rerun lives in the attention module, so they drop q, k, v
    too."""
    model = peft_model(arch, lora_dropout=0.1)
    data = _layouts(kind, batch(arch))
    params = [*model.parameters(), *model.buffers()]
    got = {}
    for setting in ("up", "attn"):
        peftfast.patch(model, recompute=setting)
        before = _calls(model)
        loss, grads = loss_and_grads(model, data)
        runtime = {k: n - before.get(k, 0) for k, n in _calls(model).items()}
        torch.manual_seed(0)
        _, saved = saved_activation_bytes(lambda: model(**data).loss, exclude=params)
        got[setting] = loss, grads, saved.total, runtime
    assert torch.equal(got["attn"][0], got["up"][0])
    assert all(torch.equal(got["attn"][1][n], g) for n, g in got["up"][1].items())
    cfg = model.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head
    per_token = (qkv + _attn_low_rank(model)) * 4  # fp32 base and LoRA weights
    assert got["up"][2] - got["attn"][2] == cfg.num_hidden_layers * data["input_ids"].numel() * per_token
    assert got["attn"][3] == got["up"][3] and all(got["attn"][3].values())  # one fused call each, per setting


def test_attn_rebuild_with_dora_layers():
    """DoRA layers run layer by layer on the fused DoRA path (no sibling group, no block op): the rerun goes through
    them (the same dropout masks from the restored RNG), bit for bit, and the attention keeps no q, k, v, nor the
    q/k/v DoRA layers' fused ``x_d·Aᵀ``. With dropout they keep their dropped input and mask, never the input
    itself, so under "norms" nothing needs layer 0's norm output; the rerun does, and keeps what rebuilds it: the
    embedding output (one hidden vector per token). The DoRA MLP op keeps u under "norms", not from "up" on."""
    model = peft_model("llama", use_dora=True, lora_dropout=0.1)
    data = batch("llama")
    params = [*model.parameters(), *model.buffers()]
    got = {}
    for setting in ("norms", "attn"):
        peftfast.patch(model, recompute=setting)
        loss, grads = loss_and_grads(model, data)
        torch.manual_seed(0)
        _, saved = saved_activation_bytes(lambda: model(**data).loss, exclude=params)
        got[setting] = loss, grads, saved.total
    assert peftfast.report(model).summary().startswith("peftfast: patched 14 LoRA layer(s)")
    assert torch.equal(got["attn"][0], got["norms"][0])
    assert all(torch.equal(got["attn"][1][n], g) for n, g in got["norms"][1].items())
    cfg = model.config
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * (cfg.hidden_size // cfg.num_attention_heads)
    tokens = data["input_ids"].numel()
    # per layer q, k, v, the q/k/v DoRA layers' fused x_d·Aᵀ (the rerun makes it on its way) and the MLP's u; less
    # the embedding
    per_layer = qkv + _attn_low_rank(model) + cfg.intermediate_size
    assert got["norms"][2] - got["attn"][2] == (cfg.num_hidden_layers * per_layer - cfg.hidden_size) * tokens * 4


def test_attn_rebuild_on_the_triton_kernels_keeps_gradients_bit_for_bit():
    """The same through the Triton LoRA, RoPE, norm and attention kernels (interpreter; one layer, padded)."""
    model = peft_model("llama", lora_dropout=0.1, model_kwargs=dict(num_hidden_layers=1))
    data = _layouts("padded", batch("llama"))
    got = {}
    params = [*model.parameters(), *model.buffers()]
    for setting in ("up", "attn"):
        peftfast.patch(model, backend="triton", recompute=setting)
        with _counters.count_launches() as launches:
            got[setting] = loss_and_grads(model, data)
        torch.manual_seed(0)
        _, saved = saved_activation_bytes(lambda: model(**data).loss, exclude=params)
        got[setting] += (saved.total, sum(launches.values()))
    cfg = model.config
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * (cfg.hidden_size // cfg.num_attention_heads)
    assert got["up"][2] - got["attn"][2] == data["input_ids"].numel() * (qkv + _attn_low_rank(model)) * 4
    assert got["attn"][3] > got["up"][3]  # the rerun's launches (forward kernels again)
    assert torch.equal(got["attn"][0], got["up"][0])
    assert all(torch.equal(got["attn"][1][n], g) for n, g in got["up"][1].items())


def test_attn_rebuild_steps_aside_under_gradient_checkpointing():
    model = peft_model("llama", lora_dropout=0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data = batch("llama")
    got = {}
    for setting in ("none", "attn"):
        peftfast.patch(model, recompute=setting)
        got[setting] = loss_and_grads(model, data)
    assert torch.equal(got["attn"][0], got["none"][0])
    assert all(torch.equal(got["attn"][1][n], g) for n, g in got["none"][1].items())


def test_unpatch_restores_the_block_forward():
    model = peft_model("llama")
    layer = next(m for m in model.modules() if isinstance(m, LlamaDecoderLayer))
    peftfast.patch(model)
    assert "forward" in layer.__dict__ and "_peftfast_block" in layer.__dict__
    peftfast.unpatch(model)
    assert "forward" not in layer.__dict__ and "_peftfast_block" not in layer.__dict__


def _attend(layer, hidden_states, attention_mask, position_ids, past_key_values, use_cache, position_embeddings,
            **kwargs):
    """The attention sublayer's output, its every argument handed on (as LlamaDecoderLayer's forward does)."""
    h = layer.input_layernorm(hidden_states)
    return layer.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=past_key_values, use_cache=use_cache,
                           position_embeddings=position_embeddings, **kwargs)[0]


class _ScaledResidual(LlamaDecoderLayer):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        h = _attend(self, hidden_states, attention_mask, position_ids, past_key_values, use_cache,
                    position_embeddings, **kwargs)
        h = hidden_states + 0.5 * h  # not the form the fused forward computes
        return h + self.mlp(self.post_attention_layernorm(h))


class _DropsAnArgument(LlamaDecoderLayer):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, position_embeddings=position_embeddings)
        h = residual + h
        residual = h
        return residual + self.mlp(self.post_attention_layernorm(h))


class _PairDoubled(LlamaDecoderLayer):
    """Unpacks its MLP's output as gpt-oss does (``hidden, router_scores``) but adds twice the hidden part: neither
    the plain form nor the pair form of the probe matches."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        h = hidden_states + _attend(self, hidden_states, attention_mask, position_ids, past_key_values, use_cache,
                                    position_embeddings, **kwargs)
        m, _ = self.mlp(self.post_attention_layernorm(h))
        return h + 2 * m


@pytest.mark.parametrize("cls, reason", [(_ScaledResidual, "computes something else"),
                                         (_DropsAnArgument, "other arguments"),
                                         (_PairDoubled, "computes something else")])
def test_probe_refuses_a_block_that_computes_otherwise(cls, reason):
    model = peft_model("llama")
    for m in model.modules():
        if type(m) is LlamaDecoderLayer:
            m.__class__ = cls
    if cls is _PairDoubled:  # an MLP that returns a pair, as gpt-oss's does
        for layer in model.base_model.model.model.layers:
            layer.mlp.register_forward_hook(lambda mod, args, out: (out, None))
    ref = clone(model)
    peftfast.patch(model)
    blocks = _blocks(model)
    assert blocks and all(not patched and reason in why for _, patched, why in blocks), blocks
    data = batch("llama")
    assert abs(loss_and_grads(model, data)[0].item() - loss_and_grads(ref, data)[0].item()) <= TOL * 10


def test_other_layouts_are_reported_with_their_reason():
    model = peft_model("llama")
    for layer in model.base_model.model.model.layers:
        layer.post_mlp_scale = torch.nn.Identity()  # a child no layout has
    peftfast.patch(model)
    blocks = _blocks(model)
    assert blocks and all(not patched and "extra: post_mlp_scale; missing: none" in why
                          and "Phi-3, Gemma 2/3 and GLM-4 layouts" in why for _, patched, why in blocks), blocks


def test_phi3_residual_dropout_draws_the_same_masks():
    """Phi-3's resid_attn_dropout / resid_mlp_dropout active (p = 0.2, training): the fused block calls them as
    modules in the class forward's order, so torch's RNG gives them the same masks: the same loss and gradients."""
    model = peft_model("phi3", lora_dropout=0.0, model_kwargs=dict(resid_pdrop=0.2))
    ref = clone(model)
    peftfast.patch(model)
    assert all(patched for _, patched, _ in _blocks(model))
    data = batch("phi3")
    loss, grads = loss_and_grads(model, data)
    ref_loss, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= TOL
    torch.manual_seed(0)
    other = model(**data).loss  # another draw: the dropouts do act
    assert abs(other.item() - loss.item()) > 1e-4


def test_probe_refuses_a_dropout_on_the_wrong_tensor():
    """A Phi-3 block whose class applies the attention dropout to the residual instead of the attention output: the
    probe's distinct stubs tell the two apart, and the block keeps its own forward with the reason."""
    from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

    class Swapped(Phi3DecoderLayer):
        def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                    position_embeddings=None, **kwargs):
            residual = hidden_states
            h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)
            h = self.resid_attn_dropout(residual) + h
            residual = h
            return residual + self.resid_mlp_dropout(self.mlp(self.post_attention_layernorm(h)))

    model = peft_model("phi3")
    for layer in model.base_model.model.model.layers:
        layer.__class__ = Swapped
    peftfast.patch(model)
    assert all(not patched and "computes something else" in why for _, patched, why in _blocks(model)), \
        _blocks(model)


def test_norms_off_means_blocks_off():
    model = peft_model("llama")
    peftfast.patch(model, fuse_norms=False)
    assert all(not patched and why == "fuse_norms=False" for _, patched, why in _blocks(model))


@pytest.mark.parametrize("enable_first", [False, True], ids=["patch-then-enable", "enable-then-patch"])
def test_gradient_checkpointing_still_checkpoints_fused_blocks(enable_first):
    """transformers (5.2x) checkpoints a layer by wrapping its class forward, which the fused instance forward
    bypasses: the fused block must checkpoint itself (forward + recompute = two fused calls per block), whether
    checkpointing was enabled before ``patch`` (its probe then runs the checkpointing class forward) or after."""
    model = peft_model("llama", lora_dropout=0.1)
    ckpt = clone(model)
    peftfast.patch(model)
    if enable_first:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peftfast.patch(ckpt)
    if not enable_first:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data = batch("llama")
    # without grad mode there is nothing to replay: a training-mode forward keeps its cache, as unpatched
    plain = clone(ckpt)
    peftfast.unpatch(plain)
    with torch.no_grad():
        outs = [m(input_ids=data["input_ids"], use_cache=True) for m in (ckpt, plain)]
    caches = [o.cache if hasattr(o, "cache") else o.past_key_values for o in outs]  # "cache": transformers >= 5.24
    lengths = [None if c is None else c.get_seq_length() for c in caches]
    # transformers < 5.24 drops the cache of a checkpointing layer in training mode even without grad mode
    assert lengths[0] == lengths[1] and lengths[1] in (None, data["input_ids"].shape[1]), lengths

    def fused_calls() -> list[int]:
        return [r["fused"] for k, r in peftfast.report(ckpt).module_runtime(ckpt).items() if k.endswith("(block)")]

    before = fused_calls()
    loss, grads = loss_and_grads(model, data)
    ck_loss, ck_grads = loss_and_grads(ckpt, data)
    calls = [after - b for after, b in zip(fused_calls(), before)]
    assert calls and all(c == 2 for c in calls), calls  # forward + recompute
    assert abs(loss.item() - ck_loss.item()) <= TOL * abs(loss.item())
    assert max(max_rel_err(ck_grads[n], grads[n]) for n in grads) <= TOL


class _AttnDropoutLayer(LlamaDecoderLayer):
    """Llama's layer plus a dropout its own code applies to the attention output in training only."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                              position_ids=position_ids, cache=cache, use_cache=use_cache,
                              position_embeddings=position_embeddings, **kwargs)
        h = residual + torch.nn.functional.dropout(h, p=0.25, training=self.training)
        return h + self.mlp(self.post_attention_layernorm(h))


def test_block_probe_runs_in_training_mode_too():
    """A model patched in eval mode (as from_pretrained hands it over) whose layer drops out in training only: the
    probe runs the class forward in both modes, so the block keeps it, with the training-mode reason, and training
    matches the unpatched model draw for draw."""
    model = peft_model("llama")
    for layer in model.base_model.model.model.layers:
        layer.__class__ = _AttnDropoutLayer
    ref = clone(model)
    model.eval()
    peftfast.patch(model)
    assert all(not patched and why == "in training mode, the block's forward computes something else than "
               "r = x + attn(norm(x)); r + mlp(norm(r))" for _, patched, why in _blocks(model)), _blocks(model)
    model.train()
    assert_trains_as(model, ref, batch("llama"))
