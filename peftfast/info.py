"""``peftfast info``: versions, live backends and the GPU, in a few lines."""

from __future__ import annotations

import torch

from peftfast import _ext
from peftfast.bench import _versions
from peftfast.ops._backend import interpreting, resolve_backend, triton_available


def info_lines() -> list[str]:
    import peftfast

    v = _versions()
    lines = [f"peftfast {peftfast.__version__}"]
    lines += [f"{k:<13}{val}" for k, val in v.items()]
    why = triton_available()
    lines.append(f"{'triton path':<13}{'available' if why is None else why}"
                 + (" (CPU interpreter on: TRITON_INTERPRET=1)" if interpreting() else ""))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"{'gpu ' + str(i):<13}{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append(f"{'gpu':<13}none (backend 'auto' runs the CPU path named below)")
    lines.append(f"{'cuda build':<13}{torch.version.cuda or 'none'}")
    why = _ext.status()
    if why is None:
        b = _ext.build_info()
        parts = "CPU + CUDA kernels" if b.get("cuda") == "1" else "CPU kernels only"
        lines.append(f"{'peftfast._C':<13}built ({parts}; torch {b.get('torch')}, OpenMP {b.get('openmp') == '1'}, "
                     f"SIMD {b.get('simd', 'scalar')})")
    else:
        lines.append(f"{'peftfast._C':<13}{why}")
    # without _C the seeded LoRA / NF4 ops keep their registered boundary, declared from Python
    lines.append(f"{'torch ops':<13}torch.ops.peftfast.{{{', '.join(_registered_ops())}}}"
                 + ("" if why is None else " (declared from Python: ATen kernels on CPU, Triton on CUDA)"))
    live = ["torch"] + (["cpp (CPU)"] if why is None else []) + (["triton"] if triton_available() is None else [])
    lines.append(f"{'backends':<13}{', '.join(live)}; auto on CPU: {resolve_backend('auto', torch.device('cpu'))}"
                 + (f", on CUDA: {resolve_backend('auto', torch.device('cuda'))}" if torch.cuda.is_available() else ""))
    return lines


def _registered_ops() -> list[str]:
    """Ops registered in the ``peftfast`` namespace (declared in csrc/ops.cpp or as Python custom ops)."""
    names = []
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("peftfast::") and schema.name != "peftfast::build_info":
            names.append(schema.name.split("::", 1)[1])
    return sorted(set(names))


if __name__ == "__main__":
    print("\n".join(info_lines()))
