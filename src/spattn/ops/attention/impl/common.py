"""Maths shared unchanged by the PyTorch backends: a masked softmax that never yields NaN."""

from __future__ import annotations

import torch


def masked_softmax_lse(
    scores: torch.Tensor, blocked: torch.Tensor, return_lse: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax over the last axis of ``scores`` with ``blocked`` pairs removed; rows with nothing allowed
    give p = 0 and lse = -inf, with finite gradients. Computed in float32 at least.

    ``scores`` may be overwritten (it must be a fresh tensor whose producer does not need it for its
    backward, e.g. a matmul output). When every row keeps something (the common case) it uses the fused
    softmax kernel. Returns (p, lse or None)."""
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    if not bool(blocked.all(-1).any()):
        s = s.masked_fill_(blocked, float("-inf"))
        p = torch.softmax(s, -1)
        return p, (torch.logsumexp(s, -1) if return_lse else None)
    s = s.masked_fill(blocked, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    nonempty = denom > 0
    p = e / torch.where(nonempty, denom, torch.ones_like(denom))
    lse = torch.where(nonempty, torch.log(torch.where(nonempty, denom, torch.ones_like(denom))) + m, float("-inf"))
    return p, lse.squeeze(-1)
