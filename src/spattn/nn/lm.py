"""``TransformerLM``: a small decoder-only language model built from :class:`SparseAttention` layers.

Pre-norm blocks (RMSNorm, attention, RMSNorm, SwiGLU MLP), rotary positions, tied embeddings. Each layer's
pattern comes from ``pattern`` (one Pattern for all layers, ``None`` for dense) or from a factory
``pattern(layer_index) -> Pattern | parametrised pattern | None``, so a trainer can give every layer its own
learned router.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spattn.nn.attention import SparseAttention


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _Block(nn.Module):
    def __init__(self, dim: int, attention: SparseAttention, mlp_ratio: float) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim)
        self.attention = attention
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = _MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TransformerLM(nn.Module):
    """Decoder-only LM: token ids int ``[B, L]`` -> logits float ``[B, L, vocab_size]``.

    Args:
        vocab_size: tokens in the vocabulary.
        dim: model width (default 128); layers: blocks (default 2); num_heads / num_kv_heads: attention heads
            (default 4 / 2).
        pattern: ``None`` (dense, default), a Pattern for every layer, or a factory ``layer_index -> pattern``
            (a Pattern, ``None`` or a parametrised pattern module).
        block_size: compile block size of the attention layouts (default 64).
        mlp_ratio: MLP width / dim (default 8/3, SwiGLU).

    Example:
        >>> lm = TransformerLM(100, dim=64, layers=2, num_heads=4, num_kv_heads=2, pattern=spattn.Window(32))
        >>> lm(torch.randint(0, 100, (2, 128))).shape
        torch.Size([2, 128, 100])
    """

    def __init__(self, vocab_size: int, *, dim: int = 128, layers: int = 2, num_heads: int = 4,
                 num_kv_heads: int | None = 2, pattern: Any = None, block_size: int = 64,
                 mlp_ratio: float = 8 / 3, backend: str = "auto") -> None:
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be a positive int, got {layers!r}")
        factory: Callable[[int], Any] = pattern if callable(pattern) and not isinstance(pattern, nn.Module) \
            else (lambda _i, p=pattern: p)
        self.vocab_size, self.dim = vocab_size, dim
        self.embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(
            _Block(dim, SparseAttention(dim, num_heads, num_kv_heads, pattern=factory(i), causal=True,
                                        block_size=block_size, backend=backend), mlp_ratio)
            for i in range(layers)
        )
        self.norm = nn.RMSNorm(dim)

    def attention_layers(self) -> list[SparseAttention]:
        return [b.attention for b in self.blocks]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be int token ids [B, L], got {ids.dtype} {tuple(ids.shape)}")
        x = self.embedding(ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embedding.weight.t()

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) over positions 1..L-1 of ``ids [B, L]``."""
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    def regularisers(self) -> dict[str, torch.Tensor]:
        """Extra losses of the layers' parametrised patterns, summed per name."""
        out: dict[str, torch.Tensor] = {}
        for layer in self.attention_layers():
            for name, value in layer.regularisers().items():
                out[name] = out[name] + value if name in out else value
        return out
