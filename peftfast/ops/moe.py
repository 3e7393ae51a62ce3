"""LoRA on mixture-of-experts weight stacks without the merged weight: the experts' whole gated MLP as one op.

PEFT trains the experts of transformers' MoE blocks (``MixtralExperts``, ``Qwen3MoeExperts``, ...: 3-D parameters
``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]) through ``LoraConfig(target_parameters=...)``. Its
``ParamWrapper`` parametrizes each stack as ``W + s·B·A`` for the whole forward: one new tensor the size of the
expert stack per projection and layer, which the experts' matmuls then keep for backward (1.2 GB a layer for
Qwen3-30B-A3B in bf16), and one ``baddbmm`` of E·out·r·in multiply-adds each way, whether an expert got tokens or not.

:func:`experts_lora` computes, for the rows routed to each expert ``e`` (token ``t`` with routing weight ``w``)::

    h = x_t·W_gu[e]ᵀ + s_gu·(x_t·A_gu[e]ᵀ)·B_gu[e]ᵀ (+ b_gu[e])          [2I]
    a = act(h[:I]) · h[I:]                                                [I]
    y_t += w · (a·W_d[e]ᵀ + s_d·(a·A_d[e]ᵀ)·B_d[e]ᵀ (+ b_d[e]))          [H]

or, for gpt-oss (:class:`ExpertGate`), gate and up interleaved (``h[0::2]``, ``h[1::2]``) and the clamped SwiGLU
``a = (clamp(u, ±limit) + 1) · g'·σ(alpha·g')`` with ``g' = min(g, limit)``; the expert biases are gpt-oss's too
(their gradients, where they train, are per-expert column sums; the routing weights' gradient gains ``dy·b_d``).

with PEFT's factor layouts read in place (``lora_A.weight`` [E·r, in] is [E, r, in]; ``lora_B.weight`` [out, r·E] is
[out, r, E]). Nothing of size E·out·in is formed. Backward keeps the input (which the caller holds anyway), the routing
and, unless ``recompute``, the gate/up output h [S, 2I] (S = tokens·top-k); with ``recompute`` it runs the gate/up
GEMMs again from x instead, so the op keeps no activation of its own beyond the routing weights and int sort
indices. The rank-r products are always recomputed (S·r each). The routing weights get their gradient
``Σ a·(dy·W_d + s_d·(dy·B_d)·A_d)`` without keeping the down projection's output.

Two implementations, the same saved activations and gradients:

* ``backend="triton"`` (CUDA; the interpreter on CPU): rows sorted by expert, then one grouped-GEMM launch per
  product for all experts (``peftfast.kernels.moe``), the hidden states gathered inside the kernel, the low-rank
  term in the GEMM's epilogue, per-expert factor gradients reduced by a grouped kernel. No host sync: the tile map
  is built on the device. The down projection's GEMM scales each row by its routing weight and, as dx's does,
  stores it in its token's slot, so tokens' k expert rows are then summed as one reduction, without atomics
  (deterministic) and with no scaled or scattered copy of the rows between.
* the others (``cpp``/``torch``, CPU): one host read of the per-expert row counts, then one ``torch._grouped_mm``
  per product over all experts (CPU grouped GEMMs: fp32/bf16/fp16 operands whose strides are multiples of 16 bytes,
  as real model widths give), or where that does not apply one GEMM per expert on views of the stacks, as
  transformers' eager experts loop does.

On Triton the gated activation runs in the gate/up GEMM's epilogue (``_moe_gate_up_glu_kernel``, either column
layout, any gate): the forward writes a and, only where backward keeps it, h; the backward rerun writes a and dh.
Where h is kept, backward's activation runs on the backend's fused kernel (``act_mul``) for ``act(g)·u`` on halves;
otherwise on ``peftfast.kernels.moe``'s strided element-wise kernels (Triton) or the same maths in torch ops (CPU),
reading gate and up in place at their column stride.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from peftfast.ops import _direct
from peftfast.ops._backend import interpreting
from peftfast.ops._counters import launching
from peftfast.ops.lora import _dot_precision
from peftfast.ops.mlp import GATE_ACTS, act_mul, act_mul_backward


@dataclass(frozen=True)
class ExpertStack:
    """One projection of an expert stack: the base stack and (optionally) its PEFT LoRA factors, raw layouts.

    ``weight``: [E, out, in], or [E, in, out] when the experts class stores it transposed. ``lora_a``: [E·r, in];
    ``lora_b``: [out, r·E] (PEFT's ``ParamWrapper`` layout); both None for a projection without LoRA.
    """

    weight: torch.Tensor
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scaling: float = 1.0
    bias: torch.Tensor | None = None  # [E, out] (gpt-oss), added after the low-rank term


GLU_ACTS = {**GATE_ACTS, "clamped_swiglu": 3}


@dataclass(frozen=True)
class ExpertGate:
    """How the gate/up output h [S, 2I] becomes the down projection's input a [S, I].

    ``act``: ``silu``/``gelu``/``gelu_tanh`` give ``act(g) · u``; ``clamped_swiglu`` is gpt-oss's
    ``(clamp(u, ±limit) + 1) · g' · σ(alpha · g')`` with ``g' = min(g, limit)``. ``interleaved``: gate and up
    alternate column by column (``h[:, 0::2]``, ``h[:, 1::2]``: gpt-oss) instead of ``[gate | up]`` halves.
    """

    act: str = "silu"
    interleaved: bool = False
    alpha: float = 1.702
    limit: float = 7.0


def _factors(a: torch.Tensor | None, b: torch.Tensor | None, e: int, dtype: torch.dtype):
    """PEFT's raw factors as [E, r, in] and [E, out, r] in ``dtype`` (views when they have it)."""
    if a is None:
        return None, None
    r = a.shape[0] // e
    return a.to(dtype).view(e, r, a.shape[1]), b.to(dtype).view(b.shape[0], r, e).permute(2, 0, 1)


def _raw_grads(da3: torch.Tensor | None, db3: torch.Tensor | None):
    """Gradients of the [E, r, in] / [E, out, r] views back in PEFT's raw [E·r, in] / [out, r·E] layouts."""
    if da3 is None:
        return None, None
    e, r, n_in = da3.shape
    return da3.reshape(e * r, n_in), db3.permute(1, 2, 0).reshape(db3.shape[1], r * e)


