"""Backward block-sparse attention kernels: delta preprocessing, dQ over the kv tables, dK/dV over the
transposed (q) tables. Notation as in ``_forward.py``; ``LSE2`` is lse * log2(e) with empty rows set to +inf.

Note [no atomics]: dQ and dK/dV are separate kernels, each program owns its output tile, and one dK/dV
program loops over the G query heads of its kv head in a fixed order, so the backward is deterministic
(bitwise reproducible) for every configuration.
Note [tails in backward]: out-of-bounds rows load q = do = 0 and LSE2 = +inf, so their p is exactly 0;
out-of-bounds key columns load k = v = 0, which adds exactly 0 to dQ; their dK/dV rows are never stored.
So full blocks need no score mask in backward.
"""

from __future__ import annotations

import triton.language as tl

from ._jit import kernel


@kernel
def attn_bwd_preprocess_kernel(
    O, DO, LSE, DELTA, LSE2,
    Lq, H, sob, soh, som, sdb, sdh, sdm,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    msk = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=msk, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(LSE + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + pid_bh * Lq + offs_m, delta, mask=offs_m < Lq)
    tl.store(LSE2 + pid_bh * Lq + offs_m, lse2, mask=offs_m < Lq)


@kernel
def attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE2, DELTA,
    KV_NUM, KV_IDX, KV_MID, FKV_NUM, FKV_IDX, MASKS,
    qk_scale, scale,
    Lq, Lk, H, G,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sgb, sgh, sgm,
    stn_b, stn_h, sti_b, sti_h, sti_q, stf_b, stf_h, stf_q,
    D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows (causal) first
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    start_m = pid_m * BLOCK_M
    qb = start_m // BS
    r0 = start_m - qb * BS
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    mask_d = offs_d < D
    qmask = (offs_m[:, None] < Lq) & mask_d[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=qmask, other=0.0)
    lse2 = tl.load(LSE2 + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, DP], tl.float32)

    n_full = tl.load(FKV_NUM + b * stn_b + h * stn_h + qb)
    f_row = FKV_IDX + b * stf_b + h * stf_h + qb * stf_q
    for e in range(0, n_full):
        kb = tl.load(f_row + e)
        for sub in tl.static_range(BS // BLOCK_N):
            cols = kb * BS + sub * BLOCK_N + offs_n
            kmask = (cols[:, None] < Lk) & mask_d[None, :]
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.exp2(s - lse2[:, None])
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)

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
            s = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.where(tile != 0, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)

    dq = dq * scale
    tl.store(DQ + b * sgb + h * sgh + offs_m[:, None] * sgm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qmask)


@kernel
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE2, DELTA,
    Q_NUM, Q_IDX, Q_MID, FQ_NUM, FQ_IDX, MASKS,
    qk_scale, scale,
    Lq, Lk, H, HKV, G,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
    skgb, skgh, skgn, svgb, svgh, svgn,
    stn_b, stn_h, sti_b, sti_h, sti_k, stf_b, stf_h, stf_k,
    D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    start_n = pid_n * BLOCK_N
    kb = start_n // BS
    c0 = start_n - kb * BS
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    mask_d = offs_d < D
    kmask = (offs_n[:, None] < Lk) & mask_d[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
    dk = tl.zeros([BLOCK_N, DP], tl.float32)
    dv = tl.zeros([BLOCK_N, DP], tl.float32)
    cols = c0 + tl.arange(0, BLOCK_N)

    for g in range(0, G):
        h = hk * G + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        row_base = (b * H + h) * Lq
        n_full = tl.load(FQ_NUM + b * stn_b + h * stn_h + kb)
        f_row = FQ_IDX + b * stf_b + h * stf_h + kb * stf_k
        for e in range(0, n_full):
            qb = tl.load(f_row + e)
            for sub in tl.static_range(BS // BLOCK_M):
                rows = qb * BS + sub * BLOCK_M + offs_m
                qmask = (rows[:, None] < Lq) & mask_d[None, :]
                q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :], mask=qmask, other=0.0)
                do = tl.load(do_base + rows[:, None] * sdm + offs_d[None, :], mask=qmask, other=0.0)
                lse2 = tl.load(LSE2 + row_base + rows, mask=rows < Lq, other=float("inf"))
                delta = tl.load(DELTA + row_base + rows, mask=rows < Lq, other=0.0)
                sT = tl.dot(k, tl.trans(q)) * qk_scale  # [BLOCK_N, BLOCK_M]
                pT = tl.exp2(sT - lse2[None, :])
                dv += tl.dot(pT.to(do.dtype), do)
                dpT = tl.dot(v, tl.trans(do))
                dsT = pT * (dpT - delta[None, :])
                dk += tl.dot(dsT.to(q.dtype), q)
        n_part = tl.load(Q_NUM + b * stn_b + h * stn_h + kb)
        p_row = Q_IDX + b * sti_b + h * sti_h + kb * sti_k
        id_row = Q_MID + b * sti_b + h * sti_h + kb * sti_k
        for e in range(0, n_part):
            qb = tl.load(p_row + e)
            mid = tl.load(id_row + e).to(tl.int64)
            for sub in tl.static_range(BS // BLOCK_M):
                rows = qb * BS + sub * BLOCK_M + offs_m
                qmask = (rows[:, None] < Lq) & mask_d[None, :]
                q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :], mask=qmask, other=0.0)
                do = tl.load(do_base + rows[:, None] * sdm + offs_d[None, :], mask=qmask, other=0.0)
                lse2 = tl.load(LSE2 + row_base + rows, mask=rows < Lq, other=float("inf"))
                delta = tl.load(DELTA + row_base + rows, mask=rows < Lq, other=0.0)
                tileT = tl.load(MASKS + mid * (BS * BS) + (sub * BLOCK_M + offs_m)[None, :] * BS + cols[:, None])
                sT = tl.dot(k, tl.trans(q)) * qk_scale
                pT = tl.where(tileT != 0, tl.exp2(sT - lse2[None, :]), 0.0)
                dv += tl.dot(pT.to(do.dtype), do)
                dpT = tl.dot(v, tl.trans(do))
                dsT = pT * (dpT - delta[None, :])
                dk += tl.dot(dsT.to(q.dtype), q)

    dk = dk * scale
    dk_ptrs = DK + b * skgb + hk * skgh + offs_n[:, None] * skgn + offs_d[None, :]
    dv_ptrs = DV + b * svgb + hk * svgh + offs_n[:, None] * svgn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kmask)
