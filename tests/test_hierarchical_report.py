"""``Hierarchical`` as a family of ``spattn report``: fitted to the report's budgets in its cost unit (compressed
tokens counted), covered on its fine keys, timed as the whole call, and listed with intervals at two lengths of a
``--quick``-sized run of a tiny Llama."""

from __future__ import annotations

import json
import random

import pytest
import torch

from spattn.hierarchical import cost_at, fine_layout
from spattn.integrations.plan import Plan
from spattn.report import candidates as C
from spattn.report.evaluate import candidate_latency, coverage_pass, dropped_threads, kernel_references

L, H, HKV, D, LAYERS = 512, 4, 2, 16, 3


def _captures() -> list:
    gen = torch.Generator().manual_seed(0)
    return [[(torch.randn(1, H, L, D, generator=gen), torch.randn(1, HKV, L, D, generator=gen))
             for _ in range(LAYERS)]]


@pytest.fixture(scope="module")
def fitted():
    return C.fit_hierarchical(0.25, L, 64)


def test_fit_and_coverage_in_the_reports_cost_unit(fitted):
    assert fitted.pattern is not None and fitted.family == "hierarchical" and fitted.dynamic
    assert fitted.label.startswith("Hierarchical(compress_stride=") and "| Sinks(" in fitted.label
    captures = _captures()
    cov = coverage_pass([fitted], captures, block_size=64, head_dim=D)[fitted.id]
    exact = cost_at(fitted.pattern, L, head_dim=D, heads=H, block_size=64)
    assert cov["cost"]["keys_fraction"] == pytest.approx(exact["keys_fraction"], rel=1e-5)
    assert cov["cost"]["keys_fraction"] <= 0.25  # compressed tokens, selected and window keys within the budget
    assert cov["cost"]["attention_gflops"] == pytest.approx(LAYERS * exact["attention_flops"] / 1e9, rel=1e-5)
    # recall is the dense mass on the fine keys: that of the fine layout, layer by layer
    q, k = captures[0][1]
    lay = fine_layout(q, k, fitted.pattern)
    scores = (q[0] @ k[0].repeat_interleave(H // HKV, 0).transpose(-1, -2)) * D ** -0.5
    probs = torch.softmax(scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")), -1)
    recall = (probs * lay.to_dense()[0]).sum(-1).mean()
    assert cov["recall"]["per_layer_mean"][1] == pytest.approx(float(recall), rel=1e-4)
    assert 0 < cov["recall"]["mean"] < 1


def test_latency_threads_and_kernel_references(fitted):
    captures = _captures()
    lat = candidate_latency(fitted.pattern, captures, block_size=64, backend="reference", repeats=1, seed=0)
    assert lat["includes_selection"] and lat["median_ms"] > 0 and lat["dense_ms"] > 0
    assert lat["compile_ms"] > 0 and lat["peak_memory_mb"] > 0
    threads = dropped_threads(Plan.uniform(fitted.pattern), captures[0], block_size=64)
    assert len(threads["dropped"]) == L and all(0 <= x <= 1 + 1e-6 for x in threads["dropped"])
    q, k = captures[0][0]
    with pytest.raises(ValueError, match="no Flex reference"):
        kernel_references(fitted.pattern, q, k, k, block_size=64, backend="reference")


def test_a_budget_it_cannot_fit_is_a_note():
    cand = C.fit_hierarchical(0.05, 1024, 64)
    assert cand.pattern is None and "cannot fit 0.05" in cand.note
    assert "block size >= 16" in C.fit_hierarchical(0.25, 1024, 8).note


def test_report_lists_hierarchical_with_intervals_at_two_lengths(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from typer.testing import CliRunner

    from spattn.cli.main import app
    from tests.test_report import _make_tiny

    model_dir, _ = _make_tiny(tmp_path)
    rng = random.Random(1)  # the tiny model's words, long enough for 3 chunks of 512 tokens and 3 of 256
    words = [f"w{a}{b}" for a in "abcdefgh" for b in "abcdefgh"]
    text = tmp_path / "long.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "."
                                for _ in range(120)))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["report", "--model", str(model_dir), "--text", str(text), "-o", str(out),
                                      "--quick", "--lengths", "256,512", "--budgets", "0.5", "--families",
                                      "sinks_window,hierarchical", "--retrieval-samples", "0", "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    for part in [results, *results["lengths"]]:
        (rec,) = [c for c in part["candidates"] if c["family"] == "hierarchical"]
        assert rec["pattern"]["type"] == "hierarchical"
        low, high = rec["model"]["perplexity_interval"]
        assert low <= rec["model"]["perplexity"] <= high and low < high
        assert 0 < rec["cost"]["keys_fraction"] <= 0.5
    assert [p["length"] for p in results["lengths"]] == [512]
    assert "hierarchical" in (out / "report.html").read_text()
