"""The fuzz run's report: data model, markdown, self-contained HTML with plots, and JSON.

The search fills a :class:`RunSummary` (one :class:`PolicySummary` per precision policy, each
holding its :class:`Finding` records and its nearest misses) and calls :func:`write_report`, which
writes ``<stem>.md``, ``<stem>.html`` and ``<stem>.json`` side by side.

- Markdown: what a person reads in a CI log or a PR: header, per-policy table, every finding
  (minimal prompt, first non-finite value, the channel and the two terms that overflowed, the case
  file, a command that reproduces it) and the nearest misses.
- HTML: the same content in one file that needs nothing else: inline CSS, plots as base64 PNG
  data URIs, no URL of any kind (a nightly artifact is often opened offline or from a sandbox).
- JSON: the summary itself (strict JSON: inf/nan as strings, see fuzz.verdict.json_safe), so a
  later tool can re-render or compare runs: ``RunSummary.from_json(path.read_text())``.

Plots use matplotlib's Agg canvas directly (``FigureCanvasAgg`` on a ``Figure``), never pyplot:
nothing global is switched, so importing this module, or rendering from inside a notebook or a
pytest run that uses another backend, changes no one's backend. matplotlib is imported lazily.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import html
import io
import json
import math
import os
import re
import shlex
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .verdict import NonFinite, Verdict, from_json_safe, json_safe, layer_label

FINDING_STATUSES = ("saved", "known-signature", "duplicate-file")
STOP_REASONS = ("budget", "interrupted", "error")
NEAREST_MISSES = 5
REPORT_SUFFIXES = (".md", ".html", ".htm", ".json")
DEFAULT_STEM = "report"

# finfo(dtype).max, for when a verdict carries no per-site limits (older or hand-made records).
DTYPE_MAX = {
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": 3.4028234663852886e38,
}

# Site groups drawn as one line each (max over the group's sites at each layer). Names are those
# the engine records (fuzz.engine.model.LAYER_SITES, plus embedding, final_norm and logits).
SITE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("residual stream", ("embedding", "residual_attn", "residual_mlp")),
    ("norm outputs", ("input_layernorm", "post_attention_layernorm",
                      "pre_feedforward_layernorm", "post_feedforward_layernorm", "final_norm")),
    ("MLP activation/output", ("mlp_act", "mlp_output")),
    ("attention qkv/scores/output", ("qkv", "attn_scores", "attn_output")),
    ("logits", ("logits",)),
)
GROUP_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e")


# =========================================================================== data model


@dataclass
class Finding:
    """One failing example the search kept (shrunk), and what the corpus did with it."""

    verdict: Verdict
    status: str  # 'saved' | 'known-signature' | 'duplicate-file' (fuzz.corpus.SaveStatus)
    case_path: str | Path | None  # where the case is (saved/duplicate) or would have gone
    signature: tuple  # fuzz.corpus.signature: (model, policy, add_bos, layer, site, where)
    # True when the probe named the channel and terms that overflowed. None: derive it.
    explained: bool | None = None

    def __post_init__(self) -> None:
        if self.status not in FINDING_STATUSES:
            raise ValueError(
                f"Finding.status {self.status!r} is not one of {', '.join(FINDING_STATUSES)} "
                "(use SaveResult.status from fuzz.corpus)"
            )
        if self.verdict.first_nonfinite is None:
            raise ValueError(
                f"Finding for prompt {self.verdict.prompt[:40]!r} (policy {self.verdict.policy!r})"
                " has a finite verdict: only failing verdicts are findings; record finite ones "
                "with PolicySummary.observe()"
            )
        self.signature = tuple(self.signature)
        if self.case_path is not None:
            self.case_path = str(self.case_path)  # a Path (SaveResult.path) must stay JSON-able
        if self.explained is None:
            self.explained = self.verdict.first_nonfinite.channel is not None

    @property
    def is_new(self) -> bool:
        return self.status == "saved"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": _verdict_to_dict(self.verdict), "status": self.status,
                "case_path": self.case_path, "signature": list(self.signature),
                "explained": self.explained}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(verdict=_verdict_from_dict(_need(d, "verdict", "finding")),
                   status=_need(d, "status", "finding"), case_path=d.get("case_path"),
                   signature=tuple(_need(d, "signature", "finding")),
                   explained=d.get("explained"))


@dataclass
class PolicySummary:
    """What the run saw for one precision policy.

    The search calls :meth:`observe` for every verdict it computed (finite or not) and
    :meth:`add_finding` for each shrunk finding it tried to save.
    """

    policy: str
    dtype: str  # "float16", "bfloat16", "float32"
    expected_safe: bool  # declared safe (fuzz.precision): a finding here is a regression
    examples: int = 0
    findings: list[Finding] = field(default_factory=list)
    nearest_misses: list[Verdict] = field(default_factory=list)  # lowest content headroom first
    best_headroom: float = math.inf  # lowest content headroom among finite verdicts
    peak: Verdict | None = None  # what to plot: first finding, else nearest miss
    bos_modes: list[bool] = field(default_factory=list)

    @classmethod
    def for_policy(cls, name: str) -> PolicySummary:
        """An empty summary for a policy of fuzz.precision (imports torch)."""
        from .precision import get_policy

        policy = get_policy(name)
        return cls(policy=policy.name, dtype=str(policy.dtype).removeprefix("torch."),
                   expected_safe=policy.expected_safe)

    def observe(self, verdict: Verdict, keep: int = NEAREST_MISSES) -> None:
        """Counts one example; a finite one may become a nearest miss."""
        self.examples += 1
        if verdict.add_bos not in self.bos_modes:
            self.bos_modes.append(verdict.add_bos)
        if not verdict.finite:
            return
        # Content headroom: position 0 with BOS is the shared attention sink (NUMERICS.md), so
        # it says nothing about how close *this prompt* came to overflowing.
        headroom = verdict.min_headroom(content_only=True)
        self.best_headroom = min(self.best_headroom, headroom)
        full = len(self.nearest_misses) >= keep
        if full and headroom >= self.nearest_misses[-1].min_headroom(content_only=True):
            return  # the common case in a long run: no sort, no table walk per kept verdict
        if any(_same_example(verdict, m) for m in self.nearest_misses):
            return  # Hypothesis replays examples: one prompt must not fill the list
        self.nearest_misses.append(verdict)
        self.nearest_misses.sort(key=lambda v: v.min_headroom(content_only=True))
        del self.nearest_misses[keep:]
        if not self.findings:
            self.peak = self.nearest_misses[0]

    def add_finding(self, verdict: Verdict, status: str, case_path: str | Path | None,
                    signature: Sequence[Any]) -> Finding:
        finding = Finding(verdict, status, None if case_path is None else str(case_path),
                          tuple(signature))
        self.findings.append(finding)
        if verdict.add_bos not in self.bos_modes:
            self.bos_modes.append(verdict.add_bos)
        if len(self.findings) == 1:
            self.peak = verdict
        return finding

    @property
    def new_findings(self) -> int:
        return sum(f.is_new for f in self.findings)

    @property
    def known_findings(self) -> int:
        return len(self.findings) - self.new_findings

    def plotted(self) -> Verdict | None:
        """The verdict to plot (peak, else the first finding, else the nearest miss)."""
        if self.peak is not None:
            return self.peak
        if self.findings:
            return self.findings[0].verdict
        return self.nearest_misses[0] if self.nearest_misses else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "dtype": self.dtype, "expected_safe": self.expected_safe,
            "examples": self.examples, "findings": [f.to_dict() for f in self.findings],
            "nearest_misses": [_verdict_to_dict(v) for v in self.nearest_misses],
            "best_headroom": self.best_headroom,
            "peak": _verdict_to_dict(self.peak) if self.peak is not None else None,
            "bos_modes": list(self.bos_modes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicySummary:
        where = f"policy {d.get('policy', '?')!r}"
        peak = d.get("peak")
        return cls(
            policy=_need(d, "policy", "policy summary"), dtype=_need(d, "dtype", where),
            expected_safe=_need(d, "expected_safe", where), examples=_need(d, "examples", where),
            findings=[Finding.from_dict(f) for f in _need(d, "findings", where)],
            nearest_misses=[_verdict_from_dict(v) for v in d.get("nearest_misses", [])],
            best_headroom=float(from_json_safe(d.get("best_headroom", "inf"))),
            peak=_verdict_from_dict(peak) if peak is not None else None,
            bos_modes=list(d.get("bos_modes", [])),
        )


@dataclass
class RunSummary:
    """One fuzz run: what ran, for how long, and each policy's summary."""

    model: str
    fingerprint: str
    seed: int
    budget_s: float
    elapsed_s: float
    examples: int
    stopped: str  # 'budget' | 'interrupted' | 'error'
    device: str
    tool_version: str
    torch_version: str
    bounds: dict  # {"max_new_tokens": N, "max_prompt_tokens": N, ...}
    policies: list[PolicySummary]
    corpus_dir: str
    started: str  # ISO 8601
    command: str | None = None  # the command line as run (shown as the way to reproduce)
    error: str | None = None  # the error message when stopped == 'error'
    engine: str = "builtin"

    def __post_init__(self) -> None:
        if self.stopped not in STOP_REASONS:
            raise ValueError(f"RunSummary.stopped {self.stopped!r} is not one of "
                             f"{', '.join(STOP_REASONS)}")

    @property
    def findings(self) -> list[Finding]:
        return [f for p in self.policies for f in p.findings]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["policies"] = [p.to_dict() for p in self.policies]
        d["bounds"] = dict(self.bounds)
        return d

    def to_json(self) -> str:
        """Strict JSON (inf/nan as strings), sorted keys, indent 2, trailing newline."""
        return json.dumps(json_safe(self.to_dict()), sort_keys=True, indent=2,
                          ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunSummary:
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"report JSON is not valid JSON ({exc}); regenerate it with "
                             "`python -m fuzz run ... --report PATH`") from None
        if not isinstance(d, dict):
            raise ValueError("report JSON must hold one object (a RunSummary)")
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSummary:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"report JSON has unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"a RunSummary has {', '.join(sorted(known))}")
        values = dict(d)
        values["policies"] = [PolicySummary.from_dict(p)
                              for p in _need(d, "policies", "report")]
        for key in ("budget_s", "elapsed_s"):
            values[key] = float(from_json_safe(_need(d, key, "report")))
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in values and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"report JSON lacks key(s) {', '.join(map(repr, missing))}")
        return cls(**values)


