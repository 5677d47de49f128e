"""Coverage of hierarchical attention against dense attention.

Recall of the gate mix is defined on the keys read **at full resolution**: the dense attention mass of each
query on the union of its selected-branch keys (selected blocks and safeguard) and its window keys. The
compressed branch reads summaries, not keys, and is not counted (it is a lower bound on what the mix sees).
"""

from __future__ import annotations

import math

import torch

from spattn.coverage import measure
from spattn.hierarchical.attention import branch_layouts
from spattn.layout import Layout
from spattn.patterns import BlockLayout, Hierarchical, compile


def fine_layout_and_chosen(query: torch.Tensor, key: torch.Tensor, config: Hierarchical, *,
                           scale: float | None = None,
                           pool_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
                           block_size: int | None = None) -> tuple[Layout, torch.Tensor]:
    """:func:`fine_layout` and the selection it holds (``chosen`` bool ``[B, Hkv, NQ, NQ]``); ``block_size``
    (default ``select_block``): the block size the Layout is compiled at (the same token pairs at any size)."""
    B, H, L, _ = query.shape
    chosen = branch_layouts(query, key, config, scale=scale, pool_logits=pool_logits)["chosen"]
    pattern = BlockLayout(chosen.repeat_interleave(H // key.shape[1], 1), block=config.select_block) | \
        config.window_pattern()
    if config.safeguard is not None:
        pattern = config.safeguard | pattern
    layout = compile(pattern, L, L, causal=True, block_size=block_size or config.select_block, batch=B, heads=H,
                     device=query.device)
    return layout, chosen


def fine_layout(query: torch.Tensor, key: torch.Tensor, config: Hierarchical, *, scale: float | None = None,
                pool_logits: tuple[torch.Tensor, torch.Tensor] | None = None) -> Layout:
    """The Layout of the keys read at full resolution (selected | safeguard | window) for query ``[B, H, L, D]``
    and key ``[B, Hkv, L, D]``, compiled causal at ``select_block``."""
    return fine_layout_and_chosen(query, key, config, scale=scale, pool_logits=pool_logits)[0]


def coverage(query: torch.Tensor, key: torch.Tensor, config: Hierarchical, *, value: torch.Tensor | None = None,
             scale: float | None = None, **options):
    """``spattn.coverage.measure`` of :func:`fine_layout` against causal dense attention (a
    ``CoverageReport``; ``options`` go to ``measure``)."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    layout = fine_layout(query, key, config, scale=scale)
    return measure(query, key, layout, value=value, causal=True, scale=scale, **options)


__all__ = ["coverage", "fine_layout", "fine_layout_and_chosen"]
