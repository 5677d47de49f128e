"""``reachability``: how far information travels through a stack of sparse attention layers, exactly.

Model: after layer n, token i holds information from source s when s = i (the residual stream keeps a token's
own state), or when layer n lets i read some token j (any head; the edge (i, j) is kept by the layer's Layout)
that held s after layer n - 1. With R_0 = I and A_n the (head-union) kept edges of layer n plus the identity:
R_n = A_n R_{n-1} over the boolean semiring.

Representation (exact, token level): R is a bitset, int64 [Lp, W] with W = ceil(L / 64); bit k of word w of
row i says "source 64 w + k reaches token i". One layer, per query block qb:

* full blocks: every row of qb ORs the block-OR of the rows of each full key block kb. The block-ORs are
  unpacked to bits and multiplied by the 0/1 full-block matrix [NQ, NK] (a float matmul of small integers,
  exact), then packed again.
* partial blocks (mask m): row r of qb ORs the rows c of kb with m[r, c]. Per 64-source word, if all rows of
  kb hold the same word (common far from the frontier), the result is that word for every row r whose mask row
  is non-empty; only words that differ between rows of kb are combined row by row.
* the residual ORs R itself. Padded rows stay zero.

Counting uses a SWAR popcount. Costs per layer: O(L W) word operations for the block ORs and counts, plus
O(non-constant words x bs^2) for partial blocks (small for windows, sinks, strides; grows for random token
masks). Memory: R twice (L^2 / 4 bytes) plus bounded chunks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from spattn.coverage import _tables
from spattn.patterns.layout import Layout

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


def _edges(layout: Layout, batch: int, causal: bool) -> _Edges:
    bs = layout.block_size
    b = min(batch, layout.batch - 1)
    bmap = _tables.block_map(layout)[b]  # [Hl, NQ, NK]
    NQ, NK = bmap.shape[-2:]
    full = (bmap == _tables.FULL).any(0)
    part = (bmap >= 0).any(0) & ~full
    if causal:
        future = torch.ones(NQ, NK, dtype=torch.bool, device=bmap.device).triu(1)
        diag_full = full & torch.eye(NQ, NK, dtype=torch.bool, device=bmap.device)
        full = full & ~future & ~diag_full
        part = (part | diag_full) & ~future
    cells = part.nonzero()  # [P, 2] sorted by query block
    P = cells.shape[0]
    flat = layout.masks.to(torch.uint8).reshape(-1, bs * bs)
    flat = torch.cat([flat, flat.new_zeros(1, bs * bs), flat.new_ones(1, bs * bs)])
    M = flat.shape[0] - 2
    union = torch.zeros(P, bs * bs, dtype=torch.uint8, device=bmap.device)
    for h in range(bmap.shape[0]):
        code = bmap[h][cells[:, 0], cells[:, 1]].long()
        code = torch.where(code == _tables.FULL, M + 1, torch.where(code < 0, M, code))
        union = torch.maximum(union, flat[code])
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


# ---------------------------------------------------------------------------- one layer
def _step(R: torch.Tensor, e: _Edges, L: int) -> None:
    """One layer, in place: R int64 [Lp, W] (rows >= L zero). Every read of the old state happens first."""
    Lp, W = R.shape
    bs = e.bs
    NQ, NK = e.full.shape
    Rv = R.view(Lp // bs, bs, W)
    zero = torch.zeros((), dtype=R.dtype, device=R.device)
    blk_or = _tree(Rv, 1, torch.bitwise_or)  # [NB, W] OR of each block's rows
    blk_and = _tree(Rv, 1, torch.bitwise_and)  # [NB, W] AND of each block's rows
    add = torch.zeros(NQ, W, dtype=R.dtype, device=R.device)  # OR added to every row of a query block
    # full blocks
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
    # partial blocks
    rows_updates: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if bool(e.part_mask.any()):
        kb = e.part_kb  # [NQ, P]
        rne = e.part_mask.any(-1)  # [NQ, P, bs] rows that read something
        live = rne.any(-1)  # [NQ, P]
        bor, band = blk_or[kb], blk_and[kb]  # [NQ, P, W]
        const = (bor == band) & live[..., None]
        whole = live & rne.all(-1)  # every row of the query block reads something
        add |= _tree(torch.where(const & whole[..., None], bor, zero), 1, torch.bitwise_or)
        for q, p in (live & ~whole).nonzero().tolist():  # rows that read nothing: per row (rare)
            words = torch.where(const[q, p], bor[q, p], zero)
            rows = rne[q, p].nonzero().squeeze(1)
            rows_updates.append((torch.tensor([q], device=R.device), rows, words))
        tri = ((bor != band) & live[..., None]).nonzero()  # [n, 3] (query block, slot, word)
        step = max(1, _CHUNK_WORDS // (bs * bs))
        results = []
        for t0 in range(0, tri.shape[0], step):
            qi, pi, wi = tri[t0:t0 + step].unbind(1)
            vals = Rv[kb[qi, pi], :, wi]  # [n, bs (key row c)]
            sel = torch.where(e.part_mask[qi, pi], vals[:, None, :], zero)  # [n, bs (r), bs (c)]
            results.append((qi, pi, wi, _tree(sel, 2, torch.bitwise_or)))  # [n, bs (r)]
    else:
        results = []
    # writes
    Rv[:NQ] |= add[:, None, :]
    for q, rows, words in rows_updates:
        Rv[q, rows] |= words
    for qi, pi, wi, val in results:
        for p in pi.unique().tolist():  # (query block, word) pairs are unique within one slot
            sel = pi == p
            a, w = qi[sel], wi[sel]
            Rv[a, :, w] = Rv[a, :, w] | val[sel]
    if Lp > L:
        R[L:] = 0


def _count(R: torch.Tensor) -> torch.Tensor:
    """int64 [rows]: set bits per row."""
    if R.device.type == "cpu":
        import numpy as np

        if hasattr(np, "bitwise_count"):
            return torch.from_numpy(np.bitwise_count(R.numpy()).sum(-1, dtype=np.int64))
    return _popcount(R).sum(-1)


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
    if max_layers is not None and (not isinstance(max_layers, int) or max_layers <= 0):
        raise ValueError(f"max_layers must be a positive int, got {max_layers!r}")
    L = stack[0].q_len
    for lay in stack:
        if lay.q_len != lay.kv_len or lay.q_len != L:
            raise ValueError(f"every layout must be self-attention over the same length {L}, got "
                             f"q_len={lay.q_len}, kv_len={lay.kv_len}")
    if return_matrix and L > 16384:
        raise ValueError("return_matrix is meant for small lengths (L <= 16384)")
    dev = stack[0].device
    mult = math.lcm(*{lay.block_size for lay in stack})
    Lp = math.ceil(L / mult) * mult
    W = math.ceil(L / 64)
    R = torch.zeros(Lp, W, dtype=torch.int64, device=dev)
    ar = torch.arange(L, device=dev)
    R[ar, ar // 64] = torch.ones((), dtype=torch.int64, device=dev) << (ar % 64)
    allowed = L * (L + 1) // 2 if causal else L * L
    cache: dict[int, _Edges] = {}
    counts: list[int] = []
    prev = L
    i = 0
    while i < len(stack):
        lay = stack[i]
        key = id(lay)
        if key not in cache:
            cache = {key: _edges(lay, batch, causal)} if len(cache) > 4 else {**cache, key: _edges(lay, batch, causal)}
        _step(R, cache[key], L)
        c = int(_count(R).sum())
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
    receptive = _count(R[:L]).cpu()
    matrix = _unpack(R[:L], L) if return_matrix else None
    return Reachability(fraction=fraction, layers_to_full=layers_to_full, receptive_field=receptive,
                        counts=cnt, allowed=allowed, causal=causal, matrix=matrix)
