"""Hierarchical (NSA-style) sparse attention: compressed, selected and sliding-window branches mixed by gates.

The pattern is :class:`spattn.Hierarchical` (``spattn.patterns.hierarchical``); this package runs it:

* :func:`hierarchical_attention`: the fast path, every branch ``spattn.attention`` on a Layout;
* :func:`reference`: dense masks per branch (CPU, autograd; the oracle of the fast path);
* :class:`HierarchicalAttention`: the parametrised pattern of ``spattn.nn.SparseAttention`` (learned gates and
  pooling);
* :func:`cost`: tokens per decode step, prefill FLOPs and bytes; :func:`coverage`: recall against dense.
"""

from spattn.hierarchical.attention import branch_layouts, hierarchical_attention
from spattn.hierarchical.cost import cost, decode_tokens, prefill_pairs
from spattn.hierarchical.measure import coverage, fine_layout
from spattn.hierarchical.module import HierarchicalAttention
from spattn.hierarchical.reference import reference
from spattn.hierarchical.scores import selection_scores

__all__ = ["HierarchicalAttention", "branch_layouts", "cost", "coverage", "decode_tokens", "fine_layout",
           "hierarchical_attention", "prefill_pairs", "reference", "selection_scores"]
