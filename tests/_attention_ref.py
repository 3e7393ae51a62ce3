"""Plain-PyTorch attention with peftfast's masking semantics: the reference of the attention tests."""

import torch


def reference_attention(q, k, v, causal, scale, softcap, window, qseg, kseg, dtype=None, bias=None,
                        window_right=None):
    """q [B, HQ, SQ, D], k/v [B, HK, SK, D] → [B, SQ, HQ, D], computed in ``dtype`` (default: the inputs'); ``bias``
    is added to the (softcapped) scores; ``window`` bounds the keys before the query (j > i - window),
    ``window_right`` those after it (j < i + window_right)."""
    if dtype is not None:
        q, k, v = (t.to(dtype) for t in (q, k, v))
        bias = None if bias is None else bias.to(dtype)
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    kk, vv = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    s = q @ kk.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    i = torch.arange(sq, device=q.device)[:, None] + sk - sq
    j = torch.arange(sk, device=q.device)[None]
    ok = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        ok &= j <= i
    if window:
        ok &= j > i - window
    if window_right:
        ok &= j < i + window_right
    ok = ok[None, None]
    if qseg is not None:
        ok = ok & ((kseg[:, None, None, :] == qseg[:, None, :, None]) | (kseg[:, None, None, :] == -2))
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    return (p @ vv).transpose(1, 2)
