"""Cost model of hierarchical attention: key/value tokens a decode step touches, prefill FLOPs, bytes moved.

Counts are per query head and sequence unless stated, for a causal sequence of ``length`` tokens, **without the
safeguard** (its keys come on top: count them with ``spattn.compile(safeguard, ...).allowed_pairs()``):

* compressed: query ``i`` sees ``#{t : t s + b - 1 <= i}`` compressed tokens (``b = compress_block``,
  ``s = compress_stride``);
* selected: query ``i`` in query block ``q`` reads its own block up to itself (``i - q S + 1`` keys,
  ``S = select_block``) and ``min(select_count, q + 1) - 1`` whole earlier blocks;
* window: ``min(window, i + 1)`` keys.

``tests/test_hierarchical.py`` checks these counts against the compiled layouts' ``allowed_pairs``.
"""

from __future__ import annotations

from spattn.patterns import Hierarchical


def _compressed_visible(config: Hierarchical, i: int) -> int:
    reach = i - config.compress_block + 1
    return 0 if reach < 0 else reach // config.compress_stride + 1


def _selected_keys(config: Hierarchical, i: int) -> int:
    q = i // config.select_block
    return i - q * config.select_block + 1 + (min(config.select_count, q + 1) - 1) * config.select_block


def decode_tokens(config: Hierarchical, length: int) -> dict[str, int]:
    """Key/value tokens the query at position ``length - 1`` reads per branch (``compressed`` counts
    compressed tokens), and their ``total`` (branches are loaded separately: overlaps count twice)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    i = length - 1
    out = {"compressed": _compressed_visible(config, i), "selected": _selected_keys(config, i),
           "window": min(config.window, length)}
    out["total"] = sum(out.values())
    return out


def prefill_pairs(config: Hierarchical, length: int) -> dict[str, int]:
    """Allowed (query, key) pairs of a causal prefill per branch and head, and their ``total``."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    b, s, S, w = config.compress_block, config.compress_stride, config.select_block, config.window
    nc = config.num_compressed(length)
    compressed = sum(length - (t * s + b - 1) for t in range(nc))
    selected = 0
    for q in range(-(-length // S)):
        rows = min(S, length - q * S)
        selected += rows * (rows + 1) // 2 + rows * (min(config.select_count, q + 1) - 1) * S
    window = sum(min(w, i + 1) for i in range(min(w, length))) + max(0, length - w) * w
    return {"compressed": compressed, "selected": selected, "window": window,
            "total": compressed + selected + window}


def cost(config: Hierarchical, length: int, *, head_dim: int = 64, heads: int = 1, kv_heads: int | None = None,
         batch: int = 1, dtype_bytes: int = 2) -> dict[str, float | dict]:
    """The cost model at ``length`` tokens for ``batch`` sequences of ``heads`` query heads (``kv_heads`` key/value
    heads, default ``heads``), ``head_dim`` ``D``, ``dtype_bytes`` per element (2: fp16/bf16).

    Returns a dict: ``decode_tokens`` (per branch, one query head), ``decode_bytes`` (key/value bytes one decode
    step reads: the selection is shared by a GQA group, so per key/value head), ``prefill_pairs`` (per branch,
    one head), ``prefill_flops`` (forward: ``4 D`` per pair for the three branches plus ``2 D`` per compressed
    pair for the selection scores), ``prefill_bytes`` (a lower bound: every branch reads q and the keys/values of
    its query blocks once per head and writes its output), ``dense_flops`` and ``dense_decode_tokens`` for
    comparison.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    D, S, n = head_dim, config.select_block, batch * heads
    dec = decode_tokens(config, length)
    pairs = prefill_pairs(config, length)
    flops = n * (4 * D * pairs["total"] + 2 * D * pairs["compressed"])
    kv_reads = 0  # key/value tokens a query block reads per branch, summed over query blocks
    for q in range(-(-length // S)):
        lo, hi = q * S, min(length, (q + 1) * S) - 1
        kv_reads += _compressed_visible(config, hi) + (hi - lo + 1 + (min(config.select_count, q + 1) - 1) * S)
        kv_reads += hi - max(0, lo - config.window + 1) + 1
    element = D * dtype_bytes
    prefill_bytes = n * element * (2 * kv_reads + 3 * 2 * length) + batch * kv_heads * element * 2 * (
        length + config.num_compressed(length))  # + pooling: read k/v once, write the compressed tokens
    return {
        "length": length, "decode_tokens": dec, "decode_bytes": batch * kv_heads * 2 * element * dec["total"],
        "prefill_pairs": pairs, "prefill_flops": float(flops), "prefill_bytes": float(prefill_bytes),
        "dense_flops": float(n * 4 * D * length * (length + 1) // 2), "dense_decode_tokens": length,
    }


__all__ = ["cost", "decode_tokens", "prefill_pairs"]
