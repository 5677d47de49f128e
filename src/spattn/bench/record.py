"""The one JSON record every benchmark suite returns: suite, machine (``env.machine_info``), config, rows,
plus suite-specific extras. ``write`` saves it and refuses to replace committed results unless asked."""

from __future__ import annotations

import json
import pathlib
import traceback
from typing import Any

from spattn.bench.env import machine_info

COMMITTED = pathlib.Path("benchmarks") / "results"


def failed(row: dict, exc: Exception) -> dict:
    """Mark a benchmark ``row`` failed with the error and the end of its traceback (the run goes on)."""
    row.update(ok=False, error=repr(exc)[:800], trace=traceback.format_exc()[-3000:])
    return row


def make(suite: str, config: dict, rows: list[dict], **extra: Any) -> dict:
    """``{"suite", "machine", "config", "rows", **extra}``."""
    return {"suite": suite, "machine": machine_info(), "config": config, "rows": rows, **extra}


def write(record: dict, path: str | pathlib.Path, *, overwrite: bool = False) -> pathlib.Path:
    """Write ``record`` as JSON; an existing file under ``benchmarks/results/`` is replaced only with
    ``overwrite=True`` (ValueError otherwise). Returns the path written."""
    path = pathlib.Path(path)
    resolved = path.resolve()
    committed = any(parent.parts[-2:] == COMMITTED.parts for parent in resolved.parents)
    if committed and path.exists() and not overwrite:
        raise ValueError(f"{path} holds committed results; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str))
    return path
