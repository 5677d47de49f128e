"""Budget rules: from block scores ``[B, H, NQ, NK]`` to a bool selection of key blocks per query block.

Both rules only spend budget on ``available`` blocks (visible and not already kept by the safeguards) and
run on the device with no host synchronisation (shapes depend on Python integers only).

* :func:`top_k` — the ``blocks`` highest-scoring available blocks of each query block.
* :func:`top_p` — the fewest available blocks whose scores, added to the mass already kept, reach ``mass``
  times the row total (cumulative threshold; minimal because blocks are taken in decreasing score order).
* :func:`top_keys` — one budget of (query, key) pairs for all heads and query blocks, spent greedily on the
  best estimated mass per key.

``min_blocks`` / ``max_blocks`` clamp the number chosen per query block. Any budget argument may be a
Python number (every head) or a sequence with one value per head (``Hs`` heads of the scores).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Budget = int | float | Sequence[int] | Sequence[float]


def per_head(value: Budget | None, heads: int, device, dtype, name: str) -> torch.Tensor | float | None:
    """A budget as a scalar or a ``[1, Hs, 1, 1]`` tensor (one value per head)."""
    if value is None or isinstance(value, (int, float)):
        return value
    values = list(value)
    if len(values) == 1:
        return values[0]
    if len(values) != heads:
        raise ValueError(f"{name} has {len(values)} per-head values but the selection has {heads} heads")
    return torch.tensor(values, device=device, dtype=dtype).view(1, heads, 1, 1)


def _ranked(scores: torch.Tensor, available: torch.Tensor):
    available = available.expand(scores.shape)
    masked = torch.where(available, scores, torch.full_like(scores, -1.0))
    ranked, order = masked.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(scores.shape[-1], device=scores.device)
    return ranked, order, rank, available.gather(-1, order)


def _clamp(keep, rank, min_blocks, max_blocks):
    if min_blocks is not None:
        keep = keep | (rank < min_blocks)
    if max_blocks is not None:
        keep = keep & (rank < max_blocks)
    return keep


def top_k(scores: torch.Tensor, available: torch.Tensor, blocks: Budget, *, min_blocks: Budget | None = None,
          max_blocks: Budget | None = None) -> torch.Tensor:
    """bool ``[B, H, NQ, NK]``: the ``blocks`` best available key blocks per query block."""
    H = scores.shape[1]
    k = per_head(blocks, H, scores.device, torch.long, "blocks")
    lo = per_head(min_blocks, H, scores.device, torch.long, "min_blocks")
    hi = per_head(max_blocks, H, scores.device, torch.long, "max_blocks")
    ranked, order, rank, avail = _ranked(scores, available)
    keep = _clamp(rank < k, rank, lo, hi) & avail
    return torch.zeros_like(keep).scatter(-1, order, keep)


def top_p(scores: torch.Tensor, available: torch.Tensor, mass: Budget, *, kept_mass: torch.Tensor | None = None,
          total: torch.Tensor | None = None, min_blocks: Budget | None = None,
          max_blocks: Budget | None = None) -> torch.Tensor:
    """bool ``[B, H, NQ, NK]``: the fewest available blocks with ``kept_mass + selected >= mass * total``.

    ``kept_mass`` ``[B, H, NQ]`` is the score already kept by the safeguards (default 0), ``total`` the row
    total (default 1, scores being shares of each row).
    """
    H = scores.shape[1]
    p = per_head(mass, H, scores.device, scores.dtype, "mass")
    lo = per_head(min_blocks, H, scores.device, torch.long, "min_blocks")
    hi = per_head(max_blocks, H, scores.device, torch.long, "max_blocks")
    ranked, order, rank, avail = _ranked(scores, available)
    gain = torch.where(avail, ranked, torch.zeros_like(ranked))
    before = gain.cumsum(-1) - gain  # mass of the strictly better available blocks
    if kept_mass is not None:
        before = before + kept_mass[..., None]
    target = p if total is None else p * total[..., None]
    keep = _clamp((before < target) & (gain > 0), rank, lo, hi) & avail
    return torch.zeros_like(keep).scatter(-1, order, keep)


def top_keys(gain: torch.Tensor, available: torch.Tensor, cost: torch.Tensor,
             pairs: float | int | torch.Tensor) -> torch.Tensor:
    """bool ``[B, H, NQ, NK]``: one key budget shared by every head and query block of a batch element.

    Each available cell with ``gain > 0`` costs ``cost`` (new (query, key) pairs, broadcast to the scores);
    cells are taken in decreasing ``gain / cost`` (estimated missing mass per key) while the running cost
    stays within ``pairs * H`` (``pairs`` per head: keys per query times queries; a number or a 0-d tensor,
    which keeps the budget on the device). Greedy knapsack: heads
    and query blocks whose mass is already kept spend little, the others much.
    """
    B, H = gain.shape[:2]
    cost = cost.expand(gain.shape).float()
    take = available.expand(gain.shape) & (gain > 0) & (cost > 0)
    density = torch.where(take, gain.float() / cost.clamp_min(1e-9), torch.full_like(cost, -1.0))
    flat_d, flat_c, flat_t = density.reshape(B, -1), cost.reshape(B, -1), take.reshape(B, -1)
    order = flat_d.argsort(dim=-1, descending=True, stable=True)
    spent = torch.where(flat_t, flat_c, torch.zeros_like(flat_c)).gather(-1, order).cumsum(-1)
    limit = pairs * H if isinstance(pairs, torch.Tensor) else float(pairs) * H
    keep = (spent <= limit) & flat_t.gather(-1, order)
    return torch.zeros_like(flat_t).scatter(-1, order, keep).view(gain.shape)
