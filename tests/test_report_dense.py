"""The dense backend's fused path (SDPA with the layout's mask) against the float64 oracle, and the exact path
it leaves for rows that keep nothing and non-finite keys or values (Note [dense fast path])."""

from __future__ import annotations

import pytest
import torch

import spattn
from spattn.testing import assert_within, dense_attention, plain_attention


def _inputs(B=1, H=4, Hk=2, L=100, D=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hk, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hk, L, D, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("pattern", [spattn.Sinks(4) | spattn.Window(17), spattn.Causal()],
                         ids=["sinks-window", "causal"])
def test_fused_path_matches_the_oracle(dtype, pattern, monkeypatch):
    q, k, v = _inputs(dtype=dtype)
    layout = spattn.compile(pattern, q.shape[2], k.shape[2], causal=True, block_size=16)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    out = spattn.attention(q, k, v, layout, causal=True, backend="dense")
    assert calls, "finite inputs with no empty row should take the fused path"
    allowed = layout.to_dense()
    golden, _ = dense_attention(q, k, v, allowed)
    base, _ = plain_attention(q, k, v, allowed)
    assert_within(out, golden, base)


def test_empty_rows_and_nonfinite_keys_take_the_exact_path(monkeypatch):
    q, k, v = _inputs(L=64)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    # document id -1 (padding) leaves queries 10..19 with nothing to attend
    doc = spattn.Document(torch.tensor([[0] * 10 + [-1] * 10 + [1] * 44]))
    empty = spattn.compile(doc, 64, 64, causal=True, block_size=16)
    allowed = empty.to_dense()
    assert not bool(allowed.any(-1).all())
    out = spattn.attention(q, k, v, empty, causal=True, backend="dense")
    assert not calls
    assert torch.isfinite(out).all()
    rows = ~allowed.any(-1)[0, 0]
    assert bool((out[0, :, rows] == 0).all())
    # a NaN key that the layout excludes must not reach any row
    local = spattn.compile(spattn.Window(3), 64, 64, causal=True, block_size=16)
    k2 = k.clone()
    k2[0, 0, 40] = float("nan")
    out2 = spattn.attention(q, k2, v, local, causal=True, backend="dense")
    assert not calls
    bad = torch.isnan(out2).any(-1)[0]  # [H, L]
    assert bool(bad[:2, 40:44].all()) and not bool(bad[:2, :40].any()) and not bool(bad[:2, 44:].any())
