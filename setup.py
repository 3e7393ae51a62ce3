"""Build script. Metadata lives in ``pyproject.toml``; this file exists for the ``peftfast._C`` extension build
(C++/CUDA sources under ``csrc/``), which is not part of this release yet: the package is pure Python plus Triton.
"""

from setuptools import setup

setup()
