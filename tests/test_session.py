"""Session: screening confirms new findings alone; the text minimizer keeps the signature."""
from __future__ import annotations

import dataclasses
import time

import pytest

from fuzz.session import ModelOptions, Session
from fuzz.shrink.minimize import deletion_candidates, minimize_text
from fuzz.verdict import Bounds, PromptSpec


@pytest.fixture(scope="module")
def session() -> Session:
    return Session.open(ModelOptions("tiny-planted", device="cpu"), Bounds(max_new_tokens=2))


def test_a_batch_only_overflow_is_not_reported_new(session, monkeypatch):
    """If batching alone made a prompt overflow (kernel rounding), the alone run decides."""
    real_run = session.run
    specs = [PromptSpec("hello"), PromptSpec("kernel")]
    poisoned = real_run([PromptSpec("7")], "float16")[0]  # a genuine failing verdict

    def batch_says_overflow(batch_specs, policy, bounds=None):
        verdicts = real_run(batch_specs, policy, bounds)
        if len(batch_specs) > 1:  # pretend the batch rounded "hello" past the limit
            verdicts[0] = dataclasses.replace(poisoned, prompt="hello")
        return verdicts

    monkeypatch.setattr(session, "run", batch_says_overflow)
    results = session.screen(specs, "float16", known=set())
    assert [r.new for r in results] == [False, False]
    assert results[0].verdict.finite  # the canonical (alone) verdict is kept


def test_screen_marks_new_and_known_signatures(session):
    specs = [PromptSpec("a 7"), PromptSpec("hello")]
    first = session.screen(specs, "float16", known=set())
    assert first[0].new and not first[1].new and first[1].signature is None
    again = session.screen(specs, "float16", known={first[0].signature})
    assert not again[0].new


def test_minimize_reaches_the_planted_trigger_and_keeps_the_signature(session):
    spec = PromptSpec("2147483647 and 0.0.0.70 kernel")
    verdict = session.run([spec], "float16")[0]
    sig = session.signature(verdict)
    result = minimize_text(session, spec, "float16", sig)
    small, small_verdict = result.spec, result.verdict
    assert small.text == "7" and result.one_minimal
    assert session.signature(small_verdict) == sig


def test_minimize_leaves_an_irreducible_prompt_alone(session):
    spec = PromptSpec("7")
    sig = session.signature(session.run([spec], "float16")[0])
    result = minimize_text(session, spec, "float16", sig)
    assert result.spec == spec and result.verdict is None and result.one_minimal


def test_deletion_candidates():
    assert deletion_candidates("abcd", 2) == ["cd", "ab"]
    assert deletion_candidates("abc", 1) == ["bc", "ac", "ab"]


def test_a_prefill_failure_is_first_cut_after_its_failing_token():
    """Causal attention: nothing after the failing position feeds a prefill overflow, so one
    cut removes a tail that character deletions would take dozens of runs to remove."""
    from fuzz.engine.synthetic.planted import digit_run_model
    from fuzz.shrink.minimize import causal_prefix

    session = Session(digit_run_model(8), bounds=Bounds(max_new_tokens=1))
    spec = PromptSpec("00000000 and then a long tail of words, 12 and 34", add_bos=True)
    found = session.run([spec], "float16")[0]
    sig = session.signature(found)
    assert causal_prefix(session, spec, found).text == "00000000"
    result = minimize_text(session, spec, "float16", sig, found=found,
                           deadline=time.monotonic())
    assert result.spec.text == "00000000" and result.runs == 2  # the cut, and its confirmation
    assert result.stopped == "time"  # no deletion pass had the time to run
    trigger = PromptSpec("00000000", add_bos=True)
    assert causal_prefix(session, trigger, session.run([trigger], "float16")[0]) is None
    chat = dataclasses.replace(spec, chat=True)
    assert causal_prefix(session, chat, found) is None  # a template must stay whole


@pytest.mark.parametrize("choice, batches", [("fp32-accumulate-wide", "fp32-accumulate-wide"),
                                             ("auto", "native")])
def test_the_minimizer_runs_candidates_with_the_screening_kernel_and_confirms_hits_natively(
        choice, batches, monkeypatch):
    """Candidate batches run with the screening kernel once it is chosen ("auto" still on trial:
    native); every hit is confirmed alone with the faithful kernel, so the result is the same."""
    from fuzz.engine.kernels import current_kernel

    session = Session.open(ModelOptions("tiny-planted", device="cpu"), Bounds(max_new_tokens=2))
    session.screen_kernel = choice
    runs = []
    real_run = session.run

    def spy(specs, policy, bounds=None):
        runs.append(([s.text for s in specs], current_kernel()))
        return real_run(specs, policy, bounds)

    monkeypatch.setattr(session, "run", spy)
    spec = PromptSpec("2147483647 and 0.0.0.70 kernel")
    sig = session.signature(real_run([spec], "float16")[0])
    result = minimize_text(session, spec, "float16", sig)
    assert result.spec.text == "7" and result.one_minimal
    assert {k for texts, k in runs if len(texts) > 1} == {batches}
    if batches != "native":  # the confirmations: one prompt alone, faithful
        assert {len(texts) for texts, k in runs if k == "native"} == {1}
    # the last pass, that finds nothing to delete from "7", runs again with the faithful
    # kernel before the prompt is called 1-minimal
    assert runs[-1] == ([""], "native")


def test_a_signature_is_the_verdicts_own_and_the_cases(tmp_path):
    """Session.signature reads the verdict (no Case is built for it: it ran on every screened
    prompt), and it is the bucket its case gets."""
    from fuzz.corpus import Case

    session = Session.open(ModelOptions("tiny-planted", device="cpu"), Bounds(max_new_tokens=1))
    verdict = session.check(PromptSpec("x 7"), "float16")
    sig = session.signature(verdict)
    assert sig == Case.of(session, verdict).signature
    assert (sig.layer, sig.site, sig.at_bos) == (2, "residual_mlp", False)
    assert session.signature(session.check(PromptSpec("x"), "float16")) is None


def test_the_verdict_names_its_layers_and_the_limit_of_a_head_failure():
    from fuzz.verdict import NonFinite, Verdict

    table = {"embedding": {"embedding": 1.0}, "0": {"residual_mlp": 2.0},
             "1": {"residual_mlp": 3.0}, "head": {"logits": float("inf")}}
    head = NonFinite(step=0, layer=2, site="logits", position=4, token_id=9, kind="inf")
    v = Verdict(prompt="p", prompt_ids=[1], add_bos=False, policy="float16", finite=False,
                first_nonfinite=head, max_abs=table, content_max_abs=table,
                limits={"head/logits": 65504.0, "0/residual_mlp": 65504.0})
    assert v.num_layers == 2
    assert [v.layer_label(i) for i in (-1, 0, 1, 2)] == ["embedding", "0", "1", "head"]
    assert v.limit == 65504.0 and v.where == "step 0 layer 2 logits" and not v.at_bos