def _need(d: dict[str, Any], key: str, where: str) -> Any:
    try:
        return d[key]
    except (KeyError, TypeError):
        raise ValueError(f"report JSON: {where} lacks key {key!r}") from None


def _verdict_to_dict(verdict: Verdict) -> dict[str, Any]:
    """Verdict.to_dict without the derived headroom table (a quarter of the file's size;
    Verdict.headroom() recomputes it from max_abs and limits)."""
    d = verdict.to_dict()
    d.pop("headroom", None)
    return d


def _verdict_from_dict(d: dict[str, Any]) -> Verdict:
    """Verdict.from_dict plus json_safe's inverse on the numeric fields only (a prompt or a
    generated text that reads "inf" must stay a string)."""
    d = dict(d)
    for key in ("max_abs", "content_max_abs", "limits"):
        if key in d:
            d[key] = from_json_safe(d[key])
    nf = d.get("first_nonfinite")
    if nf is not None and nf.get("terms") is not None:
        d["first_nonfinite"] = {**nf, "terms": [float(from_json_safe(t)) for t in nf["terms"]]}
    try:
        return Verdict.from_dict(d)
    except TypeError as exc:
        raise ValueError(f"report JSON: a verdict does not fit fuzz.verdict.Verdict ({exc})"
                         ) from None


