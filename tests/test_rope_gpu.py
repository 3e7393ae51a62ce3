"""Fused RoPE on a real GPU (``PEFTFAST_GPU_TESTS=1 python -m pytest -m gpu``): the compiled kernel in each pair
layout against the model's own function, error ≤ 2x that of the function in the same dtype (fp64 reference)."""

import pytest
import torch
from _gpu import GPU_MARKS
from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb as cohere_rope
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb as glm_rope
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope

pytestmark = GPU_MARKS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ref_fn,layout,rot", [(llama_rope, "half", 128), (cohere_rope, "pairs", 128),
                                               (glm_rope, "pairs_half_cos", 64)], ids=["llama", "cohere", "glm"])
def test_triton_rope_within_twice_the_models_error(dtype, ref_fn, layout, rot):
    from peftfast.ops.rope import rope

    g = torch.Generator(device="cuda").manual_seed(0)
    b, s, hq, hk, d = 2, 515, 32, 8, 128
    q = torch.randn(b, s, hq, d, device="cuda", generator=g).transpose(1, 2).to(dtype).requires_grad_()
    k = torch.randn(b, s, hk, d, device="cuda", generator=g).transpose(1, 2).to(dtype).requires_grad_()
    cos, sin = (torch.randn(b, s, rot, device="cuda", generator=g).to(dtype) for _ in range(2))
    dq = torch.randn(b, hq, s, d, device="cuda", generator=g).to(dtype)
    dk = torch.randn(b, hk, s, d, device="cuda", generator=g).to(dtype)

    def run(fn, qq, kk):
        qq.grad = kk.grad = None
        a, c = fn(qq, kk)
        torch.autograd.backward([a, c], [dq.to(a.dtype), dk.to(c.dtype)])
        return [a.detach().double(), c.detach().double(), qq.grad.double(), kk.grad.double()]

    got = run(lambda qq, kk: rope(qq, kk, cos, sin, backend="triton", layout=layout), q, k)
    low = run(lambda qq, kk: ref_fn(qq, kk, cos, sin), q, k)
    rq, rk = (t.detach().double().requires_grad_() for t in (q, k))
    ref = run(lambda qq, kk: ref_fn(qq, kk, cos.double(), sin.double()), rq, rk)
    for a, e, r in zip(got, low, ref):
        assert (a - r).abs().max() <= 2 * (e - r).abs().max() + 1e-3
