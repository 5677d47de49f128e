"""Coverage: how much of the dense attention a sparse pattern keeps, and how far information can travel.

* :func:`measure` — recall, KL, top-k overlap and output error per batch, head and query (blockwise, never
  an L x L tensor in memory) -> :class:`CoverageReport`.
* :func:`block_mass` — the dense attention mass pooled to (query block, key block) cells (sum and max).
* :func:`oracle_layout` — the best block choice at a budget or a mass target (an upper bound for selectors).
* :func:`reachability` — exact token-level reachability through a stack of layers -> :class:`Reachability`.
* :mod:`spattn.coverage.plots` — pictures (``pip install 'spattn[viz]'``).

Example:
    >>> import torch, spattn
    >>> q, k = torch.randn(1, 4, 512, 64), torch.randn(1, 4, 512, 64)
    >>> report = spattn.coverage.measure(q, k, spattn.Sinks(16) | spattn.Window(128), causal=True)
    >>> report.summary()["overall"]["recall"]["mean"] <= 1
    True
"""

from spattn.coverage.mass import BlockMass, block_mass, oracle_layout, select_blocks
from spattn.coverage.measure import CoverageReport, measure
from spattn.coverage.reach import Reachability, reachability

__all__ = [
    "BlockMass", "CoverageReport", "Reachability", "block_mass", "measure", "oracle_layout", "reachability",
    "select_blocks",
]
