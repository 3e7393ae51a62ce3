"""``NF4Linear``: a frozen ``nn.Linear`` whose weight is stored in NF4 (QLoRA 4-bit NormalFloat).

Buffers (no parameters: nothing here trains): ``weight`` [N, K/2] uint8 (two codes per byte, bitsandbytes'
order), and either ``absmax`` [N, K/block_size] fp32 or, with double quantization, ``absmax_q`` [N·K/block_size]
uint8, ``absmax_code`` [256] fp32, ``absmax_scale`` [ceil(N·K/block_size/256)] fp32 and ``absmax_offset`` [] fp32;
``bias`` [N] (kept in its dtype; it may train). The plain ``forward`` dequantizes W to ``compute_dtype`` and calls
``F.linear`` — the reference path PEFT's own (unpatched) LoRA forward takes; ``peftfast.patch`` runs PEFT LoRA
layers over an ``NF4Linear`` on the fused NF4 kernels instead, which never build the 16-bit W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftfast.modules._bind import base_of
from peftfast.ops import nf4 as nf4_ops


class NF4Linear(nn.Module):
    """Frozen NF4 linear layer ``y = x Wᵀ + b`` (see the module docstring for the stored state)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, block_size: int = 64,
                 double_quant: bool = False, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        if in_features % block_size or block_size % 2:
            raise ValueError(f"peftfast: NF4Linear: in_features={in_features} is not divisible into blocks of "
                             f"{block_size} (an even block size)")
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_quant, self.compute_dtype = block_size, double_quant, compute_dtype
        nblk = out_features * in_features // block_size
        self.register_buffer("weight", torch.zeros((out_features, in_features // 2), dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax_q", torch.zeros(nblk, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_code", torch.zeros(256, dtype=torch.float32, device=device))
            self.register_buffer("absmax_scale", torch.zeros(-(-nblk // nf4_ops.DQ_BLOCK), dtype=torch.float32,
                                                             device=device))
            self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros((out_features, in_features // block_size),
                                                       dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, block_size: int = 64, double_quant: bool = False) -> NF4Linear:
        """Quantize ``linear.weight`` (any float dtype, CPU or CUDA); the bias is shared, not copied."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bias=False, block_size=block_size,
                  double_quant=double_quant, compute_dtype=w.dtype, device="meta")
        q, absmax = nf4_ops.quantize_nf4(w, block_size)
        mod.weight = q
        mod._set_absmax(absmax)
        mod.bias = linear.bias
        return mod

    def _set_absmax(self, absmax: torch.Tensor) -> None:
        if self.double_quant:
            self.absmax_q, self.absmax_code, self.absmax_scale, self.absmax_offset = nf4_ops.double_quantize(absmax)
        else:
            self.absmax = absmax

    def absmax_state(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """fp32 absmax, or the double-quantized ``(q2, code2, scale2, offset)`` the fused op expands per call."""
        if self.double_quant:
            return self.absmax_q, self.absmax_code, self.absmax_scale, self.absmax_offset
        return self.absmax

    def absmax_fp32(self) -> torch.Tensor:
        """absmax as fp32 ``[N, K/block_size]`` (expanded from the double-quantized form when needed)."""
        if self.double_quant:
            return nf4_ops.dequantize_absmax(self.absmax_q, self.absmax_code, self.absmax_scale, self.absmax_offset,
                                             (self.out_features, self.in_features // self.block_size))
        return self.absmax.float()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W ``[N, K]`` in ``dtype`` (default: the compute dtype)."""
        return nf4_ops.dequantize_nf4(self.weight, self.absmax_fp32(), self.block_size, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W in the compute dtype, exactly what nn.Linear would hold (so dtype errors and autocast behave the same)
        return F.linear(x, self.dequantize(), self.bias)

    def nbytes(self) -> int:
        """Bytes of the quantized state (codes, absmax or its double-quantized form; the bias not counted)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


# ----------------------------------------------------------------------------------------------------------------
# PEFT LoRA layers over an NF4 base (NF4Linear, or bitsandbytes' Linear4bit in the same layout)
# ----------------------------------------------------------------------------------------------------------------
def _is_bnb_4bit(base: nn.Module) -> bool:
    cls = type(base)
    return cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")


def is_nf4_base(base: nn.Module) -> bool:
    """True for an ``NF4Linear`` or a bitsandbytes ``Linear4bit`` (eligibility: :func:`why_not_base`)."""
    return isinstance(base, NF4Linear) or _is_bnb_4bit(base)


def is_nf4_lora(layer: nn.Module) -> bool:
    """A PEFT ``lora.Linear`` (or PEFT's bitsandbytes ``Linear4bit`` LoRA layer) whose base is NF4."""
    cls = type(layer)
    peft_cls = (cls.__module__, cls.__name__) in (("peft.tuners.lora.layer", "Linear"),
                                                  ("peft.tuners.lora.bnb", "Linear4bit"))
    return peft_cls and is_nf4_base(base_of(layer))


def why_not_base(base: nn.Module) -> str | None:
    """None if the fused NF4 path can read this base layer's quantized state, else why not."""
    if isinstance(base, NF4Linear):
        if base.weight.is_meta:
            return "NF4 base weight is not materialised"
        return None
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is None or not getattr(w, "bnb_quantized", True):
        return "bitsandbytes Linear4bit is not quantized yet (move it to its device first)"
    if qs.quant_type != "nf4":
        return f"bitsandbytes Linear4bit quant_type {qs.quant_type!r} is not nf4"
    n, k = base.out_features, base.in_features
    bs = qs.blocksize
    if bs % 2 or k % bs or tuple(qs.shape) != (n, k) or w.numel() * 2 != n * k or w.dtype != torch.uint8:
        return f"bitsandbytes Linear4bit layout (blocksize {bs}, shape {tuple(qs.shape)}) is not row-blocked NF4"
    if qs.code.numel() != 16 or not torch.allclose(qs.code.float().cpu(), nf4_ops.nf4_code()):
        return "bitsandbytes Linear4bit code table is not the NF4 table"
    if qs.nested and (qs.state2.blocksize != nf4_ops.DQ_BLOCK or qs.state2.code.numel() != 256):
        return f"bitsandbytes nested absmax blocksize {qs.state2.blocksize} is not {nf4_ops.DQ_BLOCK}"
    return None


def nf4_state(base: nn.Module):
    """``(qweight [N, K/2], absmax state, block_size, compute dtype or None)`` of an NF4 base layer (no copies)."""
    if isinstance(base, NF4Linear):
        return base.weight, base.absmax_state(), base.block_size, base.compute_dtype
    qs = base.weight.quant_state
    q = base.weight.data.view(base.out_features, base.in_features // 2)
    if qs.nested:
        off = torch.as_tensor(qs.offset, dtype=torch.float32, device=q.device)
        am = (qs.absmax, qs.state2.code.float(), qs.state2.absmax.float(), off)
    else:
        am = qs.absmax.float().view(base.out_features, base.in_features // qs.blocksize)
    return q, am, qs.blocksize, base.compute_dtype


def call_reason(layer: nn.Module, x: torch.Tensor) -> str | None:
    """A reason to let PEFT's own forward serve this call (bitsandbytes computing in another dtype), else None."""
    base = layer.get_base_layer()
    if _is_bnb_4bit(base) and base.compute_dtype not in (None, x.dtype):
        return f"bitsandbytes compute_dtype {base.compute_dtype} differs from the input dtype {x.dtype}"
    return None


def _checked_state(layer: nn.Module, x: torch.Tensor, name: str):
    base = layer.get_base_layer()
    q, am, bs, cdt = nf4_state(base)
    if x.shape[-1] != base.in_features:
        raise ValueError(f"peftfast: {name}: input has {x.shape[-1]} features in its last dimension, expected "
                         f"{base.in_features}")
    if x.device != q.device:
        raise ValueError(f"peftfast: {name}: input is on {x.device}, the layer on {q.device}")
    bias = base.bias
    if bias is not None and _is_bnb_4bit(base) and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # bitsandbytes adds its bias in the compute dtype (the input's: see call_reason)
    return base, bias, q, am, bs, cdt


def run_lora(layer: nn.Module, adapter: str, p: float, x: torch.Tensor, backend: str, name: str) -> torch.Tensor:
    """PEFT's LoRA forward over an NF4 base on the fused NF4 op (one layer; no sibling grouping)."""
    base, bias, q, am, bs, cdt = _checked_state(layer, x, name)
    a, b = layer.lora_A[adapter], layer.lora_B[adapter]
    args = [x, bias, a.weight, b.weight, b.bias]
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        args = [t.to(dt) if t is not None else None for t in args]
    elif isinstance(base, NF4Linear) and x.dtype != cdt:
        raise TypeError(f"peftfast: {name}: input dtype {x.dtype} does not match the NF4 base's compute dtype {cdt}")
    x, bias, aw, bw, lb = args
    with torch.autocast(dev, enabled=False):
        return nf4_ops.nf4_lora_linear(x, q, am, bias, aw, bw, float(layer.scaling[adapter]), lora_bias=lb,
                                       dropout_p=p, block_size=bs, backend=backend, name=name)


def run_dora(layer: nn.Module, adapter: str, p: float, x: torch.Tensor, backend: str, name: str) -> torch.Tensor:
    """PEFT's DoRA forward over an NF4 base (QDoRA) on :func:`peftfast.ops.nf4.nf4_dora_linear` (one layer; the
    caller leaves autocast to PEFT's forward, as for DoRA over a dense base)."""
    base, bias, q, am, bs, cdt = _checked_state(layer, x, name)
    if cdt is not None and x.dtype != cdt:
        raise TypeError(f"peftfast: {name}: input dtype {x.dtype} does not match the NF4 base's compute dtype {cdt}")
    a, b = layer.lora_A[adapter], layer.lora_B[adapter]
    mag = layer.lora_magnitude_vector[adapter].weight
    return nf4_ops.nf4_dora_linear(x, q, am, bias, a.weight, b.weight, float(layer.scaling[adapter]), mag,
                                   dropout_p=p, block_size=bs, backend=backend, name=name)


__all__ = ["NF4Linear", "is_nf4_base", "is_nf4_lora", "run_dora", "run_lora", "why_not_base"]
