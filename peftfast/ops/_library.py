"""Registration of the ``peftfast`` ops whose kernels live in Python: the Triton launchers as their CUDA kernels
and, where ``peftfast._C`` is not loaded, the schemas of csrc/ops.cpp with ATen CPU kernels.

Under ``torch.compile`` the Triton backend runs through these ops (:func:`through_op`): each call is one opaque node
with a fake kernel, so Dynamo never traces a Triton launch or the Python around it (launch counters, config
lookups, imports), which would break the graph or fail outright.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from peftfast import _ext

# op name -> the Python function registered as its CUDA kernel (tests run them on CPU tensors in the interpreter)
CUDA_KERNELS: dict[str, Callable] = {}


def register(schemas: tuple[str, ...], cpu: dict[str, Callable], cuda: dict[str, Callable], *,
             ext_declares: bool = True) -> tuple[torch.library.Library, bool]:
    """Give the ops ``cuda`` names their CUDA kernels. ``schemas`` (``name(args) -> outs``) are defined here, with
    the ``cpu`` kernels, where ``peftfast._C`` does not define them (not loaded, or ``ext_declares=False``: ops
    only Python declares). Returns the library (keep it alive) and whether the schemas were defined here."""
    if ext_declares and _ext.available():
        lib = torch.library.Library("peftfast", "IMPL")
        declared = False
    else:
        lib = torch.library.Library("peftfast", "FRAGMENT")
        for schema in schemas:
            lib.define(schema)
        for name, fn in cpu.items():
            lib.impl(name, fn, "CPU")
        declared = True
    for name, fn in cuda.items():
        lib.impl(name, fn, "CUDA")
        CUDA_KERNELS[name] = fn
    return lib, declared


def through_op(backend: str) -> bool:
    """Whether a call on ``backend`` runs the registered op: the C++ kernels always, the Triton ones under
    ``torch.compile``."""
    return backend == "cpp" or backend == "triton" and torch.compiler.is_compiling()
