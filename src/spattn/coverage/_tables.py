"""Internal helpers that read (and, for tests and fallbacks, build) Layout tables.

Notation: Bl/Hl layout batch/heads, NQ/NK query/key blocks, bs block size, M distinct partial masks.
Block codes in a block map: NONE = -2 (skipped), FULL = -1, m >= 0 = partial with ``masks[m]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from spattn.patterns.layout import Layout

NONE = -2
FULL = -1


def block_map(layout: Layout, qb0: int = 0, qb1: int | None = None) -> torch.Tensor:
    """int32 [Bl, Hl, qb1 - qb0, NK]: block codes (NONE / FULL / mask id) for query blocks [qb0, qb1)."""
    qb1 = layout.num_q_blocks if qb1 is None else qb1
    NK = layout.num_kv_blocks
    Bl, Hl = layout.batch, layout.heads
    dev = layout.device
    out = torch.full((Bl, Hl, qb1 - qb0, NK + 1), NONE, dtype=torch.int32, device=dev)
    for num, idx, val in (
        (layout.full_kv_num_blocks, layout.full_kv_indices, None),
        (layout.kv_num_blocks, layout.kv_indices, layout.kv_mask_ids),
    ):
        num = num[:, :, qb0:qb1]
        idx = idx[:, :, qb0:qb1]
        if idx.shape[-1] == 0:
            continue
        valid = torch.arange(idx.shape[-1], device=dev) < num[..., None]
        col = torch.where(valid, idx.long(), NK)
        src = torch.full_like(col, FULL, dtype=torch.int32) if val is None else val[:, :, qb0:qb1].int()
        out.scatter_(-1, col, src)
    return out[..., :NK]


def chunk_mask(layout: Layout, bmap: torch.Tensor, masks_ext: torch.Tensor, kb0: int, kb1: int,
               rows: int, cols: int) -> torch.Tensor:
    """bool [Bl, Hl, rows, cols]: token mask of key blocks [kb0, kb1) for the query blocks of ``bmap``.

    ``masks_ext`` = cat(masks, all-False, all-True) so codes NONE/FULL index its last two entries.
    """
    M = masks_ext.shape[0] - 2
    codes = bmap[..., kb0:kb1].long()
    codes = torch.where(codes == NONE, M, torch.where(codes == FULL, M + 1, codes))
    Bl, Hl, nq, nk = codes.shape
    bs = layout.block_size
    tok = masks_ext[codes]  # [Bl, Hl, nq, nk, bs, bs]
    tok = tok.permute(0, 1, 2, 4, 3, 5).reshape(Bl, Hl, nq * bs, nk * bs)
    return tok[:, :, :rows, :cols]


def extended_masks(layout: Layout) -> torch.Tensor:
    """bool [M + 2, bs, bs]: the layout's masks followed by an all-False and an all-True block."""
    bs = layout.block_size
    m = layout.masks.to(torch.bool)
    return torch.cat([m, m.new_zeros(1, bs, bs), m.new_ones(1, bs, bs)])


def _sorted_tables(sel: torch.Tensor, ids: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """From a bool [..., R, C] selection: (num int32 [..., R], indices int32 [..., R, W], mask ids)."""
    num = sel.sum(-1).int()
    width = max(1, int(num.max()) if num.numel() else 1)
    order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)[..., :width]
    valid = torch.arange(width, device=sel.device) < num[..., None]
    indices = torch.where(valid, order, 0).int()
    if ids is None:
        return num, indices, None
    mids = torch.where(valid, ids.gather(-1, order), 0).int()
    return num, indices, mids


