"""The fast on-device compile of the built-in banded patterns (Causal, Full, Sinks, Window and their unions,
optionally intersected with causal): a fixed number of tensor ops whose shapes depend only on Python integers,
then the layout codec (``classify``, ``dedupe``, ``pack``) like ``spattn.compile``.
"""

from __future__ import annotations

import time

import torch

from spattn._checks import check_int
from spattn.layout import tables
from spattn.layout.layout import Layout
from spattn.patterns.base import EMPTY, FULL, PARTIAL, Intersection, Union
from spattn.patterns.builtin import Causal, Full, Sinks, Window

# ----------------------------------------------------------------------------------------------------------
# fast build for banded patterns: Sinks(n) | Window(left, right) | Causal() | Full() [& causal]
# ----------------------------------------------------------------------------------------------------------


def _band_terms(pattern, causal: bool) -> tuple[int | None, int | None, int, bool] | None:
    """(left, right, sinks, causal) of a union of built-in banded parts, or None when not a fast case.

    Windows, Causal and Full all contain the diagonal, so their union is the widest band; ``None`` for
    left/right means unbounded on that side."""
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
            lr = tuple(float("inf") if x is None else x for x in (p.left, p.right))
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
    deduplicated like ``compile`` (``tables.dedupe``), and the tables sized from the data like ``compile``'s,
    which needs a few small device-to-host reads of counts.

    Example:
        >>> layout = build_layout(Sinks(64) | Window(1024), 131072, causal=True, device="cuda")
    """
    start = time.perf_counter()
    kv_len = q_len if kv_len is None else kv_len
    for name, value in (("q_len", q_len), ("kv_len", kv_len), ("block_size", block_size)):
        check_int(value, name, 1)
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
    # sizes at or above `big` mean "unbounded" here: clamp them so that int64 arithmetic stays exact
    lo_off = big if left is None else min(left, big)
    hi_off = big if right is None else min(right, big)
    n = min(n, big)
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
        new, rep = tables.classify(allowed, rq, rk, q_len=q_len, kv_len=kv_len)
        masks, rep_id = tables.dedupe(rep, new)
        status[pq, pk] = new[inverse]
        mask_ids[pq, pk] = rep_id[inverse]
    return Layout(
        q_len=q_len, kv_len=kv_len, block_size=bs, pattern=pattern, causal=causal,
        info={"compile_seconds": time.perf_counter() - start, "builder": "banded"},
        **tables.pack(status[None, None], mask_ids[None, None], masks),
    )
