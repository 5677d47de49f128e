"""Hierarchical attention at a budget: its exact cost at a length, sized like the other families, and the
uniform view that ``spattn report`` and the planner take of it.

The report and the planner count a candidate's cost as **keys per query** against dense causal attention
(kept (query, key) pairs / ``L (L + 1) / 2``). A hierarchical query reads three sets, each loaded by its own
kernel, so its keys per query are the sum of

* the compressed tokens it sees (each one a key/value load, of a pooled token),
* the selected branch's keys (its own block up to itself, the ``select_count - 1`` chosen earlier blocks and
  the safeguard's keys),
* the window's keys,

overlaps counted twice (the same convention as ``benchmarks/train_from_scratch.py``'s equal budgets). The count
is exact and does not depend on the input: every query block chooses ``min(select_count - 1, available)``
whole earlier blocks, whichever they are (:func:`cost_at` builds the selected Layout from an arbitrary valid
choice and counts it).

* :func:`cost_at`: keys per query per branch, ``keys_fraction``, ``block_fraction``, forward FLOPs (token and
  block level) and the dense FLOPs, at one length.
* :func:`fit_budget`: the ``Hierarchical`` whose keys per query are the largest within a budget
  (``compress_stride`` and ``window`` take fixed shares, ``select_count`` the rest).
* :func:`describe`: one frozen-model layer's ``(query, key)`` -> the Layout of the keys read at full resolution
  (for recall, reach and the block picture: :func:`~spattn.hierarchical.measure.fine_layout`) with the
  cost of :func:`cost_at`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

import torch

from spattn.layout import Layout
from spattn.patterns import Full, Hierarchical, Sinks, Window, compile

FROZEN_GATES = (0.0, 1.0, 0.0)  # Note [frozen-model gates]
COMPRESS_SHARE = 0.25  # of the keys per query, at most, for the compressed tokens (fit_budget)
WINDOW_SHARE = 0.25  # of the keys per query for the local window (fit_budget; the report's local share too)

# Note [frozen-model gates]: a frozen model's heads were trained on one softmax over their keys; a fixed mix of
# separately normalised branches is not that softmax. On SmolLM2-135M (benchmarks/hierarchical_frozen.py,
# benchmarks/results/cpu/hierarchical/frozen_smollm2.json) mixing the three branches with fixed gates, (0, 1, 1)
# or (1, 1, 1), costs far more perplexity than the same keys per query spent on one softmax. So the frozen form
# (fit_budget(frozen=True), the report's and the planner's) is Hierarchical(..., window=1, gates=(0, 1, 0)) |
# Sinks(s) | Window(w - 1): the compressed branch (mean-pooled keys) only chooses the selected blocks; sinks, local
# window, own block and chosen blocks share one softmax (the selected branch, whose safeguard holds the sinks and
# the window, so the chosen blocks are beyond them). Trained models learn their gates (HierarchicalAttention).

# Note [chosen blocks are whole]: a chosen block lies strictly before its query block and is not kept by the
# safeguard, so it adds all of its select_block keys to each query of the query block, overlapping nothing else
# in the selected branch; a query block chooses min(select_count - 1, available) of them. fit_budget counts
# select_count = 1 exactly (cost_at) and adds the chosen blocks this way (tests: equal to cost_at).


def _check_length(length) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")


def _visited_pairs(layout: Layout) -> float:
    """Mean (query, key) pairs a block kernel computes per head (visited blocks times their area)."""
    return layout.flops(1, batch=1, heads=1, level="block") / 4.0


def _branch_layouts(config: Hierarchical, length: int, heads: int, device) -> dict[str, Layout | None]:
    """The three branch Layouts at ``length`` with an arbitrary valid selection (the counts do not depend on
    which blocks are chosen)."""
    from spattn.hierarchical.attention import choose_blocks
    from spattn.hierarchical.plan import branch_plan

    plan = branch_plan(config, length, 1, heads, 1 if config.safeguard is None else heads, device)
    NQ = plan.num_blocks
    zeros = torch.zeros(1, plan.kept.shape[1], NQ, NQ, device=device)
    chosen = choose_blocks(zeros, config, plan.kept, masks=plan.selection_masks)
    return {"compressed": plan.compressed, "selected": plan.selected(chosen), "window": plan.window}


def cost_at(config: Hierarchical, length: int, *, head_dim: int = 64, heads: int = 1, block_size: int = 64,
            device: str | torch.device = "cpu") -> dict[str, float | dict[str, float]]:
    """The cost of ``config`` on a causal self-attention of ``length`` tokens, in the report's and the planner's
    terms (per query head, exact; the safeguard included).

    Args:
        config: a :class:`spattn.Hierarchical`.
        length: tokens ``L``.
        head_dim: ``D`` of the FLOP counts (default 64). heads: query heads ``H`` of the FLOP counts (default 1;
            a per-head safeguard is counted per head and averaged).
        block_size: the block size of ``block_fraction``'s dense denominator (default 64, the report's).

    Returns a dict: ``keys_per_query`` (``compressed`` / ``selected`` / ``window`` / ``total``: mean over the
    queries; branches load separately, so overlaps count twice), ``keys_fraction`` (total / ``(L + 1) / 2``,
    the dense causal keys per query), ``block_fraction`` (pairs the branches' block kernels compute over those
    of dense causal attention at ``block_size``), ``attention_flops`` (forward, ``H`` heads: ``4 D`` per pair
    plus ``2 D`` per compressed pair for the selection scores), ``attention_flops_block`` (the same at block
    level) and ``dense_attention_flops``.

    Example:
        >>> c = cost_at(Hierarchical(select_count=4, window=128), 4096, head_dim=64, heads=9)
        >>> round(c["keys_per_query"]["total"])
        471
    """
    if not isinstance(config, Hierarchical):
        raise TypeError(f"config must be a spattn.Hierarchical, got {type(config).__name__}")
    _check_length(length)
    for name, value in (("head_dim", head_dim), ("heads", heads), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return copy.deepcopy(_cost_at(config, length, head_dim, heads, block_size, str(torch.device(device))))


@functools.lru_cache(maxsize=256)
def _cost_at(config: Hierarchical, length: int, head_dim: int, heads: int, block_size: int, device: str) -> dict:
    layouts = _branch_layouts(config, length, heads, device)
    pairs = {name: 0.0 if lay is None else float(lay.allowed_pairs().mean()) for name, lay in layouts.items()}
    visited = {name: 0.0 if lay is None else _visited_pairs(lay) for name, lay in layouts.items()}
    keys = {name: p / length for name, p in pairs.items()}
    keys["total"] = sum(keys.values())
    dense_pairs = length * (length + 1) / 2
    dense_visited = _visited_pairs(compile(Full(), length, length, causal=True, block_size=block_size))
    flops = heads * (4 * head_dim * sum(pairs.values()) + 2 * head_dim * pairs["compressed"])
    flops_block = heads * (4 * head_dim * sum(visited.values()) + 2 * head_dim * visited["compressed"])
    return {"length": length, "keys_per_query": keys, "keys_fraction": keys["total"] / ((length + 1) / 2),
            "block_fraction": sum(visited.values()) / dense_visited, "attention_flops": float(flops),
            "attention_flops_block": float(flops_block),
            "dense_attention_flops": float(heads * 4 * head_dim * dense_pairs)}


def _power_of_two_at_least(x: float, lo: int) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(1.0, x)))))


def fit_budget(keys_per_query: float, length: int, *, block_size: int = 64, sinks: int = 4,
               window_share: float = WINDOW_SHARE, frozen: bool = True) -> Hierarchical | None:
    """The :class:`spattn.Hierarchical` with the most keys per query (:func:`cost_at`) within
    ``keys_per_query`` at ``length`` tokens, or None when not even one chosen block of 16 tokens fits.

    The sizing (NSA's proportions, scaled to the budget):

    * ``compress_stride``: the smallest power of two >= 16 whose compressed tokens take at most
      :data:`COMPRESS_SHARE` of the budget; ``compress_block = 2 * compress_stride``;
    * a local window of ``window_share`` of the budget (at least 1 key);
    * ``select_block``: ``block_size`` (a power of two >= 16), halved (down to 16) until the own block and one
      chosen block fit the rest (None when not even at 16: a Hierarchical that selects nothing is a local
      pattern, not this family);
    * ``select_count``: the largest that fits (at least 2: the own block and one chosen block);
    * ``Sinks(sinks)`` (0: none).

    ``frozen`` (default True; Note [frozen-model gates]): the form for a frozen model, ``Hierarchical(...,
    window=1, gates=FROZEN_GATES) | Sinks(sinks) | Window(w - 1)``: the compressed branch chooses the blocks
    and the fine keys (sinks, window, chosen blocks) share one softmax. ``frozen=False``: the trainable form,
    ``Hierarchical(..., window=w, gates=None) | Sinks(sinks)`` (learned gates in ``HierarchicalAttention``).

    Example:
        >>> fit_budget(0.25 * 1025 / 2, 1024)  # doctest: +ELLIPSIS
        Hierarchical(compress_block=32, compress_stride=16, select_block=64, select_count=2, window=1, ...)
    """
    _check_length(length)
    if not (isinstance(keys_per_query, (int, float)) and not isinstance(keys_per_query, bool)
            and math.isfinite(keys_per_query) and keys_per_query > 0):
        raise ValueError(f"keys_per_query must be a positive number, got {keys_per_query!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or \
            block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (the selected branch's triton blocks), "
                         f"got {block_size!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    if not 0.0 <= window_share < 1.0:
        raise ValueError(f"window_share must be in [0, 1), got {window_share!r}")
    from spattn.hierarchical.attention import kept_blocks
    from spattn.hierarchical.plan import selection_masks

    K = float(keys_per_query)
    # compressed tokens per query, mean over queries, ~ (L / 2 - block) / stride: the stride that fits its share
    stride = _power_of_two_at_least(length / 2 / max(1e-9, COMPRESS_SHARE * K), 16)
    stride = min(stride, _power_of_two_at_least(length, 16))
    win = max(1, int(window_share * K))
    guards = ([Sinks(sinks)] if sinks else []) + ([Window(win - 1)] if frozen and win > 1 else [])
    safeguard = None if not guards else guards[0] if len(guards) == 1 else guards[0] | guards[1]

    def build(select_block: int, count: int) -> Hierarchical:
        return Hierarchical(compress_block=2 * stride, compress_stride=stride, select_block=select_block,
                            select_count=count, window=1 if frozen else win,
                            gates=FROZEN_GATES if frozen else None, safeguard=safeguard)

    for select_block in (b for b in (block_size >> i for i in range(8)) if b >= 16):
        # one exact count at select_count = 1; each further chosen block adds select_block keys to every query
        # of a query block that still has an available block (Note [chosen blocks are whole])
        base = cost_at(build(select_block, 1), length)["keys_per_query"]["total"]
        kept = kept_blocks(build(select_block, 1), length, 1, 1, 1, "cpu")[0, 0]
        available = selection_masks(kept.shape[-1], kept)[0].sum(-1).double()  # [NQ]
        rows = torch.full_like(available, select_block)
        rows[-1] = length - select_block * (kept.shape[-1] - 1)

        extra = rows * select_block  # keys one chosen block adds to each query block

        def total(count: int, base=base, extra=extra, available=available) -> float:
            return base + float((extra * available.clamp(max=count - 1)).sum()) / length

        if total(2) > K:
            continue  # the own block and one chosen block do not fit: try smaller blocks
        lo, hi = 2, max(2, kept.shape[-1])
        while lo < hi:  # cost nondecreasing in select_count
            mid = (lo + hi + 1) // 2
            if total(mid) <= K:
                lo = mid
            else:
                hi = mid - 1
        return build(select_block, lo)
    return None


@dataclasses.dataclass
class LayerView:
    """One layer of a frozen model under a ``Hierarchical`` config, as the report and the planner count it.

    Attributes:
        layout: the keys read at full resolution (selected blocks | safeguard | window), causal, ``[1, H]``
            tables: its dense mass is the recall; the compressed branch reads summaries and is not counted.
        cost: :func:`cost_at` at this length (the same for every input).
        chosen: bool ``[1, Hkv, NQ, NQ]``, the selected blocks.
    """

    layout: Layout
    cost: dict
    chosen: torch.Tensor


def describe(query: torch.Tensor, key: torch.Tensor, config: Hierarchical, *, block_size: int = 64,
             scale: float | None = None) -> LayerView:
    """The :class:`LayerView` of one layer: query ``[1, H, L, D]``, key ``[1, Hkv, L, D]`` (after rotary, as
    ``spattn.integrations.capture`` records them), causal self-attention."""
    from spattn.hierarchical.measure import fine_layout_and_chosen

    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be [B, H, L, D], got {tuple(query.shape)} and {tuple(key.shape)}")
    layout, chosen = fine_layout_and_chosen(query, key, config, scale=scale)
    return LayerView(layout, cost_at(config, query.shape[2], head_dim=query.shape[3], heads=query.shape[1],
                                     block_size=block_size, device=query.device), chosen)


__all__ = ["COMPRESS_SHARE", "FROZEN_GATES", "WINDOW_SHARE", "LayerView", "cost_at", "describe", "fit_budget"]
