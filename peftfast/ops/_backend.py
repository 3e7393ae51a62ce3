"""Backend choice: Triton on CUDA (or on CPU under ``TRITON_INTERPRET=1``), the C++ kernels of ``peftfast._C`` on
CPU when the extension is built, ATen (``torch``) elsewhere. An op without a C++ kernel treats ``cpp`` as ``torch``."""

from __future__ import annotations

import os

import torch

from peftfast import _ext

BACKENDS = ("auto", "triton", "torch", "cpp")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (read at kernel decoration time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON: list = []  # the answer, once: a plain global, which Dynamo reads as a constant where a functools cache
# wrapper would be traced through (with a warning) in every compiled forward that resolves a backend


def triton_available() -> str | None:
    """None when Triton imports, else the reason it does not."""
    if not _TRITON:
        try:
            import triton  # noqa: F401

            import peftfast.kernels.lora  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the install
            _TRITON.append(f"triton unavailable: {type(exc).__name__}: {exc}")
        else:
            _TRITON.append(None)
    return _TRITON[0]


def resolve_backend(requested: str, device: torch.device) -> str:
    """Backend for tensors on ``device``: ``requested`` unless ``auto``; ``PEFTFAST_BACKEND`` overrides ``auto``."""
    if requested not in BACKENDS:
        raise ValueError(f"peftfast: unknown backend {requested!r}; choose one of {BACKENDS}")
    if requested == "auto":
        requested = os.environ.get("PEFTFAST_BACKEND", "auto")
        if requested not in BACKENDS:
            raise ValueError(f"peftfast: PEFTFAST_BACKEND={requested!r} is not one of {BACKENDS}")
    if requested == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() is None else "torch"
        return "cpp" if device.type == "cpu" and _ext.available() else "torch"
    if requested == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"peftfast: backend 'cpp' runs on CPU tensors (got {device.type})")
        why = _ext.status()
        if why is not None:
            raise RuntimeError(f"peftfast: backend 'cpp' requested but {why}")
    if requested == "triton":
        why = triton_available()
        if why is not None:
            raise RuntimeError(f"peftfast: backend 'triton' requested but {why}")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"peftfast: backend 'triton' needs CUDA tensors (got {device.type}); "
                "set TRITON_INTERPRET=1 before importing peftfast to run the kernels on CPU"
            )
    return requested