# ----------------------------------------------------------------------------------------------------------------
# grouped products over expert-sorted rows: Triton kernels (peftfast.kernels.moe; one launch each, no host sync) or
# one GEMM per expert (other backends)
# ----------------------------------------------------------------------------------------------------------------
def _block_m() -> int:
    return 16 if interpreting() else 64


def _route_triton(perm: torch.Tensor, weights: torch.Tensor, n_exp: int, sorted_ids: torch.Tensor | None = None,
                  counts: torch.Tensor | None = None) -> tuple:
    """The routing prologue (``_moe_route_kernel``, one launch, no host sync) -> (tile map, bounds [E + 1], counts
    [E], each sorted row's token and routing weight, the ids' range flag or None). ``sorted_ids``: the stably sorted
    flat expert ids (``perm`` sorts them), from which the counts are made and checked; else the given ``counts``.
    The tile map is ``(expert, first row, end row, tile count)``, its count bounded on the host by
    ``cdiv(S, BLOCK_M) + E`` (spare tiles get expert -1)."""
    from peftfast.kernels import moe as K

    s, bm, dev = perm.numel(), _block_m(), perm.device
    n_tiles = triton.cdiv(s, bm) + n_exp
    from_sorted = counts is None
    expert, row0, end = (torch.empty(n_tiles, device=dev, dtype=torch.int64) for _ in range(3))
    bounds = torch.empty(n_exp + 1, device=dev, dtype=torch.int64)
    if from_sorted:
        counts = torch.empty(n_exp, device=dev, dtype=torch.int64)
    ok = torch.empty(1, device=dev, dtype=torch.int64) if from_sorted else None
    tok = torch.empty(s, device=dev, dtype=torch.int64)
    w = weights.reshape(-1)
    w_sorted = torch.empty(s, device=dev, dtype=w.dtype)
    block_e = max(16, triton.next_power_of_2(n_exp))
    with launching("_moe_route_kernel"):
        K._moe_route_kernel[(max(1, triton.cdiv(s, _ROUTE_BLOCK_S)),)](
            sorted_ids if from_sorted else perm, counts, perm, w, tok, w_sorted, expert, row0, end, bounds,
            ok if from_sorted else bounds, s, n_exp, n_tiles, weights.shape[-1], s.bit_length() + 1,
            FROM_SORTED=from_sorted, BLOCK_M=bm, BLOCK_E=block_e, BLOCK_S=_ROUTE_BLOCK_S,
            BLOCK_T=_route_block_t(block_e), num_warps=4)
    return (expert, row0, end, n_tiles), bounds, counts, tok, w_sorted, ok


_ROUTE_BLOCK_S = 1024


