"""Fused RoPE: parity with transformers' apply_rotary_pos_emb, memory contract, patching, AOT compile."""

import sys
import types

import pytest
import torch
from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb as cohere_rope
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave as deepseek_rope
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb as glm_rope
from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb as gpt_oss_rope
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

import peftfast
from peftfast import _ext
from peftfast.modules import rope as rope_mod
from peftfast.ops import _counters
from peftfast.ops.rope import rope
from peftfast.testing import aot

BACKENDS = ["torch", "triton"] + (["cpp"] if _ext.available() else [])


def _inputs(b, hq, hk, s, d, rot, dtype, *, layout=1, cos_batch=None):
    if layout == 1:  # the model's [B, S, H, D] projections viewed as [B, H, S, D]: non-contiguous
        q = torch.randn(b, s, hq, d).transpose(1, 2).to(dtype).requires_grad_()
        k = torch.randn(b, s, hk, d).transpose(1, 2).to(dtype).requires_grad_()
    else:
        q = torch.randn(b, s, hq, d).to(dtype).requires_grad_()
        k = torch.randn(b, s, hk, d).to(dtype).requires_grad_()
    cb = b if cos_batch is None else cos_batch
    theta = torch.randn(cb, s, rot // 2)
    cos = torch.cat([theta.cos(), theta.cos()], -1).to(dtype)
    sin = torch.cat([theta.sin(), theta.sin()], -1).to(dtype)
    return q, k, cos, sin


def _run(fn, q, k):
    q.grad = k.grad = None
    a, b = fn()
    ga = torch.linspace(-1, 1, a.numel()).view(a.shape).to(a.dtype)
    gb = torch.linspace(1, -1, b.numel()).view(b.shape).to(b.dtype)
    torch.autograd.backward([a, b], [ga, gb])
    return [a.detach().double(), b.detach().double(), q.grad.double(), k.grad.double()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,hq,hk,s,d,rot,layout,cos_batch", [
    (2, 4, 2, 7, 16, 16, 1, None),
    (1, 3, 1, 5, 12, 8, 1, None),  # partial rotary (Phi-3)
    (2, 2, 2, 9, 80, 80, 2, 1),  # [B, S, H, D] layout, head dim 80, cos shared over the batch
])
def test_fp32_matches_transformers_in_fp64(backend, b, hq, hk, s, d, rot, layout, cos_batch):
    ref_fn = llama_rope if rot == d else phi3_rope
    q, k, cos, sin = _inputs(b, hq, hk, s, d, rot, torch.float32, layout=layout, cos_batch=cos_batch)
    got = _run(lambda: rope(q, k, cos, sin, unsqueeze_dim=layout, backend=backend), q, k)
    rq, rk = (t.detach().double().requires_grad_() for t in (q, k))
    want = _run(lambda: ref_fn(rq, rk, cos.double(), sin.double(), unsqueeze_dim=layout), rq, rk)
    for a, w in zip(got, want):
        assert a.shape == w.shape
        assert torch.allclose(a, w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ref_fn,layout,rot,unsqueeze", [
    (cohere_rope, "pairs", 16, 1), (glm_rope, "pairs_half_cos", 8, 1), (glm_rope, "pairs_half_cos", 16, 2),
    (deepseek_rope, "deinterleave", 16, 1), (deepseek_rope, "deinterleave", 16, 2),
], ids=["cohere", "glm-partial", "glm-seq-major", "deepseek", "deepseek-seq-major"])
def test_interleaved_layouts_match_transformers_in_fp64(backend, ref_fn, layout, rot, unsqueeze):
    """Interleaved pairs (2i, 2i+1): Cohere's (cos interleaved as the model builds it), GLM's (cos halved then
    repeated in pairs, partial rotary) and DeepSeek's (each pair written out to the two halves, cos halved): output
    and the gradients of q and k against the model's own function in fp64, with cos/sin tables that are not
    repeated, so that every entry the formula reads is checked."""
    g = torch.Generator().manual_seed(5)
    d = 16
    src = torch.randn(2, 7, 4, d, generator=g), torch.randn(2, 7, 2, d, generator=g)
    q, k = ((t.transpose(1, 2) if unsqueeze == 1 else t).clone().requires_grad_() for t in src)
    cos, sin = torch.randn(2, 7, rot, generator=g), torch.randn(2, 7, rot, generator=g)
    got = _run(lambda: rope(q, k, cos, sin, unsqueeze_dim=unsqueeze, backend=backend, layout=layout), q, k)
    rq, rk = (t.detach().double().requires_grad_() for t in (q, k))
    want = _run(lambda: ref_fn(rq, rk, cos.double(), sin.double(), unsqueeze_dim=unsqueeze), rq, rk)
    for a, w in zip(got, want):
        assert a.shape == w.shape
        assert torch.allclose(a, w, atol=1e-5, rtol=0), (a - w).abs().max()


