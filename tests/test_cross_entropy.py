"""Fused linear cross-entropy: op parity (both backends) against fp64, its memory contract, and the model-level loss
(tiny random Llama / Gemma2 / Qwen2, with and without PEFT LoRA, LoRA on lm_head included) against the unpatched
model.

backend="triton" runs the kernels in the CPU interpreter (conftest sets TRITON_INTERPRET=1), which returns garbage
for ``tl.dot`` on bf16 inputs: the Triton path is tested in fp32/fp16, bf16 on the torch backend.
"""

import copy
import inspect
import math
import pickle
import warnings

import _models as M
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from peftfast.bench import saved_activation_bytes
from peftfast.modules import cross_entropy as ce_mod
from peftfast.ops import _counters
from peftfast.ops.cross_entropy import default_chunk_size, fused_linear_cross_entropy, fused_linear_jsd
from peftfast.patching.loss import install_loss, loss_stats, uninstall_loss

BACKENDS = ["torch", "triton"]
N, H, V, R = 37, 80, 203, 8  # odd on purpose: no tile divides them


# ----------------------------------------------------------------------------------------------------------------
# op helpers
# ----------------------------------------------------------------------------------------------------------------
def _make(dtype, *, n=N, h=H, v=V, r=R, bias=False, lora=False, lora_dtype=None, train_weight=False, ignored=5):
    lora_dtype = lora_dtype or dtype
    t = {
        "hidden": torch.randn(n, h).to(dtype).requires_grad_(),
        "weight": (torch.randn(v, h) * 2 / h**0.5).to(dtype).requires_grad_(train_weight),
        "bias": (torch.randn(v) * 0.5).to(dtype).requires_grad_() if bias else None,
        "lora_A": (torch.randn(r, h) / h**0.5).to(lora_dtype).requires_grad_() if lora else None,
        "lora_B": (torch.randn(v, r) * 0.5).to(lora_dtype).requires_grad_() if lora else None,
    }
    labels = torch.randint(0, v, (n,))
    if ignored:
        labels[::ignored] = -100
    return t, labels


def _reference_loss(t, labels, *, lora_scale=1.0, label_smoothing=0.0, softcap=None, logit_scale=1.0,
                    reduction="mean", num_items_in_batch=None, dtype=torch.float64, eager_lowp=False):
    """The unfused maths: fp64 reference, or (``eager_lowp``) PyTorch's eager path in the tensors' own dtype with the
    logits upcast before the loss, as transformers does."""
    cast = (lambda x: x) if eager_lowp else (lambda x: None if x is None else x.to(dtype))
    h, w, b = cast(t["hidden"]), cast(t["weight"]), cast(t["bias"])
    z = F.linear(h, w, b)
    if t["lora_A"] is not None:
        a, bm = cast(t["lora_A"]), cast(t["lora_B"])
        z = z + lora_scale * F.linear(F.linear(h.to(a.dtype), a), bm).to(z.dtype)
    z = z.float() if eager_lowp else z
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if num_items_in_batch is not None:
        return F.cross_entropy(z, labels, label_smoothing=label_smoothing, reduction="sum") / num_items_in_batch
    return F.cross_entropy(z, labels, label_smoothing=label_smoothing, reduction=reduction)


def _grads(fn, leaves):
    for x in leaves:
        x.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [x.grad.clone() for x in leaves]


def _leaves(t):
    return [x for x in t.values() if x is not None and x.requires_grad]


def _fused(t, labels, **kw):
    return fused_linear_cross_entropy(t["hidden"], t["weight"], labels, bias=t["bias"], lora_A=t["lora_A"],
                                      lora_B=t["lora_B"], **kw)


def _ref_grads(t, labels, **kw):
    ref = {k: None if x is None else x.detach().double().requires_grad_(x.requires_grad) for k, x in t.items()}
    return _grads(lambda: _reference_loss(ref, labels, **kw), _leaves(ref))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------------------------
