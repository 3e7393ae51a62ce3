"""``patch(model)``: run every eligible PEFT LoRA layer of a model on the fused path, in place and reversibly."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

from torch import nn

from peftfast.modules import attention as attn_mod
from peftfast.modules import block as block_mod
from peftfast.modules import cross_entropy as ce_mod
from peftfast.modules import dense_mlp as dense_mod
from peftfast.modules import lora as lora_mod
from peftfast.modules import mlp as mlp_mod
from peftfast.modules import moe as moe_mod
from peftfast.modules import nf4 as nf4_mod
from peftfast.modules import norm as norm_mod
from peftfast.modules import rope as rope_mod
from peftfast.ops._backend import BACKENDS

logger = logging.getLogger("peftfast")

# patch(recompute=...): what backward rebuilds instead of keeping, cheapest first (each includes the one before)
RECOMPUTE: dict[str, str] = {
    "none": "keep every saved activation",
    "norms": "rebuild the fused norms' outputs and the two-layer MLPs' activation outputs (element-wise)",
    "up": "also run each fused MLP's up projection again (gated MLPs keep the gate's output, not the up's; two-layer "
          "MLPs keep only their input)",
    "attn": "also rerun the RoPE attentions' q/k/v projections and RoPE (the attention keeps no q, k, v, the q/k/v "
            "LoRA projections no x·Aᵀ)",
    "mlp": "also run the fused MLPs' gate/up GEMM again (frozen MLPs too)",
}
# patch's default: the fastest setting that keeps at most about 0.3x of what eager PEFT keeps (the CPU bench's tiny
# Llama: 0.28x at 1.1x PEFT's tokens/s; "norms" 0.37x at 1.2x); see the README's recompute section
DEFAULT_RECOMPUTE = "up"


def _at_least(recompute: str, level: str) -> bool:
    """Whether the ``recompute`` setting includes ``level``'s rebuilds (the settings nest, cheapest first)."""
    order = list(RECOMPUTE)
    return order.index(recompute) >= order.index(level)


def _mlp_recompute(recompute: str) -> str:
    """What the fused gated-MLP ops rebuild at a ``recompute`` setting (``peftfast.ops.mlp.MLP_RECOMPUTE``)."""
    return "gate_up" if _at_least(recompute, "mlp") else "up" if _at_least(recompute, "up") else "none"


# children of one parent that PEFT-targeted models feed the same input (q/k/v, gate/up, BERT's query/key/value)
SIBLING_SETS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"query_proj", "key_proj", "value_proj"}),  # DeBERTa
    frozenset({"w1", "w3"}),
    frozenset({"q", "k", "v"}),  # T5's attention
    frozenset({"wi_0", "wi_1"}),  # T5 v1.1's gated feed-forward (Flan-T5, mT5, UMT5)
    # multi-head latent attention (DeepSeek-V2/V3, Kimi K2): the query's down-projection (or, without a query LoRA
    # rank, its projection) and the joint key/value down-projection read the same hidden states
    frozenset({"q_a_proj", "kv_a_proj_with_mqa"}),
    frozenset({"q_proj", "kv_a_proj_with_mqa"}),
)
# cross-attention modules (BART/Whisper ``encoder_attn``, T5 ``EncDecAttention``, BERT decoders' ``crossattention``):
# their q reads the decoder's states and k/v the encoder's, so their siblings form no group
CROSS_ATTENTION = frozenset({"encoder_attn", "EncDecAttention", "crossattention", "cross_attn", "cross_attention"})


@dataclass
class PatchEntry:
    name: str
    kind: str  # "lora" for PEFT layers; "mlp", "experts", "rope", "attention", "norm", "block", "loss" for modules
    patched: bool
    reason: str | None = None
    group: str | None = None
    nf4: bool = False  # a LoRA layer over an NF4 base (peftfast.quantize_base or bitsandbytes nf4)