def test_probe_finds_each_family_layout():
    assert rope_mod._probe(llama_rope) is None and rope_mod._layout(llama_rope) == "half"
    assert rope_mod._probe(cohere_rope) is None and rope_mod._layout(cohere_rope) == "pairs"
    assert rope_mod._probe(glm_rope) is None and rope_mod._layout(glm_rope) == "pairs_half_cos"
    assert rope_mod._probe(deepseek_rope) is None and rope_mod._layout(deepseek_rope) == "deinterleave"
    assert rope_mod._probe(gpt_oss_rope) is None and rope_mod._layout(gpt_oss_rope) == "half_table"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unsqueeze", [1, 2])
def test_half_width_tables_match_gpt_oss_in_fp64(backend, unsqueeze):
    """gpt-oss passes cos/sin at half the head width (``x1·c - x2·s | x2·c + x1·s``): the patched call widens them to
    rotate-half's ``[c | c]``. Output and the gradients of q and k against gpt-oss's own function in fp64; a table
    of another width falls back to it, counted."""
    import functools

    g = torch.Generator().manual_seed(6)
    d = 16
    src = torch.randn(2, 7, 4, d, generator=g), torch.randn(2, 7, 2, d, generator=g)
    q, k = ((t.transpose(1, 2) if unsqueeze == 1 else t).clone().requires_grad_() for t in src)
    cos, sin = torch.randn(2, 7, d // 2, generator=g), torch.randn(2, 7, d // 2, generator=g)
    st = rope_mod.RoPEState(name="t", backend=backend, previous_forward=None)
    fused = functools.partial(rope_mod._fused, original=gpt_oss_rope, key=st.tally_key, backend=backend, name="t",
                              layout="half_table")
    got = _run(lambda: fused(q, k, cos, sin, unsqueeze_dim=unsqueeze), q, k)
    rq, rk = (t.detach().double().requires_grad_() for t in (q, k))
    want = _run(lambda: gpt_oss_rope(rq, rk, cos.double(), sin.double(), unsqueeze_dim=unsqueeze), rq, rk)
    for a, w in zip(got, want):
        assert a.shape == w.shape
        assert torch.allclose(a, w, atol=1e-5, rtol=0), (a - w).abs().max()
    assert st.fused_calls == 1 and not st.fallbacks
    with pytest.raises(RuntimeError):  # a full-width table: gpt-oss's own function is called, and refuses it
        fused(q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1), unsqueeze_dim=unsqueeze)
    assert st.fallbacks == {"unexpected apply_rotary_pos_emb arguments": 1}


