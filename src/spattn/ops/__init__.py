"""Operators. One folder per op: ``api.py`` validates and dispatches, ``impl/`` holds the backends."""

from spattn.ops.attention import attention, choose_backend

__all__ = ["attention", "choose_backend"]
