"""LoRA on mixture-of-experts stacks (PEFT ``target_parameters``): the experts op and the patched MoE models.

The op is checked against an fp64 reference that merges ``W + s·B·A`` per expert as PEFT does, on odd shapes with an
expert no token picks, both weight layouts, with and without the gate/up rerun, every backend's activation kernel,
and the gradient of every input (routing weights and base stacks included). Low precision must stay within 2x the
error PEFT's own merged-weight path makes on the same inputs. Patched Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3 and
PhiMoE give PEFT's loss and gradients, save no merged stack and less in all, and fall back (counted) where the op
cannot serve a call.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from _models import max_rel_err, saved_shapes
from peft import LoraConfig, get_peft_model

import peftfast
from peftfast.modules import moe as moe_mod
from peftfast.ops._backend import resolve_backend
from peftfast.ops.moe import ExpertGate, ExpertStack, experts_lora

ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def _stack(e, n_in, n_out, r, dtype, transposed, lora=True, scale=1.0, bias=False):
    w = torch.randn(e, n_in, n_out) if transposed else torch.randn(e, n_out, n_in)
    w = (w / n_in**0.5).to(dtype)
    c = (torch.randn(e, n_out) * 0.5).to(dtype).requires_grad_() if bias else None
    if not lora:
        return ExpertStack(w, bias=c)
    a = (torch.randn(e * r, n_in) / n_in**0.5).to(dtype).requires_grad_()
    b = (torch.randn(n_out, r * e) * 0.3).to(dtype).requires_grad_()
    return ExpertStack(w, a, b, scale, c)


def _case(t=17, h=12, i=10, e=5, k=2, r=3, dtype=torch.float32, transposed=False, lora=(True, True), bias=False):
    """Tokens routed to experts 0..e-2 only: the last expert gets no rows."""
    x = torch.randn(t, h).to(dtype).requires_grad_()
    idx = torch.stack([torch.randperm(e - 1)[:k] for _ in range(t)])
    wts = torch.softmax(torch.randn(t, k), -1).to(dtype).requires_grad_()
    gu = _stack(e, h, 2 * i, r, dtype, transposed, lora[0], 0.7, bias)
    dn = _stack(e, i, h, r, dtype, transposed, lora[1], 1.3, bias)
    return x, idx, wts, gu, dn


# gpt-oss's gate (interleaved, clamped SwiGLU), the OpenAI privacy filter's (the same on [gate | up] halves) and a
# plain SiLU gate on interleaved columns; a small limit so both clamps bite on these inputs
GATES = {"gpt_oss": ExpertGate("clamped_swiglu", interleaved=True, alpha=1.702, limit=0.8),
         "clamped_halves": ExpertGate("clamped_swiglu", alpha=1.3, limit=0.6),
         "silu_interleaved": ExpertGate("silu", interleaved=True)}


def _glu_ref(h, gate: ExpertGate):
    g, u = (h[:, 0::2], h[:, 1::2]) if gate.interleaved else h.chunk(2, dim=-1)
    if gate.act != "clamped_swiglu":
        return ACTS[gate.act](g) * u
    g, u = g.clamp(max=gate.limit), u.clamp(-gate.limit, gate.limit)
    return (u + 1) * (g * torch.sigmoid(g * gate.alpha))


def _merged(st: ExpertStack, e: int, transposed: bool, dtype) -> torch.Tensor:
    """PEFT's parametrized stack as [E, out, in]: W + s·B_e·A_e, in ``dtype``."""
    w = st.weight.to(dtype)
    w = w.transpose(1, 2) if transposed else w
    if st.lora_a is None:
        return w
    r = st.lora_a.shape[0] // e
    a = st.lora_a.to(dtype).view(e, r, -1)
    b = st.lora_b.to(dtype).view(st.lora_b.shape[0], r, e).permute(2, 0, 1)
    return w + st.scaling * (b @ a)


def _reference(x, idx, wts, gu, dn, act="silu", transposed=False, dtype=torch.float64):
    """Every (token, expert) pair on its own, on merged weights in ``dtype``."""
    e = gu.weight.shape[0]
    gate = act if isinstance(act, ExpertGate) else ExpertGate(act)
    wg, wd = _merged(gu, e, transposed, dtype), _merged(dn, e, transposed, dtype)
    xs, ws = x.to(dtype), wts.to(dtype)
    out = torch.zeros_like(xs)
    for j in range(idx.shape[1]):
        h = torch.einsum("th,toh->to", xs, wg[idx[:, j]])
        if gu.bias is not None:
            h = h + gu.bias.to(dtype)[idx[:, j]]
        o = torch.einsum("ti,thi->th", _glu_ref(h, gate), wd[idx[:, j]])
        if dn.bias is not None:
            o = o + dn.bias.to(dtype)[idx[:, j]]
        out = out + ws[:, j, None] * o
    return out


def _leaves(x, wts, gu, dn):
    return [t for t in (x, wts, gu.weight, gu.lora_a, gu.lora_b, gu.bias, dn.weight, dn.lora_a, dn.lora_b, dn.bias)
            if t is not None and t.requires_grad]


def _grads(y, leaves, dy):
    return torch.autograd.grad(y, leaves, dy)


