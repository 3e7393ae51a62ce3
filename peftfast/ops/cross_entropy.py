"""Fused linear cross-entropy: the LM head (with an optional LoRA adapter on it) and its loss, chunked over tokens.

``fused_linear_cross_entropy(hidden, weight, labels, ...)`` returns the loss of ``logits = hidden @ weightᵀ + bias
+ s · (hidden @ Aᵀ) @ Bᵀ`` (then ``· logit_scale`` and the Gemma-2 soft-cap) without ever materialising the
``N_tok × V`` logits. Tokens are processed in chunks of ``C`` rows; each chunk's ``C × V`` logits tile is computed
in fp32, turned into the loss rows and into ``D = ∂loss/∂logits`` (see ``peftfast.kernels.cross_entropy``), and
immediately contracted into the gradients:

    dh[chunk] = D W + s · (D B) A        dW += Dᵀ h  (fp32)     db += Σ_rows D
    dB += s · Dᵀ (h Aᵀ)                  dA += s · (D B)ᵀ h

Design: gradients are computed in the forward pass (one pass over the vocabulary instead of two) and only
when autograd will need them. Memory: saved for backward are dh (``N_tok × H`` in the hidden dtype, the size of
the input itself) and the fp32 gradient accumulators of the trainable weights (``V × H`` for a trainable head,
``V + (V + H) · r`` for a bias and LoRA); transient per chunk: one fp32 ``C × V`` tile plus, for 16-bit weights,
one ``C × V`` tile in the weight dtype (the torch backend: at most two such tiles alive at a time). The unfused
path keeps ``N_tok × V`` logits in the model dtype, their fp32 copy and the fp32 log-softmax for backward. The
backward multiplies the saved gradients by the incoming scalar (once-differentiable). ``label_smoothing`` follows
``F.cross_entropy`` (transformers' causal-LM loss applies none).

Backends share that contract: ``triton`` (a GEMM with the logits epilogue, a gradient kernel, cuBLAS for the
remaining products) and ``torch`` (ATen ops, chunked the same way). Both run inside the registered op
``torch.ops.peftfast.fused_linear_ce`` (``fused_linear_jsd`` for the divergence) with fake kernels and autograd, so
``torch.compile`` traces the loss as one node.

Semantics follow ``transformers.loss.loss_utils.ForCausalLMLoss``/``fixed_cross_entropy`` and
``F.cross_entropy``: fp32 loss, ``ignore_index`` rows excluded, ``mean`` divides by the number of non-ignored
rows (NaN when there are none, with zero gradients, as in PyTorch), and ``num_items_in_batch`` (gradient
accumulation) gives ``sum / num_items_in_batch``. Labels are used as given (shift them for causal LM first, or use
``peftfast.modules.cross_entropy`` which does it as transformers does).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton

from peftfast.ops import _direct
from peftfast.ops._backend import interpreting, resolve_backend
from peftfast.ops._counters import launching

REDUCTIONS = ("mean", "sum")
MAX_FUSED_RANK = 64  # the gradient kernel keeps D B [BLOCK_M, BLOCK_R] in registers (128 spills); larger: cuBLAS


@dataclass(frozen=True)
class _Opts:
    lora_scale: float
    ignore_index: int
    label_smoothing: float
    softcap: float | None
    logit_scale: float
    backend: str
    chunk_size: int
    reduction: str


@dataclass(frozen=True)
class _Need:
    """Which gradients autograd will ask for (hidden, weight, bias, lora_A, lora_B)."""

    hidden: bool
    weight: bool
    bias: bool
    a: bool
    b: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias or self.a or self.b


def default_chunk_size(n_tok: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: the largest power of two with ``C · V ≤ N_tok · H`` (so a chunk's logits tile is about the
    size of the hidden states), at least 256 rows (GEMMs stay efficient) and at most 8192."""
    target = max(1, n_tok * hidden // max(vocab, 1))
    c = 1 << (target.bit_length() - 1)
    return max(1, min(n_tok, max(256, min(c, 8192))))


# ----------------------------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------------------------
def _torch_chunk(h, weight, bias, xa, lora_b, safe, vmask, onehot, o: _Opts, need_d: bool):
    """Loss rows [C, 1] (0 where ignored) and, if ``need_d``, fp32 D [C, V]; at most two C × V buffers live.

    ``safe`` [C, 1]: labels with ignored rows mapped to 0; ``vmask`` [C, 1]: 1.0 / 0.0 for kept / ignored rows;
    ``onehot`` [C, 1]: −(1 − ε) · vmask, the target's share of D (precomputed once for all chunks).
    """
    z = torch.mm(h, weight.t()).float()  # rounded to the weight dtype first, as the unfused lm_head does
    if bias is not None:
        z.add_(bias)
    if xa is not None:
        if xa.dtype == torch.float32:
            z.addmm_(xa, lora_b.t(), alpha=o.lora_scale)
        else:
            z.add_(torch.mm(xa, lora_b.t()), alpha=o.lora_scale)
    if o.logit_scale != 1.0:
        z.mul_(o.logit_scale)
    t = None
    if o.softcap is not None:
        t = z.div_(o.softcap).tanh_()
        z = t * o.softcap
    tgt = z.gather(1, safe)
    eps = o.label_smoothing
    zsum = z.sum(1, keepdim=True) if eps > 0.0 else None
    m = z.amax(1, keepdim=True)
    p = z.sub_(m).exp_()  # z is consumed: exp(z - max)
    s = p.sum(1, keepdim=True)
    lse = s.log().add_(m)
    loss = lse.sub_(tgt) if eps == 0.0 else lse.sub_(tgt, alpha=1.0 - eps).sub_(zsum, alpha=eps / z.shape[1])
    loss.mul_(vmask)
    if not need_d:
        return loss, None
    d = p.div_(s).scatter_add_(1, safe, onehot)
    if eps > 0.0:
        d.sub_(eps / d.shape[1])
    d.mul_(vmask)
    if t is not None:
        d.mul_(t.square_().neg_().add_(1.0))
    if o.logit_scale != 1.0:
        d.mul_(o.logit_scale)
    return loss, d


# ----------------------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------------------
def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


# BLOCK_N 256 tiles spill: the epilogue keeps the fp32 tile and its exp live beside the accumulator
LOGITS_CONFIGS = [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4),
                  _cfg(128, 64, 64, 4, 4)]
