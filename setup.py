"""Build script for the ``peftfast._C`` C++/CUDA extension; package metadata lives in ``pyproject.toml``.

``PEFTFAST_BUILD_EXT`` picks what is built:

* ``auto`` (default): CPU sources always; CUDA sources too when torch is a CUDA build and nvcc is found
  (``CUDA_HOME``, else ``/usr/local/cuda``, else nvcc on the PATH);
* ``cpu`` / ``cuda``: force one (``cuda`` fails loudly when no toolkit is found);
* ``0``: no extension (pure Python + Triton; ``import peftfast`` warns once and falls back).

The build needs torch at build time: install with ``--no-build-isolation`` after torch (see the README).
CUDA code is compiled for ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0``). ``.cu`` files include no torch headers
(raw-pointer kernels + launchers), so they build in seconds; the ATen glue lives in ``.cpp`` files.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_home() -> str | None:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _extensions() -> tuple[list, dict]:
    mode = os.environ.get("PEFTFAST_BUILD_EXT", "auto").lower()
    if mode in ("0", "no", "off", "none", "false"):
        print("peftfast: PEFTFAST_BUILD_EXT=0, not building peftfast._C", file=sys.stderr)
        return [], {}
    if mode not in ("auto", "cpu", "cuda", "1"):
        raise SystemExit(f"peftfast: PEFTFAST_BUILD_EXT={mode!r} must be auto, cpu, cuda or 0")
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        if mode in ("cpu", "cuda"):
            raise SystemExit("peftfast: PEFTFAST_BUILD_EXT asks for peftfast._C but torch is not importable at "
                             "build time; install torch first and build with --no-build-isolation") from None
        print("peftfast: torch is not importable at build time (build isolation?), peftfast._C is not built; "
              "install torch first and use `pip install --no-build-isolation -e .`", file=sys.stderr)
        return [], {}

    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    home = _cuda_home()
    with_cuda = mode == "cuda" or (mode in ("auto", "1") and torch.version.cuda is not None and home is not None)
    if mode == "cuda" and (home is None or torch.version.cuda is None):
        raise SystemExit(f"peftfast: PEFTFAST_BUILD_EXT=cuda but CUDA_HOME={home} torch.version.cuda="
                         f"{torch.version.cuda}")
    # no -std flag: torch.utils.cpp_extension picks the standard this torch needs
    cxx = ["-O3", "-fopenmp", "-DPEFTFAST_TORCH_VERSION=\"" + torch.__version__ + "\""]
    kwargs: dict = dict(name="peftfast._C", extra_compile_args={"cxx": cxx}, include_dirs=[os.path.join(HERE, "csrc")],
                        extra_link_args=["-fopenmp"])
    if with_cuda:
        os.environ["CUDA_HOME"] = home
        ce.CUDA_HOME = home  # read at import; keep it consistent with what we found
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cxx.append("-DPEFTFAST_WITH_CUDA")
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-DPEFTFAST_WITH_CUDA", "-lineinfo"]
        # this toolkit keeps its libraries in lib/ (not lib64/); list both, the linker takes what exists
        kwargs["library_dirs"] = [d for d in (os.path.join(home, "lib"), os.path.join(home, "lib64"))
                                  if os.path.isdir(d)]
        ext = ce.CUDAExtension(sources=cpp + cu, **kwargs)
    else:
        ext = ce.CppExtension(sources=cpp, **kwargs)
    what = f"CPU + CUDA {os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else "CPU"
    print(f"peftfast: building peftfast._C ({what}) against torch {torch.__version__}", file=sys.stderr)
    ninja = shutil.which("ninja") is not None
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=ninja)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
