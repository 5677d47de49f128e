"""The commands as a user runs them: ``spattn serve`` (built from its options, drains in-flight requests on
shutdown) and ``spattn generate`` on SmolLM2-135M (a sparse plan that covers the prompt answers like dense)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("transformers")
import httpx  # noqa: E402

import spattn  # noqa: E402

from .serve_support import ThreadServer, tiny_model, tokenizer


def test_spattn_serve_builds_the_app_from_its_options_and_drains_an_in_flight_stream(tmp_path, monkeypatch):
    """``spattn serve`` as the CLI wires it (model folder, plan file, options), run under uvicorn on loopback;
    ``should_exit`` (what uvicorn's SIGTERM / SIGINT handler sets) while a stream is in flight: the stream
    still completes, then the engine drains and stops."""
    import uvicorn
    from typer.testing import CliRunner

    from spattn.cli.main import app

    tok = tokenizer()
    model = tiny_model(len(tok), seed=3)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    plan = spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(32) | spattn.TopK("bounds", 2))
    plan.save(tmp_path / "plan.json")
    built = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: built.update(app=app, **kw))
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "model"),
                                      "--plan", str(tmp_path / "plan.json"), "--port", "0",
                                      "--min-sparse-tokens", "0", "--block-size", "8",
                                      "--latency-target-ms", "5000", "--latency-scope", "request",
                                      "--drain-timeout", "30"])
    assert result.exit_code == 0, result.output
    engine = built["app"].state.engine
    assert built["timeout_graceful_shutdown"] == 30 and engine.runtime.controller.config.latency_target_ms == 5000
    assert engine.runtime.controller.config.latency_scope == "request"
    assert engine.runtime.plan == plan and engine.runtime.min_sparse_tokens == 0
    engine.eos = set()  # random weights: generate all the tokens asked for
    server = ThreadServer(built["app"])
    events: list = []
    first = threading.Event()

    def stream() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert first.wait(60), "no streamed event"
        server.server.should_exit = True  # what uvicorn's signal handler does
        reader.join(120)
    finally:
        server.stop()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # finished, not cut off
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) >= 1
    assert engine.draining and not engine._thread.is_alive()  # lifespan shutdown drained and stopped the worker


@pytest.mark.slow
def test_spattn_generate_on_smollm2_matches_dense_when_the_plan_covers_the_prompt(tmp_path):
    from typer.testing import CliRunner

    from spattn.cli.main import app

    from .hf_support import smollm2

    model, tok = smollm2()
    prompt = "It is a truth universally acknowledged, that a single man"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        dense = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                               pad_token_id=tok.eos_token_id)
    expected = tok.decode(dense[0, ids.shape[1]:], skip_special_tokens=True)
    plan = spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(64) | spattn.TopK("bounds", 2))
    plan.save(tmp_path / "plan.json")
    result = CliRunner().invoke(app, ["generate", "--prompt", prompt, "--plan", str(tmp_path / "plan.json"),
                                      "--max-new-tokens", "4", "--min-sparse-tokens", "0", "--block-size", "16",
                                      "--stats"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == expected.splitlines()[0]
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    assert stats["steps"] == 3 and not stats["counts"]  # 3 decode steps after the prefill, no fallback
