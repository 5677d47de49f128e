"""``spattn serve`` end to end over loopback with a real HTTP client: completions and chat, streaming and not,
bad requests, a bounded load test, fault injection, a real Prometheus scraping /metrics, the dashboard."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("transformers")
import httpx  # noqa: E402

import spattn  # noqa: E402
from spattn.runtime import ControllerConfig, Runtime, paged_attention  # noqa: E402
from spattn.serve import Engine, create_app  # noqa: E402

from .serve_support import ThreadServer, free_port, tiny_model, tokenizer

PROMPTS = ["It is a truth universally acknowledged", "In the beginning"]
TOKENS = 6
LOGPROBS: dict[str, list[torch.Tensor]] = {}  # dense log-softmax of each generated step, per prompt
DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "spattn.json"


@pytest.fixture(scope="module")
def served():
    tok = tokenizer()
    model = tiny_model(len(tok))
    references = {}
    with torch.inference_mode():  # dense greedy answers, before the runtime takes the model over
        for prompt in PROMPTS:
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False,
                                 pad_token_id=2, eos_token_id=-1, return_dict_in_generate=True, output_logits=True)
            references[prompt] = out.sequences[0, ids.shape[1]:].tolist()
            LOGPROBS[prompt] = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
    # the window covers these short prompts: the sparse path runs (paged kernel, page selection) and equals dense
    plan = spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(200) | spattn.TopK("bounds", 2))
    runtime = Runtime(model, plan, block_size=8, min_sparse_tokens=0, monitor_level=2, recall_sample=0.5,
                      controller=ControllerConfig(recall_floor=0.5, error_limit=1000))
    engine = Engine(runtime, tok, max_batch=8, batch_wait_ms=30, model_name="tiny")
    engine.eos = set()  # random weights: never stop early, so every answer has TOKENS tokens
    server = ThreadServer(create_app(engine))
    yield server, engine, references, tok
    server.stop()


def completion(url, prompt, **extra):
    body = {"prompt": prompt, "max_tokens": TOKENS, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_completion_equals_the_dense_answer(served):
    server, engine, references, tok = served
    r = completion(server.url, PROMPTS[0])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["usage"]["completion_tokens"] == TOKENS and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == tok.decode(references[PROMPTS[0]], skip_special_tokens=True)


def test_streaming_completion_and_chat_match_the_non_streaming_answers(served):
    server, engine, references, tok = served
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                      json={"prompt": PROMPTS[1], "max_tokens": TOKENS, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert streamed == tok.decode(references[PROMPTS[1]], skip_special_tokens=True)

    chat = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": TOKENS, "temperature": 0}
    plain = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=120)
    assert plain.status_code == 200, plain.text
    message = plain.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and plain.json()["object"] == "chat.completion"
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**chat, "stream": True}, timeout=120) as r:
        events = sse_events(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"} and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == message["content"]


@pytest.mark.parametrize("body,needle", [
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": ""}, "stop"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "logit_bias": {}}, "logit_bias"),
    ({"prompt": "x " * 300, "max_tokens": 10}, "context"),
    ({"prompt": ""}, "prompt"),
], ids=["missing-prompt", "zero-tokens", "negative-temperature", "n", "stop-five", "stop-empty", "logprobs",
        "unknown-field", "too-long", "empty"])
def test_bad_requests_get_a_400_with_a_message(served, body, needle):
    server = served[0]
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_n_choices_each_equal_the_dense_answer_streaming_and_not(served):
    server, engine, references, tok = served
    want = tok.decode(references[PROMPTS[0]], skip_special_tokens=True)
    body = completion(server.url, PROMPTS[0], n=3).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["text"] == want and c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 3 * TOKENS
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                      json={"prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 0, "stream": True, "n": 2}) as r:
        events = sse_events(r)[:-1]
    for index in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == want and mine[-1]["finish_reason"] == "length"


def test_stop_sequences_end_the_text_before_the_first_one(served):
    server, engine, references, tok = served
    ref = references[PROMPTS[1]]
    full = tok.decode(ref, skip_special_tokens=True)
    cut = len(tok.decode(ref[:3], skip_special_tokens=True))
    stop = full[cut:cut + 2]
    assert stop.strip(), f"the reference text has no usable stop string at {cut}: {full!r}"
    want = full[: full.find(stop)]
    body = completion(server.url, PROMPTS[1], stop=[stop, "never-in-this-text"]).json()
    choice = body["choices"][0]
    assert choice["text"] == want and choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < TOKENS
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                      json={"prompt": PROMPTS[1], "max_tokens": TOKENS, "temperature": 0, "stream": True,
                            "stop": stop}) as r:
        events = sse_events(r)[:-1]
    assert "".join(e["choices"][0]["text"] for e in events) == want
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(stop not in e["choices"][0]["text"] for e in events)
    chat = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": TOKENS, "temperature": 0}
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=120).json()
    content = answer["choices"][0]["message"]["content"]
    if len(content) > 2:
        stopped = httpx.post(f"{server.url}/v1/chat/completions", json={**chat, "stop": content[2:4]},
                             timeout=120).json()
        assert stopped["choices"][0]["message"]["content"] == content[: content.find(content[2:4])]


def test_logprobs_are_the_dense_model_log_probabilities(served):
    server, engine, references, tok = served
    body = completion(server.url, PROMPTS[0], logprobs=2).json()
    lp = body["choices"][0]["logprobs"]
    ref, dense = references[PROMPTS[0]], LOGPROBS[PROMPTS[0]]
    assert lp["tokens"] == [tok.decode([t], skip_special_tokens=True) for t in ref]
    assert lp["token_logprobs"] == pytest.approx([float(d[t]) for d, t in zip(dense, ref, strict=True)], abs=1e-4)
    for top, d in zip(lp["top_logprobs"], dense, strict=True):
        values, indices = d.topk(2)
        assert top == pytest.approx({tok.decode([int(i)]): float(v) for v, i in zip(values, indices, strict=True)},
                                    abs=1e-4)
    text = body["choices"][0]["text"]
    assert lp["text_offset"][0] == 0 and [text[o:] for o in lp["text_offset"]] == [
        "".join(lp["tokens"][i:]) for i in range(len(ref))]
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                      json={"prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 0, "stream": True,
                            "logprobs": 0}) as r:
        events = sse_events(r)[:-1]
    streamed = [x for e in events if e["choices"][0]["logprobs"] for x in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == pytest.approx(lp["token_logprobs"], abs=1e-4)


def test_malformed_json_wrong_method_and_bad_chat_are_4xx_and_the_server_stays_up(served):
    server = served[0]
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/completions", timeout=30).status_code == 405
    bad_role = {"messages": [{"role": "robot", "content": "x"}]}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=bad_role, timeout=30).status_code == 400
    health = httpx.get(f"{server.url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_bounded_load_every_request_completes_and_nothing_is_lost(served):
    server, engine, references, tok = served
    clients, per_client = 4, 3
    expected = {p: tok.decode(references[p], skip_special_tokens=True) for p in PROMPTS}

    async def client(c: int, http: httpx.AsyncClient) -> list:
        out = []
        for m in range(per_client):
            prompt = PROMPTS[(c + m) % 2]
            start = time.perf_counter()
            r = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": TOKENS, "temperature": 0})
            out.append((prompt, r.status_code, r.json(), time.perf_counter() - start))
        return out

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            return await asyncio.gather(*(client(c, http) for c in range(clients)))

    batches_before = _sample(server.url, "spattn_batch_size_count")
    results = [x for per in asyncio.run(main()) for x in per]
    assert len(results) == clients * per_client
    for prompt, status, body, _ in results:
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == TOKENS
        # batched with other prompts (left padding) the answer is the same greedy answer
        assert body["choices"][0]["text"] == expected[prompt]
    latencies = sorted(r[3] for r in results)
    p50, p95 = statistics.median(latencies), latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    print(f"load: {clients} clients x {per_client} requests, p50 {p50:.2f} s, p95 {p95:.2f} s (shared CPU)")
    batches = _sample(server.url, "spattn_batch_size_count") - batches_before
    assert batches < clients * per_client, "requests were never batched"


def _sample(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + (labels or "")) and (labels or line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("fault", ["raises", "nan"])
def test_a_failing_kernel_still_answers_correctly_and_the_counters_say_so(served, fault):
    server, engine, references, tok = served
    reason = "error" if fault == "raises" else "nonfinite"
    before = _sample(server.url, "spattn_fallbacks_total", f'{{layer="1",reason="{reason}"}}')

    def broken(query, key, value, selection, **kwargs):
        if fault == "raises":
            raise RuntimeError("injected")
        return paged_attention(query, key, value, selection, **kwargs) * float("nan")

    engine.runtime.kernel = broken
    try:
        r = completion(server.url, PROMPTS[0])
    finally:
        engine.runtime.kernel = paged_attention
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == tok.decode(references[PROMPTS[0]], skip_special_tokens=True)
    after = _sample(server.url, "spattn_fallbacks_total", f'{{layer="1",reason="{reason}"}}')
    assert after - before >= TOKENS - 1  # every decode step of the layer was rerun dense


def _exported(url: str) -> set[str]:
    names = set()
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    return names


def test_the_dashboard_refers_only_to_exported_metrics(served):
    server = served[0]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b(spattn_[a-z0-9_]+)", e)}
    assert len(exprs) >= 8 and used
    missing = used - _exported(server.url)
    assert not missing, f"dashboard uses metrics the server does not export: {sorted(missing)}"


def test_prometheus_scrapes_the_server_and_answers_queries(served, tmp_path):
    server = served[0]
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian package 'prometheus'; .ci/run installs it)")
    assert completion(server.url, PROMPTS[1]).status_code == 200
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: spattn\n    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wanted = ["spattn_requests_total", "spattn_decode_step_seconds_count", "spattn_decode_density_count",
                  "spattn_budget_pages"]
        found: dict[str, float] = {}
        deadline = time.time() + 60
        while time.time() < deadline and len(found) < len(wanted):
            for name in wanted:
                if name in found:
                    continue
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": f"sum({name})"}, timeout=5)
                except httpx.TransportError:
                    break  # not up yet
                if r.status_code != 200:  # 503 while Prometheus starts
                    break
                result = r.json().get("data", {}).get("result", [])
                if result:
                    found[name] = float(result[0]["value"][1])
            time.sleep(0.5)
        assert set(found) == set(wanted), f"Prometheus returned only {found}"
        assert found["spattn_requests_total"] >= 1 and found["spattn_decode_step_seconds_count"] >= TOKENS - 1
    finally:
        proc.terminate()
        proc.wait(30)
