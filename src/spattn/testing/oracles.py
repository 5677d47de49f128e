"""Independent oracles: dense masked attention (float64 and same-dtype) and a brute-force token mask.

They share no code with any backend: a misread of the block tables in a fast path cannot hide here.
"""

from __future__ import annotations

import math

import torch


def _expand_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    H, Hk = query.shape[1], key.shape[1]
    if H % Hk:
        raise ValueError(f"query heads ({H}) must be a multiple of key heads ({Hk})")
    return key.repeat_interleave(H // Hk, 1), value.repeat_interleave(H // Hk, 1)


def dense_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 dense masked attention, GQA by repetition.

    Args:
        query: ``[B, H, Lq, D]``; key, value: ``[B, Hk, Lk, D]`` with ``H % Hk == 0``.
        allowed: bool, broadcastable to ``[B, H, Lq, Lk]`` (True = the pair is attended).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``(out [B, H, Lq, D] float64, lse [B, H, Lq] float64)``; a row with nothing allowed gives 0 and ``-inf``.
    """
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    k, v = _expand_kv(query, key.double(), value.double())
    s = query.double() @ k.transpose(-1, -2) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    p = torch.where(allowed, p, 0)
    return p @ v, lse


def plain_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same dense maths in the inputs' dtype (scores in float32): the baseline error of the tolerance rule.

    Shapes as :func:`dense_attention`; returns ``(out [B, H, Lq, D] in query.dtype, lse [B, H, Lq] float32)``.
    """
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    k, v = _expand_kv(query, key, value)
    s = (query @ k.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None]).masked_fill(~allowed, 0)
    return p.to(query.dtype) @ v, lse


def brute_force_mask(
    pattern, q_len: int, kv_len: int | None = None, *, causal: bool = False, heads: int = 1, batch: int = 1
) -> torch.Tensor:
    """A pattern's exact token mask from its ``token_mask`` at every position, with no block classification.

    Queries are aligned bottom-right when ``q_len < kv_len`` (query ``i`` sits at position ``kv_len - q_len + i``).
    Only static patterns (no dynamic selection) have a brute-force mask.

    Returns:
        bool ``[batch, heads, q_len, kv_len]``.
    """
    from spattn.patterns.base import Context

    kv_len = q_len if kv_len is None else kv_len
    ctx = Context(q_len=q_len, kv_len=kv_len, block_size=max(q_len, kv_len, 1), device=torch.device("cpu"),
                  causal=causal, batch=batch, heads=heads)
    offset = kv_len - q_len
    i = torch.arange(q_len, dtype=torch.int64).view(q_len, 1) + offset
    j = torch.arange(kv_len, dtype=torch.int64).view(1, kv_len)
    out = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            bt, ht = torch.full((1, 1), b), torch.full((1, 1), h)
            keep = torch.as_tensor(pattern.token_mask(ctx, bt, ht, i, j), dtype=torch.bool)
            if causal:
                keep = keep & (j <= i)
            out[b, h] = keep.expand(q_len, kv_len)
    return out
