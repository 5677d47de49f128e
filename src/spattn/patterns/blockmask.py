"""Conversion between a Layout and torch's FlexAttention ``BlockMask`` (the field's block-sparse format)."""

from __future__ import annotations

from typing import Any

import torch

from spattn.patterns.base import EMPTY, FULL, PARTIAL
from spattn.patterns.compile import layout_from_status
from spattn.patterns.layout import Layout


def _flex():
    try:
        from torch.nn.attention import flex_attention
    except ImportError as exc:  # pragma: no cover
        raise RuntimeError(f"torch {torch.__version__} has no FlexAttention: {exc}") from exc
    return flex_attention


def _widen(idx: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(idx, (0, width - idx.shape[-1])).contiguous()


def layout_to_block_mask(layout: Layout) -> Any:
    """A ``BlockMask`` with the same full / partial tables; partial blocks read the layout's masks."""
    fa = _flex()
    NK, bs = layout.num_kv_blocks, layout.block_size
    # the mask_mod must be the exact predicate everywhere (eager flex evaluates it on every pair)
    slot, masks = layout.mask_slots()
    Bl, Hl = layout.batch, layout.heads

    def mask_mod(b, h, q_idx, kv_idx):
        bb = b if Bl > 1 else b * 0
        hh = h if Hl > 1 else h * 0
        m = slot[bb, hh, q_idx // bs, kv_idx // bs]
        return masks[m, q_idx % bs, kv_idx % bs]

    return fa.BlockMask.from_kv_blocks(
        layout.kv_num_blocks,
        _widen(layout.kv_indices, NK),
        layout.full_kv_num_blocks,
        _widen(layout.full_kv_indices, NK),
        BLOCK_SIZE=bs,
        mask_mod=mask_mod,
        seq_lengths=(layout.q_len, layout.kv_len),
    )


def block_mask_to_layout(block_mask: Any) -> Layout:
    """A Layout from a ``BlockMask``: its tables, with partial blocks resolved by evaluating its mask_mod."""
    bsq, bsk = block_mask.BLOCK_SIZE
    if bsq != bsk:
        raise ValueError(f"spattn layouts use one block size for queries and keys, got BLOCK_SIZE={block_mask.BLOCK_SIZE}")
    bs = int(bsq)
    q_len, kv_len = block_mask.seq_lengths
    dev = block_mask.kv_num_blocks.device
    NQ, NK = -(-q_len // bs), -(-kv_len // bs)
    Bl, Hl = block_mask.kv_num_blocks.shape[:2]
    status = torch.zeros(Bl, Hl, NQ, NK, dtype=torch.int8, device=dev)

    def mark(num, idx, value):
        if num is None:
            return
        num, idx = num[..., :NQ], idx[..., :NQ, :]
        valid = torch.arange(idx.shape[-1], device=dev) < num[..., None]
        b, h, qb, e = valid.nonzero().unbind(1)
        kb = idx[b, h, qb, e].long()
        keep = kb < NK
        status[b[keep], h[keep], qb[keep], kb[keep]] = value

    mark(block_mask.kv_num_blocks, block_mask.kv_indices, PARTIAL)
    mark(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, FULL)
    mask_ids = torch.full(status.shape, -1, dtype=torch.int32, device=dev)
    b, h, qb, kb = (status == PARTIAL).nonzero().unbind(1)
    masks = torch.zeros(0, bs, bs, dtype=torch.bool, device=dev)
    if b.numel():
        r = torch.arange(bs, device=dev)
        qi = qb[:, None] * bs + r
        kj = kb[:, None] * bs + r
        fn = block_mask.mask_mod
        inner = torch.vmap(torch.vmap(fn, in_dims=(None, None, None, 0)), in_dims=(None, None, 0, None))
        vals = torch.vmap(inner, in_dims=(0, 0, 0, 0))(b, h, qi, kj).bool()
        vals = vals & (qi < q_len)[:, :, None] & (kj < kv_len)[:, None, :]
        count = vals.flatten(1).sum(-1)
        area = (torch.clamp(q_len - qb * bs, max=bs) * torch.clamp(kv_len - kb * bs, max=bs))
        status[b, h, qb, kb] = torch.where(count == 0, EMPTY, torch.where(count == area, FULL, PARTIAL)).to(torch.int8)
        keep = (count > 0) & (count < area)
        if keep.any():
            uniq, inv = torch.unique(vals[keep].flatten(1), dim=0, return_inverse=True)
            masks = uniq.view(-1, bs, bs)
            mask_ids[b[keep], h[keep], qb[keep], kb[keep]] = inv.to(torch.int32)
    return layout_from_status(status, masks, mask_ids, q_len=q_len, kv_len=kv_len, block_size=bs)
