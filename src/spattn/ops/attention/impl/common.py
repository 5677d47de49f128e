"""Maths shared unchanged by the PyTorch backends: a masked softmax that never yields NaN."""

from __future__ import annotations

import torch


def masked_softmax_lse(scores: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last axis restricted to ``allowed``; rows with nothing allowed give p = 0 and
    lse = -inf, with finite gradients. Computed in float32 at least. Returns (p, lse)."""
    work = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    s = work.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    nonempty = denom > 0
    p = e / torch.where(nonempty, denom, torch.ones_like(denom))
    lse = torch.where(nonempty, torch.log(torch.where(nonempty, denom, torch.ones_like(denom))) + m, float("-inf"))
    return p, lse.squeeze(-1)
