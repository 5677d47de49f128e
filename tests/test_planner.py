"""Planner: knapsack exactness, batched scoring against the coverage oracle, planted heads, budget rules."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import spattn
from spattn.integrations.plan import BudgetRule, Plan, scale_pattern
from spattn.planner import Candidate, Constraints, make_plan, parse_budget, score_layouts, solve
from spattn.planner.candidates import default_candidates
from spattn.planner.table import Sample, table_from_samples
from spattn.selectors import TopK


# ---------------------------------------------------------------------------------------------- knapsack
def _brute_force(c, v, cap, flagged, min_flagged):
    best = None
    G, O = c.shape
    for choice in itertools.product(range(O), repeat=G):
        rows = np.arange(G)
        cost = c[rows, choice].sum()
        n_flag = flagged[rows, choice].sum()
        if cost <= cap + 1e-12 and n_flag >= min_flagged:
            value = v[rows, choice].sum()
            best = value if best is None or value > best else best
    return best


@pytest.mark.parametrize("method", ["dp", "milp"])
def test_knapsack_is_exact_on_small_instances(method):
    rng = np.random.default_rng(1)
    checked = 0
    for trial in range(30):
        G, O = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        c = rng.integers(0, 7, (G, O)).astype(float)  # integer costs: the dp is exact too
        if trial % 3 == 0 and O > 1:
            c[0, 0] = np.inf  # an option group 0 may not take
        v = rng.normal(size=(G, O))
        flagged = rng.random((G, O)) < 0.4
        min_flagged = int(rng.integers(0, 3))
        cap = float(rng.integers(0, int(np.where(np.isfinite(c), c, 0).sum()) + 2))
        best = _brute_force(c, v, cap, flagged, min_flagged)
        if best is None:
            with pytest.raises(ValueError):
                solve(c, v, cap, flagged=flagged, min_flagged=min_flagged, method=method)
            continue
        sol = solve(c, v, cap, flagged=flagged, min_flagged=min_flagged, method=method)
        rows = np.arange(G)
        assert sol.cost <= cap + 1e-9 and flagged[rows, sol.choice].sum() >= min_flagged
        assert math.isclose(sol.value, best, rel_tol=1e-9, abs_tol=1e-9) and sol.exact
        checked += 1
    assert checked > 10


def test_knapsack_real_costs_never_exceed_capacity():
    rng = np.random.default_rng(2)
    for _ in range(20):
        c, v = rng.random((6, 4)), rng.random((6, 4))
        cap = float(rng.uniform(c.min(1).sum(), c.sum() / 2))
        dp, milp = solve(c, v, cap, method="dp", resolution=500), solve(c, v, cap, method="milp")
        assert dp.cost <= cap and milp.cost <= cap + 1e-9
        assert dp.value <= milp.value + 1e-9  # rounding costs up can only lose value


def test_knapsack_errors():
    with pytest.raises(ValueError, match="too small"):
        solve([[2, 3]], [[0, 1]], 1)
    with pytest.raises(ValueError, match="no allowed option"):
        solve([[np.inf]], [[0]], 1)
    with pytest.raises(ValueError, match="same|shape"):
        solve([[1, 2]], [[1]], 3)
    with pytest.raises(ValueError, match="method"):
        solve([[1]], [[1]], 3, method="greedy")


# ---------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("causal", [True, False])
def test_score_layouts_matches_coverage_measure(causal):
    torch.manual_seed(0)
    length = 200  # not a multiple of the block size
    B, H, Hkv, D = 2, 4, 2, 16
    q, k, v = torch.randn(B, H, length, D), torch.randn(B, Hkv, length, D), torch.randn(B, Hkv, length, D)
    patterns = [spattn.Window(17), spattn.Sinks(3) | spattn.Window(40), spattn.Full(),
                spattn.Sinks(4) | spattn.Window(16) | TopK("pooled", 1),
                spattn.PerHead([spattn.Window(5), spattn.Full(), spattn.Sinks(2), spattn.Strided(3)])]
    layouts = [spattn.compile(p, length, causal=causal, block_size=32, query=q, key=k, heads=H, batch=B)
               for p in patterns]
    got = score_layouts(q, k, layouts, value=v, causal=causal, chunk_elements=30000)  # several query chunks
    for n, layout in enumerate(layouts):
        ref = spattn.coverage.measure(q, k, layout, value=v, causal=causal, topk=0)
        assert torch.allclose(got.recall[n], ref.recall, atol=1e-5), patterns[n]
        assert torch.allclose(got.output_error[n], ref.output_error, atol=1e-5), patterns[n]


def test_score_layouts_errors():
    q, k = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    lay = spattn.compile(spattn.Window(4), 64, causal=True, block_size=16)
    with pytest.raises(ValueError, match="layouts"):
        score_layouts(q, k, [])
    with pytest.raises(ValueError, match="block size"):
        score_layouts(q, k, [lay, spattn.compile(spattn.Window(4), 64, causal=True, block_size=32)])
    with pytest.raises(ValueError, match="query"):
        score_layouts(q[0], k, [lay])


# ---------------------------------------------------------------------------------------------- planted heads
L_PLANT, BS_PLANT = 384, 32


def planted_sample(seed: int) -> Sample:
    """One layer, three heads: head 0 attends locally, head 1 to 4 hub tokens at the start, head 2 retrieves
    tokens of one far-back key block per query block."""
    L, D = L_PLANT, 32
    g = torch.Generator().manual_seed(seed)
    q, k = torch.zeros(1, 3, L, D), torch.zeros(1, 3, L, D)
    theta, width = math.pi / L, 6.0  # head 0: scores ~ -(i - j)^2 / (2 width^2)
    pos = torch.arange(L, dtype=torch.float64)
    e = torch.stack([torch.cos(theta * pos), torch.sin(theta * pos)], -1).float()
    e = e * math.sqrt(math.sqrt(D) / (theta * width) ** 2)
    q[0, 0, :, :2], k[0, 0, :, :2] = e, e
    q[0, 1], k[0, 1] = 0.3 * torch.randn(L, D, generator=g), 0.3 * torch.randn(L, D, generator=g)
    hub = math.sqrt(20 * math.sqrt(D))
    k[0, 1, :4, 5], q[0, 1, :, 5] = hub, hub
    keys = torch.randn(L, D, generator=g)
    keys = keys / keys.norm(dim=-1, keepdim=True) * math.sqrt(4 * math.sqrt(D))
    k[0, 2] = keys
    for qb in range(3, L // BS_PLANT):
        kb = int(torch.randint(0, qb - 2, (1,), generator=g))
        targets = kb * BS_PLANT + torch.randint(0, BS_PLANT, (BS_PLANT,), generator=g)
        q[0, 2, qb * BS_PLANT:(qb + 1) * BS_PLANT] = 4 * keys[targets]
    return Sample(queries={0: q}, keys={0: k}, causal=True)


PLANT_CANDIDATES = [c for c in default_candidates(L_PLANT, BS_PLANT)
                    if c.name in {"window:16", "window:32", "window:64", "window:128", "sinks_window:16",
                                  "sinks_window:32", "pooled:32+1", "pooled:32+2", "dense"}]


@pytest.fixture(scope="module")
def planted_table():
    return table_from_samples({L_PLANT: [planted_sample(0)]}, PLANT_CANDIDATES, block_size=BS_PLANT)


def test_batched_samples_score_like_separate_chunks():
    """One Sample holding two chunks (one batched capture) gives the table of two one-chunk Samples."""
    a, b = planted_sample(0), planted_sample(1)
    both = Sample(queries={0: torch.cat([a.queries[0], b.queries[0]])}, keys={0: torch.cat([a.keys[0], b.keys[0]])})
    sep = table_from_samples({L_PLANT: [a, b]}, PLANT_CANDIDATES, block_size=BS_PLANT)
    bat = table_from_samples({L_PLANT: [both]}, PLANT_CANDIDATES, block_size=BS_PLANT)
    assert sep.samples == bat.samples == 2
    for name in ("recall", "log_recall", "keys", "block_fraction"):
        np.testing.assert_allclose(getattr(bat, name), getattr(sep, name), rtol=1e-5, atol=1e-6, err_msg=name)


def test_planted_heads_get_the_matching_pattern(planted_table):
    result = make_plan(None, None, budget=0.5, table=planted_table)
    local, hub, retrieving = result.per_head
    assert local["family"] == "window" and local["recall"] > 0.99
    # the hub head keeps its hubs: sinks + window, or dynamic selection (whose safeguards are sinks + window and
    # which, since partly kept blocks became selectable, also finds the hub blocks)
    assert hub["family"] in ("sinks_window", "dynamic:pooled") and hub["recall"] > 0.99
    assert hub["family"] != local["family"]
    assert retrieving["family"] == "dynamic:pooled"
    windows = [planted_table.recall[0, 2, planted_table.index(n)] for n in ("window:64", "window:128")]
    assert retrieving["recall"] > max(windows) + 0.1
    # the plan beats the best uniform pattern at the same budget, and names each choice in its JSON
    assert result.solution.value > result.uniform["value"]
    again = Plan.from_json(result.plan.to_json())
    assert again == result.plan and again.heads[0][2]["choice"] == retrieving["choice"]
    assert isinstance(again.pattern_for(0), spattn.PerHead)


def test_plan_from_a_table_states_the_tables_length_and_block_size(planted_table):
    """Re-solving a saved table must not fall back to make_plan's default length (1024) and block size (64):
    the rule's length is what Plan.at_length rescales from."""
    plan = make_plan(None, None, budget="20 keys", table=planted_table).plan
    assert (plan.budget.length, plan.budget.block_size) == (L_PLANT, BS_PLANT) != (1024, 64)


