"""The sweep's picture: three panels from its summary (fuzz.sweep.summary).

1. the least headroom of every finite token over the vocabulary (histogram, log axes), the
   limit (1) and the within-10% line marked;
2. the layer where each token comes closest to the limit: all finite tokens, and the non-finite
   and within-10% ones (where they overflow, or peak);
3. the closest tokens by piece.
Drawn on matplotlib's Agg canvas, never pyplot (as fuzz.report.plots).
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from fuzz.atomic import write_atomic
from fuzz.report.plots import plot_text
from fuzz.sweep.summary import CLOSE_HEADROOM, SweepSummary, layer_sorted


def plot_sweep(summary: SweepSummary, path: Path, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 5.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_hist, ax_layer, ax_close = fig.subplots(1, 3, width_ratios=[4, 4, 3])
    values = np.array(summary.headrooms)
    if values.size:
        low, high = max(values.min(), 1e-3), max(values.max(), 1.2)
        bins = np.geomspace(min(low, 0.95), high * 1.05, 60)
        ax_hist.hist(values, bins=bins, color="tab:blue")
    ax_hist.set_xscale("log")
    ax_hist.set_yscale("log")
    ax_hist.axvline(1.0, color="tab:red", label="limit (headroom 1)")
    ax_hist.axvline(CLOSE_HEADROOM, color="tab:orange", linestyle="--",
                    label=f"within 10% ({CLOSE_HEADROOM})")
    ax_hist.set_xlabel("least headroom of a token (limit / max |x|), finite tokens")
    ax_hist.set_ylabel("tokens")
    ax_hist.set_title(f"{summary.swept} tokens: {summary.nonfinite} non-finite, "
                      f"{summary.close} within 10%", fontsize=10)
    ax_hist.legend(fontsize=8)

    layers = [k for k, _ in layer_sorted({**summary.peak_layer_all, **summary.peak_layer_close})]
    x = np.arange(len(layers))
    everyone = [summary.peak_layer_all.get(k, 0) for k in layers]
    close = [summary.peak_layer_close.get(k, 0) for k in layers]
    ax_layer.bar(x - 0.2, everyone, width=0.4, label="all finite tokens", color="tab:blue")
    ax_layer.bar(x + 0.2, close, width=0.4, label="non-finite or within 10%", color="tab:red")
    ax_layer.set_xticks(x, [("emb" if k == "embedding" else k) for k in layers], fontsize=8)
    ax_layer.set_yscale("symlog", linthresh=1)
    ax_layer.set_xlabel("layer of the token's least headroom (or first non-finite value)")
    ax_layer.set_ylabel("tokens")
    ax_layer.set_title("where each token comes closest to the limit", fontsize=10)
    ax_layer.legend(fontsize=8)

    shown = summary.closest[::-1]
    ax_close.barh(range(len(shown)), [r["least_headroom"] for r in shown], color="tab:orange")
    ax_close.set_yticks(range(len(shown)),
                        [f"{plot_text(r['piece'], 18)} ({r['least_headroom_site']})"
                         for r in shown], fontsize=7)
    if shown:
        least = min(r["least_headroom"] for r in shown)
        ax_close.set_xlim(max(0.0, least * 0.98 if math.isfinite(least) else 0.0), None)
    ax_close.axvline(CLOSE_HEADROOM, color="tab:orange", linestyle="--")
    ax_close.set_xlabel("least headroom")
    ax_close.set_title(f"the {len(shown)} closest finite tokens", fontsize=10)
    fig.suptitle(title.replace("$", r"\$"), fontsize=11)  # '$' would start mathtext
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.12, top=0.86, wspace=0.45)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())
    return path
