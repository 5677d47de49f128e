"""``compile(pattern, ...) -> Layout``: analytic block classification, then exact token masks for the few
distinct partial blocks, then the forward and transposed block tables."""

from __future__ import annotations

import time

import torch

from spattn.patterns.base import EMPTY, FULL, PARTIAL, Context, Pattern
from spattn.patterns.builtin import Causal
from spattn.patterns.layout import Layout

_MASK_CHUNK = 256  # representative blocks evaluated at once (each bs*bs booleans)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def make_context(
    pattern: Pattern,
    q_len: int,
    kv_len: int | None,
    *,
    causal: bool,
    block_size: int,
    batch: int | None,
    heads: int | None,
    device,
    query: torch.Tensor | None,
    key: torch.Tensor | None,
) -> tuple[Pattern, Context]:
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a spattn Pattern, got {type(pattern).__name__}")
    q_len = _check_int(q_len, "q_len", 1)
    kv_len = q_len if kv_len is None else _check_int(kv_len, "kv_len", 1)
    if kv_len < q_len:
        raise ValueError(f"kv_len ({kv_len}) must be >= q_len ({q_len}): queries are aligned bottom-right")
    block_size = _check_int(block_size, "block_size", 1)
    if batch is not None:
        _check_int(batch, "batch", 1)
    if heads is not None:
        _check_int(heads, "heads", 1)
    if device is None:
        device = query.device if query is not None else torch.device("cpu")
    if pattern.contains_dynamic() and (query is None or key is None):
        raise ValueError(f"pattern {pattern!r} depends on the input: pass query= and key= to compile")
    full = pattern & Causal() if causal else pattern
    ctx = Context(q_len, kv_len, block_size, torch.device(device), causal, batch, heads, query, key)
    return full, ctx


def compile(  # noqa: A001 - the verb the whole project uses
    pattern: Pattern,
    q_len: int,
    kv_len: int | None = None,
    *,
    causal: bool = False,
    block_size: int = 128,
    batch: int | None = None,
    heads: int | None = None,
    device: torch.device | str | None = None,
    query: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
) -> Layout:
    """Compile a pattern into a block-sparse :class:`Layout` for ``q_len`` queries and ``kv_len`` keys.

    Args:
        pattern: any :class:`Pattern` (``Sinks(64) | Window(1024)``, ``PerHead([...])``, ...).
        q_len: number of queries; ``kv_len`` defaults to it. Queries are aligned bottom-right.
        causal: intersect with ``Causal()`` (no query sees a later key).
        block_size: tokens per block on both axes (128 matches the kernels).
        batch, heads: sizes the layout must serve (patterns that vary per sequence / head need them).
        device: where the tables live (default: the query's device, else CPU).
        query, key: ``[B, H, Lq, D]`` / ``[B, Hkv, Lk, D]``, needed only by dynamic (input-aware) patterns.

    Returns:
        A :class:`Layout` with tables ``[Bl, Hl, ...]`` (``Bl``/``Hl`` are 1 when shared).

    Example:
        >>> layout = compile(Sinks(64) | Window(1024), 8192, causal=True)
    """
    start = time.perf_counter()
    full, ctx = make_context(
        pattern, q_len, kv_len, causal=causal, block_size=block_size, batch=batch, heads=heads,
        device=device, query=query, key=key,
    )
    if ctx.device.type == "cuda":
        from spattn.patterns.device_build import build_layout, supports_fast_build

        if supports_fast_build(pattern):  # banded built-ins: the same tables from a few fused device ops
            layout = build_layout(pattern, ctx.q_len, ctx.kv_len, causal=causal, block_size=block_size, device=ctx.device)
            layout.info["compile_seconds"] = time.perf_counter() - start
            layout.info["builder"] = "device_build"
            return layout
    status = full.status(ctx).contiguous()
    if heads is not None and status.shape[1] not in (1, heads):
        raise ValueError(f"pattern gives {status.shape[1]} heads but heads={heads}")
    if batch is not None and status.shape[0] not in (1, batch):
        raise ValueError(f"pattern gives batch {status.shape[0]} but batch={batch}")
    status, mask_ids, masks = _resolve_partial(full, ctx, status)
    tables = _build_tables(status, mask_ids)
    layout = Layout(
        q_len=ctx.q_len,
        kv_len=ctx.kv_len,
        block_size=block_size,
        masks=masks,
        pattern=pattern,
        causal=causal,
        info={"compile_seconds": time.perf_counter() - start, **ctx.info},
        **tables,
    )
    return layout


