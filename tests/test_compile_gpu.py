"""``torch.compile`` over a patched model on a real GPU: the Triton paths (LoRA groups, gated MLP, norms, RoPE,
attention) inside Dynamo's graph, where the CPU tests can only run the registered ops' CPU kernels.

Run with ``PEFTFAST_GPU_TESTS=1 python -m pytest -m gpu`` (``benchmarks/run_gpu.sh``); the interpreter is off then.
"""

import pytest
import torch
import torch._dynamo
from _gpu import GPU_MARKS
from _models import loss_and_grads, max_rel_err
from test_integration import _our_breaks
from test_lora_gpu import _llama_bf16
from torch._dynamo.backends.debugging import ExplainWithBackend

import peftfast

pytestmark = GPU_MARKS


def _patched(dropout: float):
    model, ids = _llama_bf16(dropout)
    for n, prm in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(prm, std=0.02)
    peftfast.patch(model)
    return model, dict(input_ids=ids, labels=ids)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_patched_llama_compiles_without_breaks_in_our_code_on_gpu(dropout):
    """No graph break located in peftfast's files (LoRA dropout included: the seeds are traced tensor draws, the
    MLP's projections then run on the registered LoRA ops); two compiled steps from one RNG state agree bit for bit;
    without dropout the compiled (``aot_eager``) loss and gradients are eager's."""
    model, data = _patched(dropout)
    want = loss_and_grads(model, data, seed=3)
    torch._dynamo.reset()
    explain = ExplainWithBackend("aot_eager")
    compiled = torch.compile(model, backend=explain)
    first = loss_and_grads(model, data, seed=3, call=compiled)
    second = loss_and_grads(model, data, seed=3, call=compiled)
    breaks = _our_breaks(explain.output())
    assert not breaks, f"{len(breaks)} graph break(s) in peftfast code, e.g. {breaks[:3]}"
    assert torch.equal(first[0], second[0]) and all(torch.equal(first[1][n], second[1][n]) for n in first[1])
    if dropout == 0.0:
        assert abs(first[0].item() - want[0].item()) <= 1e-2 * abs(want[0].item())
        worst = max(max_rel_err(first[1][n], want[1][n]) for n in want[1])
        assert worst <= 5e-2, worst


def test_patched_llama_compiles_with_inductor_on_gpu():
    """The default backend (Inductor) over the patched model: the loss and gradients of the eager patched model."""
    model, data = _patched(0.0)
    want = loss_and_grads(model, data, seed=3)
    torch._dynamo.reset()
    got = loss_and_grads(model, data, seed=3, call=torch.compile(model))
    assert abs(got[0].item() - want[0].item()) <= 1e-2 * abs(want[0].item())
    worst = max(max_rel_err(got[1][n], want[1][n]) for n in want[1])
    assert worst <= 5e-2, worst


@pytest.mark.parametrize("case", ["llama", "bert", "adapter", "dora", "llama-recompute-mlp", "nf4", "moe"])
def test_every_fused_path_compiles_as_one_graph_on_gpu(case):
    """The CPU suite's fused paths (norms, LayerNorm, act · u, Adapter, DoRA, the gate/up rerun, NF4, MoE) in fp32 on
    CUDA under ``torch.compile`` (``aot_eager``): one graph, no break (every Triton call is a registered op's CUDA
    kernel), and the eager Triton run's loss and gradients without dropout."""
    from test_compile import _FUSED_PATHS, _batch

    build, family, kw = _FUSED_PATHS[case]
    model = build(0.0).cuda()
    data = {k: v.cuda() for k, v in _batch(family).items()}
    peftfast.patch(model, **kw)
    want = loss_and_grads(model, data, seed=3)
    torch._dynamo.reset()
    explain = ExplainWithBackend("aot_eager")
    got = loss_and_grads(model, data, seed=3, call=torch.compile(model, backend=explain))
    out = explain.output()
    assert out.graph_break_count == 0 and out.graph_count == 1, out.break_reasons
    assert abs(got[0].item() - want[0].item()) <= 1e-4 * abs(want[0].item())
    assert max(max_rel_err(got[1][n], want[1][n]) for n in want[1]) <= 1e-3
