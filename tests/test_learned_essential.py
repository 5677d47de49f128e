"""Essential: the compiled layout equals the brute-force mask, JSON round trip, the id rules, composition."""

from __future__ import annotations

import pytest
import torch

import spattn
from spattn import Essential, essential_flags
from spattn.testing import brute_force_mask


@pytest.mark.parametrize(
    "q_len, kv_len, bs, causal",
    [
        pytest.param(100, 100, 16, True, id="L100-causal"),
        pytest.param(37, 100, 16, True, id="Lq37-Lk100-decode"),
        pytest.param(1, 63, 8, True, id="Lq1-L63"),
        pytest.param(127, 127, 32, False, id="L127-noncausal"),
    ],
)
def test_compiled_layout_equals_brute_force(q_len, kv_len, bs, causal):
    ids = torch.randint(0, 40, (2, kv_len))
    flags = essential_flags(ids, "rare")
    for pattern in (Essential(positions=(0, 5, kv_len - 1, kv_len + 10)), Essential(flags=flags),
                    Essential(positions=(3,), flags=flags) | spattn.Window(4)):
        layout = spattn.compile(pattern, q_len, kv_len, causal=causal, block_size=bs, batch=2)
        want = brute_force_mask(pattern, q_len, kv_len, causal=causal, batch=2)
        assert torch.equal(layout.to_dense().expand_as(want), want)


def test_later_queries_only_and_json_round_trip():
    pattern = Essential(positions=(10,), flags=torch.tensor([[False] * 20 + [True] + [False] * 11]))
    dense = spattn.compile(pattern, 32, block_size=8).to_dense()[0, 0]
    assert dense[:, 10].tolist() == [False] * 10 + [True] * 22  # every query at or after it, none before
    assert dense[:, 20].tolist() == [False] * 20 + [True] * 12
    assert int(dense.sum()) == 22 + 12
    again = spattn.pattern_from_dict(pattern.to_dict())
    assert again.to_dict() == pattern.to_dict() and torch.equal(again.flags, pattern.flags)


def test_rules():
    ids = torch.tensor([[5, 9, 5, 7, 2]])
    assert essential_flags(ids, "rare").tolist() == [[False, True, False, True, True]]
    counts = torch.bincount(torch.tensor([5, 5, 9, 9, 9, 7, 2, 2]), minlength=10)
    assert essential_flags(ids, "rare", counts=counts, max_count=1).tolist() == [[False, False, False, True, False]]
    assert essential_flags(ids, "ids", token_ids={2, 9}).tolist() == [[False, True, False, False, True]]
    assert essential_flags(ids, lambda x: x > 6).tolist() == [[False, True, False, True, False]]

    class Pieces:  # a tokenizer stand-in: id -> text piece
        table = {0: "The", 1: " man", 2: " met", 3: " Elizabeth", 4: ".", 5: " He", 6: " saw", 7: " Darcy"}

        def decode(self, ids):
            return "".join(self.table[i] for i in ids)

    flags = essential_flags([0, 1, 2, 3, 4, 5, 6, 7], "capitalised", tokenizer=Pieces())
    assert flags.tolist() == [[False, False, False, True, False, False, False, True]]  # names, not sentence starts


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="positions"):
        Essential(positions=(-1,))
    with pytest.raises(TypeError, match="flags"):
        Essential(flags=torch.rand(2, 5))
    with pytest.raises(ValueError, match="kv_len"):
        spattn.compile(Essential(flags=torch.ones(1, 10, dtype=torch.bool)), 12)
    with pytest.raises(ValueError, match="token_ids"):
        essential_flags([1, 2], "ids")
    with pytest.raises(ValueError, match="tokenizer"):
        essential_flags([1, 2], "capitalised")
    with pytest.raises(ValueError, match="rule"):
        essential_flags([1, 2], "frequent")


def test_kept_by_a_budgeted_dynamic_part():
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    guard = Essential(positions=(40, 41, 130))
    layout = spattn.compile(spattn.Window(16) | guard | spattn.TopK("pooled", 1), 256, causal=True, block_size=32,
                            heads=2, query=q, key=k)
    dense = layout.to_dense()
    assert bool(dense[..., 130:, 130].all()) and bool(dense[..., 41:, 41].all())
