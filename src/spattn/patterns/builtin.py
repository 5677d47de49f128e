"""The built-in patterns. Semantics use absolute query position ``i`` and key position ``j``.

Note [clamp]: a size parameter (window sides, sinks, dilation, stride, cell sizes) may be any Python int, or
``None`` where it means "unbounded". Before it meets a tensor it is clamped to ``Context.reach`` (a distance no
pair of the compiled lengths reaches), so every comparison is exact int64 arithmetic: ``Window(2**70)`` is
``Window(None)``, which keeps every earlier key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from spattn._checks import check_bool, check_bound, check_int
from spattn.patterns.base import EMPTY, FULL, Context, Pattern, Union, as_4d, status_from_bounds


def _delta_range(ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of i - j over each (query block, key block): ``[NQ, NK]`` min and max."""
    qlo, qhi = ctx.q_range()
    klo, khi = ctx.k_range()
    return qlo - khi, qhi - klo


def _delta_signature(ctx: Context, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    bs = ctx.block_size
    return (qb * bs + ctx.offset - kb * bs)[:, None]


@dataclasses.dataclass(frozen=True)
class Full(Pattern):
    """Every query attends every key (dense attention)."""

    kind: ClassVar[str] = "full"

    def block_status(self, ctx):
        return torch.full((ctx.num_q_blocks, ctx.num_kv_blocks), FULL, dtype=torch.int8, device=ctx.device)

    def token_mask(self, ctx, b, h, i, j):
        return torch.ones(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool, device=i.device)

    def signature(self, ctx, b, h, qb, kb):
        return qb.new_zeros(qb.shape[0], 1)


@dataclasses.dataclass(frozen=True)
class Causal(Pattern):
    """``j <= i``: no query sees a later key."""

    kind: ClassVar[str] = "causal"

    def block_status(self, ctx):
        dmin, dmax = _delta_range(ctx)
        return status_from_bounds(dmin >= 0, dmax < 0)

    def token_mask(self, ctx, b, h, i, j):
        return j <= i

    def signature(self, ctx, b, h, qb, kb):
        return _delta_signature(ctx, qb, kb)


@dataclasses.dataclass(frozen=True)
class Window(Pattern):
    """``i - left <= j <= i + right`` (FlashAttention ``window_size`` semantics: left + right + 1 keys).

    ``left`` / ``right``: ints ``>= 0`` of any size, or ``None`` for unbounded (``Window(None)`` is every earlier
    key: causal; ``Window(None, None)`` is every key).

    Example: ``Window(1024)`` is a causal-style sliding window of the 1024 previous keys plus the query's own.
    """

    left: int | None
    right: int | None = 0
    kind: ClassVar[str] = "window"

    def __post_init__(self):
        check_bound(self.left, "Window.left")
        check_bound(self.right, "Window.right")

    def block_status(self, ctx):
        dmin, dmax = _delta_range(ctx)
        left, right = ctx.clamp(self.left), ctx.clamp(self.right)
        return status_from_bounds((dmin >= -right) & (dmax <= left), (dmax < -right) | (dmin > left))

    def token_mask(self, ctx, b, h, i, j):
        d = i - j
        return (d <= ctx.clamp(self.left)) & (d >= -ctx.clamp(self.right))

    def signature(self, ctx, b, h, qb, kb):
        return _delta_signature(ctx, qb, kb)


@dataclasses.dataclass(frozen=True)
class Sinks(Pattern):
    """``j < n``: every query sees the first ``n`` keys (attention sinks, StreamingLLM)."""

    n: int
    kind: ClassVar[str] = "sinks"

    def __post_init__(self):
        check_int(self.n, "Sinks.n")

    def block_status(self, ctx):
        klo, khi = ctx.k_range()
        n = ctx.clamp(self.n)
        st = status_from_bounds(khi < n, klo >= n)
        return st.expand(ctx.num_q_blocks, ctx.num_kv_blocks)

    def token_mask(self, ctx, b, h, i, j):
        return (j < ctx.clamp(self.n)) & (i >= -(1 << 62))

    def signature(self, ctx, b, h, qb, kb):
        return kb[:, None]


@dataclasses.dataclass(frozen=True)
class Global(Pattern):
    """Hub tokens: the listed absolute positions see every key, and every query sees them."""

    tokens: tuple[int, ...]
    kind: ClassVar[str] = "global"

    def __post_init__(self):
        tokens = self.tokens
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.flatten().tolist()
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
            raise TypeError(f"Global.tokens must be a sequence of ints (positions), got {type(tokens).__name__}: "
                            f"write Global(({tokens!r},)) for one position")
        tokens = tuple(sorted(set(check_int(t, f"Global.tokens[{k}]") for k, t in enumerate(tokens))))
        object.__setattr__(self, "tokens", tokens)

    def _flags(self, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """Hub flags over absolute positions ``[kv_len]`` and their block counts for keys / queries."""
        key = ("global-flags", id(self))
        if key not in ctx.cache:
            flags = torch.zeros(ctx.kv_len, dtype=torch.bool, device=ctx.device)
            toks = [t for t in self.tokens if t < ctx.kv_len]
            if toks:
                flags[torch.tensor(toks, device=ctx.device)] = True
            ctx.cache[key] = flags
        return ctx.cache[key]

    def block_status(self, ctx):
        flags = self._flags(ctx)
        bs = ctx.block_size
        kpad = torch.nn.functional.pad(flags, (0, ctx.num_kv_blocks * bs - ctx.kv_len))
        k_count = kpad.view(-1, bs).sum(-1)
        k_size = torch.clamp(ctx.kv_len - torch.arange(ctx.num_kv_blocks, device=ctx.device) * bs, max=bs)
        qflags = flags[ctx.offset :]
        qpad = torch.nn.functional.pad(qflags, (0, ctx.num_q_blocks * bs - ctx.q_len))
        q_count = qpad.view(-1, bs).sum(-1)
        q_size = torch.clamp(ctx.q_len - torch.arange(ctx.num_q_blocks, device=ctx.device) * bs, max=bs)
        full = (q_count == q_size)[:, None] | (k_count == k_size)[None, :]
        empty = (q_count == 0)[:, None] & (k_count == 0)[None, :]
        return status_from_bounds(full, empty)

    def signature(self, ctx, b, h, qb, kb):
        """The hub flags of the block's queries and of its keys (as ids of distinct flag rows): blocks with equal
        flags have equal masks, so a regular hub set needs a handful of masks, not one per block."""
        key = ("global-signature", id(self))
        if key not in ctx.cache:
            flags, bs = self._flags(ctx), ctx.block_size
            kflags = torch.nn.functional.pad(flags, (0, ctx.num_kv_blocks * bs - ctx.kv_len)).view(-1, bs)
            qflags = torch.nn.functional.pad(flags[ctx.offset :], (0, ctx.num_q_blocks * bs - ctx.q_len)).view(-1, bs)
            ctx.cache[key] = (torch.unique(qflags, dim=0, return_inverse=True)[1],
                              torch.unique(kflags, dim=0, return_inverse=True)[1])
        qid, kid = ctx.cache[key]
        return torch.stack([qid[qb], kid[kb]], dim=1)

    def token_mask(self, ctx, b, h, i, j):
        flags = self._flags(ctx)
        qi = torch.clamp(i, 0, ctx.kv_len - 1)
        kj = torch.clamp(j, 0, ctx.kv_len - 1)
        return (flags[qi] & (i >= 0) & (i < ctx.kv_len)) | (flags[kj] & (j >= 0) & (j < ctx.kv_len))


@dataclasses.dataclass(frozen=True)
class Dilated(Pattern):
    """``i - left <= j <= i + right`` and ``(i - j) % dilation == 0`` (LongNet / dilated sliding window).

    ``left`` / ``right``: ints ``>= 0`` of any size, or ``None`` for unbounded; ``dilation``: an int ``>= 1``."""

    left: int | None
    dilation: int
    right: int | None = 0
    kind: ClassVar[str] = "dilated"

    def __post_init__(self):
        check_bound(self.left, "Dilated.left")
        check_int(self.dilation, "Dilated.dilation", 1)
        check_bound(self.right, "Dilated.right")

    def block_status(self, ctx):
        dmin, dmax = _delta_range(ctx)
        left, right, dilation = ctx.clamp(self.left), ctx.clamp(self.right), ctx.clamp(self.dilation)
        lo = torch.clamp(dmin, min=-right)
        hi = torch.clamp(dmax, max=left)
        # is there a multiple of `dilation` in [lo, hi]?
        first = lo + (-lo) % dilation
        empty = (hi < lo) | (first > hi)
        full = (dmin >= -right) & (dmax <= left) & (dilation == 1)
        return status_from_bounds(full & torch.ones_like(empty), empty)

    def token_mask(self, ctx, b, h, i, j):
        d = i - j
        return (d <= ctx.clamp(self.left)) & (d >= -ctx.clamp(self.right)) & (d % ctx.clamp(self.dilation) == 0)

    def signature(self, ctx, b, h, qb, kb):
        return _delta_signature(ctx, qb, kb)


@dataclasses.dataclass(frozen=True)
class Strided(Pattern):
    """``((i // block) - (j // block)) % stride == 0``: strided long-range reach (Sparse Transformer).

    ``block=1`` (default) is the classic token-level stride; ``block=B`` applies the stride to groups of
    ``B`` tokens, so that with ``B`` equal to the compile block size whole blocks are kept or skipped.
    """

    stride: int
    block: int = 1
    kind: ClassVar[str] = "strided"

    def __post_init__(self):
        check_int(self.stride, "Strided.stride", 1)
        check_int(self.block, "Strided.block", 1)

    def block_status(self, ctx):
        g, n = ctx.clamp(self.block), ctx.clamp(self.stride)
        qlo, qhi = ctx.q_range()
        klo, khi = ctx.k_range()
        dmin = qlo // g - khi // g
        dmax = qhi // g - klo // g
        first = dmin + (-dmin) % n
        empty = first > dmax
        full = dmin == dmax  # a single group difference, which is then a multiple of n (not empty)
        return status_from_bounds(full & ~empty, empty)

    def token_mask(self, ctx, b, h, i, j):
        g, n = ctx.clamp(self.block), ctx.clamp(self.stride)
        return ((i // g) - (j // g)) % n == 0

    def signature(self, ctx, b, h, qb, kb):
        bs, g, n = ctx.block_size, ctx.clamp(self.block), ctx.clamp(self.stride)
        qlo = qb * bs + ctx.offset
        klo = kb * bs
        return torch.stack([qlo % g, klo % g, (qlo // g - klo // g) % n], dim=1)


# ----------------------------------------------------------------------------------------------
# block-granular patterns: a boolean selection over (query block, key block) cells of size `block`
# ----------------------------------------------------------------------------------------------


class BlockSelection(Pattern):
    """Base class of patterns defined by a boolean selection over ``block``-sized cells.

    Subclasses implement ``selection(ctx) -> bool [Bs, Hs, rows, ceil(kv_len / g)]`` and ``granularity(ctx) -> g``.
    Key cells tile ``j``. Query cells tile the *query index* ``i - (kv_len - q_len)`` (``rows = ceil(q_len / g)``),
    or, for subclasses with ``absolute_rows = True``, the absolute position ``i`` (bottom-right aligned: rows
    ``offset // g .. (kv_len - 1) // g``, so that a row means the same positions whether compiled for the whole
    sequence or for the last queries, Note [decode consistency]).
    """

    absolute_rows: ClassVar[bool] = False

    def granularity(self, ctx: Context) -> int:
        """Cell size in tokens: ``block``, clamped to the lengths (one cell covers a whole axis, Note [clamp])."""
        return min(self.block, max(ctx.q_len, ctx.kv_len))  # type: ignore[attr-defined]

    def row_cells(self, ctx: Context) -> tuple[int, int]:
        """``(first, count)``: the cell index of the selection's row 0 and the number of rows (see the class)."""
        g = self.granularity(ctx)
        if self.absolute_rows:
            first = ctx.offset // g
            return first, (ctx.kv_len - 1) // g - first + 1
        return 0, -(-ctx.q_len // g)

    def _row_of(self, ctx: Context, index: torch.Tensor) -> torch.Tensor:
        """Selection row of query *index* tensors (0 .. q_len - 1)."""
        g = self.granularity(ctx)
        if self.absolute_rows:
            return (index + ctx.offset) // g - ctx.offset // g
        return index // g

    def selection(self, ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    def cached_selection(self, ctx: Context, *, kept: torch.Tensor | None = None,
                         allowed: torch.Tensor | None = None) -> torch.Tensor:
        """The selection, computed once per context. Dynamic subclasses implement
        ``selection(ctx, *, kept, allowed)`` and receive the status of the static parts around them
        (``spattn.patterns.compile.select_dynamic``, phase 2 of compile); static ones ``selection(ctx)``."""
        key = ("selection", id(self))
        if key not in ctx.cache:
            sel = self.selection(ctx, kept=kept, allowed=allowed) if self.dynamic else self.selection(ctx)
            sel = as_4d(sel).to(device=ctx.device, dtype=torch.bool)
            g = self.granularity(ctx)
            want = (self.row_cells(ctx)[1], -(-ctx.kv_len // g))
            if tuple(sel.shape[-2:]) != want:
                raise ValueError(
                    f"{type(self).__name__}: block selection has shape {tuple(sel.shape[-2:])} but q_len={ctx.q_len}, "
                    f"kv_len={ctx.kv_len} with block={g} need {want}"
                )
            ctx.cache[key] = sel
        return ctx.cache[key]

    def block_status(self, ctx):
        sel = self.cached_selection(ctx)
        g, bs = self.granularity(ctx), ctx.block_size
        if g == bs and (not self.absolute_rows or ctx.offset % g == 0):
            return torch.where(sel, FULL, EMPTY).to(torch.int8)
        # count selected cells in each compile block's rectangle with a 2-D prefix sum
        integral = torch.nn.functional.pad(sel.int().cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        qlo = torch.arange(ctx.num_q_blocks, device=ctx.device) * bs
        qhi = torch.clamp(qlo + bs, max=ctx.q_len) - 1
        klo = torch.arange(ctx.num_kv_blocks, device=ctx.device) * bs
        khi = torch.clamp(klo + bs, max=ctx.kv_len) - 1
        r0, r1 = self._row_of(ctx, qlo), self._row_of(ctx, qhi) + 1
        c0, c1 = klo // g, khi // g + 1
        total = (
            integral[..., r1[:, None], c1[None, :]]
            - integral[..., r0[:, None], c1[None, :]]
            - integral[..., r1[:, None], c0[None, :]]
            + integral[..., r0[:, None], c0[None, :]]
        )
        area = (r1 - r0)[:, None] * (c1 - c0)[None, :]
        return status_from_bounds(total == area, total == 0)

    def token_mask(self, ctx, b, h, i, j):
        sel = self.cached_selection(ctx)
        g = self.granularity(ctx)
        qi = self._row_of(ctx, torch.clamp(i - ctx.offset, 0, ctx.q_len - 1))
        kj = torch.clamp(j, 0, ctx.kv_len - 1) // g
        bb = b if sel.shape[0] > 1 else torch.zeros_like(b)
        hh = h if sel.shape[1] > 1 else torch.zeros_like(h)
        return sel[bb, hh, qi, kj]


def _row_seed(seed: int, row: int) -> int:
    """A 63-bit generator seed for one row of random cells (a hash: rows and seeds never share a stream)."""
    import hashlib

    digest = hashlib.blake2b(f"spattn-random-blocks:{seed}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclasses.dataclass(frozen=True)
class RandomBlocks(BlockSelection):
    """BigBird-style random reach: each query cell of ``block`` tokens gets ``per_row`` random key cells, the same
    for a given ``seed``; different per head when ``per_head=True`` (head h uses seed + h).

    Note [decode consistency]: query cells tile absolute positions (bottom-right aligned) and each cell's draw
    depends only on (seed, cell) and its candidates: every key cell when compiled with ``causal=False``, the cells
    up to its own when ``causal=True``. So a row keeps the same pairs whether compiled for the whole sequence or for
    the last queries of a KV cache of any length (``generate`` agrees with the evaluation that chose the pattern).
    """

    per_row: int
    seed: int = 0
    block: int = 128
    per_head: bool = False
    kind: ClassVar[str] = "random_blocks"
    absolute_rows: ClassVar[bool] = True

    def __post_init__(self):
        check_int(self.per_row, "RandomBlocks.per_row")
        check_int(self.seed, "RandomBlocks.seed")
        if self.seed >= 1 << 62:
            raise ValueError(f"RandomBlocks.seed must be < 2**62, got {self.seed}")
        check_int(self.block, "RandomBlocks.block", 1)
        check_bool(self.per_head, "RandomBlocks.per_head")

    def selection(self, ctx):
        g = self.granularity(ctx)
        first, rows = self.row_cells(ctx)
        cols = -(-ctx.kv_len // g)
        if self.per_head and ctx.heads is None:
            raise ValueError("RandomBlocks(per_head=True) needs compile(..., heads=H)")
        seeds = [self.seed + h for h in range(ctx.heads)] if self.per_head else [self.seed]
        sel = torch.zeros(len(seeds), rows, cols, dtype=torch.bool)
        for k, seed in enumerate(seeds):
            for row in range(rows):
                cell = first + row
                n = min(cell + 1, cols) if ctx.causal else cols  # the candidates: Note [decode consistency]
                take = min(self.per_row, n)
                if take:
                    gen = torch.Generator(device="cpu").manual_seed(_row_seed(seed, cell))
                    sel[k, row, torch.rand(n, generator=gen).topk(take).indices] = True
        return sel[None].to(ctx.device)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout(BlockSelection):
    """An explicit boolean block matrix ``[NQb, NKb]``, ``[H, NQb, NKb]`` or ``[B, H, NQb, NKb]`` over cells of
    ``block`` tokens (query cells tile the query index, key cells the key index)."""

    blocks: torch.Tensor
    block: int = 128
    kind: ClassVar[str] = "block_layout"

    def __post_init__(self):
        blocks = self.blocks
        if not isinstance(blocks, torch.Tensor):
            blocks = torch.as_tensor(blocks)
        if blocks.dim() not in (2, 3, 4):
            raise ValueError(f"BlockLayout.blocks must have 2, 3 or 4 dims [.., NQb, NKb], got shape {tuple(blocks.shape)}")
        if blocks.dtype != torch.bool:
            if blocks.dtype.is_floating_point or blocks.dtype.is_complex:
                raise TypeError(f"BlockLayout.blocks must be bool (or 0/1 integers), got {blocks.dtype}")
            blocks = blocks != 0
        if blocks.dim() == 3:
            blocks = blocks[None]
        object.__setattr__(self, "blocks", blocks)
        check_int(self.block, "BlockLayout.block", 1)

    def selection(self, ctx):
        return self.blocks


@dataclasses.dataclass(frozen=True, eq=False)
class Document(Pattern):
    """``segment_ids[b, i] == segment_ids[b, j]`` (packed / variable-length batches). ``segment_ids`` is
    int ``[B, kv_len]`` over key positions; queries use the ids at their absolute positions. An id < 0 marks
    padding, which attends nothing and is never attended."""

    segment_ids: torch.Tensor
    kind: ClassVar[str] = "document"

    def __post_init__(self):
        ids = self.segment_ids
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"Document.segment_ids must be [B, L], got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"Document.segment_ids must be an integer tensor, got {ids.dtype}")
        object.__setattr__(self, "segment_ids", ids.long())

    def _ids(self, ctx: Context) -> torch.Tensor:
        ids = self.segment_ids
        if ids.shape[1] != ctx.kv_len:
            raise ValueError(f"Document.segment_ids has length {ids.shape[1]} but kv_len is {ctx.kv_len}")
        if ctx.batch is not None and ids.shape[0] not in (1, ctx.batch):
            raise ValueError(f"Document.segment_ids has batch {ids.shape[0]} but the batch size is {ctx.batch}")
        return ids.to(ctx.device)

    def block_status(self, ctx):
        ids = self._ids(ctx)
        bs = ctx.block_size
        big = torch.iinfo(torch.int64).max

        def block_min_max(x: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, ...]:
            pad = n_blocks * bs - x.shape[1]
            valid = torch.nn.functional.pad(x >= 0, (0, pad), value=False).view(x.shape[0], n_blocks, bs)
            xp = torch.nn.functional.pad(x, (0, pad), value=-1).view(x.shape[0], n_blocks, bs)
            lo = torch.where(valid, xp, big).amin(-1)
            hi = torch.where(valid, xp, -1).amax(-1)
            inb = torch.arange(n_blocks * bs, device=x.device).view(n_blocks, bs) < x.shape[1]
            all_valid = (valid | ~inb).all(-1)
            return lo, hi, valid.any(-1), all_valid

        klo, khi, kany, kall = block_min_max(ids, ctx.num_kv_blocks)
        qlo, qhi, qany, qall = block_min_max(ids[:, ctx.offset :], ctx.num_q_blocks)
        empty = ~qany[:, :, None] | ~kany[:, None, :] | (qhi[:, :, None] < klo[:, None, :]) | (khi[:, None, :] < qlo[:, :, None])
        single = (qlo[:, :, None] == qhi[:, :, None]) & (klo[:, None, :] == khi[:, None, :]) & (qlo[:, :, None] == klo[:, None, :])
        full = single & qall[:, :, None] & kall[:, None, :]
        return status_from_bounds(full, empty)[:, None]

    def token_mask(self, ctx, b, h, i, j):
        ids = self._ids(ctx)
        bb = b if ids.shape[0] > 1 else torch.zeros_like(b)
        qi = ids[bb, torch.clamp(i, 0, ctx.kv_len - 1)]
        kj = ids[bb, torch.clamp(j, 0, ctx.kv_len - 1)]
        return (qi == kj) & (qi >= 0)


@dataclasses.dataclass(frozen=True)
class PerHead(Pattern):
    """Head ``h`` uses ``patterns[h]``. Compile with ``heads=len(patterns)`` (or leave heads unset)."""

    patterns: tuple[Pattern, ...]
    kind: ClassVar[str] = "per_head"

    def __post_init__(self):
        pats = tuple(self.patterns)
        if not pats:
            raise ValueError("PerHead needs at least one pattern")
        for k, p in enumerate(pats):
            if not isinstance(p, Pattern):
                raise TypeError(f"PerHead.patterns[{k}] must be a Pattern, got {type(p).__name__}")
        object.__setattr__(self, "patterns", pats)

    def contains_dynamic(self) -> bool:
        return any(p.contains_dynamic() for p in self.patterns)

    def _check(self, ctx: Context) -> None:
        if ctx.heads is not None and ctx.heads != len(self.patterns):
            raise ValueError(f"PerHead has {len(self.patterns)} patterns but heads={ctx.heads}")

    def _groups(self) -> list[tuple[Pattern, tuple[int, ...]]]:
        """The distinct patterns and the heads using each (first-use order): heads sharing a pattern are
        evaluated together (a plan gives many heads of a layer the same window)."""
        groups: list[tuple[Pattern, list[int]]] = []
        for k, p in enumerate(self.patterns):
            for q, heads in groups:
                try:
                    same = q is p or bool(q == p)
                except (RuntimeError, TypeError):  # patterns holding tensors compare elementwise: kept apart
                    same = False
                if same:
                    heads.append(k)
                    break
            else:
                groups.append((p, [k]))
        return [(p, tuple(heads)) for p, heads in groups]

    @staticmethod
    def _heads(h, heads: tuple[int, ...]):
        sel = h == heads[0]
        for k in heads[1:]:
            sel = sel | (h == k)
        return sel

    def block_status(self, ctx):
        self._check(ctx)
        H = len(self.patterns)
        sts = [None] * H
        for p, heads in self._groups():
            st = p.status(ctx)
            for k in heads:
                sts[k] = st
        Bs = max(s.shape[0] for s in sts)
        rows = []
        for h, s in enumerate(sts):
            s = s[:, h : h + 1] if s.shape[1] > 1 else s
            rows.append(s.expand(Bs, 1, -1, -1))
        out = torch.cat(rows, dim=1)
        assert out.shape[1] == H
        return out

    def token_mask(self, ctx, b, h, i, j):
        out = None
        for p, heads in self._groups():
            m = p.token_mask(ctx, b, h, i, j) & self._heads(h, heads)
            out = m if out is None else out | m
        return out

    def signature(self, ctx, b, h, qb, kb):
        sig = torch.zeros(qb.shape[0], dtype=torch.long, device=qb.device)
        base = 0
        for p, heads in self._groups():
            sel = self._heads(h, heads)
            if bool(sel.any()):
                cols = p.signature(ctx, b[sel], h[sel], qb[sel], kb[sel])
                _, inv = torch.unique(cols, dim=0, return_inverse=True)
                sig[sel] = inv + base
                base += int(inv.max()) + 1
        return sig[:, None]


@dataclasses.dataclass(frozen=True)
class _LeadingRows(Pattern):
    """``i < n``: the first ``n`` query positions see every key (a part of a causal ``Budgeted``)."""

    n: int
    kind: ClassVar[str] = "leading_rows"

    def block_status(self, ctx):
        qlo, qhi = ctx.q_range()
        n = ctx.clamp(self.n)
        return status_from_bounds(qhi < n, qlo >= n).expand(ctx.num_q_blocks, ctx.num_kv_blocks)

    def token_mask(self, ctx, b, h, i, j):
        return (i < ctx.clamp(self.n)) & (j >= -(1 << 62))

    def signature(self, ctx, b, h, qb, kb):
        return qb[:, None]


@dataclasses.dataclass(frozen=True)
class _GrowingStride(BlockSelection):
    """Cells of ``block`` tokens: query cell ``c`` keeps key cells ``kc`` with ``(c - kc) % stride(c) == 0``,
    ``stride(c) = max(ceil((c + 1) / cells), 2)``: about ``cells`` cells of long-range reach for every row, whatever
    its position (a part of a causal ``Budgeted``; absolute rows, Note [decode consistency])."""

    cells: int
    block: int
    kind: ClassVar[str] = "growing_stride"
    absolute_rows: ClassVar[bool] = True

    def selection(self, ctx):
        g = self.granularity(ctx)
        first, rows = self.row_cells(ctx)
        c = torch.arange(first, first + rows, device=ctx.device)[:, None]
        kc = torch.arange(-(-ctx.kv_len // g), device=ctx.device)[None, :]
        stride = torch.clamp(-(-(c + 1) // self.cells), min=2)
        return (c - kc) % stride == 0


@dataclasses.dataclass(frozen=True)
class Budgeted(Pattern):
    """Keeps about ``keys_per_query`` keys per query at any length.

    At each length it resolves to ``Sinks(sinks) | Window(w) | Strided(n, block=block_size)``: the sinks, a
    local window taking a ``local`` fraction of the rest of the budget, and block-strided long-range reach
    spending what is left. Keys per query never exceed ``min(kv_len, keys_per_query) + block_size``. When
    ``kv_len <= keys_per_query`` it is dense (``Full()``).

    Compiled with ``causal=True`` the budget is spent per row (Note [decode consistency]): a query at position
    ``i`` sees every key while ``i < keys_per_query``, else the sinks, the window and a block stride grown from its
    own ``i + 1`` keys rather than from ``kv_len``, so that a decode step keeps the same keys as the full forward
    pass at that position. ``resolve`` gives the whole-sequence (non-causal) form.
    """

    keys_per_query: int
    sinks: int = 64
    local: float = 0.5
    kind: ClassVar[str] = "budgeted"

    def __post_init__(self):
        check_int(self.keys_per_query, "Budgeted.keys_per_query", 1)
        check_int(self.sinks, "Budgeted.sinks")
        if not isinstance(self.local, (int, float)) or not 0.0 <= float(self.local) <= 1.0:
            raise ValueError(f"Budgeted.local must be a fraction in [0, 1], got {self.local!r}")

    def resolve(self, kv_len: int, block_size: int) -> Pattern:
        """The concrete pattern this budget stands for at ``kv_len`` keys and ``block_size`` blocks."""
        budget = self.keys_per_query
        if kv_len <= budget:
            return Full()
        s = min(self.sinks, budget // 4)
        rest = budget - s
        w = max(int(self.local * rest) - 1, 0)
        r = rest - (w + 1)
        m = r // block_size
        parts: list[Pattern] = [Window(w)]
        if s:
            parts.insert(0, Sinks(s))
        if m >= 1:
            n_blocks = -(-kv_len // block_size)
            stride = max(-(-n_blocks // m), 2)
            parts.append(Strided(stride, block=block_size))
        else:
            parts[-1] = Window(w + r)
        out = parts[0]
        for p in parts[1:]:
            out = out | p
        return out

    def _resolve_causal(self, block_size: int) -> Pattern:
        """The per-row form used under ``causal=True``: independent of the lengths (Note [decode consistency])."""
        budget = self.keys_per_query
        s = min(self.sinks, budget // 4)
        rest = budget - s
        w = max(int(self.local * rest) - 1, 0)
        r = rest - (w + 1)
        m = r // block_size
        parts: list[Pattern] = [_LeadingRows(budget), Window(w if m >= 1 else w + r)]
        if s:
            parts.append(Sinks(s))
        if m >= 1:
            parts.append(_GrowingStride(m, block_size))
        return Union(tuple(parts))

    def _resolved(self, ctx: Context) -> Pattern:
        key = ("resolved", id(self))
        if key not in ctx.cache:
            ctx.cache[key] = (self._resolve_causal(ctx.block_size) if ctx.causal
                              else self.resolve(ctx.kv_len, ctx.block_size))
        return ctx.cache[key]

    def block_status(self, ctx):
        return self._resolved(ctx).status(ctx)

    def token_mask(self, ctx, b, h, i, j):
        return self._resolved(ctx).token_mask(ctx, b, h, i, j)

    def signature(self, ctx, b, h, qb, kb):
        return self._resolved(ctx).signature(ctx, b, h, qb, kb)


def per_head(patterns: Sequence[Pattern]) -> PerHead:
    """Convenience: ``PerHead(tuple(patterns))``."""
    return PerHead(tuple(patterns))


__all__ = [
    "Full",
    "Causal",
    "Window",
    "Sinks",
    "Global",
    "Dilated",
    "Strided",
    "BlockSelection",
    "RandomBlocks",
    "BlockLayout",
    "Document",
    "PerHead",
    "Budgeted",
    "per_head",
]
