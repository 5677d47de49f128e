"""``gate``: a trained :class:`~spattn.learned.BlockGate` as a selector of the ``TopK`` / ``TopP`` patterns.

``TopK("gate", 4, options={"path": "gates.safetensors", "layer": 3})`` (or ``TopK(load(path, layer=3), 4)``)
scores blocks with the layer's gate and composes with safeguards like any built-in selector:
``Sinks(64) | Window(512) | Essential(flags=...) | TopK(load("gates.safetensors", layer=3), 8)``. The pattern
stays JSON (path and layer), so plans that use it round-trip.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import torch

from spattn.learned.checkpoint import cached_gate
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

    def scores(self, query, key, *, block_size, causal=False, scale=None, allowed=None):
        gate = self._gate(query, block_size)
        with torch.no_grad():
            return gate(query, key, causal=causal, allowed=allowed).float()

    def reference(self, query, key, *, block_size, causal=False, scale=None):
        return self._gate(query, block_size).reference(query, key, causal=causal)


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