def _resolve_partial(pattern: Pattern, ctx: Context, status: torch.Tensor):
    """Evaluate token masks for one representative of each distinct partial-block signature, then
    reclassify blocks that turn out empty or full, and deduplicate the remaining masks by content."""
    bs, dev = ctx.block_size, ctx.device
    NQ, NK = ctx.num_q_blocks, ctx.num_kv_blocks
    mask_ids = torch.full(status.shape, -1, dtype=torch.int32, device=dev)
    idx = (status == PARTIAL).nonzero()
    if idx.shape[0] == 0:
        return status, mask_ids, torch.zeros(0, bs, bs, dtype=torch.bool, device=dev)
    b, h, qb, kb = idx.unbind(1)
    sig = pattern.signature(ctx, b, h, qb, kb)
    tails = torch.stack([(qb == NQ - 1).long(), (kb == NK - 1).long()], dim=1)
    sig = torch.cat([sig, tails], dim=1)
    _, inverse = torch.unique(sig, dim=0, return_inverse=True)
    n_rep = int(inverse.max()) + 1
    first = torch.full((n_rep,), idx.shape[0], dtype=torch.long, device=dev)
    first.scatter_reduce_(0, inverse, torch.arange(idx.shape[0], device=dev), reduce="amin")
    rb, rh, rq, rk = b[first], h[first], qb[first], kb[first]
    r = torch.arange(bs, device=dev)
    pieces = []
    for s in range(0, n_rep, _MASK_CHUNK):
        sl = slice(s, s + _MASK_CHUNK)
        qi = rq[sl, None] * bs + r  # query index
        kj = rk[sl, None] * bs + r
        m = pattern.token_mask(
            ctx, rb[sl, None, None], rh[sl, None, None], (qi + ctx.offset)[:, :, None], kj[:, None, :]
        )
        inb = (qi < ctx.q_len)[:, :, None] & (kj < ctx.kv_len)[:, None, :]
        pieces.append(torch.broadcast_to(m, inb.shape) & inb)
    rep_masks = torch.cat(pieces)
    inb_count = (torch.clamp(ctx.q_len - rq * bs, max=bs) * torch.clamp(ctx.kv_len - rk * bs, max=bs))
    count = rep_masks.flatten(1).sum(-1)
    new_status = torch.where(count == 0, EMPTY, torch.where(count == inb_count, FULL, PARTIAL)).to(torch.int8)
    # dedupe remaining masks by content
    keep = new_status == PARTIAL
    rep_id = torch.full((n_rep,), -1, dtype=torch.long, device=dev)
    if bool(keep.any()):
        uniq, inv = torch.unique(rep_masks[keep].flatten(1), dim=0, return_inverse=True)
        masks = uniq.view(-1, bs, bs)
        rep_id[keep] = inv
    else:
        masks = torch.zeros(0, bs, bs, dtype=torch.bool, device=dev)
    status = status.clone()
    status[b, h, qb, kb] = new_status[inverse]
    mask_ids[b, h, qb, kb] = rep_id[inverse].to(torch.int32)
    return status, mask_ids, masks


def _pack(cond: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Counts and left-packed ascending indices (and mask ids) of the True entries of the last axis."""
    num = cond.sum(-1, dtype=torch.int32)
    width = max(int(num.max()), 1) if num.numel() else 1
    pos = torch.where(cond, cond.cumsum(-1, dtype=torch.int32) - 1, width).long()
    cols = torch.arange(cond.shape[-1], dtype=torch.int32, device=cond.device).expand(cond.shape)
    idx = torch.zeros(*cond.shape[:-1], width + 1, dtype=torch.int32, device=cond.device)
    idx.scatter_(-1, pos, cols)
    idx = idx[..., :width]
    valid = torch.arange(width, device=cond.device) < num[..., None]
    idx = torch.where(valid, idx, 0).contiguous()
    if ids is None:
        return num, idx
    mids = torch.zeros_like(idx, dtype=torch.int32)
    mids = torch.where(valid, torch.gather(ids, -1, idx.long()), 0).to(torch.int32).contiguous()
    return num, idx, mids


def _build_tables(status: torch.Tensor, mask_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    full = status == FULL
    part = status == PARTIAL
    kv_num, kv_idx, kv_mid = _pack(part, mask_ids)
    fkv_num, fkv_idx = _pack(full)
    q_num, q_idx, q_mid = _pack(part.transpose(-1, -2), mask_ids.transpose(-1, -2))
    fq_num, fq_idx = _pack(full.transpose(-1, -2))
    return {
        "kv_num_blocks": kv_num,
        "kv_indices": kv_idx,
        "kv_mask_ids": kv_mid,
        "full_kv_num_blocks": fkv_num,
        "full_kv_indices": fkv_idx,
        "q_num_blocks": q_num,
        "q_indices": q_idx,
        "q_mask_ids": q_mid,
        "full_q_num_blocks": fq_num,
        "full_q_indices": fq_idx,
    }


def layout_from_status(
    status: torch.Tensor, masks: torch.Tensor, mask_ids: torch.Tensor, *, q_len: int, kv_len: int,
    block_size: int, pattern=None, causal: bool = False,
) -> Layout:
    """Build a Layout from a dense block status ``[Bl, Hl, NQ, NK]`` (0/1/2), masks ``[M, bs, bs]`` and
    per-block mask ids (used by converters and device builders)."""
    return Layout(
        q_len=q_len, kv_len=kv_len, block_size=block_size, masks=masks, pattern=pattern, causal=causal,
        **_build_tables(status, mask_ids),
    )


def brute_force_mask(
    pattern: Pattern,
    q_len: int,
    kv_len: int | None = None,
    *,
    causal: bool = False,
    block_size: int = 128,
    batch: int | None = None,
    heads: int | None = None,
    query: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
) -> torch.Tensor:
    """bool ``[Bs, Hs, q_len, kv_len]``: the pattern's semantics evaluated at every pair (test oracle)."""
    full, ctx = make_context(
        pattern, q_len, kv_len, causal=causal, block_size=block_size, batch=batch, heads=heads,
        device=None, query=query, key=key,
    )
    st = full.status(ctx)  # populates selections of block-granular / dynamic parts
    Bs, Hs = st.shape[:2]
    b = torch.arange(Bs)[:, None, None, None]
    h = torch.arange(Hs)[None, :, None, None]
    i = (torch.arange(ctx.q_len) + ctx.offset)[None, None, :, None]
    j = torch.arange(ctx.kv_len)[None, None, None, :]
    m = full.token_mask(ctx, b, h, i, j)
    return torch.broadcast_to(m, (Bs, Hs, ctx.q_len, ctx.kv_len))
