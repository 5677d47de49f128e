"""Hierarchical as a planner candidate: linked (all-or-none) knapsack options against brute force, the table's
scores and costs against the hierarchical oracles, whole-layer plans, rescaling to other lengths, JSON."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import spattn
from spattn.hierarchical import cost_at, fit_budget
from spattn.hierarchical.measure import fine_layout
from spattn.integrations.plan import Plan, scale_pattern
from spattn.planner import make_plan, solve
from spattn.planner.candidates import Candidate, default_candidates
from spattn.planner.table import Sample, table_from_samples
from spattn.testing import dense_attention


def _brute_force_linked(c, v, cap, linked):
    best = None
    G, O = c.shape
    for choice in itertools.product(range(O), repeat=G):
        if any(len({choice[g] == o for g, o in members}) > 1 for members in linked):
            continue  # a linked set partly taken
        rows = np.arange(G)
        cost = c[rows, choice].sum()
        if cost <= cap + 1e-12:
            value = v[rows, choice].sum()
            best = value if best is None or value > best else best
    return best


def test_linked_options_are_all_or_none_and_exact():
    rng = np.random.default_rng(3)
    checked = 0
    for trial in range(25):
        G, O = int(rng.integers(2, 5)), int(rng.integers(2, 4))
        c = rng.integers(0, 6, (G, O)).astype(float)
        v = rng.normal(size=(G, O))
        v[:, O - 1] += 1.0  # make the linked option attractive, so the constraint binds
        if trial % 4 == 0:
            c[G - 1, O - 1] = np.inf  # a forbidden member: the whole set is never taken
        linked = [[(g, O - 1) for g in range(G)]]
        cap = float(rng.integers(0, int(np.where(np.isfinite(c), c, 0).sum()) + 2))
        best = _brute_force_linked(c, v, cap, linked)
        if best is None:
            with pytest.raises(ValueError):
                solve(c, v, cap, linked=linked, method="milp")
            continue
        sol = solve(c, v, cap, linked=linked, method="milp")
        taken = [sol.choice[g] == O - 1 for g in range(G)]
        assert all(taken) or not any(taken), (sol.choice, c, v)
        if not np.isfinite(c[G - 1, O - 1]):
            assert not any(taken)
        assert sol.cost <= cap + 1e-9 and math.isclose(sol.value, best, rel_tol=1e-9, abs_tol=1e-9)
        checked += 1
    assert checked > 10
    # without the link the same instance may split the option across groups: the link is what binds
    c, v = np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([[0.0, 5.0], [0.0, 0.1]])
    assert solve(c, v, 3).choice == [1, 0]
    assert solve(c, v, 3, linked=[[(0, 1), (1, 1)]]).choice == [0, 0]
    assert solve(c, v, 4, linked=[[(0, 1), (1, 1)]]).choice == [1, 1]


def test_linked_errors():
    c, v = np.ones((2, 2)), np.zeros((2, 2))
    with pytest.raises(ValueError, match="dp solver cannot link"):
        solve(c, v, 2, linked=[[(0, 1), (1, 1)]], method="dp")
    with pytest.raises(ValueError, match="at least two"):
        solve(c, v, 2, linked=[[(0, 1)]])
    with pytest.raises(ValueError, match="outside the"):
        solve(c, v, 2, linked=[[(0, 1), (5, 1)]])
    with pytest.raises(ValueError, match="more than one linked set"):
        solve(c, v, 2, linked=[[(0, 1), (1, 1)], [(0, 1), (1, 0)]])
    with pytest.raises(ValueError, match="one group twice"):
        solve(c, v, 2, linked=[[(0, 1), (0, 0)]])


def test_default_candidates_offer_the_frozen_form_at_the_budgeted_counts():
    cands = default_candidates(1024, 64)
    wide = [c for c in cands if c.family == "hierarchical"]
    assert wide and all(c.layer_wide for c in wide) and not any(c.layer_wide for c in cands if c not in wide)
    for c in wide:
        k = int(c.name.split(":")[1])
        assert c.pattern == fit_budget(k, 1024, block_size=64, sinks=4)
        assert cost_at(c.pattern, 1024)["keys_per_query"]["total"] <= k
    assert not [c for c in default_candidates(1024, 64, families=("window", "dense")) if c.layer_wide]


def _sample(L=256, H=4, Hkv=2, D=16, S=2, layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = {layer: torch.randn(S, H, L, D, generator=g) for layer in range(layers)}
    ks = {layer: torch.randn(S, Hkv, L, D, generator=g) for layer in range(layers)}
    return Sample(qs, ks)


def test_table_scores_hierarchical_on_its_fine_keys_and_costs_it_exactly():
    """Note [hierarchical candidates]: recall = dense mass on the keys the frozen form reads at full resolution
    (checked against a float64 dense softmax under fine_layout's mask), keys = cost_at (compressed included)."""
    L = 256
    config = fit_budget(96, L, block_size=32, sinks=4)
    assert config is not None
    cands = [Candidate("hier", "hierarchical", config), Candidate("dense", "dense", spattn.Full())]
    sample = _sample(L)
    table = table_from_samples({L: [sample]}, cands, block_size=32)
    cost = cost_at(config, L, block_size=32)
    assert np.allclose(table.keys[..., 0], cost["keys_per_query"]["total"])
    assert np.allclose(table.block_fraction[..., 0], cost["block_fraction"])
    for layer in range(2):
        q, k = sample.queries[layer], sample.keys[layer]
        mask = fine_layout(q, k, config).to_dense()  # [S, H, L, L] bool
        kx = k.double().repeat_interleave(2, 1)
        p = torch.softmax((q.double() @ kx.transpose(-1, -2) / math.sqrt(16)).masked_fill(
            ~torch.ones(L, L, dtype=torch.bool).tril(), -math.inf), -1)
        want = (p * mask).sum(-1).mean(-1).mean(0)  # [H]
        assert np.allclose(table.recall[layer, :, 0], want.numpy(), atol=1e-5)
    assert np.allclose(table.recall[..., 1], 1.0, atol=1e-6)
    # the output of a plan layer run as Hierarchical is a real attention, no NaN
    out = spattn.hierarchical.hierarchical_attention(q[:1], k[:1], k[:1], config)
    assert torch.isfinite(out).all() and out.shape == (1, 4, L, 16)
    ref, _ = dense_attention(q[:1], k[:1], k[:1], mask[:1])  # the frozen form is one softmax over its keys
    assert torch.allclose(out.double(), ref, atol=1e-4)


def test_make_plan_gives_a_whole_layer_or_no_head_and_says_when_it_cannot():
    L = 256
    config = fit_budget(96, L, block_size=32, sinks=4)
    cands = [Candidate("window:32", "window", spattn.Window(32)),
             Candidate("sinks_window:64", "sinks_window", spattn.Sinks(4) | spattn.Window(64)),
             Candidate("hier", "hierarchical", config), Candidate("dense", "dense", spattn.Full())]
    table = table_from_samples({L: [_sample(L)]}, cands, block_size=32)
    table.recall[1, :, 2] = 0.999  # layer 1: every head wants the hierarchical option
    table.recall[0, 0, 2] = 0.999  # layer 0: one head alone wants it; the link must refuse a partial layer
    res = make_plan(None, None, budget=f"{int(cost_at(config, L)['keys_per_query']['total']) + 1} keys",
                    table=table, solver="milp")
    assert res.plan.pattern_for(1) == config
    picks0 = [h["choice"] for h in res.per_head if h["layer"] == 0]
    assert all(p == "hier" for p in picks0) or "hier" not in picks0
    assert "skipped_candidates" not in res.plan.meta["planner"]
    dp = make_plan(None, None, budget="100 keys", table=table, solver="dp")
    assert set(dp.plan.meta["planner"]["skipped_candidates"]) == {"hier"}
    assert all(h["choice"] != "hier" for h in dp.per_head)
    # the plan survives JSON and rescales to another length (Note [hierarchical at another length])
    again = Plan.from_json(res.plan.to_json())
    assert again.pattern_for(1) == config
    longer = res.plan.at_length(4 * L)
    assert isinstance(longer.pattern_for(1), spattn.Hierarchical)
    # validation measures a Hierarchical layer on its fine keys, like the table did
    from spattn.planner.validate import plan_layouts

    sample = _sample(L, S=1)
    q, k = sample.queries[1], sample.keys[1]
    got = plan_layouts(res.plan, 1, q, k, causal=True, block_size=32)
    assert torch.equal(got.to_dense(), fine_layout(q, k, config).to_dense())


def test_scale_pattern_rescales_hierarchical_by_the_budget_rule():
    config = fit_budget(256, 1024, block_size=64, sinks=4)
    frac = scale_pattern(config, 4, "fraction")
    assert frac.select_count - 1 == round((config.select_count - 1) * 4)
    assert frac.compress_stride == config.compress_stride and frac.window == config.window == 1
    assert frac.safeguard == scale_pattern(config.safeguard, 4, "fraction")
    share = cost_at(config, 1024)["keys_fraction"]
    assert abs(cost_at(frac, 4096)["keys_fraction"] - share) < 0.35 * share  # the share of the keys holds
    keys = scale_pattern(config, 4, "keys")
    assert keys.compress_stride == 4 * config.compress_stride and keys.select_count == config.select_count
    assert keys.compress_block == 4 * config.compress_block and keys.safeguard == config.safeguard
    per_query = cost_at(config, 1024)["keys_per_query"]["compressed"]
    assert abs(cost_at(keys, 4096)["keys_per_query"]["compressed"] - per_query) <= 0.2 * per_query + 2
    assert scale_pattern(config, 1, "fraction") is config
