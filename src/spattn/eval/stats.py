"""Uncertainty for every metric: percentile bootstrap intervals over examples (and over seeds), paired
comparisons that call a difference inside its interval a tie.

* :func:`bootstrap_interval`: interval of a statistic (default the mean) of per-example values
  (scipy's ``stats.bootstrap``, percentile method).
* :func:`estimate`: the statistic and its interval in one small record (:class:`Estimate`).
* :func:`seed_interval`: two-level bootstrap for trained models: resample seeds, then examples within each
  resampled seed, so the interval holds the training noise as well as the test-set noise.
* :func:`compare`: paired bootstrap of ``mean(a - b)`` over the same examples; ``"tie"`` when the interval
  contains 0.

scipy comes with the ``eval`` extra (``pip install 'spattn[eval]'``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from spattn._optional import require


def _values(values: Any, name: str) -> list[float]:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().flatten().double().tolist()
    try:
        out = [float(v) for v in values]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}") from None
    if not out:
        raise ValueError(f"{name} must hold at least one value")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite numbers (no NaN or inf)")
    return out


def _check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    return float(confidence)


def _check_resamples(resamples: int) -> int:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    return resamples


def bootstrap_interval(
    values: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
    statistic: Callable[..., Any] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of ``statistic`` (default: the mean) over examples.

    Args:
        values: one number per example (e.g. 0/1 exact-match scores), a list or a 1-D tensor.
        confidence: coverage of the interval (default 0.95).
        resamples: bootstrap resamples (default 1000).
        seed: seed of the resampling (the same inputs and seed give the same interval).
        statistic: ``f(sample, axis=-1)`` on a NumPy array (vectorised, as ``numpy.mean``); default the mean.

    A single value, or values that are all equal, give the degenerate interval ``(v, v)``.

    Example:
        >>> low, high = bootstrap_interval([1, 0, 1, 1, 0, 1, 1, 1])
        >>> low <= 0.75 <= high
        True
    """
    data = _values(values, "values")
    _check_confidence(confidence)
    _check_resamples(resamples)
    np = require("numpy", extra="eval")
    statistic = np.mean if statistic is None else statistic
    if len(data) == 1 or min(data) == max(data):
        point = float(statistic(np.asarray(data), axis=-1))
        return point, point
    stats = require("scipy.stats", extra="eval")
    result = stats.bootstrap(
        (np.asarray(data),), statistic, confidence_level=confidence, n_resamples=resamples, method="percentile",
        vectorized=True, rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass(frozen=True)
class Estimate:
    """A metric with its bootstrap interval: ``value`` (the statistic on all data), ``low``/``high``,
    the ``confidence`` and ``n`` (examples, or seeds for :func:`seed_interval`)."""

    value: float
    low: float
    high: float
    confidence: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def estimate(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 1000, seed: int = 0) -> Estimate:
    """The mean of ``values`` with its percentile bootstrap interval (see :func:`bootstrap_interval`)."""
    data = _values(values, "values")
    low, high = bootstrap_interval(data, confidence=confidence, resamples=resamples, seed=seed)
    return Estimate(value=sum(data) / len(data), low=low, high=high, confidence=confidence, n=len(data))


def seed_interval(
    groups: Sequence[Sequence[float]], *, confidence: float = 0.95, resamples: int = 1000, seed: int = 0
) -> Estimate:
    """Mean over seeds of the per-seed mean, with a two-level bootstrap interval.

    Args:
        groups: one sequence of per-example values per training seed (``[[0, 1, 1], [1, 1, 0]]``).
        confidence, resamples, seed: as :func:`bootstrap_interval`.

    Each resample draws seeds with replacement, then examples with replacement within each drawn seed, and
    takes the mean of the per-seed means. With one seed this is the example bootstrap.
    """
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
        raise ValueError("groups must be a non-empty sequence of per-seed value sequences")
    data = [_values(g, f"groups[{i}]") for i, g in enumerate(groups)]
    _check_confidence(confidence)
    _check_resamples(resamples)
    np = require("numpy", extra="eval")
    means = [sum(g) / len(g) for g in data]
    point = sum(means) / len(means)
    if len(data) == 1:
        low, high = bootstrap_interval(data[0], confidence=confidence, resamples=resamples, seed=seed)
        return Estimate(value=point, low=low, high=high, confidence=confidence, n=1)
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(g) for g in data]
    picks = rng.integers(0, len(arrays), size=(resamples, len(arrays)))
    totals = np.zeros(resamples)
    for slot in range(len(arrays)):  # every drawn seed gets its own resample of its examples
        for s, values in enumerate(arrays):
            chosen = picks[:, slot] == s
            count = int(chosen.sum())
            if count:
                totals[chosen] += values[rng.integers(0, len(values), size=(count, len(values)))].mean(axis=1)
    samples = totals / len(arrays)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return Estimate(value=point, low=float(low), high=float(high), confidence=confidence, n=len(data))


