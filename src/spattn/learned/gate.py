"""``BlockGate``: a small learned block scorer (SeerAttention's ``Qavg_Kmaxminavg`` gate).

Notation: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads (``G = H // Hkv``), ``D`` head dim, ``E`` gate
width (``hidden``), ``bs`` block size, ``NQ``/``NK`` query/key blocks. For query block ``b`` of head ``h`` and key
block ``c`` of its key/value head ``g``::

    qbar_b = mean_{i in b} q_i                                  [D]
    kcat_c = [max_{j in c} k_j, min_{j in c} k_j, mean_{j in c} k_j]   [3D]
    u = norm(qbar_b @ Wq[h])     v = norm(kcat_c @ Wk[g])            [E]   (norm: RMS norm, optional)
    logit[b, c] = u . v / sqrt(E) + log n_c                    (n_c keys in block c)
    gate[b, c] = softmax_c(logit) over the visible key blocks (causal: blocks not entirely in the future)

The gate reads the model's own queries and keys (after rotary) and never changes them. Trained against the
block-pooled dense attention (:func:`spattn.learned.distill_loss`), it estimates the same quantity as the
built-in selectors (share of the row's softmax mass per block), so it plugs into ``TopK`` / ``TopP``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spattn.selectors.common import block_sizes, check_qk, kv_head_index, masked_softmax, pool, restrict, visible_blocks


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class BlockGate(nn.Module):
    """Learned block scores ``[B, H, NQ, NK]`` from pooled queries and max/min/mean-pooled keys.

    Args:
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``Hkv`` (divides ``H``); default ``num_heads``.
        head_dim: ``D``.
        block_size: tokens per block the gate scores (it is trained at this size). Default 64.
        hidden: gate width ``E``. Default 64.
        qk_norm: RMS-normalise the projected pooled vectors (SeerAttention's ``use_qk_norm``). Default True.

    Example:
        >>> gate = BlockGate(num_heads=4, num_kv_heads=2, head_dim=32, block_size=16)
        >>> q, k = torch.randn(1, 4, 100, 32), torch.randn(1, 2, 100, 32)
        >>> gate(q, k, causal=True).shape
        torch.Size([1, 4, 7, 7])
    """

    def __init__(self, num_heads: int, num_kv_heads: int | None = None, head_dim: int = 64, *, block_size: int = 64,
                 hidden: int = 64, qk_norm: bool = True) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("block_size", block_size), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size, self.hidden, self.qk_norm = block_size, hidden, bool(qk_norm)
        self.query_proj = nn.Parameter(torch.randn(num_heads, head_dim, hidden) / math.sqrt(head_dim))
        self.key_proj = nn.Parameter(torch.randn(num_kv_heads, 3 * head_dim, hidden) / math.sqrt(3 * head_dim))

    def config(self) -> dict[str, int | bool]:
        """The constructor arguments (JSON), as saved next to the weights."""
        return {"num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "block_size": self.block_size, "hidden": self.hidden, "qk_norm": self.qk_norm}

    def _check(self, query: torch.Tensor, key: torch.Tensor) -> tuple[int, ...]:
        B, H, Hkv, Lq, Lk, D = check_qk(query, key, self.block_size)
        if (H, Hkv, D) != (self.num_heads, self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"gate was built for {self.num_heads} query heads, {self.num_kv_heads} key heads, head dim "
                f"{self.head_dim}; got query {tuple(query.shape)}, key {tuple(key.shape)}"
            )
        return B, H, Hkv, Lq, Lk, D

    def logits(self, query: torch.Tensor, key: torch.Tensor, *, causal: bool = True,
               allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw scores float32 ``[B, H, NQ, NK]`` and the visible blocks bool ``[.., NQ, NK]`` they are taken over.

        query ``[B, H, Lq, D]``, key ``[B, Hkv, Lk, D]``; ``allowed`` bool ``[Bs, Hs, NQ, NK]`` restricts the
        visible blocks (as for any selector). Differentiable in the gate parameters (and in the inputs)."""
        B, H, Hkv, Lq, Lk, D = self._check(query, key)
        bs = self.block_size
        dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        qbar = pool(query, bs).to(dtype)  # [B, H, NQ, D]
        kcat = torch.cat([pool(key, bs, "amax"), pool(key, bs, "amin"), pool(key, bs)], -1).to(dtype)  # [.., NK, 3D]
        u = torch.einsum("bhnd,hde->bhne", qbar, self.query_proj.to(dtype))
        v = torch.einsum("bgnd,gde->bgne", kcat, self.key_proj.to(dtype))
        if self.qk_norm:
            u, v = _rms(u), _rms(v)
        v = v[:, kv_head_index(H, Hkv, query.device)]  # [B, H, NK, E] (a view per group, no parameters copied)
        logits = u @ v.transpose(-1, -2) / math.sqrt(self.hidden)
        logits = logits + torch.log(block_sizes(Lk, bs, query.device).to(dtype))
        visible = restrict(visible_blocks(Lq, Lk, bs, causal, query.device), allowed)
        return logits, visible

    def forward(self, query: torch.Tensor, key: torch.Tensor, *, causal: bool = True,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Block probabilities float32 ``[B, H, NQ, NK]``: rows sum to 1 over the visible blocks, 0 elsewhere."""
        logits, visible = self.logits(query, key, causal=causal, allowed=allowed)
        return masked_softmax(logits, visible)

    def reference(self, query: torch.Tensor, key: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
        """float64 ``[B, H, NQ, NK]``: the same probabilities from the definition, one block at a time."""
        B, H, Hkv, Lq, Lk, D = self._check(query, key)
        bs, G, off = self.block_size, H // Hkv, Lk - Lq
        q, k = query.double(), key.double()
        wq, wk = self.query_proj.detach().double(), self.key_proj.detach().double()
        NQ, NK = -(-Lq // bs), -(-Lk // bs)
        out = torch.zeros(B, H, NQ, NK, dtype=torch.float64)
        for b in range(B):
            for h in range(H):
                for qi in range(NQ):
                    u = q[b, h, qi * bs:(qi + 1) * bs].mean(0) @ wq[h]
                    u = _rms(u) if self.qk_norm else u
                    last = min((qi + 1) * bs, Lq) - 1 + off
                    logits = torch.full((NK,), -math.inf, dtype=torch.float64)
                    for c in range(NK):
                        if causal and c * bs > last:
                            continue
                        keys = k[b, h // G, c * bs:(c + 1) * bs]
                        v = torch.cat([keys.amax(0), keys.amin(0), keys.mean(0)]) @ wk[h // G]
                        v = _rms(v) if self.qk_norm else v
                        logits[c] = u @ v / math.sqrt(self.hidden) + math.log(keys.shape[0])
                    out[b, h, qi] = torch.softmax(logits, 0)
        return out


__all__ = ["BlockGate"]
