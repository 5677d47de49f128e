"""Facts that every benchmark JSON carries: machine, versions, git commit, and the rerun command."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time

import torch


def git_commit() -> str | None:
    """``SPATTN_GIT_COMMIT`` when set (a copy without ``.git``, e.g. a lent GPU machine), else ``git rev-parse``."""
    if os.environ.get("SPATTN_GIT_COMMIT"):
        return os.environ["SPATTN_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """The one machine record of every benchmark JSON: platform, CPU, Python / torch / CUDA / triton versions,
    the GPU (name, compute capability, SM count) when there is one, git commit, command and UTC time."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "git_commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_sms"] = props.multi_processor_count
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
