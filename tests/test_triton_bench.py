"""The benchmark plumbing the triton suite runs on: one timer, one record, the suite registry, the one
driver and ``spattn bench`` (its default output folder and the guard on committed results)."""

from __future__ import annotations

import json

import pytest
import torch

from spattn import bench
from spattn.bench import record, timing


def test_median_ms_counts_only_timed_calls():
    calls = []
    ms = timing.median_ms(lambda: calls.append(1), device="cpu", repeats=7, warmup=2)
    assert len(calls) == 9 and ms >= 0.0
    x = torch.ones(3, requires_grad=True)
    x.grad = torch.ones(3)
    timing.median_ms(lambda: None, device="cpu", repeats=1, warmup=0, grad_to_none=[x])
    assert x.grad is None


def test_record_and_guarded_write(tmp_path, monkeypatch):
    rec = record.make("demo", {"a": 1}, [{"x": 2}], extra=3)
    assert rec["suite"] == "demo" and rec["rows"] == [{"x": 2}] and rec["extra"] == 3
    assert {"torch", "python", "git_commit", "command", "device"} <= set(rec["machine"])
    monkeypatch.setenv("SPATTN_GIT_COMMIT", "abc123")
    assert record.make("demo", {}, [])["machine"]["git_commit"] == "abc123"
    committed = tmp_path / "benchmarks" / "results" / "cpu" / "demo.json"
    record.write(rec, committed)  # a new file may be written
    with pytest.raises(ValueError, match="committed"):
        record.write(rec, committed)
    record.write(rec, committed, overwrite=True)
    assert json.loads(committed.read_text())["suite"] == "demo"
    free = tmp_path / "elsewhere" / "demo.json"
    record.write(rec, free)
    record.write(rec, free)  # outside benchmarks/results: replaced freely


def test_registry_names_the_four_suites():
    assert set(bench.SUITES) == {"kernels", "selectors", "coverage", "reference"}
    with pytest.raises(ValueError, match="unknown benchmark suite"):
        bench.run_suite("nope")


def _fake_suite(monkeypatch, seen):
    def run_suite(name, argv=None):
        seen.append((name, list(argv or [])))
        return record.make(name, {"argv": argv}, [])

    monkeypatch.setattr(bench, "run_suite", run_suite)


def test_cli_bench_default_path_and_guard(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from spattn.cli.main import app

    seen = []
    _fake_suite(monkeypatch, seen)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--suite", "reference", "--lengths", "256,512", "--repeats", "2"])
    assert res.exit_code == 0, res.output
    assert "spattn-bench/reference.json" in res.output and (tmp_path / "spattn-bench" / "reference.json").exists()
    assert seen[-1] == ("reference", ["--lengths", "256", "512", "--repeats", "2"])
    res = runner.invoke(app, ["bench", "--suite", "kernels", "--", "--quick"])
    assert res.exit_code == 0, res.output
    assert seen[-1] == ("kernels", ["--quick"])
    committed = tmp_path / "benchmarks" / "results" / "kernels.json"
    committed.parent.mkdir(parents=True)
    committed.write_text("{}")
    res = runner.invoke(app, ["bench", "--suite", "kernels", "--output", str(committed)])
    assert res.exit_code != 0 and "committed" in res.output
    assert committed.read_text() == "{}"
    res = runner.invoke(app, ["bench", "--suite", "nope"])
    assert res.exit_code != 0


def test_driver_writes_one_record(tmp_path, monkeypatch):
    import importlib.util
    import pathlib

    seen = []
    _fake_suite(monkeypatch, seen)
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "run.py"
    spec = importlib.util.spec_from_file_location("spattn_bench_driver", path)
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    monkeypatch.setattr(driver, "run_suite", bench.run_suite)
    out = tmp_path / "k.json"
    assert driver.main(["coverage", "--out", str(out), "--", "--lengths", "1024"]) == 0
    assert seen[-1] == ("coverage", ["--lengths", "1024"])
    assert json.loads(out.read_text())["suite"] == "coverage"


def test_benchmark_scripts_end_by_saving_the_partial_record_and_failing_loudly(tmp_path, capsys):
    from spattn.bench.record import finish, record_error

    saved = []
    out = {"rows": [1]}
    try:
        raise RuntimeError("kernel broke")
    except RuntimeError as err:
        status = record_error(out, err)
    assert status == "failed" and out["error"]["type"] == "RuntimeError" and "kernel broke" in out["error"]["message"]
    assert "Traceback" in out["error"]["traceback"]
    with pytest.raises(SystemExit) as stop:
        finish(out, tmp_path / "r.json", status, 1.234, lambda rec, path: saved.append((dict(rec), path)))
    assert stop.value.code == 1 and saved and saved[0][0]["status"] == "failed" and saved[0][0]["seconds"] == 1.23
    finish({"rows": []}, tmp_path / "ok.json", "complete", 2.0, lambda rec, path: saved.append((dict(rec), path)))
    assert saved[-1][0]["status"] == "complete" and "wrote" in capsys.readouterr().out
