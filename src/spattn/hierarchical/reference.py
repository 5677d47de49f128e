"""The reference of hierarchical attention: dense masks per branch, plain PyTorch, CPU, autograd.

Short and obviously right (``O(L^2)`` memory; for tests and small inputs). Each branch is a masked softmax over
all keys with its token mask written out from the definition in :mod:`spattn.patterns.hierarchical`; the
selection ranks blocks by sorting. The fast path (:mod:`spattn.hierarchical.attention`) runs the same maths
through Layouts.
"""

from __future__ import annotations

import math

import torch

from spattn.hierarchical.common import check_inputs, compress, mix
from spattn.patterns import Hierarchical, brute_force_mask


def _masked_attention(q, k, v, mask, scale):
    """softmax(q k^T * scale) v over ``mask`` (rows with no key give 0)."""
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, p


def reference_chosen(scores: torch.Tensor, config: Hierarchical, kept: torch.Tensor) -> torch.Tensor:
    """bool ``[B, Hkv, NQ, NQ]``: own block + the ``select_count - 1`` best earlier, not-kept blocks (by sort)."""
    NQ = scores.shape[-1]
    qb = torch.arange(NQ, device=scores.device)
    available = ((qb[None, :] < qb[:, None]) & ~kept).expand(scores.shape)
    ranked = torch.where(available, scores, torch.full_like(scores, -math.inf))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(NQ, device=scores.device).expand(order.shape))
    return (available & (rank < config.select_count - 1)) | (qb[None, :] == qb[:, None])


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, config: Hierarchical, *,
              scale: float | None = None, gate_logits: torch.Tensor | None = None,
              pool_logits: tuple[torch.Tensor, torch.Tensor] | None = None, chosen: torch.Tensor | None = None,
              return_info: bool = False):
    """Hierarchical attention with dense masks; same arguments and result as
    :func:`~spattn.hierarchical.hierarchical_attention` (query ``[B, H, L, D]``, key/value ``[B, Hkv, L, D]``
    -> ``[B, H, L, Dv]``). ``chosen`` (``[B, Hkv, NQ, NQ]``) imposes the selected blocks instead of computing
    them (to compare implementations at equal selection)."""
    check_inputs(query, key, value, config, gate_logits, pool_logits)
    B, H, L, D = query.shape
    Hkv = key.shape[1]
    G, sb, NQ = H // Hkv, config.select_block, -(-L // config.select_block)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    rep = lambda x: x.repeat_interleave(G, 1)  # noqa: E731 - key/value head h // G serves query head h
    i = torch.arange(L, device=query.device)[:, None]
    j = torch.arange(L, device=query.device)[None, :]

    # compressed: token t = pool(keys [t s, t s + cb)), visible iff t s + cb - 1 <= i
    kc = compress(key, config, None if pool_logits is None else pool_logits[0])
    vc = compress(value, config, None if pool_logits is None else pool_logits[1])
    t = torch.arange(kc.shape[2], device=query.device)[None, :]
    mask_c = t * config.compress_stride + config.compress_block - 1 <= i
    out_c, p_c = _masked_attention(query, rep(kc), rep(vc), mask_c, scale)

    # selection: block scores = probabilities summed over group heads and block queries, mapped by overlap
    safeguard = torch.zeros(1, 1, L, L, dtype=torch.bool, device=query.device)
    if config.safeguard is not None:
        safeguard = brute_force_mask(config.safeguard, L, L, causal=True, batch=B, heads=H).to(query.device)
    if chosen is None:
        per_token = p_c.detach().float() @ config.overlap(L, query.device)  # [B, H, L, NS]
        per_token = per_token.view(B, Hkv, G, L, NQ).sum(2)
        scores = torch.zeros(B, Hkv, NQ, NQ, device=query.device).index_add_(2, i[:, 0] // sb, per_token)
        pad = NQ * sb - L
        touched = torch.nn.functional.pad(safeguard, (0, pad, 0, pad)).view(*safeguard.shape[:2], NQ, sb, NQ, sb)
        kept = touched.any(5).any(3)
        if kept.shape[1] > 1:
            kept = kept.view(kept.shape[0], Hkv, G, NQ, NQ).all(2)
        chosen = reference_chosen(scores, config, kept)
    chosen_tokens = rep(chosen)[:, :, i[:, 0] // sb][..., j[0] // sb]  # [B, H, L, L]
    mask_s = (chosen_tokens | safeguard) & (j <= i)
    out_s, _ = _masked_attention(query, rep(key), rep(value), mask_s, scale)

    # window: i - window < j <= i
    mask_w = (j <= i) & (j > i - config.window)
    out_w, _ = _masked_attention(query, rep(key), rep(value), mask_w, scale)

    outputs = [out_c, out_s, out_w]
    out = mix(outputs, config, gate_logits)
    if return_info:
        return out, {"chosen": chosen, "outputs": outputs, "masks": (mask_c, mask_s, mask_w)}
    return out


__all__ = ["reference", "reference_chosen"]
