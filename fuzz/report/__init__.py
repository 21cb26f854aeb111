"""The fuzz run's report: data model, markdown, self-contained HTML with plots, and JSON.

The search fills a :class:`RunSummary` (one :class:`PolicySummary` per precision policy, each
holding its :class:`Finding` records and its nearest misses) and calls :func:`write_report`, which
writes ``<stem>.md``, ``<stem>.html`` and ``<stem>.json`` side by side.

The package, one module per concern (this module re-exports their public names, so callers say
``from fuzz.report import NAME``):

- ``model``: Finding, ModeCounts, PolicySummary, RunSummary and their strict-JSON form (the
  ``.json`` file; ``jsonform`` holds its helpers);
- ``describe``: a run's pieces in words (numbers, prompts, a verdict, a signature, a margin);
- ``commands``: the commands that repeat the run, reproduce a finding, replay the corpus;
- ``text``: the report's wording both renderers share (counts, statuses, facts, sentences);
- ``markdown``: :func:`render_markdown`, what a person reads in a CI log or a PR;
- ``html``: :func:`render_html`, the same content in one file that needs nothing else;
- ``plots``: a verdict's figure and PNG (one per policy for the HTML page), on matplotlib's
  Agg canvas (never pyplot), matplotlib imported lazily: importing fuzz.report loads none;
- ``files``: :func:`write_report` and :func:`report_paths`, atomic writes via fuzz.atomic.
"""
from __future__ import annotations

from fuzz.report.commands import check_command, replay_command, run_command
from fuzz.report.describe import (
    bos_text,
    bounds_text,
    describe_nonfinite,
    describe_position,
    describe_step,
    describe_terms,
    fmt_duration,
    fmt_headroom,
    fmt_ratio,
    fmt_value,
    layer_site_text,
    margin_text,
    plural,
    prompt_literal,
    robustness_text,
    shell_quote,
    signature_text,
    site_limit,
)
from fuzz.report.files import DEFAULT_STEM, REPORT_SUFFIXES, report_paths, write_report
from fuzz.report.html import render_html
from fuzz.report.markdown import md_cell, md_code, render_markdown
from fuzz.report.plots import (
    GROUP_COLORS,
    SITE_GROUPS,
    default_title,
    plot_text,
    plot_verdict,
    render_plots,
    render_png,
    verdict_figure,
)

# Plot internals, re-exported on purpose ("as" marks that) but kept out of __all__:
# tests/test_report.py checks the series they build without drawing a figure.
from fuzz.report.plots import _group_series as _group_series
from fuzz.report.plots import _headroom_series as _headroom_series
from fuzz.report.plots import _layer_axis as _layer_axis
from fuzz.report.text import (
    also_hit,
    findings_total,
    group_findings,
    header_facts,
    policy_rows,
    policy_status,
    status_text,
)
from fuzz.search.accounting import (
    DTYPE_MAX,
    FINDING_STATUSES,
    NEAREST_MISSES,
    STOP_REASONS,
    Finding,
    ModeCounts,
    PolicySummary,
    RunSummary,
    unique_misses,
)

__all__ = [
    "DEFAULT_STEM", "DTYPE_MAX", "FINDING_STATUSES", "GROUP_COLORS", "NEAREST_MISSES",
    "REPORT_SUFFIXES", "SITE_GROUPS", "STOP_REASONS",
    "Finding", "ModeCounts", "PolicySummary", "RunSummary", "unique_misses",
    "also_hit", "bos_text", "bounds_text", "check_command",
    "describe_nonfinite", "describe_position", "describe_step", "describe_terms",
    "layer_site_text", "findings_total", "fmt_duration", "fmt_headroom", "fmt_ratio",
    "fmt_value", "group_findings", "header_facts", "margin_text",
    "plural", "policy_rows", "policy_status",
    "prompt_literal", "replay_command", "robustness_text", "run_command", "shell_quote",
    "signature_text", "site_limit", "status_text",
    "md_cell", "md_code", "render_markdown",
    "render_html",
    "default_title", "plot_text", "plot_verdict", "render_plots", "render_png",
    "verdict_figure",
    "report_paths", "write_report",
]
