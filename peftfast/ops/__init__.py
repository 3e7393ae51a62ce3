"""Launchers, autograd Functions and backend dispatch for the fused ops."""

from peftfast.ops.lora import MAX_RANK, draw_seed, dropout_keep_mask, lora_linear, lora_linear_group

__all__ = ["MAX_RANK", "draw_seed", "dropout_keep_mask", "lora_linear", "lora_linear_group"]