@pytest.mark.parametrize("budget", [0.35, 0.45, 0.6, 0.8, 1.0])
def test_plan_cost_never_exceeds_the_budget(planted_table, budget):
    result = make_plan(None, None, budget=budget, table=planted_table)
    assert result.solution.cost <= result.capacity + 1e-9
    # recompute the cost from the compiled plan itself: visited tiles of the PerHead layout vs dense
    pattern = result.plan.pattern_for(0) or spattn.Full()
    sample = planted_sample(0)
    layout = spattn.compile(pattern, L_PLANT, causal=True, block_size=BS_PLANT, heads=3,
                            query=sample.queries[0], key=sample.keys[0])
    dense = spattn.compile(spattn.Full(), L_PLANT, causal=True, block_size=BS_PLANT)
    visited = (layout.kv_num_blocks + layout.full_kv_num_blocks).sum(-1).double().mean()
    full = (dense.kv_num_blocks + dense.full_kv_num_blocks).sum(-1).double().mean()
    assert float(visited / full) <= budget + 1e-9


def test_candidate_table_save_load(planted_table, tmp_path):
    from spattn.planner import CandidateTable

    again = CandidateTable.load(planted_table.save(tmp_path / "table.npz"))
    assert [c.name for c in again.candidates] == [c.name for c in planted_table.candidates]
    assert again.candidates[-2].pattern == planted_table.candidates[-2].pattern
    assert np.array_equal(again.recall, planted_table.recall) and again.output_error is None
    a = make_plan(None, None, budget=0.5, table=again)
    b = make_plan(None, None, budget=0.5, table=planted_table)
    assert a.plan.layers == b.plan.layers