# fp32 weights with ``ieee`` dots (torch's default, TF32 off) run on FMA units: smaller K steps, or ptxas spills
IEEE_CONFIGS = [_cfg(64, 128, 32, 8, 3), _cfg(64, 64, 32, 4, 3), _cfg(64, 128, 16, 8, 3)]
# no autotuning: the gradient kernel writes D over z when W is fp32, so autotuning reruns would read D back.
# BLOCK_M 64 lets sm_90 run D B as wgmma; BLOCK_N keeps 4 warps free of spills (BLOCK_N 128 spills, and so does
# BLOCK_N 64 once D B's accumulator is 64 ranks wide)
GRAD_WARPS, GRAD_STAGES = 4, 2


def grad_tiles(block_r: int) -> dict[str, int]:
    """The gradient kernel's tiles for a fused ``D B`` of ``block_r`` columns (0: no LoRA)."""
    return {"BLOCK_M": 64, "BLOCK_N": 64 if block_r <= 32 else 32}


LSE_TILES = {"BLOCK_M": 16, "BLOCK_B": 64}
LSE_WARPS, LSE_STAGES = 4, 2
# fixed tiles for the CPU interpreter: small, so tiny test shapes still cover several programs and ragged edges
INTERP_LOGITS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
INTERP_GRAD = {"BLOCK_M": 16, "BLOCK_N": 32}


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


def _logits_block_r(r: int) -> int:
    return min(64, _block_r(r))


def smem_estimate(cfg: triton.Config, elt: int, arch: int, *, block_r: int = 0, lora_elt: int = 0) -> int:
    """Upper estimate of the logits kernel's shared memory (``tests/test_cross_entropy_aot.py`` checks it against
    compiled kernels): the pipelined h [BLOCK_M, BLOCK_K] and W [BLOCK_K, BLOCK_N] buffers (sm_90 keeps
    ``num_stages`` of them, sm_8x ``num_stages - 1``), the LoRA epilogue's xa / B tiles pipelined the same way,
    or the fp32 [BLOCK_M, BLOCK_N] tile's layout conversion for the stores, whichever is largest, plus the
    LoRA xa [BLOCK_M, BLOCK_R] tile."""
    kw = cfg.kwargs
    stages = cfg.num_stages if arch >= 90 else max(cfg.num_stages - 1, 1)
    rows, cols = kw["BLOCK_M"], kw["BLOCK_N"]
    main = (rows + cols) * kw["BLOCK_K"] * elt * stages
    epi = (rows + cols) * block_r * lora_elt * stages
    # the epilogue's xa tile is staged on its own, beside the reused main-loop buffers
    return max(main, epi, rows * cols * 4) + rows * block_r * lora_elt


def grad_smem_estimate(arch: int, *, lora_r: int = 0, lora_elt: int = 0) -> int:
    """Upper estimate of the gradient kernel's shared memory: pipelined fp32 z tiles and B tiles, plus the layout
    conversion of D for the MMA."""
    stages = GRAD_STAGES if arch >= 90 else max(GRAD_STAGES - 1, 1)
    block_r = _block_r(lora_r) if lora_r else 0
    tiles = grad_tiles(block_r)
    bm, bn = tiles["BLOCK_M"], tiles["BLOCK_N"]
    b_tile = bn * block_r * lora_elt
    return (bm * bn * 4 + b_tile) * stages + bm * bn * 4


