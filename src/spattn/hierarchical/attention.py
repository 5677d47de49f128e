"""The fast path of hierarchical attention: every branch is ``spattn.attention`` on a Layout, built without host
synchronisation.

* compressed: the pooled keys/values ``[B, Hkv, Nc, D]`` under the :class:`~spattn.CompressedCausal` layout
  (causal by construction; see Note [padded compressed keys]); its call also returns the log-sum-exp;
* selected: the ``chosen`` blocks come from the compressed attention's probabilities, recomputed blockwise from
  that log-sum-exp (:func:`~spattn.hierarchical.scores.selection_scores`: a triton kernel on CUDA, never an
  ``L x Nc`` tensor), ranked by :func:`spattn.selectors.budget.top_k`, and turned into the branch's Layout
  tables on the device (:meth:`~spattn.hierarchical.plan.BranchPlan.selected`: no ``spattn.compile`` per call);
* window: ``Window(window - 1)`` compiled causal.

The static parts (the compressed and window Layouts, the safeguard's blocks) are compiled once per shape and
cached (:func:`~spattn.hierarchical.plan.branch_plan`). A call is a fixed sequence of device work: pooling,
three attention calls, the scores kernel, a sort, the table codec and the mix.

Note [padded compressed keys]: layouts align queries bottom-right and need ``kv_len >= q_len``, so the
``Nc < L`` compressed keys are zero-padded to ``L`` and the layout is compiled for ``(L, L)``. Padding is never
visible: ``t s + b - 1 <= i <= L - 1`` implies ``t < Nc``, so the padded key blocks are EMPTY and no kernel
loads them.

So the triton backend serves all three on the GPU (``backend="auto"``) and the reference backend on the CPU.
"""

from __future__ import annotations

import math

import torch

from spattn.hierarchical.common import check_inputs, compress, mix
from spattn.hierarchical.plan import branch_plan, selection_masks
from spattn.hierarchical.scores import compressed_lse, selection_scores
from spattn.ops.attention import attention
from spattn.patterns import EMPTY, BlockLayout, Hierarchical, Layout, compile
from spattn.selectors.budget import top_k


