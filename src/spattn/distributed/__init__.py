"""Sparse attention across ranks on ``torch.distributed``: head-parallel (Ulysses all-to-all) and
context-parallel (local queries, only the visited key blocks move), the sharding and load balancer they
share, a byte-exact communication count, a cost model and a many-rank simulation.

    >>> import torch.distributed as dist, spattn
    >>> from spattn.distributed import Sharding, context_parallel_attention, head_parallel_attention
    >>> s = Sharding.balanced(spattn.Sinks(64) | spattn.Window(1024), L, world_size=W, causal=True)  # doctest: +SKIP
    >>> out = context_parallel_attention(s.shard(q, r), s.shard(k, r), s.shard(v, r), pattern, sharding=s,
    ...                                  causal=True)  # doctest: +SKIP

See ``docs/distributed.md``.
"""

from spattn.distributed.apply import plan, set_sharding
from spattn.distributed.comm import Traffic, count_bytes
from spattn.distributed.context_parallel import context_parallel_attention
from spattn.distributed.cost import layer_bytes, simulate
from spattn.distributed.head_parallel import head_parallel_attention
from spattn.distributed.sharding import Sharding, balance, shard, unshard, visited_blocks

__all__ = [
    "Traffic", "count_bytes", "context_parallel_attention", "head_parallel_attention", "layer_bytes", "simulate",
    "plan", "set_sharding", "Sharding", "balance", "shard", "unshard", "visited_blocks",
]
