"""Split-K decode kernel: 1-16 queries against a long KV cache, parallel over key blocks.

Notation as in ``_forward.py``; S = number of splits; each program owns a contiguous slice of the
(full entries, then partial entries) list of the single query-block row and writes an fp32 partial output
(already normalised) and its log2-domain lse; ``decode_combine_kernel`` merges the S partials.
GQA: when the layout is shared by all heads (PACK), one program serves the G query heads of a kv head, so
K/V tiles are read once per group: row r of the tile is head g = r // Lq, query i = r % Lq.
Queries sit in query block 0 (Lq <= 16 <= BS), so the mask row of query i is i.
"""

from __future__ import annotations

import triton.language as tl

from ._jit import kernel


@kernel
def decode_split_kernel(
    Q, K, V, OP, LP,
    KV_NUM, KV_IDX, KV_MID, FKV_NUM, FKV_IDX, MASKS,
    qk_scale,
    Lq, Lk, H, HP, G, GP, S, PER,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    stn_b, stn_h, sti_b, sti_h, stf_b, stf_h,
    D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (S, B * HP) where HP = Hkv (packed) or H (one head a program, GP = 1)
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HP
    hp = pid_bh % HP
    r = tl.arange(0, BLOCK_M)
    g = r // Lq
    i = r - g * Lq
    rvalid = g < GP
    h = hp * GP + g  # query head of each row
    hk = (hp * GP) // G
    h0 = hp * GP  # the table head (tables are shared by the packed heads)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    mask_d = offs_d < D
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqm + offs_d[None, :],
                mask=rvalid[:, None] & mask_d[None, :], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)

    n_full = tl.load(FKV_NUM + b * stn_b + h0 * stn_h)
    n_part = tl.load(KV_NUM + b * stn_b + h0 * stn_h)
    lo = pid_s * PER
    hi = tl.minimum(lo + PER, n_full + n_part)
    f_row = FKV_IDX + b * stf_b + h0 * stf_h
    for e in range(lo, tl.minimum(hi, n_full)):
        kb = tl.load(f_row + e)
        for sub in tl.static_range(BS // BLOCK_N):
            cols = kb * BS + sub * BLOCK_N + offs_n
            kmask = (cols[:, None] < Lk) & mask_d[None, :]
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
            s = tl.dot(q, tl.trans(k))
            s = tl.where(cols[None, :] < Lk, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s * qk_scale - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    p_row = KV_IDX + b * sti_b + h0 * sti_h
    id_row = KV_MID + b * sti_b + h0 * sti_h
    for e in range(tl.maximum(lo, n_full) - n_full, hi - n_full):
        kb = tl.load(p_row + e)
        mid = tl.load(id_row + e).to(tl.int64)
        for sub in tl.static_range(BS // BLOCK_N):
            cols = kb * BS + sub * BLOCK_N + offs_n
            kmask = (cols[:, None] < Lk) & mask_d[None, :]
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
            tile = tl.load(MASKS + mid * (BS * BS) + i[:, None] * BS + (sub * BLOCK_N + offs_n)[None, :],
                           mask=rvalid[:, None], other=0)
            s = tl.dot(q, tl.trans(k))
            s = tl.where(tile != 0, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s * qk_scale - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    # OP: [B, H, S, Lq, DP] fp32, LP: [B, H, S, Lq] fp32
    row = ((b * H + h) * S + pid_s) * Lq + i
    tl.store(OP + row[:, None] * DP + offs_d[None, :], out, mask=rvalid[:, None])
    tl.store(LP + row, lse2, mask=rvalid)


@kernel
def decode_combine_kernel(
    OP, LP, O, LSE,
    Lq, H, S, sob, soh, som,
    D: tl.constexpr, DP: tl.constexpr, SP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # over B * H * Lq
    bh = pid // Lq
    i = pid % Lq
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, SP)
    offs_d = tl.arange(0, DP)
    smask = offs_s < S
    lse2 = tl.load(LP + (bh * S + offs_s) * Lq + i, mask=smask, other=float("-inf"))
    m = tl.max(lse2, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse2 - m_safe)
    tot = tl.sum(w, 0)
    o = tl.load(OP + ((bh * S + offs_s) * Lq + i)[:, None] * DP + offs_d[None, :], mask=smask[:, None], other=0.0)
    tot_safe = tl.where(tot == 0.0, 1.0, tot)
    out = tl.sum(o * w[:, None], 0) / tot_safe
    lse = tl.where(tot == 0.0, float("-inf"), (m_safe + tl.log2(tot_safe)) * 0.6931471805599453)
    tl.store(O + b * sob + h * soh + i * som + offs_d, out.to(O.dtype.element_ty), mask=offs_d < D)
    tl.store(LSE + pid, lse)