def unique_misses(p: PolicySummary) -> list[Verdict]:
    """The nearest misses, each example once (a list filled without observe() may repeat one)."""
    out: list[Verdict] = []
    for v in p.nearest_misses:
        if not any(_same_example(v, kept) for kept in out):
            out.append(v)
    return out


def _same_example(a: Verdict, b: Verdict) -> bool:
    return a.prompt == b.prompt and a.add_bos == b.add_bos and a.prompt_ids == b.prompt_ids


# =========================================================================== text pieces


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


# =========================================================================== markdown


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
    code_facts = {"Model", "Fingerprint", "Corpus"}
    for key, value in header_facts(s):
        out.append(f"- **{key}:** {md_code(value) if key in code_facts else value}")
    new = sum(p.new_findings for p in s.policies)
    out += ["", f"**{plural(len(s.findings), 'finding')}, {new} new.**", "",
            "## How to reproduce", "", "```sh", run_command(s), replay_command(s), "```", "",
            "## Policies", "",
            "| policy | dtype | declared safe | examples | findings (new / known) | "
            "best headroom | status |",
            "|---|---|---|---:|---:|---:|---|"]
    for p in s.policies:
        out.append(
            f"| {md_cell(p.policy)} | {p.dtype} | {'yes' if p.expected_safe else 'no'} | "
            f"{p.examples} | {p.new_findings} / {p.known_findings} | "
            f"{best_headroom_text(p)} | {policy_status(p)} |")
    out += ["", "Headroom is the dtype's largest finite value divided by the largest |x| seen "
            "(below 1 means overflow), over content positions (the BOS attention sink excluded).",
            ""]
    for p in s.policies:
        out += _md_policy(s, p)
    return "\n".join(out).rstrip() + "\n"


