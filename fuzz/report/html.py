"""The HTML report: the markdown report's content in one self-contained file.

It needs nothing else: inline CSS, plots as base64 PNG data URIs, no URL of any kind (a nightly
artifact is often opened offline or from a sandbox). The plots are passed in as PNG bytes
(fuzz.report.plots renders them), so this module never imports matplotlib.
"""
from __future__ import annotations

import base64
import html
from typing import Any

# the shared wording and commands, read as text.NAME and commands.NAME (text is
# shadowed in _h, _t, _code)
from fuzz.report import causes, commands, text
from fuzz.report.describe import bos_text, prompt_literal
from fuzz.report.heatmap import HEATMAP_CAPTION, finding_key
from fuzz.search.accounting import Finding, PolicySummary, RunSummary

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #eee;padding-bottom:.2em}
h3{font-size:1.05em;margin-top:1.2em}
code,pre{font-family:ui-monospace,'DejaVu Sans Mono',Menlo,Consolas,monospace;font-size:.92em}
code{background:#f3f3f3;padding:.1em .3em;border-radius:3px;overflow-wrap:anywhere}
pre{background:#f6f8fa;padding:.8em;border-radius:4px;white-space:pre-wrap;
overflow-wrap:anywhere}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em;max-width:100%}
.wide{overflow-x:auto} .wide table{max-width:none}
th,td{border:1px solid #d0d0d0;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
dl.facts dt{font-weight:600} dl.facts dd{margin:0;min-width:0}
.finding{border-left:4px solid #d62728;padding:.2em 1em;margin:1em 0;background:#fff8f8}
.finding.known{border-left-color:#999;background:#fafafa}
.finding.marginal{border-left-color:#e0a000;background:#fffbf0}
.alarm{color:#b00020;font-weight:700} .ok{color:#217a21}
.overflow{font-weight:600}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}
"""


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _t(text: str) -> str:
    """Text content: escaped, quotes left as they are (they need no escape outside attributes,
    and a reader of the page source sees "it's", not "it&#x27;s")."""
    return html.escape(text, quote=False)


def _tone(tone: str) -> str:
    """The class attribute for a status's tone (text.tone), none when it has none."""
    return f' class="{tone}"' if tone else ""


def _code(text: str) -> str:
    return f"<code>{_t(text)}</code>"


def render_html(s: RunSummary, plots: dict[str, bytes] | None = None) -> str:
    """The whole page; `plots` maps policy name -> PNG bytes (embedded as data URIs)."""
    plots = plots or {}
    facts = "".join(f"<dt>{_h(k)}</dt><dd>{_code(v) if k in text.CODE_FACTS else _h(v)}</dd>"
                    for k, v in text.header_facts(s))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>gemma-fuzz report: {_h(s.model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>gemma-fuzz report: {_code(s.model)}</h1>",
        f'<dl class="facts">{facts}</dl>',
        f"<p><strong>{_t(text.findings_total(s))}</strong></p>",
        "<h2>How to reproduce</h2>",
        f"<pre>{_t(commands.run_command(s))}\n{_t(commands.replay_command(s))}</pre>",
        f"<p>{_t(text.REPRODUCE_NOTE)}</p>",
        "<h2>Policies</h2>", _html_policy_table(s),
        f"<p>{_t(text.HEADROOM_NOTE)}</p>", f"<p>{_t(text.COUNTS_NOTE)}</p>",
        *_html_causes(s),
    ]
    for p in s.policies:
        parts.append(_html_policy(s, p, plots.get(p.policy), plots))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_causes(s: RunSummary) -> list[str]:
    """The findings by root cause, their signatures nested under each (none without findings)."""
    if not s.findings:
        return []
    items = "".join(f"<li>{_t(cause)}<ul>" + "".join(f"<li>{_t(sig)}</li>" for sig in sigs)
                    + "</ul></li>" for cause, sigs in causes.cause_rows(s, text.model_layers(s)))
    return [f"<h2>{_t(causes.CAUSES_TITLE)}</h2>",
            f"<p>{_t(causes.causes_count(s))}. {_t(causes.CAUSES_NOTE)}</p>", f"<ul>{items}</ul>"]


def _html_policy_table(s: RunSummary) -> str:
    head = "".join(f"<th>{_t(c)}</th>" for c in text.POLICY_COLUMNS)
    rows = []
    for row in text.policy_rows(s):
        cells = []
        for column, value in zip(text.POLICY_COLUMNS, row.cells):
            if column == "policy":
                cells.append(f"<td>{_code(value)}</td>")
            elif column == "status":
                cells.append(f"<td{_tone(row.tone)}>{_t(value)}</td>")
            elif column in text.NUMERIC_COLUMNS:
                cells.append(f"<td class=num>{_t(value)}</td>")
            else:
                cells.append(f"<td>{_t(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="wide"><table><tr>{head}</tr>' + "".join(rows) + "</table></div>"


def _html_policy(s: RunSummary, p: PolicySummary, png: bytes | None,
                 plots: dict[str, bytes]) -> str:
    parts = [f'<h2 id="policy-{_h(p.policy)}">Policy {_code(p.policy)} '
             f"({_h(p.dtype)}, {text.safety_text(p)})</h2>"]
    status, *counts = text.policy_counts(p)
    parts.append(f"<p{_tone(text.tone(p.expected_safe, text.policy_tally(p)))}>{_t(status)}</p>")
    parts += [f"<p>{_t(line)}</p>" for line in counts]
    known = text.known_rows(s, p)
    if known:
        parts.append(f"<h3>{_t(text.KNOWN_TITLE)}</h3><ul>"
                     + "".join(f"<li>{_t(row)}</li>" for row in known) + "</ul>")
    for i, (f, count) in enumerate(text.group_findings(p.findings), 1):
        parts.append(_html_finding(s, p, f, count, i, plots.get(finding_key(p.policy, i))))
    marginal = text.marginal_rows(p)
    if marginal:
        more = text.marginal_more(p)
        parts.append(f"<h3>{_t(text.MARGINAL_TITLE)}</h3><ul>"
                     + "".join(f"<li>{_t(margin)}: {_code(prompt)} ({_t(bos)})</li>"
                               for margin, prompt, bos in marginal)
                     + (f"<li>{_t(more)}</li>" if more else "") + "</ul>")
    if p.nearest_misses:
        rows = "".join(
            f"<tr><td class=num>{_t(headroom)}</td><td>{_t(where)}</td>"
            f"<td>{_code(prompt)}</td><td>{_t(bos)}</td></tr>"
            for headroom, where, prompt, bos in text.miss_rows(p))
        parts.append(f"<h3>{_t(text.MISSES_TITLE)}</h3>"
                     "<table><tr><th>headroom</th><th>where</th><th>prompt</th><th>BOS</th></tr>"
                     + rows + "</table>")
    elif not p.findings:
        parts.append(f"<p>{_t(text.NO_FINITE_EXAMPLE)}</p>")
    plotted = p.plotted()
    if png is not None and plotted is not None:
        what = "first finding" if p.findings else "nearest miss"
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure><img alt="max |x| and headroom per layer, policy {_h(p.policy)}" '
            f'src="data:image/png;base64,{data}"><figcaption>Policy {_code(p.policy)}, {what}: '
            f"{_code(prompt_literal(plotted.prompt))} "
            f"({_t(bos_text(plotted.add_bos))}). "
            "Top: max |x| per layer for each site group (log scale; non-finite values drawn at "
            "the top edge). Bottom: headroom per layer, min over sites.</figcaption></figure>")
    return "\n".join(parts)


def _html_finding(s: RunSummary, p: PolicySummary, f: Finding, count: int, i: int,
                  heatmap: bytes | None = None) -> str:
    items = []
    for label, segments in text.finding_facts(s, p, f, count):
        value = "".join(_code(part) if as_code else _t(part) for part, as_code in segments)
        if label == "Overflow":  # the two terms that overflowed: what the reader looks for
            value = f'<span class="overflow">{value}</span>'
        items.append(f"<dt>{_t(label)}</dt><dd>{value}</dd>")
    cls = "finding" if f.is_new else (
        "finding marginal" if f.is_marginal or f.is_unmeasured else "finding known")
    figure = ""
    if heatmap is not None:
        data = base64.b64encode(heatmap).decode("ascii")
        figure = (f'<figure><img alt="heat map of finding {i}, policy {_h(p.policy)}" '
                  f'src="data:image/png;base64,{data}"><figcaption>{_t(HEATMAP_CAPTION)}'
                  "</figcaption></figure>")
    return (f'<div class="{cls}"><h3>{_t(text.finding_heading(f, i))}</h3>'
            f'<dl class="facts">{"".join(items)}</dl>{figure}</div>')
