"""`fuzz advise`'s picture: mean KLD against float32 (log scale, 95% interval) against median
prompts/s (95% interval), one marker per policy, named in a legend beside the axes (labels
written next to the points overlapped where two policies had similar numbers).

float32's KLD is 0, which a log axis cannot show: it is drawn on the axis' floor and the legend
says so. A policy with no finite teacher-forced position has no KLD and is only listed. Drawn on
matplotlib's Agg canvas without pyplot, as fuzz.report.plots does.
"""
from __future__ import annotations

import io
import math
import textwrap
from typing import Any

from fuzz.advise.inputs import machine_text
from fuzz.advise.result import REFERENCE, Advice, PolicyAdvice

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "8")
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")


def _floor(a: Advice) -> float:
    """Where a KLD of 0 is drawn: a decade under the smallest positive value shown."""
    values = [v for r in a.policies for v in (r.divergence.mean_kld, r.divergence.mean_kld_ci[0])
              if not math.isnan(v) and v > 0] + [a.max_kld]
    return 10 ** math.floor(math.log10(min(values)) - 1)


def _errors(value: float, ci: tuple[float, float], floor: float) -> list[list[float]]:
    lo, hi = ci
    if math.isnan(lo) or math.isnan(hi):
        return [[0.0], [0.0]]
    return [[max(0.0, value - max(lo, floor))], [max(0.0, hi - value)]]


def figure(a: Advice, dpi: int = 100) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    floor = _floor(a)
    for i, r in enumerate(a.policies):
        _point(ax, r, i, floor, r.policy == a.recommended)
    ax.axhline(a.max_kld, color="#d62728", ls="--", lw=1,
               label=f"--max-kld {a.max_kld:g} nats (a chosen line)")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, None)
    ax.set_xlabel("prompts/s: median of per-batch speeds, with its 95% interval")
    ax.set_ylabel(f"mean KL({REFERENCE} || policy), nats, 95% interval")
    speeds = [r.prompts_per_s for r in a.policies if not math.isnan(r.prompts_per_s)]
    ax.set_xlim(0, 1.15 * max(speeds + [h for r in a.policies for h in r.speed_ci[1:]
                                        if not math.isnan(h) and not math.isinf(h)],
                              default=1.0))
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle(f"{a.model}: divergence from {REFERENCE} vs speed, per policy", fontsize=11)
    ax.set_title(textwrap.fill(machine_text(a.machine), 110), fontsize=7)
    fig.subplots_adjust(left=0.08, right=0.66, bottom=0.11, top=0.86)
    return fig


def _point(ax: Any, r: PolicyAdvice, i: int, floor: float, best: bool) -> None:
    d = r.divergence
    notes = [] if r.finite_everywhere else ["not finite everywhere"]
    if best:
        notes.insert(0, "recommended")
    if r.policy == REFERENCE and d.mean_kld == 0:
        notes.append("KLD 0, drawn at the floor")
    label = r.policy + (f" ({', '.join(notes)})" if notes else "")
    color, marker = COLORS[i % len(COLORS)], "*" if best else MARKERS[i % len(MARKERS)]
    if math.isnan(d.mean_kld) or math.isnan(r.prompts_per_s):
        ax.scatter([], [], marker=marker, color=color, label=label + ": not plotted, no KLD")
        return
    y = max(d.mean_kld, floor)
    ax.errorbar([r.prompts_per_s], [y], xerr=_errors(r.prompts_per_s, r.speed_ci, 0.0),
                yerr=_errors(y, d.mean_kld_ci, floor), fmt="none", ecolor=color, elinewidth=1,
                capsize=3, alpha=0.8)
    ax.scatter([r.prompts_per_s], [y], s=220 if best else 60, marker=marker, zorder=3,
               facecolors=color if r.finite_everywhere else "none", edgecolors=color,
               label=label)


def render_png(a: Advice) -> bytes:
    buffer = io.BytesIO()
    figure(a).savefig(buffer, format="png")
    return buffer.getvalue()
