"""Triton kernels of peftfast (installed as ``peftfast.kernels``). Only ``@triton.jit`` code lives here.

Run from the repository root, ``import kernels`` (the PyPI package of that name, which bitsandbytes and transformers
look for) would find this directory first. Imported under that name it steps aside: it loads the installed
``kernels`` package in its place, or, where there is none, stays an empty module without ``__file__`` or
submodules, which is how transformers recognises a directory shadowing a package that is not installed.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        __file__ = None  # noqa: F811 - an empty stand-in: see the docstring
        __path__ = []
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import system hands back what sys.modules holds after this file ran
        _spec.loader.exec_module(_module)
