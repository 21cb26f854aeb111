"""Writing a report: ``<stem>.md``, ``<stem>.html`` and ``<stem>.json`` side by side.

Each file is written atomically (fuzz.atomic.write_atomic: temp file, then rename), so a killed
job never leaves a half-written report behind and a reader sees the old file or the new one.
"""
from __future__ import annotations

import os
from pathlib import Path

from fuzz.atomic import write_atomic
from fuzz.report.html import render_html
from fuzz.report.markdown import render_markdown
from fuzz.report.plots import render_plots
from fuzz.search.accounting import RunSummary

REPORT_SUFFIXES = (".md", ".html", ".htm", ".json")
DEFAULT_STEM = "report"


def report_paths(path: str | Path) -> tuple[Path, Path, Path]:
    """(md, html, json) for a PATH that ends in .md/.html/.json, names a directory, or is a stem."""
    raw = str(path)
    p = Path(path)
    if raw.endswith(("/", os.sep)) or p.is_dir():
        stem = p / DEFAULT_STEM
    elif p.suffix.lower() in REPORT_SUFFIXES:
        stem = p.with_suffix("")
    else:  # a stem such as nightly/2025-01-31 (its dots are part of the name)
        stem = p
    if not stem.name:
        raise ValueError(f"report path {raw!r} has no file name; give e.g. reports/nightly.md")
    return (stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".html"),
            stem.with_name(stem.name + ".json"))


def write_report(summary: RunSummary, path: str | Path) -> list[Path]:
    """Writes <stem>.md, <stem>.html (self-contained, with plots) and <stem>.json, and each
    finding's heat map as <stem>.<policy>.finding-<i>.png (the markdown links them: a markdown
    file cannot hold an image); returns them."""
    md_path, html_path, json_path = report_paths(path)
    plots = render_plots(summary)
    images = {key: md_path.with_name(f"{md_path.stem}.{key.replace('/', '.')}.png")
              for key in plots if "/" in key}  # heatmap.finding_key's keys
    for key, image in images.items():
        write_atomic(image, plots[key])
    names = {key: image.name for key, image in images.items()}
    write_atomic(md_path, render_markdown(summary, names).encode("utf-8"))
    write_atomic(html_path, render_html(summary, plots).encode("utf-8"))
    write_atomic(json_path, summary.to_json().encode("utf-8"))
    return [md_path, html_path, json_path, *images.values()]
