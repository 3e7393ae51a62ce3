"""The marks every GPU test module carries: run only with ``PEFTFAST_GPU_TESTS=1`` on a CUDA machine
(``benchmarks/run_gpu.sh``), where the Triton interpreter is off."""

import os

import pytest
import torch

GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("PEFTFAST_GPU_TESTS") != "1",
                       reason="set PEFTFAST_GPU_TESTS=1 (interpreter off)"),
]
