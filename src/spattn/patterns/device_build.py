"""Layouts built straight from tensors or closed-form patterns, on any device.

* :func:`layout_from_dense` — a Layout from a dense bool mask (tests, small lengths; exact oracle).
* :func:`build_layout` — the fast on-device build for the built-in banded patterns (Causal, Full, Sinks,
  Window and their unions, optionally intersected with causal): a fixed number of tensor ops whose shapes
  depend only on Python integers, so no host synchronisation and nothing to recompile per length.
"""

from __future__ import annotations

import torch

from spattn.patterns.layout import Layout


def _pack(sel: torch.Tensor, values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """sel bool [Bl, Hl, R, C] -> (count int32 [Bl, Hl, R], indices int32 [Bl, Hl, R, W], values gathered)."""
    count = sel.sum(-1)
    width = max(1, int(count.max())) if count.numel() else 1
    cols = torch.arange(sel.shape[-1], device=sel.device).expand_as(sel)
    key = torch.where(sel, cols, sel.shape[-1] + cols)  # valid first, ascending
    order = key.argsort(dim=-1, stable=True)[..., :width]
    idx = torch.gather(cols, -1, order)
    valid = torch.arange(width, device=sel.device) < count[..., None]
    idx = torch.where(valid, idx, 0).to(torch.int32)
    gathered = None
    if values is not None:
        gathered = torch.where(valid, torch.gather(values, -1, order), 0).to(torch.int32)
    width_cols = idx.shape[-1]
    if width_cols < width:  # fewer columns than width (C < 1): pad
        idx = torch.nn.functional.pad(idx, (0, width - width_cols))
    return count.to(torch.int32), idx, gathered


def layout_from_dense(mask: torch.Tensor, block_size: int = 128, **layout_kwargs) -> Layout:
    """Build a :class:`Layout` from a dense bool mask ``[Bl, Hl, q_len, kv_len]`` (brute force, for tests)."""
    if mask.dim() != 4 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [Bl, Hl, q_len, kv_len], got {tuple(mask.shape)} {mask.dtype}")
    Bl, Hl, Lq, Lk = mask.shape
    bs = block_size
    NQ, NK = -(-Lq // bs), -(-Lk // bs)
    padded = torch.zeros(Bl, Hl, NQ * bs, NK * bs, dtype=torch.bool, device=mask.device)
    padded[:, :, :Lq, :Lk] = mask
    inb = torch.zeros(NQ * bs, NK * bs, dtype=torch.bool, device=mask.device)
    inb[:Lq, :Lk] = True
    tiles = padded.view(Bl, Hl, NQ, bs, NK, bs).permute(0, 1, 2, 4, 3, 5)  # [Bl, Hl, NQ, NK, bs, bs]
    inb_t = inb.view(NQ, bs, NK, bs).permute(0, 2, 1, 3)
    n_allowed = tiles.sum((-1, -2))
    n_inb = inb_t.sum((-1, -2))
    full = (n_allowed == n_inb) & (n_allowed > 0)
    partial = (n_allowed > 0) & ~full
    part_tiles = tiles[partial]
    if part_tiles.numel():
        masks, inverse = torch.unique(part_tiles.reshape(part_tiles.shape[0], -1), dim=0, return_inverse=True)
        masks = masks.view(-1, bs, bs)
    else:
        masks = torch.zeros(0, bs, bs, dtype=torch.bool, device=mask.device)
        inverse = torch.zeros(0, dtype=torch.long, device=mask.device)
    mid = torch.zeros(Bl, Hl, NQ, NK, dtype=torch.long, device=mask.device)
    mid[partial] = inverse
    kv_num, kv_idx, kv_mid = _pack(partial, mid)
    fkv_num, fkv_idx, _ = _pack(full)
    q_num, q_idx, q_mid = _pack(partial.transpose(-1, -2), mid.transpose(-1, -2))
    fq_num, fq_idx, _ = _pack(full.transpose(-1, -2))
    return Layout(
        q_len=Lq, kv_len=Lk, block_size=bs,
        kv_num_blocks=kv_num, kv_indices=kv_idx, kv_mask_ids=kv_mid,
        full_kv_num_blocks=fkv_num, full_kv_indices=fkv_idx,
        q_num_blocks=q_num, q_indices=q_idx, q_mask_ids=q_mid,
        full_q_num_blocks=fq_num, full_q_indices=fq_idx,
        masks=masks, **layout_kwargs,
    )
