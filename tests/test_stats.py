"""jaxapr.stats and jaxapr.evaluation's summaries, against independent references."""

import math

import numpy as np
import pytest

from jaxapr import evaluation, stats


def _wilson_by_formula(k, n, z=1.959963984540054):
    # The textbook form: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n).
    p = k / n
    c = p + z * z / (2 * n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (c - h) / (1 + z * z / n), (c + h) / (1 + z * z / n)


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (91, 200), (455, 1000), (1, 1)])
def test_wilson_matches_formula_and_known_values(k, n):
    lo, hi = stats.wilson_interval(k, n)
    elo, ehi = _wilson_by_formula(k, n)
    assert lo == pytest.approx(max(0.0, elo), abs=1e-12) and hi == pytest.approx(min(1.0, ehi), abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_published_value():
    # Wilson (1927) / Newcombe (1998) example: 81 of 263 -> 0.2553 .. 0.3662.
    lo, hi = stats.wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)


def test_wilson_width_shrinks_with_n():
    w200 = np.subtract(*stats.wilson_interval(91, 200)[::-1])
    w1000 = np.subtract(*stats.wilson_interval(455, 1000)[::-1])
    assert w1000 < w200 / 2


@pytest.mark.parametrize(
    "bad",
    [dict(successes=3, n=0), dict(successes=5, n=4), dict(successes=-1, n=4), dict(successes=1, n=4, confidence=1.5)],
)
def test_wilson_bad_input(bad):
    with pytest.raises(ValueError, match="expected"):
        stats.wilson_interval(**bad)


def test_paired_bootstrap_covers_a_known_difference():
    rng = np.random.default_rng(0)
    n = 1000
    a = (rng.random(n) < 0.5).astype(float)
    # b agrees with a except on a 10% slice where a solved: the true difference is ~5 points.
    b = a.copy()
    flip = (rng.random(n) < 0.1) & (a == 1)
    b[flip] = 0
    r = stats.paired_bootstrap(a, b, num_resamples=2000)
    assert r["diff"] == pytest.approx(flip.mean())
    assert r["low"] < r["diff"] < r["high"] and r["low"] > 0  # b never beats a: the interval excludes 0
    # Pairing matters: the unpaired normal interval of the same difference is much wider.
    se_unpaired = math.sqrt(a.var() / n + b.var() / n)
    assert (r["high"] - r["low"]) < 2 * 1.96 * se_unpaired / 2
    same = stats.paired_bootstrap(a, a, num_resamples=500)
    assert same["diff"] == same["low"] == same["high"] == 0.0


def test_paired_bootstrap_is_deterministic_and_checks_input():
    a, b = np.arange(50) % 2, np.arange(50) % 3 == 0
    assert stats.paired_bootstrap(a, b, seed=3) == stats.paired_bootstrap(a, b, seed=3)
    with pytest.raises(ValueError, match="paired values on the same problems"):
        stats.paired_bootstrap([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        stats.paired_bootstrap([], [])
    with pytest.raises(ValueError, match="num_resamples"):
        stats.paired_bootstrap(a, b, num_resamples=10)


def test_bootstrap_mean_brackets_the_mean():
    x = np.random.default_rng(1).exponential(100.0, size=400)
    mean, lo, hi = stats.bootstrap_mean(x, num_resamples=2000)
    assert mean == pytest.approx(x.mean()) and lo < mean < hi
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / math.sqrt(len(x)), rel=0.15)


def test_summarize_reports_wilson_and_means():
    records = {
        "success": [1, 0, 1, 1],
        "total_tokens": [10, 20, 30, 40],
        "total_tokens_with_context": [15, 25, 35, 45],
        "sequential_tokens": [5, 6, 7, 8],
        "latency_steps": [4, 5, 6, 7],
        "children": [0, 2, 4, 2],
    }
    m = evaluation.summarize(records, seconds=8.0)
    assert m["accuracy"] == 0.75 and (m["accuracy_low"], m["accuracy_high"]) == stats.wilson_interval(3, 4)
    assert m["total_tokens"] == 25.0 and m["children"] == 2.0 and m["problems"] == 4
    assert m["seconds_per_problem"] == 2.0
    with pytest.raises(ValueError, match="no problems"):
        evaluation.summarize({k: [] for k in records}, 1.0)
