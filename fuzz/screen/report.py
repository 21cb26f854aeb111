"""A screen's summary in words: the console text, and PATH.md, PATH.html and PATH.json beside
each other (as `fuzz run --report` writes its own). One wording for all of them."""
from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fuzz.atomic import write_atomic
from fuzz.report.describe import plural, prompt_literal, signature_text
from fuzz.report.markdown import md_cell, md_code
from fuzz.screen.summary import PolicyScreen
from fuzz.verdict import json_safe

SUFFIXES = (".md", ".html", ".json")


def share_text(p: PolicyScreen) -> str:
    """'312 of 1000 non-finite (31.2%, 95% interval 28.4-34.1%)'."""
    low, high = p.interval
    return (f"{p.nonfinite} of {p.screened} non-finite ({100 * p.share:.1f}%, 95% interval "
            f"{100 * low:.1f}-{100 * high:.1f}%)")


def share_cell(p: PolicyScreen) -> str:
    """'31.2% (28.4-34.1%)': the share and its 95% interval, for a table cell."""
    low, high = p.interval
    return f"{100 * p.share:.1f}% ({100 * low:.1f}-{100 * high:.1f}%)"


def policy_lines(p: PolicyScreen) -> list[str]:
    safety = "declared safe" if p.expected_safe else "declared unsafe"
    extra = "".join(f", {n} {what}" for n, what in ((p.inconclusive, "inconclusive"),
                                                    (p.not_run, "not run")) if n)
    lines = [f"{p.policy} ({safety}): {share_text(p)}{extra}; "
             f"{plural(len(p.signatures), 'signature')}"]
    for s in p.by_count():
        row = s.shortest
        lines.append(f"  {s.count:>6} x {signature_text(s.signature, None)}; shortest: "
                     f"{row['source']} {prompt_literal(row['prompt'])}")
    return lines


def console_text(policies: Sequence[PolicyScreen], header: str) -> str:
    return "\n".join([header, *[line for p in policies for line in policy_lines(p)]])


def render_markdown(policies: Sequence[PolicyScreen], facts: dict[str, Any]) -> str:
    out = ["# gemma-fuzz screen", ""]
    out += [f"- **{k}:** {md_cell(str(v))}" for k, v in facts.items()]
    out += ["", "| policy | declared safe | screened | non-finite | share (95% interval) | "
            "inconclusive | not run | signatures |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for p in policies:
        out.append(f"| {p.policy} | {'yes' if p.expected_safe else 'no'} | {p.screened} | "
                   f"{p.nonfinite} | {share_cell(p)} | {p.inconclusive} | {p.not_run} | "
                   f"{len(p.signatures)} |")
    for p in policies:
        if not p.signatures:
            continue
        out += ["", f"## {p.policy}", "", "| prompts | signature | shortest prompt | source |",
                "|---:|---|---|---|"]
        out += [f"| {s.count} | {md_cell(signature_text(s.signature, None))} | "
                f"{md_code(prompt_literal(s.shortest['prompt']))} | "
                f"{md_cell(s.shortest['source'])} |" for s in p.by_count()]
    return "\n".join(out) + "\n"


def render_html(policies: Sequence[PolicyScreen], facts: dict[str, Any]) -> str:
    esc = html.escape
    body = ["<h1>gemma-fuzz screen</h1>", "<ul>"]
    body += [f"<li><b>{esc(k)}:</b> {esc(str(v))}</li>" for k, v in facts.items()]
    body.append("</ul><div class=wide><table><tr><th>policy</th><th>declared safe</th>"
                "<th>screened</th><th>non-finite</th><th>share (95% interval)</th>"
                "<th>inconclusive</th><th>not run</th><th>signatures</th></tr>")
    for p in policies:
        body.append(f"<tr><td>{esc(p.policy)}</td><td>{'yes' if p.expected_safe else 'no'}</td>"
                    f"<td class=num>{p.screened}</td><td class=num>{p.nonfinite}</td>"
                    f"<td>{share_cell(p)}</td>"
                    f"<td class=num>{p.inconclusive}</td><td class=num>{p.not_run}</td>"
                    f"<td class=num>{len(p.signatures)}</td></tr>")
    body.append("</table></div>")
    for p in policies:
        if not p.signatures:
            continue
        body.append(f"<h2>{esc(p.policy)}</h2><table><tr><th>prompts</th><th>signature</th>"
                    "<th>shortest prompt</th><th>source</th></tr>")
        body += [f"<tr><td class=num>{s.count}</td>"
                 f"<td>{esc(signature_text(s.signature, None))}</td>"
                 f"<td><code>{esc(prompt_literal(s.shortest['prompt']))}</code></td>"
                 f"<td>{esc(s.shortest['source'])}</td></tr>" for s in p.by_count()]
        body.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;"
             "padding:0 1em}table{border-collapse:collapse;margin:.6em 0}th,td{border:1px "
             "solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}td.num{text-align:"
             "right}code{overflow-wrap:anywhere}.wide{overflow-x:auto}")
    return ("<!DOCTYPE html><html><head><meta charset=utf-8><title>gemma-fuzz screen</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(policies: Sequence[PolicyScreen], facts: dict[str, Any],
                 path: str | Path) -> list[Path]:
    """PATH.md, PATH.html, PATH.json (a directory: DIR/screen.*), each written atomically."""
    base = Path(path)
    if base.is_dir():
        base = base / "screen"
    elif base.suffix in SUFFIXES:
        base = base.with_suffix("")
    doc = {**facts, "policies": [p.to_dict() for p in policies]}
    outputs = {".md": render_markdown(policies, facts), ".html": render_html(policies, facts),
               ".json": json.dumps(json_safe(doc), indent=2, ensure_ascii=False,
                                   allow_nan=False) + "\n"}
    written = []
    for suffix, text in outputs.items():
        target = base.with_name(base.name + suffix)
        write_atomic(target, text.encode("utf-8"))
        written.append(target)
    return written
