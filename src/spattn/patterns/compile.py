"""``compile(pattern, ...) -> Layout`` in two phases, then exact token masks and the codec.

1. static parts: analytic block status, O(blocks) (``Pattern.status``);
2. dynamic parts (``TopK``, ``TopP``, ...): each selects given ``kept`` (the status of the static parts of the
   enclosing unions: blocks already paid for) and ``allowed`` (the status of the static parts of the
   enclosing intersections: blocks it may use at all) — see :func:`select_dynamic`;
3. one token mask per distinct partial-block signature, reclassified exactly (``layout.tables.classify``),
   deduplicated (``dedupe``) and packed into the forward and transposed tables (``pack``).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from spattn._checks import check_int
from spattn.layout import tables
from spattn.layout.layout import Layout
from spattn.patterns.banded import build_layout, supports_fast_build
from spattn.patterns.base import PARTIAL, Combination, Context, Pattern, Union
from spattn.patterns.builtin import BlockSelection, Causal
from spattn.patterns.fused import fused_layout, supports_fused_build

_MASK_CHUNK = 256  # representative blocks evaluated at once (each bs*bs booleans)


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
    q_len = check_int(q_len, "q_len", 1)
    kv_len = q_len if kv_len is None else check_int(kv_len, "kv_len", 1)
    if kv_len < q_len:
        raise ValueError(f"kv_len ({kv_len}) must be >= q_len ({q_len}): queries are aligned bottom-right")
    block_size = check_int(block_size, "block_size", 1)
    if batch is not None:
        check_int(batch, "batch", 1)
    if heads is not None:
        check_int(heads, "heads", 1)
    if device is None:
        device = query.device if query is not None else torch.device("cpu")
    if pattern.contains_dynamic() and (query is None or key is None):
        raise ValueError(f"pattern {pattern!r} depends on the input: pass query= and key= to compile")
    full = pattern & Causal() if causal else pattern
    ctx = Context(q_len, kv_len, block_size, torch.device(device), causal, batch, heads, query, key)
    return full, ctx


def _merge(op, a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else op(a, b)


def _children(pattern: Pattern) -> list[Pattern]:
    """The patterns a pattern is built from (fields holding a Pattern or a tuple of Patterns)."""
    out: list[Pattern] = []
    for f in dataclasses.fields(pattern) if dataclasses.is_dataclass(pattern) else ():
        value = getattr(pattern, f.name)
        out.extend(v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, Pattern))
    return out


def select_dynamic(pattern: Pattern, ctx: Context, *, kept: torch.Tensor | None = None,
                   allowed: torch.Tensor | None = None) -> None:
    """Phase 2: run the selection of every dynamic part of ``pattern`` (cached in ``ctx``), in tree order.

    A union hands its dynamic parts ``kept`` = the maximum status of its static parts (and of the dynamic parts
    already selected) with what enclosing unions keep; an intersection hands them ``allowed`` = the minimum
    status of its static parts (and of those dynamic parts) with what enclosing intersections allow. Both are
    int8 ``[Bs, Hs, NQ, NK]`` (``EMPTY`` / ``PARTIAL`` / ``FULL``) or None.
    """
    if not pattern.contains_dynamic():
        return
    if isinstance(pattern, Combination):
        is_union = isinstance(pattern, Union)
        op = type(pattern).combine
        done = None
        for part in sorted(pattern.parts, key=lambda p: p.contains_dynamic()):  # static parts first
            if part.contains_dynamic():
                inner = _merge(op, kept if is_union else allowed, done)
                select_dynamic(part, ctx, kept=inner if is_union else kept, allowed=allowed if is_union else inner)
            done = _merge(op, done, part.status(ctx))
    elif isinstance(pattern, BlockSelection) and pattern.dynamic:
        pattern.cached_selection(ctx, kept=kept, allowed=allowed)
    else:
        for child in _children(pattern):
            select_dynamic(child, ctx, kept=kept, allowed=allowed)


def block_status(pattern: Pattern, ctx: Context) -> torch.Tensor:
    """int8 ``[Bs, Hs, NQ, NK]``: the analytic status of ``pattern``, dynamic parts selected first (phase 2)."""
    select_dynamic(pattern, ctx)
    return pattern.status(ctx)


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
    fast: bool = True,
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
        fast: on CUDA (default True), banded built-ins take the banded builder and block-exact patterns
            (``BlockLayout``, ``RandomBlocks``, ... at the kernel block, optionally causal) the fused build
            (``spattn.patterns.fused``: one device pass, fixed-width tables, no host sync). ``False``: always the
            general path (the reference the fast builders are tested against), whose tables are sized from the
            data.

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
    if ctx.device.type == "cuda" and fast:
        if supports_fast_build(pattern):  # banded built-ins: the same tables from a few fused device ops
            layout = build_layout(pattern, ctx.q_len, ctx.kv_len, causal=causal, block_size=block_size, device=ctx.device)
            layout.info["compile_seconds"] = time.perf_counter() - start
            return layout
        if supports_fused_build(pattern, ctx):  # block-exact patterns: one device pass, no host sync
            layout = fused_layout(pattern, ctx)
            _check_sizes(layout.kv_num_blocks, batch, heads)
            return layout
    status = block_status(full, ctx).contiguous()
    _check_sizes(status, batch, heads)
    status, mask_ids, masks = _resolve_partial(full, ctx, status)
    # dynamic layouts: tables NK wide (no host read of the counts, and strides that do not change from layer to
    # layer, so the kernels are not specialised again for each new width)
    width = ctx.num_kv_blocks if pattern.contains_dynamic() else None
    return Layout(
        q_len=ctx.q_len, kv_len=ctx.kv_len, block_size=block_size, pattern=pattern, causal=causal,
        info={"compile_seconds": time.perf_counter() - start, **ctx.info},
        **tables.pack(status, mask_ids, masks, width=width),
    )


def _check_sizes(status: torch.Tensor, batch: int | None, heads: int | None) -> None:
    if heads is not None and status.shape[1] not in (1, heads):
        raise ValueError(f"pattern gives {status.shape[1]} heads but heads={heads}")
    if batch is not None and status.shape[0] not in (1, batch):
        raise ValueError(f"pattern gives batch {status.shape[0]} but batch={batch}")


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
    # Note [compile memory]: one chunk of representative masks at a time is evaluated and classified; only the
    # packed bits of its partial tiles are kept (tables.pack_bits), so memory is that of the distinct-signature
    # count times bs*bs/8 bytes, never every partial block's bool mask at once.
    statuses, words = [], []
    for s in range(0, n_rep, _MASK_CHUNK):
        sl = slice(s, s + _MASK_CHUNK)
        qi = rq[sl, None] * bs + r  # query index
        kj = rk[sl, None] * bs + r
        m = pattern.token_mask(
            ctx, rb[sl, None, None], rh[sl, None, None], (qi + ctx.offset)[:, :, None], kj[:, None, :]
        )
        st, m = tables.classify(torch.broadcast_to(m, (qi.shape[0], bs, bs)), rq[sl], rk[sl], q_len=ctx.q_len,
                                kv_len=ctx.kv_len)
        statuses.append(st)
        words.append(tables.pack_bits(m[st == PARTIAL]))
    rep_status = torch.cat(statuses)
    masks, rep_id = tables.dedupe_packed(torch.cat(words), rep_status, bs)
    ctx.info["masks_evaluated"] = n_rep
    status = status.clone()
    status[b, h, qb, kb] = rep_status[inverse]
    mask_ids[b, h, qb, kb] = rep_id[inverse]
    return status, mask_ids, masks


def layout_from_status(
    status: torch.Tensor, masks: torch.Tensor, mask_ids: torch.Tensor, *, q_len: int, kv_len: int,
    block_size: int, pattern=None, causal: bool = False,
) -> Layout:
    """Build a Layout from a dense block status ``[Bl, Hl, NQ, NK]`` (0/1/2), masks ``[M, bs, bs]`` and
    per-block mask ids (used by converters and device builders)."""
    return Layout(q_len=q_len, kv_len=kv_len, block_size=block_size, pattern=pattern, causal=causal,
                  **tables.pack(status, mask_ids, masks))


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
    st = block_status(full, ctx)  # populates selections of block-granular / dynamic parts
    Bs, Hs = st.shape[:2]
    b = torch.arange(Bs)[:, None, None, None]
    h = torch.arange(Hs)[None, :, None, None]
    i = (torch.arange(ctx.q_len) + ctx.offset)[None, None, :, None]
    j = torch.arange(ctx.kv_len)[None, None, None, :]
    m = full.token_mask(ctx, b, h, i, j)
    return torch.broadcast_to(m, (Bs, Hs, ctx.q_len, ctx.kv_len))
