"""Kernel configurations: built-in defaults plus a small autotuner whose choices are cached in memory and on
disk, keyed by (kernel, head dim, dtype, layout facts, GPU name); the layout facts (``_plan.facts``: block size,
density bucket, full/partial mix, GQA group, banded or not) come from the tables' shapes, not the pattern's name.

``SPATTN_TRITON_AUTOTUNE=0`` turns tuning off (defaults only); ``SPATTN_TRITON_CACHE`` moves the cache
file (default ``~/.cache/spattn/triton-configs.json``). Tuning never runs under CUDA graph capture or on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    persistent: bool = False  # forward only: one program per SM walking the heaviest-first order

    def fit(self, block_size: int) -> Config:
        return dataclasses.replace(self, block_m=min(self.block_m, block_size), block_n=min(self.block_n, block_size))


INTERPRETER = Config(64, 64, 4, 1)  # CPU interpreter: large tiles = fewer (slow) programs

# Note [defaults]: the configs used when tuning is off (``SPATTN_TRITON_AUTOTUNE=0``, every H200 run since
# session 4) or not allowed. Derived from what the tuner chose on the H200 in the committed runs
# (benchmarks/results/h200/kernels-v2*.json, kernels-v3.json "configs"; see benchmarks/NOTES-kernels.md):
# - fwd, bf16/fp16: 128x64, 8 warps, 3 stages on stored masks (every D128 key; D64 mixed/partial keys);
#   banded layouts (causal, sinks + window) with even lengths: 128x128 (the tuner's pick for the causal key
#   at D128 and for D64's banded key). D128 tails keep 128x64 (masked loads need more shared memory: 128x128
#   with 3 stages is at the 227 KB limit, and an out-of-resources retry is one more compile).
# - dq: D128 128x64 / 8 warps, D64 64x64 / 4 warps; dkdv: D128 64x128 / 8 warps, D64 64x64 / 4 warps (all 3
#   stages; the tuner's picks for every key).
# - bwd (the one-pass atomic backward, Note [atomic backward] in ``_backward.py``): the dkdv tiles (it walks
#   the same tables with the same accumulators) until an H200 run says otherwise (kernels_v6.py A/Bs them).
# - decode: 16x128, 4 warps, 3 stages (the tuner's pick for the head-shared keys at D128).
# - fp32 (IEEE products, tiles twice the bytes): 64x64; 2 stages above D 64 so the tiles fit.
_DEFAULTS: dict[tuple[str, bool], Config] = {  # (kernel, D <= 64), bf16 / fp16, stored masks
    ("fwd", True): Config(128, 64, 8, 3),
    ("fwd", False): Config(128, 64, 8, 3),
    ("dq", True): Config(64, 64, 4, 3),
    ("dq", False): Config(128, 64, 8, 3),
    ("dkdv", True): Config(64, 64, 4, 3),
    ("dkdv", False): Config(64, 128, 8, 3),
    ("decode", True): Config(16, 128, 4, 3),
    ("decode", False): Config(16, 128, 4, 3),
    ("bwd", True): Config(64, 64, 4, 3),
    ("bwd", False): Config(64, 128, 8, 3),
}
_FP32: dict[tuple[str, bool], Config] = {
    ("fwd", True): Config(64, 64, 8, 3),
    ("fwd", False): Config(64, 64, 8, 2),
    ("dq", True): Config(64, 64, 4, 3),
    ("dq", False): Config(64, 64, 8, 2),
    ("dkdv", True): Config(64, 64, 4, 3),
    ("dkdv", False): Config(64, 64, 8, 2),
    ("decode", True): Config(16, 64, 4, 3),
    ("decode", False): Config(16, 64, 4, 2),
    ("bwd", True): Config(64, 64, 4, 3),
    ("bwd", False): Config(64, 64, 8, 2),
}

_CANDIDATES: dict[str, list[Config]] = {
    "fwd": [
        Config(128, 64, 8, 3), Config(128, 64, 8, 4), Config(128, 128, 8, 3), Config(128, 128, 8, 2),
        Config(128, 64, 8, 3, True), Config(128, 64, 8, 4, True),
    ],
    "dq": [Config(128, 64, 8, 3), Config(64, 64, 4, 3), Config(64, 128, 8, 2)],
    "dkdv": [Config(64, 128, 8, 3), Config(64, 64, 4, 3), Config(128, 64, 8, 2)],
    "bwd": [Config(64, 128, 8, 3), Config(64, 128, 8, 2), Config(64, 64, 4, 3), Config(32, 128, 4, 3)],
    "decode": [Config(16, 64, 4, 3), Config(16, 128, 4, 3), Config(16, 64, 4, 4), Config(16, 128, 8, 3)],
}

_memory: dict[str, Config] = {}
_loaded = False


def _cache_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SPATTN_TRITON_CACHE", "~/.cache/spattn/triton-configs.json")).expanduser()


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        data = json.loads(_cache_path().read_text())
        for key, cfg in data.items():
            _memory.setdefault(key, Config(**cfg))
    except (OSError, ValueError, TypeError):
        pass


def _save() -> None:
    try:
        path = _cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: dataclasses.asdict(v) for k, v in _memory.items()}, indent=1, sort_keys=True))
    except OSError:
        pass


@functools.cache
def _gpu_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


def cache_key(kernel: str, head_dim: int, dtype: torch.dtype, facts: str, device: torch.device) -> str:
    gpu = _gpu_name(device.index) if device.type == "cuda" else "cpu"
    return f"{kernel}|D{head_dim}|{str(dtype).removeprefix('torch.')}|{facts}|{gpu}"


def default(kernel: str, head_dim: int, dtype: torch.dtype | None = None, *, banded: bool = False,
            even: bool = True) -> Config:
    """The untuned config (Note [defaults]) for ``kernel`` ("fwd", "dq", "dkdv", "bwd", "decode") at this head dim and
    dtype (None: bf16 / fp16); ``banded``: the forward runs the closed-form masks (Note [band] in
    ``_forward.py``); ``even``: no key tail (lengths a multiple of the block size)."""
    small = head_dim <= 64
    if dtype == torch.float32:
        return _FP32[(kernel, small)]
    cfg = _DEFAULTS[(kernel, small)]
    if kernel == "fwd" and banded and (small or even) and not cfg.persistent:
        cfg = dataclasses.replace(cfg, block_n=max(cfg.block_n, 128))
    return cfg


def choose(
    kernel: str,
    head_dim: int,
    dtype: torch.dtype,
    facts: str,
    device: torch.device,
    block_size: int,
    bench: Callable[[Config], float] | None = None,
    pairs: int = 0,
    even: bool = True,
    banded: bool = False,
) -> Config:
    """The config for this key: cached, else tuned with ``bench(config) -> ms`` when allowed, else the default."""
    if device.type != "cuda":
        return INTERPRETER.fit(block_size)
    _load()
    # Note [length bucket]: short and long problems prefer different configs (measured: a config tuned at
    # L=4096 lost 25% at L=131072), so the key carries a coarse size bucket.
    bucket = "short" if pairs <= 1 << 26 else "long"
    # tails (lengths not a multiple of the tile) take masked loads, which need more shared memory: a
    # config tuned on even lengths can run out of it there, so they are tuned apart
    key = cache_key(kernel, head_dim, dtype, facts, device) + f"|bs{block_size}|{bucket}|{'even' if even else 'tail'}"
    if key in _memory:
        return _memory[key]
    allowed = os.environ.get("SPATTN_TRITON_AUTOTUNE", "1") != "0" and not torch.cuda.is_current_stream_capturing()
    if bench is None or not allowed:
        return default(kernel, head_dim, dtype, banded=banded, even=even).fit(block_size)
    seen: dict[Config, float] = {}
    for cfg in _CANDIDATES[kernel]:
        cfg = cfg.fit(block_size)
        if cfg in seen:
            continue
        try:
            seen[cfg] = bench(cfg)
        except Exception:  # noqa: BLE001 - a config that fails to compile (e.g. out of shared memory) is skipped
            seen[cfg] = float("inf")
    best = min(seen, key=seen.__getitem__)
    if seen[best] == float("inf"):
        best = default(kernel, head_dim, dtype, banded=banded, even=even).fit(block_size)
    _memory[key] = best
    _save()
    return best


def run_with_fallback(launch: Callable[[Config], None], cfg: Config) -> Config:
    """Launch with ``cfg``; on an out-of-resources error retry with fewer pipeline stages, then smaller tiles."""
    from triton.runtime.errors import OutOfResources

    try:
        launch(cfg)
        return cfg
    except OutOfResources:
        pass
    tries = [dataclasses.replace(cfg, num_stages=stages) for stages in range(cfg.num_stages - 1, 0, -1)]
    tries.append(dataclasses.replace(cfg, block_m=min(cfg.block_m, 64), block_n=min(cfg.block_n, 64), num_stages=2))
    for i, c in enumerate(tries):
        try:
            launch(c)
            return c
        except OutOfResources:
            if i == len(tries) - 1:
                raise
    return cfg


def chosen() -> dict[str, dict]:
    """Every cached choice (for benchmark records)."""
    _load()
    return {k: dataclasses.asdict(v) for k, v in _memory.items()}
