"""Fetch Debian packages into a folder with ``apt-get download`` + ``dpkg-deb -x`` (no system install).

``apt-get update`` runs only when a download fails because the package lists are missing or stale; it
needs root (it is never run through sudo).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

_LIST_ERRORS = ("Unable to locate package", "has no installation candidate", "Failed to fetch", "404  Not Found")


class DebianFetchError(RuntimeError):
    """A Debian package could not be downloaded or unpacked."""


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _require_tools() -> None:
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise DebianFetchError(
            f"{' and '.join(missing)} not found: the offline corpora come from Debian packages, so this needs a "
            "Debian/Ubuntu system (or pass your own text file with --text PATH)"
        )


def download(packages: list[str], dest: Path) -> list[Path]:
    """Download the ``.deb`` files of ``packages`` into ``dest``; returns their paths."""
    _require_tools()
    dest.mkdir(parents=True, exist_ok=True)
    result = _run(["apt-get", "download", *packages], cwd=dest)
    if result.returncode != 0 and any(msg in result.stderr for msg in _LIST_ERRORS):
        if hasattr(os, "geteuid") and os.geteuid() != 0:
            raise DebianFetchError(
                f"apt-get download {' '.join(packages)} failed and the package lists need an update, which needs "
                f"root: run `apt-get update` as root, then retry.\n{result.stderr.strip()}"
            )
        update = _run(["apt-get", "update"])
        if update.returncode != 0:
            raise DebianFetchError(f"apt-get update failed:\n{update.stderr.strip()}")
        result = _run(["apt-get", "download", *packages], cwd=dest)
    if result.returncode != 0:
        raise DebianFetchError(f"apt-get download {' '.join(packages)} failed:\n{result.stderr.strip()}")
    debs = []
    for name in packages:
        found = sorted(dest.glob(f"{name}_*.deb"))
        if not found:
            raise DebianFetchError(f"apt-get download reported success but no {name}_*.deb is in {dest}")
        debs.append(found[-1])
    return debs


def fetch(packages: list[str], root: Path) -> dict[str, str]:
    """Download ``packages`` and unpack them all under ``root`` (``root/usr/...``); returns name -> .deb file name.

    Unpacking happens in a temporary folder that replaces ``root`` at the end, so an interrupted fetch
    leaves no half-filled tree.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        debs = download(packages, work / "debs")
        tree = work / "tree"
        for deb in debs:
            result = _run(["dpkg-deb", "-x", str(deb), str(tree)])
            if result.returncode != 0:
                raise DebianFetchError(f"dpkg-deb -x {deb.name} failed:\n{result.stderr.strip()}")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tree, root)
        return {name: deb.name for name, deb in zip(packages, debs, strict=True)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
