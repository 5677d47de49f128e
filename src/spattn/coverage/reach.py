"""``reachability``: how far information travels through a stack of sparse attention layers, exactly.

Model: after layer n, token i holds information from source s when s = i (the residual stream keeps a token's
own state), or when layer n lets i read some token j (any head; the edge (i, j) is kept by the layer's Layout)
that held s after layer n - 1. With R_0 = I and A_n the (head-union) kept edges of layer n plus the identity:
R_n = A_n R_{n-1} over the boolean semiring.

Representation (exact, token level): R is a bitset over sources, 64 per int64 word, stored by cells
(row block rb of bs tokens, source word w). A cell whose rows all hold the same word is one word (``const``);
only cells whose rows differ (the diagonal, the frontier of what has been reached) keep their bs rows. One
layer, per query block qb:

* full key blocks: every row of qb ORs the OR of the key block's rows (a gather + OR tree; a 0/1 float matmul
  over unpacked bits when a row has many full blocks — exact small integers);
* partial key blocks (mask m): row r ORs rows c of kb with m[r, c]. A source cell whose rows agree gives its
  word to every row that reads something; a source cell whose rows differ is combined row by row — with a
  sparse table of range ORs when every mask row is one run of columns (windows, causal diagonals), else
  with a masked OR over bs x bs;
* contributions already held by every row of qb are skipped (they cannot change anything); the residual keeps
  R; cells whose rows agree again fold back to one word.

Cost per layer: O(NB x W) words for the cells plus O(differing cells x bs log bs); memory O(NB x W + differing
cells x bs) instead of L^2 / 64 words. Counting uses numpy's popcount (or a SWAR popcount off the CPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from spattn._checks import check_int
from spattn.layout import tables
from spattn.layout.layout import Layout

_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_CHUNK_WORDS = 1 << 23


@dataclasses.dataclass(eq=False)
class Reachability:
    """Which sources can influence each token after n layers of a sparse stack.

    Attributes:
        fraction: float64 [N] — for n = 1..N, reachable (token, source) pairs / pairs allowed (source <= token
            when causal, all pairs otherwise); a token always reaches itself (residual).
        layers_to_full: the first n with ``fraction[n - 1] == 1`` (exact count equality), or None.
        receptive_field: int64 [L] — sources reaching each token after the last layer (itself included).
        counts: int64 [N] — reachable pairs after each layer; ``allowed`` the number of allowed pairs.
        causal: whether causality bounded the allowed pairs.
        matrix: bool [L, L] of the final reachability (only with ``return_matrix=True``; small L).
    """

    fraction: torch.Tensor
    layers_to_full: int | None
    receptive_field: torch.Tensor
    counts: torch.Tensor
    allowed: int
    causal: bool
    matrix: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return int(self.fraction.numel())

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: fraction per depth, layers to full, receptive field mean/min/max."""
        rf = self.receptive_field.double()
        return {
            "fraction": self.fraction.tolist(),
            "layers_to_full": self.layers_to_full,
            "receptive_field": {"mean": float(rf.mean()), "min": float(rf.min()), "max": float(rf.max())},
            "causal": self.causal,
        }

    def __repr__(self) -> str:
        frac = self.fraction.tolist()
        shown = ", ".join(f"{f:.3f}" for f in frac[:8]) + (", ..." if len(frac) > 8 else "")
        return (f"Reachability(L={self.receptive_field.numel()}, layers={len(frac)}, fraction=[{shown}], "
                f"layers_to_full={self.layers_to_full}, causal={self.causal})")


# ---------------------------------------------------------------------------- bit helpers
def _tree(x: torch.Tensor, dim: int, op: Any) -> torch.Tensor:
    x = x.movedim(dim, 0)
    while x.shape[0] > 1:
        n = x.shape[0]
        h = n // 2
        y = op(x[:h], x[h:2 * h])
        if n % 2:
            y[0] = op(y[0], x[2 * h])
        x = y
    return x[0]


def _popcount(x: torch.Tensor) -> torch.Tensor:
    """int64 popcount per element of an int64 tensor (SWAR; shifts are arithmetic, masks fix the sign)."""
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def _unpack(words: torch.Tensor, L: int) -> torch.Tensor:
    """int64 [..., W] -> bool [..., L]."""
    shifts = torch.arange(64, device=words.device, dtype=torch.int64)
    bits = (words[..., None] >> shifts) & 1
    return bits.flatten(-2)[..., :L].bool()


