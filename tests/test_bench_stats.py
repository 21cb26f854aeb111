"""The search benchmarks' statistics (benchmarks/_stats.py) against hand-computed cases: the
figures the README quotes for searchers rest on them. Fast, no model; the parts that call scipy
(the `bench` extra, which tox installs) skip without it."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _stats  # noqa: E402  (the benchmarks import each other as top-level modules)


def test_a12_of_known_samples():
    assert _stats.a12([1, 2, 3], [1, 2, 3]) == 0.5
    assert _stats.a12([4, 5, 6], [1, 2, 3]) == 1.0
    assert _stats.a12([1, 2, 3], [4, 5, 6]) == 0.0
    # 2 vs (1, 2): one win, one tie; 3 vs (1, 2): two wins -> (1 + 0.5 + 2) / 4
    assert _stats.a12([2, 3], [1, 2]) == pytest.approx(0.875)
    # fewer is better: negate both, and the smaller sample wins
    assert _stats.a12([-10, -20], [-300, -400]) == 1.0
    with pytest.raises(ValueError):
        _stats.a12([], [1])


@pytest.mark.parametrize(("a", "label"), [
    (0.5, "negligible"), (0.555, "negligible"), (0.556, "small"), (0.638, "small"),
    (0.639, "medium"), (0.714, "medium"), (0.715, "large"), (1.0, "large"),
    # symmetric below 0.5
    (0.445, "negligible"), (0.444, "small"), (0.362, "small"), (0.36, "medium"),
    (0.286, "medium"), (0.28, "large"), (0.0, "large"),
])
def test_effect_labels_follow_vargha_delaney(a, label):
    assert _stats.effect_label(a) == label


def test_median_interval_ranks_for_ten():
    pytest.importorskip("scipy")
    low, high, coverage = _stats.median_ranks(10)
    # P(B <= 1) for B ~ binomial(10, 1/2) is 11/1024: coverage 1 - 22/1024
    assert (low, high) == (2, 9)
    assert coverage == pytest.approx(1 - 22 / 1024)
    assert round(coverage, 3) == 0.979
    m = _stats.median_interval([10, 1, 9, 2, 8, 3, 7, 4, 6, 5])
    assert (m.median, m.low, m.high) == (5.5, 2, 9)


def test_median_interval_needs_six_values():
    pytest.importorskip("scipy")
    assert _stats.median_ranks(5) is None  # (1, 5) covers 1 - 2/32 = 93.75%
    assert _stats.median_ranks(6)[:2] == (1, 6)  # 1 - 2/64 = 96.9%
    m = _stats.median_interval([3, 1, 2])
    assert (m.median, m.low, m.high) == (2, None, None)
    assert m.text() == "2 [n=3: none]"


def test_mann_whitney_agrees_with_hand_example():
    pytest.importorskip("scipy")
    # 3 vs 3 values, fully separated: U = 0; of the C(6, 3) = 20 equally likely rank splits
    # one gives U = 0 and one U = 9, so the exact two-sided p is 2/20
    test = _stats.mann_whitney([1, 2, 3], [4, 5, 6])
    assert (test.u, test.p) == (0.0, pytest.approx(0.1))
    # U / (m * n) is A12
    x, y = [3, 5, 5, 8, 9, 12, 1, 4], [2, 5, 6, 7, 1, 0, 3, 3]
    assert _stats.mann_whitney(x, y).u / 64 == pytest.approx(_stats.a12(x, y))
    comparison = _stats.compare([4, 5, 6], [1, 2, 3])
    assert comparison.text() == "A12 1.00 (large, better), U 9, p 0.1"
    assert _stats.compare([1, 2, 3], [4, 5, 6]).text() == "A12 0.00 (large, worse), U 0, p 0.1"


def test_count_curve_counts_events_by_each_time():
    pytest.importorskip("scipy")
    trials = [[1.0, 5.0], [2.0], [], [0.5, 0.7, 9.0], [3.0], [4.0, 4.5]]
    curve = _stats.count_curve(trials, [0.0, 2.0, 10.0])
    # per trial by t=2: 1, 1, 0, 2, 0, 0; by t=10: 2, 1, 0, 3, 1, 2
    assert curve.centre == [0, 0.5, 1.5]
    assert (curve.low[2], curve.high[2]) == (0, 3)  # 6 trials: ranks 1 and 6
    few = _stats.count_curve(trials[:2], [10.0])
    assert few.centre == [1.5] and math.isnan(few.low[0])


def test_share_curve():
    curve = _stats.share_curve([10, None, 30, 20], [0, 20, 100])
    assert curve.centre == [0.0, 0.5, 0.75]
    assert all(lo <= c <= hi for lo, c, hi in zip(curve.low, curve.centre, curve.high))


def test_png_writer(tmp_path):
    pytest.importorskip("scipy")
    curve = _stats.count_curve([[1.0], [2.0], [3.0], [1.5], [], [0.5]], [0, 1, 2, 3])
    path = _stats.write_curves_png(tmp_path / "c.png",
                                   [_stats.Panel("signatures", {"a": curve, "b": curve})],
                                   "title", "seconds")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
