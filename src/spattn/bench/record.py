"""The one JSON record every benchmark suite returns: suite, machine (``env.machine_info``), config, rows,
plus suite-specific extras. ``write`` saves it and refuses to replace committed results unless asked."""

from __future__ import annotations

import json
import pathlib
import traceback
from collections.abc import Callable
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


def record_error(record: dict, error: BaseException) -> str:
    """A benchmark script's run broke: put ``error`` (type, message, traceback) into ``record["error"]``, print
    the traceback, and return the status ``"failed"`` (the partial record is still saved by :func:`finish`)."""
    record["error"] = {"type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
    print(traceback.format_exc(), flush=True)
    return "failed"


def finish(record: dict, path: str | pathlib.Path, status: str, seconds: float,
           save: Callable[[dict, Any], Any]) -> None:
    """The end of a benchmark script: ``status`` and ``seconds`` into ``record``, ``save(record, path)``, one
    line saying so; exit 1 (``SystemExit``) unless the status is ``"complete"``."""
    record["status"] = status
    record["seconds"] = round(seconds, 2)
    save(record, path)
    print("wrote", path, f"({record['seconds']:.0f} s, {status})")
    if status != "complete":
        raise SystemExit(1)
