"""Triton kernels (forward, backward, split-K decode; grid, persistent and banded paths) against the independent
dense oracle, under TRITON_INTERPRET=1 on CPU (fp32/fp16 only: bf16 tl.dot is wrong in the interpreter).

Every case compares out, lse, dq, dk, dv with ``spattn.testing.assert_within``: the golden result is
``dense_attention`` (float64) on the pattern's brute-force token mask (no block tables involved), the baseline
``plain_attention`` in the test dtype; the kernels run under ``poison_empty()`` so an unwritten output is NaN.

Note [interpreter in one process]: the interpreter only works when ``triton`` itself was imported with
TRITON_INTERPRET=1 (its standard library is decorated at import), and our kernels are decorated when their
module is first imported. We set the variable before importing triton; if another test module imported triton
first, the cases are skipped here and re-run once in a subprocess by ``test_interpreter_subprocess``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import spattn  # noqa: E402
from spattn.ops.attention.impl import triton as tri  # noqa: E402
from spattn.testing import assert_within, brute_force_mask, dense_attention, plain_attention, poison_empty  # noqa: E402


def _interpreter_ready() -> bool:
    if CUDA:
        return True
    import triton.language.standard as standard

    if type(standard.zeros).__name__ != "InterpretedFunction":
        return False
    from spattn.ops.attention.impl.triton import _forward

    return type(_forward.attn_fwd_kernel).__name__ == "InterpretedFunction"


IN_PROCESS = _interpreter_ready()
DEVICE = "cuda" if CUDA else "cpu"
needs_interp = pytest.mark.skipif(not IN_PROCESS, reason="triton imported without the interpreter; see subprocess test")


def _patch_interpreter_index() -> None:
    """Note [numpy 2.4]: some triton releases' interpreter turn a scalar tensor into an int with ``int(array)``
    on a 1-element 1-D array, which numpy >= 2.4 refuses (``range(0, n)`` over a loaded count fails). The test
    side carries the fix: read the single element instead."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_spattn", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._spattn = True
    interpreter._patch_lang_tensor = patched


if IN_PROCESS and not CUDA:
    _patch_interpreter_index()


def interpreter_subprocess(path: str, timeout: int = 900):
    """A test that re-runs the test module at ``path`` in a child pytest under ``TRITON_INTERPRET=1``, skipped
    when this process already runs its cases (Note [interpreter in one process]); each interpreter test module
    binds it as ``test_interpreter_subprocess = interpreter_subprocess(__file__)``."""

    @pytest.mark.skipif(IN_PROCESS, reason="cases run in this process")
    def test_interpreter_subprocess():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", path],
                              env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    return test_interpreter_subprocess


test_interpreter_subprocess = interpreter_subprocess(__file__)


# ------------------------------------------------------------------------------------------------ helpers
def _qkv(B, H, Hkv, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    return mk(B, H, Lq, D), mk(B, Hkv, Lk, D), mk(B, Hkv, Lk, D)


def _grads(fn, q, k, v, do, dl):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.double() * do.double()).sum()
    if dl is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse.double() * dl.double(), 0).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def check(q, k, v, layout, allowed, *, backward=True, grad_lse=False, band=None):
    """Triton (under NaN poisoning) against the dense oracle on the token mask ``allowed`` [B|1, H|1, Lq, Lk].
    ``band``: force the banded path on (a list) or off ([]); None = what the library picks."""
    scale = q.shape[-1] ** -0.5
    eps = 1e-5 if q.dtype == torch.float32 else 2e-3
    allowed = allowed.to(q.device)

    def fast(q, k, v):
        if band is None:
            return tri.attention_triton(q, k, v, layout, scale=scale, return_lse=True)
        from spattn.ops.attention.impl.triton._op import TABLES, EagerAttention

        tables = [getattr(layout, n) for n in TABLES]
        use_decode = q.shape[2] <= tri.DECODE_MAX_QUERIES and q.shape[2] <= layout.block_size
        return EagerAttention.apply(q, k, v, scale, band, use_decode, False, *tables)

    golden = lambda q, k, v: dense_attention(q, k, v, allowed, scale)  # noqa: E731
    baseline = lambda q, k, v: plain_attention(q, k, v, allowed, scale)  # noqa: E731
    if not backward:
        with torch.no_grad(), poison_empty():
            got = fast(q, k, v)
        results = [got, golden(q, k, v), baseline(q, k, v)]
        names = ("out", "lse")
    else:
        g = torch.Generator().manual_seed(1)
        do = torch.randn(q.shape, generator=g).to(q)
        dl = torch.randn(q.shape[:3], generator=g).to(q.device) if grad_lse else None
        with poison_empty():
            got = _grads(fast, q, k, v, do, dl)
        results = [got, _grads(golden, q, k, v, do, dl), _grads(baseline, q, k, v, do, dl)]
        names = ("out", "lse", "dq", "dk", "dv")
    for i, name in enumerate(names):
        assert_within(results[0][i].float(), results[1][i], results[2][i].float(), k=2.0, eps=eps, what=name)
    return results[0]


