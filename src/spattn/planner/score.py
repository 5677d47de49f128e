"""Score many layouts of one layer at once: per-head recall (and output error) of each, in one pass.

Notation: B batch, H query heads, Hkv key/value heads (G = H / Hkv), L tokens, bs block size,
NK = ceil(L / bs) key blocks, C layouts.

For each chunk of query rows (a whole number of blocks) the dense probabilities ``p [B, H, rows, L]`` are
computed once and pooled per key block (``R [B, H, rows, NK]``, and with values ``PV [B, H, rows, NK, Dv]``).
A layout then costs only its block tables: a full block adds its pooled sum, a partial block adds the sum of
``p`` under its token mask, gathered tile by tile. Nothing of size L x L is built per layout; memory is one
chunk of ``p`` (about 2^23 elements) shared by every layout.

Checked against :func:`spattn.coverage.measure` (the streaming reference) in ``tests/test_planner_score.py``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from spattn.layout import Layout
from spattn.layout import tables as _tables

_CHUNK_ELEMENTS = 1 << 23
_CHUNK_ELEMENTS_CUDA = 1 << 26  # a GPU has the memory; fewer, larger chunks keep it busy


@dataclasses.dataclass(eq=False)
class LayoutScores:
    """What each of C layouts keeps of the dense attention of one layer.

    Attributes:
        recall: float32 ``[C, B, H, L]`` — the dense softmax mass on kept keys, per query.
        output_error: float32 ``[C, B, H]`` or None (no values) — ``||o_sparse - o_dense||_F / ||o_dense||_F``
            per sequence and head (rows with nothing kept output 0, like ``spattn.attention``).
    """

    recall: torch.Tensor
    output_error: torch.Tensor | None


def _check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, layouts: list[Layout]) -> None:
    if not isinstance(query, torch.Tensor) or query.dim() != 4:
        raise ValueError(f"query must be a [B, H, L, D] tensor, got {getattr(query, 'shape', type(query))}")
    if not isinstance(key, torch.Tensor) or key.dim() != 4 or key.shape[0] != query.shape[0] \
            or key.shape[3] != query.shape[3] or query.shape[1] % key.shape[1]:
        raise ValueError(f"key must be [B, Hkv, L, D] with Hkv dividing H, matching query {tuple(query.shape)}; "
                         f"got {getattr(key, 'shape', type(key))}")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"score_layouts scores self-attention: query and key lengths differ "
                         f"({query.shape[2]} vs {key.shape[2]})")
    if value is not None and (value.dim() != 4 or value.shape[:3] != key.shape[:3]):
        raise ValueError(f"value must be [B, Hkv, L, Dv] matching key {tuple(key.shape[:3])}, got {tuple(value.shape)}")
    if not layouts:
        raise ValueError("layouts must hold at least one Layout")
    B, H, L = query.shape[0], query.shape[1], query.shape[2]
    bs = layouts[0].block_size
    for n, lay in enumerate(layouts):
        if not isinstance(lay, Layout):
            raise TypeError(f"layouts[{n}] must be a spattn Layout, got {type(lay).__name__}")
        if (lay.q_len, lay.kv_len) != (L, L) or lay.block_size != bs:
            raise ValueError(f"layouts[{n}] is for {lay.q_len}x{lay.kv_len} tokens in blocks of {lay.block_size}; "
                             f"expected {L}x{L} in blocks of {bs} (every layout must share one block size)")
        if lay.batch not in (1, B) or lay.heads not in (1, H):
            raise ValueError(f"layouts[{n}] has tables for batch {lay.batch}, heads {lay.heads}; expected 1 or {B}, "
                             f"1 or {H}")


def score_layouts(
    query: torch.Tensor,
    key: torch.Tensor,
    layouts: list[Layout],
    *,
    value: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    chunk_elements: int | None = None,
) -> LayoutScores:
    """Recall per query (and output error per head) of every layout, from one pass over the dense attention.

    Args:
        query: ``[B, H, L, D]``; key: ``[B, Hkv, L, D]`` (GQA: query head h reads key head h // (H / Hkv)).
        layouts: C self-attention layouts for L tokens sharing one block size (tables batch 1 or B, heads 1
            or H; dynamic layouts welcome).
        value: optional ``[B, Hkv, L, Dv]``; adds the output error.
        causal: compare against causal dense attention (default True).
        scale: score scale, default ``1 / sqrt(D)``.
        chunk_elements: about how many probabilities one chunk of query rows holds (default 2^23 on the CPU,
            2^26 on CUDA).

    Returns:
        :class:`LayoutScores` (recall ``[C, B, H, L]``, output error ``[C, B, H]``).
    """
    _check(query, key, value, layouts)
    B, H, L, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    bs = layouts[0].block_size
    NK = math.ceil(L / bs)
    C = len(layouts)
    dev = query.device
    if chunk_elements is None:
        chunk_elements = _CHUNK_ELEMENTS_CUDA if dev.type == "cuda" else _CHUNK_ELEMENTS
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cdt = torch.float64 if query.dtype == torch.float64 else torch.float32
    rows_per_chunk = max(bs, chunk_elements // max(1, B * H * NK * bs) // bs * bs)
    pad_k = NK * bs - L
    k_all = key.to(cdt)
    v_blocks = None
    if value is not None:
        Dv = value.shape[-1]
        v_blocks = torch.nn.functional.pad(value.to(cdt), (0, 0, 0, pad_k)).view(B, Hkv, NK, bs, Dv)
    # every layout's block tables, expanded to [B, H]: full cells as one stacked indicator, partial cells as one
    # list (layout, batch, head, query block, key block, tile) with the tiles of all layouts concatenated
    full_all = torch.zeros(C, B, H, math.ceil(L / bs), NK, dtype=cdt, device=dev)
    parts, tiles_all, base = [], [], 0
    for c, lay in enumerate(layouts):
        slot, tiles = _tables.unpack(lay)[1], _tables.tiles(lay.masks)
        slot, M = slot.to(dev).expand(B, H, -1, -1), tiles.shape[0] - 2
        full_all[c] = (slot == M).to(cdt)
        idx = (slot < M).nonzero()  # [n, 4]: batch, head, query block, key block
        tid = slot[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]] + base
        parts.append(torch.cat([torch.full_like(idx[:, :1], c), idx, tid[:, None]], 1))
        tiles_all.append(tiles[:M].to(dev, cdt))
        base += M
    parts_t = torch.cat(parts)  # [n, 6]
    tiles_t = torch.cat(tiles_all) if base else torch.zeros(0, bs, bs, dtype=cdt, device=dev)
    if base:  # equal masks of different layouts become one tile (a random projection names each, then checked)
        weights = torch.rand(bs * bs, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dev)
        names, first = torch.unique(tiles_t.flatten(1).double() @ weights, return_inverse=True)
        keep = torch.zeros(names.numel(), dtype=torch.long, device=dev).scatter_(
            0, first, torch.arange(base, device=dev))
        if not torch.equal(tiles_t[keep][first], tiles_t):  # pragma: no cover - a projection collision
            keep, first = torch.arange(base, device=dev), torch.arange(base, device=dev)
        tiles_t = tiles_t[keep]
        parts_t[:, 5] = first[parts_t[:, 5]]
        base = tiles_t.shape[0]
    # layouts share most partial cells (the causal diagonal, the sinks column...): sum each distinct
    # (batch, head, query block, key block, tile) once, then hand the sums to every layout holding it
    NQ = math.ceil(L / bs)
    code = (((parts_t[:, 1] * H + parts_t[:, 2]) * NQ + parts_t[:, 3]) * NK + parts_t[:, 4]) * max(1, base) \
        + parts_t[:, 5]
    ucode, owner = torch.unique(code, return_inverse=True)  # [u], [n]
    cells = torch.stack([ucode // (max(1, base) * NK * NQ * H), ucode // (max(1, base) * NK * NQ) % H,
                         ucode // (max(1, base) * NK) % NQ, ucode // max(1, base) % NK, ucode % max(1, base)], 1)
    recall = torch.zeros(C, B, H, L, dtype=cdt, device=dev)
    sq_err = torch.zeros(C, B, H, dtype=torch.float64, device=dev) if value is not None else None
    sq_ref = torch.zeros(B, H, dtype=torch.float64, device=dev) if value is not None else None
    for i0 in range(0, L, rows_per_chunk):
        i1 = min(L, i0 + rows_per_chunk)
        n_rows = i1 - i0
        nq = math.ceil(n_rows / bs)
        rows = nq * bs  # padded to whole blocks; padded rows have p = 0 and are dropped at the end
        # causal: rows before i1 see no key from block ceil(i1 / bs) on, so those columns are never computed
        nk = math.ceil(i1 / bs) if causal else NK
        kend = min(L, nk * bs)
        q = (query[:, :, i0:i1].to(cdt) * scale).view(B, Hkv, G, n_rows, D)
        s = torch.matmul(q, k_all[:, :, None, :kend].transpose(-1, -2)).view(B, H, n_rows, kend)
        if causal:
            future = torch.arange(kend, device=dev)[None, :] > torch.arange(i0, i1, device=dev)[:, None]
            s = s.masked_fill_(future, -math.inf)
        p = torch.softmax(s, dim=-1)  # no empty row: causal self-attention sees at least itself
        del s
        if nk * bs != kend or rows != n_rows:
            p = torch.nn.functional.pad(p, (0, nk * bs - kend, 0, rows - n_rows))
        p = p.view(B, H, nq, bs, nk, bs)
        pooled = p.sum(-1)  # [B, H, nq, bs, nk]
        qb0 = i0 // bs
        full = full_all[:, :, :, qb0:qb0 + nq, :nk]  # [C, B, H, nq, nk]; later key blocks hold no mass
        kept = torch.einsum("bhqrn,cbhqn->cbhqr", pooled, full)  # [C, B, H, nq, bs]
        in_chunk = (cells[:, 2] >= qb0) & (cells[:, 2] < qb0 + nq) & (cells[:, 3] < nk)
        ub, uh, uq, uk, ut = cells[in_chunk].unbind(1)
        local = torch.full((cells.shape[0],), -1, dtype=torch.long, device=dev)
        local[in_chunk] = torch.arange(ub.numel(), device=dev)
        p_tiles = p[ub, uh, uq - qb0, :, uk, :] * tiles_t[ut]  # [u, bs, bs] (query row, key) of each cell
        rows_of = parts_t[local[owner] >= 0]
        which = local[owner][local[owner] >= 0]
        cc, bb, hh, qb = rows_of[:, 0], rows_of[:, 1], rows_of[:, 2], rows_of[:, 3] - qb0
        kept.index_put_((cc, bb, hh, qb), p_tiles.sum(-1)[which], accumulate=True)
        kept = kept.flatten(3)[..., :n_rows]
        recall[..., i0:i1] = kept.clamp(0.0, 1.0)
        if value is not None:
            # each key block's share of each row's output: [B, H, nq, bs, nk, Dv]
            pv = torch.einsum("bhgqrnk,bhnkd->bhgqrnd", p.view(B, Hkv, G, nq, bs, nk, bs), v_blocks[:, :, :nk])
            pv = pv.reshape(B, H, nq, bs, nk, -1)
            o_dense = pv.sum(-2).flatten(2, 3)[:, :, :n_rows]  # [B, H, rows, Dv]
            sq_ref += o_dense.double().square().sum((-1, -2))
            o_kept = torch.einsum("bhqrnd,cbhqn->cbhqrd", pv, full)  # [C, B, H, nq, bs, Dv]
            o_part = torch.bmm(p_tiles, v_blocks[ub, uh // G, uk])  # [u, bs, Dv]
            o_kept.index_put_((cc, bb, hh, qb), o_part[which], accumulate=True)
            o_kept = o_kept.flatten(3, 4)[..., :n_rows, :]
            k_sum = kept[..., None]
            o_sparse = o_kept / torch.where(k_sum > 0, k_sum, torch.ones_like(k_sum))
            sq_err += (o_sparse - o_dense).double().square().sum((-1, -2))
            del pv, o_kept, o_sparse
        del p, p_tiles, pooled
    output_error = None
    if value is not None:
        output_error = (sq_err / sq_ref.clamp_min(1e-300)).sqrt().to(cdt)
    return LayoutScores(recall=recall.to(cdt), output_error=output_error)
