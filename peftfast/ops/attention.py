"""Fused attention op for fine-tuning batches: Triton FlashAttention kernels on CUDA, a chunked ATen path elsewhere.

Both backends keep the same contract: saved for backward are q, k, v (the model's own tensors: no repeated K/V for
grouped-query attention), the output and the fp32 log-sum-exp per query; the S × S probabilities are rebuilt in
backward (query chunks on the ATen path, tiles in Triton). Segment ids express padding, packed documents and
prefix keys (see ``kernels/attention.py``); an optional additive score bias (T5's relative position bias, broadcast
over any dimension) is read per tile and kept as the caller's tensor (one for all of T5's layers), with its gradient
where it needs one. Both run as the registered ops ``torch.ops.peftfast.flash_attn_fwd`` /
``flash_attn_bwd`` (fake kernels and autograd included), so ``torch.compile`` traces them without a break.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
import triton

from peftfast.ops import _direct
from peftfast.ops._backend import interpreting, resolve_backend
from peftfast.ops._counters import launching

MAX_HEAD_DIM = 256
ALL_SEGMENTS = -2  # key segment id seen by every query (prefix keys)
_TORCH_CHUNK = 128


# ----------------------------------------------------------------------------------------------------------------
# ATen backend (chunked over queries; never the whole S × S matrix)
# ----------------------------------------------------------------------------------------------------------------
def _allowed(i0, i1, sq, sk, causal, window, qseg, kseg, device, window_right=None):
    """Bool [B or 1, 1, i1 - i0, SK] of visible keys for query rows i0..i1."""
    i = torch.arange(i0, i1, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    ok = torch.ones(i1 - i0, sk, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= j > i - window
    if window_right is not None:
        ok &= j < i + window_right
    ok = ok[None, None]
    if qseg is not None:
        qs = qseg[:, i0:i1].long()[:, None, :, None]
        ks = kseg.long()[:, None, None, :]
        ok = ok & ((ks == qs) | (ks == ALL_SEGMENTS))
    return ok


# a mask this small outlives its layer (held by the cache below): 64 KiB is a 4-row decode step over 4096 keys in fp32
HELD_MASK_BYTES = 64 * 1024
_SHARED = threading.local()  # .mask: the last mask of _sdpa_mask (its key, and weak references), per thread


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


def _sdpa_mask(qseg, kseg, causal: bool, window, sq: int, sk: int, dtype, device, window_right=None):
    """(additive mask [B or 1, 1, SQ, SK] of 0 / -inf in ``dtype``, bool [B or 1, 1, SQ, 1] of the query rows that
    see no key, or None when there is none). Such a row attends to key 0 in the mask, so that SDPA yields no NaN,
    and the caller zeroes its output (and with it its gradients), as the kernels output 0 there. The layers of one
    forward get the same segments: they share one mask (kept once for backward, however many layers save it), found
    by content and held weakly, so that none outlives the graphs that saved it; a small one (a decode step's) is held
    outright, since in a forward without grad nothing else keeps it from one layer to the next."""
    key = (causal, window, window_right, sq, sk, dtype, device)
    compiling = torch.compiler.is_compiling()
    last = None if compiling else getattr(_SHARED, "mask", None)
    if last is not None and last[0] == key and _same(last[1], qseg) and _same(last[2], kseg):
        mask = _held(last[3])
        empty = None if last[4] is None else _held(last[4])
        if mask is not None and (empty is not None or last[4] is None):
            return mask, empty
    ok = _allowed(0, sq, sq, sk, causal, window, qseg, kseg, device, window_right)
    empty = ~ok.any(-1, keepdim=True)
    if not compiling and not bool(empty.any()):
        empty = None  # every row sees a key (e.g. prefix tuning): nothing to zero
    else:
        ok = ok | (empty & (torch.arange(sk, device=device) == 0))
    mask = torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, float("-inf"))
    if not compiling:
        # the storages, weakly: what autograd keeps (or a saved-tensor hook's alias of it) keeps them alive, so the
        # mask lives as long as a graph that saved it (in a forward without grad, one layer), never longer; up to
        # HELD_MASK_BYTES outright (generation's decode steps run without grad, a mask per layer otherwise)
        strong = mask.numel() * mask.element_size() <= HELD_MASK_BYTES
        _SHARED.mask = (key, qseg, kseg, *(None if t is None else t if strong else
                                           (weakref.ref(t.untyped_storage()), t.dtype, t.shape, t.stride())
                                           for t in (mask, empty)))
    return mask, empty


def _held(entry) -> torch.Tensor | None:
    """The tensor of a mask cache entry: itself, or a view of its weakly held storage (None once that is gone)."""
    if isinstance(entry, torch.Tensor):
        return entry
    st, dtype, shape, stride = entry
    st = st()
    if st is None:
        return None
    return torch.empty(0, dtype=dtype, device=st.device).set_(st, 0, shape, stride)


def _torch_scores(qc, k, scale, softcap, bias_chunk=None):
    s = torch.matmul(qc, k.transpose(-1, -2)) * scale
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = softcap * t
    if bias_chunk is not None:
        s = s + bias_chunk
    return s, t


def _bias_grouped(bias, b, hq, hk, sq, sk):
    """The bias as a [B, HK, GROUP, SQ, SK] view (broadcast dimensions stay stride 0: nothing is copied)."""
    return None if bias is None else bias.expand(b, hq, sq, sk).unflatten(1, (hk, hq // hk))


def _bias_chunk(bg, i0, i1, lo, hi, ct):
    return None if bg is None else bg[..., i0:i1, lo:hi].to(ct)


def _sum_to(ds: torch.Tensor, shape) -> torch.Tensor:
    """``ds`` [B, HQ, rows, keys] summed over the dimensions where ``shape`` (a bias's) broadcasts."""
    dims = [d for d in range(4) if shape[d] == 1 and ds.shape[d] != 1]
    return ds.sum(dims, keepdim=True) if dims else ds


def _add_dbias(dbias, ds, i0, i1, lo, hi) -> None:
    """Add a chunk's dS [B, HQ, rows, keys] into ``dbias`` (the bias's shape): summed over its broadcast dims."""
    rows = slice(i0, i1) if dbias.shape[2] != 1 else slice(0, 1)
    cols = slice(lo, hi) if dbias.shape[3] != 1 else slice(0, 1)
    dbias[:, :, rows, cols] += _sum_to(ds, dbias.shape)


def _torch_keep(seed, b, hq, i0, i1, sk, p, device):
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + i0 * 7919) % (2**63 - 1))
    bits = torch.empty((b, hq, i1 - i0, sk), dtype=torch.int32, device=device).random_(generator=gen)
    return bits >= int(round(p * 2**31))


