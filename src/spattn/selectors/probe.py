"""``probe``: exact attention of a few probe queries of every query block, summed per key block
(the last-query probe of vertical-slash, applied per query block; query-block-local).

Math, for query block ``b`` with ``n_b`` queries starting at query index ``lo_b`` and ``r = min(queries, n_b)``
probe queries at indices ``i_t = lo_b + ceil((t + 1) n_b / r) - 1`` (``t < r``: evenly spread, the last query
of the block always among them), ``p_i`` the softmax of ``scale * q_i . k_j`` over the keys query ``i`` may
see (causal: ``j <= i + off``; ``allowed`` blocks only)::

    score[b, c] = 1/r * sum_t sum_{j in c} p_{i_t}(j)

Exact for the probe queries; cost ``r / block_size`` of the dense score matmul.
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
    matmul_dtype,
    reference_setup,
    register_selector,
)

_CHUNK_ELEMENTS = 1 << 26  # probe rows x keys x batch x heads scored at once


def probe_rows(q_len: int, block_size: int, queries: int, device) -> torch.Tensor:
    """int64 ``[NQ, r]``: the query indices probed in each query block (``r = min(queries, block_size)``;
    a short last block repeats its rows)."""
    r = min(queries, block_size)
    n = block_sizes(q_len, block_size, device)  # [NQ]
    lo = torch.arange(n.shape[0], device=device) * block_size
    t = torch.arange(1, r + 1, device=device)
    return lo[:, None] + torch.div(t[None, :] * n[:, None] + r - 1, r, rounding_mode="floor") - 1


@register_selector
@dataclasses.dataclass(frozen=True)
class Probe(Selector):
    """Exact attention of ``queries`` probe queries per query block (default 4), pooled per key block."""

    queries: int = 4
    name: ClassVar[str] = "probe"

    def __post_init__(self):
        if isinstance(self.queries, bool) or not isinstance(self.queries, int) or self.queries < 1:
            raise ValueError(f"probe: queries must be a positive int, got {self.queries!r}")

    def scores(self, query, key, *, block_size, causal=False, scale=None, allowed=None, exclude=None):
        """As :meth:`Selector.scores`; ``exclude`` (optional) is a predicate ``(i, j) -> bool`` on absolute
        query positions ``i [R, 1]`` and key positions ``j [1, Lk]``: the mass of the excluded keys is left out
        of the block sums (not renormalised), so the result is the share of each row's mass *outside* them
        (the missing mass of safeguards that keep exactly those keys)."""
        B, H, Hkv, Lq, Lk, D = check_qk(query, key, block_size)
        scale = default_scale(scale, D)
        dev, bs, off = query.device, block_size, Lk - Lq
        NQ, NK = -(-Lq // bs), -(-Lk // bs)
        rows = probe_rows(Lq, bs, self.queries, dev)  # [NQ, r]
        r = rows.shape[1]
        cdt = matmul_dtype(query)
        kk = key.to(cdt)
        j = torch.arange(Lk, device=dev)
        step = max(1, _CHUNK_ELEMENTS // max(B * H * r * Lk, 1))  # query blocks per chunk
        out = []
        for b0 in range(0, NQ, step):
            rr = rows[b0:b0 + step]  # [nb, r]
            nb = rr.shape[0]
            qp = query[:, :, rr.flatten()].to(cdt)  # [B, H, nb * r, D]
            logits = group_matmul(qp, kk).float() * scale  # [B, H, nb * r, Lk]
            see = torch.ones(nb * r, Lk, dtype=torch.bool, device=dev)
            if causal:
                see = j[None, :] <= rr.flatten()[:, None] + off
            see = see[None, None]
            if allowed is not None:  # [Bs, Hs, NQ, NK] -> [Bs, Hs, nb * r, Lk]
                blk = allowed[:, :, b0:b0 + nb].repeat_interleave(r, dim=2)
                see = see & blk.repeat_interleave(bs, dim=3)[..., :Lk]
            logits = logits.masked_fill(~see, -math.inf)
            mx = logits.amax(-1, keepdim=True)
            p = torch.exp(logits - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
            p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)  # rows seeing nothing stay 0
            if exclude is not None:
                p = p.masked_fill(exclude(rr.flatten()[:, None] + off, j[None, :]), 0.0)
            p = torch.nn.functional.pad(p, (0, NK * bs - Lk)).unflatten(-1, (NK, bs)).sum(-1)  # [B, H, nb*r, NK]
            out.append(p.unflatten(2, (nb, r)).mean(3))
        return torch.cat(out, dim=2)

    def reference(self, query, key, *, block_size, causal=False, scale=None):
        B, H, Hkv, Lq, Lk, D, scale, q, k, G, off, bs, NQ, NK, out = reference_setup(query, key, block_size, scale)
        for b in range(B):
            for h in range(H):
                for qi in range(NQ):
                    n = min(bs, Lq - qi * bs)
                    r = min(self.queries, bs)
                    for t in range(r):
                        i = qi * bs + math.ceil((t + 1) * n / r) - 1
                        last = i + off if causal else Lk - 1
                        p = torch.softmax((k[b, h // G, : last + 1] @ q[b, h, i]) * scale, 0)
                        for c in range(NK):
                            out[b, h, qi, c] += float(p[c * bs:(c + 1) * bs].sum()) / r
        return out
