"""Fused LoRA linear: launchers, the autograd Function and backend dispatch.

``lora_linear_group`` computes, for members ``i`` that read the same input ``x`` (one member for a plain layer;
q/k/v or gate/up for a grouped call)::

    y_i = x @ W_iᵀ + b_i + s_i * (dropout_i(x) @ A_iᵀ @ B_iᵀ + bB_i)

with ``W_i`` frozen. Saved for backward: ``x`` once for all members and ``xa = dropout(x) @ Aᵀ`` (M × Σr); the
dropout masks are regenerated from ``seed`` (never stored). ``xa`` is not kept either where the backward finds it
elsewhere: inside a ``rebuilding_offered`` region (``patch(recompute="attn")``: the q/k/v projections) the region's
rerun makes it again on its way (``peftfast.ops.recompute.low_rank_slot``); with ``keep_xa=False`` backward runs the
same masked ``x @ A_catᵀ`` again from the kept ``x`` and the seed when it needs some ``dB_i`` (Σr values per token
fewer for one skinny GEMM). Either way the same bits. Backends share that contract:

* ``triton``: the kernels of ``peftfast.kernels.lora`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``cpp``: the C++ kernels of ``peftfast._C`` (``csrc/lora.cpp``): ATen GEMMs plus ``at::parallel_for`` masking
  epilogues over row chunks, with the Philox stream of the Triton kernels, so both drop the same elements;
* ``torch``: ATen ops with a seeded torch generator, the fallback where neither is available.

``cpp`` on CPU tensors and ``triton`` on CUDA tensors run through the registered ops
``torch.ops.peftfast.lora_group_fwd`` / ``lora_group_bwd`` (fake kernels and autograd registered below), so
``torch.compile`` traces them as single nodes; without ``peftfast._C`` their schemas are defined here and ``torch``
on CPU tensors is their CPU kernel. The other combinations (the reference ``torch`` backend beside ``_C``, Triton in
the interpreter) use a Python ``autograd.Function``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from peftfast import _ext
from peftfast.ops import _direct, _library
from peftfast.ops._backend import resolve_backend
from peftfast.ops._direct import out_view
from peftfast.ops.recompute import LowRankSlot, capturing, deposit_low_rank, low_rank_slot

MAX_RANK = 256
_MAX_IN_PER_LAUNCH = 3  # dense inputs one dx launch sums (q/k/v)


# ----------------------------------------------------------------------------------------------------------------
# dropout masks
# ----------------------------------------------------------------------------------------------------------------
def draw_seed(device: torch.device | None = None) -> int:
    """A dropout seed that ``torch.manual_seed`` and checkpointing's RNG save/restore reproduce.

    CUDA: advances the device's Philox generator offset (no kernel launch, no host sync). Elsewhere: one draw from
    torch's default CPU generator.
    """
    if device is not None and device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[idx]
        off = gen.get_offset()
        gen.set_offset(off + 4)  # Philox offsets advance in multiples of 4
        return (gen.initial_seed() * 0x9E3779B1 + off) % (2**31 - 1)
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def seed_tensor(seed: int | torch.Tensor | None, device: torch.device, p: float) -> torch.Tensor:
    """The dropout seed as the one-element CPU int64 tensor the registered ops take.

    Drawn here when ``seed`` is None: under ``torch.compile`` (and on CPU) from torch's CPU generator as a traced
    tensor op, so no ``.item()`` breaks the graph; on CUDA in eager mode from the device generator's offset.
    """
    if isinstance(seed, torch.Tensor):
        return seed
    if seed is not None:
        return torch.tensor([int(seed)], dtype=torch.int64)
    if p == 0.0:
        return torch.zeros((1,), dtype=torch.int64)  # unused; a fresh tensor, as ops may not see one input twice
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return torch.tensor([draw_seed(device)], dtype=torch.int64)
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


def _torch_keep_mask(seed: int, seg: int, shape: tuple[int, int], p: float, device, dtype) -> torch.Tensor:
    """Keep-mask of segment ``seg`` for the torch backend as 0/1 in ``dtype`` (regenerated, never saved).

    Uniform 31-bit integers against ``p * 2**31``: exact to 2**-31 and faster on CPU than ``bernoulli_``.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + seg * 7919) % (2**63 - 1))
    bits = torch.empty(shape, device=device, dtype=torch.int32).random_(generator=gen)
    return bits.ge_(int(round(p * 2**31))).to(dtype)


def dropout_keep_mask(seed: int, nseg: int, m: int, k: int, p: float, *, device, backend: str) -> torch.Tensor:
    """The boolean keep-masks ``[nseg, m, k]`` that ``backend`` regenerates for ``seed``; for tests and reference
    models (a kept element is scaled by ``1/(1-p)``)."""
    if backend == "torch":
        return torch.stack([_torch_keep_mask(seed, s, (m, k), p, device, torch.float32) for s in range(nseg)]).bool()
    if backend == "cpp":
        return _direct.undifferentiated(torch.ops.peftfast.dropout_keep_mask,
                                        torch.empty(0, device=device), seed_tensor(seed, device, p),
                                        nseg, m, k, p)
    from peftfast.kernels import lora as K

    out = torch.empty((nseg, m, k), dtype=torch.int8, device=device)
    grid = (triton_cdiv(m, 16), triton_cdiv(k, 32))
    K._dropout_mask_kernel[grid](out, m, k, seed, p, NSEG=nseg, BLOCK_M=16, BLOCK_K=32)
    return out.bool()


def regenerated_keep_masks(seed: int | torch.Tensor, nseg: int, x2d: torch.Tensor, p: float,
                           backend: str) -> torch.Tensor:
    """The ``[nseg, M, K]`` keep-masks a fused op on ``x2d`` drew for ``seed``, for a caller that needs the dropped
    input itself (DoRA with dropout). The seed's form says which path drew them: the registered ops' one-element
    tensor (read inside the op: no host sync, a traced op under ``torch.compile``), else an int."""
    m, k = x2d.shape
    if isinstance(seed, torch.Tensor):
        return _direct.undifferentiated(torch.ops.peftfast.dropout_keep_mask,
                                        x2d.new_empty((0,)), seed, nseg, m, k, float(p))
    return dropout_keep_mask(seed, nseg, m, k, p, device=x2d.device, backend=backend)


