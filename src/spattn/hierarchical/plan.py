"""``BranchPlan``: what hierarchical attention can build once per shape, and the selected branch's tables per call.

Everything here but :meth:`BranchPlan.selected` depends only on the config and the shape (length, batch, heads,
device), so :func:`branch_plan` caches it: the compressed and window Layouts (static), the overlap map of the
selection scores, the safeguard's kept blocks and its dense per-block view. Per call only the *selection*
changes; :meth:`BranchPlan.selected` turns the chosen blocks into the selected branch's Layout on the device:

* a chosen block becomes FULL, or, on the diagonal, the causal token mask (the dense view of
  ``compile(Full(), causal=True)``, cached); it overrides the safeguard's status there (a chosen block holds
  every pair the safeguard allows in it);
* the merged status goes through the one codec, ``spattn.layout.tables.pack(..., width=NK)`` (no host
  synchronisation, shapes from Python integers only), at the key/value-head level (the selection is shared by a
  GQA group), then the forward tables are cut to their known bound (``static width + select_count``: the
  chosen blocks are at most ``select_count`` per row) and repeated over each group's query heads.

Note [static block size]: the compressed and window Layouts do not depend on ``select_block``; each is compiled
at 128 (or ``select_block`` when larger), where the triton kernels run 128-query tiles (a 64-block layout caps
the tile at 64 queries, about half the throughput on an H200: ``benchmarks/NOTES-kernels.md``), unless the
branch reaches so few keys back that 128-blocks compute more than twice the work of ``select_block``-blocks: a
row reaching ``r`` keys back visits about ``r + b`` keys at block ``b``, so 128 pays when
``(r + 128) / 2 <= r + select_block``, i.e. ``r >= 128 - 2 * select_block`` (the window branch reaches
``window`` keys, the compressed branch its ``Nc`` compressed tokens). Session 7's MQAR plan (``window=32``,
``select_block=32``, 256 tokens) computed the whole causal triangle in both branches at block 128; it now runs
them at block 32. With ``select_block >= 64`` the rule always gives 128.

No host synchronisation and no ``spattn.compile`` per call: the Layout equals
``spattn.compile(BlockLayout(chosen) | safeguard, causal=True)`` token for token (``tests/test_hierarchical.py``);
its masks may repeat one (the safeguard's and the causal set are concatenated, not deduplicated) and its
transposed tables are ``NQ`` wide.
"""

from __future__ import annotations

import collections
import threading

import torch

from spattn.hierarchical.common import compressed_nonempty, fixed_weights
from spattn.layout import tables
from spattn.layout.layout import Layout
from spattn.patterns import EMPTY, Full, Hierarchical, compile

_CACHE_SIZE = 16
STATIC_BLOCK = 128  # block size of the static branches (compressed, window): the kernels' 128-query tiles
_cache: collections.OrderedDict[tuple, BranchPlan] = collections.OrderedDict()
_lock = threading.Lock()


def static_block(reach: int, select_block: int) -> int:
    """Block size of a static branch whose rows reach ``reach`` keys back (Note [static block size])."""
    big = max(select_block, STATIC_BLOCK)
    return big if reach >= big - 2 * select_block else select_block