def _md_policy(s: RunSummary, p: PolicySummary) -> list[str]:
    safe = "declared safe" if p.expected_safe else "declared unsafe"
    modes = ", ".join(bos_text(m) for m in p.bos_modes) or "none"
    out = [f"## Policy `{p.policy}` ({p.dtype}, {safe})", "",
           f"{plural(p.examples, 'example')} ({modes}); {plural(len(p.findings), 'finding')}: "
           f"{p.new_findings} new, {p.known_findings} known.", ""]
    for i, (f, count) in enumerate(group_findings(p.findings), 1):
        out += _md_finding(s, p, f, count, i)
    if p.nearest_misses:
        out += ["### Nearest misses (finite, lowest content headroom)", ""]
        for v in unique_misses(p):
            where = min_headroom_site(v)
            at = f" at {describe_where(*where)}" if where else ""
            out.append(f"- headroom {fmt_headroom(v.min_headroom(content_only=True))}{at}: "
                       f"{md_code(prompt_literal(v.prompt))} ({bos_text(v.add_bos)})")
        out.append("")
    elif not p.findings:
        out += ["No finite example to report.", ""]
    return out


def _md_finding(s: RunSummary, p: PolicySummary, f: Finding, count: int, i: int) -> list[str]:
    v = f.verdict
    out = [f"### Finding {i}: {signature_text(f.signature, num_layers(v))}", "",
           f"- **Status:** {status_text(f)}{also_hit(count)}",
           f"- **Prompt:** {md_code(prompt_literal(v.prompt))}"
           + (" (empty: BOS alone)" if v.prompt == "" else "")
           + f" ({len(v.prompt_ids)} tokens)",
           f"- **BOS:** {'on' if v.add_bos else 'off'}",
           f"- **First non-finite:** {describe_nonfinite(v)}"]
    terms = describe_terms(v, p.dtype)
    if terms:
        out.append(f"- **Overflow:** {terms}")
    if f.case_path:
        out.append(f"- **Case file:** {md_code(f.case_path)}")
    out += [f"- **Reproduce:** {md_code(check_command(s, v))}", ""]
    return out


