"""The DESIGN.md tolerance rule: ``err(fast, golden) <= k * err(baseline, golden) + eps`` on the max error."""

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference in float64; equal infinities (e.g. lse of empty rows) count as 0."""
    a, b = a.detach().double(), b.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_within(
    fast: torch.Tensor,
    golden: torch.Tensor,
    baseline: torch.Tensor,
    *,
    k: float = 2.0,
    eps: float = 1e-6,
    what: str = "",
) -> None:
    """Assert ``fast`` is within ``k`` times the baseline's own error of ``golden`` (plus ``eps``); no NaN allowed.

    ``golden`` is a float64 result from an independent oracle; ``baseline`` the same oracle run in the test dtype.
    """
    if fast.shape != golden.shape:
        raise AssertionError(f"{what}: shape {tuple(fast.shape)} != golden {tuple(golden.shape)}")
    assert not torch.isnan(fast).any(), f"{what}: NaN"
    e_fast, e_base = max_err(fast, golden), max_err(baseline, golden)
    assert e_fast <= k * e_base + eps, f"{what}: error {e_fast:.3e} > {k} x baseline {e_base:.3e} + {eps}"