def selection_masks(num_blocks: int, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(available ``[Bs, Hkv|1, NQ, NQ]``: earlier blocks the safeguard does not keep; own: the diagonal
    ``[NQ, NQ]``), the masks of :func:`choose_blocks`."""
    qb = torch.arange(num_blocks, device=kept.device)
    return (qb[None, :] < qb[:, None]) & ~kept, qb[None, :] == qb[:, None]


def _dense_view(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    status, slot = tables.unpack(layout)
    return status, tables.mask_ids(status, slot)


class BranchPlan:
    """The shape-only parts of hierarchical attention for one (config, length, batch, heads, kv_heads, device).

    Attributes:
        compressed: Layout of the compressed branch over ``L`` zero-padded compressed keys (None when the
            sequence is shorter than one compressed block); window: the window branch's Layout.
        overlap: float32 ``[Nc, NS]`` (:meth:`Hierarchical.overlap`); nonempty: bool ``[L]``, queries that see a
            compressed token.
        kept: bool ``[Bs, Hkv|1, NQ, NQ]``, blocks the safeguard keeps for a whole group (outside the budget);
        selection_masks: (available, own) of ``choose_blocks``.
    """

    def __init__(self, config: Hierarchical, length: int, batch: int, heads: int, kv_heads: int,
                 device: torch.device) -> None:
        self.config, self.length, self.batch, self.heads, self.kv_heads = config, length, batch, heads, kv_heads
        self.device = device
        L, sb = length, config.select_block
        self.num_blocks = NQ = -(-L // sb)
        nc = config.num_compressed(L)
        self.compressed = compile(config.compressed_pattern(), L, L, block_size=static_block(nc, sb),
                                  device=device) if nc else None
        self.window = compile(config.window_pattern(), L, L, causal=True, block_size=static_block(config.window, sb),
                              device=device)
        self.overlap = config.overlap(L, device)
        self.nonempty = compressed_nonempty(config, L, device)
        G = heads // kv_heads
        base = compile(Full(), L, L, causal=True, block_size=sb, device=device)
        dyn_status, dyn_mids = _dense_view(base)  # [1, 1, NQ, NQ]
        if config.safeguard is None:
            self.kept = torch.zeros(1, 1, NQ, NQ, dtype=torch.bool, device=device)
            self.static_status = self.static_mids = None
            masks, full_width, part_width = [], 0, 0
            self.per_head = False
        else:
            static = compile(config.safeguard, L, L, causal=True, block_size=sb, batch=batch, heads=heads,
                             device=device)
            status, mids = _dense_view(static)  # [Bs, Hs, NQ, NQ]
            kept = status != EMPTY
            if kept.shape[1] > 1:
                kept = kept.view(kept.shape[0], kv_heads, G, NQ, NQ).all(2)
            self.kept = kept
            self.per_head = status.shape[1] > 1 and G > 1  # a per-head safeguard: merge at the query heads
            self.static_status, self.static_mids = status, mids
            masks = [static.masks]
            full_width, part_width = static.full_kv_indices.shape[-1], static.kv_indices.shape[-1]
        self.selection_masks = selection_masks(NQ, self.kept)
        self._mix_weights: dict[torch.dtype, list[torch.Tensor]] = {}
        offset = sum(m.shape[0] for m in masks)
        self.dyn_status = dyn_status
        self.dyn_mids = torch.where(dyn_mids >= 0, dyn_mids + offset, -1).to(torch.int32)
        self.masks = torch.cat(masks + [base.masks])
        # chosen blocks per row: at most select_count (own block included), full or (diagonal) partial
        self.full_width = min(NQ, full_width + config.select_count)
        self.part_width = min(NQ, part_width + 1)

    def mix_weights(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The fixed gates' weight columns in ``dtype`` (:func:`~spattn.hierarchical.common.fixed_weights`)."""
        if dtype not in self._mix_weights:
            self._mix_weights[dtype] = fixed_weights(self.config, self.length, self.device, dtype)
        return self._mix_weights[dtype]

    def selected(self, chosen: torch.Tensor) -> Layout:
        """The selected branch's Layout (``[B, H]`` tables, or ``[B, 1]`` for MQA) of chosen ``[B, Hkv, NQ, NQ]``
        bool blocks, built on the device without host synchronisation."""
        Hkv, NQ = chosen.shape[1], self.num_blocks
        G = self.heads // Hkv
        if self.per_head:
            chosen = chosen.repeat_interleave(G, 1)
        status = torch.where(chosen, self.dyn_status, torch.zeros((), dtype=torch.int8, device=chosen.device))
        mids = torch.where(chosen, self.dyn_mids, -1)
        if self.static_status is not None:
            take = status != EMPTY
            status = torch.where(take, status, self.static_status)
            mids = torch.where(take, mids, self.static_mids)
        packed = tables.pack(status, mids, self.masks, width=NQ)
        for name, width in (("kv_indices", self.part_width), ("kv_mask_ids", self.part_width),
                            ("full_kv_indices", self.full_width)):
            packed[name] = packed[name][..., :width].contiguous()
        if status.shape[1] != self.heads and status.shape[1] > 1:  # GQA: one selection per group
            packed = {name: t if name == "masks" else t.repeat_interleave(G, 1) for name, t in packed.items()}
        return Layout(q_len=self.length, kv_len=self.length, block_size=self.config.select_block, causal=True,
                      info={"pattern": "hierarchical selected branch"}, **packed)


def branch_plan(config: Hierarchical, length: int, batch: int, heads: int, kv_heads: int,
                device: torch.device | str) -> BranchPlan:
    """The cached :class:`BranchPlan` (the last 16 shapes are kept)."""
    device = torch.device(device)
    key = (config, length, batch, heads, kv_heads, str(device))
    with _lock:
        plan = _cache.get(key)
        if plan is not None:
            _cache.move_to_end(key)
            return plan
    plan = BranchPlan(config, length, batch, heads, kv_heads, device)
    with _lock:
        _cache[key] = plan
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return plan


__all__ = ["BranchPlan", "branch_plan", "selection_masks", "static_block"]
