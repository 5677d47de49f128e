"""``antidiagonal``: strided antidiagonal sums (XAttention).

Math. Tile the (query index, key) plane into ``S x S`` tiles (``S = stride``, dividing ``block_size``;
query and key are zero-padded to a multiple of ``S``). Tile ``(m, n)`` sums the products on its
antidiagonal, which meets every row and every column of the tile once::

    A[m, n] = sum_{t < S} q_{mS + S-1-t} . k_{nS + t}
    P[m, :] = softmax_n( scale * A[m, n] / S )        over tiles n with keys (nS < Lk) that are visible
                                                      (causal: nS <= mS + S - 1 + off)
    score[b, c] = mean_{m in b, mS < Lq} sum_{n in c} P[m, n]

``A`` is one matmul of the strided-down query ``[Lq/S, S*D]`` and key ``[Lk/S, S*D]``: cost L^2 D / S.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from spattn.selectors.common import Selector, check_qk, default_scale, group_matmul, matmul_dtype, register_selector

_CHUNK_ELEMENTS = 1 << 27  # strided query rows x key tiles x batch x heads scored at once


@register_selector
@dataclasses.dataclass(frozen=True)
class Antidiagonal(Selector):
    """Strided antidiagonal scores with ``stride`` S (default 8; must divide the block size)."""

    stride: int = 8
    name: ClassVar[str] = "antidiagonal"

    def __post_init__(self):
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"antidiagonal: stride must be a positive int, got {self.stride!r}")

    def _check(self, block_size: int) -> int:
        if block_size % self.stride:
            raise ValueError(f"antidiagonal: stride {self.stride} must divide block_size {block_size}")
        return block_size // self.stride

    def scores(self, query, key, *, block_size, causal=False, scale=None, allowed=None):
        B, H, Hkv, Lq, Lk, D = check_qk(query, key, block_size)
        scale = default_scale(scale, D)
        S, dev, off = self.stride, query.device, Lk - Lq
        per = self._check(block_size)  # tiles per block side
        M, N = -(-Lq // S), -(-Lk // S)
        NQ, NK = -(-Lq // block_size), -(-Lk // block_size)
        cdt = matmul_dtype(query)
        qs = torch.nn.functional.pad(query.to(cdt), (0, 0, 0, M * S - Lq)).unflatten(2, (M, S)).flip(3).flatten(3)
        ks = torch.nn.functional.pad(key.to(cdt), (0, 0, 0, N * S - Lk)).unflatten(2, (N, S)).flatten(3)
        n = torch.arange(N, device=dev)
        rows = max(per, (_CHUNK_ELEMENTS // max(B * H * N, 1)) // per * per)  # whole query blocks per chunk
        out = []
        for m0 in range(0, M, rows):
            m = torch.arange(m0, min(m0 + rows, M), device=dev)
            logits = group_matmul(qs[:, :, m0:m0 + rows], ks).float() * (scale / S)  # [B, H, r, N] (input dtype matmul)
            vis = (n * S < Lk)[None, :]
            if causal:
                vis = vis & (n[None, :] * S <= m[:, None] * S + S - 1 + off)
            if allowed is not None:  # [Bs, Hs, NQ, NK] -> tiles of these rows
                blk = allowed[:, :, (m * S) // block_size][..., (n * S) // block_size]
                vis = vis & blk
            logits.masked_fill_(~vis, -math.inf)
            if allowed is None:  # every row sees key tile 0: the fused softmax is safe
                p = torch.softmax(logits, -1)
            else:  # rows may see nothing: no NaN
                mx = logits.amax(-1, keepdim=True)
                p = torch.exp(logits - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
                p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
            p = torch.nn.functional.pad(p, (0, NK * per - N)).unflatten(-1, (NK, per)).sum(-1)  # [B, H, r, NK]
            r = p.shape[2]
            p = torch.nn.functional.pad(p, (0, 0, 0, -r % per)).unflatten(2, (-1, per)).sum(3)
            out.append(p)
        E = torch.cat(out, dim=2)
        # rows m with mS < Lq in each query block
        qrows = torch.clamp(Lq - torch.arange(NQ, device=dev) * block_size, max=block_size)
        return E / (-(-qrows // S)).float()[:, None]

    def reference(self, query, key, *, block_size, causal=False, scale=None):
        B, H, Hkv, Lq, Lk, D = check_qk(query, key, block_size)
        scale = default_scale(scale, D)
        S, G, off, bs = self.stride, H // Hkv, Lk - Lq, block_size
        self._check(bs)
        M, N = -(-Lq // S), -(-Lk // S)
        NQ, NK = -(-Lq // bs), -(-Lk // bs)
        out = torch.zeros(B, H, NQ, NK, dtype=torch.float64)
        for b in range(B):
            for h in range(H):
                q, k = query[b, h].double(), key[b, h // G].double()
                for mm in range(M):
                    logits = torch.full((N,), -math.inf, dtype=torch.float64)
                    for nn in range(N):
                        if causal and nn * S > mm * S + S - 1 + off:
                            continue
                        a = 0.0
                        for t in range(S):
                            i, j = mm * S + S - 1 - t, nn * S + t
                            if i < Lq and j < Lk:
                                a += float(q[i] @ k[j])
                        logits[nn] = scale * a / S
                    p = torch.softmax(logits, 0)
                    qb = mm * S // bs
                    for nn in range(N):
                        out[b, h, qb, nn * S // bs] += p[nn]
                rows = torch.tensor([-(-min(bs, Lq - qb * bs) // S) for qb in range(NQ)], dtype=torch.float64)
                out[b, h] /= rows[:, None]
        return out
