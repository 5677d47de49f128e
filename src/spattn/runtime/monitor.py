"""Monitoring of the runtime: a level read once from ``SPATTN_LOGLEVEL``, Prometheus metrics, JSON logs.

Levels (``SPATTN_LOGLEVEL``, read once when this module is imported; default 1):

* ``0`` — off: :func:`instrument` returns the undecorated function, nothing is measured or sampled.
* ``1`` — metrics: decode-step latency, density and pages selected per layer, sampled recall, fallbacks,
  budget and modes (Prometheus, through ``prometheus-client``, the ``serve`` extra).
* ``2`` — also per-layer attention latency (synchronises CUDA around each call, so it costs time) and one
  JSON debug log line per attention call.

Fallbacks and mode switches are logged (JSON, logger ``spattn.runtime``) at every level: they are the
controller's decisions, not monitoring, and nothing falls back silently.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch

ENV_VAR = "SPATTN_LOGLEVEL"
logger = logging.getLogger("spattn.runtime")


def _read_level() -> int:
    raw = os.environ.get(ENV_VAR, "1").strip()
    try:
        level = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR} must be an integer 0, 1 or 2, got {raw!r}") from None
    if level not in (0, 1, 2):
        raise ValueError(f"{ENV_VAR} must be 0 (off), 1 (metrics) or 2 (metrics + per-layer timing), got {level}")
    return level


LEVEL = _read_level()


def instrument(fn: Callable[..., Any], record: Callable[[float, tuple, dict], None], *,
               level: int | None = None, synchronize: bool = False) -> Callable[..., Any]:
    """``fn`` wrapped to call ``record(seconds, args, kwargs)`` after each call; ``fn`` itself at level 0.

    ``synchronize``: wait for CUDA before reading the clock (true per-call GPU time, at a cost)."""
    level = LEVEL if level is None else level
    if level == 0:
        return fn

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if synchronize and torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if synchronize and torch.cuda.is_available():
            torch.cuda.synchronize()
        record(time.perf_counter() - start, args, kwargs)
        return out

    return timed


# ---------------------------------------------------------------------------------------------- logs
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's ``event`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "event", None)
        if isinstance(fields, dict):
            data.update(fields)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_json_logging(level: int = logging.INFO, stream: Any = None) -> logging.Handler:
    """Send ``spattn`` logs to ``stream`` (default stderr) as JSON lines; returns the handler (idempotent)."""
    root = logging.getLogger("spattn")
    for handler in root.handlers:
        if isinstance(handler.formatter, JsonFormatter):
            return handler
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def log_event(level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with structured ``fields`` (they become keys of the JSON line)."""
    logger.log(level, message, extra={"event": {"event": message, **fields}})


