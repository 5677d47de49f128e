"""Pareto frontiers (cost against model damage, cost against recall) and the recommendation per budget."""

from __future__ import annotations

from typing import Any


def pareto(points: list[tuple[str, float, float]], *, maximize: bool = False) -> list[str]:
    """Ids of the non-dominated points ``(id, cost, value)``: lower cost and lower value (higher when
    ``maximize``) are better. Returned in order of increasing cost."""
    sign = -1.0 if maximize else 1.0
    ordered = sorted(points, key=lambda p: (p[1], sign * p[2], p[0]))
    out: list[str] = []
    best = float("inf")
    for pid, _, value in ordered:
        v = sign * value
        if v < best:
            out.append(pid)
            best = v
    return out


def _same_numbers(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two candidates that compiled to the same layouts (same cost, recall and perplexity)."""
    return (a["cost"]["keys_fraction"] == b["cost"]["keys_fraction"]
            and a["cost"]["block_fraction"] == b["cost"]["block_fraction"]
            and a["recall"]["mean"] == b["recall"]["mean"] and a["model"]["perplexity"] == b["model"]["perplexity"])


def recommend(candidates: list[dict[str, Any]], budgets: list[float]) -> list[dict[str, Any]]:
    """Per budget, the candidate with the lowest held-out perplexity among those whose measured cost is within
    the budget (ties: higher mean recall, then lower cost)."""
    out = []
    for b in budgets:
        ok = [c for c in candidates if c["cost"]["keys_fraction"] <= b]
        if not ok:
            out.append({"budget": b, "candidate": None,
                        "reason": "no candidate's measured cost is within this budget"})
            continue
        best = min(ok, key=lambda c: (c["model"]["perplexity"], -c["recall"]["mean"], c["cost"]["keys_fraction"],
                                      c["id"]))
        same = [c["id"] for c in ok if c is not best and _same_numbers(c, best)]
        out.append({"budget": b, "candidate": best["id"],
                    "reason": "lowest held-out perplexity among the candidates whose measured cost is within "
                              "the budget",
                    "same_as": same})
    return out
