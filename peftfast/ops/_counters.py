"""Counts Triton kernel launches, so benchmarks can report work ops = aten ops + launches.

Under the CPU interpreter a launch itself dispatches aten ops (copies in and out of numpy); ``inside_launch()`` lets
an op counter leave those out, so a launch counts once, as on a GPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter

_launches: Counter[str] | None = None
_depth = 0


def inside_launch() -> bool:
    return _depth > 0


@contextlib.contextmanager
def launching(kernel_name: str):
    """Wrap one kernel launch: counts it and marks the aten ops it dispatches as part of the launch."""
    global _depth
    if _launches is not None:
        _launches[kernel_name] += 1
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


@contextlib.contextmanager
def count_launches():
    """Context manager yielding a Counter of Triton launches by kernel name."""
    global _launches
    prev, _launches = _launches, Counter()
    try:
        yield _launches
    finally:
        if prev is not None:
            prev.update(_launches)
        _launches = prev