# ---------------------------------------------------------------------------------------------- metrics
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FRACTION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_PAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    """The runtime's Prometheus metrics in their own registry (``registry``; serve it with
    ``prometheus_client.generate_latest(metrics.registry)``). ``None`` attributes when prometheus-client is
    not installed or the level is 0: every ``observe_*`` method is then a no-op."""

    def __init__(self, level: int | None = None, registry: Any = None) -> None:
        self.level = LEVEL if level is None else level
        self.registry = None
        self.enabled = False
        if self.level == 0:
            return
        try:
            import prometheus_client as pc
        except ImportError:
            logger.warning("spattn metrics are off: prometheus-client is not installed (pip install 'spattn[serve]')")
            return
        self.enabled = True
        self.registry = registry if registry is not None else pc.CollectorRegistry()
        r = self.registry
        self.step_seconds = pc.Histogram("spattn_decode_step_seconds", "Wall time of one decode step (all layers).",
                                         buckets=_STEP_BUCKETS, registry=r)
        self.prefill_seconds = pc.Histogram("spattn_prefill_seconds", "Wall time of one prefill forward.",
                                            buckets=_STEP_BUCKETS, registry=r)
        self.attention_seconds = pc.Histogram(
            "spattn_attention_seconds", "Attention time per layer call (level 2 only; CUDA synchronised).",
            ["layer", "phase"], buckets=_STEP_BUCKETS, registry=r)
        self.density = pc.Histogram("spattn_decode_density", "Share of the valid keys a decode query attends.",
                                    ["layer"], buckets=_FRACTION_BUCKETS, registry=r)
        self.pages = pc.Histogram("spattn_decode_pages", "Key pages visited per decode query (safeguards included).",
                                  ["layer"], buckets=_PAGE_BUCKETS, registry=r)
        self.recall = pc.Histogram("spattn_decode_recall", "Sampled true recall: dense softmax mass kept.",
                                   ["layer"], buckets=_FRACTION_BUCKETS, registry=r)
        self.fallbacks = pc.Counter("spattn_fallbacks", "Attention calls rerun dense, by reason.",
                                    ["layer", "reason"], registry=r)
        self.switches = pc.Counter("spattn_mode_switches", "Layer mode switches (sparse <-> dense), by reason.",
                                   ["layer", "mode", "reason"], registry=r)
        self.budget_changes = pc.Counter("spattn_budget_changes", "Changes of the page budget, by reason.",
                                         ["reason"], registry=r)
        self.budget = pc.Gauge("spattn_budget_pages", "Current page budget (pages selected beyond safeguards).",
                               registry=r)
        self.layer_dense = pc.Gauge("spattn_layer_dense", "1 while a layer runs dense (controller fallback).",
                                    ["layer"], registry=r)
        self.step_p95 = pc.Gauge("spattn_decode_step_p95_seconds", "p95 of the recent decode steps (controller).",
                                 registry=r)
        self.request_p95 = pc.Gauge("spattn_request_p95_seconds",
                                    "p95 of the recent requests' generation latency (controller, request scope).",
                                    registry=r)
        self.latency_target = pc.Gauge("spattn_latency_target_seconds",
                                       "The controller's p95 target (per decode step or per request).", registry=r)
        self.tokens = pc.Counter("spattn_generated_tokens", "Tokens generated.", registry=r)

    # the calls below are cheap no-ops when disabled
    def observe_step(self, seconds: float, prefill: bool) -> None:
        if self.enabled:
            (self.prefill_seconds if prefill else self.step_seconds).observe(seconds)

    def observe_attention(self, layer: int, phase: str, seconds: float) -> None:
        if self.enabled:
            self.attention_seconds.labels(str(layer), phase).observe(seconds)

    def observe_decode(self, layer: int, density: float, pages: float) -> None:
        if self.enabled:
            self.density.labels(str(layer)).observe(density)
            self.pages.labels(str(layer)).observe(pages)

    def observe_recall(self, layer: int, recall: float) -> None:
        if self.enabled:
            self.recall.labels(str(layer)).observe(recall)

    def count_fallback(self, layer: int, reason: str) -> None:
        if self.enabled:
            self.fallbacks.labels(str(layer), reason).inc()

    def count_switch(self, layer: int, mode: str, reason: str) -> None:
        if self.enabled:
            self.switches.labels(str(layer), mode, reason).inc()
            self.layer_dense.labels(str(layer)).set(1.0 if mode == "dense" else 0.0)

    def set_budget(self, pages: int, reason: str | None) -> None:
        if self.enabled:
            self.budget.set(pages)
            if reason is not None:
                self.budget_changes.labels(reason).inc()

    def set_latency(self, p95_seconds: float | None, target_seconds: float | None, scope: str = "step") -> None:
        if self.enabled:
            if p95_seconds is not None:
                (self.step_p95 if scope == "step" else self.request_p95).set(p95_seconds)
            if target_seconds is not None:
                self.latency_target.set(target_seconds)

    def count_tokens(self, n: int) -> None:
        if self.enabled and n:
            self.tokens.inc(n)
