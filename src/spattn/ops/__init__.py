"""Operators. One folder per op: ``api.py`` validates and dispatches, ``impl/`` holds the backends.

The public entry point is ``spattn.attention`` (``spattn.ops.attention.api.attention``)."""
