"""LoRA on mixture-of-experts weight stacks without the merged weight: the experts' whole gated MLP as one op.

PEFT trains the experts of transformers' MoE blocks (``MixtralExperts``, ``Qwen3MoeExperts``, ...: 3-D parameters
``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]) through ``LoraConfig(target_parameters=...)``. Its
``ParamWrapper`` parametrizes each stack as ``W + s·B·A`` for the whole forward: one new tensor the size of the
expert stack per projection and layer, which the experts' matmuls then keep for backward (1.2 GB a layer for
Qwen3-30B-A3B in bf16), and one ``baddbmm`` of E·out·r·in multiply-adds each way, whether an expert got tokens or not.

:func:`experts_lora` computes, for the rows routed to each expert ``e`` (token ``t`` with routing weight ``w``)::

    h = x_t·W_gu[e]ᵀ + s_gu·(x_t·A_gu[e]ᵀ)·B_gu[e]ᵀ          [2I]
    a = act(h[:I]) · h[I:]                                    [I]
    y_t += w · (a·W_d[e]ᵀ + s_d·(a·A_d[e]ᵀ)·B_d[e]ᵀ)          [H]

with PEFT's factor layouts read in place (``lora_A.weight`` [E·r, in] is [E, r, in]; ``lora_B.weight`` [out, r·E] is
[out, r, E]). Nothing of size E·out·in is formed. Backward keeps the input (which the caller holds anyway), the routing
and, unless ``recompute``, the gate/up output h [S, 2I] (S = tokens·top-k); with ``recompute`` it runs the gate/up
GEMMs again from x instead, so the op keeps no activation of its own beyond int routing indices. The rank-r products
are always recomputed (S·r each). The routing weights get their gradient ``Σ a·(dy·W_d + s_d·(dy·B_d)·A_d)`` without
keeping the down projection's output.

Rows are grouped by expert with one host read of the per-expert counts per call (transformers' eager experts loop
syncs the same way); the per-expert products are GEMMs on views, the gated activation runs on the backend's fused
kernel (``act_mul``). A grouped-GEMM kernel would remove the per-expert launches on GPU; see the README's gaps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def _w_t(w: torch.Tensor, e: int, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """Expert ``e``'s base weight as [in, out] in ``dtype`` (a view when it has that dtype: the stack is never cast
    whole, so autocast over fp32 stacks keeps no cast copy)."""
    return (w[e] if transposed else w[e].t()).to(dtype)


class _ExpertsLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top_k_index, top_k_weights, w_gu, a_gu, b_gu, w_d, a_d, b_d, s_gu, s_d, act, transposed,
                recompute, compute_dtype, backend, name):
        n_exp = w_gu.shape[0]
        k = top_k_index.shape[-1]
        ids = top_k_index.reshape(-1)
        ids_sorted, perm = torch.sort(ids, stable=True)
        tok = perm // k
        counts = torch.bincount(ids_sorted, minlength=n_exp).tolist()  # the one host sync
        if len(counts) > n_exp:
            raise ValueError(f"peftfast: {name}: top_k_index holds expert id {len(counts) - 1}, but there are only "
                             f"{n_exp} experts")
        w_sorted = top_k_weights.reshape(-1)[perm]
        xc = x.to(compute_dtype)
        A_gu, B_gu = _factors(a_gu, b_gu, n_exp, compute_dtype)
        A_d, B_d = _factors(a_d, b_d, n_exp, compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)
        out = torch.zeros(x.shape, device=x.device, dtype=acc)
        inter = w_d.shape[1] if transposed else w_d.shape[2]
        h_all = None if recompute else torch.empty(ids.numel(), 2 * inter, device=x.device, dtype=compute_dtype)
        s0 = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            rows = slice(s0, s0 + n)
            s0 += n
            t = tok[rows]
            xe = xc.index_select(0, t)
            h = _gate_up(xe, w_gu, A_gu, B_gu, s_gu, e, transposed)
            if h_all is not None:
                h_all[rows] = h
            a = act_mul(h[:, :inter], h[:, inter:], act, backend)
            p = a @ _w_t(w_d, e, transposed, compute_dtype)
            if A_d is not None:
                p.addmm_(a @ A_d[e].t(), B_d[e].t(), alpha=s_d)
            out.index_add_(0, t, (p * w_sorted[rows, None]).to(acc))
        ctx.meta = (counts, s_gu, s_d, act, transposed, compute_dtype, backend, inter)
        ctx.save_for_backward(x, tok, perm, w_sorted, w_gu, a_gu, b_gu, w_d, a_d, b_d, h_all)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        counts, s_gu, s_d, act, transposed, cdt, backend, inter = ctx.meta
        x, tok, perm, w_sorted, w_gu, a_gu, b_gu, w_d, a_d, b_d, h_all = ctx.saved_tensors
        need = ctx.needs_input_grad
        n_exp = w_gu.shape[0]
        A_gu, B_gu = _factors(a_gu, b_gu, n_exp, cdt)
        A_d, B_d = _factors(a_d, b_d, n_exp, cdt)
        xc, dyc = x.to(cdt), dy.to(cdt)
        wc = w_sorted.to(cdt)
        acc = torch.promote_types(cdt, torch.float32)
        dx = torch.zeros(x.shape, device=x.device, dtype=acc) if need[0] else None
        dw_sorted = torch.zeros(w_sorted.shape, device=x.device, dtype=acc) if need[2] else None
        dW_gu = torch.zeros_like(w_gu, dtype=acc) if need[3] else None
        dW_d = torch.zeros_like(w_d, dtype=acc) if need[6] else None
        lora_gu = A_gu is not None and (need[4] or need[5])
        lora_d = A_d is not None and (need[7] or need[8])
        dA_gu = torch.zeros(A_gu.shape, device=x.device, dtype=acc) if lora_gu else None
        dB_gu = torch.zeros(B_gu.shape, device=x.device, dtype=acc) if lora_gu else None
        dA_d = torch.zeros(A_d.shape, device=x.device, dtype=acc) if lora_d else None
        dB_d = torch.zeros(B_d.shape, device=x.device, dtype=acc) if lora_d else None
        s0 = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            rows = slice(s0, s0 + n)
            s0 += n
            t = tok[rows]
            xe = xc.index_select(0, t)
            h = _gate_up(xe, w_gu, A_gu, B_gu, s_gu, e, transposed) if h_all is None else h_all[rows]
            g, u = h[:, :inter], h[:, inter:]
            a = act_mul(g, u, act, backend)
            dye = dyc.index_select(0, t)
            w_e = wc[rows, None]
            wd_t = _w_t(w_d, e, transposed, cdt)  # [I, H]
            gd = dye @ wd_t.t()
            dyb = None
            if A_d is not None:
                dyb = dye @ B_d[e]
                gd.addmm_(dyb, A_d[e], alpha=s_d)
            if dw_sorted is not None:
                dw_sorted[rows] = (a.to(acc) * gd.to(acc)).sum(-1)
            dyw = dye * w_e
            if lora_d:
                dB_d[e] = s_d * (dyw.t() @ (a @ A_d[e].t())).to(acc)
                dA_d[e] = s_d * ((dyb * w_e).t() @ a).to(acc)
            if dW_d is not None:
                dW_d[e] = (a.t() @ dyw if transposed else dyw.t() @ a).to(acc)
            dg, du = act_mul_backward(gd * w_e, g, u, act, backend)
            dh = torch.cat((dg, du), dim=-1)
            wgu_t = _w_t(w_gu, e, transposed, cdt)  # [H, 2I]
            dhb = dh @ B_gu[e] if A_gu is not None else None
            if dx is not None:
                dxe = dh @ wgu_t.t()
                if dhb is not None:
                    dxe.addmm_(dhb, A_gu[e], alpha=s_gu)
                dx.index_add_(0, t, dxe.to(acc))
            if lora_gu:
                dB_gu[e] = s_gu * (dh.t() @ (xe @ A_gu[e].t())).to(acc)
                dA_gu[e] = s_gu * (dhb.t() @ xe).to(acc)
            if dW_gu is not None:
                dW_gu[e] = (xe.t() @ dh if transposed else dh.t() @ xe).to(acc)
        d_tkw = None
        if dw_sorted is not None:
            d_tkw = torch.empty_like(dw_sorted)
            d_tkw[perm] = dw_sorted
            d_tkw = d_tkw.view(x.shape[0], -1)
        da_gu, db_gu = _raw_grads(dA_gu, dB_gu)
        da_d, db_d = _raw_grads(dA_d, dB_d)
        return (_cast(dx, x), None, _cast(d_tkw, w_sorted), _cast(dW_gu, w_gu), _cast(da_gu, a_gu),
                _cast(db_gu, b_gu), _cast(dW_d, w_d), _cast(da_d, a_d), _cast(db_d, b_d),
                None, None, None, None, None, None, None, None)


def _cast(g: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None or like is None else g.to(like.dtype)


def _gate_up(xe, w_gu, A_gu, B_gu, s_gu, e, transposed):
    h = xe @ _w_t(w_gu, e, transposed, xe.dtype)
    if A_gu is not None:
        h.addmm_(xe @ A_gu[e].t(), B_gu[e].t(), alpha=s_gu)
    return h


def experts_lora(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: ExpertStack,
                 down: ExpertStack, *, act: str = "silu", transposed: bool = False, recompute: bool = True,
                 compute_dtype: torch.dtype | None = None, backend: str = "torch",
                 name: str = "experts") -> torch.Tensor:
    """A mixture-of-experts block's experts with LoRA on their stacked weights: [T, H] -> [T, H].

    ``top_k_index`` [T, k] (expert ids in ``[0, E)``) and ``top_k_weights`` [T, k] are the router's choice, as
    transformers' experts modules take them. ``act``: one of ``silu``/``gelu``/``gelu_tanh`` applied to the first
    half of the gate/up output, times the second. Computes in ``compute_dtype`` (default the base weights' dtype;
    autocast callers pass the autocast dtype), returns ``x``'s dtype. Gradients for x, the routing weights, the LoRA
    factors and (if they require grad) the base stacks.
    """
    w_gu, w_d = gate_up.weight, down.weight
    if act not in GATE_ACTS:
        raise ValueError(f"peftfast: {name}: activation {act!r} is not one of {sorted(GATE_ACTS)}")
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
    return _ExpertsLoRAFunction.apply(
        x, top_k_index, top_k_weights, w_gu, gate_up.lora_a, gate_up.lora_b, w_d, down.lora_a, down.lora_b,
        float(gate_up.scaling), float(down.scaling), act, transposed, recompute, compute_dtype or w_gu.dtype, backend,
        name)


__all__ = ["ExpertStack", "experts_lora"]
