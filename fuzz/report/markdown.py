"""The markdown report: what a person reads in a CI log or a PR.

Header, per-policy table, every finding (minimal prompt, first non-finite value, the channel and
the two terms that overflowed, the case file, a command that reproduces it) and the nearest
misses. Text that a reader may copy (prompts, paths, commands) goes in code spans.
"""
from __future__ import annotations

import re

from . import text  # the shared wording, read as text.NAME (shadowed only in md_code, md_cell)
from .model import Finding, PolicySummary, RunSummary


def md_code(text: str) -> str:
    """A markdown code span holding `text` verbatim, whatever backticks it contains."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(s: RunSummary) -> str:
    out: list[str] = [f"# gemma-fuzz report: {md_code(s.model)}", ""]
    for key, value in text.header_facts(s):
        out.append(f"- **{key}:** {md_code(value) if key in text.CODE_FACTS else value}")
    out += ["", f"**{text.findings_total(s)}**", "",
            "## How to reproduce", "", "```sh", text.run_command(s), text.replay_command(s),
            "```", "",
            "## Policies", "",
            "| policy | dtype | declared safe | examples | findings (new / known) | "
            "best headroom | status |",
            "|---|---|---|---:|---:|---:|---|"]
    for p in s.policies:
        out.append(
            f"| {md_cell(p.policy)} | {p.dtype} | {'yes' if p.expected_safe else 'no'} | "
            f"{p.examples} | {p.new_findings} / {p.known_findings} | "
            f"{text.best_headroom_text(p)} | {text.policy_status(p)} |")
    out += ["", text.HEADROOM_NOTE, ""]
    for p in s.policies:
        out += _md_policy(s, p)
    return "\n".join(out).rstrip() + "\n"


def _md_policy(s: RunSummary, p: PolicySummary) -> list[str]:
    out = [f"## Policy `{p.policy}` ({p.dtype}, {text.safety_text(p)})", "",
           text.policy_counts(p), ""]
    for i, (f, count) in enumerate(text.group_findings(p.findings), 1):
        out += _md_finding(s, p, f, count, i)
    if p.nearest_misses:
        out += [f"### {text.MISSES_TITLE}", ""]
        for headroom, where, prompt, bos in text.miss_rows(p):
            at = f" at {where}" if where else ""
            out.append(f"- headroom {headroom}{at}: {md_code(prompt)} ({bos})")
        out.append("")
    elif not p.findings:
        out += [text.NO_FINITE_EXAMPLE, ""]
    return out


def _md_finding(s: RunSummary, p: PolicySummary, f: Finding, count: int, i: int) -> list[str]:
    out = [f"### {text.finding_heading(f, i)}", ""]
    for label, segments in text.finding_facts(s, p, f, count):
        value = "".join(md_code(part) if as_code else part for part, as_code in segments)
        out.append(f"- **{label}:** {value}")
    return out + [""]
