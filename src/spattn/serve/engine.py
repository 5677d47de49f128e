"""The serving engine: a request queue, a worker thread that batches compatible requests into one
``Runtime.generate`` call, and per-request token streams delivered to asyncio.

Requests with the same sampling settings (temperature, top_p) are batched, up to ``max_batch``, waiting at
most ``batch_wait_ms`` for company. Each row stops at its own ``max_tokens``, at the end-of-sequence token, or
when its decoded text contains one of its ``stop`` strings (``stop_index`` then marks where the text ends). A
request asking for ``logprobs`` gets, per generated token, its log-probability under the model (log-softmax of
the logits before temperature / top-p) and the ``logprobs`` most likely tokens with theirs. A failing batch
answers each of its requests with an error; the engine keeps running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import Any

import torch

from spattn._optional import require
from spattn.runtime.engine import Runtime
from spattn.runtime.monitor import log_event


@dataclasses.dataclass
class Request:
    """One generation request: prompt token ids, limits, sampling, and where its events go."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    endpoint: str = "completions"
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    index: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    created: float = dataclasses.field(default_factory=time.perf_counter)
    tokens: list[int] = dataclasses.field(default_factory=list)
    token_logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    stop_index: int | None = None
    done: bool = False

    def emit(self, kind: str, payload: Any = None) -> None:
        """Send an event ``(kind, payload, index)`` (``"token"``, ``"done"``, ``"error"``) to the request's
        asyncio queue, thread-safely (the ``n`` choices of one HTTP request share a queue)."""
        if self.loop is not None and self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload, self.index))

    @property
    def sampling(self) -> tuple[float, float]:
        return (round(self.temperature, 6), round(self.top_p, 6))


class QueueFullError(RuntimeError):
    """The engine's queue is full (HTTP 429)."""


