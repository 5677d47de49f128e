"""Triton kernels of the fused decode page selection (see :mod:`spattn.ops.decode`).

Notation: B batch, Hkv key/value heads, G = H // Hkv query heads per key/value head (GP: G padded to a power
of two >= 16, the rows of the score tile), D head dim (DP padded), S page size (tokens per page), NP pages of the
cache's capacity C = NP * S (NPP: NP padded to a power of two, the top-k vector), W slots of the block tables
(WP padded, BLOCK_W slots per chunk of the mask pass), BLOCK_P pages per chunk, NC = cdiv(NP, BLOCK_P).

Two launches (Note [why two launches]):

``page_logit_kernel``, one program per (sequence b, key/value head k, chunk c of BLOCK_P pages): the static
row's tokens ``ROWS[step, b, :]`` and the valid keys ``VALID[b, :]`` of the chunk give ``kept`` (a safeguard
token of the page is valid) and ``visible`` (the page has a valid key), stored as ``CODE = visible + 2 * kept``;
the page minimum / maximum keys give Quest's bound ``u[g, p] = relu(q_g) . max_p - relu(-q_g) . min_p`` for
every query head g of the group and ``logit = u * scale + log(n_p)`` (``n_p`` tokens of the page up to the
query; ``-inf`` on pages that are not visible), stored per head.

``page_choose_kernel``, one program per (b, k), on whole NPP vectors:

1. ``score[p] = mean_g softmax_g(logit)[p]`` over the visible pages, normalised by its total (the torch
   selection's ``normalise``);
2. each available page (visible, not kept) packed with its index as ``bits(score) << 32 | (2**31 - 1 - p)``
   (scores are >= 0, so the int order is the float order and ties go to the lower page, as the stable sort of
   :func:`spattn.selectors.top_k` does); ``min(budget, available)`` rounds of max + remove take the top-k;
3. ``visit = kept | chosen`` compacted in ascending page order (cumsum) into the first W slots: ``KV_IDX``,
   ``KV_NUM`` (G copies, one per query head of the group), unused slots 0, and per slot ``2 * page + chosen``
   in the ``SLOTS`` scratch; a block barrier (``debug_barrier``, ``bar.sync``, makes the scratch visible to
   the whole program);
4. per chunk of BLOCK_W slots: row 0 of the slot's mask tile = ``(row | chosen) & valid`` over the page's
   tokens, zero for unused slots; ``STATS[b, k] = (attended tokens, visited pages, chosen pages)``.

Note [why two launches]: the first version was one program per (b, k) looping over every page four times
(24 programs at batch 8 on the H200's 132 SMs, each streaming 1024 pages' bounds and 2 * C token bytes
serially): 0.24 ms per layer at 128k, more than the split-K dense decode of the same layer (0.31 ms with its
tables). The page-parallel part (every byte read: bounds, rows, valid) now runs on B * Hkv * NC programs; what
needs the whole row (the softmax normalisers, the top-k, the ascending compaction) reads only ``G + 1`` floats
/ ints per page, in one program per (b, k), with no loop over pages.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOGIT_NO_SPECIALIZE = ["NP", "T", "sr_t", "sr_b", "sv_b"]
CHOOSE_NO_SPECIALIZE = ["NP", "W", "T", "sr_t", "sr_b", "sv_b"]


@triton.jit(do_not_specialize=LOGIT_NO_SPECIALIZE)
def page_logit_kernel(
    Q, KMIN, KMAX, ROWS, VALID, SLOT, STEP, LOGITS, CODE,
    scale, NP, T, sr_t, sr_b, sv_b, sq, sk,
    Hkv: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hkv
    k = pid % Hkv
    H = Hkv * G
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    offs_s = tl.arange(0, S)
    gvalid = offs_g < G
    dvalid = offs_d < D
    pages = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)   # [BLOCK_P]
    pm = pages < NP
    # q of the group's heads [GP, DP] (rows >= G are zero)
    q = tl.load(Q + b * sq[0] + (k * G + offs_g)[:, None] * sq[1] + offs_d[None, :],
                mask=gvalid[:, None] & dvalid[None, :], other=0.0).to(tl.float32)
    q_pos = tl.maximum(q, 0.0)
    q_neg = tl.maximum(-q, 0.0)
    length = tl.load(SLOT) + 1                                     # keys up to the query (its page sizes)
    step = tl.minimum(tl.maximum(tl.load(STEP), 0), T - 1)        # as the torch path: clamped to the rows
    tok = pages[:, None] * S + offs_s[None, :]                      # [BLOCK_P, S]
    rv = tl.load(ROWS + step * sr_t + b * sr_b + tok, mask=pm[:, None], other=0)
    vv = tl.load(VALID + b * sv_b + tok, mask=pm[:, None], other=0)
    visible = tl.max(vv.to(tl.int32), 1) > 0
    kept = tl.max((rv & vv).to(tl.int32), 1) > 0
    tl.store(CODE + (b * Hkv + k) * NP + pages, visible.to(tl.int32) + 2 * kept.to(tl.int32), mask=pm)
    kp = (b * Hkv + k) * sk[0] + pages[:, None] * sk[1] + offs_d[None, :]
    kmax = tl.load(KMAX + kp, mask=pm[:, None] & dvalid[None, :], other=0.0).to(tl.float32)
    kmin = tl.load(KMIN + kp, mask=pm[:, None] & dvalid[None, :], other=0.0).to(tl.float32)
    u = tl.dot(q_pos, tl.trans(kmax), input_precision="ieee") \
        - tl.dot(q_neg, tl.trans(kmin), input_precision="ieee")       # [GP, BLOCK_P]
    n_p = tl.minimum(tl.maximum(length - pages * S, 1), S).to(tl.float32)
    logit = u * scale + tl.log(n_p)[None, :]
    logit = tl.where(visible[None, :], logit, float("-inf"))
    tl.store(LOGITS + (b * H + k * G + offs_g)[:, None] * NP + pages[None, :], logit,
             mask=gvalid[:, None] & pm[None, :])


@triton.jit(do_not_specialize=CHOOSE_NO_SPECIALIZE)
def page_choose_kernel(
    ROWS, VALID, STEP, BUDGET, LOGITS, CODE, SLOTS,
    KV_NUM, KV_IDX, MASKS, STATS,
    NP, W, T, sr_t, sr_b, sv_b,
    Hkv: tl.constexpr, G: tl.constexpr, S: tl.constexpr, NPP: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hkv
    k = pid % Hkv
    H = Hkv * G
    idx = tl.arange(0, NPP)
    im = idx < NP
    flags = tl.load(CODE + (b * Hkv + k) * NP + idx, mask=im, other=0)
    visible = (flags & 1) != 0
    kept = (flags & 2) != 0
    # ---- 1. the group's page score: the mean of the per-head softmax over the visible pages
    score = tl.zeros([NPP], tl.float32)
    for g in tl.static_range(G):
        logit = tl.load(LOGITS + (b * H + k * G + g) * NP + idx, mask=im, other=float("-inf"))
        m = tl.max(logit, 0)
        e = tl.exp(logit - tl.where(m == float("-inf"), 0.0, m))
        total_g = tl.sum(e, 0)
        score += e / tl.where(total_g == 0.0, 1.0, total_g)
    score = tl.where(visible, tl.maximum(score / G, 0.0), 0.0)
    score = score / tl.maximum(tl.sum(score, 0), 1.1754943508222875e-38)
    # ---- 2. top-k of the available pages
    available = visible & ~kept
    packed = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)
    key = tl.where(available, packed, -1)
    rounds = tl.minimum(tl.minimum(tl.load(BUDGET), NP).to(tl.int32), tl.sum(available.to(tl.int32), 0))
    chosen = idx < 0
    for _ in range(0, rounds):
        top = tl.max(key, 0)
        hit = key == top
        chosen = chosen | hit
        key = tl.where(hit, -1, key)
    # ---- 3. visited pages in ascending order into the first W slots
    visit = ((kept.to(tl.int32) + chosen.to(tl.int32)) > 0) & im  # (int compare: a bool dtype in the interpreter)
    pos = tl.cumsum(visit.to(tl.int32), 0) - 1
    stored = visit & (pos < W)
    n = tl.minimum(tl.sum(visit.to(tl.int32), 0), W)
    slot_base = (b * Hkv + k) * W
    tl.store(SLOTS + slot_base + pos, (2 * idx + chosen.to(tl.int32)).to(tl.int32), mask=stored)
    for g in tl.static_range(G):
        h = k * G + g
        tl.store(KV_IDX + (b * H + h) * W + pos, idx.to(tl.int32), mask=stored)
        tl.store(KV_NUM + b * H + h, n.to(tl.int32))
    tl.debug_barrier()
    # ---- 4. row 0 of each slot's mask tile (unused slots zeroed), unused table slots 0
    step = tl.minimum(tl.maximum(tl.load(STEP), 0), T - 1)
    row_base = ROWS + step * sr_t + b * sr_b
    valid_base = VALID + b * sv_b
    offs_w = tl.arange(0, BLOCK_W)
    offs_s = tl.arange(0, S)
    attended = tl.zeros([BLOCK_W], tl.int32)
    for j0 in range(0, W, BLOCK_W):
        js = j0 + offs_w
        jm = js < W
        used = js < n
        code = tl.load(SLOTS + slot_base + js, mask=used, other=0)
        page = (code >> 1).to(tl.int64)
        ch = (code & 1) != 0
        tok = page[:, None] * S + offs_s[None, :]
        rv = tl.load(row_base + tok, mask=used[:, None], other=0) != 0
        vv = tl.load(valid_base + tok, mask=used[:, None], other=0) != 0
        keep = (rv | ch[:, None]) & vv & used[:, None]
        tl.store(MASKS + (slot_base + js)[:, None] * (S * S) + offs_s[None, :], keep.to(tl.uint8),
                 mask=jm[:, None])
        attended += tl.sum(keep.to(tl.int32), 1)
        for g in tl.static_range(G):
            tl.store(KV_IDX + (b * H + k * G + g) * W + js, tl.zeros([BLOCK_W], tl.int32), mask=jm & ~used)
    st = STATS + (b * Hkv + k) * 3
    tl.store(st, tl.sum(attended, 0))
    tl.store(st + 1, n)
    tl.store(st + 2, tl.sum(chosen.to(tl.int32), 0))


@triton.jit(do_not_specialize=["n_out", "n_query", "index"])
def nonfinite_flag_kernel(OUT, QUERY, FLAGS, n_out, n_query, index, BLOCK: tl.constexpr):
    """One program: ``FLAGS[index] |= any(OUT is not finite) & all(QUERY is finite)`` (``|x| < inf`` is an
    ordered compare: false for NaN and for +-inf)."""
    offs = tl.arange(0, BLOCK)
    bad = tl.zeros([BLOCK], tl.int32)
    for i in range(0, n_out, BLOCK):
        x = tl.load(OUT + i + offs, mask=i + offs < n_out, other=0.0).to(tl.float32)
        bad = bad | (~(tl.abs(x) < float("inf"))).to(tl.int32)
    fine = tl.full([BLOCK], 1, tl.int32)
    for i in range(0, n_query, BLOCK):
        x = tl.load(QUERY + i + offs, mask=i + offs < n_query, other=0.0).to(tl.float32)
        fine = fine & (tl.abs(x) < float("inf")).to(tl.int32)
    flag = (tl.max(bad, 0) & tl.min(fine, 0)) != 0
    old = tl.load(FLAGS + index) != 0
    tl.store(FLAGS + index, (old | flag).to(tl.uint8))


@triton.jit
def append_static_kernel(
    KEY, VALUE, KEYS, VALUES, KMIN, KMAX, SLOT,
    sk_in, sv_in, s_keys, s_values, s_bounds,
    Hkv: tl.constexpr, S: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
):
    """One program per (b, key/value head): the token's key / value written at the cache slot ``SLOT[0]`` and
    the page minimum / maximum keys updated (reset to the key on a page's first slot), as
    ``PagedLayer._update_static`` does with torch ops."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hkv
    k = pid % Hkv
    slot = tl.load(SLOT)
    page = slot // S
    first = (slot % S) == 0
    offs_d = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    dm = offs_d < D
    vm = offs_v < DV
    key = tl.load(KEY + b * sk_in[0] + k * sk_in[1] + offs_d, mask=dm)
    value = tl.load(VALUE + b * sv_in[0] + k * sv_in[1] + offs_v, mask=vm)
    tl.store(KEYS + b * s_keys[0] + k * s_keys[1] + slot * s_keys[2] + offs_d, key, mask=dm)
    tl.store(VALUES + b * s_values[0] + k * s_values[1] + slot * s_values[2] + offs_v, value, mask=vm)
    bound = b * s_bounds[0] + k * s_bounds[1] + page * s_bounds[2] + offs_d
    old_min = tl.load(KMIN + bound, mask=dm)
    old_max = tl.load(KMAX + bound, mask=dm)
    tl.store(KMIN + bound, tl.where(first, key, tl.minimum(old_min, key)), mask=dm)
    tl.store(KMAX + bound, tl.where(first, key, tl.maximum(old_max, key)), mask=dm)
