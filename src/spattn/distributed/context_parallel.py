"""Context-parallel sparse attention: local query rows, and only the key/value blocks those rows visit.

Rank ``r`` holds the rows of its :class:`~spattn.distributed.Sharding` (whole blocks) of query, key and value.
Per call:

1. the layout of the whole sequence (every rank compiles the same one: static parts are O(blocks));
   dynamic parts (``TopK`` / ``TopP`` with the ``pooled`` or ``bounds`` selector) are selected from the
   *compact key summaries* of every block, all-gathered: per block and key/value head, the float32 sum of
   the keys (``pooled``) or their min and max (``bounds``), ``1/block_size`` of the keys — see the note below;
2. the rows of this rank (its query blocks) and the key blocks they visit, ``need_r``;
3. ``need`` of every rank, all-gathered (one byte per block), then one all-to-all in which each rank sends
   each other rank the key/value tokens of its own blocks that rank needs: with a window only the
   neighbouring blocks move, with a dynamic selection only the selected ones, with dense attention everything
   (an all-gather);
4. the rows' layout rewritten onto the compact key set (own and received blocks, in global order) and run by
   :func:`spattn.attention` (any backend). The backward pass is autograd: the reverse all-to-all returns the
   key/value gradients to their owners.

Note (surrogate keys): selectors score from ``(query, key)``; to reuse them unchanged, the summaries are
expanded into a surrogate key tensor whose per-block pooled values are exactly the summaries (block ``c`` is
``[sum_c, 0, ...]`` in float32 for ``pooled``, so its mean is the same ``sum_c / n_c`` the selector
computes from the real keys; ``[min_c, max_c, max_c, ...]`` for ``bounds``), next to a full-length query
tensor holding this rank's rows (zeros elsewhere; their selections are discarded). The selection of this
rank's rows equals the single-process one; the cost is the selector's work for the whole sequence on every
rank, and two full-length surrogates in memory.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from spattn.distributed.comm import all_gather, all_to_all, resolve_group
from spattn.distributed.patterns import dynamic_parts
from spattn.distributed.sharding import Sharding
from spattn.layout import Layout
from spattn.layout import tables as _tables
from spattn.ops.attention.api import attention
from spattn.patterns.base import Pattern
from spattn.patterns.compile import compile as compile_pattern
from spattn.patterns.compile import layout_from_status

SUMMARY_SELECTORS = ("pooled", "bounds")


def summary_kind(pattern: Pattern) -> str | None:
    """``None`` (static), ``"pooled"`` or ``"bounds"``: the key summary the pattern's selection reads."""
    parts = dynamic_parts(pattern)
    if not parts:
        return None
    kinds = {getattr(p, "selector", None) for p in parts}
    if not kinds <= set(SUMMARY_SELECTORS) or len(kinds) != 1:
        raise NotImplementedError(
            f"context-parallel attention selects from key summaries with one of {SUMMARY_SELECTORS}; this pattern "
            f"uses {sorted(map(str, kinds))}: use head_parallel_attention, which runs every selector unchanged"
        )
    return kinds.pop()


