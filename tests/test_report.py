"""``spattn report`` end to end on a tiny random Llama and a short generated text (CPU, well under a minute),
plus the pure parts (frontier, recommendation, config errors)."""

from __future__ import annotations

import copy
import html
import json
import random
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
jsonschema = pytest.importorskip("jsonschema")

from typer.testing import CliRunner  # noqa: E402

from spattn.cli.main import app  # noqa: E402
from spattn.report.config import ReportConfig  # noqa: E402
from spattn.report.frontier import pareto, recommend  # noqa: E402

SCHEMA = Path(__file__).resolve().parents[1] / "src" / "spattn" / "report" / "schema.json"
ARGS = ["--lengths", "128,256", "--block-size", "16", "--budgets", "0.1,0.5", "--families",
        "window,random,budgeted,top_p,plan,learned", "--selectors", "pooled", "--calibration-chunks", "1",
        "--eval-chunks", "1", "--repeats", "1", "--device", "cpu", "--kernel-references",
        "--retrieval-at-every-length"]


def _make_tiny(root: Path) -> tuple[Path, Path]:
    """A 3-layer GQA Llama with random weights, a word-level tokenizer, and a ~1700-token text."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    rng = random.Random(0)
    words = [f"w{a}{b}" for a in "abcdefgh" for b in "abcdefgh"]
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "." for _ in range(40))
    vocab = {"[UNK]": 0, ".": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    model_dir = root / "tiny-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    text_path = root / "text.txt"
    text_path.write_text(text)
    return model_dir, text_path


def _invoke(*args: str):
    return CliRunner().invoke(app, ["report", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    model_dir, text_path = _make_tiny(root)
    out = root / "out"
    result = _invoke("--model", str(model_dir), "--text", str(text_path), "-o", str(out), *ARGS)
    assert result.exit_code == 0, result.output
    return {"root": root, "model": model_dir, "text": text_path, "out": out, "output": result.output,
            "results": json.loads((out / "results.json").read_text())}


def test_writes_html_json_and_pngs(tiny):
    out = tiny["out"]
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "</html>" in page
    pngs = sorted((out / "figures").glob("*.png"))
    assert {p.name for p in pngs} >= {"pareto.png", "recall_heatmaps.png", "layouts.png", "reachability.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{p.name}" in tiny["results"]["figures"].values()
    # self-contained: every figure is embedded, nothing is loaded from elsewhere
    assert page.count("data:image/png;base64,") == len(tiny["results"]["figures"])
    assert not re.search(r'src="(?!data:)', page) and "<link" not in page
    assert "Pareto frontier" in tiny["output"]  # the terminal summary


def test_results_validate_against_schema(tiny):
    results = tiny["results"]
    jsonschema.validate(results, json.loads(SCHEMA.read_text()))
    assert results["model"]["layers"] == 3 and results["model"]["kv_heads"] == 2
    assert len(results["candidates"]) + len(results["skipped"]) == 2 * 6
    # the planner's plan is a candidate with a pattern per layer; without --gates the learned family says why not
    plans = [c for c in results["candidates"] if c["family"] == "plan"]
    assert plans and all(len(c["plan"]["layers"]) == 3 for c in plans)
    assert [s["family"] for s in results["skipped"] if "--gates" in s["note"]] == ["learned", "learned"]
    for c in results["candidates"]:
        assert len(c["recall"]["per_layer_head_mean"]) == 3
        assert all(len(row) == 4 for row in c["recall"]["per_layer_head_mean"])
        assert len(c["reach"]["fraction"]) == 3
    # the patched model with full attention reproduces the model's own perplexity
    assert results["dense"]["patched_full_perplexity"] == pytest.approx(results["dense"]["perplexity"], rel=1e-4)
    bad = copy.deepcopy(results)
    bad["candidates"][0]["recall"]["mean"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(SCHEMA.read_text()))


# a number standing on its own (not part of a name such as a commit hash or "SmolLM2")
_NUM = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w])")


def _json_numbers(obj, acc: list[float]) -> list[float]:
    if isinstance(obj, bool) or obj is None:
        return acc
    if isinstance(obj, (int, float)):
        acc.append(float(obj))
    elif isinstance(obj, str):
        acc.extend(float(m) for m in _NUM.findall(obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _json_numbers(k, acc)
            _json_numbers(v, acc)
    elif isinstance(obj, list):
        for v in obj:
            _json_numbers(v, acc)
    return acc


def _visible_text(page: str) -> str:
    page = re.sub(r"<style.*?</style>", " ", page, flags=re.S)
    page = re.sub(r'src="data:[^"]*"', " ", page)
    page = re.sub(r"<[^>]+>", " ", page)
    return html.unescape(page)


def test_every_number_in_html_comes_from_json(tiny):
    numbers = _json_numbers(tiny["results"], [])
    shown = _NUM.findall(_visible_text((tiny["out"] / "report.html").read_text()))
    assert len(shown) > 50
    missing = []
    for token in shown:
        value = float(token)
        decimals = len(token.split(".")[1]) if "." in token and "e" not in token.lower() else 0
        tol = 0.5 * 10 ** (-decimals) + 1e-9
        if not any(abs(x - value) <= tol or abs(100 * x - value) <= tol for x in numbers):
            missing.append(token)
    assert not missing, f"numbers in report.html that are not in results.json: {missing[:20]}"


def test_recommended_pattern_costs_no_more_than_budget(tiny):
    import spattn
    from spattn.report.candidates import layout_cost

    results = tiny["results"]
    by_id = {c["id"]: c for c in results["candidates"]}
    picked = [r for r in results["recommendations"] if r["candidate"]]
    assert picked, "no recommendation at all"
    for r in picked:
        c = by_id[r["candidate"]]
        assert c["cost"]["keys_fraction"] <= r["budget"]
        if not c["dynamic"]:  # recompute the cost independently from the stored pattern (each layer's, for a plan)
            plan = spattn.Plan.from_dict(c["plan"]) if c.get("plan") else spattn.Plan.uniform(
                spattn.pattern_from_dict(c["pattern"]))
            costs = [layout_cost(spattn.compile(plan.pattern_for(i) or spattn.Full(), 128, 128, causal=True,
                                                block_size=16, heads=4))[0] for i in range(3)]
            assert sum(costs) / 3 <= r["budget"] + 1e-12
            assert sum(costs) / 3 == pytest.approx(c["cost"]["keys_fraction"], rel=1e-5)
    for c in results["candidates"]:
        assert c["within_budget"] == (c["cost"]["keys_fraction"] <= c["budget"])


def _strip_timings(results: dict) -> dict:
    r = copy.deepcopy(results)
    for key in ("timings", "command", "environment"):  # when, where and which commit: not numbers
        r.pop(key)
    refs = r.pop("kernel_references")  # timings: only which rows were timed must agree
    r["kernel_rows"] = None if refs is None else [(x["length"], x["label"], x["budget"], x["keys_fraction"])
                                                  for x in refs["rows"]]
    for part in [r, *r["lengths"]]:
        part["dense"].pop("latency")
        for c in part["candidates"]:
            c.pop("latency")
    return r


def test_same_seed_same_numbers_and_resume(tiny):
    out2 = tiny["root"] / "out2"
    result = _invoke("--model", str(tiny["model"]), "--text", str(tiny["text"]), "-o", str(out2), *ARGS)
    assert result.exit_code == 0, result.output
    again = json.loads((out2 / "results.json").read_text())
    assert _strip_timings(again) == _strip_timings(tiny["results"])
    # interrupt: mark the run unfinished and drop one finished candidate; re-running resumes from the rest
    state = out2 / ".spattn-report" / "state.json"
    state.write_text(json.dumps({"digest": again["digest"], "status": "running"}))
    cands = sorted((out2 / ".spattn-report" / again["digest"] / "L128" / "candidates").glob("*.json"))
    assert len(cands) == 12
    cands[0].unlink()
    (out2 / "results.json").unlink()
    result = _invoke("--model", str(tiny["model"]), "--text", str(tiny["text"]), "-o", str(out2), *ARGS)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    resumed = json.loads((out2 / "results.json").read_text())
    assert resumed["timings"]["resumed"] is True
    assert _strip_timings(resumed) == _strip_timings(tiny["results"])


def test_errors_a_person_can_act_on(tiny, tmp_path, monkeypatch):
    base = ["--text", str(tiny["text"]), *ARGS]
    r = _invoke("--model", str(tmp_path / "nope"), "-o", str(tmp_path / "a"), *base)
    assert r.exit_code == 2 and "unknown model" in r.output and not (tmp_path / "a").exists()
    r = _invoke("--model", str(tiny["model"]), "-o", str(tmp_path / "b"), *base, "--budgets", "0.1,1.5")
    assert r.exit_code == 2 and "outside (0, 1]" in r.output
    r = _invoke("--model", str(tiny["model"]), "-o", str(tiny["out"]), *base)
    assert r.exit_code == 2 and "--overwrite" in r.output
    short = tmp_path / "short.txt"
    short.write_text("waa wab wac. " * 20)
    r = _invoke("--model", str(tiny["model"]), "--text", str(short), "-o", str(tmp_path / "c"), *ARGS)
    assert r.exit_code == 2 and "text too short" in r.output and not (tmp_path / "c").exists()
    missing = tmp_path / "missing.txt"
    r = _invoke("--model", str(tiny["model"]), "--text", str(missing), "-o", str(tmp_path / "d"), *ARGS)
    assert r.exit_code == 2 and "not found" in r.output
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = _invoke("--model", str(tiny["model"]), "-o", str(tmp_path / "e"), *base)
    assert r.exit_code == 2 and "spattn[viz]" in r.output


def test_pareto_and_recommend():
    pts = [("a", 0.1, 5.0), ("b", 0.2, 4.0), ("c", 0.3, 4.5), ("d", 0.05, 9.0), ("e", 0.2, 3.5)]
    assert pareto(pts) == ["d", "a", "e"]
    assert pareto([("x", 0.1, 0.5), ("y", 0.2, 0.4), ("z", 0.3, 0.9)], maximize=True) == ["x", "z"]

    def cand(cid, family, cost, nll_per_segment, noise):
        """A candidate scored on 20 segments of 64 tokens: mean nll per token plus per-segment noise."""
        signs = [1, -1] * 10  # zero-mean noise, shuffled per candidate: the means are exact
        random.Random(cid).shuffle(signs)
        seg = {"nll": [64 * (nll_per_segment + noise * x) for x in signs], "tokens": [64.0] * 20}
        split = {"perplexity": 2.718281828 ** (sum(seg["nll"]) / sum(seg["tokens"])), "segments_sums": seg}
        return {"id": cid, "family": family, "selector": None, "label": cid, "cost": {"keys_fraction": cost,
                "block_fraction": cost}, "recall": {"mean": 0.5},
                "model": {"perplexity": split["perplexity"], "splits": {"selection": split, "report": split}}}

    cands = [cand("w", "window", 0.09, 3.0, 0.01), cand("t", "top_p", 0.11, 2.0, 0.01),
             cand("s", "sinks_window", 0.15, 2.0005, 0.05), cand("b", "budgeted", 0.19, 1.99, 0.05)]
    rec = recommend(cands, [0.05, 0.1, 0.2])
    assert [r["candidate"] for r in rec] == [None, "w", "t"]
    # at 0.2, "b" is lowest on the selection split, but "t" and "s" are tied with it and "t" is the cheapest
    assert rec[2]["best_on_selection"] == "b" and set(rec[2]["tied_with"]) == {"b", "s"}
    assert "cheapest of the tied" in rec[2]["reason"]


@pytest.mark.parametrize("kwargs, message", [
    ({"budgets": (0.0,)}, "outside (0, 1]"),
    ({"budgets": ()}, "at least one"),
    ({"chunk_length": 8}, "chunk_length"),
    ({"families": ("windows",)}, "unknown candidate families"),
    ({"block_size": 4096}, "block_size"),
    ({"latency_dtype": "bf16"}, "latency_dtype must be one of"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ReportConfig(**kwargs)


def test_latency_dtype_is_the_serving_dtype_on_cuda_and_help_shows_no_bool():
    # Note [latency dtype]: CUDA times bfloat16 (tensor cores), the CPU float32, unless asked otherwise
    assert ReportConfig(device="cuda").latency_dtype == "bfloat16"
    assert ReportConfig().latency_dtype == "float32"
    assert ReportConfig(latency_dtype="float16").latency_dtype == "float16"
    assert ReportConfig(latency_dtype="float16").digest() != ReportConfig().digest()
    text = CliRunner().invoke(app, ["report", "--help"], env={"COLUMNS": "200"}, catch_exceptions=False).output
    assert "--kernel-references" in text and "--no-kernel-references" in text and "--latency-dtype" in text
    assert "--retrieval-at-every-length" in text and "--no-retrieval-at-every-length" in text
    assert "<bool>" not in text and "Show this message and exit." in text


CHROMIUM = Path("/usr/bin/chromium")


def _screenshot(page: Path, shot: Path, height: int = 7000) -> None:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--virtual-time-budget=10000", f"--user-data-dir={profile}", f"--screenshot={shot}",
             f"--window-size=1280,{height}", page.as_uri()],
            capture_output=True, timeout=120, check=False,
        )
    assert shot.is_file(), "chromium wrote no screenshot"


@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tiny, tmp_path):
    """The page renders from disk with its tables and cards, and every embedded figure decodes and draws."""
    import matplotlib.image

    def inked(path: Path) -> float:  # share of pixels that are not (near) white
        return float((matplotlib.image.imread(path)[..., :3].min(-1) < 0.85).mean())

    page = tiny["out"] / "report.html"
    text = page.read_text()
    shot = tmp_path / "report.png"
    _screenshot(page, shot)
    img = matplotlib.image.imread(shot)
    assert img.shape[1] == 1280
    assert float((img[..., :3].mean(-1) < 0.5).mean()) > 0.005  # tables, cards and text: far from blank
    # the figures alone, as the report embeds them, against the same tags with their data removed
    imgs = re.findall(r"<img [^>]*>", text)
    assert len(imgs) == len(tiny["results"]["figures"])
    body = "<!doctype html><html><body style='margin:0;background:#fff'>{}</body></html>"
    figures, broken = tmp_path / "figures.html", tmp_path / "broken.html"
    figures.write_text(body.format("".join(imgs)))
    broken.write_text(body.format("".join(re.sub(r'src="[^"]*"', 'src=""', t) for t in imgs)))
    _screenshot(figures, tmp_path / "figures.png")
    _screenshot(broken, tmp_path / "broken.png")
    drawn, blank = inked(tmp_path / "figures.png"), inked(tmp_path / "broken.png")
    assert drawn > 0.01 and drawn > 20 * blank, (drawn, blank)


@pytest.mark.parametrize("length, block", [(64, 16), (100, 32)])
def test_fast_recall_matches_coverage_measure(length, block):
    """The report's layer-shared dense path gives the recall spattn.coverage.measure computes blockwise."""
    import torch

    import spattn
    from spattn.coverage.measure import measure
    from spattn.report.evaluate import dense_probs
    from spattn.selectors import TopP

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, length, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, length, 16, generator=gen, dtype=torch.float64)
    for pattern in (spattn.Sinks(3) | spattn.Window(10), spattn.Window(5) | spattn.Strided(7),
                    spattn.Sinks(4) | spattn.Window(4) | spattn.RandomBlocks(1, seed=2, block=block),
                    spattn.Sinks(4) | spattn.Window(4) | TopP("pooled", 0.5)):
        layout = spattn.compile(pattern, length, length, causal=True, block_size=block, query=q, key=k)
        mask = layout.to_dense()[0]
        assert torch.equal(mask, mask & torch.ones(length, length, dtype=torch.bool).tril())  # causal
        fast = (dense_probs(q, k) * mask).sum(-1)
        ref = measure(q, k, layout, causal=True, topk=0).recall[0]
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)