def _prune(configs, named_args, **kwargs):
    from peftfast.ops import _triton_launch as L

    limit, arch = L._device_smem(), L._device_arch()
    elt = named_args["w_ptr"].element_size()
    lora = kwargs.get("HAS_LORA", False)
    block_r = kwargs["BLOCK_R"] if lora else 0
    lora_elt = named_args["lb_ptr"].element_size() if lora else 0

    def need(c):
        return smem_estimate(c, elt, arch, block_r=block_r, lora_elt=lora_elt)

    kept = [c for c in configs if need(c) <= limit]
    return kept or [min(configs, key=need)]


def logits_configs(weight_dtype: torch.dtype, precision: str) -> list[triton.Config]:
    """The autotune configs of the logits GEMM for these weights and dot precision."""
    return IEEE_CONFIGS if weight_dtype == torch.float32 and precision == "ieee" else LOGITS_CONFIGS


@functools.cache
def _tuned_logits(ieee: bool):
    from peftfast.kernels import cross_entropy as K

    # every store is idempotent and the lse kernel reads only the partial columns of the config that ran last
    # (``best_config``), so benchmarking other configs needs no restore
    return triton.autotune(
        IEEE_CONFIGS if ieee else LOGITS_CONFIGS,
        key=["N", "K", "R", "HAS_BIAS", "HAS_LORA", "HAS_SOFTCAP", "NEED_ZSUM"],
        prune_configs_by={"early_config_prune": _prune},
    )(K._flce_logits_kernel)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _launch_logits(h, weight, bias, xa, lora_b, lab, o: _Opts, loss_out):
    """z [C, V] fp32 and lse [C]; writes the chunk's loss rows into ``loss_out`` [C] (0 where ignored)."""
    from peftfast.kernels import cross_entropy as K

    c, hdim = h.shape
    v = weight.shape[0]
    dev = h.device
    prec = _precision(weight.dtype)
    configs = logits_configs(weight.dtype, prec)
    min_bn = INTERP_LOGITS["BLOCK_N"] if interpreting() else min(cfg.kwargs["BLOCK_N"] for cfg in configs)
    nb_max = triton.cdiv(v, min_bn)
    f32 = dict(device=dev, dtype=torch.float32)
    # no pre-fill: the lse kernel reads only the partial columns the chosen config wrote, and only in-range targets
    z, lse, tgt = torch.empty((c, v), **f32), torch.empty(c, **f32), torch.empty(c, **f32)
    pmax, psum = torch.empty((c, nb_max), **f32), torch.empty((c, nb_max), **f32)
    need_zsum = o.label_smoothing > 0.0
    pz = torch.empty((c, nb_max), **f32) if need_zsum else psum
    has_lora = xa is not None
    r = lora_b.shape[1] if has_lora else 0
    lo_xa = (xa, xa.stride(0), xa.stride(1)) if has_lora else (z, 0, 0)
    lo_b = (lora_b, lora_b.stride(0), lora_b.stride(1)) if has_lora else (z, 0, 0)
    args = (h, h.stride(0), h.stride(1), weight, weight.stride(0), weight.stride(1),
            bias if bias is not None else z, *lo_xa, *lo_b, lab, z, z.stride(0), z.stride(1),
            pmax, psum, pz, pmax.stride(0), pmax.stride(1), tgt, c, v, hdim, r,
            float(o.lora_scale), float(o.logit_scale), float(o.softcap or 1.0))
    meta = dict(HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_SOFTCAP=o.softcap is not None,
                NEED_ZSUM=need_zsum, BLOCK_R=_logits_block_r(r), DOT_PRECISION=prec,
                LORA_PRECISION=_precision(lora_b.dtype) if has_lora else "ieee")
    with launching("_flce_logits_kernel"):
        if interpreting():
            t = INTERP_LOGITS
            K._flce_logits_kernel[(triton.cdiv(c, t["BLOCK_M"]) * triton.cdiv(v, t["BLOCK_N"]),)](*args, **meta, **t)
            block_n = t["BLOCK_N"]
        else:
            tuned = _tuned_logits(configs is IEEE_CONFIGS)
            tuned[lambda cf: (triton.cdiv(c, cf["BLOCK_M"]) * triton.cdiv(v, cf["BLOCK_N"]),)](*args, **meta)
            block_n = tuned.best_config.kwargs["BLOCK_N"]
    eps = o.label_smoothing
    args = (pmax, psum, pz, pmax.stride(0), pmax.stride(1), tgt, lab, lse, loss_out, c, v, triton.cdiv(v, block_n),
            int(o.ignore_index), 1.0 - eps, eps / v)
    grid = (triton.cdiv(c, LSE_TILES["BLOCK_M"]),)
    with launching("_flce_lse_kernel"):
        if interpreting():
            K._flce_lse_kernel[grid](*args, NEED_ZSUM=need_zsum, **LSE_TILES)
        else:
            K._flce_lse_kernel[grid](*args, NEED_ZSUM=need_zsum, **LSE_TILES, num_warps=LSE_WARPS,
                                     num_stages=LSE_STAGES)
    return z, lse


