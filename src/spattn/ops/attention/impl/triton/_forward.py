"""Forward block-sparse attention kernel over a Layout's kv tables.

Notation: B batch, H query heads, G = H // Hkv query heads per kv head, Lq/Lk query/key lengths,
D head dim (DP = D padded to a power of two), BS the layout block size, BLOCK_M/BLOCK_N the kernel tiles
(BLOCK_M and BLOCK_N divide BS: a layout block is visited as BS // BLOCK_N sub-tiles).
Scores s = q.k stay raw; the running max m lives in the log2 domain (m = max(s) * scale * log2(e), needs
scale > 0) so p = exp2(s * qk_scale - m) is one FMA and an exp2 per score; lse is returned in natural log.

Note [empty rows]: a row that sees no key keeps m = -inf and l = 0; we subtract a "safe" max (0 when
m = -inf) so exp2 never sees -inf - -inf, and finish with out = 0, lse = -inf.
Note [tails]: full blocks only mask key columns >= Lk (when Lk is not a multiple of BLOCK_N); rows >= Lq are
computed on zero-padded queries and never stored. Partial blocks read masks[mask_id] whose out-of-bounds
rows and columns are False by construction.
"""

from __future__ import annotations

import triton.language as tl

from ._jit import kernel


@kernel
def attn_fwd_kernel(
    Q, K, V, O, LSE,
    KV_NUM, KV_IDX, KV_MID, FKV_NUM, FKV_IDX, MASKS,
    qk_scale,  # scale * log2(e)
    Lq, Lk, H, G,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
    stn_b, stn_h,  # strides of the [*, *, NQ] count tables (0 = broadcast); NQ stride is 1
    sti_b, sti_h, sti_q,  # strides of partial [*, *, NQ, W] tables
    stf_b, stf_h, stf_q,  # strides of full [*, *, NQ, WF] tables
    D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, MERGED: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows (causal) first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // G
    start_m = pid_m * BLOCK_M
    qb = start_m // BS
    r0 = start_m - qb * BS

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    mask_d = offs_d < D

    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Lq) & mask_d[None, :], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)

    if MERGED:
        # Note [merged loop]: one software-pipelined loop over (full entries, then partial entries) x sub-tiles,
        # so short rows (windows) pay one pipeline ramp instead of two; full entries skip the mask load
        # (predicated off) but pay one select per score.
        n_full = tl.load(FKV_NUM + b * stn_b + h * stn_h + qb)
        n_part = tl.load(KV_NUM + b * stn_b + h * stn_h + qb)
        f_row = FKV_IDX + b * stf_b + h * stf_h + qb * stf_q
        p_row = KV_IDX + b * sti_b + h * sti_h + qb * sti_q
        id_row = KV_MID + b * sti_b + h * sti_h + qb * sti_q
        rows = r0 + tl.arange(0, BLOCK_M)
        for it in range(0, (n_full + n_part) * (BS // BLOCK_N)):
            e = it // (BS // BLOCK_N)
            sub = it - e * (BS // BLOCK_N)
            is_part = e >= n_full
            kb = tl.load(f_row + e, mask=e < n_full, other=0) + tl.load(p_row + (e - n_full), mask=is_part, other=0)
            mid = tl.load(id_row + (e - n_full), mask=is_part, other=0).to(tl.int64)
            cols = kb * BS + sub * BLOCK_N + offs_n
            if EVEN_N and D == DP:
                k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :])
                v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :])
            else:
                kmask = (cols[:, None] < Lk) & mask_d[None, :]
                k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
                v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
            # the mask is broadcast to the tile explicitly: newer interpreters reject a scalar mask on a block load
            part_tile = (rows[:, None] * 0 + offs_n[None, :] * 0 + e) >= n_full
            tile = tl.load(MASKS + mid * (BS * BS) + rows[:, None] * BS + (sub * BLOCK_N + offs_n)[None, :],
                           mask=part_tile, other=1)
            keep = tile != 0
            if not EVEN_N:
                keep = keep & (cols[None, :] < Lk)
            s = tl.dot(q, tl.trans(k))
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s * qk_scale - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    else:
        # ---- full blocks: bounds only
        n_full = tl.load(FKV_NUM + b * stn_b + h * stn_h + qb)
        f_row = FKV_IDX + b * stf_b + h * stf_h + qb * stf_q
        for e in range(0, n_full):
            kb = tl.load(f_row + e)
            for sub in tl.static_range(BS // BLOCK_N):
                cols = kb * BS + sub * BLOCK_N + offs_n
                if EVEN_N and D == DP:
                    k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :])
                    v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :])
                elif EVEN_N:
                    k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=mask_d[None, :], other=0.0)
                    v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=mask_d[None, :], other=0.0)
                else:
                    kmask = (cols[:, None] < Lk) & mask_d[None, :]
                    k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
                    v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
                s = tl.dot(q, tl.trans(k))
                if not EVEN_N:
                    s = tl.where(cols[None, :] < Lk, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s * qk_scale - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new

        # ---- partial blocks: token masks
        n_part = tl.load(KV_NUM + b * stn_b + h * stn_h + qb)
        p_row = KV_IDX + b * sti_b + h * sti_h + qb * sti_q
        id_row = KV_MID + b * sti_b + h * sti_h + qb * sti_q
        rows = r0 + tl.arange(0, BLOCK_M)
        for e in range(0, n_part):
            kb = tl.load(p_row + e)
            mid = tl.load(id_row + e).to(tl.int64)
            for sub in tl.static_range(BS // BLOCK_N):
                cols = kb * BS + sub * BLOCK_N + offs_n
                kmask = (cols[:, None] < Lk) & mask_d[None, :]
                k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
                v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
                tile = tl.load(MASKS + mid * (BS * BS) + rows[:, None] * BS + (sub * BLOCK_N + offs_n)[None, :])
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
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < Lq) & mask_d[None, :])
    tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=offs_m < Lq)
