"""peftfast: fused kernels for parameter-efficient fine-tuning of Hugging Face models.

One call, ``peftfast.patch(model)``, runs a PEFT model's LoRA layers on fused Triton (GPU) or ATen (CPU) paths
with the same losses and gradients, less saved activation memory and fewer kernel launches.
"""

from peftfast.ops.lora import lora_linear, lora_linear_group
from peftfast.patching import PatchReport, patch, report, unpatch

__version__ = "0.1.0"
__all__ = ["PatchReport", "__version__", "lora_linear", "lora_linear_group", "patch", "report", "unpatch"]
