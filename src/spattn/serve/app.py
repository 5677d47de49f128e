"""The HTTP app (FastAPI): an OpenAI-compatible subset over an :class:`~spattn.serve.engine.Engine`.

* ``POST /v1/completions`` — ``prompt`` (a string), ``max_tokens``, ``temperature``, ``top_p``, ``stream``,
  ``n`` (choices, generated in one batch), ``stop`` (a string or up to 4: the text ends before the first one
  found, ``finish_reason`` ``"stop"``; a streamed choice holds back text that may begin a stop string),
  ``logprobs`` (0-5: per token its log-probability under the model, before temperature / top-p, and the
  ``logprobs`` most likely tokens; ``text_offset`` counts characters from the start of the completion);
* ``POST /v1/chat/completions`` — ``messages`` rendered by the tokenizer's chat template (``n``, ``stop`` too);
* ``GET /healthz`` — 200 while serving, 503 while draining;
* ``GET /metrics`` — Prometheus text format (runtime + server metrics).

Streaming responses are server-sent events (``data: {json}`` lines, ending with ``data: [DONE]``). A bad
request gets a 400 with an OpenAI-style ``{"error": {"message", "type", "param"}}`` body; a full queue a 429;
a draining server a 503. Shutting down (SIGINT / SIGTERM under uvicorn) finishes in-flight requests first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from spattn._optional import require
from spattn.serve.engine import DrainingError, Engine, QueueFullError, Request

require("fastapi", extra="serve")
from fastapi import FastAPI  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, field_validator  # noqa: E402


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int = Field(16, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    n: int = Field(1, ge=1, le=16, description="choices to generate for the prompt")
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text ends before the first found")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        return stops

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class CompletionRequest(_Common):
    prompt: str = Field(..., min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5, description="most likely tokens to report per position")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param}})


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app serving ``engine``; its lifespan closes (drains) the engine on shutdown."""
    pc = require("prometheus_client", extra="serve")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="spattn", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        endpoint = request.url.path.rsplit("/", 1)[-1]
        engine.m_requests.labels(endpoint, "400").inc()
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        body = {"status": "draining" if engine.draining else "ok", "queued": engine.queued, "busy": engine.busy,
                "controller": engine.runtime.controller.summary()}
        return JSONResponse(status_code=503 if engine.draining else 200, content=body)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(pc.generate_latest(engine.registry), media_type=pc.CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        ids = engine.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        return await _serve(engine, "completions", body, ids, body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        if getattr(engine.tokenizer, "chat_template", None) is None:
            engine.m_requests.labels("chat", "400").inc()
            return _error(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
        messages = [m.model_dump() for m in body.messages]
        ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return await _serve(engine, "chat", body, list(ids), body.max_completion_tokens or body.max_tokens)

    return app


def _text(engine: Engine, request: Request) -> str:
    text = engine.decode(request.tokens)
    return text if request.stop_index is None else text[: request.stop_index]


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that may be the beginning of a stop string (not streamed yet)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _logprobs(engine: Engine, request: Request, start: int, end: int, offset: int) -> dict:
    """OpenAI's legacy ``logprobs`` object for the request's tokens ``start .. end - 1``; ``offset``: the
    characters of the completion before token ``start``."""
    tokens = request.tokens[:end]
    pieces = [engine.decode(tokens[:i + 1]) for i in range(start, end)]
    offsets = [offset] + [len(p) for p in pieces[:-1]] if pieces else []
    return {"tokens": [engine.decode([t]) for t in tokens[start:end]],
            "token_logprobs": request.token_logprobs[start:end],
            "top_logprobs": [{engine.decode([t]): lp for t, lp in top} for top in request.top_logprobs[start:end]],
            "text_offset": offsets}


def _kept_tokens(engine: Engine, request: Request) -> int:
    """Tokens of the answer: those that start before the stop string (all of them without one)."""
    if request.stop_index is None:
        return len(request.tokens)
    for i in range(len(request.tokens)):
        if len(engine.decode(request.tokens[:i])) >= request.stop_index:
            return i
    return len(request.tokens)


async def _serve(engine: Engine, endpoint: str, body: _Common, ids: list[int], max_tokens: int):
    start = time.perf_counter()
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    logprobs = getattr(body, "logprobs", None)
    requests = [Request(prompt_ids=list(ids), max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                        endpoint=endpoint, loop=loop, events=events, index=i, stop=body.stops, logprobs=logprobs)
                for i in range(body.n)]
    try:
        engine.submit(requests)
    except ValueError as exc:
        engine.m_requests.labels(endpoint, "400").inc()
        return _error(400, str(exc), param="prompt" if endpoint == "completions" else "messages")
    except QueueFullError as exc:
        engine.m_requests.labels(endpoint, "429").inc()
        return _error(429, str(exc), kind="rate_limit_error")
    except DrainingError as exc:
        engine.m_requests.labels(endpoint, "503").inc()
        return _error(503, str(exc), kind="unavailable")
    ident = ("cmpl-" if endpoint == "completions" else "chatcmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    name = body.model or engine.model_name

    def finish(status: str) -> None:
        engine.m_requests.labels(endpoint, status).inc()
        engine.m_request_seconds.labels(endpoint).observe(time.perf_counter() - start)

    if body.stream:
        return StreamingResponse(_stream(engine, requests, endpoint, ident, created, name, finish),
                                 media_type="text/event-stream")
    reasons: dict[int, str] = {}
    while len(reasons) < len(requests):
        kind, payload, index = await events.get()
        if kind == "error":
            finish("500")
            return _error(500, payload, kind="server_error")
        if kind == "done":
            reasons[index] = payload
    choices = []
    completion_tokens = 0
    for request in requests:
        text = _text(engine, request)
        kept = _kept_tokens(engine, request)
        completion_tokens += kept
        if endpoint == "completions":
            lp = None if logprobs is None else _logprobs(engine, request, 0, kept, 0)
            choices.append({"index": request.index, "text": text, "finish_reason": reasons[request.index],
                            "logprobs": lp})
        else:
            choices.append({"index": request.index, "message": {"role": "assistant", "content": text},
                            "finish_reason": reasons[request.index]})
    usage = {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
             "total_tokens": len(ids) + completion_tokens}
    finish("200")
    obj = "text_completion" if endpoint == "completions" else "chat.completion"
    return {"id": ident, "object": obj, "created": created, "model": name, "choices": choices, "usage": usage}


async def _stream(engine: Engine, requests: list[Request], endpoint: str, ident: str, created: int, name: str,
                  finish):
    obj = "text_completion" if endpoint == "completions" else "chat.completion.chunk"
    events = requests[0].events

    def chunk(index: int, delta: str | None, reason: str | None, first: bool = False,
              logprobs: dict | None = None) -> str:
        if endpoint == "completions":
            choice: dict[str, Any] = {"index": index, "text": delta or "", "finish_reason": reason,
                                      "logprobs": logprobs}
        else:
            d: dict[str, Any] = {"role": "assistant"} if first else {}
            if delta:
                d["content"] = delta
            choice = {"index": index, "delta": d, "finish_reason": reason}
        return "data: " + json.dumps({"id": ident, "object": obj, "created": created, "model": name,
                                      "choices": [choice]}) + "\n\n"

    sent = {r.index: "" for r in requests}
    sent_tokens = {r.index: 0 for r in requests}

    def piece(request: Request, done: bool) -> tuple[str, dict | None]:
        text = _text(engine, request)
        if not done:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                return "", None
            text = text[: len(text) - _held_back(text, request.stop)]
        previous = sent[request.index]
        if len(text) <= len(previous):
            return "", None
        delta, sent[request.index] = text[len(previous):], text
        lp = None
        if request.logprobs is not None and endpoint == "completions":
            end = _kept_tokens(engine, request) if done else len(request.tokens)
            lp = _logprobs(engine, request, sent_tokens[request.index], end, len(previous))
            sent_tokens[request.index] = end
        return delta, lp

    if endpoint == "chat":
        for r in requests:
            yield chunk(r.index, None, None, first=True)
    left = len(requests)
    failed = False
    while left:
        kind, payload, index = await events.get()
        request = requests[index]
        if kind == "token":
            delta, lp = piece(request, done=False)
            if delta:
                yield chunk(index, delta, None, logprobs=lp)
        elif kind == "done":
            delta, lp = piece(request, done=True)
            yield chunk(index, delta or None, payload, logprobs=lp)
            left -= 1
        else:
            yield "data: " + json.dumps({"error": {"message": payload, "type": "server_error"}}) + "\n\n"
            failed = True
            break
    finish("500" if failed else "200")
    yield "data: [DONE]\n\n"
