"""The regression replay: one test per (corpus case, policy), and every case as other machines
would run it.

Each policy declared safe must stay finite on every case of its model. The recorded failing
policy is replayed too, as a strict xfail: it must still go non-finite (its first site may move on
another machine: reported, a failure only with --gemma-strict-site); a case that no longer
reproduces shows up as XPASS (strict -> a failure that says so), never silently dropped. A case
whose model is not installed is skipped with the reason; a malformed case file fails with its
path.

`test_case_holds_under_every_kernel_variation` simulates other machines: each case's recorded
policy with 1 and 2 threads, alone and inside a mixed batch, with torch's native float16 matmuls
and with float32-accumulated ones (what a CPU without avx512_fp16 computes, fuzz.engine.kernels).
"""
from pathlib import Path

import pytest

from fuzz.corpus import Corpus, CorpusError, LoadedCase
from fuzz.corpus.replay import (
    ReplayCheck,
    case_bounds,
    case_spec,
    check_identity,
    is_model_path,
    planned_checks,
    replay_session,
    run_check,
    skip_reason,
)
from fuzz.pytest_plugin import model_options
from fuzz.session import ModelOptions
from fuzz.shrink.robustness import run_variation, variations

CORPUS = Corpus(Path(__file__).resolve().parent.parent / "corpus")
OPT_STRICT_SITE = "--gemma-strict-site"  # registered by fuzz.pytest_plugin


def _file_model(config: pytest.Config) -> ModelOptions | None:
    """--gemma-model PATH: the file model that file-model cases replay on (else the path each
    case recorded)."""
    options = model_options(config)
    return options if is_model_path(options.spec) else None


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
    override = _file_model(request.config)
    reason = skip_reason(check, override)
    if reason:
        pytest.skip(reason)
    device = model_options(request.config).device
    outcome = run_check(check, replay_session(check, device=device, override=override),
                        strict_site=request.config.getoption(OPT_STRICT_SITE))
    if check.expected == "finite":
        assert outcome.ok, (
            f"{check.loaded.path}: policy {check.policy} is declared safe but went non-finite: "
            f"{outcome.got}")
    else:
        # xfail(strict): this fails while the recorded bug still reproduces (XFAIL); once it
        # stops reproducing it passes, and strict turns that XPASS into a visible failure.
        assert not outcome.ok, (
            f"{check.loaded.path}: still reproduces under {check.policy}: {outcome.got}")


def _variation_params():
    try:
        cases = CORPUS.cases()
    except CorpusError:
        return []  # test_corpus_case reports the malformed file
    return [pytest.param(loaded, v, id=f"{loaded.case_id[:8]}-{v.name.replace(' ', '')}",
                         marks=pytest.mark.regression)
            for loaded in cases for v in variations("cpu")]


@pytest.mark.parametrize("loaded, variation", _variation_params())
def test_case_holds_under_every_kernel_variation(loaded: LoadedCase, variation, request):
    case = loaded.case
    check, override = ReplayCheck(loaded, case.policy, "reproduce"), _file_model(request.config)
    reason = skip_reason(check, override)
    if reason:
        pytest.skip(reason)
    session = replay_session(check, device="cpu", override=override)
    check_identity(check, session)  # a file model must be the case's own
    verdict = run_variation(session, case_spec(case), case.policy, variation, case_bounds(case))
    assert verdict.nonfinite, (
        f"{loaded.path}: {case.policy} is {verdict.status} under '{variation.name}': this case "
        f"would not fail on a machine whose kernels round that way")



def test_a_no_bos_case_whose_failure_moves_to_another_content_position_has_not_moved():
    """Without BOS every position is content: a first non-finite value at position 0 and one at
    position 3, same layer and site, are one signature (replay compared `position == 0`)."""
    import dataclasses

    from fuzz.corpus import Case
    from fuzz.corpus.replay import ReplayCheck, run_check
    from fuzz.session import Session
    from fuzz.verdict import Bounds, PromptSpec

    session = Session.open(ModelOptions("tiny-planted", device="cpu"), Bounds(max_new_tokens=1))
    case = Case.of(session, session.check(PromptSpec("7", add_bos=False), "float16"))
    assert case.first_nonfinite.position == 0 and not case.add_bos
    elsewhere = dataclasses.replace(case, first_nonfinite=dataclasses.replace(
        case.first_nonfinite, position=3))
    assert elsewhere.signature == case.signature  # one crash bucket
    outcome = run_check(ReplayCheck(LoadedCase(elsewhere, Path("x.json")), "float16",
                                    "reproduce"), session, strict_site=True)
    assert outcome.ok and not outcome.moved
