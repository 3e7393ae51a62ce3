"""Kernel and op parity of the fused LoRA linear (``lora_linear`` / ``lora_linear_group``), both backends.

Every output and gradient (y, dx, d bias, d lora_bias, dA, dB) is compared with an fp64 reference computed with
plain torch ops from the same dropout keep-masks (``dropout_keep_mask`` with the same seed). backend="triton" runs
the kernels in the CPU interpreter (conftest sets TRITON_INTERPRET=1), so shapes are tiny and odd: ragged tiles,
ranks that are not powers of two, ranks spanning several rank chunks, more group members than one dx launch sums.

Low precision follows the project rule: error vs fp64 <= 2x the error plain PyTorch makes on the same inputs in
the same dtypes (PEFT's eager path) plus a small atol.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from peftfast.ops import _counters
from peftfast.ops import lora as lora_ops
from peftfast.ops.lora import MAX_RANK, dropout_keep_mask, lora_linear, lora_linear_group

BACKENDS = ["torch", "triton"]
FP32_RTOL = 1e-5
SCALES = [2.0, 0.5, 1.25, 3.0]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    x: torch.Tensor
    ws: list[torch.Tensor]
    bs: list[torch.Tensor | None]
    lbs: list[torch.Tensor | None]
    as_: list[torch.Tensor]
    bms: list[torch.Tensor]
    scales: list[float]

    @property
    def m(self) -> int:
        return self.x.numel() // self.x.shape[-1]

    def leaves(self) -> dict[str, torch.Tensor]:
        """Trainable tensors by name (``x`` only when it requires grad)."""
        named = {"x": self.x}
        for i in range(len(self.ws)):
            named.update({f"b{i}": self.bs[i], f"lb{i}": self.lbs[i], f"A{i}": self.as_[i], f"B{i}": self.bms[i]})
        return {k: t for k, t in named.items() if t is not None and t.requires_grad}


def make_case(lead: tuple[int, ...], k: int, ns: list[int], r: int, dtype: torch.dtype = torch.float32, *,
              lora_dtype: torch.dtype | None = None, bias: bool = True, lbias: bool = False,
              layout: str = "contiguous") -> Case:
    """Random inputs; ``layout`` picks how x is laid out in memory (its values do not matter)."""
    lora_dtype = lora_dtype or dtype
    if layout == "contiguous":
        x = torch.randn(*lead, k)
    elif layout == "slice":  # every other column of a wider tensor: stride (2K, 2)
        x = torch.randn(*lead, 2 * k)[..., ::2]
    elif layout == "transposed":  # column-major [M, K]
        (m,) = lead
        x = torch.randn(k, m).t()
    else:
        raise AssertionError(layout)
    x = x.to(dtype).detach().requires_grad_()
    assert x.is_contiguous() == (layout == "contiguous")
    ws = [(torch.randn(n, k) / k**0.5).to(dtype) for n in ns]
    bs = [torch.randn(n).to(dtype).requires_grad_() if bias else None for n in ns]
    lbs = [torch.randn(n).to(lora_dtype).requires_grad_() if lbias else None for n in ns]
    as_ = [(torch.randn(r, k) / k**0.5).to(lora_dtype).requires_grad_() for _ in ns]
    bms = [(torch.randn(n, r) * 0.5).to(lora_dtype).requires_grad_() for n in ns]  # non-zero B: a real LoRA term
    return Case(x, ws, bs, lbs, as_, bms, SCALES[: len(ns)])


def upstream_grads(case: Case) -> list[torch.Tensor]:
    """Random dy per member (a sum would hide transposed or mis-indexed gradients)."""
    return [torch.randn(*case.x.shape[:-1], w.shape[0]).to(case.x.dtype) for w in case.ws]


def masks_for(case: Case, p: float, seed: int, backend: str) -> torch.Tensor | None:
    if p == 0.0:
        return None
    return dropout_keep_mask(seed, len(case.ws), case.m, case.x.shape[-1], p, device=case.x.device, backend=backend)


def _collect(ys, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {f"y{i}": y.detach() for i, y in enumerate(ys)}
    out.update({f"d{name}": t.grad for name, t in leaves.items()})
    return out


def run_fused(case: Case, backend: str, p: float, seed: int | None, dys: list[torch.Tensor]) -> dict:
    """Outputs and gradients of the fused op (on the case's own tensors, so x keeps its strides)."""
    leaves = case.leaves()
    for t in leaves.values():
        t.grad = None
    ys = lora_linear_group(case.x, case.ws, case.bs, case.as_, case.bms, case.scales, lora_biases=case.lbs,
                           dropout_p=p, seed=seed, backend=backend, name="test.layer")
    torch.autograd.backward(ys, dys)
    return _collect(ys, leaves)


def peft_eager(x, ws, bs, lbs, as_, bms, scales, p, masks) -> list[torch.Tensor]:
    """The maths as PEFT's eager lora.Linear does it: base linear, x cast to the LoRA dtype, dropout as
    ``x * (keep / (1 - p))`` (ATen's dropout), ``lora_B(lora_A(x)) * s``, result cast back to x's dtype."""
    outs = []
    for i in range(len(ws)):
        y = F.linear(x, ws[i], bs[i])
        xl = x.to(as_[i].dtype)
        if p > 0.0:
            xl = xl * (masks[i].view(xl.shape).to(xl.dtype) / (1.0 - p))
        low = F.linear(F.linear(xl, as_[i]), bms[i], lbs[i])
        outs.append((y + low * scales[i]).to(x.dtype))
    return outs


def run_eager(case: Case, p: float, masks, dys, dtype: torch.dtype | None = None) -> dict:
    """``peft_eager`` on copies of the case's tensors, in ``dtype`` (fp64 reference) or in their own dtypes."""

    def cp(t):
        if t is None:
            return None
        return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)

    c = Case(cp(case.x), [cp(w) for w in case.ws], [cp(b) for b in case.bs], [cp(b) for b in case.lbs],
             [cp(a) for a in case.as_], [cp(b) for b in case.bms], case.scales)
    leaves = c.leaves()
    ys = peft_eager(c.x, c.ws, c.bs, c.lbs, c.as_, c.bms, c.scales, p, masks)
    torch.autograd.backward(ys, [d.to(ys[0].dtype) for d in dys])
    return _collect(ys, leaves)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def assert_fp32_parity(got: dict, ref: dict, rtol: float = FP32_RTOL) -> None:
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] is not None, key
        assert got[key].shape == ref[key].shape, key
        err = rel_err(got[key], ref[key])
        assert err < rtol, f"{key}: relative error {err:.3g}"


