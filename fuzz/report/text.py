"""Text pieces shared by the markdown and HTML reports (and the plots' labels).

Number formats (activation magnitudes, headroom, durations), a prompt as a literal, one-line shell
quoting, a verdict's first non-finite value and overflowing terms in words, a corpus signature in
words, the commands that reproduce a run or a finding, and a policy's status. Each returns plain
text; the renderers escape it for their own format.

The last section is the report's wording itself (the totals line, a policy's counts, a finding's
facts, the nearest-miss rows, the fixed sentences): markdown.py and html.py lay out the same
content and add only their markup.
"""
from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Sequence
from typing import Any

from ..verdict import NonFinite, Verdict, layer_label
from .model import DTYPE_MAX, Finding, PolicySummary, RunSummary, unique_misses


def fmt_value(x: float) -> str:
    """Activation magnitudes: integers as integers (55008), huge/tiny ones in e-notation."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and (abs(x) >= 1e7 or abs(x) < 1e-3):
        return f"{x:.4g}"
    if x == int(x):
        return str(int(x))
    return f"{x:.4g}"


def fmt_headroom(h: float) -> str:
    if math.isinf(h):
        return "inf"
    return f"{h:.3g}"


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return str(seconds)
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h {m:02d}m {s:02d}s"
    return f"{m}m {s:02d}s" if m else f"{s}s"


def prompt_literal(prompt: str) -> str:
    """repr(): newlines, tabs and control characters visible as escapes, quotes delimit it."""
    return repr(prompt)


def shell_quote(text: str) -> str:
    """Quote for bash on one line: shlex for printable text, $'...' when it holds control chars
    (a newline inside '...' would split the command across lines in a log)."""
    if text.isprintable():
        return shlex.quote(text)
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("\\'")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "$'" + "".join(out) + "'"


def num_layers(verdict: Verdict) -> int:
    """Decoder layers in the verdict's table (labels '0'..'L-1')."""
    numeric = [int(k) for k in verdict.max_abs if k.isdigit()]
    return max(numeric) + 1 if numeric else 0


def nonfinite_layer_label(verdict: Verdict) -> str:
    assert verdict.first_nonfinite is not None
    return layer_label(verdict.first_nonfinite.layer, num_layers(verdict))


def describe_position(verdict: Verdict, nf: NonFinite) -> str:
    bos = " (BOS)" if verdict.add_bos and nf.position == 0 else ""
    return f"position {nf.position}{bos}, token id {nf.token_id}"


def describe_step(step: int) -> str:
    return "step 0 (prefill)" if step == 0 else f"step {step} (decode)"


def describe_nonfinite(verdict: Verdict) -> str:
    """'inf at step 0 (prefill), layer 7, site residual_mlp, position 0 (BOS), token id 2'."""
    nf = verdict.first_nonfinite
    assert nf is not None
    layer = nonfinite_layer_label(verdict)
    layer_text = layer if layer in ("embedding", "head") else f"layer {layer}"
    return (f"{nf.kind} at {describe_step(nf.step)}, {layer_text}, site {nf.site}, "
            f"{describe_position(verdict, nf)}")


def site_limit(verdict: Verdict, layer: str, site: str, dtype: str | None = None) -> float:
    limit = verdict.limits.get(f"{layer}/{site}")
    if limit is None and dtype is not None:
        limit = DTYPE_MAX.get(dtype)
    return math.nan if limit is None else float(limit)


def describe_terms(verdict: Verdict, dtype: str | None = None) -> str | None:
    """'channel 163: 55008 + 13376 = 68384 > 65504', or None when the probe found no channel."""
    nf = verdict.first_nonfinite
    if nf is None or nf.channel is None:
        return None
    text = f"channel {nf.channel}"
    if nf.terms is None:
        return text
    a, b = nf.terms
    total = a + b
    b_text = fmt_value(b) if b >= 0 else f"({fmt_value(b)})"
    text += f": {fmt_value(a)} + {b_text} = {fmt_value(total)}"
    limit = site_limit(verdict, nonfinite_layer_label(verdict), nf.site, dtype)
    if not math.isnan(limit):
        text += f" > {fmt_value(limit)}" if total >= 0 else f" < -{fmt_value(limit)}"
    return text


