"""NF4 (QLoRA 4-bit NormalFloat) base weights: quantize / dequantize and the fused LoRA linear over an NF4 base.

Storage of a frozen ``W [N, K]`` (bitsandbytes' layout for ``nf4``, ``K % block_size == 0``)::

    qweight [N, K/2] uint8     two codes per byte, W[n, 2j] in the high nibble
    absmax  [N, K/block_size]  fp32 per-block scale (block_size 64: 0.5 + 4/64 = 0.5625 byte per weight)
    W[n, k] = NF4[code] * absmax[n, k // block_size]   in fp32, rounded once to the compute dtype

Double quantization (QLoRA) stores absmax as 8-bit codes: ``absmax = code2[q2] * scale2[b // 256] + offset`` with
``offset`` the mean absmax, one fp32 ``scale2`` per 256 blocks and a 256-entry ``code2`` table (peftfast uses a
linear symmetric table; bitsandbytes' dynamic-tree table is taken as is when its layers are imported):
0.5 + 1/64 + 4/16384 byte per weight. It is expanded to fp32 inside each call (N·K/64 floats, freed after it).

``nf4_lora_linear`` computes ``y = x Wᵀ + b + s (dropout_p(x) Aᵀ Bᵀ + bB)`` without a 16-bit copy of W:

* ``triton``: ``peftfast.kernels.nf4`` GEMMs that dequantize W tiles inside their K loop (forward and dx);
* ``cpp``: ``torch.ops.peftfast.nf4_lora_fwd/bwd`` (csrc/nf4.cpp) dequantizing ``chunk`` elements of W at a time;
* ``torch``: the same chunking in ATen ops (no ``peftfast._C``).

``torch.ops.peftfast.nf4_quantize/nf4_dequantize`` have CPU and CUDA kernels; ``nf4_lora_fwd/bwd`` CPU kernels only
(CUDA tensors take the Triton path through the autograd Function below).

Saved for backward: ``x`` (its 2-D view, not a copy), ``xa = drop(x) Aᵀ`` (M × r) and the quantized state; the
dropout mask is regenerated from the seed (Philox for triton/cpp, which agree bit for bit; torch's generator for
the torch backend).
"""

from __future__ import annotations

import functools

import torch

from peftfast import _ext
from peftfast.ops import _direct, _library
from peftfast.ops._backend import interpreting, resolve_backend
from peftfast.ops._direct import out_view
from peftfast.ops.lora import _bias_grads, _dtypes

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
DQ_BLOCK = 256
_DEFAULT_CHUNK = 1 << 21  # elements of W dequantized at a time on CPU (4 MiB in bf16)


