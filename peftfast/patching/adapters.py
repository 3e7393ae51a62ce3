"""``add_adapters`` / ``set_active_adapter`` / ``save_adapters`` / ``load_adapters`` / ``remove_adapters``.

Adapters are attached in place with forward hooks on whole sublayers (a decoder's attention and MLP modules, an
encoder's output dropouts), so they compose with PEFT LoRA and with ``peftfast.patch`` on the linear layers
inside. Where they sit:

    decoder (Llama, Mistral, Qwen2, ...; GPT-2):  attn = the attention module's output, ffn = the MLP's output
    encoder (BERT, RoBERTa):                       attn / ffn = after the dropout of BertSelfOutput / BertOutput,
                                                   before its residual LayerNorm (as in Houlsby et al.)
    parallel: the adapter reads the FFN input (the MLP's argument; BERT's attention output) and adds to its output.

Adapter parameters live under ``<block>.peftfast_adapters.<site>.adapters.<name>`` and are the only trainable
parameters after ``add_adapters`` (plus a classification head and ``also_train`` matches when asked).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from peftfast.modules.adapter import AdapterConfig, AdapterSlot, BottleneckAdapter, OutputHook, StashHook

CONFIG_FILE = "peftfast_adapter_config.json"
WEIGHTS_FILE = "peftfast_adapter.safetensors"
_HEAD_NAMES = ("classifier", "score", "qa_outputs", "pooler")
_STATE = "_peftfast_adapter_state"


@dataclass
class Block:
    index: int
    name: str
    module: nn.Module
    kind: str  # "decoder" or "encoder"

    def site_module(self, site: str) -> nn.Module:
        m = self.module
        if self.kind == "decoder":
            return _decoder_attention(m) if site == "attn" else m.mlp
        return m.attention.output.dropout if site == "attn" else m.output.dropout

    def stash_module(self) -> tuple[nn.Module, int] | None:
        """Where a parallel adapter's FFN input comes from when the hooked module does not receive it."""
        return (self.module.output, 1) if self.kind == "encoder" else None


_DECODER_ATTENTION = ("self_attn", "attn", "self_attention", "attention")  # Llama, GPT-2, Falcon/BLOOM, GPT-NeoX


def _decoder_attention(m: nn.Module) -> nn.Module | None:
    return next((a for a in map(m._modules.get, _DECODER_ATTENTION) if isinstance(a, nn.Module)), None)


def find_blocks(model: nn.Module) -> list[Block]:
    """Transformer blocks in forward order, recognised by structure (not by class name)."""
    blocks = []
    for name, m in model.named_modules():
        if _decoder_attention(m) is not None and isinstance(m._modules.get("mlp"), nn.Module) and \
                "intermediate" not in m._modules:
            blocks.append(Block(len(blocks), name, m, "decoder"))
        elif (hasattr(m, "attention") and hasattr(m, "intermediate") and hasattr(m, "output")
              and isinstance(getattr(getattr(m.attention, "output", None), "dropout", None), nn.Module)
              and isinstance(getattr(m.output, "dropout", None), nn.Module)):
            blocks.append(Block(len(blocks), name, m, "encoder"))
    return blocks


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    raise ValueError(f"peftfast.add_adapters: cannot tell the hidden size of {type(model).__name__} (no config)")


def _param_like(block: nn.Module) -> torch.Tensor:
    for p in block.parameters():
        if p.is_floating_point():
            return p
    raise ValueError("peftfast.add_adapters: block has no floating-point parameters")


def _state(model: nn.Module) -> dict:
    st = model.__dict__.get(_STATE)
    if st is None:
        st = {"configs": {}, "active": None, "requires_grad": None}
        model.__dict__[_STATE] = st
    return st


def _slots(block: nn.Module) -> nn.ModuleDict:
    if "peftfast_adapters" not in block._modules:
        block.peftfast_adapters = nn.ModuleDict()
    return block.peftfast_adapters


def _install_hooks(block: Block, slot: AdapterSlot, site: str) -> None:
    target = block.site_module(site)
    if not any(isinstance(h, OutputHook) and h.slot is slot for h in target._forward_hooks.values()):
        target.register_forward_hook(OutputHook(slot, "stash" if block.kind == "encoder" else "args0"))
    stash = block.stash_module()
    if site == "ffn" and stash is not None:
        mod, index = stash
        if not any(isinstance(h, StashHook) and h.slot is slot for h in mod._forward_pre_hooks.values()):
            mod.register_forward_pre_hook(StashHook(slot, index))


