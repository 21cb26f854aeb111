"""The report's plots: max |x| and headroom per layer for one verdict, as a figure or a PNG.

Plots use matplotlib's Agg canvas directly (``FigureCanvasAgg`` on a ``Figure``), never pyplot:
nothing global is switched, so importing this module, or rendering from inside a notebook or a
pytest run that uses another backend, changes no one's backend. matplotlib is imported lazily,
inside the functions that draw: importing fuzz.report costs no matplotlib import.
"""
from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuzz.atomic import write_atomic
from fuzz.report.describe import (
    fmt_value,
    layer_site_text,
    prompt_literal,
)
from fuzz.search.accounting import DTYPE_MAX, RunSummary
from fuzz.verdict import FLOAT16_MAX, Verdict

# Site groups drawn as one line each (max over the group's sites at each layer). Names are those
# the engine records (fuzz.engine.interface.LAYER_SITES, plus embedding, final_norm and logits).
SITE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("residual stream", ("embedding", "residual_attn", "residual_mlp")),
    ("norm outputs", ("input_layernorm", "post_attention_layernorm",
                      "pre_feedforward_layernorm", "post_feedforward_layernorm", "final_norm")),
    ("MLP activation/output", ("mlp_act", "mlp_output")),
    ("attention qkv/scores/output", ("qkv", "attn_scores", "attn_output")),
    ("logits", ("logits",)),
)
GROUP_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e")


@dataclass
class _Series:
    label: str
    color: str
    x: list[int] = field(default_factory=list)
    y: list[float] = field(default_factory=list)  # finite, > 0 (drawable on a log axis)
    bad_x: list[int] = field(default_factory=list)  # x where some value was inf/nan

    def add(self, x: int, values: list[float], bad: bool,
            reduce: Callable[[list[float]], float] = max) -> None:
        """A layer where a site was inf/nan still shows its finite sites (at the overflow layer
        that is the other residual add, e.g. 61200 just under 65504), plus a marker."""
        if bad:
            self.bad_x.append(x)
        drawable = [v for v in values if math.isfinite(v) and v > 0]
        if drawable:
            self.x.append(x)
            self.y.append(reduce(drawable))

    def finish(self) -> _Series | None:
        order = sorted(range(len(self.x)), key=self.x.__getitem__)
        self.x, self.y = [self.x[i] for i in order], [self.y[i] for i in order]
        self.bad_x.sort()
        return self if (self.x or self.bad_x) else None


def _layer_axis(verdict: Verdict) -> tuple[list[str], dict[str, int]]:
    """x positions: embedding, 0..L-1, head (in that order)."""
    n = verdict.num_layers
    labels = ["embedding", *map(str, range(n)), "head"]
    return labels, {label: i for i, label in enumerate(labels)}


def _group_series(table: dict[str, dict[str, float]], xpos: dict[str, int], label: str,
                  sites: tuple[str, ...], color: str) -> _Series | None:
    """Max |x| over a group's sites at each layer."""
    s = _Series(label, color)
    for layer, values in table.items():
        picked = [values[site] for site in sites if site in values]
        if layer in xpos and picked:
            s.add(xpos[layer], picked, not all(math.isfinite(v) for v in picked))
    return s.finish()


def _headroom_series(verdict: Verdict, xpos: dict[str, int], content_only: bool, label: str,
                     color: str) -> _Series | None:
    """Min headroom over every site at each layer (0 marks an inf/nan site); against float16's
    limit for a wider dtype (Verdict.wider_than_float16), as the report's tables give it."""
    s = _Series(label, color)
    against = FLOAT16_MAX if verdict.wider_than_float16 else None
    for layer, sites in verdict.headroom(content_only, against).items():
        values = list(sites.values())
        if layer in xpos and values:
            bad = any(v == 0 for v in values)
            # The min over sites IS 0 there: no finite point, or a layer whose attention already
            # read NaN would seem to recover through its still-finite norm output.
            s.add(xpos[layer], [] if bad else values, bad, reduce=min)
    return s.finish()


def _dtype_name(limit: float) -> str:
    for name, value in DTYPE_MAX.items():
        if math.isclose(limit, value, rel_tol=1e-6):
            return name
    return "dtype"


