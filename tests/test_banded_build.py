"""The banded on-device compile (spattn.patterns.banded) gives exactly spattn.compile's tables, and so does
the dense-mask builder spattn.layout.from_dense."""

from __future__ import annotations

import pytest
import torch

import spattn
from spattn.layout import from_dense
from spattn.patterns.banded import build_layout, supports_fast_build
from spattn.patterns.compile import brute_force_mask

S, W, C, F = spattn.Sinks, spattn.Window, spattn.Causal, spattn.Full
PATTERNS = [
    pytest.param(S(64) | W(1024), id="sinks64|window1024"),
    pytest.param(C(), id="causal"),
    pytest.param(W(100, 20), id="window-left-right"),
    pytest.param(S(5) | W(30, 7), id="sinks5|window30-7"),
    pytest.param(S(130) | C(), id="sinks130|causal"),
    pytest.param(F(), id="full"),
    pytest.param(S(16), id="sinks-only"),
    pytest.param(W(0), id="diagonal-only"),
    pytest.param(S(64) | W(200) | C(), id="sinks|window|causal"),
    pytest.param(W(7) & C(), id="window&causal"),
]
SHAPES = [
    (1000, 1000, 64, True), (1000, 1000, 64, False), (63, 300, 32, True), (1, 1, 16, False),
    (129, 1025, 128, True), (5, 5000, 128, True), (200, 200, 16, False),
]


def _same(a, b) -> list[str]:
    ta, tb = a.tables(), b.tables()
    return [k for k in ta if ta[k].shape != tb[k].shape or ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_build_layout_matches_compile(pattern):
    assert supports_fast_build(pattern)
    for q_len, kv_len, bs, causal in SHAPES:
        fast = build_layout(pattern, q_len, kv_len, causal=causal, block_size=bs)
        ref = spattn.compile(pattern, q_len, kv_len, causal=causal, block_size=bs)
        assert _same(fast, ref) == [], (q_len, kv_len, bs, causal)
        facts = lambda x: (x.q_len, x.kv_len, x.block_size, x.causal)  # noqa: E731
        assert facts(fast) == facts(ref)


def test_build_layout_rejects_other_patterns():
    assert not supports_fast_build(spattn.Strided(4))
    with pytest.raises(ValueError, match="no fast path"):
        build_layout(spattn.Strided(4), 64)
    with pytest.raises(ValueError, match="kv_len"):
        build_layout(C(), 64, 32)
    with pytest.raises(ValueError, match="q_len"):
        build_layout(C(), 0)


@pytest.mark.parametrize("pattern", [S(3) | W(20), spattn.Strided(3, block=4), C()])
def test_layout_from_dense_matches_compile(pattern):
    ref = spattn.compile(pattern, 77, 150, causal=True, block_size=16)
    dense = ref.to_dense()
    assert torch.equal(dense, brute_force_mask(pattern, 77, 150, causal=True, block_size=16).expand_as(dense))
    assert _same(from_dense(dense, 16, causal=True), ref) == []
