"""Which query rows each rank holds: ``Sharding`` (a permutation of query blocks), the load balancer, and
``shard`` / ``unshard``.

A sequence of ``L`` tokens is cut into ``NQ = ceil(L / block_size)`` blocks (the layout's blocks; the last
may be short). A :class:`Sharding` gives each rank a set of whole blocks, held in ascending order: rank
``r``'s local tensor is the concatenation of its blocks' tokens, so its last local block is short only when it
holds the global last block. Queries, keys and values of self-attention are sharded the same way.

The balancer (:func:`balance`) spreads the work of a layout, the visited (full + partial) key blocks of each
query block summed over batch and heads, over the ranks, and keeps runs of consecutive blocks together as far
as balance allows: runs are dealt longest-processing-time-first onto the least loaded rank with room (the
scheduling view torch's PTRR balancer takes for BlockMasks, which deals single blocks). A window is balanced
by a contiguous split, so context parallelism exchanges only neighbouring blocks; causal dense needs
head-tail pairs; documents of mixed lengths need finer runs.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Sequence

import torch

from spattn.layout import Layout
from spattn.patterns.base import Pattern
from spattn.patterns.compile import compile as compile_pattern


def visited_blocks(layout: Layout) -> torch.Tensor:
    """int64 ``[NQ]``: key blocks visited (full + partial) by each query block, summed over the layout's batch
    and heads (the work a block-sparse kernel does for that query block)."""
    return (layout.kv_num_blocks.long() + layout.full_kv_num_blocks.long()).sum((0, 1)).cpu()


def _deal(costs: list[float], world_size: int) -> list[list[int]]:
    """Longest-processing-time-first: each item to the least loaded rank with room (equal item counts)."""
    base, extra = divmod(len(costs), world_size)
    room = [base + (1 if r < extra else 0) for r in range(world_size)]
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    heap = [(0.0, r) for r in range(world_size)]  # (load, rank)
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        load, r = heapq.heappop(heap)
        owned[r].append(i)
        room[r] -= 1
        if room[r]:
            heapq.heappush(heap, (load + costs[i], r))
    return owned


def balance(
    costs: torch.Tensor | Sequence[float], world_size: int, *, tolerance: float = 1.1,
) -> tuple[tuple[int, ...], ...]:
    """Assign query blocks to ranks so that every rank does about the same work, keeping shards contiguous
    where that already balances (so that banded patterns exchange only neighbouring blocks).

    The blocks are cut into ``K`` runs of consecutive blocks, ``K = W, 2W, 4W, ...`` up to one block per run,
    and the runs are dealt longest-first onto the least loaded rank with room (``K / W`` runs each: ``K = W``
    is a contiguous split, ``K = 2W`` pairs early and late runs as the head-tail balancer does for causal
    masks). The coarsest cut whose max / mean per-rank work is within ``tolerance`` (default 1.1) wins (else the most
    balanced one).

    Args:
        costs: ``[NQ]`` work of each query block (e.g. :func:`visited_blocks`).
        world_size: ranks ``W`` (``1 <= W <= NQ``).
        tolerance: accepted max / mean per-rank work.

    Returns:
        Per rank, its blocks in ascending order.
    """
    values = torch.as_tensor(costs, dtype=torch.float64).flatten().tolist()
    NQ = len(values)
    _check_world(world_size, NQ)
    best, best_ratio = None, math.inf
    K = world_size
    while True:
        K = min(K, NQ)
        bounds = [NQ * i // K for i in range(K + 1)]
        runs = [list(range(bounds[i], bounds[i + 1])) for i in range(K)]
        owned = _deal([sum(values[b] for b in run) for run in runs], world_size)
        blocks = [sorted(b for i in rank for b in runs[i]) for rank in owned]
        loads = [sum(values[b] for b in rank) for rank in blocks]
        mean = sum(loads) / world_size
        ratio = max(loads) / mean if mean > 0 else 1.0
        if ratio < best_ratio - 1e-12:
            best, best_ratio = blocks, ratio
        if ratio <= tolerance or K == NQ:
            break
        K *= 2
    return tuple(tuple(b) for b in best)


def _check_world(world_size: int, num_blocks: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if world_size > num_blocks:
        raise ValueError(f"world_size ({world_size}) must be <= the number of blocks ({num_blocks}): every rank "
                         "needs at least one block; use a smaller block_size or fewer ranks")


@dataclasses.dataclass(frozen=True)
class Sharding:
    """The query blocks each rank holds (ascending), for a sequence of ``seq_len`` tokens.

    Build one with :meth:`contiguous`, :meth:`balanced` or from :func:`balance`'s output.

    Example:
        >>> s = Sharding.balanced(spattn.Sinks(64) | spattn.Window(512), 4096, world_size=4, causal=True)
        >>> local_q = s.shard(q, rank)          # [B, H, L_r, D]
        >>> s.unshard([out_0, out_1, out_2, out_3])   # [B, H, L, D]  (or spattn.distributed.unshard)
    """

    seq_len: int
    block_size: int
    blocks: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {self.seq_len!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}")
        blocks = tuple(tuple(sorted(int(b) for b in rank)) for rank in self.blocks)
        NQ = -(-self.seq_len // self.block_size)
        flat = sorted(b for rank in blocks for b in rank)
        if flat != list(range(NQ)):
            raise ValueError(f"blocks must assign each of the {NQ} blocks to exactly one rank")
        if any(not rank for rank in blocks):
            raise ValueError("every rank must hold at least one block")
        object.__setattr__(self, "blocks", blocks)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def contiguous(cls, seq_len: int, world_size: int, *, block_size: int = 128) -> Sharding:
        """Rank ``r`` holds the ``r``-th run of consecutive blocks (no balancing)."""
        NQ = -(-seq_len // block_size)
        _check_world(world_size, NQ)
        base, extra = divmod(NQ, world_size)
        out, start = [], 0
        for r in range(world_size):
            n = base + (1 if r < extra else 0)
            out.append(tuple(range(start, start + n)))
            start += n
        return cls(seq_len, block_size, tuple(out))

    @classmethod
    def balanced(
        cls, layout_or_pattern: Layout | Pattern, seq_len: int | None = None, *, world_size: int,
        causal: bool = False, block_size: int = 128,
    ) -> Sharding:
        """Balance the visited blocks of a Layout (any: static, or a dynamic one compiled on a sample) or of a
        static Pattern compiled for ``seq_len`` (self-attention). For a dynamic Pattern, whose selection is not
        known before the input, the static parts are not separated out: it balances the blocks a causal (or
        full) layout visits, the most a selection can pick."""
        if isinstance(layout_or_pattern, Layout):
            layout = layout_or_pattern
            if layout.q_len != layout.kv_len:
                raise ValueError("balanced: the layout must be for self-attention (q_len == kv_len)")
            return cls(layout.q_len, layout.block_size, balance(visited_blocks(layout), world_size))
        if not isinstance(layout_or_pattern, Pattern):
            raise TypeError(f"layout_or_pattern must be a Layout or a Pattern, got {type(layout_or_pattern).__name__}")
        if seq_len is None:
            raise ValueError("balanced: seq_len is needed with a Pattern")
        pattern = layout_or_pattern
        if pattern.contains_dynamic():
            from spattn.patterns.builtin import Full

            pattern = Full()
        layout = compile_pattern(pattern, seq_len, seq_len, causal=causal, block_size=block_size)
        return cls(seq_len, block_size, balance(visited_blocks(layout), world_size))

    # ------------------------------------------------------------------ facts
    @property
    def world_size(self) -> int:
        return len(self.blocks)

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    def block_length(self, block: int) -> int:
        return min(self.block_size, self.seq_len - block * self.block_size)

    def local_length(self, rank: int) -> int:
        """Tokens rank ``rank`` holds."""
        return sum(self.block_length(b) for b in self.blocks[self._rank(rank)])

    def lengths(self) -> list[int]:
        return [self.local_length(r) for r in range(self.world_size)]

    def owner(self) -> torch.Tensor:
        """int64 ``[NQ]``: the rank holding each block."""
        out = torch.empty(self.num_blocks, dtype=torch.long)
        for r, blocks in enumerate(self.blocks):
            out[list(blocks)] = r
        return out

    def positions(self, rank: int) -> torch.Tensor:
        """int64 ``[L_r]``: the global token positions of rank ``rank``'s local rows, ascending."""
        bs = self.block_size
        parts = [torch.arange(b * bs, b * bs + self.block_length(b)) for b in self.blocks[self._rank(rank)]]
        return torch.cat(parts)

    def permutation(self) -> torch.Tensor:
        """int64 ``[L]``: global positions of the rank-major concatenation of all local rows
        (``global[..., permutation] == cat(locals)``)."""
        return torch.cat([self.positions(r) for r in range(self.world_size)])

    def work(self, layout: Layout) -> torch.Tensor:
        """float64 ``[W]``: visited blocks per rank under ``layout`` (max / mean is the imbalance)."""
        costs = visited_blocks(layout).double()
        return torch.stack([costs[list(b)].sum() for b in self.blocks])

    def _rank(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, {self.world_size}), got {rank!r}")
        return rank

    # ------------------------------------------------------------------ moving tensors
    def shard(self, tensor: torch.Tensor, rank: int, *, dim: int = 2) -> torch.Tensor:
        """Rank ``rank``'s rows of a full-sequence tensor (``[B, H, L, D]`` with ``dim=2``; ``[B, L]`` ids with
        ``dim=1``)."""
        if tensor.shape[dim] != self.seq_len:
            raise ValueError(f"tensor has length {tensor.shape[dim]} along dim {dim}, expected seq_len={self.seq_len}")
        return tensor.index_select(dim, self.positions(rank).to(tensor.device))

    def unshard(self, shards: Sequence[torch.Tensor], *, dim: int = 2) -> torch.Tensor:
        """The full-sequence tensor from every rank's local tensor (in rank order); inverse of :meth:`shard`."""
        if len(shards) != self.world_size:
            raise ValueError(f"expected {self.world_size} shards (one per rank), got {len(shards)}")
        for r, t in enumerate(shards):
            if t.shape[dim] != self.local_length(r):
                raise ValueError(f"shard {r} has length {t.shape[dim]} along dim {dim}, "
                                 f"expected {self.local_length(r)}")
        cat = torch.cat(list(shards), dim)
        inverse = torch.argsort(self.permutation()).to(cat.device)
        return cat.index_select(dim, inverse)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {"seq_len": self.seq_len, "block_size": self.block_size, "blocks": [list(b) for b in self.blocks]}