@functools.lru_cache(maxsize=1)
def _font_charmap() -> frozenset[int]:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    path = font_manager.findfont(font_manager.FontProperties())
    return frozenset(FT2Font(path).get_charmap())


def plot_text(text: str, limit: int = 60) -> str:
    """A prompt for a plot title: repr-escaped, shortened, characters the font lacks as \\uXXXX
    (so matplotlib draws no empty boxes), and '$' escaped (it would start mathtext)."""
    literal = prompt_literal(text)
    if len(literal) > limit:
        literal = literal[: limit - 4] + "...'"
    charmap = _font_charmap()
    out = []
    for ch in literal:
        if ord(ch) in charmap or ch == " ":
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out).replace("$", r"\$")


def default_title(verdict: Verdict) -> str:
    state = {"nonfinite": "non-finite"}.get(verdict.status, verdict.status)
    return (f"{verdict.policy}: {plot_text(verdict.prompt)} "
            f"({'BOS' if verdict.add_bos else 'no BOS'}, {state})")


def verdict_figure(verdict: Verdict, title: str | None = None, dpi: int = 100) -> Any:
    """A matplotlib Figure (on an Agg canvas, no pyplot) with two stacked panels: max |x| per
    layer for each site group, and headroom per layer (min over sites)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax_max, ax_head = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    labels, xpos = _layer_axis(verdict)
    _draw_max_abs(ax_max, verdict, xpos)
    _draw_headroom(ax_head, verdict, xpos)
    _mark_first_nonfinite((ax_max, ax_head), verdict, xpos)
    step = max(1, len(labels) // 24)  # keep tick labels readable for 46-layer models
    ticks = list(range(0, len(labels), step))
    if ticks[-1] != len(labels) - 1:
        ticks.append(len(labels) - 1)
    ax_head.set_xticks(ticks, [("emb" if labels[t] == "embedding" else labels[t]) for t in ticks])
    ax_head.set_xlabel("layer")
    ax_head.set_xlim(-0.5, len(labels) - 0.5)
    fig.suptitle(title or default_title(verdict), fontsize=11)
    # Fixed margins: tight_layout measured ~1 s per figure here (it lays out every tick label
    # twice), more than everything else in the report together.
    fig.subplots_adjust(left=0.08, right=0.70, bottom=0.08, top=0.93, hspace=0.08)
    return fig


def render_png(verdict: Verdict, title: str | None = None, dpi: int = 100) -> bytes:
    """verdict_figure() as PNG bytes."""
    buffer = io.BytesIO()
    verdict_figure(verdict, title, dpi).savefig(buffer, format="png")
    return buffer.getvalue()


def render_plots(summary: RunSummary) -> dict[str, bytes]:
    """One PNG per policy that has something to plot, keyed by the policy's name, and a heat
    map per mapped finding, keyed by fuzz.report.heatmap.finding_key."""
    from fuzz.report.heatmap import finding_heatmaps

    plots = {}
    for p in summary.policies:
        verdict = p.plotted()
        if verdict is not None:
            plots[p.policy] = render_png(verdict)
    return plots | finding_heatmaps(summary)


def plot_verdict(verdict: Verdict, path: str | Path, title: str | None = None) -> Path:
    """Writes the verdict's plot as a PNG at `path` (for `fuzz check --plot`); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot path {str(path)!r} must end in .png (the plot is a PNG image)")
    write_atomic(path, render_png(verdict, title))
    return path