@dataclass(frozen=True)
class Comparison:
    """Paired comparison of two configurations on the same examples.

    ``winner`` is ``"a"``, ``"b"`` or ``"tie"`` (the paired-bootstrap interval of ``mean(a - b)`` contains 0);
    ``difference`` is ``mean(a) - mean(b)`` with its interval ``low``/``high``."""

    winner: str
    difference: float
    low: float
    high: float
    confidence: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.winner} (a - b = {self.difference:+.3f} [{self.low:+.3f}, {self.high:+.3f}])"


def compare(
    a_values: Sequence[float],
    b_values: Sequence[float],
    *,
    confidence: float = 0.95,
    seed: int = 0,
    resamples: int = 1000,
    higher_is_better: bool = True,
) -> Comparison:
    """Paired bootstrap comparison of per-example scores of two configurations on the same examples.

    Args:
        a_values, b_values: one score per example, the same examples in the same order (equal lengths).
        confidence: coverage of the interval of ``mean(a - b)`` (default 0.95).
        seed, resamples: as :func:`bootstrap_interval`.
        higher_is_better: ``False`` for losses (perplexity, error): then the lower mean wins.

    Returns a :class:`Comparison`: ``"tie"`` when the interval contains 0, else the better side.

    Example:
        >>> compare([1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]).winner
        'a'
    """
    a = _values(a_values, "a_values")
    b = _values(b_values, "b_values")
    if len(a) != len(b):
        raise ValueError(f"a_values and b_values must score the same examples: got {len(a)} and {len(b)} values")
    differences = [x - y for x, y in zip(a, b, strict=True)]
    low, high = bootstrap_interval(differences, confidence=confidence, resamples=resamples, seed=seed)
    difference = sum(differences) / len(differences)
    if low <= 0 <= high:
        winner = "tie"
    else:
        winner = "a" if (difference > 0) == higher_is_better else "b"
    return Comparison(winner=winner, difference=difference, low=low, high=high, confidence=confidence, n=len(a))


def gap_closed(
    candidate_nll: Sequence[float],
    window_nll: Sequence[float],
    dense_nll: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> Estimate:
    """Share of the baseline -> dense perplexity gap a candidate closes, with a paired bootstrap interval.

    Args:
        candidate_nll, window_nll, dense_nll: mean next-token loss (nats per token) of each configuration on
            the same chunks of equal length, one value per chunk, in the same order.
        confidence, resamples, seed: as :func:`bootstrap_interval`.

    Value: ``(ppl_window - ppl_candidate) / (ppl_window - ppl_dense)`` with ``ppl = exp(mean nll)`` over the
    chunks (1 = as good as dense, 0 = no better than the window, < 0 worse); each resample draws chunks with
    replacement, the same chunks for the three configurations. A resample with no gap (``ppl_window <=
    ppl_dense``) is left out; a value of NaN means there is no gap on the chunks given.

    Example:
        >>> gap_closed([2.0, 2.2], [2.4, 2.6], [1.9, 2.1]).value  # doctest: +ELLIPSIS
        0.8...
    """
    c = _values(candidate_nll, "candidate_nll")
    w = _values(window_nll, "window_nll")
    d = _values(dense_nll, "dense_nll")
    if not len(c) == len(w) == len(d):
        raise ValueError(f"candidate_nll, window_nll and dense_nll must score the same chunks: got {len(c)}, "
                         f"{len(w)} and {len(d)} values")
    _check_confidence(confidence)
    _check_resamples(resamples)
    np = require("numpy", extra="eval")
    arrays = np.asarray([c, w, d])

    def ratio(rows):  # rows [3, ..., n] -> [...]
        cand, win, dense = np.exp(rows.mean(-1))
        gap = win - dense
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap > 0, (win - cand) / gap, np.nan)

    point = float(ratio(arrays))
    if len(c) == 1 or not math.isfinite(point):
        return Estimate(value=point, low=point, high=point, confidence=confidence, n=len(c))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(c), size=(resamples, len(c)))
    values = ratio(arrays[:, picks])
    values = values[np.isfinite(values)]
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha]) if values.size else (point, point)
    return Estimate(value=point, low=float(low), high=float(high), confidence=confidence, n=len(c))
