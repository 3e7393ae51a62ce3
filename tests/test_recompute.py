"""Saved tensors rebuilt in backward (``peftfast.ops.recompute``): same gradients, target bytes not kept, nesting
inside other saved-tensor hooks, stepping aside under checkpointing, no leak without a backward."""

import gc
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from peftfast import _ext
from peftfast.bench import saved_activation_bytes
from peftfast.ops import recompute
from peftfast.ops.recompute import (
    capture,
    offered,
    rebuild_scope,
    rebuildable,
    rebuilding,
    rebuilding_offered,
    restored_rng,
    rng_state,
    why_not_rebuild,
)


def _leaves():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, generator=g).requires_grad_()
    w = torch.randn(7, 5, generator=g).requires_grad_()
    return x, w


def _double(t):
    return t * 2.0  # saves nothing (a scalar factor)


def _consumers(y, w):
    # three kinds of saved views of y: the transpose mm keeps, an offset slice pow keeps, and y itself (mul)
    a = y.t() @ w
    b = y.reshape(-1)[3:50] ** 2
    c = y * w[:, :1].expand(7, 12).contiguous()
    return a.sum() + b.sum() + c.square().sum()


def _run(rebuild: bool, wrap=lambda f: f()):
    x, w = _leaves()
    calls = []

    def again(src):
        calls.append(1)
        return _double(src)

    def step():
        y = _double(x)
        if rebuild:
            return rebuilding(y, again, (x,), _consumers, y, w)
        return _consumers(y, w)

    loss = wrap(step)
    loss.backward()
    return loss.detach(), x.grad, w.grad, len(calls)


def test_rebuilt_views_give_identical_gradients():
    want = _run(False)
    got = _run(True)
    for a, b in zip(want[:3], got[:3]):
        assert torch.equal(a, b)
    assert got[3] >= 1  # backward did rebuild


def test_target_storage_is_not_kept_and_outer_hooks_see_the_rest():
    """The outer hooks here are the bench's saved-bytes counter: it sees every other saved tensor (and the recipe's
    source, x, which is a leaf and so not counted), but never y's storage."""
    x, w = _leaves()
    y = _double(x)
    _, plain = saved_activation_bytes(lambda: _consumers(y, w), exclude=[x, w])
    _, rebuilt = saved_activation_bytes(lambda: rebuilding(y, _double, (x,), _consumers, y, w), exclude=[x, w])
    y_bytes = y.numel() * y.element_size()
    assert plain.total - rebuilt.total == y_bytes


def test_nests_inside_save_on_cpu():
    want = _run(False)
    with torch.autograd.graph.save_on_cpu():
        got = _run(True)
    for a, b in zip(want[:3], got[:3]):
        assert torch.equal(a, b)
    assert got[3] >= 1


def test_steps_aside_under_checkpointing_and_keeps_its_gradients():
    seen = []

    def wrapped(fn):
        def inner():
            seen.append(why_not_rebuild())
            return fn()

        return checkpoint(inner, use_reentrant=False)

    want = _run(False)
    got = _run(True, wrap=wrapped)
    for a, b in zip(want[:3], got[:3]):
        assert torch.equal(a, b)
    assert got[3] == 0 and seen[0] == "activation checkpointing is active"


def test_steps_aside_without_grad_and_for_views():
    with torch.no_grad():
        assert why_not_rebuild() == "grad mode is off (nothing is saved)"
    assert why_not_rebuild() is None
    x, w = _leaves()
    y = _double(x)
    calls = []
    # a view of a larger storage cannot be rebuilt from its own recipe: the region runs as is
    loss = rebuilding(y[1:], lambda s: calls.append(1) or _double(s)[1:], (x,), _consumers,
                      torch.cat([y[1:], y[:1]]), w)
    loss.backward()
    assert calls == []


def test_no_backward_leaves_nothing_alive():
    x, w = _leaves()
    y = _double(x)
    out = rebuilding(y, _double, (x,), lambda t: (t.t() @ w).exp(), y)
    ref = weakref.ref(out)
    del out
    gc.collect()
    assert ref() is None


