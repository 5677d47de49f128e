"""benchmarks/hierarchical_train.py: every variant trains (a smoke run of the script itself), the budget is
matched on measured keys per query, and one optimiser step of the hierarchical LM moves its gates and pooling."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import torch

BENCH = pathlib.Path(__file__).parents[1] / "benchmarks" / "hierarchical_train.py"


def _bench():
    spec = importlib.util.spec_from_file_location("spattn_bench_hierarchical_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_trains_every_variant_at_matched_budget(tmp_path):
    bench = _bench()
    out = tmp_path / "ht.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert data["skipped"] == []
    for task in ("retrieval", "lm"):
        assert set(data[task]) == set(bench.VARIANTS), task
        for variant, run in data[task].items():
            assert run["curve"] and all(math.isfinite(p["train_loss"]) for p in run["curve"]), (task, variant)
    keys = data["budget"]["keys_per_query"]
    assert keys["hierarchical"] <= keys["window"] < keys["dense"]
    # the matched window is the smallest one: one key less would fall under the hierarchical budget
    smaller = bench.layout_keys_per_query(
        bench.spattn.Sinks(data["settings"]["sinks"]) | bench.spattn.Window(data["budget"]["window"] - 1),
        data["settings"]["length"], data["settings"]["select_block"])
    assert smaller < keys["hierarchical"]
    measured = data["lm"]["hierarchical"]["keys_per_query"]
    assert 0 < measured["fine_distinct"] <= measured["branches_total"] < keys["dense"]
    test = data["retrieval"]["dense"]["test"]
    assert test["far_queries"] == test["queries"] > 0  # every pass-key query lies beyond the window's reach
    assert 0 <= test["accuracy"]["low"] <= test["accuracy"]["value"] <= test["accuracy"]["high"] <= 1


def test_one_step_moves_hierarchical_gates_and_pooling_in_every_layer():
    bench = _bench()
    args = bench.parse(["--quick"])
    model = bench.make_model("hierarchical", 64, args, None)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "pattern." in n}
    assert {n.rsplit(".", 1)[-1] for n in before} == {"gate_weight", "gate_bias", "pool_key", "pool_value"}
    assert len(before) == 4 * args.layers
    ids = torch.randint(0, 64, (2, args.length + 1), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.loss(ids).backward()
    for name, p in model.named_parameters():
        if name in before:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    opt.step()
    for name, p in model.named_parameters():
        if name in before:
            assert not torch.equal(p.detach(), before[name]), name