@functools.lru_cache(maxsize=8)
def _code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values (fp32) on ``device`` (cached; do not modify)."""
    return _code(torch.device(device))


@functools.lru_cache(maxsize=1)
def have_ops() -> bool:
    """True when ``peftfast._C`` is loaded and was built with the NF4 ops (an older build lacks them)."""
    if not _ext.available():
        return False
    try:
        torch.ops.peftfast.nf4_lora_fwd  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _cpp_ok(device: torch.device) -> bool:
    if not have_ops():
        return False
    return device.type == "cpu" or (device.type == "cuda" and _ext.has_cuda_kernels())


def _check_block(block_size: int, k: int, where: str) -> None:
    if block_size < 2 or block_size % 2:
        raise ValueError(f"peftfast: {where}: block_size must be even and >= 2, got {block_size}")
    if k % block_size:
        raise ValueError(f"peftfast: {where}: in_features={k} is not divisible into blocks of {block_size}")


# ----------------------------------------------------------------------------------------------------------------
# quantize / dequantize
# ----------------------------------------------------------------------------------------------------------------
def _quantize_torch(w: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    blocks = w.detach().to(torch.float32).reshape(n, k // bs, bs)
    absmax = blocks.abs().amax(-1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    norm = torch.where(absmax[..., None] > 0, blocks / safe[..., None], torch.zeros_like(blocks))
    code = nf4_code(w.device)
    mids = (code[:-1] + code[1:]) / 2
    idx = torch.bucketize(norm, mids).to(torch.uint8).reshape(n, k // 2, 2)  # midpoint ties go to the lower code
    return (idx[..., 0] << 4) | idx[..., 1], absmax


def _dequantize_torch(q: torch.Tensor, absmax: torch.Tensor, bs: int, dtype: torch.dtype) -> torch.Tensor:
    """W (or the row/column block of it that ``q``/``absmax`` slice; column slices on block boundaries)."""
    n, kh = q.shape
    idx = torch.stack(((q >> 4), (q & 15)), dim=-1).reshape(n, 2 * kh).long()
    w = nf4_code(q.device)[idx].reshape(n, -1, bs) * absmax.reshape(n, -1, 1)
    return w.reshape(n, 2 * kh).to(dtype)


def quantize_nf4(w: torch.Tensor, block_size: int = 64, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize ``w [N, K]`` → ``(qweight [N, K/2] uint8, absmax [N, K/block_size] fp32)``.

    Each element gets the NF4 value nearest to ``w / absmax`` (fp32 division, ties to the lower code); every
    backend (C++ CPU, CUDA, torch) produces identical codes.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"peftfast: quantize_nf4: expected a 2-D floating weight, got {w.dtype} {tuple(w.shape)}")
    _check_block(block_size, w.shape[1], "quantize_nf4")
    if backend == "auto" and _cpp_ok(w.device) or backend == "cpp":
        return tuple(_direct.undifferentiated(torch.ops.peftfast.nf4_quantize, w.detach(), block_size))
    return _quantize_torch(w, block_size)


def dequantize_nf4(qweight: torch.Tensor, absmax: torch.Tensor, block_size: int = 64,
                   dtype: torch.dtype = torch.float32, *, backend: str = "auto") -> torch.Tensor:
    """W ``[N, K]`` in ``dtype`` from ``qweight [N, K/2]`` and fp32 ``absmax [N, K/block_size]``.

    ``backend``: ``auto`` (C++/CUDA kernels of ``peftfast._C`` when built, else Triton on CUDA, else torch),
    ``cpp``, ``triton`` or ``torch``.
    """
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"peftfast: dequantize_nf4: qweight must be 2-D uint8, got {qweight.dtype}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    _check_block(block_size, k, "dequantize_nf4")
    if absmax.shape != (n, k // block_size) or absmax.dtype != torch.float32:
        raise ValueError(f"peftfast: dequantize_nf4: absmax must be fp32 {(n, k // block_size)}, got "
                         f"{absmax.dtype} {tuple(absmax.shape)}")
    if backend == "auto":
        backend = "cpp" if _cpp_ok(qweight.device) else "triton" if qweight.device.type == "cuda" else "torch"
    if backend == "cpp":
        return _direct.undifferentiated(torch.ops.peftfast.nf4_dequantize, qweight, absmax, block_size, dtype)
    if backend == "triton":
        return _triton_dequantize(qweight, absmax, block_size, dtype)
    return _dequantize_torch(qweight, absmax, block_size, dtype)


def double_quantize(absmax: torch.Tensor, block: int = DQ_BLOCK) -> tuple[torch.Tensor, ...]:
    """QLoRA's double quantization of fp32 ``absmax`` → ``(q2 uint8 [nb], code2 fp32 [256], scale2 fp32
    [ceil(nb/block)], offset fp32 [])`` with ``absmax ≈ code2[q2] * scale2[i // block] + offset``.

    ``offset`` is the mean absmax; ``code2`` is linear and symmetric (``clamp((i - 128) / 127, -1, 1)``), so each
    block of ``block`` centred values is scaled by its own max magnitude.
    """
    flat = absmax.reshape(-1).to(torch.float32)
    offset = flat.mean()
    cen = flat - offset
    nb = cen.numel()
    pad = (-nb) % block
    padded = torch.nn.functional.pad(cen, (0, pad)).reshape(-1, block)
    scale2 = padded.abs().amax(-1)
    safe = torch.where(scale2 > 0, scale2, torch.ones_like(scale2))
    q2 = torch.round(padded / safe[:, None] * 127).clamp_(-127, 127).add_(128).to(torch.uint8).reshape(-1)[:nb]
    code2 = ((torch.arange(256, dtype=torch.float32, device=absmax.device) - 128) / 127).clamp_(-1, 1)
    return q2, code2, scale2, offset


def dequantize_absmax(q2: torch.Tensor, code2: torch.Tensor, scale2: torch.Tensor, offset: torch.Tensor,
                      shape: tuple[int, int], block: int = DQ_BLOCK) -> torch.Tensor:
    """fp32 absmax of ``shape`` from its double-quantized form (see :func:`double_quantize`)."""
    flat = q2.reshape(-1)
    idx = torch.arange(flat.numel(), device=flat.device) // block
    return (code2[flat.long()] * scale2.reshape(-1)[idx] + offset).reshape(shape)


# ----------------------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------------------
def _cfg(num_warps: int, num_stages: int, **kw: int):
    import triton

    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


@functools.cache
def gemm_configs(kind: str = "fwd") -> list:
    """Autotune configs of the NF4 GEMMs. BLOCK_K is the reduction step (K in the forward, N in dx); every config
    keeps a W tile inside one 64-wide absmax block column (forward BLOCK_K <= 64, dx output BLOCK_N <= 64), so the
    scale is a vector load. All compile spill-free within sm_80/sm_90 shared memory (tests/test_nf4_aot.py)."""
    if kind == "fwd":
        return [
            _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
            _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        ]
    return [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ]


DEQUANT_TILE = dict(BLOCK_N=16, BLOCK_K=256, num_warps=4)
INTERP_GEMM = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def smem_estimate(cfg, elt: int, *, arch: int = 90, block_r: int = 16, lora_elt: int = 4) -> int:
    """Upper estimate of a config's shared memory in bytes, fitted on ``metadata.shared`` of AOT compiles
    (``tests/test_nf4_aot.py`` checks it never under-estimates). Per pipeline stage (sm_90 keeps ``num_stages``,
    sm_8x ``num_stages - 1``): the activation tile ``BLOCK_M × BLOCK_K`` and the W tile ``BLOCK_K × BLOCK_N`` as
    codes plus dequantized values (``elt + 2.125`` bytes an element); the low-rank epilogue pipelines
    ``(BLOCK_M + BLOCK_N) × BLOCK_R`` LoRA elements in the same buffers."""
    kw = cfg.kwargs
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    stages = cfg.num_stages if arch >= 90 else max(cfg.num_stages - 1, 1)
    main = stages * (bm * bk * elt + int(bk * bn * (elt + 2.125)))
    epi = stages * (bm + bn) * block_r * lora_elt
    return max(main, epi, bm * bn * elt)


def _prune(configs, named_args, **kwargs):
    from peftfast.ops._triton_launch import _device_arch, _device_smem

    ptr = named_args.get("x_ptr", named_args.get("dy_ptr"))
    lora = named_args.get("r_ptr", named_args.get("a_ptr"))
    limit, arch = _device_smem(), _device_arch()
    est = dict(arch=arch, block_r=kwargs.get("BLOCK_R", 16) if kwargs.get("HAS_LORA") else 0,
               lora_elt=lora.element_size())
    kept = [c for c in configs if smem_estimate(c, ptr.element_size(), **est) <= limit]
    return kept or configs[-1:]


@functools.cache
def _tuned(name: str):
    import triton

    from peftfast.kernels import nf4 as K

    fn = {"fwd": K._nf4_lora_fwd_kernel, "dx": K._nf4_lora_dx_kernel}[name]
    return triton.autotune(gemm_configs(name), key=["N", "K", "R", "HAS_LORA"],
                           prune_configs_by={"early_config_prune": _prune})(fn)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _dot_precision(dtype: torch.dtype) -> str:
    from peftfast.ops.lora import _dot_precision as dp

    return dp(dtype)


def _block_r(r: int) -> int:
    return min(64, max(16, 1 << (max(r, 1) - 1).bit_length()))


def _triton_dequantize(q, absmax, bs, dtype) -> torch.Tensor:
    from peftfast.kernels import nf4 as K
    from peftfast.ops._counters import launching

    n, k = q.shape[0], q.shape[1] * 2
    out = torch.empty((n, k), device=q.device, dtype=dtype)
    t = dict(BLOCK_N=8, BLOCK_K=64) if interpreting() else dict(DEQUANT_TILE)
    warps = t.pop("num_warps", 4)
    grid = (_cdiv(n, t["BLOCK_N"]), _cdiv(k, t["BLOCK_K"]))
    with launching("_nf4_dequant_kernel"):
        K._nf4_dequant_kernel[grid](q, q.stride(0), absmax, absmax.stride(0), nf4_code(q.device), out, out.stride(0),
                                    n, k, QBLOCK=bs, RNE_BF16=interpreting(), num_warps=warps, **t)
    return out


def _launch(name: str, args: tuple, meta: dict, m: int, cols: int) -> None:
    from peftfast.kernels import nf4 as K
    from peftfast.ops._counters import launching

    kern = {"fwd": K._nf4_lora_fwd_kernel, "dx": K._nf4_lora_dx_kernel}[name]
    with launching(f"_nf4_lora_{name}_kernel"):
        if interpreting():
            c = INTERP_GEMM
            kern[(_cdiv(m, c["BLOCK_M"]) * _cdiv(cols, c["BLOCK_N"]),)](*args, **meta, **c)
        else:
            _tuned(name)[lambda c: (_cdiv(m, c["BLOCK_M"]) * _cdiv(cols, c["BLOCK_N"]),)](*args, **meta)


def triton_fwd(x2d, q, absmax, bias, xa, b_mat, scale, lbias, bs) -> torch.Tensor:
    """``x Wᵀ + bias + scale (xa Bᵀ + lbias)`` with W dequantized in the GEMM's K loop."""
    m, n, k = x2d.shape[0], q.shape[0], x2d.shape[1]
    out = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype)
    has_lora = xa is not None
    r = b_mat.shape[1] if has_lora else 0
    lo = (xa, xa.stride(0), xa.stride(1)) if has_lora else (out, 0, 0)
    ro = (b_mat, b_mat.stride(0), b_mat.stride(1)) if has_lora else (out, 0, 0)
    args = (x2d, x2d.stride(0), x2d.stride(1), q, q.stride(0), absmax, absmax.stride(0), nf4_code(q.device), *lo, *ro,
            bias if bias is not None else out, lbias if lbias is not None else out, out, out.stride(0),
            out.stride(1), m, n, k, r, float(scale))
    meta = dict(HAS_LORA=has_lora, HAS_BIAS=bias is not None, HAS_LBIAS=lbias is not None, QBLOCK=bs,
                BLOCK_R=_block_r(r), DOT_PRECISION=_dot_precision(x2d.dtype),
                LORA_PRECISION=_dot_precision(b_mat.dtype if has_lora else x2d.dtype))
    _launch("fwd", args, meta, m, n)
    return out


