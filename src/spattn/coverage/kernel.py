"""The Triton pass of ``coverage.measure``: per query row, the dense and the kept softmax sums (and, with values,
both outputs) in one streaming pass over the key blocks, as a flash-attention forward does.

Notation: ``B, H, Hkv, G = H // Hkv``, ``Lq, Lk``, ``off = Lk - Lq`` (query ``i`` sits at position ``i + off``),
``BS`` the layout's block size (query and key tiles are layout blocks), ``NK`` key blocks, ``D`` / ``DV`` head dims.

One program per (query block, batch * head). For each key block up to the causal limit it computes the scaled
scores ``s [BS, BS]`` (fp32), masks the pairs the dense reference may not see (key tail; ``j > i + off`` when
causal), and updates one running max ``m`` shared by two sums (``S`` over every visible key, ``K`` over the kept
ones) and, with values, two accumulators (``acc_d``, ``acc_s``). Which keys are kept comes from the layout's dense
per-block view: ``slot[b, h, qb, kb]`` indexes ``tables.tiles(masks)`` (a partial block's mask, ``M`` = all kept,
``M + 1`` = none), so there is no branch on the block status. Outputs: ``m, S, K [B, H, Lq]`` float32 and
``o_d = acc_d / S``, ``o_s = acc_s / K`` ``[B, H, Lq, DV]`` float32; the metrics are computed from them in torch
(``measure``), the same way as from the torch pass.

Not computed here: the top-k overlap (``measure`` takes the torch pass when ``topk > 0``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b):
    # Note [fp32 dot]: float32 tiles use IEEE products (Triton's default TF32 would give ~1e-3 errors)
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def coverage_kernel(
    Q, K, V, SLOT, TILES, M_OUT, S_OUT, KEPT_OUT, OD, OS,
    q_strides, k_strides, v_strides, slot_strides, o_strides,
    H, G, Lq, Lk, NK, off, scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BS: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_V: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    rm = qb * BS + tl.arange(0, BS)  # query index [BS]
    rn = tl.arange(0, BS)  # key offset in a block [BS]
    rd = tl.arange(0, BLOCK_D)
    row_ok = rm < Lq
    q = tl.load(Q + b * q_strides[0] + h * q_strides[1] + rm[:, None] * q_strides[2] + rd[None, :],
                mask=row_ok[:, None] & (rd[None, :] < D), other=0.0)
    k_base = K + b * k_strides[0] + hk * k_strides[1]
    slot_row = SLOT + b * slot_strides[0] + h * slot_strides[1] + qb * slot_strides[2]
    m = tl.full([BS], float("-inf"), tl.float32)
    s_sum = tl.zeros([BS], tl.float32)
    k_sum = tl.zeros([BS], tl.float32)
    if HAS_V:
        rv = tl.arange(0, BLOCK_DV)
        v_base = V + b * v_strides[0] + hk * v_strides[1]
        acc_d = tl.zeros([BS, BLOCK_DV], tl.float32)
        acc_s = tl.zeros([BS, BLOCK_DV], tl.float32)
    hi = NK
    if CAUSAL:  # key blocks past the last position of this query block are in every row's future
        last = tl.minimum(Lq, qb * BS + BS) - 1 + off
        hi = tl.minimum(NK, tl.maximum(last, -1) // BS + 1)
    for kb in range(0, hi):
        cols = kb * BS + rn
        col_ok = cols < Lk
        k = tl.load(k_base + cols[:, None] * k_strides[2] + rd[None, :], mask=col_ok[:, None] & (rd[None, :] < D),
                    other=0.0)
        s = _dot(q, tl.trans(k)) * scale  # [BS, BS] fp32
        visible = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rm[:, None] + off)
        slot = tl.load(slot_row + kb)
        tile = tl.load(TILES + slot * BS * BS + rn[:, None] * BS + rn[None, :])
        kept = visible & (tile != 0)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        pk = tl.where(kept, p, 0.0)
        s_sum = s_sum * alpha + tl.sum(p, 1)
        k_sum = k_sum * alpha + tl.sum(pk, 1)
        if HAS_V:
            v = tl.load(v_base + cols[:, None] * v_strides[2] + rv[None, :], mask=col_ok[:, None] & (rv[None, :] < DV),
                        other=0.0)
            acc_d = acc_d * alpha[:, None] + _dot(p.to(v.dtype), v)
            acc_s = acc_s * alpha[:, None] + _dot(pk.to(v.dtype), v)
        m = m_new
    out = bh * Lq + rm
    tl.store(M_OUT + out, m, mask=row_ok)
    tl.store(S_OUT + out, s_sum, mask=row_ok)
    tl.store(KEPT_OUT + out, k_sum, mask=row_ok)
    if HAS_V:
        o_ptr = b * o_strides[0] + h * o_strides[1] + rm[:, None] * o_strides[2] + rv[None, :]
        o_mask = row_ok[:, None] & (rv[None, :] < DV)
        tl.store(OD + o_ptr, acc_d / tl.where(s_sum > 0, s_sum, 1.0)[:, None], mask=o_mask)
        tl.store(OS + o_ptr, acc_s / tl.where(k_sum > 0, k_sum, 1.0)[:, None], mask=o_mask)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides, 0 where the dimension is broadcast (size 1)."""
    return tuple(0 if t.shape[d] == 1 else t.stride(d) for d in range(3))  # type: ignore[return-value]