def _backend_or_skip(backend):
    if backend == "cpp" and resolve_backend("auto", torch.device("cpu")) != "cpp":
        pytest.skip("peftfast._C is not built")


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_matches_fp64_merged_reference_with_every_gradient(backend, act, transposed, recompute):
    _backend_or_skip(backend)
    x, idx, wts, gu, dn = _case(transposed=transposed)
    gu.weight.requires_grad_(), dn.weight.requires_grad_()  # trainable base stacks get their gradients too
    leaves = _leaves(x, wts, gu, dn)
    y = experts_lora(x, idx, wts, gu, dn, act=act, transposed=transposed, recompute=recompute, backend=backend)
    ref = _reference(x, idx, wts, gu, dn, act, transposed)
    dy = torch.randn_like(ref)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert max_rel_err(y, ref) < 2e-6
    got, want = _grads(y, leaves, dy.float()), _grads(ref, leaves, dy)
    assert len(got) == 8
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.float32
        assert max_rel_err(g, w) < 5e-6
    # the expert no token picked gets exactly zero gradient, the others do not
    da_gu = got[3].view(5, 3, -1)
    assert da_gu[4].abs().max() == 0 and da_gu[:4].abs().amax(dim=(1, 2)).min() > 0


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("recompute", [False, True])
def test_biases_and_other_gates_match_fp64_with_every_gradient(backend, gate, recompute):
    """gpt-oss's experts: biases on both stacks, transposed [E, in, out] stacks, interleaved gate/up columns and the
    clamped SwiGLU (gradients cut where either clamp holds); trainable biases and stacks get their gradients."""
    _backend_or_skip(backend)
    torch.manual_seed(11)
    x, idx, wts, gu, dn = _case(transposed=True, bias=True)
    gu.weight.requires_grad_(), dn.weight.requires_grad_()
    leaves = _leaves(x, wts, gu, dn)
    assert len(leaves) == 10
    g = GATES[gate]
    y = experts_lora(x, idx, wts, gu, dn, act=g, transposed=True, recompute=recompute, backend=backend)
    ref = _reference(x, idx, wts, gu, dn, g, transposed=True)
    if g.act == "clamped_swiglu":  # the inputs reach both clamps, so their masks are exercised
        h = torch.einsum("th,the->te", x.detach(), gu.weight.detach()[idx[:, 0]]) + gu.bias.detach()[idx[:, 0]]
        gh, uh = (h[:, 0::2], h[:, 1::2]) if g.interleaved else h.chunk(2, dim=-1)
        assert (gh > g.limit).any() and (uh.abs() > g.limit).any() and (uh.abs() < g.limit).any()
    dy = torch.randn_like(ref)
    assert max_rel_err(y, ref) < 2e-6
    got, want = _grads(y, leaves, dy.float()), _grads(ref, leaves, dy)
    for got_g, want_g in zip(got, want):
        assert got_g.shape == want_g.shape and got_g.dtype == torch.float32
        assert max_rel_err(got_g, want_g) < 5e-6
    # the expert no token picked: zero bias gradients, the others not
    for db in (got[5], got[9]):
        assert db[4].abs().max() == 0 and db[:4].abs().amax(dim=1).min() > 0


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("keep_h", [False, True])
@pytest.mark.parametrize("gpt_oss", [False, True])
def test_registered_ops_pass_opcheck(backend, keep_h, gpt_oss):
    """peftfast::moe_experts_fwd / _bwd: schema, fake kernels, autograd registration, dynamic-shape tracing; also
    with gpt-oss's biases, transposed stacks and interleaved clamped SwiGLU."""
    _backend_or_skip(backend)
    x, idx, wts, gu, dn = _case(t=9, h=8, i=6, e=3, k=2, r=2, transposed=gpt_oss, bias=gpt_oss)
    g = GATES["gpt_oss"] if gpt_oss else ExpertGate()
    meta = (0.7, 1.3, g.act, g.alpha, g.limit, g.interleaved, gpt_oss, torch.float32, backend, "experts")
    stacks = (gu.weight, gu.lora_a, gu.lora_b, gu.bias, dn.weight, dn.lora_a, dn.lora_b, dn.bias)
    fwd_args = (x, idx, wts, *stacks, *meta, keep_h)
    torch.library.opcheck(torch.ops.peftfast.moe_experts_fwd.default, fwd_args)
    _, perm, counts, h = torch.ops.peftfast.moe_experts_fwd(*[a.detach() if torch.is_tensor(a) else a
                                                              for a in fwd_args])
    bwd_args = (torch.randn(9, 8), x.detach(), perm, counts, wts.detach(),
                *[t.detach() if t is not None else None for t in stacks], *meta, h,
                [True, True, False, True, True, gpt_oss, False, True, True, gpt_oss])
    torch.library.opcheck(torch.ops.peftfast.moe_experts_bwd.default, bwd_args)


@pytest.mark.parametrize("gpt_oss", [False, True])
def test_cpu_grouped_gemms_match_fp64_and_the_per_expert_loop(monkeypatch, gpt_oss):
    """CPU path at widths whose strides are multiples of 16 bytes (as real models'): every product is one
    ``torch._grouped_mm`` over all experts (an expert without rows included); the same output and gradients as fp64
    and as the per-expert loop it replaces elsewhere (odd widths, fp64, a torch without CPU grouped GEMMs)."""
    from peftfast.ops import moe as M

    if not M._cpu_grouped_mm():
        pytest.skip("this torch has no CPU torch._grouped_mm; the per-expert loop is all there is")
    torch.manual_seed(12)
    x, idx, wts, gu, dn = _case(t=23, h=16, i=12, e=5, k=2, r=4, transposed=gpt_oss, bias=gpt_oss)
    gu.weight.requires_grad_(), dn.weight.requires_grad_()
    gate = GATES["gpt_oss"] if gpt_oss else "silu"
    leaves = _leaves(x, wts, gu, dn)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    y = experts_lora(x, idx, wts, gu, dn, act=gate, transposed=gpt_oss, backend="torch")
    n_fwd = len(calls)
    dy = torch.randn_like(y)
    got = _grads(y, leaves, dy)
    # forward: x·A_guᵀ, gate/up and its low-rank term, a·A_dᵀ, down and its; backward: x·A_guᵀ (once, for the rerun
    # and the factor gradients), the gate/up rerun (2), dy·B_d, dy·W_d and its low-rank term, a·A_dᵀ, dh·B_gu, dx and
    # its low-rank term, 4 factor and 2 stack gradients (gpt-oss also dy·b_d for the routing weights); not one per
    # expert
    assert (n_fwd, len(calls) - n_fwd) == (6, 16 + gpt_oss)
    monkeypatch.setattr(M, "_cpu_grouped_mm", lambda: False)
    y_loop = experts_lora(x, idx, wts, gu, dn, act=gate, transposed=gpt_oss, backend="torch")
    ref = _reference(x, idx, wts, gu, dn, gate, gpt_oss)
    assert max_rel_err(y, ref) < 2e-6 and max_rel_err(y, y_loop) < 2e-6
    for g, g_loop, w in zip(got, _grads(y_loop, leaves, dy), _grads(ref, leaves, dy.double())):
        assert max_rel_err(g, w) < 5e-6 and max_rel_err(g, g_loop) < 5e-6


