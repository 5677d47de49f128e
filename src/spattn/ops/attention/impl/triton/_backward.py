"""Backward block-sparse attention kernels: delta preprocessing, dQ over the kv tables, dK/dV over the
transposed (q) tables, and the one-pass backward (``attn_bwd_fused_kernel``: dK/dV per key tile, dQ by fp32
atomic adds). Notation and stride tuples as in ``_forward.py``; ``LSE2`` is lse * log2(e) with empty
rows set to +inf. Each gradient body is written once (``dq_block``, ``dkdv_block``) and specialised for full
and partial blocks by ``IS_FULL``.

Note [no band in backward]: the banded path of the forward (Note [band] in ``_forward.py``) was tried here too
and measured slower on the H200 (fwd+bwd 0.80-0.85x Flex against 0.92-1.02x with stored masks; the tuner
could only fit 64x64 tiles, see ``benchmarks/NOTES-kernels.md``), so the backward always walks the tables and
reads the stored masks.

Note [no atomics]: in the split backward (``method="split"``) dQ and dK/dV are separate kernels, each program
owns its output tile, and one dK/dV program loops over the G query heads of its kv head in a fixed order, so
it is deterministic (bitwise reproducible) for every configuration; ``deterministic=True`` always takes it.
Note [atomic backward]: the split backward computes the scores and dP twice (7 tile matmuls per visited
(query tile, key tile) pair: QK^T, dO V^T, dS K in the dQ kernel; QK^T, P^T dO, V dO^T, dS^T Q in dK/dV). The
one-pass kernel (``method="atomic"``) walks the transposed tables like dK/dV and adds dS K (unscaled) into an
fp32 dQ buffer with relaxed atomic adds: 5 matmuls per pair, one launch instead of two, at the price of
[BLOCK_M, D] fp32 atomics per pair (resolved in L2) and a summation order that depends on the schedule. The
preprocess kernel zeroes that buffer and folds the lse gradient into delta, and one cast writes dq = scale * dq32.
Note [heads first]: CUDA issues a grid's programs x-fastest. With the tile index on x, every head's heaviest
programs wait for all tiles of the heads before it: the key tile holding the sinks (visited by every query
block: 512 blocks at 64k) or causal's first key tile / last query tile then starts near the end of the
launch and runs alone (a tail of one long program). ``HEADS_FIRST`` (a runtime 0/1, not specialised) puts
batch x heads on x, so the heaviest tile of every head is issued first (longest processing time first).
Note [tails in backward]: out-of-bounds rows load q = do = 0 and LSE2 = +inf, so their p is exactly 0;
out-of-bounds key columns load k = v = 0, which adds exactly 0 to dQ; their dK/dV rows are never stored.
So full blocks need no score mask in backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._primitives import TABLE_STRIDES, dot, head_ptr, load_rows, row_ptr, store_rows

# Note [one compile per length] in _primitives.py. The dK/dV kernel keeps ``Lq`` specialised: its inner loop
# masks every q / dO / lse / delta load with ``rows < Lq``, and without knowing Lq % 16 the compiled sm_90 code
# carries 48 more compares and 60 more ors per loop body (PTX of the D128 causal kernel: setp.lt 113 vs 65);
# the H200 run without it measured forward + backward 5-10% slower than session 3's (kernels-v5.json vs
# kernels-v2.json, same tile configs). It costs one more compile for lengths that are not a multiple of 16.
DO_NOT_SPECIALIZE = {
    "attn_bwd_preprocess_kernel": ["Lq"],
    "attn_bwd_fused_kernel": ["Lk", "HEADS_FIRST", *TABLE_STRIDES],
    "attn_bwd_dq_kernel": ["Lq", "Lk", "HEADS_FIRST", *TABLE_STRIDES],
    "attn_bwd_dkdv_kernel": ["Lk", "HEADS_FIRST", *TABLE_STRIDES],
}
# the length arguments kept specialised (tests)
SPECIALISED_LENGTHS = {"attn_bwd_dkdv_kernel": ("Lq",), "attn_bwd_fused_kernel": ("Lq",)}


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["attn_bwd_preprocess_kernel"])
def attn_bwd_preprocess_kernel(
    O, DO, LSE, DLSE, DELTA, LSE2, DQ32, Lq, H, so, sdo, sdq32,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr, ZERO_DQ: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse (HAS_DLSE), lse2 = lse * log2(e) (+inf for empty rows); ZERO_DQ: also
    zero the fp32 dQ buffer of the atomic backward (Note [atomic backward])."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    o = load_rows(head_ptr(O, so, b, h), offs_m, so[2], Lq, offs_d, D, DP, False)
    do = load_rows(head_ptr(DO, sdo, b, h), offs_m, sdo[2], Lq, offs_d, D, DP, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    if ZERO_DQ:
        store_rows(head_ptr(DQ32, sdq32, b, h), offs_m, sdq32[2], Lq, offs_d, tl.zeros([BLOCK_M, DP], tl.float32), D)
    lse = tl.load(LSE + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + pid_bh * Lq + offs_m, delta, mask=offs_m < Lq)
    tl.store(LSE2 + pid_bh * Lq + offs_m, lse2, mask=offs_m < Lq)


@triton.jit
def dq_block(
    dq, q, do, lse2, delta, k_base, v_base, stride_k, stride_v, cols, Lk, offs_d, mask_ptrs, qk_scale,
    D: tl.constexpr, DP: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
):
    """dQ += dS K over one BLOCK_N tile of key columns ``cols``."""
    k = load_rows(k_base, cols, stride_k, Lk, offs_d, D, DP, EVEN)
    v = load_rows(v_base, cols, stride_v, Lk, offs_d, D, DP, EVEN)
    s = dot(q, tl.trans(k)) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if not IS_FULL:
        p = tl.where(tl.load(mask_ptrs) != 0, p, 0.0)
    dp = dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return dq + dot(ds.to(k.dtype), k)


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["attn_bwd_dq_kernel"])
def attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE2, DELTA,
    KV_NUM, KV_IDX, KV_MID, FKV_NUM, FKV_IDX, MASKS,
    qk_scale, scale, Lq, Lk, H, G, HEADS_FIRST,
    sq, sk, sv, sdo, sdq, st_num_b, st_num_h, st_idx_b, st_idx_h, st_idx_n, st_full_b, st_full_h, st_full_n,
    D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr,
):
    if HEADS_FIRST:  # Note [heads first]
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # longest rows (causal) first
        pid_bh = tl.program_id(0).to(tl.int64)
    else:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    qb = start_m // BS
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    rows = offs_m - qb * BS
    q = load_rows(head_ptr(Q, sq, b, h), offs_m, sq[2], Lq, offs_d, D, DP, False)
    do = load_rows(head_ptr(DO, sdo, b, h), offs_m, sdo[2], Lq, offs_d, D, DP, False)
    lse2 = tl.load(LSE2 + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    k_base = head_ptr(K, sk, b, h // G)
    v_base = head_ptr(V, sv, b, h // G)
    dq = tl.zeros([BLOCK_M, DP], tl.float32)

    n_full = tl.load(FKV_NUM + b * st_num_b + h * st_num_h + qb)
    f_row = row_ptr(FKV_IDX, st_full_b, st_full_h, st_full_n, b, h, qb)
    for e in range(0, n_full):
        kb = tl.load(f_row + e)
        for sub in tl.static_range(BS // BLOCK_N):
            cols = kb * BS + sub * BLOCK_N + offs_n
            dq = dq_block(dq, q, do, lse2, delta, k_base, v_base, sk[2], sv[2], cols, Lk, offs_d, MASKS, qk_scale,
                          D, DP, True, EVEN)
    n_part = tl.load(KV_NUM + b * st_num_b + h * st_num_h + qb)
    p_row = row_ptr(KV_IDX, st_idx_b, st_idx_h, st_idx_n, b, h, qb)
    id_row = row_ptr(KV_MID, st_idx_b, st_idx_h, st_idx_n, b, h, qb)
    for e in range(0, n_part):
        kb = tl.load(p_row + e)
        mid = tl.load(id_row + e).to(tl.int64)
        for sub in tl.static_range(BS // BLOCK_N):
            cols = kb * BS + sub * BLOCK_N + offs_n
            mask_ptrs = MASKS + mid * (BS * BS) + rows[:, None] * BS + (sub * BLOCK_N + offs_n)[None, :]
            dq = dq_block(dq, q, do, lse2, delta, k_base, v_base, sk[2], sv[2], cols, Lk, offs_d, mask_ptrs,
                          qk_scale, D, DP, False, EVEN)
    store_rows(head_ptr(DQ, sdq, b, h), offs_m, sdq[2], Lq, offs_d, dq * scale, D)


@triton.jit
def dkdv_block(
    dk, dv, k, v, q_base, do_base, stride_q, stride_do, LSE2, DELTA, row_base, rows, cols, Lq, Lk, offs_d,
    mask_ptrs, qk_scale, D: tl.constexpr, DP: tl.constexpr, IS_FULL: tl.constexpr,
):
    """dV += P^T dO, dK += dS^T Q over one BLOCK_M tile of query rows ``rows`` (transposed scores)."""
    q = load_rows(q_base, rows, stride_q, Lq, offs_d, D, DP, False)
    do = load_rows(do_base, rows, stride_do, Lq, offs_d, D, DP, False)
    lse2 = tl.load(LSE2 + row_base + rows, mask=rows < Lq, other=float("inf"))
    delta = tl.load(DELTA + row_base + rows, mask=rows < Lq, other=0.0)
    sT = dot(k, tl.trans(q)) * qk_scale  # [BLOCK_N, BLOCK_M]
    pT = tl.exp2(sT - lse2[None, :])
    if not IS_FULL:
        pT = tl.where(tl.load(mask_ptrs) != 0, pT, 0.0)
    dv += dot(pT.to(do.dtype), do)
    dpT = dot(v, tl.trans(do))
    dsT = pT * (dpT - delta[None, :])
    dk += dot(dsT.to(q.dtype), q)
    return dk, dv


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["attn_bwd_dkdv_kernel"])
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE2, DELTA,
    Q_NUM, Q_IDX, Q_MID, FQ_NUM, FQ_IDX, MASKS,
    qk_scale, scale, Lq, Lk, H, HKV, G, HEADS_FIRST,
    sq, sk, sv, sdo, sdk, sdv, st_num_b, st_num_h, st_idx_b, st_idx_h, st_idx_n, st_full_b, st_full_h, st_full_n,
    D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if HEADS_FIRST:  # Note [heads first]
        pid_n = tl.program_id(1)
        pid_bh = tl.program_id(0).to(tl.int64)
    else:
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    start_n = pid_n * BLOCK_N
    kb = start_n // BS
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    cols = offs_n - kb * BS  # column inside the layout block
    k = load_rows(head_ptr(K, sk, b, hk), offs_n, sk[2], Lk, offs_d, D, DP, False)
    v = load_rows(head_ptr(V, sv, b, hk), offs_n, sv[2], Lk, offs_d, D, DP, False)
    dk = tl.zeros([BLOCK_N, DP], tl.float32)
    dv = tl.zeros([BLOCK_N, DP], tl.float32)
    for g in range(0, G):
        h = hk * G + g
        q_base = head_ptr(Q, sq, b, h)
        do_base = head_ptr(DO, sdo, b, h)
        row_base = (b * H + h) * Lq
        n_full = tl.load(FQ_NUM + b * st_num_b + h * st_num_h + kb)
        f_row = row_ptr(FQ_IDX, st_full_b, st_full_h, st_full_n, b, h, kb)
        for e in range(0, n_full):
            qb = tl.load(f_row + e)
            for sub in tl.static_range(BS // BLOCK_M):
                rows = qb * BS + sub * BLOCK_M + offs_m
                dk, dv = dkdv_block(
                    dk, dv, k, v, q_base, do_base, sq[2], sdo[2], LSE2, DELTA, row_base, rows, offs_n, Lq, Lk,
                    offs_d, MASKS, qk_scale, D, DP, True)
        n_part = tl.load(Q_NUM + b * st_num_b + h * st_num_h + kb)
        p_row = row_ptr(Q_IDX, st_idx_b, st_idx_h, st_idx_n, b, h, kb)
        id_row = row_ptr(Q_MID, st_idx_b, st_idx_h, st_idx_n, b, h, kb)
        for e in range(0, n_part):
            qb = tl.load(p_row + e)
            mid = tl.load(id_row + e).to(tl.int64)
            for sub in tl.static_range(BS // BLOCK_M):
                rows = qb * BS + sub * BLOCK_M + offs_m
                mask_ptrs = MASKS + mid * (BS * BS) + (sub * BLOCK_M + offs_m)[None, :] * BS + cols[:, None]
                dk, dv = dkdv_block(
                    dk, dv, k, v, q_base, do_base, sq[2], sdo[2], LSE2, DELTA, row_base, rows, offs_n, Lq, Lk,
                    offs_d, mask_ptrs, qk_scale, D, DP, False)
    store_rows(head_ptr(DK, sdk, b, hk), offs_n, sdk[2], Lk, offs_d, dk * scale, D)
    store_rows(head_ptr(DV, sdv, b, hk), offs_n, sdv[2], Lk, offs_d, dv, D)


@triton.jit
def fused_block(
    dk, dv, k, v, q_base, do_base, dq_base, stride_q, stride_do, stride_dq, LSE2, DELTA, row_base, rows, Lq,
    offs_d, mask_ptrs, qk_scale, q_desc, do_desc, dq_desc, b, h, row0,
    D: tl.constexpr, DP: tl.constexpr, IS_FULL: tl.constexpr, TMA: tl.constexpr, TMA_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``dkdv_block`` plus dQ[rows] += dS K by atomic adds (Note [atomic backward]). TMA: q and dO tiles come
    through tensor descriptors (rows ``row0 + arange(BLOCK_M)`` of head (b, h); rows >= Lq read as zeros),
    TMA_DQ: the dQ tile is added by a descriptor reduction instead of per-element atomics."""
    if TMA:
        q = tl.reshape(q_desc.load([b, h, row0, 0]), [BLOCK_M, DP])
        do = tl.reshape(do_desc.load([b, h, row0, 0]), [BLOCK_M, DP])
    else:
        q = load_rows(q_base, rows, stride_q, Lq, offs_d, D, DP, False)
        do = load_rows(do_base, rows, stride_do, Lq, offs_d, D, DP, False)
    lse2 = tl.load(LSE2 + row_base + rows, mask=rows < Lq, other=float("inf"))
    delta = tl.load(DELTA + row_base + rows, mask=rows < Lq, other=0.0)
    sT = dot(k, tl.trans(q)) * qk_scale  # [BLOCK_N, BLOCK_M]
    pT = tl.exp2(sT - lse2[None, :])
    if not IS_FULL:
        pT = tl.where(tl.load(mask_ptrs) != 0, pT, 0.0)
    dv += dot(pT.to(do.dtype), do)
    dpT = dot(v, tl.trans(do))
    dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
    dk += dot(dsT, q)
    dq = dot(tl.trans(dsT), k)  # [BLOCK_M, DP], fp32
    if TMA_DQ:
        dq_desc.atomic_add([b, h, row0, 0], tl.reshape(dq, [1, 1, BLOCK_M, DP]))
    else:
        tl.atomic_add(dq_base + rows[:, None] * stride_dq + offs_d[None, :], dq,
                      mask=(rows[:, None] < Lq) & (offs_d < D)[None, :], sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["attn_bwd_fused_kernel"])
