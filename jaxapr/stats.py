"""Intervals for reported figures: Wilson intervals for accuracies, bootstrap intervals for
means and for paired differences between two conditions evaluated on the same problems.

Every accuracy jaxapr reports carries a 95% Wilson score interval; every A-vs-B comparison a
paired bootstrap interval over problems (resampling problems, not rollouts, so the interval
covers the problem sample's noise that both conditions share).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def _check_confidence(confidence: float) -> float:
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence={confidence!r}: expected a value in (0, 1)")
    return float(confidence)


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return Z95 if confidence == 0.95 else NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n``: (low, high) in [0, 1].
    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 or n."""
    confidence = _check_confidence(confidence)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r}: expected a positive int (problems evaluated)")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes!r}: expected a count between 0 and n={n}")
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1 (rounding would leave it a hair inside).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def _as_vector(x: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(x, np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} has shape {arr.shape}: expected a non-empty 1-D sequence (one value per problem)")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds a non-finite value: expected finite per-problem values")
    return arr


def _resample_means(values: np.ndarray, num_resamples: int, seed: int) -> np.ndarray:
    """Means of ``num_resamples`` resamples (with replacement) of ``values`` [n, ...] over axis 0."""
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 100:
        raise ValueError(f"num_resamples={num_resamples!r}: expected an int >= 100")
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    out = np.empty((num_resamples,) + values.shape[1:])
    for start in range(0, num_resamples, 1000):  # bounded memory: 1,000 resamples at a time
        stop = min(start + 1000, num_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def bootstrap_mean(
    x: Sequence[float], *, confidence: float = 0.95, num_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of a per-problem mean (e.g. tokens
    or children per problem)."""
    confidence = _check_confidence(confidence)
    arr = _as_vector(x, "x")
    means = _resample_means(arr, num_resamples, seed)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(arr.mean()), float(lo), float(hi)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, num_resamples: int = 10_000, seed: int = 0
) -> dict:
    """The difference mean(a) - mean(b) of two conditions measured on the same problems
    (``a[i]`` and ``b[i]`` belong to problem i), with a percentile bootstrap interval that
    resamples problems: {"diff", "low", "high", "n", "p_a_better"} (the last is the share of
    resamples in which a's mean exceeds b's)."""
    confidence = _check_confidence(confidence)
    a, b = _as_vector(a, "a"), _as_vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a has {a.size} problems and b {b.size}: expected paired values on the same problems")
    diffs = _resample_means(a - b, num_resamples, seed)
    lo, hi = np.quantile(diffs, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {
        "diff": float(a.mean() - b.mean()),
        "low": float(lo),
        "high": float(hi),
        "n": int(a.size),
        "p_a_better": float((diffs > 0).mean()),
    }


def format_interval(value: float, low: float, high: float, percent: bool = True, digits: int = 1) -> str:
    """``'45.5% [42.4, 48.6]'`` (percent) or ``'2,265 [2,210, 2,320]'``."""
    if percent:
        return f"{100 * value:.{digits}f}% [{100 * low:.{digits}f}, {100 * high:.{digits}f}]"
    return f"{value:,.{digits}f} [{low:,.{digits}f}, {high:,.{digits}f}]"
