"""Issue 11, item 11: RandomBlocks and Budgeted keep the same pairs whether compiled for the whole sequence or
for the last queries of a KV cache (bottom-right aligned)."""

from __future__ import annotations

import pytest
import torch

import spattn

PATTERNS = {
    "random": spattn.RandomBlocks(2, seed=3, block=16) | spattn.Window(3),
    "random-per-head": spattn.RandomBlocks(1, seed=5, block=24, per_head=True),
    "budgeted": spattn.Budgeted(40, sinks=4),
    "budgeted-small": spattn.Budgeted(8),
    "budgeted-wide": spattn.Sinks(2) | spattn.Budgeted(100, sinks=8),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_decode_rows_equal_the_full_forward(name):
    pattern, L, bs, H = PATTERNS[name], 230, 32, 2
    full = spattn.compile(pattern, L, causal=True, block_size=bs, heads=H).to_dense()
    for t in (0, 7, 39, 40, 100, 163, 229):
        for n in (1, 3):
            if t + 1 < n:
                continue
            step = spattn.compile(pattern, n, t + 1, causal=True, block_size=bs, heads=H).to_dense()
            assert torch.equal(step, full[:, :, t + 1 - n : t + 1, : t + 1].expand_as(step)), (t, n)


def test_non_causal_rows_are_bottom_right_aligned():
    pattern, L = spattn.RandomBlocks(2, seed=1, block=16), 150
    full = spattn.compile(pattern, L, block_size=32).to_dense()
    last = spattn.compile(pattern, 5, L, block_size=32).to_dense()
    assert torch.equal(last, full[:, :, -5:])


def test_decode_attention_matches_the_full_forward():
    pattern, L = spattn.Budgeted(48, sinks=4), 160
    q, k, v = torch.randn(1, 2, L, 8, dtype=torch.float64), torch.randn(1, 2, L, 8, dtype=torch.float64), torch.randn(
        1, 2, L, 8, dtype=torch.float64)
    full = spattn.attention(q, k, v, pattern, causal=True, block_size=16)
    for t in (10, 47, 48, 120, 159):
        step = spattn.attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], pattern, causal=True,
                                block_size=16)
        torch.testing.assert_close(step[:, :, 0], full[:, :, t])