def test_overwrite_reuses_cached_stages_of_the_same_configuration(tiny, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny["out"], out)
    (out / "notes.txt").write_text("not the report's")  # a file the report does not own survives
    r = _invoke("--model", str(tiny["model"]), "--text", str(tiny["text"]), "-o", str(out), *ARGS, "--overwrite")
    assert r.exit_code == 0, r.output
    again = json.loads((out / "results.json").read_text())
    assert again["timings"]["resumed"] is True
    assert not {"dense", "capture", "coverage"} & set(again["timings"]["stages_s"])  # nothing recomputed
    assert _strip_timings(again) == _strip_timings(tiny["results"])
    assert (out / "notes.txt").read_text() == "not the report's"


class _Payload:
    """Unpickling this runs a shell command: what an attacker would plant in a shared output folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_in_the_cache_is_refused_and_never_runs(tiny, tmp_path):
    import pickle
    import shutil

    out = tmp_path / "planted"
    shutil.copytree(tiny["out"], out)
    marker = tmp_path / "ran"
    data = out / ".spattn-report" / tiny["results"]["digest"] / "data.pt"
    assert data.is_file()
    data.write_bytes(pickle.dumps({"calibration": _Payload(marker)}))
    r = _invoke("--model", str(tiny["model"]), "--text", str(tiny["text"]), "-o", str(out), *ARGS, "--overwrite")
    assert r.exit_code == 2 and "refusing to load" in r.output, r.output
    assert not marker.exists()


def test_lengths_intervals_and_the_pick_from_the_selection_split(tiny):
    from spattn.report.intervals import paired_difference

    results = tiny["results"]
    assert [x["length"] for x in results["lengths"]] == [256] and results["data"]["chunk_length"] == 128
    assert results["data"]["selection_indices"] and not set(results["data"]["selection_indices"]) & set(
        results["data"]["held_out_indices"])  # the pick and the reported numbers use different chunks
    for part in [results, *results["lengths"]]:
        assert part["candidates"]
        for c in part["candidates"]:
            m = c["model"]
            for key in ("perplexity", "top1_agreement", "kl"):
                lo, hi = m[key + "_interval"]
                assert lo <= m[key] * (1 + 1e-5) + 1e-9 and m[key] <= hi * (1 + 1e-5) + 1e-9, (c["id"], key)
            if part is not results:
                assert set(m["splits"]) == {"report"} and m["split"] == "report"
            else:  # the report split only for the candidates that can still win (Note [report split only ...])
                assert "selection" in m["splits"] and m["split"] == ("report" if "report" in m["splits"] else
                                                                     "selection")
    contenders = {i for rec in results["recommendations"] for i in
                  (rec["candidate"], rec.get("runner_up"), *rec.get("tied_with", [])) if i}
    for c in results["candidates"]:
        assert ("report" in c["model"]["splits"]) == (c["id"] in contenders), c["id"]
    by_id = {c["id"]: c for c in results["candidates"]}
    for rec in results["recommendations"]:
        if rec["candidate"] is None:
            continue
        ok = [c for c in results["candidates"] if c["cost"]["keys_fraction"] <= rec["budget"]]
        best = min(ok, key=lambda c: c["model"]["splits"]["selection"]["perplexity"])
        pick = by_id[rec["candidate"]]
        assert rec["best_on_selection"] == best["id"]
        if pick is not best:  # a tie on the selection split, and cheaper
            seg = lambda c: c["model"]["splits"]["selection"]["segments_sums"]  # noqa: E731
            assert paired_difference(seg(pick), seg(best))["tie"]
            assert pick["cost"]["keys_fraction"] <= best["cost"]["keys_fraction"]
        assert rec["holds_at"][0] == 128 and {e["length"] for e in rec["lengths"]} == {128, 256}
        at_256 = {c["id"] for c in results["lengths"][0]["candidates"]} | {c["id"] for c in
                                                                            results["lengths"][0]["skipped"]}
        assert rec["candidate"] in at_256  # the pick was measured again at the longer length


def test_latency_rows_carry_their_spread_and_noise_is_flagged(tiny):
    import time

    import torch

    from spattn.report.evaluate import interleaved_latency
    from spattn.report.render import render_html
    from spattn.report.summary import latency_text

    for c in tiny["results"]["candidates"]:
        lat = c["latency"]
        assert lat["repeats"] >= 1 and lat["spread"] >= 0 and isinstance(lat["noisy"], bool)
        assert lat["peak_memory_mb"] >= 0 and lat["dense_ms"] > 0
        assert lat["dtype"] == tiny["results"]["backends"]["latency_dtype"] == "float32"
        assert c["model"]["backend"] in ("dense", "reference")  # Note [scoring backend per candidate]
    # a planted noisy timing: alternately fast and very slow calls
    calls = [0]

    def jittery():
        calls[0] += 1
        time.sleep(0.0005 if calls[0] % 2 else 0.02)

    lat = interleaved_latency(jittery, lambda: time.sleep(0.001), repeats=4, device=torch.device("cpu"))
    assert lat["noisy"] and lat["spread"] > 0.25
    assert "?" in latency_text(lat | {"median_ms": 1.0})
    noisy = copy.deepcopy(tiny["results"])
    target = next(c for c in noisy["candidates"] if c["id"] == noisy["recommendations"][0]["candidate"])
    target["latency"] |= {"noisy": True, "spread": 0.8, "speedup_vs_dense": 123.456}
    page = render_html(noisy, tiny["out"])
    assert "too noisy to rank" in page and "123.46" not in page  # flagged, never ranked by its ratio


def test_overwrite_never_deletes_a_folder_that_was_never_a_report(tiny, tmp_path):
    folder = tmp_path / "mine"
    (folder / "figures").mkdir(parents=True)
    (folder / "figures" / "holiday.png").write_bytes(b"not the report's")
    (folder / "results.json").write_text("{}")
    r = _invoke("--model", str(tiny["model"]), "--text", str(tiny["text"]), "-o", str(folder), *ARGS, "--overwrite")
    assert r.exit_code == 2 and "never a spattn report" in r.output
    assert (folder / "figures" / "holiday.png").read_bytes() == b"not the report's"
    assert (folder / "results.json").read_text() == "{}"


def test_time_budget_skips_what_does_not_fit_and_says_so(tiny, tmp_path):
    out = tmp_path / "budget"
    r = _invoke("--model", str(tiny["model"]), "--text", str(tiny["text"]), "-o", str(out), *ARGS,
                "--retrieval-samples", "0", "--time-budget", "0")
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    skipped = results["timings"]["skipped_for_time"]
    assert results["timings"]["time_budget_s"] == 0
    assert "length 256" in skipped and not results["lengths"] and results["threads"] is None
    assert not results["candidates"] and all(s.get("out_of_time") or s["note"] for s in results["skipped"])
    assert all(rec["candidate"] is None for rec in results["recommendations"])
    # nothing of the skipped work was cached (only "cannot be fitted" notes): a rerun without the limit measures it
    timed_out = {s["id"] for s in results["skipped"] if s.get("out_of_time")}
    assert timed_out
    cached = out / ".spattn-report" / results["digest"] / "L128" / "candidates"
    for path in cached.glob("*.json") if cached.exists() else []:
        rec = json.loads(path.read_text())
        assert rec["id"] not in timed_out and not rec.get("out_of_time"), rec["id"]


def test_quick_answer_says_what_it_omits_in_terminal_and_html(tiny):
    from rich.console import Console

    from spattn.report.config import ReportConfig, quick_omits
    from spattn.report.render import render_html
    from spattn.report.summary import print_summary

    results = copy.deepcopy(tiny["results"])
    assert results["quick"] is None  # a full run says nothing of the kind
    omits = quick_omits(ReportConfig.quick_defaults())
    results["quick"] = {"omits": omits}
    console = Console(record=True, width=200)
    print_summary(results, console, tiny["out"])
    terminal = console.export_text()
    assert "quick answer" in terminal and "the threads view" in terminal
    page = html.unescape(_visible_text(render_html(results, tiny["out"])))
    assert "Quick answer" in page and all(o in page for o in omits)


def test_kernel_references_time_dense_and_each_pick_at_every_length(tiny):
    import torch

    import spattn
    from spattn.report.evaluate import kernel_references
    from spattn.report.render import render_html

    results = tiny["results"]
    refs = results["kernel_references"]
    assert refs is not None and refs["backend"] == results["backends"]["latency"]
    rows = refs["rows"]
    lengths = {results["data"]["chunk_length"], *(x["length"] for x in results["lengths"])}
    assert {r["length"] for r in rows if r["label"] == "dense causal"} == lengths
    picks = {c["label"] for c in results["candidates"] if c["id"] in
             {x["candidate"] for x in results["recommendations"]}}
    assert picks <= {r["label"] for r in rows if r["length"] == results["data"]["chunk_length"]}
    for r in rows:
        assert set(r["spreads"]) == {"spattn", "flex", "sdpa"} and isinstance(r["noisy"], bool)
        assert r["spattn_vs_sdpa"] == pytest.approx(r["sdpa_ms"] / r["spattn_ms"], rel=2e-3)
        assert r["first_call_ms"]["flex"] > 0
        if r["label"] == "dense causal":
            assert r["keys_fraction"] == 1.0 and r["budget"] is None
    page = html.unescape(_visible_text(render_html(copy.deepcopy(results), tiny["out"])))
    assert "Kernels against FlexAttention and SDPA" in page
    # the three calls compute the same attention (the timed Flex call is the one the oracle checks)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 96, 16, generator=g), torch.randn(1, 2, 96, 16, generator=g), torch.randn(
        1, 2, 96, 16, generator=g)
    row = kernel_references(spattn.Sinks(8) | spattn.Window(24), q, k, v, block_size=16, backend="reference",
                            rounds=2)
    assert row["rounds"] == 2 and 0 < row["keys_fraction"] < 1 and row["dtype"] == "float32"
    assert row["max_abs_difference_vs_flex"] < 1e-5  # the same run's correctness check
    # Note [latency dtype]: the CUDA report times the serving dtype; the CPU dry run of that path in bfloat16
    half = kernel_references(spattn.Sinks(8) | spattn.Window(24), q.bfloat16(), k.bfloat16(), v.bfloat16(),
                             block_size=16, backend="reference", rounds=1)
    assert half["dtype"] == "bfloat16" and half["max_abs_difference_vs_flex"] < 0.05


def test_retrieval_at_every_length(tiny):
    """Note [retrieval at every length]: the further length carries its own pass-key record (dense and the picks
    re-fitted there, on the same samples), each recommendation's entry for it the pick's accuracy, and the terminal
    and the page show it; on the CPU it is off unless asked."""
    results = tiny["results"]
    part = results["lengths"][0]
    got = part["retrieval"]
    assert got["length"] == part["length"] == 256 and got["samples"] == results["retrieval"]["samples"]
    here = {c["id"] for c in part["candidates"]}
    assert "dense" in got["results"] and set(got["results"]) - {"dense"} <= here
    for r in got["results"].values():
        assert len(r["correct"]) == got["samples"] and r["interval"][0] <= r["accuracy"] <= r["interval"][1]
    recs = [x for x in results["recommendations"] if x.get("candidate") in got["results"]]
    assert recs
    for rec in recs:
        entry = next(e for e in rec["lengths"] if e["length"] == 256)
        assert entry["retrieval"]["accuracy"] == got["results"][rec["candidate"]]["accuracy"]
        assert entry["retrieval"]["dense_accuracy"] == got["results"]["dense"]["accuracy"]
    assert "pass-key retrieval at 256 tokens: dense" in tiny["output"]
    page = html.unescape(_visible_text((tiny["out"] / "report.html").read_text()))
    assert "Pass-key retrieval at this length" in page
    assert ReportConfig().retrieval_at_every_length is False
    assert ReportConfig(device="cuda").retrieval_at_every_length is True
    assert ReportConfig().digest() == ReportConfig(retrieval_at_every_length=True).digest()  # cached per length
    with pytest.raises(TypeError, match="retrieval_at_every_length must be a bool"):
        ReportConfig(retrieval_at_every_length="yes")


def test_a_pick_not_measured_for_time_is_unknown_there_not_failing():
    from spattn.report.frontier import holds

    pick = {"id": "a", "within_budget": True}
    recs = [{"candidate": "a", "runner_up": None}, {"candidate": "b", "runner_up": None}]
    main = {"length": 128}
    other = {"length": 256, "candidates": [],
             "skipped": [{"id": "a", "out_of_time": True, "note": "not measured"}, {"id": "b", "note": "too big"}]}
    holds(recs, main, [other, {"length": 512, "candidates": [pick], "skipped": []}])
    a, b = recs
    assert a["lengths"][1]["holds"] is None and "time-budget" in a["lengths"][1]["note"]
    assert a["holds_at"] == [128, 512]
    assert b["lengths"][1]["holds"] is False and "cannot be fitted" in b["lengths"][1]["note"]


def test_per_task_profile_names_one_pattern_per_profile():
    from spattn.report.frontier import task_profiles

    res = {"dense": {"accuracy": 1.0}, "a": {"accuracy": 0.0}, "b": {"accuracy": 1.0}}
    disagree = task_profiles({"candidate": "a", "runner_up": "b", "for_retrieval": "b",
                              "retrieval": {"against_runner_up": "worse"}}, res)
    assert not disagree["agree"] and disagree["retrieval"]["candidate"] == "b" and disagree["evidence"]
    assert disagree["language_modelling"]["candidate"] == "a"
    assert disagree["retrieval"]["accuracy"] == 1.0 and disagree["retrieval"]["language_modelling_accuracy"] == 0.0
    tie = task_profiles({"candidate": "a", "runner_up": "b", "retrieval": {"against_runner_up": "tie"}},
                        res | {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.5}})
    assert tie["agree"] and tie["retrieval"]["candidate"] == "a" and "tie" in tie["retrieval"]["why"]
    assert not tie["retrieval"]["none_retrieves"]
    # Note [no candidate retrieves]: both at 0 while dense retrieves is no "tie that serves both profiles"
    none = task_profiles({"candidate": "a", "runner_up": "b", "retrieval": {"against_runner_up": "tie"}},
                         res | {"b": {"accuracy": 0.0}})
    assert none["retrieval"]["none_retrieves"] and none["retrieval"]["candidate"] is None and not none["agree"]
    assert none["evidence"] and "no measured candidate at this budget" in none["retrieval"]["why"]
    assert none["language_modelling"]["candidate"] == "a"
    blind = task_profiles({"candidate": "a", "runner_up": "b", "retrieval": {"against_runner_up": "tie"}},
                          res | {"dense": {"accuracy": 0.0}})
    assert not blind["evidence"] and "dense retrieves none" in blind["retrieval"]["why"]


def test_profiles_shown_in_terminal_and_html_and_timings_carry_cpu_seconds_and_load(tiny):
    from rich.console import Console

    from spattn.report.render import render_html
    from spattn.report.summary import print_summary

    results = copy.deepcopy(tiny["results"])
    timings = results["timings"]
    assert set(timings["stages_cpu_s"]) == set(timings["stages_s"]) and timings["total_cpu_s"] > 0
    assert len(timings["load_average_start"]) == 3 and timings["torch_threads"] >= 1
    rec = next(x for x in results["recommendations"] if x.get("profiles") and x.get("runner_up"))
    rec["profiles"] |= {"agree": False, "retrieval": rec["profiles"]["retrieval"] | {
        "candidate": rec["runner_up"], "accuracy": 1.0, "language_modelling_accuracy": 0.0}}
    console = Console(record=True, width=250)
    print_summary(results, console, tiny["out"])
    assert "they disagree" in console.export_text()
    page = html.unescape(_visible_text(render_html(results, tiny["out"])))
    assert "they disagree" in page and "per task profile" in page
    rec["profiles"] |= {"agree": False, "retrieval": rec["profiles"]["retrieval"] | {
        "candidate": None, "accuracy": 0.0, "none_retrieves": True, "why": "no measured candidate at this budget"}}
    console = Console(record=True, width=250)
    print_summary(results, console, tiny["out"])
    assert "for retrieval, none at this budget" in console.export_text()
    page = html.unescape(_visible_text(render_html(results, tiny["out"])))
    assert "retrieval → none at this budget" in page


def test_one_forward_per_distinct_static_layout():
    import spattn
    from spattn.integrations.plan import Plan
    from spattn.report.pipeline import _layout_key

    a = Plan.uniform(spattn.Sinks(4) | spattn.Window(21))
    b = Plan(layers={i: spattn.Window(21) | spattn.Sinks(4) for i in range(3)})  # the same layouts, spelt otherwise
    c = Plan.uniform(spattn.Sinks(4) | spattn.Window(22))
    key = lambda plan: _layout_key(plan, 128, 16, layers=3, heads=4)  # noqa: E731
    assert key(a) == key(b) != key(c)
    assert key(Plan(layers={0: spattn.Sinks(4) | spattn.Window(21)})) != key(a)  # layers 1, 2 dense
    assert key(Plan.uniform(spattn.Adaptive("pooled", keys=16, sinks=4, window=8))) is None  # input-dependent


def test_scoring_backend_is_a_rule_on_the_layout_cost_so_runs_repeat():
    from spattn.report.pipeline import REFERENCE_MAX_BLOCK_FRACTION, _scoring_backend

    static = {"family": "sinks_window", "dynamic": False, "cost": {"block_fraction": 0.3}}
    assert _scoring_backend("dense", static) == "reference"
    wide = static | {"cost": {"block_fraction": REFERENCE_MAX_BLOCK_FRACTION + 0.01}}
    assert _scoring_backend("dense", wide) == "dense"
    assert _scoring_backend("dense", static | {"family": "top_p", "dynamic": True}) == "dense"  # token selection
    assert _scoring_backend("dense", {"family": "hierarchical", "dynamic": True, "cost": {}}) == "reference"
    assert _scoring_backend("auto", static) == "auto"  # CUDA: never switched


def test_default_is_1024_and_2048_at_two_budgets():
    # Note [default lengths and budgets]: the 1024 + 4096 and three budgets are flags away
    cfg = ReportConfig()
    assert (cfg.chunk_length, cfg.lengths, cfg.budgets) == (1024, (2048,), (0.1, 0.25))


def test_latency_rows_are_timed_in_the_latency_dtype():
    import torch

    import spattn
    from spattn.report.evaluate import candidate_latency, dense_latency

    g = torch.Generator().manual_seed(0)
    captures = [[(torch.randn(1, 4, 64, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g))] * 3]
    row = candidate_latency(spattn.Sinks(4) | spattn.Window(12), captures, block_size=16, backend="reference",
                            repeats=1, seed=0, dtype="bfloat16")
    assert row["dtype"] == "bfloat16" and row["median_ms"] > 0 and "note" not in row
    dense = dense_latency(captures, "reference", 1, 0, 16, dtype="bfloat16")
    assert dense["dtype"] == "bfloat16" and dense["spattn_causal_ms"] > 0
    assert candidate_latency(spattn.Window(8), captures, block_size=16, backend="reference", repeats=1,
                             seed=0)["dtype"] == "float32"  # default: the captured dtype
