"""The Layout codec: the one place that turns a dense per-block view into block tables and back.

Notation: ``Bl``/``Hl`` layout batch/heads, ``NQ``/``NK`` query/key blocks, ``bs`` block size, ``M`` distinct
partial masks, ``W`` table width.

A block is ``EMPTY`` (no allowed pair), ``PARTIAL`` (some pairs; its token mask is ``masks[mask_id]``) or
``FULL`` (every in-bounds pair). Producers build a status int8 ``[Bl, Hl, NQ, NK]``, mask ids int32 of the
same shape (-1 where not partial) and masks bool ``[M, bs, bs]``, then call :func:`pack`. Readers call
:func:`unpack` (the dense per-block view) or :func:`entries` (the per-query-block list of visited blocks).

Both readers speak in *slots* into :func:`tiles`: slot ``m < M`` is ``masks[m]``, slot ``M`` an all-True
block (full) and slot ``M + 1`` an all-False block (empty, or table padding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the dataclass imports this module
    from spattn.layout.layout import Layout

EMPTY, PARTIAL, FULL = 0, 1, 2


# ------------------------------------------------------------------------------------------------ producers
def _left_pack(cond: torch.Tensor, values: torch.Tensor | None, width: int | None):
    """Counts int32 ``[..., R]`` and the ascending column indices (and ``values`` there) of the True entries
    of ``cond [..., R, C]``, left-packed into ``[..., R, W]`` with zero padding."""
    num = cond.sum(-1, dtype=torch.int32)
    if width is None:
        width = max(int(num.max()), 1) if num.numel() else 1
    else:
        width = max(1, min(width, cond.shape[-1]))
    # position of each True entry in its row; False entries (and any beyond the width) go to a dump column
    pos = torch.where(cond, cond.cumsum(-1) - 1, width).clamp_(max=width)
    cols = torch.arange(cond.shape[-1], dtype=torch.int32, device=cond.device).expand(cond.shape)
    shape = (*cond.shape[:-1], width + 1)
    idx = torch.zeros(shape, dtype=torch.int32, device=cond.device).scatter_(-1, pos, cols)[..., :width]
    if values is None:
        return num, idx.contiguous()
    src = torch.where(cond, values.to(torch.int32).expand(cond.shape), 0)
    vals = torch.zeros(shape, dtype=torch.int32, device=cond.device).scatter_(-1, pos, src)[..., :width]
    return num, idx.contiguous(), vals.contiguous()


def pack(status: torch.Tensor, mask_ids: torch.Tensor, masks: torch.Tensor, *,
         width: int | None = None) -> dict[str, torch.Tensor]:
    """The Layout tables of a dense per-block view (keyword arguments for :class:`spattn.Layout`).

    Args:
        status: int8 ``[Bl, Hl, NQ, NK]`` of ``EMPTY`` / ``PARTIAL`` / ``FULL``.
        mask_ids: int ``[Bl, Hl, NQ, NK]`` (broadcastable): the mask id of each partial block (read only there).
        masks: bool ``[M, bs, bs]``, passed through.
        width: ``None`` (default): tables as wide as the longest row (one host read of the counts). An int:
            tables ``min(width, NK)`` wide forward and ``min(width, NQ)`` transposed, with no host
            synchronisation (CUDA-graph safe); rows with more entries than ``width`` are cut, so pass a width
            at least the longest row (``NK`` always is).

    Returns:
        ``kv_num_blocks``, ``kv_indices``, ``kv_mask_ids``, ``full_kv_num_blocks``, ``full_kv_indices``, their
        transposed ``q_*`` counterparts and ``masks``; padding entries are 0.
    """
    if status.dim() != 4:
        raise ValueError(f"status must be [Bl, Hl, NQ, NK], got shape {tuple(status.shape)}")
    mask_ids = mask_ids.expand(status.shape)
    full, part = status == FULL, status == PARTIAL
    kv_num, kv_idx, kv_mid = _left_pack(part, mask_ids, width)
    fkv_num, fkv_idx = _left_pack(full, None, width)
    q_num, q_idx, q_mid = _left_pack(part.transpose(-1, -2), mask_ids.transpose(-1, -2), width)
    fq_num, fq_idx = _left_pack(full.transpose(-1, -2), None, width)
    return {
        "kv_num_blocks": kv_num, "kv_indices": kv_idx, "kv_mask_ids": kv_mid,
        "full_kv_num_blocks": fkv_num, "full_kv_indices": fkv_idx,
        "q_num_blocks": q_num, "q_indices": q_idx, "q_mask_ids": q_mid,
        "full_q_num_blocks": fq_num, "full_q_indices": fq_idx,
        "masks": masks,
    }


def in_bounds(q_block: torch.Tensor, kv_block: torch.Tensor, block_size: int, q_len: int,
              kv_len: int) -> torch.Tensor:
    """bool ``[N, bs, bs]``: which (query offset, key offset) pairs of blocks ``(q_block[n], kv_block[n])``
    lie inside ``q_len`` x ``kv_len``."""
    r = torch.arange(block_size, device=q_block.device)
    rows = (q_block[:, None] * block_size + r) < q_len
    cols = (kv_block[:, None] * block_size + r) < kv_len
    return rows[:, :, None] & cols[:, None, :]


def classify(tiles: torch.Tensor, q_block: torch.Tensor, kv_block: torch.Tensor, *, q_len: int,
             kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact status of blocks from their token masks.

    Args:
        tiles: bool ``[N, bs, bs]``, the allowed pairs of block ``(q_block[n], kv_block[n])`` (values outside
            ``q_len`` x ``kv_len`` are ignored).
        q_block, kv_block: int ``[N]`` block coordinates.

    Returns:
        (status int8 ``[N]``: ``EMPTY`` with no allowed pair, ``FULL`` with every in-bounds pair, else
        ``PARTIAL``; the tiles with out-of-bounds pairs cleared, bool ``[N, bs, bs]``).
    """
    inb = in_bounds(q_block, kv_block, tiles.shape[-1], q_len, kv_len)
    tiles = tiles & inb
    count = tiles.flatten(1).sum(-1)
    area = inb.flatten(1).sum(-1)
    status = torch.where(count == 0, EMPTY, torch.where(count == area, FULL, PARTIAL)).to(torch.int8)
    return status, tiles


