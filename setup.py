"""Build script: the pure-Python package always; the ``peftfast._C`` extension when its sources exist.

``PEFTFAST_BUILD_EXT``: ``auto`` (default: build, CUDA sources too when nvcc and a CUDA torch are present),
``cpu`` (C++ only), ``cuda`` (fail if CUDA cannot be built), ``0`` (skip the extension).
"""

from setuptools import setup

setup()