def min_headroom_site(verdict: Verdict, content_only: bool = True) -> tuple[str, str] | None:
    """(layer label, site) where the headroom is smallest."""
    best: tuple[float, str, str] | None = None
    for layer, sites in verdict.headroom(content_only).items():
        for site, h in sites.items():
            if best is None or h < best[0]:
                best = (h, layer, site)
    return None if best is None else (best[1], best[2])


def describe_where(layer: str, site: str) -> str:
    return site if layer in ("embedding", "head") else f"layer {layer} {site}"


def bos_text(add_bos: bool) -> str:
    return "BOS on" if add_bos else "BOS off (--no-bos)"


def signature_text(signature: Sequence[Any], layers: int) -> str:
    """A fuzz.corpus signature in words: 'layer 7 residual_mlp at the BOS position, BOS on'."""
    if len(signature) != 6:
        return " / ".join(map(str, signature))
    _, _, add_bos, layer, site, where = signature
    place = "the BOS position" if where == "bos" else "a content position"
    where_text = describe_where(layer_label(int(layer), layers), site)
    return f"{where_text} at {place}, {'BOS on' if add_bos else 'BOS off'}"


def check_command(summary: RunSummary, verdict: Verdict) -> str:
    parts = ["python", "-m", "fuzz", "check", "--model", shlex.quote(summary.model),
             "--policy", shlex.quote(verdict.policy), "--prompt", shell_quote(verdict.prompt)]
    if not verdict.add_bos:
        parts.append("--no-bos")
    if "max_new_tokens" in summary.bounds:
        parts += ["--max-new-tokens", str(summary.bounds["max_new_tokens"])]
    if summary.engine != "builtin":
        parts += ["--engine", shlex.quote(summary.engine)]
    return " ".join(parts + ["--json"])


def run_command(summary: RunSummary) -> str:
    """The command that ran (as the CLI recorded it), else one rebuilt from the summary."""
    if summary.command:
        return summary.command
    policies = ",".join(p.policy for p in summary.policies)
    parts = ["python", "-m", "fuzz", "run", "--model", shlex.quote(summary.model),
             "--policies", shlex.quote(policies), "--budget", f"{int(round(summary.budget_s))}s",
             "--seed", str(summary.seed), "--corpus", shlex.quote(summary.corpus_dir)]
    for key in ("max_new_tokens", "max_prompt_tokens"):
        if key in summary.bounds:
            parts += ["--" + key.replace("_", "-"), str(summary.bounds[key])]
    modes = {m for p in summary.policies for m in p.bos_modes}
    if modes == {False}:
        parts.append("--no-bos")
    if summary.engine != "builtin":
        parts += ["--engine", shlex.quote(summary.engine)]
    return " ".join(parts)


def replay_command(summary: RunSummary) -> str:
    return (f"python -m fuzz replay --corpus {shlex.quote(summary.corpus_dir)} "
            f"--model {shlex.quote(summary.model)}")


def policy_status(p: PolicySummary) -> str:
    """One word for the summary table; a declared-safe policy that failed is the alarm."""
    if p.findings and p.expected_safe:
        return "REGRESSION: declared safe, produced NaN/Inf"
    if p.findings:
        return "fails (as declared)"
    if p.examples == 0:
        return "not run"
    return "finite on every example"


def best_headroom_text(p: PolicySummary) -> str:
    if not math.isfinite(p.best_headroom) and not p.nearest_misses:
        return "n/a (no finite example)"
    return fmt_headroom(p.best_headroom)


def group_findings(findings: Iterable[Finding]) -> list[tuple[Finding, int]]:
    """One representative per signature (a new one if any) and how many findings share it."""
    groups: dict[tuple, list[Finding]] = {}
    for f in findings:
        groups.setdefault(f.signature, []).append(f)
    out = []
    for members in groups.values():
        first = next((f for f in members if f.is_new), members[0])
        out.append((first, len(members)))
    return out


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def also_hit(count: int) -> str:
    """Findings are bucketed by signature: say how many others fell in the same bucket."""
    return f"; {plural(count - 1, 'more example')} hit this signature" if count > 1 else ""


