"""Conversion between a Layout and torch's FlexAttention ``BlockMask`` (the field's block-sparse format)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from spattn.layout import tables
from spattn.layout.layout import Layout


def _flex():
    try:
        from torch.nn.attention import flex_attention
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        raise RuntimeError(f"torch {torch.__version__} has no FlexAttention: {exc}") from exc
    return flex_attention


def _widen(idx: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(idx, (0, width - idx.shape[-1])).contiguous()


def layout_to_block_mask(layout: Layout) -> Any:
    """A ``BlockMask`` with the same full / partial tables; partial blocks read the layout's masks."""
    fa = _flex()
    NK, bs = layout.num_kv_blocks, layout.block_size
    # the mask_mod must be the exact predicate everywhere (eager flex evaluates it on every pair)
    _, slot = tables.unpack(layout)
    tiles = tables.tiles(layout.masks)
    Bl, Hl = layout.batch, layout.heads

    def mask_mod(b, h, q_idx, kv_idx):
        bb = b if Bl > 1 else b * 0
        hh = h if Hl > 1 else h * 0
        return tiles[slot[bb, hh, q_idx // bs, kv_idx // bs], q_idx % bs, kv_idx % bs]

    return fa.BlockMask.from_kv_blocks(
        layout.kv_num_blocks,
        _widen(layout.kv_indices, NK),
        layout.full_kv_num_blocks,
        _widen(layout.full_kv_indices, NK),
        BLOCK_SIZE=bs,
        mask_mod=mask_mod,
        seq_lengths=(layout.q_len, layout.kv_len),
    )


def block_mask_to_layout(block_mask: Any, mask_mod: Any = None) -> Layout:
    """A Layout from a ``BlockMask``: its tables, with partial blocks resolved by evaluating ``mask_mod`` (default:
    the BlockMask's own) at in-bounds positions only (Note [in-bounds mask_mod])."""
    bsq, bsk = block_mask.BLOCK_SIZE
    if bsq != bsk:
        raise ValueError(
            f"spattn layouts use one block size for queries and keys, got BLOCK_SIZE={block_mask.BLOCK_SIZE}"
        )
    if mask_mod is not None and not callable(mask_mod):
        raise TypeError(f"mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool, got {type(mask_mod).__name__}")
    mod = mask_mod if mask_mod is not None else getattr(block_mask, "mask_mod", None)
    bs = int(bsq)
    q_len, kv_len = (int(n) for n in block_mask.seq_lengths)
    NQ, NK = -(-q_len // bs), -(-kv_len // bs)
    full_num, full_idx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    status, _ = tables.unpack_tables(
        block_mask.kv_num_blocks[..., :NQ], block_mask.kv_indices[..., :NQ, :],
        None if full_num is None else full_num[..., :NQ], None if full_idx is None else full_idx[..., :NQ, :], NK)
    mask_ids = torch.full(status.shape, -1, dtype=torch.int32, device=status.device)
    masks = torch.zeros(0, bs, bs, dtype=torch.bool, device=status.device)
    b, h, qb, kb = (status == tables.PARTIAL).nonzero().unbind(1)
    if b.numel() and (mod is None or mod is _flex().noop_mask):
        warnings.warn(
            f"the BlockMask has {b.numel()} partial blocks but no mask_mod to resolve them: they are taken as full "
            "blocks (what flex_attention computes with its noop mask_mod); pass "
            "Layout.from_block_mask(block_mask, mask_mod=...) for the exact token mask", UserWarning, stacklevel=3)
        status[b, h, qb, kb] = tables.FULL
    elif b.numel():
        # Note [in-bounds mask_mod]: a partly filled last block would ask for positions past the sequence end,
        # where a mask_mod indexing a length-L tensor fails; torch never calls it there, nor do we: positions are
        # clamped into bounds and the out-of-bounds pairs are cleared by classify.
        r = torch.arange(bs, device=status.device)
        q_idx = torch.clamp(qb[:, None] * bs + r, max=q_len - 1)
        kv_idx = torch.clamp(kb[:, None] * bs + r, max=kv_len - 1)
        per_key = torch.vmap(mod, in_dims=(None, None, None, 0))
        inner = torch.vmap(per_key, in_dims=(None, None, 0, None))
        vals = torch.vmap(inner, in_dims=(0, 0, 0, 0))(b, h, q_idx, kv_idx).bool()
        new, vals = tables.classify(vals, qb, kb, q_len=q_len, kv_len=kv_len)
        masks, ids = tables.dedupe(vals, new)
        status[b, h, qb, kb] = new
        mask_ids[b, h, qb, kb] = ids
    return Layout(q_len=q_len, kv_len=kv_len, block_size=bs, **tables.pack(status, mask_ids, masks))
