"""spattn.eval.stats.gap_closed: the share of the window -> dense perplexity gap, with a paired interval."""

import math

import pytest

from spattn.eval import stats


def test_gap_closed_against_its_definition():
    dense, window = [2.0, 2.2, 2.1, 1.9], [2.5, 2.6, 2.7, 2.4]
    ppl = lambda v: math.exp(sum(v) / len(v))  # noqa: E731 - the definition, once
    assert stats.gap_closed(dense, window, dense).value == pytest.approx(1.0)
    assert stats.gap_closed(window, window, dense).value == pytest.approx(0.0)
    half = [math.log((math.exp(w) + math.exp(d)) / 2) for w, d in zip(window, dense, strict=True)]
    result = stats.gap_closed(half, window, dense)
    expected = (ppl(window) - ppl(half)) / (ppl(window) - ppl(dense))
    assert result.value == pytest.approx(expected) and result.n == 4
    assert result.low <= result.value <= result.high
    worse = stats.gap_closed([3.0] * 4, window, dense)
    assert worse.value < 0 and worse.high < 0  # worse than the window on every resample
    assert math.isnan(stats.gap_closed(dense, dense, dense).value)  # no gap: nothing to close
    with pytest.raises(ValueError, match="same chunks"):
        stats.gap_closed([1.0], [1.0, 2.0], [1.0, 2.0])
