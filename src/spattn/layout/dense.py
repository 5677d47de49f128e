"""Dense token masks to and from a Layout (tests, oracles and small lengths)."""

from __future__ import annotations

from typing import Any

import torch

from spattn._checks import check_int
from spattn.layout import tables
from spattn.layout.layout import Layout

_MAX_PAIRS = 1 << 26  # to_dense refuses more (query, key) pairs per head


def expand(slot: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """bool ``[Bl, Hl, n * bs, m * bs]``: the token mask of a slot grid int64 ``[Bl, Hl, n, m]`` into
    ``tiles [S, bs, bs]`` (see :func:`spattn.layout.tables.unpack`)."""
    Bl, Hl, n, m = slot.shape
    bs = tiles.shape[-1]
    return tiles[slot].permute(0, 1, 2, 4, 3, 5).reshape(Bl, Hl, n * bs, m * bs)


def to_dense(layout: Layout) -> torch.Tensor:
    """bool ``[Bl, Hl, q_len, kv_len]``: the exact token-level mask of ``layout`` (small lengths only)."""
    if layout.q_len * layout.kv_len > _MAX_PAIRS:
        raise ValueError(
            f"to_dense() would allocate {layout.q_len}x{layout.kv_len} per head; it is meant for small lengths"
        )
    _, slot = tables.unpack(layout)
    return expand(slot, tables.tiles(layout.masks))[:, :, : layout.q_len, : layout.kv_len]


def from_dense(mask: torch.Tensor, block_size: int = 128, **layout_kwargs: Any) -> Layout:
    """The exact Layout of a token mask bool ``[Bl, Hl, q_len, kv_len]`` (``Bl``/``Hl`` 1 when shared).

    ``layout_kwargs`` go to :class:`Layout` (``pattern``, ``causal``, ``info``). Memory is that of the mask:
    for tests, oracles and small lengths.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [Bl, Hl, q_len, kv_len], got "
                         f"{tuple(getattr(mask, 'shape', ()))} {getattr(mask, 'dtype', type(mask).__name__)}")
    check_int(block_size, "block_size", 1)
    Bl, Hl, Lq, Lk = mask.shape
    if Lq < 1 or Lk < 1:
        raise ValueError(f"mask must have q_len, kv_len >= 1, got {Lq}, {Lk}")
    bs = block_size
    NQ, NK = -(-Lq // bs), -(-Lk // bs)
    padded = torch.nn.functional.pad(mask, (0, NK * bs - Lk, 0, NQ * bs - Lq))
    tile = padded.view(Bl, Hl, NQ, bs, NK, bs).permute(0, 1, 2, 4, 3, 5).reshape(-1, bs, bs)
    cells = torch.arange(NQ * NK, device=mask.device).repeat(Bl * Hl)
    status, tile = tables.classify(tile, cells // NK, cells % NK, q_len=Lq, kv_len=Lk)
    masks, ids = tables.dedupe(tile, status)
    shape = (Bl, Hl, NQ, NK)
    return Layout(q_len=Lq, kv_len=Lk, block_size=bs, **layout_kwargs,
                  **tables.pack(status.view(shape), ids.view(shape), masks))
