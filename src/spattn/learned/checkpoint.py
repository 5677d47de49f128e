"""Gate checkpoints: one safetensors file per model, JSON config and notes in its header. No pickles.

Layout: tensors ``layer.{i}.query_proj`` / ``layer.{i}.key_proj`` for each layer ``i``; header metadata
``format`` = ``spattn.gates/1``, ``config`` = JSON ``{layer: BlockGate.config()}``, ``meta`` = JSON notes
(model, training settings, metrics).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from spattn._optional import require
from spattn.learned.gate import BlockGate

FORMAT = "spattn.gates/1"
_CACHE: dict[tuple[str, int, int], dict[int, BlockGate]] = {}


def save_gates(path: str | os.PathLike, gates: Mapping[int, BlockGate], *, meta: Mapping[str, Any] | None = None
               ) -> Path:
    """Write ``{layer: BlockGate}`` to one safetensors file (parent folders created); returns the path."""
    st = require("safetensors.torch", extra="hf")
    if not gates:
        raise ValueError("gates must hold at least one {layer: BlockGate}")
    tensors, config = {}, {}
    for layer, gate in gates.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"gate layers must be ints >= 0, got {layer!r}")
        if not isinstance(gate, BlockGate):
            raise TypeError(f"gates[{layer}] must be a BlockGate, got {type(gate).__name__}")
        tensors[f"layer.{layer}.query_proj"] = gate.query_proj.detach().float().cpu().contiguous()
        tensors[f"layer.{layer}.key_proj"] = gate.key_proj.detach().float().cpu().contiguous()
        config[str(layer)] = gate.config()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "config": json.dumps(config), "meta": json.dumps(dict(meta or {}))}
    st.save_file(tensors, str(path), metadata=header)
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON notes saved with the gates (``meta=`` of :func:`save_gates`)."""
    return json.loads(_header(path).get("meta", "{}"))


def _header(path: str | os.PathLike) -> dict[str, str]:
    safe = require("safetensors", extra="hf")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gate checkpoint {str(path)!r} does not exist")
    with safe.safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a spattn gate checkpoint (format {header.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return header


def load_gates(path: str | os.PathLike, *, device: torch.device | str | None = None) -> dict[int, BlockGate]:
    """``{layer: BlockGate}`` from a file written by :func:`save_gates` (safetensors, never a pickle)."""
    st = require("safetensors.torch", extra="hf")
    header = _header(path)
    config = json.loads(header["config"])
    tensors = st.load_file(str(path), device="cpu")
    gates = {}
    for layer, cfg in sorted(config.items(), key=lambda kv: int(kv[0])):
        gate = BlockGate(cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], block_size=cfg["block_size"],
                         hidden=cfg["hidden"], qk_norm=cfg["qk_norm"])
        state = {"query_proj": tensors[f"layer.{layer}.query_proj"], "key_proj": tensors[f"layer.{layer}.key_proj"]}
        gate.load_state_dict(state)
        gate.requires_grad_(False)
        gates[int(layer)] = gate.to(device) if device is not None else gate
    return gates


def cached_gate(path: str, layer: int) -> BlockGate:
    """The gate of ``layer`` in ``path``, loaded once per file version (keyed by path, mtime and size)."""
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"gate checkpoint {str(path)!r} does not exist") from None
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        _CACHE.clear()  # one checkpoint in use at a time is the common case; keep memory bounded
        _CACHE[key] = load_gates(resolved)
    gates = _CACHE[key]
    if layer not in gates:
        raise ValueError(f"gate checkpoint {str(path)!r} has no layer {layer}; layers: {sorted(gates)}")
    return gates[layer]


__all__ = ["save_gates", "load_gates", "read_meta", "cached_gate", "FORMAT"]
