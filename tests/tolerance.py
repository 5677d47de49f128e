"""The DESIGN.md tolerance rule: err(fast, golden) <= k * err(reference_lowp, golden) + eps."""

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_within(fast: torch.Tensor, golden: torch.Tensor, baseline: torch.Tensor, *, k: float = 2.0, eps: float = 1e-6, what: str = ""):
    assert not torch.isnan(fast).any(), f"{what}: NaN"
    e_fast, e_base = max_err(fast, golden), max_err(baseline, golden)
    assert e_fast <= k * e_base + eps, f"{what}: error {e_fast:.3e} > {k} x baseline {e_base:.3e} + {eps}"