@pytest.mark.parametrize("lora", [(True, False), (False, True)])
def test_one_stack_without_lora(lora):
    x, idx, wts, gu, dn = _case(lora=lora)
    leaves = _leaves(x, wts, gu, dn)
    y = experts_lora(x, idx, wts, gu, dn)
    ref = _reference(x, idx, wts, gu, dn)
    dy = torch.randn_like(ref)
    assert max_rel_err(y, ref) < 2e-6
    for g, w in zip(_grads(y, leaves, dy.float()), _grads(ref, leaves, dy)):
        assert max_rel_err(g, w) < 5e-6


def test_strided_inputs_and_routing():
    x, idx, wts, gu, dn = _case(t=13)
    x_wide = torch.randn(13, 30).requires_grad_()
    xs = x_wide[:, 3:15]  # row stride 30
    idx_t = idx.t().contiguous().t()  # column-major routing
    wts_t = wts.detach().t().contiguous().t().requires_grad_()
    y = experts_lora(xs, idx_t, wts_t, gu, dn, backend="torch")
    ref = _reference(xs, idx, wts_t, gu, dn)
    dy = torch.randn_like(ref)
    assert max_rel_err(y, ref) < 2e-6
    leaves = [x_wide, wts_t, gu.lora_a, gu.lora_b, dn.lora_a, dn.lora_b]
    for g, w in zip(_grads(y, leaves, dy.float()), _grads(ref, leaves, dy)):
        assert max_rel_err(g, w) < 5e-6


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float16), ("torch", torch.bfloat16),
                                           ("triton", torch.float16)])  # the interpreter's bf16 tl.dot is broken
@pytest.mark.parametrize("gpt_oss", [False, True])
def test_low_precision_within_twice_peft_merged_error(backend, dtype, gpt_oss):
    """PEFT computes on W + s·B·A merged in the stack dtype; the op keeps the factors apart. Both against fp64; also
    gpt-oss's experts (biases, transposed stacks, interleaved clamped SwiGLU) at gpt-oss's own limit, 7: where a
    16-bit h lands on the other side of a clamp than the fp64 one, either path's gradient jumps there by O(1), so a
    limit inside the bulk of h would compare chance flips, not rounding (the fp32 tests check the clamps)."""
    torch.manual_seed(3)
    x, idx, wts, gu, dn = _case(t=33, h=64, i=48, e=6, k=2, r=8, dtype=dtype, transposed=gpt_oss, bias=gpt_oss)
    gate = ExpertGate("clamped_swiglu", interleaved=True, alpha=1.702, limit=7.0) if gpt_oss else "silu"
    leaves = _leaves(x, wts, gu, dn)
    y = experts_lora(x, idx, wts, gu, dn, act=gate, transposed=gpt_oss, backend=backend)
    peft_y = _reference(x, idx, wts, gu, dn, gate, gpt_oss, dtype=dtype)  # PEFT's merged path in low precision
    ref = _reference(x, idx, wts, gu, dn, gate, gpt_oss)
    dy = torch.randn_like(ref)
    assert y.dtype == dtype
    assert max_rel_err(y, ref) <= 2 * max_rel_err(peft_y, ref) + 1e-3
    got = _grads(y, leaves, dy.to(dtype))
    peft_g = _grads(peft_y, leaves, dy.to(dtype))
    for g, p, w in zip(got, peft_g, _grads(ref, leaves, dy)):
        assert g.dtype == dtype
        assert max_rel_err(g, w) <= 2 * max_rel_err(p, w) + 1e-3


@pytest.mark.parametrize("transposed,gate", [(False, "silu"), (True, "silu"), (True, "gpt_oss"),
                                              (False, "clamped_halves")])
