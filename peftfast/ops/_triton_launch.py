"""Launchers for ``peftfast.kernels.lora``: tile configs, autotuning on GPUs, fixed tiles in the interpreter.

Configs are chosen so that every one fits the shared memory of sm_80 (163 KB) and sm_90 (227 KB) in 16-bit
dtypes; fp32 inputs prune the configs that would not fit. ``tests/test_lora_aot.py`` compiles each of them for
both architectures. Autotune keys leave out M (tokens), which changes with every padded batch.
"""

from __future__ import annotations

import functools

import torch
import triton

from peftfast.kernels import lora as K
from peftfast.ops._backend import interpreting
from peftfast.ops._counters import launching


def _cfg(num_warps: int, num_stages: int, **kw: int) -> triton.Config:
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


GEMM_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
]
DOWN_CONFIGS = [
    _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=32, BLOCK_K=128),
]
DA_CONFIGS = [
    _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=64, BLOCK_K=128),
    _cfg(4, 3, BLOCK_M=128, BLOCK_K=64),
]
# rows per slab of the GEMM's masked low-rank epilogue: divides every BLOCK_M, and the interpreter's 32-row tiles
# still run two slabs
GEMM_SUB_M = 16
# fixed tiles for the CPU interpreter: small, so tiny test shapes still cover several programs and ragged edges
INTERP_GEMM = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
INTERP_DOWN = {"BLOCK_M": 32, "BLOCK_K": 32}
INTERP_DA = {"BLOCK_M": 32, "BLOCK_K": 32}

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def smem_estimate(cfg: triton.Config, elt_bytes: int, a_rows: str, b_cols: str | None, *, arch: int = 90,
                  main_loop: bool = True, skinny_r: int = 0, epilogue_r: int = 0, lora_elt: int = 0,
                  out_elt: int = 0) -> int:
    """Estimate of a config's shared memory in bytes, calibrated on ``metadata.shared`` of AOT compiles
    (``tests/test_lora_aot.py`` checks that it never under-estimates).

    Main loop: the pipelined A [a_rows, BLOCK_K] and B [BLOCK_K, b_cols] buffers (``b_cols=None``: the skinny
    kernels, whose B is [skinny_r = BLOCK_R, BLOCK_K]); sm_90 keeps ``num_stages`` of them, sm_8x
    ``num_stages - 1``. The GEMM's low-rank epilogue is a loop over BLOCK_R chunks that the compiler pipelines
    the same way with L [BLOCK_M, BLOCK_R] and R [BLOCK_R, BLOCK_N] tiles; it reuses the main loop's buffers,
    as does the store's layout conversion of the output tile (``out_elt`` bytes an element).
    """
    kw = cfg.kwargs
    rows = kw[a_rows]
    cols = kw[b_cols] if b_cols else skinny_r
    stages = cfg.num_stages if arch >= 90 else max(cfg.num_stages - 1, 1)
    main = (rows + cols) * kw["BLOCK_K"] * elt_bytes * stages if main_loop else 0
    epi = (rows + cols) * epilogue_r * lora_elt * stages
    return max(main, epi, rows * cols * out_elt if b_cols else 0)


def _device_smem() -> int:
    if not torch.cuda.is_available():
        return SMEM_LIMIT[80]
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT[80]))


def _device_arch() -> int:
    if not torch.cuda.is_available():
        return 80
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


# per launcher: (rows of the pipelined A tile, columns of B or None for the skinny kernels, dtype-giving argument)
_OPERANDS = {"gemm": ("BLOCK_M", "BLOCK_N", "q0_ptr"), "down": ("BLOCK_M", None, "x_ptr"),
             "da": ("BLOCK_M", None, "x_ptr")}


def launch_smem(name: str, cfg: triton.Config, named_args: dict, meta: dict, arch: int) -> int:
    """``smem_estimate`` of ``cfg`` for one launch of kernel ``name`` with these arguments and constexprs."""
    a_rows, b_cols, ptr_arg = _OPERANDS[name]
    est = dict(arch=arch, main_loop=meta.get("NUM_IN", 1) > 0, skinny_r=0 if b_cols else meta.get("BLOCK_R", 0))
    if meta.get("HAS_LORA"):
        est.update(epilogue_r=meta["BLOCK_R"], lora_elt=named_args["r_ptr"].element_size(),
                   out_elt=named_args["out_ptr"].element_size())
    return smem_estimate(cfg, named_args[ptr_arg].element_size(), a_rows, b_cols, **est)


def _prune(name: str):
    def prune(configs, named_args, **kwargs):
        limit, arch = _device_smem(), _device_arch()

        def need(c):
            return launch_smem(name, c, named_args, kwargs, arch)

        kept = [c for c in configs if need(c) <= limit]
        return kept or [min(configs, key=need)]

    return prune