# =========================================================================== HTML

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #eee;padding-bottom:.2em}
h3{font-size:1.05em;margin-top:1.2em}
code,pre{font-family:ui-monospace,'DejaVu Sans Mono',Menlo,Consolas,monospace;font-size:.92em}
code{background:#f3f3f3;padding:.1em .3em;border-radius:3px;overflow-wrap:break-word}
pre{background:#f6f8fa;padding:.8em;border-radius:4px;white-space:pre-wrap;
overflow-wrap:anywhere}
table{border-collapse:collapse;margin:.6em 0}
th,td{border:1px solid #d0d0d0;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
dl.facts dt{font-weight:600} dl.facts dd{margin:0}
.finding{border-left:4px solid #d62728;padding:.2em 1em;margin:1em 0;background:#fff8f8}
.finding.known{border-left-color:#999;background:#fafafa}
.alarm{color:#b00020;font-weight:700} .ok{color:#217a21}
.overflow{font-weight:600}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}
"""


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _code(text: str) -> str:
    return f"<code>{_h(text)}</code>"


def render_html(s: RunSummary, plots: dict[str, bytes] | None = None) -> str:
    """The whole page; `plots` maps policy name -> PNG bytes (embedded as data URIs)."""
    plots = plots or {}
    code_facts = {"Model", "Fingerprint", "Corpus"}
    facts = "".join(f"<dt>{_h(k)}</dt><dd>{_code(v) if k in code_facts else _h(v)}</dd>"
                    for k, v in header_facts(s))
    new = sum(p.new_findings for p in s.policies)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>gemma-fuzz report: {_h(s.model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>gemma-fuzz report: {_code(s.model)}</h1>",
        f'<dl class="facts">{facts}</dl>',
        f"<p><strong>{plural(len(s.findings), 'finding')}, {new} new.</strong></p>",
        "<h2>How to reproduce</h2>",
        f"<pre>{_h(run_command(s))}\n{_h(replay_command(s))}</pre>",
        "<h2>Policies</h2>", _html_policy_table(s),
        "<p>Headroom is the dtype's largest finite value divided by the largest |x| seen "
        "(below 1 means overflow), over content positions (the BOS attention sink excluded).</p>",
    ]
    for p in s.policies:
        parts.append(_html_policy(s, p, plots.get(p.policy)))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_policy_table(s: RunSummary) -> str:
    rows = []
    for p in s.policies:
        status = policy_status(p)
        cls = "alarm" if p.findings and p.expected_safe else ("ok" if not p.findings else "")
        rows.append(
            f"<tr><td>{_code(p.policy)}</td><td>{_h(p.dtype)}</td>"
            f"<td>{'yes' if p.expected_safe else 'no'}</td><td class=num>{p.examples}</td>"
            f"<td class=num>{p.new_findings} / {p.known_findings}</td>"
            f"<td class=num>{_h(best_headroom_text(p))}</td>"
            f'<td class="{cls}">{_h(status)}</td></tr>')
    return ("<table><tr><th>policy</th><th>dtype</th><th>declared safe</th><th>examples</th>"
            "<th>findings (new / known)</th><th>best headroom</th><th>status</th></tr>"
            + "".join(rows) + "</table>")


def _html_policy(s: RunSummary, p: PolicySummary, png: bytes | None) -> str:
    safe = "declared safe" if p.expected_safe else "declared unsafe"
    modes = ", ".join(bos_text(m) for m in p.bos_modes) or "none"
    parts = [f'<h2 id="policy-{_h(p.policy)}">Policy {_code(p.policy)} '
             f"({_h(p.dtype)}, {safe})</h2>",
             f"<p>{plural(p.examples, 'example')} ({_h(modes)}); "
             f"{plural(len(p.findings), 'finding')}: {p.new_findings} new, "
             f"{p.known_findings} known.</p>"]
    for i, (f, count) in enumerate(group_findings(p.findings), 1):
        parts.append(_html_finding(s, p, f, count, i))
    if p.nearest_misses:
        rows = []
        for v in unique_misses(p):
            where = min_headroom_site(v)
            rows.append(
                f"<tr><td class=num>{_h(fmt_headroom(v.min_headroom(content_only=True)))}</td>"
                f"<td>{_h(describe_where(*where)) if where else ''}</td>"
                f"<td>{_code(prompt_literal(v.prompt))}</td><td>{_h(bos_text(v.add_bos))}</td>"
                "</tr>")
        parts.append("<h3>Nearest misses (finite, lowest content headroom)</h3>"
                     "<table><tr><th>headroom</th><th>where</th><th>prompt</th><th>BOS</th></tr>"
                     + "".join(rows) + "</table>")
    elif not p.findings:
        parts.append("<p>No finite example to report.</p>")
    plotted = p.plotted()
    if png is not None and plotted is not None:
        what = "first finding" if p.findings else "nearest miss"
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure><img alt="max |x| and headroom per layer, policy {_h(p.policy)}" '
            f'src="data:image/png;base64,{data}"><figcaption>Policy {_code(p.policy)}, {what}: '
            f"{_code(prompt_literal(plotted.prompt))} ({_h(bos_text(plotted.add_bos))}). "
            "Top: max |x| per layer for each site group (log scale; non-finite values drawn at "
            "the top edge). Bottom: headroom per layer, min over sites.</figcaption></figure>")
    return "\n".join(parts)


def _html_finding(s: RunSummary, p: PolicySummary, f: Finding, count: int, i: int) -> str:
    v = f.verdict
    items = [("Status", _h(status_text(f) + also_hit(count))),
             ("Prompt", _code(prompt_literal(v.prompt))
              + (" (empty: BOS alone)" if v.prompt == "" else "")
              + f" ({len(v.prompt_ids)} tokens)"),
             ("BOS", "on" if v.add_bos else "off"),
             ("First non-finite", _h(describe_nonfinite(v)))]
    terms = describe_terms(v, p.dtype)
    if terms:
        items.append(("Overflow", f'<span class="overflow">{_h(terms)}</span>'))
    if f.case_path:
        items.append(("Case file", _code(f.case_path)))
    items.append(("Reproduce", _code(check_command(s, v))))
    body = "".join(f"<dt>{_h(k)}</dt><dd>{val}</dd>" for k, val in items)
    cls = "finding" if f.is_new else "finding known"
    heading = f"Finding {i}: {signature_text(f.signature, num_layers(v))}"
    return (f'<div class="{cls}"><h3>{_h(heading)}</h3>'
            f'<dl class="facts">{body}</dl></div>')


# =========================================================================== plots


@dataclass
class _Series:
    label: str
    color: str
    x: list[int] = field(default_factory=list)
    y: list[float] = field(default_factory=list)  # finite, > 0 (drawable on a log axis)
    bad_x: list[int] = field(default_factory=list)  # x where some value was inf/nan

    def add(self, x: int, values: list[float], bad: bool,
            reduce: Callable[[list[float]], float] = max) -> None:
        """A layer where a site was inf/nan still shows its finite sites (at the overflow layer
        that is the other residual add, e.g. 61200 just under 65504), plus a marker."""
        if bad:
            self.bad_x.append(x)
        drawable = [v for v in values if math.isfinite(v) and v > 0]
        if drawable:
            self.x.append(x)
            self.y.append(reduce(drawable))

    def finish(self) -> _Series | None:
        order = sorted(range(len(self.x)), key=self.x.__getitem__)
        self.x, self.y = [self.x[i] for i in order], [self.y[i] for i in order]
        self.bad_x.sort()
        return self if (self.x or self.bad_x) else None


def _layer_axis(verdict: Verdict) -> tuple[list[str], dict[str, int]]:
    """x positions: embedding, 0..L-1, head (in that order)."""
    n = num_layers(verdict)
    labels = ["embedding", *map(str, range(n)), "head"]
    return labels, {label: i for i, label in enumerate(labels)}


def _group_series(table: dict[str, dict[str, float]], xpos: dict[str, int], label: str,
                  sites: tuple[str, ...], color: str) -> _Series | None:
    """Max |x| over a group's sites at each layer."""
    s = _Series(label, color)
    for layer, values in table.items():
        picked = [values[site] for site in sites if site in values]
        if layer in xpos and picked:
            s.add(xpos[layer], picked, not all(math.isfinite(v) for v in picked))
    return s.finish()


def _headroom_series(verdict: Verdict, xpos: dict[str, int], content_only: bool, label: str,
                     color: str) -> _Series | None:
    """Min headroom over every site at each layer (0 marks an inf/nan site)."""
    s = _Series(label, color)
    for layer, sites in verdict.headroom(content_only).items():
        values = list(sites.values())
        if layer in xpos and values:
            bad = any(v == 0 for v in values)
            # The min over sites IS 0 there: no finite point, or a layer whose attention already
            # read NaN would seem to recover through its still-finite norm output.
            s.add(xpos[layer], [] if bad else values, bad, reduce=min)
    return s.finish()


def _dtype_name(limit: float) -> str:
    for name, value in DTYPE_MAX.items():
        if math.isclose(limit, value, rel_tol=1e-6):
            return name
    return "dtype"


@functools.lru_cache(maxsize=1)
def _font_charmap() -> frozenset[int]:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    path = font_manager.findfont(font_manager.FontProperties())
    return frozenset(FT2Font(path).get_charmap())


def plot_text(text: str, limit: int = 60) -> str:
    """A prompt for a plot title: repr-escaped, shortened, characters the font lacks as \\uXXXX
    (so matplotlib draws no empty boxes), and '$' escaped (it would start mathtext)."""
    literal = prompt_literal(text)
    if len(literal) > limit:
        literal = literal[: limit - 4] + "...'"
    charmap = _font_charmap()
    out = []
    for ch in literal:
        if ord(ch) in charmap or ch == " ":
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out).replace("$", r"\$")


def default_title(verdict: Verdict) -> str:
    state = "finite" if verdict.finite else "non-finite"
    return (f"{verdict.policy}: {plot_text(verdict.prompt)} "
            f"({'BOS' if verdict.add_bos else 'no BOS'}, {state})")


def verdict_figure(verdict: Verdict, title: str | None = None, dpi: int = 100) -> Any:
    """A matplotlib Figure (on an Agg canvas, no pyplot) with two stacked panels: max |x| per
    layer for each site group, and headroom per layer (min over sites)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax_max, ax_head = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    labels, xpos = _layer_axis(verdict)
    _draw_max_abs(ax_max, verdict, xpos)
    _draw_headroom(ax_head, verdict, xpos)
    _mark_first_nonfinite((ax_max, ax_head), verdict, xpos)
    step = max(1, len(labels) // 24)  # keep tick labels readable for 46-layer models
    ticks = list(range(0, len(labels), step))
    if ticks[-1] != len(labels) - 1:
        ticks.append(len(labels) - 1)
    ax_head.set_xticks(ticks, [("emb" if labels[t] == "embedding" else labels[t]) for t in ticks])
    ax_head.set_xlabel("layer")
    ax_head.set_xlim(-0.5, len(labels) - 0.5)
    fig.suptitle(title or default_title(verdict), fontsize=11)
    # Fixed margins: tight_layout measured ~1 s per figure here (it lays out every tick label
    # twice), more than everything else in the report together.
    fig.subplots_adjust(left=0.08, right=0.70, bottom=0.08, top=0.93, hspace=0.08)
    return fig


def render_png(verdict: Verdict, title: str | None = None, dpi: int = 100) -> bytes:
    """verdict_figure() as PNG bytes."""
    buffer = io.BytesIO()
    verdict_figure(verdict, title, dpi).savefig(buffer, format="png")
    return buffer.getvalue()


def plot_verdict(verdict: Verdict, path: str | Path, title: str | None = None) -> Path:
    """Writes the verdict's plot as a PNG at `path` (for `fuzz check --plot`); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot path {str(path)!r} must end in .png (the plot is a PNG image)")
    _atomic_write(path, render_png(verdict, title))
    return path


def _legend(ax: Any) -> None:
    """Legend to the right of the axes: inside, it hid the early layers' lines."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              framealpha=0.9)


def _log_y(ax: Any) -> None:
    """Log y axis with decade ticks only: minor ticks cost a Tick object each (a third of the
    render time measured here) and add nothing a reader needs at this size."""
    from matplotlib.ticker import LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
    ax.yaxis.set_minor_locator(NullLocator())


def _draw_max_abs(ax: Any, verdict: Verdict, xpos: dict[str, int]) -> None:
    series = [s for (label, sites), color in zip(SITE_GROUPS, GROUP_COLORS, strict=True)
              if (s := _group_series(verdict.max_abs, xpos, label, sites, color)) is not None]
    finite_values = [y for s in series for y in s.y]
    data_top = max(finite_values, default=1.0)
    data_bottom = min(finite_values, default=1.0)
    limits = sorted({v for v in verdict.limits.values() if math.isfinite(v)})
    # A limit far above the data (float32's 3.4e38) would squash the plot into its bottom
    # decades: draw only limits within 1e4x of the data, and name the others in the legend.
    shown = [lim for lim in limits if lim <= data_top * 1e4]
    top = max([data_top, *shown]) * 4
    for s in series:
        ax.plot(s.x, s.y, marker="o", ms=3.5, lw=1.6, color=s.color, label=s.label)
        if s.bad_x:
            # inf/nan cannot be plotted on a log axis: pin them to the top edge.
            ax.scatter(s.bad_x, [top] * len(s.bad_x), marker="X", s=70, color=s.color,
                       edgecolors="black", linewidths=0.6, zorder=5, clip_on=False)
    if verdict.add_bos:  # the BOS sink dominates the residual; show the prompt's own values too
        content = _group_series(verdict.content_max_abs, xpos, "residual stream, excluding BOS",
                                SITE_GROUPS[0][1], GROUP_COLORS[0])
        if content is not None and content.y and (not series or content.y != series[0].y):
            ax.plot(content.x, content.y, ls=":", lw=1.5, color=content.color,
                    label=content.label)
    for lim in limits:
        name = f"{_dtype_name(lim)} max = {fmt_value(lim)}"
        if lim in shown:
            ax.axhline(lim, color="black", ls="--", lw=1, label=name)
        else:
            ax.plot([], [], " ", label=f"{name} (off the chart)")
    if any(s.bad_x for s in series):
        ax.scatter([], [], marker="X", s=70, color="white", edgecolors="black",
                   label="inf/nan (drawn at the top edge)")
    _log_y(ax)
    ax.set_ylim(max(data_bottom / 4, 1e-3), top)
    ax.set_ylabel("max |x|")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax)


def _draw_headroom(ax: Any, verdict: Verdict, xpos: dict[str, int]) -> None:
    series = [_headroom_series(verdict, xpos, False, "all positions", "#444444")]
    if verdict.add_bos:
        series.append(_headroom_series(verdict, xpos, True, "excluding BOS", "#1f77b4"))
    series = [s for s in series if s is not None]
    values = [y for s in series for y in s.y] or [1.0]
    # As for the limits above: the line at 1 is drawn only when it is within 1e4x of the data
    # (float32's headroom is ~1e33: forcing 1 into view would flatten every line).
    near_one = min(values) <= 1e4
    bottom = min([*values, 1.0] if near_one else values) / 4
    top = max([*values, 1.0] if near_one else values) * 4
    for s in series:
        ax.plot(s.x, s.y, marker="o", ms=3.5, lw=1.6, color=s.color, label=s.label)
        if s.bad_x:
            ax.scatter(s.bad_x, [bottom] * len(s.bad_x), marker="v", s=60, color=s.color,
                       edgecolors="black", linewidths=0.6, zorder=5, clip_on=False)
    if any(s.bad_x for s in series):
        ax.scatter([], [], marker="v", s=60, color="white", edgecolors="black",
                   label="no headroom: inf/nan (bottom edge)")
    if near_one:
        ax.axhline(1.0, color="#d62728", ls="--", lw=1, label="headroom 1 (overflow below)")
    else:
        ax.plot([], [], " ", label="headroom 1 (overflow) is far below")
    _log_y(ax)
    ax.set_ylim(bottom, top)
    ax.set_ylabel("headroom (limit / max |x|)")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax)


def _mark_first_nonfinite(axes: Sequence[Any], verdict: Verdict, xpos: dict[str, int]) -> None:
    nf = verdict.first_nonfinite
    if nf is None:
        return
    label = nonfinite_layer_label(verdict)
    if label not in xpos:
        return
    text = f"first {nf.kind}: {describe_where(label, nf.site)}, step {nf.step}, pos {nf.position}"
    for i, ax in enumerate(axes):
        ax.axvline(xpos[label], color="#8c564b", lw=1.2, alpha=0.8,
                   label=text if i == 0 else None)
    _legend(axes[0])


# =========================================================================== writing


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


def render_plots(summary: RunSummary) -> dict[str, bytes]:
    """One PNG per policy that has something to plot."""
    plots = {}
    for p in summary.policies:
        verdict = p.plotted()
        if verdict is not None:
            plots[p.policy] = render_png(verdict)
    return plots


def write_report(summary: RunSummary, path: str | Path) -> list[Path]:
    """Writes <stem>.md, <stem>.html (self-contained, with plots) and <stem>.json; returns them."""
    md_path, html_path, json_path = report_paths(path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(md_path, render_markdown(summary).encode("utf-8"))
    _atomic_write(html_path, render_html(summary, render_plots(summary)).encode("utf-8"))
    _atomic_write(json_path, summary.to_json().encode("utf-8"))
    return [md_path, html_path, json_path]


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp file + rename: a killed job never leaves a half-written report behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
