"""`fuzz advise`'s outputs: a text table, markdown, self-contained HTML and JSON, and the picture
(agreement with float32 against speed, one point per policy).

The picture is drawn on matplotlib's Agg canvas without pyplot (as fuzz.report.plots does), and
embedded in the HTML as a data URI: the page needs nothing else. Files are written atomically.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any

from fuzz.advise.measure import REFERENCE, Advice, PolicyAdvice, machine_text
from fuzz.atomic import write_atomic
from fuzz.report.files import report_paths
from fuzz.report.markdown import md_cell, md_code
from fuzz.verdict import json_safe

COLUMNS = ("policy", "finite everywhere", "corpus non-finite", "sampled non-finite",
           "identical greedy", "median first divergence", "step-0 top-1", "step-0 mean KL",
           "prompts/s", "CPU s/run", "peak headroom", "verdict")
NUMERIC = set(COLUMNS[2:11])


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.0%}"


def _num(x: float, digits: int = 3) -> str:
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def rows(a: Advice) -> list[list[str]]:
    out = []
    for r in a.policies:
        div = ("none" if r.median_divergence is None
               else f"{r.median_divergence:g} ({r.diverged} runs)")
        out.append([r.policy, "yes" if r.finite_everywhere else "no",
                    f"{r.corpus_nonfinite}/{r.corpus_runs}",
                    f"{r.sampled_nonfinite}/{r.sampled_runs}", _pct(r.identical), div,
                    f"{_pct(r.top1)} of {r.step0_compared}", _num(r.mean_kl),
                    _num(r.prompts_per_s), _num(r.cpu_s_per_run), _num(r.headroom),
                    r.verdict])
    return out


def recommendation_line(a: Advice) -> str:
    rule = (f"the fastest policy finite on every corpus case and sampled run whose greedy "
            f"continuations match {REFERENCE}'s on at least {a.threshold:.0%} of the sampled runs")
    if a.recommended is None:
        return f"No recommendation: no policy is {rule}."
    best = next(r for r in a.policies if r.policy == a.recommended)
    return (f"Recommended: {a.recommended} ({_num(best.prompts_per_s)} prompts/s, "
            f"{_pct(best.identical)} identical greedy continuations) — {rule}.")


def facts(a: Advice) -> list[tuple[str, str]]:
    budget = "none" if a.budget_s is None else f"{a.budget_s:g} s"
    sampled = (f"{a.sampled_texts} of {a.sample} prompts (seed {a.seed}), each with and without "
               f"BOS" + (" — the budget stopped the sampling" if a.stopped_by_budget else ""))
    return [("model", f"{a.model} (fingerprint {a.fingerprint[:12]})"),
            ("machine", machine_text(a.machine)),
            ("command", a.command or "python -m fuzz advise"),
            ("corpus cases", str(a.corpus_cases)), ("sampled", sampled),
            ("bounds", f"{a.bounds['max_new_tokens']} new tokens, prompts up to "
                       f"{a.bounds['max_prompt_tokens']} tokens"),
            ("budget", budget)]


NOTES = (
    "identical greedy: sampled runs whose whole greedy continuation is float32's (a non-finite "
    "run never is). Median first divergence: the first decode step whose token differs, over "
    "the runs that diverge. Step-0 top-1 / mean KL: the prefill's next-token distribution "
    "against float32's, KL(float32 || policy) in nats, over the runs whose step-0 logits are "
    "finite. prompts/s: sampled runs per second of wall time, batched (what the recommendation "
    "ranks); CPU s/run: this process's CPU time per run, steadier on a shared machine. Peak "
    "headroom: the least "
    "limit / max |x| over every site, step and position of every run (0: something overflowed)."
)


def render_text(a: Advice) -> str:
    table = [list(COLUMNS), *rows(a)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS) - 1)]
    lines = [f"{k}: {v}" for k, v in facts(a)] + [""]
    for row in table:
        lines.append("  ".join(c.rjust(w) if i and COLUMNS[i] in NUMERIC else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) + "  " + row[-1])
    return "\n".join(lines + ["", recommendation_line(a)]) + "\n"


def render_markdown(a: Advice, png_name: str = "advise.png") -> str:
    out = [f"# gemma-fuzz advise: {md_code(a.model)}", ""]
    out += [f"- **{k}:** {md_code(v) if k == 'command' else v}" for k, v in facts(a)]
    out += ["", f"**{recommendation_line(a)}**", "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "|".join("---:" if c in NUMERIC else "---" for c in COLUMNS) + "|"]
    out += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows(a)]
    out += ["", NOTES, "", f"![agreement vs speed]({png_name})", ""]
    return "\n".join(out)


def render_html(a: Advice, png: bytes) -> str:
    esc = html.escape
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts(a))
    head = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(
        f"<td{' class=num' if c in NUMERIC else ''}>{esc(v)}</td>" for c, v in zip(COLUMNS, row))
        + "</tr>" for row in rows(a))
    data = base64.b64encode(png).decode("ascii")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>gemma-fuzz advise: {esc(a.model)}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em}"
        "table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;"
        "padding:.3em .5em;text-align:left}td.num{text-align:right}th{background:#f3f3f3}"
        "dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}"
        "dd{margin:0}img{max-width:100%}</style></head><body>"
        f"<h1>gemma-fuzz advise: <code>{esc(a.model)}</code></h1><dl>{dl}</dl>"
        f"<p><strong>{esc(recommendation_line(a))}</strong></p>"
        f"<table><tr>{head}</tr>{body}</table><p>{esc(NOTES)}</p>"
        f'<figure><img alt="agreement with float32 vs prompts per second, per policy" '
        f'src="data:image/png;base64,{data}"><figcaption>{esc(machine_text(a.machine))}'
        "</figcaption></figure></body></html>\n")


def figure(a: Advice, dpi: int = 100) -> Any:
    """Identical greedy continuations (%) against prompts/s, one labelled point per policy;
    disqualified policies hollow, the recommended one starred, the threshold dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in a.policies:
        if math.isnan(r.prompts_per_s) or math.isnan(r.identical):
            continue
        _point(ax, r, r.policy == a.recommended)
    ax.axhline(100 * a.threshold, color="#d62728", ls="--", lw=1,
               label=f"threshold {a.threshold:.0%}")
    ax.set_xlabel("prompts/s (sampled runs per second, batched)")
    ax.set_ylabel(f"identical greedy continuations vs {REFERENCE} (%)")
    ax.set_ylim(-5, 105)
    speeds = [r.prompts_per_s for r in a.policies if not math.isnan(r.prompts_per_s)]
    ax.set_xlim(0, 1.3 * max(speeds, default=1.0))  # from 0, with room for the labels
    ax.grid(True, alpha=0.3)
    ax.scatter([], [], s=60, facecolors="none", edgecolors="black", label="not finite everywhere")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{a.model}: agreement vs speed per policy", fontsize=11)
    ax.set_title(textwrap.fill(machine_text(a.machine), 120), fontsize=7)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.11, top=0.86)
    return fig


