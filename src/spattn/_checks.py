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


def check_bound(value: Any, name: str) -> int | None:
    """``value`` when it is ``None`` (unbounded) or an int ``>= 0`` (see :func:`check_int`)."""
    return None if value is None else check_int(value, name)


def check_bool(value: Any, name: str) -> bool:
    """``value`` when it is a bool (``True``/``False``, not ``"no"`` or ``0``).

    Raises:
        TypeError: naming ``name`` when ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