def seeded_keep_mask(seed: int | torch.Tensor | None, x2d: torch.Tensor, p: float, backend: str, *,
                     tensor_seed: bool) -> tuple[int | torch.Tensor, torch.Tensor]:
    """``(seed, keep)``: the seed drawn where None, as a registered op's tensor (``tensor_seed``) or an int, and the
    ``[M, K]`` keep-mask (segment 0) of :func:`regenerated_keep_masks`."""
    if tensor_seed:
        seed = seed_tensor(seed, x2d.device, p)
    else:
        if isinstance(seed, torch.Tensor):
            seed = int(seed.reshape(-1)[0].item())
        seed = draw_seed(x2d.device) if seed is None else int(seed)
    return seed, regenerated_keep_masks(seed, 1, x2d, p, backend)[0]


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _cached_mask(cache: dict | None, seed, seg, shape, p, device, dtype) -> torch.Tensor:
    """The torch backend's keep-mask, generated once per backward and shared by dx and dA."""
    if cache is None:
        return _torch_keep_mask(seed, seg, shape, p, device, dtype)
    key = (seg, shape, dtype)
    if key not in cache:
        cache[key] = _torch_keep_mask(seed, seg, shape, p, device, dtype)
    return cache[key]


# ----------------------------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------------------------
class _TorchImpl:
    @staticmethod
    def down(x2d, a_cat, rank, nseg, p, seed, out_scale, out=None):
        """``out_scale * [keep_s ⊙ x] @ A_sᵀ`` per segment → [M, nseg*rank] in A's dtype (into ``out`` if given)."""
        x2d = x2d.to(a_cat.dtype)
        if p == 0.0:
            if out is not None:
                return torch.mm(x2d, a_cat.t() * out_scale, out=out) if out.is_contiguous() else \
                    out.copy_(torch.mm(x2d, a_cat.t() * out_scale))
            return torch.mm(x2d, a_cat.t()) if out_scale == 1.0 else torch.mm(x2d, a_cat.t() * out_scale)
        outs = []
        for s in range(nseg):
            keep = _torch_keep_mask(seed, s, tuple(x2d.shape), p, x2d.device, x2d.dtype)
            outs.append(torch.mm(keep.mul_(x2d), a_cat[s * rank:(s + 1) * rank].t()))
        out = outs[0] if nseg == 1 else torch.cat(outs, dim=1)
        return out.mul_(out_scale / (1.0 - p))

    @staticmethod
    def fwd(x2d, w, b, xa_i, b_mat, scale, lbias):
        y = torch.addmm(b, x2d, w.t()) if b is not None else torch.mm(x2d, w.t())
        if xa_i.dtype == y.dtype:
            y.addmm_(xa_i, b_mat.t(), alpha=scale)
            if lbias is not None:
                y.add_(lbias, alpha=scale)
            return y
        # LoRA weights in another dtype (e.g. fp32 over a bf16 base): add in the LoRA dtype, as PEFT does
        low = torch.addmm(lbias, xa_i, b_mat.t()) if lbias is not None else torch.mm(xa_i, b_mat.t())
        return low.mul_(scale).add_(y).to(y.dtype)

    @staticmethod
    def dx(dys, ws, g_cat, a_cat, rank, p, seed, x_dtype, masks=None):
        dx = None
        for dy, w in zip(dys, ws):
            if dy is None:
                continue
            dx = torch.mm(dy, w.to(dy.dtype)) if dx is None else dx.addmm_(dy, w.to(dy.dtype))
        nseg = a_cat.shape[0] // rank
        if p == 0.0:
            low = torch.mm(g_cat, a_cat)
        else:
            low = None
            for s in range(nseg):
                part = torch.mm(g_cat[:, s * rank:(s + 1) * rank], a_cat[s * rank:(s + 1) * rank])
                part.mul_(_cached_mask(masks, seed, s, tuple(part.shape), p, part.device, part.dtype))
                low = part if low is None else low.add_(part)
            low.mul_(1.0 / (1.0 - p))
        if dx is None:
            return low.to(x_dtype)
        return dx.add_(low) if low.dtype == dx.dtype else dx.add_(low.to(dx.dtype))

    @staticmethod
    def da(x2d, g_cat, rank, p, seed, masks=None):
        """dA_cat [nseg*rank, K] in G's dtype."""
        x2d = x2d.to(g_cat.dtype)
        if p == 0.0:
            return torch.mm(g_cat.t(), x2d)
        nseg = g_cat.shape[1] // rank
        outs = []
        for s in range(nseg):
            keep = _cached_mask(masks, seed, s, tuple(x2d.shape), p, x2d.device, x2d.dtype)
            outs.append(torch.mm(g_cat[:, s * rank:(s + 1) * rank].t(), keep * x2d))
        out = outs[0] if nseg == 1 else torch.cat(outs, dim=0)
        return out.mul_(1.0 / (1.0 - p))

    @staticmethod
    def db_mat(dy, xa_i, scale):
        """dB_i = scale * dyᵀ @ xa_i in xa's dtype."""
        return torch.mm(dy.t().to(xa_i.dtype), xa_i).mul_(scale)


# ----------------------------------------------------------------------------------------------------------------
# triton backend
# ----------------------------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting so results match what eager PyTorch would give
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def dense_strategy() -> str:
    """How the Triton backend computes the dense ``x Wᵀ`` / ``dy W`` products.

    ``fused`` (default): Triton GEMMs with the low-rank term in their epilogue, so ``y``/``dx`` are written once.
    ``cublas``: the dense product from cuBLAS, then one Triton pass adds the (masked) low-rank term in place.
    Chosen with ``PEFTFAST_LORA_GEMM``; which one is faster depends on the GPU and shape (see benchmarks).
    """
    val = os.environ.get("PEFTFAST_LORA_GEMM", "fused")
    if val not in ("fused", "cublas"):
        raise ValueError(f"peftfast: PEFTFAST_LORA_GEMM={val!r} must be 'fused' or 'cublas'")
    return val


def _block_r(r_tot: int) -> int:
    return min(128, max(16, 1 << (max(r_tot, 1) - 1).bit_length()))


