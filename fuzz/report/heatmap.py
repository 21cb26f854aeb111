"""A finding's picture: a layers x positions heat map of max |x| / limit (fuzz.positions), the
first non-finite cell marked, and the overflowing channel's value across the layers.

Drawn as fuzz.report.plots draws: a Figure on an Agg canvas, never pyplot, matplotlib imported
inside the functions.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fuzz.atomic import write_atomic
from fuzz.report.describe import fmt_value
from fuzz.report.text import group_findings
from fuzz.search.accounting import RunSummary

if TYPE_CHECKING:  # fuzz.positions imports torch: the report's renderers need only the data
    from fuzz.positions import PositionMap

# Colours span 10^-4 .. 10^0 of the limit (a ratio of 1 is the overflow); smaller values are
# the darkest shade. Non-finite cells are drawn in NONFINITE_COLOR, past the scale's top.
LOG_RANGE = (-4.0, 0.0)
NONFINITE_COLOR = "#e41a1c"
NOT_COMPUTED_COLOR = "#dddddd"
FIRST_COLOR = "#00a0ff"
MAX_POSITION_TICKS = 24
HEATMAP_CAPTION = ("max |x| / limit per layer and position (the first non-finite cell boxed) "
                   "and the overflowing channel's value at each residual add")


def heatmap_figure(m: PositionMap, title: str = "", dpi: int = 100) -> Any:
    """Top: the heat map (rows: embedding, layers, head; columns: sequence positions). Bottom,
    when the overflowing channel is known: its unrounded value at every residual add."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_channel = m.channel is not None and bool(m.channel_values)
    fig = Figure(figsize=(11, 8 if with_channel else 5.5), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, height_ratios=[3, 2]) if with_channel else [fig.subplots()]
    grid = np.array([[np.nan if v is None else v for v in row] for row in m.ratio], dtype=float)
    _draw_map(fig, axes[0], m, grid)
    if with_channel:
        _draw_channel(axes[1], m)
    fig.suptitle(title or f"{m.policy}: max |x| / {limit_words(m)} per layer and position",
                 fontsize=11)
    fig.subplots_adjust(left=0.09, right=0.97, bottom=0.08, top=0.88, hspace=0.4)
    return fig


def _draw_map(fig: Any, ax: Any, m: PositionMap, grid: Any) -> None:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    # bad: not computed (the head before the last position); over: non-finite cells, drawn
    # past the top of the scale
    cmap = colormaps["viridis"].with_extremes(bad=NOT_COMPUTED_COLOR, over=NONFINITE_COLOR)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.maximum(grid, 1e-30))
    # a finite value past float16's limit (a float32 run measured against it) is the scale's
    # top colour; only non-finite cells are drawn past it
    logs = np.where(np.isfinite(grid), np.minimum(logs, LOG_RANGE[1]), logs)
    logs[np.isinf(grid)] = LOG_RANGE[1] + 1.0
    image = ax.imshow(np.ma.masked_invalid(logs), aspect="auto", origin="lower", cmap=cmap,
                      vmin=LOG_RANGE[0], vmax=LOG_RANGE[1], interpolation="nearest")
    handles = [Patch(color=NOT_COMPUTED_COLOR, label="not computed")]
    if np.isinf(grid).any():
        handles.append(Patch(color=NONFINITE_COLOR, label="non-finite (inf/nan)"))
    if m.first is not None:
        row, col = m.first
        ax.add_patch(_box(col, row))
        handles.append(Patch(fill=False, edgecolor=FIRST_COLOR, lw=2, label=(
            f"first non-finite: layer {m.rows[row]} {m.first_site}, position "
            f"{m.positions[col]}")))
    ax.set_yticks(range(len(m.rows)), [("emb" if r == "embedding" else r) for r in m.rows],
                  fontsize=7)
    step = max(1, math.ceil(len(m.positions) / MAX_POSITION_TICKS))
    ticks = list(range(0, len(m.positions), step))
    ax.set_xticks(ticks, [str(m.positions[t]) for t in ticks], fontsize=7)
    steps = "step 0, the prefill" if m.step == 0 else (
        f"steps 0..{m.step}: the prefill, then one position per decode step")
    ax.set_xlabel(f"position ({steps})")
    ax.set_ylabel("layer")
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label(f"log10(max |x| / {limit_words(m)}); 0 = that limit")
    ax.legend(handles=handles, fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0),
              ncol=len(handles), frameon=False, borderaxespad=0.2)


def limit_words(m: PositionMap) -> str:
    """'limit', or "float16's limit (65504)" when a wider dtype is measured against it."""
    return "float16's limit (65504)" if m.against == "float16" else "limit"


def _box(col: int, row: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor=FIRST_COLOR, lw=2.2)


def _draw_channel(ax: Any, m: PositionMap) -> None:
    xs = [x for _, x, _ in m.channel_values]
    ys = [abs(v) for _, _, v in m.channel_values]
    ax.plot(xs, ys, marker="o", ms=3.5, lw=1.5, color="#d62728",
            label=f"|channel {m.channel}| at each residual add (unrounded)")
    if m.limit:
        ax.axhline(m.limit, color="black", ls="--", lw=1, label=f"limit {fmt_value(m.limit)}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(m.rows)), [("emb" if r == "embedding" else r) for r in m.rows],
                  fontsize=7)
    ax.set_xlim(-0.5, len(m.rows) - 0.5)
    ax.set_xlabel("layer (residual_attn at the layer, residual_mlp half a layer later)")
    ax.set_ylabel("|value|")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def render_heatmap_png(m: PositionMap, title: str = "", dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    heatmap_figure(m, title, dpi).savefig(buffer, format="png")
    return buffer.getvalue()


def write_heatmap(m: PositionMap, path: str | Path, title: str = "") -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"heat map path {str(path)!r} must end in .png (the plot is a PNG)")
    write_atomic(path, render_heatmap_png(m, title))
    return path


def heatmap_path(plot: str | Path) -> Path:
    """Where `fuzz check --plot FILE.png` writes the heat map: FILE.positions.png."""
    plot = Path(plot)
    return plot.with_name(plot.stem + ".positions.png")


def finding_key(policy: str, index: int) -> str:
    """The plots-dict key of the index-th (from 1) finding group of a policy's heat map."""
    return f"{policy}/finding-{index}"


def finding_heatmaps(summary: RunSummary) -> dict[str, bytes]:
    """A heat map PNG per finding group (text.group_findings order) whose finding was mapped."""
    from fuzz.positions import PositionMap

    out = {}
    for p in summary.policies:
        for i, (f, _) in enumerate(group_findings(p.findings), 1):
            if f.positions is not None:
                m = PositionMap.from_dict(f.positions)
                out[finding_key(p.policy, i)] = render_heatmap_png(
                    m, f"{p.policy}, finding {i}: max |x| / limit per layer and position")
    return out
