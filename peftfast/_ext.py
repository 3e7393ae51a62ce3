"""Loading ``peftfast._C`` (the C++/CUDA extension) without ever breaking ``import peftfast``.

``status()`` returns None when the extension is loaded and usable, else the one-line reason it is not (not built,
import error, built against another torch, disabled by ``PEFTFAST_DISABLE_EXT=1``); that reason is warned once and
shown by ``peftfast info``. Ops then run on their Python/ATen or Triton paths.
"""

from __future__ import annotations

import os
import warnings

import torch

_UNSET = object()
_STATUS: object = _UNSET  # a plain global, not functools.lru_cache: Dynamo traces a cached call as a constant read


def status() -> str | None:
    """None when ``torch.ops.peftfast`` C++ kernels are live, else why not (warned once)."""
    global _STATUS
    if _STATUS is _UNSET:
        _STATUS = _load()
        if _STATUS is not None and not os.environ.get("PEFTFAST_DISABLE_EXT"):
            warnings.warn(f"peftfast: C++ extension unavailable ({_STATUS}); using the Python/ATen fallbacks",
                          stacklevel=3)
    return _STATUS  # type: ignore[return-value]


def available() -> bool:
    return status() is None


def _load() -> str | None:
    if os.environ.get("PEFTFAST_DISABLE_EXT", "0") not in ("", "0"):
        return "disabled by PEFTFAST_DISABLE_EXT"
    try:
        import peftfast._C  # noqa: F401  (registers torch.ops.peftfast.* on load)
    except ImportError as exc:
        if "No module named" in str(exc):
            return "peftfast._C is not built (install with `pip install --no-build-isolation -e .` after torch)"
        return f"peftfast._C failed to load: {exc}"
    except OSError as exc:  # pragma: no cover - broken shared object
        return f"peftfast._C failed to load: {exc}"
    built = build_info().get("torch")
    if built != torch.__version__:
        return f"peftfast._C was built against torch {built}, this is torch {torch.__version__}; rebuild it"
    return None


def build_info() -> dict[str, str]:
    """What the loaded extension was built with (``torch``, ``cuda``, ``openmp``); empty when not loaded."""
    try:
        raw = torch.ops.peftfast.build_info()
    except (AttributeError, RuntimeError):
        return {}
    return dict(kv.split("=", 1) for kv in raw.split(";") if "=" in kv)


def has_cuda_kernels() -> bool:
    return available() and build_info().get("cuda") == "1"


__all__ = ["available", "build_info", "has_cuda_kernels", "status"]
