"""Hierarchical (NSA-style) sparse attention: compressed, selected and sliding-window branches mixed by gates.

The pattern is :class:`spattn.Hierarchical` (``spattn.patterns.hierarchical``); this package runs it:

* :func:`hierarchical_attention`: the fast path, every branch ``spattn.attention`` on a Layout;
* :func:`reference`: dense masks per branch (CPU, autograd; the oracle of the fast path);
* :class:`HierarchicalAttention`: the parametrised pattern of ``spattn.nn.SparseAttention`` (learned gates and
  pooling);
* :func:`cost`: tokens per decode step, prefill FLOPs and bytes; :func:`coverage`: recall against dense;
* :func:`cost_at`, :func:`fit_budget`, :func:`describe`: the keys-per-query view of ``spattn report`` and the
  planner (``spattn.hierarchical.budget``).
"""

from spattn.hierarchical.attention import branch_layouts, hierarchical_attention
from spattn.hierarchical.budget import FROZEN_GATES, LayerView, cost_at, describe, fit_budget
from spattn.hierarchical.cost import cost, decode_tokens, prefill_pairs
from spattn.hierarchical.measure import coverage, fine_layout
from spattn.hierarchical.module import HierarchicalAttention
from spattn.hierarchical.reference import reference
from spattn.hierarchical.scores import selection_scores

__all__ = ["FROZEN_GATES", "HierarchicalAttention", "LayerView", "branch_layouts", "cost", "cost_at", "coverage",
           "decode_tokens", "describe", "fine_layout", "fit_budget", "hierarchical_attention", "prefill_pairs",
           "reference", "selection_scores"]