def test_half_width_tables_are_widened_once_per_table():
    """Each layer gets the same half-width tables: the widened ``[c | c]``, ``[s | s]`` are made on the first call
    and reused (one copy kept for backward by all layers, not one each); a table written in place is widened anew."""
    import functools

    g = torch.Generator().manual_seed(7)
    d = 16
    q, k = torch.randn(2, 4, 7, d, generator=g).requires_grad_(), torch.randn(2, 2, 7, d, generator=g)
    cos, sin = torch.randn(2, 7, d // 2, generator=g), torch.randn(2, 7, d // 2, generator=g)
    st = rope_mod.RoPEState(name="t", backend="torch", previous_forward=None)
    fused = functools.partial(rope_mod._fused, original=gpt_oss_rope, key=st.tally_key, backend="torch", name="t",
                              layout="half_table")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = [fused(q, k, cos, sin) for _ in range(3)]
    tables = [t for t in saved if t.shape == (2, 7, d)]
    assert len(tables) == 6 and len({t.data_ptr() for t in tables}) == 2
    sum(o[0].sum() for o in outs).backward()
    want = gpt_oss_rope(q.detach(), k, cos, sin)
    assert all(torch.allclose(a, w, atol=1e-6) for a, w in zip(outs[-1], want))
    with torch.no_grad():
        cos.mul_(-0.5)
    got, want = fused(q.detach(), k, cos, sin), gpt_oss_rope(q.detach(), k, cos, sin)
    assert all(torch.allclose(a, w, atol=1e-6) for a, w in zip(got, want))


@pytest.mark.parametrize("arch", ["glm"])
def test_interleaved_rope_model_runs_fused(arch):
    """GLM (interleaved pairs, partial rotary): RoPE fused in every layer, loss and gradients as unpatched."""
    from _models import batch, clone, loss_and_grads, max_rel_err, peft_model

    model = peft_model(arch)
    ref = clone(model)
    peftfast.patch(model)
    ropes = [e for e in peftfast.report(model).modules if e.kind == "rope"]
    assert len(ropes) == 2 and all(e.patched for e in ropes)
    data = batch(arch)
    loss, grads = loss_and_grads(model, data)
    want, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - want.item()) <= 2e-5 * abs(want.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= 2e-5
    rt = peftfast.report(model).module_runtime(model)
    assert [r["fused"] for n, r in rt.items() if n.endswith("(rope)")] == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_transformers_error(backend, dtype):
    q, k, cos, sin = _inputs(2, 4, 2, 7, 16, 16, dtype)
    got = _run(lambda: rope(q, k, cos, sin, backend=backend), q, k)
    eager = _run(lambda: llama_rope(q, k, cos, sin), q, k)
    rq, rk, rc, rs = (t.detach().double().requires_grad_() if t.requires_grad else t.double() for t in (q, k, cos, sin))
    ref = _run(lambda: llama_rope(rq, rk, rc, rs), rq, rk)
    for a, e, r in zip(got, eager, ref):
        assert (a - r).abs().max() <= 2 * (e - r).abs().max() + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_cos_sin_only_and_one_launch_each_way(backend):
    q, k, cos, sin = _inputs(2, 4, 2, 7, 16, 16, torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _counters.count_launches() as fwd:
        a, b = rope(q, k, cos, sin, backend=backend)
    assert len(saved) == 2 and saved[0] is cos and saved[1] is sin
    with _counters.count_launches() as bwd:
        (a.sum() + b.sum()).backward()
    want = {"_rope_kernel": 1} if backend == "triton" else {}
    assert dict(fwd) == want and dict(bwd) == want


@pytest.mark.skipif(not _ext.available(), reason=f"peftfast._C not built: {_ext.status()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cpp_kernel_matches_the_torch_backend_on_any_strides(dtype):
    """csrc/rope.cpp against the torch backend (the same fp32 maths, rounded once): inputs strided along the head
    dim, partial rotary, cos shared over the batch or per sequence, both directions; and its registered op passes
    opcheck."""
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 0.0)
    for step, rot, cos_batch in ((2, 12, None), (1, 8, 1), (3, 12, 1)):
        q = torch.randn(2, 6, 4, 12 * step).to(dtype)[..., ::step].transpose(1, 2)  # [B, H, S, D], D stride `step`
        k = torch.randn(2, 2, 6, 12 * step).to(dtype)[..., ::step]
        _, _, cos, sin = _inputs(2, 4, 2, 6, 12, rot, dtype, cos_batch=cos_batch)
        for backward in (False, True):
            got = torch.ops.peftfast.rope(q, k, cos, sin, 1, backward, "cpp")
            want = torch.ops.peftfast.rope(q, k, cos, sin, 1, backward, "torch")
            for g, w in zip(got, want):
                assert g.shape == w.shape and g.stride() == w.stride()
                # fp16/bf16: one rounding of the same fp32 value, which FMA contraction may move by an fp32 ulp
                assert ((g.double() - w.double()).abs() <= tol + 2 * torch.finfo(dtype).eps * w.double().abs()).all()
                assert torch.equal(g[..., rot:], w[..., rot:])  # the tail is copied
        torch.library.opcheck(torch.ops.peftfast.rope_rotate, (q, k, cos, sin, True, True, False))


def test_bad_input_names_the_module():
    q, k, cos, sin = _inputs(1, 2, 1, 5, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="layers.3.self_attn: rotary dim 18"):
        rope(q, k, torch.randn(1, 5, 18), torch.randn(1, 5, 18), name="layers.3.self_attn")
    with pytest.raises(ValueError, match="do not match"):
        rope(q, k, cos[:, :4], sin[:, :4])


def _phi3_model():
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, partial_rotary_factor=0.5, max_position_embeddings=64, pad_token_id=0)
    model = get_peft_model(Phi3ForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    return model


def _loss_grads(model, **data):
    model.zero_grad(set_to_none=True)
    loss = model(**data).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
def test_phi3_partial_rotary_and_packed_positions(backend):
    model = _phi3_model()
    ids = torch.randint(1, 64, (1, 12))
    packed = dict(input_ids=ids, labels=ids, position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]))
    ref_loss, ref = _loss_grads(model, **packed)
    # the unpatched reference lets packed documents attend to each other; so does this patch without fused attention
    peftfast.patch(model, backend=backend, fuse_attention=False)
    ropes = [e for e in peftfast.report(model).modules if e.kind == "rope"]
    assert len(ropes) == 2 and all(e.patched for e in ropes)
    loss, got = _loss_grads(model, **packed)
    rt = peftfast.report(model).module_runtime(model)
    assert sum(r["fused"] for n, r in rt.items() if n.endswith("(rope)")) == 2
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-6), n
    peftfast.unpatch(model)
    assert all("forward" not in m.__dict__ for m in model.modules() if hasattr(m, "q_proj") or hasattr(m, "qkv_proj"))