# ---- tensors offered by a callee (the fused attention's q, k, v) ----
def _kernel(q, k, v):
    # stands in for the attention kernel: saves q, k (a transposed view) and v
    return ((q @ k.t()).tanh() @ v).sum()


def _model(x, w, transposed=False):
    """The callee chain: projections (what a rerun must redo), then the kernel on the offered tensors."""
    q = x * w[0]
    k = (x * w[1]).t().contiguous().t() if transposed else x * w[1]  # column-major, covering its storage
    v = (x + w[2]) * 0.5  # saves nothing itself: the kernel alone keeps v
    with offered(q, k, v):
        return _kernel(q, k, v)


def _offered_run(rebuild: bool, wrap=lambda f: f(), transposed=False, rerun_transposed=None):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 6, generator=g).requires_grad_()
    w = torch.randn(3, 6, generator=g).requires_grad_()
    calls = []

    def rerun(src):
        calls.append(1)
        return capture(_model, src, w, transposed if rerun_transposed is None else rerun_transposed)

    def step():
        if rebuild:
            return rebuilding_offered(rerun, (x,), _model, x, w, transposed)
        return _model(x, w, transposed)

    loss = wrap(step)
    loss.backward()
    return loss.detach(), x.grad, w.grad, len(calls)


@pytest.mark.parametrize("transposed", [False, True])
def test_offered_tensors_rebuilt_once_with_identical_gradients(transposed):
    want = _offered_run(False, transposed=transposed)
    got = _offered_run(True, transposed=transposed)
    for a, b in zip(want[:3], got[:3]):
        assert torch.equal(a, b)
    assert got[3] == 1  # one rerun serves q, k and v


def test_offered_tensors_are_not_kept():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 6, generator=g).requires_grad_()
    w = torch.randn(3, 6, generator=g).requires_grad_()
    _, plain = saved_activation_bytes(lambda: _model(x, w), exclude=[x, w])
    _, rebuilt = saved_activation_bytes(lambda: rebuilding_offered(lambda s: capture(_model, s, w), (x,), _model,
                                                                    x, w), exclude=[x, w])
    # q, k, v are 9 x 6 each; the tanh output stays
    assert plain.total - rebuilt.total == 3 * 9 * 6 * 4


def test_a_rerun_with_another_layout_is_laid_out_as_the_forward():
    """The forward's k was column-major, the rerun's row-major: the copy keeps the saved views' strides valid."""
    want = _offered_run(False, transposed=True)
    got = _offered_run(True, transposed=True, rerun_transposed=False)
    for a, b in zip(want[:3], got[:3]):
        assert torch.equal(a, b)


def test_a_rerun_that_misses_the_kernel_or_differs_is_an_error():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 6, generator=g).requires_grad_()
    w = torch.randn(3, 6, generator=g).requires_grad_()
    loss = rebuilding_offered(lambda s: capture(lambda t: t * 2, s), (x,), _model, x, w)
    with pytest.raises(RuntimeError, match="never reached the kernel"):
        loss.backward()
    loss = rebuilding_offered(lambda s: capture(_model, s[:4], w), (x,), _model, x, w)
    with pytest.raises(RuntimeError, match=r"offered tensor 0 as \(4, 6\) torch.float32, the forward as \(9, 6\)"):
        loss.backward()


# ---- the LoRA projections that feed the offered tensors: their x·Aᵀ comes from the rerun ----
def _lora_attention(backend: str, offer: bool = True):
    """q, k, v from one LoRA group with dropout (the rerun redraws its seed under the forward's RNG state), then
    the stand-in kernel on them; ``offer=False``: the kernel is called without an offer (no rerun will come)."""
    from peftfast.ops.lora import lora_linear_group

    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, 16, generator=g).requires_grad_()
    ws = [torch.randn(n, 16, generator=g) / 4 for n in (8, 8, 8)]
    as_ = [torch.randn(4, 16, generator=g).requires_grad_() for _ in range(3)]
    bs = [torch.randn(8, 4, generator=g).requires_grad_() for _ in range(3)]

    def model(h):
        q, k, v = lora_linear_group(h, ws, [None] * 3, as_, bs, [0.5, 1.0, 2.0], dropout_p=0.2, backend=backend)
        if not offer:
            return _kernel(q, k, v)
        with offered(q, k, v):
            return _kernel(q, k, v)

    def rerun(h, state):
        with restored_rng(state):
            return capture(model, h)

    return x, [x, *as_, *bs], model, rerun