# op parity
# ----------------------------------------------------------------------------------------------------------------
CASES = {
    "plain": (dict(), dict()),
    "bias+lora+trainable-weight": (dict(bias=True, lora=True, train_weight=True), dict(lora_scale=2.0)),
    "smoothing+softcap+scale": (dict(bias=True, lora=True), dict(label_smoothing=0.1, softcap=3.0, logit_scale=1.7,
                                                                 lora_scale=0.5)),
    "sum": (dict(train_weight=True), dict(reduction="sum")),
    "num_items": (dict(lora=True), dict(num_items_in_batch=torch.tensor(50))),
    "num_items-int+softcap": (dict(bias=True), dict(num_items_in_batch=23, softcap=2.0)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_fp64_reference(backend, case):
    make_kw, kw = CASES[case]
    t, labels = _make(torch.float32, **make_kw)
    loss, grads = _grads(lambda: _fused(t, labels, backend=backend, chunk_size=16, **kw), _leaves(t))
    ref_loss, ref_grads = _ref_grads(t, labels, **kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6)
    for g, rg in zip(grads, ref_grads):
        assert _rel(g, rg) < 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_sizes_and_leading_dims(backend):
    t, labels = _make(torch.float32, lora=True, bias=True, n=2 * 19)
    ref_loss, ref_grads = _ref_grads(t, labels)
    for chunk in (1, 7, 38, None) if backend == "torch" else (7, 38):
        h3 = t["hidden"].view(2, 19, H)
        loss, grads = _grads(lambda: fused_linear_cross_entropy(h3, t["weight"], labels.view(2, 19), bias=t["bias"],
                                                                lora_A=t["lora_A"], lora_B=t["lora_B"],
                                                                backend=backend, chunk_size=chunk), _leaves(t))
        torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6)
        assert all(_rel(g, rg) < 2e-6 for g, rg in zip(grads, ref_grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_rank_above_the_fused_limit(backend):
    t, labels = _make(torch.float32, lora=True, r=136, n=20, v=67)
    loss, grads = _grads(lambda: _fused(t, labels, backend=backend, chunk_size=8, lora_scale=0.25), _leaves(t))
    ref_loss, ref_grads = _ref_grads(t, labels, lora_scale=0.25)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6)
    assert all(_rel(g, rg) < 2e-6 for g, rg in zip(grads, ref_grads))


@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("triton", torch.float16)])
def test_lora_only_gradients_with_frozen_input(backend, dtype):
    t, labels = _make(dtype, lora=True)
    t["hidden"].requires_grad_(False)
    _, grads = _grads(lambda: _fused(t, labels, backend=backend, chunk_size=16), _leaves(t))
    _, ref = _ref_grads(t, labels)
    assert len(grads) == 2 and all(_rel(g, r) < 1e-2 for g, r in zip(grads, ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_items", [None, torch.tensor(7)])
def test_all_ignored_matches_pytorch(backend, num_items):
    t, labels = _make(torch.float32, bias=True, n=11, ignored=0)
    labels[:] = -100
    loss, grads = _grads(lambda: _fused(t, labels, backend=backend, chunk_size=4, num_items_in_batch=num_items),
                         _leaves(t))
    ref_loss, ref_grads = _ref_grads(t, labels, num_items_in_batch=num_items)
    assert torch.isnan(ref_loss) == torch.isnan(loss)  # mean over no token: NaN; sum / num_items: 0
    if num_items is not None:
        assert loss.item() == 0.0
    for g, rg in zip(grads, ref_grads):
        assert torch.equal(g, torch.zeros_like(g)) and torch.equal(rg, torch.zeros_like(rg))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scaling_and_retain_graph(backend):
    t, labels = _make(torch.float32, lora=True)
    loss = _fused(t, labels, backend=backend, chunk_size=16)
    (3.0 * loss).backward(retain_graph=True)
    first = [x.grad.clone() for x in _leaves(t)]
    for x in _leaves(t):
        x.grad = None
    loss.backward()
    for a, b in zip(first, [x.grad for x in _leaves(t)]):
        torch.testing.assert_close(a, 3.0 * b)


def _lowp_case(dtype, backend, lora_dtype):
    t, labels = _make(dtype, bias=True, lora=True, train_weight=True, lora_dtype=lora_dtype)
    kw = dict(lora_scale=2.0, softcap=4.0)
    _, got = _grads(lambda: _fused(t, labels, backend=backend, chunk_size=16, **kw), _leaves(t))
    got_loss = _fused(t, labels, backend=backend, chunk_size=16, **kw).detach()
    eager_loss, eager = _grads(lambda: _reference_loss(t, labels, eager_lowp=True, **kw), _leaves(t))
    ref_loss, ref = _ref_grads(t, labels, **kw)
    return got_loss, got, eager_loss, eager, ref_loss, ref


@pytest.mark.parametrize("dtype,backend,lora_dtype", [
    (torch.float16, "triton", None), (torch.float16, "triton", torch.float32),
    (torch.bfloat16, "torch", None), (torch.bfloat16, "torch", torch.float32),
])
def test_low_precision_error_at_most_twice_eager(dtype, backend, lora_dtype):
    got_loss, got, eager_loss, eager, ref_loss, ref = _lowp_case(dtype, backend, lora_dtype)
    eps = torch.finfo(dtype).eps
    assert abs(got_loss.double() - ref_loss) <= 2 * abs(eager_loss.double() - ref_loss) + 4 * eps * ref_loss.abs()
    for name, g, e, r in zip(["hidden", "weight", "bias", "lora_A", "lora_B"], got, eager, ref):
        assert g.dtype == e.dtype, name
        assert _rel(g, r) <= 2 * _rel(e, r) + eps, (name, _rel(g, r), _rel(e, r))


# ----------------------------------------------------------------------------------------------------------------
# memory contract, launches, grad mode
# ----------------------------------------------------------------------------------------------------------------
class _Shapes(TorchDispatchMode):
    """Bytes of the largest storage any aten op returns (views of a parameter and the Triton interpreter's byte
    copies included: an upper bound on the largest allocation)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_a_full_logits_tensor(backend):
    n, h, v, chunk = 300, 24, 203, 64  # N_tok × V dwarfs every parameter-shaped tensor
    t, labels = _make(torch.float32, n=n, h=h, v=v, bias=True, lora=True, train_weight=True)
    params = [x for k, x in t.items() if k != "hidden" and x is not None]
    hidden = t["hidden"] * 1  # a non-leaf input, as in a model
    with _Shapes() as mode:
        loss, saved = saved_activation_bytes(
            lambda: fused_linear_cross_entropy(hidden, t["weight"], labels, bias=t["bias"], lora_A=t["lora_A"],
                                               lora_B=t["lora_B"], backend=backend, chunk_size=chunk),
            exclude=params)
        loss.backward()
    assert mode.largest <= chunk * v * 4 < n * v * 4
    # saved: dh (N × H) and the fp32 weight-shaped gradient accumulators, nothing vocabulary-by-token
    assert saved.total <= (n * h + v * h + v + R * h + v * R) * 4 + 64
    assert not any(s.startswith(f"({n}, {v})") for s in saved.by_shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unfused_loss_saves_logits_for_contrast(backend):
    t, labels = _make(torch.float32)
    hidden = t["hidden"] * 1
    _, eager = saved_activation_bytes(lambda: F.cross_entropy(F.linear(hidden, t["weight"]), labels),
                                      exclude=[t["weight"]])
    _, fused = saved_activation_bytes(lambda: fused_linear_cross_entropy(hidden, t["weight"], labels,
                                                                         backend=backend, chunk_size=16),
                                      exclude=[t["weight"]])
    assert eager.total >= N * V * 4 and fused.total <= N * H * 4 + 64


def test_triton_launches_per_chunk_and_no_gradient_work_without_grad():
    t, labels = _make(torch.float32, lora=True)
    with _counters.count_launches() as launches:
        _fused(t, labels, backend="triton", chunk_size=16).backward()
    assert launches == {"_flce_logits_kernel": 3, "_flce_lse_kernel": 3, "_flce_grad_kernel": 3}
    with _counters.count_launches() as launches, torch.no_grad():
        loss = _fused(t, labels, backend="triton", chunk_size=16)
    assert launches == {"_flce_logits_kernel": 3, "_flce_lse_kernel": 3}
    ref_loss, _ = _ref_grads(t, labels)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6)


def test_out_of_range_label_is_nan_not_garbage():
    t, labels = _make(torch.float32)
    labels[3] = V
    assert torch.isnan(_fused(t, labels, backend="triton", chunk_size=16))
    with pytest.raises(RuntimeError):  # the torch backend's gather checks the index, like F.cross_entropy
        _fused(t, labels, backend="torch", chunk_size=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_op_passes_opcheck(backend):
    op = torch.ops.peftfast.fused_linear_ce
    t, labels = _make(torch.float32, n=21, h=24, v=37, r=4, bias=True, lora=True, train_weight=True)
    args = [t["hidden"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], labels]
    torch.library.opcheck(op, (*args, None, 0.5, -100, 0.1, 3.0, 1.3, backend, 8, "mean", [True] * 5))
    torch.library.opcheck(op, (*args, torch.tensor(9), 2.0, -100, 0.0, None, 1.0, backend, 16, "mean",
                               [False, True, False, True, False]))
    plain = [t["hidden"].detach(), t["weight"], None, None, None, labels]
    torch.library.opcheck(op, (*plain, None, 1.0, -100, 0.0, None, 1.0, backend, 32, "sum", [False] * 5))


def test_default_chunk_size():
    assert default_chunk_size(8192, 4096, 128256) == 256
    assert default_chunk_size(37, 80, 203) == 37
    assert default_chunk_size(100_000, 8192, 32000) == 8192


def test_bad_inputs():
    t, labels = _make(torch.float32, lora=True)
    with pytest.raises(ValueError, match="does not match weight"):
        fused_linear_cross_entropy(t["hidden"][:, :-1], t["weight"], labels)
    with pytest.raises(ValueError, match="leading shape"):
        fused_linear_cross_entropy(t["hidden"], t["weight"], labels[:-1])
    with pytest.raises(TypeError, match="dtype"):
        fused_linear_cross_entropy(t["hidden"].double(), t["weight"], labels)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(t["hidden"], t["weight"], labels, reduction="none")
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        fused_linear_cross_entropy(t["hidden"], t["weight"], labels, lora_A=t["lora_A"])
    with pytest.raises(TypeError, match="integer"):
        fused_linear_cross_entropy(t["hidden"], t["weight"], labels.float())


# ----------------------------------------------------------------------------------------------------------------
# fused linear JSD
# ----------------------------------------------------------------------------------------------------------------
def _reference_jsd(hs, ws, ht, wt, labels, beta, temperature, eager=False):
    """Generalised JSD in fp64 from full logits (KL written with ``F.kl_div(..., log_target=True)``); ``eager``:
    the unfused PyTorch way instead, logits in the tensors' dtype upcast to fp32 before the softmax."""
    if eager:
        ls = F.log_softmax((hs @ ws.t()).float() / temperature, -1)
        lt = F.log_softmax((ht @ wt.t()).float() / temperature, -1)
    else:
        ls = F.log_softmax(hs.double() @ ws.double().t() / temperature, -1)
        lt = F.log_softmax(ht.double() @ wt.double().t() / temperature, -1)
    if beta == 0:
        per = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)  # KL(p || q)
    elif beta == 1:
        per = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)  # KL(q || p)
    else:
        lm = torch.logsumexp(torch.stack([lt + torch.tensor(beta).log(), ls + torch.tensor(1 - beta).log()]), 0)
        per = (beta * F.kl_div(lm, lt, reduction="none", log_target=True)
               + (1 - beta) * F.kl_div(lm, ls, reduction="none", log_target=True)).sum(-1)
    if labels is None:
        return per.mean()
    ok = labels != -100
    return per[ok].sum() / ok.sum()