def _layout_and_mask(pattern, B, H, Lq, Lk, causal, bs):
    layout = spattn.compile(pattern, Lq, Lk, causal=causal, block_size=bs, batch=B, heads=H, device=DEVICE)
    per_head = isinstance(pattern, spattn.PerHead)
    mask = brute_force_mask(pattern, Lq, Lk, causal=causal, heads=H if per_head else 1, batch=1)
    return layout, mask


S, W = spattn.Sinks, spattn.Window
CASES = [
    # id, (B, H, Hkv, Lq, Lk, D), pattern, causal, block_size, dtype
    pytest.param((1, 2, 1, 130, 130, 64), S(8) | W(48), True, 64, torch.float32, id="L130-H2-gqa-D64-sinkwin"),
    pytest.param((1, 1, 1, 127, 127, 80), spattn.Causal(), False, 32, torch.float16, id="L127-D80-causal-fp16"),
    pytest.param((2, 1, 1, 63, 130, 64), W(40, 8), True, 32, torch.float32, id="B2-Lq63-Lk130-window"),
    pytest.param((1, 2, 2, 1, 1, 64), spattn.Full(), False, 64, torch.float16, id="L1-full-fp16"),
    pytest.param((1, 1, 1, 96, 96, 32), spattn.Strided(3, block=16), True, 32, torch.float32, id="L96-strided"),
    pytest.param((1, 1, 1, 1025, 1025, 64), W(64), True, 128, torch.float32, id="L1025-window-fwd"),
    pytest.param((1, 1, 1, 130, 130, 128), W(50), True, 64, torch.float32, id="L130-D128-window"),
    pytest.param((1, 1, 1, 70, 150, 64), S(5) | W(20, 30), False, 32, torch.float32, id="noncausal-sinks-2sided"),
]


@needs_interp
@pytest.mark.parametrize("shape,pattern,causal,bs,dtype", CASES)
def test_forward_backward(shape, pattern, causal, bs, dtype):
    B, H, Hkv, Lq, Lk, D = shape
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, D, dtype)
    layout, mask = _layout_and_mask(pattern, B, H, Lq, Lk, causal, bs)
    check(q, k, v, layout, mask, backward=Lq < 1000)