def shard(tensor: torch.Tensor, sharding: Sharding, *, rank: int | None = None, dim: int = 2) -> torch.Tensor:
    """This rank's rows of a full-sequence tensor (``rank`` defaults to ``torch.distributed.get_rank()``)."""
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank()
    return sharding.shard(tensor, rank, dim=dim)


def unshard(local: torch.Tensor, sharding: Sharding, *, group=None, dim: int = 2) -> torch.Tensor:
    """Collective: every rank's local tensor -> the full-sequence tensor on every rank (all-gather, padded to
    the longest shard, then the inverse permutation). Differentiable."""
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as funcol

    from spattn.distributed.comm import resolve_group

    group = resolve_group(group)
    rank = dist.get_rank(group)
    if local.shape[dim] != sharding.local_length(rank):
        raise ValueError(f"local tensor has length {local.shape[dim]} along dim {dim}, rank {rank} holds "
                         f"{sharding.local_length(rank)}")
    longest = max(sharding.lengths())
    moved = local.movedim(dim, 0)
    padded = torch.nn.functional.pad(moved, (0, 0) * (moved.dim() - 1) + (0, longest - moved.shape[0]))
    gathered = funcol.wait_tensor(funcol.all_gather_single_autograd(padded.contiguous(), 0, group))
    pieces = [gathered[r * longest: r * longest + n] for r, n in enumerate(sharding.lengths())]
    return sharding.unshard([p.movedim(0, dim) for p in pieces], dim=dim)
