"""Fused attention: kernels vs an fp64 reference, memory contract, transformers integration, AOT compile."""

import math

import pytest
import torch
from _attention_ref import reference_attention as _reference
from _models import clone, loss_and_grads, max_rel_err, nonzero_lora_b, peft_model
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import peftfast
from peftfast import _ext
from peftfast.ops import _counters
from peftfast.ops import attention as attn_ops
from peftfast.ops.attention import ALL_SEGMENTS, _ranges_cache, flash_attention, key_ranges, query_ranges
from peftfast.testing import aot

# cpp: what backend "auto" resolves to on CPU with peftfast._C built (PyTorch's SDPA, with an additive mask for
# segments, prefix keys and bottom-right causal rows)
BACKENDS = ["torch", "triton"] + (["cpp"] if _ext.available() else [])


def _make(b, hq, hk, sq, sk, d, dtype, seg=None, dv=None):
    q = torch.randn(b, sq, hq, d).transpose(1, 2).to(dtype).requires_grad_()  # the model's strided views
    k = torch.randn(b, sk, hk, d).transpose(1, 2).to(dtype).requires_grad_()
    v = torch.randn(b, sk, hk, dv or d).transpose(1, 2).to(dtype).requires_grad_()
    qseg = kseg = None
    if seg == "padding":
        kseg = torch.zeros(b, sk, dtype=torch.int32)
        kseg[0, sk - max(1, sk // 3):] = -1
        qseg = kseg[:, sk - sq:].clone()
        qseg[qseg == -1] = -3
    elif seg == "packed":
        kseg = (torch.arange(sk)[None].expand(b, sk) * 3 // max(sk, 1)).to(torch.int32).contiguous()
        qseg = kseg[:, sk - sq:].clone()
    elif seg == "prefix":
        kseg = torch.zeros(b, sk, dtype=torch.int32)
        kseg[:, : sk - sq] = -2
        kseg[:, sk - sq:] = (torch.arange(sq) * 2 // max(sq, 1)).to(torch.int32)
        qseg = kseg[:, sk - sq:].clone()
    elif seg == "mixed":  # packed documents of uneven lengths, right padding in row 0, left padding in row 1
        kseg = torch.full((b, sk), -1, dtype=torch.int32)
        for row in range(b):
            lengths = (sk // 4, sk // 3, sk // 6) if row % 2 == 0 else (sk // 5, sk // 2)
            start = 0 if row % 2 == 0 else sk - sum(lengths)
            for doc, n in enumerate(lengths):
                kseg[row, start:start + n] = doc
                start += n
        qseg = kseg[:, sk - sq:].clone()
        qseg[qseg == -1] = -3
    return q, k, v, qseg, kseg


def _grads(fn, leaves, g):
    for t in leaves:
        t.grad = None
    o = fn()
    o.backward(g)
    return [o.detach().double()] + [t.grad.double() for t in leaves]


def _sides(window) -> dict:
    """A case's window: an int bounds the keys before the query, (left, right) both sides (either may be None)."""
    left, right = window if isinstance(window, tuple) else (window, None)
    return dict(window=left, window_right=right)


def _check(backend, b, hq, hk, sq, sk, d, causal, softcap=None, window=None, seg=None, dtype=torch.float32, dv=None):
    q, k, v, qseg, kseg = _make(b, hq, hk, sq, sk, d, dtype, seg, dv)
    scale = 1 / math.sqrt(d)
    g = torch.randn(b, sq, hq, dv or d).to(dtype)
    w = _sides(window)
    got = _grads(lambda: flash_attention(q, k, v, causal=causal, scale=scale, softcap=softcap, qseg=qseg, kseg=kseg,
                                         backend=backend, **w), [q, k, v], g)
    rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _grads(lambda: _reference(rq, rk, rv, causal, scale, softcap, w["window"], qseg, kseg,
                                    window_right=w["window_right"]), [rq, rk, rv], g.double())
    if dtype == torch.float32:
        for a, r in zip(got, ref):
            assert (a - r).abs().max() <= 2e-5 * r.abs().max().clamp_min(1.0)
        return
    eager = _grads(lambda: _reference(q, k, v, causal, scale, softcap, w["window"], qseg, kseg,
                                      window_right=w["window_right"]), [q, k, v], g)
    for a, e, r in zip(got, eager, ref):
        assert (a - r).abs().max() <= 2 * (e - r).abs().max() + 1e-3


CASES = [  # b, hq, hk, sq, sk, d, causal, softcap, window, seg
    (1, 2, 2, 1, 1, 16, True, None, None, None),
    (2, 4, 2, 17, 17, 16, True, None, None, None),
    (1, 4, 1, 17, 17, 24, False, None, None, None),  # MQA, bidirectional, head dim padded to 32
    (2, 2, 1, 9, 30, 16, True, None, None, None),  # bottom-right causal: q shorter than k
    (1, 2, 2, 33, 33, 80, True, 20.0, 8, None),  # Gemma 2: softcap + sliding window, head dim 80
    (2, 4, 2, 23, 23, 16, True, None, None, "padding"),
    (1, 2, 1, 31, 31, 16, True, None, None, "packed"),
    (2, 2, 2, 13, 19, 16, True, None, None, "prefix"),  # 6 prefix keys seen by every document
    (1, 2, 1, 19, 19, 32, False, None, 5, "packed"),
    (1, 2, 2, 113, 113, 16, True, None, None, "padding"),
    # many tiles per row: those of other documents and of padding are skipped (key_ranges, query_ranges)
    (2, 2, 1, 97, 97, 16, True, None, None, "mixed"),
    (2, 2, 2, 83, 83, 16, False, None, None, "mixed"),  # bidirectional: later documents' tiles skipped too
    (1, 2, 1, 61, 61, 16, True, None, 9, "mixed"),
    # bidirectional windows (ModernBERT's local layers: |i - j| < w), several tiles on each side of the band
    (1, 2, 1, 53, 53, 16, False, None, (5, 5), None),
    (2, 2, 2, 45, 45, 16, False, None, (9, 9), "mixed"),
    (1, 2, 2, 29, 29, 32, False, 10.0, (4, 7), "padding"),  # asymmetric, softcap
    (2, 2, 1, 9, 30, 16, False, None, (6, 3), "prefix"),  # fewer queries than keys: i' = i + 21
    (1, 2, 2, 40, 40, 16, False, None, (None, 3), None),  # the keys after the query bounded only
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fp32_matches_reference(backend, case):
    _check(backend, *case)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s", [203, 257])
def test_long_ragged_lengths(backend, s):
    _check(backend, 1, 2, 1, s, s, 64, True, seg="padding")


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float16), ("torch", torch.float16),
                                           ("torch", torch.bfloat16)]
                         + [("cpp", torch.float16), ("cpp", torch.bfloat16)] * _ext.available())
def test_low_precision_within_twice_eager_error(backend, dtype):
    _check(backend, 2, 4, 2, 21, 21, 32, True, seg="padding", dtype=dtype)


BIAS_SHAPES = {  # [B, HQ, SQ, SK] broadcast along each dimension in turn (T5: [1, H, SQ, SK])
    "full": (2, 4, 13, 19), "per-head": (1, 4, 13, 19), "per-row": (2, 1, 13, 19), "per-key": (1, 4, 1, 19),
    "per-query": (2, 4, 13, 1),
}


def _bias_case(backend, shape, seg, causal, softcap=None, dtype=torch.float32, grad=True, p=0.0):
    """Output and the gradients of q, k, v (and the bias) of attention with an additive score bias, against fp64
    (fp32 inputs) or within twice eager's error (low precision)."""
    b, hq, hk, sq, sk, d = 2, 4, 2, 13, 19, 16
    q, k, v, qseg, kseg = _make(b, hq, hk, sq, sk, d, dtype, seg)
    gen = torch.Generator().manual_seed(21)
    bias = (torch.randn(shape, generator=gen) * 2).to(dtype)
    if shape[0] == 2 and shape[2] == sq and shape[3] == sk:  # a strided view, as T5's bias often is
        bias = (torch.randn(shape[::-1], generator=gen) * 2).to(dtype).permute(3, 2, 1, 0).contiguous().transpose(
            2, 3).contiguous().transpose(2, 3)
    bias.requires_grad_(grad)
    g = torch.randn(b, sq, hq, d, generator=gen).to(dtype)
    leaves = [q, k, v] + ([bias] if grad else [])
    got = _grads(lambda: flash_attention(q, k, v, causal=causal, softcap=softcap, qseg=qseg, kseg=kseg, bias=bias,
                                         backend=backend, dropout_p=p, seed=5), leaves, g)
    if p:
        return got
    scale = 1 / math.sqrt(d)
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    rb = ref_in[3] if grad else bias.double()
    ref = _grads(lambda: _reference(*ref_in[:3], causal, scale, softcap, None, qseg, kseg, bias=rb), ref_in, g.double())
    if dtype == torch.float32:
        for a, r in zip(got, ref):
            assert (a - r).abs().max() <= 2e-5 * r.abs().max().clamp_min(1.0)
        return got
    eager = _grads(lambda: _reference(q, k, v, causal, scale, softcap, None, qseg, kseg, bias=bias), leaves, g)
    for a, e, r in zip(got, eager, ref):
        assert (a - r).abs().max() <= 2 * (e - r).abs().max() + 1e-3
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", BIAS_SHAPES.values(), ids=BIAS_SHAPES.keys())
def test_score_bias_matches_reference_with_its_gradient(backend, shape):
    """An additive score bias (T5's position bias), broadcast along any dimension: output and the gradients of q,
    k, v and the bias (summed over its broadcast dimensions) against fp64; prefix keys, causal, a softcap."""
    _bias_case(backend, shape, "prefix", True, softcap=8.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seg,causal", [("padding", False), ("packed", True), (None, False)])
def test_score_bias_without_a_gradient(backend, seg, causal):
    """A frozen bias (LoRA leaves T5's relative attention embedding frozen): no dS buffer, same results."""
    _bias_case(backend, (1, 4, 13, 19), seg, causal, grad=False)


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float16), ("torch", torch.bfloat16)]
                         + [("cpp", torch.bfloat16)] * _ext.available())
def test_score_bias_low_precision_within_twice_eager_error(backend, dtype):
    _bias_case(backend, (1, 4, 13, 19), "padding", True, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_bias_with_dropout_is_the_same_draw_forward_and_backward(backend):
    """With attention dropout the bias's gradient comes from the same mask as the output: two runs with one seed
    agree bit for bit, and a finite-difference check along the bias in fp64 holds."""
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the same q, k, v
        runs.append(_bias_case(backend, (1, 4, 13, 19), "padding", True, p=0.25))
    a, b = runs
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    if backend == "triton":
        return  # fp64 tl.dot is not a thing; the torch and C++ backends share the kernels' maths
    b_, hq, hk, sq, sk, d = 1, 2, 1, 5, 7, 8
    q, k, v, qseg, kseg = _make(b_, hq, hk, sq, sk, d, torch.float64, "padding")
    bias = torch.randn(1, hq, sq, sk, dtype=torch.float64, requires_grad=True)
    w = torch.randn(b_, sq, hq, d, dtype=torch.float64)

    def f(bb):
        return (flash_attention(q.detach(), k.detach(), v.detach(), qseg=qseg, kseg=kseg, bias=bb, backend=backend,
                                dropout_p=0.3, seed=9) * w).sum()

    assert torch.autograd.gradcheck(f, (bias,), eps=1e-6, atol=1e-6)


def _visible(qseg: torch.Tensor, kseg: torch.Tensor) -> torch.Tensor:
    """[B, SQ, SK] bool: the kernels' segment rule (equal ids, or a prefix key)."""
    return (qseg[:, :, None] == kseg[:, None, :]) | (kseg[:, None, :] == ALL_SEGMENTS)


@pytest.mark.parametrize("seg", ["padding", "packed", "prefix", "mixed", "random"])
@pytest.mark.parametrize("bm,bn", [(16, 16), (8, 32), (64, 16)])
def test_segment_ranges_are_the_hull_of_visible_pairs(seg, bm, bn):
    """Per query block the keys [lo, hi) it can see and per key block the queries that can see it: exactly the hull
    of the visible pairs (so a skipped tile holds none), empty where nothing is visible."""
    sq, sk = 45, 53
    if seg == "random":  # any ids, any order: -3..4 and a large one, prefix keys anywhere
        g = torch.Generator().manual_seed(3)
        qseg = torch.randint(-3, 5, (3, sq), generator=g, dtype=torch.int32)
        kseg = torch.randint(-3, 5, (3, sk), generator=g, dtype=torch.int32)
        qseg[0, :7], kseg[0, 40:] = 2**30, 2**30
    else:
        _, _, _, qseg, kseg = _make(2, 1, 1, sq, sk, 16, torch.float32, seg)
    _ranges_cache.clear()
    kr, qr = key_ranges(qseg, kseg, bm), query_ranges(qseg, kseg, bn)
    assert kr.dtype == qr.dtype == torch.int32
    assert kr.shape == (qseg.shape[0], -(-sq // bm), 2) and qr.shape == (qseg.shape[0], -(-sk // bn), 2)
    vis = _visible(qseg, kseg)
    for b in range(qseg.shape[0]):
        for blk in range(kr.shape[1]):
            cols = vis[b, blk * bm:(blk + 1) * bm].any(0).nonzero()
            lo, hi = kr[b, blk].tolist()
            assert (lo, hi) == ((cols.min().item(), cols.max().item() + 1) if len(cols) else (sk, 0))
        for blk in range(qr.shape[1]):
            rows = vis[b, :, blk * bn:(blk + 1) * bn].any(1).nonzero()
            lo, hi = qr[b, blk].tolist()
            assert (lo, hi) == ((rows.min().item(), rows.max().item() + 1) if len(rows) else (sq, 0))
    # the last call's ids are cached (every layer of a forward passes the same ones); a change of ids is seen
    assert key_ranges(qseg.detach(), kseg, bm) is kr and query_ranges(qseg, kseg.detach(), bn) is qr
    kseg.add_(0)  # an in-place write bumps the version
    assert key_ranges(qseg, kseg, bm) is not kr and query_ranges(qseg, kseg, bn) is not qr


def _poisoned_halves(layout: str, backend: str, **extra) -> None:
    """Two halves of 32 positions: two documents, padding then a document, or (no segments) causal rows whose first
    half never sees the second. The other half's q, k, v are NaN: a visited tile or chunk would spread it (0 · NaN)
    into this half's output or gradients even though its masks hide it, so finite values equal to the reference
    prove it is skipped forward, in dK/dV and in dQ."""
    s, half = 64, 32
    ids = torch.cat([torch.zeros(half), torch.ones(half)]).to(torch.int32)[None]
    if layout == "packed-bidirectional":
        qseg, kseg, causal, mine, other = ids, ids.clone(), False, slice(0, half), slice(half, s)
    elif layout == "left-padded-causal":
        kseg = torch.where(ids == 0, -1, 0).to(torch.int32)
        qseg, causal, mine, other = torch.where(kseg == -1, -3, kseg).to(torch.int32), True, slice(half, s), \
            slice(0, half)
    else:  # "long-causal"
        qseg = kseg = None
        causal, mine, other = True, slice(0, half), slice(half, s)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, s, 16, generator=g) for _ in range(3))
    grad = torch.randn(1, s, 2, 16, generator=g)
    clean = [t[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
    want = _grads(lambda: flash_attention(*clean, causal=causal, backend="torch"), clean, grad[:, mine])
    poisoned = [t.clone() for t in (q, k, v)]
    for t in poisoned:
        t[:, :, other] = float("nan")
    poisoned = [t.requires_grad_() for t in poisoned]
    got = _grads(lambda: flash_attention(*poisoned, causal=causal, qseg=qseg, kseg=kseg, backend=backend, **extra),
                 poisoned, grad)
    checked = [got[0][:, mine], got[1][:, :, mine], got[2][:, :, mine], got[3][:, :, mine]]
    if qseg is None:  # later queries see the poisoned keys: only this half's outputs and dQ are clean
        checked = checked[:2]
    for a, r in zip(checked, want):
        assert torch.isfinite(a).all()
        assert (a - r).abs().max() <= 2e-5 * r.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("layout", ["packed-bidirectional", "left-padded-causal"])
def test_triton_kernels_skip_the_tiles_no_query_of_a_block_can_see(layout):
    """16-wide tiles: each half is two tiles (see ``_poisoned_halves``)."""
    assert _tiles_in_interpreter() == 16
    _poisoned_halves(layout, "triton")


@pytest.mark.parametrize("poisoned", ["after", "before"])
def test_triton_kernels_skip_the_tiles_outside_a_bidirectional_window(poisoned):
    """64 positions in 16-wide tiles, a window of 5 on both sides (|i - j| < 5). With the last tile's q, k, v NaN,
    the outputs, dQ, dK and dV of the first tile stay finite and equal to a clean run's: its query block never
    visits that tile's keys (after the band) forward or in dQ. With the first tile NaN, the same holds for the last
    tile, whose key block never visits the first tile's queries (before the band) in dK/dV. Tiles in between see the
    NaN legitimately and spread it to their neighbours' partial sums, so only the far tiles are checked."""
    assert _tiles_in_interpreter() == 16
    s = 64
    bad, mine = (slice(48, 64), slice(0, 16)) if poisoned == "after" else (slice(0, 16), slice(48, 64))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, s, 16, generator=g) for _ in range(3))
    grad = torch.randn(1, s, 2, 16, generator=g)
    kw = dict(causal=False, window=5, window_right=5, backend="triton")
    clean = [t.clone().requires_grad_() for t in (q, k, v)]
    want = _grads(lambda: flash_attention(*clean, **kw), clean, grad)
    dirty = [t.clone() for t in (q, k, v)]
    for t in dirty:
        t[:, :, bad] = float("nan")
    dirty = [t.requires_grad_() for t in dirty]
    got = _grads(lambda: flash_attention(*dirty, **kw), dirty, grad)
    pairs = [(got[0][:, mine], want[0][:, mine])] + [(a[:, :, mine], r[:, :, mine]) for a, r in zip(got[1:], want[1:])]
    for a, r in pairs:
        assert torch.isfinite(a).all()
        assert (a - r).abs().max() <= 1e-6 * r.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_aten_path_in_small_chunks_matches_reference(case, monkeypatch):
    """The ATen path over chunks of 8 query rows, each against only the keys it can see (causal, window and segment
    bounds), and with dropout, which keeps the masks of whole key rows."""
    monkeypatch.setattr(attn_ops, "_TORCH_CHUNK", 8)
    _check("torch", *case)
    b, hq, hk, sq, sk, d, causal, softcap, window, seg = case
    q, k, v, qseg, kseg = _make(b, hq, hk, sq, sk, d, torch.float32, seg)
    kw = dict(causal=causal, softcap=softcap, **_sides(window), qseg=qseg, kseg=kseg, dropout_p=0.2, seed=5,
              backend="torch")
    g = torch.randn(b, sq, hq, d)
    skipping = _grads(lambda: flash_attention(q, k, v, **kw), [q, k, v], g)
    chunks = attn_ops._torch_chunks
    monkeypatch.setattr(attn_ops, "_torch_chunks", lambda sq, sk, *a: [(i0, i1, 0, sk)
                                                                       for i0, i1, _, _ in chunks(sq, sk, *a)])
    every_key = _grads(lambda: flash_attention(q, k, v, **kw), [q, k, v], g)  # the same chunks, so the same masks
    for a, r in zip(skipping, every_key):
        assert (a - r).abs().max() <= 2e-5 * r.abs().max().clamp_min(1.0)
    assert skipping[0].abs().max() > 0


@pytest.mark.parametrize("layout", ["packed-bidirectional", "left-padded-causal", "long-causal"])
def test_aten_path_skips_the_keys_no_query_of_a_chunk_can_see(layout, monkeypatch):
    """Chunks of 16 query rows on the ATen path (see ``_poisoned_halves``); causal rows skip later keys likewise.
    A softcap sends the no-segment case down the chunked path (plain causal attention goes to SDPA)."""
    monkeypatch.setattr(attn_ops, "_TORCH_CHUNK", 16)
    _poisoned_halves(layout, "torch", **({"softcap": 1e9} if layout == "long-causal" else {}))


@pytest.mark.skipif(not _ext.available(), reason=f"peftfast._C not built: {_ext.status()}")
def test_cpu_sdpa_path_shares_one_mask_per_forward(monkeypatch):
    """On the default CPU path the layers of a forward (same segments) share one additive mask: autograd keeps it
    once, not once per layer; other segments get their own. The cache holds a mask weakly (it lives as long as a
    graph that saved it), a small one outright, so that the layers of a decode step (no grad) build it once."""
    from peftfast.bench import saved_activation_bytes

    q, k, v, qseg, kseg = _make(2, 2, 2, 13, 19, 16, torch.float32, "prefix")

    def layers(n, segs=(qseg, kseg)):
        out = q.transpose(1, 2)  # [B, S, H, D], what the op returns
        for _ in range(n):  # each "layer" attends with the previous output as its query
            out = flash_attention(out.transpose(1, 2), k, v, causal=True, qseg=segs[0], kseg=segs[1], backend="cpp")
        return out

    _, one = saved_activation_bytes(lambda: layers(1), exclude=[q, k, v])
    _, three = saved_activation_bytes(lambda: layers(3), exclude=[q, k, v])
    mask_bytes = 2 * 1 * 13 * 19 * 4
    assert one.by_shape.get("(2, 1, 13, 19):float32") == mask_bytes
    assert not any(k.endswith(":bool") for k in one.by_shape)  # every row sees the prefix: no rows to zero
    assert three.by_shape.get("(2, 1, 13, 19):float32") == mask_bytes  # one mask for the three
    other = (qseg.clone(), kseg.clone())
    other[1][1, -3:] = -1  # padding: a different mask
    _, mixed = saved_activation_bytes(lambda: layers(1) + layers(1, other), exclude=[q, k, v])
    assert mixed.by_shape.get("(2, 1, 13, 19):float32") == 2 * mask_bytes
    # a small mask (2 KB here) is held outright: without grad the second layer reuses the first one's
    built = []
    real_allowed = attn_ops._allowed
    monkeypatch.setattr(attn_ops, "_allowed", lambda *a, **kw: built.append(1) or real_allowed(*a, **kw))
    other = (other[0], other[1].clone())
    other[1][0, -1] = -1
    with torch.no_grad():
        layers(3, other)
    assert len(built) == 1 and isinstance(attn_ops._SHARED.mask[3], torch.Tensor)
    # above HELD_MASK_BYTES, weakly: the mask lives as long as the graph that saved it, not until the next call
    monkeypatch.setattr(attn_ops, "HELD_MASK_BYTES", mask_bytes - 1)
    out = layers(2)
    storage = attn_ops._SHARED.mask[3][0]
    assert storage() is not None
    del out
    assert storage() is None
    with torch.no_grad():
        layers(2, other)
    assert len(built) == 4  # (one more for `layers(2)`) no mask outlives its layer: each no-grad layer builds one


def _tiles_in_interpreter() -> int:
    from peftfast.ops.attention import _bwd_tiles, _tiles

    sizes = {_tiles(16)["BLOCK_M"], _tiles(16)["BLOCK_N"], _bwd_tiles(16)["BLOCK_M"], _bwd_tiles(16)["BLOCK_N"]}
    assert len(sizes) == 1
    return sizes.pop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_not_nan(backend):
    q, k, v, qseg, kseg = _make(1, 2, 2, 6, 6, 16, torch.float32, "padding")
    o = flash_attention(q, k, v, causal=True, qseg=qseg, kseg=kseg, backend=backend)
    o.sum().backward()
    assert torch.isfinite(o).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert (o[0, qseg[0] == -3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_forward_and_backward_share_one_mask(backend):
    q, k, v, _, _ = _make(1, 2, 1, 12, 12, 16, torch.float32)

    def f(qq):
        return flash_attention(qq, k, v, causal=True, dropout_p=0.3, seed=77, backend=backend)

    o = f(q)
    assert torch.equal(o, f(q))  # the seed fixes the mask
    plain = flash_attention(q, k, v, causal=True, backend=backend)
    assert not torch.allclose(o, plain)
    direction = torch.randn_like(q)
    g = torch.randn_like(o)
    (o * g).sum().backward()
    eps = 1e-2
    with torch.no_grad():
        numeric = ((f(q + eps * direction) - f(q - eps * direction)) * g).sum() / (2 * eps)
    analytic = (q.grad * direction).sum()
    assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_no_repeated_kv_and_launch_counts(backend):
    q, k, v, qseg, kseg = _make(2, 8, 2, 16, 16, 16, torch.float32, "padding")
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _counters.count_launches() as fwd:
        o = flash_attention(q, k, v, causal=True, qseg=qseg, kseg=kseg, backend=backend)
    if backend == "cpp":  # SDPA: q, k, v, out, lse, the additive mask (shared by the layers) and the empty rows
        assert sorted(saved) == sorted([(2, 8, 16, 16), (2, 2, 16, 16), (2, 2, 16, 16), (2, 8, 16, 16), (2, 8, 16),
                                        (2, 1, 16, 16), (2, 1, 16, 1)])
    else:
        assert sorted(saved) == sorted([(2, 8, 16, 16), (2, 2, 16, 16), (2, 2, 16, 16), (2, 16, 8, 16), (2, 8, 16),
                                        (2, 16), (2, 16)])  # q, k, v, out, lse, segment ids: k/v keep 2 heads
    with _counters.count_launches() as bwd:
        o.sum().backward()
    if backend == "triton":
        assert dict(fwd) == {"_attn_fwd_kernel": 1}
        assert dict(bwd) == {"_attn_bwd_dkdv_kernel": 1, "_attn_bwd_dq_kernel": 1}


MLA_CASES = [  # b, hq, hk, sq, sk, d, causal, softcap, window, seg, dv: value heads narrower than query/key heads
    (2, 4, 4, 17, 17, 24, True, None, None, None, 16),  # DeepSeek's MLA: q/k 192 wide, v 128 (here 24 and 16)
    (2, 4, 2, 23, 23, 16, True, None, None, "padding", 8),
    (2, 2, 2, 13, 19, 16, True, None, None, "prefix", 8),
    (1, 2, 1, 33, 33, 32, True, 20.0, 8, "packed", 16),
    (2, 2, 2, 45, 45, 16, False, None, (9, 9), "mixed", 12),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MLA_CASES)
def test_value_heads_narrower_than_query_heads(backend, case):
    """v [B, HK, SK, DV] with DV < D: the output is [B, SQ, HQ, DV], with q's, k's and v's gradients, on every path
    (SDPA takes DV as it is; the kernels, with v padded to D)."""
    *head, dv = case
    _check(backend, *head, dv=dv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_heads_narrower_than_query_heads_in_low_precision(backend):
    _check(backend, 2, 4, 2, 23, 23, 24, True, seg="padding", dtype=torch.float16, dv=16)


def test_bad_input_is_a_clear_error():
    q, k, v, _, _ = _make(1, 2, 1, 4, 4, 16, torch.float32)
    big = torch.randn(1, 2, 4, 272)
    with pytest.raises(ValueError, match="layers.0.attn: head dims.*at most 256"):
        flash_attention(big, big, big, name="layers.0.attn")
    with pytest.raises(ValueError, match="head dims q 16, k 16, v 24: .* v at most theirs"):
        flash_attention(q, k, torch.randn(1, 1, 4, 24))
    with pytest.raises(ValueError, match="dtypes differ"):
        flash_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="segment ids"):
        flash_attention(q, k, v, qseg=torch.zeros(1, 3, dtype=torch.int32), kseg=torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="grouped heads"):
        flash_attention(q, torch.randn(1, 3, 4, 16), torch.randn(1, 3, 4, 16))
    with pytest.raises(ValueError, match=r"layers.1.attn: score bias of shape \(1, 3, 4, 4\) does not broadcast"):
        flash_attention(q, k, v, bias=torch.zeros(1, 3, 4, 4), name="layers.1.attn")
    with pytest.raises(ValueError, match="score bias must be a floating tensor"):
        flash_attention(q, k, v, bias=torch.zeros(1, 2, 4, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# transformers integration
# ----------------------------------------------------------------------------------------------------------------
def _padded(vocab=128):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_padded_batch_matches_sdpa(arch):
    model = peft_model(arch)
    ref = clone(model)
    ref.get_base_model().set_attn_implementation("sdpa")
    peftfast.patch(model)
    ids, mask = _padded()
    attn = _matches_reference(model, ref, dict(input_ids=ids, attention_mask=mask,
                                               labels=ids.masked_fill(mask == 0, -100)), mask.bool())
    assert len(attn) == 2 and all(r["fused"] == 1 and not r["fallbacks"] for r in attn.values())


@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved-rope", "rotate-half-rope"])
def test_multi_head_latent_attention_runs_fused(interleave):
    """DeepSeek-V3's multi-head latent attention hands the attention function q/k heads (nope + rope dims) wider
    than its v heads: fused, on a padded batch, with SDPA's logits and gradients; its two down-projections of the
    hidden states run as one sibling group. Its RoPE runs fused too, in either form the config picks: the
    interleaved pairs written out as halves (``rope_interleave``, DeepSeek's default) or rotate-half."""
    from peft import LoraConfig, get_peft_model
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_group=1, topk_group=1, max_position_embeddings=64, attn_implementation="sdpa",
        rope_interleave=interleave)
    model = nonzero_lora_b(get_peft_model(DeepseekV3ForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear")))
    ref = clone(model)
    peftfast.patch(model)
    ropes = [e for e in peftfast.report(model).modules if e.kind == "rope"]
    assert len(ropes) == 2 and all(e.patched for e in ropes), ropes
    ids, mask = _padded()
    attn = _matches_reference(model, ref, dict(input_ids=ids, attention_mask=mask,
                                               labels=ids.masked_fill(mask == 0, -100)), mask.bool())
    assert len(attn) == 2 and all(r["fused"] == 1 and not r["fallbacks"] for r in attn.values()), attn
    rope_rt = {n: r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith("(rope)")}
    assert len(rope_rt) == 2 and all(r["fused"] == 1 and not r["fallbacks"] for r in rope_rt.values()), rope_rt
    # the query's and the joint key/value down-projections read the same input: one sibling group per layer
    groups = {e.group for e in peftfast.report(model).entries if e.group}
    assert groups == {f"base_model.model.model.layers.{i}.self_attn.{{q_a_proj,kv_a_proj_with_mqa}}" for i in (0, 1)}
    assert {r["fused"] for r in peftfast.report(model).runtime(model).values()} == {1}


def _matches_reference(model, ref, data: dict, keep: torch.Tensor) -> dict:
    """The patched ``model`` gives ``ref``'s logits (where ``keep``) and gradients on ``data``; returns the attention
    modules' runtime counts."""
    out, want = model(**data), ref(**data)
    assert torch.allclose(out.logits[keep], want.logits[keep], atol=2e-5, rtol=1e-4)
    out.loss.backward()
    want.loss.backward()
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, r.grad, atol=1e-5, rtol=1e-4), n
    rt = peftfast.report(model).module_runtime(model)
    return {n: r for n, r in rt.items() if n.endswith("(attention)")}


@pytest.mark.parametrize("tgt", [6, 14], ids=["fewer-queries", "more-queries"])
def test_encoder_decoder_padded_batch_matches_eager(tgt):
    """BART (no ``_supports_attention_backend`` flag, yet its attention calls the interface): encoder, decoder and
    cross-attention all fused; the source mask pads the cross-attention keys only, whichever stack is longer."""
    model = peft_model("bart", lora_dropout=0.0)
    ref = clone(model)
    ref.get_base_model().set_attn_implementation("eager")
    rep = peftfast.patch(model)
    assert model.get_base_model().config._attn_implementation == "peftfast", rep.format(model)
    cross = [n for n, m in model.named_modules() if m.__dict__.get("_peftfast_cross")]
    assert cross and all(n.endswith("encoder_attn") for n in cross) and len(cross) == 2
    ids, mask = _padded()
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(2, 128, (3, tgt), generator=g)
    dmask = torch.ones_like(labels)
    dmask[1, tgt - 2:] = 0
    labels = labels.masked_fill(dmask == 0, -100)
    data = dict(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
    attn = _matches_reference(model, ref, data, dmask.bool())
    # two encoder self-attentions, two decoder self-attentions, two cross-attentions
    assert len(attn) == 6 and all(r["fused"] == 1 and not r["fallbacks"] for r in attn.values()), attn
    peftfast.unpatch(model)
    assert not any("_peftfast_cross" in m.__dict__ for m in model.modules())


def _t5_family(name: str, **overrides):
    import transformers as tf

    kw = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **overrides)
    cls, cfg = {"t5": ("T5ForConditionalGeneration", "T5Config"), "mt5": ("MT5ForConditionalGeneration", "MT5Config"),
                "umt5": ("UMT5ForConditionalGeneration", "UMT5Config")}[name]
    return getattr(tf, cls)(getattr(tf, cfg)(**kw))


def _t5_batch(tgt: int) -> dict:
    ids, mask = _padded(vocab=100)
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(2, 100, (3, tgt), generator=g)
    dmask = torch.ones_like(labels)
    dmask[1, tgt - 2:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(dmask == 0, -100),
                decoder_attention_mask=dmask)


@pytest.mark.parametrize("tgt", [6, 14], ids=["fewer-queries", "more-queries"])
@pytest.mark.parametrize("name", ["t5", "mt5", "umt5"])
def test_t5_position_bias_runs_fused(name, tgt):
    """T5, mT5 and UMT5 (one bias shared by all layers; UMT5: one per layer) declare no flash attention for their
    position bias, which the kernel adds: encoder, decoder and cross-attention fused, padded source and target,
    loss and every gradient as eager attention's."""
    model, ref = _lora_and_reference(_t5_family(name))
    peftfast.patch(model)
    (entry,) = [e for e in peftfast.report(model).modules if e.kind == "attention"]
    data = _t5_batch(tgt)
    loss, grads = loss_and_grads(model, data)
    want, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - want.item()) <= 2e-5 * abs(want.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-4
    if model.get_base_model().decoder.block[0].layer[0].SelfAttention.is_causal is False:
        # older transformers (5.17) build UMT5's decoder self-attention with is_causal=False, causal through its 4-D
        # mask only: declined with that reason, never fused non-causal
        assert name == "umt5" and not entry.patched and "is_causal=False" in entry.reason, entry
        return
    assert entry.patched, entry.reason
    rt = peftfast.report(model).module_runtime(model)
    attn = {n: r for n, r in rt.items() if n.endswith("(attention)")}
    assert len(attn) == 6 and all(r["fused"] == 1 and not r["fallbacks"] for r in attn.values()), attn


def test_t5_trainable_position_bias_gets_its_gradient():
    """With the relative attention embedding trained (PEFT ``modules_to_save`` or full fine-tuning) and gradient
    checkpointing (which makes the cross-attention's zero bias require grad), the bias's gradient flows through the
    fused kernel: the embedding's gradient equals eager's."""
    base = _t5_family("t5")
    model, ref = _lora_and_reference(base)
    for m in (model, ref):
        for n, p in m.named_parameters():
            if "relative_attention_bias" in n:
                p.requires_grad_(True)
        m.get_base_model().gradient_checkpointing_enable()
    peftfast.patch(model)
    data = _t5_batch(9)
    loss, grads = loss_and_grads(model, data)
    want, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - want.item()) <= 2e-5 * abs(want.item())
    bias_grads = [n for n in grads if "relative_attention_bias" in n]
    assert len(bias_grads) == 2  # encoder and decoder
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-4
    rt = peftfast.report(model).module_runtime(model)
    attn = [r for n, r in rt.items() if n.endswith("(attention)")]
    assert attn and all(r["fused"] >= 1 and not r["fallbacks"] for r in attn), rt


def test_t5_keeps_no_score_matrix_per_layer():
    """Eager T5 attention keeps S x S probabilities per layer; fused, the only S x S tensors kept are the position
    biases, one storage [1, H, S, S] per stack shared by its layers."""
    data = _t5_batch(9)  # source 11, target 9: scores are [.., 11, 11], [.., 9, 9] or [.., 9, 11]
    scores = {}
    for patched in (False, True):
        torch.manual_seed(0)
        model, _ = _lora_and_reference(_t5_family("t5"))
        if patched:
            peftfast.patch(model)
        found = {}

        def pack(t):
            if t.dim() == 4 and t.shape[-2] in (9, 11) and t.shape[-1] in (9, 11):
                found[t.untyped_storage().data_ptr()] = tuple(t.shape)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**data).loss  # noqa: F841 (the graph, and what it saved, stays alive)
        scores[patched] = sorted(found.values())
    assert len(scores[False]) >= 6 and any(s[0] == 3 for s in scores[False])  # eager: per layer, per batch row
    # fused: the encoder's and the decoder's bias, and the cross-attention's zeros, each [1, H, SQ, SK]
    assert len(scores[True]) <= 3 and all(s[0] == 1 for s in scores[True]), scores[True]


def _unflagged(name: str):
    """A tiny model of a family that never sets ``_supports_attention_backend`` (so inherits False) while its
    attention calls transformers' interface: (model, batch, has cross-attention)."""
    import transformers as tf

    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 100, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    causal = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    labels = torch.randint(3, 100, (2, 7), generator=g)
    small = dict(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=1,
                 decoder_start_token_id=2, bos_token_id=0, eos_token_id=2)
    if name == "whisper":
        cfg = tf.WhisperConfig(**small, num_mel_bins=8, max_source_positions=10, max_target_positions=20)
        return tf.WhisperForConditionalGeneration(cfg), dict(input_features=torch.randn(2, 8, 20, generator=g),
                                                             labels=labels), True
    if name == "marian":
        cfg = tf.MarianConfig(**small, max_position_embeddings=64)
        return tf.MarianMTModel(cfg), dict(input_ids=ids, attention_mask=mask, labels=labels), True
    decoder = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=2)
    if name == "stablelm":
        return tf.StableLmForCausalLM(tf.StableLmConfig(**decoder, num_hidden_layers=2)), causal, False
    cls = getattr(tf, "Qwen3_5ForCausalLM", None)
    if cls is None:
        pytest.skip(f"transformers {tf.__version__} has no Qwen3.5")
    # three Gated DeltaNet layers, then one full-attention layer (the one the fused attention serves)
    cfg = tf.Qwen3_5TextConfig(**decoder, num_hidden_layers=4, head_dim=8, linear_num_key_heads=2,
                               linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
    return cls(cfg), causal, False


@pytest.mark.parametrize("name", ["whisper", "marian", "stablelm", "qwen3_5"])
def test_families_without_the_backend_flag_get_the_fused_attention(name):
    torch.manual_seed(0)
    base, data, has_cross = _unflagged(name)
    assert base._supports_attention_backend is False  # what the probe of the model's own code stands in for
    model, ref = _lora_and_reference(base)
    peftfast.patch(model)
    (entry,) = [e for e in peftfast.report(model).modules if e.kind == "attention"]
    assert entry.patched, entry.reason
    assert any(m.__dict__.get("_peftfast_cross") for m in model.modules()) == has_cross
    loss, grads = loss_and_grads(model, data)
    want, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - want.item()) <= 2e-5 * abs(want.item())
    errs = {n: max_rel_err(grads[n], ref_grads[n]) for n in grads}
    assert max(errs.values()) <= 1e-4, max(errs.items(), key=lambda kv: kv[1])
    rt = peftfast.report(model).module_runtime(model)
    attn = [r for n, r in rt.items() if n.endswith("(attention)")]
    assert attn and all(r["fused"] >= 1 and not r["fallbacks"] for r in attn), rt


def test_models_that_compute_their_own_attention_are_refused_with_the_reason():
    import transformers as tf

    from peftfast.modules.attention import why_not

    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                   num_heads=4, decoder_start_token_id=0))
    assert type(t5)._supports_flash_attn is False and why_not(t5) is None  # its position bias: the kernel adds it
    deberta = tf.DebertaV2Model(tf.DebertaV2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=4, intermediate_size=32))
    assert "computes its own attention" in why_not(deberta)  # no module of it calls the interface

    class Declared(tf.LlamaForCausalLM):  # says so itself, whatever its code calls
        _supports_attention_backend = False

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    assert "computes its own attention" in why_not(Declared(cfg))
    assert why_not(tf.LlamaForCausalLM(cfg)) is None
    # Pegasus-X calls the interface and takes flash attention, but its decoder self-attention keeps is_causal=False:
    # causal through its 4-D mask only, it would see later tokens on the 2-D path
    pegasus_x = tf.PegasusXForConditionalGeneration(tf.PegasusXConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64))
    assert "model.decoder.layers.0.self_attn is a decoder self-attention with is_causal=False" in why_not(pegasus_x)


