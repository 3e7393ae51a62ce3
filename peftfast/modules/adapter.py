"""Bottleneck Adapter modules and the forward hooks that place them in a transformer block."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peftfast.ops.adapter import ACTIVATIONS, MAX_BOTTLENECK, adapter_forward

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")


@dataclass
class AdapterConfig:
    """A bottleneck Adapter configuration (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al. 2022).

    placement: ``houlsby`` (after attention and after the FFN), ``pfeiffer`` (after the FFN only) or ``parallel``
    (beside the FFN, reading its input). Width: ``bottleneck_size``, else ``hidden_size // reduction_factor``.
    ``layer_norm`` adds a LayerNorm on the adapter input (pre-LN variant). ``scaling`` multiplies the up-projection;
    ``learned_scaling`` makes it a trainable scalar. The up-projection starts at zero, so a new adapter is the
    identity. ``layers`` (indices of blocks to include; None = all) and ``leave_out`` select the blocks.
    """

    placement: str = "pfeiffer"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    activation: str = "relu"
    layer_norm: bool = False
    scaling: float = 1.0
    learned_scaling: bool = False
    bias: bool = True
    init_std: float = 1e-2
    layers: list[int] | None = None
    leave_out: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"AdapterConfig: placement {self.placement!r} is not one of {PLACEMENTS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig: activation {self.activation!r} is not one of {list(ACTIVATIONS)}")
        if self.bottleneck_size is None and (not isinstance(self.reduction_factor, int) or self.reduction_factor < 1):
            raise ValueError(f"AdapterConfig: reduction_factor must be a positive int, got {self.reduction_factor!r}")
        if self.bottleneck_size is not None and not 1 <= self.bottleneck_size <= MAX_BOTTLENECK:
            raise ValueError(f"AdapterConfig: bottleneck_size must be in 1..{MAX_BOTTLENECK}, "
                             f"got {self.bottleneck_size}")
        self.leave_out = list(self.leave_out)
        if self.layers is not None:
            self.layers = list(self.layers)

    def width(self, hidden_size: int) -> int:
        h = self.bottleneck_size or max(1, hidden_size // self.reduction_factor)
        if h > MAX_BOTTLENECK:
            raise ValueError(f"AdapterConfig: bottleneck {h} (hidden {hidden_size} / reduction_factor "
                             f"{self.reduction_factor}) exceeds {MAX_BOTTLENECK}; raise reduction_factor or set "
                             "bottleneck_size")
        return h

    def sites(self) -> tuple[str, ...]:
        return ("attn", "ffn") if self.placement == "houlsby" else ("ffn",)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class BottleneckAdapter(nn.Module):
    """``h = res + s · act(LN?(x) W_downᵀ + b_down) W_upᵀ + b_up``; ``res`` is ``x`` unless given (parallel).

    ``fused=True`` runs the fused op (Triton on CUDA, the C++ kernels on CPU, else the torch backend): saved for
    backward are the input and the bottleneck pre-activation only. ``fused=False`` is the plain eager reference.
    """

    def __init__(self, hidden_size: int, config: AdapterConfig, *, device=None, dtype=None):
        super().__init__()
        width = config.width(hidden_size)
        self.config = config
        self.down = nn.Linear(hidden_size, width, bias=config.bias, device=device, dtype=dtype)
        self.up = nn.Linear(width, hidden_size, bias=config.bias, device=device, dtype=dtype)
        self.layer_norm = nn.LayerNorm(hidden_size, device=device, dtype=dtype) if config.layer_norm else None
        if config.learned_scaling:
            self.scaling = nn.Parameter(torch.full((), float(config.scaling), device=device, dtype=dtype))
        else:
            self.scaling = float(config.scaling)
        self.fused = True
        self.backend = "auto"
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=config.init_std)
            if self.down.bias is not None:
                self.down.bias.zero_()
            self.up.weight.zero_()
            if self.up.bias is not None:
                self.up.bias.zero_()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        inp = x if self.layer_norm is None else self.layer_norm(x)
        res = x if residual is None else residual
        if self.fused:
            # with the pre-LN variant the residual is x, not LN(x): pass it explicitly
            explicit = residual is not None or self.layer_norm is not None
            return adapter_forward(inp, self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.scaling,
                                   act=self.config.activation, residual=res if explicit else None,
                                   backend=self.backend, name=self._name())
        z = F.linear(inp, self.down.weight, self.down.bias)
        act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu,
               "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[self.config.activation]
        out = res + self.scaling * F.linear(act(z), self.up.weight)
        return out if self.up.bias is None else out + self.up.bias

    def _name(self) -> str:
        return getattr(self, "_peftfast_name", "adapter")

    def extra_repr(self) -> str:
        c = self.config
        return f"placement={c.placement}, act={c.activation}, scaling={c.scaling}, fused={self.fused}"


class AdapterSlot(nn.Module):
    """The adapters of one site (after attention or at the FFN) of one block; one of them active at a time."""

    def __init__(self, site: str):
        super().__init__()
        self.site = site
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self._stash: torch.Tensor | None = None

    def current(self) -> BottleneckAdapter | None:
        if self.active is None or self.active not in self.adapters:
            return None
        return self.adapters[self.active]

    def run(self, out: torch.Tensor, ffn_input: torch.Tensor | None) -> torch.Tensor:
        ad = self.current()
        if ad is None:
            return out
        if ad.config.placement == "parallel":
            if ffn_input is None:
                raise RuntimeError(f"peftfast adapter {ad._name()!r}: the FFN input was not captured for the "
                                   "parallel adapter")
            return ad(ffn_input, residual=out)
        return ad(out)


class OutputHook:
    """Forward hook applying a slot's active adapter to a module's output (``output[0]`` for tuples).

    ``input_from``: where a parallel adapter reads the FFN input: ``"args0"`` (this module's first argument,
    e.g. a Llama MLP) or ``"stash"`` (captured by a :class:`StashHook` on another module, e.g. BERT's output).
    """

    def __init__(self, slot: AdapterSlot, input_from: str):
        self.slot = slot
        self.input_from = input_from

    def __call__(self, module: nn.Module, args: tuple, output):
        ffn_input = args[0] if self.input_from == "args0" and args else self.slot._stash
        self.slot._stash = None
        if isinstance(output, tuple):
            return (self.slot.run(output[0], ffn_input), *output[1:])
        return self.slot.run(output, ffn_input)


class StashHook:
    """Forward pre-hook keeping argument ``index`` of a module for a parallel adapter applied further down."""

    def __init__(self, slot: AdapterSlot, index: int):
        self.slot = slot
        self.index = index

    def __call__(self, module: nn.Module, args: tuple):
        self.slot._stash = args[self.index] if len(args) > self.index else None
        return None


def adapter_param_count(hidden: int, config: AdapterConfig) -> int:
    h = config.width(hidden)
    n = 2 * hidden * h + (h + hidden if config.bias else 0)
    n += 2 * hidden if config.layer_norm else 0
    n += 1 if config.learned_scaling else 0
    return n * len(config.sites())