def status_text(f: Finding) -> str:
    return {"saved": "new, saved to the corpus",
            "known-signature": "known signature (already in the corpus, not saved again)",
            "duplicate-file": "already in the corpus (same case file)"}[f.status]


def bounds_text(bounds: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in bounds.items()) or "defaults"


def header_facts(s: RunSummary) -> list[tuple[str, str]]:
    stopped = s.stopped + (f" ({s.error})" if s.error else "")
    return [
        ("Model", s.model), ("Fingerprint", s.fingerprint), ("Engine", s.engine),
        ("Started", s.started),
        ("Budget / elapsed", f"{fmt_duration(s.budget_s)} / {fmt_duration(s.elapsed_s)}"),
        ("Stopped", stopped), ("Examples", str(s.examples)), ("Seed", str(s.seed)),
        ("Bounds", bounds_text(s.bounds)), ("Device", s.device),
        ("Versions", f"gemma-fuzz {s.tool_version}, torch {s.torch_version}"),
        ("Corpus", s.corpus_dir),
    ]


# --------------------------------------------------------------------------- report content
# What the markdown and the HTML report both say, as plain text: the two renderers add only their
# markup (and escaping), so the two files cannot drift apart in wording.

# Header facts whose value is a name or a path: shown as code.
CODE_FACTS = frozenset({"Model", "Fingerprint", "Corpus"})
HEADROOM_NOTE = ("Headroom is the dtype's largest finite value divided by the largest |x| seen "
                 "(below 1 means overflow), over content positions (the BOS attention sink "
                 "excluded).")
MISSES_TITLE = "Nearest misses (finite, lowest content headroom)"
NO_FINITE_EXAMPLE = "No finite example to report."

# One piece of a fact's value: its text, and whether it is set as code (a prompt, a path, a
# command: what a reader copies).
Segment = tuple[str, bool]


def findings_total(s: RunSummary) -> str:
    """'3 findings, 1 new.'"""
    new = sum(p.new_findings for p in s.policies)
    return f"{plural(len(s.findings), 'finding')}, {new} new."


def safety_text(p: PolicySummary) -> str:
    return "declared safe" if p.expected_safe else "declared unsafe"


def policy_counts(p: PolicySummary) -> str:
    """'40 examples (BOS on); 2 findings: 1 new, 1 known.'"""
    modes = ", ".join(bos_text(m) for m in p.bos_modes) or "none"
    return (f"{plural(p.examples, 'example')} ({modes}); {plural(len(p.findings), 'finding')}: "
            f"{p.new_findings} new, {p.known_findings} known.")


def finding_heading(f: Finding, i: int) -> str:
    return f"Finding {i}: {signature_text(f.signature, num_layers(f.verdict))}"


def finding_facts(s: RunSummary, p: PolicySummary, f: Finding,
                  count: int) -> list[tuple[str, list[Segment]]]:
    """The facts listed under a finding, in order: (label, value as segments)."""
    v = f.verdict
    empty = " (empty: BOS alone)" if v.prompt == "" else ""
    facts = [("Status", [(status_text(f) + also_hit(count), False)]),
             ("Prompt", [(prompt_literal(v.prompt), True),
                         (f"{empty} ({len(v.prompt_ids)} tokens)", False)]),
             ("BOS", [("on" if v.add_bos else "off", False)]),
             ("First non-finite", [(describe_nonfinite(v), False)])]
    terms = describe_terms(v, p.dtype)
    if terms:
        facts.append(("Overflow", [(terms, False)]))
    if f.case_path:
        facts.append(("Case file", [(f.case_path, True)]))
    facts.append(("Reproduce", [(check_command(s, v), True)]))
    return facts


def miss_rows(p: PolicySummary) -> list[tuple[str, str, str, str]]:
    """(headroom, where or '', prompt literal, BOS) for each nearest miss, each example once."""
    rows = []
    for v in unique_misses(p):
        where = min_headroom_site(v)
        rows.append((fmt_headroom(v.min_headroom(content_only=True)),
                     describe_where(*where) if where else "", prompt_literal(v.prompt),
                     bos_text(v.add_bos)))
    return rows
