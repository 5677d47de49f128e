"""Cost models: analytic FLOPs from the visited tiles, and a measured latency table cached on disk.

The latency of a candidate is the median time of one ``spattn.attention`` call for a whole layer (every head
using the candidate) on random inputs of the model's shape, on the target device and backend, the candidates
timed round-robin (interleaved) after one warm-up call each; a head's share
is that time divided by the head count (a layer of mixed heads runs one kernel over per-head tables, so its
time is about the sum of the shares; the planner's validation measures the real mixed layer to check).
Static layouts are compiled outside the timed call (a deployed model reuses them); dynamic candidates are
timed with their selection, which runs on every input.

The table is a JSON file keyed by (pattern, length, heads, key heads, head dim, block size, causal, dtype,
device name, backend, torch version): built once per configuration, reused by later plans.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spattn.ops.attention import attention
from spattn.patterns import Hierarchical, Pattern
from spattn.patterns import compile as compile_pattern


def device_name(device: torch.device) -> str:
    """A stable name of the device for cache keys (the GPU model, or the CPU's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu:{platform.processor() or platform.machine()}:{os.cpu_count()}cores"


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall milliseconds of one ``fn()`` call, synchronised before and after on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after one warm-up call."""
    _timed(fn, device)
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def default_path() -> Path:
    """``$SPATTN_CACHE/planner/latency.json`` (default ``~/.cache/spattn/planner/latency.json``)."""
    from spattn.data.cache import cache_dir

    return cache_dir() / "planner" / "latency.json"


class LatencyTable:
    """Measured attention latency per (pattern, shape, device, backend), cached in a JSON file.

    Args:
        path: the cache file (default :func:`default_path`); ``None`` keeps the table in memory only.
        device: where to time (default CUDA when available, else CPU).
        backend: the ``spattn.attention`` backend to time (``"auto"``: what a patched model runs).
        repeats: timed calls per entry (median reported).
        dtype: dtype of the random inputs (default float16 on CUDA, float32 on CPU).

    Example:
        >>> table = LatencyTable(None, device="cpu", repeats=1)
        >>> ms = table.layer_ms(spattn.Sinks(4) | spattn.Window(64), 256, heads=2, kv_heads=1, head_dim=16)
    """

    def __init__(self, path: str | os.PathLike | None | bool = True, *, device: torch.device | str | None = None,
                 backend: str = "auto", repeats: int = 5, dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.path = default_path() if path is True else (Path(path) if path else None)
        self.backend = backend
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        self.repeats = repeats
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.entries: dict[str, dict[str, Any]] = {}
        self.measured = 0  # entries timed by this object (the rest came from the cache file)
        if self.path is not None and self.path.is_file():
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != "spattn.latency/1":
                raise ValueError(f"{self.path} is not a spattn latency table (format spattn.latency/1)")
            self.entries = dict(data.get("entries", {}))

    def _key(self, pattern: Pattern, length: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
             causal: bool) -> str:
        return json.dumps({"pattern": pattern.to_dict(), "length": length, "heads": heads, "kv_heads": kv_heads,
                           "head_dim": head_dim, "block_size": block_size, "causal": causal,
                           "dtype": str(self.dtype), "device": device_name(self.device), "backend": self.backend,
                           "torch": torch.__version__}, sort_keys=True)

    def layer_ms(self, pattern: Pattern, length: int, *, heads: int, kv_heads: int, head_dim: int,
                 block_size: int = 64, causal: bool = True) -> float:
        """Median milliseconds of one attention call of a layer whose every head uses ``pattern``."""
        return self.measure([pattern], length, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                            block_size=block_size, causal=causal)[0]

    def measure(self, patterns: list[Pattern], length: int, *, heads: int, kv_heads: int, head_dim: int,
                block_size: int = 64, causal: bool = True) -> list[float]:
        """Median milliseconds of one layer's attention call per pattern (every head using it), interleaved.

        The patterns not yet in the table are warmed up once each (JIT, layout compile), then timed in
        ``repeats`` rounds that call every pattern once (round-robin), so that clock and thermal drift over
        the build spreads over all candidates instead of favouring the ones timed first. Inputs are random
        ``[1, heads, length, head_dim]`` queries and ``[1, kv_heads, length, head_dim]`` keys and values.
        Returns one time per pattern, in order (cached entries are not re-timed).
        """
        keys = [self._key(p, length, heads, kv_heads, head_dim, block_size, causal) for p in patterns]
        todo = [i for i, key in enumerate(keys) if key not in self.entries]
        seen: dict[str, int] = {}
        runs: dict[int, Callable[[], Any]] = {}
        if todo:
            gen = torch.Generator(device="cpu").manual_seed(0)
            q = torch.randn(1, heads, length, head_dim, generator=gen).to(self.device, self.dtype)
            k = torch.randn(1, kv_heads, length, head_dim, generator=gen).to(self.device, self.dtype)
            v = torch.randn(1, kv_heads, length, head_dim, generator=gen).to(self.device, self.dtype)
            for i in todo:
                if keys[i] in seen:  # the same pattern twice in the list: time it once
                    continue
                seen[keys[i]] = i
                runs[i] = self._runner(patterns[i], q, k, v, length, block_size, causal)
        samples: dict[int, list[float]] = {i: [] for i in runs}
        with torch.no_grad():
            for run in runs.values():  # warm-up: JIT and caches, outside the timing
                run()
            for _ in range(self.repeats):
                for i, run in runs.items():
                    samples[i].append(_timed(run, self.device))
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for i, times in samples.items():
            self.entries[keys[i]] = {"ms": statistics.median(times), "repeats": self.repeats, "interleaved": True,
                                     "measured": stamp}
            self.measured += 1
        return [float(self.entries[key]["ms"]) for key in keys]

    def _runner(self, pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
                block_size: int, causal: bool) -> Callable[[], Any]:
        """One layer's attention call with ``pattern`` (static layouts compiled here, outside the timing;
        dynamic selection inside it, as a deployed model runs it; ``Hierarchical``: its whole attention)."""
        if isinstance(pattern, Hierarchical):
            from spattn.hierarchical import hierarchical_attention

            return lambda: hierarchical_attention(q, k, v, pattern, backend=self.backend)
        if pattern.contains_dynamic():
            return lambda: attention(q, k, v, pattern, causal=causal, backend=self.backend, block_size=block_size)
        layout = compile_pattern(pattern, length, length, causal=causal, block_size=block_size, device=self.device)
        return lambda: attention(q, k, v, layout, causal=causal, backend=self.backend)

    def save(self) -> Path | None:
        """Write the table to its file (atomically); returns the path (None for an in-memory table)."""
        if self.path is None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": "spattn.latency/1", "entries": self.entries}, indent=1) + "\n")
        os.replace(tmp, self.path)
        return self.path
