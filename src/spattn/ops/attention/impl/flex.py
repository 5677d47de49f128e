"""FlexAttention backend: torch's flex_attention on the Layout converted to a BlockMask."""

from __future__ import annotations

import torch

from spattn.patterns.layout import Layout


def available() -> str | None:
    """None when flex_attention can be imported, else the reason."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        return f"torch {torch.__version__} has no flex_attention ({exc})"
    return None


def attention_flex(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: Layout, *, scale: float, return_lse: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = layout.to_block_mask()
    gqa = key.shape[1] != query.shape[1]
    if return_lse:
        out, lse = flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
        return out, lse.float()
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa), None