def triton_dx(dy, q, absmax, g, a, p, seed, bs, out_dtype) -> torch.Tensor:
    """``dy W + keep ⊙ (G A) / (1 - p)`` with W dequantized in the GEMM's N loop."""
    m, n, k = dy.shape[0], q.shape[0], q.shape[1] * 2
    out = torch.empty((m, k), device=dy.device, dtype=out_dtype)
    has_lora = g is not None
    r = a.shape[0] if has_lora else 0
    lo = (g, g.stride(0), g.stride(1)) if has_lora else (out, 0, 0)
    ao = (a, a.stride(1), a.stride(0)) if has_lora else (out, 0, 0)
    args = (dy, dy.stride(0), dy.stride(1), q, q.stride(0), absmax, absmax.stride(0), nf4_code(q.device), *lo, *ao,
            out, out.stride(0), out.stride(1), m, n, k, r, int(seed), float(p), 1.0 / (1.0 - p) if p > 0 else 1.0)
    meta = dict(HAS_LORA=has_lora, HAS_DROPOUT=has_lora and p > 0.0, QBLOCK=bs, BLOCK_R=_block_r(r),
                DOT_PRECISION=_dot_precision(dy.dtype),
                LORA_PRECISION=_dot_precision(a.dtype if has_lora else dy.dtype))
    _launch("dx", args, meta, m, k)
    return out


# ----------------------------------------------------------------------------------------------------------------
# backends of the NF4 LoRA linear
# ----------------------------------------------------------------------------------------------------------------
def _lora_impl(backend: str):
    from peftfast.ops import lora as L

    return L._TritonImpl if backend == "triton" else L._TorchImpl


