"""The argument checks shared by the whole package (imports nothing from spattn)."""

from __future__ import annotations

from typing import Any


def check_int(value: Any, name: str, minimum: int = 0) -> int:
    """``value`` when it is an int (not a bool) ``>= minimum``.

    Raises:
        TypeError: naming ``name`` when ``value`` is not an int.
        ValueError: naming ``name`` and ``minimum`` when it is smaller.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value