def _pack(bits: torch.Tensor, W: int) -> torch.Tensor:
    """bool [..., L] -> int64 [..., W]."""
    L = bits.shape[-1]
    bits = torch.nn.functional.pad(bits.to(torch.int64), (0, W * 64 - L)).view(*bits.shape[:-1], W, 64)
    shifts = torch.arange(64, device=bits.device, dtype=torch.int64)
    return (bits << shifts).sum(-1)  # distinct powers of two: the sum is the OR (bit 63 wraps to the sign)


# ---------------------------------------------------------------------------- edges of one layer
@dataclasses.dataclass
class _Edges:
    bs: int
    full: torch.Tensor  # float32 [NQ, NK] 0/1
    full_kb: torch.Tensor  # int64 [NQ, F] full key blocks per query block (NK = padding: a zero row)
    part_kb: torch.Tensor  # int64 [NQ, P] key block per slot (0 for padding)
    part_mask: torch.Tensor  # bool [NQ, P, bs, bs] (all False for padding)
    rne: torch.Tensor = None  # bool [NQ, P, bs] rows that read something
    lo: torch.Tensor = None  # int64 [NQ, P, bs] first / last column read by the row
    hi: torch.Tensor = None
    interval: torch.Tensor = None  # bool [NQ, P] every row reads one contiguous run of columns

    def __post_init__(self):
        m = self.part_mask
        bs = self.bs
        self.rne = m.any(-1)
        col = torch.arange(bs, device=m.device)
        self.lo = torch.where(self.rne, torch.where(m, col, bs).amin(-1), 0)  # empty rows: 0..0 (masked later)
        self.hi = torch.where(self.rne, torch.where(m, col, -1).amax(-1), 0)
        runs = m.sum(-1)
        self.interval = ((runs == self.hi - self.lo + 1) | ~self.rne).all(-1)
        self.any_part = bool(self.rne.any())


def _edges(layout: Layout, batch: int, causal: bool) -> _Edges:
    bs = layout.block_size
    b = min(batch, layout.batch - 1)
    status, slot = tables.unpack(layout)
    status, slot = status[b], slot[b]  # [Hl, NQ, NK]
    NQ, NK = status.shape[-2:]
    dev = status.device
    full = (status == tables.FULL).any(0)
    part = (status == tables.PARTIAL).any(0) & ~full
    if causal:
        future = torch.ones(NQ, NK, dtype=torch.bool, device=dev).triu(1)
        diag_full = full & torch.eye(NQ, NK, dtype=torch.bool, device=dev)
        full = full & ~future & ~diag_full
        part = (part | diag_full) & ~future
    cells = part.nonzero()  # [P, 2] sorted by query block
    P = cells.shape[0]
    flat = tables.tiles(layout.masks).to(torch.uint8).reshape(-1, bs * bs)
    union = torch.zeros(P, bs * bs, dtype=torch.uint8, device=dev)
    for h in range(slot.shape[0]):  # the union over heads of each cell's token mask
        union = torch.maximum(union, flat[slot[h][cells[:, 0], cells[:, 1]]])
    masks = union.bool().view(P, bs, bs)
    if causal:
        diag = cells[:, 0] == cells[:, 1]
        masks[diag] &= torch.ones(bs, bs, dtype=torch.bool, device=masks.device).tril()
    part_kb, slot_of = _pad_rows(cells, NQ, 0)
    part_mask = torch.zeros(*part_kb.shape, bs, bs, dtype=torch.bool, device=cells.device)
    part_mask[cells[:, 0], slot_of] = masks
    full_kb, _ = _pad_rows(full.nonzero(), NQ, NK)
    return _Edges(bs=bs, full=full.float(), full_kb=full_kb, part_kb=part_kb, part_mask=part_mask)


