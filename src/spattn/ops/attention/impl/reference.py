"""Reference block-sparse attention: blockwise PyTorch that gathers only the kept key blocks.

Memory is proportional to (queries x kept keys), never Lq x Lk; autograd works; CPU and GPU.
Notation: B batch, H query heads, Hk key/value heads, G = H // Hk query heads per kv head, NQ/NK query/key
blocks, bs block size, W kept key blocks per query block (full + partial), C query blocks per chunk.
When the layout is shared by all heads (Hl == 1) each kv head's blocks are gathered once for its G query
heads (GQA without copies of K/V beyond the gathered chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spattn.layout import tables
from spattn.layout.layout import Layout
from spattn.ops.attention.impl.common import mark_nonfinite, masked_softmax_lse, split_nonfinite

_CHUNK_ELEMENTS = 1 << 23  # score elements per chunk (B*H*C*bs*W*bs)


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
    G = H // Hk
    bs, NQ, NK = layout.block_size, layout.num_q_blocks, layout.num_kv_blocks
    Bl, Hl = layout.batch, layout.heads
    dev = query.device
    out_dtype = query.dtype
    key, value, nonfinite = split_nonfinite(key, value)  # Note [non-finite inputs]
    if out_dtype in (torch.float16, torch.bfloat16):  # the oracle computes in float32 (autograd casts back)
        query, key, value = query.float(), key.float(), value.float()

    kp = F.pad(key, (0, 0, 0, NK * bs - Lk)).reshape(B, Hk, NK, bs, D)
    vp = F.pad(value, (0, 0, 0, NK * bs - Lk)).reshape(B, Hk, NK, bs, Dv)
    qp = F.pad(query * scale, (0, 0, 0, NQ * bs - Lq)).reshape(B, Hk, G, NQ, bs, D)

    idx, slot = tables.entries(layout)  # [Bl, Hl, NQ, W]
    W = idx.shape[-1]
    blocked = ~tables.tiles(layout.masks)  # per slot: True where the pair is NOT allowed
    col = torch.arange(bs, device=dev)
    b_ix = torch.arange(B, device=dev)[:, None, None, None]
    if Hl == 1:  # gather per kv head: [B, Hk, C, W, bs, D]
        h_ix = torch.arange(Hk, device=dev)[None, :, None, None]
    else:  # per query head: [B, H, C, W, bs, D]
        h_ix = (torch.arange(H, device=dev) // G)[None, :, None, None]

    C = max(1, _CHUNK_ELEMENTS // max(1, B * H * bs * W * bs))
    outs, lses = [], []
    for c0 in range(0, NQ, C):
        c1 = min(NQ, c0 + C)
        n = c1 - c0
        ic, sc = idx[:, :, c0:c1], slot[:, :, c0:c1]
        mask = blocked[sc]  # [Bl, Hl, n, W, r, s]
        if Lk % bs:
            mask = mask | ((ic * bs)[..., None] + col >= Lk)[..., None, :]
        mask = mask.permute(0, 1, 2, 4, 3, 5).reshape(Bl, Hl, n, bs, W * bs)
        kb = kp[b_ix, h_ix, ic]
        vb = vp[b_ix, h_ix, ic]
        qc = qp[:, :, :, c0:c1]  # [B, Hk, G, n, bs, D]
        if Hl == 1:
            qx = qc.permute(0, 1, 3, 2, 4, 5).reshape(B, Hk, n, G * bs, D)
            s = torch.matmul(qx, kb.reshape(B, Hk, n, W * bs, D).transpose(-1, -2))  # [B, Hk, n, G*bs, W*bs]
            p, lse = masked_softmax_lse(s.view(B, Hk, n, G, bs, W * bs), mask[:, :, :, None], return_lse)
            o = torch.matmul(p.view(B, Hk, n, G * bs, W * bs), vb.reshape(B, Hk, n, W * bs, Dv))
            o = o.view(B, Hk, n, G, bs, Dv)
            lse = lse.transpose(2, 3) if return_lse else None
            o = o.transpose(2, 3)  # [B, Hk, G, n, bs, Dv]
        else:
            kb = kb.reshape(B, Hk, G, n, W * bs, D)
            vb = vb.reshape(B, Hk, G, n, W * bs, Dv)
            s = torch.matmul(qc, kb.transpose(-1, -2))  # [B, Hk, G, n, bs, W*bs]
            p, lse = masked_softmax_lse(s, mask.view(Bl, Hk, G, n, bs, W * bs), return_lse)
            o = torch.matmul(p, vb)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, 3).reshape(B, H, NQ * bs, Dv)[:, :, :Lq]
    lse = torch.cat(lses, 3).reshape(B, H, NQ * bs)[:, :, :Lq].float() if return_lse else None
    return mark_nonfinite(out.to(out_dtype), lse, layout, nonfinite)
