"""The output directory and the stage cache that lets an interrupted report resume.

Layout of an output directory::

    report.html  results.json  figures/*.png
    .spattn-report/state.json              {"digest": ..., "status": "running" | "done"}
    .spattn-report/<digest>/data.pt        calibration and held-out token chunks
    .spattn-report/<digest>/dense.json     dense perplexity sums
    .spattn-report/<digest>/candidates/<id>.json   one finished candidate each

A directory is reused without ``--overwrite`` only when it is empty or holds an unfinished run of the same
configuration (then finished stages are read back). ``--overwrite`` removes the previous report's files
(only the ones a report writes, and only in a folder that holds a report's ``state.json``) and keeps cached
stages of the same configuration. A non-empty folder that was never a report is refused untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

STATE_DIR = ".spattn-report"
OUTPUTS = ("report.html", "results.json", "figures")


class OutputExistsError(FileExistsError):
    """The output directory holds something else; the message says how to proceed."""


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


class StageCache:
    """Cached stage outputs under ``<output>/.spattn-report/<digest>/``."""

    def __init__(self, output: Path, digest: str, *, overwrite: bool, fresh: bool = False) -> None:
        self.output = Path(output)
        self.digest = digest
        self.resumed = False
        self.created = not self.output.exists()
        state_path = self.output / STATE_DIR / "state.json"
        if self.output.exists() and not self.output.is_dir():
            raise OutputExistsError(f"output path {self.output} exists and is not a directory")
        if self.output.is_dir() and any(self.output.iterdir()):
            state = None
            if state_path.is_file():
                try:
                    state = json.loads(state_path.read_text())
                except ValueError:
                    state = None
            unfinished_same = state is not None and state.get("digest") == digest and state.get("status") == "running"
            if unfinished_same:
                self.resumed = True
            elif not state_path.is_file():
                raise OutputExistsError(
                    f"output directory {self.output} is not empty and was never a spattn report (no "
                    f"{STATE_DIR}/state.json): spattn deletes nothing there, with or without --overwrite; choose "
                    "another --output"
                )
            elif not overwrite:
                raise OutputExistsError(
                    f"output directory {self.output} already exists and is not an unfinished run of this "
                    "configuration; pass --overwrite to replace the report there, or choose another --output"
                )
            else:
                for name in OUTPUTS:
                    p = self.output / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
                root = self.output / STATE_DIR
                if root.is_dir():
                    for child in root.iterdir():
                        if child.is_dir() and (fresh or child.name != digest):
                            shutil.rmtree(child)
                self.resumed = (root / digest).is_dir()
        self.root = self.output / STATE_DIR / digest
        (self.root / "candidates").mkdir(parents=True, exist_ok=True)
        _write_json(state_path, {"digest": digest, "status": "running"})

    def discard(self) -> None:
        """Remove an output directory this run created (used when it fails before computing anything)."""
        if self.created and self.output.is_dir():
            shutil.rmtree(self.output)

    def finish(self) -> None:
        _write_json(self.output / STATE_DIR / "state.json", {"digest": self.digest, "status": "done"})

    # JSON stages
    def get(self, name: str) -> Any | None:
        path = self.root / f"{name}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None  # a torn write from an interrupted run: recompute

    def put(self, name: str, data: Any) -> None:
        _write_json(self.root / f"{name}.json", data)

    def candidate_path(self, cid: str) -> str:
        safe = "".join(ch if ch.isalnum() or ch in "._-@" else "_" for ch in cid)
        return f"candidates/{safe}"
