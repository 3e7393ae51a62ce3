"""``torch.compile`` over patched models and the fused ops: no graph break located in peftfast's code, no recompile on
the second call, and compiled (``aot_eager``) loss and gradients equal to eager.

Model level: tiny patched PEFT Llama (LoRA and attention dropout, padded batch, fused loss) and Gemma-2 (attention
and final-logit soft-cap, sliding window, packed rows) on the default CPU backend. Op level: the same ops chained in
one function on both backends (``triton`` runs the kernels in the interpreter inside the registered ops).
Breaks elsewhere (transformers, PEFT) are not this file's subject and are not counted.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch._dynamo
from _models import batch, max_rel_err, peft_model, trainable
from torch._dynamo.backends.debugging import ExplainWithBackend

import peftfast
from peftfast.ops.attention import flash_attention
from peftfast.ops.cross_entropy import fused_linear_cross_entropy, fused_linear_jsd
from peftfast.ops.rope import rope

PKG = os.path.dirname(os.path.abspath(peftfast.__file__))
# every file of the package: no graph break and no recompiling guard of ours anywhere (the norms, MLPs, LoRA, DoRA,
# NF4 and Adapter paths included, since each runs as registered ops under Dynamo)
OURS = {os.path.join(r, f) for r, _, fs in os.walk(PKG) for f in fs if f.endswith(".py")}
OURS_REL = tuple(os.path.relpath(p, PKG).replace(os.sep, "/") for p in OURS)
TOL = 1e-5


def _breaks_in_our_files(explanation) -> list[str]:
    """Breaks whose innermost peftfast frame (as ``test_integration._our_breaks`` locates them) is in ``OURS``."""
    out = []
    for br in explanation.break_reasons:
        frames = [f for f in br.user_stack if os.path.abspath(f.filename).startswith(PKG)]
        if frames and os.path.abspath(frames[-1].filename) in OURS:
            out.append(f"{frames[-1].filename.removeprefix(PKG)}:{frames[-1].lineno}: {br.reason.splitlines()[0]}")
    return out


class _Recompiles(logging.Handler):
    """Collects Dynamo's recompilation messages (each names the failed guards with their source lines)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _compare(fn, leaves: list[torch.Tensor], *args, **kwargs):
    """Eager, then two calls of ``torch.compile(fn, backend=explain(aot_eager))``: asserts equal losses / gradients
    and that no recompilation was triggered by a guard in our files. Returns (explanation, recompile messages)."""

    def run(f):
        for t in leaves:
            t.grad = None
        torch.manual_seed(11)  # the dropout seeds are drawn from torch's RNG, in eager as in the graph
        loss = f(*args, **kwargs)
        loss.backward()
        return loss.detach(), [t.grad.clone() for t in leaves]

    want = run(fn)
    torch._dynamo.reset()
    explain = ExplainWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=explain)
    log = logging.getLogger("torch._dynamo.guards.__recompiles")
    recompiles = _Recompiles()
    torch._logging.set_logs(recompiles=True)
    log.addHandler(recompiles)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [run(compiled), run(compiled)]
        out = explain.output()
    finally:
        log.removeHandler(recompiles)
        torch._logging.set_logs()
        torch._dynamo.reset()
    # Dynamo traces through a functools cache in compiled code with a warning naming the caller's file: none of ours
    cached = [str(w.message) for w in caught if "lru_cache" in str(w.message)]
    assert not [m for m in cached if PKG in m], cached
    for loss, grads in got:
        assert max_rel_err(loss, want[0]) <= TOL
        assert all(max_rel_err(g, w) <= TOL for g, w in zip(grads, want[1]))
    # a failed guard reads "- 0/0: <guard>  # <source line>  # <path>:<line> in <function>"; the user stack that
    # follows it passes through our wrappers whoever owns the guard, so only the guard's own location counts
    guards = [ln for m in recompiles.messages for ln in m.splitlines() if re.match(r"\s*- \d+/\d+: ", ln)]
    ours = [g for g in guards if (m := re.search(r"(peftfast/[\w/]+\.py):\d+ in ", g)) and
            m.group(1).removeprefix("peftfast/") in OURS_REL]
    assert not ours, ours[0]
    return out, recompiles.messages