def _chunk_rows(total: int, per_row: int, chunk: int, multiple: int = 1) -> int:
    rows = max(1, (chunk or _DEFAULT_CHUNK) // max(per_row, 1))
    rows = max(multiple, rows // multiple * multiple)
    return min(rows, total)


def _fwd(backend, x2d, q, absmax, bias, lbias, a, b_mat, scale, p, seed, bs, chunk):
    r = a.shape[0]
    if backend == "cpp":
        return tuple(_direct.undifferentiated(torch.ops.peftfast.nf4_lora_fwd,
                                              x2d, q, absmax, bias, lbias, a, b_mat, scale, p,
                                              torch.tensor([seed], dtype=torch.int64), bs, chunk))
    impl = _lora_impl(backend)
    xa = impl.down(x2d, a, r, 1, p, seed, 1.0)
    if backend == "triton":
        return triton_fwd(x2d, q, absmax, bias, xa, b_mat, scale, lbias, bs), xa
    n, k = q.shape[0], x2d.shape[1]
    y = torch.empty((x2d.shape[0], n), device=x2d.device, dtype=x2d.dtype)
    rows = _chunk_rows(n, k, chunk)
    for n0 in range(0, n, rows):
        sl = slice(n0, min(n, n0 + rows))
        wc = _dequantize_torch(q[sl], absmax[sl], bs, x2d.dtype)
        y[:, sl] = impl.fwd(x2d, wc, None if bias is None else bias[sl], xa, b_mat[sl], scale,
                            None if lbias is None else lbias[sl])
    return y, xa


def _bwd(backend, x2d, xa, dy, q, absmax, a, b_mat, scale, p, seed, bs, chunk, need_x, need_a, need_b):
    if backend == "cpp":
        dx, da, db = _direct.undifferentiated(torch.ops.peftfast.nf4_lora_bwd,
                                              x2d, xa, dy, q, absmax, a, b_mat, scale, p,
                                              torch.tensor([seed], dtype=torch.int64), bs, chunk, need_x,
                                              need_a, need_b)
        return dx if need_x else None, da if need_a else None, db if need_b else None
    from peftfast.ops import lora as L

    impl = _lora_impl(backend)
    r = a.shape[0]
    g = impl.down(dy, b_mat.t(), r, 1, 0.0, 0, scale) if (need_x or need_a) else None
    masks: dict = {}
    dx = da = db = None
    if need_x:
        if backend == "triton":
            dx = triton_dx(dy, q, absmax, g, a, p, seed, bs, x2d.dtype)
        else:
            n, k = q.shape[0], q.shape[1] * 2
            dx = torch.empty((dy.shape[0], k), device=dy.device, dtype=dy.dtype)
            cols = _chunk_rows(k, n, chunk, bs)
            for k0 in range(0, k, cols):
                k1 = min(k, k0 + cols)
                wc = _dequantize_torch(q[:, k0 // 2:k1 // 2], absmax[:, k0 // bs:k1 // bs], bs, dy.dtype)
                dx[:, k0:k1].copy_(torch.mm(dy, wc))
            low = torch.mm(g, a)
            if p > 0:
                low.mul_(L._cached_mask(masks, seed, 0, tuple(low.shape), p, low.device, low.dtype)).mul_(1 / (1 - p))
            dx.add_(low.to(dx.dtype) if low.dtype != dx.dtype else low)
    if need_a:
        da = impl.da(x2d, g, r, p, seed, masks)
    if need_b:
        db = impl.db_mat(dy, xa, scale)
    return dx, da, db


def _expand_absmax(am, code2, scale2, offset, n, nblk):
    if code2 is None:
        return am
    return dequantize_absmax(am, code2, scale2, offset, (n, nblk))


class _NF4LoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, lbias, a, b_mat, q, am, code2, scale2, offset, scale, p, seed, bs, backend, chunk):
        k = x.shape[-1]
        x2d = x.reshape(-1, k)
        n = q.shape[0]
        absmax = _expand_absmax(am, code2, scale2, offset, n, k // bs)
        y, xa = _fwd(backend, x2d, q, absmax, bias, lbias, a, b_mat, scale, p, seed, bs, chunk)
        ctx.save_for_backward(x2d, xa, bias, lbias, a, b_mat, q, am, code2, scale2, offset)
        ctx.meta = (scale, p, seed, bs, backend, chunk, x.shape)
        return out_view(y, *x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        scale, p, seed, bs, backend, chunk, x_shape = ctx.meta
        x2d, xa, bias, lbias, a, b_mat, q, am, code2, scale2, offset = ctx.saved_tensors
        need = ctx.needs_input_grad
        n = q.shape[0]
        dy2 = dy.reshape(-1, n)
        absmax = _expand_absmax(am, code2, scale2, offset, n, x2d.shape[1] // bs)
        dx, da, db = _bwd(backend, x2d, xa, dy2, q, absmax, a, b_mat, scale, p, seed, bs, chunk, need[0], need[3],
                          need[4])
        (gb,), (glb,) = _bias_grads([dy2], _dtypes([bias]), _dtypes([lbias]), [scale], [need[1]], [need[2]])
        return (None if dx is None else dx.view(x_shape), gb, glb, da, db, *([None] * 11))


def nf4_lora_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    lora_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    block_size: int = 64,
    backend: str = "auto",
    chunk: int = 0,
    name: str = "",
) -> torch.Tensor:
    """Fused LoRA linear over an NF4 base: ``y = x Wᵀ + b + scale (dropout_p(x) Aᵀ Bᵀ + lora_bias)``.

    x [..., K] in the compute dtype; ``qweight [N, K/2]``; ``absmax`` fp32 ``[N, K/block_size]`` or the
    double-quantized ``(q2, code2, scale2, offset)``; lora_a [r, K], lora_b [N, r] (their own dtype, e.g. fp32).
    Gradients: x, lora_a, lora_b, bias, lora_bias (never W). ``chunk``: elements of W dequantized at a time on the
    CPU backends (0: 2**21).
    """
    from peftfast.ops.lora import draw_seed

    n = qweight.shape[0] if qweight.dim() == 2 else 0
    am, code2, scale2, offset = _check_args(x, qweight, absmax, block_size, lora_a, lora_b, dropout_p,
                                            name or "nf4_lora_linear")
    be = resolve_backend(backend, x.device)
    if be == "cpp" and not have_ops():
        be = "torch"  # a peftfast._C built before the NF4 ops: the ATen path keeps the same contract
    if _registered(be, x.device):
        # the registered op (C++ or ATen on CPU, Triton for CUDA): autograd registered once, the seed a tensor, so
        # torch.compile traces it as one node
        from peftfast.ops.lora import seed_tensor

        k = x.shape[-1]
        absmax_full = _expand_absmax(am, code2, scale2, offset, n, k // block_size)
        args = (x.reshape(-1, k), qweight, absmax_full, bias, lora_bias, lora_a, lora_b, float(scale),
                float(dropout_p), seed_tensor(seed, x.device, float(dropout_p)), int(block_size), int(chunk))
        y, _ = _direct.call(torch.ops.peftfast.nf4_lora_fwd.default, _nf4_setup, _nf4_backward, args, (-1, -1))
        return y.view(*x.shape[:-1], n)
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed(x.device)
    return _NF4LoRAFunction.apply(x, bias, lora_bias, lora_a, lora_b, qweight, am, code2, scale2, offset,
                                  float(scale), float(dropout_p), int(seed or 0), int(block_size), be, int(chunk))


def _backend_for(backend: str, device: torch.device) -> str:
    """What :func:`nf4_lora_linear` runs on for ``backend`` and ``device`` (an extension built before the NF4 ops:
    the ATen path, same contract)."""
    be = resolve_backend(backend, device)
    return "torch" if be == "cpp" and not have_ops() else be


def nf4_dora_weight_norm(qweight: torch.Tensor, absmax, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
                         block_size: int = 64, dtype: torch.dtype = torch.float32, backend: str = "auto",
                         chunk: int = 0) -> torch.Tensor:
    """DoRA's ``‖W_n + s·(B A)_n‖`` per output row (no gradient) for an NF4 ``W`` as the fused GEMMs see it
    (dequantized to ``dtype``, the compute dtype), a chunk of rows at a time: about ``chunk`` elements of W exist
    in ``dtype`` at once (0: 2**21 on CPU, 2**24 on CUDA), where PEFT dequantizes the whole of W and forms
    ``W + s·B A`` beside it (two ``[N, K]`` temporaries per layer and call). ``absmax``: fp32 ``[N, K/block_size]``
    or the double-quantized ``(q2, code2, scale2, offset)``."""
    from peftfast.ops.lora import dora_norm_dtype, dora_norm_from, dora_row_terms

    n, k = qweight.shape[0], qweight.shape[1] * 2
    am, code2, scale2, offset = _check_args(qweight.new_empty((0, k), dtype=dtype), qweight, absmax, block_size,
                                            lora_a, lora_b, 0.0, "nf4_dora_weight_norm")
    be = _backend_for(backend, qweight.device)
    if chunk == 0 and qweight.device.type == "cuda":
        chunk = 1 << 24  # 32 MB of bf16 at a time: a few launches per layer (PEFT forms two whole [N, K] copies)
    with torch.no_grad():
        am = _expand_absmax(am, code2, scale2, offset, n, k // block_size)
        ct = dora_norm_dtype(dtype, lora_a.dtype)
        w_sq = torch.empty((n,), dtype=ct, device=qweight.device)
        wa = torch.empty((n, lora_a.shape[0]), dtype=ct, device=qweight.device)
        rows = _chunk_rows(n, k, chunk)
        for n0 in range(0, n, rows):
            sl = slice(n0, min(n, n0 + rows))
            wc = dequantize_nf4(qweight[sl], am[sl], block_size, dtype, backend=be)
            w_sq[sl], wa[sl] = dora_row_terms(wc, lora_a, ct)
        return dora_norm_from(w_sq, wa, lora_a, lora_b, scale)


def nf4_dora_linear(x: torch.Tensor, qweight: torch.Tensor, absmax, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scale: float, magnitude: torch.Tensor, *, dropout_p: float = 0.0,
                    seed: int | torch.Tensor | None = None, block_size: int = 64, backend: str = "auto",
                    chunk: int = 0, name: str = "") -> torch.Tensor:
    """QDoRA: PEFT's DoRA linear over an NF4 base, on the fused NF4 LoRA op (no 16-bit W is ever whole).

    ``mag = m / ‖W + s·B A‖`` (the norm detached, as PEFT does; :func:`nf4_dora_weight_norm`). Without dropout
    ``y = mag ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b``: one fused NF4 LoRA call (x and the rank-r product kept) and one scaling
    (its ``[M, N]`` input kept for the magnitude's gradient), where PEFT keeps the base and LoRA outputs and the
    LoRA chain's inputs. With dropout (``x_d`` the dropped input) PEFT's ``base(x) + (mag − 1)·(x_d Wᵀ) +
    mag·s·x_d Aᵀ Bᵀ`` is ``y₁ + (mag − 1)·z_d`` with ``y₁ = x Wᵀ + b + s·x_d Aᵀ Bᵀ`` (the fused op's own dropout,
    whose mask this one replays from the same seed to form ``x_d``) and ``z_d = x_d Wᵀ + s·x_d Aᵀ Bᵀ`` (the fused
    op on ``x_d``, no dropout): two NF4 GEMMs, as PEFT's, and one ``[M, N]`` kept where PEFT keeps two.
    Shapes as :func:`nf4_lora_linear`; ``magnitude`` ``[N]``.
    """
    from peftfast.ops.lora import _dora_out, seeded_keep_mask

    where = f"peftfast: {name}: " if name else "peftfast: "
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if magnitude.shape != (n,):
        raise ValueError(f"{where}DoRA magnitude has shape {tuple(magnitude.shape)}, expected ({n},)")
    if magnitude.device != x.device:
        raise ValueError(f"{where}DoRA magnitude is on {magnitude.device}, the input on {x.device}")
    _check_args(x, qweight, absmax, block_size, lora_a, lora_b, dropout_p, name or "nf4_dora_linear")
    be = _backend_for(backend, x.device)
    norm = nf4_dora_weight_norm(qweight, absmax, lora_a, lora_b, scale, block_size=block_size, dtype=x.dtype,
                                backend=be, chunk=chunk)
    mag = magnitude / norm.to(magnitude.dtype)
    common = dict(block_size=block_size, backend=be, chunk=chunk, name=name)
    if dropout_p == 0.0:
        z = nf4_lora_linear(x, qweight, absmax, None, lora_a, lora_b, scale, **common)
        return _dora_out(z, mag, bias, x.dtype)
    x2d = x.reshape(-1, k)
    # one seed for both the fused op's mask and x_d: the registered op's tensor seed (a traced op under compile),
    # else an int for the autograd Function's path
    seed, keep = seeded_keep_mask(seed, x2d, dropout_p, be, tensor_seed=_registered(be, x.device))
    xd = x2d * keep * (1.0 / (1.0 - dropout_p))
    y1 = nf4_lora_linear(x2d, qweight, absmax, bias, lora_a, lora_b, scale, dropout_p=dropout_p, seed=seed, **common)
    z_d = nf4_lora_linear(xd, qweight, absmax, None, lora_a, lora_b, scale, **common)
    ct = torch.promote_types(y1.dtype, mag.dtype)
    y = y1.to(ct) + (mag.to(ct) - 1) * z_d
    return y.to(x.dtype).view(*x.shape[:-1], n)


def _check_args(x, qweight, absmax, block_size, lora_a, lora_b, dropout_p, name):
    """The checks of one NF4 LoRA projection (clear errors naming it); returns its absmax state's four parts."""
    from peftfast.ops.lora import MAX_RANK

    where = f"peftfast: {name}: "
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"{where}qweight must be a 2-D uint8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"{where}input has {x.shape[-1]} features, the NF4 weight {k}")
    _check_block(block_size, k, name or "nf4_lora_linear")
    if isinstance(absmax, torch.Tensor):
        am, code2, scale2, offset = absmax, None, None, None
        if am.shape != (n, k // block_size) or am.dtype != torch.float32:
            raise ValueError(f"{where}absmax must be fp32 {(n, k // block_size)}, got {am.dtype} {tuple(am.shape)}")
    else:
        am, code2, scale2, offset = absmax
    r = lora_a.shape[0]
    if not 1 <= r <= MAX_RANK or lora_a.shape != (r, k) or lora_b.shape != (n, r):
        raise ValueError(f"{where}lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} do not fit "
                         f"[r, {k}] / [{n}, r] with 1 <= r <= {MAX_RANK}")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"{where}lora_A/lora_B dtypes differ ({lora_a.dtype}, {lora_b.dtype})")
    if not x.is_floating_point():
        raise TypeError(f"{where}input must be floating point, got {x.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{where}dropout probability must be in [0, 1), got {dropout_p}")
    for t in (qweight, am, lora_a, lora_b):
        if t.device != x.device:
            raise ValueError(f"{where}tensors are on different devices ({x.device} and {t.device})")
    return am, code2, scale2, offset


_NF4_PROJ = 9  # per projection in the MLP op's flat inputs: bias, lora_bias, A, B, qweight, absmax (4 parts)


class _NF4LoRAMLPFunction(torch.autograd.Function):
    """Gated LoRA-MLP over three NF4 bases. ``flat``: per projection (gate, up, down) ``bias, lora_bias, A, B,
    qweight, absmax, code2, scale2, offset``, then the three dropout seeds (one-element int64 tensors for the
    registered ops, ints otherwise); ``meta``: per projection ``(scale, p, block_size)``."""

    @staticmethod
    def forward(ctx, x, act, meta, backend, chunk, recompute, *flat):
        from peftfast.ops.mlp import act_mul

        proj, seeds = flat[:3 * _NF4_PROJ], flat[3 * _NF4_PROJ:]
        x2d = x.reshape(-1, x.shape[-1])
        absmax = _absmaxes(proj, meta, x2d.shape[1])
        (g, xa_g), (u, xa_u) = (_nf4_proj_fwd(backend, x2d, proj, absmax, meta, seeds, i, chunk) for i in (0, 1))
        y, xa_d = _nf4_proj_fwd(backend, act_mul(g, u, act, backend), proj, absmax, meta, seeds, 2, chunk)
        tensor_seeds = [t for t in seeds if isinstance(t, torch.Tensor)]
        if recompute == "gate_up":
            ctx.save_for_backward(x2d, xa_d, *proj, *tensor_seeds)
        elif recompute == "up":
            ctx.save_for_backward(x2d, xa_g, g, xa_d, *proj, *tensor_seeds)
        else:
            ctx.save_for_backward(x2d, xa_g, xa_u, g, u, xa_d, *proj, *tensor_seeds)
        ctx.meta = (act, meta, backend, chunk, recompute, x.shape, None if tensor_seeds else seeds)
        return out_view(y, *x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from peftfast.ops.mlp import act_mul, act_mul_backward

        act, meta, backend, chunk, recompute, x_shape, int_seeds = ctx.meta
        saved = ctx.saved_tensors
        if recompute == "gate_up":
            (x2d, xa_d), rest = saved[:2], saved[2:]
        elif recompute == "up":
            (x2d, xa_g, g, xa_d), rest = saved[:4], saved[4:]
        else:
            (x2d, xa_g, xa_u, g, u, xa_d), rest = saved[:6], saved[6:]
        proj, seeds = rest[:3 * _NF4_PROJ], int_seeds or rest[3 * _NF4_PROJ:]
        absmax = _absmaxes(proj, meta, x2d.shape[1])
        if recompute == "gate_up":
            (g, xa_g), (u, xa_u) = (_nf4_proj_fwd(backend, x2d, proj, absmax, meta, seeds, i, chunk) for i in (0, 1))
        elif recompute == "up":  # the up projection again, its dropout mask from the same seed (and its x·Aᵀ with it)
            u, xa_u = _nf4_proj_fwd(backend, x2d, proj, absmax, meta, seeds, 1, chunk)
        need = ctx.needs_input_grad[6:]
        h = act_mul(g, u, act, backend)  # rebuilt, never saved
        dy2 = dy.reshape(-1, dy.shape[-1])
        dh, grads_d = _nf4_proj_bwd(backend, h, xa_d, dy2, proj, absmax, meta, seeds, 2, chunk, True, need)
        del h
        dg, du = act_mul_backward(dh, g, u, act, backend)
        del dh, g, u
        need_x = ctx.needs_input_grad[0]
        dx, grads_g = _nf4_proj_bwd(backend, x2d, xa_g, dg, proj, absmax, meta, seeds, 0, chunk, need_x, need)
        dx_u, grads_u = _nf4_proj_bwd(backend, x2d, xa_u, du, proj, absmax, meta, seeds, 1, chunk, need_x, need)
        if dx is not None:
            dx = dx.add_(dx_u).view(x_shape)
        return (dx, None, None, None, None, None, *grads_g, *grads_u, *grads_d, None, None, None)


def _registered(backend: str, device: torch.device) -> bool:
    """Whether the NF4 LoRA ops run on ``backend`` through their registered boundary (tensor seeds: no graph
    break): ``cpp``, Triton on CUDA, and the torch backend on CPU where the schemas are defined here."""
    triton = backend == "triton" and (device.type == "cuda" or torch.compiler.is_compiling())  # as LoRA's
    return backend == "cpp" or (triton and _LIB is not None) or (backend == "torch" and device.type == "cpu" and
                                                                 _ATEN_OPS)


def _absmaxes(proj, meta, k: int) -> list[torch.Tensor]:
    """The fp32 absmax [N, K/block] of gate, up and down (double-quantized ones expanded once per pass; the down
    projection's K is the gate's N)."""
    out = []
    for i in range(3):
        _, _, _, _, q, am, code2, scale2, offset = proj[i * _NF4_PROJ:(i + 1) * _NF4_PROJ]
        kk = k if i < 2 else proj[4].shape[0]
        out.append(_expand_absmax(am, code2, scale2, offset, q.shape[0], kk // meta[i][2]))
    return out


def _nf4_proj_fwd(backend, x2d, proj, absmax, meta, seeds, i, chunk):
    bias, lbias, a, b_mat, q = proj[i * _NF4_PROJ:i * _NF4_PROJ + 5]
    scale, p, bs = meta[i]
    if _registered(backend, x2d.device):
        return tuple(_direct.undifferentiated(torch.ops.peftfast.nf4_lora_fwd,
                                              x2d, q, absmax[i], bias, lbias, a, b_mat, scale, p, seeds[i], bs,
                                              chunk))
    return _fwd(backend, x2d, q, absmax[i], bias, lbias, a, b_mat, scale, p, seeds[i], bs, chunk)


def _nf4_proj_bwd(backend, x2d, xa, dy2, proj, absmax, meta, seeds, i, chunk, need_x, need):
    """(dx, grads of the projection's 9 flat inputs) of projection ``i``."""
    bias, lbias, a, b_mat, q = proj[i * _NF4_PROJ:i * _NF4_PROJ + 5]
    scale, p, bs = meta[i]
    nb, nlb, na, nbm = need[i * _NF4_PROJ:i * _NF4_PROJ + 4]
    if _registered(backend, x2d.device):
        dx, da, db = _direct.undifferentiated(torch.ops.peftfast.nf4_lora_bwd,
                                              x2d, xa, dy2, q, absmax[i], a, b_mat, scale, p, seeds[i], bs,
                                              chunk, need_x, na, nbm)
        dx, da, db = dx if need_x else None, da if na else None, db if nbm else None
    else:
        dx, da, db = _bwd(backend, x2d, xa, dy2, q, absmax[i], a, b_mat, scale, p, seeds[i], bs, chunk, need_x, na,
                          nbm)
    (gb,), (glb,) = _bias_grads([dy2], _dtypes([bias]), _dtypes([lbias]), [scale], [nb], [nlb])
    return dx, (gb, glb, da, db, *([None] * 5))


NF4Proj = tuple  # (qweight, absmax state, block_size, bias | None, lora_A, lora_B, scale, lora_bias | None, dropout_p)


def nf4_lora_mlp(x: torch.Tensor, gate: NF4Proj, up: NF4Proj, down: NF4Proj, *, act: str = "silu",
                 seeds: tuple[int | None, int | None, int | None] = (None, None, None), recompute: bool | str = False,
                 backend: str = "auto", chunk: int = 0, name: str = "") -> torch.Tensor:
    """``down(act(gate(x)) · up(x))`` with each projection a LoRA linear over an NF4 base (QLoRA's gated MLP).

    Each projection is ``(qweight, absmax, block_size, bias, lora_A, lora_B, scale, lora_bias, dropout_p)`` as
    :func:`nf4_lora_linear` takes them, run by the same kernels (no 16-bit copy of any W); dropout seeds are drawn
    in gate, up, down order when not given, as the three layers called one by one draw theirs. Saved for backward:
    x, g, u and the skinny ``drop(x)·Aᵀ`` products; never ``act(g)`` or the down projection's input
    ``h = act(g)·u``, which the layers one by one keep (2·I values per token). ``recompute="up"`` keeps g but not u
    (nor the up product): backward runs the up NF4 GEMM again with the same seed; ``"gate_up"`` (or ``True``) keeps
    neither g nor u (and no gate/up products): backward runs both gate/up NF4 GEMMs again.
    """
    from peftfast.ops.mlp import GATE_ACTS, recompute_mode

    label = name or "nf4_lora_mlp"
    if act not in GATE_ACTS:
        raise ValueError(f"peftfast: {label}: unknown gate activation {act!r}; choose one of {list(GATE_ACTS)}")
    mode = recompute_mode(recompute, label)
    be = _backend_for(backend, x.device)
    flat, meta, seed_args = _mlp_projections(x, label, (gate, up, down), seeds, be, dora=False)
    return _NF4LoRAMLPFunction.apply(x, act, tuple(meta), be, int(chunk), mode, *flat, *seed_args)


def _mlp_projections(x: torch.Tensor, label: str, projs: tuple, seeds: tuple, be: str, *, dora: bool):
    """``(flat, meta, seeds)`` of an NF4 gated-MLP op's three projections, each checked with an error naming it.
    The eighth entry of a projection is its LoRA bias, or with ``dora`` its DoRA magnitude (checked). Seeds are
    drawn in gate, up, down order where not given, as the layers one by one draw theirs: on the registered ops' path
    as traced tensor ops (no ``.item()``), else as ints."""
    from peftfast.ops.lora import draw_seed, seed_tensor

    registered = _registered(be, x.device)
    flat, meta, seed_args = [], [], []
    for what, (q, absmax, bs, bias, a, b_mat, scale, extra, p), seed in zip(("gate", "up", "down"), projs, seeds):
        k = q.shape[1] * 2 if q.dim() == 2 else 0
        xin = x if what != "down" else x.new_empty((0, k))  # only its features, dtype and device are checked
        am, code2, scale2, offset = _check_args(xin, q, absmax, bs, a, b_mat, p, f"{label} {what}")
        if dora and (extra.shape != (q.shape[0],) or extra.device != x.device):
            raise ValueError(f"peftfast: {label}: {what} DoRA magnitude has shape {tuple(extra.shape)} on "
                             f"{extra.device}, expected ({q.shape[0]},) on {x.device}")
        flat += [bias, extra, a, b_mat, q, am, code2, scale2, offset]
        if registered:
            seed_args.append(seed_tensor(seed, x.device, float(p)))
        else:
            seed_args.append(int(seed) if seed is not None else draw_seed(x.device) if p > 0.0 else 0)
        meta.append((float(scale), float(p), int(bs)))
    gate, up, down = projs
    if gate[0].shape[0] != up[0].shape[0] or down[0].shape[1] * 2 != gate[0].shape[0]:
        raise ValueError(f"peftfast: {label}: NF4 widths do not chain: gate {gate[0].shape[0]}, up {up[0].shape[0]}, "
                         f"down input {down[0].shape[1] * 2}")
    return flat, meta, seed_args


# ----------------------------------------------------------------------------------------------------------------
# QDoRA gated MLP: three DoRA projections over NF4 bases as one op
# ----------------------------------------------------------------------------------------------------------------
def _keep_mask(seed, x2d: torch.Tensor, p: float, backend: str) -> torch.Tensor:
    """The ``[M, K]`` keep-mask the NF4 LoRA op draws for ``seed`` (segment 0), regenerated."""
    from peftfast.ops.lora import regenerated_keep_masks

    return regenerated_keep_masks(seed, 1, x2d, p, backend)[0]


def _plain_fwd(backend, x2d, q, absmax, a, b_mat, scale, p, seed, bs, chunk):
    """``(x Wᵀ + s·drop(x) Aᵀ Bᵀ, drop(x) Aᵀ)`` of one NF4 projection without biases."""
    if _registered(backend, x2d.device):
        return tuple(_direct.undifferentiated(torch.ops.peftfast.nf4_lora_fwd,
                                              x2d, q, absmax, None, None, a, b_mat, scale, p, seed, bs, chunk))
    return _fwd(backend, x2d, q, absmax, None, None, a, b_mat, scale, p, seed, bs, chunk)


def _plain_bwd(backend, x2d, xa, dy, q, absmax, a, b_mat, scale, p, seed, bs, chunk, need_x, need_a, need_b):
    if _registered(backend, x2d.device):
        dx, da, db = _direct.undifferentiated(torch.ops.peftfast.nf4_lora_bwd,
                                              x2d, xa, dy, q, absmax, a, b_mat, scale, p, seed, bs, chunk,
                                              need_x, need_a, need_b)
        return dx if need_x else None, da if need_a else None, db if need_b else None
    return _bwd(backend, x2d, xa, dy, q, absmax, a, b_mat, scale, p, seed, bs, chunk, need_x, need_a, need_b)


def _qdora_proj_fwd(backend, xin, proj, absmax, mags, meta, seeds, i, chunk, dtype):
    """(out, z, xa) of DoRA projection ``i`` over NF4: ``mag ⊙ z + b`` without dropout (z = x Wᵀ + s·x Aᵀ Bᵀ), else
    PEFT's ``base(x) + (mag − 1)·x_d Wᵀ + mag·s·x_d Aᵀ Bᵀ`` as ``y₁ + b + (mag − 1)·z`` with y₁ the fused op's own
    dropout and z the fused op on the dropped input (see :func:`nf4_dora_linear`)."""
    from peftfast.ops.lora import _dora_out
    from peftfast.ops.mlp import _dora_drop_out

    bias, _, a, b_mat, q = proj[i * _NF4_PROJ:i * _NF4_PROJ + 5]
    scale, p, bs = meta[i]
    y1, xa = _plain_fwd(backend, xin, q, absmax[i], a, b_mat, scale, p, seeds[i], bs, chunk)
    if p == 0.0:
        return _dora_out(y1, mags[i], bias, dtype), y1, xa
    xd = xin * _keep_mask(seeds[i], xin, p, backend) * (1.0 / (1.0 - p))
    z, _ = _plain_fwd(backend, xd, q, absmax[i], a, b_mat, scale, 0.0, seeds[i], bs, chunk)
    return _dora_drop_out(y1, z, mags[i], bias, dtype), z, xa


def _qdora_proj_bwd(backend, xin, xa, z, dout, proj, absmax, norms, mags, meta, seeds, i, chunk, need_x, need):
    """(dx, grads of the projection's 9 flat inputs) of :func:`_qdora_proj_fwd`'s projection ``i``."""
    from peftfast.ops.mlp import _dora_drop_grads, _dora_grads, _plus

    bias, magnitude, a, b_mat, q = proj[i * _NF4_PROJ:i * _NF4_PROJ + 5]
    scale, p, bs = meta[i]
    nb, nmag, na, nbm = need[i * _NF4_PROJ:i * _NF4_PROJ + 4]
    if p == 0.0:
        dz, dmag, db = _dora_grads(dout, z, mags[i], norms[i], magnitude, bias, nmag, nb)
        dx, da, dbm = _plain_bwd(backend, xin, xa, dz, q, absmax[i], a, b_mat, scale, 0.0, seeds[i], bs, chunk,
                                 need_x, na, nbm)
        return dx, (db, dmag, da, dbm, *([None] * 5))
    dz, dmag, db = _dora_drop_grads(dout, z, mags[i], norms[i], magnitude, bias, nmag, nb)
    # y₁'s backward (its masked low-rank term), then z's on the dropped input, masked the same way
    dx, da, dbm = _plain_bwd(backend, xin, xa, dout, q, absmax[i], a, b_mat, scale, p, seeds[i], bs, chunk, need_x,
                             na, nbm)
    keep = _keep_mask(seeds[i], xin, p, backend)
    c = 1.0 / (1.0 - p)
    dxd, da2, dbm2 = _plain_bwd(backend, xin * keep * c, xa, dz, q, absmax[i], a, b_mat, scale, 0.0, seeds[i], bs,
                                chunk, need_x, na, nbm)
    if dxd is not None:
        dx = dx + (dxd * keep * c).to(dx.dtype)
    return dx, (db, dmag, _plus(da, da2), _plus(dbm, dbm2), *([None] * 5))


class _NF4DoRAMLPFunction(torch.autograd.Function):
    """QDoRA gated MLP: ``down(act(gate(x)) · up(x))``, each projection a DoRA adapter over an NF4 base. ``flat``:
    per projection ``bias, magnitude, A, B, qweight, absmax, code2, scale2, offset``, then the three seeds;
    ``meta``: per projection ``(scale, p, block_size)``. Saved: x, the rank-r products, z of each projection (for
    the magnitude's gradient; without dropout the output is rebuilt from it element-wise) and, with dropout, g and
    u; a projection that ``recompute`` drops (``"up"``: up; ``"gate_up"``: both) keeps nothing and runs again in
    backward from the same seed. ``act(g)``, h and the dropped inputs are never kept."""

    @staticmethod
    def forward(ctx, x, act, meta, backend, chunk, recompute, *flat):
        from peftfast.ops.mlp import act_mul

        proj, seeds = flat[:3 * _NF4_PROJ], flat[3 * _NF4_PROJ:]
        x2d = x.reshape(-1, x.shape[-1])
        absmax = _absmaxes(proj, meta, x2d.shape[1])
        norms = []
        for i in range(3):
            _, _, a, b_mat, q = proj[i * _NF4_PROJ:i * _NF4_PROJ + 5]
            norms.append(nf4_dora_weight_norm(q, absmax[i], a, b_mat, meta[i][0], block_size=meta[i][2],
                                              dtype=x.dtype, backend=backend, chunk=chunk))
        mags = [proj[i * _NF4_PROJ + 1] / norms[i].to(proj[i * _NF4_PROJ + 1].dtype) for i in range(3)]
        g, z_g, xa_g = _qdora_proj_fwd(backend, x2d, proj, absmax, mags, meta, seeds, 0, chunk, x.dtype)
        u, z_u, xa_u = _qdora_proj_fwd(backend, x2d, proj, absmax, mags, meta, seeds, 1, chunk, x.dtype)
        y, z_d, xa_d = _qdora_proj_fwd(backend, act_mul(g, u, act, backend), proj, absmax, mags, meta, seeds, 2,
                                       chunk, x.dtype)
        dropped = {"none": (), "up": (1,), "gate_up": (0, 1)}[recompute]
        kept = []
        for i, (out, z, xa) in enumerate(((g, z_g, xa_g), (u, z_u, xa_u))):
            if i not in dropped:
                kept += [z, xa] + ([out] if meta[i][1] > 0.0 else [])
        tensor_seeds = [t for t in seeds if isinstance(t, torch.Tensor)]
        ctx.save_for_backward(x2d, z_d, xa_d, *norms, *mags, *proj, *tensor_seeds, *kept)
        ctx.meta = (act, meta, backend, chunk, dropped, x.shape, x.dtype, None if tensor_seeds else seeds)
        return out_view(y, *x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from peftfast.ops.lora import _dora_out
        from peftfast.ops.mlp import act_mul, act_mul_backward

        act, meta, backend, chunk, dropped, x_shape, x_dtype, int_seeds = ctx.meta
        x2d, z_d, xa_d, *rest = ctx.saved_tensors
        norms, mags, rest = rest[:3], rest[3:6], rest[6:]
        proj, rest = rest[:3 * _NF4_PROJ], rest[3 * _NF4_PROJ:]
        if int_seeds is None:
            seeds, kept = rest[:3], list(rest[3:])
        else:
            seeds, kept = int_seeds, list(rest)
        absmax = _absmaxes(proj, meta, x2d.shape[1])
        gate_up = []
        for i in (0, 1):
            if i in dropped:
                gate_up.append(_qdora_proj_fwd(backend, x2d, proj, absmax, mags, meta, seeds, i, chunk, x_dtype))
                continue
            z, xa = kept.pop(0), kept.pop(0)
            out = kept.pop(0) if meta[i][1] > 0.0 else _dora_out(z, mags[i], proj[i * _NF4_PROJ], x_dtype)
            gate_up.append((out, z, xa))
        (g, z_g, xa_g), (u, z_u, xa_u) = gate_up
        need = ctx.needs_input_grad[6:]
        h = act_mul(g, u, act, backend)  # rebuilt, never saved
        dy2 = dy.reshape(-1, dy.shape[-1])
        dh, grads_d = _qdora_proj_bwd(backend, h, xa_d, z_d, dy2, proj, absmax, norms, mags, meta, seeds, 2, chunk,
                                      True, need)
        del h
        dg, du = act_mul_backward(dh, g, u, act, backend)
        del dh, g, u
        need_x = ctx.needs_input_grad[0]
        dx, grads_g = _qdora_proj_bwd(backend, x2d, xa_g, z_g, dg, proj, absmax, norms, mags, meta, seeds, 0, chunk,
                                      need_x, need)
        dx_u, grads_u = _qdora_proj_bwd(backend, x2d, xa_u, z_u, du, proj, absmax, norms, mags, meta, seeds, 1,
                                        chunk, need_x, need)
        if dx is not None:
            dx = dx.add_(dx_u).view(x_shape)
        return (dx, None, None, None, None, None, *grads_g, *grads_u, *grads_d, None, None, None)


NF4DoRAProj = tuple  # (qweight, absmax state, block_size, bias | None, lora_A, lora_B, scale, magnitude, dropout_p)


def nf4_dora_mlp(x: torch.Tensor, gate: NF4DoRAProj, up: NF4DoRAProj, down: NF4DoRAProj, *, act: str = "silu",
                 seeds: tuple = (None, None, None), recompute: bool | str = False, backend: str = "auto",
                 chunk: int = 0, name: str = "") -> torch.Tensor:
    """QDoRA's gated MLP, ``down(act(gate(x)) · up(x))`` with each projection a PEFT DoRA linear over an NF4 base
    (``(qweight, absmax, block_size, bias, lora_A, lora_B, scale, magnitude, dropout_p)``), as
    :func:`nf4_dora_linear` computes each one (the same kernels, the same dropout masks for the same seeds, drawn
    in gate, up, down order when not given), as one op: it keeps the projections' pre-scale outputs z (the
    magnitudes' gradients need them) and, with dropout, g and u, never ``act(g)``, the down input h or a dropped
    input, which the layers one by one keep (without dropout 4·I values per token fewer). ``recompute="up"`` keeps
    nothing of the up projection (backward runs it again: one NF4 GEMM, two with dropout); ``"gate_up"`` (or
    ``True``) nothing of gate and up."""
    from peftfast.ops.mlp import GATE_ACTS, recompute_mode

    label = name or "nf4_dora_mlp"
    if act not in GATE_ACTS:
        raise ValueError(f"peftfast: {label}: unknown gate activation {act!r}; choose one of {list(GATE_ACTS)}")
    mode = recompute_mode(recompute, label)
    be = _backend_for(backend, x.device)
    flat, meta, seed_args = _mlp_projections(x, label, (gate, up, down), seeds, be, dora=True)
    return _NF4DoRAMLPFunction.apply(x, act, tuple(meta), be, int(chunk), mode, *flat, *seed_args)


# ----------------------------------------------------------------------------------------------------------------
# fake kernels and autograd of the C++ ops
# ----------------------------------------------------------------------------------------------------------------
def _nf4_setup(ctx, inputs, output):
    x, qweight, absmax, bias, lora_bias, lora_a, lora_b, scale, p, seed, block_size, chunk = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], qweight, absmax, lora_a, lora_b, seed)
    ctx.meta = (scale, p, block_size, chunk, None if bias is None else bias.dtype,
                None if lora_bias is None else lora_bias.dtype)


def _nf4_backward(ctx, dy, _dxa):
    x, xa, qweight, absmax, lora_a, lora_b, seed = ctx.saved_tensors
    scale, p, block_size, chunk, bias_dtype, lbias_dtype = ctx.meta
    need = ctx.needs_input_grad
    # the kernels take dy with any strides (ATen GEMMs on CPU, strided loads in Triton)
    dx, da, db = _direct.undifferentiated(torch.ops.peftfast.nf4_lora_bwd, x, xa, dy, qweight, absmax, lora_a, lora_b,
                                                 scale, p, seed, block_size, chunk, need[0], need[5], need[6])
    (gb,), (glb,) = _bias_grads([dy], [bias_dtype], [lbias_dtype], [scale], [bias_dtype is not None and need[3]],
                                [lbias_dtype is not None and need[4]])
    return (dx if need[0] else None, None, None, gb, glb, da if need[5] else None, db if need[6] else None,
            None, None, None, None, None)


def _op_impls(backend: str):
    """The kernels of ``nf4_lora_fwd`` / ``nf4_lora_bwd`` on ``backend``'s Python path: Triton for the CUDA key, the
    torch backend for the CPU key where ``peftfast._C`` is not loaded."""

    def fwd(x, qweight, absmax, bias, lora_bias, lora_a, lora_b, scale, p, seed, block_size, chunk):
        return _fwd(backend, x, qweight, absmax, bias, lora_bias, lora_a, lora_b, scale, p, int(seed.item()),
                    block_size, chunk)

    def bwd(x, xa, dy, qweight, absmax, lora_a, lora_b, scale, p, seed, block_size, chunk, need_x, need_a, need_b):
        dx, da, db = _bwd(backend, x, xa, dy, qweight, absmax, lora_a, lora_b, scale, p, int(seed.item()),
                          block_size, chunk, need_x, need_a, need_b)
        return (dx if dx is not None else x.new_empty((0,)), da if da is not None else xa.new_empty((0,)),
                db if db is not None else xa.new_empty((0,)))

    return fwd, bwd


# the schemas of csrc/ops.cpp's fused NF4 LoRA ops, for a process without peftfast._C
_SCHEMAS = (
    "nf4_lora_fwd(Tensor x, Tensor qweight, Tensor absmax, Tensor? bias, Tensor? lora_bias, Tensor lora_a, "
    "Tensor lora_b, float scale, float p, Tensor seed, int block_size, int chunk) -> (Tensor, Tensor)",
    "nf4_lora_bwd(Tensor x, Tensor xa, Tensor dy, Tensor qweight, Tensor absmax, Tensor lora_a, Tensor lora_b, "
    "float scale, float p, Tensor seed, int block_size, int chunk, bool need_x, bool need_a, bool need_b) -> "
    "(Tensor, Tensor, Tensor)",
)


def _register(cpp: bool) -> None:
    """Fake kernels and autograd of the NF4 ops, and the Triton kernels for the CUDA key; ``cpp``: the C++ ops
    (quantize and dequantize too) are loaded, else only the LoRA ops' schemas, defined here."""
    lib = "peftfast::"
    if cpp:
        @torch.library.register_fake(lib + "nf4_quantize")
        def _(w, block_size):
            n, k = w.shape
            return w.new_empty((n, k // 2), dtype=torch.uint8), w.new_empty((n, k // block_size),
                                                                             dtype=torch.float32)

        @torch.library.register_fake(lib + "nf4_dequantize")
        def _(qweight, absmax, block_size, dtype):
            return qweight.new_empty((qweight.shape[0], qweight.shape[1] * 2), dtype=dtype)

    @torch.library.register_fake(lib + "nf4_lora_fwd")
    def _(x, qweight, absmax, bias, lora_bias, lora_a, lora_b, scale, p, seed, block_size, chunk):
        return x.new_empty((x.shape[0], qweight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]),
                                                                        dtype=lora_a.dtype)

    @torch.library.register_fake(lib + "nf4_lora_bwd")
    def _(x, xa, dy, qweight, absmax, lora_a, lora_b, scale, p, seed, block_size, chunk, need_x, need_a, need_b):
        dx = dy.new_empty(x.shape) if need_x else x.new_empty((0,))
        da = xa.new_empty(lora_a.shape) if need_a else xa.new_empty((0,))
        db = xa.new_empty(lora_b.shape) if need_b else xa.new_empty((0,))
        return dx, da, db

    torch.library.register_autograd(lib + "nf4_lora_fwd", _nf4_backward, setup_context=_nf4_setup)


_LIB: torch.library.Library | None = None
_ATEN_OPS = False  # the LoRA ops' schemas defined here (no peftfast._C): the torch backend is their CPU kernel
# (a loaded _C built before the NF4 ops keeps its ATen path unregistered)
if have_ops() or not _ext.available():
    _LIB, _ATEN_OPS = _library.register(_SCHEMAS, dict(zip(("nf4_lora_fwd", "nf4_lora_bwd"), _op_impls("torch"))),
                                        dict(zip(("nf4_lora_fwd", "nf4_lora_bwd"), _op_impls("triton"))))
    _register(cpp=have_ops())


__all__ = ["NF4_CODE", "dequantize_absmax", "dequantize_nf4", "double_quantize", "nf4_code", "nf4_dora_linear",
           "nf4_dora_mlp", "nf4_dora_weight_norm", "nf4_lora_linear", "nf4_lora_mlp", "quantize_nf4"]
