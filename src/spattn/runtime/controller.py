"""The controller: a latency target drives the page budget (PI loop with bounds), a recall floor raises a
layer's budget or switches it to dense, and kernel errors / non-finite outputs rerun the call dense.

Every decision is logged (JSON, logger ``spattn.runtime``) and counted (:attr:`Controller.counts`, mirrored
in the Prometheus metrics); nothing falls back silently.

PI loop, once per decode step, on ``p95`` = the 95th percentile of the last ``window`` step latencies (with
``latency_scope="request"``: once per finished generate call, on the p95 of the last ``window`` requests'
generation latencies, each sequence of a batch counting as one request)::

    e  = clip((target - p95) / target, -1, 1)            # > 0: room to spend, < 0: too slow
    I  = clip(I + e, -integral_limit, integral_limit)    # not integrated while the budget is saturated
    budget = clamp(round(initial + (kp * e + ki * I) * (max_budget - min_budget)), min_budget, max_budget)

When ``p95`` stays above the target for ``patience`` steps with the budget already at ``min_budget``, and those
steps are themselves over the target (not only the p95 window's older ones), the sparse layers switch to dense
(reason ``"latency"``); steps marked instrumented (a sampled recall, a graph recording) stay out of the window; a layer switched to dense (any reason) returns to sparse
after ``cooldown`` decode steps, and the switch back is logged and counted as well.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter, deque

from spattn.runtime.monitor import Metrics, log_event

REASONS = ("error", "nonfinite", "latency", "recall")
SCOPES = ("step", "request")


@dataclasses.dataclass
class ControllerConfig:
    """Settings of the :class:`Controller`.

    Args:
        latency_target_ms: p95 latency target in milliseconds, per decode step or per request (see
            ``latency_scope``; ``None``: no latency control).
        latency_scope: ``"step"`` (default: the p95 of decode-step latencies, updated every step) or
            ``"request"`` (the p95 of per-request generation latencies, prefill included, updated when a
            ``generate`` call ends; every sequence of the batch is one request).
        window: decode steps (or requests) in the p95 window (default 16).
        budget: initial page budget (pages selected beyond the safeguards); ``None``: the plan's largest
            ``TopK.blocks``, else 8.
        min_budget, max_budget: bounds of the budget (defaults 0 and 64).
        kp, ki: proportional and integral gains (defaults 0.5, 0.1).
        integral_limit: anti-windup bound of the integral (default 5).
        recall_floor: minimum sampled recall per layer (``None``: no floor). A sample below it adds
            ``recall_boost`` pages to that layer; at ``max_budget`` the layer switches to dense.
        recall_boost: pages added per low-recall sample (default 2).
        patience: steps over target at ``min_budget`` before the dense switch (default 4).
        cooldown: decode steps a layer stays dense before sparse is tried again (default 64).
        error_limit: consecutive kernel errors / non-finite outputs in one layer before it switches to dense
            (default 3; each such call is rerun dense anyway).
    """

    latency_target_ms: float | None = None
    latency_scope: str = "step"
    window: int = 16
    budget: int | None = None
    min_budget: int = 0
    max_budget: int = 64
    kp: float = 0.5
    ki: float = 0.1
    integral_limit: float = 5.0
    recall_floor: float | None = None
    recall_boost: int = 2
    patience: int = 4
    cooldown: int = 64
    error_limit: int = 3

    def __post_init__(self) -> None:
        target = self.latency_target_ms
        if target is not None and not (target > 0 and math.isfinite(target)):
            raise ValueError(f"latency_target_ms must be a positive number or None, got {self.latency_target_ms!r}")
        if self.latency_scope not in SCOPES:
            raise ValueError(f"latency_scope must be one of {SCOPES}, got {self.latency_scope!r}")
        for name in ("window", "patience", "cooldown", "error_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("min_budget", "max_budget", "recall_boost"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.max_budget < self.min_budget:
            raise ValueError(f"max_budget ({self.max_budget}) must be >= min_budget ({self.min_budget})")
        in_range = isinstance(self.budget, int) and self.min_budget <= self.budget <= self.max_budget
        if self.budget is not None and not in_range:
            raise ValueError(f"budget must be an int in [min_budget, max_budget] = [{self.min_budget}, "
                             f"{self.max_budget}] or None, got {self.budget!r}")
        if self.recall_floor is not None and not 0 < self.recall_floor <= 1:
            raise ValueError(f"recall_floor must be in (0, 1] or None, got {self.recall_floor!r}")
        if self.kp < 0 or self.ki < 0:
            raise ValueError(f"kp and ki must be >= 0, got kp={self.kp}, ki={self.ki}")


class Controller:
    """Budget and per-layer modes for the runtime (see the module docstring for the rules).

    Args:
        config: a :class:`ControllerConfig`.
        initial_budget: the budget used when ``config.budget`` is None.
        metrics: where to mirror the counts (a :class:`~spattn.runtime.monitor.Metrics`).
    """

    def __init__(self, config: ControllerConfig | None = None, *, initial_budget: int = 8,
                 metrics: Metrics | None = None) -> None:
        self.config = config = config if config is not None else ControllerConfig()
        start = config.budget if config.budget is not None else initial_budget
        self.initial_budget = min(max(int(start), config.min_budget), config.max_budget)
        self.budget = self.initial_budget
        self.metrics = metrics if metrics is not None else Metrics(level=0)
        self.integral = 0.0
        self.steps = 0
        self.latencies: deque[float] = deque(maxlen=config.window)
        self.p95: float | None = None
        self.extra: Counter[int] = Counter()        # recall boosts per layer
        self.dense_until: dict[int, int] = {}      # layer -> decode step at which sparse is retried
        self.dense_reason: dict[int, str] = {}
        self.errors: Counter[int] = Counter()       # consecutive failures per layer
        self.over_target = 0
        self.instrumented_steps = 0  # decode steps kept out of the latency window (Note [instrumented steps])
        self.counts: Counter[tuple] = Counter()     # ("fallback", layer, reason), ("switch", layer, mode, reason),
        #                                             ("budget", reason)
        self.metrics.set_budget(self.budget, None)
        if config.latency_target_ms is not None:
            self.metrics.set_latency(None, config.latency_target_ms / 1000)

    # ------------------------------------------------------------------ queries
    def is_dense(self, layer: int) -> bool:
        """True while ``layer`` runs dense because of a controller switch."""
        return layer in self.dense_until

    def budget_for(self, layer: int) -> int:
        """Pages layer ``layer`` may select beyond its safeguards this step (dynamic parts of the plan)."""
        return min(self.budget + self.extra[layer], self.config.max_budget)

    def extra_pages(self, layer: int) -> int:
        """Pages added to a static layer by recall boosts."""
        return min(self.extra[layer], self.config.max_budget)

    # ------------------------------------------------------------------ events
    def fallback(self, layer: int, reason: str, detail: str = "") -> None:
        """One attention call of ``layer`` was rerun dense because of ``reason`` ("error" or "nonfinite")."""
        self.counts[("fallback", layer, reason)] += 1
        self.metrics.count_fallback(layer, reason)
        log_event(logging.WARNING, "fallback", layer=layer, reason=reason, detail=detail, step=self.steps)
        self.errors[layer] += 1
        if self.errors[layer] >= self.config.error_limit:
            self.switch_dense(layer, reason)

    def succeeded(self, layer: int) -> None:
        """A sparse call of ``layer`` returned a finite result."""
        if self.errors[layer]:
            self.errors[layer] = 0

    def switch_dense(self, layer: int, reason: str) -> None:
        if layer in self.dense_until:
            return
        self.dense_until[layer] = self.steps + self.config.cooldown
        self.dense_reason[layer] = reason
        self.counts[("switch", layer, "dense", reason)] += 1
        self.metrics.count_switch(layer, "dense", reason)
        log_event(logging.WARNING, "switch", layer=layer, mode="dense", reason=reason, step=self.steps,
                  retry_at_step=self.dense_until[layer])

    def _switch_sparse(self, layer: int) -> None:
        reason = self.dense_reason.pop(layer, "cooldown")
        del self.dense_until[layer]
        self.errors[layer] = 0
        self.counts[("switch", layer, "sparse", "cooldown")] += 1
        self.metrics.count_switch(layer, "sparse", "cooldown")
        log_event(logging.WARNING, "switch", layer=layer, mode="sparse", reason="cooldown", after=reason,
                  step=self.steps)

    def observe_recall(self, layer: int, recall: float) -> None:
        """A sampled true recall of ``layer``: below the floor, raise its budget or switch it to dense."""
        self.metrics.observe_recall(layer, recall)
        floor = self.config.recall_floor
        if floor is None or recall >= floor or self.is_dense(layer):
            return
        if self.budget + self.extra[layer] >= self.config.max_budget:
            self.switch_dense(layer, "recall")
            return
        self.extra[layer] += self.config.recall_boost
        self.counts[("budget", "recall")] += 1
        self.metrics.set_budget(self.budget, "recall")
        log_event(logging.INFO, "budget", layer=layer, reason="recall", recall=round(recall, 4), floor=floor,
                  pages=self.budget_for(layer), step=self.steps)

    def observe_step(self, seconds: float, sparse_layers: list[int], *, instrumented: bool = False) -> None:
        """One decode step took ``seconds``: cooldowns; with the step scope also p95, the PI budget and the
        latency switch. ``instrumented``: the step ran extra work the budget does not control (a sampled recall
        against dense, the eager step that records a CUDA graph); it counts as a step but stays out of the
        latency window (Note [instrumented steps])."""
        # Note [instrumented steps]: a captured decode replays its step in a few ms, but a step that samples the
        # true recall (recall_sample) or records a new graph (after a dense switch) runs eagerly, about 10x
        # slower. With a p95 over 8 steps one such step is the p95, so the PI loop chased an outlier no budget
        # can move: on the H200 (session 7, decode_fused.py's spike at 32k) it never got back under its target,
        # and each dense switch (a new recording) made the next window slow again. Those steps are still
        # observed by the metrics (the latency histogram), and counted here (instrumented_steps, in the summary).
        self.steps += 1
        for layer in [lay for lay, until in self.dense_until.items() if until <= self.steps]:
            self._switch_sparse(layer)
        if instrumented:
            self.instrumented_steps += 1
            return
        if self.config.latency_scope == "step":
            self._control([seconds], sparse_layers)

    def observe_request(self, seconds: float, sparse_layers: list[int], requests: int = 1) -> None:
        """A ``generate`` call for ``requests`` sequences took ``seconds``: with the request scope, each
        sequence is one request of that latency in the p95 window, then one PI update."""
        if self.config.latency_scope == "request" and requests > 0:
            self._control([seconds] * int(requests), sparse_layers)

    def _control(self, latencies: list[float], sparse_layers: list[int]) -> None:
        """The p95 of the window after ``latencies``, then the PI budget and the latency switch."""
        cfg = self.config
        self.latencies.extend(latencies)
        ordered = sorted(self.latencies)
        self.p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        target = None if cfg.latency_target_ms is None else cfg.latency_target_ms / 1000
        self.metrics.set_latency(self.p95, target, cfg.latency_scope)
        if target is None:
            return
        error = max(-1.0, min(1.0, (target - self.p95) / target))
        saturated = (self.budget >= cfg.max_budget and error > 0) or (self.budget <= cfg.min_budget and error < 0)
        if not saturated:
            self.integral = max(-cfg.integral_limit, min(cfg.integral_limit, self.integral + error))
        span = cfg.max_budget - cfg.min_budget
        wanted = round(self.initial_budget + (cfg.kp * error + cfg.ki * self.integral) * span)
        wanted = min(max(wanted, cfg.min_budget), cfg.max_budget)
        if wanted != self.budget:
            reason = "latency_down" if wanted < self.budget else "latency_up"
            self.counts[("budget", reason)] += 1
            self.metrics.set_budget(wanted, reason)
            log_event(logging.INFO, "budget", reason=reason, pages_from=self.budget, pages_to=wanted,
                      p95_ms=round(self.p95 * 1000, 3), target_ms=cfg.latency_target_ms, step=self.steps)
            self.budget = wanted
        # the dense switch waits for steps that are slow at the minimum budget themselves: the p95 window still
        # holds the steps from before the budget came down for `window` steps (Note [instrumented steps])
        if self.p95 > target and self.budget <= cfg.min_budget and max(latencies) > target:
            self.over_target += 1
            if self.over_target >= cfg.patience:
                for layer in sparse_layers:
                    self.switch_dense(layer, "latency")
                self.over_target = 0
        else:
            self.over_target = 0

    def summary(self) -> dict:
        """Counts and state as a JSON-ready dict."""
        counts, dense, reasons = dict(self.counts), dict(self.dense_until), dict(self.dense_reason)  # C-level copies:
        # safe to call from another thread (the server's /healthz) while generation updates them
        return {
            "budget": self.budget,
            "p95_ms": None if self.p95 is None else self.p95 * 1000,
            "latency_scope": self.config.latency_scope,
            "steps": self.steps,
            "instrumented_steps": self.instrumented_steps,
            "dense_layers": {str(k): reasons.get(k, "") for k in sorted(dense)},
            "counts": {"/".join(str(p) for p in key): n for key, n in sorted(counts.items(), key=str)},
        }
