"""The report's per-layer candidate families (the planner's plan, a saved learned gate) on planted captures:
they fit the budget in the report's own cost unit, carry to another length by their budget rule, and the
coverage pass measures each layer with that layer's own pattern. No model needed (fast)."""

from __future__ import annotations

import pytest
import torch

import spattn
from spattn.integrations.plan import Plan
from spattn.report import candidates as C
from spattn.report.config import ReportConfig, quick_omits
from spattn.report.evaluate import coverage_pass, dropped_threads

pytest.importorskip("numpy")
L, H, HKV, D, BS, LAYERS = 128, 4, 2, 16, 16, 3


def _captures(chunks: int = 1) -> list:
    gen = torch.Generator().manual_seed(0)
    return [[(torch.randn(1, H, L, D, generator=gen), torch.randn(1, HKV, L, D, generator=gen))
             for _ in range(LAYERS)] for _ in range(chunks)]


@pytest.fixture(scope="module")
def table():
    return C.planner_table(_captures(), L, BS)


@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_plan_fits_the_budget_in_report_keys(table, budget):
    cand = C.fit_plan(table, budget, L, BS)
    assert cand.pattern is not None and cand.plan is not None and cand.family == "plan"
    cov = coverage_pass([cand], _captures(), block_size=BS, head_dim=D)[cand.id]
    # the knapsack spends at most the budget's keys per query over all layers and heads
    assert cov["cost"]["keys_fraction"] <= budget * (1 + 1e-6)
    assert cand.label.startswith("Plan(per head:")
    assert C.fit_plan(table, budget, L, BS).plan.to_dict() == cand.plan.to_dict()  # deterministic, no wall times
    # the plan states a fraction rule: at twice the length it keeps about the same share of the keys
    longer = cand.plan.at_length(2 * L)
    cost = [C.layout_cost(spattn.compile(longer.pattern_for(i) or spattn.Full(), 2 * L, 2 * L, causal=True,
                                         block_size=BS, heads=H))[0] for i in range(LAYERS)]
    assert sum(cost) / LAYERS <= 1.25 * budget


def test_coverage_uses_each_layers_own_pattern():
    # layer 0 dense, layer 1 window-only, layer 2 sinks + window: recall per layer must differ accordingly
    plan = Plan(layers={0: None, 1: spattn.Window(8), 2: spattn.Sinks(4) | spattn.Window(8)})
    cand = C.plan_candidate("plan@0.5", "plan", 0.5, plan, LAYERS)
    assert cand.pattern == spattn.Window(8)  # the middle layer stands for it
    cov = coverage_pass([cand], _captures(), block_size=BS, head_dim=D)[cand.id]
    per_layer = cov["recall"]["per_layer_mean"]
    assert per_layer[0] == pytest.approx(1.0)
    assert per_layer[1] < per_layer[2] < 1.0
    threads = dropped_threads(plan, _captures()[0], block_size=BS)
    assert threads["per_layer_head"][0] == pytest.approx([0.0] * H, abs=1e-6)
    assert min(threads["per_layer_head"][1]) > 0


def test_learned_gate_family_from_a_saved_checkpoint(tmp_path):
    from spattn.learned.checkpoint import save_gates
    from spattn.learned.gate import BlockGate

    torch.manual_seed(0)
    path = save_gates(tmp_path / "gates.safetensors",
                      {i: BlockGate(H, HKV, D, block_size=BS, hidden=8) for i in range(LAYERS)})
    cand = C.fit_learned(str(path), 0.6, L, BS, LAYERS)
    assert cand.pattern is not None and cand.dynamic and cand.parameter["blocks"] >= 1
    cov = coverage_pass([cand], _captures(), block_size=BS, head_dim=D)[cand.id]
    assert 0 < cov["cost"]["keys_fraction"] <= 0.6 * (1 + 1e-6)
    # too small a budget: said, not fitted
    small = C.fit_learned(str(path), 0.01, L, BS, LAYERS)
    assert small.pattern is None and "cannot fit" in small.note


def test_quick_is_one_candidate_per_family_and_says_what_it_omits():
    cfg = ReportConfig.quick_defaults()
    assert cfg.chunk_length == 256 and cfg.lengths == () and cfg.budgets == (0.25,)
    assert cfg.retrieval_samples == 2 and not cfg.threads and cfg.selectors == ("probe",)  # the issue-12 selector
    omits = " ".join(quick_omits(cfg))
    assert "longer lengths" in omits and "threads view" in omits and "2 pass keys" in omits
    assert quick_omits(ReportConfig()) == []