def grad_split(c: int, v: int, block_m: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(SPLIT, COLS_PER_SPLIT) of the gradient kernel: about four programs per SM over the chunk."""
    row_blocks = triton.cdiv(c, block_m)
    col_blocks = triton.cdiv(v, block_n)
    split = max(1, min(col_blocks, triton.cdiv(4 * _num_sms(device), row_blocks)))
    cols = triton.cdiv(col_blocks, split) * block_n
    return triton.cdiv(v, cols), cols


def _launch_grad(z, d, lse, lab, lora_b, o: _Opts, store_f32: bool, fuse_g: bool):
    """Writes D into ``d`` (and fp32 D over ``z`` with ``store_f32``); returns G = D B [C, r] fp32 if ``fuse_g``."""
    from peftfast.kernels import cross_entropy as K

    c, v = z.shape
    r = lora_b.shape[1] if fuse_g else 0
    tiles = INTERP_GRAD if interpreting() else grad_tiles(_block_r(r) if fuse_g else 0)
    split, cols = grad_split(c, v, tiles["BLOCK_M"], tiles["BLOCK_N"], z.device)
    g = torch.empty((split, c, r), device=z.device, dtype=torch.float32) if fuse_g else z
    lo_b = (lora_b, lora_b.stride(0), lora_b.stride(1)) if fuse_g else (z, 0, 0)
    g_strides = (g.stride(0), g.stride(1), g.stride(2)) if fuse_g else (0, 0, 0)
    eps = o.label_smoothing
    args = (z, z.stride(0), z.stride(1), d, d.stride(0), d.stride(1), lse, lab, *lo_b, g, *g_strides,
            c, v, r, cols, int(o.ignore_index), 1.0 - eps, eps / v, float(o.logit_scale),
            1.0 / o.softcap if o.softcap is not None else 1.0)
    meta = dict(HAS_SOFTCAP=o.softcap is not None, HAS_LORA=fuse_g, STORE_F32=store_f32, BLOCK_R=_block_r(r),
                LORA_PRECISION=_precision(lora_b.dtype) if fuse_g else "ieee", **tiles)
    with launching("_flce_grad_kernel"):
        grid = (triton.cdiv(c, tiles["BLOCK_M"]), split)
        if interpreting():
            K._flce_grad_kernel[grid](*args, **meta)
        else:
            K._flce_grad_kernel[grid](*args, **meta, num_warps=GRAD_WARPS, num_stages=GRAD_STAGES)
    if not fuse_g:
        return None
    return g[0] if split == 1 else g.sum(0)


# ----------------------------------------------------------------------------------------------------------------
# chunked forward (loss and gradients)
# ----------------------------------------------------------------------------------------------------------------
_DTYPE_OUT_OK = {"addmm": True}


def _acc_weight_grad(dw, d_lp, d32, h) -> None:
    """dW += Dᵀ h accumulated in fp32 (cuBLAS' fp32-output GEMM for 16-bit D on CUDA, else fp32 operands)."""
    if d32 is None and _DTYPE_OUT_OK["addmm"]:
        try:
            torch.ops.aten.addmm.dtype_out(dw, d_lp.t(), h, torch.float32, out=dw)
            return
        except (RuntimeError, NotImplementedError):  # pragma: no cover - depends on the CUDA build
            _DTYPE_OUT_OK["addmm"] = False
    src = d32 if d32 is not None else d_lp.float()
    dw.addmm_(src.t(), h.float())


def _forward(hidden, weight, bias, lora_a, lora_b, labels, valid, o: _Opts, need: _Need):
    """Loss-row sum (fp32 scalar) and the unscaled gradients (dh, dW, db, dA, dB; None where not needed)."""
    n, hdim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    has_lora = lora_a is not None
    lora_dtype = lora_a.dtype if has_lora else None
    lowp = weight.dtype != torch.float32
    loss_rows = torch.empty(n, device=dev, dtype=torch.float32)
    dh = torch.empty((n, hdim), device=dev, dtype=hidden.dtype) if need.hidden else None
    dw = torch.zeros((v, hdim), device=dev, dtype=torch.float32) if need.weight else None
    db = torch.zeros(v, device=dev, dtype=torch.float32) if need.bias else None
    da = torch.zeros(lora_a.shape, device=dev, dtype=torch.float32) if need.a else None
    dbm = torch.zeros(lora_b.shape, device=dev, dtype=torch.float32) if need.b else None
    need_g = has_lora and (need.hidden or need.a)
    triton_be = o.backend == "triton"
    fuse_g = triton_be and need_g and lora_b.shape[1] <= MAX_FUSED_RANK
    lora32 = has_lora and lora_dtype == torch.float32
    # fp32 D is written besides the 16-bit one only for the consumers that want fp32 operands
    store_f32 = triton_be and lowp and (need.bias or (need.weight and dev.type != "cuda")
                                        or (lora32 and (need.b or (need_g and not fuse_g))))
    if not triton_be:  # per-row label data for every chunk, in three ops
        safe = torch.where(valid, labels, 0).unsqueeze(1)
        vmask = valid.unsqueeze(1).float()
        onehot = vmask * -(1.0 - o.label_smoothing)
    for c0 in range(0, n, o.chunk_size):
        c1 = min(n, c0 + o.chunk_size)
        h, lab = hidden[c0:c1], labels[c0:c1]
        xa = torch.mm(h.to(lora_dtype), lora_a.t()) if has_lora else None
        g = None
        if triton_be:
            z, lse = _launch_logits(h, weight, bias, xa, lora_b, lab, o, loss_rows[c0:c1])
            if not need.any:
                continue
            d_lp = z if not lowp else torch.empty((c1 - c0, v), device=dev, dtype=weight.dtype)
            g = _launch_grad(z, d_lp, lse, lab, lora_b, o, store_f32, fuse_g)
            d32 = z if (store_f32 or not lowp) else None
            del lse
        else:
            rows, d32 = _torch_chunk(h, weight, bias, xa, lora_b, safe[c0:c1], vmask[c0:c1], onehot[c0:c1], o,
                                     need.any)
            loss_rows[c0:c1] = rows.squeeze(1)
            if not need.any:
                continue
            # 16-bit D feeds dh and the 16-bit LoRA products; dW, db and fp32 LoRA read fp32 D
            d_lp = d32 if not lowp else (d32.to(weight.dtype) if need.hidden or (has_lora and not lora32) else None)
        if need_g and g is None:
            d_lora = d32 if lora32 else d_lp
            g = torch.mm(d_lora, lora_b).float()
        if need.hidden:
            torch.mm(d_lp, weight, out=dh[c0:c1])
            if has_lora:
                dh[c0:c1].add_(torch.mm(g.to(lora_dtype), lora_a).to(dh.dtype), alpha=o.lora_scale)
        if need.weight:
            _acc_weight_grad(dw, d_lp, d32, h)
        if need.bias:
            db.add_(d32.sum(0) if d32 is not None else d_lp.sum(0, dtype=torch.float32))
        if need.a:
            da.addmm_(g.t(), h.float(), alpha=o.lora_scale)
        if need.b:
            if lora32:
                dbm.addmm_(d32.t(), xa, alpha=o.lora_scale)
            else:
                dbm.add_(torch.mm(d_lp.t(), xa), alpha=o.lora_scale)
    return loss_rows.sum(), (dh, dw, db, da, dbm)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _loss_scale(loss_sum, valid, num_items, reduction: str):
    """(loss, gscale): the reduction of the loss rows and the factor their gradients take (fp32 scalars)."""
    if num_items is not None:
        num_items = num_items.to(loss_sum.device)
        loss = loss_sum / num_items  # exactly fixed_cross_entropy's expression
        return loss, 1.0 / num_items.to(torch.float32)
    if reduction == "mean":
        count = valid.sum()
        # no valid row: loss NaN as in PyTorch, gradients zero (not 0 · inf)
        return loss_sum / count, torch.where(count > 0, 1.0 / count.clamp(min=1).float(), 0.0)
    return loss_sum, torch.ones((), device=loss_sum.device, dtype=torch.float32)


# Registered op (not a Python autograd.Function), so torch.compile traces it as one node with the fake kernel below.
# Outputs: the loss, the factor of its gradients and those gradients, unscaled (empty where not needed); the
# autograd formula multiplies the saved gradients by gscale and the incoming scalar.
@torch.library.custom_op(
    "peftfast::fused_linear_ce", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor? lora_a, Tensor? lora_b, Tensor labels, "
           "Tensor? num_items, float lora_scale, int ignore_index, float label_smoothing, float? softcap, "
           "float logit_scale, str backend, int chunk_size, str reduction, bool[] need) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _ce_op(hidden, weight, bias, lora_a, lora_b, labels, num_items, lora_scale, ignore_index, label_smoothing,
           softcap, logit_scale, backend, chunk_size, reduction, need):
    o = _Opts(lora_scale, ignore_index, label_smoothing, softcap, logit_scale, backend, chunk_size, reduction)
    valid = labels != ignore_index
    loss_sum, grads = _forward(hidden, weight, bias, lora_a, lora_b, labels, valid, o, _Need(*need))
    loss, gscale = _loss_scale(loss_sum, valid, num_items, reduction)
    return (loss, gscale, *(_empty(hidden) if g is None else g for g in grads))


@_ce_op.register_fake
def _(hidden, weight, bias, lora_a, lora_b, labels, num_items, lora_scale, ignore_index, label_smoothing, softcap,
      logit_scale, backend, chunk_size, reduction, need):
    f32 = torch.float32
    shapes = [(hidden.shape, hidden.dtype), (weight.shape, f32), (weight.shape[:1], f32),
              (None if lora_a is None else lora_a.shape, f32), (None if lora_b is None else lora_b.shape, f32)]
    grads = [hidden.new_empty(shape, dtype=dt) if n else _empty(hidden) for n, (shape, dt) in zip(need, shapes)]
    loss_dt = torch.promote_types(f32, num_items.dtype) if num_items is not None else f32
    return (hidden.new_empty((), dtype=loss_dt), hidden.new_empty((), dtype=f32), *grads)


def _ce_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, lora_a, lora_b = inputs[:5]
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (hidden, weight, bias, lora_a, lora_b))


def _ce_backward(ctx, grad, *_):
    gscale, *grads = ctx.saved_tensors
    s = grad.float() * gscale
    out = [None if dt is None or t.numel() == 0 else (t * s).to(dt) for t, dt in zip(grads, ctx.dtypes)]
    return (*out, *([None] * 11))


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup)