def _bwd_xa_shapes(loss) -> list[tuple]:
    """The xa each lora_group_bwd call of ``loss.backward()`` receives (the C++ op: an empty one is recomputed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class _Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.peftfast.lora_group_bwd.default:
                seen.append(tuple(args[1].shape))
            return func(*args, **(kwargs or {}))

    with _Spy():
        loss.backward()
    return seen


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cpp", marks=pytest.mark.skipif(
    not _ext.available(), reason=f"peftfast._C: {_ext.status()}"))])
def test_offered_region_keeps_no_low_rank_product_and_the_rerun_supplies_it(backend):
    x, leaves, model, rerun = _lora_attention(backend)
    torch.manual_seed(7)
    want_loss = model(x)
    want_loss.backward()
    want = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch.manual_seed(7)
    state = rng_state(x.device)
    loss = rebuilding_offered(lambda h: rerun(h, state), (x,), model, x)
    shapes = _bwd_xa_shapes(loss)
    assert torch.equal(loss, want_loss)
    assert all(torch.equal(t.grad, w) for t, w in zip(leaves, want))
    if backend == "cpp":  # the registered backward got the rerun's xa: nothing computed twice
        assert shapes == [(11, 12)]
    plain, lean = _saved_plain_and_in_region(x, leaves, model, rerun)
    assert plain - lean == 3 * 11 * 8 * 4 + 11 * 12 * 4  # q, k, v and x·A_catᵀ


def _saved_plain_and_in_region(x, leaves, model, rerun) -> tuple[int, int]:
    """Saved bytes of ``model(x)`` alone and inside a ``rebuilding_offered`` region, from the same RNG state."""
    torch.manual_seed(7)
    _, plain = saved_activation_bytes(lambda: model(x), exclude=leaves)
    torch.manual_seed(7)
    state = rng_state(x.device)
    _, region = saved_activation_bytes(lambda: rebuilding_offered(lambda h: rerun(h, state), (x,), model, x),
                                       exclude=leaves)
    return plain.total, region.total


def test_without_the_offer_the_low_rank_product_is_kept_as_a_saved_tensor():
    """No offer taken, so no rerun: the slot keeps x·A_catᵀ through the outer hooks, which count it as saved."""
    x, leaves, model, rerun = _lora_attention("torch", offer=False)
    plain, region = _saved_plain_and_in_region(x, leaves, model, rerun)
    assert region == plain
    torch.manual_seed(7)
    model(x).backward()
    want = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch.manual_seed(7)
    state = rng_state(x.device)
    rebuilding_offered(lambda h: rerun(h, state), (x,), model, x).backward()
    assert all(torch.equal(t.grad, w) for t, w in zip(leaves, want))


def test_offered_outside_a_region_or_under_checkpointing_runs_as_is():
    want = _offered_run(False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 6, generator=g).requires_grad_()
    w = torch.randn(3, 6, generator=g).requires_grad_()
    _model(x, w).backward()  # no region: offered is a plain context
    assert torch.equal(x.grad, want[1])
    got = _offered_run(True, wrap=lambda f: checkpoint(f, use_reentrant=False))
    assert got[3] == 0 and all(torch.equal(a, b) for a, b in zip(want[:3], got[:3]))
    with torch.autograd.graph.save_on_cpu():
        got = _offered_run(True)
    assert got[3] == 1 and all(torch.equal(a, b) for a, b in zip(want[:3], got[:3]))


def test_views_of_a_larger_storage_are_not_offered():
    """A tensor that is part of a larger storage (a slice of a cache) would be rebuilt without the rest: it is kept."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 6, generator=g).requires_grad_()
    calls = []

    def fn(t):
        big = t * 3
        q = big[:5]
        with offered(q):
            return (q.exp() * q).sum()

    loss = rebuilding_offered(lambda s: calls.append(1) or capture(fn, s), (x,), fn, x)
    loss.backward()
    assert calls == []


