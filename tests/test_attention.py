"""The reference, dense and flex backends against the independent float64 dense oracle (spattn.testing)."""

import math

import pytest
import torch

import spattn
from spattn.testing import assert_within, brute_force_mask, poison_empty
from spattn.testing import dense_attention as golden
from spattn.testing import plain_attention as plain_lowp

SHAPES = {  # (B, H, Hk, Lq, Lk, D)
    "B1-L1-H2-D64": (1, 2, 2, 1, 1, 64),
    "B2-L63-H4-D64-gqa": (2, 4, 2, 63, 63, 64),
    "B1-L127-H2-D80-mqa": (1, 2, 1, 127, 127, 80),
    "B1-L200-H2-D128": (1, 2, 2, 200, 200, 128),
    "B1-Lq7-Lk300-decode-gqa": (1, 4, 2, 7, 300, 64),
    "B1-Lq1-Lk333-decode": (1, 2, 2, 1, 333, 32),
    "B1-L1025-H2-D64": (1, 2, 2, 1025, 1025, 64),
}

PATTERNS = {
    "sinks-window": spattn.Sinks(8) | spattn.Window(40),
    "strided-global": spattn.Strided(5) | spattn.Global((3, 50)),
    "random": spattn.RandomBlocks(2, block=32) | spattn.Window(10),
    "document": spattn.Document(torch.tensor([[0] * 20 + [-1] * 10 + [1] * 170 + [2] * 133])),  # empty rows
}


def _grid(backends, dtypes, shapes=tuple(SHAPES), patterns=tuple(PATTERNS)):
    """Cases as pytest params; the 1025-token shape runs once per backend (float32, sinks + window)."""
    out = []
    for backend in backends:
        for shape in shapes:
            for name in patterns:
                B, H, Hk, Lq, Lk, D = SHAPES[shape]
                if name == "document" and (B > 1 or Lk > 333):
                    continue  # one batch row of segment ids, sized for the decode shapes
                for causal in (True, False):
                    for dtype in dtypes:
                        if Lq >= 1025 and (dtype != torch.float32 or name != "sinks-window" or not causal):
                            continue
                        tag = f"{backend}-{shape}-{name}-{'causal' if causal else 'bidir'}-{str(dtype)[6:]}"
                        out.append(pytest.param(backend, shape, name, causal, dtype, id=tag))
    return out


