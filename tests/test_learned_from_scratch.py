"""benchmarks/train_from_scratch.py (a quick run of the script itself) and the trainer options it relies on:
``fit``'s deadline and autocast, and the ``spattn train`` hierarchical / distill variants."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import time

import pytest
import torch

BENCH = pathlib.Path(__file__).parents[1] / "benchmarks" / "train_from_scratch.py"


def _bench():
    spec = importlib.util.spec_from_file_location("spattn_bench_train_from_scratch", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_trains_every_section_at_matched_budget(tmp_path):
    bench = _bench()
    out = tmp_path / "tfs.json"
    threads = torch.get_num_threads()
    try:
        data = bench.main(["--quick", "--device", "cpu", "--skip-gate", "--time-budget", "900", "--out", str(out),
                           "--sections", "lm0,ablation,seed1", "--workers", "3", "--in-process",
                           "--variants", "hierarchical,learned,learned+drop"])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text())["sections"].keys() == data["sections"].keys()
    assert data["machine"]["versions"]["torch"] and data["command"]
    lm, ablation, seed1 = (data["sections"][f"{k}@256"] for k in ("lm", "ablation", "seed1"))
    assert lm["wave"] == ablation["wave"] == 0 and seed1["wave"] == 1  # whole sections, at most 3 workers a wave
    assert seed1["steps_from_wave"] == 0  # the second seed keeps the first's step count
    for name in ("lm@256", "ablation@256", "seed1@256"):
        section = data["sections"][name]
        assert section["status"] == "done", section
        assert section["steps"] == 3 and set(section["calibration"]) == set(section["runs"])  # --max-steps (quick)
        for variant, run in section["runs"].items():
            assert run["status"] == "done" and run["steps_done"] == 3 and not run["stopped_early"], variant
            log = tmp_path / "tfs-runs" / f"{bench.job_name(name, variant)}.jsonl"  # the worker's own curve
            assert log.name.replace("-", "").replace(".", "").isalnum()
            assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1, 2]
            for corpus in ("austen", "kjv"):
                assert len(run["final_losses"][corpus]) == 2, variant
                point = run["history"][-1][f"{corpus}_loss"]
                assert math.isfinite(point["value"]) and point["low"] <= point["value"] <= point["high"]
    assert set(lm["runs"]) == {"hierarchical", "learned"} and set(ablation["runs"]) == {"learned+drop"}
    keys = lm["budget"]["keys_per_query"]
    assert keys["hierarchical"] <= keys["window"] < keys["dense"]  # the window is the smallest reaching it
    # the router's block count is the one nearest the hierarchical budget
    budget = lm["budget"]
    near = abs(keys["learned"] - keys["hierarchical"])
    for n in (budget["learned_routed_blocks"] - 1, budget["learned_routed_blocks"] + 1):
        if n >= 1:
            assert near <= abs(bench.band_keys_per_query(1 + n, budget["learned_block"], 256) - keys["hierarchical"])
    assert lm["runs"]["hierarchical"]["keys_per_query"]["branches_total"] > 0
    assert lm["runs"]["learned"]["keys_per_query"]["mean"] > 0
    assert "gate_entropy" in lm["runs"]["learned"]["history"][-1]  # collapse metrics logged, in training
    assert 0 < lm["runs"]["learned"]["history"][-1]["held_distinct_blocks"] <= 1  # and on held-out text
    assert "held_distinct_blocks" not in lm["runs"]["hierarchical"]["history"][-1]
    assert ablation["runs"]["learned+drop"]["regularisers"]["drop"] == 0.1
    assert lm["comparisons"]["at_step"] == 2  # the last step, logged by every run
    assert lm["comparisons"]["hierarchical_vs_learned"]["austen"]["winner"] in ("a", "b", "tie")
    assert set(data["over_seeds"]) == {"hierarchical", "learned"}
    assert data["ablation_comparisons"]["learned+drop_vs_learned"]["kjv"]["winner"] in ("a", "b", "tie")
    drawn = bench.main(["--plot", str(out), "--figure", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "| learned+drop | 3 |" in drawn["summary"] and "**seed1@256** (3 steps each" in drawn["summary"]


def test_fit_stops_at_the_deadline_and_trains_under_autocast():
    from spattn.learned.train import fit, lm_batches
    from spattn.nn import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(32, dim=16, layers=1, num_heads=2, num_kv_heads=1)
    ids = torch.randint(0, 32, (500,))
    run = fit(model, lm_batches(ids, 32, 2), steps=50, log_every=10, deadline=time.perf_counter() - 1)
    assert run["steps_done"] == 1 and run["stopped_early"] and run["history"][-1]["step"] == 0
    calls = []
    run = fit(model, lm_batches(ids, 32, 2), steps=3, log_every=1, autocast=torch.bfloat16,
              evaluate_with=lambda m: calls.append(torch.is_autocast_enabled("cpu")) or {"probe": 1.0})
    assert run["steps_done"] == 3 and not run["stopped_early"] and calls == [True] * 3
    assert run["final"]["probe"] == 1.0 and math.isfinite(run["final"]["loss"])


@pytest.mark.parametrize("variant", ["hierarchical", "distill"])
def test_train_recipe_variants_build_and_train(variant):
    from spattn.cli.train import attention_factory
    from spattn.learned.train import Regularisers, regulariser_losses
    from spattn.nn import TransformerLM

    factory = attention_factory(variant, heads=2, kv_heads=1, head_dim=8, budget=3, block_size=16)
    model = TransformerLM(32, dim=16, layers=1, num_heads=2, num_kv_heads=1, pattern=factory, block_size=16)
    ids = torch.randint(0, 32, (2, 97))
    loss = model.loss(ids)
    terms = regulariser_losses(model, Regularisers())
    assert ("distill" in terms) == (variant == "distill")
    (loss + sum(terms.values())).backward()
    trained = [p for n, p in model.named_parameters() if "pattern." in n]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
