"""``spattn.plan``: a pattern per layer and head, chosen under a FLOP, key or latency budget.

Steps: capture queries and keys on several calibration chunks (at one or more lengths) -> score every candidate
in every head (:mod:`~spattn.planner.table`) -> cost it (visited tiles, keys per query, or a measured latency
table) -> solve the multiple-choice knapsack (one option per head, :mod:`~spattn.planner.solve`) under the budget
and the constraints -> a :class:`spattn.Plan` naming each head's choice with its cost and score.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from spattn._optional import require
from spattn.integrations.plan import BudgetRule, Plan
from spattn.patterns import Full, Pattern, PerHead
from spattn.planner.calibrate import calibration_chunks
from spattn.planner.candidates import Candidate, as_candidates
from spattn.planner.cost import LatencyTable
from spattn.planner.solve import Solution, solve, sweep
from spattn.planner.table import CandidateTable, build_table
from spattn.planner.tasks import TaskScorer, builtin_scorer, layer_sensitivity, layer_weights

np = require("numpy", extra="planner")

OBJECTIVES = ("recall", "kl", "output_error", "task")
COSTS = ("flops", "latency")
SWEEP = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)


@dataclasses.dataclass(frozen=True)
class Constraints:
    """Rules every plan must follow.

    Attributes:
        dense_layers: layers kept dense in every head (negative indices count from the end: ``(0, -1)`` keeps
            the first and the last layer).
        min_dense_heads: at least this many heads (anywhere) stay dense.
        families: restrict the choices to these candidate families (dense is always allowed).
    """

    dense_layers: tuple[int, ...] = ()
    min_dense_heads: int = 0
    families: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
        if isinstance(self.min_dense_heads, bool) or not isinstance(self.min_dense_heads, int) \
                or self.min_dense_heads < 0:
            raise ValueError(f"min_dense_heads must be an int >= 0, got {self.min_dense_heads!r}")
        if self.families is not None:
            object.__setattr__(self, "families", tuple(self.families))

    def to_dict(self) -> dict[str, Any]:
        return {"dense_layers": list(self.dense_layers), "min_dense_heads": self.min_dense_heads,
                "families": None if self.families is None else list(self.families)}


_BUDGET_TEXT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(%|keys?|ms)?\s*$", re.IGNORECASE)


def parse_budget(budget: float | str | BudgetRule, *, cost: str, length: int, block_size: int) -> BudgetRule:
    """A :class:`BudgetRule` from ``0.25`` / ``"25%"`` (fraction of the dense cost), ``"256 keys"`` (keys per
    query) or ``"12ms"`` (attention milliseconds per forward at ``length``; needs ``cost="latency"``)."""
    if isinstance(budget, BudgetRule):
        return budget
    if isinstance(budget, bool):
        raise TypeError("budget must be a fraction, '25%', '256 keys', '12ms' or a BudgetRule, got a bool")
    if isinstance(budget, (int, float)):
        if not 0 < budget <= 1:
            raise ValueError(f"a numeric budget is a fraction of the dense cost in (0, 1], got {budget!r}; "
                             "write '256 keys' or '12ms' for other budgets")
        kind, value = "fraction", float(budget)
    elif isinstance(budget, str):
        match = _BUDGET_TEXT.match(budget)
        if not match:
            raise ValueError(f"budget {budget!r} is not understood: use 0.25, '25%', '256 keys' or '12ms'")
        value = float(match.group(1))
        unit = (match.group(2) or "").lower()
        if unit == "%":
            kind, value = "fraction", value / 100
        elif unit.startswith("key"):
            kind = "keys"
        elif unit == "ms":
            kind = "ms"
        else:
            kind = "fraction"
    else:
        raise TypeError(f"budget must be a fraction, '25%', '256 keys', '12ms' or a BudgetRule, "
                        f"got {type(budget).__name__}")
    if kind == "ms" and cost != "latency":
        raise ValueError("a millisecond budget needs cost='latency' (a measured latency table)")
    if kind == "keys" and cost == "latency":
        raise ValueError("a keys-per-query budget is a FLOP budget: use cost='flops' (or a ms budget for latency)")
    return BudgetRule(kind, value, length=length, cost=cost, block_size=block_size)


@dataclasses.dataclass
class PlanResult:
    """A plan and the evidence behind it.

    Attributes:
        plan: the :class:`spattn.Plan` (per layer ``PerHead`` patterns, the rule, per-head choices).
        table: the :class:`~spattn.planner.table.CandidateTable` (every candidate in every head).
        solution: the knapsack :class:`~spattn.planner.solve.Solution`.
        per_head: one dict per (layer, head): choice, family, cost (budget unit), score (objective), recall,
            keys per query, tile fraction (and latency share in ms with ``cost="latency"``).
        costs / values: the ``[layers * heads, C]`` arrays the solver saw; capacity: the budget in their unit.
        uniform: the best single candidate used in every head within the same budget (``None`` if none fits).
        front: the Pareto sweep: one dict per capacity (budget, cost, value, mean recall, mean keys).
        layer_weights: the task weights per layer (``objective="task"``), else None.
        seconds: wall time per stage.
    """

    plan: Plan
    table: CandidateTable
    solution: Solution
    per_head: list[dict[str, Any]]
    costs: np.ndarray
    values: np.ndarray
    capacity: float
    uniform: dict[str, Any] | None
    front: list[dict[str, Any]]
    layer_weights: list[float] | None
    seconds: dict[str, float]

    def summary(self) -> dict[str, Any]:
        """JSON-ready headline numbers."""
        return {"budget": self.plan.budget.to_dict() if self.plan.budget else None,
                "capacity": self.capacity, **self.plan.meta.get("planner", {}),
                "uniform": self.uniform, "front": self.front, "seconds": self.seconds}


def _progress_bar(enabled: bool):
    """A rich progress callback ``(description, done, total)`` and its closer, or no-ops."""
    if not enabled:
        return None, lambda: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   transient=False)
    bar.start()
    tasks: dict[str, Any] = {}

    def update(description: str, done: int, total: int) -> None:
        stage = description.split(",")[0]
        if stage not in tasks:
            tasks[stage] = bar.add_task(description, total=total)
        bar.update(tasks[stage], completed=done, description=description)

    return update, bar.stop


def _latency_costs(table: CandidateTable, latency: LatencyTable, heads: int) -> np.ndarray:
    """Per-head share of the measured layer latency, ``[layers, heads, C]`` (the same in every layer); the
    candidates are timed interleaved (:meth:`LatencyTable.measure`)."""
    ms = np.array(latency.measure([c.pattern for c in table.candidates], table.length, heads=heads,
                                  kv_heads=table.kv_heads, head_dim=table.head_dim, block_size=table.block_size,
                                  causal=table.causal)) / heads
    return np.broadcast_to(ms, (table.layers, heads, len(table.candidates))).copy()


def _resolve_layers(indices: Sequence[int], layers: int) -> list[int]:
    out = []
    for i in indices:
        j = i + layers if i < 0 else i
        if not 0 <= j < layers:
            raise ValueError(f"dense_layers names layer {i}, but the model has {layers} layers")
        out.append(j)
    return sorted(set(out))


def _label(candidate: Candidate) -> str:
    return candidate.name


def make_plan(
    model: torch.nn.Module,
    text: Any,
    *,
    budget: float | str | BudgetRule,
    cost: str = "flops",
    objective: str = "recall",
    task: str | TaskScorer | None = None,
    candidates: list[Candidate | Pattern] | None = None,
    lengths: Sequence[int] = (1024,),
    device: torch.device | str | None = None,
    tokenizer: Any = None,
    samples: int = 3,
    block_size: int = 64,
    constraints: Constraints | None = None,
    solver: str = "auto",
    latency: LatencyTable | None = None,
    sweep_budgets: Sequence[float] = SWEEP,
    table: CandidateTable | None = None,
    progress: bool | Callable[[str, int, int], None] = False,
) -> PlanResult:
    """Plan a pattern per layer and head; returns the plan with its evidence (:class:`PlanResult`).

    Arguments as :func:`plan`, plus ``table`` (a :class:`CandidateTable` from an earlier call with the same
    model, text and candidates: re-solve at another budget without recalibrating; its lengths and block size
    replace ``lengths`` and ``block_size``, so the plan's rule names the length it was calibrated at) and ``sweep_budgets``
    (fractions of the dense cost for the Pareto front).
    """
    started = time.perf_counter()
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    lengths = [int(x) for x in lengths]
    if not lengths or any(x < 2 for x in lengths):
        raise ValueError(f"lengths must name at least one calibration length >= 2, got {lengths}")
    if objective == "task" and task is None:
        raise ValueError("objective='task' needs task= ('lm', 'classification', 'retrieval' or a scorer object)")
    if task is not None and objective != "task":
        objective = "task"  # naming a task means planning for it
    constraints = constraints or Constraints()
    if table is not None:  # the table fixes the calibration length and block size of the rule (and the costs)
        lengths, block_size = list(table.lengths), table.block_size
    L0 = lengths[0]
    rule = parse_budget(budget, cost=cost, length=L0, block_size=block_size)
    cands = as_candidates(candidates, L0, block_size)
    if candidates is None and constraints.families is not None:  # do not calibrate options that cannot be chosen
        cands = [c for c in cands if c.dense or c.family in constraints.families
                 or c.family.split(":")[0] in constraints.families]
    callback, close = (progress, lambda: None) if callable(progress) else _progress_bar(bool(progress))
    seconds: dict[str, float] = {}
    try:
        if table is None:
            chunks = {L: calibration_chunks(text, tokenizer, L, samples) for L in lengths}
            table = build_table(model, chunks, cands, block_size=block_size, values=objective == "output_error",
                                rule_kind=rule.kind, device=device, progress=callback)
        elif [c.name for c in table.candidates] != [c.name for c in cands] and candidates is not None:
            raise ValueError("table= was built with other candidates than candidates=")
        cands = table.candidates
        seconds["calibration"] = table.seconds
        layers, heads, C = table.layers, table.heads, len(cands)
        weights = None
        if objective == "task":
            t0 = time.perf_counter()
            scorer = task if not isinstance(task, str) else builtin_scorer(
                task, model, tokenizer, text, length=L0, skip=samples, block_size=block_size)
            if not isinstance(scorer, TaskScorer):
                raise TypeError(f"task must be a task name or have name and score(model, plan), "
                                f"got {type(task).__name__}")
            static = [c for c in cands if not c.dynamic and not c.dense]
            probe = min(static or [c for c in cands if not c.dense],
                        key=lambda c: float(table.block_fraction[..., cands.index(c)].mean())).pattern
            drops, _ = layer_sensitivity(model, scorer, layers, probe, block_size=block_size, progress=callback)
            weights = layer_weights(drops)
            seconds["task_sensitivity"] = time.perf_counter() - t0
        if cost == "latency":
            t0 = time.perf_counter()
            latency = latency or LatencyTable(device=device)
            table.latency_ms = _latency_costs(table, latency, heads)
            latency.save()
            seconds["latency_table"] = time.perf_counter() - t0
    finally:
        close()
    t0 = time.perf_counter()
    # ---- costs in the budget's unit, values by the objective: [layers, heads, C] -> [G, C]
    if rule.kind == "keys":
        unit_cost = table.keys
    elif cost == "latency":
        unit_cost = table.latency_ms
    else:
        unit_cost = table.block_fraction
    if rule.kind == "fraction":
        dense_col = table.index("dense") if any(c.name == "dense" for c in cands) else None
        dense_cost = unit_cost[..., dense_col] if dense_col is not None else np.ones((layers, heads))
        capacity = rule.value * float(dense_cost.sum())
    elif rule.kind == "keys":
        capacity = rule.value * layers * heads
    else:
        capacity = rule.value
    if objective == "recall":
        value = table.recall.copy()
    elif objective == "kl":
        value = table.log_recall.copy()
    elif objective == "output_error":
        value = -table.output_error
    else:
        value = table.recall * weights[:, None, None]
    costs = unit_cost.reshape(layers * heads, C).astype(np.float64).copy()
    values = value.reshape(layers * heads, C).astype(np.float64)
    dense_flags = np.array([c.dense for c in cands])[None].repeat(layers * heads, 0)
    if constraints.families is not None:
        allowed = np.array([c.dense or c.family in constraints.families
                            or c.family.split(":")[0] in constraints.families for c in cands])
        costs[:, ~allowed] = np.inf
    for layer in _resolve_layers(constraints.dense_layers, layers):
        costs[layer * heads:(layer + 1) * heads, ~dense_flags[0]] = np.inf
    linked, skipped = _link_layer_wide(cands, costs, layers, heads, solver)
    solution = solve(costs, values, capacity, flagged=dense_flags, min_flagged=constraints.min_dense_heads,
                     method=solver, linked=linked)
    # the best uniform pattern at the same budget (same candidate in every head, constraints ignored)
    uniform = None
    totals = unit_cost.reshape(layers * heads, C).sum(0)
    fits = [c for c in range(C) if totals[c] <= capacity * (1 + 1e-9)]
    if fits:
        best = max(fits, key=lambda c: values[:, c].sum())
        uniform = {"choice": cands[best].name, "cost": float(totals[best]), "value": float(values[:, best].sum()),
                   "recall": float(table.recall[..., best].mean())}
    front = []
    if rule.kind == "fraction":
        scale = float(dense_cost.sum())
        for sol in sweep(costs, values, [b * scale for b in sweep_budgets], flagged=dense_flags,
                         min_flagged=constraints.min_dense_heads, method=solver, linked=linked):
            pick = np.array(sol.choice)
            rows = np.arange(layers * heads)
            front.append({"budget": sol.capacity / scale, "cost": sol.cost / scale, "value": sol.value,
                          "recall": float(table.recall.reshape(-1, C)[rows, pick].mean()),
                          "keys_per_query": float(table.keys.reshape(-1, C)[rows, pick].mean())})
    seconds["solve"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    plan_obj, per_head = _to_plan(table, solution, costs, values, rule, objective, weights)
    plan_obj.meta["planner"] = {
        "objective": objective, "cost": cost, "task": getattr(task, "name", task),
        "lengths": lengths, "samples": table.samples, "block_size": block_size,
        "candidates": [c.name for c in cands], "solver": solution.method, "exact": solution.exact,
        "capacity": capacity, "total_cost": solution.cost, "total_value": solution.value,
        "mean_recall": float(np.mean([h["recall"] for h in per_head])),
        "mean_keys_per_query": float(np.mean([h["keys_per_query"] for h in per_head])),
        "mean_tile_fraction": float(np.mean([h["tile_fraction"] for h in per_head])),
        "constraints": constraints.to_dict(), "seconds": seconds, "uniform": uniform,
    }
    if skipped:
        plan_obj.meta["planner"]["skipped_candidates"] = skipped
    return PlanResult(plan=plan_obj, table=table, solution=solution, per_head=per_head, costs=costs, values=values,
                      capacity=capacity, uniform=uniform, front=front,
                      layer_weights=None if weights is None else weights.tolist(), seconds=seconds)


def _link_layer_wide(cands: list[Candidate], costs: np.ndarray, layers: int, heads: int,
                     solver: str) -> tuple[list[list[tuple[int, int]]] | None, dict[str, str]]:
    """Note [layer-wide candidates]: a candidate that covers a whole layer (``Candidate.layer_wide``:
    ``Hierarchical``, one selection per key/value group run by its own attention) is offered to each head with
    its per-head score and cost, and linked across the layer's heads: the solver gives it to every head of the
    layer or to none (milp equalities). The dp solver cannot link heads; with it (or with ``"auto"`` and no
    scipy) those candidates are left out, and the plan's meta says so (``skipped_candidates``).
    Returns the linked sets for :func:`solve` (None when there are none) and the skipped candidates."""
    wide = [n for n, c in enumerate(cands) if c.layer_wide]
    if not wide:
        return None, {}
    milp = solver == "milp"
    if solver == "auto":
        try:
            import scipy.optimize  # noqa: F401
            milp = True
        except ImportError:
            milp = False
    if not milp:
        costs[:, wide] = np.inf
        why = "a layer-wide candidate needs the milp solver (scipy: pip install 'spattn[planner]'); the dp solver " \
              "cannot link a layer's heads"
        return None, {cands[n].name: why for n in wide}
    if heads < 2:
        return None, {}
    return [[(layer * heads + h, n) for h in range(heads)] for layer in range(layers) for n in wide], {}


def _to_plan(table: CandidateTable, solution: Solution, costs: np.ndarray, values: np.ndarray, rule: BudgetRule,
             objective: str, weights: np.ndarray | None) -> tuple[Plan, list[dict[str, Any]]]:
    layers, heads = table.layers, table.heads
    cands = table.candidates
    per_layer: dict[int, Pattern | None] = {}
    heads_json: dict[int, list[dict[str, Any]]] = {}
    per_head: list[dict[str, Any]] = []
    for layer in range(layers):
        picks = solution.choice[layer * heads:(layer + 1) * heads]
        pats = [cands[o].pattern for o in picks]
        if all(isinstance(p, Full) for p in pats):
            per_layer[layer] = None
        elif all(p == pats[0] for p in pats):
            per_layer[layer] = pats[0]
        else:
            per_layer[layer] = PerHead(tuple(pats))
        rows = []
        for h, o in enumerate(picks):
            g = layer * heads + h
            row = {"layer": layer, "head": h, "choice": cands[o].name, "family": cands[o].family,
                   "cost": float(costs[g, o]), "score": float(values[g, o]),
                   "recall": float(table.recall[layer, h, o]), "keys_per_query": float(table.keys[layer, h, o]),
                   "tile_fraction": float(table.block_fraction[layer, h, o])}
            if table.latency_ms is not None:
                row["latency_ms"] = float(table.latency_ms[layer, h, o])
            per_head.append(row)
            rows.append({k: v for k, v in row.items() if k not in ("layer",)})
        heads_json[layer] = rows
    plan = Plan(layers=per_layer, budget=rule, heads=heads_json)
    return plan, per_head


def plan(
    model: torch.nn.Module,
    text: Any,
    *,
    budget: float | str | BudgetRule,
    cost: str = "flops",
    objective: str = "recall",
    task: str | TaskScorer | None = None,
    candidates: list[Candidate | Pattern] | None = None,
    lengths: Sequence[int] = (1024,),
    device: torch.device | str | None = None,
    **options: Any,
) -> Plan:
    """Choose a pattern per layer and head of ``model`` under ``budget``; returns a :class:`spattn.Plan`.

    Args:
        model: a transformers model (decoder such as SmolLM2, or encoder such as MiniLM).
        text: calibration text: a corpus name (``"austen"``), a text file, the text itself (with
            ``tokenizer=``) or token ids. Chunks come from its calibration split (the held-out tail stays out).
        budget: ``0.25`` or ``"25%"`` (fraction of the dense cost: visited tiles with ``cost="flops"``, measured
            time with ``cost="latency"``), ``"256 keys"`` (mean keys per query), or ``"12ms"`` (attention
            milliseconds per forward at the first length; ``cost="latency"``), or a :class:`spattn.BudgetRule`.
        cost: ``"flops"`` (analytic, from each layout's visited tiles) or ``"latency"`` (a latency table measured
            on ``device`` and cached on disk, see :class:`~spattn.planner.cost.LatencyTable`).
        objective: per-head score to maximise: ``"recall"`` (mean attention mass kept), ``"kl"`` (minus the mean
            KL of the attention rows), ``"output_error"`` (minus the relative attention output error) or
            ``"task"`` (recall weighted by each layer's measured importance for ``task``).
        task: ``"lm"``, ``"classification"``, ``"retrieval"`` or a scorer with ``score(model, plan) -> float``;
            implies ``objective="task"``.
        candidates: the options per head (patterns or :class:`~spattn.planner.Candidate`); default
            :func:`~spattn.planner.candidates.default_candidates` (dense is always added).
        lengths: calibration lengths; the budget rule is stated at the first, and candidates are scored at
            every length as the plan would run there (:meth:`spattn.Plan.at_length`). Default ``(1024,)``.
        device: where scoring (and latency timing) runs (default: the model's device).
        **options: ``tokenizer``, ``samples`` (calibration chunks per length, default 3), ``block_size``
            (default 64; deploy with ``spattn.patched(model, plan, block_size=plan.budget.block_size)``),
            ``constraints`` (:class:`Constraints`), ``solver`` (``"auto"``, ``"dp"``, ``"milp"``), ``latency``
            (a :class:`LatencyTable`), ``progress`` (show progress bars). See :func:`make_plan`.

    Returns:
        a :class:`spattn.Plan` whose ``heads`` name each head's choice with its cost and score, and whose
        ``budget`` is the rule :meth:`~spattn.Plan.at_length` keeps.

    Example:
        >>> model, tokenizer = spattn.integrations.load_smollm2()  # doctest: +SKIP
        >>> plan = spattn.plan(model, "austen", tokenizer=tokenizer, budget=0.2)  # doctest: +SKIP
        >>> with spattn.patched(model, plan, block_size=plan.budget.block_size):  # doctest: +SKIP
        ...     logits = model(input_ids).logits
    """
    return make_plan(model, text, budget=budget, cost=cost, objective=objective, task=task, candidates=candidates,
                     lengths=lengths, device=device, **options).plan
