"""The HTTP app (FastAPI): an OpenAI-compatible subset over an :class:`~spattn.serve.engine.Engine`.

* ``POST /v1/completions`` — ``prompt`` (a string), ``max_tokens``, ``temperature``, ``top_p``, ``stream``;
* ``POST /v1/chat/completions`` — ``messages`` rendered by the tokenizer's chat template;
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
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int = Field(16, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str = Field(..., min_length=1)


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


async def _serve(engine: Engine, endpoint: str, body: _Common, ids: list[int], max_tokens: int):
    start = time.perf_counter()
    request = Request(prompt_ids=list(ids), max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                      endpoint=endpoint, loop=asyncio.get_running_loop(), events=asyncio.Queue())
    try:
        engine.submit(request)
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
        return StreamingResponse(_stream(engine, request, endpoint, ident, created, name, finish),
                                 media_type="text/event-stream")
    reason = None
    while True:
        kind, payload = await request.events.get()
        if kind == "error":
            finish("500")
            return _error(500, payload, kind="server_error")
        if kind == "done":
            reason = payload
            break
    text = engine.tokenizer.decode(request.tokens, skip_special_tokens=True)
    usage = {"prompt_tokens": len(ids), "completion_tokens": len(request.tokens),
             "total_tokens": len(ids) + len(request.tokens)}
    finish("200")
    if endpoint == "completions":
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return {"id": ident, "object": "text_completion", "created": created, "model": name, "choices": [choice],
                "usage": usage}
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
    return {"id": ident, "object": "chat.completion", "created": created, "model": name, "choices": [choice],
            "usage": usage}


async def _stream(engine: Engine, request: Request, endpoint: str, ident: str, created: int, name: str, finish):
    obj = "text_completion" if endpoint == "completions" else "chat.completion.chunk"

    def chunk(delta: str | None, reason: str | None, first: bool = False) -> str:
        if endpoint == "completions":
            choice: dict[str, Any] = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
        else:
            d: dict[str, Any] = {"role": "assistant"} if first else {}
            if delta:
                d["content"] = delta
            choice = {"index": 0, "delta": d, "finish_reason": reason}
        return "data: " + json.dumps({"id": ident, "object": obj, "created": created, "model": name,
                                      "choices": [choice]}) + "\n\n"

    if endpoint == "chat":
        yield chunk(None, None, first=True)
    sent = ""
    while True:
        kind, payload = await request.events.get()
        if kind == "token":
            text = engine.tokenizer.decode(request.tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                continue
            delta, sent = text[len(sent):], text
            if delta:
                yield chunk(delta, None)
        elif kind == "done":
            text = engine.tokenizer.decode(request.tokens, skip_special_tokens=True)
            yield chunk(text[len(sent):] or None, payload)
            finish("200")
            break
        else:
            yield "data: " + json.dumps({"error": {"message": payload, "type": "server_error"}}) + "\n\n"
            finish("500")
            break
    yield "data: [DONE]\n\n"