# ----------------------------------------------------------------------------------------------------------------
# patched models
# ----------------------------------------------------------------------------------------------------------------
def _counts(model) -> dict[str, tuple[int, int]]:
    """(fused, fallback) calls per patched RoPE / attention module and for the loss."""
    rt = peftfast.report(model).module_runtime(model)
    return {n: (r["fused"], sum(r["fallbacks"].values())) for n, r in rt.items()
            if n.endswith(("(rope)", "(attention)", "(loss)"))}


def _llama_padded():
    model = peft_model("llama", r=4, lora_alpha=8, lora_dropout=0.1, model_kwargs={"attention_dropout": 0.1})
    data = batch("llama", seq=11, bsz=3)
    mask = torch.ones_like(data["input_ids"])
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    data["attention_mask"] = mask
    data["labels"] = data["labels"].masked_fill(mask == 0, -100)
    return model, data


def _gemma2_packed():
    model = peft_model("gemma2", r=4, lora_alpha=8)
    data = batch("gemma2", seq=11, bsz=2)
    data["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7]])
    return model, data


# every fusion on in both, no break in any peftfast file (Gemma-2 once ran with its MLP and norm fusions off)
@pytest.mark.parametrize("build,recompute", [(_llama_padded, "attn"), (_gemma2_packed, "norms")],
                         ids=["llama-padded-dropout", "gemma2-packed"])
def test_patched_model_compiles_without_breaks_in_our_code(build, recompute):
    model, data = build()
    # Llama with recompute="attn": the eager run reruns q/k/v in backward, the compiled one leaves that to the compiler
    peftfast.patch(model, fuse_loss=True, recompute=recompute)
    explanation, _ = _compare(lambda **d: model(**d).loss, list(trainable(model).values()), **data)
    assert _breaks_in_our_files(explanation) == []
    counts = _counts(model)
    assert {n.rsplit(" ", 1)[1] for n in counts} == {"(rope)", "(attention)", "(loss)"}
    # every call on the fused path; under torch.compile a call site counts once per compilation: eager 1 + 1 trace
    # (+ 1 per recompilation or resumed frame that breaks elsewhere may still cause)
    assert all(fused >= 2 and fallbacks == 0 for fused, fallbacks in counts.values()), counts
    if not explanation.graph_break_count:
        assert set(counts.values()) == {(2, 0)}


def test_compiled_fallback_is_still_counted_with_its_reason():
    model = peft_model("llama", r=4, lora_alpha=8, model_kwargs={"layers": 1})
    peftfast.patch(model, fuse_mlp=False, fuse_norms=False)
    data = batch("llama")

    def loss(**d):
        return model(**d, output_attentions=True).loss  # the fused kernel returns no weights: SDPA fallback

    explanation, _ = _compare(loss, list(trainable(model).values()), **data)
    assert _breaks_in_our_files(explanation) == []
    (attn,) = [r for n, r in peftfast.report(model).module_runtime(model).items() if n.endswith("(attention)")]
    assert attn["fused"] == 0 and list(attn["fallbacks"]) == ["output_attentions=True (the fused kernel returns no "
                                                              "weights)"]
    assert attn["fallbacks"]["output_attentions=True (the fused kernel returns no weights)"] >= 2


# ----------------------------------------------------------------------------------------------------------------
# the ops, both backends
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_chain_compiles_as_one_graph(backend):
    g = torch.Generator().manual_seed(0)
    b, hq, hk, s, d, v = 2, 4, 2, 9, 16, 37
    q = torch.randn(b, s, hq, d, generator=g).transpose(1, 2).requires_grad_()  # strided, as models make them
    k = torch.randn(b, hk, s, d, generator=g).requires_grad_()
    val = torch.randn(b, hk, s, d, generator=g).requires_grad_()
    theta = torch.randn(1, s, d // 2, generator=g)
    cos, sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    qseg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, -3, -3]], dtype=torch.int32)
    kseg = torch.where(qseg == -3, -1, qseg)
    w = (torch.randn(v, hq * d, generator=g) / 8).requires_grad_()
    w_t = torch.randn(v, 24, generator=g) / 5
    h_t = torch.randn(b * s, 24, generator=g)
    labels = torch.randint(0, v, (b * s,), generator=g)
    labels[::5] = -100

    def step(q, k, val, w):
        qr, kr = rope(q, k, cos, sin, backend=backend)
        o = flash_attention(qr, kr, val, causal=True, softcap=20.0, window=6, qseg=qseg, kseg=kseg, dropout_p=0.2,
                            backend=backend)
        h = o.reshape(b * s, hq * d)
        ce = fused_linear_cross_entropy(h, w, labels, softcap=30.0, num_items_in_batch=13, backend=backend,
                                        chunk_size=8)
        jsd = fused_linear_jsd(h, w, h_t, w_t, labels, beta=0.3, temperature=2.0, backend=backend, chunk_size=8)
        return ce + jsd

    explanation, recompiles = _compare(step, [q, k, val, w], q, k, val, w)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1 and not recompiles
    names = {str(n.target) for gm in explanation.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert {"peftfast.rope.default", "peftfast.flash_attn_fwd.default", "peftfast.fused_linear_ce.default",
            "peftfast.fused_linear_jsd.default"} <= names



@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5", "bart"])
def test_other_fused_losses_compile_without_breaks_in_our_code(arch):
    """BERT's fused masked-LM loss (no row selection under torch.compile: a data-dependent shape), GPT-2's fused
    causal loss (its own argument list, bound by signature) and the encoder-decoder loss of T5 and BART (the head's
    input taken by a pre-hook registered once at install: one registered per call would break the graph): the same
    loss and gradients as eager, which for BERT selects the labelled rows, no graph break in our files, every call
    fused."""
    model = peft_model(arch, r=4, lora_alpha=8)
    data = batch(arch, seq=11, bsz=2)
    peftfast.patch(model, fuse_loss=True)
    explanation, _ = _compare(lambda **d: model(**d).loss, list(trainable(model).values()), **data)
    assert _breaks_in_our_files(explanation) == []
    fused, fallbacks = _counts(model)["base_model.model (loss)"]
    assert fused >= 2 and fallbacks == 0


def test_packed_mlp_compiles_without_breaks_in_our_code():
    """Phi-3's packed gate_up MLP op (LoRA dropout on) under torch.compile: the same loss and gradients as eager,
    no graph break in our files, every MLP call fused."""
    model = peft_model("phi3", r=4, lora_alpha=8, lora_dropout=0.1)
    data = batch("phi3", seq=11, bsz=2)
    peftfast.patch(model, fuse_loss=True)
    explanation, _ = _compare(lambda **d: model(**d).loss, list(trainable(model).values()), **data)
    assert _breaks_in_our_files(explanation) == []
    rt = peftfast.report(model).module_runtime(model)
    mlps = [r for n, r in rt.items() if n.endswith(".mlp")]
    assert len(mlps) == 2 and all(r["fused"] >= 2 and not r["fallbacks"] for r in mlps), rt


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_moe_experts_compile_without_breaks_in_our_code(arch):
    """LoRA on Qwen3-MoE's and gpt-oss's expert stacks under torch.compile: the experts op is one traced node (the
    CPU path's per-expert host read inside it), the same loss and gradients as eager, every experts call fused."""
    from test_moe import _gpt_oss, _ids, _moe_model

    model = _moe_model("qwen3_moe", modules=("q_proj",)) if arch == "qwen3_moe" else _gpt_oss(trainable_biases=True)
    peftfast.patch(model, fuse_norms=False, fuse_attention=False, fuse_rope=False)
    ids = _ids(10)
    explanation, _ = _compare(lambda **d: model(**d).loss, list(trainable(model).values()), input_ids=ids,
                              labels=ids)
    assert _breaks_in_our_files(explanation) == []
    rt = peftfast.report(model).module_runtime(model)
    experts = [r for n, r in rt.items() if n.endswith(".experts")]
    assert len(experts) == 2 and all(r["fused"] >= 2 and not r["fallbacks"] for r in experts), rt


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gpt_oss", [False, True])
def test_moe_experts_op_compiles_as_one_node(backend, gpt_oss):
    """The experts op alone, both paths (Triton: the grouped kernels in the interpreter, inside the registered op):
    one graph, no break, no recompile, eager's output and gradients; also gpt-oss's (trainable biases, transposed
    stacks, interleaved clamped SwiGLU)."""
    from test_moe import GATES, _case, _leaves

    from peftfast.ops.moe import experts_lora

    x, idx, wts, gu, dn = _case(t=13, transposed=gpt_oss, bias=gpt_oss)
    leaves = _leaves(x, wts, gu, dn)
    gate = GATES["gpt_oss"] if gpt_oss else "silu"
    explanation, recompiles = _compare(
        lambda: experts_lora(x, idx, wts, gu, dn, act=gate, transposed=gpt_oss, backend=backend).square().sum(),
        leaves)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1 and not recompiles


def test_dora_compiles_without_breaks_in_our_code():
    """DoRA layers with LoRA dropout (the mask drawn from a seed tensor, no host read) under torch.compile: the same
    loss and gradients (magnitudes included) as eager, no graph break in our files."""
    model = peft_model("llama", r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True)
    data = batch("llama", seq=11, bsz=2)
    peftfast.patch(model)
    explanation, _ = _compare(lambda **d: model(**d).loss, list(trainable(model).values()), **data)
    assert _breaks_in_our_files(explanation) == []
    assert any("lora_magnitude_vector" in n for n in trainable(model))


# what must hold where peftfast._C is not loaded, run in a process with PEFTFAST_DISABLE_EXT=1
_WITHOUT_EXT = (
    "tests/test_compile.py::test_patched_model_compiles_without_breaks_in_our_code",
    "tests/test_compile.py::test_packed_mlp_compiles_without_breaks_in_our_code",
    "tests/test_compile.py::test_dora_compiles_without_breaks_in_our_code",
    "tests/test_nf4.py::test_nf4_model_compiles_without_graph_breaks_in_our_ops",
    "tests/test_nf4.py::test_qdora_layer_compiles_as_one_graph",
    "tests/test_integration.py::test_compile_matches_eager",
    "tests/test_integration.py::test_compile_has_no_graph_breaks_in_our_ops",
    "tests/test_lora.py::test_group_saves_x_once",
    "tests/test_mlp.py::test_fused_mlp_saves_less_than_layerwise_and_peft",
    "tests/test_compile.py::test_triton_backend_under_compile_launches_only_inside_registered_ops",
    "tests/test_compile.py::test_python_cuda_kernels_match_the_cpu_kernels",
    "tests/test_compile.py::test_ops_on_the_compiled_triton_route_pass_opcheck",
    "tests/test_compile.py::test_triton_backend_compiles_as_one_graph",
)


def test_without_the_extension_the_seeded_ops_stay_registered_and_compile():
    """Without ``peftfast._C`` (not built, or built against another torch) the seeded LoRA and NF4 ops' schemas are
    defined in Python, the torch backend their CPU kernel: dropout seeds stay tensors, so the compile tests of the
    LoRA, gated-MLP, DoRA, NF4 and QDoRA paths pass there too (before, the seed's ``.item()`` broke the graph in
    each), and the saved tensors are the registered path's (x and x·Aᵀ, and the 8-byte seed). So are the RMSNorm,
    act · u and Adapter ops' (the Triton backend's route under ``torch.compile``), which pass opcheck there."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PEFTFAST_DISABLE_EXT="1")
    probe = subprocess.run([sys.executable, "-c", "import peftfast.ops.lora as L, peftfast.ops.nf4 as N, "
                            "peftfast.ops.norm as R, peftfast.ops.mlp as M, peftfast.ops.adapter as A; "
                            "from peftfast import _ext; print(_ext.available(), L._ATEN_OPS, N._ATEN_OPS, "
                            "R._ATEN_OPS, M._ATEN_OPS, A._ATEN_OPS)"],
                           env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert probe.stdout.split() == ["False"] + ["True"] * 5, probe.stdout + probe.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_WITHOUT_EXT], env=env,
                         capture_output=True, text=True, timeout=1500, cwd=root)
    tail = run.stdout[-4000:]
    assert run.returncode == 0, tail
    assert re.search(r"\b39 passed\b", tail) and "skipped" not in tail, tail


class _OpDepth(torch.utils._python_dispatch.TorchDispatchMode):
    """Tracks whether a ``peftfast`` op is running (its kernel, Triton launches included) and counts them."""

    def __init__(self):
        super().__init__()
        self.depth = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "peftfast":
            return func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[1]
        self.ops[name] = self.ops.get(name, 0) + 1
        self.depth += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.depth -= 1


def _adapted_bert() -> torch.nn.Module:
    from _models import BUILDERS

    torch.manual_seed(0)
    model = BUILDERS["bert"]().train()
    peftfast.add_adapters(model, peftfast.AdapterConfig(placement="houlsby", bottleneck_size=8, activation="silu"),
                          train_head=True)
    peftfast.set_adapter_backend(model, backend="triton")
    return model


def _nf4_llama(p: float) -> torch.nn.Module:
    model = peft_model("llama", lora_dropout=p)
    peftfast.quantize_base(model, block_size=16)
    return model


# case -> (model for a LoRA dropout p, its batch's family, patch options): a Llama (RMSNorm, add + RMSNorm, gated MLP
# with u rebuilt in backward, RoPE, attention), also with DoRA, with the gate/up and q/k/v reruns and on an NF4 base;
# a BERT (LayerNorm, two-layer MLP); a BERT with a Houlsby bottleneck Adapter; a Qwen3-MoE (LoRA on the expert stacks)
_FUSED_PATHS = {
    "llama": (lambda p: peft_model("llama", lora_dropout=p), "llama", {}),
    "bert": (lambda p: peft_model("bert", lora_dropout=p), "bert", {}),
    "adapter": (lambda p: _adapted_bert(), "bert", {}),
    "dora": (lambda p: peft_model("llama", lora_dropout=p, use_dora=True), "llama", {}),
    "llama-recompute-mlp": (lambda p: peft_model("llama", lora_dropout=p), "llama", {"recompute": "mlp"}),
    "llama-recompute-attn": (lambda p: peft_model("llama", lora_dropout=p), "llama", {"recompute": "attn"}),
    "nf4": (_nf4_llama, "llama", {}),
    "moe": (lambda p: _moe_llm(), "moe", {}),
}


def _moe_llm() -> torch.nn.Module:
    from test_moe import _moe_model

    return _moe_model("qwen3_moe")


def _batch(family: str) -> dict:
    if family != "moe":
        return batch(family)
    ids = torch.randint(2, 64, (2, 11), generator=torch.Generator().manual_seed(1))  # the MoE models' vocabulary
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("case", list(_FUSED_PATHS))
def test_triton_backend_under_compile_launches_only_inside_registered_ops(case, monkeypatch):
    """Under ``torch.compile`` a Triton launch (and the Python around it: counters, config lookups, imports) that
    Dynamo meets breaks the graph or fails, so on the Triton backend every launch of ours must sit inside a
    registered op, an opaque node with a fake kernel. Here with Dynamo's flag set by hand on the interpreter: every
    launch during a patched model's forward and backward happens inside a ``peftfast`` op, and the norms, act · u and
    Adapter (whose Triton launches ran in Python autograd Functions before) run as ops, with eager's loss and
    gradients."""
    from peftfast import _ext
    from peftfast.ops import _counters

    # without peftfast._C the registered LoRA ops' CPU kernel (ATen) draws other dropout masks than the Triton
    # kernels (the C++ one draws theirs): dropout off there, to keep the values comparable
    build, family, kw = _FUSED_PATHS[case]
    name, model, data = case, build(0.1 if _ext.available() else 0.0), _batch(family)
    peftfast.patch(model, backend="triton", **kw)
    want_loss, want = None, None
    for traced in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda traced=traced: traced)
        mode = _OpDepth()
        outside: list[str] = []

        class _Where(dict):
            def __setitem__(self, key, value):
                if mode.depth == 0:
                    outside.append(key)
                super().__setitem__(key, value)

            def __missing__(self, key):
                return 0

        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        monkeypatch.setattr(_counters, "_launches", _Where())
        with mode:
            loss = model(**data).loss
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if not traced:
            want_loss, want = loss.item(), grads
            assert outside, "the eager Triton backend launches from Python autograd Functions"
            continue
        assert not outside, sorted(set(outside))
        llama_ops = ("rms_norm_fwd", "rms_norm_bwd", "act_mul_fwd", "act_mul_bwd", "lora_group_fwd")
        expected = {"bert": ("layer_norm_fwd", "layer_norm_bwd", "lora_group_fwd"),
                    "nf4": ("rms_norm_fwd", "nf4_lora_fwd", "nf4_lora_bwd"),
                    "moe": ("rms_norm_fwd", "moe_experts_fwd", "moe_experts_bwd", "lora_group_fwd"),
                    "adapter": ("adapter_fwd", "adapter_bwd", "layer_norm_fwd")}.get(name, llama_ops)
        assert all(mode.ops.get(op) for op in expected), mode.ops
        assert abs(loss.item() - want_loss) <= 1e-5 * abs(want_loss)
        assert grads.keys() == want.keys() and max(max_rel_err(grads[n], want[n]) for n in want) <= 1e-4


def _python_kernel_cases() -> dict[str, list[tuple]]:
    """Arguments for each op whose CUDA kernel is a Python (Triton) function: odd shapes, strided rows, with and
    without the optional inputs, each form / activation, every need flag."""
    torch.manual_seed(0)
    m, n, i, hb = 37, 80, 56, 12
    wide = torch.randn(m, n + 16)
    x, xs = torch.randn(m, n), wide[:, 3:n + 3]  # xs: rows 96 apart (read in place)
    res, w, b, dy, dh = (torch.randn(m, n), torch.randn(n), torch.randn(n), torch.randn(m, n), torch.randn(m, n))
    g, u, dhm = torch.randn(2, 19, i), torch.randn(2, 19, i), torch.randn(2, 19, i)
    packed = torch.randn(m, 2 * i)
    wd, bd, wu, bu = torch.randn(hb, n) * 0.2, torch.randn(hb), torch.randn(n, hb) * 0.2, torch.randn(n)
    s = torch.tensor([0.7])
    rstd = torch.ops.peftfast.rms_norm_fwd(x, None, w, 1e-6, False, True)[2]
    h, rstd_h = torch.ops.peftfast.rms_norm_fwd(xs, res, w, 1e-6, True, False)[1:]
    _, mean, rstd_ln = torch.ops.peftfast.layer_norm_fwd(x, w, b, 1e-5, torch.float32)
    z = torch.ops.peftfast.adapter_fwd(x, None, wd, bd, wu, bu, s, "gelu")[1]
    return {
        "rms_norm_fwd": [(x, None, w, 1e-6, False, True), (xs, res, w, 1e-6, True, False), (x, res, w, 1e-5, False,
                                                                                           False)],
        "rms_norm_bwd": [(dy, x, w, rstd, None, False, True, True, True), (dy, h, w, rstd_h, dh, True, False, True,
                                                                           False), (dy, x, w, rstd, None, False, True,
                                                                                    False, True)],
        "layer_norm_fwd": [(x, w, b, 1e-5, torch.float32), (xs.contiguous(), w, None, 1e-5, torch.float32)],
        "layer_norm_bwd": [(dy, x, w, b, mean, rstd_ln, True, True, True), (dy, x, w, None, mean, rstd_ln, True,
                                                                            False, False)],
        "act_mul_fwd": [(g, u, "silu"), (packed[:, :i], packed[:, i:], "gelu_tanh"), (g, u, "gelu")],
        "act_mul_bwd": [(dhm, g, u, "silu"), (dhm[0], packed[:19, :i], packed[:19, i:], "gelu")],
        "adapter_fwd": [(x, None, wd, bd, wu, bu, s, "gelu"), (x, res, wd, None, wu, None, s, "silu")],
        "adapter_bwd": [(dy, z, wd, wu, s, "gelu", True, True, True), (dy, z, wd, wu, s, "gelu", False, False,
                                                                       False)],
    }


_PYTHON_KERNEL_OPS = ("rms_norm_fwd", "rms_norm_bwd", "layer_norm_fwd", "layer_norm_bwd", "act_mul_fwd",
                      "act_mul_bwd", "adapter_fwd", "adapter_bwd")


@pytest.mark.parametrize("op", _PYTHON_KERNEL_OPS)
def test_python_cuda_kernels_match_the_cpu_kernels(op):
    """The CUDA kernel each op gets from Python (its Triton launchers; run here on CPU tensors in the interpreter,
    they never run otherwise off a GPU) returns what the op's CPU kernel returns (C++ with ``peftfast._C``, ATen
    without): same shapes, dtypes and, to fp32 rounding, values, empty outputs where a need flag is off."""
    from peftfast.ops import _library, adapter, mlp, norm  # noqa: F401  (register the kernels)

    kernel = _library.CUDA_KERNELS[op]
    for args in _python_kernel_cases()[op]:
        got, want = kernel(*args), getattr(torch.ops.peftfast, op)(*args)
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        assert len(got) == len(want)
        for a, e in zip(got, want):
            assert a.shape == e.shape and a.dtype == e.dtype, (op, a.shape, e.shape, a.dtype, e.dtype)
            if e.numel():
                assert max_rel_err(a, e) <= 2e-5, (op, max_rel_err(a, e))


@pytest.mark.parametrize("op", _PYTHON_KERNEL_OPS)
def test_ops_on_the_compiled_triton_route_pass_opcheck(op):
    """``torch.library.opcheck`` (schema, fake kernel, autograd registration, AOT dispatch) of the ops the Triton
    backend runs through under ``torch.compile``, on their CPU kernels: the C++ ones with ``peftfast._C``, the ATen
    ones declared from Python without it (the subprocess test below runs that case)."""
    for args in _python_kernel_cases()[op]:
        torch.library.opcheck(getattr(torch.ops.peftfast, op).default, args)


@pytest.mark.parametrize("case", ["llama", "adapter", "dora", "moe"])
def test_triton_backend_compiles_as_one_graph(case):
    """A real ``torch.compile`` of a patched model on the Triton backend (the interpreter here): every Triton call
    sits in a registered op, so Dynamo makes one graph with no break and the compiled loss and gradients equal the
    eager Triton run's (before, Dynamo traced into the launches and failed). The ops' CPU kernels stand in for their
    CUDA ones inside the graph: C++ with ``peftfast._C``, which draws the Triton kernels' dropout masks."""
    from peftfast import _ext

    build, family, kw = _FUSED_PATHS[case]
    model, data = build(0.1 if _ext.available() else 0.0), _batch(family)
    peftfast.patch(model, backend="triton", **kw)
    explanation, _ = _compare(lambda **d: model(**d).loss, list(trainable(model).values()), **data)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_no_bytecode_dynamo_cannot_trace_in_the_package():
    """``del`` of a variable a nested function or generator captured compiles to ``DELETE_DEREF``, which Dynamo
    cannot trace: a graph break wherever it sits in a forward or backward (the DoRA-with-dropout MLP had one). None in
    any peftfast source file."""
    import dis
    import types

    found = []

    def walk(code: types.CodeType, path: str) -> None:
        found.extend(f"{path}:{ins.positions.lineno} {code.co_name}: del {ins.argval}"
                     for ins in dis.get_instructions(code) if ins.opname == "DELETE_DEREF")
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                walk(const, path)

    for path in sorted(OURS):
        with open(path) as f:
            walk(compile(f.read(), path, "exec"), os.path.relpath(path, PKG))
    assert not found, found
    assert len(OURS) > 40  # the whole package was read
