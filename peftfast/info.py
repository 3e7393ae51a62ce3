"""``peftfast info``: versions, live backends and the GPU, in a few lines."""

from __future__ import annotations

import torch

from peftfast.bench import _versions
from peftfast.ops._backend import interpreting, triton_available


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
        lines.append(f"{'gpu':<13}none (backend 'auto' uses the ATen path on CPU)")
    lines.append(f"{'cuda build':<13}{torch.version.cuda or 'none'}")
    try:
        import peftfast._C  # noqa: F401

        lines.append(f"{'peftfast._C':<13}built")
    except ImportError:
        lines.append(f"{'peftfast._C':<13}not built (the C++/CUDA extension is not part of this release yet)")
    return lines


if __name__ == "__main__":
    print("\n".join(info_lines()))
