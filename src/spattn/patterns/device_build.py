"""Layouts built straight from tensors or closed-form patterns, on any device.

* :func:`layout_from_dense` — a Layout from a dense bool mask (tests, small lengths; exact oracle).
* :func:`build_layout` — the fast on-device build for the built-in banded patterns (Causal, Full, Sinks,
  Window and their unions, optionally intersected with causal): a fixed number of tensor ops whose shapes
  depend only on Python integers, so no host synchronisation and nothing to recompile per length.
"""

from __future__ import annotations

import torch

from spattn.patterns.layout import Layout


def _pack(
    sel: torch.Tensor, values: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """sel bool [Bl, Hl, R, C] -> (count int32 [Bl, Hl, R], indices int32 [Bl, Hl, R, W], values gathered)."""
    count = sel.sum(-1)
    width = max(1, int(count.max())) if count.numel() else 1
    cols = torch.arange(sel.shape[-1], device=sel.device).expand_as(sel)
    key = torch.where(sel, cols, sel.shape[-1] + cols)  # valid first, ascending
    order = key.argsort(dim=-1, stable=True)[..., :width]
    idx = torch.gather(cols, -1, order)
    valid = torch.arange(width, device=sel.device) < count[..., None]
    idx = torch.where(valid, idx, 0).to(torch.int32)
    gathered = None
    if values is not None:
        gathered = torch.where(valid, torch.gather(values, -1, order), 0).to(torch.int32)
    width_cols = idx.shape[-1]
    if width_cols < width:  # fewer columns than width (C < 1): pad
        idx = torch.nn.functional.pad(idx, (0, width - width_cols))
    return count.to(torch.int32), idx, gathered


def layout_from_dense(mask: torch.Tensor, block_size: int = 128, **layout_kwargs) -> Layout:
    """Build a :class:`Layout` from a dense bool mask ``[Bl, Hl, q_len, kv_len]`` (brute force, for tests)."""
    if mask.dim() != 4 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [Bl, Hl, q_len, kv_len], got {tuple(mask.shape)} {mask.dtype}")
    Bl, Hl, Lq, Lk = mask.shape
    bs = block_size
    NQ, NK = -(-Lq // bs), -(-Lk // bs)
    padded = torch.zeros(Bl, Hl, NQ * bs, NK * bs, dtype=torch.bool, device=mask.device)
    padded[:, :, :Lq, :Lk] = mask
    inb = torch.zeros(NQ * bs, NK * bs, dtype=torch.bool, device=mask.device)
    inb[:Lq, :Lk] = True
    tiles = padded.view(Bl, Hl, NQ, bs, NK, bs).permute(0, 1, 2, 4, 3, 5)  # [Bl, Hl, NQ, NK, bs, bs]
    inb_t = inb.view(NQ, bs, NK, bs).permute(0, 2, 1, 3)
    n_allowed = tiles.sum((-1, -2))
    n_inb = inb_t.sum((-1, -2))
    full = (n_allowed == n_inb) & (n_allowed > 0)
    partial = (n_allowed > 0) & ~full
    part_tiles = tiles[partial]
    if part_tiles.numel():
        masks, inverse = torch.unique(part_tiles.reshape(part_tiles.shape[0], -1), dim=0, return_inverse=True)
        masks = masks.view(-1, bs, bs)
    else:
        masks = torch.zeros(0, bs, bs, dtype=torch.bool, device=mask.device)
        inverse = torch.zeros(0, dtype=torch.long, device=mask.device)
    mid = torch.zeros(Bl, Hl, NQ, NK, dtype=torch.long, device=mask.device)
    mid[partial] = inverse
    kv_num, kv_idx, kv_mid = _pack(partial, mid)
    fkv_num, fkv_idx, _ = _pack(full)
    q_num, q_idx, q_mid = _pack(partial.transpose(-1, -2), mid.transpose(-1, -2))
    fq_num, fq_idx, _ = _pack(full.transpose(-1, -2))
    return Layout(
        q_len=Lq, kv_len=Lk, block_size=bs,
        kv_num_blocks=kv_num, kv_indices=kv_idx, kv_mask_ids=kv_mid,
        full_kv_num_blocks=fkv_num, full_kv_indices=fkv_idx,
        q_num_blocks=q_num, q_indices=q_idx, q_mask_ids=q_mid,
        full_q_num_blocks=fq_num, full_q_indices=fq_idx,
        masks=masks, **layout_kwargs,
    )


# ----------------------------------------------------------------------------------------------------------
# fast build for banded patterns: Sinks(n) | Window(left, right) | Causal() | Full() [& causal]
# ----------------------------------------------------------------------------------------------------------


def _band_terms(pattern, causal: bool) -> tuple[int | None, int | None, int, bool] | None:
    """(left, right, sinks, causal) of a union of built-in banded parts, or None when not a fast case.

    Windows, Causal and Full all contain the diagonal, so their union is the widest band; ``None`` for
    left/right means unbounded on that side."""
    from spattn.patterns.base import Intersection, Union
    from spattn.patterns.builtin import Causal, Full, Sinks, Window

    if isinstance(pattern, Intersection):
        others = [p for p in pattern.parts if not isinstance(p, Causal)]
        if len(others) != 1 or len(pattern.parts) - len(others) < 1:
            return None
        pattern, causal = others[0], True
    parts = pattern.parts if isinstance(pattern, Union) else (pattern,)
    band: tuple[float, float] | None = None
    sinks = 0
    for p in parts:
        if isinstance(p, Sinks):
            sinks = max(sinks, p.n)
            continue
        if isinstance(p, Window):
            lr = (p.left, p.right)
        elif isinstance(p, Causal):
            lr = (float("inf"), 0)
        elif isinstance(p, Full):
            lr = (float("inf"), float("inf"))
        else:
            return None
        band = lr if band is None else (max(band[0], lr[0]), max(band[1], lr[1]))
    if band is None:
        return (None, None, sinks, causal) if sinks else None
    left = None if band[0] == float("inf") else int(band[0])
    right = None if band[1] == float("inf") else int(band[1])
    return left, right, sinks, causal


def _sorted_unique_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(masks.flatten(1), dim=0, return_inverse=True)`` for a few masks [R, bs, bs], by pairwise
    comparison at the first differing element (same lexicographic order, False < True)."""
    flat = masks.flatten(1)
    R = flat.shape[0]
    diff = flat[:, None, :] != flat[None, :, :]  # [R, R, bs*bs]
    first = diff.to(torch.uint8).argmax(-1)  # first differing position (0 when equal)
    equal = ~diff.any(-1)
    a_val = torch.gather(flat, 1, first).bool()  # value of row a at that position
    less = ~equal & ~a_val  # a < b when a has False where they first differ
    dup_of_earlier = (equal & torch.ones(R, R, dtype=torch.bool, device=flat.device).tril(-1)).any(-1)
    keep = ~dup_of_earlier
    rank = (less & keep[:, None]).sum(0)  # number of kept distinct masks strictly below each mask
    n_unique = int(keep.sum())
    out = torch.zeros(n_unique, flat.shape[1], dtype=flat.dtype, device=flat.device)
    out[rank[keep]] = flat[keep]
    return out.view(-1, *masks.shape[1:]), rank


def supports_fast_build(pattern) -> bool:
    """True when :func:`build_layout` has a fast path for this pattern."""
    return _band_terms(pattern, False) is not None


def build_layout(
    pattern,
    q_len: int,
    kv_len: int | None = None,
    *,
    causal: bool = False,
    block_size: int = 128,
    device: torch.device | str | None = None,
) -> Layout:
    """The same :class:`Layout` as ``spattn.compile`` for banded built-in patterns, built with a few fused
    tensor ops on ``device`` (tables are shared by batch and heads: ``[1, 1, ...]``).

    Fast cases: unions of ``Sinks``, ``Window``, ``Causal`` and ``Full``, optionally with ``causal=True``
    (or ``& Causal()``). Other patterns raise ValueError (use ``spattn.compile``).

    Shapes depend only on Python integers, so nothing recompiles per length. The partial-block masks are
    deduplicated like ``compile`` (sorted unique), which needs a few small device-to-host reads of counts.

    Example:
        >>> layout = build_layout(Sinks(64) | Window(1024), 131072, causal=True, device="cuda")
    """
    import time

    from spattn.patterns.base import EMPTY, FULL, PARTIAL
    from spattn.patterns.compile import _build_tables

    start = time.perf_counter()
    kv_len = q_len if kv_len is None else kv_len
    for name, value in (("q_len", q_len), ("kv_len", kv_len), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if kv_len < q_len:
        raise ValueError(f"kv_len ({kv_len}) must be >= q_len ({q_len}): queries are aligned bottom-right")
    terms = _band_terms(pattern, causal)
    if terms is None:
        raise ValueError(f"build_layout has no fast path for {pattern!r}; use spattn.compile")
    left, right, n, is_causal = terms
    dev = torch.device(device) if device is not None else torch.device("cpu")
    bs, off = block_size, kv_len - q_len
    NQ, NK = -(-q_len // bs), -(-kv_len // bs)
    big = q_len + kv_len + 1
    lo_off = big if left is None else left
    hi_off = big if right is None else right
    if is_causal:
        hi_off = min(hi_off, 0)
    has_band = left is not None or right is not None or terms[0] is None and terms[1] is None and n == 0

    # block bounds (int64): absolute query range [qlo, qhi] and key range [k0, k1], in bounds
    qb = torch.arange(NQ, device=dev, dtype=torch.int64)[:, None]
    kb = torch.arange(NK, device=dev, dtype=torch.int64)[None, :]
    qlo = qb * bs + off
    qhi = torch.clamp(qb * bs + bs, max=q_len) - 1 + off
    k0 = kb * bs
    k1 = torch.clamp(k0 + bs, max=kv_len) - 1
    band = (left, right) != (None, None) or has_band
    if band:
        band_full = (qhi - lo_off <= k0) & (qlo + hi_off >= k1)
        band_empty = (qhi + hi_off < k0) | (qlo - lo_off > k1)
    else:
        band_full = torch.zeros((), dtype=torch.bool, device=dev)
        band_empty = torch.ones((), dtype=torch.bool, device=dev)
    if n > 0:
        sink_full = k1 < n
        sink_empty = k0 >= n
        if is_causal:
            sink_full = sink_full & (k1 <= qlo)
            sink_empty = sink_empty | (k0 > qhi)
    else:
        sink_full = torch.zeros((), dtype=torch.bool, device=dev)
        sink_empty = torch.ones((), dtype=torch.bool, device=dev)
    full = band_full | sink_full
    empty = band_empty & sink_empty & ~full
    status = torch.full((NQ, NK), PARTIAL, dtype=torch.int8, device=dev)
    status = torch.where(full, FULL, torch.where(empty, EMPTY, status)).to(torch.int8)

    # partial blocks: one token mask per signature (d, sink block, tails), then reclassify and dedupe
    mask_ids = torch.full((NQ, NK), -1, dtype=torch.int32, device=dev)
    pq, pk = (status == PARTIAL).nonzero().unbind(1)
    masks = torch.zeros(0, bs, bs, dtype=torch.bool, device=dev)
    if pq.numel():
        d = pq * bs + off - pk * bs
        # Note [signature]: d matters only where the band or the causal cut crosses the block; elsewhere the
        # mask is the sinks columns alone, so those blocks share one representative per sink block.
        p_qlo = pq * bs + off
        p_qhi = torch.clamp(pq * bs + bs, max=q_len) - 1 + off
        p_k0 = pk * bs
        p_k1 = torch.clamp(p_k0 + bs, max=kv_len) - 1
        touch = torch.zeros_like(pq, dtype=torch.bool)
        if band:
            touch |= ~((p_qhi + hi_off < p_k0) | (p_qlo - lo_off > p_k1))
        if is_causal:
            touch |= p_k1 > p_qlo
        d = torch.where(touch, d, -big)
        # one int64 key per signature (1-D unique is a plain sort; unique(dim=0) is slow on CUDA)
        sink_kb = torch.where(pk * bs < n, pk, -1) + 1
        key = ((d + big) * (NK + 1) + sink_kb) * 4 + (pq == NQ - 1).long() * 2 + (pk == NK - 1).long()
        _, inverse = torch.unique(key, return_inverse=True)
        n_rep = int(inverse.max()) + 1
        first = torch.full((n_rep,), pq.numel(), dtype=torch.long, device=dev)
        first.scatter_reduce_(0, inverse, torch.arange(pq.numel(), device=dev), reduce="amin")
        rq, rk = pq[first], pk[first]
        r = torch.arange(bs, device=dev)
        i = (rq[:, None] * bs + r + off)[:, :, None]  # absolute query positions [R, bs, 1]
        j = (rk[:, None] * bs + r)[:, None, :]  # key positions [R, 1, bs]
        allowed = torch.zeros(i.shape[0], bs, bs, dtype=torch.bool, device=dev)
        if band:
            allowed |= (j >= i - lo_off) & (j <= i + hi_off)
        if n > 0:
            allowed |= (j < n) & ((j <= i) if is_causal else True)
        inb = (i - off < q_len) & (j < kv_len)
        rep = allowed & inb
        count = rep.flatten(1).sum(-1)
        inb_count = torch.clamp(q_len - rq * bs, max=bs) * torch.clamp(kv_len - rk * bs, max=bs)
        new = torch.where(count == 0, EMPTY, torch.where(count == inb_count, FULL, PARTIAL)).to(torch.int8)
        keep = new == PARTIAL
        rep_id = torch.full((n_rep,), -1, dtype=torch.long, device=dev)
        if bool(keep.any()):
            masks, inv = _sorted_unique_masks(rep[keep])
            rep_id[keep] = inv
        status[pq, pk] = new[inverse]
        mask_ids[pq, pk] = rep_id[inverse].to(torch.int32)
    tables = _build_tables(status[None, None], mask_ids[None, None])
    return Layout(
        q_len=q_len, kv_len=kv_len, block_size=bs, masks=masks, pattern=pattern, causal=causal,
        info={"compile_seconds": time.perf_counter() - start, "builder": "device_build"},
        **tables,
    )