def _tiny_causal_lm(model_type: str):
    """A two-layer random model of ``model_type`` with hidden 64 (None where transformers has no such family)."""
    import transformers as tf

    try:
        cfg = tf.AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64)
    except (KeyError, ValueError):
        return None
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).float()


def _lora_and_reference(base):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(target_modules="all-linear", r=4, lora_alpha=8))
    with torch.no_grad():
        for m in model.modules():
            for b in getattr(m, "lora_B", {}).values():
                b.weight.normal_(0.0, 0.2)
    model.train()
    ref = clone(model)
    ref.get_base_model().set_attn_implementation("eager")
    return model, ref


@pytest.mark.parametrize("model_type", ["afmoe", "jetmoe"])
def test_models_that_view_the_attention_output_get_a_dense_one(model_type):
    """AFMoE and JetMoE ``.view()`` what the attention function returns, as transformers' own SDPA path makes it
    ([B, S, H, D] in memory); from a head-major q, PyTorch's SDPA alone would not."""
    base = _tiny_causal_lm(model_type)
    if base is None:
        pytest.skip(f"this transformers has no {model_type}")
    model, ref = _lora_and_reference(base)
    peftfast.patch(model)
    ids, mask = _padded(vocab=100)
    data = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    loss, grads = loss_and_grads(model, data)
    want, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - want.item()) <= 2e-5 * abs(want.item())
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-4
    rt = peftfast.report(model).module_runtime(model)
    attn = [r for n, r in rt.items() if n.endswith("(attention)")]
    assert attn and all(r["fused"] >= 1 and not r["fallbacks"] for r in attn), rt


