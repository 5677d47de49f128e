"""Issue 11, item 2: exact position arithmetic for any parameter size, checked against Python integers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spattn
from spattn.patterns.banded import build_layout, supports_fast_build

# -- an independent oracle: the documented semantics, in Python integers (no tensors, no clamping) ----------


def allowed(pattern, i: int, j: int) -> bool:
    """Whether absolute query position ``i`` may attend key ``j`` under ``pattern`` (static built-ins)."""
    if isinstance(pattern, spattn.Union):
        return any(allowed(p, i, j) for p in pattern.parts)
    if isinstance(pattern, spattn.Intersection):
        return all(allowed(p, i, j) for p in pattern.parts)
    if isinstance(pattern, spattn.Full):
        return True
    if isinstance(pattern, spattn.Causal):
        return j <= i
    if isinstance(pattern, spattn.Window):
        return (pattern.left is None or i - j <= pattern.left) and (pattern.right is None or j - i <= pattern.right)
    if isinstance(pattern, spattn.Sinks):
        return j < pattern.n
    if isinstance(pattern, spattn.Dilated):
        near = (pattern.left is None or i - j <= pattern.left) and (pattern.right is None or j - i <= pattern.right)
        return near and (i - j) % pattern.dilation == 0
    if isinstance(pattern, spattn.Strided):
        return (i // pattern.block - j // pattern.block) % pattern.stride == 0
    if isinstance(pattern, spattn.Global):
        return i in pattern.tokens or j in pattern.tokens
    raise AssertionError(f"no oracle for {pattern!r}")


def oracle_mask(pattern, q_len: int, kv_len: int, causal: bool) -> torch.Tensor:
    off = kv_len - q_len
    rows = [[allowed(pattern, i + off, j) and (not causal or j <= i + off) for j in range(kv_len)]
            for i in range(q_len)]
    return torch.tensor(rows, dtype=torch.bool)


size = st.one_of(st.integers(0, 70), st.integers(2**30, 2**62), st.sampled_from([2**31 - 1, 2**31, 2**32, 2**62]))
positive = st.one_of(st.integers(1, 70), st.integers(2**30, 2**62), st.sampled_from([2**31, 2**32, 2**62]))
bound = st.one_of(size, st.none())

leaf = st.one_of(
    st.builds(spattn.Window, bound, bound),
    st.builds(spattn.Sinks, size),
    st.builds(spattn.Dilated, bound, positive, bound),
    st.builds(spattn.Strided, positive, positive),
    st.builds(lambda t: spattn.Global(tuple(t)), st.lists(st.one_of(st.integers(0, 60), size), max_size=4)),
    st.just(spattn.Causal()),
    st.just(spattn.Full()),
)
tree = st.recursive(leaf, lambda kids: st.one_of(
    st.lists(kids, min_size=2, max_size=3).map(lambda ps: spattn.Union(tuple(ps))),
    st.lists(kids, min_size=2, max_size=3).map(lambda ps: spattn.Intersection(tuple(ps))),
), max_leaves=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=tree, q_len=st.integers(1, 37), extra=st.integers(0, 12), block_size=st.sampled_from([4, 8, 16]),
       causal=st.booleans())
def test_compiled_mask_equals_python_integers(pattern, q_len, extra, block_size, causal):
    kv_len = q_len + extra
    want = oracle_mask(pattern, q_len, kv_len, causal)
    layout = spattn.compile(pattern, q_len, kv_len, causal=causal, block_size=block_size)
    assert torch.equal(layout.to_dense()[0, 0], want), pattern
    if supports_fast_build(pattern):  # the device build (CUDA in compile) runs on CPU here: same tables
        fast = build_layout(pattern, q_len, kv_len, causal=causal, block_size=block_size)
        assert torch.equal(fast.to_dense()[0, 0], want), pattern


@pytest.mark.parametrize("size", [2**31, 2**70])
def test_huge_window_and_sinks_keep_everything_causal(size):
    q = torch.randn(1, 2, 96, 8)
    k, v = torch.randn(1, 2, 96, 8), torch.randn(1, 2, 96, 8)
    dense = spattn.attention(q, k, v, spattn.Full(), causal=True, block_size=32)
    for pattern in (spattn.Window(size), spattn.Sinks(size), spattn.Dilated(size, 1), spattn.Window(None)):
        for backend in ("reference", "dense"):
            out = spattn.attention(q, k, v, pattern, causal=True, block_size=32, backend=backend)
            torch.testing.assert_close(out, dense)
        report = spattn.coverage.measure(q, k, pattern, causal=True, topk=0, block_size=32)
        assert float(report.recall.min()) == pytest.approx(1.0)


def test_dilated_huge_dilation_is_the_diagonal():
    layout = spattn.compile(spattn.Dilated(2**40, 2**40), 40, causal=True, block_size=16)
    assert torch.equal(layout.to_dense()[0, 0], torch.eye(40, dtype=torch.bool))


def test_unbounded_spelling_round_trips():
    pattern = spattn.Window(None) | spattn.Dilated(None, 3, right=None)
    back = spattn.pattern_from_dict(pattern.to_dict())
    assert back == pattern
    assert spattn.compile(spattn.Window(None), 50, causal=True, block_size=16).density() == pytest.approx(1.0)


# -- item 6: compile memory when most blocks are partial ----------------------------------------------------------
def test_regular_hubs_evaluate_a_handful_of_masks():
    L, bs = 4096, 128
    layout = spattn.compile(spattn.Global(tuple(range(0, L, 7))), L, causal=True, block_size=bs)
    # 7 distinct hub phases per axis (128 % 7 = 2), plus the diagonal blocks' causal cut: never one per block
    assert layout.info["masks_evaluated"] <= 128 < (L // bs) ** 2 // 2
    small = spattn.Global(tuple(range(0, 300, 7))) | spattn.Window(5)
    want = oracle_mask(small, 300, 300, True)
    assert torch.equal(spattn.compile(small, 300, causal=True, block_size=32).to_dense()[0, 0], want)


def test_packed_bits_round_trip_and_keep_the_order():
    from spattn.layout import tables

    tiles = torch.rand(50, 9, 9) < 0.5
    words = tables.pack_bits(tiles)
    assert torch.equal(tables.unpack_bits(words, 9), tiles)
    by_bits = torch.unique(tiles.flatten(1), dim=0)
    assert torch.equal(tables.unpack_bits(torch.unique(words, dim=0), 9).flatten(1), by_bits)
