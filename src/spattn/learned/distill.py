"""Gate distillation for a frozen model (SeerAttention's recipe) and the target it is trained against.

Target: the dense attention mass pooled to (query block, key block) cells (``spattn.coverage.block_mass``,
streamed, never an L x L tensor), normalised per query block: ``t[b, c]`` = share of block ``b``'s softmax
mass that falls in key block ``c``. Loss: ``KL(t || softmax(gate logits))`` averaged over rows, the base model
frozen (only the gate learns). Block-*max* pooling (SeerAttention's choice) is ``reduce="max"``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from spattn.coverage.mass import block_mass
from spattn.learned.gate import BlockGate

REDUCES = ("sum", "max")


def block_targets(query: torch.Tensor, key: torch.Tensor, block_size: int, *, causal: bool = True,
                  scale: float | None = None, reduce: str = "sum") -> torch.Tensor:
    """float32 ``[B, H, NQ, NK]``: per query block, the dense attention mass (``"sum"``) or block-max
    probability (``"max"``) per key block, normalised to sum to 1 (rows with no visible key stay 0).

    query ``[B, H, Lq, D]``, key ``[B, Hkv, Lk, D]``. Computed without gradients."""
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    with torch.no_grad():
        mass = block_mass(query.detach(), key.detach(), block_size, causal, scale=scale)
        t = (mass.sum if reduce == "sum" else mass.max).float()
        return t / t.sum(-1, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)


def distill_loss(logits: torch.Tensor, visible: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scalar ``mean_rows KL(target || softmax(logits))`` over the visible blocks (rows without target mass
    are left out).

    Args:
        logits: float ``[B, H, NQ, NK]`` (e.g. ``BlockGate.logits``); visible: bool ``[.., NQ, NK]``;
        target: float ``[B, H, NQ, NK]`` rows summing to 1 (``block_targets``).
    """
    visible = visible.expand_as(logits)
    logp = torch.log_softmax(logits.masked_fill(~visible, -math.inf), -1)
    t = torch.where(visible, target.to(logits.dtype), torch.zeros_like(logits))
    kl = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-30)) - logp), torch.zeros_like(t)).sum(-1)
    rows = t.sum(-1) > 0
    return (kl * rows).sum() / rows.sum().clamp_min(1)


def train_gate(
    gate: BlockGate,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int = 200,
    lr: float = 1e-3,
    causal: bool = True,
    scale: float | None = None,
    reduce: str = "sum",
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fit ``gate`` to the block targets of captured ``(query [B, H, L, D], key [B, Hkv, L, D])`` pairs with
    AdamW and a cosine learning rate; the targets are computed once. Returns the loss per step."""
    if not pairs:
        raise ValueError("pairs must hold at least one (query, key) pair")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    targets = [block_targets(q, k, gate.block_size, causal=causal, scale=scale, reduce=reduce) for q, k in pairs]
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.01)
    losses = []
    for step in range(steps):
        q, k = pairs[step % len(pairs)]
        logits, visible = gate.logits(q, k, causal=causal)
        loss = distill_loss(logits, visible, targets[step % len(pairs)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step, losses[-1])
    return losses


def distill(
    model: torch.nn.Module,
    chunks: torch.Tensor,
    *,
    block_size: int = 64,
    hidden: int = 64,
    steps: int = 200,
    lr: float = 1e-3,
    layers: Sequence[int] | None = None,
    reduce: str = "sum",
    path: str | os.PathLike | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    device: torch.device | str | None = None,
) -> dict[int, BlockGate]:
    """Distil one :class:`BlockGate` per layer of a **frozen** Hugging Face model.

    The model runs once per chunk (no gradients) to capture each layer's queries and keys
    (``spattn.capture``); each layer's gate is then trained for ``steps`` steps on those captures
    (:func:`train_gate`). With ``path`` the gates are saved (safetensors) for :func:`spattn.learned.load`.

    Args:
        model: a transformers causal LM (Llama-style: SmolLM2 via ``spattn.integrations.models.load_smollm2``).
        chunks: int64 token ids ``[C, L]`` (e.g. ``spattn.data.text_chunks("austen", tokenizer, 2048,
            split="calibration")``).
        block_size: gate block size (64, SeerAttention's); hidden: gate width (64).
        steps, lr: training steps per layer and the AdamW learning rate (cosine schedule).
        layers: which layers get a gate (default all).
        reduce: target pooling, ``"sum"`` (mass, default) or ``"max"`` (SeerAttention's block max).
        progress: optional ``progress(layer_index, layers_total, final_loss)`` callback.
        device: where the gates train (default: the model's device); captures stay on the CPU between layers.

    Returns:
        ``{layer: BlockGate}`` (gates on CPU; the ``meta`` saved with them holds the final losses).
    """
    from spattn.integrations.capture import capture  # layer 5 (integrations): imported where used, never at import time
    from spattn.learned.checkpoint import save_gates

    if not isinstance(chunks, torch.Tensor) or chunks.dim() != 2 or chunks.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"chunks must be int64 token ids [C, L], got {getattr(chunks, 'dtype', type(chunks))}")
    model.requires_grad_(False)
    caps = [capture(model, chunks[i:i + 1], layers=None if layers is None else list(layers), mode="full")
            for i in range(chunks.shape[0])]
    first = caps[0]
    if device is None:
        device = next(model.parameters()).device
    wanted = first.layers
    gates: dict[int, BlockGate] = {}
    final: dict[str, float] = {}
    for n, layer in enumerate(wanted):
        q0, k0 = first.queries[layer], first.keys[layer]
        gate = BlockGate(q0.shape[1], k0.shape[1], q0.shape[-1], block_size=block_size, hidden=hidden).to(device)
        pairs = [(c.queries[layer].to(device), c.keys[layer].to(device)) for c in caps]
        losses = train_gate(gate, pairs, steps=steps, lr=lr, causal=first.causal, scale=first.scale, reduce=reduce)
        gate.requires_grad_(False)
        gates[layer] = gate.cpu()
        del pairs
        final[str(layer)] = losses[-1]
        if progress is not None:
            progress(n, len(wanted), losses[-1])
    if path is not None:
        meta: dict[str, Any] = {"model": first.meta.get("model"), "chunks": int(chunks.shape[0]),
                                "chunk_length": int(chunks.shape[1]), "steps": steps, "lr": lr, "reduce": reduce,
                                "causal": first.causal, "scale": first.scale, "final_loss": final}
        save_gates(Path(path), gates, meta=meta)
    return gates


__all__ = ["block_targets", "distill_loss", "train_gate", "distill", "REDUCES"]
