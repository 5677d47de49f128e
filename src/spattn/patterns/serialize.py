"""JSON round trip for patterns: ``pattern.to_dict()`` and ``pattern_from_dict(d)``."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch

from spattn.patterns.base import Pattern

_REGISTRY: dict[str, type[Pattern]] = {}
# kinds defined by higher layers, imported by name on first use (they register themselves when imported)
_DEFINED_IN = {"top_k": "spattn.selectors.patterns", "top_p": "spattn.selectors.patterns"}


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    """Make a Pattern subclass known to ``pattern_from_dict`` under its ``kind`` (usable as a decorator)."""
    kind = cls.kind
    if kind in _REGISTRY and _REGISTRY[kind] is not cls:
        raise ValueError(f"pattern kind {kind!r} is already registered by {_REGISTRY[kind].__name__}")
    _REGISTRY[kind] = cls
    return cls


def _encode(value: Any) -> Any:
    if isinstance(value, Pattern):
        return pattern_to_dict(value)
    if isinstance(value, torch.Tensor):
        return {"tensor": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    return value


def pattern_to_dict(pattern: Pattern) -> dict[str, Any]:
    out: dict[str, Any] = {"type": pattern.kind}
    for f in dataclasses.fields(pattern):
        out[f.name] = _encode(getattr(pattern, f.name))
    return out


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        if "type" in value:
            return pattern_from_dict(value, _where=where)
        if "tensor" in value:
            dtype = getattr(torch, str(value.get("dtype", "int64")), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{where}: unknown tensor dtype {value.get('dtype')!r}")
            try:
                return torch.tensor(value["tensor"], dtype=dtype)
            except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
                raise ValueError(f"{where}.tensor: not a {dtype} tensor: {exc}") from None
        raise ValueError(f"{where}: a dict must be a pattern (with 'type') or a tensor (with 'tensor')")
    if isinstance(value, list):
        return tuple(_decode(v, f"{where}[{k}]") for k, v in enumerate(value))
    return value


def pattern_from_dict(data: dict[str, Any], *, _where: str = "pattern") -> Pattern:
    """Rebuild a pattern from ``Pattern.to_dict()`` output. Raises ``ValueError`` naming the bad field."""
    if not isinstance(data, dict):
        raise TypeError(f"{_where} must be a dict, got {type(data).__name__}")
    if "type" not in data:
        raise ValueError(f"{_where} has no 'type' key; known types: {sorted({*_REGISTRY, *_DEFINED_IN})}")
    kind = data["type"]
    if not isinstance(kind, str):
        raise ValueError(f"{_where}.type must be a string (a pattern kind), got {type(kind).__name__} {kind!r}; "
                         f"known types: {sorted({*_REGISTRY, *_DEFINED_IN})}")
    if kind not in _REGISTRY and kind in _DEFINED_IN:
        importlib.import_module(_DEFINED_IN[kind])
    cls = _REGISTRY.get(kind)
    if cls is None:
        raise ValueError(f"{_where}: unknown pattern type {kind!r}; known types: {sorted({*_REGISTRY, *_DEFINED_IN})}")
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(data) - names - {"type"}
    if extra:
        raise ValueError(f"{_where}: unknown field(s) {sorted(extra)} for {cls.__name__}; expected {sorted(names)}")
    kwargs = {k: _decode(v, f"{_where}.{k}") for k, v in data.items() if k != "type"}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{_where}: cannot build {cls.__name__} from {sorted(kwargs)}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{_where}: {exc}") from exc
