"""A plan's recall and cost on chunks it was not planned on: another length, another text.

The plan is taken at the length (:meth:`spattn.Plan.at_length`, so its budget rule holds), each layer's pattern
is compiled for the captured queries and keys, and recall, keys per query and visited tiles are measured per
head, the same way the planner measured its candidates.
"""

from __future__ import annotations

from typing import Any

import torch

from spattn._optional import require
from spattn.integrations.plan import Plan
from spattn.patterns import Full, Hierarchical
from spattn.patterns import compile as compile_pattern
from spattn.planner.calibrate import calibration_chunks, capture_sample
from spattn.planner.score import score_layouts
from spattn.planner.table import dense_tiles

np = require("numpy", extra="planner")


def plan_layouts(plan: Plan, layer: int, query: torch.Tensor, key: torch.Tensor, *, causal: bool,
                 block_size: int) -> Any:
    """The layout layer ``layer`` of ``plan`` runs on ``query [1, H, L, D]`` / ``key [1, Hkv, L, D]``."""
    pattern = plan.pattern_for(layer) or Full()
    L, H = query.shape[2], query.shape[1]
    if isinstance(pattern, Hierarchical):  # Note [hierarchical candidates] in planner/table.py: its fine keys
        from spattn.hierarchical.measure import fine_layout_and_chosen

        return fine_layout_and_chosen(query, key, pattern, block_size=block_size)[0]
    return compile_pattern(pattern, L, L, causal=causal, block_size=block_size, batch=1, heads=H,
                           device=query.device, query=query if pattern.contains_dynamic() else None,
                           key=key if pattern.contains_dynamic() else None)


def validate(
    model: torch.nn.Module,
    plan: Plan,
    text: Any,
    *,
    length: int,
    tokenizer: Any = None,
    samples: int = 2,
    split: str = "held_out",
    block_size: int | None = None,
) -> dict[str, Any]:
    """Recall and cost of ``plan`` (taken at ``length``) on ``samples`` chunks of ``text``.

    Args:
        model, text, tokenizer: as in :func:`spattn.plan` (``text`` may be another corpus: domain shift).
        plan: a planner plan (its rule rescales it to ``length``; a plan without a rule is used as is).
        length: tokens per chunk. samples: chunks. split: which split of the text (default the held-out one).
        block_size: default the plan's (``plan.budget.block_size``), else 64.

    Returns:
        JSON-ready dict: ``length``, ``samples``, ``recall`` (mean), ``recall_p5`` (5th percentile of the
        per-head means), ``per_layer_recall``, ``keys_per_query``, ``tile_fraction`` (of dense), and the
        ``per_head_recall`` ``[layers][heads]``.
    """
    bs = block_size or (plan.budget.block_size if plan.budget is not None else 64)
    at = plan.at_length(length) if plan.budget is not None else plan
    chunks = calibration_chunks(text, tokenizer, length, samples, split=split)
    recall_sum = keys_sum = tiles_sum = None
    dense = None
    for s in range(chunks.shape[0]):
        cap, _ = capture_sample(model, chunks[s : s + 1], values=False)
        if dense is None:
            dense = dense_tiles(length, bs, cap.causal)
            shape = (len(cap.layers), cap.queries[cap.layers[0]].shape[1])
            recall_sum, keys_sum, tiles_sum = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        for li, layer in enumerate(cap.layers):
            q, k = cap.queries[layer], cap.keys[layer]
            lay = plan_layouts(at, layer, q, k, causal=cap.causal, block_size=bs)
            r = score_layouts(q, k, [lay], causal=cap.causal, scale=cap.scale).recall[0, 0].double()
            H = q.shape[1]
            recall_sum[li] += r.mean(-1).numpy()
            keys_sum[li] += (lay.allowed_pairs()[0] / length).expand(H).numpy()
            visited = (lay.kv_num_blocks + lay.full_kv_num_blocks).double().sum(-1)[0]
            tiles_sum[li] += (visited / dense).expand(H).numpy()
    n = chunks.shape[0]
    recall, keys, tiles = recall_sum / n, keys_sum / n, tiles_sum / n
    return {
        "length": length, "samples": n, "split": split,
        "recall": float(recall.mean()), "recall_p5": float(np.percentile(recall, 5)),
        "per_layer_recall": [float(x) for x in recall.mean(1)],
        "keys_per_query": float(keys.mean()), "tile_fraction": float(tiles.mean()),
        "per_head_recall": [[round(float(x), 5) for x in row] for row in recall],
    }
