"""``vertical_slash``: probe with the last queries, score key columns and diagonals (MInference).

Math. The probe is the last ``last`` queries ``r`` (absolute positions ``a_r``); ``p_r`` their softmax over
keys (causal: ``j <= a_r``). Column ("vertical") and diagonal ("slash", offset ``d = a - j``) profiles::

    v_j = mean_r p_r(j)                  s_d = mean_r p_r(a_r - d)          (each sums to 1)
    E[b, c] = 1/2 * ( sum_{j in c} v_j  +  1/n_b sum_{i in b} sum_{j in c} s_{a_i - j} )
    score[b, c] = E[b, c] / sum_{visible c'} E[b, c']                       over the visible key blocks

The slash term is evaluated in O(NQ * NK) with two prefix sums of ``s`` (float64, so long sequences keep
their precision).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from spattn.selectors.common import (
    Selector,
    check_qk,
    default_scale,
    group_matmul,
    matmul_dtype,
    normalise,
    reference_setup,
    register_selector,
    restrict,
    visible_blocks,
)


@register_selector
@dataclasses.dataclass(frozen=True)
class VerticalSlash(Selector):
    """Vertical + slash profiles from the last ``last`` queries (default 64)."""

    last: int = 64
    name: ClassVar[str] = "vertical_slash"

    def __post_init__(self):
        if isinstance(self.last, bool) or not isinstance(self.last, int) or self.last < 1:
            raise ValueError(f"vertical_slash: last must be a positive int, got {self.last!r}")

    def scores(self, query, key, *, block_size, causal=False, scale=None, allowed=None):
        B, H, Hkv, Lq, Lk, D = check_qk(query, key, block_size)
        scale = default_scale(scale, D)
        dev, bs, off = query.device, block_size, Lk - Lq
        R = min(self.last, Lq)
        a = torch.arange(Lq - R, Lq, device=dev) + off  # absolute probe positions [R]
        j = torch.arange(Lk, device=dev)
        cdt = matmul_dtype(query)
        logits = group_matmul(query[:, :, Lq - R:].to(cdt), key.to(cdt)).float() * scale  # [B, H, R, Lk]
        if causal:
            logits = logits.masked_fill(j[None, :] > a[:, None], float("-inf"))
        p = torch.softmax(logits, -1)
        v = p.mean(2)  # [B, H, Lk]
        # slash profile indexed by e = d + Lk - 1 in [0, 2 Lk - 1)
        # e = a_0 + r + (Lk - 1 - j): flip the key axis, shift row r right by r (skew), sum the rows
        skew = torch.nn.functional.pad(p.flip(-1), (0, R)).flatten(2)[..., : R * (Lk + R - 1)]
        skew = skew.view(B, H, R, Lk + R - 1).sum(2)  # [B, H, Lk + R - 1], entry t is e = a_0 + t
        s = torch.nn.functional.pad(skew.double(), (Lk - R, 0)) / R  # a_0 = Lk - R; length 2 Lk - 1
        # vertical block sums
        NK, NQ = -(-Lk // bs), -(-Lq // bs)
        V = torch.nn.functional.pad(v, (0, NK * bs - Lk)).view(B, H, NK, bs).sum(-1).double()
        # slash block sums: S1[x] = sum_{e < x} s_e, S2[x] = sum_{y < x} S1[y]
        S1 = torch.nn.functional.pad(s.cumsum(-1), (1, 0))  # [B, H, 2 Lk]
        S2 = torch.nn.functional.pad(S1.cumsum(-1), (1, 0))  # [B, H, 2 Lk + 1]
        qlo = torch.arange(NQ, device=dev) * bs + off  # absolute first / last query of each block
        qhi = torch.clamp(qlo - off + bs, max=Lq) - 1 + off
        klo = torch.arange(NK, device=dev) * bs
        khi = torch.clamp(klo + bs, max=Lk) - 1
        # sum_{a=qlo}^{qhi} [S1[a - klo + Lk] - S1[a - khi + Lk - 1]]
        hi_term = _range_sum(S2, qlo[:, None] - klo[None, :] + Lk, qhi[:, None] - klo[None, :] + Lk)
        lo_term = _range_sum(S2, qlo[:, None] - khi[None, :] + Lk - 1, qhi[:, None] - khi[None, :] + Lk - 1)
        n_b = (qhi - qlo + 1).double()[:, None]
        T = (hi_term - lo_term) / n_b
        E = 0.5 * (V[:, :, None, :] + T)
        return normalise(E, restrict(visible_blocks(Lq, Lk, bs, causal, dev), allowed)).float()

    def reference(self, query, key, *, block_size, causal=False, scale=None):
        B, H, Hkv, Lq, Lk, D, scale, q, k, G, off, bs, NQ, NK, out = reference_setup(query, key, block_size, scale)
        R = min(self.last, Lq)
        vis = visible_blocks(Lq, Lk, bs, causal, "cpu")
        for b in range(B):
            for h in range(H):
                v = torch.zeros(Lk, dtype=torch.float64)
                s = {}
                for r in range(Lq - R, Lq):
                    a = r + off
                    logit = (k[b, h // G] @ q[b, h, r]) * scale
                    if causal:
                        logit[a + 1:] = float("-inf")
                    p = torch.softmax(logit, 0)
                    v += p / R
                    for jj in range(Lk):
                        s[a - jj] = s.get(a - jj, 0.0) + float(p[jj]) / R
                E = torch.zeros(NQ, NK, dtype=torch.float64)
                for qi in range(NQ):
                    rows = range(qi * bs + off, min((qi + 1) * bs, Lq) + off)
                    for c in range(NK):
                        cols = range(c * bs, min((c + 1) * bs, Lk))
                        vert = float(v[c * bs:(c + 1) * bs].sum())
                        slash = sum(s.get(ai - jj, 0.0) for ai in rows for jj in cols) / len(rows)
                        E[qi, c] = 0.5 * (vert + slash)
                out[b, h] = normalise(E, vis)
        return out


def _range_sum(S2: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """``sum_{x=x0}^{x1} S1[x]`` for index grids ``[NQ, NK]`` via the second prefix sum ``S2 [B, H, 2 Lk + 1]``."""
    B, H, _ = S2.shape
    shape = x0.shape
    hi = S2.gather(-1, (x1 + 1).reshape(1, 1, -1).expand(B, H, -1))
    lo = S2.gather(-1, x0.reshape(1, 1, -1).expand(B, H, -1))
    return (hi - lo).view(B, H, *shape)
