"""Ablations: vary one factor of a plan with the rest fixed, score every variant on the same examples.

A :class:`PlanSpec` names the factors: ``window``, ``sinks`` (0 = off), ``selector`` and ``budget`` (keys per
query of the dynamic part, spent in blocks; 0 = no dynamic part), ``block_size`` and ``dense_layers`` (layers
kept dense). :func:`ablate` builds one variant per value of one factor, scores each with a user function
returning per-example scores, and compares each with the base spec (paired bootstrap, ties called ties).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from spattn.eval import stats
from spattn.integrations.plan import Plan
from spattn.patterns import Pattern, Sinks, Window
from spattn.selectors import TopK

FACTORS = ("window", "sinks", "selector", "budget", "block_size", "dense_layers")


@dataclass(frozen=True)
class PlanSpec:
    """A plan described by the factors an ablation varies.

    Attributes:
        window: sliding window, keys to the left of each query (``Window(window)``).
        sinks: first tokens every query sees (``Sinks(sinks)``; 0 = none).
        selector: selector of the dynamic part (``"pooled"``, ``"vertical_slash"``, ``"antidiagonal"``,
            ``"bounds"``).
        budget: keys per query of the dynamic part, ``TopK(selector, ceil(budget / block_size))`` (0 = none).
        block_size: block size of the compiled layouts and of the selection.
        dense_layers: layers left with full attention.
    """

    window: int = 256
    sinks: int = 64
    selector: str = "pooled"
    budget: int = 0
    block_size: int = 128
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("window", "sinks", "budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"PlanSpec.{name} must be an int >= 0, got {value!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"PlanSpec.block_size must be a positive int, got {self.block_size!r}")
        layers = tuple(sorted({int(i) for i in self.dense_layers}))
        if any(i < 0 for i in layers):
            raise ValueError(f"PlanSpec.dense_layers must be layer indices >= 0, got {self.dense_layers!r}")
        object.__setattr__(self, "dense_layers", layers)
        TopK(self.selector, 1)  # validates the selector name

    def pattern(self) -> Pattern:
        """``Sinks(sinks) | Window(window) | TopK(selector, blocks)``, leaving out the parts that are 0."""
        pattern: Pattern = Window(self.window)
        if self.sinks:
            pattern = Sinks(self.sinks) | pattern
        if self.budget:
            pattern = pattern | TopK(self.selector, -(-self.budget // self.block_size))
        return pattern

    def plan(self) -> Plan:
        """The plan: :meth:`pattern` in every layer except ``dense_layers`` (full attention)."""
        return Plan(layers={i: None for i in self.dense_layers}, default=self.pattern(),
                    meta={"spec": self.to_dict()})

    def replace(self, **changes: Any) -> PlanSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dense_layers"] = list(self.dense_layers)
        return out

    def label(self) -> str:
        parts = [f"window={self.window}", f"sinks={self.sinks}"]
        if self.budget:
            parts.append(f"{self.selector}:{self.budget}")
        parts.append(f"block={self.block_size}")
        if self.dense_layers:
            parts.append("dense=" + "+".join(map(str, self.dense_layers)))
        return ", ".join(parts)


def parse_value(factor: str, text: str) -> Any:
    """One value of ``factor`` from the command line: ints; a selector name; ``dense_layers`` as
    ``"0+1"`` (layers joined by ``+``) or ``"none"``; ``sinks`` also takes ``on``/``off``."""
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
    text = text.strip()
    if factor == "selector":
        return text
    if factor == "dense_layers":
        return () if text.lower() in ("", "none", "-") else tuple(int(x) for x in text.split("+"))
    if factor == "sinks" and text.lower() in ("on", "off"):
        return 64 if text.lower() == "on" else 0
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"values of {factor} must be ints, got {text!r}") from None


def variants(factor: str, values: Sequence[Any], base: PlanSpec) -> list[PlanSpec]:
    """``base`` with ``factor`` set to each value (the base itself need not be among them)."""
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
    if not values:
        raise ValueError("values must not be empty")
    if factor == "selector" and not base.budget:
        raise ValueError("varying the selector needs a dynamic part: set a budget > 0 in the base spec")
    return [base.replace(**{factor: v}) for v in values]


def ablate(
    factor: str,
    values: Sequence[Any],
    score: Callable[[PlanSpec], Sequence[float]],
    *,
    base: PlanSpec | None = None,
    confidence: float = 0.95,
    progress: Callable[[PlanSpec], None] | None = None,
) -> dict[str, Any]:
    """Vary ``factor`` over ``values`` with the rest of ``base`` fixed; a JSON-ready table.

    Args:
        factor: one of :data:`FACTORS`.
        values: the values to try (ints, selector names, layer tuples for ``dense_layers``).
        score: ``score(spec) -> per-example scores`` (higher is better), the same examples for every spec,
            e.g. exact match of :func:`spattn.eval.retrieval.retrieval_accuracy` with ``spec.plan()``.
        base: the fixed factors (default :class:`PlanSpec()`); it is scored too, as the reference row.
        confidence: coverage of the intervals.
        progress: called with each spec before it is scored.

    Returns ``{"factor", "base", "rows": [{"value", "spec", "label", "score": Estimate, "versus_base":
    Comparison}]}``.
    """
    base = PlanSpec() if base is None else base
    specs = variants(factor, values, base)
    cache: dict[PlanSpec, list[float]] = {}

    def run(spec: PlanSpec) -> list[float]:
        if spec not in cache:
            if progress is not None:
                progress(spec)
            cache[spec] = [float(s) for s in score(spec)]
        return cache[spec]

    reference = run(base)
    rows = []
    for value, spec in zip(values, specs, strict=True):
        scores = run(spec)
        rows.append({
            "value": list(value) if isinstance(value, tuple) else value,
            "spec": spec.to_dict(), "label": spec.label(), "pattern": repr(spec.pattern()),
            "score": stats.estimate(scores, confidence=confidence).to_dict(),
            "versus_base": stats.compare(scores, reference, confidence=confidence).to_dict(),
        })
    return {"factor": factor, "base": base.to_dict(), "base_label": base.label(),
            "base_score": stats.estimate(reference, confidence=confidence).to_dict(), "rows": rows}


def table(result: dict[str, Any]) -> str:
    """The ablation as a Markdown table."""
    lines = [f"| {result['factor']} | plan | score [interval] | vs base ({result['base_label']}) |",
             "|---|---|---|---|"]
    for row in result["rows"]:
        s, c = row["score"], row["versus_base"]
        verdict = {"a": "better", "b": "worse", "tie": "tie"}[c["winner"]]
        lines.append(f"| {row['value']} | {row['label']} | {s['value']:.3f} [{s['low']:.3f}, {s['high']:.3f}] | "
                     f"{verdict} ({c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]) |")
    return "\n".join(lines)
