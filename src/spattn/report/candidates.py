"""Candidate patterns, each fitted to a budget: the largest setting whose measured cost stays within it.

Cost is counted at token level against dense *causal* attention: kept (query, key) pairs / (L (L + 1) / 2),
i.e. the fraction of the dense keys a query reads, averaged over queries, heads, layers and (for dynamic
patterns) the calibration chunks. The block-level fraction (what a block-sparse kernel visits) is reported
beside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

import spattn
from spattn.patterns import Pattern

FAMILY_TITLES = {
    "window": "sliding window",
    "sinks_window": "sinks + window",
    "strided": "window + strided reach",
    "random": "sinks + window + random blocks",
    "budgeted": "Budgeted (sinks, window, block strides)",
    "top_p": "sinks + window + dynamic selection (Adaptive)",
    "plan": "planner: a pattern per layer and head (spattn.plan)",
    "learned": "sinks + window + learned gate (TopK of a saved gate)",
    "hierarchical": "hierarchical: compressed tokens choose blocks (Hierarchical, NSA-style)",
}
# the planner's options for the "plan" family: static only, so that a plan costs no selection in each forward
PLAN_FAMILIES = ("window", "sinks_window", "strided", "budgeted", "dense")


@dataclasses.dataclass
class Candidate:
    """One pattern at one budget (``pattern`` None: the family could not fit the budget; ``note`` says why).

    ``plan``: a candidate that differs per layer (and head): the :class:`~spattn.Plan` applied to the model;
    ``pattern`` is then its middle layer's pattern (timed for latency and drawn in the layout picture)."""

    id: str
    family: str
    budget: float
    pattern: Pattern | None
    label: str
    parameter: dict[str, Any]
    dynamic: bool
    selector: str | None = None
    note: str | None = None
    plan: Any = None

    def pattern_for(self, layer: int) -> Pattern:
        """The pattern of ``layer`` (full attention where a plan keeps a layer dense)."""
        if self.plan is None:
            return self.pattern
        return self.plan.pattern_for(layer) or spattn.Full()


def causal_pairs(length: int) -> int:
    return length * (length + 1) // 2