@functools.cache
def _tuned(name: str):
    if name == "gemm":
        return triton.autotune(
            GEMM_CONFIGS, key=["N", "K0", "K1", "K2", "R_TOT", "NUM_IN", "HAS_DROPOUT", "ACCUMULATE"],
            prune_configs_by={"early_config_prune": _prune("gemm")},
            restore_value=["out_ptr"],
        )(K._lora_gemm_kernel)
    if name == "down":
        return triton.autotune(
            DOWN_CONFIGS, key=["K", "R_TOT", "NSEG", "HAS_DROPOUT"],
            prune_configs_by={"early_config_prune": _prune("down")},
        )(K._lora_down_kernel)
    if name == "da":
        return triton.autotune(
            DA_CONFIGS, key=["K", "R_TOT", "NSEG", "HAS_DROPOUT"],
            prune_configs_by={"early_config_prune": _prune("da")},
        )(K._lora_da_kernel)
    raise KeyError(name)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def down(x2d, a_cat, out, rank, nseg, p, seed, out_scale, block_r, precision) -> None:
    m, k = x2d.shape
    r_tot = a_cat.shape[0]
    args = (x2d, x2d.stride(0), x2d.stride(1), a_cat, a_cat.stride(0), a_cat.stride(1), out, out.stride(0),
            out.stride(1), m, k, r_tot, rank, seed, p, out_scale)
    meta = dict(NSEG=nseg, HAS_DROPOUT=p > 0.0, BLOCK_R=block_r, DOT_PRECISION=precision)
    with launching("_lora_down_kernel"):
        if interpreting():
            grid = (_cdiv(m, INTERP_DOWN["BLOCK_M"]), _cdiv(r_tot, block_r))
            K._lora_down_kernel[grid](*args, **meta, **INTERP_DOWN)
        else:
            _tuned("down")[lambda c: (_cdiv(m, c["BLOCK_M"]), _cdiv(r_tot, block_r))](*args, **meta)


def gemm(*, inputs, l, r, bias, lbias, out, l_scale, rank, nseg, p, seed, accumulate, block_r, dot_precision,  # noqa: E741
         lora_precision) -> None:
    """``out (+)= Σ P_i @ Q_i + lowrank(L, R) + bias``; ``inputs`` holds up to three (P [M, K_i], Q [K_i, N])."""
    m, n = out.shape
    dense = []
    for pmat, qmat in inputs:
        dense += [pmat, pmat.stride(0), pmat.stride(1), qmat, qmat.stride(0), qmat.stride(1), pmat.shape[1]]
    filler = [out, 0, 0, out, 0, 0, 0]
    while len(dense) < 21:
        dense += filler
    has_lora = l is not None
    lo = [l, l.stride(0), l.stride(1)] if has_lora else [out, 0, 0]
    # r is passed as [N, R] (B for the forward, A_catᵀ for dx)
    ro = [r, r.stride(0), r.stride(1)] if has_lora else [out, 0, 0]
    r_tot = l.shape[1] if has_lora else 0
    args = (*dense, *lo, *ro, bias if bias is not None else out, lbias if lbias is not None else out,
            out, out.stride(0), out.stride(1), m, n, r_tot, max(rank, 1), l_scale, seed, p,
            1.0 / (1.0 - p) if p > 0 else 1.0)
    eff_r = min(64, max(16, 1 << (max(rank if p > 0 else r_tot, 1) - 1).bit_length()))
    meta = dict(NUM_IN=len(inputs), HAS_LORA=has_lora, NSEG=max(nseg, 1), HAS_DROPOUT=has_lora and p > 0.0,
                HAS_BIAS=bias is not None, HAS_LBIAS=lbias is not None, ACCUMULATE=accumulate, BLOCK_R=eff_r,
                DOT_PRECISION=dot_precision, LORA_PRECISION=lora_precision, SUB_M=GEMM_SUB_M)
    del block_r
    with launching("_lora_gemm_kernel"):
        if interpreting():
            c = INTERP_GEMM
            K._lora_gemm_kernel[(_cdiv(m, c["BLOCK_M"]) * _cdiv(n, c["BLOCK_N"]),)](*args, **meta, **c)
        else:
            _tuned("gemm")[lambda c: (_cdiv(m, c["BLOCK_M"]) * _cdiv(n, c["BLOCK_N"]),)](*args, **meta)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def da(x2d, g, rank, nseg, p, seed, keep_extra_scale, block_r, precision) -> torch.Tensor:
    """fp32 ``[R_TOT, K] = Σ_m Gᵀ (keep ⊙ x)`` summed over deterministic row splits."""
    m, k = x2d.shape
    r_tot = g.shape[1]
    block_k = INTERP_DA["BLOCK_K"] if interpreting() else 64
    programs = _cdiv(k, block_k) * _cdiv(r_tot, block_r)
    split = max(1, min(_cdiv(m, 128), _cdiv(2 * _num_sms(x2d.device), programs)))
    rows = _cdiv(_cdiv(m, split), 128) * 128
    split = _cdiv(m, rows)
    part = torch.empty((split, r_tot, k), device=x2d.device, dtype=torch.float32)
    keep_scale = (1.0 / (1.0 - p) if p > 0 else 1.0) * keep_extra_scale
    args = (x2d, x2d.stride(0), x2d.stride(1), g, g.stride(0), g.stride(1), part, part.stride(0), part.stride(1),
            part.stride(2), m, k, r_tot, rank, rows, seed, p, keep_scale)
    meta = dict(NSEG=nseg, HAS_DROPOUT=p > 0.0, BLOCK_R=block_r, DOT_PRECISION=precision)
    with launching("_lora_da_kernel"):
        if interpreting():
            c = INTERP_DA
            K._lora_da_kernel[(_cdiv(k, c["BLOCK_K"]), split, _cdiv(r_tot, block_r))](*args, **meta, **c)
        else:
            _tuned("da")[lambda c: (_cdiv(k, c["BLOCK_K"]), split, _cdiv(r_tot, block_r))](*args, **meta)
    return part[0] if split == 1 else part.sum(0)
