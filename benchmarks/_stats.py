"""The statistics the search benchmarks report, one copy for both (bench_search.py on planted
models, bench_search_real.py on the real Gemma 3 270M).

Why these: a search is a random process, so one run per searcher says little and a mean of a
few runs hides how skewed they are. Following Klees et al., "Evaluating Fuzz Testing" (CCS 2018)
and FuzzBench's analysis (google/fuzzbench, analysis/stat_tests.py), each searcher runs several
trials and is reported by
- its median with a distribution-free 95% interval (order statistics: no normality assumed);
- against the baseline (random generation): the Vargha-Delaney A12 effect size (how often one
  searcher's trial beats the other's) and the two-sided Mann-Whitney U test's p (whether the
  difference could be chance), both rank-based, so a budget-censored value (a search that found
  nothing) only has to rank above or below the others, not to have a true size;
- over time: the median and its interval of a count at each point of a grid (e.g. signatures
  saved by second t), or the share of trials that had found by then (Wilson interval).

scipy (the `bench` extra: pip install -e '.[bench]') computes the U test and the binomial ranks
of the median's interval; it is imported inside the functions that need it, so A12 and the
labels work without it. matplotlib draws on its Agg canvas, no pyplot (as fuzz/report/plots.py).
"""
from __future__ import annotations

import functools
import math
import statistics
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEVEL = 0.95

# Vargha & Delaney (2000), the A12 values matching Cohen's d of 0.2 / 0.5 / 0.8; FuzzBench's
# a12() states them as "Small > 0.556, Medium > 0.638, Large > 0.714".
SMALL, MEDIUM, LARGE = 0.556, 0.638, 0.714


def require_scipy() -> None:
    """Fails now, not after an hour of trials, where scipy is missing."""
    _scipy_stats()


def _scipy_stats() -> Any:
    try:
        from scipy import stats
    except ImportError:
        raise ImportError("the benchmarks' statistics need scipy: pip install -e '.[bench]' "
                          "(or .venv/bin/pip install 'scipy>=1.11')") from None
    return stats


def a12(x: Sequence[float], y: Sequence[float]) -> float:
    """Vargha-Delaney A12: the probability that a value drawn from `x` is greater than one
    drawn from `y`, ties counting half (0.5: no difference; 1.0: every x beats every y).

    "Greater" is the caller's notion of better: where fewer is better (prompts to the first
    finding), pass both samples negated. Pure Python, O(len(x) * len(y)): trials are few."""
    if not x or not y:
        raise ValueError(f"A12 needs two non-empty samples, got {len(x)} and {len(y)} values")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in x for b in y)
    return wins / (len(x) * len(y))


def effect_label(a: float) -> str:
    """The size of an A12 effect by Vargha and Delaney's thresholds, symmetric around 0.5
    (0.3 is as "medium" as 0.7; the direction is A12's side of 0.5): negligible below 0.556,
    small up to 0.638, medium up to 0.714, large above."""
    # rounded: 1 - 0.362 must read as 0.638 exactly, not 0.6380000000000001
    distance = round(max(a, 1.0 - a), 9)
    if distance > LARGE:
        return "large"
    if distance > MEDIUM:
        return "medium"
    if distance >= SMALL:
        return "small"
    return "negligible"


@dataclass(frozen=True)
class MannWhitney:
    u: float  # the U statistic of the first sample (its wins over the second, ties half)
    p: float  # two-sided


def mann_whitney(x: Sequence[float], y: Sequence[float]) -> MannWhitney:
    """scipy.stats.mannwhitneyu, two-sided, with scipy's defaults (exact below 8 values per
    sample without ties, else the normal approximation with tie and continuity corrections),
    as FuzzBench runs it. U is x's: U / (len(x) * len(y)) == a12(x, y)."""
    result = _scipy_stats().mannwhitneyu(list(x), list(y), alternative="two-sided")
    return MannWhitney(float(result.statistic), float(result.pvalue))


@dataclass(frozen=True)
class Comparison:
    """One searcher against the baseline, on values where greater is better."""

    a12: float
    u: float
    p: float

    @property
    def label(self) -> str:
        return effect_label(self.a12)

    def text(self) -> str:
        """'A12 0.80 (large, better), U 80, p 0.031': better or worse than the baseline, said
        beside the size, since a "large" effect may be either."""
        side = "" if self.label == "negligible" else ", better" if self.a12 > 0.5 else ", worse"
        return f"A12 {self.a12:.2f} ({self.label}{side}), U {self.u:g}, p {self.p:.2g}"


def compare(x: Sequence[float], y: Sequence[float]) -> Comparison:
    """x against y (greater is better: negate both where fewer is)."""
    test = mann_whitney(x, y)
    return Comparison(a12(x, y), test.u, test.p)


