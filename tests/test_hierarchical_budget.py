"""``spattn.hierarchical.budget``: the cost at a length equals the branch layouts' counts on real inputs (any
selection), the fit is the largest config within the budget, and the frozen form is exactly one softmax over its
fine keys."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spattn.hierarchical import (
    FROZEN_GATES,
    cost_at,
    describe,
    fine_layout,
    fit_budget,
    hierarchical_attention,
    prefill_pairs,
)
from spattn.patterns import Hierarchical, Sinks, Window
from spattn.testing import assert_within, dense_attention, plain_attention


def _qkv(L, H=4, Hkv=2, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, H, L, D, generator=gen), torch.randn(1, Hkv, L, D, generator=gen),
            torch.randn(1, Hkv, L, D, generator=gen))


@pytest.mark.parametrize("config, L", [
    (Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=3, window=20), 200),
    (Hierarchical(compress_block=32, compress_stride=16, select_block=32, select_count=2, window=1,
                  gates=FROZEN_GATES) | Sinks(4) | Window(23), 300),
    (Hierarchical(compress_block=16, compress_stride=16, select_block=16, select_count=4, window=8) | Sinks(20),
     97),
])
def test_cost_at_equals_the_branch_layouts_on_inputs(config, L):
    q, k, v = _qkv(L)
    c = cost_at(config, L, head_dim=16, heads=4)
    for seed in (0, 1):  # two inputs, two selections: the same counts
        _, info = hierarchical_attention(*_qkv(L, seed=seed), config, return_info=True)
        lay = info["layouts"]
        got = {name: 0.0 if lay[name] is None else float(lay[name].allowed_pairs().mean()) / L
               for name in ("compressed", "selected", "window")}
        for name, value in got.items():
            assert c["keys_per_query"][name] == pytest.approx(value, rel=1e-12), name
    if config.safeguard is None:  # the analytic model agrees
        pairs = prefill_pairs(config, L)
        assert c["keys_per_query"]["total"] * L == pytest.approx(pairs["total"])
    assert c["keys_fraction"] == pytest.approx(c["keys_per_query"]["total"] / ((L + 1) / 2))
    total_pairs = c["keys_per_query"]["total"] * L
    compressed_pairs = c["keys_per_query"]["compressed"] * L
    assert c["attention_flops"] == pytest.approx(4 * 4 * 16 * (total_pairs + 0.5 * compressed_pairs))
    assert c["attention_flops_block"] >= c["attention_flops"]
    assert c["dense_attention_flops"] == 4 * 4 * 16 * L * (L + 1) / 2


@pytest.mark.parametrize("L, fraction, frozen", [(512, 0.25, False), (1024, 0.1, False), (1024, 0.25, True),
                                                 (2048, 0.05, True)])
def test_fit_budget_is_the_largest_config_within_the_budget(L, fraction, frozen):
    K = fraction * (L + 1) / 2
    config = fit_budget(K, L, sinks=4, frozen=frozen)
    assert config is not None and config.select_count >= 2
    assert cost_at(config, L)["keys_per_query"]["total"] <= K  # fit_budget's own count of the chosen blocks
    more = dataclasses.replace(config, select_count=config.select_count + 1)
    assert cost_at(more, L)["keys_per_query"]["total"] > K  # ... agrees with cost_at at the next size too
    if frozen:
        assert config.gates == FROZEN_GATES and config.window == 1
        assert config.safeguard == Sinks(4) | Window(int(0.25 * K) - 1)
    else:
        assert config.gates is None and config.window == int(0.25 * K) and config.safeguard == Sinks(4)
    assert cost_at(config, L)["keys_per_query"]["compressed"] <= 0.25 * K


def test_fit_budget_says_when_nothing_fits_and_rejects_bad_arguments():
    assert fit_budget(0.25 * 257 / 2, 256) is None  # own block + one chosen 16-block + sinks + window > 32 keys
    assert fit_budget(0.05 * 1025 / 2, 1024) is None
    with pytest.raises(ValueError, match="keys_per_query"):
        fit_budget(0, 1024)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        fit_budget(100, 1024, block_size=48)
    with pytest.raises(ValueError, match="length"):
        fit_budget(100, 0)
    with pytest.raises(ValueError, match="sinks"):
        fit_budget(100, 1024, sinks=-1)
    with pytest.raises(TypeError, match="config must be a spattn.Hierarchical"):
        cost_at(Sinks(4), 128)


def test_frozen_form_is_one_softmax_over_its_fine_keys():
    # gates (0, 1, 0) and the window in the safeguard: the output is attention over the fine layout's keys
    L = 160
    q, k, v = _qkv(L, seed=3)
    config = Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=3, window=1,
                          gates=FROZEN_GATES) | Sinks(4) | Window(11)
    view = describe(q, k, config, block_size=16)
    assert torch.equal(view.layout.to_dense(), fine_layout(q, k, config).to_dense())
    assert view.cost == cost_at(config, L, head_dim=16, heads=4, block_size=16)
    mask = view.layout.to_dense()  # [1, H, L, L]
    assert not mask.triu(1).any()  # causal
    golden, _ = dense_attention(q, k, v, mask)
    baseline, _ = plain_attention(q, k, v, mask)
    assert_within(hierarchical_attention(q, k, v, config), golden, baseline)
    # the fine keys hold the selected blocks of every query block: chosen from [1, Hkv, NQ, NQ]
    assert view.chosen.shape == (1, 2, 10, 10) and int(view.chosen[0, 0, 5].sum()) == 3