@pytest.mark.parametrize("setting", ["none", "norms", "up", "attn", "mlp"])
def test_patch_reports_the_setting(setting):
    from _models import peft_model

    import peftfast

    model = peft_model("llama")
    peftfast.patch(model, recompute=setting)
    assert f"recompute={setting}" in peftfast.report(model).summary()
    blocks = [m._peftfast_block for m in model.modules() if "_peftfast_block" in m.__dict__]
    mlps = [m._peftfast_mlp for m in model.modules() if "_peftfast_mlp" in m.__dict__]
    assert blocks and mlps
    assert all(b.rebuild_norms == (setting != "none") for b in blocks)
    ropes = [m._peftfast_rope for m in model.modules() if "_peftfast_rope" in m.__dict__]
    assert ropes and all(r.rebuild_qkv == (setting in ("attn", "mlp")) for r in ropes)
    want = {"none": "none", "norms": "none", "up": "up", "attn": "up", "mlp": "gate_up"}[setting]
    assert all(m.recompute == want for m in mlps)


def test_patch_rejects_an_unknown_setting():
    from _models import peft_model

    import peftfast

    with pytest.raises(ValueError, match="unknown recompute 'all'; choose one of"):
        peftfast.patch(peft_model("llama"), recompute="all")


def test_a_torch_without_the_hook_api_runs_the_region_as_is(monkeypatch):
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    assert why_not_rebuild() == "this torch cannot list the active saved-tensor hooks"
    want = _run(False)
    got = _run(True)
    assert got[3] == 0 and all(torch.equal(a, b) for a, b in zip(want[:3], got[:3]))


# ----------------------------------------------------------------------------------------------------------------
# rebuild scopes: targets registered anywhere inside, saved by consumers further on
# ----------------------------------------------------------------------------------------------------------------
def _scoped(register: bool, modify: bool = False, scope: bool = True, outer=None):
    x, w = _leaves()
    calls = []

    def again(src):
        calls.append(1)
        return _double(src)

    def body():
        y = _double(x)
        if register:
            rebuildable(y, again, (x,))
        if modify:
            y.add_(1.0)  # written after its registration: must be kept, not rebuilt from x
        return _consumers(y, w)

    def run():
        return rebuild_scope(body) if scope else body()

    if outer is not None:
        with torch.autograd.graph.saved_tensors_hooks(*outer):
            loss, total = run(), None
    else:  # x, the recipe's source, is a leaf kept anyway (as a norm's input is by the norm)
        loss, saved = saved_activation_bytes(run, [x, w])
        total = saved.total
    loss.backward()
    return loss.detach(), x.grad, w.grad, len(calls), total


def test_scope_rebuilds_registered_targets_with_identical_gradients():
    ref = _scoped(register=False)
    got = _scoped(register=True)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    assert got[3] >= 1  # backward did rebuild
    assert ref[4] - got[4] == 7 * 12 * 4  # y's bytes
    assert ref[3] == 0


def test_scope_keeps_targets_written_after_registration():
    ref = _scoped(register=False, modify=True)
    got = _scoped(register=True, modify=True)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    assert got[3] == 0 and got[4] == ref[4]


def test_rebuildable_outside_a_scope_or_without_grad_is_a_no_op():
    got = _scoped(register=True, scope=False)
    assert got[3] == 0
    with torch.no_grad():
        rebuildable(torch.ones(3), lambda t: t, (torch.ones(3),))  # nothing to register, nothing raised


def test_scope_nests_inside_save_on_cpu_style_hooks():
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t

    ref = _scoped(register=False)
    got = _scoped(register=True, outer=(pack, lambda t: t))
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2]) and got[3] >= 1
    assert (7, 12) in packed  # the recipe's source went to the outer hooks