def kept_blocks(config: Hierarchical, length: int, batch: int, heads: int, kv_heads: int, device) -> torch.Tensor:
    """bool ``[Bs, Hkv|1, NQ, NQ]``: key blocks the safeguard already keeps (whole group), excluded from the
    selection's budget; all False without a safeguard."""
    NQ = -(-length // config.select_block)
    if config.safeguard is None:
        return torch.zeros(1, 1, NQ, NQ, dtype=torch.bool, device=device)
    layout = compile(config.safeguard, length, length, causal=True, block_size=config.select_block, batch=batch,
                     heads=heads, device=device)
    kept = layout.block_status() != EMPTY
    if kept.shape[1] > 1:
        kept = kept.view(kept.shape[0], kv_heads, heads // kv_heads, NQ, NQ).all(2)
    return kept


def choose_blocks(scores: torch.Tensor, config: Hierarchical, kept: torch.Tensor, *,
                  masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """bool ``[B, Hkv, NQ, NQ]``: each query block's own block plus its ``select_count - 1`` best earlier
    blocks (by ``scores``) that the safeguard does not already keep (``masks``: :func:`selection_masks` if at
    hand)."""
    available, own = masks if masks is not None else selection_masks(scores.shape[-1], kept)
    chosen = top_k(scores, available.expand(scores.shape), config.select_count - 1) if config.select_count > 1 \
        else torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return chosen | own


def selected_layout(chosen: torch.Tensor, config: Hierarchical, length: int, heads: int) -> Layout:
    """The selected branch's Layout through ``spattn.compile``: ``BlockLayout(chosen) | safeguard`` (chosen
    ``[B, Hkv, NQ, NQ]`` repeated over each GQA group), causal at ``select_block``. The fast path builds the
    same Layout with :meth:`~spattn.hierarchical.plan.BranchPlan.selected`; this is its cross-check."""
    B, Hkv = chosen.shape[:2]
    pattern = BlockLayout(chosen.repeat_interleave(heads // Hkv, 1), block=config.select_block)
    if config.safeguard is not None:
        pattern = config.safeguard | pattern
    return compile(pattern, length, length, causal=True, block_size=config.select_block, batch=B, heads=heads,
                   device=chosen.device)


def branch_layouts(query: torch.Tensor, key: torch.Tensor, config: Hierarchical, *, scale: float | None = None,
                   pool_logits: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Layout | torch.Tensor]:
    """The three branches' Layouts for these inputs (``compressed`` over ``L`` zero-padded compressed keys,
    None when ``L < compress_block``; ``selected``; ``window``) and the ``chosen`` blocks ``[B, Hkv, NQ, NQ]``."""
    B, H, L, D = query.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kc = compress(key, config, None if pool_logits is None else pool_logits[0])
    plan = branch_plan(config, L, B, H, key.shape[1], query.device)
    lse = compressed_lse(query, kc, config, scale=scale)
    chosen = choose_blocks(selection_scores(query, kc, config, scale=scale, lse=lse, overlap=plan.overlap), config,
                           plan.kept)
    return {"compressed": plan.compressed, "selected": plan.selected(chosen), "window": plan.window,
            "chosen": chosen}


def hierarchical_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, config: Hierarchical, *,
                           scale: float | None = None, gate_logits: torch.Tensor | None = None,
                           pool_logits: tuple[torch.Tensor, torch.Tensor] | None = None, backend: str = "auto",
                           return_info: bool = False):
    """Hierarchical (NSA-style) causal attention: compressed, selected and window branches mixed by gates.

    Args:
        query: ``[B, H, L, D]``; key ``[B, Hkv, L, D]``, value ``[B, Hkv, L, Dv]`` (GQA: Hkv divides H). Causal
            prefill / training (``Lq == Lk``).
        config: a :class:`spattn.Hierarchical`.
        scale: score scale, default ``1 / sqrt(D)``.
        gate_logits: learned gate logits ``[B|1, H|1, L|1, 3]`` (compressed, selected, window); default
            ``None``: ``config.gates`` (equal if ``None``). See :func:`~spattn.hierarchical.common.mix`.
        pool_logits: ``(key_logits, value_logits)``, each ``[Hkv, compress_block]``, for
            ``pooling="learned"`` (softmax position weights); default ``None``: mean pooling.
        backend: ``spattn.attention`` backend of every branch (default ``"auto"``).
        return_info: also return a dict: the branch ``layouts``, ``chosen`` blocks ``[B, Hkv, NQ, NQ]``,
            ``outputs`` (per-branch ``[B, H, L, Dv]``; zeros for a branch whose fixed gate is 0, which is not
            run, and for the compressed branch on sequences shorter than ``compress_block``).

    Returns:
        ``[B, H, L, Dv]`` in the input dtype (and the info dict).

    Example:
        >>> q, k, v = torch.randn(1, 4, 1000, 64), torch.randn(1, 2, 1000, 64), torch.randn(1, 2, 1000, 64)
        >>> config = spattn.Hierarchical(select_count=4, window=128) | spattn.Sinks(16)
        >>> hierarchical_attention(q, k, v, config).shape
        torch.Size([1, 4, 1000, 64])
    """
    check_inputs(query, key, value, config, gate_logits, pool_logits)
    B, H, L, D = query.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    plan = branch_plan(config, L, B, H, key.shape[1], query.device)
    kc = compress(key, config, None if pool_logits is None else pool_logits[0])
    # Note [zero fixed gates]: a branch whose fixed gate is 0 adds nothing to the mix, so it is not run (its
    # output is zeros). The compressed branch's scores still need its log-sum-exp: on the CPU that comes from
    # compressed_lse over the Nc real compressed keys (the branch's call would attend over L padded keys); on
    # CUDA from the branch's triton call, whose lse is cheaper than the torch stream at long lengths.
    zero = [gate_logits is None and config.gates is not None and g == 0 for g in config.gates or (1, 1, 1)]
    if kc.shape[2] > 0 and zero[0] and query.device.type == "cpu":
        compressed = query.new_zeros(B, H, L, value.shape[-1])
        lse = compressed_lse(query, kc, config, scale=scale)
        scores = selection_scores(query, kc, config, scale=scale, lse=lse, overlap=plan.overlap, backend="torch")
    elif kc.shape[2] > 0:  # Note [padded compressed keys]
        vc = compress(value, config, None if pool_logits is None else pool_logits[1])
        pad = (0, 0, 0, L - kc.shape[2])
        compressed, lse = attention(query, torch.nn.functional.pad(kc, pad), torch.nn.functional.pad(vc, pad),
                                    plan.compressed, scale=scale, backend=backend, return_lse=True)
        scores = selection_scores(query, kc, config, scale=scale, lse=lse, overlap=plan.overlap,
                                  backend="torch" if backend in ("reference", "dense") else "auto")
    else:  # shorter than one compressed block: the branch is empty (and weighted 0 by the mix)
        compressed = query.new_zeros(B, H, L, value.shape[-1])
        NQ = plan.num_blocks
        scores = torch.zeros(B, key.shape[1], NQ, NQ, device=query.device)
    chosen = choose_blocks(scores, config, plan.kept, masks=plan.selection_masks)
    selected = plan.selected(chosen)
    outputs = [compressed,
               attention(query, key, value, selected, causal=True, scale=scale, backend=backend),
               query.new_zeros(B, H, L, value.shape[-1]) if zero[2] else  # Note [zero fixed gates]
               attention(query, key, value, plan.window, causal=True, scale=scale, backend=backend)]
    out = mix(outputs, config, gate_logits,
              weights=None if gate_logits is not None else plan.mix_weights(query.dtype))
    if return_info:
        layouts = {"compressed": plan.compressed, "selected": selected, "window": plan.window, "chosen": chosen}
        return out, {"layouts": layouts, "chosen": chosen, "outputs": outputs, "compressed_nonempty": plan.nonempty}
    return out


def frozen_model_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, config: Hierarchical, *,
                           causal: bool, scale: float | None, padded: bool, backend: str = "auto") -> torch.Tensor:
    """``hierarchical_attention`` for a frozen transformers layer under ``spattn.patched`` (query ``[B, H, L, D]``,
    key/value ``[B, Hkv, L, D]``): mean pooling and fixed gates (equal when ``config.gates`` is None). A causal
    prefill without padding only: a decode step over a key/value cache, padding or bidirectional attention raise
    ``NotImplementedError``."""
    if not causal:
        raise NotImplementedError("spattn: Hierarchical needs causal attention (a decoder model)")
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError("spattn: Hierarchical runs full causal prefills (Lq == Lk); decoding over a "
                                  "key/value cache is not implemented yet (generate with use_cache=False)")
    if padded:
        raise NotImplementedError("spattn: Hierarchical does not support padded batches yet")
    if config.pooling != "mean":
        raise NotImplementedError("spattn: a frozen model has no trained pooling: use Hierarchical(pooling='mean')")
    return hierarchical_attention(query, key, value, config, scale=scale, backend=backend)


__all__ = ["branch_layouts", "choose_blocks", "frozen_model_attention", "hierarchical_attention", "kept_blocks",
           "selected_layout"]