class _Spy:
    """Wraps a kernel, counting launches (the launch still runs)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


ATOMIC_CASES = [  # Note [atomic backward]: the one-pass backward on awkward shapes (GQA, tails, Lq != Lk, D 80/128);
    # tma "load": q / dO through tensor descriptors (the interpreter has no descriptor reductions, so dQ stays atomic)
    pytest.param((1, 2, 1, 80, 80, 64), S(8) | W(30), True, 32, torch.float32, "load", id="L80-gqa-D64-sinkwin-tma"),
    pytest.param((1, 1, 1, 127, 127, 80), spattn.Causal(), False, 32, torch.float16, "0", id="L127-D80-causal-fp16"),
    pytest.param((2, 1, 1, 63, 130, 64), W(40, 8), True, 32, torch.float32, "0", id="B2-Lq63-Lk130-window"),
    pytest.param((1, 1, 1, 130, 130, 128), W(50), True, 64, torch.float32, "load", id="L130-D128-window-tma"),
    pytest.param((1, 2, 1, 96, 96, 32), spattn.Strided(3, block=16), True, 32, torch.float16, "0", id="L96-strided"),
]


@needs_interp
@pytest.mark.parametrize("shape,pattern,causal,bs,dtype,tma", ATOMIC_CASES)
def test_atomic_backward(monkeypatch, shape, pattern, causal, bs, dtype, tma):
    from spattn.ops.attention.impl.triton import _launch

    spy = _Spy(_launch.attn_bwd_fused_kernel)
    monkeypatch.setattr(_launch, "attn_bwd_fused_kernel", spy)
    monkeypatch.setenv("SPATTN_TRITON_BACKWARD", "atomic")
    monkeypatch.setenv("SPATTN_TRITON_TMA", tma)
    B, H, Hkv, Lq, Lk, D = shape
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, D, dtype, seed=21)
    layout, mask = _layout_and_mask(pattern, B, H, Lq, Lk, causal, bs)
    assert _launch._tma_modes(q, q, q.float()) == (tma == "load", False)
    check(q, k, v, layout, mask)
    assert spy.launches == 1


@needs_interp
def test_atomic_backward_tuning_leaves_dq_alone(monkeypatch):
    # the tuner benchmarks candidate configs by running them: they must accumulate into scratch, not into dQ
    from spattn.ops.attention.impl.triton import _launch, _tuning

    def tuning_choose(kernel, head_dim, dtype, facts, device, block_size, bench=None, **kw):
        if kernel == "bwd":
            for _ in range(2):
                bench(_tuning.INTERPRETER.fit(block_size))
        return _tuning.INTERPRETER.fit(block_size)

    monkeypatch.setattr(_tuning, "choose", tuning_choose)
    monkeypatch.setattr(_launch, "_bench", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setenv("SPATTN_TRITON_BACKWARD", "atomic")
    q, k, v = _qkv(1, 1, 1, 64, 64, 32, torch.float32, seed=25)
    layout, mask = _layout_and_mask(spattn.Causal(), 1, 1, 64, 64, True, 32)
    check(q, k, v, layout, mask)


@needs_interp
def test_atomic_backward_empty_rows_lse_grad_and_determinism_flag(monkeypatch):
    from spattn.ops.attention.impl.triton import _launch
    from spattn.ops.attention.impl.triton._op import TABLES, EagerAttention

    spy = _Spy(_launch.attn_bwd_fused_kernel)
    monkeypatch.setattr(_launch, "attn_bwd_fused_kernel", spy)
    monkeypatch.setenv("SPATTN_TRITON_BACKWARD", "atomic")
    L = 80
    ids = torch.zeros(2, L, dtype=torch.long)
    ids[0, 30:] = 1
    ids[0, 70:] = -1  # padding: empty rows (out 0, lse -inf, zero gradients)
    ids[1, 10:] = 1
    ids[1, 60:] = -1
    q, k, v = _qkv(2, 1, 1, L, L, 32, torch.float32, seed=23)
    pattern = spattn.Document(ids)
    layout = spattn.compile(pattern, L, L, causal=True, block_size=32, batch=2, device=DEVICE)
    out, lse, dq, dk, dv = check(q, k, v, layout, brute_force_mask(pattern, L, L, causal=True, batch=2), grad_lse=True)
    assert spy.launches == 1
    assert torch.equal(dq[0, :, 70:], torch.zeros_like(dq[0, :, 70:]))
    # deterministic=True takes the split kernels whatever the environment says
    tables = [getattr(layout, n) for n in TABLES]
    qs = q.clone().requires_grad_()
    EagerAttention.apply(qs, k, v, 0.2, [], False, True, *tables)[0].sum().backward()
    assert spy.launches == 1 and torch.isfinite(qs.grad).all()
    monkeypatch.setenv("SPATTN_TRITON_BACKWARD", "fused")
    with pytest.raises(ValueError, match="SPATTN_TRITON_BACKWARD"):
        EagerAttention.apply(q.clone().requires_grad_(), k, v, 0.2, [], False, False, *tables)[0].sum().backward()


@needs_interp
def test_banded_path_is_taken_and_equals_stored_masks():
    from spattn.ops.attention.impl.triton import _plan

    q, k, v = _qkv(1, 2, 1, 100, 130, 32, torch.float32, seed=2)
    layout, mask = _layout_and_mask(S(8) | W(40), 1, 2, 100, 130, True, 32)
    found = _plan.band(layout)
    assert found is not None and found[:3] == (40, 0, 8) and found[4], found
    banded = check(q, k, v, layout, mask, band=list(found), backward=False)
    stored = check(q, k, v, layout, mask, band=[], backward=False)
    for a, b in zip(banded, stored, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # not banded: a strided pattern, a document layout, and a band layout whose masks were tampered with
    assert _plan.band(spattn.compile(spattn.Strided(3, block=16), 96, 96, causal=True, block_size=32)) is None
    ids = torch.arange(96) // 40
    assert _plan.band(spattn.compile(spattn.Document(ids), 96, 96, causal=True, block_size=32)) is None
    masks = layout.masks.clone()
    masks[0, 0, -1] = ~masks[0, 0, -1]
    assert _plan.band(dataclasses.replace(layout, masks=masks, kv_mask_ids=layout.kv_mask_ids.clone())) is None


@needs_interp
def test_persistent_heaviest_first(monkeypatch):
    from spattn.ops.attention.impl.triton import _plan, _tuning

    monkeypatch.setattr(_tuning, "INTERPRETER", _tuning.Config(32, 32, 4, 1, persistent=True))
    q, k, v = _qkv(1, 2, 1, 150, 150, 32, torch.float32, seed=11)
    pattern = spattn.Strided(2, block=32) | W(10)  # rows visit 1 + qb // 2 blocks: uneven on purpose
    layout = spattn.compile(pattern, 150, 150, causal=True, block_size=32, device=DEVICE)
    check(q, k, v, layout, brute_force_mask(pattern, 150, 150, causal=True), backward=False)
    # the order visits every row tile once, heaviest first
    work = _plan.order(layout.kv_num_blocks.int(), layout.full_kv_num_blocks.int(), 1, 2, 32, 32, 150)
    assert sorted(work.tolist()) == list(range(2 * 5))
    weight = (layout.kv_num_blocks + layout.full_kv_num_blocks).expand(1, 2, -1).reshape(-1)
    assert (weight[work.long()].diff() <= 0).all()


@needs_interp
def test_document_varlen_empty_rows_and_lse_grad():
    # two sequences with different segment boundaries and trailing padding (id -1 attends nothing)
    L = 100
    ids = torch.zeros(2, L, dtype=torch.long)
    ids[0, 40:] = 1
    ids[0, 90:] = -1
    ids[1, 10:] = 1
    ids[1, 70:] = 2
    ids[1, 95:] = -1
    q, k, v = _qkv(2, 2, 1, L, L, 32, torch.float32, seed=3)
    pattern = spattn.Document(ids)
    layout = spattn.compile(pattern, L, L, causal=True, block_size=32, batch=2, heads=2, device=DEVICE)
    mask = brute_force_mask(pattern, L, L, causal=True, batch=2)
    out, lse, dq, dk, dv = check(q, k, v, layout, mask, grad_lse=True)
    assert torch.equal(out[0, :, 90:], torch.zeros_like(out[0, :, 90:]))
    assert torch.isinf(lse[0, :, 90:]).all() and (lse[0, :, 90:] < 0).all()
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


@needs_interp
@pytest.mark.parametrize(
    "shape,per_head,dtype",
    [pytest.param((1, 4, 2, 5, 200, 64), False, torch.float32, id="decode-q5-gqa-packed"),
     pytest.param((1, 2, 1, 1, 130, 32), True, torch.float32, id="decode-q1-perhead"),
     pytest.param((1, 4, 1, 16, 300, 80), False, torch.float16, id="decode-q16-D80-fp16")],
)
def test_decode_one_launch(shape, per_head, dtype):
    from spattn.ops.attention.impl.triton import _launch

    B, H, Hkv, Lq, Lk, D = shape
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, D, dtype, seed=5)
    pattern = S(8) | W(64)
    if per_head:
        pattern = spattn.PerHead([pattern, W(16)])
    layout, mask = _layout_and_mask(pattern, B, H, Lq, Lk, True, 32)
    assert Lq <= tri.DECODE_MAX_QUERIES
    check(q, k, v, layout, mask)  # forward through split-K decode, backward through the generic kernels
    # Note [fused combine]: the last program of each group resets its counter, so the buffer stays zeroed
    assert int(_launch._counters[q.device].abs().sum()) == 0


@needs_interp
def test_decode_band_and_stored_agree():
    q, k, v = _qkv(1, 2, 2, 3, 257, 64, torch.float32, seed=6)
    layout, mask = _layout_and_mask(S(4) | W(100), 1, 2, 3, 257, True, 32)
    a = check(q, k, v, layout, mask, backward=False, band=[])
    b = check(q, k, v, layout, mask, backward=False)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)


@needs_interp
def test_custom_op_traces_fullgraph():
    from spattn.ops.attention.impl.triton._op import TABLES

    q, k, v = _qkv(1, 2, 1, 64, 64, 32, torch.float32, seed=7)
    layout = spattn.compile(S(4) | W(16), 64, 64, causal=True, block_size=32, device=DEVICE)

    def f(q, k, v):
        reason = tri.supports(q, k, v, layout)  # must trace too (backend="auto" calls it)
        out, lse = tri.attention_triton(q, k, v, layout, scale=0.25, return_lse=True)
        return out * (2 if reason is None or CUDA else 2.0), lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, got_lse = compiled(q, k, v)
    want, want_lse = f(q, k, v)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_lse, want_lse)
    grads = []
    for fn in (compiled, f):
        qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
        fn(qs, ks, vs)[0].sum().backward()
        grads.append((qs.grad, ks.grad, vs.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    torch.library.opcheck(
        torch.ops.spattn.triton_attention_forward.default,
        (q, k, v, [getattr(layout, n) for n in TABLES], 0.25, [], False, False),
        test_utils=("test_schema", "test_faketensor"),
    )


@needs_interp
def test_backward_is_deterministic():
    q, k, v = _qkv(1, 2, 1, 64, 64, 32, torch.float32, seed=9)
    layout = spattn.compile(spattn.Causal(), 64, 64, block_size=32, device=DEVICE)
    run = lambda q, k, v: tri.attention_triton(q, k, v, layout, scale=0.2, return_lse=True)  # noqa: E731
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).to(q)
    a, b = _grads(run, q, k, v, do, None), _grads(run, q, k, v, do, None)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@needs_interp
def test_backward_grid_order_changes_nothing(monkeypatch):
    # Note [heads first]: the grid order only changes which program runs when, never a result (split: bitwise)
    from spattn.ops.attention.impl.triton import _launch

    q, k, v = _qkv(1, 2, 1, 64, 64, 32, torch.float32, seed=12)
    layout = spattn.compile(S(4) | W(20), 64, 64, block_size=32, device=DEVICE)
    run = lambda q, k, v: tri.attention_triton(q, k, v, layout, scale=0.2, return_lse=True)  # noqa: E731
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).to(q)
    got = {}
    for first in (True, False):
        monkeypatch.setattr(_launch, "HEADS_FIRST", first)
        got[first] = _grads(run, q, k, v, do, None)
    for x, y in zip(got[True], got[False], strict=True):
        assert torch.equal(x, y)


def test_tuner_key_is_layout_facts():
    from spattn.ops.attention.impl.triton import _plan

    causal = spattn.compile(spattn.Causal(), 1024, block_size=64)
    window = spattn.compile(S(64) | W(128), 1024, causal=True, block_size=64)
    fc = _plan.facts(causal.kv_indices, causal.full_kv_indices, causal.num_kv_blocks, 64, 1)
    fw = _plan.facts(window.kv_indices, window.full_kv_indices, window.num_kv_blocks, 64, 4)
    assert fc.startswith("bs64|dens2^0|") and fc.endswith("|G1"), fc
    assert "dens2^-" in fw and fw.endswith("|G4"), fw
    assert "Causal" not in fc and "Union" not in fw


def test_supports_reasons():
    q = torch.randn(1, 2, 64, 32)
    k = v = torch.randn(1, 2, 64, 32)
    layout = spattn.compile(spattn.Causal(), 64, 64, block_size=32)
    if not CUDA:
        assert "CUDA" in tri.supports(q, k, v, layout)
    assert "block_size" in tri._check(q, k, v, spattn.compile(spattn.Causal(), 64, 64, block_size=24))
    assert "multiple" in tri._check(torch.randn(1, 3, 64, 32), k, v, layout)
    assert tri._check(q, k, v, layout) is None
    with pytest.raises(ValueError, match="q_len"):
        tri.attention_triton(q[:, :, :32], k, v, layout, scale=1.0, return_lse=False)


@needs_interp
def test_custom_op_autograd_matches_eager_path():
    from spattn.ops.attention.impl.triton._op import TABLES

    q, k, v = _qkv(1, 2, 1, 40, 70, 32, torch.float32, seed=13)
    layout = spattn.compile(S(4) | W(20), 40, 70, causal=True, block_size=32, device=DEVICE)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(0))
    dl = torch.randn(q.shape[:3], generator=torch.Generator().manual_seed(1))
    eager = _grads(lambda q, k, v: tri.attention_triton(q, k, v, layout, scale=0.3, return_lse=True), q, k, v, do, dl)
    tables = [getattr(layout, n) for n in TABLES]
    via = lambda q, k, v: torch.ops.spattn.triton_attention_forward(q, k, v, tables, 0.3, [], False, False)  # noqa: E731
    op = _grads(via, q, k, v, do, dl)
    for a, b in zip(eager, op, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_interp
def test_decode_plan_is_cached_per_layout_and_inputs(monkeypatch):
    """Note [decode host cost]: the second eager decode call reuses the launch plan (no new plan, same scratch),
    stays exact under NaN poisoning, and a new scale, a strided input or a freed layout are handled."""
    import gc

    from spattn.ops.attention.impl.triton import _launch

    q, k, v = _qkv(2, 2, 1, 1, 200, 16, torch.float32, seed=12)
    layout, mask = _layout_and_mask(S(8) | W(64), 2, 2, 1, 200, True, 32)
    check(q, k, v, layout, mask, backward=False)  # makes the plan
    (plan,) = _launch._decode_plans.get(layout).values()
    scratch = plan.scratch

    def no_new_plan(*args, **kwargs):
        raise AssertionError("a cached decode call made a new plan")

    monkeypatch.setattr(_launch.DecodePlan, "__init__", no_new_plan)
    q2, _, _ = _qkv(2, 2, 1, 1, 200, 16, torch.float32, seed=13)
    check(q2, k, v, layout, mask, backward=False)  # new values, same plan, exact
    assert plan.scratch is scratch
    monkeypatch.undo()
    with torch.no_grad():
        other = tri.attention_triton(q2, k, v, layout, scale=0.5, return_lse=False)[0]
    gold, _ = dense_attention(q2, k, v, mask, 0.5)
    torch.testing.assert_close(other.double(), gold, atol=1e-5, rtol=1e-5)
    assert len(_launch._decode_plans.get(layout)) == 2
    qt = q2.transpose(-1, -2).contiguous().transpose(-1, -2)  # last dim not contiguous: copied, same answer
    check(qt, k, v, layout, mask, backward=False)
    cached = len(_launch._decode_plans._data)
    del layout
    gc.collect()
    assert len(_launch._decode_plans._data) == cached - 1  # the plans went with their layout


@needs_interp
@pytest.mark.parametrize("Lq", [pytest.param(70, id="prefill-fwd-bwd"), pytest.param(3, id="decode")])
def test_layout_builder_tables_through_the_kernels(Lq):
    """LayoutBuilder's layouts (tables padded to width NK, masks repeated) run in the kernels, checked against
    the dense oracle on ``spattn.compile``'s token mask of the same pattern and inputs."""
    from spattn.selectors import LayoutBuilder, TopK

    Lk = 100
    q, k, v = _qkv(1, 4, 2, Lq, Lk, 16, torch.float32, seed=14)
    pattern = S(4) | W(40) | TopK("pooled", 2)
    layout = LayoutBuilder(pattern, Lq, Lk, causal=True, block_size=32, batch=1, heads=4, device=DEVICE).build(q, k)
    assert layout.kv_indices.shape[-1] == layout.num_kv_blocks  # the fixed width
    ref = spattn.compile(pattern, Lq, Lk, causal=True, block_size=32, batch=1, heads=4, query=q, key=k)
    check(q, k, v, layout, ref.to_dense(), backward=Lq > 16)