def supports(query: torch.Tensor, block_size: int) -> str | None:
    """None when the kernel runs these inputs, else why not."""
    if block_size not in (16, 32, 64, 128):
        return f"block size {block_size} (the kernel needs 16, 32, 64 or 128)"
    if query.shape[-1] > 256:
        return f"head dim {query.shape[-1]} > 256"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {query.dtype}"
    return None


def coverage_sums(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, slot: torch.Tensor,
                  tiles: torch.Tensor, *, block_size: int, causal: bool, scale: float):
    """Run :func:`coverage_kernel`.

    Args:
        query ``[B, H, Lq, D]``, key ``[B, Hkv, Lk, D]``, value ``[B, Hkv, Lk, DV]`` or None (finite, one dtype).
        slot: int ``[Bl, Hl, NQ, NK]`` into ``tiles`` (``tables.unpack``); tiles: bool ``[M + 2, bs, bs]``.

    Returns:
        ``(m, S, K)`` float32 ``[B, H, Lq]`` and ``(o_d, o_s)`` float32 ``[B, H, Lq, DV]`` (None without value).
    """
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    dev = query.device
    query, key = query.contiguous(), key.contiguous()
    value = value.to(query.dtype).contiguous() if value is not None else None
    slot = slot.to(torch.int32).contiguous()
    tiles = tiles.to(torch.int8).contiguous()
    m = torch.empty(B, H, Lq, dtype=torch.float32, device=dev)
    s_sum, k_sum = torch.empty_like(m), torch.empty_like(m)
    DV = value.shape[-1] if value is not None else 1
    od = torch.empty(B, H, Lq, DV, dtype=torch.float32, device=dev) if value is not None else m
    os_ = torch.empty_like(od) if value is not None else m
    grid = (-(-Lq // block_size), B * H)
    coverage_kernel[grid](
        query, key, value if value is not None else key, slot, tiles, m, s_sum, k_sum, od, os_,
        _strides(query), _strides(key), _strides(value if value is not None else key), _strides(slot), _strides(od),
        H, H // Hkv, Lq, Lk, slot.shape[-1], Lk - Lq, scale,
        D=D, DV=DV, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
        BS=block_size, CAUSAL=causal, HAS_V=value is not None,
        num_warps=4 if block_size <= 64 else 8, num_stages=2,
    )
    return (m, s_sum, k_sum), ((od, os_) if value is not None else None)