@functools.cache  # curves ask for the same n at every grid point
def median_ranks(n: int, level: float = LEVEL) -> tuple[int, int, float] | None:
    """The classic distribution-free interval of a median: the 1-based ranks (j, n + 1 - j) of
    the order statistics that bracket it, and its exact coverage 1 - 2 P(B <= j - 1) for B ~
    binomial(n, 1/2) (the number of values below the true median), j as large as keeps the
    coverage >= `level`. None when even (1, n) covers less: n < 6 at 95%.

    n = 10: ranks 2 and 9, coverage 97.9% (ranks 3 and 8 would cover only 89.1%)."""
    binom = _scipy_stats().binom
    best = None
    for j in range(1, n // 2 + 1):
        coverage = 1.0 - 2.0 * float(binom.cdf(j - 1, n, 0.5))
        if coverage < level:
            break
        best = (j, n + 1 - j, coverage)
    return best


@dataclass(frozen=True)
class MedianInterval:
    median: float
    low: float | None  # None: too few values for an interval at this level
    high: float | None
    coverage: float | None  # the interval's exact coverage (>= the level asked for)
    n: int

    def text(self, fmt: Callable[[float], str] = lambda v: f"{v:g}") -> str:
        """'376 [91, 977]', or '376 [n=3: none]' where there are too few values."""
        if self.low is None or self.high is None:
            return f"{fmt(self.median)} [n={self.n}: none]"
        return f"{fmt(self.median)} [{fmt(self.low)}, {fmt(self.high)}]"


def median_interval(values: Sequence[float], level: float = LEVEL) -> MedianInterval:
    """The median of `values` and its distribution-free interval (median_ranks)."""
    if not values:
        raise ValueError("the median of no values")
    ordered = sorted(values)
    ranks = median_ranks(len(ordered), level)
    if ranks is None:
        return MedianInterval(statistics.median(ordered), None, None, None, len(ordered))
    low, high, coverage = ranks
    return MedianInterval(statistics.median(ordered), ordered[low - 1], ordered[high - 1],
                          coverage, len(ordered))


@dataclass(frozen=True)
class Curve:
    """A statistic across trials at each point of a grid: its centre and its interval (NaN
    where there is none)."""

    x: list[float]
    centre: list[float]
    low: list[float]
    high: list[float]


def count_curve(event_times: Sequence[Sequence[float]], grid: Sequence[float],
                level: float = LEVEL) -> Curve:
    """Per trial, how many events (e.g. signatures saved) happened by each grid time; the
    median across trials at each time, and its interval (NaN with fewer than 6 trials)."""
    centre, low, high = [], [], []
    for t in grid:
        m = median_interval([sum(e <= t for e in events) for events in event_times], level)
        centre.append(m.median)
        low.append(math.nan if m.low is None else m.low)
        high.append(math.nan if m.high is None else m.high)
    return Curve(list(grid), centre, low, high)


def share_curve(first_times: Sequence[float | None], grid: Sequence[float]) -> Curve:
    """The share of trials whose event (e.g. the first finding) had happened by each grid
    point (None: never), with the Wilson 95% interval of that share (fuzz.report.intervals, the
    interval the project's reports use for a share)."""
    from fuzz.report.intervals import wilson_interval

    n = len(first_times)
    centre, low, high = [], [], []
    for t in grid:
        hits = sum(f is not None and f <= t for f in first_times)
        lo, hi = wilson_interval(hits, n)
        centre.append(hits / n if n else math.nan)
        low.append(lo)
        high.append(hi)
    return Curve(list(grid), centre, low, high)


@dataclass(frozen=True)
class Panel:
    """One plot: a y-axis label and a curve per searcher (in legend order)."""

    ylabel: str
    curves: Mapping[str, Curve]
    title: str = ""


def write_curves_png(path: str | Path, panels: Sequence[Panel], title: str, xlabel: str,
                     mark: tuple[float, str] | None = None) -> Path:
    """Panels side by side, one step line per searcher with its interval shaded, written
    atomically (fuzz.atomic) as a PNG; returns the path. Steps, not slopes: the counts change
    at events and hold in between. `mark`: an x and its label drawn as a dashed line on every
    panel (e.g. where the budget ends and the job's tail begins)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fuzz.atomic import write_atomic

    fig = Figure(figsize=(6.4 * len(panels), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, curve in panel.curves.items():
            (line,) = ax.step(curve.x, curve.centre, where="post", label=name)
            if any(not math.isnan(v) for v in curve.low):
                ax.fill_between(curve.x, curve.low, curve.high, step="post", alpha=0.2,
                                color=line.get_color(), linewidth=0)
        if mark is not None:
            ax.axvline(mark[0], color="grey", linestyle="--", linewidth=1, label=mark[1])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel.ylabel)
        if panel.title:
            ax.set_title(panel.title, fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.suptitle(textwrap.fill(title, 75 * len(panels)), fontsize="medium")
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path
