"""Dense backend: the layout's token mask over all Lq x Lk scores (small inputs and fallback)."""

from __future__ import annotations

import torch

from spattn.layout.dense import to_dense
from spattn.layout.layout import Layout
from spattn.ops.attention.impl.common import mark_nonfinite, masked_softmax_lse, split_nonfinite


def attention_dense(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: Layout, *, scale: float,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out ``[B, H, Lq, Dv]`` and lse float32 ``[B, H, Lq]`` (or None). Inputs already validated.

    Scores in float32 (float64 for float64 inputs), masked with ``masked_softmax_lse`` (rows with nothing
    allowed give 0), non-finite keys/values handled as in Note [non-finite inputs].

    Fast path (Note [dense fast path]): without lse, with finite keys and values and every row keeping at least
    one key, the masked scores go through the fused ``scaled_dot_product_attention`` instead."""
    B, H, Lq, _ = query.shape
    Hk = key.shape[1]
    key, value, nonfinite = split_nonfinite(key, value)
    cdt = torch.float64 if query.dtype == torch.float64 else torch.float32
    if Hk != H:
        key, value = key.repeat_interleave(H // Hk, dim=1), value.repeat_interleave(H // Hk, dim=1)
    allowed = to_dense(layout).to(query.device)  # [Bl, Hl, Lq, Lk]
    # Note [dense fast path]: SDPA with a boolean mask gives NaN for a row that keeps nothing, and cannot see
    # a NaN in an excluded key or value (0 * NaN spreads); both cases take the exact path below. A non-finite
    # query makes its own row NaN on either path. Half types keep the exact path (its scores are float32).
    if not return_lse and nonfinite is None and query.dtype in (torch.float32, torch.float64) \
            and bool(allowed.any(-1).all()):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value,
                                                               attn_mask=allowed, scale=scale)
        return out, None
    blocked = ~allowed
    scores = torch.matmul(query.to(cdt), key.to(cdt).transpose(-1, -2)) * scale
    p, lse = masked_softmax_lse(scores, blocked, return_lse)
    out = torch.matmul(p, value.to(cdt)).to(query.dtype)
    return mark_nonfinite(out, lse.float() if return_lse else None, layout, nonfinite)
