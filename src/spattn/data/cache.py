"""Where spattn keeps downloaded corpora and converted models: ``$SPATTN_CACHE`` or ``~/.cache/spattn``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache root: ``path`` if given, else ``$SPATTN_CACHE``, else ``~/.cache/spattn`` (created on demand)."""
    if path is None:
        path = os.environ.get("SPATTN_CACHE") or Path.home() / ".cache" / "spattn"
    root = Path(path).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
