"""The report's data model: what a run saw, and its JSON form.

The search fills a :class:`RunSummary`: one :class:`PolicySummary` per precision policy, each
holding its :class:`Finding` records (shrunk failing examples and what the corpus did with them)
and its nearest misses (the finite examples with the lowest content headroom).

JSON is the summary itself (strict JSON: inf/nan as strings, see fuzz.verdict.json_safe), so a
later tool can re-render or compare runs: ``RunSummary.from_json(path.read_text())``. Verdicts are
stored without their derived headroom table, and read back with json_safe's inverse applied to
numeric fields only.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..verdict import Verdict, from_json_safe, json_safe

FINDING_STATUSES = ("saved", "known-signature", "duplicate-file")
STOP_REASONS = ("budget", "interrupted", "error")
NEAREST_MISSES = 5

# finfo(dtype).max, for when a verdict carries no per-site limits (older or hand-made records).
DTYPE_MAX = {
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": 3.4028234663852886e38,
}


@dataclass
class Finding:
    """One failing example the search kept (shrunk), and what the corpus did with it."""

    verdict: Verdict
    status: str  # 'saved' | 'known-signature' | 'duplicate-file' (fuzz.corpus.SaveStatus)
    case_path: str | Path | None  # where the case is (saved/duplicate) or would have gone
    signature: tuple  # fuzz.corpus.signature: (model, policy, add_bos, layer, site, where)
    # True when the probe named the channel and terms that overflowed. None: derive it.
    explained: bool | None = None
    how: str = "shrunk"  # "shrunk" (by Hypothesis), "mutated" (an edit of a near miss), or
    # "interrupted" (saved unminimized when the run was stopped)

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
                "explained": self.explained, "how": self.how}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(verdict=_verdict_from_dict(_need(d, "verdict", "finding")),
                   status=_need(d, "status", "finding"), case_path=d.get("case_path"),
                   signature=tuple(_need(d, "signature", "finding")),
                   explained=d.get("explained"), how=d.get("how", "shrunk"))


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
    def for_policy(cls, name: str, bos_modes: Sequence[bool] = ()) -> PolicySummary:
        """An empty summary for a policy of fuzz.precision (imports torch), to be run in
        `bos_modes` (more are added as observed)."""
        from ..precision import get_policy

        policy = get_policy(name)
        return cls(policy=policy.name, dtype=str(policy.dtype).removeprefix("torch."),
                   expected_safe=policy.expected_safe, bos_modes=list(bos_modes))

    def observe(self, verdict: Verdict, keep: int = NEAREST_MISSES) -> None:
        """Counts one example; a finite one may become a nearest miss."""
        self.examples += 1
        if verdict.add_bos not in self.bos_modes:
            self.bos_modes.append(verdict.add_bos)
        if not verdict.finite:
            return
        # Content headroom: position 0 with BOS is the shared attention sink (docs/NUMERICS.md), so
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
                    signature: Sequence[Any], how: str = "shrunk") -> Finding:
        finding = Finding(verdict, status, None if case_path is None else str(case_path),
                          tuple(signature), how=how)
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
