"""Install the fused linear cross-entropy loss on a causal LM (see ``peftfast.modules.cross_entropy``)."""

from __future__ import annotations

from torch import nn

from peftfast.modules import cross_entropy as ce_mod
from peftfast.ops._backend import BACKENDS


def install_loss(model: nn.Module, backend: str = "auto", *, keep_logits: bool = False,
                 chunk_size: int | None = None) -> tuple[bool, str | None]:
    """Route ``model``'s labelled forward calls through the fused loss; ``(True, None)`` when patched, else
    ``(False, reason)`` with the model left unpatched (a previous install is undone). Idempotent."""
    if backend not in BACKENDS:
        raise ValueError(f"peftfast: unknown backend {backend!r}; choose one of {BACKENDS}")
    reason = ce_mod.why_not(model)
    if reason is not None:
        ce_mod.uninstall(model)
        return False, reason
    ce_mod.install(model, ce_mod.LossPatchConfig(backend=backend, keep_logits=keep_logits, chunk_size=chunk_size))
    return True, None


def uninstall_loss(model: nn.Module) -> None:
    """Undo ``install_loss``: the causal LM gets back exactly the forward it had."""
    ce_mod.uninstall(model)


def loss_stats(model: nn.Module) -> dict | None:
    """Fused calls, calls without labels and fallback reasons with counts; None when the loss is not installed."""
    return ce_mod.stats(model)
