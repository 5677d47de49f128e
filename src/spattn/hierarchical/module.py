"""``HierarchicalAttention``: the parametrised pattern of ``spattn.nn.SparseAttention`` for ``Hierarchical``.

Parameters (all start at the parameter-free behaviour, so a fresh module equals the functional form with
equal gates and mean pooling):

* gates (when ``config.gates is None``): ``gate_weight [H, D, 3]`` and ``gate_bias [H, 3]``, logits
  ``query . gate_weight[h] + gate_bias[h]`` per head and query (zeros: equal gates);
* learned pooling (``config.pooling == "learned"``): ``pool_key`` / ``pool_value`` ``[Hkv, compress_block]``
  position logits (zeros: mean pooling).
"""

from __future__ import annotations

import torch
from torch import nn

from spattn.hierarchical.attention import hierarchical_attention
from spattn.patterns import Hierarchical


class HierarchicalAttention(nn.Module):
    """Hierarchical sparse attention with learned gates and pooling, for ``spattn.nn.SparseAttention``.

    Args:
        config: a :class:`spattn.Hierarchical` (fixed ``gates`` turn the learned gates off).
        num_heads: query heads ``H``; num_kv_heads: key/value heads (default ``num_heads``); head_dim: ``D``
            (default 64).
        backend: ``spattn.attention`` backend of the branches (default ``"auto"``).

    After each call ``last`` holds ``chosen`` (``[B, Hkv, NQ, NQ]``) and ``gate_mean`` (``[3]``, mean
    softmax weights of the branches where they are non-empty).

    Example:
        >>> config = spattn.Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=2,
        ...                              window=32, pooling="learned")
        >>> layer = spattn.nn.SparseAttention(64, 4, 2, pattern=HierarchicalAttention(config, 4, 2, 16))
        >>> layer(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    def __init__(self, config: Hierarchical, num_heads: int, num_kv_heads: int | None = None, head_dim: int = 64,
                 *, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, Hierarchical):
            raise TypeError(f"config must be a spattn.Hierarchical, got {type(config).__name__}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.config, self.num_heads, self.num_kv_heads, self.head_dim = config, num_heads, num_kv_heads, head_dim
        self.backend = backend
        if config.gates is None:
            self.gate_weight = nn.Parameter(torch.zeros(num_heads, head_dim, 3))
            self.gate_bias = nn.Parameter(torch.zeros(num_heads, 3))
        else:
            self.gate_weight = self.gate_bias = None
        if config.pooling == "learned":
            self.pool_key = nn.Parameter(torch.zeros(num_kv_heads, config.compress_block))
            self.pool_value = nn.Parameter(torch.zeros(num_kv_heads, config.compress_block))
        else:
            self.pool_key = self.pool_value = None
        self.last: dict[str, torch.Tensor] = {}

    def gate_logits(self, query: torch.Tensor) -> torch.Tensor | None:
        """``[B, H, L, 3]`` gate logits of ``query [B, H, L, D]`` (None with fixed gates)."""
        if self.gate_weight is None:
            return None
        w, b = self.gate_weight.to(query.dtype), self.gate_bias.to(query.dtype)
        return torch.einsum("bhld,hdc->bhlc", query, w) + b[None, :, None, :]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        """out ``[B, H, L, Dv]`` for query ``[B, H, L, D]``, key/value ``[B, Hkv, L, D]`` (causal only)."""
        if not causal:
            raise ValueError("HierarchicalAttention is causal: use SparseAttention(..., causal=True)")
        if query.shape[1] != self.num_heads or key.shape[1] != self.num_kv_heads or query.shape[-1] != self.head_dim:
            raise ValueError(f"expected query [B, {self.num_heads}, L, {self.head_dim}] and key [B, "
                             f"{self.num_kv_heads}, L, {self.head_dim}], got {tuple(query.shape)}, {tuple(key.shape)}")
        logits = self.gate_logits(query)
        pool = None if self.pool_key is None else (self.pool_key, self.pool_value)
        out, info = hierarchical_attention(query, key, value, self.config, scale=scale, gate_logits=logits,
                                           pool_logits=pool, backend=self.backend, return_info=True)
        with torch.no_grad():
            if logits is not None:
                nonempty = torch.ones(query.shape[2], 3, dtype=torch.bool, device=query.device)
                nonempty[:, 0] = info["compressed_nonempty"]
                w = torch.softmax(logits.float().masked_fill(~nonempty, float("-inf")), -1)
                gate_mean = w.mean((0, 1, 2))
            else:
                gate_mean = torch.tensor(self.config.gates) / sum(self.config.gates)
        self.last = {"chosen": info["chosen"], "gate_mean": gate_mean}
        return out

    def extra_repr(self) -> str:
        return f"config={self.config!r}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}"


__all__ = ["HierarchicalAttention"]
