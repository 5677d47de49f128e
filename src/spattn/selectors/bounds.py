"""``bounds``: per key block min/max of the keys; an upper bound on ``q . k`` (Quest, for decode).

Math, for key block ``c`` with elementwise ``kmin_c``, ``kmax_c`` over its keys, and any key ``k`` in it::

    q . k  <=  u(q, c) = sum_d max(q_d kmin_cd, q_d kmax_cd) = relu(q) . kmax_c - relu(-q) . kmin_c
    U[b, c] = max_{i in b} u(q_i, c)      (reduce="max": a true bound for every query of the block)
              u(mean_{i in b} q_i, c)     (reduce="mean": cheaper, approximate)
    score[b, c] = softmax_c( scale * U[b, c] + log n_c )    over the visible key blocks c

For decode (one query) both reductions are Quest's page bound.
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
    matmul_dtype,
    pool,
    reference_setup,
    register_selector,
    restrict,
    visible_blocks,
)

_CHUNK_ELEMENTS = 1 << 27  # query rows x key blocks x batch x heads evaluated at once (reduce="max")


@register_selector
@dataclasses.dataclass(frozen=True)
class Bounds(Selector):
    """Key-block min/max bounds. ``reduce``: "max" (bound over every query of the block) or "mean"."""

    reduce: str = "max"
    name: ClassVar[str] = "bounds"

    def __post_init__(self):
        if self.reduce not in ("max", "mean"):
            raise ValueError(f"bounds: reduce must be 'max' or 'mean', got {self.reduce!r}")

    def scores(self, query, key, *, block_size, causal=False, scale=None, allowed=None):
        B, H, Hkv, Lq, Lk, D = check_qk(query, key, block_size)
        scale = default_scale(scale, D)
        cdt = matmul_dtype(query)
        kmax = pool(key, block_size, "amax").to(cdt)  # [B, Hkv, NK, D] (max / min are exact in any dtype)
        kmin = pool(key, block_size, "amin").to(cdt)
        bs = block_size
        if self.reduce == "mean":
            q = pool(query, bs).to(cdt)
            U = group_matmul(q.clamp_min(0), kmax).float() - group_matmul((-q).clamp_min(0), kmin).float()
        else:
            NK = kmax.shape[2]
            rows = max(bs, (_CHUNK_ELEMENTS // max(B * H * NK, 1)) // bs * bs)  # whole query blocks per chunk
            parts = []
            for s in range(0, Lq, rows):
                q = query[:, :, s:s + rows].to(cdt)
                # [B, H, r, NK]
                u = group_matmul(q.clamp_min(0), kmax).float() - group_matmul((-q).clamp_min(0), kmin).float()
                parts.append(pool(u, bs, "amax"))
            U = torch.cat(parts, dim=2)
        logits = U * scale + torch.log(block_sizes(Lk, bs, query.device).float())
        return masked_softmax(logits, restrict(visible_blocks(Lq, Lk, bs, causal, query.device), allowed))

    def reference(self, query, key, *, block_size, causal=False, scale=None):
        B, H, Hkv, Lq, Lk, D, scale, q, k, G, off, bs, NQ, NK, out = reference_setup(query, key, block_size, scale)
        for b in range(B):
            for h in range(H):
                for qi in range(NQ):
                    qs = q[b, h, qi * bs:(qi + 1) * bs]
                    if self.reduce == "mean":
                        qs = qs.mean(0, keepdim=True)
                    last = min((qi + 1) * bs, Lq) - 1 + off
                    logits = torch.full((NK,), -math.inf, dtype=torch.float64)
                    for c in range(NK):
                        if causal and c * bs > last:
                            continue
                        keys = k[b, h // G, c * bs:(c + 1) * bs]
                        lo, hi = keys.min(0).values, keys.max(0).values
                        bound = torch.maximum(qs * lo, qs * hi).sum(-1).max()
                        logits[c] = scale * bound + math.log(keys.shape[0])
                    out[b, h, qi] = torch.softmax(logits, 0)
        return out
