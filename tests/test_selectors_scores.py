"""Selectors: fast path against the float64 brute-force definition."""

import pytest
import torch

from spattn.selectors import antidiagonal, bounds, get_selector, probe, selector_names
from spattn.selectors.common import visible_blocks

# scores are probabilities in [0, 1] accumulated in float32 over at most a few hundred terms
ATOL = 2e-5

SELECTORS = [
    ("pooled", {}),
    ("bounds", {}),
    ("bounds", {"reduce": "mean"}),
    ("vertical_slash", {"last": 5}),
    ("antidiagonal", {"stride": 4}),
    ("probe", {"queries": 3}),
]
SHAPES = [
    pytest.param(1, 2, 1, 63, 63, 8, id="B1-L63-H2-gqa"),
    pytest.param(2, 4, 2, 100, 130, 8, id="B2-Lq100-Lk130-H4-gqa"),
    pytest.param(1, 1, 1, 1, 70, 16, id="decode-Lq1-Lk70"),
    pytest.param(1, 2, 2, 64, 64, 8, id="B1-L64-aligned"),
]


@pytest.mark.parametrize("name,opts", SELECTORS, ids=lambda x: x if isinstance(x, str) else str(x))
@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,D", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_fast_matches_reference(name, opts, B, H, Hkv, Lq, Lk, D, causal):
    torch.manual_seed(0)
    q, k = torch.randn(B, H, Lq, D) * 1.5, torch.randn(B, Hkv, Lk, D) * 1.5
    sel = get_selector(name, **opts)
    fast = sel.scores(q, k, block_size=16, causal=causal)
    ref = sel.reference(q, k, block_size=16, causal=causal)
    assert fast.shape == ref.shape == (B, H, -(-Lq // 16), -(-Lk // 16))
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast.double(), ref, atol=ATOL, rtol=0)
    vis = visible_blocks(Lq, Lk, 16, causal, "cpu")
    assert (ref[..., ~vis] == 0).all()
    torch.testing.assert_close(ref.sum(-1), torch.ones_like(ref.sum(-1)))


@pytest.mark.parametrize("name", ["antidiagonal", "bounds", "probe"])
def test_chunked_equals_unchunked(name, monkeypatch):
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 200, 8), torch.randn(2, 2, 200, 8)
    sel = get_selector(name)
    whole = sel.scores(q, k, block_size=16, causal=True)
    mod = {"antidiagonal": antidiagonal, "bounds": bounds, "probe": probe}[name]
    monkeypatch.setattr(mod, "_CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(sel.scores(q, k, block_size=16, causal=True), whole)


def test_bounds_is_an_upper_bound():
    torch.manual_seed(2)
    q, k = torch.randn(1, 1, 48, 8), torch.randn(1, 1, 48, 8)
    from spattn.selectors.common import pool

    kmax, kmin = pool(k, 16, "amax"), pool(k, 16, "amin")
    u = q.clamp_min(0) @ kmax.transpose(-1, -2) - (-q).clamp_min(0) @ kmin.transpose(-1, -2)  # [1, 1, 48, 3]
    dots = (q @ k.transpose(-1, -2)).view(1, 1, 48, 3, 16).amax(-1)
    assert (dots <= u + 1e-5).all()


def test_selector_errors():
    assert set(selector_names()) >= {"pooled", "vertical_slash", "antidiagonal", "bounds"}
    with pytest.raises(ValueError, match="unknown selector"):
        get_selector("nope")
    with pytest.raises(ValueError, match="no option"):
        get_selector("pooled", stride=3)
    with pytest.raises(ValueError, match="stride"):
        get_selector("antidiagonal", stride=5).scores(torch.randn(1, 1, 32, 4), torch.randn(1, 1, 32, 4), block_size=16)
    with pytest.raises(ValueError, match="reduce"):
        get_selector("bounds", reduce="min")
    with pytest.raises(ValueError, match="multiple"):
        get_selector("pooled").scores(torch.randn(1, 3, 32, 4), torch.randn(1, 2, 32, 4), block_size=16)


def test_probe_rows_spread_over_the_block_and_end_on_its_last_query():
    rows = probe.probe_rows(100, 32, 4, "cpu")
    assert rows.tolist() == [[7, 15, 23, 31], [39, 47, 55, 63], [71, 79, 87, 95], [96, 97, 98, 99]]
    # the probe of every query of a block is exact: its scores are the true mass per key block
    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    got = get_selector("probe", queries=16).scores(q, k, block_size=16, causal=True)
    causal = torch.ones(64, 64).bool().tril()
    p = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~causal, -torch.inf), -1)
    want = p.view(1, 2, 4, 16, 4, 16).sum(-1).mean(3)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