def layout_cost(layout: spattn.Layout) -> tuple[float, float]:
    """(token-level, block-level) cost of a causal self-attention layout against dense causal attention."""
    L = layout.q_len
    keys = float(layout.allowed_pairs().mean()) / causal_pairs(L)
    nb = layout.num_q_blocks
    visited = float((layout.kv_num_blocks + layout.full_kv_num_blocks).double().sum(-1).mean())
    return keys, visited / (nb * (nb + 1) // 2)


def _static_cost(pattern: Pattern, length: int, block_size: int) -> float:
    return layout_cost(spattn.compile(pattern, length, length, causal=True, block_size=block_size))[0]


def _fit_int(build: Callable[[int], Pattern], lo: int, hi: int, cost: Callable[[Pattern], float],
             budget: float) -> tuple[int, Pattern] | None:
    """Largest p in [lo, hi] with cost(build(p)) <= budget (cost nondecreasing in p), or None."""
    if cost(build(lo)) > budget:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(build(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo, build(lo)


def _fmt(pattern: Pattern) -> str:
    """Short human label of a pattern (numbers are the pattern's own fields, stored in results.json)."""
    from spattn.patterns.base import Union

    if isinstance(pattern, Union):
        return " | ".join(_fmt(p) for p in pattern.parts)
    name = type(pattern).__name__
    d = pattern.to_dict()
    d.pop("type", None)
    shown = {
        "Window": ["left"], "Sinks": ["n"], "Strided": ["stride"], "RandomBlocks": ["per_row", "block"],
        "Budgeted": ["keys_per_query", "sinks"], "TopP": ["selector", "mass"], "TopK": ["selector", "blocks"],
        "Adaptive": ["selector", "keys", "sinks", "window"],
        "Hierarchical": ["compress_stride", "select_block", "select_count"],
    }.get(name)
    if shown is None:
        return repr(pattern)
    if name == "Hierarchical" and pattern.safeguard is not None:  # its sinks and window: the safeguard
        return f"{_fmt(dataclasses.replace(pattern, safeguard=None))} | {_fmt(pattern.safeguard)}"
    args = []
    for n, key in enumerate(shown):
        v = d.get(key)
        text = repr(v) if isinstance(v, str) else (f"{v:.4g}" if isinstance(v, float) else str(v))
        args.append(text if n == 0 and len(shown) == 1 or isinstance(v, str) else f"{key}={text}")
    return f"{name}({', '.join(args)})"


def safeguards(budget_keys: float) -> tuple[int, int]:
    """(sinks, window) kept by the families that add long-range reach: a quarter of the budget is local."""
    sinks = int(min(64, max(4, budget_keys // 8)))
    window = int(max(0, budget_keys // 4))
    return sinks, window


def static_candidates(family: str, budget: float, length: int, block_size: int, seed: int) -> Candidate:
    """Fit a static family to ``budget`` at causal self-attention over ``length`` tokens."""
    K = budget * (length + 1) / 2  # keys per query on average
    sinks, window = safeguards(K)
    cost = lambda p: _static_cost(p, length, block_size)  # noqa: E731 - local shorthand
    nk = -(-length // block_size)
    if family == "window":
        fit = _fit_int(lambda w: spattn.Window(w), 0, length, cost, budget)
        name = "left"
    elif family == "sinks_window":
        fit = _fit_int(lambda w: spattn.Sinks(sinks) | spattn.Window(w), 0, length, cost, budget)
        name = "left"
    elif family == "strided":
        half = int(K // 2)
        fit = _fit_int(lambda p: spattn.Window(half) | spattn.Strided(length + 1 - p), 1, length, cost, budget)
        name = "stride"
    elif family == "random":
        fit = _fit_int(lambda r: spattn.Sinks(sinks) | spattn.Window(window)
                       | spattn.RandomBlocks(r, seed=seed, block=block_size), 0, nk, cost, budget)
        name = "per_row"
    elif family == "budgeted":
        fit = _fit_int(lambda k: spattn.Budgeted(k, sinks=sinks), 1, length, cost, budget)
        name = "keys_per_query"
    else:
        raise ValueError(f"unknown static family {family!r}")
    cid = f"{family}@{budget:g}"
    if fit is None:
        return Candidate(cid, family, budget, None, "", {}, False,
                         note=f"{FAMILY_TITLES[family]} cannot fit {budget:g} of the dense keys at {length} tokens")
    value, pattern = fit
    if family == "random" and value == 0:
        return Candidate(cid, family, budget, None, "", {}, False,
                         note=(f"random blocks cannot fit {budget:g} of the dense keys at {length} tokens: one random "
                               f"{block_size}-token block per query block on top of the sinks and window exceeds it"))
    if family == "strided":
        name, value = "stride", length + 1 - value
    return Candidate(cid, family, budget, pattern, _fmt(pattern), {name: value}, False)


def fit_dynamic(selector: str, budget: float, length: int, block_size: int,
                probes: list[tuple[torch.Tensor, torch.Tensor]], iterations: int = 7) -> Candidate:
    """Fit ``Adaptive(selector, keys, sinks, window)`` (one key budget per query over all heads, spent where the
    estimated missing mass is) to ``budget``: ``keys`` starts at the budget and steps down by one selection
    block until the cost measured on the calibration probes (``[(query [1, H, L, D], key [1, Hkv, L, D]),
    ...]``, a few layers) fits."""
    from spattn.selectors import Adaptive

    K = budget * (length + 1) / 2
    sinks, window = safeguards(K)
    cell = min(64, block_size) if block_size % min(64, block_size) == 0 else block_size

    def build(keys: int) -> Pattern:
        return Adaptive(selector, keys, sinks=sinks, window=window, block=cell)

    def cost(p: Pattern) -> float:
        vals = [layout_cost(spattn.compile(p, length, length, causal=True, block_size=block_size, query=q, key=k))[0]
                for q, k in probes]
        return sum(vals) / len(vals)

    cid = f"top_p:{selector}@{budget:g}"
    local = _static_cost(spattn.Sinks(sinks) | spattn.Window(window), length, block_size)
    if local > budget:
        return Candidate(cid, "top_p", budget, None, "", {}, True, selector=selector,
                         note=(f"Adaptive({selector!r}) cannot fit {budget:g} of the dense keys: its sinks and window "
                               f"alone cost {local:.3g}"))
    keys = int(K)
    for _ in range(iterations):
        if keys <= 0 or cost(build(keys)) <= budget:
            break
        keys -= cell
    keys = max(keys, 0)
    pattern = build(keys)
    return Candidate(cid, "top_p", budget, pattern, _fmt(pattern), {"keys": keys}, True, selector=selector)


def _plan_label(plan: Any) -> str:
    """``Plan(per head: 60% sinks_window, 30% window, ...)``: the planner's choices by family, largest first."""
    counts: dict[str, int] = {}
    for rows in plan.heads.values():
        for row in rows:
            counts[row["family"]] = counts.get(row["family"], 0) + 1
    total = sum(counts.values()) or 1
    parts = [f"{100 * n / total:.0f}% {fam}" for fam, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return f"Plan(per head: {', '.join(parts[:3])}{', ...' if len(parts) > 3 else ''})"


def planner_table(layers_by_chunk: list[list[tuple[torch.Tensor, torch.Tensor]]], length: int, block_size: int,
                  device: str | torch.device = "cpu") -> Any:
    """The planner's candidate table (:func:`spattn.planner.table_from_samples`) on the report's calibration
    captures (``[chunk][layer] -> (query [1, H, L, D], key [1, Hkv, L, D])``), static families only
    (:data:`PLAN_FAMILIES`): built once per report, solved once per budget."""
    from spattn.planner import Candidate as PlannerCandidate
    from spattn.planner import default_candidates
    from spattn.planner.candidates import SINKS
    from spattn.planner.table import Sample, table_from_samples

    cands = default_candidates(length, block_size, families=PLAN_FAMILIES)
    # cheaper options than the planner's smallest (a window of half a block), so that the small budgets of the
    # report (5% of 512 tokens is ~13 keys per query) have a choice in every head
    names = {c.name for c in cands}
    for w in sorted({max(1, block_size // 8), max(1, block_size // 4)}):
        for name, fam, pattern in ((f"window:{w}", "window", spattn.Window(w)),
                                   (f"sinks_window:{w}", "sinks_window", spattn.Sinks(SINKS) | spattn.Window(w))):
            if name not in names:
                cands.insert(0, PlannerCandidate(name, fam, pattern))
    samples = [Sample({i: q for i, (q, _) in enumerate(layers)}, {i: k for i, (_, k) in enumerate(layers)})
               for layers in layers_by_chunk]
    return table_from_samples({length: samples}, cands, block_size=block_size, device=device)


def fit_plan(table: Any, budget: float, length: int, block_size: int) -> Candidate:
    """The planner's plan at ``budget``: the knapsack over every layer and head of ``table`` (its keys per query
    summed over heads at most ``budget`` of the dense causal keys, recall as the objective), restated as a
    ``"fraction"`` rule so that :meth:`~spattn.Plan.at_length` keeps the same share of the keys at other
    lengths."""
    from spattn.integrations.plan import BudgetRule, Plan
    from spattn.planner import InfeasibleBudget, make_plan

    cid = f"plan@{budget:g}"
    keys = budget * (length + 1) / 2
    try:
        result = make_plan(None, None, budget=BudgetRule("keys", keys, length=length, block_size=block_size),
                           candidates=table.candidates, lengths=(length,), block_size=block_size, table=table)
    except InfeasibleBudget as exc:
        return Candidate(cid, "plan", budget, None, "", {}, False,
                         note=f"the planner cannot fit {budget:g} of the dense keys at {length} tokens: {exc}")
    got = result.plan
    # the planner's notes without its wall times: the same inputs give the same plan, byte for byte
    notes = {k: v for k, v in got.meta.get("planner", {}).items() if k != "seconds"}
    plan = Plan(layers=got.layers, default=got.default, meta={"planner": notes}, heads=got.heads,
                budget=BudgetRule("fraction", budget, length=length, block_size=block_size))
    return plan_candidate(cid, "plan", budget, plan, table.layers)


def plan_candidate(cid: str, family: str, budget: float, plan: Any, layers: int) -> Candidate:
    """A :class:`Candidate` for a per-layer ``plan`` of a ``layers``-layer model (its middle layer stands for
    it in the latency timing and the layout picture)."""
    patterns = [plan.pattern_for(i) or spattn.Full() for i in range(layers)]
    dynamic = any(p.contains_dynamic() for p in patterns)
    middle = patterns[layers // 2]
    label = _plan_label(plan) if plan.heads else f"Plan({_fmt(middle)} in the middle layer)"
    return Candidate(cid, family, budget, middle, label, {"layers": layers}, dynamic, plan=plan)


def fit_learned(gates: str, budget: float, length: int, block_size: int, layers: int) -> Candidate:
    """``Sinks | Window | TopK(gate of the layer, blocks)`` in every layer, from a saved gate checkpoint
    (:func:`spattn.learned.load`): the sinks and window of :func:`safeguards`, and as many selected blocks as the
    rest of the budget pays for (the gate's block cost is at most ``blocks * block_size`` keys per query)."""
    from spattn.integrations.plan import BudgetRule, Plan
    from spattn.learned import load
    from spattn.selectors import TopK

    cid = f"learned@{budget:g}"
    K = budget * (length + 1) / 2
    sinks, window = safeguards(K)
    local = _static_cost(spattn.Sinks(sinks) | spattn.Window(window), length, block_size)
    blocks = int(max(0.0, budget - local) * (length + 1) / 2 // block_size)
    if local > budget or blocks < 1:
        return Candidate(cid, "learned", budget, None, "", {}, True,
                         note=f"a learned gate cannot fit {budget:g} of the dense keys at {length} tokens: its sinks "
                              f"and window cost {local:.3g} and leave less than one {block_size}-token block")
    per_layer = {i: spattn.Sinks(sinks) | spattn.Window(window) | TopK(load(gates, layer=i), blocks)
                 for i in range(layers)}
    plan = Plan(layers=per_layer, budget=BudgetRule("fraction", budget, length=length, block_size=block_size),
                meta={"gates": gates})
    cand = plan_candidate(cid, "learned", budget, plan, layers)
    cand.label = f"Sinks({sinks}) | Window({window}) | TopK(gate, {blocks})"
    cand.parameter = {"blocks": blocks}
    return cand


def fit_hierarchical(budget: float, length: int, block_size: int) -> Candidate:
    """``Hierarchical`` in its frozen-model form (:func:`spattn.hierarchical.fit_budget`: the compressed tokens
    choose ``select_count - 1`` blocks, which share one softmax with the sinks and window of :func:`safeguards`),
    its keys per query (compressed tokens counted too) within ``budget``."""
    from spattn.hierarchical import fit_budget

    K = budget * (length + 1) / 2
    sinks, _ = safeguards(K)
    cid = f"hierarchical@{budget:g}"
    select_block = 1 << (block_size.bit_length() - 1)  # a power of two (its triton blocks), at most block_size
    if select_block < 16:
        return Candidate(cid, "hierarchical", budget, None, "", {}, True,
                         note=f"hierarchical needs a block size >= 16 (its selection blocks), got {block_size}")
    pattern = fit_budget(K, length, block_size=select_block, sinks=sinks)
    if pattern is None:
        return Candidate(cid, "hierarchical", budget, None, "", {}, True,
                         note=f"hierarchical cannot fit {budget:g} of the dense keys at {length} tokens: its "
                              "compressed tokens, sinks, window, own block and one chosen 16-token block exceed it")
    parameter = {"select_count": pattern.select_count, "select_block": pattern.select_block,
                 "compress_stride": pattern.compress_stride}
    return Candidate(cid, "hierarchical", budget, pattern, _fmt(pattern), parameter, True)
