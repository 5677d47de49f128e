"""Forward block-sparse attention over a Layout's kv tables: the one block step, the prefill kernel (grid or
persistent) and the split-K decode kernel with its fused combine.

Notation: B batch, H query heads, G = H // Hkv query heads per kv head, Lq/Lk query/key lengths,
D head dim (DP = D padded to a power of two), BS the layout block size, BLOCK_M/BLOCK_N the kernel tiles
(BLOCK_M and BLOCK_N divide BS: a layout block is visited as BS // BLOCK_N sub-tiles), NM = cdiv(Lq, BLOCK_M)
row tiles per head. Stride tuples: ``s*`` = (batch, head, row) of a tensor, ``st_*`` of a table (0 = broadcast).
Scores s = q.k stay raw; the running max m lives in the log2 domain (m = max(s) * scale * log2(e), needs
scale > 0) so p = exp2(s * qk_scale - m) is one FMA and an exp2 per score; lse is returned in natural log.

Note [empty rows]: a row that sees no key keeps m = -inf and l = 0; we subtract a "safe" max (0 when
m = -inf) so exp2 never sees -inf - -inf, and finish with out = 0, lse = -inf.
Note [tails]: EVEN means Lk % BS == 0 (every visited key column exists); otherwise loads are masked and full
blocks mask key columns >= Lk. Rows >= Lq are computed on zero-padded queries and never stored. Stored masks
are False out of bounds by construction.
Note [band]: when the host has checked that every stored mask tile equals a closed form (a band
``-right <= i - j <= left`` plus ``j < sinks``; ``_plan.band``), BAND computes the partial tiles' masks from
iota instead of loading them, and FULL_RUN (each row's full blocks are one contiguous run) replaces the full
table walk by ``first + e``.
Note [persistent]: PERSISTENT launches about one program per SM; each walks ORDER (row tiles sorted by their
visited-block count, heaviest first, ``_plan.order``) with a grid stride, so uneven sparse rows balance.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._primitives import TABLE_STRIDES, band_keep, dot, head_ptr, load_rows, row_ptr, store_rows

_BAND_ARGS = ("offset", "band_left", "band_right", "n_sinks", "sink_min_d")
# Note [one compile per length] in _primitives.py
DO_NOT_SPECIALIZE = {
    "attn_fwd_kernel": ["Lq", "Lk", "NM", "TOTAL", *_BAND_ARGS, *TABLE_STRIDES],
    "decode_kernel": ["Lk", "S", "PER", *_BAND_ARGS, *TABLE_STRIDES],
}

LN2 = tl.constexpr(0.6931471805599453)  # natural log of 2


@triton.jit
def forward_block(
    acc, l_i, m_i, q, k_base, v_base, stride_k, stride_v, cols, Lk, offs_d, mask_ptrs, q_pos,
    band_left, band_right, n_sinks, sink_min_d, qk_scale,
    D: tl.constexpr, DP: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr, BAND: tl.constexpr,
):
    """One online-softmax step over the key columns ``cols`` (a BLOCK_N tile of one layout block).
    IS_FULL: every pair is allowed (only the key tail is masked); else the mask is the stored tile at
    ``mask_ptrs`` or, with BAND, the closed form of Note [band]."""
    k = load_rows(k_base, cols, stride_k, Lk, offs_d, D, DP, EVEN)
    v = load_rows(v_base, cols, stride_v, Lk, offs_d, D, DP, EVEN)
    s = dot(q, tl.trans(k))
    if IS_FULL:
        if not EVEN:
            s = tl.where(cols[None, :] < Lk, s, float("-inf"))
    else:
        if BAND:
            keep = band_keep(q_pos[:, None] - cols[None, :], cols[None, :], Lk, band_left, band_right, n_sinks,
                             sink_min_d)
        else:
            keep = tl.load(mask_ptrs) != 0
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s * qk_scale - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def forward_row(
    acc, l_i, m_i, q, k_base, v_base, stride_k, stride_v, q_pos, mask_rows,
    KV_NUM, KV_IDX, KV_MID, FKV_NUM, FKV_IDX, MASKS,
    st_num_b, st_num_h, st_idx_b, st_idx_h, st_idx_n, st_full_b, st_full_h, st_full_n, b, h, qb,
    Lk, band_left, band_right, n_sinks, sink_min_d, qk_scale, e_lo, e_hi,
    D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr, BAND: tl.constexpr, FULL_RUN: tl.constexpr, SPLIT: tl.constexpr,
):
    """Every block of query block ``qb``: full entries, then partial ones; ``mask_rows`` are the rows of the
    stored mask tiles. SPLIT: only entries ``[e_lo, e_hi)`` of the (full, then partial) list (decode)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    n_full = tl.load(FKV_NUM + b * st_num_b + h * st_num_h + qb)
    n_part = tl.load(KV_NUM + b * st_num_b + h * st_num_h + qb)
    f_row = row_ptr(FKV_IDX, st_full_b, st_full_h, st_full_n, b, h, qb)
    p_row = row_ptr(KV_IDX, st_idx_b, st_idx_h, st_idx_n, b, h, qb)
    id_row = row_ptr(KV_MID, st_idx_b, st_idx_h, st_idx_n, b, h, qb)
    f_lo, f_hi, p_lo, p_hi = 0, n_full, 0, n_part
    if SPLIT:
        f_lo = tl.minimum(e_lo, n_full)
        f_hi = tl.minimum(e_hi, n_full)
        p_lo = tl.maximum(e_lo, n_full) - n_full
        p_hi = tl.minimum(e_hi, n_full + n_part) - n_full
    first = 0
    if FULL_RUN:
        first = tl.load(f_row)
    for e in range(f_lo, f_hi):
        if FULL_RUN:
            kb = first + e
        else:
            kb = tl.load(f_row + e)
        for sub in tl.static_range(BS // BLOCK_N):
            cols = kb * BS + sub * BLOCK_N + offs_n
            acc, l_i, m_i = forward_block(
                acc, l_i, m_i, q, k_base, v_base, stride_k, stride_v, cols, Lk, offs_d, MASKS, q_pos,
                band_left, band_right, n_sinks, sink_min_d, qk_scale, D, DP, True, EVEN, BAND)
    for e in range(p_lo, p_hi):
        kb = tl.load(p_row + e)
        if not BAND:  # the banded path computes its masks from iota: no mask id to load
            mid = tl.load(id_row + e).to(tl.int64)
        for sub in tl.static_range(BS // BLOCK_N):
            cols = kb * BS + sub * BLOCK_N + offs_n
            if BAND:
                mask_ptrs = MASKS
            else:
                mask_ptrs = MASKS + mid * (BS * BS) + mask_rows[:, None] * BS + (sub * BLOCK_N + offs_n)[None, :]
            acc, l_i, m_i = forward_block(
                acc, l_i, m_i, q, k_base, v_base, stride_k, stride_v, cols, Lk, offs_d, mask_ptrs, q_pos,
                band_left, band_right, n_sinks, sink_min_d, qk_scale, D, DP, False, EVEN, BAND)
    return acc, l_i, m_i


@triton.jit
def _prefill_tile(
    pid_m, pid_bh, Q, K, V, O, LSE, KV_NUM, KV_IDX, KV_MID, FKV_NUM, FKV_IDX, MASKS,
    qk_scale, Lq, Lk, H, G, offset, band_left, band_right, n_sinks, sink_min_d,
    sq, sk, sv, so, st_num_b, st_num_h, st_idx_b, st_idx_h, st_idx_n, st_full_b, st_full_h, st_full_n,
    D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr, BAND: tl.constexpr, FULL_RUN: tl.constexpr,
):
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    qb = start_m // BS
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    q = load_rows(head_ptr(Q, sq, b, h), offs_m, sq[2], Lq, offs_d, D, DP, False)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    acc, l_i, m_i = forward_row(
        acc, l_i, m_i, q, head_ptr(K, sk, b, h // G), head_ptr(V, sv, b, h // G), sk[2], sv[2],
        offset + offs_m, offs_m - qb * BS, KV_NUM, KV_IDX, KV_MID, FKV_NUM, FKV_IDX, MASKS,
        st_num_b, st_num_h, st_idx_b, st_idx_h, st_idx_n, st_full_b, st_full_h, st_full_n, b, h, qb,
        Lk, band_left, band_right, n_sinks, sink_min_d, qk_scale, 0, 0,
        D, DP, BS, BLOCK_N, EVEN, BAND, FULL_RUN, False)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    store_rows(head_ptr(O, so, b, h), offs_m, so[2], Lq, offs_d, acc / l_safe[:, None], D)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(LSE + (b * H + h) * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["attn_fwd_kernel"])
def attn_fwd_kernel(
    Q, K, V, O, LSE,
    KV_NUM, KV_IDX, KV_MID, FKV_NUM, FKV_IDX, MASKS, ORDER,
    qk_scale,  # scale * log2(e)
    Lq, Lk, H, G, NM, TOTAL, offset, band_left, band_right, n_sinks, sink_min_d,
    sq, sk, sv, so, st_num_b, st_num_h, st_idx_b, st_idx_h, st_idx_n, st_full_b, st_full_h, st_full_n,
    D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr, BAND: tl.constexpr, FULL_RUN: tl.constexpr, PERSISTENT: tl.constexpr,
):
    # grid: (TOTAL,) = B * H * NM row tiles, longest rows (causal) first; PERSISTENT: (programs,) walking ORDER
    pid = tl.program_id(0)
    if PERSISTENT:
        for t in range(pid, TOTAL, tl.num_programs(0)):
            item = tl.load(ORDER + t)
            _prefill_tile(
                item % NM, item // NM, Q, K, V, O, LSE, KV_NUM, KV_IDX, KV_MID, FKV_NUM, FKV_IDX, MASKS,
                qk_scale, Lq, Lk, H, G, offset, band_left, band_right, n_sinks, sink_min_d,
                sq, sk, sv, so, st_num_b, st_num_h, st_idx_b, st_idx_h, st_idx_n, st_full_b, st_full_h, st_full_n,
                D, DP, BS, BLOCK_M, BLOCK_N, EVEN, BAND, FULL_RUN)
    else:
        _prefill_tile(
            NM - 1 - pid % NM, pid // NM, Q, K, V, O, LSE, KV_NUM, KV_IDX, KV_MID, FKV_NUM, FKV_IDX, MASKS,
            qk_scale, Lq, Lk, H, G, offset, band_left, band_right, n_sinks, sink_min_d,
            sq, sk, sv, so, st_num_b, st_num_h, st_idx_b, st_idx_h, st_idx_n, st_full_b, st_full_h, st_full_n,
            D, DP, BS, BLOCK_M, BLOCK_N, EVEN, BAND, FULL_RUN)


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["decode_kernel"])
def decode_kernel(
    Q, K, V, O, LSE, OP, LP, COUNT,
    KV_NUM, KV_IDX, KV_MID, FKV_NUM, FKV_IDX, MASKS,
    qk_scale, Lq, Lk, H, HP, G, GP, S, PER, offset, band_left, band_right, n_sinks, sink_min_d,
    sq, sk, sv, so, st_num_b, st_num_h, st_idx_b, st_idx_h, st_idx_n, st_full_b, st_full_h, st_full_n,
    D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr, BAND: tl.constexpr, FULL_RUN: tl.constexpr,
):
    """Split-K decode (Lq <= 16, all queries in query block 0) in one launch.

    grid (S, B * HP), HP = Hkv when one layout serves all heads (GQA packing: row r of the tile is head
    g = r // Lq, query i = r % Lq, so K/V tiles are read once per group) else H. Program (s, bh) runs entries
    [s * PER, (s + 1) * PER) of the (full, then partial) list and writes a normalised fp32 partial to OP
    [B, H, S, Lq, DP] with its log2 lse in LP [B, H, S, Lq]. Note [fused combine]: it then bumps COUNT[bh]; the
    program that sees S - 1 there is the last of its group, merges the S partials into O and LSE and resets
    the counter to 0 (so the zeroed buffer is reusable and the launch is CUDA-graph safe)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HP
    hp = pid_bh % HP
    r = tl.arange(0, BLOCK_M)
    g = r // Lq
    i = r - g * Lq
    rvalid = g < GP
    h = hp * GP + g  # query head of each row
    h0 = hp * GP  # the table head (tables are shared by the packed heads)
    offs_d = tl.arange(0, DP)
    q = tl.load(Q + b * sq[0] + h[:, None] * sq[1] + i[:, None] * sq[2] + offs_d[None, :],
                mask=rvalid[:, None] & (offs_d < D)[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    acc, l_i, m_i = forward_row(
        acc, l_i, m_i, q, head_ptr(K, sk, b, h0 // G), head_ptr(V, sv, b, h0 // G), sk[2], sv[2],
        offset + i, i, KV_NUM, KV_IDX, KV_MID, FKV_NUM, FKV_IDX, MASKS,
        st_num_b, st_num_h, st_idx_b, st_idx_h, st_idx_n, st_full_b, st_full_h, st_full_n, b, h0, 0,
        Lk, band_left, band_right, n_sinks, sink_min_d, qk_scale, pid_s * PER, pid_s * PER + PER,
        D, DP, BS, BLOCK_N, EVEN, BAND, FULL_RUN, True)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    row = ((b * H + h) * S + pid_s) * Lq + i
    tl.store(OP + row[:, None] * DP + offs_d[None, :], acc / l_safe[:, None], mask=rvalid[:, None])
    tl.store(LP + row, lse2, mask=rvalid)
    # release our partial, acquire the others' (acq_rel at GPU scope)
    done = tl.atomic_add(COUNT + pid_bh, 1, sem="acq_rel")
    if done == S - 1:
        # merge the S partials row by row of the tile (the loads bypass L1: other programs wrote them)
        rows_bh = b * H + h
        mo = tl.full([BLOCK_M], float("-inf"), tl.float32)
        lo = tl.zeros([BLOCK_M], tl.float32)
        ao = tl.zeros([BLOCK_M, DP], tl.float32)
        for s in range(0, S):
            srow = (rows_bh * S + s) * Lq + i
            lp = tl.load(LP + srow, mask=rvalid, other=float("-inf"), cache_modifier=".cg")
            op = tl.load(OP + srow[:, None] * DP + offs_d[None, :], mask=rvalid[:, None], other=0.0,
                         cache_modifier=".cg")
            m_new = tl.maximum(mo, lp)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(mo - m_safe)
            w = tl.exp2(lp - m_safe)
            lo = lo * alpha + w
            ao = ao * alpha[:, None] + op * w[:, None]
            mo = m_new
        lo_safe = tl.where(lo == 0.0, 1.0, lo)
        o_ptrs = O + b * so[0] + h[:, None] * so[1] + i[:, None] * so[2] + offs_d[None, :]
        tl.store(o_ptrs, (ao / lo_safe[:, None]).to(O.dtype.element_ty), mask=rvalid[:, None] & (offs_d < D)[None, :])
        lse = tl.where(lo == 0.0, float("-inf"), (mo + tl.log2(lo_safe)) * LN2)
        tl.store(LSE + rows_bh * Lq + i, lse, mask=rvalid)
        tl.atomic_xchg(COUNT + pid_bh, 0)
