"""Reference block-sparse attention: blockwise PyTorch that gathers only the kept key blocks.

Memory is proportional to (queries x kept keys), never Lq x Lk; autograd works; CPU and GPU.
Notation: B batch, H query heads, Hk key/value heads (H % Hk == 0), NQ/NK query/key blocks, bs block size,
W kept key blocks per query block (full + partial), C query blocks processed together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spattn.ops.attention.impl.common import masked_softmax_lse
from spattn.patterns.layout import Layout

_CHUNK_ELEMENTS = 1 << 23  # score elements per chunk (B*H*C*bs*W*bs)


def _entries(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: kept key blocks ``[Bl, Hl, NQ, W]`` and mask slot ``[Bl, Hl, NQ, W]`` where slot
    M = full block, M + 1 = padding (nothing allowed), else the partial block's mask id."""
    M = layout.masks.shape[0]
    wf = layout.full_kv_indices.shape[-1]
    wp = layout.kv_indices.shape[-1]
    dev = layout.device
    f_valid = torch.arange(wf, device=dev) < layout.full_kv_num_blocks[..., None]
    p_valid = torch.arange(wp, device=dev) < layout.kv_num_blocks[..., None]
    idx = torch.cat([layout.full_kv_indices, layout.kv_indices], -1).long()
    slot = torch.cat(
        [torch.where(f_valid, M, M + 1), torch.where(p_valid, layout.kv_mask_ids.long(), M + 1)], -1
    )
    return idx, slot


def attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: Layout,
    *,
    scale: float,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out ``[B, H, Lq, Dv]`` and lse float32 ``[B, H, Lq]`` (or None). Inputs already validated."""
    B, H, Lq, D = query.shape
    Hk, Lk, Dv = key.shape[1], key.shape[2], value.shape[-1]
    bs, NQ, NK = layout.block_size, layout.num_q_blocks, layout.num_kv_blocks
    group = H // Hk
    dev = query.device
    out_dtype = query.dtype
    if out_dtype in (torch.float16, torch.bfloat16):  # the oracle computes in float32 (autograd casts back)
        query, key, value = query.float(), key.float(), value.float()

    kp = F.pad(key, (0, 0, 0, NK * bs - Lk)).view(B, Hk, NK, bs, D)
    vp = F.pad(value, (0, 0, 0, NK * bs - Lk)).view(B, Hk, NK, bs, Dv)
    qp = F.pad(query, (0, 0, 0, NQ * bs - Lq)).view(B, H, NQ, bs, D)

    idx, slot = _entries(layout)
    W = idx.shape[-1]
    idx = idx.expand(B, H, NQ, W)
    slot = slot.expand(B, H, NQ, W)
    masks = torch.cat(
        [layout.masks, torch.ones(1, bs, bs, dtype=torch.bool, device=dev), torch.zeros(1, bs, bs, dtype=torch.bool, device=dev)]
    )
    col = torch.arange(bs, device=dev)
    b_ix = torch.arange(B, device=dev)[:, None, None, None]
    hk_ix = (torch.arange(H, device=dev) // group)[None, :, None, None]

    C = max(1, _CHUNK_ELEMENTS // max(1, B * H * bs * W * bs))
    outs, lses = [], []
    for c0 in range(0, NQ, C):
        c1 = min(NQ, c0 + C)
        ic, sc = idx[:, :, c0:c1], slot[:, :, c0:c1]
        kb = kp[b_ix, hk_ix, ic]  # [B, H, C, W, bs, D]
        vb = vp[b_ix, hk_ix, ic]
        scores = torch.einsum("bhcrd,bhcwsd->bhcrws", qp[:, :, c0:c1], kb) * scale
        allowed = masks[sc]  # [B, H, C, W, r, s]
        allowed = allowed & ((ic * bs)[..., None] + col < Lk)[..., None, :]
        allowed = allowed.permute(0, 1, 2, 4, 3, 5)  # [B, H, C, r, W, s]
        n = c1 - c0
        p, lse = masked_softmax_lse(scores.reshape(B, H, n, bs, W * bs), allowed.reshape(B, H, n, bs, W * bs))
        out = torch.einsum("bhcrws,bhcwsd->bhcrd", p.view(B, H, n, bs, W, bs).to(vb.dtype), vb)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, 2).reshape(B, H, NQ * bs, Dv)[:, :, :Lq]
    lse = torch.cat(lses, 2).reshape(B, H, NQ * bs)[:, :, :Lq].float() if return_lse else None
    return out.to(out_dtype), lse
