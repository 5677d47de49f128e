"""Collapse metrics of a learned block selection, logged during training.

A selection *collapses* when every query picks the same few key blocks (and the gate stops considering the
others): the blocks chosen across queries stop being distinct and the gate's entropy falls to 0.
"""

from __future__ import annotations

import torch

from spattn.learned.regularisers import row_entropy


def collapse_metrics(chosen: torch.Tensor, probs: torch.Tensor | None = None,
                     visible: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics of one selection (floats, for JSON logs).

    Args:
        chosen: bool ``[B, H, NQ, NK]``, the key blocks the learned part selected (safeguards excluded).
        probs: optional gate probabilities float ``[B, H, NQ, NK]``; visible: bool ``[.., NQ, NK]`` (needed
            with ``probs``).

    Returns:
        ``distinct_blocks``: mean over (batch, head) of (key blocks chosen by at least one query block) /
        (key blocks chosen in total, counted with repetition, capped at the number of key blocks): 1 when
        the queries pick different blocks, ``1 / rows`` when they all pick the same ones;
        ``usage_entropy``: normalised entropy of how often each key block is chosen (0: one block);
        ``gate_entropy`` (with ``probs``): mean normalised entropy of the gate rows;
        ``selected_per_row``: mean blocks chosen per query block.
    """
    if chosen.dim() != 4 or chosen.dtype != torch.bool:
        raise ValueError(f"chosen must be bool [B, H, NQ, NK], got {chosen.dtype} {tuple(chosen.shape)}")
    NK = chosen.shape[-1]
    used = chosen.any(-2)  # [B, H, NK]
    picks = chosen.sum((-1, -2))  # [B, H]
    distinct = used.sum(-1) / picks.clamp(min=1, max=NK)
    counts = chosen.sum(-2).double()  # [B, H, NK]
    share = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    ent = -(share * torch.log(share.clamp_min(1e-12))).sum(-1) / torch.log(torch.tensor(float(max(NK, 2))))
    out = {
        "distinct_blocks": float(distinct[picks > 0].mean()) if bool((picks > 0).any()) else 0.0,
        "usage_entropy": float(ent.mean()),
        "selected_per_row": float(chosen.sum(-1).double().mean()),
    }
    if probs is not None:
        if visible is None:
            raise ValueError("collapse_metrics: visible= is needed with probs=")
        g, ok = row_entropy(probs.detach().double(), visible)
        out["gate_entropy"] = float((g * ok).sum() / ok.sum().clamp_min(1))
    return out


__all__ = ["collapse_metrics"]