@pytest.mark.parametrize("recompute", [True, False])
def test_grouped_kernels_span_several_tiles_per_expert(transposed, gate, recompute):
    """The Triton path (interpreter): experts with several 16-row tiles and a partial last one, K and the gate/up
    columns over several blocks, an expert without rows; one launch per product whatever the expert count, no host
    sync; the activation in the gate/up GEMM's epilogue (forward, and backward's rerun), h written only where
    backward keeps it."""
    from peftfast.ops import _counters

    torch.manual_seed(5)
    bias = gate != "silu"
    g = GATES.get(gate, gate)
    x, idx, wts, gu, dn = _case(t=61, h=40, i=36, e=4, k=2, r=3, transposed=transposed, bias=bias)
    idx = torch.stack([torch.randperm(3)[:2] for _ in range(61)])  # experts 0-2: about 40 rows each
    leaves = _leaves(x, wts, gu, dn)
    with _counters.count_launches() as fwd:
        y = experts_lora(x, idx, wts, gu, dn, act=g, transposed=transposed, recompute=recompute, backend="triton")
    ref = _reference(x, idx, wts, gu, dn, g, transposed=transposed)
    dy = torch.randn_like(ref)
    assert max_rel_err(y, ref) < 2e-6
    with _counters.count_launches() as bwd:
        got = _grads(y, leaves, dy.float())
    for got_g, w in zip(got, _grads(ref, leaves, dy)):
        assert max_rel_err(got_g, w) < 5e-6
    # forward: x·A_guᵀ, gate/up with the activation, a·A_dᵀ, down; backward: x·A_guᵀ (once: the rerun's and the
    # factor gradients'), dy·B_d, dy·W_d, a·A_dᵀ, dh·B_gu, dh·W_gu (gated by the routing weights' dy·b_d with biases),
    # the four factor gradients, and either the rerun with the activation's gradient in its epilogue or, where h
    # was kept, the element-wise activation and its gradient
    assert fwd["_moe_grouped_gemm_kernel"] == 3 and fwd["_moe_gate_up_glu_kernel"] == 1
    assert fwd["_moe_route_kernel"] == 1 and bwd["_moe_route_kernel"] == 1  # the routing prologue, each way
    assert bwd["_moe_grouped_gemm_kernel"] == 6 + bias and bwd["_moe_grouped_wgrad_kernel"] == 4 + 2 * bias
    assert bwd["_moe_gate_up_glu_kernel"] == recompute
    elementwise = (bwd["_act_mul_fwd_kernel"] + bwd["_moe_glu_fwd_kernel"],
                   bwd["_act_mul_bwd_kernel"] + bwd["_moe_glu_bwd_kernel"])
    assert elementwise == ((0, 0) if recompute else (1, 1))
    assert sum(fwd[k] for k in ("_act_mul_fwd_kernel", "_moe_glu_fwd_kernel")) == 0