def row_tables(layout: Layout, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block status int8 and mask slot int64, both ``[Bl, Hl, len(rows), NK]``, of query blocks ``rows``."""
    rows_t = torch.tensor(rows, dtype=torch.long, device=layout.device)
    slot = _tables.unpack(layout)[1][:, :, rows_t]
    M = layout.masks.shape[0]
    status = torch.where(slot == M, 2, torch.where(slot == M + 1, 0, 1)).to(torch.int8)
    return status, slot


def rows_layout(status: torch.Tensor, slot: torch.Tensor, layout: Layout, columns: torch.Tensor, *, q_len: int,
                kv_len: int) -> Layout:
    """The layout of one rank's query rows (``status`` / ``slot`` from :func:`row_tables`) against key blocks
    ``columns``, in the order the keys are laid out (ascending for the compact key set; rank order for torch's
    all-gather), with the global layout's token masks."""
    columns = columns.to(status.device)
    status, slot = status[..., columns], slot[..., columns]
    mask_ids = torch.where(status == 1, slot, -1).to(torch.int32)
    return layout_from_status(status, layout.masks, mask_ids, q_len=q_len, kv_len=kv_len,
                              block_size=layout.block_size, pattern=layout.pattern, causal=layout.causal)


def token_rows(starts: torch.Tensor, lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """int64: the row indices ``starts[i] .. starts[i] + lengths[i] - 1`` of every block, concatenated."""
    offsets = torch.arange(block_size)
    rows = starts[:, None] + offsets
    return rows[offsets[None, :] < lengths[:, None]]


def _summaries(key: torch.Tensor, kind: str, block_size: int) -> torch.Tensor:
    """Local key blocks -> ``[n_blocks, B, Hkv, S, D]``: sums in the selectors' accumulation dtype (S=1, the
    numerator of their block mean) or min and max (S=2)."""
    from spattn.selectors.common import pool

    if kind == "pooled":
        n = -(-key.shape[2] // block_size)
        padded = torch.nn.functional.pad(key, (0, 0, 0, n * block_size - key.shape[2]))
        acc = torch.float64 if key.dtype == torch.float64 else torch.float32
        sums = padded.unflatten(-2, (n, block_size)).sum(-2, dtype=acc)
        return sums[:, :, :, None].permute(2, 0, 1, 3, 4).contiguous()
    lo, hi = pool(key, block_size, "amin"), pool(key, block_size, "amax")
    return torch.stack([lo, hi], 3).permute(2, 0, 1, 3, 4).contiguous()


def _surrogate_key(summaries: torch.Tensor, kind: str, sharding: Sharding, dtype: torch.dtype) -> torch.Tensor:
    """Global summaries ``[NQ, B, Hkv, S, D]`` (block order) -> surrogate key ``[B, Hkv, L, D]``."""
    NB, B, Hkv, _, D = summaries.shape
    bs, L = sharding.block_size, sharding.seq_len
    if kind == "pooled":
        sur = torch.zeros(NB, bs, B, Hkv, D, dtype=summaries.dtype, device=summaries.device)
        sur[:, 0] = summaries[:, :, :, 0]
    else:
        sur = summaries[:, :, :, 1][:, None].expand(NB, bs, B, Hkv, D).clone().to(dtype)
        sur[:, 0] = summaries[:, :, :, 0]
    return sur.reshape(NB * bs, B, Hkv, D)[:L].permute(1, 2, 0, 3)


def _global_layout(pattern, query, key, sharding, rank, group, causal, B, H):
    """The whole-sequence layout on every rank (dynamic parts selected from gathered key summaries)."""
    L, bs = sharding.seq_len, sharding.block_size
    kind = summary_kind(pattern)
    if kind is None:
        return compile_pattern(pattern, L, L, causal=causal, block_size=bs, batch=B, heads=H, device=query.device)
    W = sharding.world_size
    local = _summaries(key.detach(), kind, bs)  # [n_r, B, Hkv, S, D]
    most = max(len(b) for b in sharding.blocks)
    padded = torch.nn.functional.pad(local, (0, 0) * 4 + (0, most - local.shape[0]))
    gathered = all_gather(padded, group, name="key_summaries").view(W, most, *local.shape[1:])
    order = torch.empty(sharding.num_blocks, dtype=torch.long)
    flat = []
    for r, blocks in enumerate(sharding.blocks):
        flat.extend(r * most + i for i in range(len(blocks)))
    order[torch.tensor([b for blocks in sharding.blocks for b in blocks])] = torch.tensor(flat)
    summaries = gathered.flatten(0, 1)[order.to(gathered.device)]
    sur_key = _surrogate_key(summaries, kind, sharding, key.dtype)
    sur_query = query.new_zeros(B, H, L, query.shape[-1])
    sur_query[:, :, sharding.positions(rank).to(query.device)] = query.detach()
    return compile_pattern(pattern, L, L, causal=causal, block_size=bs, batch=B, heads=H, device=query.device,
                           query=sur_query, key=sur_key)


_SHARDINGS: dict = {}  # default shardings by (pattern, length, ranks, causal, block size, balanced)
_SHARDINGS_SIZE = 32


def _default_sharding(pattern, L: int, W: int, causal: bool, bs: int, balanced: bool) -> Sharding:
    if not balanced:
        return Sharding.contiguous(L, W, block_size=bs)
    if isinstance(pattern, Layout):
        return Sharding.balanced(pattern, world_size=W)
    key = (pattern, L, W, causal, bs)
    try:
        found = _SHARDINGS.get(key)
    except TypeError:  # a pattern holding unhashable values (a Document's tensor): no cache
        return Sharding.balanced(pattern, L, world_size=W, causal=causal, block_size=bs)
    if found is None:
        found = _SHARDINGS[key] = Sharding.balanced(pattern, L, world_size=W, causal=causal, block_size=bs)
        while len(_SHARDINGS) > _SHARDINGS_SIZE:
            _SHARDINGS.pop(next(iter(_SHARDINGS)))
    return found


def context_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: Pattern | Layout,
    *,
    mesh=None,
    sharding: Sharding | None = None,
    load_balance: bool = True,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    block_size: int = 128,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse self-attention over a sequence sharded across ranks, with local query rows (context parallel).

    Collective: every rank of the mesh calls it with its own rows.

    Args:
        query: this rank's rows ``[B, H, L_r, D]``.
        key, value: ``[B, Hkv, L_r, D]`` / ``[B, Hkv, L_r, Dv]``, the same rows.
        pattern: a static :class:`~spattn.Pattern`, a dynamic one whose selectors are ``"pooled"`` or
            ``"bounds"``, or a :class:`~spattn.Layout` of the whole sequence (``q_len == kv_len == L``).
        mesh: a 1-D ``DeviceMesh`` or a ``ProcessGroup`` (default: the default group).
        sharding: the :class:`Sharding` the rows were cut with. Default: built here from the pattern, the
            total length (the sum of every rank's rows, one small all-gather) and ``load_balance``:
            ``Sharding.balanced`` when True (default), ``Sharding.contiguous`` when False. Pass it
            explicitly when you have it (the one you sharded the inputs with).
        causal, scale, backend, block_size, return_lse: as in :func:`spattn.attention`.

    Returns:
        ``[B, H, L_r, Dv]`` (and lse float32 ``[B, H, L_r]``): single-process attention on the whole sequence,
        restricted to this rank's rows.

    Example:
        >>> s = Sharding.balanced(Sinks(64) | Window(4096), L, world_size=W, causal=True)
        >>> out = context_parallel_attention(s.shard(q, rank), s.shard(k, rank), s.shard(v, rank),
        ...                                  Sinks(64) | Window(4096), sharding=s, causal=True)  # doctest: +SKIP
    """
    group = resolve_group(mesh)
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, L_r, D]")
    B, H, Lr, D = query.shape
    if key.shape[2] != Lr or value.shape[2] != Lr:
        raise ValueError(f"query, key and value must hold the same rows, got lengths {Lr}, {key.shape[2]}, "
                         f"{value.shape[2]}")
    layout = pattern if isinstance(pattern, Layout) else None
    if layout is None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a spattn Pattern or Layout, got {type(pattern).__name__}")
    if sharding is None:
        if layout is not None:
            L = layout.q_len
        else:
            lengths = all_gather(torch.tensor([Lr], dtype=torch.long, device=query.device), group, name="lengths")
            L = int(lengths.sum())
        bs = layout.block_size if layout is not None else block_size
        sharding = _default_sharding(pattern, L, W, causal, bs, bool(load_balance))
    if not isinstance(sharding, Sharding):
        raise TypeError(f"sharding must be a spattn.distributed.Sharding, got {type(sharding).__name__}")
    if sharding.world_size != W:
        raise ValueError(f"sharding is for {sharding.world_size} ranks, the group has {W}")
    if sharding.local_length(rank) != Lr:
        raise ValueError(f"rank {rank} holds {Lr} rows but the sharding gives it {sharding.local_length(rank)}")
    L, bs = sharding.seq_len, sharding.block_size
    if layout is None:
        layout = _global_layout(pattern, query, key, sharding, rank, group, causal, B, H)
    else:
        if layout.q_len != L or layout.kv_len != L or layout.block_size != bs:
            raise ValueError(f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len}, block_size="
                             f"{layout.block_size}; the sharding is for {L} tokens in blocks of {bs}")
        layout = layout.to(query.device)

    rows = list(sharding.blocks[rank])
    status, slot = row_tables(layout, rows)
    need = (status > 0).flatten(0, 2).any(0).cpu()
    need[rows] = True  # own key blocks are free and keep the compact keys at least as long as the queries
    needs = all_gather(need.to(torch.uint8).to(query.device), group, name="needed_blocks").view(W, -1).bool().cpu()
    owner = sharding.owner()
    lengths = torch.tensor([sharding.block_length(b) for b in range(sharding.num_blocks)])
    local_start = torch.full((sharding.num_blocks,), -1, dtype=torch.long)  # first local row of each own block
    local_start[rows] = torch.cumsum(lengths[rows], 0) - lengths[rows]
    empty = torch.zeros(0, dtype=torch.long)
    send_blocks = [empty if t == rank else torch.nonzero(needs[t] & (owner == rank)).flatten() for t in range(W)]
    recv_blocks = [empty if s == rank else torch.nonzero(needs[rank] & (owner == s)).flatten() for s in range(W)]
    sent = torch.cat(send_blocks)
    send_index = token_rows(local_start[sent], lengths[sent], bs).to(query.device)
    kv = torch.cat([key, value], -1)  # [B, Hkv, L_r, D + Dv]
    send = kv.index_select(2, send_index).permute(2, 0, 1, 3)  # [n, B, Hkv, D + Dv]
    recv = all_to_all(send, [int(lengths[b].sum()) for b in recv_blocks],
                      [int(lengths[b].sum()) for b in send_blocks], group, name="key_value")
    # compact keys: own blocks then received blocks, reordered by global block index
    pieces = torch.cat([torch.tensor(rows, dtype=torch.long)] + recv_blocks)
    order = torch.argsort(pieces)
    columns = pieces[order]
    piece_start = torch.cumsum(lengths[pieces], 0) - lengths[pieces]
    index = token_rows(piece_start[order], lengths[columns], bs).to(query.device)
    compact = torch.cat([kv.permute(2, 0, 1, 3), recv], 0).index_select(0, index).permute(1, 2, 0, 3)
    k_compact, v_compact = compact[..., :D], compact[..., D:]
    local = rows_layout(status, slot, layout, columns, q_len=Lr, kv_len=int(lengths[columns].sum()))
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    return attention(query, k_compact, v_compact, local, causal=causal and local.causal, scale=scale,
                     backend=backend, return_lse=return_lse)