def _route_block_t(block_e: int) -> int:
    """Tiles per step of the tile map: a [BLOCK_T, BLOCK_E] comparison of 4096 lanes (no spills at 512 experts)."""
    return max(1, min(64, 4096 // block_e))


def _pow2_tile(n: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


def _gemm_config(n: int, dtype: torch.dtype) -> dict:
    if interpreting():
        return dict(BLOCK_N=_pow2_tile(n, 32), BLOCK_K=32, num_warps=1, num_stages=1)
    if dtype != torch.float32:
        return dict(BLOCK_N=_pow2_tile(n, 128), BLOCK_K=64, num_warps=4, num_stages=3)
    if _dot_precision(dtype) == "ieee":  # FMA products: 64-wide tiles spill under Triton 3.6 (AOT-checked)
        return dict(BLOCK_N=_pow2_tile(n, 32), BLOCK_K=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=_pow2_tile(n, 64), BLOCK_K=32, num_warps=4, num_stages=3)


def _wgrad_config(i: int, n: int, dtype: torch.dtype) -> dict:
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_I=_pow2_tile(i, 32), BLOCK_N=_pow2_tile(n, 32), num_warps=1, num_stages=1)
    cap = 32 if dtype == torch.float32 else 64  # fp32 IEEE products (FMA) spill registers on sm_80 at 64 x 64
    return dict(BLOCK_M=32, BLOCK_I=_pow2_tile(i, cap), BLOCK_N=_pow2_tile(n, cap), num_warps=4, num_stages=3)


def _gg_triton(x: torch.Tensor, gather: torch.Tensor | None, w3: torch.Tensor, tmap, out_dtype: torch.dtype,
               lora: tuple | None = None, bias: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
               scatter: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped ``x[src]·w3[e]ᵀ (+ s·L·R3[e]ᵀ) (+ bias[e])``: w3 [E, N, K] and R3 [E, N, r] as any-strided views,
    L [S, r], bias [E, N]; each row times ``row_scale`` [S] and stored at row ``scatter[m]`` where given."""
    from peftfast.kernels import moe as K

    expert, row0, end, n_tiles = tmap
    rows = gather.numel() if gather is not None else x.shape[0]
    n, k = w3.shape[1], w3.shape[2]
    out = torch.empty(rows, n, device=x.device, dtype=out_dtype)
    if rows == 0 or n == 0:
        return out
    lo, r3, scale = lora if lora is not None else (None, None, 0.0)
    cfg = _gemm_config(n, x.dtype)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    prec = _dot_precision(x.dtype)
    with launching("_moe_grouped_gemm_kernel"):
        K._moe_grouped_gemm_kernel[(n_tiles, triton.cdiv(n, cfg["BLOCK_N"]))](
            x, x.stride(0), x.stride(1), gather if gather is not None else expert,
            w3, w3.stride(0), w3.stride(1), w3.stride(2),
            lo if lo is not None else x, *(lo.stride() if lo is not None else (0, 0)),
            r3 if r3 is not None else w3, *(r3.stride() if r3 is not None else (0, 0, 0)),
            bias if bias is not None else w3, *(bias.stride() if bias is not None else (0, 0)),
            row_scale if row_scale is not None else expert, scatter if scatter is not None else expert,
            out, out.stride(0), out.stride(1), expert, row0, end, n, k, lo.shape[1] if lo is not None else 0,
            float(scale), GATHER=gather is not None, HAS_LORA=lo is not None, HAS_BIAS=bias is not None,
            ROW_SCALE=row_scale is not None, SCATTER=scatter is not None, BLOCK_M=_block_m(), BLOCK_R=16,
            DOT_PRECISION=prec, LORA_PRECISION=prec, num_warps=warps, num_stages=stages, **cfg)
    return out


def _glu_gemm_config(i: int, dtype: torch.dtype, grad: bool = False) -> dict:
    """The fused gate/up + activation GEMM: gate and up tiles of BLOCK_N columns each, so half the plain GEMM's
    BLOCK_N keeps its registers and shared memory per stage. Chosen by AOT compiles for sm_80/sm_90 without spills:
    the backward epilogue (the activation's gradient and the routing weights' row sums beside a) takes 8 warps and
    32-deep K steps in 16-bit; fp32 ``ieee`` products (FMA, no tensor cores) take 8 warps, 16-deep K steps and two
    stages (smaller choices still spill a few bytes under Triton 3.6 or 3.8)."""
    if interpreting():
        return dict(BLOCK_N=_pow2_tile(i, 32), BLOCK_K=32, num_warps=1, num_stages=1)
    if dtype != torch.float32:
        return dict(BLOCK_N=_pow2_tile(i, 64), BLOCK_K=32 if grad else 64, num_warps=8 if grad else 4, num_stages=3)
    if _dot_precision(dtype) == "ieee":
        return dict(BLOCK_N=_pow2_tile(i, 32), BLOCK_K=16, num_warps=8, num_stages=2)
    return dict(BLOCK_N=_pow2_tile(i, 32), BLOCK_K=32, num_warps=4, num_stages=3)


def _gate_up_glu_triton(x: torch.Tensor, gather: torch.Tensor | None, w3: torch.Tensor, tmap, gate: tuple,
                        lora: tuple | None, bias: torch.Tensor | None, keep_h: bool, grad: tuple | None = None,
                        route_grad: bool = False) -> tuple:
    """One launch: (a [S, I], h [S, 2I] where ``keep_h``) for ``a = glu(x[src]·w3[e]ᵀ + s·L·R3[e]ᵀ + bias[e])``,
    in x's dtype; with ``grad = (gd [S, I], w_sorted [S])`` it returns (a, dh) for ``da = gd·w`` instead, and with
    ``route_grad`` also ``Σ_j a·gd`` per row [S] fp32 (summed over the kernel's column blocks), else None.
    ``gate``: (act, alpha, limit, interleaved)."""
    from peftfast.kernels import moe as K

    expert, row0, end, n_tiles = tmap
    act, alpha, limit, interleaved = gate
    rows = gather.numel() if gather is not None else x.shape[0]
    two_i, k = w3.shape[1], w3.shape[2]
    inter = two_i // 2
    a = torch.empty(rows, inter, device=x.device, dtype=x.dtype)
    h = torch.empty(rows, two_i, device=x.device, dtype=x.dtype) if keep_h or grad is not None else None
    cfg = _glu_gemm_config(inter, x.dtype, grad is not None)
    route = grad is not None and route_grad
    n_blocks = triton.cdiv(inter, cfg["BLOCK_N"])
    parts = torch.empty(rows, n_blocks, device=x.device, dtype=torch.float32) if route else None  # each written once
    if rows == 0 or inter == 0:
        return a, h, parts.sum(-1) if route else None
    lo, r3, scale = lora if lora is not None else (None, None, 0.0)
    gd, w_rows = grad if grad is not None else (None, None)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    prec = _dot_precision(x.dtype)
    with launching("_moe_gate_up_glu_kernel"):
        K._moe_gate_up_glu_kernel[(n_tiles, n_blocks)](
            x, x.stride(0), x.stride(1), gather if gather is not None else expert,
            w3, w3.stride(0), w3.stride(1), w3.stride(2),
            lo if lo is not None else x, *(lo.stride() if lo is not None else (0, 0)),
            r3 if r3 is not None else w3, *(r3.stride() if r3 is not None else (0, 0, 0)),
            bias if bias is not None else w3, *(bias.stride() if bias is not None else (0, 0)),
            gd if gd is not None else a, *(gd.stride() if gd is not None else (0, 0)),
            w_rows if w_rows is not None else a, parts if route else a, *(parts.stride() if route else (0, 0)),
            a, a.stride(0), a.stride(1), h if h is not None else a, *(h.stride() if h is not None else (0, 0)),
            expert, row0, end, inter, k, lo.shape[1] if lo is not None else 0, float(scale), float(alpha),
            float(limit), GATHER=gather is not None, HAS_LORA=lo is not None, HAS_BIAS=bias is not None,
            INTERLEAVED=bool(interleaved), ACT=GLU_ACTS[act], STORE_H=keep_h and grad is None, GRAD=grad is not None,
            ROUTE_GRAD=route,
            BLOCK_M=_block_m(), BLOCK_R=16, DOT_PRECISION=prec, LORA_PRECISION=prec, num_warps=warps,
            num_stages=stages, **cfg)
    return a, h, parts.sum(-1) if route else None


def _wgrad_triton(p: torch.Tensor, q: torch.Tensor, gather: torch.Tensor | None, bounds: torch.Tensor,
                  scale: float = 1.0) -> torch.Tensor:
    """Per expert ``scale · P[rows]ᵀ · Q[src(rows)]`` -> [E, I, N] fp32 (P [S, I], Q [S or T, N])."""
    from peftfast.kernels import moe as K

    e = bounds.numel() - 1
    i, n = p.shape[1], q.shape[1]
    out = torch.empty(e, i, n, device=p.device, dtype=torch.float32)
    cfg = _wgrad_config(i, n, q.dtype)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    with launching("_moe_grouped_wgrad_kernel"):
        K._moe_grouped_wgrad_kernel[(e, triton.cdiv(i, cfg["BLOCK_I"]), triton.cdiv(n, cfg["BLOCK_N"]))](
            p, p.stride(0), p.stride(1), q, q.stride(0), q.stride(1), gather if gather is not None else bounds,
            bounds, out, out.stride(0), out.stride(1), out.stride(2), i, n, float(scale), GATHER=gather is not None,
            DOT_PRECISION=_dot_precision(q.dtype), num_warps=warps, num_stages=stages, **cfg)
    return out


_GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gmm_operand(t: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes ``t`` as it is: row- or column-major matrices, 16-byte strides."""
    if t.dtype not in _GMM_DTYPES or t.numel() == 0:
        return False
    if t.stride(-1) != 1 and t.stride(-2) != 1:
        return False
    return all(s * t.element_size() % 16 == 0 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1)


@functools.cache
def _cpu_grouped_mm() -> bool:
    """Whether this torch runs ``torch._grouped_mm`` on CPU tensors (2-D x 3-D and 2-D x 2-D with offsets)."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    try:
        a, offs = torch.ones(4, 4), torch.tensor([1, 4], dtype=torch.int32)
        return (torch.equal(fn(a, torch.ones(2, 4, 4), offs=offs), torch.full((4, 4), 4.0))
                and torch.equal(fn(a.t(), a, offs=offs)[1], torch.full((4, 4), 3.0)))
    except Exception:  # a torch without CPU grouped GEMMs: the per-expert loop
        return False


def _gmm_rhs(w3: torch.Tensor) -> torch.Tensor:
    """``w3`` [E, N, K] as grouped_mm's [E, K, N] operand. Base stacks are row- or column-major views already; a
    view that is neither, PEFT's ``lora_B`` read as [E, N, r] (expert stride 1), is copied: E·N·r elements."""
    b = w3.transpose(1, 2)
    return b if b.stride(-1) == 1 or b.stride(-2) == 1 else b.contiguous()


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None) -> torch.Tensor | None:
    """``torch._grouped_mm(a, b, offs)`` where it applies (else None: the caller loops over experts)."""
    if offs is None or a.dtype != b.dtype or not (_gmm_operand(a) and _gmm_operand(b)):
        return None
    return torch._grouped_mm(a, b, offs=offs)


def _expert_rows(counts: list[int]):
    """(expert, slice of its sorted rows) for each expert that got rows."""
    s0 = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(s0, s0 + n)
            s0 += n


def _gg_loop(x: torch.Tensor, gather: torch.Tensor | None, w3: torch.Tensor, counts: list[int],
             out_dtype: torch.dtype, lora: tuple | None = None, bias: torch.Tensor | None = None,
             offs: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`_gg_triton` as one grouped GEMM per product (``offs``: the experts' cumulative row counts, int32;
    ``ids``: each sorted row's expert), or where that does not apply one GEMM (and one low-rank update) per expert
    with rows, on views of the stacks."""
    xs = x.index_select(0, gather) if gather is not None else x
    out = _gmm(xs, _gmm_rhs(w3), offs) if offs is not None else None
    if out is not None:
        if lora is not None:
            lo, r3, scale = lora
            low = _gmm(lo, _gmm_rhs(r3), offs)
            if low is None:
                low = _gg_loop(lo, None, r3, counts, lo.dtype)
            out.add_(low, alpha=scale)
        if bias is not None:
            out.add_(bias.to(out.dtype).index_select(0, ids))
        return out.to(out_dtype)
    out = torch.empty(xs.shape[0], w3.shape[1], device=x.device, dtype=xs.dtype)
    for e, rows in _expert_rows(counts):
        if bias is not None:
            torch.addmm(bias[e].to(xs.dtype), xs[rows], w3[e].t().to(xs.dtype), out=out[rows])
        else:
            torch.mm(xs[rows], w3[e].t().to(xs.dtype), out=out[rows])
        if lora is not None:
            out[rows].addmm_(lora[0][rows], lora[1][e].t(), alpha=lora[2])
    return out.to(out_dtype)


def _wgrad_loop(p: torch.Tensor, q: torch.Tensor, gather: torch.Tensor | None, counts: list[int],
                scale: float = 1.0, offs: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`_wgrad_triton` as one grouped GEMM, or where that does not apply one GEMM per expert with rows
    (experts without rows: zeros)."""
    qs = q.index_select(0, gather) if gather is not None else q
    acc = torch.promote_types(q.dtype, torch.float32)
    out = _gmm(p.t(), qs, offs)
    if out is not None:
        out = out.to(acc)
        return out.mul_(scale) if scale != 1.0 else out
    out = torch.zeros(len(counts), p.shape[1], q.shape[1], device=p.device, dtype=acc)
    for e, rows in _expert_rows(counts):
        if qs.dtype == acc:
            torch.mm(p[rows].t().to(acc), qs[rows], out=out[e])
        else:
            out[e] = (p[rows].t().to(qs.dtype) @ qs[rows]).to(acc)
    return out.mul_(scale) if scale != 1.0 else out


class _Groups:
    """Rows sorted by expert, and the grouped products over them: the Triton kernels (their tile map built on the
    device by the routing prologue: no host sync) or, on the other backends, one GEMM per expert (the counts read on
    the host once). ``triton_tiles``: the prologue's (tile map, bounds)."""

    def __init__(self, counts: torch.Tensor, triton_tiles: tuple | None = None):
        self.triton = triton_tiles is not None
        if self.triton:
            self.tmap, self.bounds = triton_tiles
        else:
            self.counts = counts.tolist()  # the one host sync of this path
            grouped = _cpu_grouped_mm() and counts.device.type == "cpu"
            self.offs = torch.cumsum(counts, 0).to(torch.int32) if grouped else None
            self._counts_t = counts

    @classmethod
    def route(cls, top_k_weights: torch.Tensor, n_exp: int, triton_path: bool, name: str,
              top_k_index: torch.Tensor | None = None, perm: torch.Tensor | None = None,
              counts: torch.Tensor | None = None) -> tuple:
        """(groups, perm, counts, each sorted row's token, its routing weight) for the rows ``top_k_index`` [T, k]
        routes (forward: sorted here, stably, expert ids checked), or for the forward's ``perm`` and ``counts``
        (backward). Triton: the sort, then one routing-prologue launch (the ids checked on the device: a CUDA
        device-side assert carrying the message); elsewhere torch ops, the counts read on the host once."""
        k = top_k_weights.shape[-1]
        sorted_ids = None
        if perm is None:
            sorted_ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)
        if triton_path:
            tiles, bounds, counts, tok, w_sorted, ok = _route_triton(perm, top_k_weights, n_exp, sorted_ids, counts)
            if ok is not None:
                torch._assert_async(ok, f"peftfast: {name}: top_k_index holds an expert id outside [0, {n_exp})")
            return cls(counts, (tiles, bounds)), perm, counts, tok, w_sorted
        if counts is None:
            counts = cls.count(top_k_index.reshape(-1), n_exp, name)
        return cls(counts), perm, counts, perm // k, top_k_weights.reshape(-1)[perm]

    @staticmethod
    def count(ids: torch.Tensor, n_exp: int, name: str) -> torch.Tensor:
        """Rows per expert [E] int64 (the torch path), expert ids checked on the host."""
        counts = torch.bincount(ids, minlength=n_exp)
        if counts.numel() > n_exp:
            raise ValueError(f"peftfast: {name}: top_k_index holds expert id {counts.numel() - 1}, but there are only "
                             f"{n_exp} experts")
        return counts

    def rows(self, t: torch.Tensor, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tensor, gather) for the products: the kernels gather rows as they load them; the per-expert GEMMs
        read one gathered copy, made once here rather than in each product."""
        return (t, tok) if self.triton else (t.index_select(0, tok), None)

    def gg(self, x, gather, w3, out_dtype, lora=None, bias=None) -> torch.Tensor:
        if self.triton:
            return _gg_triton(x, gather, w3, self.tmap, out_dtype, lora, bias)
        return _gg_loop(x, gather, w3, self.counts, out_dtype, lora, bias, self.offs,
                        self.ids if bias is not None else None)

    @functools.cached_property
    def ids(self) -> torch.Tensor | None:
        """Each sorted row's expert (CPU grouped path), made only where biases need it."""
        return None if self.offs is None else torch.repeat_interleave(torch.arange(len(self.counts)), self._counts_t)

    def column_sums(self, q: torch.Tensor, gather: torch.Tensor | None = None,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per expert, the sum of its rows of ``q[src]`` [S, N] (each times ``weights`` [S] where given) -> [E, N]
        fp32 (a bias gradient), deterministic: on Triton the weight-gradient reduction against a column of ones
        (stride 0) or of the weights (no atomics, no [S, N] copy); on CPU an in-order ``index_add_`` over the sorted
        rows' experts (where torch has no CPU grouped GEMMs, the per-expert loop against that column)."""
        rows = gather.numel() if gather is not None else q.shape[0]
        if not self.triton and self.offs is not None:  # CPU: in order, so deterministic too
            acc = torch.promote_types(q.dtype, torch.float32)
            qs = (q.index_select(0, gather) if gather is not None else q).to(acc)
            if weights is not None:
                qs = qs * weights[:, None].to(acc)
            return torch.zeros(len(self.counts), q.shape[1], dtype=acc).index_add_(0, self.ids, qs)
        if weights is None:
            col = torch.ones(1, 1, device=q.device, dtype=q.dtype).expand(rows, 1)
        else:
            col = weights[:, None].to(q.dtype)
        return self.wgrad(col, q, gather)[:, 0]

    def gg_sum(self, x, gather, w3, acc, lora, perm, tokens: int, bias=None, row_scale=None) -> torch.Tensor:
        """:meth:`gg` (times ``row_scale`` [S] per row) summed over each token's k rows -> [T, N] in ``acc``,
        deterministic (no atomics). On Triton the GEMM scales and stores each row in its token's slot itself."""
        if self.triton:
            flat = _gg_triton(x, gather, w3, self.tmap, acc, lora, bias, row_scale, perm)
            return flat.view(tokens, -1, flat.shape[1]).sum(1)
        rows = self.gg(x, gather, w3, acc, lora, bias)
        if row_scale is not None:
            rows.mul_(row_scale[:, None].to(acc))
        return _unsort(rows, perm, tokens, acc)

    def wgrad(self, p, q, gather, scale: float = 1.0) -> torch.Tensor:
        if self.triton:
            return _wgrad_triton(p, q, gather, self.bounds, scale)
        return _wgrad_loop(p, q, gather, self.counts, scale, self.offs)


def _nk(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A base stack as [E, out, in] (a view)."""
    return w.transpose(1, 2) if transposed else w


def _unsort(rows: torch.Tensor, perm: torch.Tensor, tokens: int, acc: torch.dtype) -> torch.Tensor:
    """Sum of each token's k expert rows (in ``acc``), deterministic: no atomics."""
    flat = torch.empty(rows.shape, device=rows.device, dtype=acc)
    flat[perm] = rows.to(acc)
    return flat.view(tokens, -1, rows.shape[1]).sum(1)


# ----------------------------------------------------------------------------------------------------------------
# the gated activation: the MLP kernels' act_mul for [gate | up] halves; otherwise (interleaved columns, gpt-oss's
# clamped SwiGLU) peftfast.kernels.moe's strided kernels on Triton, the same maths in torch ops elsewhere
# ----------------------------------------------------------------------------------------------------------------
def _split(h: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    inter = h.shape[1] // 2
    return (h[:, 0::2], h[:, 1::2]) if interleaved else (h[:, :inter], h[:, inter:])


def _glu_launch(kernel: str, grid_rows: int, cols: int, *args, act: str, alpha: float, limit: float) -> None:
    from peftfast.kernels import moe as K

    block = 1024
    if grid_rows and cols:
        with launching(kernel):
            getattr(K, kernel)[(grid_rows, triton.cdiv(cols, block))](
                *args, cols, float(alpha), float(limit), ACT=GLU_ACTS[act], BLOCK=block,
                num_warps=1 if interpreting() else 4)


def _glu(h: torch.Tensor, act: str, alpha: float, limit: float, interleaved: bool, backend: str) -> torch.Tensor:
    """The down projection's input a [S, I] from h [S, 2I]."""
    g, u = _split(h, interleaved)
    if act in GATE_ACTS and not interleaved:
        return act_mul(g, u, act, backend)
    if backend == "triton":
        a = torch.empty(g.shape, device=h.device, dtype=h.dtype)
        _glu_launch("_moe_glu_fwd_kernel", g.shape[0], g.shape[1], g, *g.stride(), u, *u.stride(), a, a.stride(0),
                    act=act, alpha=alpha, limit=limit)
        return a
    if act in GATE_ACTS:
        return act_mul(g, u, act, "torch")
    # gpt-oss's own order of operations, in h's dtype, so low precision rounds as the model does
    gc = g.clamp(max=limit)
    return (u.clamp(-limit, limit) + 1) * (gc * torch.sigmoid(gc * alpha))


def _glu_backward(da: torch.Tensor, h: torch.Tensor, act: str, alpha: float, limit: float, interleaved: bool,
                  backend: str) -> torch.Tensor:
    """The gradient of h [S, 2I] (h's dtype and layout) from that of a [S, I]."""
    dh = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    g, u = _split(h, interleaved)
    dg, du = _split(dh, interleaved)
    if act in GATE_ACTS and not interleaved:
        act_mul_backward(da, g, u, act, backend, out=(dg, du))
    elif backend == "triton":
        _glu_launch("_moe_glu_bwd_kernel", g.shape[0], g.shape[1], da, da.stride(0), g, *g.stride(), u, *u.stride(),
                    dg, *dg.stride(), du, *du.stride(), act=act, alpha=alpha, limit=limit)
    elif act in GATE_ACTS:
        act_mul_backward(da, g, u, act, "torch", out=(dg, du))
    else:
        d32, g32, u32 = da.float(), g.float(), u.float()
        gc, uc = g32.clamp(max=limit), u32.clamp(-limit, limit)
        sig = torch.sigmoid(alpha * gc)
        dg.copy_(torch.where(g32 <= limit, d32 * (uc + 1) * (sig + alpha * gc * sig * (1 - sig)), 0.0))
        du.copy_(torch.where((u32 >= -limit) & (u32 <= limit), d32 * gc * sig, 0.0))
    return dh


# ----------------------------------------------------------------------------------------------------------------
# registered ops: torch.compile traces them as single nodes with their fake kernels (the per-expert host read of the
# CPU path stays inside the op); eager calls go through peftfast.ops._direct
# ----------------------------------------------------------------------------------------------------------------
_SIG = ("Tensor w_gu, Tensor? a_gu, Tensor? b_gu, Tensor? bias_gu, Tensor w_d, Tensor? a_d, Tensor? b_d, "
        "Tensor? bias_d, float s_gu, float s_d, str act, float alpha, float limit, bool interleaved, bool transposed, "
        "ScalarType cdt, str backend, str name")
_N_META = 10  # the floats/strs/bools of _SIG, from s_gu on


@torch.library.custom_op("peftfast::moe_experts_fwd", mutates_args=(),
                         schema=f"(Tensor x, Tensor top_k_index, Tensor top_k_weights, {_SIG}, bool keep_h) "
                                "-> (Tensor, Tensor, Tensor, Tensor)")
def _fwd_op(x, top_k_index, top_k_weights, w_gu, a_gu, b_gu, bias_gu, w_d, a_d, b_d, bias_d, s_gu, s_d, act, alpha,
            limit, interleaved, transposed, cdt, backend, name, keep_h):
    """(y [T, H], perm [S], rows per expert [E], h [S, 2I] where ``keep_h``, else empty): backward reuses the
    sort and the counts."""
    n_exp = w_gu.shape[0]
    grp, perm, counts, tok, w_sorted = _Groups.route(top_k_weights, n_exp, backend == "triton", name, top_k_index)
    acc = torch.promote_types(cdt, torch.float32)
    A_gu, B_gu = _factors(a_gu, b_gu, n_exp, cdt)
    A_d, B_d = _factors(a_d, b_d, n_exp, cdt)
    xs, x_gather = grp.rows(x.to(cdt), tok)
    xa = grp.gg(xs, x_gather, A_gu, cdt) if A_gu is not None else None  # x·A_guᵀ [S, r]
    if grp.triton:  # the activation in the GEMM's epilogue: h is written only if backward keeps it
        a, h, _ = _gate_up_glu(grp, xs, x_gather, w_gu, xa, B_gu, s_gu, bias_gu, transposed, cdt,
                               (act, alpha, limit, interleaved), keep_h)
    else:
        h = _gate_up(grp, xs, x_gather, w_gu, xa, B_gu, s_gu, bias_gu, transposed, cdt)
        a = _glu(h, act, alpha, limit, interleaved, backend)
    lora_d = (grp.gg(a, None, A_d, cdt), B_d, s_d) if A_d is not None else None
    out = grp.gg_sum(a, None, _nk(w_d, transposed), acc, lora_d, perm, x.shape[0], bias_d, w_sorted)
    return out.to(x.dtype), perm, counts, h if keep_h else a.new_empty((0,))


@_fwd_op.register_fake
def _(x, top_k_index, top_k_weights, w_gu, a_gu, b_gu, bias_gu, w_d, a_d, b_d, bias_d, s_gu, s_d, act, alpha, limit,
      interleaved, transposed, cdt, backend, name, keep_h):
    s = top_k_index.numel()
    two_i = w_gu.shape[2] if transposed else w_gu.shape[1]
    return (x.new_empty(x.shape), top_k_index.new_empty((s,)), top_k_index.new_empty((w_gu.shape[0],)),
            x.new_empty((s, two_i) if keep_h else (0,), dtype=cdt))


@torch.library.custom_op("peftfast::moe_experts_bwd", mutates_args=(),
                         schema=f"(Tensor dy, Tensor x, Tensor perm, Tensor counts, Tensor top_k_weights, "
                                f"{_SIG}, Tensor h, bool[] needs) "
                                "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _bwd_op(dy, x, perm, counts, top_k_weights, w_gu, a_gu, b_gu, bias_gu, w_d, a_d, b_d, bias_d, s_gu, s_d, act,
            alpha, limit, interleaved, transposed, cdt, backend, name, h, needs):
    """Gradients of (x, top_k_weights, w_gu, a_gu, b_gu, bias_gu, w_d, a_d, b_d, bias_d) in their dtypes; an empty
    tensor for one ``needs`` does not ask for (or an absent factor or bias)."""
    need_x, need_w, need_wgu, need_agu, need_bgu, need_cgu, need_wd, need_ad, need_bd, need_cd = needs
    n_exp = w_gu.shape[0]
    acc = torch.promote_types(cdt, torch.float32)
    grp, _, _, tok, w_sorted = _Groups.route(top_k_weights, n_exp, backend == "triton", name, perm=perm,
                                             counts=counts)
    A_gu, B_gu = _factors(a_gu, b_gu, n_exp, cdt)
    A_d, B_d = _factors(a_d, b_d, n_exp, cdt)
    xs, x_gather = grp.rows(x.to(cdt), tok)
    dys, dy_gather = grp.rows(dy.to(cdt), tok)
    # x·A_guᵀ once, for the gate/up rerun and the factor gradients
    lora_gu_grads = A_gu is not None and (need_agu or need_bgu)
    xa = grp.gg(xs, x_gather, A_gu, cdt) if A_gu is not None and (h.numel() == 0 or lora_gu_grads) else None
    # the Triton rerun of the gate/up GEMM writes a and dh from its epilogue (gd first), never h
    fused = grp.triton and h.numel() == 0
    if not fused:
        if h.numel() == 0:
            h = _gate_up(grp, xs, x_gather, w_gu, xa, B_gu, s_gu, bias_gu, transposed, cdt)
        a = _glu(h, act, alpha, limit, interleaved, backend)
    # gd = dy·W_d[e] + s_d·(dy·B_d[e])·A_d[e]: the routing weight's gradient and, times w, the activation's
    dyb = grp.gg(dys, dy_gather, B_d.transpose(1, 2), cdt) if A_d is not None else None
    lora_d = (dyb, A_d.transpose(1, 2), s_d) if A_d is not None else None
    gd = grp.gg(dys, dy_gather, _nk(w_d, transposed).transpose(1, 2), acc, lora_d)
    if fused:  # and Σ a·gd per row, the routing weights' gradient, from the same epilogue
        a, dh, dw_rows = _gate_up_glu(grp, xs, x_gather, w_gu, xa, B_gu, s_gu, bias_gu, transposed, cdt,
                                      (act, alpha, limit, interleaved), False, (gd, w_sorted), need_w)
    d_tkw = None
    if need_w:
        d_tkw = torch.empty(w_sorted.shape, device=x.device, dtype=acc)
        dw_rows = dw_rows.to(acc) if fused else (a.to(acc) * gd).sum(-1)
        if bias_d is not None:  # + dy·bias_d[e], one grouped product with an output width of 1
            dw_rows += grp.gg(dys, dy_gather, bias_d[:, None, :], acc)[:, 0]
        d_tkw[perm] = dw_rows
        d_tkw = d_tkw.view(top_k_weights.shape)
    w_col = w_sorted[:, None].to(acc)
    da_d = db_d = dw_d = dc_d = None
    lora_d_grads = A_d is not None and (need_ad or need_bd)
    if lora_d_grads or need_wd or need_cd:
        # the down projection's upstream gradient is w·dy: w goes into the other, narrower operand of each product
        # and dy is read in place (gathered by the kernels on Triton), so no [S, H] copy of dy, gathered or scaled
        if lora_d_grads:
            aw = (grp.gg(a, None, A_d, cdt).to(acc) * w_col).to(cdt)  # w·a·A_dᵀ [S, r]
            db3 = grp.wgrad(aw, dys, dy_gather, s_d).transpose(1, 2)  # [E, H, r]
            da3 = grp.wgrad((dyb.to(acc) * w_col).to(cdt), a, None, s_d)  # [E, r, I]
            da_d, db_d = _raw_grads(da3, db3)
        if need_wd:
            dw = grp.wgrad((a.to(acc) * w_col).to(cdt), dys, dy_gather)  # [E, I, H]
            dw_d = dw if transposed else dw.transpose(1, 2)
        if need_cd:
            dc_d = grp.column_sums(dys, dy_gather, w_sorted)
    if not fused:
        dh = _glu_backward(gd.mul_(w_col).to(cdt), h, act, alpha, limit, interleaved, backend)  # gd: ours
    dhb = grp.gg(dh, None, B_gu.transpose(1, 2), cdt) if A_gu is not None else None
    dx = None
    if need_x:
        lora_gu = (dhb, A_gu.transpose(1, 2), s_gu) if A_gu is not None else None
        dx = grp.gg_sum(dh, None, _nk(w_gu, transposed).transpose(1, 2), acc, lora_gu, perm, x.shape[0])
    da_gu = db_gu = dw_gu = None
    if lora_gu_grads:
        db3 = grp.wgrad(dh, xa, None, s_gu)  # [E, 2I, r]
        da3 = grp.wgrad(dhb, xs, x_gather, s_gu)  # [E, r, H]
        da_gu, db_gu = _raw_grads(da3, db3)
    if need_wgu:
        dw = grp.wgrad(dh, xs, x_gather)  # [E, 2I, H]
        dw_gu = dw.transpose(1, 2) if transposed else dw
    dc_gu = grp.column_sums(dh) if need_cgu else None
    grads = (dx, d_tkw, dw_gu, da_gu, db_gu, dc_gu, dw_d, da_d, db_d, dc_d)
    likes = (x, top_k_weights, w_gu, a_gu, b_gu, bias_gu, w_d, a_d, b_d, bias_d)
    return tuple(g.to(like.dtype) if g is not None and like is not None else x.new_empty((0,))
                 for g, like in zip(grads, likes))


@_bwd_op.register_fake
def _(dy, x, perm, counts, top_k_weights, w_gu, a_gu, b_gu, bias_gu, w_d, a_d, b_d, bias_d, s_gu, s_d, act, alpha,
      limit, interleaved, transposed, cdt, backend, name, h, needs):
    likes = (x, top_k_weights, w_gu, a_gu, b_gu, bias_gu, w_d, a_d, b_d, bias_d)
    return tuple(like.new_empty(like.shape) if need and like is not None else x.new_empty((0,))
                 for need, like in zip(needs, likes))


_GRAD_INPUTS = (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)  # x, top_k_weights, then the 8 stack tensors: what backward serves


def _setup(ctx, inputs, output) -> None:
    x, top_k_index, top_k_weights, *stacks = inputs[:11]
    _, perm, counts, h = output
    ctx.save_for_backward(x, perm, counts, top_k_weights, *stacks, h)
    ctx.meta = tuple(inputs[11:-1])
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dperm, _dcounts, _dh):
    x, perm, counts, top_k_weights, *stacks, h = ctx.saved_tensors
    present = (x, top_k_weights, *stacks)
    needs = [t is not None and bool(ctx.needs_input_grad[i]) for i, t in zip(_GRAD_INPUTS, present)]
    n_in = 11 + _N_META + 1
    if dy is None or not any(needs):
        return (None,) * n_in
    grads = _bwd_op(dy, x, perm, counts, top_k_weights, *stacks, *ctx.meta, h, needs)
    out = [None] * n_in
    for i, g, n in zip(_GRAD_INPUTS, grads, needs):
        out[i] = g if n else None
    return tuple(out)


_fwd_op.register_autograd(_backward, setup_context=_setup)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("peftfast: the MoE experts backward is not differentiable (double backward)")


_bwd_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _gate_up(grp, xs, gather, w_gu, xa, B_gu, s_gu, bias_gu, transposed, cdt):
    """h = x[src]·W_gu[e]ᵀ + s·xa·B_gu[e]ᵀ + b_gu[e] (``xa``: x·A_guᵀ, or None without LoRA)."""
    lora = (xa, B_gu, s_gu) if xa is not None else None
    return grp.gg(xs, gather, _nk(w_gu, transposed), cdt, lora, bias_gu)


def _gate_up_glu(grp, xs, gather, w_gu, xa, B_gu, s_gu, bias_gu, transposed, cdt, gate, keep_h, grad=None,
                 route_grad=False):
    """Triton: :func:`_gate_up` and the activation as one launch."""
    lora = (xa, B_gu, s_gu) if xa is not None else None
    return _gate_up_glu_triton(xs, gather, _nk(w_gu, transposed), grp.tmap, gate, lora, bias_gu, keep_h, grad,
                               route_grad)


def experts_lora(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: ExpertStack,
                 down: ExpertStack, *, act: str | ExpertGate = "silu", transposed: bool = False, recompute: bool = True,
                 compute_dtype: torch.dtype | None = None, backend: str = "torch",
                 name: str = "experts") -> torch.Tensor:
    """A mixture-of-experts block's experts with LoRA on their stacked weights: [T, H] -> [T, H].

    ``top_k_index`` [T, k] (expert ids in ``[0, E)``) and ``top_k_weights`` [T, k] are the router's choice, as
    transformers' experts modules take them. ``act``: a :class:`ExpertGate`, or one of ``silu``/``gelu``/``gelu_tanh``
    (``act(gate) · up`` over ``[gate | up]`` halves). Stacks may carry biases [E, out] (gpt-oss). Computes in
    ``compute_dtype`` (default the base weights' dtype; autocast callers pass the autocast dtype), returns ``x``'s
    dtype. Gradients for x, the routing weights, the LoRA factors and (if they require grad) the base stacks and
    biases.
    """
    gate = act if isinstance(act, ExpertGate) else ExpertGate(act)
    w_gu, w_d = gate_up.weight, down.weight
    if gate.act not in GLU_ACTS:
        raise ValueError(f"peftfast: {name}: activation {gate.act!r} is not one of {sorted(GLU_ACTS)}")
    if w_gu.dim() != 3 or w_d.dim() != 3 or w_gu.shape[0] != w_d.shape[0]:
        raise ValueError(f"peftfast: {name}: expert stacks must be 3-D with one expert count, got "
                         f"{tuple(w_gu.shape)} and {tuple(w_d.shape)}")
    n_exp = w_gu.shape[0]
    hid, two_i = (w_gu.shape[1], w_gu.shape[2]) if transposed else (w_gu.shape[2], w_gu.shape[1])
    inter, hid_out = (w_d.shape[1], w_d.shape[2]) if transposed else (w_d.shape[2], w_d.shape[1])
    if two_i != 2 * inter or hid_out != hid:
        raise ValueError(f"peftfast: {name}: gate_up {tuple(w_gu.shape)} and down {tuple(w_d.shape)} do not form a "
                         f"gated MLP (hidden {hid}, intermediate {inter}, transposed={transposed})")
    if x.dim() != 2 or x.shape[1] != hid:
        raise ValueError(f"peftfast: {name}: input must be [tokens, {hid}], got {tuple(x.shape)}")
    if top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2 or top_k_index.shape[0] != x.shape[0]:
        raise ValueError(f"peftfast: {name}: top_k_index {tuple(top_k_index.shape)} and top_k_weights "
                         f"{tuple(top_k_weights.shape)} must both be [{x.shape[0]}, k]")
    for label, st, n_in, n_out in (("gate_up", gate_up, hid, 2 * inter), ("down", down, inter, hid)):
        if (st.lora_a is None) != (st.lora_b is None):
            raise ValueError(f"peftfast: {name}: {label} has only one of its LoRA factors")
        if st.lora_a is not None:
            r_a, r_b = st.lora_a.shape[0], st.lora_b.shape[1]
            if r_a != r_b or r_a % n_exp or st.lora_a.shape[1] != n_in or st.lora_b.shape[0] != n_out:
                raise ValueError(f"peftfast: {name}: {label} LoRA factors {tuple(st.lora_a.shape)} / "
                                 f"{tuple(st.lora_b.shape)} do not fit {n_exp} experts of {n_in} -> {n_out}")
        if st.bias is not None and tuple(st.bias.shape) != (n_exp, n_out):
            raise ValueError(f"peftfast: {name}: {label} bias has shape {tuple(st.bias.shape)}, expected "
                             f"{(n_exp, n_out)}")
    args = (x, top_k_index, top_k_weights, w_gu, gate_up.lora_a, gate_up.lora_b, gate_up.bias, w_d, down.lora_a,
            down.lora_b, down.bias, float(gate_up.scaling), float(down.scaling), gate.act, float(gate.alpha),
            float(gate.limit), bool(gate.interleaved), transposed, compute_dtype or w_gu.dtype, backend, name,
            not recompute)
    return _direct.call(torch.ops.peftfast.moe_experts_fwd.default, _setup, _backward, args, (-1, -1, -1, -1))[0]


__all__ = ["ExpertGate", "ExpertStack", "experts_lora"]
