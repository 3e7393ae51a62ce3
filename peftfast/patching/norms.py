"""``install_norms`` / ``uninstall_norms``: run a model's RMSNorm and LayerNorm modules on the fused norm ops.

Patching is per instance and reversible: ``module.forward`` is rebound to ``functools.partial(<fused forward>,
module)`` (so deepcopy and pickle carry it to the copy), and the module's previous instance-level ``forward``, if
any, is restored by ``uninstall_norms``. Norm parameters keep their ``requires_grad``: a frozen weight gets no
gradient computed at all.
"""

from __future__ import annotations

from torch import nn

from peftfast.modules import norm as norm_mod
from peftfast.ops._backend import BACKENDS


def install_norms(model: nn.Module, backend: str = "auto") -> list[tuple[str, str | None]]:
    """Patch every norm module of ``model`` that ``why_not`` accepts.

    Returns one ``(qualified name, reason)`` per recognised norm module: reason None when patched (or already
    patched: then only its backend is updated), else why it was left alone.
    """
    if backend not in BACKENDS:
        raise ValueError(f"peftfast.install_norms: unknown backend {backend!r}; choose one of {BACKENDS}")
    out: list[tuple[str, str | None]] = []
    for name, mod in model.named_modules():
        if not norm_mod.is_norm(mod):
            continue
        reason = norm_mod.why_not(mod)
        if reason is None:
            norm_mod.install(mod, name, backend)
        out.append((name, reason))
    return out


def uninstall_norms(model: nn.Module) -> list[str]:
    """Undo ``install_norms``: every patched norm gets its original ``forward`` back. Returns their names."""
    return [name for name, mod in model.named_modules() if norm_mod.uninstall(mod)]