def _remove_hooks(model: nn.Module, slots: set[int]) -> None:
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key, h in list(hooks.items()):
                if isinstance(h, (OutputHook, StashHook)) and id(h.slot) in slots:
                    del hooks[key]


def _selected(config: AdapterConfig, blocks: list[Block]) -> list[Block]:
    n = len(blocks)
    for i in [*(config.layers or []), *config.leave_out]:
        if not -n <= i < n:
            raise ValueError(f"peftfast.add_adapters: layer index {i} out of range for {n} blocks")
    include = set(range(n)) if config.layers is None else {i % n for i in config.layers}
    return [b for b in blocks if b.index in include - {i % n for i in config.leave_out}]


def add_adapters(model: nn.Module, config: AdapterConfig | None = None, name: str = "default", *,
                 train_head: bool = False, also_train: Iterable[str] = (), freeze: bool = True) -> nn.Module:
    """Add a named bottleneck Adapter to every selected block, make it the active one, and freeze the rest.

    ``train_head`` keeps a classification head (``classifier``/``score``/...) trainable; ``also_train`` keeps
    parameters whose name contains any of the given strings trainable (e.g. ``("lora_",)`` to train PEFT LoRA
    beside the adapters). Works on ``PeftModel`` and plain transformers models, decoder and encoder families.
    """
    config = config or AdapterConfig()
    if not name or "." in name:
        raise ValueError(f"peftfast.add_adapters: adapter name {name!r} must be non-empty and contain no '.'")
    st = _state(model)
    if name in st["configs"]:
        raise ValueError(f"peftfast.add_adapters: an adapter named {name!r} already exists; remove it first")
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(f"peftfast.add_adapters: found no transformer blocks in {type(model).__name__} "
                         "(supported: decoder blocks with attention + mlp, BERT-style encoder blocks)")
    chosen = _selected(config, blocks)
    if not chosen:
        raise ValueError("peftfast.add_adapters: the layers/leave_out selection leaves no block")
    hidden = _hidden_size(model)
    if st["requires_grad"] is None:
        st["requires_grad"] = {n: p.requires_grad for n, p in model.named_parameters()}
    for block in chosen:
        ref = _param_like(block.module)
        slots = _slots(block.module)
        for site in config.sites():
            if site not in slots:
                slots[site] = AdapterSlot(site)
            slot = slots[site]
            ad = BottleneckAdapter(hidden, config, device=ref.device, dtype=ref.dtype)
            ad._peftfast_name = f"{name}@{block.name or block.index}.{site}"
            slot.adapters[name] = ad
            _install_hooks(block, slot, site)
    st["configs"][name] = config
    set_active_adapter(model, name)
    if freeze:
        keep = tuple(also_train) + (_HEAD_NAMES if train_head else ())
        for pname, p in model.named_parameters():
            in_adapter = ".peftfast_adapters." in f".{pname}"
            if in_adapter:
                continue
            p.requires_grad_(any(k in pname for k in keep))
    return model


def _adapters(model: nn.Module, name: str | None = None):
    for block in find_blocks(model):
        slots = block.module._modules.get("peftfast_adapters")
        if slots is None:
            continue
        for site, slot in slots.items():
            for n, ad in slot.adapters.items():
                if name is None or n == name:
                    yield block, site, slot, n, ad


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters added to ``model`` (without side effects on a model that has none)."""
    st = model.__dict__.get(_STATE)
    return list(st["configs"]) if st else []


def set_active_adapter(model: nn.Module, name: str | None, *, train: bool = True) -> None:
    """Make ``name`` the active adapter everywhere (None: none active); with ``train`` only it is trainable."""
    if name is not None and name not in adapter_names(model):
        raise KeyError(f"peftfast.set_active_adapter: no adapter named {name!r}; have {adapter_names(model)}")
    st = _state(model)
    for block in find_blocks(model):
        slots = block.module._modules.get("peftfast_adapters")
        for slot in (slots.values() if slots is not None else ()):
            slot.active = name
            for n, ad in slot.adapters.items():
                ad.requires_grad_(train and n == name)
    st["active"] = name


def set_adapter_backend(model: nn.Module, *, fused: bool = True, backend: str = "auto") -> None:
    """Switch every adapter between the fused op (``backend`` auto/triton/torch) and the eager reference."""
    for *_, ad in _adapters(model):
        ad.fused, ad.backend = fused, backend


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The named adapter's tensors keyed ``<block index>.<site>.<param>`` (independent of the wrapping model)."""
    out = {}
    for block, site, _, _, ad in _adapters(model, name):
        for k, v in ad.state_dict().items():
            out[f"{block.index}.{site}.{k}"] = v.detach()
    if not out:
        raise KeyError(f"peftfast: no adapter named {name!r} in {type(model).__name__}")
    return out


