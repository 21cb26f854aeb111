"""Minimizing to 1-minimality (fuzz.shrink.minimize), the record a case keeps of it, and
`fuzz minimize` / `fuzz run` resuming the cases whose minimizing was stopped.

The planted count trigger (fuzz.engine.synthetic.count: any 6 words of a 3-word family, anywhere,
with BOS) is the model that shows it: a found prompt can hold any amount of filler between the
words, and its minimal forms are the 6 words alone, each after its space."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import time

import pytest

from fuzz.cli import main
from fuzz.corpus import Case, Corpus, CorpusError, load_case
from fuzz.engine.synthetic.count import count_model, family_words, plan_count
from fuzz.margin import passes_margin
from fuzz.report.progress import LOG_INTERVAL_S, Progress
from fuzz.session import Session
from fuzz.shrink.minimize import minimize_text, not_minimized, surviving_deletions
from fuzz.shrink.robustness import assess, finalize
from fuzz.verdict import Bounds, PromptSpec

PADDED = "x nan, the inf value 12 nan and inf so value"  # 6 family words among filler
BOUNDS = Bounds(max_new_tokens=1)


@pytest.fixture(scope="module")
def counting() -> Session:
    return Session(count_model(6), bounds=BOUNDS)


def _keeps_margin(session: Session):
    return lambda _spec, verdict: passes_margin(verdict, session.min_margin)


def test_the_count_plant_overflows_on_six_family_words_wherever_they_are(counting):
    plan = plan_count(6)
    assert plan.peak(5) < 65504 < 1.02 * 65504 < plan.peak(6)
    for prompt, fails in [(" nan nan nan nan nan nan", True), (PADDED, True),
                          (" nan nan nan nan nan", False), ("nan " * 6, False)]:
        verdict = counting.run([PromptSpec(prompt)], "float16")[0]
        assert verdict.nonfinite == fails, (prompt, verdict.status)
        if fails:
            assert (verdict.first_nonfinite.layer, verdict.first_nonfinite.site) == \
                (0, "residual_attn") and verdict.margin >= 1.02
    # bfloat16 and float32 hold the sum
    assert counting.run([PromptSpec(PADDED)], "bfloat16")[0].finite


def test_minimizing_runs_to_one_minimality_and_says_so(counting):
    spec = PromptSpec(PADDED)
    found = counting.run([spec], "float16")[0]
    sig = counting.signature(found)
    result = minimize_text(counting, spec, "float16", sig, BOUNDS,
                           keeps=_keeps_margin(counting), found=found)
    assert result.one_minimal and result.stopped == ""
    assert family_words(result.spec.text) == 6 and len(result.spec.text) < len(PADDED)
    # no single deletion keeps the failure: checked one by one with the faithful kernel
    assert surviving_deletions(counting, result.spec, "float16", sig, BOUNDS,
                               keeps=_keeps_margin(counting)) == []
    record = result.record()
    assert record["state"] == "1-minimal" and record["from_chars"] == len(PADDED)
    assert record["chars"] == len(result.spec.text) and record["runs"] > 0


def test_minimizing_stopped_by_time_says_why_and_how_far(counting):
    spec = PromptSpec(PADDED)
    sig = counting.signature(counting.run([spec], "float16")[0])
    result = minimize_text(counting, spec, "float16", sig, BOUNDS, deadline=time.monotonic())
    assert not result.one_minimal and result.stopped == "time"
    assert result.record() == {"state": "stopped", "why": "time", "from_chars": len(PADDED),
                               "chars": len(PADDED), "chunk": len(PADDED) // 2, "runs": 0}
    # and the surviving deletions show it is not 1-minimal
    assert surviving_deletions(counting, result.spec, "float16", sig, BOUNDS)


def test_finalize_records_minimization_in_the_case(counting, tmp_path):
    spec = PromptSpec(PADDED)
    found = counting.run([spec], "float16")[0]
    assessment = finalize(counting, spec, "float16", counting.signature(found), 0)
    assert assessment.robust and assessment.minimization["state"] == "1-minimal"
    case = Case.of_assessment(counting, assessment)
    assert case.minimal is True
    saved = Corpus(tmp_path).save(case)
    assert load_case(saved.path).minimization == assessment.minimization


def test_a_case_file_keeps_no_record_it_does_not_have(counting, tmp_path):
    """Cases written before the record (and `add`'s) stay byte for byte what they were."""
    case = Case.of(counting, counting.check(PromptSpec(PADDED), "float16"))
    assert case.minimization is None and "minimization" not in json.loads(case.to_json())
    assert case.minimal is None


@pytest.mark.parametrize(("record", "message"), [
    ({"state": "done"}, "field 'minimization.state' must be"),
    ({"why": "time"}, "field 'minimization' lacks 'state'"),
    ({"state": "stopped", "chars": -1}, "field 'minimization.chars' must be an integer >= 0"),
    ("1-minimal", "field 'minimization' must be an object"),
])
def test_a_bad_minimization_record_is_named(counting, tmp_path, record, message):
    case = Case.of(counting, counting.check(PromptSpec(PADDED), "float16"))
    doc = json.loads(case.to_json())
    doc["minimization"] = record
    path = tmp_path / f"{case.case_id}.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(CorpusError, match=message) as err:
        load_case(path)
    assert str(err.value).startswith(str(path))


# --- resuming ----------------------------------------------------------------------------------
def _stopped_case(session: Session, corpus: Corpus, prompt: str = PADDED):
    """A case saved as a run saves one whose minimizing the budget cut."""
    assessment = assess(session, PromptSpec(prompt), "float16")
    assert assessment.robust
    assessment = dataclasses.replace(assessment, minimization={
        "state": "stopped", "why": "time", "from_chars": len(prompt), "chars": len(prompt),
        "chunk": 8, "runs": 40})
    return corpus.save(Case.of_assessment(session, assessment, strategy="test"))


def test_fuzz_minimize_finishes_a_stopped_case_and_replaces_its_file(counting, tmp_path, capsys):
    corpus = Corpus(tmp_path / "corpus")
    old = _stopped_case(counting, corpus)
    signature = load_case(old.path).signature
    assert main(["minimize", "--corpus", str(corpus.root), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "1 case to minimize: 1 finished" in out
    [loaded] = corpus.cases("tiny-count-6")
    case = loaded.case
    assert not old.path.exists() and loaded.path != old.path  # replaced, not added beside
    assert case.signature == signature and case.minimal
    assert family_words(case.prompt) == 6 and case.robustness["robust"]
    assert case.bounds == BOUNDS.to_dict()  # its own bounds, not the defaults
    assert case.finder["strategy"] == "test+minimize"
    # nothing left to do: a second run says so
    assert main(["minimize", "--corpus", str(corpus.root), "--device", "cpu"]) == 0
    assert "no case to minimize" in capsys.readouterr().out


def test_fuzz_minimize_lists_what_the_budget_left_unstarted(counting, tmp_path, capsys):
    corpus = Corpus(tmp_path / "corpus")
    old = _stopped_case(counting, corpus)
    assert main(["minimize", "--corpus", str(corpus.root), "--budget", "0s"]) == 0
    assert "not started: the budget ended" in capsys.readouterr().out
    assert old.path.exists()  # untouched


def test_fuzz_minimize_reports_a_case_that_no_longer_fails(counting, tmp_path, capsys):
    corpus = Corpus(tmp_path / "corpus")
    saved = _stopped_case(counting, corpus)
    # the same case, its prompt edited by hand to 5 family words (and renamed to match)
    doc = json.loads(saved.path.read_text())
    doc["prompt"] = " nan nan nan nan nan"
    edited = Case(**{**load_case(saved.path).__dict__, "prompt": doc["prompt"]})
    saved.path.unlink()
    path = corpus.model_dir(edited.model) / f"{edited.case_id}.json"
    path.write_text(edited.to_json())
    assert main(["minimize", "--corpus", str(corpus.root)]) == 1
    assert "no-longer-fails" in capsys.readouterr().out
    assert path.exists()


def test_fuzz_minimize_needs_an_existing_corpus(tmp_path, capsys):
    assert main(["minimize", "--corpus", str(tmp_path / "nowhere")]) == 2
    assert "--corpus" in capsys.readouterr().err


def test_replace_publishes_the_new_case_before_removing_the_old(counting, tmp_path):
    corpus = Corpus(tmp_path)
    old = _stopped_case(counting, corpus)
    [loaded] = corpus.cases("tiny-count-6")
    shorter = Case.of_assessment(counting, dataclasses.replace(
        assess(counting, PromptSpec(" nan nan nan nan nan nan"), "float16"),
        minimization={"state": "1-minimal"}))
    corpus.save(shorter, force=True)  # as if killed after publishing, before removing the old
    result = corpus.replace(loaded, shorter)
    assert result.status == "duplicate-file" and not old.path.exists()
    assert [c.case.prompt for c in corpus.cases("tiny-count-6")] == [shorter.prompt]
    with pytest.raises(ValueError, match="of its own signature"):
        corpus.replace(corpus.cases("tiny-count-6")[0],
                       dataclasses.replace(shorter, policy="bfloat16"))


def test_replace_with_the_same_prompt_rewrites_the_record(counting, tmp_path):
    corpus = Corpus(tmp_path)
    old = _stopped_case(counting, corpus, " nan nan nan nan nan nan")
    [loaded] = corpus.cases("tiny-count-6")
    new = dataclasses.replace(loaded.case, minimization={"state": "1-minimal"})
    assert corpus.replace(loaded, new).path == old.path
    assert load_case(old.path).minimization == {"state": "1-minimal"}


def test_a_fuzz_run_first_resumes_the_cases_an_earlier_run_stopped(tmp_path):
    from fuzz.precision import parse_policies
    from fuzz.run import FuzzJob

    session = Session(count_model(6), bounds=BOUNDS)
    corpus = Corpus(tmp_path / "corpus")
    _stopped_case(session, corpus)
    job = FuzzJob(session, parse_policies("float16"), [True], 30.0, corpus, None, 1, 6, None,
                  quiet=True)
    job.main()
    assert job.resumed and "finished" in job.resumed[0]
    assert all(c.case.minimal for c in corpus.cases("tiny-count-6"))


def test_not_minimized_records_why():
    assert not_minimized("the run was interrupted") == {"state": "not minimized",
                                                        "why": "the run was interrupted"}


# --- the progress line in a log ---------------------------------------------------------------
class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_in_a_log_progress_is_a_plain_line_every_interval(monkeypatch):
    clock = iter([1.0, 2.0, LOG_INTERVAL_S + 1.0, LOG_INTERVAL_S + 2.0])
    monkeypatch.setattr("fuzz.report.progress.time.monotonic", lambda: next(clock))
    log = _Log()
    progress = Progress(480.0, 0.0, quiet=False, stream=log)
    assert progress.bar is None  # no carriage-return bar in a log
    for screened in (10, 20, 30, 40):
        progress.tick("float16 no-BOS", screened, 0, math.inf)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()
    assert lines[0].startswith("fuzz 1/480s | float16 no-BOS | screened 10")
    assert lines[1].startswith(f"fuzz {LOG_INTERVAL_S + 1:.0f}/480s")
