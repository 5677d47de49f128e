"""Uncertainty for the report: per-segment sums of token scores, percentile-bootstrap intervals over segments,
and the paired tie rule that decides whether two candidates differ.

Tokens of one text are not independent, so the unit of resampling is a segment of ``SEGMENT`` consecutive
predicted tokens (a block bootstrap), never a single token.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SEGMENT = 64
RESAMPLES = 1000
CONFIDENCE = 0.95


def segment_sums(scores: dict[str, torch.Tensor], segment: int = SEGMENT) -> dict[str, list[float]]:
    """Sums of each per-token score over consecutive segments, plus the token count of each segment.

    ``scores``: ``{"nll": [N], "agree": [N], "kl": [N]}`` (e.g. :func:`spattn.eval.lm.token_scores`)."""
    n = next(iter(scores.values())).numel()
    edges = list(range(0, n, segment)) + [n]
    out: dict[str, list[float]] = {name: [float(v[a:b].sum()) for a, b in zip(edges, edges[1:], strict=False)]
                                   for name, v in scores.items()}
    out["tokens"] = [float(b - a) for a, b in zip(edges, edges[1:], strict=False)]
    return out


def merge(parts: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Concatenate the segment lists of several chunks."""
    out: dict[str, list[float]] = {}
    for part in parts:
        for name, values in part.items():
            out.setdefault(name, []).extend(values)
    return out


def _indices(n: int, seed: int, resamples: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (resamples, n), generator=gen)


def _ratio(num: torch.Tensor, den: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return num[idx].sum(-1) / den[idx].sum(-1)


def _bounds(values: torch.Tensor, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    q = torch.quantile(values.double(), torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(q[0]), float(q[1])


def summarise(seg: dict[str, list[float]], *, seed: int = 0, resamples: int = RESAMPLES,
              confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Point estimates and bootstrap intervals of perplexity, top-1 agreement and mean KL from segment sums."""
    tok = torch.tensor(seg["tokens"], dtype=torch.float64)
    idx = _indices(len(tok), seed, resamples)
    out: dict[str, Any] = {"tokens": int(tok.sum()), "segments": len(tok), "confidence": confidence}
    nll = torch.tensor(seg["nll"], dtype=torch.float64)
    out["perplexity"] = math.exp(float(nll.sum() / tok.sum()))
    out["perplexity_interval"] = [math.exp(x) for x in _bounds(_ratio(nll, tok, idx), confidence)]
    for name, key in (("agree", "top1_agreement"), ("kl", "kl")):
        if name in seg:
            v = torch.tensor(seg[name], dtype=torch.float64)
            out[key] = float(v.sum() / tok.sum())
            out[key + "_interval"] = list(_bounds(_ratio(v, tok, idx), confidence))
    return out


def paired_difference(a: dict[str, list[float]], b: dict[str, list[float]], *, metric: str = "nll", seed: int = 0,
                      resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean per-token ``metric`` of ``a`` minus ``b`` on the same segments, with a paired bootstrap interval.

    ``tie`` is True when the interval contains 0: the data cannot tell the two apart."""
    ta, tb = torch.tensor(a["tokens"], dtype=torch.float64), torch.tensor(b["tokens"], dtype=torch.float64)
    if not torch.equal(ta, tb):
        raise ValueError("paired_difference needs the two candidates scored on the same segments")
    diff = torch.tensor(a[metric], dtype=torch.float64) - torch.tensor(b[metric], dtype=torch.float64)
    idx = _indices(len(ta), seed, resamples)
    lo, hi = _bounds(_ratio(diff, ta, idx), confidence)
    return {"difference": float(diff.sum() / ta.sum()), "interval": [lo, hi], "tie": lo <= 0.0 <= hi}
