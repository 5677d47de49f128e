"""FlexAttention backend: torch's flex_attention on the Layout converted to a BlockMask."""

from __future__ import annotations

import functools

import torch

from spattn.layout.layout import Layout
from spattn.ops.attention.impl.common import mark_nonfinite, split_nonfinite


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
    from torch.nn.attention import flex_attention as fa

    block_mask = layout.to_block_mask()
    gqa = key.shape[1] != query.shape[1]
    key, value, nonfinite = split_nonfinite(key, value)  # Note [non-finite inputs] (common.py)
    run = functools.partial(fa.flex_attention, query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    if not return_lse:
        out, lse = run(), None
    elif hasattr(fa, "AuxRequest"):  # torch >= 2.9: return_lse is deprecated in favour of return_aux
        out, aux = run(return_aux=fa.AuxRequest(lse=True))
        lse = aux.lse.float()
    else:
        out, lse = run(return_lse=True)
        lse = lse.float()
    return mark_nonfinite(out, lse, layout, nonfinite)
