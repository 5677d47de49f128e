"""Triton kernel of the fused decode page selection (see :mod:`spattn.ops.decode`).

Notation: B batch, Hkv key/value heads, G = H // Hkv query heads per key/value head (GP: G padded to a power
of two >= 16, the rows of the score tile), D head dim (DP padded), S page size (tokens per page), NP pages of the
cache's capacity C = NP * S (NPP: NP padded to a power of two, the top-k vector), W slots of the block tables
(WP padded), BLOCK_P pages per chunk. One program per (sequence b, key/value head k); four passes over the
pages, each ending with a block barrier (the passes hand results to each other through global scratch, which
``debug_barrier`` (``bar.sync``) makes visible to the whole program):

1. per chunk of pages: the static row's tokens ``ROWS[step, b, :]`` and the valid keys ``VALID[b, :]`` give
   ``kept`` (a safeguard token of the page is valid) and ``visible`` (the page has a valid key); the page
   minimum / maximum keys give Quest's bound ``u[g, p] = relu(q_g) . max_p - relu(-q_g) . min_p`` for every
   query head g of the group, ``logit = u * scale + log(n_p)`` (``n_p`` tokens of the page up to the query),
   stored per head with the online max / sum of the per-head softmax over the visible pages;
2. per chunk: ``score[p] = mean_g softmax_g(logit)[p]`` over the visible pages, and its total;
3. whole vector (NPP): the normalised score of each available page (visible, not kept) packed with its index
   as ``bits(score) << 32 | (NPP - 1 - p)`` (scores are >= 0, so the int order is the float order and ties go
   to the lower page, as the stable sort of :func:`spattn.selectors.top_k` does); ``min(budget, NP)`` rounds of
   max + remove take the top-k; ``visit = kept | chosen`` compacted in ascending page order (cumsum) into the
   first W slots: ``KV_IDX``, ``KV_NUM`` (G copies, one per query head of the group), unused slots 0;
4. per chunk: row 0 of each visited slot's mask tile = ``(row | chosen) & valid`` over the page's tokens;
   the tiles of unused slots are zeroed; ``STATS[b, k] = (attended tokens, visited pages, chosen pages)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

DO_NOT_SPECIALIZE = ["NP", "W", "T", "sr_t", "sr_b", "sv_b"]


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def page_select_kernel(
    Q, KMIN, KMAX, ROWS, VALID, SLOT, STEP, BUDGET,
    LOGITS, SCORE, CODE,
    KV_NUM, KV_IDX, MASKS, STATS,
    scale, NP, W, T, sr_t, sr_b, sv_b, sq, sk,
    Hkv: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, S: tl.constexpr,
    BLOCK_P: tl.constexpr, NPP: tl.constexpr, WP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hkv
    k = pid % Hkv
    H = Hkv * G
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    offs_p = tl.arange(0, BLOCK_P)
    offs_s = tl.arange(0, S)
    gvalid = offs_g < G
    dvalid = offs_d < D
    # q of the group's heads [GP, DP] (rows >= G are zero)
    q = tl.load(Q + b * sq[0] + (k * G + offs_g)[:, None] * sq[1] + offs_d[None, :],
                mask=gvalid[:, None] & dvalid[None, :], other=0.0).to(tl.float32)
    q_pos = tl.maximum(q, 0.0)
    q_neg = tl.maximum(-q, 0.0)
    length = tl.load(SLOT) + 1                                     # keys up to the query (its page sizes)
    step = tl.minimum(tl.maximum(tl.load(STEP), 0), T - 1)        # as the torch path: clamped to the rows
    row_base = ROWS + step * sr_t + b * sr_b
    valid_base = VALID + b * sv_b
    stat_base = (b * Hkv + k) * NP                                  # [B, Hkv, NP] scratch
    logit_base = (b * H + k * G) * NP                               # [B, H, NP] scratch
    m_g = tl.full([GP], float("-inf"), tl.float32)
    l_g = tl.zeros([GP], tl.float32)
    # ---- pass 1: kept / visible pages, per-head logits, online softmax statistics
    for p0 in range(0, NP, BLOCK_P):
        pages = p0 + offs_p                                         # [BLOCK_P]
        pm = pages < NP
        tok = pages[:, None] * S + offs_s[None, :]                  # [BLOCK_P, S]
        rv = tl.load(row_base + tok, mask=pm[:, None], other=0)
        vv = tl.load(valid_base + tok, mask=pm[:, None], other=0)
        visible = tl.max(vv.to(tl.int32), 1) > 0
        kept = tl.max((rv & vv).to(tl.int32), 1) > 0
        tl.store(CODE + stat_base + pages, visible.to(tl.int32) + 2 * kept.to(tl.int32), mask=pm)
        kp = (b * Hkv + k) * sk[0] + pages[:, None] * sk[1] + offs_d[None, :]
        kmax = tl.load(KMAX + kp, mask=pm[:, None] & dvalid[None, :], other=0.0).to(tl.float32)
        kmin = tl.load(KMIN + kp, mask=pm[:, None] & dvalid[None, :], other=0.0).to(tl.float32)
        u = tl.dot(q_pos, tl.trans(kmax), input_precision="ieee") \
            - tl.dot(q_neg, tl.trans(kmin), input_precision="ieee")   # [GP, BLOCK_P]
        n_p = tl.minimum(tl.maximum(length - pages * S, 1), S).to(tl.float32)
        logit = u * scale + tl.log(n_p)[None, :]
        logit = tl.where(visible[None, :] & gvalid[:, None], logit, float("-inf"))
        tl.store(LOGITS + logit_base + offs_g[:, None] * NP + pages[None, :], logit,
                 mask=gvalid[:, None] & pm[None, :])
        m_new = tl.maximum(m_g, tl.max(logit, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_g = l_g * tl.exp(m_g - m_safe) + tl.sum(tl.exp(logit - m_safe[:, None]), 1)
        m_g = m_new
    tl.debug_barrier()
    # ---- pass 2: the group's page score, mean of the per-head distributions
    m_safe = tl.where(m_g == float("-inf"), 0.0, m_g)
    l_safe = tl.where(l_g == 0.0, 1.0, l_g)
    total = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(0, NP, BLOCK_P):
        pages = p0 + offs_p
        pm = pages < NP
        logit = tl.load(LOGITS + logit_base + offs_g[:, None] * NP + pages[None, :],
                        mask=gvalid[:, None] & pm[None, :], other=float("-inf"))
        prob = tl.exp(logit - m_safe[:, None]) / l_safe[:, None]
        score = tl.sum(prob, 0) / G
        tl.store(SCORE + stat_base + pages, score, mask=pm)
        total += tl.where(pm, score, 0.0)
    total_sum = tl.sum(total, 0)
    tl.debug_barrier()
    # ---- pass 3: top-k of the available pages, visit list in ascending page order
    idx = tl.arange(0, NPP)
    im = idx < NP
    flags = tl.load(CODE + stat_base + idx, mask=im, other=0)
    visible = (flags & 1) != 0
    kept = (flags & 2) != 0
    score = tl.load(SCORE + stat_base + idx, mask=im, other=0.0)
    score = tl.where(visible, tl.maximum(score, 0.0), 0.0) / tl.maximum(total_sum, 1.1754943508222875e-38)
    available = visible & ~kept
    packed = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (NPP - 1 - idx).to(tl.int64)
    key = tl.where(available, packed, -1)
    budget = tl.minimum(tl.load(BUDGET), NP).to(tl.int32)
    chosen = idx < 0
    for _ in range(0, budget):
        top = tl.max(key, 0)
        hit = key == top
        chosen = chosen | (hit & (top >= 0))
        key = tl.where(hit, -1, key)
    visit = ((kept.to(tl.int32) + chosen.to(tl.int32)) > 0) & im  # (int compare: a bool dtype in the interpreter)
    pos = tl.cumsum(visit.to(tl.int32), 0) - 1
    stored = visit & (pos < W)
    n = tl.minimum(tl.sum(visit.to(tl.int32), 0), W)
    tl.store(CODE + stat_base + idx, tl.where(stored, 2 * pos + chosen.to(tl.int32), -1), mask=im)
    slots = tl.arange(0, WP)
    for g in tl.static_range(G):
        h = k * G + g
        tl.store(KV_IDX + (b * H + h) * W + pos, idx.to(tl.int32), mask=stored)
        tl.store(KV_IDX + (b * H + h) * W + slots, tl.zeros([WP], tl.int32), mask=(slots >= n) & (slots < W))
        tl.store(KV_NUM + b * H + h, n.to(tl.int32))
    tl.debug_barrier()
    # ---- pass 4: row 0 of each visited slot's mask tile; unused slots zeroed
    tile_base = (b * Hkv + k) * W
    attended = tl.zeros([BLOCK_P], tl.int32)
    for p0 in range(0, NP, BLOCK_P):
        pages = p0 + offs_p
        pm = pages < NP
        code = tl.load(CODE + stat_base + pages, mask=pm, other=-1)
        sel = code >= 0
        slot = (code >> 1).to(tl.int64)
        ch = (code & 1) != 0
        tok = pages[:, None] * S + offs_s[None, :]
        rv = tl.load(row_base + tok, mask=sel[:, None], other=0) != 0
        vv = tl.load(valid_base + tok, mask=sel[:, None], other=0) != 0
        keep = (rv | ch[:, None]) & vv
        tl.store(MASKS + (tile_base + slot)[:, None] * (S * S) + offs_s[None, :], keep.to(tl.uint8),
                 mask=sel[:, None])
        attended += tl.sum(keep.to(tl.int32), 1)
    for j0 in range(0, W, BLOCK_P):
        js = j0 + offs_p
        unused = (js >= n) & (js < W)
        tl.store(MASKS + (tile_base + js)[:, None].to(tl.int64) * (S * S) + offs_s[None, :],
                 tl.zeros([BLOCK_P, S], tl.uint8), mask=unused[:, None])
    st = STATS + (b * Hkv + k) * 3
    tl.store(st, tl.sum(attended, 0))
    tl.store(st + 1, n)
    tl.store(st + 2, tl.sum(chosen.to(tl.int32), 0))