class _TritonImpl:
    @staticmethod
    def down(x2d, a_cat, rank, nseg, p, seed, out_scale, out=None):
        from peftfast.ops import _triton_launch as L

        m = x2d.shape[0]
        r_tot = a_cat.shape[0]
        if out is None:
            out = torch.empty((m, r_tot), device=x2d.device, dtype=a_cat.dtype)
        scale = out_scale / (1.0 - p) if p > 0 else out_scale
        L.down(x2d, a_cat, out, rank, nseg, p, seed, scale, _block_r(r_tot), _dot_precision(a_cat.dtype))
        return out

    @staticmethod
    def fwd(x2d, w, b, xa_i, b_mat, scale, lbias):
        from peftfast.ops import _triton_launch as L

        m, n = x2d.shape[0], w.shape[0]
        common = dict(l=xa_i, r=b_mat, lbias=lbias, l_scale=scale, rank=b_mat.shape[1], nseg=1, p=0.0, seed=0,
                      block_r=_block_r(b_mat.shape[1]), dot_precision=_dot_precision(x2d.dtype),
                      lora_precision=_dot_precision(b_mat.dtype))
        if dense_strategy() == "cublas":
            out = torch.addmm(b, x2d, w.t()) if b is not None else torch.mm(x2d, w.t())
            L.gemm(inputs=[], bias=None, out=out, accumulate=True, **common)
            return out
        out = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype)
        L.gemm(inputs=[(x2d, w.t())], bias=b, out=out, accumulate=False, **common)
        return out

    @staticmethod
    def dx(dys, ws, g_cat, a_cat, rank, p, seed, x_dtype, masks=None):
        from peftfast.ops import _triton_launch as L

        pairs = [(dy, w) for dy, w in zip(dys, ws) if dy is not None]
        m, k = g_cat.shape[0], a_cat.shape[1]
        cublas = dense_strategy() == "cublas" and bool(pairs)
        if cublas:
            out = None
            for dy, w in pairs:
                out = torch.mm(dy, w) if out is None else out.addmm_(dy, w)
            chunks = [[]]
        else:
            out = torch.empty((m, k), device=g_cat.device, dtype=x_dtype)
            chunks = [pairs[i:i + _MAX_IN_PER_LAUNCH] for i in range(0, len(pairs), _MAX_IN_PER_LAUNCH)] or [[]]
        nseg = a_cat.shape[0] // rank
        for j, chunk in enumerate(chunks):
            last = j == len(chunks) - 1
            L.gemm(
                inputs=chunk, l=g_cat if last else None, r=a_cat.t() if last else None, bias=None, lbias=None,
                out=out, l_scale=1.0, rank=rank, nseg=nseg, p=p, seed=seed, accumulate=cublas or j > 0,
                block_r=_block_r(a_cat.shape[0]), dot_precision=_dot_precision(x_dtype),
                lora_precision=_dot_precision(a_cat.dtype),
            )
        return out

    @staticmethod
    def da(x2d, g_cat, rank, p, seed, masks=None):
        from peftfast.ops import _triton_launch as L

        return L.da(x2d, g_cat, rank, g_cat.shape[1] // rank, p, seed, 1.0, _block_r(g_cat.shape[1]),
                    _dot_precision(g_cat.dtype)).to(g_cat.dtype)

    @staticmethod
    def db_mat(dy, xa_i, scale):
        from peftfast.ops import _triton_launch as L

        # dB_iᵀ = scale * xa_iᵀ @ dy: the dA kernel with dy as "x" and no dropout; dy is never upcast in memory
        r = xa_i.shape[1]
        return L.da(dy, xa_i, r, 1, 0.0, 0, scale, _block_r(r), _dot_precision(xa_i.dtype)).t().to(xa_i.dtype)


_IMPLS = {"torch": _TorchImpl, "triton": _TritonImpl}


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------
def group_forward(x2d: torch.Tensor, scales, p: float, seed: int, backend: str, n: int,
                  flat) -> tuple[list, torch.Tensor]:
    """Forward of ``n`` LoRA linears sharing ``x2d`` [M, K] (no autograd): outputs [M, N_i] and ``xa`` [M, n*r].

    ``flat`` = Ws, bs, bBs, As, Bs. Backward needs only ``x2d`` and ``xa`` (plus the parameters).
    """
    ws, bs, lbs, as_, bmats = (flat[i * n:(i + 1) * n] for i in range(5))
    # a tensor seed: the registered op's (tensor_seeds); and under torch.compile every Triton call (ops/_library.py)
    if _library.through_op(backend) or isinstance(seed, torch.Tensor):
        ys, xa = _direct.undifferentiated(torch.ops.peftfast.lora_group_fwd,
                                          x2d, ws, _no_none(bs, x2d), _no_none(lbs, x2d), as_, bmats,
                                          list(scales), p, seed_tensor(seed, x2d.device, p))
        return list(ys), xa
    rank = as_[0].shape[0]
    impl = _IMPLS[backend]
    a_cat = as_[0] if n == 1 else torch.cat(as_, dim=0)
    xa = impl.down(x2d, a_cat, rank, n, p, seed, 1.0)
    ys = [impl.fwd(x2d, ws[i], bs[i], xa[:, i * rank:(i + 1) * rank], bmats[i], scales[i], lbs[i]) for i in range(n)]
    return ys, xa


def group_backward(x2d, xa, flat, scales, p, seed, backend, n, need_x: bool, flat_need, dy2) -> tuple:
    """Backward of :func:`group_forward`: (grad of x2d or None, grads of ``flat`` in its order)."""
    ws, bs, lbs, as_, bmats = (flat[i * n:(i + 1) * n] for i in range(5))
    if _library.through_op(backend) or isinstance(seed, torch.Tensor):
        return _registered_backward(x2d, xa, ws, _dtypes(bs), _dtypes(lbs), as_, bmats, scales, p,
                             seed_tensor(seed, x2d.device, p), need_x, flat_need, dy2)
    need_b = flat_need[n:2 * n]
    need_lb = flat_need[2 * n:3 * n]
    need_a = flat_need[3 * n:4 * n]
    grad_x, da, grad_bm = _impl_backward(_IMPLS[backend], x2d, xa, ws, as_, bmats, scales, p, seed, need_x,
                                         any(need_a), flat_need[4 * n:5 * n], dy2)
    rank = as_[0].shape[0]
    grad_a = [da[i * rank:(i + 1) * rank] if need_a[i] else None for i in range(n)]
    grad_b, grad_lb = _bias_grads(dy2, _dtypes(bs), _dtypes(lbs), scales, need_b, need_lb)
    return grad_x, (*([None] * n), *grad_b, *grad_lb, *grad_a, *grad_bm)