def test_probe_refuses_a_different_formula():
    fake = types.ModuleType("peftfast_fake_modeling")
    fake.apply_rotary_pos_emb = lambda q, k, cos, sin, unsqueeze_dim=1: (q * cos.unsqueeze(1), k)  # not RoPE
    sys.modules[fake.__name__] = fake
    try:
        attn_cls = type("FakeAttention", (torch.nn.Module,), {"__module__": fake.__name__})
        attn = attn_cls()
        attn.q_proj, attn.k_proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        assert rope_mod.is_rope_attention(attn)
        assert "computes something else" in rope_mod.why_not(attn)
    finally:
        del sys.modules[fake.__name__]


def _rope_counts(model) -> dict[str, tuple[int, int]]:
    """(fused calls, fallback calls) per patched attention module."""
    return {n: (m._peftfast_rope.fused_calls, sum(m._peftfast_rope.fallbacks.values()))
            for n, m in model.named_modules() if "_peftfast_rope" in m.__dict__}


def test_the_modeling_global_is_never_replaced_and_copies_count_on_their_own():
    import copy
    import pickle

    import transformers.models.llama.modeling_llama as modeling
    from _models import batch, peft_model

    def aliases() -> set[str]:
        return {n for n in vars(modeling) if n.startswith("__peftfast_apply_rotary_pos_emb_")}

    original = modeling.apply_rotary_pos_emb
    model = peft_model("llama")
    before = aliases()
    seen = []
    attn = model.base_model.model.model.layers[0].self_attn
    peftfast.patch(model)
    hook = attn.q_proj.register_forward_hook(lambda *a: seen.append(modeling.apply_rotary_pos_emb))
    data = batch("llama")
    model(**data)
    hook.remove()
    assert seen and all(fn is original for fn in seen)  # not even during the patched call
    assert set(_rope_counts(model).values()) == {(1, 0)}

    ours = aliases() - before
    assert len(ours) == 2  # one per patched instance
    peftfast.patch(model, backend="triton")  # re-patching with another backend re-points the aliases
    assert {getattr(modeling, a).keywords["backend"] for a in ours} == {"triton"} and aliases() - before == ours
    for dup in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        dup(**data)
        assert set(_rope_counts(dup).values()) == {(2, 0)}  # its own counters (copied at 1)
    assert set(_rope_counts(model).values()) == {(1, 0)}
    peftfast.unpatch(model)
    assert not ours & aliases()
    assert modeling.apply_rotary_pos_emb is original