def _legend(ax: Any) -> None:
    """Legend to the right of the axes: inside, it hid the early layers' lines."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              framealpha=0.9)


def _log_y(ax: Any) -> None:
    """Log y axis with decade ticks only: minor ticks cost a Tick object each (a third of the
    render time measured here) and add nothing a reader needs at this size."""
    from matplotlib.ticker import LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
    ax.yaxis.set_minor_locator(NullLocator())


def _draw_max_abs(ax: Any, verdict: Verdict, xpos: dict[str, int]) -> None:
    series = [s for (label, sites), color in zip(SITE_GROUPS, GROUP_COLORS, strict=True)
              if (s := _group_series(verdict.max_abs, xpos, label, sites, color)) is not None]
    finite_values = [y for s in series for y in s.y]
    data_top = max(finite_values, default=1.0)
    data_bottom = min(finite_values, default=1.0)
    limits = sorted({v for v in verdict.limits.values() if math.isfinite(v)})
    # A limit far above the data (float32's 3.4e38) would squash the plot into its bottom
    # decades: draw only limits within 1e4x of the data, and name the others in the legend.
    shown = [lim for lim in limits if lim <= data_top * 1e4]
    top = max([data_top, *shown]) * 4
    for s in series:
        ax.plot(s.x, s.y, marker="o", ms=3.5, lw=1.6, color=s.color, label=s.label)
        if s.bad_x:
            # inf/nan cannot be plotted on a log axis: pin them to the top edge.
            ax.scatter(s.bad_x, [top] * len(s.bad_x), marker="X", s=70, color=s.color,
                       edgecolors="black", linewidths=0.6, zorder=5, clip_on=False)
    if verdict.add_bos:  # the BOS sink dominates the residual; show the prompt's own values too
        content = _group_series(verdict.content_max_abs, xpos, "residual stream, excluding BOS",
                                SITE_GROUPS[0][1], GROUP_COLORS[0])
        if content is not None and content.y and (not series or content.y != series[0].y):
            ax.plot(content.x, content.y, ls=":", lw=1.5, color=content.color,
                    label=content.label)
    for lim in limits:
        name = f"{_dtype_name(lim)} max = {fmt_value(lim)}"
        if lim in shown:
            ax.axhline(lim, color="black", ls="--", lw=1, label=name)
        else:
            ax.plot([], [], " ", label=f"{name} (off the chart)")
    if any(s.bad_x for s in series):
        ax.scatter([], [], marker="X", s=70, color="white", edgecolors="black",
                   label="inf/nan (drawn at the top edge)")
    _log_y(ax)
    ax.set_ylim(max(data_bottom / 4, 1e-3), top)
    ax.set_ylabel("max |x|")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax)


def _draw_headroom(ax: Any, verdict: Verdict, xpos: dict[str, int]) -> None:
    series = [_headroom_series(verdict, xpos, False, "all positions", "#444444")]
    if verdict.add_bos:
        series.append(_headroom_series(verdict, xpos, True, "excluding BOS", "#1f77b4"))
    series = [s for s in series if s is not None]
    values = [y for s in series for y in s.y] or [1.0]
    # As for the limits above: the line at 1 is drawn only when it is within 1e4x of the data
    # (float32's headroom is ~1e33: forcing 1 into view would flatten every line).
    near_one = min(values) <= 1e4
    bottom = min([*values, 1.0] if near_one else values) / 4
    top = max([*values, 1.0] if near_one else values) * 4
    for s in series:
        ax.plot(s.x, s.y, marker="o", ms=3.5, lw=1.6, color=s.color, label=s.label)
        if s.bad_x:
            ax.scatter(s.bad_x, [bottom] * len(s.bad_x), marker="v", s=60, color=s.color,
                       edgecolors="black", linewidths=0.6, zorder=5, clip_on=False)
    if any(s.bad_x for s in series):
        ax.scatter([], [], marker="v", s=60, color="white", edgecolors="black",
                   label="no headroom: inf/nan (bottom edge)")
    if near_one:
        ax.axhline(1.0, color="#d62728", ls="--", lw=1, label="headroom 1 (overflow below)")
    else:
        ax.plot([], [], " ", label="headroom 1 (overflow) is far below")
    _log_y(ax)
    ax.set_ylim(bottom, top)
    ax.set_ylabel("headroom vs float16 (65504 / max |x|)" if verdict.wider_than_float16
                  else "headroom (limit / max |x|)")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax)


def _mark_first_nonfinite(axes: Sequence[Any], verdict: Verdict, xpos: dict[str, int]) -> None:
    nf = verdict.first_nonfinite
    if nf is None:
        return
    label = verdict.layer_label(nf.layer)
    if label not in xpos:
        return
    text = f"first {nf.kind}: {layer_site_text(label, nf.site)}, step {nf.step}, pos {nf.position}"
    for i, ax in enumerate(axes):
        ax.axvline(xpos[label], color="#8c564b", lw=1.2, alpha=0.8,
                   label=text if i == 0 else None)
    _legend(axes[0])
