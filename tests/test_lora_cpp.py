"""``peftfast._C``: build, op registration (opcheck), the C++ CPU LoRA kernels against the Triton kernels
(interpreter) and an fp64 reference, and the fallback when the extension is missing.

Numerical parity of the cpp backend over dtypes/shapes/dropout/bias lives in tests/test_lora_ops.py (``cpp`` is one
of its backends); this file checks what is specific to the extension.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from peftfast import _ext
from peftfast.ops.lora import dropout_keep_mask, lora_linear_group

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"peftfast._C: {_ext.status()}")


def _group(m=37, k=80, ns=(50, 24, 24), r=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=dtype)
    ws = [(torch.randn(n, k, generator=g) / k**0.5).to(dtype) for n in ns]
    bs = [torch.randn(n, generator=g, dtype=dtype).requires_grad_() for n in ns]
    as_ = [(torch.randn(r, k, generator=g) / k**0.5).to(dtype).requires_grad_() for _ in ns]
    bms = [torch.randn(n, r, generator=g, dtype=dtype).requires_grad_() for n in ns]
    return x, ws, bs, as_, bms, [2.0, 0.5, 1.25][: len(ns)]


@needs_ext
def test_build_info_matches_this_torch():
    info = _ext.build_info()
    assert info["torch"] == torch.__version__
    assert info["cuda"] in ("0", "1")


@needs_ext
@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None,
                    reason="no nvcc or a CPU-only torch: the CUDA sources are not compiled here")
def test_cuda_sources_were_compiled():
    """With nvcc and a CUDA torch (CI has both), the default build compiles csrc/cuda for sm_80/sm_90, so a CUDA
    compile error fails the install; the extension records that it holds CUDA code."""
    assert _ext.build_info()["cuda"] == "1", "peftfast._C was built without its CUDA sources"


@needs_ext
def test_schemas_declared_once_in_cpp():
    for name in ("lora_group_fwd", "lora_group_bwd", "lora_group", "dropout_keep_mask", "build_info"):
        op = getattr(torch.ops.peftfast, name).default
        assert op._schema.name == f"peftfast::{name}"


@needs_ext
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck_lora_group_fwd(p):
    x, ws, bs, as_, bms, sc = _group()
    x.requires_grad_()
    e = x.new_empty(0)
    lbs = [e, torch.randn(24, requires_grad=True), e]
    bs = [bs[0], e, bs[2]]
    torch.library.opcheck(torch.ops.peftfast.lora_group_fwd.default,
                          (x, ws, bs, lbs, as_, bms, sc, p, torch.tensor([7])))
    # keep_xa=False: xa comes back empty and the registered backward rebuilds it
    ys, xa = torch.ops.peftfast.lora_group_fwd(x, ws, bs, lbs, as_, bms, sc, p, torch.tensor([7]), False)
    assert xa.shape == (0,) and xa.dtype == as_[0].dtype
    torch.library.opcheck(torch.ops.peftfast.lora_group_fwd.default,
                          (x, ws, bs, lbs, as_, bms, sc, p, torch.tensor([7]), False))
    # peftfast::lora_group: its autograd in C++, below it lora_group_fwd's outputs (fake kernel included)
    for keep in (True, False):
        torch.library.opcheck(torch.ops.peftfast.lora_group.default,
                              (x, ws, bs, lbs, as_, bms, sc, p, torch.tensor([7]), keep))


@needs_ext
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("need", [(True, True, [1, 1, 1]), (False, True, [0, 1, 0]), (True, False, [0, 0, 0])])
def test_opcheck_lora_group_bwd(p, need):
    x, ws, _, as_, bms, sc = _group()
    as_, bms = [a.detach() for a in as_], [b.detach() for b in bms]
    xa = torch.randn(37, 24)
    grads = [torch.randn(37, 50), None, torch.randn(37, 24)]
    torch.library.opcheck(torch.ops.peftfast.lora_group_bwd.default,
                          (x, xa, grads, ws, as_, bms, sc, p, torch.tensor([7]), *need))
    # an xa the forward did not keep (empty) is rebuilt: the same results as passing the forward's xa
    kept = torch.ops.peftfast.lora_group_fwd(x, ws, [x.new_empty(0)] * 3, [x.new_empty(0)] * 3, as_, bms, sc, p,
                                             torch.tensor([7]))[1]
    args = (grads, ws, as_, bms, sc, p, torch.tensor([7]), *need)
    bwd = torch.ops.peftfast.lora_group_bwd
    want, got = bwd(x, kept, *args), bwd(x, xa[:0, 0], *args)
    for g, w in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        assert torch.equal(g, w)
    torch.library.opcheck(torch.ops.peftfast.lora_group_bwd.default, (x, xa[:0, 0], *args))
    with pytest.raises(RuntimeError, match="xa has shape"):
        torch.ops.peftfast.lora_group_bwd(x, xa[:5], *args)


@needs_ext
def test_opcheck_dropout_keep_mask():
    torch.library.opcheck(torch.ops.peftfast.dropout_keep_mask.default,
                          (torch.empty(0), torch.tensor([3]), 2, 37, 80, 0.1))


@needs_ext
@pytest.mark.parametrize("seed", [0, 1, 123456, 2**31 - 2])
@pytest.mark.parametrize("p", [0.05, 0.5])
@pytest.mark.parametrize("k", [80, 83])  # 83: rows end in a tail the SIMD steps do not cover
def test_philox_masks_identical_to_triton(seed, p, k):
    """The C++ Philox stream reproduces tl.rand bit for bit: both backends drop the same elements."""
    a = dropout_keep_mask(seed, 3, 37, k, p, device=torch.device("cpu"), backend="cpp")
    b = dropout_keep_mask(seed, 3, 37, k, p, device=torch.device("cpu"), backend="triton")
    assert torch.equal(a, b)
    assert abs(a.float().mean().item() - (1 - p)) < 0.03


_EACH_PATH = """
import torch
from peftfast import _ext
from peftfast.ops.lora import dropout_keep_mask
print(_ext.build_info()["simd"])
for seed, p in ((5, 0.05), (2**31 - 2, 0.5)):
    a = dropout_keep_mask(seed, 2, 19, 75, p, device=torch.device("cpu"), backend="cpp")
    b = dropout_keep_mask(seed, 2, 19, 75, p, device=torch.device("cpu"), backend="triton")
    assert torch.equal(a, b), (seed, p)
