"""The selection scores of hierarchical attention, from the compressed branch's own log-sum-exp.

For query block ``q`` (``select_block`` queries) of key/value head ``h`` and compressed token ``t``::

    token_scores[b, h, q, t] = sum over the group's query heads g and the block's queries i of
                               exp(scale * query[b, g, i] . compressed_key[b, h, t] - lse[b, g, i])
                               where t is visible to i (t * compress_stride + compress_block - 1 <= i)

which is the compressed branch's attention probability (``lse`` is that branch's log-sum-exp, returned by its
attention call, so no second softmax pass), summed as NSA sums it. ``token_scores @ overlap`` maps compressed
tokens to selection blocks. Two implementations of the same sum, no gradient:

* ``torch``: chunks of query blocks, one matmul and one exp per chunk (CPU, or CUDA without triton);
* ``triton`` (:mod:`spattn.hierarchical.triton_scores`): one program per (query block, key/value head), query
  rows in registers, compressed keys streamed in tiles, heaviest blocks first; no ``L x Nc`` tensor.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from spattn.patterns import Hierarchical

SCORE_BACKENDS = ("auto", "torch", "triton")
_SCORE_ELEMENTS = 1 << 26  # score elements per chunk of the torch path (256 MiB of float32)
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def compressed_lse(query: torch.Tensor, compressed_key: torch.Tensor, config: Hierarchical, *,
                   scale: float) -> torch.Tensor:
    """float32 ``[B, H, L]``: the compressed branch's log-sum-exp (``-inf`` where no compressed token is visible),
    streamed over query chunks (for callers without the branch's attention output, e.g. coverage)."""
    B, H, L, D = query.shape
    Hkv, nc = compressed_key.shape[1], compressed_key.shape[2]
    G = H // Hkv
    dtype = torch.promote_types(query.dtype, torch.float32)
    out = torch.full((B, H, L), -math.inf, device=query.device, dtype=torch.float32)
    if nc == 0:
        return out
    last_key = torch.arange(nc, device=query.device) * config.compress_stride + config.compress_block - 1
    kc = compressed_key.to(dtype).transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, D, Nc]
    chunk = max(1, _SCORE_ELEMENTS // max(1, B * H * nc))
    with torch.no_grad():
        for start in range(0, L, chunk):
            stop = min(L, start + chunk)
            q = query[:, :, start:stop].to(dtype).view(B, Hkv, G, stop - start, D)
            logits = (q @ kc) * scale
            visible = last_key[None, :] <= torch.arange(start, stop, device=query.device)[:, None]
            logits = logits.masked_fill(~visible, -math.inf)
            out[:, :, start:stop] = torch.logsumexp(logits, -1).view(B, H, stop - start).float()
    return out


def token_scores_torch(query: torch.Tensor, compressed_key: torch.Tensor, lse: torch.Tensor, config: Hierarchical,
                       *, scale: float) -> torch.Tensor:
    """float32 ``[B, Hkv, NQ, Nc]`` (module docstring), in chunks of query blocks."""
    B, H, L, D = query.shape
    Hkv, nc = compressed_key.shape[1], compressed_key.shape[2]
    G, sb = H // Hkv, config.select_block
    NQ = -(-L // sb)
    out = torch.zeros(B, Hkv, NQ, nc, device=query.device, dtype=torch.float32)
    if nc == 0:
        return out
    dtype = torch.promote_types(query.dtype, torch.float32)
    last_key = torch.arange(nc, device=query.device) * config.compress_stride + config.compress_block - 1
    kc = compressed_key.to(dtype).transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, D, Nc]
    chunk = max(sb, _SCORE_ELEMENTS // max(1, B * H * nc) // sb * sb)
    with torch.no_grad():
        for start in range(0, L, chunk):
            stop = min(L, start + chunk)
            c = stop - start
            q = query[:, :, start:stop].to(dtype).view(B, Hkv, G, c, D)
            logits = (q @ kc) * scale - lse[:, :, start:stop].to(dtype).view(B, Hkv, G, c, 1)
            visible = last_key[None, :] <= torch.arange(start, stop, device=query.device)[:, None]
            p = torch.where(visible, logits.exp(), 0.0).sum(2)  # [B, Hkv, c, Nc]
            nb = -(-c // sb)
            if nb * sb != c:
                p = torch.nn.functional.pad(p, (0, 0, 0, nb * sb - c))
            out[:, :, start // sb:start // sb + nb] = p.view(B, Hkv, nb, sb, nc).sum(3).float()
    return out


def selection_scores(query: torch.Tensor, compressed_key: torch.Tensor, config: Hierarchical, *, scale: float,
                     lse: torch.Tensor | None = None, overlap: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """float32 ``[B, Hkv, NQ, NS]``: compressed-attention probabilities summed over the queries of each query
    block (``select_block`` tokens) and the heads of each GQA group, mapped to selection blocks by
    :meth:`Hierarchical.overlap`. No gradient.

    Args:
        query: ``[B, H, L, D]``; compressed_key: ``[B, Hkv, Nc, D]`` (not padded).
        scale: the score scale of the compressed branch.
        lse: the compressed branch's log-sum-exp ``[B, H, L]`` (natural log), default ``None``: computed here
            (:func:`compressed_lse`).
        overlap: ``config.overlap(L)`` if already at hand (default ``None``: built here).
        backend: ``"auto"`` (triton on CUDA when installed, else torch), ``"torch"`` or ``"triton"``.
    """
    if backend not in SCORE_BACKENDS:
        raise ValueError(f"backend must be one of {SCORE_BACKENDS}, got {backend!r}")
    query, compressed_key = query.detach(), compressed_key.detach()
    if lse is None:
        lse = compressed_lse(query, compressed_key, config, scale=scale)
    lse = lse.detach()
    if backend == "auto":
        backend = "triton" if query.is_cuda and _HAS_TRITON else "torch"
    if backend == "triton":
        if not _HAS_TRITON:
            raise RuntimeError("backend='triton' needs triton (pip install 'spattn[gpu]')")
        from spattn.hierarchical.triton_scores import token_scores_triton

        token = token_scores_triton(query, compressed_key, lse, config, scale=scale)
    else:
        token = token_scores_torch(query, compressed_key, lse, config, scale=scale)
    if overlap is None:
        overlap = config.overlap(query.shape[2], query.device)
    return token @ overlap


__all__ = ["SCORE_BACKENDS", "compressed_lse", "selection_scores", "token_scores_torch"]