def _route_reference(ids: list[int], n_exp: int, bm: int) -> tuple[list, list, list]:
    """Counts, bounds and the tile map (expert, first row, end row; spare tiles (-1, 0, 0)) in plain Python."""
    counts = [sum(1 for i in ids if i == e) for e in range(n_exp)]
    bounds = [sum(counts[:e]) for e in range(n_exp + 1)]
    tiles = [(e, bounds[e] + t * bm, bounds[e + 1]) for e in range(n_exp) for t in range(-(-counts[e] // bm))]
    return counts, bounds, tiles + [(-1, 0, 0)] * (-(-len(ids) // bm) + n_exp - len(tiles))


@pytest.mark.parametrize("tokens,top_k,n_exp", [(700, 2, 5), (61, 3, 17), (1, 1, 3), (0, 2, 4), (300, 4, 40)])
def test_routing_prologue_kernel_builds_the_tile_map(tokens, top_k, n_exp):
    """The routing prologue (one launch, interpreter): from a stable sort of the ids, the counts, bounds and tile map
    equal a plain-Python reference (experts without rows, S over two programs of 1024 rows, tile maps of several
    steps, a single row, no rows), each sorted row's token and (bf16) routing weight bit for bit; from the counts
    (backward) the same map; ids outside [0, E) are flagged, on either side."""
    from peftfast.ops import _counters
    from peftfast.ops import moe as M

    torch.manual_seed(tokens)
    live = max(1, n_exp - 2)  # the last experts get no rows
    idx = torch.stack([torch.randperm(live)[:top_k] for _ in range(tokens)]) if tokens else \
        torch.empty(0, top_k, dtype=torch.int64)
    wts = torch.rand(tokens, top_k).to(torch.bfloat16)
    ids = idx.reshape(-1)
    sorted_ids, perm = torch.sort(ids, stable=True)
    with _counters.count_launches() as launches:
        tiles, bounds, counts, tok, w_sorted, ok = M._route_triton(perm, wts, n_exp, sorted_ids)
    assert launches["_moe_route_kernel"] == 1
    ref_counts, ref_bounds, ref_tiles = _route_reference(ids.tolist(), n_exp, M._block_m())
    expert, row0, end, n_tiles = tiles
    assert n_tiles == len(ref_tiles) and int(ok) == 1
    assert counts.tolist() == ref_counts and bounds.tolist() == ref_bounds
    assert list(zip(expert.tolist(), row0.tolist(), end.tolist())) == ref_tiles
    assert torch.equal(tok, perm // top_k) and torch.equal(w_sorted, wts.reshape(-1)[perm])
    again = M._route_triton(perm, wts, n_exp, counts=counts)
    assert again[5] is None and again[2] is counts and torch.equal(again[1], bounds)
    assert all(torch.equal(a, b) for a, b in zip(again[0][:3], tiles[:3]))
    if tokens:
        for bad in (-1, n_exp):
            wrong = ids.clone()
            wrong[len(wrong) // 2] = bad
            sorted_bad, perm_bad = torch.sort(wrong, stable=True)
            assert int(M._route_triton(perm_bad, wts, n_exp, sorted_bad)[5]) == 0


@pytest.mark.parametrize("gate", ["silu", "gpt_oss"])
def test_fused_activation_epilogue_matches_the_element_wise_kernels(monkeypatch, gate):
    """The gate/up GEMM with the activation in its epilogue gives the unfused Triton path's a, h and dh (GEMM, then
    the element-wise kernels on the stored h): the same rounding of g and u before the activation and of gd·w
    before its gradient, in fp16; and the routing weights' ``Σ a·gd`` per row. I = 36 spans two column blocks."""
    from peftfast.ops import moe as M

    torch.manual_seed(6)
    g = GATES.get(gate, ExpertGate(gate))
    if gate == "gpt_oss":
        g = ExpertGate("clamped_swiglu", interleaved=True, alpha=1.702, limit=1.5)  # clamps bite at this scale
    x, idx, wts, gu, dn = _case(t=29, h=40, i=36, e=4, k=2, r=3, transposed=gate != "silu", bias=gate != "silu",
                                dtype=torch.float16)
    grp, perm, _, tok, _ = M._Groups.route(wts.detach(), 4, True, "experts", idx)
    A, B = M._factors(gu.lora_a.detach(), gu.lora_b.detach(), 4, torch.float16)
    xs, gather = grp.rows(x.detach(), tok)
    xa = grp.gg(xs, gather, A, torch.float16)
    args = (grp, xs, gather, gu.weight, xa, B, gu.scaling, gu.bias.detach() if gu.bias is not None else None,
            gate != "silu", torch.float16)
    gate_t = (g.act, g.alpha, g.limit, g.interleaved)
    h = M._gate_up(*args)
    a, h_kept, _ = M._gate_up_glu(*args, gate_t, True)
    a_only, no_h, _ = M._gate_up_glu(*args, gate_t, False)
    a_ref = M._glu(h, g.act, g.alpha, g.limit, g.interleaved, "triton")
    assert no_h is None and torch.equal(a, a_only)
    assert torch.equal(h_kept, h) and torch.equal(a, a_ref)
    gd = torch.randn(a.shape, dtype=torch.float32)
    w_sorted = wts.detach().reshape(-1)[perm]
    a_bwd, dh, dw_rows = M._gate_up_glu(*args, gate_t, False, (gd, w_sorted), True)
    dh_ref = M._glu_backward((gd * w_sorted[:, None].float()).half(), h, g.act, g.alpha, g.limit, g.interleaved,
                             "triton")
    assert torch.equal(a_bwd, a) and torch.equal(dh, dh_ref)
    # the routing weights' Σ a·gd per row, from the same epilogue (summed per column block, then across blocks)
    assert torch.allclose(dw_rows, (a.float() * gd).sum(-1), rtol=1e-5, atol=1e-5)
    assert M._gate_up_glu(*args, gate_t, False, (gd, w_sorted))[2] is None
    gc, uc = (h[:, 0::2], h[:, 1::2]) if g.interleaved else h.chunk(2, dim=-1)
    if g.act == "clamped_swiglu":  # both clamps bite here, so the cut gradients are compared too
        assert (gc > g.limit).any() and (uc.abs() > g.limit).any()


def test_bad_input_names_the_module_and_the_problem():
    x, idx, wts, gu, dn = _case()
    with pytest.raises(ValueError, match=r"peftfast: layer3\.experts: top_k_index holds expert id 7"):
        experts_lora(x, idx.clone().fill_(7), wts, gu, dn, name="layer3.experts")
    with pytest.raises(RuntimeError, match=r"peftfast: layer3\.experts: top_k_index holds an expert id outside"):
        experts_lora(x, idx.clone().fill_(7), wts, gu, dn, name="layer3.experts", backend="triton")
    with pytest.raises(ValueError, match="must be \\[17, 12\\]|input must be"):
        experts_lora(x[:, :5], idx, wts, gu, dn)
    with pytest.raises(ValueError, match="do not form a gated MLP"):
        experts_lora(x, idx, wts, gu, ExpertStack(dn.weight[:, :, :4]))
    with pytest.raises(ValueError, match="do not fit 5 experts"):
        experts_lora(x, idx, wts, ExpertStack(gu.weight, gu.lora_a[:-1], gu.lora_b[:, :-1]), dn)
    with pytest.raises(ValueError, match="activation 'relu'"):
        experts_lora(x, idx, wts, gu, dn, act="relu")
    with pytest.raises(ValueError, match="must both be"):
        experts_lora(x, idx[:, :1], wts, gu, dn)


def test_recompute_keeps_no_gate_up_output():
    """Saved for backward: without the rerun, h [S, 2I]; with it, only the input, the routing weights, the sorting
    permutation and the rows per expert; never a stack-sized tensor besides the parameters."""
    x, idx, wts, gu, dn = _case(t=21, h=16, i=12, e=4, k=2, r=2)
    s = 21 * 2
    params = [gu.weight, dn.weight, gu.lora_a, gu.lora_b, dn.lora_a, dn.lora_b]
    kept = saved_shapes(lambda: experts_lora(x, idx, wts, gu, dn, recompute=False), params)
    rerun = saved_shapes(lambda: experts_lora(x, idx, wts, gu, dn, recompute=True), params)
    assert (s, 24) in kept and (s, 24) not in rerun
    assert sorted(set(rerun)) == [(0,), (4,), (21, 2), (21, 16), (s,)]  # no h; rows per expert; routing weights;
    # the input; the sort


# ----------------------------------------------------------------------------------------------------------------
# patched models
# ----------------------------------------------------------------------------------------------------------------
_COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                       num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                       head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2, eos_token_id=None, pad_token_id=0)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2,
                         n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                         qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    # hybrid linear attention (Gated DeltaNet) and full attention layers, each with a MoE MLP and a shared expert
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                        shared_expert_intermediate_size=24, head_dim=8, layer_types=["linear_attention",
                        "full_attention"], linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                        linear_value_head_dim=8)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                    dict(moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                         shared_expert_intermediate_size=24, head_dim=8, layer_types=["linear_attention",
                         "full_attention"], linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                         linear_value_head_dim=8)),
    "dots1": ("Dots1Config", "Dots1ForCausalLM",
              dict(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2,
                   n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=0, max_window_layers=2,
                   head_dim=8)),
    # biases, transposed stacks, interleaved gate/up, clamped SwiGLU: a limit the random hidden states pass
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8, swiglu_limit=0.05)),
}
STACKS = ["experts.gate_up_proj", "experts.down_proj"]


def _moe_base(arch, *, impl=None, seed=0, **cfg_kw):
    cfg_name, cls_name, kw = MOE[arch]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = getattr(transformers, cfg_name)(**{**_COMMON, **kw, **cfg_kw})
        if impl is not None:
            cfg._experts_implementation = impl
        return getattr(transformers, cls_name)(cfg)


def _moe_model(arch, *, impl=None, targets=STACKS, modules=("q_proj", "v_proj", "o_proj"), seed=0, **cfg_kw):
    model = _moe_base(arch, impl=impl, seed=seed, **cfg_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(modules),
                                              target_parameters=list(targets), init_lora_weights=False))
    return pm.train()


