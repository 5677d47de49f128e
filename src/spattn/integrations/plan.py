"""``Plan``: which attention pattern each layer (and, through ``PerHead``, each head) of a model uses.

A plan is a small JSON-serialisable object. ``None`` as a pattern means full attention (the model's own
mask: causal for decoders, bidirectional for encoders), so ``Plan()`` is a drop-in dense plan.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spattn.patterns import Pattern, pattern_from_dict

_FORMAT = "spattn.plan/1"


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

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``Plan.from_dict`` inverts it)."""
        return {
            "format": _FORMAT,
            "default": None if self.default is None else self.default.to_dict(),
            "layers": {str(i): (None if p is None else p.to_dict()) for i, p in self.layers.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`to_dict` output; raises ``ValueError`` naming the bad field."""
        if not isinstance(data, Mapping):
            raise TypeError(f"plan data must be a dict, got {type(data).__name__}")
        fmt = data.get("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"plan format must be {_FORMAT!r}, got {fmt!r}")
        extra = set(data) - {"format", "default", "layers", "meta"}
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
        if not self.layers:
            return f"Plan.uniform({self.default!r})"
        return f"Plan(layers={self.layers!r}, default={self.default!r})"


def as_plan(plan: Plan | Pattern | None) -> Plan:
    """Accept a Plan, a single Pattern (used in every layer) or None (full attention)."""
    if plan is None:
        return Plan()
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Pattern):
        return Plan.uniform(plan)
    raise TypeError(f"plan must be a spattn.Plan, a Pattern or None, got {type(plan).__name__}")