def attn_bwd_fused_kernel(
    Q, K, V, DO, DK, DV, DQ32, LSE2, DELTA,
    Q_NUM, Q_IDX, Q_MID, FQ_NUM, FQ_IDX, MASKS, Q_DESC, DO_DESC, DQ_DESC,
    qk_scale, scale, Lq, Lk, H, HKV, G, HEADS_FIRST,
    sq, sk, sv, sdo, sdk, sdv, sdq32,
    st_num_b, st_num_h, st_idx_b, st_idx_h, st_idx_n, st_full_b, st_full_h, st_full_n,
    D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, TMA_DQ: tl.constexpr,
):
    """The one-pass backward (Note [atomic backward]): grid (cdiv(Lk, BLOCK_N), B * Hkv), as the dK/dV kernel;
    DQ32 [B, H, Lq, D] fp32, zeroed, receives the unscaled dS K. Q_DESC / DO_DESC / DQ_DESC: [B, H, L, D]
    tensor descriptors with [1, 1, BLOCK_M, D] blocks when TMA / TMA_DQ (else unused)."""
    if HEADS_FIRST:  # Note [heads first]
        pid_n = tl.program_id(1)
        pid_bh = tl.program_id(0).to(tl.int64)
    else:
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    start_n = pid_n * BLOCK_N
    kb = start_n // BS
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    cols = offs_n - kb * BS  # column inside the layout block
    k = load_rows(head_ptr(K, sk, b, hk), offs_n, sk[2], Lk, offs_d, D, DP, False)
    v = load_rows(head_ptr(V, sv, b, hk), offs_n, sv[2], Lk, offs_d, D, DP, False)
    dk = tl.zeros([BLOCK_N, DP], tl.float32)
    dv = tl.zeros([BLOCK_N, DP], tl.float32)
    b32 = b.to(tl.int32)
    for g in range(0, G):
        h = hk * G + g
        h32 = h.to(tl.int32)
        q_base = head_ptr(Q, sq, b, h)
        do_base = head_ptr(DO, sdo, b, h)
        dq_base = head_ptr(DQ32, sdq32, b, h)
        row_base = (b * H + h) * Lq
        n_full = tl.load(FQ_NUM + b * st_num_b + h * st_num_h + kb)
        f_row = row_ptr(FQ_IDX, st_full_b, st_full_h, st_full_n, b, h, kb)
        for e in range(0, n_full):
            qb = tl.load(f_row + e)
            for sub in tl.static_range(BS // BLOCK_M):
                row0 = qb * BS + sub * BLOCK_M
                dk, dv = fused_block(
                    dk, dv, k, v, q_base, do_base, dq_base, sq[2], sdo[2], sdq32[2], LSE2, DELTA, row_base,
                    row0 + offs_m, Lq, offs_d, MASKS, qk_scale, Q_DESC, DO_DESC, DQ_DESC, b32, h32, row0,
                    D, DP, True, TMA, TMA_DQ, BLOCK_M)
        n_part = tl.load(Q_NUM + b * st_num_b + h * st_num_h + kb)
        p_row = row_ptr(Q_IDX, st_idx_b, st_idx_h, st_idx_n, b, h, kb)
        id_row = row_ptr(Q_MID, st_idx_b, st_idx_h, st_idx_n, b, h, kb)
        for e in range(0, n_part):
            qb = tl.load(p_row + e)
            mid = tl.load(id_row + e).to(tl.int64)
            for sub in tl.static_range(BS // BLOCK_M):
                row0 = qb * BS + sub * BLOCK_M
                mask_ptrs = MASKS + mid * (BS * BS) + (sub * BLOCK_M + offs_m)[None, :] * BS + cols[:, None]
                dk, dv = fused_block(
                    dk, dv, k, v, q_base, do_base, dq_base, sq[2], sdo[2], sdq32[2], LSE2, DELTA, row_base,
                    row0 + offs_m, Lq, offs_d, mask_ptrs, qk_scale, Q_DESC, DO_DESC, DQ_DESC, b32, h32, row0,
                    D, DP, False, TMA, TMA_DQ, BLOCK_M)
    store_rows(head_ptr(DK, sdk, b, hk), offs_n, sdk[2], Lk, offs_d, dk * scale, D)
    store_rows(head_ptr(DV, sdv, b, hk), offs_n, sdv[2], Lk, offs_d, dv, D)