def _grouped(q, hk):
    """[B, HQ, S, D] as [B, HK, GROUP, S, D] (a view): grouped-query heads meet their K/V by broadcasting."""
    b, hq, s, d = q.shape
    return q.view(b, hk, hq // hk, s, d)


def _torch_chunks(sq, sk, causal, window, qseg, kseg, device, window_right=None):
    """(i0, i1, lo, hi) per chunk of query rows: the keys [lo, hi) any of them can see. Causal and window bounds
    always; on CPU also the segment hull over the batch (``key_ranges``, read on the host: free there, a sync on a
    GPU). Keys outside are all masked, so the chunk's scores, exponentials and products skip them (for long causal
    rows about half the work; for packed or padded rows the other documents and the padding)."""
    shift = sk - sq
    hull = None
    if qseg is not None and device.type == "cpu":
        r = key_ranges(qseg, kseg, _TORCH_CHUNK)
        hull = list(zip(r[..., 0].amin(0).tolist(), r[..., 1].amax(0).tolist()))
    out = []
    for n, i0 in enumerate(range(0, sq, _TORCH_CHUNK)):
        i1 = min(sq, i0 + _TORCH_CHUNK)
        lo, hi = 0, sk
        if causal:
            hi = min(hi, i1 + shift)
        if window is not None:
            lo = max(lo, i0 + shift - window + 1)
        if window_right is not None:
            hi = min(hi, i1 - 1 + shift + window_right)
        if hull is not None:
            lo, hi = max(lo, hull[n][0]), min(hi, hull[n][1])
        out.append((i0, i1, lo, max(lo, hi)))
    return out


def _torch_forward(q, k, v, causal, scale, softcap, window, qseg, kseg, p, seed, bias=None, window_right=None):
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    ct = torch.promote_types(q.dtype, torch.float32)
    bg = _bias_grouped(bias, b, hq, hk, sq, sk)
    out = torch.empty((b, sq, hq, v.shape[-1]), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    kf, vf = k.to(ct)[:, :, None], v.to(ct)[:, :, None]
    for i0, i1, lo, hi in _torch_chunks(sq, sk, causal, window, qseg, kseg, q.device, window_right):
        if lo == hi:  # rows that see no key: output 0, log-sum-exp 0
            out[:, i0:i1] = 0
            lse[:, :, i0:i1] = 0
            continue
        qc = _grouped(q[:, :, i0:i1].to(ct), hk)
        s, _ = _torch_scores(qc, kf[..., lo:hi, :], scale, softcap, _bias_chunk(bg, i0, i1, lo, hi, ct))
        ok = _allowed(i0, i1, sq, sk, causal, window, qseg, kseg, q.device, window_right)[:, :, None, ..., lo:hi]
        s = s.masked_fill(~ok, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        e = torch.exp(s - m)
        denom = e.sum(-1, keepdim=True)
        has = denom > 0
        pr = e / torch.where(has, denom, torch.ones_like(denom))
        if p > 0:  # the mask of the whole key row, as without the skipping
            keep = _torch_keep(seed, b, hq, i0, i1, sk, p, q.device).view(b, hk, hq // hk, i1 - i0, sk)[..., lo:hi]
            pr = torch.where(keep, pr / (1 - p), torch.zeros_like(pr))
        o = torch.matmul(pr, vf[..., lo:hi, :]).reshape(b, hq, i1 - i0, v.shape[-1])
        out[:, i0:i1] = o.transpose(1, 2).to(q.dtype)
        ls = torch.where(has, m + torch.log(torch.where(has, denom, torch.ones_like(denom))), torch.zeros_like(m))
        lse[:, :, i0:i1] = ls.reshape(b, hq, i1 - i0).float()
    return out, lse


def _torch_backward(q, k, v, out, lse, dout, dlse, causal, scale, softcap, window, qseg, kseg, p, seed, bias=None,
                    need_dbias=False, window_right=None):
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    ct = torch.promote_types(q.dtype, torch.float32)
    bg = _bias_grouped(bias, b, hq, hk, sq, sk)
    dbias = torch.zeros(bias.shape, dtype=ct, device=q.device) if need_dbias else None
    kf, vf = k.to(ct)[:, :, None], v.to(ct)[:, :, None]
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=ct)[:, :, None]
    dv = torch.zeros(v.shape, device=v.device, dtype=ct)[:, :, None]
    delta = (dout.to(ct) * out.to(ct)).sum(-1).transpose(1, 2)  # [B, HQ, SQ]
    if dlse is not None:  # d lse_i / d s_ij = p_ij: a gradient of the log-sum-exp shifts each row's delta
        delta = delta - dlse.to(ct)
    for i0, i1, lo, hi in _torch_chunks(sq, sk, causal, window, qseg, kseg, q.device, window_right):
        if lo == hi:
            dq[:, :, i0:i1] = 0
            continue
        qc = _grouped(q[:, :, i0:i1].to(ct), hk)
        kc, vc = kf[..., lo:hi, :], vf[..., lo:hi, :]
        s, t = _torch_scores(qc, kc, scale, softcap, _bias_chunk(bg, i0, i1, lo, hi, ct))
        ok = _allowed(i0, i1, sq, sk, causal, window, qseg, kseg, q.device, window_right)[:, :, None, ..., lo:hi]
        s = s.masked_fill(~ok, float("-inf"))
        pr = torch.exp(s - _grouped(lse[:, :, i0:i1, None].to(ct), hk))
        doc = _grouped(dout[:, i0:i1].transpose(1, 2).to(ct), hk)
        dp = torch.matmul(doc, vc.transpose(-1, -2))
        pd = pr
        if p > 0:
            keep = _torch_keep(seed, b, hq, i0, i1, sk, p, q.device).view(b, hk, hq // hk, i1 - i0, sk)[..., lo:hi]
            pd = torch.where(keep, pr / (1 - p), torch.zeros_like(pr))
            dp = torch.where(keep, dp / (1 - p), torch.zeros_like(dp))
        dv[..., lo:hi, :] += torch.matmul(pd.transpose(-1, -2), doc).sum(2, keepdim=True)
        ds = pr * (dp - _grouped(delta[:, :, i0:i1, None], hk))
        if dbias is not None:  # added after the softcap: dS before its derivative
            _add_dbias(dbias, ds.reshape(b, hq, i1 - i0, hi - lo), i0, i1, lo, hi)
        if t is not None:
            ds = ds * (1 - t * t)
        ds = ds * scale
        dk[..., lo:hi, :] += torch.matmul(ds.transpose(-1, -2), qc).sum(2, keepdim=True)
        dq[:, :, i0:i1] = torch.matmul(ds, kc).reshape(b, hq, i1 - i0, d).to(q.dtype)
    return dq, dk[:, :, 0].to(k.dtype), dv[:, :, 0].to(v.dtype), None if dbias is None else dbias.to(bias.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------------------
def _tiles(d: int) -> dict:
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    # 8 warps even at head dim 64: with 4 the dropout and softcap variants spilled 560 B per thread (AOT, sm_80/90)
    if d <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def _bwd_tiles(d: int) -> dict:
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if d <= 128:  # dK/dV hold four 64 x D tiles: with 4 warps they spilled up to 960 B per thread at D=128
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)


def _dkdv_tiles(d: int, has_bias: bool) -> dict:
    """The dK/dV kernel's tiles: with a bias above head dim 64 it loads one more BLOCK_M x BLOCK_N tile per step,
    which spilled 208 B per thread at 64 query rows (sm_90, D=128, with dropout); 32 rows spill none (AOT)."""
    t = _bwd_tiles(d)
    return dict(t, BLOCK_M=32) if has_bias and d > 64 and not interpreting() else t


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _flags(causal, window, softcap, qseg, p, bias, window_right=None):
    return dict(IS_CAUSAL=causal, HAS_SEG=qseg is not None, HAS_WINDOW=window is not None or window_right is not None,
                HAS_SOFTCAP=softcap is not None, HAS_DROPOUT=p > 0, HAS_BIAS=bias is not None)


def _bias_args(bias, dummy) -> tuple:
    """(pointer, strides [B, H, SQ, SK]) of the bias for the kernels: stride 0 along broadcast dimensions."""
    if bias is None:
        return dummy, 0, 0, 0, 0
    return (bias, *(bias.stride(i) if bias.shape[i] != 1 else 0 for i in range(4)))


def _first_last(sorted_vals: torch.Tensor, order: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per ``vals[b, i]``: the smallest and largest index j with ``seq[b, j] == vals[b, i]`` (``sorted_vals``,
    ``order``: ``seq`` sorted stably per row and the sort's indices), and whether there is one."""
    n = sorted_vals.shape[1]
    left = torch.searchsorted(sorted_vals, vals, right=False)
    right = torch.searchsorted(sorted_vals, vals, right=True)
    found = right > left
    first = order.gather(1, left.clamp(max=n - 1))  # a stable sort keeps equal ids in index order
    last = order.gather(1, (right - 1).clamp(min=0))
    return first, last, found


def _block_reduce(lo: torch.Tensor, hi: torch.Tensor, block: int, empty: int) -> torch.Tensor:
    """int32 [B, cdiv(S, block), 2]: min of ``lo`` and max of ``hi`` over each block of ``block`` positions."""
    b, s = lo.shape
    pad = -s % block
    lo = torch.nn.functional.pad(lo, (0, pad), value=empty).view(b, -1, block).amin(-1)
    hi = torch.nn.functional.pad(hi, (0, pad), value=0).view(b, -1, block).amax(-1)
    return torch.stack([lo, hi], -1).to(torch.int32)


# per kind, (key, tensors, result) of the last call: every layer of a forward (and of its backward) passes the same
# segment ids. The tensors are held, so their storage (and data pointer) cannot be reused while cached; a detached
# or saved-and-unpacked alias of them (same storage, same version counter) still hits.
_ranges_cache: dict[str, tuple] = {}


def _tensor_key(t: torch.Tensor) -> tuple:
    return t.device, t.data_ptr(), tuple(t.shape), t.stride(), t._version


def _cached(kind: str, qseg: torch.Tensor, kseg: torch.Tensor, block: int, compute) -> torch.Tensor:
    key = (_tensor_key(qseg), _tensor_key(kseg), block)
    hit = _ranges_cache.get(kind)
    if hit is not None and hit[0] == key:
        return hit[2]
    out = compute()
    _ranges_cache[kind] = (key, (qseg, kseg), out)
    return out


def key_ranges(qseg: torch.Tensor, kseg: torch.Tensor, block_m: int) -> torch.Tensor:
    """int32 [B, cdiv(SQ, block_m), 2]: per block of queries, the hull [lo, hi) of the key positions any of them can
    see by the segment rule (equal ids, or a key id of -2, exactly as the kernels' masks); empty (lo >= hi) where
    none. Tiles outside it are all masked, so the forward and dQ kernels skip them: for packed rows most tiles of
    the other documents, for padded rows those of the padding. Device ops only (a sort and binary searches per
    row), no host read; cached for the ids of the last call."""
    def compute():
        b, sk = kseg.shape
        kpos = torch.arange(sk, device=kseg.device).expand(b, sk)
        ks_sorted, ks_order = torch.sort(kseg, dim=1, stable=True)
        first, last, found = _first_last(ks_sorted, ks_order, qseg)
        is_prefix = kseg == ALL_SEGMENTS
        p_lo = torch.where(is_prefix, kpos, sk).amin(1, keepdim=True)
        p_hi = torch.where(is_prefix, kpos + 1, 0).amax(1, keepdim=True)
        lo = torch.minimum(torch.where(found, first, sk), p_lo)
        hi = torch.maximum(torch.where(found, last + 1, 0), p_hi)
        return _block_reduce(lo, hi, block_m, sk)

    return _cached("keys", qseg, kseg, block_m, compute)


def query_ranges(qseg: torch.Tensor, kseg: torch.Tensor, block_n: int) -> torch.Tensor:
    """int32 [B, cdiv(SK, block_n), 2]: per block of keys, the hull of the query positions that can see any of them
    (every query for a prefix key); the dK/dV kernel skips the tiles outside it. See ``key_ranges``."""
    def compute():
        sq = qseg.shape[1]
        qs_sorted, qs_order = torch.sort(qseg, dim=1, stable=True)
        first, last, found = _first_last(qs_sorted, qs_order, kseg)
        is_prefix = kseg == ALL_SEGMENTS
        lo = torch.where(is_prefix, 0, torch.where(found, first, sq))
        hi = torch.where(is_prefix, sq, torch.where(found, last + 1, 0))
        return _block_reduce(lo, hi, block_n, sq)

    return _cached("queries", qseg, kseg, block_n, compute)


def _window_args(window, window_right, sq: int, sk: int) -> tuple[int, int]:
    """The kernels' (window, window_right): an unbounded side as sq + sk, which no key offset reaches."""
    return (sq + sk if window is None else window), (sq + sk if window_right is None else window_right)


def _head_blocks(d: int, dv: int) -> dict:
    """The kernels' head-dim blocks: q/k's and v/o's (narrower values: multi-head latent attention)."""
    return dict(BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
                SAME_DV=dv == d)


def _triton_forward(q, k, v, causal, scale, softcap, window, qseg, kseg, p, seed, bias=None, window_right=None):
    from peftfast.kernels import attention as K

    b, hq, sq, d = q.shape
    hk, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty((b, sq, hq, dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    seg_q = qseg if qseg is not None else lse
    seg_k = kseg if kseg is not None else lse
    t = _tiles(d)
    kr = key_ranges(qseg, kseg, t["BLOCK_M"]) if qseg is not None else lse
    grid = (triton.cdiv(sq, t["BLOCK_M"]), b * hq)
    with launching("_attn_fwd_kernel"):
        K._attn_fwd_kernel[grid](
            q, *q.stride(), k, *k.stride(), v, *v.stride(), out, *out.stride(), lse, seg_q, seg_k, kr,
            *_bias_args(bias, lse), sq, sk, hq, hq // hk, d, dv, scale, softcap or 1.0,
            *_window_args(window, window_right, sq, sk), seed, p,
            **_flags(causal, window, softcap, qseg, p, bias, window_right), **_head_blocks(d, dv),
            DOT_PRECISION=_precision(q.dtype), **t)
    return out, lse


def _triton_backward(q, k, v, out, lse, dout, dlse, causal, scale, softcap, window, qseg, kseg, p, seed, bias=None,
                     need_dbias=False, window_right=None):
    from peftfast.kernels import attention as K

    b, hq, sq, d = q.shape
    hk, sk, dv_dim = k.shape[1], k.shape[2], v.shape[-1]
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # [B, HQ, SQ]
    delta = (delta if dlse is None else delta - dlse.float()).contiguous()  # see _torch_backward
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    seg_q = qseg if qseg is not None else lse
    seg_k = kseg if kseg is not None else lse
    # dS of every pair, summed over the bias's broadcast dimensions afterwards: B·HQ·SQ·SK fp32 for the backward's
    # duration (what eager attention keeps per layer from its forward on), only where the bias needs a gradient
    dbias = torch.zeros((b, hq, sq, sk), device=q.device, dtype=torch.float32) if need_dbias else None
    t = _bwd_tiles(d)
    kr = key_ranges(qseg, kseg, t["BLOCK_M"]) if qseg is not None else lse
    qr = query_ranges(qseg, kseg, t["BLOCK_N"]) if qseg is not None else lse
    common = dict(**_flags(causal, window, softcap, qseg, p, bias, window_right), **_head_blocks(d, dv_dim),
                  DOT_PRECISION=_precision(q.dtype))
    scal = (scale, softcap or 1.0, *_window_args(window, window_right, sq, sk), seed, p)
    with launching("_attn_bwd_dkdv_kernel"):
        K._attn_bwd_dkdv_kernel[(triton.cdiv(sk, t["BLOCK_N"]), b * hk)](
            q, *q.stride(), k, *k.stride(), v, *v.stride(), dout, *dout.stride(), dk, *dk.stride(), dv, *dv.stride(),
            lse, delta, seg_q, seg_k, qr, *_bias_args(bias, lse), sq, sk, hq, hk, hq // hk, d, dv_dim, *scal, **common,
            **_dkdv_tiles(d, bias is not None))
    with launching("_attn_bwd_dq_kernel"):
        K._attn_bwd_dq_kernel[(triton.cdiv(sq, t["BLOCK_M"]), b * hq)](
            q, *q.stride(), k, *k.stride(), v, *v.stride(), dout, *dout.stride(), dq, *dq.stride(),
            lse, delta, seg_q, seg_k, kr, *_bias_args(bias, lse), dbias if need_dbias else lse, sq, sk, hq,
            hq // hk, d, dv_dim, *scal, HAS_DBIAS=need_dbias, **common, **t)
    return dq, dk, dv, _sum_to(dbias, bias.shape).to(bias.dtype) if need_dbias else None


# ----------------------------------------------------------------------------------------------------------------
# autograd and entry point
# ----------------------------------------------------------------------------------------------------------------
# Registered ops (not a Python autograd.Function), so torch.compile traces them as single nodes with the fake
# kernels below. The dropout seed is a one-element int64 CPU tensor: drawn as a tensor op, it needs no ``.item()``
# in traced code.
_SIG = ("Tensor? qseg, Tensor? kseg, Tensor? bias, bool causal, float scale, float? softcap, int? window, "
        "int? window_right, float p, Tensor? seed, str backend")


def _seed_int(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.reshape(-1)[0].item())


@torch.library.custom_op("peftfast::flash_attn_fwd", mutates_args=(),
                         schema=f"(Tensor q, Tensor k, Tensor v, {_SIG}) -> (Tensor, Tensor)")
def _fwd_op(q, k, v, qseg, kseg, bias, causal, scale, softcap, window, window_right, p, seed, backend):
    fwd = _triton_forward if backend == "triton" else _torch_forward
    return fwd(q, k, v, causal, scale, softcap, window, qseg, kseg, p, _seed_int(seed), bias, window_right)


@_fwd_op.register_fake
def _(q, k, v, qseg, kseg, bias, causal, scale, softcap, window, window_right, p, seed, backend):
    b, hq, sq, _ = q.shape
    return q.new_empty((b, sq, hq, v.shape[-1])), q.new_empty((b, hq, sq), dtype=torch.float32)


@torch.library.custom_op("peftfast::flash_attn_bwd", mutates_args=(),
                         schema=f"(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout, Tensor? dlse, "
                                f"{_SIG}, bool need_dbias=False) -> (Tensor, Tensor, Tensor, Tensor)")
def _bwd_op(q, k, v, out, lse, dout, dlse, qseg, kseg, bias, causal, scale, softcap, window, window_right, p, seed,
            backend, need_dbias=False):
    """(dq, dk, dv, dbias): dbias in the bias's shape where ``need_dbias``, else an empty tensor."""
    bwd = _triton_backward if backend == "triton" else _torch_backward
    dq, dk, dv, dbias = bwd(q, k, v, out, lse, dout, dlse, causal, scale, softcap, window, qseg, kseg, p,
                            _seed_int(seed), bias, bool(need_dbias and bias is not None), window_right)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty((0,))


@_bwd_op.register_fake
def _(q, k, v, out, lse, dout, dlse, qseg, kseg, bias, causal, scale, softcap, window, window_right, p, seed,
      backend, need_dbias=False):
    dbias = bias.new_empty(bias.shape) if need_dbias and bias is not None else q.new_empty((0,))
    if backend == "triton":  # empty_like: the inputs' strides
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias
    return torch.empty_like(q), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup(ctx, inputs, output) -> None:
    q, k, v, qseg, kseg, bias, *meta = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, qseg, kseg, bias, meta[-2])
    ctx.meta = tuple(meta[:-2]) + (meta[-1],)
    # lse stays differentiable (attention sinks rescale the output by a function of it: flash_attention,
    # return_lse); unused, its gradient arrives as None, not as zeros the backward would subtract for nothing
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, qseg, kseg, bias, seed = ctx.saved_tensors
    causal, scale, softcap, window, window_right, p, backend = ctx.meta
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    need_dbias = bias is not None and bool(ctx.needs_input_grad[5])
    dq, dk, dv, dbias = _bwd_op(q, k, v, out, lse, dout, dlse, qseg, kseg, bias, causal, scale, softcap, window,
                                window_right, p, seed, backend, need_dbias)
    return dq, dk, dv, None, None, dbias if need_dbias else None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def check_inputs(q, k, v, qseg=None, kseg=None, bias=None) -> str | None:
    """None if the fused op can take these tensors, else a one-line reason (the integration falls back on it)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q/k/v must be 4-D [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if not (q.device == k.device == v.device):
        return f"q/k/v devices differ ({q.device}, {k.device}, {v.device})"
    b, hq, sq, d = q.shape
    if d > MAX_HEAD_DIM or k.shape[-1] != d or v.shape[-1] > d:
        return (f"head dims q {d}, k {k.shape[-1]}, v {v.shape[-1]}: q and k must be equal and at most "
                f"{MAX_HEAD_DIM}, v at most theirs")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or hq % k.shape[1]:
        return f"k/v shapes {tuple(k.shape)}, {tuple(v.shape)} do not fit q {tuple(q.shape)} (grouped heads)"
    if (qseg is None) != (kseg is None):
        return "query and key segment ids must be given together"
    if qseg is not None and (qseg.shape != (b, sq) or kseg.shape != (b, k.shape[2])):
        return f"segment ids {tuple(qseg.shape)}, {tuple(kseg.shape)} do not match [B, SQ], [B, SK]"
    if bias is not None:
        full = (b, hq, sq, k.shape[2])
        if bias.dim() != 4 or any(n not in (1, f) for n, f in zip(bias.shape, full)):
            return f"score bias of shape {tuple(bias.shape)} does not broadcast to [B, HQ, SQ, SK] = {full}"
        if not bias.is_floating_point() or bias.device != q.device:
            return f"score bias must be a floating tensor on {q.device} (got {bias.dtype} on {bias.device})"
    return None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, softcap: float | None = None, window: int | None = None,
                    qseg: torch.Tensor | None = None, kseg: torch.Tensor | None = None, dropout_p: float = 0.0,
                    seed: int | torch.Tensor | None = None, backend: str = "auto", name: str = "attention",
                    return_lse: bool = False, bias: torch.Tensor | None = None, window_right: int | None = None
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, HQ, SQ, D] over k [B, HK, SK, D] and v [B, HK, SK, DV] (HQ a multiple of HK; DV ≤ D:
    multi-head latent attention, DeepSeek-V2/V3's, has D = 192 and DV = 128); returns [B, SQ, HQ, DV], and
    with ``return_lse`` also each row's log-sum-exp [B, HQ, SQ] fp32 (0 for a row that sees no key), differentiable:
    its gradient shifts the backward's row term (``Δ_i = rowsum(dO ⊙ O) − dlse_i``).

    ``causal`` aligns bottom-right (prefix keys / caches); ``window`` keeps keys within the last ``window``
    positions (key j > i' − window, i' = i + SK − SQ the query's key position), ``window_right`` those within the
    next ones (j < i' + window_right; ModernBERT's bidirectional window |i' − j| < w is ``window=w,
    window_right=w``); ``softcap`` applies ``c·tanh(s/c)``; ``qseg``/``kseg`` int32 segment ids (see the kernels module:
    -1 padding, -2 prefix keys visible to all); ``dropout_p`` drops attention probabilities with a mask rebuilt
    from ``seed`` (an int or a one-element int64 CPU tensor; drawn from torch's RNG when None) in backward. Runs as
    ``torch.ops.peftfast.flash_attn_fwd`` / ``flash_attn_bwd``. ``bias`` is added to the (softcapped) scores
    before masking and softmax (T5's position bias); it broadcasts to [B, HQ, SQ, SK] along any dimension of size 1,
    and gets a gradient when it requires one.
    """
    reason = check_inputs(q, k, v, qseg, kseg, bias)
    if reason is not None:
        raise ValueError(f"peftfast: {name}: {reason}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"peftfast: {name}: dropout probability must be in [0, 1), got {dropout_p}")
    for what, w in (("window", window), ("window_right", window_right)):
        if w is not None and w < 1:
            raise ValueError(f"peftfast: {name}: {what} must be positive, got {w}")
    be = resolve_backend(backend, q.device)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    sq, sk = q.shape[2], k.shape[2]
    windowed = window is not None or window_right is not None
    if be != "triton" and qseg is None and softcap is None and not windowed and dropout_p == 0 and \
            (not causal or sq == sk) and not return_lse and bias is None:
        # plain attention on the ATen path: PyTorch's fused SDPA kernel is one op, keeps O and the log-sum-exp,
        # and reads grouped K/V without repeating them (enable_gqa)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=bool(causal) and sq > 1,
                                                               scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        # SDPA's output follows q's layout: from a head-major q it is not [B, SQ, HQ, D] in memory, and models
        # that .view() the attention output (AFMoE, JetMoE) need it to be, as transformers' own SDPA path returns
        return out.transpose(1, 2).contiguous()
    if be == "cpp" and softcap is None and dropout_p == 0 and (sq <= _TORCH_CHUNK or sk != sq) and not return_lse \
            and bias is None:
        # the default CPU path (no attention kernel of ours there): where the chunked torch backend has little to
        # skip (one chunk of queries, or prefix keys / a cache that every chunk sees), segments, bottom-right causal
        # or a window run on PyTorch's fused SDPA with an additive mask, one per forward. Measured on 2 cores, fwd+bwd
        # with GQA: 2.7x faster at 128 tokens with prefix keys, 1.7x at 1024 with 32 prefix keys; but 0.8x for 1024
        # tokens of three packed documents, where the chunked path skips the other documents' keys, so longer
        # equal-length q/k stay chunked. The chunked path is also the reference: skipping, it keeps even non-finite
        # values in keys no query of a chunk can see out of the output.
        mask, empty = _sdpa_mask(qseg, kseg, bool(causal), window, sq, sk, q.dtype, q.device, window_right)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                               enable_gqa=q.shape[1] != k.shape[1])
        return (out if empty is None else out.masked_fill(empty, 0)).transpose(1, 2).contiguous()
    qseg = None if qseg is None else qseg.to(torch.int32).contiguous()
    kseg = None if kseg is None else kseg.to(torch.int32).contiguous()
    seed_t = None
    if dropout_p > 0:
        from peftfast.ops.lora import seed_tensor

        seed_t = seed_tensor(seed, q.device, float(dropout_p))
    args = (q, k, v, qseg, kseg, bias, bool(causal), scale, None if softcap is None else float(softcap),
            None if window is None else int(window), None if window_right is None else int(window_right),
            float(dropout_p), seed_t, "triton" if be == "triton" else "torch")
    out, lse = _direct.call(torch.ops.peftfast.flash_attn_fwd.default, _setup, _backward, args, (-1, -1))
    return (out, lse) if return_lse else out


__all__ = ["ALL_SEGMENTS", "MAX_HEAD_DIM", "check_inputs", "flash_attention"]