@dataclass
class PatchReport:
    """What ``patch`` did to a model: one entry per PEFT layer (``entries``), one per block-level module it fused or
    left alone (``modules``: gated MLPs), model-level notes, and the calls that fell back at run time."""

    entries: list[PatchEntry] = field(default_factory=list)
    modules: list[PatchEntry] = field(default_factory=list)
    backend: str = "auto"
    notes: list[str] = field(default_factory=list)  # model-level parts left alone, each with its reason
    recompute: str = DEFAULT_RECOMPUTE

    @property
    def patched(self) -> list[PatchEntry]:
        return [e for e in self.entries if e.patched]

    @property
    def skipped(self) -> list[PatchEntry]:
        return [e for e in self.entries if not e.patched]

    def runtime(self, model: nn.Module) -> dict[str, dict]:
        """Per patched layer: fused calls, base-only calls, and fallback reasons with their counts."""
        out = {}
        for name, mod in model.named_modules():
            st = getattr(mod, "_peftfast", None)
            if isinstance(st, lora_mod.LoRAState):
                out[name] = {"fused": st.fused_calls, "base_only": st.base_only_calls, "fallbacks": dict(st.fallbacks)}
        return out

    def module_runtime(self, model: nn.Module) -> dict[str, dict]:
        """Per fused block module: fused calls, block-level fallbacks, and calls deferred to the layers."""
        out = {}
        for name, mod in model.named_modules():
            mst = getattr(mod, "_peftfast_mlp", None)
            if isinstance(mst, mlp_mod.MLPState):
                out[name] = {"fused": mst.fused_calls, "fallbacks": dict(mst.fallbacks), "deferred": dict(mst.deferred)}
            est = mod.__dict__.get("_peftfast_moe")
            if isinstance(est, moe_mod.ExpertsState):
                out[name] = {"fused": est.fused_calls, "fallbacks": dict(est.fallbacks), "deferred": {}}
            dst = mod.__dict__.get("_peftfast_dense")
            if isinstance(dst, dense_mod.DenseMLPState):
                out[name] = {"fused": dst.fused_calls, "fallbacks": dict(dst.fallbacks), "deferred": {}}
            lst = mod.__dict__.get("_peftfast_loss")
            if isinstance(lst, ce_mod.LossState):
                out[f"{name} (loss)"] = {"fused": lst.fused_calls, "fallbacks": dict(lst.fallbacks),
                                         "deferred": {"no labels": lst.no_label_calls, "eval mode": lst.eval_calls}}
            ast = mod.__dict__.get("_peftfast_attn")
            if isinstance(ast, attn_mod.AttentionStats):
                out[f"{name} (attention)"] = {"fused": ast.fused_calls, "fallbacks": dict(ast.fallbacks),
                                              "deferred": {}}
            bst = mod.__dict__.get("_peftfast_block")
            if isinstance(bst, block_mod.BlockState):
                out[f"{name} (block)"] = {"fused": bst.fused_calls, "fallbacks": dict(bst.fallbacks), "deferred": {}}
            rst = getattr(mod, "_peftfast_rope", None)
            if isinstance(rst, rope_mod.RoPEState):
                out[f"{name} (rope)"] = {"fused": rst.fused_calls, "fallbacks": dict(rst.fallbacks), "deferred": {}}
        return out

    def summary(self) -> str:
        groups = {e.group for e in self.patched if e.group}
        blocks = ""
        if self.modules:
            kinds = dict.fromkeys(e.kind for e in self.modules)
            parts = [f"{sum(e.patched for e in self.modules if e.kind == k)}/"
                     f"{sum(e.kind == k for e in self.modules)} {k}" for k in kinds]
            blocks = "; fused " + ", ".join(parts)
        # the setting matters only where a fused block or MLP runs
        rec = f", recompute={self.recompute}" if any(e.patched and e.kind in ("block", "mlp", "experts")
                                                      for e in self.modules) else ""
        nf4 = sum(e.nf4 for e in self.patched)
        nf4 = f", {nf4} over NF4 base weights" if nf4 else ""
        return (f"peftfast: patched {len(self.patched)} LoRA layer(s) ({len(groups)} sibling group(s){nf4}), "
                f"skipped {len(self.skipped)}{blocks}; backend={self.backend}{rec}")

    def format(self, model: nn.Module | None = None) -> str:
        lines = [self.summary()] + [f"  note     {n}" for n in self.notes]
        for e in self.modules:
            lines.append(f"  fused    {e.name} ({e.kind})" if e.patched
                         else f"  unfused  {e.name} ({e.kind}): {e.reason}")
        for e in self.entries:
            if e.patched:
                lines.append(f"  patched  {e.name}" + (f"  [group {e.group}]" if e.group else "")
                             + ("  [NF4 base]" if e.nf4 else ""))
            else:
                lines.append(f"  skipped  {e.name}: {e.reason}")
        if model is not None:
            for name, r in [*self.runtime(model).items(), *self.module_runtime(model).items()]:
                for reason, count in r["fallbacks"].items():
                    lines.append(f"  fallback {name}: {count} call(s): {reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _is_peft_layer(mod: nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import LoraLayer
    except Exception:  # pragma: no cover
        return False
    return isinstance(mod, LoraLayer)


def patch(model: nn.Module, *, backend: str = "auto", group_siblings: bool = True, fuse_mlp: bool = True,
          fuse_rope: bool = True, fuse_attention: bool = True, fuse_norms: bool = True,
          fuse_loss: bool = False, recompute: str = DEFAULT_RECOMPUTE) -> nn.Module:
    """Run every eligible PEFT LoRA ``Linear`` of ``model`` on peftfast's fused path, in place.

    Accepts a ``PeftModel`` (LoRA or prompt learning), any model holding PEFT LoRA layers, or a model with peftfast
    bottleneck adapters; for each, the frozen base's norms, RoPE and attention are fused too. Parameters, names,
    ``state_dict``, optimizer references and ``save_pretrained`` are untouched. Calling it again re-applies the
    options. Layers that cannot
    be fused are left alone with a reason in ``peftfast.report(model)``. With ``fuse_mlp``, gated MLPs whose three
    projections are patched run as one LoRA-MLP op that does not keep the activation output or the down input, and
    those of plain frozen ``nn.Linear`` projections (the base of a model tuned elsewhere) as a frozen-MLP op that
    keeps g and u only; two-layer MLPs (GPT-2, BERT-family, CLIP-style, GPT-NeoX) keep only their pre-activation
    (``peftfast.modules.dense_mlp``);
    with ``fuse_rope``, RoPE attention modules rotate q and k in one fused op; with ``fuse_attention`` the model's
    attention runs on peftfast's fused kernel (``"peftfast"`` attention implementation: padding, packing, GQA,
    prefix keys); with ``fuse_norms``, RMSNorms (and, for CUDA models, LayerNorms) run on fused norm kernels that
    keep no fp32 copy of their input (off CUDA, LayerNorms run ATen's op and are patched only for the rebuild).
    ``fuse_loss`` (opt-in, because such calls then return ``logits=None``, which loops that read training logits,
    e.g. TRL's token accuracy, cannot take): the labelled training calls of a causal, masked or encoder-decoder LM
    compute the loss from the last hidden states by fused linear cross-entropy (LoRA on ``lm_head`` included)
    without materialising logits.
    ``recompute`` trades backward work for saved activations (``RECOMPUTE``): ``"norms"`` rebuilds each fused norm's
    output in backward (an element-wise pass) instead of keeping it for the projections that read it, inside fused
    blocks and, through a rebuild scope around the layer stack, wherever else it is saved (the next layer's q/k/v,
    unfused blocks), and each two-layer MLP's activation output; ``"up"`` (default) also runs each fused MLP's up
    projection again in backward (one more GEMM of hidden·intermediate per token): gated MLPs keep the gate's output but
    not the up's (intermediate values per token fewer), two-layer MLPs keep only their input; ``"attn"`` also reruns
    each patched RoPE attention up to its kernel (q/k/v projections with the same dropout seeds, RoPE) so that the
    attention kernel keeps no q, k, v (one more GEMM of hidden·(q+k+v widths) per token), and the q/k/v LoRA projections
    take their ``dropout(x)·Aᵀ`` from that rerun instead of keeping it; ``"mlp"`` also runs each fused gated MLP's gate
    projection again (g is not kept either: one more GEMM of hidden·intermediate per token); ``"none"`` keeps
    everything. Gradients are the same either way (bit for bit on CPU; on Triton ``"up"`` rebuilds u with the LoRA GEMM
    rather than the fused gate/up one: the same within rounding). Returns ``model``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"peftfast.patch: unknown backend {backend!r}; choose one of {BACKENDS}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"peftfast.patch: unknown recompute {recompute!r}; choose one of {list(RECOMPUTE)}")
    config = lora_mod.LoRAPatchConfig(backend=backend, group_siblings=group_siblings)
    rep = PatchReport(backend=backend, recompute=recompute)
    patched: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if not _is_peft_layer(mod) or moe_mod.is_param_wrapper(mod):
            continue
        reason = lora_mod.why_not(mod)
        if reason is None:
            lora_mod.install(mod, name, config)
            patched[name] = mod
        elif getattr(mod, "_peftfast", None) is not None:
            lora_mod.uninstall(mod)  # it became ineligible since the last patch (e.g. DoRA added)
        rep.entries.append(PatchEntry(name=name, kind="lora", patched=reason is None, reason=reason,
                                      nf4=nf4_mod.is_nf4_lora(mod)))
    _form_groups(patched, rep)
    for name, mod in moe_mod.roots(model):  # LoRA on expert stacks (target_parameters): one op per experts module
        if not moe_mod.is_experts(mod):  # a bare parameter elsewhere (a router's weight) stays on PEFT's path
            wrappers, base = moe_mod.chain(mod)
            wrapped = f"{type(base).__name__}.{'/'.join(w.parameter_name for w in wrappers)}"
            rep.entries.append(PatchEntry(name=name, kind="lora", patched=False,
                                          reason=f"PEFT ParamWrapper on {wrapped}: LoRA on a bare parameter other "
                                                 "than an expert stack runs PEFT's own path"))
            continue
        _apply(rep, moe_mod, "experts", name, mod, moe_mod.why_not(mod) if fuse_mlp else "fuse_mlp=False", backend,
               recompute=_at_least(recompute, "up"))
    frozen_mlps: list[tuple[str, nn.Module]] = []
    dense_mlps: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if not mlp_mod.is_gated_mlp(mod):
            if dense_mod.is_dense_mlp(mod):
                dense_mlps.append((name, mod))  # two-layer MLPs (GPT-2, BERT, CLIP): below, once `tuned` is known
            elif mlp_mod.is_packed_gated_mlp(mod) and any(_is_peft_layer(c) for c in mod.children()):
                # Phi-3 / GLM / ModernBERT: one gate_up projection, chunked (why_not_packed's probe checks the code)
                reason = mlp_mod.why_not_packed(mod) if fuse_mlp else "fuse_mlp=False"
                _apply(rep, mlp_mod, "mlp", name, mod, reason, backend, recompute=_mlp_recompute(recompute),
                       packed=True)
            elif type(mod).__name__.endswith("MLP") and any(_is_peft_layer(c) for c in mod.children()):
                rep.modules.append(PatchEntry(name=name, kind="mlp", patched=False,
                                              reason=f"{type(mod).__name__} layout (not gate_proj/up_proj/down_proj, "
                                                     "gate_up_proj, Wi/Wo nor a two-layer MLP) is not fused as a "
                                                     "block"))
            continue
        projs = mlp_mod.gated_projs(mod)
        if not any(_is_peft_layer(getattr(mod, p)) for p in projs):
            frozen_mlps.append((name, mod))  # fused below if the model is tuned elsewhere
            continue
        reason = mlp_mod.why_not(mod) if fuse_mlp else "fuse_mlp=False"
        nf4 = [nf4_mod.is_nf4_lora(getattr(mod, p)) for p in projs]
        if reason is None and any(nf4) and not all(nf4):
            reason = "gate/up/down mix NF4 and other base weights: they run one by one"
        if reason is None and not any(nf4) and not group_siblings:
            reason = "group_siblings=False (the fused MLP groups gate and up)"
        _apply(rep, mlp_mod, "mlp", name, mod, reason, backend, recompute=_mlp_recompute(recompute))
    # the frozen base of any tuned model trains through the same norms, RoPE and attention: LoRA layers, PEFT prompt
    # learning and peftfast's bottleneck adapters all get them fused; a model with none of these is left unchanged
    # (with a warning below)
    from peftfast.patching.adapters import adapter_names

    tuned = (bool(rep.entries) or any(e.kind == "experts" for e in rep.modules)
             or isinstance(getattr(model, "peft_config", None), dict) or bool(adapter_names(model)))
    for name, mod in frozen_mlps:
        if tuned:  # the MLPs of the frozen base: only the input gradient flows through them
            reason = mlp_mod.why_not_frozen(mod) if fuse_mlp else "fuse_mlp=False"
            _apply(rep, mlp_mod, "mlp", name, mod, reason, backend, recompute=_mlp_recompute(recompute), frozen=True)
        else:
            mlp_mod.uninstall(mod)
    backbone = _backbone(model) if tuned else None
    scope_ok = backbone is not None and recompute != "none"  # outputs registered with a rebuild scope get rebuilt
    for name, mod in dense_mlps:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if parent is not mod and dense_mod.layouts_of(parent) == [dense_mod.FFN_LAYOUT]:
            continue  # a BERT-style layer's intermediate: its layer's entry stands for both
        if tuned:  # the activation keeps only its input; the down projection's copy of its output is rebuilt
            rebuild = recompute != "none"
            consumer = getattr(getattr(parent, "output", None), "dense", None) if parent is not mod else None
            rerun = _at_least(recompute, "up")  # a two-layer MLP's up projection is all its MLP keeps
            reason = dense_mod.why_not(mod, rebuild, consumer, scope_ok, rerun) if fuse_mlp else "fuse_mlp=False"
            _apply(rep, dense_mod, "mlp", name, mod, reason, backend, rebuild=rebuild, consumer=consumer,
                   scoped=scope_ok, rerun=rerun)
        else:
            dense_mod.uninstall(mod)
    if tuned:
        for name, mod in model.named_modules():
            if rope_mod.is_rope_attention(mod):
                _apply(rep, rope_mod, "rope", name, mod, rope_mod.why_not(mod) if fuse_rope else "fuse_rope=False",
                       backend, rebuild_qkv=_at_least(recompute, "attn"))
    if fuse_attention and tuned and attn_mod.base_model_of(model) is not None:
        reason = attn_mod.install(model, backend)
        rep.modules.append(PatchEntry(name="attention implementation", kind="attention", patched=reason is None,
                                      reason=reason))
    elif tuned and attn_mod.base_model_of(model) is not None:
        attn_mod.uninstall(model)
        rep.modules.append(PatchEntry(name="attention implementation", kind="attention", patched=False,
                                      reason="fuse_attention=False"))
    scoped = scope_ok and fuse_norms
    if tuned:
        for name, mod in model.named_modules():
            if not norm_mod.is_norm(mod):
                continue
            reason = norm_mod.why_not(mod) if fuse_norms else "fuse_norms=False"
            if reason is None and isinstance(mod, nn.LayerNorm) and mod.weight is not None \
                    and mod.weight.device.type != "cuda" and backend != "triton" and not scoped:
                reason = ("nn.LayerNorm off CUDA: ATen's LayerNorm is already one fused op there (and "
                          "recompute='none' keeps its output)" if backbone is not None else
                          "nn.LayerNorm off CUDA: ATen's LayerNorm is already one fused op there")
            _apply(rep, norm_mod, "norm", name, mod, reason, backend, rebuild=scoped)
        # the residual add before each pre-norm block's post-attention RMSNorm joins that norm's op
        for name, mod in model.named_modules():
            if block_mod.is_block(mod):
                reason = block_mod.why_not(mod) if fuse_norms else "fuse_norms=False"
                _apply(rep, block_mod, "block", name, mod, reason, backend, rebuild_norms=recompute != "none")
    if tuned and ce_mod.causal_lm(model) is not None:
        reason = ce_mod.why_not(model) if fuse_loss else "fuse_loss=False (opt-in: training calls return logits=None)"
        if reason is None:
            ce_mod.install(model, ce_mod.LossPatchConfig(backend=backend))
        else:
            ce_mod.uninstall(model)
        rep.modules.append(PatchEntry(name="loss (lm_head + cross-entropy)", kind="loss", patched=reason is None,
                                      reason=reason))
    registrants = scoped and any(e.kind == "norm" and e.patched for e in rep.modules) or scope_ok and any(
        isinstance(m.__dict__.get("_peftfast_dense"), dense_mod.DenseMLPState)
        and m.__dict__["_peftfast_dense"].layout.kind in ("intermediate", "inline") for m in model.modules())
    if registrants:
        # the fused norms' outputs are rebuilt wherever in the stack they are saved (the next layer's q/k/v, an
        # unfused block's attention and MLP), not only inside fused blocks
        norm_mod.install_scope(backbone)
    elif backbone is not None:
        norm_mod.uninstall_scope(backbone)
    if not tuned:  # e.g. its adapters were removed since an earlier patch: undo what that patch fused
        unpatch(model)
    rep.notes = _model_notes(model, any(e.kind == "attention" and e.patched for e in rep.modules))
    model._peftfast_report = rep
    if not tuned:
        warnings.warn("peftfast.patch: the model has no PEFT LoRA layers, PEFT prompt learning or peftfast adapters; "
                      "returning it unchanged", stacklevel=2)
    elif not any(e.patched for e in [*rep.entries, *rep.modules]):
        warnings.warn("peftfast.patch: nothing in the model could be fused (peftfast.report(model) gives each "
                      "reason); returning it unchanged", stacklevel=2)
    else:
        logger.info(rep.summary())
        for e in rep.skipped:
            logger.info("peftfast: skipped %s: %s", e.name, e.reason)
    for n in rep.notes:
        logger.info("peftfast: %s", n)
    return model


def _backbone(model: nn.Module) -> nn.Module | None:
    """The decoder/encoder stack of a transformers model (``base_model``: GPT2Model in GPT2LMHeadModel), or None."""
    inner = attn_mod.base_model_of(model)
    return getattr(inner, "base_model", None) if inner is not None else None


def _apply(rep: PatchReport, feature, kind: str, name: str, mod: nn.Module, reason: str | None, backend: str,
           **options) -> None:
    """Install ``feature`` on ``mod`` when there is no reason against it (else undo an earlier install); report it."""
    if reason is None:
        feature.install(mod, name, backend, **options)
    else:
        feature.uninstall(mod)
    rep.modules.append(PatchEntry(name=name, kind=kind, patched=reason is None, reason=reason))


def _model_notes(model: nn.Module, attention_fused: bool) -> list[str]:
    """Parts of the model ``patch`` leaves on their own path, with the reason (nothing is skipped silently)."""
    notes = []
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        for name, cfg in configs.items():
            if getattr(cfg, "is_prompt_learning", False):
                kind = getattr(getattr(cfg, "peft_type", None), "value", type(cfg).__name__)
                where = ("the fused attention sees its virtual tokens / prefix keys, but PEFT still concatenates "
                         "prefix and sequence K/V per layer" if attention_fused else "the model's own attention")
                notes.append(f"adapter {name!r} ({kind}): its prompt encoder runs on PEFT's own path; {where}")
    if attention_fused and (softcap := attn_mod.dropped_softcap(model)) is not None:
        notes.append(softcap)
    from peftfast.patching.adapters import adapter_names

    if adapter_names(model):
        notes.append(f"bottleneck adapters {adapter_names(model)}: fused by their own modules "
                     "(peftfast.add_adapters), not by patch; patch fuses the frozen base around them")
    return notes


def _form_groups(patched: dict[str, nn.Module], rep: PatchReport) -> None:
    by_parent: dict[str, dict[str, nn.Module]] = {}
    for name, mod in patched.items():
        if nf4_mod.is_nf4_lora(mod) or getattr(mod, "lora_variant", None):
            # NF4 layers run one by one (no grouped NF4 op), and so do DoRA layers (a norm and magnitude each)
            mod._peftfast.group = None
            continue
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = mod
        mod._peftfast.group = None
    entries = {e.name: e for e in rep.entries}
    for parent, children in by_parent.items():
        if CROSS_ATTENTION.intersection(parent.split(".")):
            continue
        for sibs in SIBLING_SETS:
            names = sorted(sibs & children.keys(), key=lambda n: (len(n), n))
            if len(names) < 2:
                continue
            members = [children[n] for n in names]
            if len({m.in_features for m in members}) != 1:
                continue
            grp = lora_mod.SiblingGroup(members)
            label = f"{parent}.{{{','.join(names)}}}" if parent else "{" + ",".join(names) + "}"
            for i, m in enumerate(members):
                m._peftfast.group = grp
                m._peftfast.index = i
                entries[f"{parent}.{names[i]}" if parent else names[i]].group = label


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: every layer gets back exactly the forward it had before."""
    for _, mod in model.named_modules():
        if getattr(mod, "_peftfast", None) is not None:
            lora_mod.uninstall(mod)
        mlp_mod.uninstall(mod)
        moe_mod.uninstall(mod)
        dense_mod.uninstall(mod)
        rope_mod.uninstall(mod)
        block_mod.uninstall(mod)
        norm_mod.uninstall(mod)
    attn_mod.uninstall(model)
    backbone = _backbone(model)
    if backbone is not None:
        norm_mod.uninstall_scope(backbone)
    if ce_mod.causal_lm(model) is not None:
        ce_mod.uninstall(model)
    model.__dict__.pop("_peftfast_report", None)
    return model


def report(model: nn.Module) -> PatchReport:
    """The ``PatchReport`` of the last ``patch(model)`` (an empty one if the model is not patched)."""
    rep = model.__dict__.get("_peftfast_report")
    return rep if rep is not None else PatchReport()
