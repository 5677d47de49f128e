"""Lazy imports of optional extras, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message says which ``pip install 'spattn[extra]'`` fixes it."""


def require(module: str, *, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{module.split('.')[0]} is needed here but not installed: pip install 'spattn[{extra}]'"
        ) from exc