def test_constraints(planted_table):
    result = make_plan(None, None, budget=0.9, table=planted_table, constraints=Constraints(min_dense_heads=2))
    assert sum(r["family"] == "dense" for r in result.per_head) >= 2
    result = make_plan(None, None, budget=1.0, table=planted_table, constraints=Constraints(dense_layers=(-1,)))
    assert result.plan.pattern_for(0) is None
    result = make_plan(None, None, budget=0.6, table=planted_table, constraints=Constraints(families=("window",)))
    assert {r["family"] for r in result.per_head} <= {"window", "dense"}
    with pytest.raises(ValueError, match="too small"):
        make_plan(None, None, budget=0.6, table=planted_table, constraints=Constraints(dense_layers=(0,)))
    with pytest.raises(ValueError, match="dense_layers"):
        make_plan(None, None, budget=0.6, table=planted_table, constraints=Constraints(dense_layers=(3,)))


# ---------------------------------------------------------------------------------------------- budget rules
@pytest.mark.parametrize("text, kind, value", [(0.25, "fraction", 0.25), ("25%", "fraction", 0.25),
                                               ("256 keys", "keys", 256.0), ("12ms", "ms", 12.0)])
def test_parse_budget(text, kind, value):
    cost = "latency" if kind == "ms" else "flops"
    rule = parse_budget(text, cost=cost, length=1024, block_size=64)
    assert (rule.kind, rule.value, rule.length) == (kind, value, 1024)