"""


@needs_ext
def test_every_philox_path_matches_triton():
    """Each CPU path (AVX-512, AVX2, scalar: the ones this CPU has) draws the masks of tl.rand, in a process
    capped at that path by PEFTFAST_CPU_SIMD."""
    best = _ext.build_info()["simd"]
    order = ["scalar", "avx2", "avx512"]
    for cap in order[: order.index(best) + 1]:
        env = {**os.environ, "PEFTFAST_CPU_SIMD": cap, "TRITON_INTERPRET": "1"}
        out = subprocess.run([sys.executable, "-c", _EACH_PATH], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-1] == cap


@needs_ext
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cpp_equals_triton_with_dropout(p):
    """Same seed → same masks → the same outputs and gradients from the C++ and the Triton (interpreter) kernels."""
    x, ws, bs, as_, bms, sc = _group(m=29, k=72, ns=(40, 24), dtype=torch.float32)
    x.requires_grad_()
    leaves = [x, *bs[:2], *as_[:2], *bms[:2]]
    gouts = [torch.randn(29, n) for n in (40, 24)]
    res = {}
    for be in ("cpp", "triton"):
        for t in leaves:
            t.grad = None
        ys = lora_linear_group(x, ws[:2], bs[:2], as_[:2], bms[:2], sc[:2], dropout_p=p, seed=99, backend=be)
        torch.autograd.backward(ys, gouts)
        res[be] = [y.detach() for y in ys] + [t.grad.clone() for t in leaves]
    for a, b in zip(res["cpp"], res["triton"]):
        assert (a - b).abs().max().item() <= 2e-4 * max(1.0, b.abs().max().item())


@needs_ext
@pytest.mark.parametrize("need", [(True, True, [1, 1, 1]), (False, True, [0, 1, 0]), (True, False, [1, 0, 1])])
def test_cuda_key_implementation_matches_the_cpp_op(need):
    """What the ops run for the CUDA key (the Triton launchers, here in the interpreter on CPU tensors) returns what
    the C++ kernels return: same outputs, same dA_cat (one tensor), same dBs, empty tensors for what is not needed."""
    from peftfast.ops import lora as L

    x, ws, bs, as_, bms, sc = _group(m=29, k=72)
    as_, bms = [a.detach() for a in as_], [b.detach() for b in bms]
    e = x.new_empty(0)
    seed = torch.tensor([11])
    fwd_cuda, bwd_cuda = L._fwd_impl("triton"), L._bwd_impl("triton")
    fwd_args = (x, ws, [bs[0].detach(), e, e], [e, e, e], as_, bms, sc, 0.3, seed)
    for got, want in zip(fwd_cuda(*fwd_args)[0], torch.ops.peftfast.lora_group_fwd(*fwd_args)[0]):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
    xa = torch.ops.peftfast.lora_group_fwd(*fwd_args)[1]
    grads = [torch.randn(29, 50), None, torch.randn(29, 24)]
    bwd_args = (x, xa, grads, ws, as_, bms, sc, 0.3, seed, *need)
    got, want = bwd_cuda(*bwd_args), torch.ops.peftfast.lora_group_bwd(*bwd_args)
    for g, w in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=2e-4, atol=2e-4)
    # keep_xa=False on both: an empty xa forward, rebuilt in backward
    assert fwd_cuda(*fwd_args, False)[1].shape == (0,)
    assert torch.ops.peftfast.lora_group_fwd(*fwd_args, False)[1].shape == (0,)
    kept = bwd_cuda(x, fwd_cuda(*fwd_args)[1], *bwd_args[2:])
    got_e = bwd_cuda(x, xa.new_empty((0,)), *bwd_args[2:])
    for g, w in zip([got_e[0], got_e[1], *got_e[2]], [kept[0], kept[1], *kept[2]]):
        assert torch.equal(g, w)


@needs_ext
def test_chunked_masking_covers_many_row_chunks():
    """K large enough that the C++ kernels walk several row chunks (2**20 elements each) with dropout on."""
    m, k, r = 70, 32768, 4
    x = torch.randn(m, k, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, k, dtype=torch.float64) / k**0.5
    a = (torch.randn(r, k, dtype=torch.float64) / k**0.5).requires_grad_()
    b = torch.randn(8, r, dtype=torch.float64, requires_grad=True)
    (y,) = lora_linear_group(x, [w], [None], [a], [b], [1.5], dropout_p=0.2, seed=5, backend="cpp")
    y.backward(torch.ones_like(y))
    keep = dropout_keep_mask(5, 1, m, k, 0.2, device=x.device, backend="cpp")[0].double()
    xr, ar, br = (t.detach().clone().requires_grad_() for t in (x, a, b))
    yr = xr @ w.t() + 1.5 * ((xr * keep / 0.8) @ ar.t() @ br.t())
    yr.backward(torch.ones_like(yr))
    assert torch.allclose(y, yr, atol=1e-10)
    for got, want in ((x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        assert torch.allclose(got, want, atol=1e-9)


@needs_ext
def test_double_backward_is_a_clear_error():
    x, ws, bs, as_, bms, sc = _group(ns=(50,))
    x.requires_grad_()
    (y,) = lora_linear_group(x, ws, bs, as_, bms, sc, backend="cpp")
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@needs_ext
def test_bad_shapes_raise_from_the_op():
    x, ws, bs, as_, bms, sc = _group(ns=(50,))
    with pytest.raises(RuntimeError, match="lora_A 0 has shape"):
        torch.ops.peftfast.lora_group_fwd(x, ws, [x.new_empty(0)], [x.new_empty(0)], [as_[0][:, :40]], bms, sc, 0.0,
                                          torch.tensor([0]))


def test_missing_extension_falls_back_with_one_warning():
    """With the extension disabled (as when it is not built) import works, `auto` picks the ATen path on CPU and
    `backend="cpp"` says why it cannot run."""
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import peftfast\n"
        "    from peftfast import _ext\n"
        "    from peftfast.ops._backend import resolve_backend\n"
        "    print(resolve_backend('auto', torch.device('cpu')))\n"
        "    try:\n"
        "        resolve_backend('cpp', torch.device('cpu'))\n"
        "    except RuntimeError as e:\n"
        "        print('ERR', e)\n"
    )
    env = dict(os.environ, PEFTFAST_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "torch"
    assert lines[1].startswith("ERR") and "disabled by PEFTFAST_DISABLE_EXT" in lines[1]


@needs_ext
def test_extension_built_against_another_torch_is_refused(monkeypatch):
    monkeypatch.setattr(_ext, "build_info", lambda: {"torch": "1.0.0", "cuda": "0"})
    why = _ext._load()
    assert why is not None and "built against torch 1.0.0" in why and torch.__version__ in why and "rebuild" in why


# ----------------------------------------------------------------------------------------------------------------
# eager calls through _LoRAGroupOpFunction: the registered autograd's saved tensors and gradients, without
# torch.library's per-call wrapper
# ----------------------------------------------------------------------------------------------------------------
def _node(y: torch.Tensor) -> str:
    """The autograd node that made ``y``, past the views the public op takes of its outputs."""
    fn = y.grad_fn
    while type(fn).__name__ == "ViewBackward0":
        fn = fn.next_functions[0][0]
    return fn.name() if type(fn).__name__ == "CppFunction" else type(fn).__name__


CPP_NODE = "torch::autograd::CppNode<peftfast::(anonymous namespace)::LoRAGroupFunction>"


@pytest.fixture(params=["cpp-autograd", "python-function"])
def eager_path(request, monkeypatch):
    """The eager autograd of ``lora_linear_group`` on CPU: the C++ node of ``peftfast::lora_group`` (the default), or
    the Python ``_LoRAGroupOpFunction`` (``PEFTFAST_CPP_AUTOGRAD=0``, and where a recompute region hands ``xa``
    around); yields the node name expected."""
    from peftfast.ops import lora as lora_ops

    if request.param == "python-function":
        monkeypatch.setattr(lora_ops, "_CPP_AUTOGRAD", False)
        return "_LoRAGroupOpFunctionBackward"
    assert lora_ops._CPP_AUTOGRAD
    return CPP_NODE


@needs_ext
@pytest.mark.parametrize("x_grad,need", [(True, "all"), (False, "B only"), (True, "none")])
def test_direct_call_equals_the_registered_op(x_grad, need, eager_path):
    """``lora_linear_group`` runs ``lora_group_fwd`` / ``lora_group_bwd`` under one autograd node (the C++ one of
    ``peftfast::lora_group``, or the Python ``_LoRAGroupOpFunction``); the op called through the dispatcher's
    autograd kernel gives the same outputs, gradients and saved tensors, bit for bit, with ``needs_input_grad`` per
    member (here: only some members' B, or only x)."""
    from peftfast.ops.lora import _no_none, seed_tensor

    x, ws, bs, as_, bms, scales = _group()
    x.requires_grad_(x_grad)
    for t in [*bs, *as_, *bms]:
        t.requires_grad_(need == "all")
    if need == "B only":
        bms[1].requires_grad_(True)
    leaves = [t for t in [x, *bs, *as_, *bms] if t.requires_grad]
    dys = [torch.randn(37, w.shape[0]) for w in ws]

    def run(direct):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            if direct:
                ys = lora_linear_group(x, ws, bs, as_, bms, scales, dropout_p=0.25, seed=9, backend="cpp")
            else:
                ys, _ = torch.ops.peftfast.lora_group_fwd(x, list(ws), _no_none(bs, x), _no_none([None] * 3, x),
                                                          list(as_), list(bms), scales, 0.25,
                                                          seed_tensor(9, x.device, 0.25))
        grads = torch.autograd.grad(ys, leaves, dys) if leaves else ()
        return [y.detach() for y in ys], list(grads), saved, _node(ys[0]) if leaves else None

    got, ref = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(got[0], ref[0]))
    assert len(got[1]) == len(leaves) and all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))
    assert got[2] == ref[2]  # the same saved tensors (the registered setup_context runs in both)
    if leaves:
        assert got[3] == eager_path
        assert ref[3].startswith("GeneratedBackwardFor_peftfast_lora_group_fwd")


