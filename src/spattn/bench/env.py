"""The one machine record every result JSON carries: machine, versions, git commit, and the rerun command.

Benchmarks, ``spattn report`` and ``spattn.eval`` all write :func:`machine_info`; nothing else builds one.
"""

from __future__ import annotations

import importlib
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_HERE, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """``SPATTN_GIT_COMMIT`` when set (a copy without ``.git``, e.g. a lent GPU machine), else HEAD of the spattn
    checkout this module runs from, or None outside a git checkout."""
    if os.environ.get("SPATTN_GIT_COMMIT"):
        return os.environ["SPATTN_GIT_COMMIT"]
    return _git("rev-parse", "HEAD") or None


def versions() -> dict[str, str | None]:
    """python, torch, spattn and the optional libraries that change results (None when not installed)."""
    import spattn

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "spattn": spattn.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    return out


def machine_info(device: str | torch.device | None = None) -> dict:
    """Where and with what a result was produced.

    Args:
        device: the device the run used (default: CUDA device 0 when present, else the CPU).

    Returns:
        A JSON-ready dict: platform, processor, cpu_count, load_average, torch_threads, device, cuda, the GPU's
        capability / SM count / memory when there is one, versions (also flattened as ``python`` / ``torch`` /
        ``triton`` keys), git_commit, git_dirty, command, timestamp.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vers = versions()
    status = None if os.environ.get("SPATTN_GIT_COMMIT") else _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cuda": torch.version.cuda,
        "versions": vers,
        "python": vers["python"],
        "torch": vers["torch"],
        "triton": vers["triton"],
        "git_commit": git_commit(),
        "git_dirty": None if status is None else status != "",
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_sms"] = props.multi_processor_count
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    return info
