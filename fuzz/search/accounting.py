"""The report's data model: what a run saw, and its JSON form.

The search fills a :class:`RunSummary`: one :class:`PolicySummary` per precision policy, each
holding its :class:`Finding` records (shrunk failing examples and what the corpus did with them)
and its nearest misses (the finite examples with the lowest content headroom).

JSON is the summary itself (strict JSON: inf/nan as strings, see fuzz.verdict.json_safe), so a
later tool can re-render or compare runs: ``RunSummary.from_json(path.read_text())``. Verdicts are
stored without their derived headroom table, and read back with json_safe's inverse applied to
numeric fields only (fuzz.search.jsonform).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuzz.rootcause import RootCause
from fuzz.search.jsonform import need, verdict_from_dict, verdict_to_dict
from fuzz.verdict import Signature, Verdict, from_json_safe, json_safe

# "marginal": failed here, but not under every kernel variation or below the margin a regression
# case needs (fuzz.shrink.robustness): reported, not saved.
# fuzz.corpus.SaveStatus, 'marginal' (measured: not a regression case) or 'unmeasured' (the
# budget ended before its kernel variations were measured: not saved, see fuzz.search.schedule)
FINDING_STATUSES = ("saved", "known-signature", "duplicate-file", "marginal", "unmeasured")
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
    status: str  # one of FINDING_STATUSES
    case_path: str | Path | None  # where the case is (saved/duplicate) or would have gone
    signature: Signature
    # True when the probe named the channel and terms that overflowed. None: derive it.
    explained: bool | None = None
    # "shrunk" (by Hypothesis, then minimized), "cut" (found when the budget left no time to
    # minimize: measured and saved as found), or "interrupted" (the run was stopped)
    how: str = "shrunk"
    # fuzz.margin.Margin.to_dict() and fuzz.shrink.robustness.Robustness.to_dict() of the saved
    # prompt
    margin: dict[str, Any] | None = None
    robustness: dict[str, Any] | None = None
    # fuzz.positions.PositionMap.to_dict() of the saved prompt (the finding's heat map), when
    # the run measured it
    positions: dict[str, Any] | None = None
    # how far minimizing got (fuzz.corpus.Case.minimization), when the finding was measured
    minimization: dict[str, Any] | None = None
    # the seed prompt ("file:line", fuzz run --seed-prompts) the finding was edited from
    grew_from: str | None = None
    # the tokenizer's piece of the failing token (fuzz.rootcause.token_piece): the report has no
    # tokenizer, so the run spells it; None when it could not
    piece: str | None = None

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
        self.signature = Signature.from_list(self.signature)
        if self.case_path is not None:
            self.case_path = str(self.case_path)  # a Path (SaveResult.path) must stay JSON-able
        if self.explained is None:
            self.explained = self.verdict.first_nonfinite.channel is not None

    @property
    def is_new(self) -> bool:
        return self.status == "saved"

    @property
    def root_cause(self) -> RootCause:
        """Its mechanism (fuzz.rootcause): the channel and the kind of position, no layer."""
        cause = RootCause.of_verdict(self.verdict, self.signature.fingerprint, self.piece)
        assert cause is not None  # __post_init__ refuses a finite verdict
        return cause

    @property
    def is_marginal(self) -> bool:
        return self.status == "marginal"

    @property
    def is_unmeasured(self) -> bool:
        return self.status == "unmeasured"

    @property
    def saved_unminimal(self) -> bool:
        """Saved to the corpus without being known 1-minimal: minimizing was stopped or did not
        run (`fuzz minimize` resumes it)."""
        return self.is_new and self.minimization is not None and \
            self.minimization.get("state") != "1-minimal"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": verdict_to_dict(self.verdict), "status": self.status,
                "case_path": self.case_path, "signature": list(self.signature),
                "explained": self.explained, "how": self.how, "margin": self.margin,
                "robustness": self.robustness, "positions": self.positions,
                "minimization": self.minimization, "grew_from": self.grew_from,
                "piece": self.piece,
                # derived (read back from the verdict and piece), written for other tools
                "root_cause": self.root_cause.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(verdict=verdict_from_dict(need(d, "verdict", "finding")),
                   status=need(d, "status", "finding"), case_path=d.get("case_path"),
                   signature=Signature.from_list(need(d, "signature", "finding")),
                   explained=d.get("explained"), how=d.get("how", "shrunk"),
                   margin=d.get("margin"), robustness=d.get("robustness"),
                   positions=d.get("positions"), minimization=d.get("minimization"),
                   grew_from=d.get("grew_from"), piece=d.get("piece"))


MAX_MARGINAL_EXAMPLES = 10


def mode_name(add_bos: bool) -> str:
    return "bos" if add_bos else "no-bos"


@dataclass
class ModeCounts:
    """What one BOS mode of one policy saw. Every screened example counts (Hypothesis's replays
    and shrink candidates too), so these are screening counts, not distinct prompts."""

    examples: int = 0
    nonfinite: int = 0  # examples that went non-finite, under any signature
    inconclusive: int = 0  # stopped by the time limit before EOS or the step bound
    known: dict[Signature, int] = field(default_factory=dict)  # known signature -> examples
    # distinct prompts whose new failure stayed below the margin a case needs (not shrunk), and
    # a few of them (prompt, add_bos, margin, where) for the report
    marginal: int = 0
    marginal_examples: list[dict[str, Any]] = field(default_factory=list)
    best_headroom: float = math.inf  # content, against the policy's own dtype
    best_float16_headroom: float = math.inf  # content, against float16's 65504
    seconds: float = 0.0  # wall time the job spent searching this mode
    # every prompt failed under one known signature at the BOS position (fuzz.search.round): given
    # up
    saturated: bool = False
    _marginal_seen: set = field(default_factory=set, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "nonfinite": self.nonfinite,
                "inconclusive": self.inconclusive,
                "known": [{"signature": list(sig), "examples": n}
                          for sig, n in sorted(self.known.items(), key=lambda kv: -kv[1])],
                "marginal": self.marginal, "marginal_examples": list(self.marginal_examples),
                "best_headroom": self.best_headroom,
                "best_float16_headroom": self.best_float16_headroom,
                "seconds": self.seconds, "saturated": self.saturated}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModeCounts:
        return cls(examples=int(d.get("examples", 0)), nonfinite=int(d.get("nonfinite", 0)),
                   inconclusive=int(d.get("inconclusive", 0)),
                   known={Signature.from_list(k["signature"]): int(k["examples"])
                          for k in d.get("known", [])},
                   marginal=int(d.get("marginal", 0)),
                   marginal_examples=list(d.get("marginal_examples", [])),
                   best_headroom=float(from_json_safe(d.get("best_headroom", "inf"))),
                   best_float16_headroom=float(
                       from_json_safe(d.get("best_float16_headroom", "inf"))),
                   seconds=float(d.get("seconds", 0.0)), saturated=bool(d.get("saturated")))


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
    modes: dict[str, ModeCounts] = field(default_factory=dict)  # by mode_name(add_bos)

    @classmethod
    def for_policy(cls, name: str, bos_modes: Sequence[bool] = ()) -> PolicySummary:
        """An empty summary for a policy of fuzz.precision (imports torch), to be run in
        `bos_modes` (more are added as observed)."""
        from fuzz.precision import get_policy

        policy = get_policy(name)
        return cls(policy=policy.name, dtype=str(policy.dtype).removeprefix("torch."),
                   expected_safe=policy.expected_safe, bos_modes=list(bos_modes))

    def mode(self, add_bos: bool) -> ModeCounts:
        if add_bos not in self.bos_modes:
            self.bos_modes.append(add_bos)
        return self.modes.setdefault(mode_name(add_bos), ModeCounts())

    def observe(self, verdict: Verdict, signature: Sequence[Any] | None = None,
                new: bool = False, keep: int = NEAREST_MISSES) -> None:
        """Counts one example: a non-finite one under its signature when that is known, a
        finite one may become a nearest miss."""
        self.examples += 1
        counts = self.mode(verdict.add_bos)
        counts.examples += 1
        if verdict.nonfinite:
            counts.nonfinite += 1
            if signature is not None and not new:
                known = Signature._make(signature)
                counts.known[known] = counts.known.get(known, 0) + 1
            return
        if not verdict.finite:
            counts.inconclusive += 1
            return
        # Content headroom: position 0 with BOS is the shared attention sink (docs/NUMERICS.md), so
        # it says nothing about how close *this prompt* came to overflowing.
        headroom = verdict.min_headroom(content_only=True)
        self.best_headroom = min(self.best_headroom, headroom)
        counts.best_headroom = min(counts.best_headroom, headroom)
        counts.best_float16_headroom = min(counts.best_float16_headroom,
                                           verdict.float16_headroom())
        # `keep` nearest misses per BOS mode: each mode's round edits its own (fuzz.search.round).
        mine = [m for m in self.nearest_misses if m.add_bos == verdict.add_bos]
        if len(mine) >= keep and headroom >= mine[-1].min_headroom(content_only=True):
            return  # the common case in a long run: no sort, no table walk per kept verdict
        if any(_same_example(verdict, m) for m in mine):
            return  # Hypothesis replays examples: one prompt must not fill the list
        if len(mine) >= keep:
            self.nearest_misses.remove(mine[-1])
        self.nearest_misses.append(verdict)
        self.nearest_misses.sort(key=lambda v: v.min_headroom(content_only=True))
        if not self.findings:
            self.peak = self.nearest_misses[0]

    def observe_marginal(self, verdict: Verdict) -> None:
        """A new failure below the margin a case needs: counted once per distinct prompt."""
        counts = self.mode(verdict.add_bos)
        if verdict.prompt in counts._marginal_seen:
            return
        counts._marginal_seen.add(verdict.prompt)
        counts.marginal += 1
        if len(counts.marginal_examples) < MAX_MARGINAL_EXAMPLES:
            counts.marginal_examples.append({"prompt": verdict.prompt, "add_bos": verdict.add_bos,
                                             "margin": verdict.margin, "where": verdict.where})

    def add_finding(self, verdict: Verdict, status: str, case_path: str | Path | None,
                    signature: Sequence[Any], how: str = "shrunk",
                    margin: dict[str, Any] | None = None,
                    robustness: dict[str, Any] | None = None,
                    piece: str | None = None) -> Finding:
        finding = Finding(verdict, status, None if case_path is None else str(case_path),
                          Signature.from_list(signature), how=how, margin=margin,
                          robustness=robustness, piece=piece)
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
        return sum(f.status in ("known-signature", "duplicate-file") for f in self.findings)

    @property
    def marginal_findings(self) -> int:
        return sum(f.is_marginal for f in self.findings)

    @property
    def unmeasured_findings(self) -> int:
        return sum(f.is_unmeasured for f in self.findings)

    @property
    def marginal_total(self) -> int:
        """Failures not saved for want of margin, one count everywhere (summary, report, JSON):
        distinct prompts that failed short of the case margin (never shrunk) plus marginal
        findings (shrunk and measured, short under some kernel variation)."""
        return sum(c.marginal for c in self.modes.values()) + self.marginal_findings

    @property
    def unminimal_findings(self) -> int:
        """Cases saved without being known 1-minimal (`fuzz minimize` resumes them)."""
        return sum(f.saved_unminimal for f in self.findings)

    @property
    def nonfinite(self) -> int:
        """Examples that went non-finite, in every BOS mode."""
        return sum(c.nonfinite for c in self.modes.values())

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
            "nearest_misses": [verdict_to_dict(v) for v in self.nearest_misses],
            "best_headroom": self.best_headroom,
            "peak": verdict_to_dict(self.peak) if self.peak is not None else None,
            "bos_modes": list(self.bos_modes),
            "modes": {name: counts.to_dict() for name, counts in self.modes.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicySummary:
        where = f"policy {d.get('policy', '?')!r}"
        peak = d.get("peak")
        return cls(
            policy=need(d, "policy", "policy summary"), dtype=need(d, "dtype", where),
            expected_safe=need(d, "expected_safe", where), examples=need(d, "examples", where),
            findings=[Finding.from_dict(f) for f in need(d, "findings", where)],
            nearest_misses=[verdict_from_dict(v) for v in d.get("nearest_misses", [])],
            best_headroom=float(from_json_safe(d.get("best_headroom", "inf"))),
            peak=verdict_from_dict(peak) if peak is not None else None,
            bos_modes=list(d.get("bos_modes", [])),
            modes={name: ModeCounts.from_dict(c) for name, c in d.get("modes", {}).items()},
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
    # the command line as typed (sys.argv), kept for the record; the report's "How to reproduce"
    # is built from the fields instead (fuzz.report.commands): this lacks a seed drawn at random
    command: str | None = None
    error: str | None = None  # the error message when stopped == 'error'
    engine: str = "builtin"
    # `fuzz run` options that change what is screened; None in a report written before they
    # were recorded (the reproduce command then leaves them out rather than guess them)
    batch_size: int | None = None
    round_examples: int | None = None
    long: bool = False  # `fuzz run --long` (fuzz.long): the long-prompt strategy ran
    # policy -> the matmul kernel its screens ran with last (fuzz.engine.kernels; the verdicts
    # that count are faithful whichever), and the speedup over native that "auto"'s trial
    # measured when it decided (fuzz.engine.kernels.KernelTrial; None: no trial decided)
    screening_kernels: dict[str, str] = field(default_factory=dict)
    kernel_trial_speedup: float | None = None

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
                              for p in need(d, "policies", "report")]
        for key in ("budget_s", "elapsed_s"):
            values[key] = float(from_json_safe(need(d, key, "report")))
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in values and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"report JSON lacks key(s) {', '.join(map(repr, missing))}")
        return cls(**values)


def unique_misses(p: PolicySummary) -> list[Verdict]:
    """The nearest misses, each example once (a list filled without observe() may repeat one)."""
    out: list[Verdict] = []
    for v in p.nearest_misses:
        if not any(_same_example(v, kept) for kept in out):
            out.append(v)
    return out


def _same_example(a: Verdict, b: Verdict) -> bool:
    return a.prompt == b.prompt and a.add_bos == b.add_bos and a.prompt_ids == b.prompt_ids