def _inputs(B, H, Hk, Lq, Lk, D, dtype, requires_grad=False):
    q = torch.randn(B, H, Lq, D, dtype=dtype)
    k = torch.randn(B, Hk, Lk, D, dtype=dtype)
    v = torch.randn(B, Hk, Lk, D, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


GRID = _grid(["reference"], [torch.float32, torch.bfloat16]) + _grid(
    ["dense", "flex"], [torch.float32], shapes=("B2-L63-H4-D64-gqa", "B1-Lq7-Lk300-decode-gqa", "B1-L200-H2-D128")
)


@pytest.mark.parametrize("backend,shape,name,causal,dtype", GRID)
def test_backend_forward_and_backward(backend, shape, name, causal, dtype):
    """Every backend against the independent float64 dense oracle on a brute-force token mask (not the compiled
    layout), by the tolerance rule, with fresh outputs NaN-poisoned so an unwritten row fails."""
    if backend == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")
    B, H, Hk, Lq, Lk, D = SHAPES[shape]
    pattern = PATTERNS[name]
    if name == "document":
        pattern = spattn.Document(pattern.segment_ids[:, :Lk])
    layout = spattn.compile(pattern, Lq, Lk, causal=causal, block_size=32, heads=H, batch=B)
    allowed = brute_force_mask(pattern, Lq, Lk, causal=causal, heads=H, batch=B)
    backward = backend != "flex"  # torch's flex_attention has no backward on CPU
    q, k, v = _inputs(B, H, Hk, Lq, Lk, D, dtype, requires_grad=backward)
    scale = 1 / math.sqrt(D)
    with poison_empty():
        out, lse = spattn.attention(q, k, v, layout, causal=causal, backend=backend, return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    gold, gold_lse = golden(q64, k64, v64, allowed, scale)
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    base, base_lse = plain_lowp(ql, kl, vl, allowed, scale)
    eps = 1e-5 if dtype == torch.float32 else 1e-3
    assert out.dtype == dtype and out.shape == (B, H, Lq, D)
    assert_within(out, gold, base, eps=eps, what="out")
    assert_within(lse, gold_lse, base_lse, eps=eps, what="lse")
    if not backward:
        return
    do = torch.randn_like(out)
    with poison_empty():
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    gq, gk, gv = torch.autograd.grad(gold, (q64, k64, v64), do.double())
    bq, bk, bv = torch.autograd.grad(base, (ql, kl, vl), do)
    for name_, fast, g, b in (("dq", dq, gq, bq), ("dk", dk, gk, bk), ("dv", dv, gv, bv)):
        assert_within(fast, g, b, eps=eps, what=name_)


def test_gradcheck_float64():
    q, k, v = _inputs(1, 2, 1, 10, 19, 4, torch.float64, requires_grad=True)
    layout = spattn.compile(spattn.Sinks(3) | spattn.Window(4) | spattn.Strided(7), 10, 19, causal=True, block_size=8)
    fn = lambda q, k, v: spattn.attention(q, k, v, layout, causal=True, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_empty_rows_give_zero_and_finite_gradients():
    L = 50
    ids = torch.tensor([[0] * 20 + [-1] * 10 + [1] * 20])  # the 10 padding queries attend nothing
    layout = spattn.compile(spattn.Document(ids), L, causal=True, block_size=16, batch=1)
    for backend in ("reference", "dense"):
        q, k, v = _inputs(1, 2, 2, L, L, 16, torch.float32, requires_grad=True)
        out, lse = spattn.attention(q, k, v, layout, causal=True, backend=backend, return_lse=True)
        assert torch.all(out[:, :, 20:30] == 0)
        assert torch.all(torch.isneginf(lse[:, :, 20:30]))
        assert torch.isfinite(lse[:, :, :20]).all()
        (out.sum() + lse[:, :, :20].sum()).backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all()


def test_full_pattern_equals_sdpa():
    q, k, v = _inputs(2, 4, 2, 100, 100, 32, torch.float64)
    out = spattn.attention(q, k, v, spattn.Full(), causal=True, backend="reference")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(out, ref, atol=1e-10)


def test_auto_backend_and_reason():
    q, k, v = _inputs(1, 2, 2, 64, 64, 16, torch.float32)
    layout = spattn.compile(spattn.Window(8), 64, block_size=16)
    name, reason = spattn.choose_backend(q, k, v, layout)
    assert name == "dense" and "short" in reason
    q, k, v = _inputs(1, 2, 2, 2100, 2100, 16, torch.float32)
    layout = spattn.compile(spattn.Window(8), 2100)
    name, reason = spattn.choose_backend(q, k, v, layout)
    assert name == "reference" and "no GPU" in reason
    out = spattn.attention(q, k, v, layout)
    assert torch.allclose(out, spattn.attention(q, k, v, layout, backend="dense"), atol=1e-5)


def test_reference_memory_is_not_quadratic(monkeypatch):
    """The reference never allocates an Lq x Lk score tensor: watch the largest score product."""
    import spattn.ops.attention.impl.reference as ref

    biggest = []
    real = torch.matmul

    def spy(a, b):
        out = real(a, b)
        biggest.append(out.numel())
        return out

    monkeypatch.setattr(ref.torch, "matmul", spy)
    L = 4096
    q, k, v = _inputs(1, 1, 1, L, L, 16, torch.float32)
    spattn.attention(q, k, v, spattn.Sinks(64) | spattn.Window(256), causal=True, backend="reference")
    assert max(biggest) < L * L / 4