def pack_bits(tiles: torch.Tensor) -> torch.Tensor:
    """int64 ``[N, ceil(bs * bs / 32)]``: each tile's bits, row-major, 32 to a word, most significant first, so
    that words compare (lexicographically) as the bools do, at an eighth of their memory (a quarter in int64)."""
    n = tiles.shape[0]
    flat = tiles.reshape(n, tiles.shape[-1] * tiles.shape[-2])
    width = -(-flat.shape[1] // 32)
    flat = torch.nn.functional.pad(flat, (0, width * 32 - flat.shape[1])).view(n, width, 32)
    shifts = torch.arange(31, -1, -1, device=tiles.device, dtype=torch.int64)
    return (flat.long() << shifts).sum(-1)


def unpack_bits(words: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool ``[N, bs, bs]``: the inverse of :func:`pack_bits`."""
    shifts = torch.arange(31, -1, -1, device=words.device, dtype=torch.int64)
    bits = ((words[..., None] >> shifts) & 1).bool().flatten(1)
    return bits[:, : block_size * block_size].reshape(-1, block_size, block_size)


def dedupe_packed(words: torch.Tensor, status: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dedupe` on the :func:`pack_bits` words of the *partial* tiles only (``words [P, W]``, P the number
    of ``status == PARTIAL`` entries, in order): producers that evaluate masks chunk by chunk keep the packed
    words and never hold every partial tile as bools at once."""
    ids = torch.full(status.shape, -1, dtype=torch.int32, device=status.device)
    keep = status == PARTIAL
    if words.shape[0] == 0:
        return torch.zeros(0, block_size, block_size, dtype=torch.bool, device=status.device), ids
    uniq, inverse = torch.unique(words, dim=0, return_inverse=True)
    ids[keep] = inverse.to(torch.int32)
    return unpack_bits(uniq, block_size), ids


def dedupe(tiles: torch.Tensor, status: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct token masks of the partial blocks.

    Args:
        tiles: bool ``[N, bs, bs]``; status: int8 ``[N]`` (from :func:`classify`).

    Returns:
        (masks bool ``[M, bs, bs]`` sorted (lexicographic, False < True) and unique; ids int32 ``[N]``: the
        mask of each partial tile, -1 for the others).
    """
    return dedupe_packed(pack_bits(tiles[status == PARTIAL]), status, tiles.shape[-1])


# ------------------------------------------------------------------------------------------------ readers
def tiles(masks: torch.Tensor) -> torch.Tensor:
    """bool ``[M + 2, bs, bs]``: ``masks``, then an all-True block (slot ``M``) and an all-False one (``M + 1``)."""
    ones = torch.ones(1, *masks.shape[1:], dtype=torch.bool, device=masks.device)
    return torch.cat([masks.to(torch.bool), ones, ~ones])


def unpack_tables(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, full_kv_num_blocks: torch.Tensor,
                  full_kv_indices: torch.Tensor, num_kv_blocks: int, kv_mask_ids: torch.Tensor | None = None,
                  num_masks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`unpack` on raw forward tables (also torch ``BlockMask`` tables; entries ``>= num_kv_blocks`` are
    ignored). Without ``kv_mask_ids`` every partial slot is 0."""
    shape = (*kv_num_blocks.shape, num_kv_blocks + 1)
    dev = kv_num_blocks.device
    status = torch.zeros(shape, dtype=torch.int8, device=dev)
    slot = torch.full(shape, num_masks + 1, dtype=torch.int64, device=dev)
    for num, idx, code, ids in ((kv_num_blocks, kv_indices, PARTIAL, kv_mask_ids),
                                (full_kv_num_blocks, full_kv_indices, FULL, None)):
        if num is None or idx.shape[-1] == 0:
            continue
        idx = idx.long()
        valid = (torch.arange(idx.shape[-1], device=dev) < num[..., None]) & (idx < num_kv_blocks)
        col = torch.where(valid, idx, num_kv_blocks)
        status.scatter_(-1, col, torch.full_like(col, code, dtype=torch.int8))
        src = torch.full_like(col, num_masks) if ids is None else torch.where(valid, ids.long(), 0)
        slot.scatter_(-1, col, src)
    return status[..., :num_kv_blocks], slot[..., :num_kv_blocks]


def unpack(layout: Layout, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense per-block view of query blocks ``[start, stop)`` (default all).

    Returns:
        (status int8 ``[Bl, Hl, n, NK]`` of ``EMPTY`` / ``PARTIAL`` / ``FULL``; slot int64 ``[Bl, Hl, n, NK]``
        into ``tiles(layout.masks)``: the mask id of a partial block, ``M`` full, ``M + 1`` empty).
    """
    rows = slice(start, stop)
    return unpack_tables(layout.kv_num_blocks[:, :, rows], layout.kv_indices[:, :, rows],
                         layout.full_kv_num_blocks[:, :, rows], layout.full_kv_indices[:, :, rows],
                         layout.num_kv_blocks, layout.kv_mask_ids[:, :, rows], layout.masks.shape[0])


def mask_ids(status: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """int32 mask ids (-1 where not partial) from :func:`unpack`'s output: the inverse of :func:`pack`'s input."""
    return torch.where(status == PARTIAL, slot, -1).to(torch.int32)


def entries(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the key blocks visited, full ones first then partial ones, as the kernels read them.

    Returns:
        (key block int64 ``[Bl, Hl, NQ, Wf + Wp]``; slot int64 of the same shape into ``tiles(layout.masks)``:
        ``M`` for a full block, the mask id for a partial one, ``M + 1`` for padding).
    """
    M = layout.masks.shape[0]
    dev = layout.device
    full_valid = torch.arange(layout.full_kv_indices.shape[-1], device=dev) < layout.full_kv_num_blocks[..., None]
    part_valid = torch.arange(layout.kv_indices.shape[-1], device=dev) < layout.kv_num_blocks[..., None]
    block = torch.cat([layout.full_kv_indices, layout.kv_indices], -1).long()
    slot = torch.cat([torch.where(full_valid, M, M + 1),
                      torch.where(part_valid, layout.kv_mask_ids.long(), M + 1)], -1)
    return block, slot