class DrainingError(RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


class _Logprobs:
    """A logits processor (placed before transformers' temperature / top-p warpers): keeps the step's
    log-softmax of the logits, ``[B, V]`` float32, for the streamer to read."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _Streamer:
    """A transformers streamer for a batch: routes each row's new token to its request (and its logprobs),
    and ends a row at its stop strings."""

    def __init__(self, requests: list[Request], eos: set[int], ttft: Any, decode: Any = None,
                 logprobs: _Logprobs | None = None) -> None:
        self.requests = requests
        self.eos = eos
        self.ttft = ttft
        self.decode = decode
        self.logprobs = logprobs
        self.top = max((r.logprobs or 0 for r in requests), default=0)
        self.prompt_seen = False

    def _record_logprobs(self, ids: list[int]) -> tuple[list[float], list[list[int]], list[list[float]]] | None:
        last = None if self.logprobs is None else self.logprobs.last
        if last is None:
            return None
        chosen = last.gather(-1, torch.tensor(ids, device=last.device)[:, None])[:, 0].tolist()
        if not self.top:
            return chosen, [[] for _ in ids], [[] for _ in ids]
        values, indices = last.topk(self.top, dim=-1)
        return chosen, indices.tolist(), values.tolist()

    def _stopped(self, request: Request, token: int) -> bool:
        """Whether ``token`` completes a stop string; sets ``stop_index`` before the token is appended (the
        asyncio side reads the request from another thread: it never sees the token without the stop)."""
        if not request.stop or self.decode is None:
            return False
        text = self.decode([*request.tokens, token])
        found = [i for i in (text.find(s) for s in request.stop) if i >= 0]
        if found:
            request.stop_index = min(found)
        return bool(found)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first sends the prompt
            self.prompt_seen = True
            return
        ids = value.reshape(len(self.requests), -1)[:, -1].tolist()
        recorded = self._record_logprobs(ids) if any(r.logprobs is not None for r in self.requests) else None
        for row, (request, token) in enumerate(zip(self.requests, ids, strict=True)):
            if request.done:
                continue
            if token in self.eos:
                request.done = True
                request.emit("done", "stop")
                continue
            if not request.tokens and self.ttft is not None:
                self.ttft.observe(time.perf_counter() - request.created)
            stopped = self._stopped(request, token)
            if request.logprobs is not None and recorded is not None:
                chosen, indices, values = recorded
                request.token_logprobs.append(chosen[row])
                request.top_logprobs.append(list(zip(indices[row][: request.logprobs],
                                                     values[row][: request.logprobs], strict=True)))
            request.tokens.append(token)
            request.emit("token", token)
            if stopped:
                request.done = True
                request.emit("done", "stop")
            elif len(request.tokens) >= request.max_tokens:
                request.done = True
                request.emit("done", "length")

    def end(self) -> None:
        for request in self.requests:
            if not request.done:
                request.done = True
                request.emit("done", "length" if len(request.tokens) >= request.max_tokens else "stop")


class _RowLimits:
    """Stopping criterion: row ``b`` is finished once it generated ``max_tokens[b]`` tokens or its request is
    done (a stop string; the streamer runs before the stopping criteria in every step)."""

    def __init__(self, prompt_len: int, requests: list[Request], device) -> None:
        self.prompt_len = prompt_len
        self.requests = requests
        self.limits = torch.tensor([r.max_tokens for r in requests], device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.tensor([r.done for r in self.requests], device=self.limits.device)
        return ((input_ids.shape[1] - self.prompt_len) >= self.limits) | done


class Engine:
    """Queue + batching worker around a :class:`~spattn.runtime.Runtime` and its tokenizer.

    Args:
        runtime: the runtime (model + plan + controller).
        tokenizer: the model's tokenizer.
        max_batch: largest batch (default 8).
        batch_wait_ms: how long the worker waits to fill a batch (default 5 ms).
        max_queue: queued requests beyond which new ones get HTTP 429 (default 256).
        max_context: longest prompt + completion in tokens (default: the model's ``max_position_embeddings``).
        model_name: the name reported in responses (default ``"spattn"``).
    """

    def __init__(self, runtime: Runtime, tokenizer: Any, *, max_batch: int = 8, batch_wait_ms: float = 5.0,
                 max_queue: int = 256, max_context: int | None = None, model_name: str = "spattn") -> None:
        pc = require("prometheus_client", extra="serve")
        if max_batch < 1 or max_queue < 1 or batch_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and batch_wait_ms >= 0")
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000
        self.max_queue = max_queue
        config = runtime.model.config
        self.max_context = max_context or int(getattr(config, "max_position_embeddings", 2048))
        self.model_name = model_name
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self.registry = runtime.metrics.registry or pc.CollectorRegistry()
        r = self.registry
        self.m_requests = pc.Counter("spattn_requests", "HTTP requests by endpoint and status.",
                                     ["endpoint", "status"], registry=r)
        self.m_request_seconds = pc.Histogram("spattn_request_seconds", "Request latency (queue + generation).",
                                              ["endpoint"], registry=r,
                                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.m_ttft = pc.Histogram("spattn_time_to_first_token_seconds", "Time from request to its first token.",
                                   registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.m_queue = pc.Gauge("spattn_queue_depth", "Requests waiting for a batch.", registry=r)
        self.m_inflight = pc.Gauge("spattn_inflight_requests", "Requests being generated.", registry=r)
        self.m_batch = pc.Histogram("spattn_batch_size", "Requests per generate call.", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._pending: list[Request] = []
        self._lock = threading.Lock()
        self.draining = False
        self.busy = 0
        self._thread = threading.Thread(target=self._work, name="spattn-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    @property
    def queued(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def submit(self, request: Request | list[Request]) -> None:
        """Queue a request, or the ``n`` choices of one request together (their ``loop``/``events`` set);
        raises QueueFullError / DrainingError / ValueError before queueing any of them."""
        requests = request if isinstance(request, list) else [request]
        if self.draining:
            raise DrainingError("the server is shutting down")
        if self.queued + len(requests) > self.max_queue:
            raise QueueFullError(f"the queue is full ({self.max_queue} requests); retry later")
        for r in requests:
            if not r.prompt_ids:
                raise ValueError("the prompt is empty")
            total = len(r.prompt_ids) + r.max_tokens
            if total > self.max_context:
                raise ValueError(f"prompt ({len(r.prompt_ids)} tokens) + max_tokens ({r.max_tokens}) = "
                                 f"{total} exceeds the model's context of {self.max_context} tokens")
        for r in requests:
            self._queue.put(r)
        self.m_queue.set(self.queued)

    def close(self, timeout: float = 60.0) -> None:
        """Stop taking requests, finish the queued and running ones, stop the worker."""
        self.draining = True
        log_event(logging.INFO, "drain", queued=self.queued, busy=self.busy)
        self._queue.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _next_batch(self) -> list[Request] | None:
        """Block for a request, then gather compatible ones for up to ``batch_wait``; None = stop."""
        if not self._pending:
            item = self._queue.get()
            if item is None:
                return None
            self._pending.append(item)
        deadline = time.perf_counter() + self.batch_wait
        stop = False
        while True:
            left = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=max(left, 0)) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            self._pending.append(item)
        key = self._pending[0].sampling
        batch = [r for r in self._pending if r.sampling == key][: self.max_batch]
        self._pending = [r for r in self._pending if r not in batch]
        if stop:
            self._queue.put(None)  # handled after the pending requests
        return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                if self._pending:
                    continue
                return
            self.m_queue.set(self.queued)
            self.busy = len(batch)
            self.m_inflight.set(len(batch))
            self.m_batch.observe(len(batch))
            try:
                self._generate(batch)
            except Exception as exc:  # noqa: BLE001 - one failing batch must not stop the server
                log_event(logging.ERROR, "batch_failed", error=f"{type(exc).__name__}: {exc}", size=len(batch))
                for request in batch:
                    if not request.done:
                        request.done = True
                        request.emit("error", f"generation failed: {type(exc).__name__}: {exc}")
            finally:
                self.busy = 0
                self.m_inflight.set(0)

    def _generate(self, batch: list[Request]) -> None:
        from transformers import StoppingCriteriaList

        device = next(self.runtime.model.parameters()).device
        longest = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, request in enumerate(batch):  # left padding, as decoder-only generation needs
            n = len(request.prompt_ids)
            ids[row, longest - n:] = torch.tensor(request.prompt_ids)
            mask[row, longest - n:] = 1
        ids, mask = ids.to(device), mask.to(device)
        temperature, top_p = batch[0].sampling
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        recorder = _Logprobs() if any(r.logprobs is not None for r in batch) else None
        streamer = _Streamer(batch, self.eos, self.m_ttft, decode=self.decode, logprobs=recorder)
        limits = _RowLimits(longest, batch, device)
        self.runtime.generate(ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in batch),
                              streamer=streamer, stopping_criteria=StoppingCriteriaList([limits]),
                              logits_processor=[recorder] if recorder is not None else None,
                              pad_token_id=self.pad_id, **sampling)

    def decode(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (special tokens skipped), as the responses show it."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
