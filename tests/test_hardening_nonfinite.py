"""Issue 11, items 3 and 4: a non-finite key/value reaches exactly the rows that attend it (every backend
that runs on CPU), and coverage reports non-finite input as such, never as perfect."""

from __future__ import annotations

import math

import pytest
import torch

import spattn
from spattn.testing import brute_force_mask

BACKENDS = ["reference", "dense", "flex"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_with_nan_values_and_keys(backend):
    ids = torch.tensor([[0] * 80 + [-1] * 16])
    q, k, v = torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 16)
    v[:, :, 80:] = float("nan")
    k[:, :, 88:] = float("inf")
    q[:, :, 90:] = float("nan")  # padded queries hold garbage too
    out = spattn.attention(q, k, v, spattn.Document(ids), causal=True, backend=backend, block_size=32)
    assert torch.isfinite(out[:, :, :80]).all()
    assert (out[:, :, 80:] == 0).all()  # padding attends nothing
    clean = spattn.attention(q[:, :, :80], k[:, :, :80], v[:, :, :80], spattn.Causal(), causal=True, backend=backend)
    torch.testing.assert_close(out[:, :, :80], clean)


@pytest.mark.parametrize("backend, what", [
    ("reference", "key"), ("reference", "value"), ("reference", "value-channel"),
    ("dense", "key"), ("dense", "value"), ("dense", "value-channel"),
    ("flex", "value"),  # eager flex is slow on CPU: its key path is the padding test's
])
def test_nan_reaches_exactly_the_rows_that_attend_it(backend, what):
    B, H, Hk, L, D = 1, 4, 2, 70, 8
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, Hk, L, D), torch.randn(B, Hk, L, D)
    pattern = spattn.Sinks(2) | spattn.Window(5)
    bad = 40
    if what == "key":
        k[:, 1, bad] = float("nan")
    elif what == "value":
        v[:, 1, bad] = float("nan")
    else:
        v[:, 1, bad, 3] = float("inf")
    out, lse = spattn.attention(q, k, v, pattern, causal=True, backend=backend, block_size=16, return_lse=True)
    attends = brute_force_mask(pattern, L, causal=True)[0, 0, :, bad]  # [L]
    heads = torch.tensor([False, False, True, True])  # query heads 2, 3 read kv head 1
    rows = heads[:, None] & attends[None, :]  # [H, L]
    poisoned = ~torch.isfinite(out[0])  # [H, L, D]
    if what == "value-channel":
        assert torch.equal(poisoned[..., 3], rows) and not poisoned[..., :3].any() and not poisoned[..., 4:].any()
    else:
        assert torch.equal(poisoned.any(-1), rows) and torch.equal(poisoned.all(-1), rows)
    assert torch.equal(torch.isnan(lse[0]), rows if what == "key" else torch.zeros_like(rows))
    # every other row is exactly what a clean input gives
    k2, v2 = k.clone(), v.clone()
    k2[:, 1, bad], v2[:, 1, bad] = 0.0, 0.0
    clean = spattn.attention(q, k2, v2, pattern, causal=True, backend=backend, block_size=16)
    torch.testing.assert_close(out[0][~rows], clean[0][~rows])


def test_nan_query_stays_in_its_row():
    q, k, v = torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8)
    q[0, 0, 7] = float("nan")
    for backend in BACKENDS:
        out = spattn.attention(q, k, v, spattn.Window(4), causal=True, backend=backend, block_size=16)
        bad = ~torch.isfinite(out[0, 0]).all(-1)
        assert bad.nonzero().flatten().tolist() == [7], backend


# -- coverage on non-finite input ---------------------------------------------------------------------------
def test_coverage_reports_nonfinite_rows_as_nan_and_counts_them():
    q, k, v = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    q[0, 0, 5] = float("nan")
    k[0, 1, 30] = float("inf")  # causal: rows 30.. of head 1 see it
    report = spattn.coverage.measure(q, k, spattn.Window(8), value=v, causal=True, block_size=16)
    bad = torch.zeros(2, 64, dtype=torch.bool)
    bad[0, 5] = True
    bad[1, 30:] = True
    for name in ("recall", "kl", "topk_overlap", "output_abs_error", "lse"):
        values = getattr(report, name)[0]
        assert torch.equal(torch.isnan(values), bad), name
    assert torch.isnan(report.output_error).all()  # both heads hold non-finite rows
    summary = report.summary()
    assert summary["nonfinite_rows"] == int(bad.sum())
    assert summary["overall"]["recall"]["mean"] < 1.0 or math.isnan(summary["overall"]["recall"]["mean"])
    assert "non-finite" in repr(report)
    clean = spattn.coverage.measure(q[:, :1, :5], k[:, :1, :5], spattn.Window(8), causal=True, block_size=16)
    torch.testing.assert_close(report.recall[:, :1, :5], clean.recall)


def test_coverage_all_nonfinite_is_never_perfect():
    q = torch.full((1, 1, 16, 4), float("nan"))
    report = spattn.coverage.measure(q, torch.randn(1, 1, 16, 4), spattn.Full(), causal=True)
    assert torch.isnan(report.recall).all()
    s = report.summary()
    assert s["nonfinite_rows"] == 16 and math.isnan(s["overall"]["recall"]["mean"])
