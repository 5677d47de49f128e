"""Planner on (tiny) transformers models: end to end, task scorers, latency costs, validation, CLI, heat map."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import spattn
from spattn.planner import Candidate, LatencyTable, LMScorer, TaskScorer, make_plan
from tests.hf_support import tiny_bert, tiny_llama

transformers = pytest.importorskip("transformers")

L, BS = 128, 32
CANDIDATES = [Candidate("window:16", "window", spattn.Window(16)),
              Candidate("window:48", "window", spattn.Window(48)),
              Candidate("sinks_window:16", "sinks_window", spattn.Sinks(4) | spattn.Window(16)),
              Candidate("pooled:32+1", "dynamic:pooled",
                        spattn.Sinks(4) | spattn.Window(16) | spattn.TopK("pooled", 1))]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (12 * L,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama_result(llama, tokens):
    return make_plan(llama, tokens, budget=0.85, lengths=(L,), samples=2, block_size=BS, candidates=CANDIDATES)


def test_plan_end_to_end_on_a_model(llama, tokens, llama_result):
    plan = llama_result.plan
    assert set(plan.heads) == {0, 1} and all(len(v) == 4 for v in plan.heads.values())
    assert llama_result.solution.cost <= llama_result.capacity + 1e-9
    assert plan.meta["planner"]["samples"] == 2 and plan.budget.block_size == BS
    ids = tokens[None, :L]
    with spattn.patched(llama, plan, block_size=BS):
        logits = llama(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    with spattn.patched(llama, plan.at_length(2 * L), block_size=BS):
        assert torch.isfinite(llama(input_ids=tokens[None, : 2 * L]).logits).all()
    # the functional form returns the same plan
    same = spattn.plan(llama, tokens, budget=0.85, lengths=(L,), samples=2, block_size=BS, candidates=CANDIDATES)
    assert same.layers == plan.layers and same.heads == plan.heads and same.budget == plan.budget


class LayerOneMatters:
    """A task that only cares about layer 1 (its score drops when layer 1 goes sparse)."""

    name = "layer-one"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, model, plan):
        self.calls += 1
        return -1.0 if plan is not None and plan.pattern_for(1) is not None else 0.0


def test_task_scorer_protocol_moves_the_budget(llama, tokens, llama_result):
    scorer = LayerOneMatters()
    assert isinstance(scorer, TaskScorer)
    task = make_plan(llama, tokens, budget=0.85, lengths=(L,), samples=2, block_size=BS, candidates=CANDIDATES,
                     task=scorer, table=llama_result.table)
    assert scorer.calls == 3  # dense once, then one probe per layer
    assert task.layer_weights[1] > task.layer_weights[0]
    spent = {layer: sum(h["cost"] for h in task.per_head if h["layer"] == layer) for layer in (0, 1)}
    assert spent[1] > spent[0]  # the budget left after the cheapest choices goes to the layer the task needs
    assert task.plan.meta["planner"]["objective"] == "task" and task.plan.meta["planner"]["task"] == "layer-one"
    # the same budget, planned for recall alone, spends it differently
    assert [h["choice"] for h in task.per_head] != [h["choice"] for h in llama_result.per_head]
    assert task.solution.cost <= task.capacity + 1e-9
    with pytest.raises(TypeError, match="score"):
        make_plan(llama, tokens, budget=0.85, task=object(), table=llama_result.table, block_size=BS)


def test_lm_scorer(llama, tokens):
    scorer = LMScorer(tokens[: 2 * L].view(2, L), block_size=BS)
    assert scorer.score(llama, None) == 0.0
    sparse = scorer.score(llama, spattn.Plan.uniform(spattn.Window(4)))
    assert sparse < 0  # minus a KL: any real sparsity loses something


def test_objectives_and_latency_costs(llama, tokens, llama_result):
    out = make_plan(llama, tokens, budget=0.85, lengths=(L,), samples=1, block_size=BS, candidates=CANDIDATES,
                    objective="output_error")
    assert out.table.output_error is not None and np.all(out.table.output_error >= 0)
    kl = make_plan(None, None, budget=0.85, objective="kl", table=llama_result.table)
    assert kl.solution.cost <= kl.capacity + 1e-9
    keys = make_plan(None, None, budget="40 keys", table=llama_result.table)
    assert np.mean([h["keys_per_query"] for h in keys.per_head]) <= 40 + 1e-9
    table = LatencyTable(None, device="cpu", repeats=1)
    # at these tiny shapes the CPU reference kernel may be slower than dense SDPA: a 100% budget always fits
    lat = make_plan(None, None, budget=1.0, cost="latency", table=llama_result.table, latency=table)
    assert table.measured == len(CANDIDATES) + 1 and lat.table.latency_ms is not None
    cheapest = float(lat.table.latency_ms.reshape(lat.table.layers * lat.table.heads, -1).min(1).sum())
    ms = make_plan(None, None, budget=f"{1.2 * cheapest:.6f}ms", cost="latency", table=lat.table, latency=table)
    assert ms.solution.cost <= 1.2 * cheapest + 1e-6 and ms.plan.budget.kind == "ms"
    assert table.measured == len(CANDIDATES) + 1  # the second plan reused every entry


def test_latency_table_cache_file(tmp_path):
    path = tmp_path / "latency.json"
    table = LatencyTable(path, device="cpu", repeats=1)
    ms = table.layer_ms(spattn.Window(8), 64, heads=2, kv_heads=1, head_dim=8, block_size=16)
    table.save()
    again = LatencyTable(path, device="cpu", repeats=1)
    assert again.layer_ms(spattn.Window(8), 64, heads=2, kv_heads=1, head_dim=8, block_size=16) == ms
    assert again.measured == 0
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="latency table"):
        LatencyTable(path)


def test_latency_table_times_candidates_interleaved():
    calls = []

    class Recording(LatencyTable):
        def _runner(self, pattern, q, k, v, length, block_size, causal):
            return lambda: calls.append(pattern)

    a, b, c = spattn.Window(8), spattn.Window(16), spattn.Sinks(2) | spattn.Window(8)
    table = Recording(None, device="cpu", repeats=3)
    shape = dict(heads=2, kv_heads=1, head_dim=8, block_size=16)
    table.layer_ms(c, 64, **shape)  # already in the table: not timed again below
    calls.clear()
    ms = table.measure([a, b, c, a], 64, **shape)
    assert calls == [a, b] + [a, b] * 3  # one warm-up each, then round-robin rounds; the duplicate once
    assert len(ms) == 4 and ms[0] == ms[3] and table.measured == 3
    assert all(e["interleaved"] and e["repeats"] == 3 for e in table.entries.values())


def test_encoder_plan_is_bidirectional():
    model = tiny_bert()
    ids = torch.randint(5, 120, (6 * 64,), generator=torch.Generator().manual_seed(1))
    cands = [Candidate("window:8", "window", spattn.Window(8, 8)),
             Candidate("window:24", "window", spattn.Window(24, 24))]
    result = make_plan(model, ids, budget=0.8, lengths=(64,), samples=1, block_size=16, candidates=cands)
    assert not result.table.causal
    assert result.solution.cost <= result.capacity + 1e-9


def test_validate_and_heatmap(llama, tokens, llama_result, tmp_path):
    pytest.importorskip("matplotlib")
    from spattn.planner.figures import plan_heatmap
    from spattn.planner.validate import validate

    out = validate(llama, llama_result.plan, tokens, length=2 * L, samples=1)
    assert out["length"] == 2 * L and 0 < out["recall"] <= 1 and len(out["per_head_recall"]) == 2
    fig = plan_heatmap(llama_result.plan, tmp_path / "plan.png")
    assert (tmp_path / "plan.png").stat().st_size > 1000 and fig is not None
    with pytest.raises(ValueError, match="per-head"):
        plan_heatmap(spattn.Plan.uniform(spattn.Window(4)))


def test_cli_plan(tmp_path):
    from typer.testing import CliRunner

    from spattn.cli.main import app
    from spattn.integrations.models import minilm_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=256)
    folder = tmp_path / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial kings".split()
    rng = np.random.default_rng(0)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words, 60)) for _ in range(40)))
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--model", str(folder), "--text", str(text), "--budget", "70%",
                                      "--lengths", "128", "--samples", "1", "--block-size", "32", "--families",
                                      "window,sinks_window", "--quiet", "--output", str(out)])
    assert result.exit_code == 0, result.output
    plan = spattn.Plan.load(out)
    assert plan.budget.kind == "fraction" and plan.heads and plan.meta["command"].startswith("spattn")
    bad = CliRunner().invoke(app, ["plan", "--model", str(folder), "--text", str(text), "--budget", "fast"])
    assert bad.exit_code == 2 and "not understood" in bad.output