@needs_ext
def test_direct_call_is_seen_by_dispatch_modes_and_steps_aside_without_grad(eager_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, ws, bs, as_, bms, scales = _group(ns=(24,))
    with Seen() as seen:
        (y,) = lora_linear_group(x, ws, bs, as_, bms, scales[:1], backend="cpp")
    assert "peftfast.lora_group_fwd.default" in seen.ops
    assert _node(y) == eager_path
    with torch.no_grad():
        (y,) = lora_linear_group(x, ws, bs, as_, bms, scales[:1], backend="cpp")
    assert y.grad_fn is None


@needs_ext
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_autograd_equals_the_python_function(p, dtype):
    """The C++ node and the Python Function: the same outputs and every gradient, bit for bit: trainable base and
    LoRA biases, one member's output unused (its gradient None: no dB, no bias gradients for it), ``xa`` not kept
    (rebuilt in backward), a bf16 base with fp32 LoRA weights as PEFT's autocast_adapter_dtype leaves them."""
    from peftfast.ops import lora as lora_ops

    def run(cpp: bool):
        x, ws, bs, as_, bms, sc = _group(dtype=dtype, seed=3)
        x.requires_grad_()
        as_ = [a.detach().float().requires_grad_() for a in as_]
        bms = [b.detach().float().requires_grad_() for b in bms]
        g = torch.Generator().manual_seed(5)
        lbs = [None, torch.randn(24, generator=g).requires_grad_(), torch.randn(24, generator=g).requires_grad_()]
        leaves = [x, *bs, lbs[1], lbs[2], *as_, *bms]
        before = lora_ops._CPP_AUTOGRAD
        lora_ops._CPP_AUTOGRAD = cpp
        try:
            ys = lora_linear_group(x, ws, bs, as_, bms, sc, lora_biases=lbs, dropout_p=p, seed=11, backend="cpp",
                                   keep_xa=False)
        finally:
            lora_ops._CPP_AUTOGRAD = before
        loss = ys[0].float().square().sum() + ys[2].float().sin().sum()  # ys[1] unused
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [y.detach() for y in ys], grads, _node(ys[0])

    (ys_c, g_c, node_c), (ys_p, g_p, node_p) = run(True), run(False)
    assert node_c == CPP_NODE and node_p == "_LoRAGroupOpFunctionBackward"
    assert all(torch.equal(a, b) for a, b in zip(ys_c, ys_p))
    assert len(g_c) == len(g_p)
    for a, b in zip(g_c, g_p):
        assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and torch.equal(a, b)))
    assert g_c[2] is None and g_c[4] is None and g_c[10] is None  # member 1's bias, LoRA bias and B: output unused
    assert g_c[7] is not None  # its A still gets the (zero) rows of the stacked dA