# ---- the size threshold: small targets are kept (the hooks' host time outweighs their bytes) ----
def test_regions_rebuild_from_the_threshold_up(monkeypatch):
    """``rebuilding``, ``rebuildable`` and ``rebuilding_offered`` rebuild a target (or from sources) of at least
    ``MIN_REBUILD_BYTES`` and keep a smaller one, with the same gradients either way."""
    y_bytes = 7 * 12 * 4  # _leaves' x, and so y
    want = _run(False)
    for limit, rebuilt in ((y_bytes, True), (y_bytes + 1, False)):
        monkeypatch.setattr(recompute, "MIN_REBUILD_BYTES", limit)
        got = _run(True)
        assert all(torch.equal(a, b) for a, b in zip(want[:3], got[:3]))
        assert (got[3] >= 1) is rebuilt
        ref, scoped = _scoped(register=False), _scoped(register=True)
        assert all(torch.equal(a, b) for a, b in zip(ref[:3], scoped[:3]))
        assert (scoped[3] >= 1) is rebuilt and (ref[4] - scoped[4] == y_bytes) is rebuilt
    want = _offered_run(False)
    for limit, rebuilt in ((9 * 6 * 4, True), (9 * 6 * 4 + 1, False)):  # the source x of _offered_run
        monkeypatch.setattr(recompute, "MIN_REBUILD_BYTES", limit)
        got = _offered_run(True)
        assert all(torch.equal(a, b) for a, b in zip(want[:3], got[:3]))
        assert (got[3] == 1) is rebuilt


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_a_model_too_small_to_rebuild_saves_what_recompute_none_does(arch, monkeypatch):
    """Under the threshold every region of a patched model steps aside (the backbone's scope, fused blocks, the
    MLPs' up reruns): the same saved bytes as ``recompute="none"`` and the same gradients; at 0 it saves less."""
    from _models import batch, loss_and_grads, peft_model

    import peftfast

    data = batch(arch)

    def run(setting: str, limit: int):
        monkeypatch.setattr(recompute, "MIN_REBUILD_BYTES", limit)
        model = peftfast.patch(peft_model(arch), recompute=setting)
        _, saved = saved_activation_bytes(lambda: model(**data).loss, list(model.parameters()))
        return saved.total, loss_and_grads(model, data)

    big = 1 << 40
    none, (loss, grads) = run("none", big)
    small, (loss_s, grads_s) = run("up", big)
    rebuilt, (loss_r, grads_r) = run("up", 0)
    assert small == none and rebuilt < none, (none, small, rebuilt)
    for got_loss, got in ((loss_s, grads_s), (loss_r, grads_r)):
        assert torch.equal(got_loss, loss)
        assert all(torch.equal(got[n], grads[n]) for n in grads)


def test_the_backbone_scope_opens_only_where_its_hidden_states_reach_the_threshold(monkeypatch):
    """The scope's size comes from ``input_ids`` and the embedding table (or from ``inputs_embeds``); an input it
    cannot size (Whisper's features) opens the scope as before."""
    from _models import batch, peft_model

    import peftfast
    from peftfast.modules import norm as norm_mod

    model = peftfast.patch(peft_model("llama"), recompute="up")
    backbone = next(m for m in model.modules() if "_peftfast_scope" in m.__dict__)
    ids = batch("llama")["input_ids"]
    hidden_bytes = ids.numel() * 32 * 4  # llama(hidden=32), fp32
    embeds = torch.zeros(*ids.shape, 32)
    opened = []
    real = norm_mod.rebuild_scope
    monkeypatch.setattr(norm_mod, "rebuild_scope", lambda fn, *a, **k: opened.append(1) or real(fn, *a, **k))
    for limit, small in ((hidden_bytes, False), (hidden_bytes + 1, True)):
        monkeypatch.setattr(recompute, "MIN_REBUILD_BYTES", limit)
        assert norm_mod._small_stack(backbone, (), {"input_ids": ids}) is small
        assert norm_mod._small_stack(backbone, (ids,), {}) is small
        assert norm_mod._small_stack(backbone, (), {"input_ids": None, "inputs_embeds": embeds}) is small
        assert norm_mod._small_stack(backbone, (embeds,), {}) is False  # a float input: not sized
        opened.clear()
        model(**batch("llama")).loss.backward()
        assert len(opened) == (0 if small else 1)
