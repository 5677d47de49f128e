"""The multiple-choice knapsack: exactly one option per group (head), total cost within the capacity, the
largest total value; plus the constraints the planner needs and a sweep over capacities (the Pareto front).

Two exact solvers:

* ``"dp"`` — dynamic programming over integer costs. Costs that are not integers are put on a grid of
  ``resolution`` steps of the capacity and rounded *up*, so the answer never exceeds the capacity; it is then
  exact for the rounded costs (``exact`` says whether rounding happened). "At least M flagged options" adds a
  second state dimension (the flagged count, capped at M).
* ``"milp"`` — ``scipy.optimize.milp`` (HiGHS) on the real costs, with every constraint; exact up to HiGHS'
  tolerances (zero relative gap asked). Needs ``pip install 'spattn[planner]'``.

``"auto"`` picks milp when scipy is installed, else dp.

Linked options (``linked=``): sets of (group, option) pairs taken all together or not at all, e.g. a pattern that
covers a whole layer (``Hierarchical``: one selection per key/value group) offered to each of the layer's heads.
Only milp carries them (equalities between the set's variables); the dp's state cannot, so it refuses them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from spattn._optional import require

np = require("numpy", extra="planner")

METHODS = ("auto", "dp", "milp")


class InfeasibleBudget(ValueError):
    """No choice fits the capacity (with the constraints); the message says what the cheapest choice costs."""


@dataclasses.dataclass
class Solution:
    """A knapsack answer.

    Attributes:
        choice: the option picked per group, ``[G]`` ints.
        cost: total cost of the picked options (real costs). value: their total value.
        capacity: the capacity asked for. method: the solver that answered. exact: False when the dp solver
            rounded costs up to its grid (then the answer is feasible and optimal for the rounded costs).
    """

    choice: list[int]
    cost: float
    value: float
    capacity: float
    method: str
    exact: bool


def _as_arrays(costs, values) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(costs, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if c.ndim != 2 or c.shape != v.shape or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"costs and values must be [groups, options] arrays of one shape, got {c.shape} and {v.shape}")
    if np.isnan(c).any() or np.isnan(v).any():
        raise ValueError("costs and values must not hold NaN")
    if (c < 0).any():
        raise ValueError("costs must be >= 0 (use inf for an option a group may not take)")
    if np.isinf(v[np.isfinite(c)]).any():
        raise ValueError("values of allowed options (finite cost) must be finite")
    if not np.isfinite(c).any(axis=1).all():
        bad = int(np.flatnonzero(~np.isfinite(c).any(axis=1))[0])
        raise ValueError(f"group {bad} has no allowed option (every cost is inf)")
    return c, v


def _check_infeasible(c: np.ndarray, capacity: float, flagged: np.ndarray | None, min_flagged: int) -> None:
    cheapest = float(np.min(c, axis=1).sum())
    if cheapest > capacity * (1 + 1e-12) + 1e-12:
        raise InfeasibleBudget(f"the budget is too small: the cheapest choice for every head already costs "
                               f"{cheapest:.6g} "
                         f"> capacity {capacity:.6g}")
    if flagged is not None and min_flagged:
        possible = int((flagged & np.isfinite(c)).any(axis=1).sum())
        if possible < min_flagged:
            raise InfeasibleBudget(f"at least {min_flagged} flagged (dense) options asked, but only {possible} groups "
                             "can take one")


def solve(
    costs: Sequence[Sequence[float]] | np.ndarray,
    values: Sequence[Sequence[float]] | np.ndarray,
    capacity: float,
    *,
    flagged: Sequence[Sequence[bool]] | np.ndarray | None = None,
    min_flagged: int = 0,
    method: str = "auto",
    resolution: int = 20000,
    linked: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> Solution:
    """Pick one option per group maximising the total value with total cost <= ``capacity``.

    Args:
        costs: ``[G, O]`` non-negative costs; ``inf`` marks an option the group may not take.
        values: ``[G, O]`` values (higher is better).
        capacity: the budget (same unit as the costs).
        flagged: optional ``[G, O]`` bools and ``min_flagged``: at least that many groups must take a flagged
            option (e.g. "at least M dense heads").
        method: ``"auto"``, ``"dp"`` or ``"milp"``.
        resolution: grid steps of the capacity for the dp solver when costs are not integers.
        linked: sets of ``(group, option)`` pairs that are picked all together or not at all (milp only; a set
            holding a forbidden option, cost ``inf``, is never picked).

    Returns:
        :class:`Solution`. Raises :class:`InfeasibleBudget` (a ``ValueError``) when no choice fits.

    Example:
        >>> solve([[1, 2], [1, 3]], [[0.0, 1.0], [0.0, 2.0]], 4).choice
        [0, 1]
    """
    c, v = _as_arrays(costs, values)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or not math.isfinite(capacity) \
            or capacity < 0:
        raise ValueError(f"capacity must be a finite number >= 0, got {capacity!r}")
    if isinstance(min_flagged, bool) or not isinstance(min_flagged, int) or min_flagged < 0:
        raise ValueError(f"min_flagged must be an int >= 0, got {min_flagged!r}")
    f = None
    if flagged is not None:
        f = np.asarray(flagged, dtype=bool)
        if f.shape != c.shape:
            raise ValueError(f"flagged must have the shape of costs {c.shape}, got {f.shape}")
    elif min_flagged:
        raise ValueError("min_flagged needs flagged= (which options count)")
    sets = _check_linked(linked, c)
    if sets:
        c = c.copy()
        for members in sets:  # a set with a forbidden member can never be taken: forbid all of it
            if not all(np.isfinite(c[g, o]) for g, o in members):
                for g, o in members:
                    c[g, o] = np.inf
        if not np.isfinite(c).any(axis=1).all():
            bad = int(np.flatnonzero(~np.isfinite(c).any(axis=1))[0])
            raise ValueError(f"group {bad} has no allowed option once the linked sets are applied")
    _check_infeasible(c, float(capacity), f, min_flagged)
    if method == "auto":
        try:
            import scipy.optimize  # noqa: F401
            method = "milp"
        except ImportError:
            if sets:
                raise ImportError("linked options need the milp solver, i.e. scipy: pip install 'spattn[planner]'") \
                    from None
            method = "dp"
    if method == "milp":
        return _milp(c, v, float(capacity), f, min_flagged, sets)
    if sets:
        raise ValueError("linked options need method='milp' (the dp solver cannot link groups)")
    return _dp(c, v, float(capacity), f, min_flagged, resolution)


def _check_linked(linked, c: np.ndarray) -> list[list[tuple[int, int]]]:
    if linked is None:
        return []
    G, O = c.shape
    out, seen = [], set()
    for n, members in enumerate(linked):
        pairs = [(int(g), int(o)) for g, o in members]
        if len(pairs) < 2:
            raise ValueError(f"linked[{n}] must hold at least two (group, option) pairs, got {pairs}")
        for g, o in pairs:
            if not (0 <= g < G and 0 <= o < O):
                raise ValueError(f"linked[{n}] names ({g}, {o}), outside the [{G}, {O}] costs")
            if (g, o) in seen:
                raise ValueError(f"({g}, {o}) appears in more than one linked set")
            seen.add((g, o))
        if len({g for g, _ in pairs}) != len(pairs):
            raise ValueError(f"linked[{n}] names one group twice (a group takes exactly one option)")
        out.append(pairs)
    return out


def _totals(c: np.ndarray, v: np.ndarray, choice: list[int]) -> tuple[float, float]:
    rows = np.arange(c.shape[0])
    return float(c[rows, choice].sum()), float(v[rows, choice].sum())


def _dp(c: np.ndarray, v: np.ndarray, capacity: float, f: np.ndarray | None, min_flagged: int,
        resolution: int) -> Solution:
    finite = np.isfinite(c)
    integral = bool(np.all(np.abs(c[finite] - np.round(c[finite])) < 1e-9)) and capacity <= 4 * resolution * 50
    if integral:
        w = np.where(finite, np.round(c), 0).astype(np.int64)
        cap = int(math.floor(capacity + 1e-9))
        exact = True
    else:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        unit = capacity / resolution if capacity > 0 else 1.0
        w = np.where(finite, np.ceil(c / unit - 1e-9), 0).astype(np.int64)
        cap = resolution
        exact = False
    G, O = c.shape
    M = min_flagged
    neg = -np.inf
    # best[m, k]: best value with exactly k cost units used and min(flagged so far, M) = m
    best = np.full((M + 1, cap + 1), neg)
    best[0, 0] = 0.0
    back_o = np.full((G, M + 1, cap + 1), -1, dtype=np.int32)
    back_m = np.zeros((G, M + 1, cap + 1), dtype=np.int16)
    levels = np.arange(M + 1)
    for g in range(G):
        new = np.full_like(best, neg)
        arg_o = np.full((M + 1, cap + 1), -1, dtype=np.int32)
        arg_m = np.zeros((M + 1, cap + 1), dtype=np.int16)
        for o in range(O):
            if not finite[g, o] or w[g, o] > cap:
                continue
            shift = int(w[g, o])
            sources = [levels]  # target level m comes from source level m ...
            if f is not None and f[g, o] and M:  # ... or, for a flagged option, from m - 1 (and M from M)
                sources = [np.maximum(levels - 1, 0), np.full(M + 1, M)]
            for src_m in sources:
                src = best[src_m, : cap + 1 - shift] + v[g, o]
                if f is not None and f[g, o] and M and src_m is sources[0]:
                    src[0] = neg  # level 0 cannot be reached by taking a flagged option
                region = new[:, shift:]
                better = src > region
                region[better] = src[better]
                arg_o[:, shift:][better] = o
                arg_m[:, shift:][better] = np.broadcast_to(src_m[:, None], better.shape)[better]
        best, back_o[g], back_m[g] = new, arg_o, arg_m
    if not np.isfinite(best[M]).any():
        raise InfeasibleBudget("no choice fits the budget with the constraints (dp on rounded costs; "
                               "try method='milp')")
    k = int(np.argmax(best[M]))
    m = M
    choice = [0] * G
    for g in range(G - 1, -1, -1):
        o = int(back_o[g, m, k])
        choice[g] = o
        m, k = int(back_m[g, m, k]), k - int(w[g, o])
    cost, value = _totals(c, v, choice)
    return Solution(choice, cost, value, capacity, "dp", exact)


def _milp(c: np.ndarray, v: np.ndarray, capacity: float, f: np.ndarray | None, min_flagged: int,
          linked: list[list[tuple[int, int]]] | None = None) -> Solution:
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import csr_matrix
    except ImportError:
        raise ImportError("solver 'milp' needs scipy: pip install 'spattn[planner]'") from None
    G, O = c.shape
    finite = np.isfinite(c)
    cols = np.flatnonzero(finite.ravel())  # variables: allowed (group, option) pairs
    groups = cols // O
    n = cols.size
    cost = c.ravel()[cols]
    obj = -v.ravel()[cols]
    rows = [csr_matrix((np.ones(n), (groups, np.arange(n))), shape=(G, n))]
    lo, hi = [np.ones(G)], [np.ones(G)]
    rows.append(csr_matrix(cost[None]))
    lo.append(np.array([-np.inf]))
    hi.append(np.array([capacity]))
    if f is not None and min_flagged:
        rows.append(csr_matrix(f.ravel()[cols].astype(np.float64)[None]))
        lo.append(np.array([float(min_flagged)]))
        hi.append(np.array([np.inf]))
    var_of = {int(col): n for n, col in enumerate(cols)}
    for members in linked or ():  # x[first] - x[other] = 0 for each other member
        allowed = [var_of[g * O + o] for g, o in members if g * O + o in var_of]
        if len(allowed) < len(members):
            continue  # a forbidden member: the set's costs were set to inf before, so none is a variable
        first = allowed[0]
        for other in allowed[1:]:
            rows.append(csr_matrix(([1.0, -1.0], ([0, 0], [first, other])), shape=(1, n)))
            lo.append(np.array([0.0]))
            hi.append(np.array([0.0]))
    from scipy.sparse import vstack

    A = vstack(rows).tocsr()
    res = milp(obj, constraints=LinearConstraint(A, np.concatenate(lo), np.concatenate(hi)),
               integrality=np.ones(n), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise InfeasibleBudget(f"no choice fits the budget with the constraints (milp: {res.message})")
    x = np.round(res.x).astype(bool)
    choice = [0] * G
    for var in np.flatnonzero(x):
        choice[int(groups[var])] = int(cols[var] % O)
    total, value = _totals(c, v, choice)
    if total > capacity * (1 + 1e-9) + 1e-9:  # pragma: no cover - HiGHS feasibility tolerance
        raise RuntimeError(f"milp returned a choice costing {total} > capacity {capacity}")
    return Solution(choice, total, value, capacity, "milp", True)


def sweep(costs, values, capacities: Sequence[float], **kwargs) -> list[Solution]:
    """:func:`solve` at each capacity (ascending); capacities below the cheapest choice are skipped.
    The answers trace the Pareto front of total value against total cost."""
    out = []
    for cap in sorted(float(x) for x in capacities):
        try:
            out.append(solve(costs, values, cap, **kwargs))
        except InfeasibleBudget:
            continue
    return out