def _pad_rows(cells: torch.Tensor, rows: int, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) pairs sorted by row -> int64 [rows, width] columns per row padded with ``fill``, slots."""
    counts = torch.bincount(cells[:, 0], minlength=rows)
    width = max(1, int(counts.max()) if cells.shape[0] else 1)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(cells.shape[0], device=cells.device) - starts[cells[:, 0]]
    table = torch.full((rows, width), fill, dtype=torch.int64, device=cells.device)
    table[cells[:, 0], slot] = cells[:, 1]
    return table, slot


# ---------------------------------------------------------------------------- state
@dataclasses.dataclass
class _State:
    """R in cells (row block rb, source word w): ``const`` [NB, W] holds the AND of the cell's rows (its value
    when every row agrees); the cells whose rows differ are listed in ``cells`` (sorted ids rb * W + w) with
    their rows in ``rows`` [E, bs]. Padded rows of the last block mirror its first row (they never count)."""

    const: torch.Tensor
    cells: torch.Tensor
    rows: torch.Tensor
    nrows: torch.Tensor  # int64 [NB] real rows per block
    L: int
    bs: int

    @property
    def W(self) -> int:
        return self.const.shape[1]


def _initial(L: int, bs: int, device: torch.device) -> _State:
    NB, W = math.ceil(L / bs), math.ceil(L / 64)
    i = torch.arange(L, device=device)
    cell = (i // bs) * W + i // 64
    cells, pos = torch.unique(cell, return_inverse=True)
    rows = torch.zeros(cells.numel(), bs, dtype=torch.int64, device=device)
    rows[pos, i % bs] = torch.ones((), dtype=torch.int64, device=device) << (i % 64)
    nrows = torch.full((NB,), bs, dtype=torch.int64, device=device)
    nrows[-1] = L - (NB - 1) * bs
    st = _State(torch.zeros(NB, W, dtype=torch.int64, device=device), cells, rows, nrows, L, bs)
    return _settle(st, st.const, cells, rows)


def _settle(st: _State, const: torch.Tensor, cells: torch.Tensor, rows: torch.Tensor) -> _State:
    """Mirror padded rows, store each cell's AND in ``const`` and keep only cells whose rows differ."""
    tail = int(st.nrows[-1])
    if tail < st.bs and cells.numel():
        last = cells // st.W == st.nrows.numel() - 1
        rows[last, tail:] = rows[last, :1]
    row_and = _tree(rows, 1, torch.bitwise_and) if cells.numel() else rows.new_zeros(0)
    row_or = _tree(rows, 1, torch.bitwise_or) if cells.numel() else rows.new_zeros(0)
    const = const.clone()
    const.view(-1)[cells] = row_and
    differ = row_and != row_or
    return dataclasses.replace(st, const=const, cells=cells[differ], rows=rows[differ])


def _block_or(st: _State) -> torch.Tensor:
    out = st.const.clone()
    if st.cells.numel():
        out.view(-1)[st.cells] = _tree(st.rows, 1, torch.bitwise_or)
    return out


