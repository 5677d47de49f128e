"""The commands as a user runs them: ``spattn serve`` in its own process (drains in-flight requests on SIGTERM)
and ``spattn generate`` on SmolLM2-135M (a sparse plan that covers the prompt answers like dense)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("transformers")
import httpx  # noqa: E402

import spattn  # noqa: E402

from .serve_support import free_port, tiny_model, tokenizer


def test_serve_drains_an_in_flight_stream_on_sigterm(tmp_path):
    tok = tokenizer()
    model = tiny_model(len(tok), seed=3)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    plan = spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(32) | spattn.TopK("bounds", 2))
    plan.save(tmp_path / "plan.json")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "spattn.cli.main", "serve", "--model", str(tmp_path / "model"),
         "--plan", str(tmp_path / "plan.json"), "--port", str(port), "--min-sparse-tokens", "0",
         "--block-size", "8", "--recall-sample", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.5)
        events: list = []
        first = threading.Event()

        def stream() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(60), "no streamed event"
        proc.send_signal(signal.SIGTERM)
        reader.join(120)
        # uvicorn finishes the stream, shuts down, then re-raises the signal it caught
        assert proc.wait(120) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")  # finished, not cut off
    logs = proc.stdout.read()
    assert '"event": "drain"' in logs  # the structured JSON log of the shutdown


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