def _loss_and_grads(model, ids, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # PhiMoE's router samples in training mode
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _ids(seed=1):
    return torch.randint(2, 64, (2, 11), generator=torch.Generator().manual_seed(seed))


def _assert_matches(model, ref, ids):
    """The patched ``model`` gives ``ref``'s (PEFT's) loss and every trainable gradient (fp32)."""
    loss, grads = _loss_and_grads(model, ids)
    ref_loss, ref_grads = _loss_and_grads(ref, ids)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert max_rel_err(grads[n], ref_grads[n]) < 2e-5, n
    return grads


def _experts_entries(model):
    return [e for e in peftfast.report(model).modules if e.kind == "experts"]


@pytest.mark.parametrize("arch", list(MOE))
def test_patched_moe_models_match_peft(arch):
    model = _moe_model(arch)
    ref = copy.deepcopy(model)
    peftfast.patch(model)
    entries = _experts_entries(model)
    n_moe = 1 if arch == "deepseek_v3" else 2  # DeepSeek's first layer is dense
    assert len(entries) == n_moe and all(e.patched for e in entries), entries
    assert not [e for e in peftfast.report(model).entries if "ParamWrapper" in (e.reason or "")]
    grads = _assert_matches(model, ref, _ids())
    assert any("lora_A" in n and "experts" in n for n in grads)
    runtime = peftfast.report(model).module_runtime(model)
    assert [runtime[e.name]["fused"] for e in entries] == [1] * n_moe


# more families whose experts classes take transformers' experts interface: a tiny config from the fields each
# config class has (the same small widths for all), LoRA on q/o and both stacks
MORE_FAMILIES = ["afmoe", "cohere2_moe", "deepseek_v2", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe",
                 "granitemoe", "hunyuan_v1_moe", "minimax", "minimax_m2", "solar_open"]
_SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_local_experts=4,
              n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0,
              shared_expert_intermediate_size=24, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
              qk_nope_head_dim=4, v_head_dim=8, max_position_embeddings=128, pad_token_id=0, eos_token_id=None,
              bos_token_id=None, decoder_sparse_step=1, mlp_only_layers=[], moe_layer_freq=1, layer_types=None)


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_more_moe_families_match_peft(family):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    cfg_cls = CONFIG_MAPPING[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        known = cfg_cls().to_dict()
        cfg = cfg_cls(**{k: v for k, v in _SMALL.items() if k in known})
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(cfg)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                target_parameters=STACKS, init_lora_weights=False)).train()
    ref = copy.deepcopy(model)
    peftfast.patch(model)
    entries = _experts_entries(model)
    assert entries and all(e.patched for e in entries), [(e.name, e.reason) for e in entries]
    grads = _assert_matches(model, ref, _ids(13))
    assert any("experts" in n and "lora_A" in n for n in grads)
    runtime = peftfast.report(model).module_runtime(model)
    assert [runtime[e.name]["fused"] for e in entries] == [1] * len(entries)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_patched_model_on_the_triton_backend_runs_the_grouped_kernels(arch):
    """The whole model on the Triton backend (interpreter): the experts through the grouped kernels; gpt-oss's
    biases in their epilogue and its interleaved clamped SwiGLU in the gate/up GEMM's epilogue."""
    from peftfast.ops import _counters

    model = _moe_model(arch) if arch != "gpt_oss" else _gpt_oss()
    ref = copy.deepcopy(model)
    peftfast.patch(model, backend="triton")
    with _counters.count_launches() as launches:
        _assert_matches(model, ref, _ids(8))
    # per layer: 3 grouped GEMMs forward and 6 backward, 4 factor gradients, and the gate/up GEMM with the
    # activation in its epilogue twice (forward, backward's rerun); gpt-oss adds one width-1 product (dy·b_d, the
    # routing weights' bias term); no element-wise activation kernel runs
    oss = arch == "gpt_oss"
    assert launches["_moe_grouped_gemm_kernel"] == 2 * (9 + oss) and launches["_moe_grouped_wgrad_kernel"] == 2 * 4
    assert launches["_moe_gate_up_glu_kernel"] == 2 * 2
    elementwise = ("_moe_glu_fwd_kernel", "_moe_glu_bwd_kernel", "_act_mul_fwd_kernel", "_act_mul_bwd_kernel")
    assert sum(launches[k] for k in elementwise) == 0


