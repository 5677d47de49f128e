"""``Plan``: which attention pattern each layer (and, through ``PerHead``, each head) of a model uses.

A plan is a small JSON-serialisable object. ``None`` as a pattern means full attention (the model's own
mask: causal for decoders, bidirectional for encoders), so ``Plan()`` is a drop-in dense plan.

A plan made by the planner (``spattn.plan``) also states its budget as a rule (:class:`BudgetRule`: a fraction of
the dense cost, keys per token, or milliseconds at a length) and names each head's choice with its measured cost
and score; :meth:`Plan.at_length` rescales the patterns so that the rule holds at another length.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spattn.patterns import (
    Budgeted,
    Dilated,
    Hierarchical,
    Intersection,
    Pattern,
    PerHead,
    RandomBlocks,
    Strided,
    Union,
    Window,
    pattern_from_dict,
)
from spattn.selectors import TopK

_FORMAT = "spattn.plan/1"
BUDGET_KINDS = ("fraction", "keys", "ms")


@dataclasses.dataclass(frozen=True)
class BudgetRule:
    """How a plan's budget is stated, so that it means the same thing at every length.

    Attributes:
        kind: ``"fraction"`` — a fraction of the dense (causal) attention cost: at another length the patterns
            grow with it (windows, key budgets and selected blocks scale by ``L / length``); ``"keys"`` — mean
            keys per query (per token): the patterns keep their absolute sizes and strided reach thins out, so
            the cost per token stays put; ``"ms"`` — attention milliseconds per forward at ``length`` on the
            device the plan was measured on: at another length it is carried as a per-token key budget (the
            latency then grows linearly in the length, not quadratically).
        value: the fraction in (0, 1], the keys per query (> 0) or the milliseconds (> 0).
        length: the calibration length the rule was planned at (tokens).
        cost: what the value counts: ``"flops"`` (visited tiles at ``block_size``, or allowed keys for
            ``kind="keys"``) or ``"latency"`` (the measured cost table).
        block_size: the block size of the cost model (deploy with ``spattn.patched(..., block_size=...)``).
    """

    kind: str
    value: float
    length: int
    cost: str = "flops"
    block_size: int = 64

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind must be one of {BUDGET_KINDS}, got {self.kind!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise TypeError(f"budget value must be a finite number, got {self.value!r}")
        if self.value <= 0 or (self.kind == "fraction" and self.value > 1):
            raise ValueError(
                f"budget value must be in (0, 1] for a fraction and > 0 for keys or ms, "
                f"got {self.value!r} ({self.kind})"
            )
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"budget length must be a positive int (tokens), got {self.length!r}")
        if self.cost not in ("flops", "latency"):
            raise ValueError(f"budget cost must be 'flops' or 'latency', got {self.cost!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"budget block_size must be a positive int, got {self.block_size!r}")
        object.__setattr__(self, "value", float(self.value))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BudgetRule:
        if not isinstance(data, Mapping):
            raise ValueError(f"plan.budget must be an object, got {type(data).__name__}")
        extra = set(data) - {f.name for f in dataclasses.fields(cls)}
        if extra:
            raise ValueError(f"plan.budget has unknown field(s) {sorted(extra)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"plan.budget: {err}") from None

    def __str__(self) -> str:
        unit = {"fraction": "of the dense cost", "keys": "keys per query", "ms": "ms per forward"}[self.kind]
        return f"{self.value:g} {unit} at {self.length} tokens ({self.cost}, blocks of {self.block_size})"


def _scaled(value: int, ratio: float, minimum: int = 0) -> int:
    return max(minimum, int(round(value * ratio)))


def scale_pattern(pattern: Pattern, ratio: float, kind: str) -> Pattern:
    """``pattern`` (planned at length ``L0``) rescaled for length ``ratio * L0`` under a budget rule ``kind``.

    ``"fraction"``: sizes measured in tokens or blocks grow with the length (``Window.left``, ``Dilated.left``,
    ``Budgeted.keys_per_query``, ``RandomBlocks.per_row``, ``TopK.blocks``); strides, sinks and mass targets are
    kept (their share of the keys is already length-free). ``"keys"`` / ``"ms"``: absolute sizes are kept and
    ``Strided.stride`` grows with the length, so that strided reach costs the same keys per query.
    Dynamic ``TopP`` keeps its mass target under every rule (its cost follows the input, not the rule).
    ``Hierarchical`` (Note [hierarchical at another length]): under ``"fraction"`` its chosen blocks
    (``select_count - 1``, the own block kept) and its window grow with the length and its safeguard is rescaled;
    the compressed tokens (``L / compress_stride``) already grow with it. Under ``"keys"`` / ``"ms"`` the
    selection and window are kept and ``compress_stride`` (and ``compress_block``, in proportion) grows with the
    length, so that the compressed tokens per query stay the same.
    """
    if kind not in BUDGET_KINDS:
        raise ValueError(f"kind must be one of {BUDGET_KINDS}, got {kind!r}")
    if ratio == 1:
        return pattern
    if isinstance(pattern, (Union, Intersection)):
        return type(pattern)(tuple(scale_pattern(p, ratio, kind) for p in pattern.parts))
    if isinstance(pattern, PerHead):
        return PerHead(tuple(scale_pattern(p, ratio, kind) for p in pattern.patterns))
    if isinstance(pattern, Hierarchical):  # Note [hierarchical at another length]
        guard = None if pattern.safeguard is None else scale_pattern(pattern.safeguard, ratio, kind)
        if kind == "fraction":
            return dataclasses.replace(pattern, select_count=1 + _scaled(pattern.select_count - 1, ratio),
                                       window=pattern.window if pattern.window <= 1 else _scaled(pattern.window, ratio, 1),
                                       safeguard=guard)
        stride = max(1, math.ceil(pattern.compress_stride * ratio))
        block = max(stride, math.ceil(pattern.compress_block * stride / pattern.compress_stride))
        return dataclasses.replace(pattern, compress_stride=stride, compress_block=block, safeguard=guard)
    if kind == "fraction":
        if isinstance(pattern, Window):
            return Window(_scaled(pattern.left, ratio), _scaled(pattern.right, ratio))
        if isinstance(pattern, Dilated):
            return dataclasses.replace(pattern, left=_scaled(pattern.left, ratio), right=_scaled(pattern.right, ratio))
        if isinstance(pattern, Budgeted):
            return dataclasses.replace(pattern, keys_per_query=_scaled(pattern.keys_per_query, ratio, 1))
        if isinstance(pattern, RandomBlocks):
            return dataclasses.replace(pattern, per_row=_scaled(pattern.per_row, ratio))
        if isinstance(pattern, TopK) and isinstance(pattern.blocks, int):
            return dataclasses.replace(pattern, blocks=_scaled(pattern.blocks, ratio))
        return pattern
    if isinstance(pattern, Strided):
        return dataclasses.replace(pattern, stride=max(1, math.ceil(pattern.stride * ratio)))
    return pattern


def _check_pattern(value: Any, where: str) -> Pattern | None:
    if value is not None and not isinstance(value, Pattern):
        raise TypeError(f"{where} must be a spattn Pattern or None (full attention), got {type(value).__name__}")
    return value


class Plan:
    """Patterns per layer: ``layers[i]`` for layer ``i``, ``default`` for every other layer.

    Args:
        layers: mapping from layer index (int >= 0) to a :class:`~spattn.Pattern`, or ``None`` for full
            attention in that layer. Use ``spattn.PerHead([...])`` for a different pattern per query head.
        default: pattern for layers not in ``layers`` (``None``: full attention).
        meta: free-form JSON-serialisable notes (who made the plan, budget, scores...).
        budget: the :class:`BudgetRule` the plan was made under (planner plans), used by :meth:`at_length`.
        heads: what the planner chose, per layer and head: ``{layer: [{"choice": ..., "family": ..., "cost": ...,
            "score": ...}, ...]}`` (JSON-ready dicts; informative, not needed to apply the plan).

    Example:
        >>> import spattn
        >>> plan = spattn.Plan(layers={0: None}, default=spattn.Sinks(64) | spattn.Window(256))
        >>> plan.pattern_for(0) is None, plan.pattern_for(5) == spattn.Sinks(64) | spattn.Window(256)
        (True, True)
        >>> spattn.Plan.from_json(plan.to_json()) == plan
        True
    """

    def __init__(
        self,
        layers: Mapping[int, Pattern | None] | None = None,
        default: Pattern | None = None,
        *,
        meta: Mapping[str, Any] | None = None,
        budget: BudgetRule | None = None,
        heads: Mapping[int, list[dict[str, Any]]] | None = None,
    ) -> None:
        if layers is None:
            layers = {}
        if not isinstance(layers, Mapping):
            raise TypeError(f"layers must be a mapping {{layer index: pattern}}, got {type(layers).__name__}")
        checked: dict[int, Pattern | None] = {}
        for index, pattern in layers.items():
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(f"layers keys must be int layer indices, got {index!r}")
            if index < 0:
                raise ValueError(f"layers keys must be >= 0, got {index}")
            checked[index] = _check_pattern(pattern, f"layers[{index}]")
        self.layers: dict[int, Pattern | None] = dict(sorted(checked.items()))
        self.default: Pattern | None = _check_pattern(default, "default")
        self.meta: dict[str, Any] = dict(meta or {})
        if budget is not None and not isinstance(budget, BudgetRule):
            raise TypeError(f"budget must be a spattn BudgetRule or None, got {type(budget).__name__}")
        self.budget: BudgetRule | None = budget
        if heads is not None and not isinstance(heads, Mapping):
            raise TypeError(f"heads must be a mapping {{layer index: [per-head dicts]}}, got {type(heads).__name__}")
        self.heads: dict[int, list[dict[str, Any]]] = {int(i): list(v) for i, v in sorted((heads or {}).items())}

    @classmethod
    def uniform(cls, pattern: Pattern | None) -> Plan:
        """The same pattern in every layer (``None``: full attention everywhere)."""
        return cls(default=pattern)

    def pattern_for(self, layer: int) -> Pattern | None:
        """The pattern of layer ``layer`` (``None`` = full attention)."""
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        return self.layers.get(layer, self.default)

    def is_dense(self) -> bool:
        """True when every layer uses full attention."""
        return self.default is None and all(p is None for p in self.layers.values())

    def at_length(self, length: int) -> Plan:
        """The plan for sequences of ``length`` tokens, keeping the stated budget rule (:class:`BudgetRule`).

        A ``"fraction"`` plan grows its windows and key budgets with the length, so its share of the dense cost
        stays about the same; a ``"keys"`` (or ``"ms"``) plan keeps its absolute sizes and thins its strided
        reach, so the keys per query stay about the same. The result states the same rule; compile a layer
        with ``spattn.compile(plan.pattern_for(i), length, causal=True, block_size=plan.budget.block_size,
        heads=H)``. A plan with no rule (hand-written) raises ``ValueError``.

        Example:
            >>> import spattn
            >>> rule = spattn.BudgetRule("fraction", 0.25, length=1024)
            >>> plan = spattn.Plan(default=spattn.Sinks(4) | spattn.Window(200), budget=rule)
            >>> plan.at_length(4096).default == spattn.Sinks(4) | spattn.Window(800)
            True
        """
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int (tokens), got {length!r}")
        if self.budget is None:
            raise ValueError("this plan states no budget rule (Plan(budget=BudgetRule(...))): nothing to keep")
        ratio = length / self.budget.length
        kind = self.budget.kind

        def scale(p: Pattern | None) -> Pattern | None:
            return None if p is None else scale_pattern(p, ratio, kind)

        meta = dict(self.meta)
        meta["length"] = length
        return Plan(layers={i: scale(p) for i, p in self.layers.items()}, default=scale(self.default), meta=meta,
                    budget=self.budget, heads=self.heads)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``Plan.from_dict`` inverts it)."""
        out = {
            "format": _FORMAT,
            "default": None if self.default is None else self.default.to_dict(),
            "layers": {str(i): (None if p is None else p.to_dict()) for i, p in self.layers.items()},
            "meta": self.meta,
        }
        if self.budget is not None:
            out["budget"] = self.budget.to_dict()
        if self.heads:
            out["heads"] = {str(i): v for i, v in self.heads.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`to_dict` output; raises ``ValueError`` naming the bad field."""
        if not isinstance(data, Mapping):
            raise TypeError(f"plan data must be a dict, got {type(data).__name__}")
        fmt = data.get("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"plan format must be {_FORMAT!r}, got {fmt!r}")
        extra = set(data) - {"format", "default", "layers", "meta", "budget", "heads"}
        if extra:
            raise ValueError(f"plan has unknown field(s) {sorted(extra)}")
        default = data.get("default")
        layers_raw = data.get("layers") or {}
        if not isinstance(layers_raw, Mapping):
            raise ValueError("plan.layers must be an object {layer index: pattern}")
        layers: dict[int, Pattern | None] = {}
        for key, value in layers_raw.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"plan.layers key {key!r} is not a layer index") from None
            layers[index] = None if value is None else pattern_from_dict(value, _where=f"plan.layers[{key}]")
        return cls(
            layers=layers,
            default=None if default is None else pattern_from_dict(default, _where="plan.default"),
            meta=data.get("meta") or {},
            budget=None if data.get("budget") is None else BudgetRule.from_dict(data["budget"]),
            heads=_heads_from_dict(data.get("heads")),
        )

    def to_json(self, **kwargs: Any) -> str:
        """The plan as a JSON string (keyword arguments go to ``json.dumps``)."""
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON to ``path``; returns the path."""
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file not found: {path}")
        return cls.from_json(path.read_text())

    # ------------------------------------------------------------------ comparison / display
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable container

    def __repr__(self) -> str:
        if not self.layers and self.budget is None:
            return f"Plan.uniform({self.default!r})"
        if self.budget is not None:
            return f"Plan({len(self.layers)} layers planned, default={self.default!r}, budget: {self.budget})"
        return f"Plan(layers={self.layers!r}, default={self.default!r})"


def _heads_from_dict(raw: Any) -> dict[int, list[dict[str, Any]]] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError("plan.heads must be an object {layer index: [per-head choices]}")
    out: dict[int, list[dict[str, Any]]] = {}
    for key, value in raw.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"plan.heads key {key!r} is not a layer index") from None
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise ValueError(f"plan.heads[{key}] must be a list of objects, one per head")
        out[index] = [dict(v) for v in value]
    return out


def as_plan(plan: Plan | Pattern | None) -> Plan:
    """Accept a Plan, a single Pattern (used in every layer) or None (full attention)."""
    if plan is None:
        return Plan()
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Pattern):
        return Plan.uniform(plan)
    raise TypeError(f"plan must be a spattn.Plan, a Pattern or None, got {type(plan).__name__}")