def _jsd_inputs(teacher_grad: bool = False):
    hs = torch.randn(N, H, requires_grad=True)
    ws = (torch.randn(V, H) * 2 / H**0.5).requires_grad_()
    # the teacher may be wider or narrower; a non-contiguous teacher hidden state
    ht = torch.randn(48, N).t().requires_grad_(teacher_grad)
    wt = (torch.randn(V, 48) * 2 / 48**0.5).requires_grad_(teacher_grad)
    labels = torch.randint(0, V, (N,))
    labels[::4] = -100
    return hs, ws, ht, wt, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_matches_fp64_reference(backend, beta):
    hs, ws, ht, wt, labels = _jsd_inputs()
    for lab, scale_t2 in ((labels, True), (None, False)):
        loss, grads = _grads(lambda: fused_linear_jsd(hs, ws, ht, wt, lab, beta=beta, temperature=2.0,
                                                      scale_t2=scale_t2, backend=backend, chunk_size=16), [hs, ws])
        rh, rw = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
        factor = 4.0 if scale_t2 else 1.0
        ref, ref_grads = _grads(lambda: factor * _reference_jsd(rh, rw, ht, wt, lab, beta, 2.0), [rh, rw])
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
        assert all(_rel(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_teacher_gradients_match_fp64_reference(backend, beta):
    hs, ws, ht, wt, labels = _jsd_inputs(teacher_grad=True)
    leaves = [hs, ws, ht, wt]
    loss, grads = _grads(lambda: fused_linear_jsd(hs, ws, ht, wt, labels, beta=beta, temperature=1.5,
                                                  teacher_grad=True, backend=backend, chunk_size=16), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_grads = _grads(lambda: 1.5**2 * _reference_jsd(*ref_leaves, labels, beta, 1.5), ref_leaves)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape and _rel(g, r) < 1e-5
    # only what requires grad gets (and computes) a gradient; the default keeps the teacher constant
    wt.grad = None
    wt.requires_grad_(False)
    _, (g_ht,) = _grads(lambda: fused_linear_jsd(hs.detach(), ws.detach(), ht, wt, labels, beta=beta,
                                                 temperature=1.5, teacher_grad=True, backend=backend), [ht])
    assert _rel(g_ht, ref_grads[2]) < 1e-5 and wt.grad is None
    ht.grad = hs.grad = None
    fused_linear_jsd(hs, ws, ht, wt, labels, beta=beta, backend=backend).backward()
    assert ht.grad is None and hs.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_jsd_low_precision_gradients_within_twice_eager_error(dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in _jsd_inputs()[:4]]
    labels = _jsd_inputs()[4]
    loss, grads = _grads(lambda: fused_linear_jsd(*leaves, labels, beta=0.3, temperature=2.0, teacher_grad=True,
                                                  backend="torch", chunk_size=16), leaves)
    eager, eager_grads = _grads(lambda: 4.0 * _reference_jsd(*leaves, labels, 0.3, 2.0, eager=True), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_grads = _grads(lambda: 4.0 * _reference_jsd(*ref_leaves, labels, 0.3, 2.0), ref_leaves)
    assert abs(loss.double() - ref) <= 2 * abs(eager.double() - ref) + 1e-6
    for g, e, r in zip(grads, eager_grads, ref_grads):
        assert g.dtype == dtype and _rel(g, r) <= 2 * _rel(e, r) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_op_passes_opcheck(backend):
    hs, ws = torch.randn(13, 16, requires_grad=True), torch.randn(29, 16, requires_grad=True)
    ht, wt = torch.randn(13, 12, requires_grad=True), torch.randn(29, 12, requires_grad=True)
    labels = torch.randint(0, 29, (13,))
    labels[::3] = -100
    op = torch.ops.peftfast.fused_linear_jsd
    torch.library.opcheck(op, (hs, ws, ht, wt, labels, 0.3, 2.0, -100, backend, 8, True, [True] * 4))
    torch.library.opcheck(op, (hs, ws, ht, wt, None, 0.0, 1.0, -100, backend, 16, False, [True, False, False, True]))


def test_jsd_bf16_memory_and_no_grad():
    n, h, v, chunk = 300, 24, 203, 64
    hs = torch.randn(n, h, dtype=torch.bfloat16, requires_grad=True)
    ws = torch.randn(v, h, dtype=torch.bfloat16) / h**0.5
    ht, wt = torch.randn(n, h, dtype=torch.bfloat16), torch.randn(v, h, dtype=torch.bfloat16) / h**0.5
    with _Shapes() as mode:
        loss = fused_linear_jsd(hs * 1, ws, ht, wt, beta=0.5, backend="torch", chunk_size=chunk)
        loss.backward()
    assert mode.largest <= chunk * v * 4 < n * v * 4
    ref = _reference_jsd(hs.detach(), ws, ht, wt, None, 0.5, 1.0)
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    assert hs.grad.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_jsd(hs, ws, ht, wt, beta=0.5, backend="torch", chunk_size=chunk), loss)


# ----------------------------------------------------------------------------------------------------------------
# model level
# ----------------------------------------------------------------------------------------------------------------
def _gemma2(**overrides):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    kw = dict(vocab_size=M.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=3.0,
              attn_implementation="eager", bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return Gemma2ForCausalLM(Gemma2Config(**{**kw, **overrides}))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, M.VOCAB, (M.BATCH, M.SEQ), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a padded prompt
    return ids, labels


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _step(model, batches, **kw):
    """Gradient accumulation over ``batches`` with transformers' ``num_items_in_batch`` semantics."""
    model.zero_grad(set_to_none=True)
    total = sum(int((lab[..., 1:] != -100).sum()) for _, lab in batches)
    losses = []
    for ids, lab in batches:
        out = model(input_ids=ids, labels=lab, num_items_in_batch=torch.tensor(total), **kw)
        out.loss.backward()
        losses.append(out.loss.detach())
    return losses, {n: p.grad.clone() for n, p in _trainable(model).items()}


def _models():
    return {
        "llama-full": lambda: M.llama(),
        "llama-lora-lm_head": lambda: M.peft_model("llama", target_modules=["q_proj", "v_proj", "lm_head"]),
        "qwen2-lora": lambda: M.peft_model("qwen2"),
        "gemma2-softcap": lambda: _gemma2(),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(_models()))
def test_model_loss_and_grads_match_unpatched(arch, backend):
    torch.manual_seed(0)
    ref = _models()[arch]().train()
    model = copy.deepcopy(ref)
    assert install_loss(model, backend=backend) == (True, None)
    batches = [_batch(0), _batch(1)]
    ref_losses, ref_grads = _step(ref, batches)
    losses, grads = _step(model, batches)
    for a, b in zip(losses, ref_losses):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if "lm_head" in arch:
        assert any("lm_head.lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert loss_stats(model) == {"fused": 2, "no_labels": 0, "eval": 0, "fallbacks": {}}


_RECIPE_EXTRA = {"Gemma": dict(head_dim=8), "Gemma2": dict(head_dim=8, final_logit_softcapping=5.0),
                 "Gemma3": dict(head_dim=8, final_logit_softcapping=5.0), "Cohere": dict(logit_scale=0.3),
                 "Granite": dict(logits_scaling=4.0), "Qwen3": dict(head_dim=8), "Mistral": dict(head_dim=8),
                 "GPT2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "Helium": dict(head_dim=8),
                 "HunYuanDenseV1": dict(head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
                 "Ministral": dict(head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
                 "SeedOss": dict(head_dim=8, residual_dropout=0.0, attention_dropout=0.0),
                 "Qwen3_5": dict(head_dim=8, layer_types=["full_attention"])}


@pytest.mark.parametrize("cls", sorted(ce_mod.RECIPES))
def test_every_supported_class_matches_unpatched(cls):
    import transformers

    if not hasattr(transformers, cls):  # e.g. the GPU machine's older transformers
        pytest.skip(f"{cls} is not in transformers {transformers.__version__}")
    name = cls.removesuffix("ForCausalLM").removesuffix("LMHeadModel")
    cfg_cls = getattr(transformers, f"{name}TextConfig" if name in ("Gemma3", "Qwen3_5") else f"{name}Config")
    kw = dict(vocab_size=M.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager", pad_token_id=None,
              bos_token_id=0, eos_token_id=1)
    ref = getattr(transformers, cls)(cfg_cls(**kw, **_RECIPE_EXTRA.get(name, {})))
    model = copy.deepcopy(ref)
    assert install_loss(model, backend="torch") == (True, None)
    batches = [_batch()]
    (loss,), grads = _step(model, batches)
    (ref_loss,), ref_grads = _step(ref, batches)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert loss_stats(model) == {"fused": 1, "no_labels": 0, "eval": 0, "fallbacks": {}}  # not the original's loss


def test_moe_router_auxiliary_loss_goes_to_the_original_forward():
    """A mixture of experts asked for router logits adds the load-balancing loss: that call is the original
    forward's (counted with the reason); without them the fused loss serves it, and its output has the MoE fields."""
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=M.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     max_position_embeddings=64, pad_token_id=None, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    ref = transformers.MixtralForCausalLM(cfg).train()
    model = copy.deepcopy(ref)
    install_loss(model, backend="torch")
    ids, lab = _batch()
    got, want = model(input_ids=ids, labels=lab), ref(input_ids=ids, labels=lab)
    assert type(got).__name__ == "MoeCausalLMOutputWithPast" and got.logits is None and got.aux_loss is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    got = model(input_ids=ids, labels=lab, output_router_logits=True)
    want = ref(input_ids=ids, labels=lab, output_router_logits=True)
    assert got.aux_loss is not None and got.logits is not None
    torch.testing.assert_close(got.loss, want.loss)
    assert loss_stats(model) == {"fused": 1, "no_labels": 0, "eval": 0,
                                 "fallbacks": {"output_router_logits (the router's auxiliary loss)": 1}}


def test_model_output_shape_return_dict_keep_logits_and_shift_labels():
    torch.manual_seed(0)
    ref = _gemma2().eval()
    model = copy.deepcopy(ref)
    install_loss(model, backend="torch", keep_logits=True)
    ids, lab = _batch()
    r = ref(input_ids=ids, labels=lab)
    out = model(input_ids=ids, labels=lab)
    torch.testing.assert_close(out.loss, r.loss)
    torch.testing.assert_close(out.logits, r.logits)
    assert not out.logits.requires_grad
    install_loss(model, backend="torch")  # re-install updates the options
    model.train()  # without keep_logits the fused loss serves training calls (no dropout in this config)
    out = model(ids, None, None, None, None, lab)  # positional, as the original signature allows
    assert out.logits is None and out.loss is not None
    tup = model(input_ids=ids, labels=lab, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.loss)
    shift = torch.full_like(lab, -100)
    shift[:, :-1] = lab[:, 1:]
    torch.testing.assert_close(model(input_ids=ids, labels=lab, shift_labels=shift).loss, r.loss)


def test_both_names_of_the_cache_argument():
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (keeping the old keyword with a warning): the fused
    forward takes the class's own name, the other one as the class does, and a DynamicCache is filled as unpatched."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    ref = _gemma2().train()
    model = copy.deepcopy(ref)
    install_loss(model, backend="torch")
    st = model._peftfast_loss
    own = st.params[ce_mod._CACHE_AT]
    assert own in ("past_key_values", "cache") and own in inspect.signature(type(model).forward).parameters
    ids, lab = _batch()
    for name in {own, "past_key_values"}:
        got_cache, want_cache = DynamicCache(config=model.config), DynamicCache(config=ref.config)
        before = st.fused_calls
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecated keyword
            out = model(input_ids=ids, labels=lab, use_cache=True, **{name: got_cache})
            want = ref(input_ids=ids, labels=lab, use_cache=True, **{name: want_cache})
        assert st.fused_calls == before + 1 and out.logits is None
        torch.testing.assert_close(out.loss, want.loss)
        assert getattr(out, own) is got_cache and got_cache.get_seq_length() == want_cache.get_seq_length() > 0
        torch.testing.assert_close(got_cache.layers[0].keys, want_cache.layers[0].keys)


def test_model_fallbacks_are_counted_and_exact():
    torch.manual_seed(0)
    ref = M.peft_model("llama", target_modules=["q_proj", "lm_head"], lora_dropout=0.1)
    model = copy.deepcopy(ref)
    assert install_loss(model, backend="torch") == (True, None)
    ids, lab = _batch()
    out = model(input_ids=ids)  # no labels: the original forward, logits included
    assert out.logits.shape == (M.BATCH, M.SEQ, M.VOCAB)
    model.eval()
    ref.eval()
    # evaluation keeps the original forward (its logits feed metrics)
    torch.testing.assert_close(model(input_ids=ids, labels=lab).loss, ref(input_ids=ids, labels=lab).loss)
    model.train()
    ref.train()
    torch.manual_seed(3)
    kept = model(input_ids=ids, labels=lab[:, -2:], logits_to_keep=2)
    torch.manual_seed(3)
    torch.testing.assert_close(kept.logits, ref(input_ids=ids, labels=lab[:, -2:], logits_to_keep=2).logits)
    torch.manual_seed(3)
    got = model(input_ids=ids, labels=lab).loss  # LoRA dropout on lm_head in training: PEFT's path
    torch.manual_seed(3)
    torch.testing.assert_close(got, ref(input_ids=ids, labels=lab).loss)
    st = loss_stats(model)
    assert st["fused"] == 0 and st["no_labels"] == 1 and st["eval"] == 1
    assert st["fallbacks"] == {"logits_to_keep != 0": 1,
                               "lm_head adapter 'default' has LoRA dropout 0.1 in training (not fused)": 1}


def test_with_fused_lora_layers_and_under_autocast():
    import peftfast

    torch.manual_seed(0)
    ref = M.peft_model("llama", target_modules=["q_proj", "v_proj", "lm_head"])
    model = copy.deepcopy(ref)
    peftfast.patch(model, backend="torch")  # lm_head's lora.Linear now has peftfast's forward: the loss reads weights
    install_loss(model, backend="torch")
    batches = [_batch(0)]
    (loss,), grads = _step(model, batches)
    (ref_loss,), ref_grads = _step(ref, batches)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    ids, lab = batches[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(input_ids=ids, labels=lab).loss
        want = ref(input_ids=ids, labels=lab).loss
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) < 2e-2 * want.item()
    assert loss_stats(model)["fused"] == 2


def test_why_not_reasons():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    dora = get_peft_model(M.llama(), LoraConfig(target_modules=["lm_head"], use_dora=True, r=4))
    assert "variant" in install_loss(dora)[1]
    assert "not a supported" in ce_mod.why_not(torch.nn.Linear(2, 2))
    llama = M.llama()
    llama.loss_function = lambda *a, **k: None
    assert "custom loss_function" in ce_mod.why_not(llama)
    llama = M.llama()
    llama.lm_head.register_forward_hook(lambda *a: None)
    assert "hooks" in ce_mod.why_not(llama)


def test_uninstall_restores_exactly_and_deepcopy_pickle_work():
    torch.manual_seed(0)
    model = M.peft_model("llama", target_modules=["q_proj", "lm_head"])
    lm = model.get_base_model()
    assert "forward" not in lm.__dict__
    install_loss(model, backend="torch")
    twin = copy.deepcopy(model)
    assert twin.get_base_model().forward.args[0] is twin.get_base_model()
    ids, lab = _batch()
    a, b = model(input_ids=ids, labels=lab).loss, twin(input_ids=ids, labels=lab).loss
    torch.testing.assert_close(a, b)
    assert loss_stats(twin)["fused"] == 1
    thawed = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(thawed(input_ids=ids, labels=lab).loss, a)
    uninstall_loss(model)
    assert "forward" not in lm.__dict__ and "_peftfast_loss" not in lm.__dict__ and loss_stats(model) is None
    assert model(input_ids=ids, labels=lab).logits is not None
    # a forward that was already on the instance comes back as the same object
    plain = M.llama()
    mine = plain.forward
    plain.__dict__["forward"] = mine
    assert "already replaced" in ce_mod.why_not(plain)
    del plain.__dict__["forward"]
    install_loss(plain)
    uninstall_loss(plain)
    assert "forward" not in plain.__dict__


# ----------------------------------------------------------------------------------------------------------------
# masked LMs: the head on the labelled rows only, the vocabulary projection inside the fused loss
# ----------------------------------------------------------------------------------------------------------------
_ENC = dict(vocab_size=M.VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_MLM_DECODER = {"BertForMaskedLM": "decoder", "RobertaForMaskedLM": "decoder", "XLMRobertaForMaskedLM": "decoder",
                "CamembertForMaskedLM": "decoder", "DistilBertForMaskedLM": "vocab_projector",
                "ElectraForMaskedLM": "generator_lm_head", "ModernBertForMaskedLM": "decoder"}


def _mlm(cls: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if cls == "DistilBertForMaskedLM":
        cfg = transformers.DistilBertConfig(vocab_size=M.VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=64,
                                            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    elif cls == "ModernBertForMaskedLM":  # its decoder has a bias, its dense layers none (the defaults)
        cfg = transformers.ModernBertConfig(vocab_size=M.VOCAB, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=1, cls_token_id=1,
                                            sep_token_id=1)
    else:
        name = cls.removesuffix("ForMaskedLM")
        extra = dict(embedding_size=24) if name == "Electra" else {}  # a generator narrower than its encoder
        cfg = getattr(transformers, f"{name}Config")(**_ENC, **extra)
    model = getattr(transformers, cls)(cfg)
    with torch.no_grad():  # non-zero biases everywhere (the decoder's bias goes into the fused loss)
        for mod in model.modules():
            if isinstance(getattr(mod, "bias", None), torch.nn.Parameter):
                mod.bias.normal_(0.0, 0.1)
    return model.train()


def _mlm_batch(seed=0, every=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, M.VOCAB, (M.BATCH, M.SEQ), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, ::every] = ids[:, ::every]
    return ids, labels


def _peft_mlm(cls: str, decoder_lora: bool):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if not decoder_lora else [_MLM_DECODER[cls], "dense", "query", "q_lin", "vocab_transform",
                                                     "Wqkv"]
    model = get_peft_model(_mlm(cls), LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for layer in M.lora_layers(model):
            for b in layer.lora_B.values():
                b.weight.normal_(0.0, 0.2)
    return model.train()


@pytest.mark.parametrize("decoder_lora", [False, True], ids=["lora", "lora+decoder"])
@pytest.mark.parametrize("cls", sorted(ce_mod.MASKED_LM))
def test_masked_lm_matches_unpatched(cls, decoder_lora):
    ref = _peft_mlm(cls, decoder_lora)
    model = copy.deepcopy(ref)
    assert install_loss(model, backend="torch") == (True, None)
    ids, lab = _mlm_batch()
    ref.zero_grad()
    want = ref(input_ids=ids, labels=lab).loss
    want.backward()
    got = model(input_ids=ids, labels=lab)
    got.loss.backward()
    assert got.logits is None and got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    grads = _trainable(model)
    assert any(_MLM_DECODER[cls] in n for n in grads) == decoder_lora
    for n, p in _trainable(ref).items():
        torch.testing.assert_close(grads[n].grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert loss_stats(model) == {"fused": 1, "no_labels": 0, "eval": 0, "fallbacks": {}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_lm_rows_memory_and_outputs(backend, monkeypatch):
    ref = _peft_mlm("BertForMaskedLM", decoder_lora=True)
    model = copy.deepcopy(ref)
    install_loss(model, backend=backend)
    ids, lab = _mlm_batch(every=4)
    n_lab = int((lab != -100).sum())
    params = list(model.parameters())
    shapes = M.saved_shapes(lambda: model(input_ids=ids, labels=lab).loss, params)
    ref_shapes = M.saved_shapes(lambda: ref(input_ids=ids, labels=lab).loss, list(ref.parameters()))
    assert not any(s[-1:] == (M.VOCAB,) for s in shapes) and any(s[-1:] == (M.VOCAB,) for s in ref_shapes)
    # the head's transform keeps only labelled rows: no [tokens, hidden] tensor after the encoder's last one
    assert (n_lab, 32) in shapes
    _, saved = saved_activation_bytes(lambda: model(input_ids=ids, labels=lab).loss, exclude=params)
    _, ref_saved = saved_activation_bytes(lambda: ref(input_ids=ids, labels=lab).loss, exclude=list(ref.parameters()))
    assert saved.total < ref_saved.total

    # positional arguments and return_dict=False, as the class forward takes them
    want = ref(input_ids=ids, labels=lab).loss
    tup = model(ids, None, None, None, None, None, None, lab, return_dict=False)
    assert isinstance(tup, tuple) and tup[0].shape == () and len(tup) == 1
    torch.testing.assert_close(tup[0], want, rtol=1e-5, atol=1e-6)
    # under torch.compile no rows are selected (a data-dependent shape): every row runs, unlabelled ones ignored
    model.zero_grad()
    ref.zero_grad()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = model(input_ids=ids, labels=lab).loss
    assert (ids.numel(), 32) in M.saved_shapes(lambda: model(input_ids=ids, labels=lab).loss, params)
    monkeypatch.undo()
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for n, p in _trainable(ref).items():
        torch.testing.assert_close(_trainable(model)[n].grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # nothing labelled: NaN, as CrossEntropyLoss gives
    none = torch.full_like(lab, -100)
    assert model(input_ids=ids, labels=none).loss.isnan() and ref(input_ids=ids, labels=none).loss.isnan()
    # no labels, or evaluation: the original forward with its logits
    assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    model.eval()
    ref.eval()
    assert model(input_ids=ids, labels=lab).logits is not None
    install_loss(model, backend=backend, keep_logits=True)
    out, r = model(input_ids=ids, labels=lab), ref(input_ids=ids, labels=lab)
    torch.testing.assert_close(out.logits, r.logits)
    torch.testing.assert_close(out.loss, r.loss, rtol=1e-5, atol=1e-6)
    assert loss_stats(model) == {"fused": 7, "no_labels": 1, "eval": 1, "fallbacks": {}}


def _patched_loss_matches(ref, arch: str):
    """(ref, its copy through ``patch(fuse_loss=True)``, batch, ref's loss): the loss entry patched, the same loss and
    gradients."""
    import peftfast

    model = peftfast.patch(copy.deepcopy(ref), fuse_loss=True)
    entry = next(e for e in peftfast.report(model).modules if e.kind == "loss")
    assert entry.patched, entry.reason
    data = M.batch(arch)
    loss, grads = M.loss_and_grads(model, data)
    want, ref_grads = M.loss_and_grads(ref, data)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-5, msg=n)
    return ref, model, data, want


def test_masked_lm_through_patch_with_fused_layers():
    ref = M.peft_model("bert", lora_dropout=0.0)
    import peftfast

    _, model, _, _ = _patched_loss_matches(ref, "bert")
    peftfast.unpatch(model)
    assert "forward" not in model.get_base_model().__dict__


def test_masked_lm_why_not_and_uninstall():
    import transformers

    distil = _mlm("DistilBertForMaskedLM")
    distil.mlm_loss_fct = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    assert "mlm_loss_fct" in ce_mod.why_not(distil)
    bert = _mlm("BertForMaskedLM")
    bert.cls.forward = lambda x: bert.cls.predictions(x) * 2  # a head that is not transform → decoder
    assert "probe" in install_loss(bert)[1] and "_peftfast_loss" not in bert.__dict__
    bert = _mlm("BertForMaskedLM")
    bert.cls.predictions.decoder = torch.nn.Linear(32, M.VOCAB + 1)
    assert "vocab_size" in ce_mod.why_not(bert)
    deberta = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**_ENC))
    assert "ForMaskedLM" in ce_mod.why_not(deberta) and "not a supported" in ce_mod.why_not(deberta)
    roberta = _mlm("RobertaForMaskedLM")
    assert "forward" not in roberta.__dict__
    install_loss(roberta)
    twin = pickle.loads(pickle.dumps(roberta))
    ids, lab = _mlm_batch()
    torch.testing.assert_close(twin(input_ids=ids, labels=lab).loss, roberta(input_ids=ids, labels=lab).loss)
    uninstall_loss(roberta)
    assert "forward" not in roberta.__dict__ and roberta(input_ids=ids, labels=lab).logits is not None


def test_bound_causal_forward_gpt2_arguments_outputs_and_cache():
    """GPT-2 (``transformer`` backbone, its own argument order, token_type_ids, cross-attention output class): the
    fused forward binds the class's signature and hands every argument on by name, as the original does."""
    from transformers import DynamicCache

    ref = M.peft_model("gpt2", r=4, lora_alpha=8)
    model = copy.deepcopy(ref)
    assert install_loss(model, backend="torch") == (True, None)
    assert model.get_base_model()._peftfast_loss.kind == "bound"
    ids, lab = _batch()
    tt = torch.ones_like(ids)  # token_type_ids go through the embedding: a lost argument changes the loss
    want = ref(input_ids=ids, labels=lab, token_type_ids=tt)
    got = model(ids, labels=lab, token_type_ids=tt)
    assert type(got) is type(want) and got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    got.loss.backward()
    want.loss.backward()
    for n, p in _trainable(ref).items():
        torch.testing.assert_close(_trainable(model)[n].grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    tup = model(input_ids=ids, labels=lab, return_dict=False)
    assert isinstance(tup, tuple) and tup[0].shape == ()
    params = inspect.signature(type(ref.get_base_model()).forward).parameters
    cache_name = next(n for n in ("cache", "past_key_values") if n in params)
    c_got, c_want = DynamicCache(config=model.config), DynamicCache(config=ref.config)
    out = model(input_ids=ids, labels=lab, use_cache=True, **{cache_name: c_got})
    ref(input_ids=ids, labels=lab, use_cache=True, **{cache_name: c_want})
    assert getattr(out, cache_name) is c_got and c_got.get_seq_length() == c_want.get_seq_length() > 0
    model.eval()
    ref.eval()
    install_loss(model, backend="torch", keep_logits=True)
    out, r = model(input_ids=ids, labels=lab), ref(input_ids=ids, labels=lab)
    torch.testing.assert_close(out.logits, r.logits)
    assert loss_stats(model) == {"fused": 4, "no_labels": 0, "eval": 0, "fallbacks": {}}
    # served by the original (whose loss then reads the kept position's label only)
    assert model(input_ids=ids, labels=lab[:, -1:], logits_to_keep=1).logits.shape[1] == 1
    assert loss_stats(model)["fallbacks"] == {"logits_to_keep != 0": 1}


def test_masked_lm_padding_token_types_and_autocast():
    """BERT with a padded batch (attention_mask), token_type_ids and bf16 autocast: the fused masked-LM loss is at
    most twice as far from the fp32 loss as the eager bf16 loss is (at least 1e-3 relative: both round in bf16)."""
    ref = _peft_mlm("BertForMaskedLM", decoder_lora=True)
    model = copy.deepcopy(ref)
    install_loss(model, backend="torch")
    ids, lab = _mlm_batch()
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    lab = lab.masked_fill(mask == 0, -100)
    types = (torch.arange(M.SEQ) > 4).long().expand_as(ids)
    kw = dict(input_ids=ids, labels=lab, attention_mask=mask, token_type_ids=types)
    exact = ref(**kw).loss
    torch.testing.assert_close(model(**kw).loss, exact, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, eager = model(**kw).loss, ref(**kw).loss
    assert got.dtype == torch.float32
    assert abs(got.item() - exact.item()) <= max(2 * abs(eager.item() - exact.item()), 1e-3 * exact.item())
    assert loss_stats(model)["fused"] == 2


# ----------------------------------------------------------------------------------------------------------------
# encoder-decoder LMs
# ----------------------------------------------------------------------------------------------------------------
_S2S_SMALL = dict(vocab_size=M.VOCAB, d_model=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  decoder_start_token_id=2)
_S2S_EXTRA = {"LED": dict(attention_window=4, max_encoder_position_embeddings=64, max_decoder_position_embeddings=64),
              "BigBirdPegasus": dict(attention_type="original_full"), "Marian": dict(decoder_vocab_size=M.VOCAB)}


def _s2s(cls: str) -> torch.nn.Module:
    """A tiny random ``cls`` in training mode, its configs' own dropout on, biases and ``final_logits_bias``
    random."""
    import transformers

    torch.manual_seed(0)
    model_cls = getattr(transformers, cls)
    name = model_cls.config_class.__name__.removesuffix("Config")
    if "T5" in name:
        cfg = model_cls.config_class(vocab_size=M.VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    elif name == "Whisper":  # audio in: 8 mel bins, 16 frames (the encoder's convolutions halve them)
        cfg = model_cls.config_class(**_S2S_SMALL, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40,
                                     num_mel_bins=8, max_source_positions=8, max_target_positions=16)
    else:
        cfg = model_cls.config_class(**_S2S_SMALL, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40,
                                     max_position_embeddings=64, **_S2S_EXTRA.get(name, {}))
    model = model_cls(cfg)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(getattr(mod, "bias", None), torch.nn.Parameter):
                mod.bias.normal_(0.0, 0.1)
        if isinstance(getattr(model, "final_logits_bias", None), torch.Tensor):
            model.final_logits_bias.normal_(0.0, 0.5)
    return model.train()


def _peft_s2s(cls: str, head_lora: bool = True):
    from peft import LoraConfig, get_peft_model

    targets = ["q", "v", "q_proj", "v_proj", "query", "value"] + (["lm_head", "proj_out"] if head_lora else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note on adapting a tied lm_head
        # Whisper takes input_features: PEFT's seq2seq wrapper would hand its decoder an input_ids as well
        task = None if cls == "WhisperForConditionalGeneration" else "SEQ_2_SEQ_LM"
        model = get_peft_model(_s2s(cls), LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                     lora_bias=head_lora, task_type=task))
    with torch.no_grad():
        for layer in M.lora_layers(model):
            for b in layer.lora_B.values():
                b.weight.normal_(0.0, 0.2)
                if b.bias is not None:
                    b.bias.normal_(0.0, 0.2)
    return model.train()


def _s2s_batch(seed=0, src=11, tgt=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, M.VOCAB, (M.BATCH, src), generator=g)
    labels = torch.randint(3, M.VOCAB, (M.BATCH, tgt), generator=g)
    labels[0, -3:] = -100  # a padded target
    return ids, labels


def _seeded(model, **kw):
    torch.manual_seed(7)  # dropout: the fused call runs the class's own forward, drawing the same masks
    return model(**kw)


def _s2s_source(cls: str, ids: torch.Tensor) -> dict:
    """The encoder's input: token ids, or for Whisper log-mel features (8 bins x 16 frames, from the ids)."""
    if cls == "WhisperForConditionalGeneration":
        g = torch.Generator().manual_seed(int(ids.sum()))
        return {"input_features": torch.randn(ids.shape[0], 8, 16, generator=g)}
    return {"input_ids": ids}


@pytest.mark.parametrize("cls", sorted(ce_mod.SEQ2SEQ))
def test_seq2seq_matches_unpatched(cls):
    """Every ``SEQ2SEQ`` class, PEFT LoRA (with LoRA bias) on attention and on ``lm_head``, dropout on: the same loss,
    gradient of every trainable tensor and output fields (but the logits) as the unpatched model, on the fused
    path."""
    import transformers

    if not hasattr(transformers, cls):
        pytest.skip(f"{cls} is not in transformers {transformers.__version__}")
    ref = _peft_s2s(cls)
    model = copy.deepcopy(ref)
    assert install_loss(model, backend="torch") == (True, None)
    ids, lab = _s2s_batch()
    src = _s2s_source(cls, ids)
    want = _seeded(ref, **src, labels=lab)
    got = _seeded(model, **src, labels=lab)
    want.loss.backward()
    got.loss.backward()
    assert type(got) is type(want) and got.logits is None and got.loss.dtype == torch.float32
    assert set(got.keys()) == set(want.keys()) - {"logits"}
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    grads = _trainable(model)
    assert any(ce_mod.SEQ2SEQ[cls].head in n for n in grads)
    for n, p in _trainable(ref).items():
        torch.testing.assert_close(grads[n].grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert loss_stats(model) == {"fused": 1, "no_labels": 0, "eval": 0, "fallbacks": {}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["T5ForConditionalGeneration", "BartForConditionalGeneration"])
def test_seq2seq_arguments_outputs_cache_and_memory(cls, backend):
    from transformers import DynamicCache, EncoderDecoderCache

    ref = _peft_s2s(cls)
    model = copy.deepcopy(ref)
    install_loss(model, backend=backend)
    ids, lab = _s2s_batch()
    kw = dict(input_ids=ids, labels=lab, attention_mask=torch.ones_like(ids))
    kw["attention_mask"][1, -4:] = 0
    # backend parity, and no tokens x vocab tensor kept for backward
    want = _seeded(ref, **kw)
    torch.testing.assert_close(_seeded(model, **kw).loss, want.loss, rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    shapes = M.saved_shapes(lambda: _seeded(model, **kw).loss, params)
    logits_sized = lab.numel() * M.VOCAB  # a [tokens, vocab] tensor (the head's weight and bias rows are smaller)
    assert not any(s[-1:] == (M.VOCAB,) and math.prod(s) >= logits_sized for s in shapes)
    assert any(s[-1:] == (M.VOCAB,) and math.prod(s) >= logits_sized
               for s in M.saved_shapes(lambda: _seeded(ref, **kw).loss, list(ref.parameters())))
    _, saved = saved_activation_bytes(lambda: _seeded(model, **kw).loss, exclude=params)
    _, ref_saved = saved_activation_bytes(lambda: _seeded(ref, **kw).loss, exclude=list(ref.parameters()))
    assert saved.total < ref_saved.total

    # decoder inputs given by the caller are used as given; return_dict=False
    dec = torch.randint(3, M.VOCAB, lab.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_seeded(model, **kw, decoder_input_ids=dec).loss,
                               _seeded(ref, **kw, decoder_input_ids=dec).loss, rtol=1e-5, atol=1e-6)
    tup, ref_tup = _seeded(model, **kw, return_dict=False), _seeded(ref, **kw, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(ref_tup) - 1 and tup[0].shape == ()  # no logits
    torch.testing.assert_close(tup[0], ref_tup[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(tup[-1], ref_tup[-1])  # the encoder's last hidden state
    # a cache: BART's forward switches it off with labels, T5's keeps filling it; the fused call does the same
    name = next(n for n in ("cache", "past_key_values") if n in inspect.signature(type(ref.get_base_model()).forward)
                .parameters)
    caches = [EncoderDecoderCache(DynamicCache(), DynamicCache()) for _ in range(2)]
    got = _seeded(model, **kw, use_cache=True, **{name: caches[0]})
    want_c = _seeded(ref, **kw, use_cache=True, **{name: caches[1]})
    assert (getattr(got, name) is None) == (getattr(want_c, name) is None)
    assert caches[0].get_seq_length() == caches[1].get_seq_length()
    torch.testing.assert_close(got.loss, want_c.loss, rtol=1e-5, atol=1e-6)
    assert loss_stats(model) == {"fused": 6, "no_labels": 0, "eval": 0, "fallbacks": {}}

    # no labels, or evaluation: the original forward and its logits; keep_logits: detached logits as well
    dec_kw = dict(input_ids=ids, decoder_input_ids=dec)
    assert torch.equal(_seeded(model, **dec_kw).logits, _seeded(ref, **dec_kw).logits)
    model.eval()
    ref.eval()
    assert model(**kw).logits is not None
    install_loss(model, backend=backend, keep_logits=True)
    out, r = model(**kw), ref(**kw)
    torch.testing.assert_close(out.logits, r.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, r.loss, rtol=1e-5, atol=1e-6)
    assert not out.logits.requires_grad
    assert loss_stats(model) == {"fused": 7, "no_labels": 1, "eval": 1, "fallbacks": {}}


def test_seq2seq_why_not_head_replaced_pickle_and_uninstall():
    lm = _s2s("BartForConditionalGeneration")
    ids, lab = _s2s_batch()
    lm.lm_head.register_forward_hook(lambda *a: None)
    assert ce_mod.why_not(lm) == "lm_head has forward hooks"
    marian = _s2s("MarianMTModel")
    marian.config.decoder_vocab_size = M.VOCAB + 1
    assert "decoder_vocab_size" in ce_mod.why_not(marian)
    whisper = _s2s("WhisperForConditionalGeneration")
    audio = _s2s_source("WhisperForConditionalGeneration", ids)
    assert install_loss(whisper) == (True, None)
    long = torch.randint(3, M.VOCAB, (2, 17))  # over max_target_positions: the class's own error
    with pytest.raises(ValueError, match="cannot exceed"):
        whisper(**audio, labels=long)
    assert whisper(**audio, labels=lab).logits is None
    whisper.proj_out.register_forward_hook(lambda *a: None)
    assert ce_mod.why_not(whisper) == "proj_out has forward hooks"
    assert whisper(**audio, labels=lab).logits is not None
    assert loss_stats(whisper) == {"fused": 1, "no_labels": 0, "eval": 0,
                                   "fallbacks": {"proj_out has forward hooks": 1}}

    t5 = _s2s("T5ForConditionalGeneration")
    assert "forward" not in t5.__dict__ and not t5.lm_head._forward_pre_hooks
    install_loss(t5)
    twin = pickle.loads(pickle.dumps(t5))  # its head's pre-hook serves its own state
    torch.testing.assert_close(_seeded(twin, input_ids=ids, labels=lab).loss,
                               _seeded(t5, input_ids=ids, labels=lab).loss)
    assert loss_stats(twin)["fused"] == 1
    twin.lm_head = torch.nn.Linear(32, M.VOCAB, bias=False)  # replaced after install: the original serves the call
    assert twin(input_ids=ids, labels=lab).logits is not None
    assert loss_stats(twin)["fallbacks"] == {"lm_head was replaced after the loss was patched": 1}
    uninstall_loss(t5)
    assert "forward" not in t5.__dict__ and not t5.lm_head._forward_pre_hooks
    assert t5(input_ids=ids, labels=lab).logits is not None


def test_seq2seq_bf16_autocast_and_through_patch():
    """T5 through ``patch(fuse_loss=True)`` (fused LoRA layers and loss): the same loss and gradients as PEFT; under
    bf16 autocast the fused loss is at most twice as far from the fp32 loss as the eager bf16 loss is (at least
    1e-3 relative: both round in bf16); ``unpatch`` removes the head's pre-hook."""
    import peftfast

    ref, model, data, want = _patched_loss_matches(M.peft_model("t5", r=4, lora_alpha=8), "t5")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, eager = model(**data).loss, ref(**data).loss
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= max(2 * abs(eager.item() - want.item()), 1e-3 * want.item())
    assert ce_mod.stats(model)["fused"] == 2
    peftfast.unpatch(model)
    lm = model.get_base_model()
    assert "forward" not in lm.__dict__ and not lm.lm_head._forward_pre_hooks


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_prompt_learning_through_patch(arch, method):
    """PEFT prefix tuning (a cache of virtual keys in every layer) and prompt tuning (virtual input embeddings) on
    T5 / BART with ``patch(fuse_loss=True)``: the class's own forward takes what PEFT hands it, and the fused loss
    gives the same loss and gradients of the virtual tokens' encoder."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    import peftfast

    torch.manual_seed(0)
    cfg = (PrefixTuningConfig if method == "prefix" else PromptTuningConfig)(task_type="SEQ_2_SEQ_LM",
                                                                              num_virtual_tokens=4)
    ref = get_peft_model(M.BUILDERS[arch](), cfg).train()
    _, model, _, _ = _patched_loss_matches(ref, arch)
    assert ce_mod.stats(model) == {"fused": 1, "no_labels": 0, "eval": 0, "fallbacks": {}}
    peftfast.unpatch(model)


def test_seq2seq_compiled_path_takes_the_head_input_without_a_try_block(monkeypatch):
    """The branch ``torch.compile`` traces (no ``try`` block, which Dynamo before torch 2.12 cannot resume in after a
    graph break in the model's own code): the same loss and gradients as the eager branch; a call that raises there
    leaves the head hook armed, and the next call disarms it before the head runs unfused."""
    ref = _peft_s2s("BartForConditionalGeneration")
    model = copy.deepcopy(ref)
    assert install_loss(model, backend="torch") == (True, None)
    ids, lab = _s2s_batch()
    want = _seeded(model, input_ids=ids, labels=lab).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in _trainable(model).items()}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(ce_mod.torch.compiler, "is_compiling", lambda: True)
    got = _seeded(model, input_ids=ids, labels=lab).loss
    got.backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for n, p in _trainable(model).items():
        torch.testing.assert_close(p.grad, want_grads[n], rtol=0, atol=0, msg=n)
    st = model.base_model.model._peftfast_loss
    assert st.taken is None
    with pytest.raises(Exception):
        model(input_ids=ids[:, :0], labels=lab)  # no source tokens: the class's own forward raises inside the call
    assert st.taken is not None  # armed: what the compiled branch leaves
    monkeypatch.undo()
    model.eval(), ref.eval()  # dropout off: the two forwards compare exactly
    with torch.no_grad():  # an unlabelled call takes the class's own forward: its head must see the real input
        out = model(input_ids=ids, decoder_input_ids=lab.clamp(min=0))
    assert st.taken is None and out.logits.shape == (*lab.shape, ref.base_model.model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, ref(input_ids=ids, decoder_input_ids=lab.clamp(min=0)).logits)
