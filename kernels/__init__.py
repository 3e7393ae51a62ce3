"""Triton kernels of peftfast (installed as ``peftfast.kernels``). Only ``@triton.jit`` code lives here."""
