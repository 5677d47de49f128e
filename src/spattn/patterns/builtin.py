"""The built-in patterns. Semantics use absolute query position ``i`` and key position ``j``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from spattn._checks import check_int
from spattn.patterns.base import EMPTY, FULL, Context, Pattern, as_4d, status_from_bounds


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

    Example: ``Window(1024)`` is a causal-style sliding window of the 1024 previous keys plus the query's own.
    """

    left: int
    right: int = 0
    kind: ClassVar[str] = "window"

    def __post_init__(self):
        check_int(self.left, "Window.left")
        check_int(self.right, "Window.right")

    def block_status(self, ctx):
        dmin, dmax = _delta_range(ctx)
        return status_from_bounds((dmin >= -self.right) & (dmax <= self.left), (dmax < -self.right) | (dmin > self.left))

    def token_mask(self, ctx, b, h, i, j):
        d = i - j
        return (d <= self.left) & (d >= -self.right)

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
        st = status_from_bounds(khi < self.n, klo >= self.n)
        return st.expand(ctx.num_q_blocks, ctx.num_kv_blocks)

    def token_mask(self, ctx, b, h, i, j):
        return (j < self.n) & (i >= -(1 << 62))

    def signature(self, ctx, b, h, qb, kb):
        return kb[:, None]


@dataclasses.dataclass(frozen=True)
class Global(Pattern):
    """Hub tokens: the listed absolute positions see every key, and every query sees them."""

    tokens: tuple[int, ...]
    kind: ClassVar[str] = "global"

    def __post_init__(self):
        tokens = tuple(sorted(set(check_int(t, "Global.tokens[...]") for t in self.tokens)))
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

    def token_mask(self, ctx, b, h, i, j):
        flags = self._flags(ctx)
        qi = torch.clamp(i, 0, ctx.kv_len - 1)
        kj = torch.clamp(j, 0, ctx.kv_len - 1)
        return (flags[qi] & (i >= 0) & (i < ctx.kv_len)) | (flags[kj] & (j >= 0) & (j < ctx.kv_len))


