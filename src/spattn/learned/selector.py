"""``gate``: a trained :class:`~spattn.learned.BlockGate` as a selector of the ``TopK`` / ``TopP`` patterns.

``TopK("gate", 4, options={"path": "gates.safetensors", "layer": 3})`` (or ``TopK(load(path, layer=3), 4)``)
scores blocks with the layer's gate and composes with safeguards like any built-in selector:
``Sinks(64) | Window(512) | Essential(flags=...) | TopK(load("gates.safetensors", layer=3), 8)``. The pattern
stays JSON (path and layer), so plans that use it round-trip.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import ClassVar

import torch

from spattn.learned.checkpoint import cached_gate, read_meta
from spattn.selectors.common import Selector, register_selector


@register_selector
@dataclasses.dataclass(frozen=True)
class Gate(Selector):
    """Block scores from a saved gate. Options: ``path`` (safetensors file from ``distill`` / ``save_gates``)
    and ``layer`` (default 0). The compile block size must equal the gate's ``block_size``."""

    path: str = ""
    layer: int = 0
    name: ClassVar[str] = "gate"

    def __post_init__(self):
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("the gate selector needs path= (a gate checkpoint written by spattn.learned.save_gates)")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {self.layer!r}")

    def _gate(self, query: torch.Tensor, block_size: int):
        gate = cached_gate(self.path, self.layer)
        if block_size != gate.block_size:
            raise ValueError(f"gate {self.path!r} layer {self.layer} was trained at block_size={gate.block_size}; "
                             f"compile with block_size={gate.block_size} (got {block_size})")
        return gate.to(query.device)

    def _check_length(self, key: torch.Tensor) -> None:
        """Warn when the keys reach past the positions the gate was distilled on (its scores read rotary
        queries and keys, so they do not carry over to unseen positions: ``docs/learned.md``)."""
        trained = _distilled_length(os.path.realpath(self.path), os.stat(self.path).st_mtime_ns)
        if trained and key.shape[-2] > trained:
            warnings.warn(f"gate {self.path!r} was distilled on {trained}-token chunks and is used on "
                          f"{key.shape[-2]} keys: beyond position {trained} its selection is not trained and "
                          "can be no better than a window; distil at the longest length you use",
                          stacklevel=3)

    def scores(self, query, key, *, block_size, causal=False, scale=None, allowed=None):
        gate = self._gate(query, block_size)
        self._check_length(key)
        with torch.no_grad():
            return gate(query, key, causal=causal, allowed=allowed).float()

    def reference(self, query, key, *, block_size, causal=False, scale=None):
        return self._gate(query, block_size).reference(query, key, causal=causal)


@functools.lru_cache(maxsize=8)
def _distilled_length(path: str, mtime_ns: int) -> int:
    """Chunk length saved in a checkpoint's notes by ``distill`` (0 when unknown), read once per file version."""
    length = read_meta(path).get("chunk_length", 0)
    return length if isinstance(length, int) and not isinstance(length, bool) else 0


def load(path: str | os.PathLike, layer: int = 0) -> Gate:
    """The ``gate`` selector of ``layer`` in a gate checkpoint (checked now, loaded once and cached).

    Example:
        >>> gate = spattn.learned.load("gates.safetensors", layer=3)  # doctest: +SKIP
        >>> pattern = Sinks(64) | Window(512) | TopK(gate, 8)  # doctest: +SKIP
    """
    selector = Gate(path=os.fspath(path), layer=layer)
    cached_gate(selector.path, layer)  # fail now, naming the file and layer, not at the first compile
    return selector


__all__ = ["Gate", "load"]
