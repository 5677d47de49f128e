"""Dense backend: SDPA with the layout's token mask (small inputs and fallback). Materialises Lq x Lk."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spattn.layout.dense import to_dense
from spattn.layout.layout import Layout
from spattn.ops.attention.impl.common import masked_softmax_lse


def attention_dense(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: Layout, *, scale: float, return_lse: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, H, Lq, _ = query.shape
    Hk = key.shape[1]
    allowed = to_dense(layout).to(query.device)  # [Bl, Hl, Lq, Lk]
    allowed = allowed.expand(B, H, Lq, key.shape[2])
    empty = ~allowed.any(-1, keepdim=True)
    # SDPA gives NaN on rows with nothing allowed: let such rows see key 0, then zero them.
    safe = allowed.clone()
    safe[..., :1] |= empty
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=safe, scale=scale, enable_gqa=Hk != H)
    out = torch.where(empty, torch.zeros((), dtype=out.dtype, device=out.device), out)
    lse = None
    if return_lse:
        k = key.repeat_interleave(H // Hk, dim=1) if Hk != H else key
        scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scale
        _, lse = masked_softmax_lse(scores, ~allowed)
    return out, lse
