"""The markdown report: what a person reads in a CI log or a PR.

Header, the policies table (a row per policy and BOS mode), the findings grouped by root cause
(their signatures under each), and per policy: its status and counts,
the known signatures it hit, every finding (minimal prompt, first non-finite value, the channel
and the two terms that overflowed, its margin and robustness, the case file, a command that
reproduces it), the marginal prompts and the nearest misses. Text that a reader may copy
(prompts, paths, commands) goes in code spans.
"""
from __future__ import annotations

import re

# the shared wording and commands, read as text.NAME and commands.NAME (text is
# shadowed only in md_code, md_cell)
from fuzz.report import causes, commands, text
from fuzz.report.heatmap import HEATMAP_CAPTION, finding_key
from fuzz.search.accounting import Finding, PolicySummary, RunSummary


def md_code(text: str) -> str:
    """A markdown code span holding `text` verbatim, whatever backticks it contains."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(s: RunSummary, images: dict[str, str] | None = None) -> str:
    """`images`: heatmap.finding_key -> the file name of that finding's heat map (beside the
    report), linked under the finding."""
    images = images or {}
    out: list[str] = [f"# gemma-fuzz report: {md_code(s.model)}", ""]
    for key, value in text.header_facts(s):
        out.append(f"- **{key}:** {md_code(value) if key in text.CODE_FACTS else value}")
    out += ["", f"**{text.findings_total(s)}**", "",
            "## How to reproduce", "", "```sh", commands.run_command(s),
            commands.replay_command(s), "```", "", text.REPRODUCE_NOTE, "",
            "## Policies", "",
            "| " + " | ".join(text.POLICY_COLUMNS) + " |",
            "|" + "|".join("---:" if c in text.NUMERIC_COLUMNS else "---"
                           for c in text.POLICY_COLUMNS) + "|"]
    for row in text.policy_rows(s):
        out.append("| " + " | ".join(md_cell(c) for c in row.cells) + " |")
    out += ["", text.HEADROOM_NOTE, "", text.COUNTS_NOTE, ""]
    out += _md_causes(s)
    for p in s.policies:
        out += _md_policy(s, p, images)
    return "\n".join(out).rstrip() + "\n"


def _md_causes(s: RunSummary) -> list[str]:
    """The findings by root cause, their signatures nested under each (none without findings)."""
    if not s.findings:
        return []
    out = [f"## {causes.CAUSES_TITLE}", "", f"{causes.causes_count(s)}. {causes.CAUSES_NOTE}", ""]
    for cause, signatures in causes.cause_rows(s, text.model_layers(s)):
        out += [f"- {cause}", *(f"  - {sig}" for sig in signatures)]
    return out + [""]


def _md_policy(s: RunSummary, p: PolicySummary, images: dict[str, str]) -> list[str]:
    out = [f"## Policy `{p.policy}` ({p.dtype}, {text.safety_text(p)})", ""]
    for line in text.policy_counts(p):
        out += [line, ""]
    known = text.known_rows(s, p)
    if known:
        out += [f"### {text.KNOWN_TITLE}", "", *(f"- {row}" for row in known), ""]
    for i, (f, count) in enumerate(text.group_findings(p.findings), 1):
        out += _md_finding(s, p, f, count, i)
        image = images.get(finding_key(p.policy, i))
        if image:
            out += [f"![{HEATMAP_CAPTION}]({image})", ""]
    marginal = text.marginal_rows(p)
    if marginal:
        out += [f"### {text.MARGINAL_TITLE}", ""]
        out += [f"- {margin}: {md_code(prompt)} ({bos})" for margin, prompt, bos in marginal]
        more = text.marginal_more(p)
        out += [f"- {more}"] if more else []
        out.append("")
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