def layout_from_mask(mask: torch.Tensor, block_size: int, *, causal: bool = False, pattern: Any = None) -> Layout:
    """Build an exact Layout from a token-level bool mask [Bl, Hl, Lq, Lk] (small lengths; tests, fallbacks)."""
    if mask.dim() != 4 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool [Bl, Hl, Lq, Lk], got {tuple(mask.shape)} {mask.dtype}")
    Bl, Hl, Lq, Lk = mask.shape
    bs = block_size
    NQ, NK = max(1, math.ceil(Lq / bs)), max(1, math.ceil(Lk / bs))
    dev = mask.device
    pad = torch.zeros(Bl, Hl, NQ * bs, NK * bs, dtype=torch.bool, device=dev)
    pad[:, :, :Lq, :Lk] = mask
    inb = torch.zeros(NQ * bs, NK * bs, dtype=torch.bool, device=dev)
    inb[:Lq, :Lk] = True
    blocks = pad.view(Bl, Hl, NQ, bs, NK, bs).permute(0, 1, 2, 4, 3, 5)
    inbb = inb.view(NQ, bs, NK, bs).permute(0, 2, 1, 3)
    anyb = blocks.flatten(-2).any(-1)
    full = (blocks | ~inbb).flatten(-2).all(-1) & anyb
    part = anyb & ~full
    flat = blocks[part].reshape(-1, bs * bs)
    if flat.shape[0]:
        uniq, inv = torch.unique(flat.to(torch.uint8), dim=0, return_inverse=True)
        masks = uniq.bool().view(-1, bs, bs)
    else:
        masks = torch.zeros(0, bs, bs, dtype=torch.bool, device=dev)
        inv = torch.zeros(0, dtype=torch.long, device=dev)
    ids = torch.zeros(Bl, Hl, NQ, NK, dtype=torch.long, device=dev)
    ids[part] = inv
    kvn, kvi, kvm = _sorted_tables(part, ids)
    fkvn, fkvi, _ = _sorted_tables(full, None)
    qn, qi, qm = _sorted_tables(part.transpose(-1, -2), ids.transpose(-1, -2))
    fqn, fqi, _ = _sorted_tables(full.transpose(-1, -2), None)
    return Layout(
        q_len=Lq, kv_len=Lk, block_size=bs,
        kv_num_blocks=kvn, kv_indices=kvi, kv_mask_ids=kvm,
        full_kv_num_blocks=fkvn, full_kv_indices=fkvi,
        q_num_blocks=qn, q_indices=qi, q_mask_ids=qm,
        full_q_num_blocks=fqn, full_q_indices=fqi,
        masks=masks, pattern=pattern, causal=causal,
        info={"built_by": "spattn.coverage._tables.layout_from_mask"},
    )


def as_layout(layout_or_pattern: Any, q_len: int, kv_len: int, *, causal: bool, batch: int, heads: int,
              device: torch.device, query: torch.Tensor | None = None, key: torch.Tensor | None = None,
              block_size: int | None = None) -> Layout:
    """A Layout as is (validated against the lengths), or a pattern compiled with ``spattn.compile``."""
    if isinstance(layout_or_pattern, Layout):
        lay = layout_or_pattern
        if lay.q_len != q_len or lay.kv_len != kv_len:
            raise ValueError(
                f"layout is for q_len={lay.q_len}, kv_len={lay.kv_len} but the inputs have {q_len}, {kv_len}"
            )
        if lay.batch not in (1, batch) or lay.heads not in (1, heads):
            raise ValueError(
                f"layout tables have batch={lay.batch}, heads={lay.heads}; expected 1 or {batch} / 1 or {heads}"
            )
        return lay.to(device) if lay.device != device else lay
    import spattn

    if not hasattr(spattn, "compile"):
        raise TypeError("layout_or_pattern must be a spattn.Layout (spattn.compile is not available)")
    kwargs: dict[str, Any] = dict(causal=causal, batch=batch, heads=heads, device=device, query=query, key=key)
    if block_size is not None:
        kwargs["block_size"] = block_size
    try:
        lay = spattn.compile(layout_or_pattern, q_len, kv_len, **kwargs)
    except TypeError as exc:  # not a pattern
        raise TypeError(
            f"layout_or_pattern must be a spattn.Layout or a pattern, got {type(layout_or_pattern).__name__}: {exc}"
        ) from exc
    return lay
