"""``quantize_base(model)``: store the frozen base weight of every PEFT LoRA-targeted ``nn.Linear`` in NF4 (QLoRA),
and ``dequantize_base(model)`` to go back to ``nn.Linear``.

Each targeted ``lora.Linear``'s ``base_layer`` becomes a :class:`~peftfast.modules.nf4.NF4Linear` (the bias is
kept as is); the 16/32-bit weight is dropped (freed unless something else still references it). Every layer is
validated before any is converted, so a bad input leaves the model untouched. ``peftfast.patch`` then runs those
layers on the fused NF4 path; unpatched, PEFT's forward calls ``NF4Linear.forward`` (dequantize + ``F.linear``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from peftfast.modules.nf4 import NF4Linear


@dataclass
class NF4Layer:
    name: str
    out_features: int
    in_features: int
    bytes_before: int
    bytes_after: int


@dataclass
class NF4Report:
    """What ``quantize_base`` converted: per layer and in total, bytes of the base weights before and after."""

    layers: list[NF4Layer] = field(default_factory=list)
    block_size: int = 64
    double_quant: bool = False

    @property
    def params(self) -> int:
        return sum(e.out_features * e.in_features for e in self.layers)

    @property
    def bytes_before(self) -> int:
        return sum(e.bytes_before for e in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(e.bytes_after for e in self.layers)

    @property
    def bytes_per_param(self) -> float:
        return self.bytes_after / max(self.params, 1)

    def __str__(self) -> str:
        mode = f"NF4, block {self.block_size}" + (", double quant" if self.double_quant else "")
        lines = [f"peftfast.quantize_base: {len(self.layers)} layer(s) to {mode}: {self.bytes_before / 2**20:.2f} MiB"
                 f" -> {self.bytes_after / 2**20:.2f} MiB ({self.bytes_per_param:.4f} bytes/param, "
                 f"{8 * self.bytes_per_param:.3f} bits)"]
        lines += [f"  {e.name}: [{e.out_features}, {e.in_features}] {e.bytes_before} -> {e.bytes_after} B"
                  for e in self.layers]
        return "\n".join(lines)


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora.layer import LoraLayer
    except Exception:  # pragma: no cover
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _holder(layer: nn.Module) -> nn.Module:
    """The module whose ``base_layer`` attribute is the innermost base layer."""
    m = layer
    while isinstance(getattr(m.base_layer, "base_layer", None), nn.Module):
        m = m.base_layer
    return m


def quantize_base(model: nn.Module, bits: int = 4, *, double_quant: bool = False, block_size: int = 64,
                  skip: tuple[str, ...] = ()) -> NF4Report:
    """NF4-quantize the frozen base weight of every PEFT LoRA layer over an ``nn.Linear``, in place.

    ``bits`` must be 4 (NF4); ``block_size``: elements per absmax (64 as QLoRA; 0.5625 byte/param), which must
    divide each layer's in_features; ``double_quant``: QLoRA's 8-bit absmax (about 0.5159 byte/param);
    ``skip``: layer names (or name suffixes) to leave in full precision. Raises ``ValueError`` naming the layer for
    a base that is not a frozen, materialised ``nn.Linear``, one that is already quantized, a merged adapter, a DoRA
    adapter (QDoRA goes through bitsandbytes' ``Linear4bit``, which PEFT's DoRA reads) or an in_features not
    divisible into blocks; nothing is converted then. Returns an :class:`NF4Report`.
    """
    if bits != 4:
        raise ValueError(f"peftfast.quantize_base: bits={bits} is not supported (only 4-bit NF4)")
    if block_size < 2 or block_size % 2:
        raise ValueError(f"peftfast.quantize_base: block_size must be even and >= 2, got {block_size}")
    if model.__dict__.get("_peftfast_report") is not None:
        raise ValueError("peftfast.quantize_base: the model is patched; call quantize_base before peftfast.patch "
                         "(or peftfast.unpatch first), so sibling groups and fused MLPs are planned for NF4 layers")
    todo = []
    for name, layer in _lora_layers(model):
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        base = layer.get_base_layer()
        where = f"peftfast.quantize_base: {name}"
        if isinstance(base, NF4Linear):
            raise ValueError(f"{where}: base layer is already NF4-quantized")
        if type(base) is not nn.Linear:
            raise ValueError(f"{where}: base layer {type(base).__module__}.{type(base).__name__} is not a plain "
                             "nn.Linear (only Linear LoRA bases are quantized)")
        w = base.weight
        if w.is_meta or not w.is_floating_point():
            raise ValueError(f"{where}: base weight is not a materialised floating tensor ({w.dtype}, {w.device})")
        if w.requires_grad:
            raise ValueError(f"{where}: base weight is trainable; QLoRA quantizes frozen weights only")
        if base.in_features % block_size:
            raise ValueError(f"{where}: in_features={base.in_features} is not divisible into blocks of {block_size}")
        if getattr(layer, "merged", False):
            raise ValueError(f"{where}: adapters are merged into the base weight; unmerge before quantizing")
        if any(getattr(layer, "use_dora", {}).values()):
            # PEFT's own DoRA forward reads module.weight as a float matrix: over NF4Linear's packed codes the model
            # would run only while patched, and not at all after unpatch
            raise ValueError(f"{where}: DoRA adapter; PEFT's DoRA forward cannot read an NF4Linear base. For QDoRA "
                             "load the model 4-bit with bitsandbytes (BitsAndBytesConfig(load_in_4bit=True, "
                             "bnb_4bit_quant_type='nf4')), which peftfast.patch runs fused")
        todo.append((name, layer, base))
    if not todo:
        raise ValueError("peftfast.quantize_base: the model has no PEFT LoRA layer over an nn.Linear to quantize")
    rep = NF4Report(block_size=block_size, double_quant=double_quant)
    for name, layer, base in todo:
        before = base.weight.numel() * base.weight.element_size()
        q = NF4Linear.from_linear(base, block_size=block_size, double_quant=double_quant)
        _holder(layer).base_layer = q
        rep.layers.append(NF4Layer(name, base.out_features, base.in_features, before, q.nbytes()))
    model._peftfast_nf4_report = rep
    return rep


def dequantize_base(model: nn.Module) -> int:
    """Inverse of :func:`quantize_base` (up to the quantization error); as for it, call it on an unpatched model.
    Replace every ``NF4Linear`` base of the model's PEFT LoRA layers by an ``nn.Linear`` holding the dequantized
    weight (frozen, in the compute dtype; the bias object is kept). Returns the number of layers restored."""
    count = 0
    for _, layer in _lora_layers(model):
        base = layer.get_base_layer()
        if not isinstance(base, NF4Linear):
            continue
        w = base.dequantize()
        lin = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        lin.bias = base.bias
        _holder(layer).base_layer = lin
        count += 1
    model.__dict__.pop("_peftfast_nf4_report", None)
    return count


def is_nf4_base(module: nn.Module) -> bool:
    return isinstance(module, NF4Linear)


__all__ = ["NF4Layer", "NF4Report", "dequantize_base", "quantize_base"]
