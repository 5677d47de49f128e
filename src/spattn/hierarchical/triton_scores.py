"""Triton kernel of the selection scores (:mod:`spattn.hierarchical.scores`): ``token_scores[b, h, q, t]``.

Notation: ``B`` batch, ``H`` query heads, ``HKV`` key/value heads, ``G = H / HKV``, ``L`` length, ``NC``
compressed tokens, ``SB`` select_block (query rows of one block), ``CB`` / ``CS`` compress block / stride,
``D`` head dim (``DP`` its power-of-two padding), ``BLOCK_R`` rows of the group's (head, query) rows per
step, ``BLOCK_T`` compressed tokens per tile.

One program per (query block, batch x key/value head), heaviest (latest) query blocks first. The program walks
the ``G * SB`` rows of its group in chunks of ``BLOCK_R`` (row ``r``: head ``r // SB``, query ``r % SB``), and
for each chunk the compressed tokens its last query can see, in tiles: ``p = exp2(s * log2e - lse * log2e)``,
masked to the visible tokens, summed over the rows and added to the output row it owns (the first chunk
stores, the others load, add and store; no atomics, so the sum is deterministic).

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spattn.patterns import Hierarchical

LOG2E = 1.4426950408889634


@triton.jit
def _token_scores_kernel(
    Q, KC, LSE, OUT,
    scale_log2, L, NC, NQ, HKV, G,
    sqb, sqh, sql, skb, skh, skn, slb, slh, sob, soh, soq,
    CB: tl.constexpr, CS: tl.constexpr, SB: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr,
):
    qb = NQ - 1 - tl.program_id(0)  # heaviest first
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    last = tl.minimum(L - 1, qb * SB + SB - 1)  # the block's last query
    reach = last - CB + 1
    n_vis = tl.minimum(tl.where(reach >= 0, reach // CS + 1, 0), NC)  # tokens its last query sees
    d = tl.arange(0, DP)
    r_off = tl.arange(0, BLOCK_R)
    t_off = tl.arange(0, BLOCK_T)
    out_row = OUT + b * sob + hk * soh + qb * soq
    for r0 in range(0, G * SB, BLOCK_R):
        r = r0 + r_off
        head = hk * G + r // SB
        i = qb * SB + r % SB
        row_ok = (r < G * SB) & (i < L)
        q = tl.load(Q + b * sqb + head[:, None] * sqh + i[:, None] * sql + d[None, :],
                    mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        lse2 = tl.load(LSE + b * slb + head * slh + i, mask=row_ok, other=0.0) * 1.4426950408889634
        for t0 in range(0, n_vis, BLOCK_T):
            t = t0 + t_off
            k = tl.load(KC + b * skb + hk * skh + t[:, None] * skn + d[None, :],
                        mask=(t[:, None] < n_vis) & (d[None, :] < D), other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            visible = (t[None, :] * CS + CB - 1 <= i[:, None]) & row_ok[:, None] & (t[None, :] < n_vis)
            p = tl.where(visible, tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
            col = tl.sum(p, 0)
            if r0 > 0:
                col += tl.load(out_row + t, mask=t < n_vis, other=0.0)
            tl.store(out_row + t, col, mask=t < n_vis)


def token_scores_triton(query: torch.Tensor, compressed_key: torch.Tensor, lse: torch.Tensor, config: Hierarchical,
                        *, scale: float) -> torch.Tensor:
    """float32 ``[B, Hkv, NQ, Nc]``: the selection's per-token scores (query ``[B, H, L, D]``, compressed_key
    ``[B, Hkv, Nc, D]``, lse float32 ``[B, H, L]`` natural log); the same sum as ``token_scores_torch``."""
    B, H, L, D = query.shape
    Hkv, nc = compressed_key.shape[1], compressed_key.shape[2]
    G, sb = H // Hkv, config.select_block
    NQ = -(-L // sb)
    out = torch.zeros(B, Hkv, NQ, nc, device=query.device, dtype=torch.float32)
    if nc == 0:
        return out
    q = query if query.stride(-1) == 1 else query.contiguous()
    kc = compressed_key.to(query.dtype)
    kc = kc if kc.stride(-1) == 1 else kc.contiguous()
    lse = lse.float().contiguous()
    rows = G * sb
    block_r = max(16, min(128, triton.next_power_of_2(rows)))
    big = D > 64 or query.dtype == torch.float32
    block_t = 64 if big else 128
    interpreted = query.device.type != "cuda"
    _token_scores_kernel[(NQ, B * Hkv)](
        q, kc, lse, out, scale * LOG2E, L, nc, NQ, Hkv, G,
        q.stride(0), q.stride(1), q.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), out.stride(2),
        CB=config.compress_block, CS=config.compress_stride, SB=sb, D=D, DP=max(16, triton.next_power_of_2(D)),
        BLOCK_R=block_r, BLOCK_T=block_t, IEEE=query.dtype == torch.float32 and not interpreted,
        num_warps=8 if big and not interpreted else 4, num_stages=2,
    )
    return out


__all__ = ["token_scores_triton"]