def _impl_backward(impl, x2d, xa, ws, as_, bmats, scales, p, seed, need_x: bool, need_a: bool, need_bm,
                   dy2) -> tuple:
    """(dx or None, dA_cat [n*r, K] or None, [dB_i or None]) on the torch / Triton backends; dA_cat stays one
    tensor (the registered op returns it whole, ``group_backward`` hands out row views of it). ``xa`` not kept
    (1-D, empty) is rebuilt when some dB_i needs it."""
    n = len(ws)
    rank = as_[0].shape[0]
    m = x2d.shape[0]
    if xa.dim() != 2 and any(need_bm[i] and dy2[i] is not None for i in range(n)):
        xa = impl.down(x2d, as_[0] if n == 1 else torch.cat(as_, dim=0), rank, n, p, seed, 1.0)
    g_cat = None
    if need_x or need_a:
        g_cat = torch.empty((m, n * rank), device=x2d.device, dtype=xa.dtype)
        for i in range(n):
            gi = g_cat[:, i * rank:(i + 1) * rank]
            if dy2[i] is None:
                gi.zero_()
            else:
                impl.down(dy2[i], bmats[i].t(), rank, 1, 0.0, 0, scales[i], out=gi)
    a_cat = as_[0] if n == 1 else torch.cat(as_, dim=0)
    masks: dict = {}  # torch backend: each regenerated mask serves dx and dA (the Triton kernels need none)
    grad_x = impl.dx(dy2, ws, g_cat, a_cat, rank, p, seed, x2d.dtype, masks) if need_x else None
    da = impl.da(x2d, g_cat, rank, p, seed, masks) if need_a else None
    grad_bm = [impl.db_mat(dy2[i], xa[:, i * rank:(i + 1) * rank], scales[i])
               if dy2[i] is not None and need_bm[i] else None for i in range(n)]
    return grad_x, da, grad_bm


def _dtypes(ts) -> list:
    return [None if t is None else t.dtype for t in ts]


def _bias_grads(dy2, b_dtypes, lb_dtypes, scales, need_b, need_lb) -> tuple[list, list]:
    """Gradients of the biases (sums of dy; the backward needs only their dtypes)."""
    grad_b, grad_lb = [None] * len(dy2), [None] * len(dy2)
    for i, dy in enumerate(dy2):
        if dy is None:
            continue
        if need_b[i]:
            grad_b[i] = dy.sum(0).to(b_dtypes[i])
        if need_lb[i]:
            # one rounding: reduce and scale in fp32 at least (the LoRA dtype if wider), as PEFT's LoRA-dtype bias
            # add would at best
            acc = torch.promote_types(torch.promote_types(dy.dtype, lb_dtypes[i]), torch.float32)
            grad_lb[i] = dy.sum(0, dtype=acc).mul_(scales[i]).to(lb_dtypes[i])
    return grad_b, grad_lb


def _registered_backward(x2d, xa, ws, b_dtypes, lb_dtypes, as_, bmats, scales, p, seed_t, need_x, flat_need,
                         dy2) -> tuple:
    """Backward through the registered op ``lora_group_bwd``; returns what :func:`group_backward` returns."""
    n = len(ws)
    need_b, need_lb, need_a, need_bm = (flat_need[i * n:(i + 1) * n] for i in range(1, 5))
    dx, da, dbs = _direct.undifferentiated(torch.ops.peftfast.lora_group_bwd, x2d, xa, list(dy2), ws, as_, bmats,
                                           list(scales), p, seed_t, bool(need_x), any(need_a),
                                           [int(b) for b in need_bm])
    rank = as_[0].shape[0]
    grad_a = [da[i * rank:(i + 1) * rank] if need_a[i] else None for i in range(n)]
    grad_bm = [dbs[i] if need_bm[i] and dy2[i] is not None else None for i in range(n)]
    grad_b, grad_lb = _bias_grads(dy2, b_dtypes, lb_dtypes, scales, need_b, need_lb)
    return dx if need_x else None, (*([None] * n), *grad_b, *grad_lb, *grad_a, *grad_bm)