@dataclasses.dataclass(frozen=True)
class Dilated(Pattern):
    """``i - left <= j <= i + right`` and ``(i - j) % dilation == 0`` (LongNet / dilated sliding window)."""

    left: int
    dilation: int
    right: int = 0
    kind: ClassVar[str] = "dilated"

    def __post_init__(self):
        check_int(self.left, "Dilated.left")
        check_int(self.dilation, "Dilated.dilation", 1)
        check_int(self.right, "Dilated.right")

    def block_status(self, ctx):
        dmin, dmax = _delta_range(ctx)
        lo = torch.clamp(dmin, min=-self.right)
        hi = torch.clamp(dmax, max=self.left)
        # is there a multiple of `dilation` in [lo, hi]?
        first = lo + (-lo) % self.dilation
        empty = (hi < lo) | (first > hi)
        full = (dmin >= -self.right) & (dmax <= self.left) & (self.dilation == 1)
        return status_from_bounds(full & torch.ones_like(empty), empty)

    def token_mask(self, ctx, b, h, i, j):
        d = i - j
        return (d <= self.left) & (d >= -self.right) & (d % self.dilation == 0)

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
        g, n = self.block, self.stride
        qlo, qhi = ctx.q_range()
        klo, khi = ctx.k_range()
        dmin = qlo // g - khi // g
        dmax = qhi // g - klo // g
        first = dmin + (-dmin) % n
        empty = first > dmax
        full = dmin == dmax  # a single group difference, which is then a multiple of n (not empty)
        return status_from_bounds(full & ~empty, empty)

    def token_mask(self, ctx, b, h, i, j):
        return ((i // self.block) - (j // self.block)) % self.stride == 0

    def signature(self, ctx, b, h, qb, kb):
        bs, g, n = ctx.block_size, self.block, self.stride
        qlo = qb * bs + ctx.offset
        klo = kb * bs
        return torch.stack([qlo % g, klo % g, (qlo // g - klo // g) % n], dim=1)


# ----------------------------------------------------------------------------------------------
# block-granular patterns: a boolean selection over (query block, key block) cells of size `block`
# ----------------------------------------------------------------------------------------------


class BlockSelection(Pattern):
    """Base class of patterns defined by a boolean selection over ``block``-sized cells.

    Subclasses implement ``selection(ctx) -> bool [Bs, Hs, ceil(q_len / g), ceil(kv_len / g)]`` (query cells
    tile the *query index* ``i - (kv_len - q_len)``, key cells tile ``j``) and ``granularity(ctx) -> g``.
    """

    def granularity(self, ctx: Context) -> int:
        return self.block  # type: ignore[attr-defined]

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
            want = (-(-ctx.q_len // g), -(-ctx.kv_len // g))
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
        if g == bs:
            return torch.where(sel, FULL, EMPTY).to(torch.int8)
        # count selected cells in each compile block's rectangle with a 2-D prefix sum
        integral = torch.nn.functional.pad(sel.int().cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        qlo = torch.arange(ctx.num_q_blocks, device=ctx.device) * bs
        qhi = torch.clamp(qlo + bs, max=ctx.q_len) - 1
        klo = torch.arange(ctx.num_kv_blocks, device=ctx.device) * bs
        khi = torch.clamp(klo + bs, max=ctx.kv_len) - 1
        r0, r1 = qlo // g, qhi // g + 1
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
        qi = torch.clamp(i - ctx.offset, 0, ctx.q_len - 1) // g
        kj = torch.clamp(j, 0, ctx.kv_len - 1) // g
        bb = b if sel.shape[0] > 1 else torch.zeros_like(b)
        hh = h if sel.shape[1] > 1 else torch.zeros_like(h)
        return sel[bb, hh, qi, kj]


def _random_selection(per_row: int, seed: int, heads: int, n_rows: int, n_cols: int, device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(heads, n_rows, n_cols, generator=gen)
    k = min(per_row, n_cols)
    sel = torch.zeros(heads, n_rows, n_cols, dtype=torch.bool)
    if k > 0:
        sel.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    return sel.to(device)


@dataclasses.dataclass(frozen=True)
class RandomBlocks(BlockSelection):
    """BigBird-style random reach: each query block gets ``per_row`` random key blocks of ``block`` tokens,
    the same for a given ``seed``; different per head when ``per_head=True`` (head h uses seed + h)."""

    per_row: int
    seed: int = 0
    block: int = 128
    per_head: bool = False
    kind: ClassVar[str] = "random_blocks"

    def __post_init__(self):
        check_int(self.per_row, "RandomBlocks.per_row")
        check_int(self.seed, "RandomBlocks.seed")
        check_int(self.block, "RandomBlocks.block", 1)

    def selection(self, ctx):
        g = self.block
        rows, cols = -(-ctx.q_len // g), -(-ctx.kv_len // g)
        if not self.per_head:
            return _random_selection(self.per_row, self.seed, 1, rows, cols, ctx.device)[None]
        if ctx.heads is None:
            raise ValueError("RandomBlocks(per_head=True) needs compile(..., heads=H)")
        sel = [_random_selection(self.per_row, self.seed + h, 1, rows, cols, ctx.device) for h in range(ctx.heads)]
        return torch.cat(sel)[None]


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

    def block_status(self, ctx):
        self._check(ctx)
        H = len(self.patterns)
        sts = [p.status(ctx) for p in self.patterns]
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
        for k, p in enumerate(self.patterns):
            m = p.token_mask(ctx, b, h, i, j) & (h == k)
            out = m if out is None else out | m
        return out

    def signature(self, ctx, b, h, qb, kb):
        sig = torch.zeros(qb.shape[0], dtype=torch.long, device=qb.device)
        base = 0
        for k, p in enumerate(self.patterns):
            sel = h == k
            if bool(sel.any()):
                cols = p.signature(ctx, b[sel], h[sel], qb[sel], kb[sel])
                _, inv = torch.unique(cols, dim=0, return_inverse=True)
                sig[sel] = inv + base
                base += int(inv.max()) + 1
        return sig[:, None]


@dataclasses.dataclass(frozen=True)
class Budgeted(Pattern):
    """Keeps about ``keys_per_query`` keys per query at any length.

    At each length it resolves to ``Sinks(sinks) | Window(w) | Strided(n, block=block_size)``: the sinks, a
    local window taking a ``local`` fraction of the rest of the budget, and block-strided long-range reach
    spending what is left. Keys per query never exceed ``min(kv_len, keys_per_query) + block_size``. When
    ``kv_len <= keys_per_query`` it is dense (``Full()``).
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

    def _resolved(self, ctx: Context) -> Pattern:
        key = ("resolved", id(self))
        if key not in ctx.cache:
            ctx.cache[key] = self.resolve(ctx.kv_len, ctx.block_size)
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
