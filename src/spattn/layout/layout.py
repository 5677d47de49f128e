"""The block-sparse Layout: what a pattern compiles to and what every attention backend runs on.

Format (the FlexAttention ``BlockMask`` layout, plus explicit masks for partial blocks)
-------------------------------------------------------------------------------------
Notation: ``Bl``/``Hl`` are the layout's batch/head sizes (1 means "the same for every batch / head"),
``NQ = ceil(q_len / block_size)``, ``NK = ceil(kv_len / block_size)``, ``bs = block_size``.

Query blocks tile the *query index* ``i`` in ``[0, q_len)``; key blocks tile the key index ``j`` in
``[0, kv_len)``. Queries are aligned bottom-right: query ``i`` sits at absolute position
``i + kv_len - q_len`` (FlashAttention / KV-cache convention); patterns are defined on absolute positions.

Forward tables (per query block, the key blocks it visits; valid entries first, sorted ascending, the
rest of the last dimension is padding and must not be read):

* ``full_kv_num_blocks`` int32 ``[Bl, Hl, NQ]`` and ``full_kv_indices`` int32 ``[Bl, Hl, NQ, W]``: key blocks in
  which every in-bounds (i, j) pair is allowed. Kernels only apply the bounds check (i < q_len, j < kv_len).
* ``kv_num_blocks`` int32 ``[Bl, Hl, NQ]``, ``kv_indices`` int32 ``[Bl, Hl, NQ, W]`` and ``kv_mask_ids`` int32
  ``[Bl, Hl, NQ, W]``: *partial* key blocks. Entry ``e`` of row ``(b, h, qb)`` is key block
  ``kv_indices[b, h, qb, e]`` and its token-level mask is ``masks[kv_mask_ids[b, h, qb, e]]``.
* ``masks`` bool ``[M, bs, bs]``: the distinct token masks of partial blocks (deduplicated), ``masks[m][r, c]``
  is True when query ``qb * bs + r`` may attend key ``kb * bs + c``. Out-of-bounds rows/columns are False.

Transposed tables (per key block, the query blocks that visit it; for backward dK/dV), same conventions:
``full_q_num_blocks [Bl, Hl, NK]``, ``full_q_indices [Bl, Hl, NK, W']``, ``q_num_blocks``, ``q_indices``,
``q_mask_ids`` (the mask id is the same mask ``[r = query offset, c = key offset]``, not transposed).

Full and partial sets are disjoint; a block absent from both is skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from spattn.layout import tables

_FIELDS = (
    "kv_num_blocks",
    "kv_indices",
    "kv_mask_ids",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "q_mask_ids",
    "full_q_num_blocks",
    "full_q_indices",
    "masks",
)


@dataclasses.dataclass(eq=False)
class Layout:
    """A compiled block-sparse attention layout (see the module docstring for the exact format).

    Build one with :func:`spattn.compile`. Tables have shape ``[Bl, Hl, ...]`` where ``Bl`` is 1 or the
    batch size and ``Hl`` is 1 or the number of query heads.

    Example:
        >>> import spattn
        >>> layout = spattn.compile(spattn.Sinks(4) | spattn.Window(16), 64, 64, causal=True, block_size=16)
        >>> layout.density() < 1
        True
    """

    q_len: int
    kv_len: int
    block_size: int
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    kv_mask_ids: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    q_num_blocks: torch.Tensor
    q_indices: torch.Tensor
    q_mask_ids: torch.Tensor
    full_q_num_blocks: torch.Tensor
    full_q_indices: torch.Tensor
    masks: torch.Tensor
    pattern: Any = None
    causal: bool = False
    info: dict = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ shape facts
    @property
    def batch(self) -> int:
        """Batch size of the tables (1 = shared by every sequence)."""
        return self.kv_num_blocks.shape[0]

    @property
    def heads(self) -> int:
        """Head count of the tables (1 = shared by every head)."""
        return self.kv_num_blocks.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return self.q_num_blocks.shape[2]

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    @property
    def offset(self) -> int:
        """Absolute position of query 0 (``kv_len - q_len``)."""
        return self.kv_len - self.q_len

    def to(self, device: torch.device | str) -> Layout:
        """The same layout with every table on ``device``."""
        return dataclasses.replace(self, **{f: getattr(self, f).to(device) for f in _FIELDS})

    def tables(self) -> dict[str, torch.Tensor]:
        """All tables by name (the kernels' inputs)."""
        return {f: getattr(self, f) for f in _FIELDS}

    # ------------------------------------------------------------------ dense views (small lengths)
    def block_status(self) -> torch.Tensor:
        """int8 ``[Bl, Hl, NQ, NK]``: ``EMPTY`` (0) skipped, ``PARTIAL`` (1), ``FULL`` (2)."""
        return tables.unpack(self)[0]

    def to_dense(self) -> torch.Tensor:
        """bool ``[Bl, Hl, q_len, kv_len]``: the exact token-level mask. For tests and small lengths only."""
        from spattn.layout.dense import to_dense

        return to_dense(self)

    # ------------------------------------------------------------------ counts
    def _row_pairs(self, visited: bool = False) -> torch.Tensor:
        """float64 ``[Bl, Hl, NQ]`` per query block: allowed (query, key) pairs (exact), or with ``visited`` the
        in-bounds pairs of every visited block (what a block kernel computes)."""
        bs, NQ, NK = self.block_size, self.num_q_blocks, self.num_kv_blocks
        q_rows = torch.full((NQ, 1), bs, dtype=torch.float64, device=self.device)
        q_rows[-1] = self.q_len - (NQ - 1) * bs
        k_cols = torch.full((NK,), bs, dtype=torch.float64, device=self.device)
        k_cols[-1] = self.kv_len - (NK - 1) * bs
        block, slot = tables.entries(self)
        M = self.masks.shape[0]
        area = k_cols[block.clamp(max=NK - 1)] * q_rows
        if visited:
            return torch.where(slot == M + 1, 0.0, area).sum(-1)
        mask_pairs = torch.cat([self.masks.flatten(1).sum(-1).double(), q_rows.new_zeros(2)])
        return torch.where(slot == M, area, mask_pairs[slot]).sum(-1)

    def _row_keys(self) -> torch.Tensor:
        """float64 ``[Bl, Hl, NQ]``: allowed (query, key) pairs per query block, exact."""
        return self._row_pairs()

    def allowed_pairs(self) -> torch.Tensor:
        """float64 ``[Bl, Hl]``: number of allowed (query, key) pairs, exact at token level."""
        return self._row_keys().sum(-1)

    def dense_pairs(self) -> int:
        """The (query, key) pairs dense attention computes: ``q_len * kv_len``, or the causal ones
        (``j <= i + kv_len - q_len``) when the layout is causal. The denominator of :meth:`density`."""
        if not self.causal:
            return self.q_len * self.kv_len
        off, n = self.offset, self.q_len  # row i sees min(kv_len, max(0, i + off + 1)) keys
        return sum(min(self.kv_len, max(0, i + off + 1)) for i in range(n)) if off < 0 else n * off + n * (n + 1) // 2

    def dense_blocks(self) -> int:
        """The blocks a dense block kernel visits: ``NQ * NK``, or those holding a causal pair when causal.
        The denominator of :meth:`block_density`."""
        NQ, NK, bs = self.num_q_blocks, self.num_kv_blocks, self.block_size
        if not self.causal:
            return NQ * NK
        # query block qb reaches key blocks 0 .. (last absolute position of the block) // bs
        return sum(min(NK, max(0, (min(self.q_len, (qb + 1) * bs) - 1 + self.offset) // bs + 1)) for qb in range(NQ))

    def density(self, level: str = "token") -> float:
        """Fraction of the pairs dense attention computes that this layout keeps, averaged over batch and heads:
        allowed pairs / :meth:`dense_pairs` (all ``q_len * kv_len`` pairs, or the causal ones when the layout
        is causal). 1.0 means "as much as dense".

        ``level="block"`` is :meth:`block_density` (kept for old callers).
        """
        if level == "token":
            return float(self.allowed_pairs().mean() / max(1, self.dense_pairs()))
        if level == "block":
            return self.block_density()
        raise ValueError(f"level must be 'token' or 'block', got {level!r}")

    def block_density(self) -> float:
        """Fraction of the blocks a dense block kernel visits (:meth:`dense_blocks`: causal ones when causal)
        that this layout visits (full + partial), averaged over batch and heads: what a block-sparse kernel pays.
        Always at least :meth:`density`'s share of the work, often much more (partial blocks)."""
        visited = (self.kv_num_blocks + self.full_kv_num_blocks).double().sum(-1).mean()
        return float(visited / max(1, self.dense_blocks()))

    def flops(self, head_dim: int, *, batch: int | None = None, heads: int | None = None, level: str = "token") -> float:
        """Forward FLOPs (4 * pairs * head_dim: QK^T and PV) summed over batch and heads.

        ``level="token"`` counts allowed pairs (useful FLOPs); ``level="block"`` counts what a block kernel
        computes (visited blocks times block area, tails clipped). ``batch``/``heads`` expand shared tables.
        """
        B = batch if batch is not None else self.batch
        H = heads if heads is not None else self.heads
        if level == "token":
            pairs = self.allowed_pairs().mean() * B * H
        elif level == "block":
            pairs = self._row_pairs(visited=True).sum(-1).mean() * B * H
        else:
            raise ValueError(f"level must be 'token' or 'block', got {level!r}")
        return float(4.0 * pairs * head_dim)

    def keys_per_query(self) -> torch.Tensor:
        """float64 ``[Bl, Hl, NQ]``: mean allowed keys per query in each query block."""
        bs = self.block_size
        rows = torch.full((self.num_q_blocks,), bs, dtype=torch.float64, device=self.device)
        rows[-1] = self.q_len - (self.num_q_blocks - 1) * bs
        return self._row_keys() / rows

    # ------------------------------------------------------------------ pictures
    def to_string(self, batch: int = 0, head: int = 0, max_size: int = 64) -> str:
        """A █/▒/░ grid of the block status (█ full, ▒ partial, ░ skipped), downsampled to ``max_size``."""
        from spattn.layout.show import to_string

        return to_string(self, batch, head, max_size)

    def plot(self, batch: int = 0, head: int = 0, ax: Any = None, title: str | None = None) -> Any:
        """Draw the block status with matplotlib (``pip install 'spattn[viz]'``). Returns the Axes."""
        from spattn.layout.show import plot

        return plot(self, batch, head, ax, title)

    def __repr__(self) -> str:
        return (
            f"Layout(q_len={self.q_len}, kv_len={self.kv_len}, block_size={self.block_size}, "
            f"batch={self.batch}, heads={self.heads}, blocks={self.num_q_blocks}x{self.num_kv_blocks}, "
            f"density={self.density():.4f}, block_density={self.block_density():.4f}, masks={self.masks.shape[0]}, "
            f"causal={self.causal}, device={self.device})"
        )

    # ------------------------------------------------------------------ torch BlockMask
    def to_block_mask(self) -> Any:
        """Convert to torch's FlexAttention ``BlockMask`` (same tables; partial blocks get a mask_mod
        that reads this layout's masks). Requires torch with ``torch.nn.attention.flex_attention``."""
        from spattn.layout.blockmask import layout_to_block_mask

        return layout_to_block_mask(self)

    @classmethod
    def from_block_mask(cls, block_mask: Any, *, mask_mod: Any = None) -> Layout:
        """Build a Layout from torch's ``BlockMask``; partial blocks are resolved at token level by evaluating
        ``mask_mod(b, h, q_idx, kv_idx)`` (default: the BlockMask's own) inside those blocks only, and never past
        the sequence ends. A BlockMask whose partial blocks have no mask_mod (torch's ``noop_mask``) warns and
        keeps them as full blocks, which is what ``flex_attention`` computes for it. Any ``q_len`` / ``kv_len``
        (cross-attention with more queries than keys included) converts and runs in ``spattn.attention``."""
        from spattn.layout.blockmask import block_mask_to_layout

        return block_mask_to_layout(block_mask, mask_mod)
