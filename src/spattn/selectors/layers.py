"""``layer_budgets``: one key budget shared by the layers of a model, split by the selection's own estimates.

``Adaptive(selector, keys)`` spends ``keys`` per query over the heads and query cells of *one* layer. Layers
differ as much as heads do (on SmolLM2-135M a sinks + window keeps 98% of the mass in layer 16 and 70% in layer
9 at the same keys), but a patched model runs its layers one after another, so a layer cannot see what the
others would gain. ``layer_budgets`` takes the queries and keys of every layer on a calibration input
(``spattn.capture``), runs ``Adaptive``'s estimate (missing mass and cost per cell) for each, and spends one
budget of ``keys x layers`` per query greedily over all cells of all layers by estimated missing mass per key
(the knapsack of :func:`spattn.selectors.top_keys` across layers). Each layer's share is its keys per query:
``{layer: keys}`` for a :class:`~spattn.Plan` of ``Adaptive`` patterns whose mean over the layers is the budget.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from spattn.patterns.base import Context
from spattn.selectors import budget as _budget
from spattn.selectors.patterns import Adaptive


def layer_budgets(pattern: Adaptive, queries: Mapping[int, torch.Tensor], keys: Mapping[int, torch.Tensor], *,
                  causal: bool = True, block_size: int = 128, min_keys: int | None = None) -> dict[int, int]:
    """Keys per query for each layer, ``pattern.keys`` on average over the layers.

    Args:
        pattern: the :class:`Adaptive` pattern every layer runs (its selector, sinks, window, cells, sharing).
        queries, keys: per layer ``[B, H, Lq, D]`` / ``[B, Hkv, Lk, D]`` of a calibration input (same shapes in
            every layer), e.g. ``spattn.capture(model, ids).queries`` and ``.keys``.
        causal, block_size: as the model runs them (``block_size`` only sets the kernel blocks the cells
            divide; the split does not depend on it).
        min_keys: the fewest keys a layer gets (default: its own sinks and window, which it always keeps).

    Returns:
        ``{layer: keys}`` (ints; the mean is ``pattern.keys`` within one selection cell, sinks and window
        included). ``dataclasses.replace(pattern, keys=k)`` per layer gives the plan.

    Example:
        >>> cap = spattn.capture(model, ids)  # doctest: +SKIP
        >>> pattern = Adaptive("probe", 492, sinks=64, window=64, block=32)
        >>> split = layer_budgets(pattern, cap.queries, cap.keys)  # doctest: +SKIP
        >>> layers = {i: dataclasses.replace(pattern, keys=k) for i, k in split.items()}  # doctest: +SKIP
        >>> plan = spattn.Plan(layers=layers)  # doctest: +SKIP
    """
    if not isinstance(pattern, Adaptive):
        raise TypeError(f"pattern must be an Adaptive pattern, got {type(pattern).__name__}")
    layers = sorted(queries)
    if not layers or sorted(keys) != layers:
        raise ValueError(f"queries and keys must hold the same, non-empty set of layers; got {sorted(queries)} and "
                         f"{sorted(keys)}")
    shapes = {(tuple(queries[i].shape), tuple(keys[i].shape)) for i in layers}
    if len(shapes) != 1:
        raise ValueError(f"every layer must have the same query/key shapes, got {sorted(shapes)}")
    if min_keys is not None and (isinstance(min_keys, bool) or not isinstance(min_keys, int) or min_keys < 0):
        raise ValueError(f"min_keys must be None or an int >= 0, got {min_keys!r}")
    q0, k0 = queries[layers[0]], keys[layers[0]]
    Lq, Lk = q0.shape[2], k0.shape[2]
    dev = q0.device
    gains, available, costs = [], [], []
    local = None
    for layer in layers:
        ctx = Context(Lq, Lk, block_size, dev, causal, q0.shape[0], q0.shape[1], queries[layer], keys[layer])
        est = pattern.estimate(ctx)
        gains.append(est.gain.float())
        available.append(est.available.expand(est.gain.shape))
        costs.append(est.cost.float().expand(est.gain.shape))
        if local is None:
            local = pattern.own_pairs(ctx)
    heads = gains[0].shape[1]
    with torch.no_grad():
        pairs = (torch.tensor(float(pattern.keys * Lq), device=dev) - local).clamp_min(0)  # per head, every layer
        chosen = _budget.top_keys(torch.cat(gains, 1), torch.cat(available, 1), torch.cat(costs, 1), pairs)
        spent = (torch.cat(costs, 1) * chosen).sum((-1, -2)).mean(0)  # [layers * Hs] new pairs per head
        per_layer = spent.view(len(layers), heads).mean(1) / Lq + local / Lq  # keys per query
    floor = float(local) / Lq if min_keys is None else float(min_keys)
    return {layer: max(int(round(float(v))), int(round(floor))) for layer, v in zip(layers, per_layer, strict=True)}


__all__ = ["layer_budgets"]
