"""Head-parallel (DeepSpeed-Ulysses) sparse attention: all-to-all from sequence shards to head shards, any
single-device spattn attention on the whole sequence for this rank's heads, all-to-all back.

Notation: ``W`` ranks, rank ``r`` holds ``L_r`` rows of every head; ``H`` query heads (``H % W == 0``), ``hq =
H / W`` per rank after the exchange; ``Hkv`` key/value heads, ``G = H / Hkv``. Key/value heads go to ranks in
groups when ``Hkv % W == 0`` (``Hkv / W`` each); otherwise, when each rank's query heads fall in one GQA group
(``G % hq == 0``), every rank receives the one key/value head its query heads read (replicated, as
DeepSpeed does), and the gradients of the copies add up through autograd.

Because each rank sees its heads over the whole sequence, every pattern works unchanged: static, dynamic
(``TopK`` / ``TopP`` with any selector), ``PerHead``, documents.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from spattn.distributed.comm import all_gather, all_to_all, resolve_group
from spattn.distributed.patterns import dynamic_parts
from spattn.distributed.sharding import Sharding
from spattn.layout import Layout
from spattn.ops.attention.api import attention
from spattn.patterns.base import Pattern
from spattn.patterns.compile import compile as compile_pattern


def kv_heads_for(rank: int, world_size: int, heads: int, kv_heads: int) -> list[int]:
    """The key/value heads rank ``rank`` needs for its query heads ``[rank * hq, (rank + 1) * hq)``."""
    if heads % world_size:
        raise ValueError(f"head-parallel attention needs the query heads ({heads}) to be a multiple of the ranks "
                         f"({world_size})")
    hq, G = heads // world_size, heads // kv_heads
    if kv_heads % world_size == 0:
        n = kv_heads // world_size
        return list(range(rank * n, (rank + 1) * n))
    if G % hq == 0:
        return [rank * hq // G]
    raise ValueError(f"head-parallel attention cannot split {heads} query heads over {kv_heads} key/value heads "
                     f"on {world_size} ranks: key/value heads must be a multiple of the ranks, or each rank's "
                     f"{hq} query heads must lie in one group of {G}")


def slice_heads(layout: Layout, start: int, stop: int) -> Layout:
    """The layout of query heads ``[start, stop)`` (tables shared by all heads are kept as they are)."""
    if layout.heads == 1:
        return layout
    tables = {name: t[:, start:stop] for name, t in layout.tables().items() if name != "masks"}
    return dataclasses.replace(layout, **tables)


def _lengths(sharding: Sharding | None, local_len: int, group, device) -> tuple[list[int], torch.Tensor | None]:
    if sharding is None:  # rank-order slices: every rank must hold as many rows (8 bytes per rank to check)
        lengths = all_gather(torch.tensor([local_len], dtype=torch.long, device=device), group, name="lengths")
        lengths = lengths.tolist()
        if len(set(lengths)) != 1:
            raise ValueError(f"ranks hold different numbers of rows {lengths}: pass the sharding= they were cut with")
        return lengths, None
    return sharding.lengths(), torch.argsort(sharding.permutation())


def head_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern_or_layout: Pattern | Layout,
    *,
    group=None,
    sharding: Sharding | None = None,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    block_size: int = 128,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse self-attention over a sequence sharded across ranks, computed head-parallel (Ulysses).

    Collective: every rank of ``group`` calls it with its own rows.

    Args:
        query: this rank's rows ``[B, H, L_r, D]`` (all heads).
        key, value: ``[B, Hkv, L_r, D]`` / ``[B, Hkv, L_r, Dv]``, the same rows.
        pattern_or_layout: a :class:`~spattn.Pattern` (static or dynamic) or a :class:`~spattn.Layout` compiled
            for the whole sequence (``q_len == kv_len == L``, heads 1 or ``H``).
        group: a ``ProcessGroup`` or a 1-D ``DeviceMesh`` (default: the default group).
        sharding: which global positions each rank's rows are (a :class:`Sharding`); default ``None`` means
            every rank holds ``L_r`` rows and the sequence is their concatenation in rank order (checked with a
            small all-gather of the lengths, 8 bytes per rank, counted as ``"lengths"``).
        causal, scale, backend, block_size, return_lse: as in :func:`spattn.attention`.

    Returns:
        ``[B, H, L_r, Dv]`` for this rank's rows (and lse float32 ``[B, H, L_r]``), equal to single-process
        ``spattn.attention`` on the whole sequence restricted to these rows.

    Example:
        >>> out = head_parallel_attention(q_local, k_local, v_local, Sinks(64) | TopP("pooled", 0.9),
        ...                               causal=True)  # doctest: +SKIP
    """
    group = resolve_group(group)
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, L_r, D]")
    B, H, Lr, D = query.shape
    Hkv, Dv = key.shape[1], value.shape[-1]
    if key.shape[2] != Lr or value.shape[2] != Lr:
        raise ValueError(f"query, key and value must hold the same rows, got lengths {Lr}, {key.shape[2]}, "
                         f"{value.shape[2]}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if sharding is not None and sharding.world_size != W:
        raise ValueError(f"sharding is for {sharding.world_size} ranks, the group has {W}")
    if sharding is not None and sharding.local_length(rank) != Lr:
        raise ValueError(f"rank {rank} holds {Lr} rows but the sharding gives it {sharding.local_length(rank)}")
    hq = H // W if H % W == 0 else None
    kv_of = [kv_heads_for(t, W, H, Hkv) for t in range(W)]
    hk = len(kv_of[0])
    lengths, inverse = _lengths(sharding, Lr, group, query.device)
    L = sum(lengths)
    dynamic = isinstance(pattern_or_layout, Pattern) and pattern_or_layout.contains_dynamic()
    G = H // Hkv
    grouped = dynamic and any(getattr(p, "sharing", "head") == "group" for p in dynamic_parts(pattern_or_layout))
    if grouped and hq % G:
        raise ValueError(f"dynamic selection shares one selection per GQA group of {G} heads, but each rank holds "
                         f"{hq} query heads: use more key/value heads per rank or sharing='head'")

    # sequence shards -> head shards: rank t receives every rank's rows of its heads
    q_send = query.reshape(B, W, hq, Lr, D).permute(1, 3, 0, 2, 4).reshape(W * Lr, B, hq, D)
    q_all = all_to_all(q_send, lengths, [Lr] * W, group, name="query")  # [L, B, hq, D], rank-order rows
    kv = torch.cat([key, value], -1)  # [B, Hkv, L_r, D + Dv]
    kv_send = torch.stack([kv[:, kv_of[t]] for t in range(W)])  # [W, B, hk, L_r, D + Dv]
    kv_send = kv_send.permute(0, 3, 1, 2, 4).reshape(W * Lr, B, hk, D + Dv)
    kv_all = all_to_all(kv_send, lengths, [Lr] * W, group, name="key_value")
    q_full = q_all.permute(1, 2, 0, 3)  # [B, hq, L, D]
    kv_full = kv_all.permute(1, 2, 0, 3)
    if inverse is not None:  # rank-order rows -> global positions
        inverse = inverse.to(query.device)
        q_full, kv_full = q_full.index_select(2, inverse), kv_full.index_select(2, inverse)
    k_full, v_full = kv_full[..., :D], kv_full[..., D:]

    h0, h1 = rank * hq, (rank + 1) * hq
    if isinstance(pattern_or_layout, Layout):
        layout = pattern_or_layout
        if layout.q_len != L or layout.kv_len != L:
            raise ValueError(f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len}; the sequence has {L} tokens")
        layout = slice_heads(layout.to(query.device), h0, h1)
    elif isinstance(pattern_or_layout, Pattern):
        if dynamic:
            layout = compile_pattern(pattern_or_layout, L, L, causal=causal, block_size=block_size, batch=B,
                                     heads=hq, device=query.device, query=q_full, key=k_full)
        else:
            layout = compile_pattern(pattern_or_layout, L, L, causal=causal, block_size=block_size, batch=B,
                                     heads=H, device=query.device)
            layout = slice_heads(layout, h0, h1)
    else:
        raise TypeError(f"pattern_or_layout must be a spattn Pattern or Layout, got {type(pattern_or_layout).__name__}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    result = attention(q_full, k_full, v_full, layout, causal=causal and layout.causal, scale=scale,
                       backend=backend, return_lse=return_lse)
    out, lse = result if return_lse else (result, None)

    # head shards -> sequence shards
    perm = None if sharding is None else sharding.permutation().to(query.device)

    def back(x: torch.Tensor, name: str) -> torch.Tensor:  # [B, hq, L, ...] -> [B, H, L_r, ...]
        if perm is not None:
            x = x.index_select(2, perm)
        tail = x.shape[3:]
        send = x.movedim(2, 0).contiguous()  # [L, B, hq, ...] rank-order rows
        got = all_to_all(send, [Lr] * W, lengths, group, name=name)  # [W * L_r, B, hq, ...]
        got = got.reshape(W, Lr, B, hq, *tail).movedim(1, 3)  # [W, B, hq, L_r, ...]
        return got.movedim(0, 1).reshape(B, H, Lr, *tail)

    out = back(out, "output")
    if return_lse:
        return out, back(lse, "lse")
    return out