def _check(hidden, weight, labels, bias, lora_a, lora_b, reduction, label_smoothing, softcap, chunk_size):
    where = "peftfast fused_linear_cross_entropy"
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{where}: hidden [..., {hidden.shape[-1]}] does not match weight {tuple(weight.shape)} "
                         "(expected [vocab, hidden])")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{where}: labels {tuple(labels.shape)} must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{where}: labels must be integer class indices, got {labels.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{where}: hidden dtype {hidden.dtype} does not match weight dtype {weight.dtype}")
    v = weight.shape[0]
    if bias is not None and (bias.shape != (v,) or bias.dtype != weight.dtype):
        raise ValueError(f"{where}: bias must be [{v}] in {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError(f"{where}: pass both lora_A and lora_B, or neither")
    if lora_a is not None:
        r = lora_a.shape[0]
        if lora_a.shape != (r, weight.shape[1]) or lora_b.shape != (v, r):
            raise ValueError(f"{where}: lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} do not match "
                             f"[r, {weight.shape[1]}] / [{v}, r]")
        if lora_a.dtype != lora_b.dtype or lora_a.dtype not in (weight.dtype, torch.float32):
            raise TypeError(f"{where}: lora_A/lora_B must share one dtype, the weight's or fp32 "
                            f"(got {lora_a.dtype}, {lora_b.dtype})")
    for t in (weight, labels, bias, lora_a, lora_b):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{where}: tensors are on different devices ({hidden.device} and {t.device})")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{where}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{where}: softcap must be positive or None, got {softcap}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be positive, got {chunk_size}")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,  # noqa: N803 - PEFT's names
    lora_B: torch.Tensor | None = None,  # noqa: N803
    lora_scale: float = 1.0,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logits = (hidden Wᵀ + b + s · hidden Aᵀ Bᵀ) · logit_scale`` (then ``softcap ·
    tanh(logits / softcap)``) against ``labels``, without materialising the logits. Returns an fp32 scalar.

    hidden [..., H], weight [V, H], labels [...] (not shifted here), lora_A [r, H], lora_B [V, r] (the weight's
    dtype or fp32). ``num_items_in_batch`` (tensor or int) overrides ``reduction``: the loss is ``sum /
    num_items_in_batch``, as transformers computes it under gradient accumulation. ``chunk_size`` rows are
    processed at a time (default: ``default_chunk_size``).
    """
    _check(hidden, weight, labels, bias, lora_A, lora_B, reduction, label_smoothing, softcap, chunk_size)
    be = resolve_backend(backend, hidden.device)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1).to(torch.int64).contiguous()
    n = h2.shape[0]
    chunk = chunk_size or default_chunk_size(n, weight.shape[1], weight.shape[0])
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias, lora_A, lora_B)]
    num_items = num_items_in_batch
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        num_items = torch.tensor(num_items)
    args = (h2, weight, bias, lora_A, lora_B, lab, num_items, float(lora_scale), int(ignore_index),
            float(label_smoothing), None if softcap is None else float(softcap), float(logit_scale),
            "triton" if be == "triton" else "torch", int(chunk), reduction, need)
    return _direct.call(torch.ops.peftfast.fused_linear_ce.default, _ce_setup, _ce_backward, args, (-1,) * 7)[0]


# ----------------------------------------------------------------------------------------------------------------
# fused linear JSD (distillation)
# ----------------------------------------------------------------------------------------------------------------
def _scaled_logits(h, weight, inv_t: float, backend: str, lab, ignore_index: int):
    """fp32 ``(h Wᵀ) / T`` [C, V] and its row log-sum-exp: the logits GEMM and lse kernel on Triton."""
    if backend == "triton":
        o = _Opts(1.0, ignore_index, 0.0, None, inv_t, "triton", h.shape[0], "sum")
        scratch = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
        return _launch_logits(h, weight, None, None, None, lab, o, scratch)
    z = torch.mm(h, weight.t()).float().mul_(inv_t)
    return z, torch.logsumexp(z, 1)


def _jsd_chunk(ls, lt, beta: float, need_s: bool, need_t: bool):
    """Per-row divergence and its gradients w.r.t. the student's and (``need_t``) the teacher's scaled logits, from
    the student and teacher log-probabilities ``ls``, ``lt`` [C, V] (fp32; ``ls`` may be overwritten).

    With r = log q − log p (student q, teacher p) and a softmax's Jacobian x ↦ π ⊙ (x − ⟨π, x⟩):
    β = 0: KL(p ‖ q); student gradient q − p, teacher p ⊙ (−r + ⟨p, r⟩).
    β = 1: KL(q ‖ p); student q ⊙ (r − ⟨q, r⟩), teacher p − q.
    Otherwise m = β p + (1 − β) q, JSD_β = β KL(p ‖ m) + (1 − β) KL(q ‖ m), whose derivatives w.r.t. q and p are
    g = (1 − β)(log q − log m) and h = β (log p − log m) (the terms through m cancel), so the gradients are
    q ⊙ (g − ⟨q, g⟩) and p ⊙ (h − ⟨p, h⟩).
    """
    q = ls.exp()
    if beta == 0.0:
        p = lt.exp()
        rows = (p * (lt - ls)).sum(1)
        d_t = (lt - ls).sub_(rows.unsqueeze(1)).mul_(p) if need_t else None
        return rows, (q.sub_(p) if need_s else None), d_t
    if beta == 1.0:
        r = ls - lt
        rows = (q * r).sum(1)
        d_t = lt.exp().sub_(q) if need_t else None
        return rows, (r.sub_(rows.unsqueeze(1)).mul_(q) if need_s else None), d_t
    p = lt.exp()
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1.0 - beta))
    rows = beta * (p * (lt - lm)).sum(1) + (1.0 - beta) * (q * (ls - lm)).sum(1)
    d_s = d_t = None
    if need_t:
        h = (lt - lm).mul_(beta)
        d_t = h.sub_((p * h).sum(1, keepdim=True)).mul_(p)
    if need_s:
        g = ls.sub_(lm).mul_(1.0 - beta)
        d_s = g.sub_((q * g).sum(1, keepdim=True)).mul_(q)
    return rows, d_s, d_t


def _jsd_forward(s_hidden, s_weight, t_hidden, t_weight, labels, beta, temperature, ignore_index, backend,
                 chunk_size, need):
    """Row sum of the divergence and the unscaled gradients (dh_s, dW_s, dh_t, dW_t; None where not needed)."""
    n = s_hidden.shape[0]
    dev = s_hidden.device
    inv_t = 1.0 / temperature
    need_s, need_t = need[0] or need[1], need[2] or need[3]
    valid = labels != ignore_index if labels is not None else None
    rows = torch.empty(n, device=dev, dtype=torch.float32)
    grads = [torch.empty(h.shape, device=dev, dtype=h.dtype) if nh else None for h, nh in
             ((s_hidden, need[0]), (t_hidden, need[2]))]
    wgrads = [torch.zeros(w.shape, device=dev, dtype=torch.float32) if nw else None for w, nw in
              ((s_weight, need[1]), (t_weight, need[3]))]
    lab_all = labels if labels is not None else torch.full((n,), ignore_index, device=dev, dtype=torch.int64)
    for c0 in range(0, n, chunk_size):
        c1 = min(n, c0 + chunk_size)
        lab = lab_all[c0:c1]
        hs, ht = s_hidden[c0:c1], t_hidden[c0:c1]
        zs, lse_s = _scaled_logits(hs, s_weight, inv_t, backend, lab, ignore_index)
        zt, lse_t = _scaled_logits(ht, t_weight, inv_t, backend, lab, ignore_index)
        ls = zs.sub_(lse_s.unsqueeze(1))
        lt = zt.sub_(lse_t.unsqueeze(1))
        r, d_s, d_t = _jsd_chunk(ls, lt, beta, need_s, need_t)
        if valid is not None:
            ok = valid[c0:c1]
            r = torch.where(ok, r, 0.0)
        rows[c0:c1] = r
        for d, h, w, dh, dw in ((d_s, hs, s_weight, grads[0], wgrads[0]), (d_t, ht, t_weight, grads[1], wgrads[1])):
            if d is None:
                continue
            if valid is not None:
                d.mul_(ok.unsqueeze(1))
            d.mul_(inv_t)  # the logits are divided by T
            if dh is not None:
                torch.mm(d.to(w.dtype), w, out=dh[c0:c1])
            if dw is not None:
                dw.addmm_(d.t(), h.float())
    count = valid.sum() if valid is not None else torch.tensor(n, device=dev)
    return rows.sum(), count, (grads[0], wgrads[0], grads[1], wgrads[1])


# Registered op, traced by torch.compile as one node (see ``_ce_op``). Outputs: the loss, the factor of its
# gradients and the unscaled gradients of the student's and the teacher's hidden states and weights (empty where not
# needed).
@torch.library.custom_op(
    "peftfast::fused_linear_jsd", mutates_args=(),
    schema="(Tensor s_hidden, Tensor s_weight, Tensor t_hidden, Tensor t_weight, Tensor? labels, float beta, "
           "float temperature, int ignore_index, str backend, int chunk_size, bool t2, bool[] need) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _jsd_op(s_hidden, s_weight, t_hidden, t_weight, labels, beta, temperature, ignore_index, backend, chunk_size, t2,
            need):
    rows, count, grads = _jsd_forward(s_hidden, s_weight, t_hidden, t_weight, labels, beta, temperature,
                                      ignore_index, backend, chunk_size, need)
    factor = temperature * temperature if t2 else 1.0
    loss = rows / count * factor
    gscale = torch.where(count > 0, factor / count.clamp(min=1).float(), 0.0)
    return (loss, gscale, *(_empty(s_hidden) if g is None else g for g in grads))


@_jsd_op.register_fake
def _(s_hidden, s_weight, t_hidden, t_weight, labels, beta, temperature, ignore_index, backend, chunk_size, t2,
      need):
    f32 = torch.float32
    shapes = [(s_hidden.shape, s_hidden.dtype), (s_weight.shape, f32), (t_hidden.shape, t_hidden.dtype),
              (t_weight.shape, f32)]
    grads = [s_hidden.new_empty(shape, dtype=dt) if n else _empty(s_hidden) for n, (shape, dt) in zip(need, shapes)]
    return (s_hidden.new_empty((), dtype=f32), s_hidden.new_empty((), dtype=f32), *grads)


def _jsd_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.dtypes = tuple(t.dtype for t in inputs[:4])


def _jsd_backward(ctx, grad, *_):
    gscale, *grads = ctx.saved_tensors
    s = grad.float() * gscale
    out = [None if t.numel() == 0 else (t * s).to(dt) for t, dt in zip(grads, ctx.dtypes)]
    return (*out, *([None] * 8))


_jsd_op.register_autograd(_jsd_backward, setup_context=_jsd_setup)


def fused_linear_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_t2: bool = True,
    teacher_grad: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence between the student's and the teacher's next-token distributions,
    ``q = softmax(student_hidden W_sᵀ / T)`` and ``p = softmax(teacher_hidden W_tᵀ / T)``, without either
    ``N_tok × V`` logits tensor. Returns an fp32 scalar: the mean over tokens whose label is not ``ignore_index``
    (over all tokens when ``labels`` is None).

    ``beta`` = 0: forward KL(p ‖ q); 1: reverse KL(q ‖ p); otherwise β KL(p ‖ m) + (1 − β) KL(q ‖ m) with
    m = β p + (1 − β) q. ``scale_t2`` multiplies the divergence (and so its gradients) by T², the convention of
    Hinton et al. (2015): the gradients of softened distributions shrink as 1/T², and T² keeps their size
    independent of the temperature (no effect at T = 1). The teacher is a constant unless ``teacher_grad=True``:
    then gradients also reach ``teacher_hidden`` / ``teacher_weight`` where they require grad (one more fp32
    ``C × V`` temporary per chunk; saved for backward: their gradients, the size of the inputs, fp32 for the
    weight). Chunked like ``fused_linear_cross_entropy`` (two fp32 ``C × V`` tiles and a few fp32 temporaries of that
    size per chunk); on Triton the two logits GEMMs and their log-sum-exp are the cross-entropy kernels, the
    divergence itself is ATen. Runs as ``torch.ops.peftfast.fused_linear_jsd``.
    """
    where = "peftfast fused_linear_jsd"
    if student_weight.dim() != 2 or teacher_weight.dim() != 2 or student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"{where}: student {tuple(student_weight.shape)} and teacher {tuple(teacher_weight.shape)} "
                         "weights must be [V, H] with the same vocabulary")
    if student_hidden.shape[-1] != student_weight.shape[1] or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(f"{where}: hidden sizes do not match the weights")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"{where}: student {tuple(student_hidden.shape)} and teacher {tuple(teacher_hidden.shape)} "
                         "hidden states cover different tokens")
    if labels is not None and labels.shape != student_hidden.shape[:-1]:
        raise ValueError(f"{where}: labels {tuple(labels.shape)} must match {tuple(student_hidden.shape[:-1])}")
    for h, w, who in ((student_hidden, student_weight, "student"), (teacher_hidden, teacher_weight, "teacher")):
        if h.dtype != w.dtype:
            raise TypeError(f"{where}: {who} hidden dtype {h.dtype} does not match its weight dtype {w.dtype}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{where}: beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"{where}: temperature must be positive, got {temperature}")
    be = resolve_backend(backend, student_hidden.device)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    wt = teacher_weight
    if not teacher_grad:
        ht, wt = ht.detach(), wt.detach()
    lab = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    n, v = hs.shape[0], student_weight.shape[0]
    chunk = chunk_size or default_chunk_size(n, max(hs.shape[1], ht.shape[1]), 2 * v)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t.requires_grad for t in (hs, student_weight, ht, wt)]
    args = (hs, student_weight, ht, wt, lab, float(beta), float(temperature), int(ignore_index),
            "triton" if be == "triton" else "torch", int(chunk), bool(scale_t2), need)
    return _direct.call(torch.ops.peftfast.fused_linear_jsd.default, _jsd_setup, _jsd_backward, args, (-1,) * 6)[0]
