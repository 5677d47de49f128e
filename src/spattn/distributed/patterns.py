"""What the distributed modes need to know about a pattern: its dynamic (input-aware) parts."""

from __future__ import annotations

import dataclasses

from spattn.patterns.base import Pattern


def dynamic_parts(pattern: Pattern) -> list[Pattern]:
    """The innermost dynamic patterns inside ``pattern`` (e.g. the ``TopP`` of ``Sinks(64) | TopP(...)``)."""
    if not pattern.contains_dynamic():
        return []
    children = []
    for field in dataclasses.fields(pattern):
        value = getattr(pattern, field.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        children.extend(v for v in values if isinstance(v, Pattern) and v.contains_dynamic())
    if not children:
        return [pattern]
    return [part for child in children for part in dynamic_parts(child)]
