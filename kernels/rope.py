"""Triton kernel for rotary position embeddings applied to q and k in one launch (forward and backward).

    q   [B, HQ, S, D]    any strides (the model's transposed views need no copy)
    k   [B, HK, S, D]
    cos, sin [B or 1, S, R]   R = rotary dim ≤ D (R < D: Phi-3 partial rotary; the rest passes through)

    forward   out[a] = x[a]·cos[ca] − x[b]·sin[ca],  out[b] = x[b]·cos[cb] + x[a]·sin[cb]   for each pair i < R/2
              out[R:] = x[R:]
    backward  the transpose: dx[a] = dy[a]·cos[ca] + dy[b]·sin[cb], dx[b] = dy[b]·cos[cb] − dy[a]·sin[ca]

    the pairs (LAYOUT): 0 rotate-half (Llama, most families)     a = i,  b = i + R/2,  ca = a,  cb = b
                        1 interleaved, cos interleaved (Cohere)  a = 2i, b = 2i + 1,   ca = a,  cb = b
                        2 interleaved, cos halved (GLM: cos[:R/2] repeated in pairs)   ca = cb = i
                        3 de-interleaving (DeepSeek's MLA, GLM-4 MoE lite, Mistral 4): pair (2i, 2i + 1) of the
                          input is written to (i, i + R/2) of the output, ca = cb = i; the backward reads
                          (i, i + R/2) and writes (2i, 2i + 1)

cos/sin come from the model's rotary module, so position_ids (packed sequences) and every RoPE scaling scheme are
honoured as the model computes them. Nothing of q or k is saved for backward (only cos and sin, which the model
keeps anyway), and no rotate-half temporary exists. fp32 arithmetic, one rounding per output; int64 offsets.
"""

import triton
import triton.language as tl


@triton.jit
def _pair_offsets(offs_i, HALF, LAYOUT: tl.constexpr):
    """Element offsets (a, b) of pair i within the rotary dims."""
    if LAYOUT == 0:
        return offs_i, offs_i + HALF
    return 2 * offs_i, 2 * offs_i + 1


@triton.jit
def _io_offsets(offs_i, HALF, LAYOUT: tl.constexpr, BACKWARD: tl.constexpr):
    """(read a, read b, write a, write b) offsets of pair i: the same pair both ways, except in the
    de-interleaving layout, whose forward reads interleaved pairs and writes halves (the backward the reverse)."""
    if LAYOUT == 3:
        if BACKWARD:
            return offs_i, offs_i + HALF, 2 * offs_i, 2 * offs_i + 1
        return 2 * offs_i, 2 * offs_i + 1, offs_i, offs_i + HALF
    a, b = _pair_offsets(offs_i, HALF, LAYOUT)
    return a, b, a, b


@triton.jit
def _rope_rows(x_ptr, sxb, sxh, sxs, sxd, o_ptr, sob, soh, sos, sod, c_ptr, s_ptr, b, s, heads, offs_h, HALF, ROT,
               D, cos1, cos2, sin1, sin2, BACKWARD: tl.constexpr, LAYOUT: tl.constexpr, BLOCK_HALF: tl.constexpr,
               BLOCK_D: tl.constexpr):
    h_ok = offs_h < heads
    offs_i = tl.arange(0, BLOCK_HALF)
    i_ok = offs_i < HALF
    m = h_ok[:, None] & i_ok[None, :]
    base_x = x_ptr + b.to(tl.int64) * sxb + s.to(tl.int64) * sxs + offs_h[:, None].to(tl.int64) * sxh
    base_o = o_ptr + b.to(tl.int64) * sob + s.to(tl.int64) * sos + offs_h[:, None].to(tl.int64) * soh
    off1, off2, out1, out2 = _io_offsets(offs_i, HALF, LAYOUT, BACKWARD)
    x1 = tl.load(base_x + off1[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base_x + off2[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    tl.store(base_o + out1[None, :] * sod, y1.to(o_ptr.dtype.element_ty), mask=m)
    tl.store(base_o + out2[None, :] * sod, y2.to(o_ptr.dtype.element_ty), mask=m)
    if ROT < D:
        offs_p = ROT + tl.arange(0, BLOCK_D)
        pm = h_ok[:, None] & (offs_p[None, :] < D)
        xp = tl.load(base_x + offs_p[None, :] * sxd, mask=pm, other=0.0)
        tl.store(base_o + offs_p[None, :] * sod, xp.to(o_ptr.dtype.element_ty), mask=pm)


@triton.jit
def _rope_kernel(
    q_ptr, sqb, sqh, sqs, sqd,
    k_ptr, skb, skh, sks, skd,
    qo_ptr, sqob, sqoh, sqos, sqod,
    ko_ptr, skob, skoh, skos, skod,
    cos_ptr, scb, scs, scd,
    sin_ptr, ssb, sss, ssd,
    S, HQ, HK, ROT, D,
    BACKWARD: tl.constexpr, LAYOUT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One (batch, position) row and BLOCK_H heads per program; grid (B * S, cdiv(HQ, BLOCK_H) + cdiv(HK, BLOCK_H)).

    cos/sin of the row are loaded once and serve every head of the block; ``BACKWARD`` applies the transpose.
    """
    row = tl.program_id(0)
    hb = tl.program_id(1)
    b = row // S
    s = row % S
    HALF = ROT // 2
    offs_i = tl.arange(0, BLOCK_HALF)
    i_ok = offs_i < HALF
    cb = cos_ptr + b.to(tl.int64) * scb + s.to(tl.int64) * scs
    sb = sin_ptr + b.to(tl.int64) * ssb + s.to(tl.int64) * sss
    c1, c2 = _pair_offsets(offs_i, HALF, LAYOUT)
    if LAYOUT >= 2:
        c1 = offs_i
        c2 = offs_i
    cos1 = tl.load(cb + c1 * scd, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cb + c2 * scd, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sb + c1 * ssd, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sb + c2 * ssd, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    q_blocks = tl.cdiv(HQ, BLOCK_H)
    if hb < q_blocks:
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        _rope_rows(q_ptr, sqb, sqh, sqs, sqd, qo_ptr, sqob, sqoh, sqos, sqod, cos_ptr, sin_ptr, b, s, HQ, offs_h,
                   HALF, ROT, D, cos1, cos2, sin1, sin2, BACKWARD, LAYOUT, BLOCK_HALF, BLOCK_D)
    else:
        offs_h = (hb - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        _rope_rows(k_ptr, skb, skh, sks, skd, ko_ptr, skob, skoh, skos, skod, cos_ptr, sin_ptr, b, s, HK, offs_h,
                   HALF, ROT, D, cos1, cos2, sin1, sin2, BACKWARD, LAYOUT, BLOCK_HALF, BLOCK_D)
