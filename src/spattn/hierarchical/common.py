"""Maths shared unchanged by the reference and the fast path: pooling, the gate mix, argument checks."""

from __future__ import annotations

import math

import torch

from spattn.patterns.hierarchical import Hierarchical


def check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, config: Hierarchical,
                 gate_logits: torch.Tensor | None, pool_logits: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Raise ``ValueError`` / ``TypeError`` naming the bad argument."""
    if not isinstance(config, Hierarchical):
        raise TypeError(f"config must be a spattn.Hierarchical, got {type(config).__name__}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, L, D], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    B, H, L, D = query.shape
    if key.shape[0] != B or key.shape[2] != L or key.shape[3] != D:
        raise ValueError(f"key must be [B, Hkv, L, D] matching query {tuple(query.shape)} (hierarchical "
                         f"attention is a causal prefill: Lq == Lk), got {tuple(key.shape)}")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value must be [B, Hkv, L, Dv] like key {tuple(key.shape)}, got {tuple(value.shape)}")
    if H % key.shape[1]:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({key.shape[1]})")
    if gate_logits is not None:
        if config.gates is not None:
            raise ValueError("give either config.gates (fixed) or gate_logits (learned), not both")
        if gate_logits.dim() != 4 or gate_logits.shape[-1] != 3 or gate_logits.shape[2] not in (1, L):
            raise ValueError(f"gate_logits must be [B|1, H|1, L|1, 3], got {tuple(gate_logits.shape)}")
    if pool_logits is not None:
        if config.pooling != "learned":
            raise ValueError("pool_logits are the learned pooling's weights: use Hierarchical(pooling='learned')")
        for name, w in zip(("pool_logits[0] (keys)", "pool_logits[1] (values)"), pool_logits, strict=True):
            if w.shape != (key.shape[1], config.compress_block):
                raise ValueError(f"{name} must be [Hkv, compress_block] = [{key.shape[1]}, "
                                 f"{config.compress_block}], got {tuple(w.shape)}")


def pool_weights(pool_logit: torch.Tensor | None, config: Hierarchical, heads: int, device, dtype) -> torch.Tensor:
    """``[Hkv, compress_block]`` position weights of one compressed token (rows sum to 1; mean when None)."""
    if pool_logit is None:
        return torch.full((heads, config.compress_block), 1.0 / config.compress_block, device=device, dtype=dtype)
    return torch.softmax(pool_logit.to(torch.promote_types(dtype, torch.float32)), -1).to(dtype)


def compress(x: torch.Tensor, config: Hierarchical, pool_logit: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, Hkv, L, D] -> [B, Hkv, Nc, D]``: compressed token ``t`` is the weighted sum of
    ``x[..., t * compress_stride + p, :]`` over ``p < compress_block`` (complete blocks only)."""
    B, Hkv, L, D = x.shape
    nc = config.num_compressed(L)
    if nc == 0:
        return x.new_zeros(B, Hkv, 0, D)
    span = x.unfold(2, config.compress_block, config.compress_stride)[:, :, :nc]  # [B, Hkv, Nc, D, cb]
    if pool_logit is None:
        return torch.einsum("bhndc,hc->bhnd", span, pool_weights(None, config, Hkv, x.device, x.dtype))
    # Note [pooling gradient in float32]: with bf16 weights, the learned weights' gradient (a sum of B * Nc * D
    # products per position) is rounded to bf16 before the softmax's backward, which cancels much of it. The
    # weights and the sum run in float32 and only the pooled tokens are cast back: one rounding fewer on that
    # gradient. (Session 7's bf16 H200 gate failure on it was bf16 noise either way: docs/hierarchical.md,
    # "The bf16 gate".)
    acc = torch.promote_types(x.dtype, torch.float32)
    w = pool_weights(pool_logit, config, Hkv, x.device, acc)
    return torch.einsum("bhndc,hc->bhnd", span.to(acc), w).to(x.dtype)


def compressed_nonempty(config: Hierarchical, length: int, device) -> torch.Tensor:
    """bool ``[L]``: queries that see at least one compressed token (``i >= compress_block - 1``)."""
    return torch.arange(length, device=device) >= config.compress_block - 1


def fixed_weights(config: Hierarchical, length: int, device, dtype) -> list[torch.Tensor]:
    """The fixed-gate mix as three weight columns ``[L, 1]`` (compressed, selected, window): ``g / sum(g)`` where
    the query sees a compressed token, else ``(0, g_s, g_w) / (g_s + g_w)``; equal gates when ``config.gates`` is
    None. Built on the device with fills (no host-to-device copy, so no synchronisation)."""
    gates = config.gates or (1.0, 1.0, 1.0)
    rest = gates[1] + gates[2]
    every = [g / (gates[0] + rest) for g in gates]
    without = [0.0, gates[1] / rest, gates[2] / rest]  # no compressed token yet: the branch is empty
    empty = ~compressed_nonempty(config, length, device)[:, None]
    return [torch.full((length, 1), a, dtype=dtype, device=device).masked_fill_(empty, b)
            for a, b in zip(every, without, strict=True)]


def mix(outputs: list[torch.Tensor], config: Hierarchical, gate_logits: torch.Tensor | None, *,
        weights: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The gate mix ``sum_c w_c n_c o_c / sum_c w_c n_c`` of the branch outputs ``[B, H, L, Dv]``
    (compressed, selected, window); ``w = exp(gate_logits)`` or the fixed ``config.gates`` (equal if None).
    ``weights``: the fixed gates' :func:`fixed_weights` if already at hand (default ``None``: built here)."""
    ref = outputs[0]
    L = ref.shape[2]
    if gate_logits is None:
        weights = weights if weights is not None else fixed_weights(config, L, ref.device, ref.dtype)
    else:
        dtype = torch.promote_types(ref.dtype, torch.float32)
        nonempty = compressed_nonempty(config, L, ref.device)
        visible = torch.stack([nonempty, torch.ones_like(nonempty), torch.ones_like(nonempty)], -1)  # [L, 3]
        w = torch.softmax(torch.where(visible, gate_logits.to(dtype), -math.inf), -1).to(ref.dtype)
        weights = [w[..., c:c + 1] for c in range(3)]
    out = outputs[0] * weights[0]
    out = torch.addcmul(out, outputs[1], weights[1])
    return torch.addcmul(out, outputs[2], weights[2])


__all__ = ["check_inputs", "compress", "compressed_nonempty", "fixed_weights", "mix", "pool_weights"]