class _LoRAGroupFunction(torch.autograd.Function):
    """Fused forward/backward of ``n`` LoRA linears sharing one input. ``flat`` = Ws, bs, bBs, As, Bs."""

    @staticmethod
    def forward(ctx, x, scales, p, seed, backend, keep_xa, slot, n, *flat):
        x2d = x.reshape(-1, x.shape[-1])
        ys, xa = group_forward(x2d, scales, p, seed, backend, n, flat)
        deposit_low_rank(xa)
        if slot is not None:
            slot.hold(xa)
        ctx.save_for_backward(x2d, xa if keep_xa and slot is None else xa.new_empty((0,)), *flat)
        ctx.slot = slot
        ctx.meta = (scales, p, seed, backend, n, x.shape)
        return tuple(out_view(y, *x.shape[:-1], y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx, *dys):
        scales, p, seed, backend, n, x_shape = ctx.meta
        x2d, xa, *flat = ctx.saved_tensors
        xa = _from_slot(ctx.slot, xa)
        need = ctx.needs_input_grad
        m = x2d.shape[0]
        dy2 = [None if d is None else d.reshape(m, -1) for d in dys]
        grad_x, grads = group_backward(x2d, xa, flat, scales, p, seed, backend, n, need[0], need[8:], dy2)
        return (None if grad_x is None else grad_x.view(x_shape), None, None, None, None, None, None, None, *grads)


def _from_slot(slot: LowRankSlot | None, xa: torch.Tensor) -> torch.Tensor:
    """The saved ``xa``, or where it was not saved, what the region's rerun deposited (if it did: else empty, and
    the backward computes it)."""
    if slot is None or xa.dim() == 2:
        return xa
    got = slot.take()
    return got if got is not None else xa


# ----------------------------------------------------------------------------------------------------------------
# registered ops: peftfast::lora_group_fwd / lora_group_bwd (schemas in csrc/ops.cpp, CPU kernels in csrc/lora.cpp)
# ----------------------------------------------------------------------------------------------------------------
def tensor_seeds(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` on ``device`` runs the CPU kernel of the registered ops, which take the dropout seed as a
    one-element tensor (drawn as a traced op under ``torch.compile``, read inside the op: no ``.item()`` in traced
    code): ``cpp``, or ``torch`` on CPU where the ops are defined here without ``peftfast._C`` (:func:`_register`)."""
    return backend == "cpp" or (backend == "torch" and device.type == "cpu" and _ATEN_OPS)


def traced_seeds(backend: str, device: torch.device) -> bool:
    """Whether an op that draws its dropout seed itself keeps it a tensor: on the registered ops' CPU path
    (:func:`tensor_seeds`), and on the Triton backend under ``torch.compile``, where eager calls read the CUDA
    generator's offset (which Dynamo cannot trace) and the registered ops' CUDA kernels (the same Triton launches)
    read the tensor instead."""
    return tensor_seeds(backend, device) or (backend == "triton" and torch.compiler.is_compiling())


def _use_registered_op(backend: str, device: torch.device) -> bool:
    # cpp: resolve_backend already checked that _C is loaded and the tensors are on CPU; the Triton CUDA kernels are
    # registered for the CUDA key with or without _C (and under torch.compile every Triton call is an op's: on the
    # interpreter the CPU kernel stands in)
    triton = backend == "triton" and (device.type == "cuda" or torch.compiler.is_compiling())
    return tensor_seeds(backend, device) or (triton and _LIB is not None)


_ZERO_SEED = torch.zeros((1,), dtype=torch.int64)
_EMPTIES: dict[tuple, torch.Tensor] = {}


def _no_none(ts, like: torch.Tensor) -> list[torch.Tensor]:
    """Absent biases as empty tensors: the ops take ``Tensor[]`` (autograd does not flow through ``Tensor?[]``).
    Eager calls share one per dtype and device (never written or saved: no tensor made per call); traced ones get
    their own."""
    if torch.compiler.is_compiling():
        return [like.new_empty((0,)) if t is None else t for t in ts]
    key = (like.dtype, like.device)
    empty = _EMPTIES.get(key)
    if empty is None:
        empty = _EMPTIES[key] = like.new_empty((0,))
    return [empty if t is None else t for t in ts]


def _shaped(ys, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The group's [M, N_i] outputs in ``x``'s leading shape."""
    return tuple(ys) if x.dim() == 2 else tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)


def _or_none(ts) -> list:
    return [t if t.numel() else None for t in ts]


def _fwd_impl(backend: str):
    """The kernel of ``lora_group_fwd`` on ``backend``'s Python path (Triton for the CUDA key; torch for the CPU key
    where ``peftfast._C`` is not loaded)."""

    def fwd(x, weights, biases, lora_biases, lora_as, lora_bs, scales, p, seed, keep_xa=True):
        ys, xa = group_forward(x, scales, p, int(seed.item()), backend, len(weights),
                               [*weights, *_or_none(biases), *_or_none(lora_biases), *lora_as, *lora_bs])
        return ys, xa if keep_xa else xa.new_empty((0,))

    return fwd


def _bwd_impl(backend: str):
    """The kernel of ``lora_group_bwd`` on ``backend``'s Python path (see :func:`_fwd_impl`)."""

    def bwd(x, xa, grads, weights, lora_as, lora_bs, scales, p, seed, need_x, need_a, need_b):
        gx, da, dbs = _impl_backward(_IMPLS[backend], x, xa, weights, lora_as, lora_bs, scales, p, int(seed.item()),
                                     need_x, need_a, [bool(b) for b in need_b], list(grads))
        return (gx if gx is not None else x.new_empty((0,)), da if da is not None else xa.new_empty((0,)),
                [d if d is not None else xa.new_empty((0,)) for d in dbs])

    return bwd


def _mask_impl(backend: str):
    """The kernel of ``dropout_keep_mask`` on ``backend``'s Python path (see :func:`_fwd_impl`)."""
    return lambda like, seed, nseg, m, k, p: dropout_keep_mask(int(seed.item()), nseg, m, k, p, device=like.device,
                                                              backend=backend)


def _fwd_fake(x, weights, biases, lora_biases, lora_as, lora_bs, scales, p, seed, keep_xa=True):
    m, r = x.shape[0], lora_as[0].shape[0]
    xa_shape = (m, len(weights) * r) if keep_xa else (0,)
    return [x.new_empty((m, w.shape[0])) for w in weights], x.new_empty(xa_shape, dtype=lora_as[0].dtype)


def _bwd_fake(x, xa, grads, weights, lora_as, lora_bs, scales, p, seed, need_x, need_a, need_b):
    m, k, r = x.shape[0], x.shape[1], lora_as[0].shape[0]
    dx = x.new_empty((m, k) if need_x else (0,))
    da = xa.new_empty((len(weights) * r, k) if need_a else (0,))
    dbs = [xa.new_empty((w.shape[0], r) if need_b[i] and grads[i] is not None else (0,)) for i, w in enumerate(weights)]
    return dx, da, dbs


def _fwd_setup(ctx, inputs, output) -> None:
    """The registered autograd of ``lora_group_fwd`` (what ``torch.compile`` traces; eager calls take
    :class:`_LoRAGroupOpFunction`, the same saved tensors and gradients)."""
    x, weights, biases, lora_biases, lora_as, lora_bs, scales, p, seed, *_ = inputs
    xa = output[1]  # empty when not kept (keep_xa=False): lora_group_bwd rebuilds it
    ctx.meta = (len(weights), list(scales), float(p))
    ctx.bias_dtypes = (_dtypes(biases), _dtypes(lora_biases))  # bias gradients are sums of dy: dtypes suffice
    ctx.mark_non_differentiable(xa)
    ctx.slot = None
    ctx.save_for_backward(x, xa, seed, *weights, *lora_as, *lora_bs)


def _fwd_backward(ctx, grad_ys, grad_xa):
    n, scales, p = ctx.meta
    x, xa, seed, *rest = ctx.saved_tensors
    xa = _from_slot(getattr(ctx, "slot", None), xa)
    need = ctx.needs_input_grad  # structured like the inputs: one list per Tensor[] argument
    flat_need = [flag for i in range(1, 6) for flag in need[i]]
    dx, grads = _registered_backward(x, xa, rest[:n], *ctx.bias_dtypes, rest[n:2 * n], rest[2 * n:], scales, p, seed,
                              need[0], flat_need, list(grad_ys))
    # one entry per input the op was called with: keep_xa, when left to its default, is not one (torch < 2.12
    # rejects a longer return)
    return dx, *(list(grads[i * n:(i + 1) * n]) for i in range(5)), *([None] * (len(need) - 6))


class _LoRAGroupOpFunction(torch.autograd.Function):
    """Eager autograd of the registered ops ``lora_group_fwd`` / ``lora_group_bwd``: the same kernels, saved tensors
    and gradients as their registered autograd (:func:`_fwd_setup`, :func:`_fwd_backward`), without the per-call
    layers around it (``torch.library``'s Python autograd kernel, :mod:`peftfast.ops._direct`'s flattening), which
    cost a small-shape call more than its GEMMs. The ops run below the Autograd key, so dispatch modes (op
    counters, fake tensors) still see them. ``flat`` = Ws, bs, bBs, As, Bs (None for an absent bias); returns the n
    outputs and ``xa`` (non-differentiable). ``slot``: a recompute region's low-rank slot, which holds ``xa``
    instead of the saved tensors."""

    @staticmethod
    def forward(ctx, x2d, n, scales, p, seed, keep_xa, slot, *flat):
        ws, bs, lbs, as_, bms = (list(flat[i * n:(i + 1) * n]) for i in range(5))
        ctx.bias_dtypes = (_dtypes(bs), _dtypes(lbs))
        with torch._C._AutoDispatchBelowAutograd():
            ys, xa = torch.ops.peftfast.lora_group_fwd.default(x2d, ws, _no_none(bs, x2d), _no_none(lbs, x2d), as_,
                                                                bms, scales, p, seed, keep_xa)
        ctx.mark_non_differentiable(xa)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: the op skips its member
        ctx.meta = (n, scales, p)
        ctx.slot = slot
        kept = xa
        if slot is not None:
            slot.hold(xa)
            kept = xa.new_empty((0,))
        ctx.save_for_backward(x2d, kept, seed, *ws, *as_, *bms)
        return (*ys, xa)

    @staticmethod
    def backward(ctx, *grads):
        # with create_graph=True the backward op runs with its registered guard, which refuses a second backward
        n, scales, p = ctx.meta
        x, xa, seed, *rest = ctx.saved_tensors
        xa = _from_slot(ctx.slot, xa)
        need = ctx.needs_input_grad
        dx, flat = _registered_backward(x, xa, rest[:n], *ctx.bias_dtypes, rest[n:2 * n], rest[2 * n:], scales, p,
                                        seed, need[0], need[7:], list(grads[:n]))
        return (dx, None, None, None, None, None, None, *flat)


_LIB: torch.library.Library | None = None
# the ops' schemas were defined here (peftfast._C not loaded): their CPU kernel is the torch backend
_ATEN_OPS = False
# the schemas of csrc/ops.cpp, for a process without peftfast._C
_SCHEMAS = (
    "lora_group_fwd(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] lora_biases, Tensor[] lora_as, "
    "Tensor[] lora_bs, float[] scales, float p, Tensor seed, bool keep_xa=True) -> (Tensor[], Tensor)",
    "lora_group_bwd(Tensor x, Tensor xa, Tensor?[] grads, Tensor[] weights, Tensor[] lora_as, Tensor[] lora_bs, "
    "float[] scales, float p, Tensor seed, bool need_x, bool need_a, int[] need_b) -> (Tensor, Tensor, Tensor[])",
    "dropout_keep_mask(Tensor like, Tensor seed, int nseg, int m, int k, float p) -> Tensor",
)
# the C++ autograd of peftfast::lora_group for eager training calls (CPU kernels, or the Triton ones registered for
# CUDA); PEFTFAST_CPP_AUTOGRAD=0 runs the Python Function instead
_CPP_AUTOGRAD = os.environ.get("PEFTFAST_CPP_AUTOGRAD", "1") != "0" and _ext.available() and \
    hasattr(torch.ops.peftfast, "lora_group")


def _register() -> None:
    """Fake kernels, autograd and the CUDA (Triton) implementation of the LoRA ops. Without ``peftfast._C`` their
    schemas are defined here, with the torch backend as the CPU kernel: the seeded paths keep one registered
    boundary (and tensor seeds, so ``torch.compile`` traces them without a graph break) either way."""
    global _LIB, _ATEN_OPS
    if _LIB is not None:
        return
    # the Triton mask kernel (the masks the Triton LoRA kernels draw): DoRA with dropout rebuilds x_d through its op
    names = ("lora_group_fwd", "lora_group_bwd", "dropout_keep_mask")
    _LIB, _ATEN_OPS = _library.register(
        _SCHEMAS, dict(zip(names, (_fwd_impl("torch"), _bwd_impl("torch"), _mask_impl("torch")))),
        dict(zip(names, (_fwd_impl("triton"), _bwd_impl("triton"), _mask_impl("triton")))))
    torch.library.register_fake("peftfast::lora_group_fwd")(_fwd_fake)
    torch.library.register_fake("peftfast::lora_group_bwd")(_bwd_fake)
    torch.library.register_fake("peftfast::dropout_keep_mask")(
        lambda like, seed, nseg, m, k, p: like.new_empty((nseg, m, k), dtype=torch.bool))
    torch.library.register_autograd("peftfast::lora_group_fwd", _fwd_backward, setup_context=_fwd_setup)
    torch.library.register_autograd("peftfast::lora_group_bwd", _no_double_backward,
                                       setup_context=lambda ctx, inputs, output: None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("peftfast: the fused LoRA linear does not support double backward (create_graph=True); "
                       "unpatch the model or use backend='torch'")


_register()


# ----------------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------------
def _fail(name: str, exc: type, msg: str):
    raise exc((f"peftfast: {name}: " if name else "peftfast: ") + msg)


def _check_group(x, weights, biases, lora_as, lora_bs, scales, lora_biases, dropout_p, name) -> None:
    # every eager call of every patched layer passes here: each property read once, the message built only to raise
    n = len(weights)
    if not (len(lora_as) == len(lora_bs) == len(scales) == n and n >= 1):
        _fail(name, ValueError, "weights, lora_As, lora_Bs and scales must have the same non-zero length")
    if not 0.0 <= dropout_p < 1.0:
        _fail(name, ValueError, f"dropout probability must be in [0, 1), got {dropout_p}")
    k = x.shape[-1]
    dt, dev = x.dtype, x.device
    a0 = lora_as[0]
    rank, adt = a0.shape[0], a0.dtype
    if not 1 <= rank <= MAX_RANK:
        _fail(name, ValueError, f"LoRA rank {rank} is outside 1..{MAX_RANK}")
    ashape = (rank, k)
    for i in range(n):
        w, a, b = weights[i], lora_as[i], lora_bs[i]
        ws = w.shape
        if len(ws) != 2 or ws[1] != k:
            _fail(name, ValueError, f"input has {k} features but base weight {i} has shape {tuple(ws)} "
                             f"(expected [out_features, {k}])")
        if a.shape != ashape:
            _fail(name, ValueError, f"lora_A {i} has shape {tuple(a.shape)}, expected ({rank}, {k})")
        if b.shape != (ws[0], rank):
            _fail(name, ValueError, f"lora_B {i} has shape {tuple(b.shape)}, expected ({ws[0]}, {rank})")
        if w.dtype != dt:
            _fail(name, TypeError, f"input dtype {dt} does not match base weight dtype {w.dtype}")
        if a.dtype != adt or b.dtype != adt:
            _fail(name, TypeError, f"lora_A/lora_B dtypes differ ({a.dtype}, {b.dtype})")
        bias, lbias = biases[i], lora_biases[i]
        if bias is not None and bias.shape != (ws[0],):
            _fail(name, ValueError, f"bias {i} has shape {tuple(bias.shape)}, expected ({ws[0]},)")
        if lbias is not None and lbias.shape != (ws[0],):
            _fail(name, ValueError, f"lora bias {i} has shape {tuple(lbias.shape)}")
        for t in (w, a, b):
            if t.device != dev:
                _fail(name, ValueError, f"tensors are on different devices ({dev} and {t.device})")
        if w.requires_grad:
            _fail(name, ValueError, f"base weight {i} requires grad; the fused path only trains LoRA and biases")


def lora_linear_group(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    *,
    lora_biases: Sequence[torch.Tensor | None] | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
    name: str = "",
    keep_xa: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Fused LoRA linears that share ``x``: ``y_i = x W_iᵀ + b_i + s_i (drop_i(x) A_iᵀ B_iᵀ + bB_i)``.

    ``weights[i]`` is ``[N_i, K]`` (pass ``W.t()`` for ``fan_in_fan_out`` layers; strides are honoured), all
    members share one rank and dropout probability, and each member gets an independent dropout mask.
    ``keep_xa=False`` keeps no ``dropout(x) @ A_catᵀ`` for backward, which rebuilds it (the same bits).
    """
    n = len(weights)
    lora_biases = list(lora_biases) if lora_biases is not None else [None] * n
    biases = list(biases)
    _check_group(x, weights, biases, lora_as, lora_bs, scales, lora_biases, dropout_p, name)
    be = resolve_backend(backend, x.device)
    # inside a recompute="attn" region: the rerun makes xa again, so nothing keeps it
    slot = low_rank_slot() if keep_xa else None
    if _use_registered_op(be, x.device):
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        scales = [float(s) for s in scales]
        eager = not torch.compiler.is_compiling()
        # no dropout in eager mode: one constant (never written) for the unused seed, not a tensor made per call
        seed_t = _ZERO_SEED if seed is None and dropout_p == 0.0 and eager else \
            seed_tensor(seed, x.device, float(dropout_p))
        train = torch.is_grad_enabled() and eager
        if train and slot is None and _CPP_AUTOGRAD and not capturing():
            # the C++ autograd node (csrc/lora_autograd.cpp): same kernels, saved tensors and gradients, no Python
            # per call in forward or backward; a recompute region's slot or rerun needs xa handed over: below
            return _shaped(torch.ops.peftfast.lora_group.default(
                x2d, list(weights), _no_none(biases, x2d), _no_none(lora_biases, x2d), list(lora_as), list(lora_bs),
                scales, float(dropout_p), seed_t, bool(keep_xa)), x)
        if train:
            *ys, xa = _LoRAGroupOpFunction.apply(x2d, n, scales, float(dropout_p), seed_t, bool(keep_xa), slot,
                                                 *weights, *biases, *lora_biases, *lora_as, *lora_bs)
        else:  # nothing to record (no_grad), or the registered op for the compiler to trace
            ys, xa = _direct.undifferentiated(torch.ops.peftfast.lora_group_fwd.default, x2d, list(weights),
                                              _no_none(biases, x2d), _no_none(lora_biases, x2d), list(lora_as),
                                              list(lora_bs), scales, float(dropout_p), seed_t, bool(keep_xa))
        deposit_low_rank(xa)
        return _shaped(ys, x)
    if isinstance(seed, torch.Tensor):
        seed = int(seed.item())
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed(x.device)
    flat = [*weights, *biases, *lora_biases, *lora_as, *lora_bs]
    return _LoRAGroupFunction.apply(x, tuple(float(s) for s in scales), float(dropout_p), int(seed or 0), be,
                                    bool(keep_xa), slot, n, *flat)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    lora_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
    name: str = "",
) -> torch.Tensor:
    """One fused LoRA linear: ``y = x Wᵀ + b + scale * (dropout_p(x) Aᵀ Bᵀ + lora_bias)``."""
    return lora_linear_group(x, [weight], [bias], [lora_a], [lora_b], [scale], lora_biases=[lora_bias],
                             dropout_p=dropout_p, seed=seed, backend=backend, name=name)[0]


# ----------------------------------------------------------------------------------------------------------------
# DoRA (weight-decomposed LoRA) on the fused LoRA op
# ----------------------------------------------------------------------------------------------------------------
def dora_weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """‖W_n + s·(B A)_n‖ for each output row n (fp32, or fp64 for fp64 inputs; no gradient), from rank-r products
    only: ``‖W_n‖² + 2s·(W Aᵀ)_n·B_n + s²·B_n (A Aᵀ) B_nᵀ``.

    ``weight`` is ``[N, K]``. PEFT forms ``B A`` through an identity matrix (a K × K ``eye`` and two GEMMs) and then
    ``W + s·B A``: two ``[N, K]`` temporaries and a pass over each, per layer and call. Here: one ``[N, r]`` GEMM,
    an ``[r, r]`` one and a row-norm pass over W; nothing ``[N, K]`` is allocated.
    """
    with torch.no_grad():
        ct = dora_norm_dtype(weight.dtype, lora_a.dtype)
        return dora_norm_from(*dora_row_terms(weight, lora_a, ct), lora_a, lora_b, scale)


def dora_norm_dtype(weight_dtype: torch.dtype, lora_dtype: torch.dtype) -> torch.dtype:
    """The dtype DoRA's weight norm is accumulated in: fp32, or wider where W or the LoRA weights are."""
    return torch.promote_types(torch.promote_types(weight_dtype, lora_dtype), torch.float32)


def dora_row_terms(weight: torch.Tensor, lora_a: torch.Tensor, ct: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖W_n‖², W Aᵀ)`` in ``ct`` for the rows of ``weight`` [rows, K]: the only parts of DoRA's norm that read W,
    so a quantized W can be dequantized a chunk of rows at a time."""
    w_sq = torch.linalg.vector_norm(weight, dim=1, dtype=ct).square()
    # the GEMM in W's dtype (fp32 accumulation inside), as PEFT's own forward multiplies by W
    wa = torch.mm(weight, lora_a.t().to(weight.dtype)).to(ct)
    return w_sq, wa


def dora_norm_from(w_sq: torch.Tensor, wa: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """``‖W_n + s·(B A)_n‖`` from :func:`dora_row_terms` (in their dtype): ``‖W_n‖² + 2s·(W Aᵀ)_n·B_n + s²·B_n (A Aᵀ)
    B_nᵀ``, clamped at 0 before the root."""
    ct = w_sq.dtype
    a, b = lora_a.to(ct), lora_b.to(ct)
    cross = (wa * b).sum(1)
    quad = (torch.mm(b, torch.mm(a, a.t())) * b).sum(1)
    return (w_sq + (2.0 * scale) * cross + (scale * scale) * quad).clamp_min_(0.0).sqrt_()


def _dora_out(z: torch.Tensor, mag: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``z ⊙ mag + b`` of a DoRA linear without dropout (z's and mag's dtypes promoted, as PEFT's eager maths), cast
    to the input's ``dtype``; shared by :func:`dora_linear` and the DoRA MLP op, whose backward mirrors it."""
    y = z * mag.to(torch.promote_types(z.dtype, mag.dtype))
    if bias is not None:
        y = y + bias
    return y.to(dtype)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, magnitude: torch.Tensor, *, dropout_p: float = 0.0,
                seed: int | torch.Tensor | None = None, backend: str = "auto", name: str = "") -> torch.Tensor:
    """PEFT's DoRA linear: ``m/‖W + s·B A‖`` (the norm detached, as the paper and PEFT treat it) rescales the LoRA
    linear's output, ``y = base(x) + (mag − 1)·(x_d Wᵀ) + mag·s·(x_d Aᵀ Bᵀ)`` with ``x_d`` the dropped input.

    Without dropout (``x_d = x``) that is ``y = mag ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b``: one fused LoRA call (x and the
    rank-r product kept, as for LoRA) and one scaling, which keeps its input for the magnitude's gradient, where PEFT
    keeps both the base and the LoRA output. With dropout the base GEMM of the dropped input is needed, as PEFT
    computes it: ``y = base(x) + (mag − 1)·z_d + s·x_d Aᵀ Bᵀ`` with ``z_d`` the fused LoRA linear of ``x_d`` (one
    ``[M, N]`` kept where PEFT keeps two), the mask regenerated from ``seed`` (the fused LoRA op's Philox or torch
    stream). ``weight`` is ``[N, K]`` (pass ``W.t()`` for ``fan_in_fan_out``).
    """
    where = f"peftfast: {name}: " if name else "peftfast: "
    n = weight.shape[0]
    if magnitude.shape != (n,):
        raise ValueError(f"{where}DoRA magnitude has shape {tuple(magnitude.shape)}, expected ({n},)")
    if magnitude.device != x.device:
        raise ValueError(f"{where}DoRA magnitude is on {magnitude.device}, the input on {x.device}")
    norm = dora_weight_norm(weight, lora_a, lora_b, scale)
    mag = magnitude / norm.to(magnitude.dtype)
    if dropout_p == 0.0:
        z = lora_linear(x, weight, None, lora_a, lora_b, scale, backend=backend, name=name)
        return _dora_out(z, mag, bias, x.dtype)
    _check_group(x, [weight], [bias], [lora_a], [lora_b], [scale], [None], dropout_p, name)
    be = resolve_backend(backend, x.device)
    x2d = x.reshape(-1, x.shape[-1])
    _, keep = seeded_keep_mask(seed, x2d, dropout_p, be, tensor_seed=traced_seeds(be, x.device))
    xd = x2d * keep * (1.0 / (1.0 - dropout_p))
    # base(x) + (mag - 1)·(x_d Wᵀ) + mag·s·low(x_d) = base(x) + (mag - 1)·z_d + s·low(x_d), z_d = x_d Wᵀ + s·low(x_d)
    # the fused LoRA linear of x_d: one [M, N] tensor kept for the magnitude's gradient instead of two, and the
    # rank-r term low(x_d) = (x_d Aᵀ) Bᵀ again (two skinny GEMMs)
    z_d = lora_linear(xd, weight, None, lora_a, lora_b, scale, backend=backend, name=name)
    low = torch.nn.functional.linear(torch.nn.functional.linear(xd.to(lora_a.dtype), lora_a), lora_b)
    base = torch.nn.functional.linear(x2d, weight, bias)
    ct = torch.promote_types(torch.promote_types(base.dtype, mag.dtype), low.dtype)
    y = base + (mag.to(ct) - 1) * z_d + scale * low
    return y.to(x.dtype).view(*x.shape[:-1], n)


__all__ = ["MAX_RANK", "dora_linear", "dora_weight_norm", "draw_seed", "dropout_keep_mask", "lora_linear",
           "lora_linear_group", "seed_tensor", "tensor_seeds", "traced_seeds"]