@needs_ext
def test_registered_ops_that_cuda_paths_call_have_cuda_kernels():
    """The Triton (CUDA) implementations registered for the C++-declared ops the CUDA paths call through the
    dispatcher: the LoRA group, the NF4 LoRA linear, and the keep-mask that DoRA with dropout (QDoRA's NF4 path
    included) rebuilds its dropped input from (it had none: such a call on CUDA would have failed)."""
    import peftfast.ops.adapter  # noqa: F401
    import peftfast.ops.mlp  # noqa: F401
    import peftfast.ops.nf4  # noqa: F401  (registers the NF4 ops' CUDA implementations)
    import peftfast.ops.norm  # noqa: F401

    for op in ("lora_group_fwd", "lora_group_bwd", "dropout_keep_mask", "nf4_lora_fwd", "nf4_lora_bwd",
               # the Triton backend's route under torch.compile
               "rms_norm_fwd", "rms_norm_bwd", "layer_norm_fwd", "layer_norm_bwd", "act_mul_fwd", "act_mul_bwd",
               "adapter_fwd", "adapter_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"peftfast::{op}", "CUDA"), op


@needs_ext
@pytest.mark.parametrize("keep_xa", [None, True])
def test_registered_backward_returns_one_gradient_per_input_passed(keep_xa):
    """``lora_group_fwd``'s registered autograd gets the inputs the call passed: ``keep_xa`` left to its default is
    not one of them, and torch < 2.12 rejects a backward that returns more entries than there are inputs (opcheck and
    every compiled LoRA call failed under torch 2.11; later versions forgive it)."""
    from peftfast.ops import lora as L

    class Ctx:
        def save_for_backward(self, *ts):
            self.saved_tensors = ts

        def mark_non_differentiable(self, *ts):
            pass

    x, ws, bs, as_, bms, sc = _group(m=9, k=16)
    e = x.new_empty(0)
    inputs = (x, ws, [b.detach() for b in bs], [e, e, e], [a.detach() for a in as_], [b.detach() for b in bms],
              sc, 0.0, torch.tensor([3]))
    if keep_xa is not None:
        inputs = (*inputs, keep_xa)
    ys, xa = torch.ops.peftfast.lora_group_fwd(*inputs)
    ctx = Ctx()
    L._fwd_setup(ctx, inputs, (ys, xa))
    ctx.needs_input_grad = (True, *([[True] * 3] * 5), *([False] * (len(inputs) - 6)))
    grads = L._fwd_backward(ctx, [torch.ones_like(y) for y in ys], None)
    assert len(grads) == len(inputs)
    assert grads[0].shape == x.shape and all(len(g) == 3 for g in grads[1:6])


@needs_ext
def test_python_declared_schemas_equal_the_extensions():
    """Without ``peftfast._C`` the ops are declared from Python (``_SCHEMAS`` in ops/lora.py, nf4.py, adapter.py,
    ``_RMS_SCHEMAS`` in norm.py, ``_ACT_SCHEMAS`` in mlp.py):
    each schema string must be the one csrc/ops.cpp declares, or the two processes would run different ops."""
    from peftfast.ops import adapter as A
    from peftfast.ops import lora as L
    from peftfast.ops import mlp as M
    from peftfast.ops import nf4 as N
    from peftfast.ops import norm as R

    for schema in (*L._SCHEMAS, *N._SCHEMAS, *R._RMS_SCHEMAS, *M._ACT_SCHEMAS, *A._SCHEMAS):
        declared = torch._C.parse_schema("peftfast::" + schema)
        op = getattr(torch.ops.peftfast, declared.name.split("::")[1]).default
        assert str(op._schema) == str(declared), (str(op._schema), str(declared))
