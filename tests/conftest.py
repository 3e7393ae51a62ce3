"""Test set-up: Triton kernels run in the CPU interpreter, so it must be on before peftfast.kernels is imported.

``PEFTFAST_GPU_TESTS=1`` (``benchmarks/run_gpu.sh`` sets it with ``-m gpu``) leaves the interpreter off, so the
kernels compile for the GPU.
"""

import os

if os.environ.get("PEFTFAST_GPU_TESTS") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _rebuild_tiny_tensors(monkeypatch):
    """Tests run tiny shapes, under ``MIN_REBUILD_BYTES``: every region rebuilds in them, so the rebuild paths stay
    tested (``test_recompute`` checks the threshold itself at its real value)."""
    from peftfast.ops import recompute

    monkeypatch.setattr(recompute, "MIN_REBUILD_BYTES", 0)
