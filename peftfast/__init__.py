"""peftfast: fused kernels for parameter-efficient fine-tuning of Hugging Face models.

One call, ``peftfast.patch(model)``, runs a PEFT model's LoRA layers on fused Triton (GPU) or ATen (CPU) paths
with the same losses and gradients, less saved activation memory and fewer kernel launches;
``peftfast.add_adapters(model, AdapterConfig(...))`` adds fused bottleneck Adapters.
"""

from peftfast import training
from peftfast.modules.adapter import AdapterConfig, BottleneckAdapter
from peftfast.ops.adapter import adapter_forward
from peftfast.ops.lora import lora_linear, lora_linear_group
from peftfast.ops.moe import ExpertGate, ExpertStack, experts_lora
from peftfast.patching import PatchReport, patch, report, unpatch
from peftfast.patching.adapters import (
    adapter_names,
    add_adapters,
    load_adapters,
    remove_adapters,
    save_adapters,
    set_active_adapter,
    set_adapter_backend,
)
from peftfast.patching.nf4 import NF4Report, dequantize_base, quantize_base

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig", "BottleneckAdapter", "ExpertGate", "ExpertStack", "NF4Report", "PatchReport", "__version__",
    "adapter_forward", "adapter_names", "add_adapters", "dequantize_base", "experts_lora", "load_adapters",
    "lora_linear", "lora_linear_group", "patch", "quantize_base", "remove_adapters", "report", "save_adapters",
    "set_active_adapter", "set_adapter_backend", "training", "unpatch",
]