def assert_within_twice_pytorch(got: dict, eager: dict, ref: dict, atol_rel: float = 2e-4) -> None:
    """err(ours) <= 2 * err(PyTorch in the same dtypes) + atol, per output and gradient."""
    assert got.keys() == eager.keys() == ref.keys()
    for key in ref:
        assert got[key].dtype == eager[key].dtype, key
        err = (got[key].double() - ref[key]).abs().max().item()
        err_pt = (eager[key].double() - ref[key]).abs().max().item()
        atol = atol_rel * ref[key].abs().max().item()
        assert err <= 2 * err_pt + atol, f"{key}: error {err:.3g} vs PyTorch {err_pt:.3g} (atol {atol:.3g})"


# ----------------------------------------------------------------------------------------------------------------
# fp32 parity
# ----------------------------------------------------------------------------------------------------------------
PARITY_CASES = [
    # lead, K, Ns, r, p, bias, lora bias
    pytest.param((37,), 80, [96], 8, 0.0, True, True, id="37x80x96-r8"),
    pytest.param((37,), 80, [96], 8, 0.3, True, False, id="37x80x96-r8-drop"),
    pytest.param((5,), 33, [17], 3, 0.0, False, False, id="5x33x17-r3"),
    pytest.param((5,), 33, [17], 3, 0.3, False, True, id="5x33x17-r3-drop"),
    pytest.param((19,), 40, [24], 12, 0.3, True, False, id="r12-drop"),
    pytest.param((13,), 24, [20], 80, 0.0, True, True, id="r80-rank-chunks"),
    pytest.param((13,), 24, [20], 80, 0.3, False, False, id="r80-rank-chunks-drop"),
    pytest.param((2, 7), 40, [24], 8, 0.3, True, True, id="lead-dims-drop"),
    pytest.param((37,), 80, [96, 48], 8, 0.3, True, True, id="group2-drop"),
    pytest.param((37,), 80, [96, 48, 48], 8, 0.0, False, True, id="group3-qkv"),
    pytest.param((37,), 80, [96, 48, 48], 8, 0.3, True, False, id="group3-qkv-drop"),
    # a segment straddles the down kernel's 128-wide rank chunk (R_TOT = 160)
    pytest.param((11,), 24, [20, 12], 80, 0.3, True, False, id="group2-r80-drop"),
    # four members: dx needs more than one launch (three dense inputs per launch)
    pytest.param((17,), 32, [16, 24, 40, 8], 4, 0.25, True, True, id="group4-drop"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,k,ns,r,p,bias,lbias", PARITY_CASES)
def test_fp32_parity(backend, lead, k, ns, r, p, bias, lbias):
    check_fp32_parity(backend, lead, k, ns, r, p, bias, lbias)


def check_fp32_parity(backend, lead, k, ns, r, p, bias, lbias) -> None:
    """y and every gradient of the op within FP32_RTOL of the fp64 reference built with the same masks."""
    case = make_case(lead, k, ns, r, bias=bias, lbias=lbias)
    dys = upstream_grads(case)
    seed = 1234
    masks = masks_for(case, p, seed, backend)
    got = run_fused(case, backend, p, seed, dys)
    ref = run_eager(case, p, masks, dys, dtype=torch.float64)
    expected = {f"y{i}" for i in range(len(ns))} | {"dx"} | {f"d{n}" for n in case.leaves() if n != "x"}
    assert got.keys() == expected
    for i, n in enumerate(ns):
        assert got[f"y{i}"].shape == (*lead, n) and got[f"y{i}"].dtype == torch.float32
    assert got["dx"].shape == case.x.shape
    assert_fp32_parity(got, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["slice", "transposed"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp32_parity_noncontiguous_x(backend, layout, p):
    case = make_case((29,), 40, [24, 16], 8, bias=True, lbias=True, layout=layout)
    dys = upstream_grads(case)
    masks = masks_for(case, p, 77, backend)
    assert_fp32_parity(run_fused(case, backend, p, 77, dys), run_eager(case, p, masks, dys, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_parity_noncontiguous_x_with_leading_dims(backend):
    case = make_case((2, 7), 40, [24], 8, lbias=True, layout="slice")
    dys = upstream_grads(case)
    masks = masks_for(case, 0.3, 5, backend)
    assert_fp32_parity(run_fused(case, backend, 0.3, 5, dys), run_eager(case, 0.3, masks, dys, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_single_entry_point(backend):
    """``lora_linear`` (not the group entry point) with every gradient, dropout and a LoRA bias."""
    case = make_case((9,), 32, [16], 4, lbias=True)
    case.scales = [0.75]
    dys = upstream_grads(case)
    leaves = case.leaves()
    y = lora_linear(case.x, case.ws[0], case.bs[0], case.as_[0], case.bms[0], 0.75, lora_bias=case.lbs[0],
                    dropout_p=0.2, seed=3, backend=backend, name="single")
    y.backward(dys[0])
    got = _collect([y], leaves)
    assert_fp32_parity(got, run_eager(case, 0.2, masks_for(case, 0.2, 3, backend), dys, dtype=torch.float64))


@pytest.mark.parametrize("case_id", ["group3-qkv-drop", "r80-rank-chunks-drop", "group4-drop"])
def test_fp32_parity_cublas_dense_strategy(monkeypatch, case_id):
    """PEFTFAST_LORA_GEMM=cublas: dense product from torch, the Triton kernel only adds the masked low-rank term."""
    monkeypatch.setenv("PEFTFAST_LORA_GEMM", "cublas")
    (lead, k, ns, r, p, bias, lbias), = [c.values for c in PARITY_CASES if c.id == case_id]
    check_fp32_parity("triton", lead, k, ns, r, p, bias, lbias)


# ----------------------------------------------------------------------------------------------------------------
# low precision: 2x the error of plain PyTorch in the same dtype
# ----------------------------------------------------------------------------------------------------------------
# bf16 runs on the torch backend only: the Triton interpreter's tl.dot returns garbage for bf16 operands (a defect
# of the CPU interpreter, not of the kernels, which run bf16 on GPUs), so interpreter results would be meaningless.
LOW_PRECISION = [("torch", torch.float16), ("triton", torch.float16), ("torch", torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", LOW_PRECISION)
@pytest.mark.parametrize(
    "lead,k,ns,r,p",
    [
        pytest.param((37,), 80, [96], 8, 0.0, id="single"),
        pytest.param((37,), 80, [96, 48, 48], 8, 0.3, id="qkv-drop"),
        pytest.param((17,), 32, [16, 24, 40, 8], 12, 0.25, id="group4-r12-drop"),
        pytest.param((13,), 24, [20], 80, 0.3, id="r80-drop"),
    ],
)
def test_low_precision_within_twice_pytorch_error(backend, dtype, lead, k, ns, r, p):
    case = make_case(lead, k, ns, r, dtype, bias=True, lbias=True)
    dys = upstream_grads(case)
    masks = masks_for(case, p, 99, backend)
    got = run_fused(case, backend, p, 99, dys)
    for key, t in got.items():
        assert t.dtype == dtype, key
    assert_within_twice_pytorch(got, run_eager(case, p, masks, dys), run_eager(case, p, masks, dys, torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp32_lora_over_fp16_base(backend, p):
    """PEFT keeps LoRA weights in fp32 over a half-precision base: x is cast to fp32 for the LoRA branch and the
    result comes back in x's dtype; LoRA gradients stay fp32."""
    case = make_case((37,), 80, [96, 48], 8, torch.float16, lora_dtype=torch.float32, bias=True, lbias=True)
    dys = upstream_grads(case)
    masks = masks_for(case, p, 11, backend)
    got = run_fused(case, backend, p, 11, dys)
    for key, t in got.items():
        want = torch.float32 if key[1:2] in ("A", "B") or key.startswith("dlb") else torch.float16
        assert t.dtype == want, (key, t.dtype)
    assert_within_twice_pytorch(got, run_eager(case, p, masks, dys), run_eager(case, p, masks, dys, torch.float64))


# ----------------------------------------------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_forward_and_backward_share_the_mask(backend):
    """dx and dA match a reference built with the forward's mask, and the mask matters (another mask is far off)."""
    case = make_case((37,), 80, [96], 8, lbias=True)
    dys = upstream_grads(case)
    p = 0.5
    got = run_fused(case, backend, p, 21, dys)
    ref = run_eager(case, p, masks_for(case, p, 21, backend), dys, dtype=torch.float64)
    wrong = run_eager(case, p, masks_for(case, p, 22, backend), dys, dtype=torch.float64)
    for key in ("y0", "dx", "dA0", "dB0"):
        assert rel_err(got[key], ref[key]) < FP32_RTOL, key
        assert rel_err(got[key], wrong[key]) > 1e-2, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_rate(backend):
    """Keep rate ~ 1 - p overall, per row and per column (no striped or constant regions), for each segment."""
    p, m, k = 0.3, 64, 512
    masks = dropout_keep_mask(7, 2, m, k, p, device="cpu", backend=backend)
    assert masks.shape == (2, m, k) and masks.dtype == torch.bool
    q = 1.0 - p
    for mask in masks.double():
        assert abs(mask.mean().item() - q) < 5 * (p * q / (m * k)) ** 0.5
        assert (mask.mean(1) - q).abs().max().item() < 5.5 * (p * q / k) ** 0.5
        assert (mask.mean(0) - q).abs().max().item() < 5.5 * (p * q / m) ** 0.5
    # independent segments disagree on ~2pq of the elements
    assert abs((masks[0] != masks[1]).double().mean().item() - 2 * p * q) < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_masks_depend_on_seed_and_segment(backend):
    a = dropout_keep_mask(1, 3, 16, 40, 0.4, device="cpu", backend=backend)
    assert torch.equal(a, dropout_keep_mask(1, 3, 16, 40, 0.4, device="cpu", backend=backend))
    b = dropout_keep_mask(2, 3, 16, 40, 0.4, device="cpu", backend=backend)
    for s in range(3):
        assert (a[s] != b[s]).double().mean() > 0.2  # another seed: another mask
    assert (a[0] != a[1]).double().mean() > 0.2 and (a[1] != a[2]).double().mean() > 0.2


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_members_get_different_masks(backend):
    """Two identical members with dropout differ (own segment each); without dropout they are bit-identical."""
    case = make_case((13,), 32, [16], 4)
    ws, bs, as_, bms = case.ws * 2, case.bs * 2, case.as_ * 2, case.bms * 2
    y0, y1 = lora_linear_group(case.x, ws, bs, as_, bms, [1.0, 1.0], dropout_p=0.5, seed=4, backend=backend)
    assert (y0 - y1).abs().max() > 1e-2
    y0, y1 = lora_linear_group(case.x, ws, bs, as_, bms, [1.0, 1.0], dropout_p=0.0, backend=backend)
    assert torch.equal(y0, y1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_seed_determinism_and_global_rng(backend):
    """Same seed twice -> identical outputs and gradients, even when the global RNG is reseeded between forward
    and backward (the backward regenerates masks from the seed); another seed -> another output."""
    case = make_case((37,), 80, [96], 8)
    dys = upstream_grads(case)
    first = run_fused(case, backend, 0.4, 5, dys)

    leaves = case.leaves()
    for t in leaves.values():
        t.grad = None
    ys = lora_linear_group(case.x, case.ws, case.bs, case.as_, case.bms, case.scales, dropout_p=0.4, seed=5,
                           backend=backend)
    torch.manual_seed(999)
    torch.rand(1000)
    torch.autograd.backward(ys, dys)
    second = _collect(ys, leaves)
    for key in first:
        assert torch.equal(first[key], second[key]), key

    other = lora_linear(case.x, case.ws[0], case.bs[0], case.as_[0], case.bms[0], case.scales[0], dropout_p=0.4,
                        seed=6, backend=backend)
    assert (other.detach() - first["y0"]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_unseeded_dropout_draws_from_torch_rng(backend):
    """seed=None draws the seed from torch's RNG: reproducible under torch.manual_seed, fresh on each call."""
    case = make_case((9,), 32, [16], 4)

    def call():
        return lora_linear(case.x, case.ws[0], case.bs[0], case.as_[0], case.bms[0], 1.0, dropout_p=0.5,
                           backend=backend).detach()

    torch.manual_seed(123)
    a, b = call(), call()
    torch.manual_seed(123)
    assert torch.equal(call(), a)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_zero_is_no_dropout(backend):
    """p=0: exactly the no-dropout maths, the seed is irrelevant and the global RNG is not touched."""
    case = make_case((19,), 40, [24, 16], 8, lbias=True)
    dys = upstream_grads(case)
    state = torch.get_rng_state()
    got = run_fused(case, backend, 0.0, None, dys)
    assert torch.equal(torch.get_rng_state(), state)
    assert_fp32_parity(got, run_eager(case, 0.0, None, dys, dtype=torch.float64))
    seeded = run_fused(case, backend, 0.0, 987, dys)
    for key in got:
        assert torch.equal(got[key], seeded[key]), key


# ----------------------------------------------------------------------------------------------------------------
# memory contract and needs_input_grad
# ----------------------------------------------------------------------------------------------------------------
def _saved_activations(case: Case, fn, backend: str) -> tuple[list[torch.Tensor], object]:
    """Tensors autograd saves while ``fn`` runs, parameters (W, A, B, biases) left out, and the one-element int64
    dropout seed that the registered ops' CPU path keeps (``tensor_seeds``: 8 bytes, not an activation) asserted
    present there and left out."""
    params = {t.data_ptr() for t in [*case.ws, *case.bs, *case.lbs, *case.as_, *case.bms] if t is not None}
    saved: list[torch.Tensor] = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    if lora_ops.tensor_seeds(backend, case.x.device):
        seeds = [t for t in saved if t.dtype == torch.int64 and t.numel() == 1]
        assert len(seeds) == 1, [(tuple(t.shape), t.dtype) for t in saved]
        saved = [t for t in saved if t is not seeds[0]]
    return saved, out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lead,layout,dtype",
    [
        ((37,), "contiguous", torch.float32),
        ((2, 7), "contiguous", torch.float32),
        ((23,), "slice", torch.float32),
        ((23,), "transposed", torch.float32),
        # fp32 LoRA over an fp16 base: PEFT's eager path would keep an fp32 copy of x; the fused op keeps x only
        ((37,), "contiguous", torch.float16),
    ],
)
def test_saved_tensors_are_x_and_xa_only(backend, lead, layout, dtype):
    """p=0.1: saved for backward are x itself (no copy, no dropout copy) and xa [M, r]; no mask, nothing M×N."""
    case = make_case(lead, 40, [48], 12, dtype, lora_dtype=torch.float32, lbias=True, layout=layout)
    m, k = case.m, 40
    saved, y = _saved_activations(case, lambda: lora_linear(
        case.x, case.ws[0], case.bs[0], case.as_[0], case.bms[0], 2.0, lora_bias=case.lbs[0], dropout_p=0.1,
        backend=backend), backend)
    assert len(saved) == 2, [(tuple(t.shape), t.dtype) for t in saved]
    xs = [t for t in saved if t.untyped_storage().data_ptr() == case.x.untyped_storage().data_ptr()]
    assert len(xs) == 1
    x_saved = xs[0]
    assert x_saved.data_ptr() == case.x.data_ptr() and x_saved.numel() == m * k and x_saved.dtype == dtype
    assert x_saved.reshape(case.x.shape).stride() == case.x.stride()  # a view of the input, same layout
    (xa,) = [t for t in saved if t is not x_saved]
    assert tuple(xa.shape) == (m, 12) and xa.dtype == case.as_[0].dtype
    y.sum().backward()  # the saved set is enough for the backward
    assert case.x.grad is not None and case.as_[0].grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_saves_x_once(backend):
    case = make_case((37,), 40, [48, 24, 24], 8)
    saved, ys = _saved_activations(case, lambda: lora_linear_group(
        case.x, case.ws, case.bs, case.as_, case.bms, case.scales, dropout_p=0.1, backend=backend), backend)
    assert len(saved) == 2, [tuple(t.shape) for t in saved]
    x_like = [t for t in saved if t.untyped_storage().data_ptr() == case.x.untyped_storage().data_ptr()]
    assert len(x_like) == 1
    (xa,) = [t for t in saved if t is not x_like[0]]
    assert tuple(xa.shape) == (37, 3 * 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dx_when_x_needs_no_grad(backend, monkeypatch):
    impl = lora_ops._IMPLS[backend]
    dx_calls = []
    real_dx = impl.dx

    def spy(*args, **kwargs):
        dx_calls.append(1)
        return real_dx(*args, **kwargs)

    monkeypatch.setattr(impl, "dx", staticmethod(spy))
    case = make_case((19,), 40, [24], 8, lbias=True)
    case.x.requires_grad_(False)
    dys = upstream_grads(case)
    with _counters.count_launches() as launches:
        got = run_fused(case, backend, 0.3, 8, dys)
    assert dx_calls == [] and case.x.grad is None and "dx" not in got
    if backend == "triton":
        assert launches["_lora_gemm_kernel"] == 1  # the forward's GEMM only: no dx GEMM
    ref = run_eager(case, 0.3, masks_for(case, 0.3, 8, backend), dys, dtype=torch.float64)
    assert_fp32_parity(got, ref)

    case.x.requires_grad_(True)
    run_fused(case, backend, 0.3, 8, dys)
    assert dx_calls == [1]  # the spy does see dx when it is needed


# ----------------------------------------------------------------------------------------------------------------
# launches
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_triton_group_forward_launches(p):
    case = make_case((9,), 32, [16, 8, 8], 4)
    with _counters.count_launches() as fwd:
        ys = lora_linear_group(case.x, case.ws, case.bs, case.as_, case.bms, case.scales, dropout_p=p,
                               backend="triton")
    assert dict(fwd) == {"_lora_down_kernel": 1, "_lora_gemm_kernel": 3}
    with _counters.count_launches() as bwd:
        torch.autograd.backward(ys, upstream_grads(case))
    assert bwd["_lora_gemm_kernel"] == 1  # dx of all three members in one launch


def test_triton_dx_of_four_members_takes_two_launches():
    case = make_case((9,), 32, [16, 8, 8, 8], 4)
    case.bs = [None] * 4
    ys = lora_linear_group(case.x, case.ws, case.bs, case.as_, case.bms, case.scales, backend="triton")
    with _counters.count_launches() as bwd:
        torch.autograd.backward(ys, upstream_grads(case))
    assert bwd["_lora_gemm_kernel"] == -(-4 // lora_ops._MAX_IN_PER_LAUNCH) == 2


def test_torch_backend_launches_no_triton_kernel():
    case = make_case((9,), 32, [16, 8], 4)
    with _counters.count_launches() as launches:
        ys = lora_linear_group(case.x, case.ws, case.bs, case.as_, case.bms, case.scales, dropout_p=0.1,
                               backend="torch")
        torch.autograd.backward(ys, upstream_grads(case))
    assert sum(launches.values()) == 0


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------
NAME = "model.layers.3.self_attn.q_proj"


def _good() -> dict:
    return {"x": torch.randn(5, 32), "w": torch.randn(16, 32), "b": torch.randn(16), "a": torch.randn(4, 32),
            "bm": torch.randn(16, 4), "p": 0.0}


@pytest.mark.parametrize(
    "change,exc,match",
    [
        pytest.param({"x": torch.randn(5, 31)}, ValueError, "31 features", id="wrong-K"),
        pytest.param({"w": torch.randn(16, 32, 1)}, ValueError, "base weight", id="3d-weight"),
        pytest.param({"a": torch.randn(4, 31)}, ValueError, "lora_A", id="A-wrong-K"),
        pytest.param({"bm": torch.randn(15, 4)}, ValueError, "lora_B", id="B-wrong-N"),
        pytest.param({"bm": torch.randn(16, 5)}, ValueError, "lora_B", id="B-wrong-rank"),
        pytest.param({"b": torch.randn(15)}, ValueError, "bias", id="bias-shape"),
        pytest.param({"x": torch.randn(5, 32, dtype=torch.float16)}, TypeError, "dtype", id="x-vs-W-dtype"),
        pytest.param({"bm": torch.randn(16, 4, dtype=torch.float64)}, TypeError, "dtype", id="A-vs-B-dtype"),
        pytest.param({"a": torch.randn(MAX_RANK + 1, 32), "bm": torch.randn(16, MAX_RANK + 1)}, ValueError,
                     f"rank {MAX_RANK + 1}", id="rank-too-big"),
        pytest.param({"p": 1.0}, ValueError, "dropout", id="p-one"),
        pytest.param({"p": 1.5}, ValueError, "dropout", id="p-above-one"),
        pytest.param({"p": -0.1}, ValueError, "dropout", id="p-negative"),
        pytest.param({"w": torch.randn(16, 32).requires_grad_()}, ValueError, "requires grad", id="trainable-W"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_module(change, exc, match, backend):
    t = {**_good(), **change}
    with pytest.raises(exc, match=match) as info:
        lora_linear(t["x"], t["w"], t["b"], t["a"], t["bm"], 1.0, dropout_p=t["p"], backend=backend, name=NAME)
    assert NAME in str(info.value)
    # without a name the error is still raised (and says where it comes from)
    with pytest.raises(exc, match=match) as info:
        lora_linear(t["x"], t["w"], t["b"], t["a"], t["bm"], 1.0, dropout_p=t["p"], backend=backend)
    assert "peftfast" in str(info.value)


def test_bad_group_member_is_named():
    t = _good()
    with pytest.raises(ValueError, match=r"lora_B 1 .*\(8, 4\)") as info:
        lora_linear_group(t["x"], [t["w"], torch.randn(8, 32)], [None, None], [t["a"], torch.randn(4, 32)],
                          [t["bm"], torch.randn(16, 4)], [1.0, 1.0], name=NAME)
    assert NAME in str(info.value)
    with pytest.raises(ValueError, match="same non-zero length"):
        lora_linear_group(t["x"], [t["w"]], [None], [t["a"]], [t["bm"]], [1.0, 2.0], name=NAME)


def test_valid_input_at_the_limits_is_accepted():
    """The checks above are not over-eager: rank MAX_RANK and p just below 1 are fine."""
    x = torch.randn(3, 8)
    y = lora_linear(x, torch.randn(4, 8), None, torch.randn(MAX_RANK, 8), torch.randn(4, MAX_RANK), 1.0,
                    dropout_p=0.99, seed=1, backend="torch")
    assert y.shape == (3, 4) and torch.isfinite(y).all()
