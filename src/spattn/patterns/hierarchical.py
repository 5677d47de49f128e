"""``Hierarchical``: NSA-style multi-scale attention as one spattn pattern (a frozen, JSON-serialisable config).

Three branches per query head, mixed by per-head, per-query gates (Native Sparse Attention's design):

* **compressed**: attention over block tokens. Compressed token ``t`` pools the keys/values
  ``[t * compress_stride, t * compress_stride + compress_block)`` (mean pooling, or learned position weights);
  query ``i`` sees it only when it summarises no future key: ``t * compress_stride + compress_block - 1 <= i``
  (:class:`CompressedCausal`, a Layout over the compressed keys).
* **selected**: per query block of ``select_block`` tokens, the query's own block plus the
  ``select_count - 1`` earlier key blocks of ``select_block`` tokens with the highest compressed-attention
  scores (summed over the queries of the block and the heads of a GQA group: one selection per group), as a
  :class:`~spattn.BlockLayout`, causal, united with the static ``safeguard`` (``Hierarchical(...) | Sinks(64)``).
* **window**: the last ``window`` keys (``i - window < j <= i``).

``Hierarchical`` describes the attention; it is not a token mask, so it does not compile to one Layout: run it
with ``spattn.hierarchical.hierarchical_attention`` (functional, fixed gates) or
``spattn.hierarchical.HierarchicalAttention`` (the ``spattn.nn.SparseAttention`` parametrised pattern, learned
gates and pooling). The branches' own layouts come from :meth:`Hierarchical.compressed_pattern`,
:meth:`Hierarchical.window_pattern` and the selection.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from spattn.patterns.base import Context, Pattern, status_from_bounds
from spattn.patterns.builtin import Window
from spattn.patterns.serialize import register_pattern

POOLINGS = ("mean", "learned")
BRANCHES = ("compressed", "selected", "window")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@register_pattern
@dataclasses.dataclass(frozen=True)
class CompressedCausal(Pattern):
    """Causal mask over compressed keys: compressed key ``j`` (pooling tokens ``[j * stride, j * stride + block)``)
    is visible to the query at token position ``p`` iff ``j * stride + block - 1 <= p``.

    Compile it with ``causal=False`` (the mask is the causality) and ``kv_len >= q_len`` (pad the compressed keys
    to the query length: positions past the real compressed tokens are never visible). ``query_start``: token
    position of the first query (0 for a prefill; ``L - Lq`` for the last ``Lq`` queries of a length-``L``
    sequence).
    """

    block: int
    stride: int
    query_start: int = 0
    kind: ClassVar[str] = "compressed_causal"

    def __post_init__(self):
        _positive_int("block", self.block)
        _positive_int("stride", self.stride)
        if isinstance(self.query_start, bool) or not isinstance(self.query_start, int) or self.query_start < 0:
            raise ValueError(f"query_start must be an int >= 0, got {self.query_start!r}")

    def _position(self, ctx: Context, i):
        return i - ctx.offset + self.query_start  # absolute query index -> token position

    def block_status(self, ctx):
        qlo, qhi = ctx.q_range()
        klo, khi = ctx.k_range()
        plo, phi = self._position(ctx, qlo), self._position(ctx, qhi)
        full = khi * self.stride + self.block - 1 <= plo
        empty = klo * self.stride + self.block - 1 > phi
        return status_from_bounds(full, empty)

    def token_mask(self, ctx, b, h, i, j):
        return j * self.stride + self.block - 1 <= self._position(ctx, i)


@register_pattern
@dataclasses.dataclass(frozen=True)
class Hierarchical(Pattern):
    """Hierarchical (NSA-style) sparse attention: compressed, selected and sliding-window branches mixed by gates.

    Args:
        compress_block: tokens pooled into one compressed token (default 32).
        compress_stride: step between compressed tokens (default 16; at most ``compress_block``).
        select_block: tokens per selected key block, also the query block of the selection and the compile
            block size of the branch layouts (default 64; a power of two >= 16 for the triton kernels).
        select_count: key blocks each query block reads in the selected branch, its own block included
            (default 16).
        window: keys of the sliding window, the query itself included (default 512).
        pooling: ``"mean"`` (parameter-free, default) or ``"learned"`` (softmax position weights per key/value
            head, initialised to the mean; trained in ``HierarchicalAttention``).
        gates: fixed branch weights ``(compressed, selected, window)`` (non-negative, selected + window > 0), or
            ``None``: learned gates in ``HierarchicalAttention``, equal gates in the functional form.
        safeguard: a static pattern united with the selected branch (``Sinks(64) | Essential(...)``); ``None``
            by default. ``Hierarchical(...) | Sinks(64)`` sets it.

    The gate mix: with weights ``w_c >= 0`` (fixed, or ``exp`` of learned logits) and ``n_c`` = 1 when the
    branch has at least one key for the query, ``out = sum_c w_c n_c o_c / sum_c w_c n_c`` (a convex mix; the
    compressed branch is empty for the first ``compress_block - 1`` queries).

    Example:
        >>> config = Hierarchical(compress_block=32, compress_stride=16, select_block=64, select_count=4,
        ...                       window=128) | Sinks(16)
        >>> out = spattn.hierarchical.hierarchical_attention(q, k, v, config)  # doctest: +SKIP
    """

    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    select_count: int = 16
    window: int = 512
    pooling: str = "mean"
    gates: tuple[float, float, float] | None = None
    safeguard: Pattern | None = None
    kind: ClassVar[str] = "hierarchical"
    dynamic: ClassVar[bool] = True

    def __post_init__(self):
        for name in ("compress_block", "compress_stride", "select_block", "select_count", "window"):
            _positive_int(name, getattr(self, name))
        if self.compress_stride > self.compress_block:
            raise ValueError(f"compress_stride ({self.compress_stride}) must be <= compress_block "
                             f"({self.compress_block}): every key must be summarised")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.gates is not None:
            gates = tuple(self.gates)
            if len(gates) != 3 or not all(isinstance(g, (int, float)) and not isinstance(g, bool) and
                                          math.isfinite(g) and g >= 0 for g in gates):
                raise ValueError("gates must be None or three finite non-negative numbers "
                                 f"(compressed, selected, window), got {self.gates!r}")
            if gates[1] + gates[2] <= 0:
                raise ValueError(f"gates: the selected or the window weight must be > 0 (every query has keys "
                                 f"there), got {self.gates!r}")
            object.__setattr__(self, "gates", tuple(float(g) for g in gates))
        if self.safeguard is not None and (not isinstance(self.safeguard, Pattern) or
                                           self.safeguard.contains_dynamic()):
            raise TypeError("safeguard must be a static spattn Pattern (Sinks, Window, Essential...) or None, got "
                            f"{self.safeguard!r}")

    # -- algebra: static parts join the selected branch ----------------------------------------------
    def __or__(self, other: Pattern) -> Hierarchical:
        if not isinstance(other, Pattern) or other.contains_dynamic():
            raise TypeError("Hierarchical | x: x must be a static spattn Pattern (a safeguard of the selected "
                            f"branch), got {other!r}")
        return dataclasses.replace(self, safeguard=other if self.safeguard is None else self.safeguard | other)

    __ror__ = __or__

    def __and__(self, other: Pattern) -> Pattern:
        raise TypeError("Hierarchical does not intersect with other patterns; restrict its branches instead")

    # -- not a single token mask ------------------------------------------------------------------------
    def block_status(self, ctx):
        raise TypeError("Hierarchical is three branches mixed by gates, not one mask: run it with "
                        "spattn.hierarchical.hierarchical_attention or spattn.hierarchical.HierarchicalAttention")

    token_mask = block_status

    # -- the branches' geometry -------------------------------------------------------------------------
    def num_compressed(self, length: int) -> int:
        """Compressed tokens of a length-``length`` sequence (complete blocks only)."""
        if length < self.compress_block:
            return 0
        return (length - self.compress_block) // self.compress_stride + 1

    def compressed_pattern(self, query_start: int = 0) -> CompressedCausal:
        """The compressed branch's mask over (zero-padded) compressed keys."""
        return CompressedCausal(self.compress_block, self.compress_stride, query_start)

    def window_pattern(self) -> Window:
        """The window branch: ``Window(window - 1)`` compiled causal (``window`` keys, the query's own included)."""
        return Window(self.window - 1)

    def overlap(self, length: int, device=None) -> torch.Tensor:
        """float32 ``[Nc, NS]``: share of compressed token ``t``'s span inside selection block ``s``
        (``|span_t & block_s| / compress_block``); maps compressed scores to selection-block scores."""
        nc, ns = self.num_compressed(length), -(-length // self.select_block)
        start = torch.arange(nc, device=device)[:, None] * self.compress_stride
        lo = torch.arange(ns, device=device)[None, :] * self.select_block
        inter = (torch.minimum(start + self.compress_block, lo + self.select_block) - torch.maximum(start, lo))
        return inter.clamp_min(0).float() / self.compress_block


__all__ = ["BRANCHES", "POOLINGS", "CompressedCausal", "Hierarchical"]
