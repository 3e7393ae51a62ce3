"""Counts Triton kernel launches, so benchmarks can report work ops = aten ops + launches."""

from __future__ import annotations

import contextlib
from collections import Counter

_launches: Counter[str] | None = None


def record_launch(kernel_name: str) -> None:
    if _launches is not None:
        _launches[kernel_name] += 1


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
