"""`fuzz minimize`: finish the cases whose minimizing was stopped.

A case saved by `fuzz run` records how far minimizing got (Case.minimization): "1-minimal" (no
single-character deletion keeps the failure), "stopped" (the finding's time limit or the budget
came first: why, and how far), or "not minimized" (saved as found: the run was interrupted, or
its budget's tail left no time). This resumes the last two under the rules a run uses
(fuzz.shrink.robustness.finalize: the signature and the margin kept on every deletion, the result
checked under every kernel variation), with the case's own bounds, until each is 1-minimal or
the budget ends; `fuzz run` does the same first, within a share of its budget.

A case file is replaced only by a prompt that holds under every variation with the case's
signature: the new file is published before the old one goes (Corpus.replace), so nothing is
lost if the process is killed. A case that no longer fails, or whose model cannot be found, is
reported and left as it is.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Optional

from fuzz.corpus.case import Case
from fuzz.corpus.replay import (
    ModelMismatch,
    ReplayCheck,
    case_bounds,
    case_spec,
    check_identity,
    replay_session,
    skip_reason,
)
from fuzz.corpus.store import Corpus, LoadedCase
from fuzz.engine.zoo import ModelNotInstalled
from fuzz.session import ModelOptions
from fuzz.shrink.robustness import finalize

UNFINISHED = ("stopped", "not minimized")


@dataclass(frozen=True)
class Resumed:
    """What resuming did to one case."""

    label: str
    before: str  # the prompt's length and state before
    after: str  # ... and after ("" when not run)
    status: str  # finished | progressed | unchanged | left | no-longer-fails | skipped | error
    detail: str = ""

    @property
    def failed(self) -> bool:
        """A case that no longer fails, or a model that is not the case's: exit 1."""
        return self.status in ("no-longer-fails", "error")


def unfinished(corpus: Corpus, model: Optional[str] = None,
               unrecorded: bool = False) -> list[LoadedCase]:
    """Cases whose minimizing stopped or never ran (with `unrecorded`, also cases that record
    nothing: written before the record existed, or added by hand)."""
    def wanted(case: Case) -> bool:
        state = (case.minimization or {}).get("state")
        return state in UNFINISHED or (unrecorded and state is None)

    return [loaded for loaded in corpus.cases(model) if wanted(loaded.case)]


def _state(case: Case) -> str:
    state = (case.minimization or {}).get("state", "not recorded")
    return f"{len(case.prompt)} chars, {state}"


def resume_case(corpus: Corpus, loaded: LoadedCase, deadline: float, device: str = "auto",
                override: Optional[ModelOptions] = None) -> Resumed:
    """Minimizes one case on until it is 1-minimal or `deadline` (time.monotonic()); replaces
    its file when the result holds under every kernel variation."""
    case = loaded.case
    label, before = loaded.path.name, _state(case)
    check = ReplayCheck(loaded, case.policy, "reproduce")
    reason = skip_reason(check, override)
    if reason:
        return Resumed(label, before, "", "skipped", reason)
    try:
        session = replay_session(check, device, "builtin", override)
        check_identity(check, session)
    except (ModelNotInstalled, ModelMismatch) as err:
        return Resumed(label, before, "", "error", str(err))
    session = dataclasses.replace(session, bounds=case_bounds(case))
    assessment = finalize(session, case_spec(case), case.policy, case.signature,
                          case.first_nonfinite.step, deadline=deadline,
                          measure_deadline=math.inf)
    verdict = assessment.verdict
    if not verdict.nonfinite or session.signature(verdict) != case.signature:
        got = verdict.where or verdict.status
        return Resumed(label, before, "", "no-longer-fails",
                       f"it gives {got} here, not its recorded signature: run `python -m fuzz "
                       "replay` to see it")
    if not assessment.robust:
        return Resumed(label, before, "", "left",
                       f"not robust here ({assessment.robustness.reason}): left as it was")
    finder = case.finder
    new = Case.of_assessment(session, assessment, seed=finder.get("seed"),
                             strategy=f"{finder.get('strategy', '?')}+minimize")
    new = dataclasses.replace(new, note=case.note, model_location=case.model_location)
    after = _state(new)
    if new.prompt == case.prompt and new.minimization == case.minimization:
        return Resumed(label, before, after, "unchanged", "no deletion kept the failure in time")
    result = corpus.replace(loaded, new)
    status = "finished" if new.minimal else "progressed"
    return Resumed(label, before, after, status, f"-> {result.path.name}")


def resume_all(corpus: Corpus, budget_s: float, model: Optional[str] = None,
               unrecorded: bool = False, device: str = "auto",
               override: Optional[ModelOptions] = None, started: Optional[float] = None
               ) -> list[Resumed]:
    """Every unfinished case, in file order, within `budget_s` from `started`: the ones the
    budget leaves no time for are listed as not started."""
    started = time.monotonic() if started is None else started
    deadline = started + budget_s
    out = []
    for loaded in unfinished(corpus, model, unrecorded):
        if time.monotonic() >= deadline:
            out.append(Resumed(loaded.path.name, _state(loaded.case), "", "skipped",
                               "not started: the budget ended"))
            continue
        out.append(resume_case(corpus, loaded, deadline, device, override))
    return out
