"""The regression replay: one test per (corpus case, policy).

Each policy declared safe must stay finite on every case of its model. The recorded failing
policy is replayed too, as a strict xfail: a case that no longer reproduces shows up as XPASS
(strict -> a failure that says so), never silently dropped. A case whose model is not
installed is skipped with the reason; a malformed case file fails with its path.
"""
from pathlib import Path

import pytest

from fuzz.corpus import Corpus, CorpusError
from fuzz.replay import planned_checks, run_check, session_for, skip_reason

CORPUS = Corpus(Path(__file__).resolve().parent.parent / "corpus")


def _params():
    scan = CORPUS.scan()
    params = [pytest.param(err, id=f"malformed-{Path(err.path).name}") for err in scan.errors]
    try:
        checks = planned_checks(CORPUS) if not scan.errors else []
    except CorpusError as err:
        return params + [pytest.param(err, id="malformed")]
    for check in checks:
        marks = [pytest.mark.regression]
        if check.expected == "reproduce":
            marks.append(pytest.mark.xfail(strict=True, raises=AssertionError,
                                           reason="recorded failure must still reproduce; "
                                                  "XPASS = it no longer does (fixed, or the "
                                                  "engine changed)"))
        params.append(pytest.param(check, id=check.test_id, marks=marks))
    return params


@pytest.mark.parametrize("check", _params())
def test_corpus_case(check, request):
    if isinstance(check, CorpusError):
        pytest.fail(str(check), pytrace=False)
    reason = skip_reason(check)
    if reason:
        pytest.skip(reason)
    device = request.config.getoption("--gemma-device")
    outcome = run_check(check, session_for(check.loaded.case.model, device=device))
    if check.expected == "finite":
        assert outcome.ok, (
            f"{check.loaded.path}: policy {check.policy} is declared safe but went non-finite: "
            f"{outcome.got}")
    else:
        # xfail(strict): this fails while the recorded bug still reproduces (XFAIL); once it
        # stops reproducing it passes, and strict turns that XPASS into a visible failure.
        assert not outcome.ok, (
            f"{check.loaded.path}: still reproduces under {check.policy}: {outcome.got}")