def _gpt_oss(impl=None, trainable_biases=False, **cfg_kw):
    """A tiny gpt-oss under PEFT with random expert biases (its init zeroes them), optionally trainable."""
    model = _moe_model("gpt_oss", impl=impl, **cfg_kw)
    limit = model.get_base_model().config.swiglu_limit
    for mod in model.modules():
        if type(mod).__name__ == "GptOssExperts":
            mod.limit = limit  # transformers 5.17 (the GPU machine's) fixes 7.0 in __init__; later ones read the config
    gen = torch.Generator().manual_seed(4)
    for n, p in model.named_parameters():
        if n.endswith("_proj_bias"):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            p.requires_grad_(trainable_biases)
    return model


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_gpt_oss_experts_match_peft_with_biases_and_clamps(impl):
    """gpt-oss: transposed stacks, biases (trainable here), interleaved gate/up and the clamped SwiGLU, found by the
    probe under each transformers experts implementation; PEFT's loss and every gradient, the biases' included."""
    model = _gpt_oss(impl, trainable_biases=True)
    ref = copy.deepcopy(model)
    seen = []
    for mod in ref.modules():
        if type(mod).__name__ == "GptOssExperts":
            mod._apply_gate = lambda h, f=mod._apply_gate: (seen.append(h.detach()), f(h))[1]
    peftfast.patch(model)
    entries = _experts_entries(model)
    assert len(entries) == 2 and all(e.patched for e in entries)
    st = model.get_submodule(entries[0].name).__dict__["_peftfast_moe"]
    assert st.gate == ExpertGate("clamped_swiglu", interleaved=True, alpha=1.702, limit=0.05) and st.transposed
    grads = _assert_matches(model, ref, _ids(12))
    assert sum("_proj_bias" in n for n in grads) == 4
    # its RoPE (half-width tables), sink attention and blocks (whose MLP returns hidden and router scores) fused too
    rt = peftfast.report(model).module_runtime(model)
    assert [r["fused"] for n, r in rt.items() if n.endswith(("(rope)", "(attention)", "(block)"))] == [1] * 6, rt
    h = torch.cat(seen)  # PEFT's own gate inputs: both clamps bite, and not everywhere
    g, u = h[:, 0::2], h[:, 1::2]
    assert (g > 0.05).any() and (g < 0.05).any() and (u.abs() > 0.05).any() and (u.abs() < 0.05).any()


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_router_aux_loss_matches_peft(arch):
    """With ``output_router_logits`` the loss adds the routers' load-balancing term (their logits come from the MoE
    block, not the experts): the same loss and gradients, the experts still fused."""
    kw = dict(output_router_logits=True, router_aux_loss_coef=0.1)
    model = _gpt_oss(**kw) if arch == "gpt_oss" else _moe_model(arch, **kw)
    ref = copy.deepcopy(model)
    peftfast.patch(model)
    assert all(e.patched for e in _experts_entries(model))
    _assert_matches(model, ref, _ids(3))
    out = model(input_ids=_ids(3), labels=_ids(3))
    assert out.aux_loss is not None and out.aux_loss.requires_grad


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_every_transformers_experts_implementation_is_matched(impl):
    model = _moe_model("qwen3_moe", impl=impl)
    ref = copy.deepcopy(model)
    peftfast.patch(model)
    assert all(e.patched for e in _experts_entries(model))
    ids = _ids(2)
    _assert_matches(model, ref, ids)


@pytest.mark.parametrize("targets", [["experts.gate_up_proj"], ["experts.down_proj"],
                                     ["experts.down_proj", "experts.gate_up_proj"]])
def test_one_or_both_stacks_in_either_order(targets):
    model = _moe_model("mixtral", targets=targets)
    ref = copy.deepcopy(model)
    peftfast.patch(model)
    assert all(e.patched for e in _experts_entries(model)) and len(_experts_entries(model)) == 2
    ids = _ids(3)
    _assert_matches(model, ref, ids)


def test_gradient_checkpointing_reruns_the_op_and_matches_peft():
    model = _moe_model("mixtral")
    ref = copy.deepcopy(model)
    for m in (model, ref):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peftfast.patch(model)
    ids = _ids(9)
    _assert_matches(model, ref, ids)
    runtime = peftfast.report(model).module_runtime(model)
    assert all(runtime[e.name]["fused"] >= 1 for e in _experts_entries(model))


def test_saves_no_merged_stack_and_less_than_peft():
    model = _moe_model("qwen3_moe", num_experts=8, moe_intermediate_size=40)
    ref = copy.deepcopy(model)
    peftfast.patch(model)
    ids = _ids(4)
    stack = 8 * 80 * 32  # one gate_up stack's elements
    numel = {}
    for label, m in (("patched", model), ("peft", ref)):
        shapes = saved_shapes(lambda m=m: m(input_ids=ids, labels=ids).loss.backward(), list(m.parameters()))
        numel[label] = [torch.Size(s).numel() for s in shapes]
    assert stack in numel["peft"]  # PEFT keeps the merged gate_up stack of each layer
    assert max(numel["patched"]) < 8 * 40 * 32  # nothing stack-sized at all
    assert sum(numel["patched"]) < 0.6 * sum(numel["peft"])


def test_runtime_fallbacks_are_counted_and_match():
    model = _moe_model("mixtral")
    ref = copy.deepcopy(model)
    peftfast.patch(model)
    name = _experts_entries(model)[0].name
    ids = _ids(5)
    with model.disable_adapter(), ref.disable_adapter(), torch.no_grad():  # nothing trains: a forward only
        torch.manual_seed(0)
        loss = model(input_ids=ids, labels=ids).loss
        torch.manual_seed(0)
        ref_loss = ref(input_ids=ids, labels=ids).loss
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    fallbacks = peftfast.report(model).module_runtime(model)[name]["fallbacks"]
    assert fallbacks == {"adapters disabled or merged": 1}
    # a second adapter made active alongside the first: PEFT adds both deltas; the op steps aside
    model = _moe_model("mixtral")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], target_parameters=STACKS,
                                          init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    ref = copy.deepcopy(model)
    peftfast.patch(model)
    _assert_matches(model, ref, ids)
    fallbacks = peftfast.report(model).module_runtime(model)[name]["fallbacks"]
    assert any("2 active adapters" in k for k in fallbacks)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_autocast_bf16_matches_peft_within_its_own_error(arch):
    # gpt-oss at its own clamp limit: a limit inside the bulk of h compares chance clamp flips of the low-precision
    # paths, not their rounding (see test_low_precision_within_twice_peft_merged_error)
    model = _moe_model(arch, modules=("q_proj",)) if arch != "gpt_oss" else _gpt_oss(swiglu_limit=7.0)
    ref = copy.deepcopy(model)
    exact = copy.deepcopy(model).double()
    exact.get_base_model().config._experts_implementation = "eager"  # grouped_mm takes no fp64
    peftfast.patch(model)
    ids = _ids(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, ids)
        ref_loss, ref_grads = _loss_and_grads(ref, ids)
    want_loss, want = _loss_and_grads(exact, ids)
    runtime = peftfast.report(model).module_runtime(model)
    assert [runtime[e.name] for e in _experts_entries(model)] == [{"fused": 1, "fallbacks": {}, "deferred": {}}] * 2
    assert abs(loss.double() - want_loss) <= 2 * abs(ref_loss.double() - want_loss) + 2e-3
    for n in want:
        if "experts" in n:
            assert max_rel_err(grads[n], want[n]) <= 2 * max_rel_err(ref_grads[n], want[n]) + 1e-3, n