_DECORATED = """
import functools

def apply_rotary_pos_emb(q, k, cos, sin):
    return "original"

def renaming(fn):  # what transformers' deprecate_kwarg does (5.24 wraps the attention forwards with it)
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if "old" in kwargs:
            kwargs["new"] = kwargs.pop("old")
        return fn(*args, **kwargs)
    return wrapped

def opaque(fn):  # a wrapper that does not keep the wrapped function in its closure
    table = {"fn": fn}
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return table["fn"](*args, **kwargs)
    return wrapped

class Attn:
    @renaming
    def forward(self, new=None):
        return apply_rotary_pos_emb(None, None, None, None), new

class Opaque:
    @opaque
    def forward(self):
        return apply_rotary_pos_emb(None, None, None, None)
"""


def test_a_decorated_forward_keeps_its_decorator_and_reads_the_alias(monkeypatch):
    mod = types.ModuleType("peftfast_test_decorated_forward")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    exec(_DECORATED, vars(mod))
    new = rope_mod._renamed_function(mod.Attn.forward, {"apply_rotary_pos_emb": "__alias__"}, vars(mod))
    mod.__alias__ = lambda *a: "fused"
    assert new(mod.Attn(), old=3) == ("fused", 3)  # the decorator still renames, the inner code reads the alias
    assert mod.Attn().forward(old=3) == ("original", 3)  # the class is untouched
    assert new.__wrapped__ is not mod.Attn.forward.__wrapped__ and new.__qualname__ == mod.Attn.forward.__qualname__
    # no cell holds the wrapped function: refused (the caller then swaps the global around each call)
    assert rope_mod._renamed_function(mod.Opaque.forward, {"apply_rotary_pos_emb": "__alias__"}, vars(mod)) is None
    # another module's globals: refused
    assert rope_mod._renamed_function(mod.Attn.forward, {"apply_rotary_pos_emb": "__alias__"}, {}) is None


