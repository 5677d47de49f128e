"""Triton kernels (forward, backward, split-K decode) against the reference, under TRITON_INTERPRET=1 on CPU.

Note [interpreter in one process]: the interpreter only works when ``triton`` itself was imported with
TRITON_INTERPRET=1 (its standard library is decorated at import). We set the variable before importing
triton; if another test module imported triton first, the cases are skipped here and re-run once in a
subprocess by ``test_interpreter_subprocess``.
"""

from __future__ import annotations

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
from spattn.ops.attention.impl.reference import attention_reference  # noqa: E402


def _interpreter_ready() -> bool:
    if CUDA:
        return True
    import triton.language.standard as standard

    return type(standard.zeros).__name__ == "InterpretedFunction"


IN_PROCESS = _interpreter_ready()
DEVICE = "cuda" if CUDA else "cpu"
needs_interp = pytest.mark.skipif(not IN_PROCESS, reason="triton imported without the interpreter; see subprocess test")


@pytest.mark.skipif(IN_PROCESS, reason="cases run in this process")
def test_interpreter_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite), "non-finite entries differ"
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0


def _check(fast: torch.Tensor, golden: torch.Tensor, lowp: torch.Tensor, name: str, eps: float) -> None:
    assert not torch.isnan(fast).any(), f"{name}: NaN"
    e_fast, e_ref = _err(fast, golden), _err(lowp, golden)
    assert e_fast <= 2 * e_ref + eps, f"{name}: triton err {e_fast:.3e} vs reference err {e_ref:.3e}"


def _run(fn, q, k, v, layout, scale, grad_lse: bool):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, layout, scale=scale, return_lse=True)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(out.shape, generator=g).to(out)
    loss = (out.float() * do.float()).sum()
    if grad_lse:
        dl = torch.randn(lse.shape, generator=g)
        loss = loss + torch.where(torch.isfinite(lse), lse * dl.to(lse), 0).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _compare(q, k, v, layout, *, backward=True, grad_lse=False):
    scale = q.shape[-1] ** -0.5
    eps = 1e-5 if q.dtype == torch.float32 else 2e-3
    if not backward:
        with torch.no_grad():
            out, lse = tri.attention_triton(q, k, v, layout, scale=scale, return_lse=True)
            g_out, g_lse = attention_reference(q.double(), k.double(), v.double(), layout, scale=scale, return_lse=True)
            r_out, r_lse = attention_reference(q, k, v, layout, scale=scale, return_lse=True)
        _check(out, g_out, r_out, "out", eps)
        _check(lse, g_lse, r_lse, "lse", eps)
        return out, lse
    fast = _run(tri.attention_triton, q, k, v, layout, scale, grad_lse)
    gold = _run(attention_reference, q.double(), k.double(), v.double(), layout, scale, grad_lse)
    lowp = _run(attention_reference, q, k, v, layout, scale, grad_lse)
    for name, a, g, r in zip(("out", "lse", "dq", "dk", "dv"), fast, gold, lowp, strict=True):
        _check(a, g, r, name, eps)
    return fast


def _qkv(B, H, Hkv, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    return mk(B, H, Lq, D), mk(B, Hkv, Lk, D), mk(B, Hkv, Lk, D)


CASES = [
    # id, (B, H, Hkv, Lq, Lk, D), pattern, causal, block_size, dtype
    pytest.param(
        (1, 2, 1, 200, 200, 64), spattn.Sinks(8) | spattn.Window(48), True, 64, torch.float32, id="L200-gqa-sinkwin"
    ),
    pytest.param((1, 1, 1, 127, 127, 80), spattn.Causal(), False, 32, torch.float16, id="L127-D80-causal-fp16"),
    pytest.param((2, 2, 2, 63, 130, 32), spattn.Window(40, 8), True, 32, torch.float32, id="Lq63-Lk130-window"),
    pytest.param((1, 2, 2, 1, 1, 64), spattn.Full(), False, 64, torch.float16, id="L1-full"),
    pytest.param((1, 1, 1, 96, 96, 32), spattn.Strided(3, block=16), True, 32, torch.float32, id="strided"),
]


@needs_interp
@pytest.mark.parametrize("shape,pattern,causal,bs,dtype", CASES)
def test_forward_backward(shape, pattern, causal, bs, dtype):
    B, H, Hkv, Lq, Lk, D = shape
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, D, dtype)
    layout = spattn.compile(pattern, Lq, Lk, causal=causal, block_size=bs, batch=B, heads=H, device=DEVICE)
    _compare(q, k, v, layout)


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
    layout = spattn.compile(spattn.Document(ids), L, L, causal=True, block_size=32, batch=2, heads=2, device=DEVICE)
    out, lse, dq, dk, dv = _compare(q, k, v, layout, grad_lse=True)
    assert torch.equal(out[0, :, 90:], torch.zeros_like(out[0, :, 90:]))
    assert torch.isinf(lse[0, :, 90:]).all() and (lse[0, :, 90:] < 0).all()
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