@pytest.mark.parametrize("backend", ["torch", "cpp"] if _ext.available() else ["torch"])
@pytest.mark.parametrize("seg", [False, True])
def test_output_is_dense_whatever_the_query_layout(backend, seg):
    q = torch.randn(2, 4, 12, 8)  # head-major, as after a q-norm on [B, H, S, D]
    k, v = torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    qseg = kseg = None
    if seg:
        kseg = torch.zeros(2, 12, dtype=torch.int32)
        kseg[0, 9:] = -1
        qseg = kseg.clone()
    out = flash_attention(q, k, v, causal=True, qseg=qseg, kseg=kseg, backend=backend)
    assert out.shape == (2, 12, 4, 8) and out.is_contiguous()
    assert out.view(2, 12, 32).shape == (2, 12, 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_sum_exp_is_differentiable_and_sinks_compose_with_it(backend):
    """``return_lse``: the log-sum-exp's gradient reaches q and k (the backward's row term shifts by it), and
    attention sinks, the output scaled by sigmoid(lse - sink), match a softmax over the keys and the sink column,
    forward and every gradient (sinks included), against fp64; causal with padding."""
    dt = torch.float16 if backend == "triton" else torch.float32  # the interpreter's bf16 tl.dot is broken
    g = torch.Generator().manual_seed(11)
    b, hq, hk, s, d = 2, 4, 2, 13, 16
    q = torch.randn(b, s, hq, d, generator=g).transpose(1, 2)
    k, v = torch.randn(b, hk, s, d, generator=g), torch.randn(b, hk, s, d, generator=g)
    sinks = torch.randn(hq, generator=g)
    kseg = torch.zeros(b, s, dtype=torch.int32)
    kseg[1, 10:] = -1
    qseg = kseg.clone()
    qseg[qseg == -1] = -3
    w_out, w_lse = torch.randn(b, s, hq, d, generator=g), torch.randn(b, hq, s, generator=g)
    keep = torch.ones(s, s, dtype=torch.bool).tril()[None, None] & (kseg >= 0)[:, None, None, :]
    rows = (qseg >= 0)  # [B, S]: rows that see keys

    def run(q, k, v, sinks, ref):
        if ref:
            kk, vv = (t.repeat_interleave(hq // hk, 1) for t in (k, v))
            sc = (q @ kk.transpose(-1, -2) * d**-0.5).masked_fill(~keep, float("-inf"))
            lse = torch.logsumexp(sc, -1).masked_fill(~rows[:, None], 0.0)
            p = torch.softmax(torch.cat([sc, sinks.view(1, hq, 1, 1).expand(b, hq, s, 1)], -1), -1)[..., :s]
            out = (p.nan_to_num(0.0) @ vv).transpose(1, 2)
        else:
            o, lse = flash_attention(q, k, v, causal=True, qseg=qseg, kseg=kseg, backend=backend, return_lse=True)
            out = o * torch.sigmoid(lse - sinks.view(1, -1, 1)).transpose(1, 2).unsqueeze(-1).to(o.dtype)
        return out, lse

    results = []
    for ref, dtype in ((True, torch.float64), (False, dt)):
        ins = [t.to(dtype if t is not sinks else torch.float64 if ref else torch.float32).requires_grad_()
               for t in (q, k, v, sinks)]
        out, lse = run(*ins, ref)
        m = rows[:, :, None, None]
        loss = (out.double() * w_out.double() * m).sum() + (lse.double() * w_lse.double() * rows[:, None]).sum()
        loss.backward()
        results.append([out.detach().double() * m, lse.detach().double() * rows[:, None],
                        *(t.grad.double() for t in ins)])
    tol = 2e-3 if dt == torch.float16 else 1e-4
    for got, want in zip(results[1], results[0]):
        assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()


def test_attention_sinks_run_fused():
    """gpt-oss adds one learned logit per head to every softmax row (``s_aux``): its attention runs fused, the
    loss and every gradient (the sinks' too) as eager attention's."""
    base = _tiny_causal_lm("gpt_oss")
    if base is None:
        pytest.skip("this transformers has no gpt_oss")
    model, ref = _lora_and_reference(base)
    for m in (model, ref):  # the sinks (one logit per head) train here, to check their gradient
        for n, p in m.named_parameters():
            if n.endswith("sinks"):
                p.requires_grad_(True)
    peftfast.patch(model)
    (entry,) = [e for e in peftfast.report(model).modules if e.kind == "attention"]
    assert entry.patched, entry.reason
    ids, mask = _padded(vocab=100)
    data = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    loss, grads = loss_and_grads(model, data)
    want, ref_grads = loss_and_grads(ref, data)
    assert abs(loss.item() - want.item()) <= 2e-5 * abs(want.item())
    assert any(n.endswith("sinks") for n in grads)
    assert max(max_rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-4
    rt = peftfast.report(model).module_runtime(model)
    attn = [r for n, r in rt.items() if n.endswith("(attention)")]
    assert attn and all(r["fused"] >= 1 and not r["fallbacks"] for r in attn), rt


def test_the_fallback_computes_sinks_position_bias_head_mask_and_weights_exactly():
    """A call that reaches the fallback with sinks (or a position bias, a head mask, asked-for weights) computes
    them as eager attention does (fp64)."""
    from peftfast.modules.attention import AttentionStats, peftfast_attention_forward

    g = torch.Generator().manual_seed(8)
    b, h, s, d = 2, 4, 7, 8
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(h, generator=g, dtype=torch.float64)
    bias = torch.randn(1, h, s, s, generator=g, dtype=torch.float64)
    head_mask = torch.rand(1, h, 1, 1, generator=g, dtype=torch.float64)
    mask2d = torch.ones(b, s, dtype=torch.long)
    mask2d[1, 5:] = 0
    module = nn.Module()
    module.__dict__["_peftfast_attn"] = AttentionStats()
    module.is_causal = True
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    keep = causal[None, None] & mask2d.bool()[:, None, None, :]
    # a position bias alone runs fused (test_position_bias_runs_fused): with weights asked for, the fallback adds it
    for kw in (dict(s_aux=sinks, output_attentions=True), dict(position_bias=bias, output_attentions=True),
               dict(head_mask=head_mask), dict(output_attentions=True)):
        out, weights = peftfast_attention_forward(module, q, k, v, mask2d, scaling=0.3, **kw)
        sc = q @ k.transpose(-1, -2) * 0.3 + kw.get("position_bias", 0)
        sc = sc.masked_fill(~keep, float("-inf"))
        if "s_aux" in kw:
            sc = torch.cat([sc, sinks.view(1, h, 1, 1).expand(b, h, s, 1)], dim=-1)
        p = torch.softmax(sc, dim=-1)[..., :s] * kw.get("head_mask", 1.0)
        want = (p @ v).transpose(1, 2)
        rows = mask2d.bool()  # padding queries see nothing here (0), eager's see the row's other keys: not compared
        assert torch.allclose(out[rows], want[rows], atol=1e-10), kw
        assert weights is not None
        assert torch.allclose(weights.transpose(1, 2)[rows], p.transpose(1, 2)[rows], atol=1e-10)
    text = str(dict(module._peftfast_attn.fallbacks))
    assert "head_mask" in text and "output_attentions" in text


def _attend(self, x):  # a helper an attention forward delegates the call of the interface to (a global name)
    return ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)


def _own(self, x):
    return x


def test_a_flagged_model_without_flash_support_is_refused():
    """Doge is flagged for the interface, yet its dynamic mask needs more than the 2-D padding mask the flash
    builder gives."""
    from peftfast.modules.attention import why_not

    doge = _tiny_causal_lm("doge")
    if doge is None:
        pytest.skip("this transformers has no doge")
    assert type(doge)._supports_attention_backend and "_supports_flash_attn=False" in why_not(doge)


def test_the_interface_probe_reads_helpers_of_the_model_classes_only():
    import transformers as tf

    from peftfast.modules.attention import why_not

    for helper, want in ((_attend, None), (_own, "computes its own attention")):
        attn = type("FakeAttention", (nn.Module,), {"forward": lambda self, x: self._attend(x), "_attend": helper})
        model_cls = type("FakeModel", (tf.PreTrainedModel,), {"config_class": tf.PretrainedConfig,
                                                              "_supports_flash_attn": True})
        for cls in (attn, model_cls):
            cls.__module__ = "transformers.models.fake.modeling_fake"
        model = model_cls(tf.PretrainedConfig())
        model.attn = attn()
        got = why_not(model)
        assert got is None if want is None else want in got, got
        attn.__module__ = "somewhere_else"  # a class outside transformers' model families is not read
        assert "computes its own attention" in why_not(model)


def test_cross_attention_segment_ids_pad_keys_only():
    from peftfast.modules.attention import cross_segment_ids

    q, k = torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    qseg, kseg, why = cross_segment_ids(q, k, mask, {})
    assert why is None and qseg.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert kseg.tolist() == [[0, 0, 0, -1, -1], [0, 0, 0, 0, 0]]
    assert cross_segment_ids(q, k, torch.ones(2, 5), {}) == (None, None, None)
    assert "cu_seq_lens" in cross_segment_ids(q, k, None, {"cu_seq_lens_q": torch.tensor([0, 3])})[2]
    assert "2-D [B, 5]" in cross_segment_ids(q, k, torch.ones(2, 3), {})[2]


def test_packed_rows_match_each_document_alone():
    model = peft_model("llama")
    peftfast.patch(model)
    model.eval()
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(2, 128, (1, n), generator=g) for n in (5, 3, 6)]
    packed = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    got = model(input_ids=packed, position_ids=pos).logits
    start = 0
    for d in docs:
        alone = model(input_ids=d).logits
        assert torch.allclose(got[:, start:start + d.shape[1]], alone, atol=2e-5, rtol=1e-4)
        start += d.shape[1]


def test_output_attentions_falls_back_to_sdpa_with_a_reason():
    model = peft_model("llama")
    peftfast.patch(model)
    ids, mask = _padded()
    ref = clone(model)
    peftfast.unpatch(ref)
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    want = ref(input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    assert torch.allclose(out.logits[keep], want.logits[keep], atol=2e-5, rtol=1e-4)
    text = peftfast.report(model).format(model)
    assert "output_attentions=True" in text and "fallback" in text


def test_gqa_padded_model_saves_no_repeated_kv():
    from peftfast.bench import saved_activation_bytes

    model = peft_model("llama")
    ids, mask = _padded()
    params = list(model.parameters())
    _, eager = saved_activation_bytes(lambda: model(input_ids=ids, attention_mask=mask).logits, exclude=params)
    peftfast.patch(model)
    _, fused = saved_activation_bytes(lambda: model(input_ids=ids, attention_mask=mask).logits, exclude=params)
    # 4 query heads of 8 over 2 KV heads: a repeated K or V would be a second [3, 4, 11, 8] tensor beside q
    assert [s for s in fused.by_shape if s.startswith("(3, 4, 11, 8)")] == ["(3, 4, 11, 8):float32"]
    assert any(s.startswith("(3, 2, 11, 8)") for s in fused.by_shape)  # k and v as the model made them
    assert fused.total < eager.total


def test_unpatch_restores_the_attention_implementation():
    model = peft_model("llama")
    before = model.get_base_model().config._attn_implementation
    peftfast.patch(model)
    assert model.get_base_model().config._attn_implementation == "peftfast"
    peftfast.patch(model, fuse_attention=False)
    assert model.get_base_model().config._attn_implementation == before
    peftfast.patch(model)
    peftfast.unpatch(model)
    assert model.get_base_model().config._attn_implementation == before


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time compile
# ----------------------------------------------------------------------------------------------------------------
def _aot_plan() -> list[aot.Job]:
    jobs = []
    for arch in aot.ARCHS:
        for dt in ("bf16", "fp16"):
            # (block of q/k's head dim, of v's): equal, and multi-head latent attention's 192/128 (block 256/128)
            for d, dv in ((64, 64), (128, 128), (256, 256), (256, 128)):
                p = "*" + dt
                head = f"D{d}" if dv == d else "D192-V128"
                for kernel in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
                    args = {}
                    for pre, w in (("q", d), ("k", d), ("v", dv)):
                        args.update({f"{pre}_ptr": p, f"s{pre}b": 16 * 2048 * w, f"s{pre}h": w,
                                     f"s{pre}m" if pre == "q" else f"s{pre}n": 16 * w, f"s{pre}d": 1})
                    if kernel == "_attn_fwd_kernel":
                        args.update(o_ptr=p, sob=16 * 2048 * dv, som=16 * dv, soh=dv, sod=1)
                    else:
                        args.update(do_ptr=p, sdob=16 * 2048 * dv, sdom=16 * dv, sdoh=dv, sdod=1)
                        if kernel == "_attn_bwd_dkdv_kernel":
                            for pre, w in (("dk", d), ("dv", dv)):
                                args.update({f"{pre}_ptr": p, f"s{pre}b": 16 * 2048 * w, f"s{pre}h": w,
                                             f"s{pre}n": 16 * w, f"s{pre}d": 1})
                        else:
                            args.update(dq_ptr=p, sdqb=16 * 2048 * d, sdqh=d, sdqm=16 * d, sdqd=1)
                        args["delta_ptr"] = "*fp32"
                    args.update(lse_ptr="*fp32", qseg_ptr="*i32", kseg_ptr="*i32", SQ=2048, SK=2048, HQ=16,
                                GROUP=4, D=192 if dv != d else d, DV=dv, scale=0.125, softcap=1.0, window=0,
                                window_right=0, seed=0, p_drop=0.0)
                    # a T5-style bias [1, H, S, S]: no batch stride
                    args.update(bias_ptr=p, sbb=0, sbh=2048 * 2048, sbm=2048, sbn=1)
                    if kernel == "_attn_bwd_dq_kernel":
                        args["dbias_ptr"] = "*fp32"
                    args["qrange_ptr" if kernel == "_attn_bwd_dkdv_kernel" else "krange_ptr"] = "*i32"
                    if kernel == "_attn_bwd_dkdv_kernel":
                        args["HK"] = 4
                    off = {"HAS_BIAS": False, "HAS_DBIAS": False}
                    variants = (
                            ({"IS_CAUSAL": True, "HAS_SEG": True, "HAS_WINDOW": False, "HAS_SOFTCAP": False,
                              "HAS_DROPOUT": False, **off}, "seg"),
                            ({"IS_CAUSAL": True, "HAS_SEG": False, "HAS_WINDOW": True, "HAS_SOFTCAP": True,
                              "HAS_DROPOUT": True, **off}, "window-softcap-dropout"),
                            # ModernBERT's local layers: a window on both sides of a non-causal query, padding
                            ({"IS_CAUSAL": False, "HAS_SEG": True, "HAS_WINDOW": True, "HAS_SOFTCAP": False,
                              "HAS_DROPOUT": False, **off}, "seg-bidirectional-window"),
                            # T5: a position bias (trainable: dS stored), padding, attention dropout
                            ({"IS_CAUSAL": False, "HAS_SEG": True, "HAS_WINDOW": False, "HAS_SOFTCAP": False,
                              "HAS_DROPOUT": True, "HAS_BIAS": True, "HAS_DBIAS": True}, "seg-bias-dropout"))
                    if dv != d:  # DeepSeek's layers: causal, padded or packed rows, attention dropout
                        variants = (({"IS_CAUSAL": True, "HAS_SEG": True, "HAS_WINDOW": False, "HAS_SOFTCAP": False,
                                      "HAS_DROPOUT": True, **off}, "seg-dropout"),)
                    for flags, variant in variants:
                        if kernel != "_attn_bwd_dq_kernel":
                            flags = {f: v for f, v in flags.items() if f != "HAS_DBIAS"}
                        meta = {**flags, "BLOCK_D": d, "BLOCK_DV": dv, "SAME_DV": dv == d, "DOT_PRECISION": "tf32"}
                        tiles = _gpu_tiles(kernel, args["D"], flags["HAS_BIAS"])
                        jobs.append(aot.Job(kernel, f"{head}-{variant}", dt, arch,
                                            {"BLOCK_M": tiles["BLOCK_M"], "BLOCK_N": tiles["BLOCK_N"]},
                                            tiles["num_warps"], tiles["num_stages"], meta, args))
    return jobs


def _gpu_tiles(kernel: str, d: int, has_bias: bool) -> dict:
    from unittest import mock

    from peftfast.ops import attention as A

    with mock.patch.object(A, "interpreting", lambda: False):
        if kernel == "_attn_bwd_dkdv_kernel":
            return A._dkdv_tiles(d, has_bias)
        return A._tiles(d) if kernel == "_attn_fwd_kernel" else A._bwd_tiles(d)


AOT_PLAN = _aot_plan()
# default tier: every kernel at head dim 128 and at MLA's 192/128, the forward at 64 and 256, and T5's bias and
# ModernBERT's window variants at their head dim 64 only, in bf16 (about a minute cold on two cores); the rest
# compiles with ``-m slow``
_AT_64 = ("D64-seg-bias-dropout", "D64-seg-bidirectional-window")
AOT_FAST = [j for j in AOT_PLAN if j.dtype == "bf16" and (
    j.variant in _AT_64 or j.variant.startswith("D192-V128")
    or ("bidirectional" not in j.variant and (j.kernel == "_attn_fwd_kernel" or "D128-" in j.variant)))]
AOT_SLOW = [j for j in AOT_PLAN if j not in AOT_FAST]


def _compile(jobs) -> dict[str, dict]:
    return {r["key"]: r for r in aot.run(jobs)}


@pytest.fixture(scope="module")
def aot_fast() -> dict[str, dict]:
    return _compile(AOT_FAST)


@pytest.fixture(scope="module")
def aot_slow() -> dict[str, dict]:
    return _compile(AOT_SLOW)


def _check_compiled(job: aot.Job, res: dict) -> None:
    assert res["error"] is None, res["error"]
    assert res["ptx_target"] == ("sm_90a" if job.arch == 90 else f"sm_{job.arch}")
    assert res["shared"] <= {80: 163 * 1024, 90: 227 * 1024}[job.arch], res["shared"]
    assert res["mma_sync"] or res["wgmma"], f"{job.key}: no tensor-core MMA"
    # register spills per thread: the worst config (dK/dV at D=128 with softcap + dropout, sm_90) spills 184 B
    # with 8 warps; with 4 it spilled 960 B, the forward at D=64 with dropout 560 B
    assert res.get("stack_bytes", 0) <= 192, f"{job.key}: {res.get('stack_bytes')} B of register spills"
    if job.arch == 90 and job.kernel == "_attn_fwd_kernel" and job.tiles["BLOCK_M"] % 64 == 0:
        assert res["wgmma"], f"{job.key}: expected wgmma on sm_90"


def _job_id(j: aot.Job) -> str:
    return f"{j.kernel[6:-7]}-{j.variant}-{j.dtype}-sm{j.arch}"


@pytest.mark.parametrize("job", AOT_FAST, ids=_job_id)
def test_attention_kernels_compile(job: aot.Job, aot_fast: dict[str, dict]) -> None:
    _check_compiled(job, aot_fast[job.key])


@pytest.mark.slow
@pytest.mark.parametrize("job", AOT_SLOW, ids=_job_id)
def test_attention_kernels_compile_slow_tier(job: aot.Job, aot_slow: dict[str, dict]) -> None:
    _check_compiled(job, aot_slow[job.key])


def test_segment_ids_are_built_once_per_forward(monkeypatch):
    from peftfast.modules import attention as attn_mod

    model = peft_model("llama")
    peftfast.patch(model)
    ids, mask = _padded()
    calls = []
    real = attn_mod._segment_ids
    monkeypatch.setattr(attn_mod, "_segment_ids", lambda *a: calls.append(1) or real(*a))
    model(input_ids=ids, attention_mask=mask)
    assert len(calls) == 1  # two layers, one host read of the mask
    mask2 = mask.clone()
    mask2[1, 9:] = 0
    want = model(input_ids=ids, attention_mask=mask2).logits  # another mask: rebuilt, not reused
    assert len(calls) == 2
    peftfast.unpatch(model)
    ref = model(input_ids=ids, attention_mask=mask2).logits
    assert torch.allclose(want[mask2.bool()], ref[mask2.bool()], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_ops_pass_opcheck(backend):
    from peftfast.modules.attention import _segment_ids

    q = torch.randn(2, 4, 7, 16).requires_grad_()
    k = torch.randn(2, 9, 2, 16).transpose(1, 2).requires_grad_()  # strided, 2 prefix keys
    v = torch.randn(2, 2, 9, 16).requires_grad_()
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    qseg, kseg, _ = _segment_ids(q, k, mask, {}, traced=True)
    seed = torch.tensor([1234])
    bias = torch.randn(1, 4, 7, 9).requires_grad_()  # broadcast over the batch
    for args in ((None, None, None, True, 0.25, None, None, None, 0.0, None, backend),
                 (qseg, kseg, None, True, 0.3, 5.0, 4, None, 0.2, seed, backend),
                 (qseg, kseg, None, False, 0.3, None, 3, 2, 0.0, None, backend),  # a bidirectional window
                 (qseg, kseg, bias, False, 0.3, None, None, None, 0.0, None, backend)):
        torch.library.opcheck(torch.ops.peftfast.flash_attn_fwd, (q, k, v, *args))
        out, lse = torch.ops.peftfast.flash_attn_fwd(q, k, v, *args)
        dout = torch.randn_like(out)
        saved = [t.detach() for t in (q, k, v, out)]  # the backward op runs without autograd (once-differentiable)
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        for dlse in (None, torch.randn_like(lse)):
            torch.library.opcheck(torch.ops.peftfast.flash_attn_bwd, (*saved, lse.detach(), dout, dlse, *plain))
        if args[2] is not None:
            torch.library.opcheck(torch.ops.peftfast.flash_attn_bwd,
                                  (*saved, lse.detach(), dout, None, *plain, True))


def test_views_kept_alone_are_compacted_before_the_kernel_keeps_them():
    """GPT-2's q is a view of the fused q|k|v projection while the KV cache hands back k and v as copies: the kernel
    would keep the whole projection output for q. q is copied out densely, in the view's (sequence-major) order;
    views that share one storage, and tensors without grad, are passed as they are."""
    from peftfast.modules.attention import _compact

    leaf = torch.randn(2, 7, 3 * 48, requires_grad=True)
    qkv = leaf * 1.0
    q, k, v = (t.view(2, 7, 3, 16).transpose(1, 2) for t in qkv.split(48, dim=2))
    kc, vc = k.contiguous(), v.contiguous()  # as a cache returns them
    cq, ck, cv = _compact(q, kc, vc)
    assert ck is kc and cv is vc and torch.equal(cq, q)
    assert cq.untyped_storage().nbytes() == q.numel() * 4  # only q's values are kept
    assert cq.transpose(1, 2).is_contiguous()  # sequence-major, as the view was
    cq.sum().backward()  # the copy stays in the graph: q's part of the projection gets the gradient
    assert torch.equal(leaf.grad, torch.cat([torch.ones(2, 7, 48), torch.zeros(2, 7, 96)], dim=2))
    shared = _compact(q, k, v)
    assert all(a is b for a, b in zip(shared, (q, k, v)))  # one storage for all three: kept as is
    with torch.no_grad():
        assert _compact(q.detach(), kc.detach(), vc.detach())[0].untyped_storage().nbytes() == 2 * 7 * 144 * 4


def test_key_padding_reads_extended_masks_only_when_they_pad_keys():
    """A ``[B, 1, 1, SK]`` mask (the extended mask older code builds) pads keys alone: bool (True kept) and additive
    (0 kept, the dtype's minimum masked, a ``[1, 1, 1, SK]`` one broadcast over the batch) become the 2-D mask;
    an additive one that also biases kept keys, a query-dependent 4-D mask, or one seen while tracing is refused with
    the reason (those calls take the fallback, which applies it as given)."""
    from peftfast.modules.attention import key_padding

    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    additive = (~keep).float()[:, None, None, :] * torch.finfo(torch.float32).min
    for m in (keep, keep[:, None, None, :], additive):
        got, why = key_padding(m, 2, 5)
        assert why is None and torch.equal(got, keep)
    got, why = key_padding(additive[:1], 2, 5)
    assert why is None and torch.equal(got, keep[:1].expand(2, 5))
    biased = additive.clone()
    biased[1, 0, 0, 2] = 0.5
    assert "values other than 0 and -inf" in key_padding(biased, 2, 5)[1]
    assert "traced" in key_padding(additive, 2, 5, traced=True)[1]
    assert "expected a 2-D" in key_padding(additive.expand(2, 1, 3, 5), 2, 5)[1]
    assert key_padding(None, 2, 5) == (None, None)


def test_stacks_with_their_own_config_copy_are_switched_and_restored():
    """Under transformers 5.17 T5's encoder and decoder keep copies of the config that ``set_attn_implementation``
    does not switch: their attention stayed on SDPA while the report said fused. Simulated here with a copy given to
    the encoder's modules: patch switches it (the encoder's attention runs the kernel, loss unchanged), unpatch
    restores it."""
    import copy

    model = peft_model("t5")
    inner = model.get_base_model()
    own = copy.deepcopy(inner.encoder.config)
    for m in inner.encoder.modules():
        if getattr(m, "config", None) is inner.encoder.config:
            m.config = own
    before = inner.config._attn_implementation
    assert own._attn_implementation == before != "peftfast" and own is not inner.config
    ref = clone(model)
    data = {"input_ids": torch.randint(2, 100, (2, 9)), "labels": torch.randint(2, 100, (2, 5))}
    peftfast.patch(model)
    assert own._attn_implementation == "peftfast"
    loss, _ = loss_and_grads(model, data)
    ref_loss, _ = loss_and_grads(ref, data)
    assert abs(loss.item() - ref_loss.item()) <= 2e-5 * abs(ref_loss.item())
    rt = peftfast.report(model).module_runtime(model)
    enc = [r for n, r in rt.items() if ".encoder." in n and n.endswith("(attention)")]
    assert enc and all(r["fused"] == 1 for r in enc), rt
    peftfast.unpatch(model)
    assert own._attn_implementation == before
