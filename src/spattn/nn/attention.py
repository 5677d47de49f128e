"""``SparseAttention``: a multi-head attention layer ``[B, L, dim] -> [B, L, dim]`` on spattn attention.

Projections (query ``H x D``, key/value ``Hkv x D``, output), optional rotary embeddings, then attention under a
pattern:

* ``None``: dense attention (``torch.nn.functional.scaled_dot_product_attention``, causal when asked);
* a static or dynamic :class:`~spattn.Pattern` (``Sinks(16) | Window(256)``, ``... | TopK("pooled", 4)``):
  ``spattn.attention`` on its layout (static layouts are compiled once per length and cached; dynamic ones
  are compiled from each call's queries and keys, the selection itself taking no gradient);
* a **parametrised pattern**: any ``torch.nn.Module`` with the method below. It is registered as the
  submodule ``pattern``, so its parameters train with the layer and appear in ``state_dict``.

Parametrised-pattern protocol (what ``spattn.learned.LearnedTopK`` implements and what a future
``Hierarchical`` with learned branch gates implements the same way)::

    def attend(self, query, key, value, *, causal: bool, scale: float) -> Tensor
        # query [B, H, L, D], key/value [B, Hkv, L, D] (after rotary) -> out [B, H, L, D]
    def regularisers(self) -> dict[str, Tensor]      # optional: extra losses for the trainer to add

The module may keep statistics of its last call (``last``) for logging.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from spattn.ops.attention import attention
from spattn.patterns import Pattern, compile


@runtime_checkable
class ParametrisedPattern(Protocol):
    """A pattern that owns parameters: an ``nn.Module`` with ``attend(query, key, value, *, causal, scale)``."""

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor: ...


def rotary_tables(length: int, head_dim: int, base: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[length, head_dim]`` of rotary embeddings (the rotate-half convention of Llama)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    angles = torch.cat([angles, angles], -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, L, D]`` by position (``cos``/``sin`` ``[L, D]``)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class SparseAttention(nn.Module):
    """Multi-head (GQA) attention with a spattn pattern, trainable end to end.

    Args:
        dim: model width; input and output ``[B, L, dim]``.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``Hkv`` (divides ``H``); default ``num_heads``.
        pattern: ``None`` (dense, default), a :class:`~spattn.Pattern`, or a parametrised pattern (an
            ``nn.Module`` with ``attend``; see the module docstring).
        causal: causal attention (default True).
        rotary: rotary embeddings: ``True`` (base 10000, default), a float base, or ``False``.
        head_dim: ``D``, default ``dim // num_heads`` (must be even with rotary).
        block_size: compile block size for Pattern layouts (default 64).
        backend: ``spattn.attention`` backend (default ``"auto"``).
        bias: bias in the projections (default False).

    Example:
        >>> layer = SparseAttention(128, 4, 2, pattern=spattn.Sinks(4) | spattn.Window(64))
        >>> layer(torch.randn(2, 300, 128)).shape
        torch.Size([2, 300, 128])
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, pattern: Any = None,
                 causal: bool = True, rotary: bool | float = True, head_dim: int | None = None,
                 block_size: int = 64, backend: str = "auto", bias: bool = False) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("dim", dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        head_dim = dim // num_heads if head_dim is None else head_dim
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int (default dim // num_heads), got {head_dim!r}")
        if rotary is True:
            rotary = 10000.0
        if rotary is not False and (not isinstance(rotary, (int, float)) or rotary <= 1 or head_dim % 2):
            raise ValueError(f"rotary must be True, False or a base > 1 with an even head_dim; got {rotary!r}, "
                             f"head_dim={head_dim}")
        if pattern is not None and not isinstance(pattern, Pattern):
            if not (isinstance(pattern, nn.Module) and isinstance(pattern, ParametrisedPattern)):
                raise TypeError("pattern must be None (dense), a spattn Pattern, or an nn.Module with "
                                f"attend(query, key, value, *, causal, scale); got {type(pattern).__name__}")
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.causal, self.rotary_base, self.block_size, self.backend = causal, rotary or None, block_size, backend
        self.query_proj = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.key_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.value_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.output_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)
        if isinstance(pattern, nn.Module):
            self.pattern = pattern  # registered: its parameters train with the layer
        else:
            self.pattern = None
            self.static_pattern = pattern
        self._layouts: dict[tuple, Any] = {}

    @property
    def spec(self) -> Pattern | None:
        """The Pattern this layer uses (None for dense or a parametrised pattern)."""
        return None if self.pattern is not None else self.static_pattern

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """query ``[B, H, L, D]``, key/value ``[B, Hkv, L, D]`` of ``x [B, L, dim]`` (rotary applied)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"input must be [B, L, {self.dim}], got {tuple(x.shape)}")
        B, L, _ = x.shape
        q = self.query_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.key_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.value_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary_base:
            cos, sin = rotary_tables(L, self.head_dim, float(self.rotary_base), x.device, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def _static_layout(self, pattern: Pattern, q, k):
        key = (q.shape[0], q.shape[2], k.shape[2], q.device)
        if key not in self._layouts:
            self._layouts = {key: compile(pattern, q.shape[2], k.shape[2], causal=self.causal,
                                          block_size=self.block_size, batch=q.shape[0], heads=q.shape[1],
                                          device=q.device)}  # one length at a time
        return self._layouts[key]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The attention itself: query ``[B, H, L, D]``, key/value ``[B, Hkv, L, D]`` -> ``[B, H, L, D]``."""
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.pattern is not None:
            return self.pattern.attend(query, key, value, causal=self.causal, scale=scale)
        if self.static_pattern is None:
            return F.scaled_dot_product_attention(query, key, value, is_causal=self.causal, scale=scale,
                                                  enable_gqa=self.num_heads != self.num_kv_heads)
        if self.static_pattern.contains_dynamic():
            return attention(query, key, value, self.static_pattern, causal=self.causal, scale=scale,
                             backend=self.backend, block_size=self.block_size)
        return attention(query, key, value, self._static_layout(self.static_pattern, query, key), causal=self.causal,
                         scale=scale, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim] -> [B, L, dim]``."""
        out = self.attend(*self.project(x))
        B, _, L, _ = out.shape
        return self.output_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))

    def regularisers(self) -> dict[str, torch.Tensor]:
        """Extra losses the parametrised pattern asks for (empty for Patterns and dense)."""
        fn = getattr(self.pattern, "regularisers", None)
        return dict(fn()) if callable(fn) else {}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, rotary={self.rotary_base}, "
                f"pattern={self.spec!r}" if self.pattern is None else
                f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, rotary={self.rotary_base}")