def _range_or(src: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """[n, bs]: OR of src[i, lo[i, r] .. hi[i, r]] (inclusive) per row r, with a sparse table of ORs."""
    n, bs = src.shape
    levels = [src]
    while (1 << len(levels)) <= bs:
        h = 1 << (len(levels) - 1)
        nxt = levels[-1].clone()
        nxt[:, : bs - h] |= levels[-1][:, h:]
        levels.append(nxt)  # levels[k][i, c] = OR of src[i, c .. c + 2^k) (clipped)
    table = torch.stack(levels)  # [K, n, bs]
    length = hi - lo + 1
    k = torch.floor(torch.log2(length.double())).long()
    k = k - ((1 << k) > length).long() + ((1 << (k + 1)) <= length).long()  # guard float rounding
    i = torch.arange(n, device=src.device)[:, None]
    return table[k, i, lo] | table[k, i, hi - (1 << k) + 1]


def _or_into(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """target[index[k]] |= values[k] for every k, duplicates in ``index`` allowed."""
    if index.numel() == 0:
        return
    order = torch.argsort(index, stable=True)
    index, values = index[order], values[order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    start = torch.cummax(torch.where(first, torch.arange(index.numel(), device=index.device), 0), 0).values
    rank = torch.arange(index.numel(), device=index.device) - start
    for r in range(int(rank.max()) + 1):
        sel = rank == r  # unique targets within one rank
        target[index[sel]] = target[index[sel]] | values[sel]


# ---------------------------------------------------------------------------- one layer
def _step(st: _State, e: _Edges) -> _State:
    """One layer: rows of query block qb OR (block-uniform) ``add[qb]`` plus row-varying contributions."""
    bs, W = st.bs, st.W
    NQ, NK = e.full.shape
    dev = st.const.device
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    blk_or = _block_or(st)  # [NB, W]
    exc = torch.zeros(NQ * W, dtype=torch.bool, device=dev)
    exc[st.cells] = True
    exc = exc.view(NQ, W)
    add = torch.zeros(NQ, W, dtype=torch.int64, device=dev)
    F = e.full_kb.shape[1]
    if bool(e.full.any()):
        if F <= 64:
            ext = torch.cat([blk_or[:NK], blk_or.new_zeros(1, W)])
            per = max(1, _CHUNK_WORDS // max(1, F * W))
            for q0 in range(0, NQ, per):
                add[q0:q0 + per] |= _tree(ext[e.full_kb[q0:q0 + per]], 1, torch.bitwise_or)
        else:  # many full blocks per row: a 0/1 matmul over unpacked bits (exact small integers)
            rows_per = max(1, _CHUNK_WORDS // max(1, W * 64))
            for q0 in range(0, NQ, rows_per):
                Fq = e.full[q0:q0 + rows_per]
                used = Fq.any(0).nonzero().squeeze(1)
                if used.numel():
                    add[q0:q0 + rows_per] |= _pack((Fq[:, used] @ _unpack(blk_or[used], W * 64).float()) > 0, W)
    tgt: list[torch.Tensor] = []  # row-varying contributions: target cell ids [n] and rows [n, bs]
    val: list[torch.Tensor] = []
    if e.any_part:
        kb = e.part_kb  # [NQ, P]
        rne = e.rne  # [NQ, P, bs]
        live = rne.any(-1)
        pad_rows = torch.arange(bs, device=dev) >= st.nrows[:, None]  # [NQ, bs] padded rows never matter
        whole = live & (rne | pad_rows[:, None, :]).all(-1)
        src_exc = exc[kb]  # [NQ, P, W]
        src_const = st.const[kb]
        add |= _tree(torch.where((whole[..., None] & ~src_exc), src_const, zero), 1, torch.bitwise_or)
        # every row of qb already holds st.const | add: a contribution within it changes nothing, and a
        # contribution from source cell (kb, w) lies within blk_or[kb, w]; only the rest needs rows
        have = (st.const | add)[:, None, :]  # [NQ, 1, W]
        news = (blk_or[kb] & ~have) != 0  # [NQ, P, W]
        # ragged entries (some rows read nothing) with agreeing source rows: per row
        q, p, w = ((live & ~whole)[..., None] & ~src_exc & news).nonzero().unbind(1)
        if q.numel():
            tgt.append(q * W + w)
            val.append(torch.where(rne[q, p], src_const[q, p, w][:, None], zero))
        # sources whose rows differ: a token-level product mask x rows
        q, p, w = (live[..., None] & src_exc & news).nonzero().unbind(1)
        if q.numel():
            pos = torch.searchsorted(st.cells, kb[q, p] * W + w)
            fast = e.interval[q, p]
            step = max(1, _CHUNK_WORDS // (bs * bs))
            for part, chunk in ((fast, bs * 16), (~fast, step)):
                qs, ps, ws, poss = q[part], p[part], w[part], pos[part]
                for t0 in range(0, qs.numel(), chunk):
                    sl = slice(t0, t0 + chunk)
                    src = st.rows[poss[sl]]  # [n, bs (c)]
                    if part is fast:
                        res = _range_or(src, e.lo[qs[sl], ps[sl]], e.hi[qs[sl], ps[sl]])
                        res = torch.where(rne[qs[sl], ps[sl]], res, zero)
                    else:
                        sel = torch.where(e.part_mask[qs[sl], ps[sl]], src[:, None, :], zero)  # [n, bs (r), bs (c)]
                        res = _tree(sel, 2, torch.bitwise_or)
                    tgt.append(qs[sl] * W + ws[sl])
                    val.append(res)
    const = st.const | add
    add_flat = add.view(-1)
    if tgt:
        t = torch.cat(tgt)
        v = torch.cat(val)
        cells = torch.unique(torch.cat([st.cells, t]))
    else:
        t = v = None
        cells = st.cells
    rows = const.view(-1)[cells][:, None].expand(-1, bs).clone()
    if st.cells.numel():
        old = torch.searchsorted(cells, st.cells)
        rows[old] = st.rows | add_flat[st.cells][:, None]
    if t is not None:
        _or_into(rows, torch.searchsorted(cells, t), v)
    return _settle(st, const, cells, rows)


def _row_counts(st: _State) -> torch.Tensor:
    """int64 [L]: reachable sources per token."""
    pc = _count(st.const)  # per cell
    per_block = pc.sum(-1)  # [NB] (exception cells counted with their AND; corrected below)
    out = per_block[:, None].expand(-1, st.bs).clone()
    if st.cells.numel():
        rb = st.cells // st.W
        corr = _count(st.rows) - pc.view(-1)[st.cells][:, None]  # [E, bs]
        out.index_add_(0, rb, corr)
    return out.reshape(-1)[: st.L]


def _to_matrix(st: _State) -> torch.Tensor:
    rows = st.const[:, None, :].expand(-1, st.bs, -1).clone()  # [NB, bs, W]
    if st.cells.numel():
        rb, w = st.cells // st.W, st.cells % st.W
        rows[rb, :, w] = st.rows
    return _unpack(rows.reshape(-1, st.W)[: st.L], st.L)


def _count(R: torch.Tensor) -> torch.Tensor:
    """int64, set bits per element of an int64 tensor."""
    if R.device.type == "cpu":
        try:
            import numpy as np
        except ImportError:  # numpy is optional for torch: fall back to the SWAR popcount
            return _popcount(R)
        if hasattr(np, "bitwise_count"):
            words = R.contiguous().numpy().view(np.uint64)  # unsigned: numpy counts |x| for signed ints
            return torch.from_numpy(np.bitwise_count(words).astype(np.int64))
    return _popcount(R)


# ---------------------------------------------------------------------------- public
def reachability(
    layouts: Layout | Sequence[Layout],
    *,
    causal: bool,
    max_layers: int | None = None,
    batch: int = 0,
    return_matrix: bool = False,
) -> Reachability:
    """Exact token-level reachability through a stack of sparse attention layers.

    Information moves one hop per layer along kept edges (a query reads a key when any head of that layer
    keeps the pair), and the residual stream keeps each token's own state.

    Args:
        layouts: one :class:`spattn.Layout` repeated ``max_layers`` times, or one Layout per layer (static or
            captured dynamic). Self-attention only: q_len == kv_len, the same length for every layer.
        causal: count only pairs with source <= token, and drop any kept edge to a future key.
        max_layers: depth for a repeated layout (required then); with a list, the first ``max_layers`` layers.
        batch: which sequence of batched (per-sequence) tables to follow. Default 0.
        return_matrix: also return the final bool [L, L] matrix (small L only).

    Returns:
        :class:`Reachability` with ``fraction`` [N], ``layers_to_full`` and ``receptive_field`` [L].

    Example:
        >>> import spattn
        >>> layout = spattn.compile(spattn.Sinks(4) | spattn.Window(64), 1024, 1024, causal=True, block_size=64)
        >>> spattn.coverage.reachability(layout, causal=True, max_layers=32).layers_to_full
        16
    """
    if isinstance(layouts, Layout):
        if max_layers is None:
            raise ValueError("max_layers is required when layouts is a single Layout repeated over layers")
        stack: list[Layout] = [layouts] * max_layers
    elif isinstance(layouts, Sequence) and layouts and all(isinstance(x, Layout) for x in layouts):
        stack = list(layouts)
        if max_layers is not None:
            if max_layers > len(stack):
                raise ValueError(f"max_layers={max_layers} exceeds the {len(stack)} layouts given")
            stack = stack[:max_layers]
    else:
        raise TypeError("layouts must be a spattn.Layout or a non-empty sequence of Layouts")
    if max_layers is not None:
        check_int(max_layers, "max_layers", 1)
    L = stack[0].q_len
    for lay in stack:
        if lay.q_len != lay.kv_len or lay.q_len != L:
            raise ValueError(f"every layout must be self-attention over the same length {L}, got "
                             f"q_len={lay.q_len}, kv_len={lay.kv_len}")
    if return_matrix and L > 16384:
        raise ValueError("return_matrix is meant for small lengths (L <= 16384)")
    dev = stack[0].device
    bs = stack[0].block_size
    if any(lay.block_size != bs for lay in stack):
        raise ValueError("every layout of the stack must use the same block_size")
    st = _initial(L, bs, dev)
    allowed = L * (L + 1) // 2 if causal else L * L
    cache: dict[int, _Edges] = {}
    counts: list[int] = []
    prev = L
    i = 0
    while i < len(stack):
        lay = stack[i]
        key = id(lay)
        if key not in cache:
            if len(cache) > 4:
                cache.clear()
            cache[key] = _edges(lay, batch, causal)
        st = _step(st, cache[key])
        c = int(_row_counts(st).sum())
        counts.append(c)
        i += 1
        if c == prev and all(x is lay for x in stack[i:]):
            counts.extend([c] * (len(stack) - i))  # fixed point of a repeated layer: nothing changes any more
            break
        prev = c
    cnt = torch.tensor(counts, dtype=torch.int64)
    fraction = cnt.double() / allowed
    full = (cnt == allowed).nonzero()
    layers_to_full = int(full[0]) + 1 if full.numel() else None
    receptive = _row_counts(st).cpu()
    matrix = _to_matrix(st) if return_matrix else None
    return Reachability(fraction=fraction, layers_to_full=layers_to_full, receptive_field=receptive,
                        counts=cnt, allowed=allowed, causal=causal, matrix=matrix)