def test_unpatch_restores_peft_forward_and_state_dict_is_untouched(tmp_path):
    model = _moe_model("olmoe")
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    peftfast.patch(model)
    root = model.get_submodule(_experts_entries(model)[0].name)
    assert "forward" in root.__dict__ and "_peftfast_moe" in root.__dict__
    assert model.state_dict().keys() == keys.keys()
    model.save_pretrained(tmp_path)
    peftfast.unpatch(model)
    assert "forward" not in root.__dict__ and "_peftfast_moe" not in root.__dict__
    for k, v in model.state_dict().items():
        assert torch.equal(v, keys[k]), k
    from peft import PeftModel

    base = _moe_base("olmoe")  # the same seed: the same base; the adapters come from disk
    reloaded = PeftModel.from_pretrained(base, tmp_path).train()
    ids = _ids(7)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)


def test_probe_rejects_a_class_computing_something_else():
    model = _moe_model("mixtral")
    root = model.get_submodule("base_model.model.model.layers.0.mlp.experts")
    base = moe_mod.chain(root)[1]
    original = type(base)

    class Doubled(original):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * original.forward(self, hidden_states, top_k_index, top_k_weights)

    base.__class__ = Doubled
    try:
        assert "computes something else" in moe_mod.why_not(root)
    finally:
        base.__class__ = original
    assert moe_mod.why_not(root) is None


def test_unsupported_layouts_are_skipped_with_a_reason():
    model = _gpt_oss()
    root = model.get_submodule("base_model.model.model.layers.0.mlp.experts")
    base = moe_mod.chain(root)[1]
    original = type(base)

    class NoPlusOne(original):  # alpha/limit present, but not gpt-oss's maths: the probe must tell
        def _apply_gate(self, gate_up):
            g, u = gate_up[..., ::2].clamp(max=self.limit), gate_up[..., 1::2].clamp(-self.limit, self.limit)
            return u * g * torch.sigmoid(g * self.alpha)

    class ReluGate(original):
        def _apply_gate(self, gate_up):
            return torch.relu(gate_up[..., ::2]) * gate_up[..., 1::2]

    try:
        base.__class__ = NoPlusOne
        assert moe_mod.why_not(root) == ("NoPlusOne's forward computes something else than Σ w·down(glu(gate_up)) "
                                         "(biases included)")
        base.__class__ = ReluGate
        assert moe_mod.why_not(root) == ("ReluGate's forward computes something else than Σ w·down(glu(gate_up)) "
                                         "(biases included)")
        alpha, base.alpha = base.alpha, None  # no numeric alpha/limit: no gate to try
        assert moe_mod.why_not(root) == ("ReluGate: its own _apply_gate is neither act(gate)·up nor a clamped SwiGLU "
                                         "with alpha/limit")
        base.__class__, base.alpha = original, alpha
        base.has_post_expert_norm = True
        peftfast.patch(model)
        entries = _experts_entries(model)
        assert len(entries) == 2 and [e.patched for e in entries] == [False, True]
        assert entries[0].reason == "GptOssExperts: a norm after each expert is not fused"
    finally:
        base.__class__, base.alpha = original, 1.702
        base.has_post_expert_norm = False
    assert moe_mod.why_not(root) is None
    # a stack other than gate_up/down (the router's weight) leaves the whole chain on PEFT's path
    model = _moe_model("mixtral", targets=["experts.gate_up_proj", "gate.weight"])
    peftfast.patch(model)
    router = [e for e in peftfast.report(model).entries if e.name.endswith("mlp.gate")]
    assert len(router) == 2 and not any(e.patched for e in router)
    assert router[0].reason == ("PEFT ParamWrapper on MixtralTopKRouter.weight: LoRA on a bare parameter other than "
                                "an expert stack runs PEFT's own path")
    assert len(_experts_entries(model)) == 2 and all(e.patched for e in _experts_entries(model))


def test_patch_again_reapplies_the_options():
    model = _moe_model("mixtral")
    ref = copy.deepcopy(model)
    peftfast.patch(model)
    root = model.get_submodule(_experts_entries(model)[0].name)
    assert root.__dict__["_peftfast_moe"].recompute is True
    peftfast.patch(model, recompute="none")
    assert root.__dict__["_peftfast_moe"].recompute is False
    peftfast.patch(model, fuse_mlp=False)
    assert "_peftfast_moe" not in root.__dict__ and "forward" not in root.__dict__
    peftfast.patch(model)
    _assert_matches(model, ref, _ids(11))


def test_fuse_mlp_false_leaves_experts_on_peft():
    model = _moe_model("mixtral")
    peftfast.patch(model, fuse_mlp=False)
    assert [e.reason for e in _experts_entries(model)] == ["fuse_mlp=False"] * 2
    root = model.get_submodule(_experts_entries(model)[0].name)
    assert "_peftfast_moe" not in root.__dict__
