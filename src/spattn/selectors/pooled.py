"""``pooled``: mean-pooled query block · mean-pooled key block, softmax-normalised per query block
(FlexPrefill's block estimate, MoBA's mean-pooled keys).

Math, for query block ``b`` and key block ``c`` (``n_c`` keys, ``scale`` the softmax scale)::

    qbar_b = mean_{i in b} q_i        kbar_c = mean_{j in c} k_j
    score[b, c] = softmax_c( scale * qbar_b . kbar_c + log n_c )     over the visible key blocks c

``log n_c`` counts the keys of the block, so a short tail block is not over-weighted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from spattn.selectors.common import (
    Selector,
    block_sizes,
    check_qk,
    default_scale,
    group_matmul,
    masked_softmax,
    pool,
    reference_setup,
    register_selector,
    restrict,
    visible_blocks,
)


@register_selector
@dataclasses.dataclass(frozen=True)
class Pooled(Selector):
    """Mean-pooled block scores. No options."""

    name: ClassVar[str] = "pooled"

    def scores(self, query, key, *, block_size, causal=False, scale=None, allowed=None):
        B, H, Hkv, Lq, Lk, D = check_qk(query, key, block_size)
        scale = default_scale(scale, D)
        qb = pool(query, block_size)  # [B, H, NQ, D] float32 (accumulated in float32, no copy of the input)
        kb = pool(key, block_size)  # [B, Hkv, NK, D]
        logits = group_matmul(qb, kb) * scale + torch.log(block_sizes(Lk, block_size, query.device).float())
        return masked_softmax(logits, restrict(visible_blocks(Lq, Lk, block_size, causal, query.device), allowed))

    def reference(self, query, key, *, block_size, causal=False, scale=None):
        B, H, Hkv, Lq, Lk, D, scale, q, k, G, off, bs, NQ, NK, out = reference_setup(query, key, block_size, scale)
        for b in range(B):
            for h in range(H):
                for qi in range(NQ):
                    qbar = q[b, h, qi * bs:(qi + 1) * bs].mean(0)
                    last = min((qi + 1) * bs, Lq) - 1 + off
                    logits = torch.full((NK,), -math.inf, dtype=torch.float64)
                    for c in range(NK):
                        if causal and c * bs > last:
                            continue
                        keys = k[b, h // G, c * bs:(c + 1) * bs]
                        logits[c] = scale * (qbar @ keys.mean(0)) + math.log(keys.shape[0])
                    out[b, h, qi] = torch.softmax(logits, 0)
        return out