@needs_interp
@pytest.mark.parametrize(
    "shape,per_head",
    [pytest.param((2, 4, 2, 5, 200, 64), False, id="decode-q5-gqa-packed"),
     pytest.param((1, 2, 1, 1, 130, 32), True, id="decode-q1-perhead")],
)
def test_decode(shape, per_head):
    B, H, Hkv, Lq, Lk, D = shape
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, D, torch.float32, seed=5)
    pattern = spattn.Sinks(8) | spattn.Window(64)
    if per_head:
        pattern = spattn.PerHead([pattern, spattn.Window(16)])
    layout = spattn.compile(pattern, Lq, Lk, causal=True, block_size=32, batch=B, heads=H, device=DEVICE)
    assert Lq <= tri.DECODE_MAX_QUERIES
    _compare(q, k, v, layout)  # forward through the split-K kernel, backward through the generic kernels


@needs_interp
def test_custom_op_traces_fullgraph():
    from spattn.ops.attention.impl.triton._op import TABLES

    q, k, v = _qkv(1, 2, 1, 64, 64, 32, torch.float32, seed=7)
    layout = spattn.compile(spattn.Sinks(4) | spattn.Window(16), 64, 64, causal=True, block_size=32, device=DEVICE)

    def f(q, k, v):
        reason = tri.supports(q, k, v, layout)  # must trace too (backend="auto" calls it)
        out, lse = tri.attention_triton(q, k, v, layout, scale=0.25, return_lse=True)
        return out * (2 if reason is None or CUDA else 2.0), lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, got_lse = compiled(q, k, v)
    want, want_lse = f(q, k, v)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_lse, want_lse)
    # gradients through the compiled graph (the custom op's registered autograd) match eager
    grads = []
    for fn in (compiled, f):
        qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
        fn(qs, ks, vs)[0].sum().backward()
        grads.append((qs.grad, ks.grad, vs.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    torch.library.opcheck(
        torch.ops.spattn.triton_attention_forward.default,
        (q, k, v, [getattr(layout, n) for n in TABLES], 0.25, "test", False, False),
        test_utils=("test_schema", "test_faketensor"),
    )


@needs_interp
def test_backward_is_deterministic():
    q, k, v = _qkv(1, 2, 1, 64, 64, 32, torch.float32, seed=9)
    layout = spattn.compile(spattn.Causal(), 64, 64, block_size=32, device=DEVICE)
    a = _run(tri.attention_triton, q, k, v, layout, 0.2, False)
    b = _run(tri.attention_triton, q, k, v, layout, 0.2, False)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


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
def test_forward_merged_loop_variant(monkeypatch):
    from spattn.ops.attention.impl.triton import _tuning

    monkeypatch.setattr(_tuning, "INTERPRETER", _tuning.Config(32, 16, 4, 1, merged=True))
    q, k, v = _qkv(1, 2, 1, 100, 130, 32, torch.float32, seed=11)
    layout = spattn.compile(spattn.Sinks(8) | spattn.Window(40), 100, 130, causal=True, block_size=32, device=DEVICE)
    _compare(q, k, v, layout, backward=False)


@needs_interp
def test_custom_op_autograd_matches_eager_path():
    from spattn.ops.attention.impl.triton._op import TABLES

    q, k, v = _qkv(1, 2, 1, 40, 70, 32, torch.float32, seed=13)
    layout = spattn.compile(spattn.Sinks(4) | spattn.Window(20), 40, 70, causal=True, block_size=32, device=DEVICE)
    eager = _run(tri.attention_triton, q, k, v, layout, 0.3, True)

    def via_op(q, k, v, layout, *, scale, return_lse):
        tables = [getattr(layout, n) for n in TABLES]
        return torch.ops.spattn.triton_attention_forward(q, k, v, tables, scale, "test", False, False)

    op = _run(via_op, q, k, v, layout, 0.3, True)
    for a, b in zip(eager, op, strict=True):
        torch.testing.assert_close(a, b)