def _point(ax: Any, r: PolicyAdvice, best: bool) -> None:
    x, y = r.prompts_per_s, 100 * r.identical
    color = "#2ca02c" if best else ("#1f77b4" if r.finite_everywhere else "#7f7f7f")
    ax.scatter([x], [y], s=220 if best else 60, marker="*" if best else "o",
               facecolors=color if r.finite_everywhere else "none", edgecolors=color, zorder=3)
    ax.annotate(r.policy + (" (recommended)" if best else ""), (x, y), xytext=(6, 6),
                textcoords="offset points", fontsize=8)


def render_png(a: Advice) -> bytes:
    buffer = io.BytesIO()
    figure(a).savefig(buffer, format="png")
    return buffer.getvalue()


def write(a: Advice, path: str | Path) -> list[Path]:
    """<stem>.md, .html, .json and .png side by side (a directory PATH: DIR/advise.*)."""
    p = Path(path)
    md_path, html_path, json_path = report_paths(p / "advise" if p.is_dir() or
                                                 str(path).endswith("/") else p)
    png = render_png(a)
    png_path = md_path.with_suffix(".png")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(png_path, png)
    write_atomic(md_path, render_markdown(a, png_path.name).encode("utf-8"))
    write_atomic(html_path, render_html(a, png).encode("utf-8"))
    doc = json.dumps(json_safe(a.to_dict()), indent=2, sort_keys=True, allow_nan=False)
    write_atomic(json_path, (doc + "\n").encode("utf-8"))
    return [md_path, html_path, json_path, png_path]


def main(args: Any, options: Any, bounds: Any) -> int:
    """`fuzz advise` (fuzz.cli wires the arguments): exit 0 with a recommendation, 1 without
    one, 2 on bad input."""
    import sys

    from fuzz.advise.measure import advise
    from fuzz.corpus import Corpus
    from fuzz.session import Session

    if args.sample < 1:
        raise ValueError(f"--sample {args.sample}: give at least 1 prompt to draw")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: give a batch size of at least 1")
    corpus = None
    if args.corpus is not None:
        if not Path(args.corpus).is_dir():
            raise ValueError(f"--corpus {args.corpus}: no such directory; give the corpus "
                             "directory (e.g. corpus) or leave --corpus out")
        corpus = Corpus(Path(args.corpus))
    session = Session.open(options, bounds, args.batch_size)
    result = advise(session, corpus, sample=args.sample, seed=args.seed, budget_s=args.budget,
                    progress=lambda line: print(f"advise: {line}", file=sys.stderr, flush=True))
    result.command = _command(args, session.bounds)
    print(render_text(result), end="")
    if args.report:
        for path in write(result, args.report):
            print(f"wrote {path}")
    return 0 if result.recommended else 1


def _command(args: Any, bounds: Any) -> str:
    """The command that repeats this measurement (every option that changes it, spelled out)."""
    import shlex

    parts = ["python", "-m", "fuzz", "advise", "--model", args.model or "gemma3-270m",
             "--sample", str(args.sample), "--seed", str(args.seed),
             "--batch-size", str(args.batch_size), "--max-new-tokens", str(bounds.max_new_tokens),
             "--max-prompt-tokens", str(bounds.max_prompt_tokens)]
    if args.corpus:
        parts += ["--corpus", args.corpus]
    if args.budget is not None:
        parts += ["--budget", f"{args.budget:g}s"]
    if args.device != "auto":
        parts += ["--device", args.device]
    return " ".join(shlex.quote(part) for part in parts)