def save_adapters(model: nn.Module, path: str, name: str = "default") -> None:
    """Write the adapter ``name`` to ``path``: ``peftfast_adapter.safetensors`` + ``peftfast_adapter_config.json``."""
    from safetensors.torch import save_file

    if name not in adapter_names(model):
        raise KeyError(f"peftfast.save_adapters: no adapter named {name!r}; have {adapter_names(model)}")
    st = _state(model)
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    save_file(tensors, os.path.join(path, WEIGHTS_FILE))
    meta = {"name": name, "config": st["configs"][name].to_dict(), "hidden_size": _hidden_size(model),
            "num_blocks": len(find_blocks(model)), "format": "peftfast-adapter/1"}
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def load_adapters(model: nn.Module, path: str, name: str | None = None, **add_kwargs) -> nn.Module:
    """Add the adapter saved at ``path`` to ``model`` (a fresh model of the same shape) and load its weights."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"peftfast.load_adapters: {cfg_path} not found")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("hidden_size") != _hidden_size(model) or meta.get("num_blocks") != len(find_blocks(model)):
        raise ValueError(f"peftfast.load_adapters: adapter was saved for hidden {meta.get('hidden_size')} with "
                         f"{meta.get('num_blocks')} blocks; this model has {_hidden_size(model)} and "
                         f"{len(find_blocks(model))}")
    name = name or meta["name"]
    add_adapters(model, AdapterConfig.from_dict(meta["config"]), name, **add_kwargs)
    tensors = load_file(os.path.join(path, WEIGHTS_FILE))
    seen = set()
    for block, site, _, _, ad in _adapters(model, name):
        prefix = f"{block.index}.{site}."
        own = {k: tensors[prefix + k] for k in ad.state_dict() if prefix + k in tensors}
        missing = set(ad.state_dict()) - set(own)
        if missing:
            raise ValueError(f"peftfast.load_adapters: {path} lacks {sorted(missing)} for block {block.index} {site}")
        ad.load_state_dict(own)
        seen |= {prefix + k for k in own}
    extra = set(tensors) - seen
    if extra:
        warnings.warn(f"peftfast.load_adapters: ignored {len(extra)} tensors not matching this model's blocks",
                      stacklevel=2)
    return model


def remove_adapters(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove adapter ``name`` (all adapters when None); removing the last one restores the model exactly."""
    have = adapter_names(model)
    names = have if name is None else [name]
    for n in names:
        if n not in have:
            raise KeyError(f"peftfast.remove_adapters: no adapter named {n!r}; have {have}")
    if not names:
        return model
    st = _state(model)
    for block in find_blocks(model):
        slots = block.module._modules.get("peftfast_adapters")
        if slots is None:
            continue
        dead = set()
        for site in list(slots):
            slot = slots[site]
            for n in names:
                if n in slot.adapters:
                    del slot.adapters[n]
            if len(slot.adapters) == 0:
                dead.add(id(slot))
                del slots[site]
        if dead:
            _remove_hooks(model, dead)
        if len(slots) == 0:
            del block.module._modules["peftfast_adapters"]
    for n in names:
        del st["configs"][n]
    if not st["configs"]:
        flags = st["requires_grad"] or {}
        for pname, p in model.named_parameters():
            if pname in flags:
                p.requires_grad_(flags[pname])
        del model.__dict__[_STATE]
    elif st["active"] in names:
        set_active_adapter(model, next(iter(st["configs"])))
    return model
