"""`fuzz advise`'s outputs: a text table, markdown, self-contained HTML and JSON (the picture is
fuzz.advise.plot's).

Two tables: the rule's inputs (finiteness, mean KLD and same-top-1 with their intervals, speed
with its interval, the verdict), then the detail (KLD percentiles, PPL ratio, RMS Δp, identical
greedy continuations, CPU time, headroom). Files are written atomically; the HTML embeds the
picture as a data URI and needs nothing else.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from fuzz.advise.inputs import machine_text
from fuzz.advise.plot import render_png
from fuzz.advise.result import REFERENCE, Advice
from fuzz.advise.stats import BOOTSTRAP_REPS
from fuzz.atomic import write_atomic
from fuzz.report.describe import plural
from fuzz.report.markdown import md_cell, md_code
from fuzz.verdict import json_safe

MAIN = ("policy", "finite everywhere", "corpus non-finite", "sampled non-finite",
        "teacher-forced non-finite", "mean KLD [95%]", "same top-1 [95%]",
        "prompts/s [95%]", "verdict")
DETAIL = ("policy", "KLD median", "KLD p95", "KLD p99", "KLD p99.9", "PPL ratio [95%]",
          "RMS Δp [95%]", "identical greedy [95%]", "median first divergence", "CPU s/run",
          "wall s", "peak headroom")
# left-aligned; every other column but the verdict holds numbers, right-aligned
TEXT_COLUMNS = ("policy", "finite everywhere")
REPORT_SUFFIXES = (".md", ".html", ".htm", ".json")
STEM = "advise"


def num(x: float, digits: int = 3) -> str:
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def pct3(x: float) -> str:
    """A small share in percent, 3 significant digits (RMS Δp: llama.cpp prints it so)."""
    return "n/a" if math.isnan(x) else f"{100 * x:.3g}%"


def interval(value: float, ci: tuple[float, float], fmt=num) -> str:
    lo, hi = ci
    if math.isnan(value):
        return "n/a"
    return f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]" if not math.isnan(lo) else f"{fmt(value)} [n/a]"


def main_rows(a: Advice) -> list[list[str]]:
    out = []
    for r in a.policies:
        d = r.divergence
        out.append([r.policy, "yes" if r.finite_everywhere else "no",
                    f"{r.corpus_nonfinite}/{r.corpus_runs}",
                    f"{r.sampled_nonfinite}/{r.sampled_runs}",
                    f"{d.nonfinite_positions}/{d.positions + d.nonfinite_positions}",
                    interval(d.mean_kld, d.mean_kld_ci), interval(d.top1, d.top1_ci, pct),
                    interval(r.prompts_per_s, r.speed_ci), r.verdict])
    return out


def detail_rows(a: Advice) -> list[list[str]]:
    out = []
    for r in a.policies:
        d = r.divergence
        div = ("none" if r.median_divergence is None
               else f"{r.median_divergence:g} ({r.diverged} runs)")
        out.append([r.policy, num(d.kld_median), num(d.kld_p95), num(d.kld_p99),
                    num(d.kld_p999), interval(d.ppl_ratio, d.ppl_ratio_ci, _ratio),
                    interval(d.rms_dp, d.rms_dp_ci, pct3),
                    f"{interval(r.identical, r.identical_ci, pct)} of {r.sampled_runs}", div,
                    num(r.cpu_s_per_run), num(r.seconds), num(r.headroom)])
    return out


def _ratio(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.4f}"


def recommendation_line(a: Advice) -> str:
    rule = (f"finite everywhere, the upper end of the mean-KLD 95% interval against {REFERENCE} "
            f"at most {a.max_kld:g} nats; among those the fastest, where speed intervals "
            "separate, else the safest")
    if a.recommended is None:
        return f"No recommendation: no policy is finite everywhere with its mean KLD under " \
               f"the line (rule: {rule})."
    best = next(r for r in a.policies if r.policy == a.recommended)
    d = best.divergence
    tie = (f"; tied on speed with {', '.join(best.tie_with)} (intervals overlap), so the "
           "safest of them by overflow safety" if best.tie_with else "")
    return (f"Recommended: {a.recommended} (mean KLD {interval(d.mean_kld, d.mean_kld_ci)} "
            f"nats, {interval(best.prompts_per_s, best.speed_ci)} prompts/s{tie}) — rule: "
            f"{rule}.")


def facts(a: Advice) -> list[tuple[str, str]]:
    budget = "none" if a.budget_s is None else f"{a.budget_s:g} s"
    sampled = (f"{a.sampled_runs} of {a.planned_runs} runs: {a.sampled_texts} of {a.sample} "
               f"prompts (seed {a.seed}), with and without BOS where they fit"
               + (" — the budget stopped the sampling" if a.stopped_by_budget else ""))
    t = a.text
    seqs = ", ".join(f"{n} {source}" for source, n in a.sequences.items())
    skipped = (f"; {a.skipped_sequences} corpus continuations over the length limit skipped"
               if a.skipped_sequences else "")
    ref = next((r.divergence for r in a.policies if r.policy == REFERENCE), None)
    positions = f", {ref.positions} positions" if ref else ""
    return [("model", f"{a.model} (fingerprint {a.fingerprint[:12]})"),
            ("machine", machine_text(a.machine)),
            ("command", a.command or "python -m fuzz advise"),
            ("corpus", f"{a.corpus} ({plural(a.corpus_cases, 'case')} of this model)"),
            ("sampled", sampled),
            ("text", f"{t['source']}: {t['chunks']} chunks of {t['tokens']} tokens (BOS "
                     f"first; {t['available']} available), sha256 {t['sha256'][:16]}"),
            ("teacher-forced", f"{sum(a.sequences.values())} sequences ({seqs}){positions}"
                               f"{skipped}"),
            ("bounds", f"{a.bounds['max_new_tokens']} new tokens, prompts up to "
                       f"{a.bounds['max_prompt_tokens']} tokens"),
            ("budget", budget)]


NOTES = (
    "Teacher-forced, every position of every sequence, against float32: KLD is KL(float32 || "
    "policy) in nats; same top-1 is the share of positions whose most likely token is "
    "float32's; PPL ratio is PPL(policy)/PPL(float32) of the actual next tokens; RMS Δp the root "
    "mean square of the difference of their probabilities. Positions where the policy's logits "
    "are not finite are counted and left out. Intervals [95%]: a cluster bootstrap over "
    f"sequences ({BOOTSTRAP_REPS} resamples, fixed seed), since positions within a sequence are "
    "correlated; for prompts/s, the bootstrap interval of the median of per-batch speeds (every "
    "policy runs every batch, in a rotated order; one batch gives no interval); identical "
    "greedy: the share of sampled runs whose whole greedy continuation is float32's, with its "
    "Wilson interval (a harsh, secondary measure: one benign rounding flip changes every later "
    "token). CPU s/run: this process's CPU time per sampled run, steadier than wall time on a "
    "shared machine. Peak headroom: the least limit / max |x| over every site, step and "
    "position of every generated run (0: something overflowed). The tie goes to the safest, "
    "in this order: float32, bfloat16, float16-fp32-norm-residual, float16-fp32-residual, "
    "float16-fp32-layers plans, float16-clip32752, float16-clamp, float16."
)


def _text_table(columns: tuple[str, ...], rows: list[list[str]], last_free: bool) -> list[str]:
    table = [list(columns), *rows]
    n = len(columns) - (1 if last_free else 0)
    widths = [max(len(row[i]) for row in table) for i in range(n)]
    lines = []
    for row in table:
        cells = [c.ljust(w) if columns[i] in TEXT_COLUMNS else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells + ([row[-1]] if last_free else [])).rstrip())
    return lines


def render_text(a: Advice) -> str:
    lines = [f"{k}: {v}" for k, v in facts(a)] + [""]
    lines += _text_table(MAIN, main_rows(a), last_free=True) + [""]
    lines += _text_table(DETAIL, detail_rows(a), last_free=False)
    return "\n".join(lines + ["", recommendation_line(a)]) + "\n"


def _md_table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---" if c in TEXT_COLUMNS or c == "verdict" else "---:"
                          for c in columns) + "|"]
    return out + ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]


def render_markdown(a: Advice, png_name: str = f"{STEM}.png") -> str:
    out = [f"# gemma-fuzz advise: {md_code(a.model)}", ""]
    out += [f"- **{k}:** {md_code(v) if k == 'command' else v}" for k, v in facts(a)]
    out += ["", f"**{recommendation_line(a)}**", ""] + _md_table(MAIN, main_rows(a))
    out += ["", "Detail:", ""] + _md_table(DETAIL, detail_rows(a))
    out += ["", NOTES, "", f"![mean KLD vs speed]({png_name})", ""]
    return "\n".join(out)


def _html_table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(
        f"<td{'' if c in TEXT_COLUMNS or c == 'verdict' else ' class=num'}>{esc(v)}</td>"
        for c, v in zip(columns, row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(a: Advice, png: bytes) -> str:
    esc = html.escape
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts(a))
    data = base64.b64encode(png).decode("ascii")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>gemma-fuzz advise: {esc(a.model)}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em}"
        "table{border-collapse:collapse;font-size:.9em;margin:1em 0}th,td{border:1px solid #ccc;"
        "padding:.3em .5em;text-align:left}td.num{text-align:right}th{background:#f3f3f3}"
        "dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}"
        "dd{margin:0}img{max-width:100%}</style></head><body>"
        f"<h1>gemma-fuzz advise: <code>{esc(a.model)}</code></h1><dl>{dl}</dl>"
        f"<p><strong>{esc(recommendation_line(a))}</strong></p>"
        f"{_html_table(MAIN, main_rows(a))}<h2>Detail</h2>{_html_table(DETAIL, detail_rows(a))}"
        f"<p>{esc(NOTES)}</p>"
        f'<figure><img alt="mean KLD against float32 vs prompts per second, per policy" '
        f'src="data:image/png;base64,{data}"><figcaption>{esc(machine_text(a.machine))}'
        "</figcaption></figure></body></html>\n")


def report_paths(path: str | Path) -> tuple[Path, Path, Path, Path]:
    """(md, html, json, png): PATH.* for a path ending in .md/.html/.json, else the directory
    PATH (created if missing) holding advise.*."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix.lower() in REPORT_SUFFIXES else p / STEM
    return tuple(stem.with_name(stem.name + s)  # type: ignore[return-value]
                 for s in (".md", ".html", ".json", ".png"))


def render_json(a: Advice) -> str:
    """The report's JSON (strict: inf/nan as strings), what `--json` prints."""
    return json.dumps(json_safe(a.to_dict()), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write(a: Advice, path: str | Path) -> list[Path]:
    """The four files (see report_paths); returns their paths."""
    md_path, html_path, json_path, png_path = report_paths(path)
    try:
        md_path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"--report {path}: {md_path.parent} is a file, not a directory; give "
                         "a directory (or a path ending in .md, .html or .json)") from None
    png = render_png(a)
    write_atomic(png_path, png)
    write_atomic(md_path, render_markdown(a, png_path.name).encode("utf-8"))
    write_atomic(html_path, render_html(a, png).encode("utf-8"))
    write_atomic(json_path, render_json(a).encode("utf-8"))
    return [md_path, html_path, json_path, png_path]
