"""Regularisers against collapse of a learned block selection, each a small function for any training loop.

Inputs are the gate probabilities ``probs`` float ``[B, H, NQ, NK]`` (rows sum to 1 over ``visible``), the
visible blocks bool ``[.., NQ, NK]`` and, where needed, the chosen blocks bool ``[B, H, NQ, NK]``.

- :func:`entropy_loss`: ``1 - H(p) / log n`` per row (attention-entropy regularisation; minimise to keep the
  gate spread, against a gate that always names the same block).
- :func:`density_loss`: the expected density of a ``TopP(mass)`` selection from a soft count of the blocks
  needed, penalised above a target (the budget penalty).
- :func:`drop_blocks`: stochastic block pruning (each selected block dropped with probability ``rate`` in
  training; safeguards are not in the selection, so they are never dropped).
- :func:`balance_loss`: usage balance, the squared coefficient of variation of each key block's importance
  (Shazeer et al.'s importance loss, normalised so uniform gates score 0 under causal visibility).
"""

from __future__ import annotations

import torch


def _rows(probs: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if probs.dim() != 4:
        raise ValueError(f"probs must be [B, H, NQ, NK], got shape {tuple(probs.shape)}")
    visible = visible.expand_as(probs)
    count = visible.sum(-1)
    return probs, visible, count


def row_entropy(probs: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised entropy ``H(p) / log n`` per row ``[B, H, NQ]`` (0 peaked, 1 uniform) and the mask of rows
    with at least two visible blocks (others carry no choice and are left out of means)."""
    probs, visible, count = _rows(probs, visible)
    p = torch.where(visible, probs, torch.zeros_like(probs))
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
    ok = count >= 2
    return ent / torch.log(count.clamp_min(2).to(ent.dtype)), ok


def _mean(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    return (x * ok).sum() / ok.sum().clamp_min(1)


def entropy_loss(probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Scalar ``1 - mean normalised gate entropy`` over rows with a choice; minimising it spreads the gate.

    Args:
        probs: float ``[B, H, NQ, NK]``, rows summing to 1 over ``visible``.
        visible: bool ``[.., NQ, NK]`` (broadcast to ``probs``).
    """
    ent, ok = row_entropy(probs, visible)
    return 1.0 - _mean(ent, ok)


def soft_topp_count(probs: torch.Tensor, visible: torch.Tensor, mass: float, temperature: float = 0.02
                    ) -> torch.Tensor:
    """Differentiable count of the blocks ``TopP(mass)`` keeps per row ``[B, H, NQ]``: with the row sorted
    descending and ``before_c`` the mass of the strictly better blocks, block ``c`` counts
    ``sigmoid((mass - before_c) / temperature)`` (1 while the target is not reached, 0 after)."""
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    probs, visible, _ = _rows(probs, visible)
    p = torch.where(visible, probs, torch.zeros_like(probs))
    ranked = torch.sort(p, -1, descending=True).values
    before = ranked.cumsum(-1) - ranked
    live = torch.sort(visible.to(p.dtype), -1, descending=True).values  # visible cells first (p = 0 elsewhere)
    return (torch.sigmoid((mass - before) / temperature) * live).sum(-1)


def density_loss(probs: torch.Tensor, visible: torch.Tensor, target: float, *, mass: float = 0.9,
                 temperature: float = 0.02) -> torch.Tensor:
    """Scalar budget penalty ``relu(expected_density - target) ** 2``.

    ``expected_density`` is the mean over rows of (soft count of blocks ``TopP(mass)`` keeps) / (visible
    blocks): a gate that concentrates its mass needs fewer blocks. Args as :func:`entropy_loss`, plus
    ``target`` (density in (0, 1]), ``mass`` (default 0.9) and the soft-count ``temperature`` (0.02)."""
    if not 0 < target <= 1:
        raise ValueError(f"target must be a density in (0, 1], got {target!r}")
    _, visible, count = _rows(probs, visible)
    density = soft_topp_count(probs, visible, mass, temperature) / count.clamp_min(1)
    ok = count >= 1
    return torch.relu(_mean(density, ok) - target) ** 2


def expected_density(probs: torch.Tensor, visible: torch.Tensor, *, mass: float = 0.9) -> torch.Tensor:
    """Scalar: mean over rows of (blocks a hard ``TopP(mass)`` keeps) / (visible blocks); the metric that
    :func:`density_loss` lowers."""
    _, visible, count = _rows(probs, visible)
    p = torch.where(visible, probs, torch.zeros_like(probs))
    ranked = torch.sort(p, -1, descending=True).values
    before = ranked.cumsum(-1) - ranked
    kept = ((before < mass) & (ranked > 0)).sum(-1)
    ok = count >= 1
    return _mean(kept / count.clamp_min(1), ok)


def drop_blocks(chosen: torch.Tensor, rate: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic block pruning: bool ``[..., NK]`` with each selected block dropped with probability ``rate``.

    Use in training only (the trainer does). ``rate`` in [0, 1); 0 returns ``chosen`` unchanged."""
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1), got {rate!r}")
    if rate == 0:
        return chosen
    noise = torch.rand(chosen.shape, generator=generator, device=chosen.device)
    return chosen & (noise >= rate)


def importance(probs: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block ``[B, H, NK]``: mean over the rows that see it of ``p * n_row`` (1 for a uniform gate),
    and the mask of key blocks some row sees."""
    probs, visible, count = _rows(probs, visible)
    scaled = torch.where(visible, probs * count[..., None], torch.zeros_like(probs))
    seen = visible.sum(-2)
    return scaled.sum(-2) / seen.clamp_min(1), seen > 0


def balance_loss(probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Scalar usage-balance term: squared coefficient of variation of :func:`importance` over the key blocks
    seen (0 when every key block gets its fair share; large when a few blocks take every row's mass)."""
    imp, seen = importance(probs, visible)
    n = seen.sum(-1).clamp_min(1)
    mean = (imp * seen).sum(-1) / n
    var = (((imp - mean[..., None]) ** 2) * seen).sum(-1) / n
    cv2 = var / mean.clamp_min(1e-12) ** 2
    return cv2.mean()


__all__ = ["entropy_loss", "density_loss", "expected_density", "soft_topp_count", "drop_blocks", "balance_loss",
           "importance", "row_entropy"]
