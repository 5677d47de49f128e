"""The one adapter around torch's private context-parallel pieces (``torch.distributed.tensor.experimental.
_context_parallel``, present in torch 2.13; they are ``_``-prefixed and have moved before, so nothing else in
spattn imports them).

* :func:`ptrr_sharding`: torch's PTRR load balancer (``_PTRRLoadBalancer.ptrr_scheduling``) on a layout's
  visited blocks, as a spattn :class:`~spattn.distributed.Sharding` (to compare with spattn's balancer);
* :func:`flex_context_parallel_attention`: torch's own FlexAttention context parallelism — the
  ``_ContextParallel(FLEX)`` style all-gathers K/V with ``flex_cp_allgather`` (backward: reduce-scatter) and
  ``flex_attention`` runs on the local rows — with the BlockMask of this rank's rows cut from the spattn
  layout (torch's ``_create_cp_block_mask`` re-traces a ``mask_mod`` instead). The baseline for the
  multi-GPU benchmark. FlexAttention's backward needs a GPU.
"""

from __future__ import annotations

import torch

from spattn.distributed.context_parallel import row_tables, rows_layout
from spattn.distributed.sharding import Sharding, visited_blocks
from spattn.layout import Layout
from spattn.patterns.base import Pattern
from spattn.patterns.compile import compile as compile_pattern


def _private():
    try:
        from torch.distributed.tensor.experimental._context_parallel import _attention, _load_balancer
    except ImportError as exc:  # pragma: no cover - depends on the torch version
        raise RuntimeError(f"torch {torch.__version__} has no experimental context parallelism "
                           f"(torch.distributed.tensor.experimental._context_parallel): {exc}") from exc
    return _attention, _load_balancer


def ptrr_sharding(layout_or_pattern: Layout | Pattern, seq_len: int | None = None, world_size: int = 1, *,
                  causal: bool = True, block_size: int = 128) -> Sharding:
    """torch's PTRR balancer (sorted by visited blocks, dealt zig-zag) as a Sharding. Needs the number of
    blocks to be a multiple of ``world_size`` (torch's requirement)."""
    _, lb = _private()
    layout = layout_or_pattern
    if isinstance(layout_or_pattern, Pattern):
        if layout_or_pattern.contains_dynamic():
            raise NotImplementedError("torch's context parallelism takes a static BlockMask, not a dynamic pattern")
        layout = compile_pattern(layout_or_pattern, seq_len, seq_len, causal=causal, block_size=block_size)
    groups = lb._PTRRLoadBalancer.ptrr_scheduling(visited_blocks(layout).double(), world_size)
    return Sharding(layout.q_len, layout.block_size, tuple(tuple(g.tolist()) for g in groups))


def local_block_mask(layout: Layout, sharding: Sharding, rank: int):
    """The BlockMask of ``rank``'s rows against keys in rank-concatenation order (what the all-gather gives)."""
    if sharding.seq_len % (sharding.world_size * sharding.block_size):
        raise ValueError(f"torch's FlexAttention context parallelism needs the length ({sharding.seq_len}) to be a "
                         f"multiple of world_size x block_size ({sharding.world_size} x {sharding.block_size})")
    if len({len(b) for b in sharding.blocks}) != 1:
        raise ValueError("torch's FlexAttention context parallelism needs the same number of blocks on every rank")
    status, slot = row_tables(layout, list(sharding.blocks[rank]))
    columns = torch.tensor([b for blocks in sharding.blocks for b in blocks])
    local = rows_layout(status, slot, layout, columns, q_len=sharding.local_length(rank), kv_len=sharding.seq_len)
    return local.to_block_mask()


class _Flex(torch.nn.Module):
    def __init__(self, compiled: bool):
        super().__init__()
        from torch.nn.attention.flex_attention import flex_attention

        self.fn = torch.compile(flex_attention) if compiled else flex_attention

    def forward(self, query, key, value, block_mask=None, scale=None):
        return self.fn(query, key, value, block_mask=block_mask, scale=scale,
                       enable_gqa=key.shape[1] != query.shape[1])


_MODULES: dict = {}


def flex_context_parallel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                    pattern: Pattern | Layout, *, mesh, sharding: Sharding, causal: bool = True,
                                    scale: float | None = None) -> torch.Tensor:
    """torch's FlexAttention context parallelism on this rank's rows ``[B, H, L_r, D]`` (inputs sharded with
    ``sharding``; ``mesh`` a 1-D DeviceMesh). Returns ``[B, H, L_r, D]``."""
    import torch.distributed as dist
    from torch.distributed.tensor.parallel import parallelize_module

    attention_mod, _ = _private()
    if isinstance(pattern, Pattern):
        if pattern.contains_dynamic():
            raise NotImplementedError("torch's context parallelism takes a static BlockMask, not a dynamic pattern")
        layout = compile_pattern(pattern, sharding.seq_len, sharding.seq_len, causal=causal,
                                 block_size=sharding.block_size, device=query.device)
    else:
        layout = pattern.to(query.device)
    key_ = (id(mesh), query.device.type)
    module = _MODULES.get(key_)
    if module is None:
        flex = attention_mod._ContextParallel.AttentionType.FLEX
        style = attention_mod._ContextParallel(seq_dim=2, attention_type=flex)
        module = parallelize_module(_Flex(compiled=query.is_cuda), mesh, style)
        _MODULES[key_] = module
    block_mask = local_block_mask(layout, sharding, dist.get_rank(mesh.get_group()))
    return module(query, key, value, block_mask=block_mask, scale=scale)