def test_an_earlier_instance_forward_gets_the_swapped_global():
    import transformers.models.llama.modeling_llama as modeling
    from _models import batch, peft_model

    model = peft_model("llama")
    ref = model(**batch("llama")).loss
    attn = model.base_model.model.model.layers[0].self_attn
    seen = []

    def hooked(*args, **kwargs):  # e.g. accelerate's hooks: an instance-level forward set before patch
        seen.append(modeling.apply_rotary_pos_emb)
        return type(attn).forward(attn, *args, **kwargs)

    attn.forward = hooked
    original = modeling.apply_rotary_pos_emb
    peftfast.patch(model, fuse_attention=False)
    loss = model(**batch("llama")).loss
    assert seen and seen[0] is not original and modeling.apply_rotary_pos_emb is original
    assert attn._peftfast_rope.fused_calls == 1
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    peftfast.unpatch(model)
    assert attn.forward is hooked


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_keep_the_projections_sequence_major_layout(backend):
    # the attention output then comes out [B, S, H, D] and the o-projection reads it without a copy
    q, k, cos, sin = _inputs(2, 4, 2, 5, 12, 8, torch.float32, layout=1)
    a, b = rope(q, k, cos, sin, backend=backend)
    assert a.stride() == q.stride() and b.stride() == k.stride()
    assert a.transpose(1, 2).is_contiguous() and b.transpose(1, 2).is_contiguous()
    qc, kc = q.detach().contiguous(), k.detach().contiguous()  # a contiguous input stays contiguous
    ac, bc = rope(qc, kc, cos, sin, backend=backend)
    assert ac.is_contiguous() and bc.is_contiguous()
    assert torch.equal(ac, a) and torch.equal(bc, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_op_passes_opcheck(backend):
    for layout, cos_batch, backward, pairs in ((1, None, False, "half"), (2, 1, True, "half"),
                                               (1, None, True, "pairs"), (2, 1, False, "pairs_half_cos")):
        q, k, cos, sin = _inputs(2, 4, 2, 5, 12, 8, torch.float32, layout=layout, cos_batch=cos_batch)
        torch.library.opcheck(torch.ops.peftfast.rope, (q, k, cos, sin, layout, backward, backend, pairs))


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time compile
# ----------------------------------------------------------------------------------------------------------------
def _plan() -> list[aot.Job]:
    jobs = []
    for arch in aot.ARCHS:
        for dt in ("bf16", "fp32"):
            for d, rot in ((128, 128), (96, 48), (256, 256), (80, 80), (64, 64)):
                p = "*" + dt
                args = {}
                for pre in ("q", "k", "qo", "ko"):
                    args.update({f"{pre}_ptr": p, f"s{pre}b": 4096 * d, f"s{pre}h": d, f"s{pre}s": 32 * d,
                                 f"s{pre}d": 1})
                for pre, c in (("cos", "c"), ("sin", "s")):
                    args.update({f"{pre}_ptr": p, f"s{c}b": 0, f"s{c}s": rot, f"s{c}d": 1})
                args.update(S=4096, HQ=32, HK=8, ROT=rot, D=d)
                # rotate-half everywhere; the interleaved layouts at their shapes (Cohere, GLM; DeepSeek's MLA
                # rotates a 64-wide slice of each head)
                layouts = (0,) + ((1,) if rot == d == 128 else (2,) if rot < d else (3,) if d == 64 else ())
                for layout in layouts:
                    for backward in (False, True):
                        meta = {"BACKWARD": backward, "LAYOUT": layout,
                                "BLOCK_HALF": rot // 2 if rot // 2 & (rot // 2 - 1) == 0 else 64, "BLOCK_D": 64,
                                "DOT_PRECISION": "tf32"}
                        variant = f"D{d}-R{rot}-{'bwd' if backward else 'fwd'}" + (f"-L{layout}" if layout else "")
                        jobs.append(aot.Job("_rope_kernel", variant, dt, arch, {"BLOCK_H": 16}, 4, 1, meta, args))
    return jobs


AOT_PLAN = _plan()


@pytest.fixture(scope="module")
def aot_results() -> dict[str, dict]:
    return {r["key"]: r for r in aot.run(AOT_PLAN)}


@pytest.mark.parametrize("job", AOT_PLAN, ids=lambda j: f"{j.variant}-{j.dtype}-sm{j.arch}")
def test_rope_kernel_compiles(job: aot.Job, aot_results: dict[str, dict]) -> None:
    res = aot_results[job.key]
    assert res["error"] is None, res["error"]
    assert res["ptx_target"] == ("sm_90a" if job.arch == 90 else f"sm_{job.arch}")
    assert res["shared"] <= 48 * 1024


def test_latent_attention_with_another_rope_form_is_reported_not_skipped_silently():
    """DeepSeek-V2's multi-head latent attention rotates with complex numbers (``apply_rotary_emb``), a form the
    probe does not take: its RoPE entries say so in the report (before, MLA modules were no candidates at all), and
    the model still trains as unpatched, its attention fused."""
    from _models import clone, loss_and_grads, max_rel_err, nonzero_lora_b
    from peft import LoraConfig, get_peft_model
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, n_group=1, topk_group=1, max_position_embeddings=64)
    model = nonzero_lora_b(get_peft_model(DeepseekV2ForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear")))
    ref = clone(model)
    peftfast.patch(model)
    ropes = [e for e in peftfast.report(model).modules if e.kind == "rope"]
    assert len(ropes) == 2 and all(not e.patched and "apply_rotary_emb" in e.reason for e in ropes), ropes
    assert all(e.patched for e in peftfast.report(model).modules if e.kind == "attention")
    ids = torch.randint(3, 128, (2, 9))
    loss, grads = loss_and_grads(model, dict(input_ids=ids, labels=ids))
    want, ref_grads = loss_and_grads(ref, dict(input_ids=ids, labels=ids))
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= 2e-5
