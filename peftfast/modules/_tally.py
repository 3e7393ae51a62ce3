"""Call counters of the patched modules that ``torch.compile`` can trace without recompiling.

A plain ``state.fused_calls += 1`` inside traced code makes Dynamo guard on the counter's value, so every call
recompiles (and after ``recompile_limit`` calls the frame runs eagerly). States that mix in :class:`Tallied` get a
process-unique ``tally_key``; :func:`tally` is marked ``assume_constant_result``: eager calls count every call,
while under ``torch.compile`` it runs once per trace (a compiled call site is counted once per compilation, not per
execution). The key is re-drawn when a state is copied or unpickled, so a copied model counts on its own.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Iterator

import torch

_REGISTRY: weakref.WeakValueDictionary[int, Tallied] = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)
_MUTE = threading.local()  # .depth > 0: calls rerun in backward (peftfast.ops.recompute.capture) are not counted


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """Calls in this region (on this thread) are not counted: they rerun a forward already counted."""
    _MUTE.depth = getattr(_MUTE, "depth", 0) + 1
    try:
        yield
    finally:
        _MUTE.depth -= 1


class Tallied:
    """Mixin for dataclass states: registers the instance under a fresh ``tally_key`` (not part of its fields,
    its pickle or its copies)."""

    tally_key: int

    def __post_init__(self) -> None:
        self._register()

    def _register(self) -> None:
        self.tally_key = next(_KEYS)
        _REGISTRY[self.tally_key] = self

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("tally_key", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._register()


@torch.compiler.assume_constant_result
def tally(key: int, counter: str, reason: str = "") -> int:
    """Add one to the int field ``counter`` of the state registered as ``key``, or to ``<counter>[reason]`` for the
    Counter fields ``fallbacks`` and ``deferred``. Returns 0 (a constant for Dynamo)."""
    st = _REGISTRY.get(key)
    if st is not None and not getattr(_MUTE, "depth", 0):
        if counter in ("fallbacks", "deferred"):
            getattr(st, counter)[reason] += 1
        else:
            setattr(st, counter, getattr(st, counter) + 1)
    return 0


__all__ = ["Tallied", "muted", "tally"]