@pytest.mark.parametrize("budget, cost, words", [(1.5, "flops", "fraction"), ("12ms", "flops", "latency"),
                                                 ("fast", "flops", "not understood"), (True, "flops", "bool"),
                                                 ("256 keys", "latency", "FLOP budget")])
def test_parse_budget_errors(budget, cost, words):
    with pytest.raises((ValueError, TypeError), match=words):
        parse_budget(budget, cost=cost, length=1024, block_size=64)


def _keys_and_tiles(pattern, length, block_size):
    layout = spattn.compile(pattern, length, causal=True, block_size=block_size, heads=2)
    dense = spattn.compile(spattn.Full(), length, causal=True, block_size=block_size)
    tiles = (layout.kv_num_blocks + layout.full_kv_num_blocks).sum(-1).double().mean()
    full = (dense.kv_num_blocks + dense.full_kv_num_blocks).sum(-1).double().mean()
    return float(layout.allowed_pairs().mean()) / length, float(tiles / full)


@pytest.mark.parametrize("kind", ["fraction", "keys"])
def test_at_length_keeps_the_budget_rule(kind):
    bs, L0 = 32, 256
    per_head = spattn.PerHead([spattn.Sinks(4) | spattn.Window(48) | spattn.Strided(4, block=bs),
                               spattn.Budgeted(96, sinks=4)])
    rule = BudgetRule(kind, 0.5, length=L0, block_size=bs) if kind == "fraction" else \
        BudgetRule(kind, 100.0, length=L0, block_size=bs)
    plan = Plan(layers={0: per_head}, budget=rule)
    keys0, tiles0 = _keys_and_tiles(plan.pattern_for(0), L0, bs)
    for factor in (4, 8):
        at = plan.at_length(L0 * factor)
        assert at.budget == rule and Plan.from_json(at.to_json()) == at
        keys, tiles = _keys_and_tiles(at.pattern_for(0), L0 * factor, bs)
        if kind == "fraction":  # the share of the dense cost stays: never above the plan's, and it does not
            assert 0.5 * tiles0 <= tiles <= tiles0 + 1e-9  # shrink like a fixed-size plan would (1 / factor)
        else:  # keys per query stay within one block of the planned ones
            assert keys <= keys0 + bs + 1e-9
    with pytest.raises(ValueError, match="budget rule"):
        Plan(layers={0: per_head}).at_length(1024)


def test_scale_pattern_rules():
    p = spattn.Sinks(4) | spattn.Window(100) | spattn.Strided(3, block=16) | TopK("pooled", 2)
    assert scale_pattern(p, 2.0, "fraction") == spattn.Sinks(4) | spattn.Window(200) | spattn.Strided(3, block=16) \
        | TopK("pooled", 4)
    assert scale_pattern(p, 2.0, "keys") == spattn.Sinks(4) | spattn.Window(100) | spattn.Strided(6, block=16) \
        | TopK("pooled", 2)
    with pytest.raises(ValueError, match="kind"):
        scale_pattern(p, 2.0, "tokens")


def test_candidates_are_validated():
    from spattn.planner.candidates import as_candidates

    out = as_candidates([spattn.Window(8), Candidate("w", "window", spattn.Window(16))], 64, 16)
    assert [c.name for c in out] == ["custom:0", "w", "dense"]
    with pytest.raises(ValueError, match="unique"):
        as_candidates([Candidate("w", "window", spattn.Window(8)), Candidate("w", "window", spattn.Window(9))], 64, 16)
    with pytest.raises(TypeError, match="candidates"):
        as_candidates(["window"], 64, 16)


def test_layout_builds_share_selector_scores():
    """Candidates differing only in their TopK rule compute the selector's scores once and build the same tables."""
    from spattn.selectors import LayoutBuilder

    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 256, 16), torch.randn(2, 2, 256, 16)
    pats = [spattn.Sinks(4) | spattn.Window(32) | TopK(sel, n) for sel in ("pooled", "vertical_slash") for n in (1, 3)]
    builders = [LayoutBuilder(p, 256, causal=True, block_size=32, batch=2, heads=4) for p in pats]
    shared: dict = {}
    for b in builders:
        alone, together = b.build(q, k), b.build(q, k, shared=shared)
        assert torch.equal(alone.block_status(), together.block_status())
    assert sorted(key[1] for key in shared) == ["pooled", "vertical_slash"]
