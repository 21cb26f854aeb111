"""Margins, kernel variations and the robustness verdict (fuzz.margin, fuzz.shrink.robustness,
fuzz.engine.kernels) on the synthetic models."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from fuzz.corpus import Case
from fuzz.engine import kernels
from fuzz.engine.synthetic.planted import (
    digit_run_model,
    is_minimal_trigger,
    longest_digit_run,
    plan_digit_run,
)
from fuzz.engine.synthetic.tiny import TINY_PLANTED_LAYER
from fuzz.engine.zoo import load_model
from fuzz.margin import MIN_MARGIN, float32_magnitude, measure
from fuzz.precision import get_policy
from fuzz.session import Session
from fuzz.shrink import robustness
from fuzz.shrink.robustness import (
    FILLERS,
    Outcome,
    Variation,
    assess,
    check_robustness,
    judge,
    run_variation,
    thread_counts,
    variations,
)
from fuzz.verdict import Bounds, PromptSpec

SIG = ("fp", "float16", True, 2, "residual_mlp", "content")


@pytest.fixture(scope="module")
def planted() -> Session:
    return Session(load_model("tiny-planted"), bounds=Bounds(max_new_tokens=2))


def test_the_probe_measures_the_unrounded_sum_of_the_overflowing_add(planted):
    v = planted.run([PromptSpec("a 7")], "float16")[0]
    first = v.first_nonfinite
    assert (first.layer, first.site) == (TINY_PLANTED_LAYER, "residual_mlp")
    assert first.unrounded > 65504 and v.margin == pytest.approx(first.unrounded / 65504)
    # the float32 run fed the same tokens holds the magnitude free of float16's rounding
    f32 = planted.model.engine(get_policy("float32"))
    assert float32_magnitude(f32, v) == pytest.approx(first.unrounded, rel=1e-2)
    margin = measure(v, f32)
    assert margin.ratio == v.margin and margin.float32_ratio > 1.0


def test_a_finite_verdict_has_no_margin(planted):
    v = planted.run([PromptSpec("hello")], "float16")[0]
    assert v.finite and v.margin is None and measure(v) is None


def test_variations_cover_threads_batches_and_both_kernels():
    names = [v.name for v in variations("cpu")]
    assert names[0] == f"alone, {thread_counts()[-1]} threads, cpu"  # canonical first
    assert "alone, 1 thread, cpu" in names and any(n.startswith("batched") for n in names)
    assert sum("fp32-accumulate" in n for n in names) == 2
    assert not any("fp32-accumulate" in v.name for v in variations("cpu", "upstream"))
    on_gpu = [v.name for v in variations("cuda:0")]
    assert on_gpu[0].startswith("alone") and "cuda:0" in on_gpu[0] and "cpu" in on_gpu[-1]


def test_a_batched_variation_runs_the_prompt_among_fillers(planted):
    spec = PromptSpec("a 7")
    alone = run_variation(planted, spec, "float16", Variation(False, 1, "cpu"), planted.bounds)
    batched = run_variation(planted, spec, "float16", Variation(True, 1, "cpu"), planted.bounds)
    assert batched.prompt == "a 7" and len(FILLERS) == 3
    assert batched.first_nonfinite == alone.first_nonfinite  # the planted add is exact


def test_judge_names_why_a_finding_is_marginal():
    ok = Outcome("alone, 2 threads, cpu", "nonfinite", SIG, "step 0 layer 2 residual_mlp", 1.3)
    moved = Outcome("batched", "nonfinite", SIG[:3] + (3,) + SIG[4:], "step 0 layer 3 x", 1.3)
    finite = Outcome("alone, fp32-accumulate", "finite", None, "", None)
    low = Outcome("alone, 1 thread, cpu", "nonfinite", SIG, "step 0 layer 2 residual_mlp", 1.01)
    assert judge((ok, ok), SIG, MIN_MARGIN).robust
    assert judge((ok, finite), SIG, MIN_MARGIN).reason == "finite alone, fp32-accumulate"
    assert judge((ok, moved), SIG, MIN_MARGIN).reason.startswith("first site moves to step 0")
    rob = judge((ok, low), SIG, MIN_MARGIN)
    assert not rob.robust and rob.margin == 1.01 and "margin 1.0100 < 1.02" in rob.reason


def test_assess_keeps_a_robust_planted_trigger(planted):
    a = assess(planted, PromptSpec("7"), "float16")
    assert a.robust, a.robustness.reason
    assert len(a.robustness.outcomes) == len(variations("cpu"))
    assert all(o.status == "nonfinite" for o in a.robustness.outcomes)
    case = Case.of_assessment(planted, a)
    assert case.robustness["robust"] and case.margin["float32"] is not None


def test_no_variation_starts_past_the_deadline_and_a_cut_one_is_not_robust(planted, monkeypatch):
    spec = PromptSpec("a 7")
    sig = planted.signature(planted.run([spec], "float16")[0])
    assert check_robustness(planted, spec, "float16", sig).robust
    late = check_robustness(planted, spec, "float16", sig, deadline=time.monotonic() - 1)
    assert late.cut and not late.robust and late.outcomes == ()
    assert late.reason == f"cut by the budget after 0 of {len(variations())} kernel variations"
    # a deadline that passes after two variations: those two are kept, the rest never run
    clock = iter(range(1000))  # fuzz.shrink.robustness's own clock only: the runs keep the real one
    monkeypatch.setattr("fuzz.shrink.robustness.time",
                        SimpleNamespace(monotonic=lambda: next(clock)))
    halfway = check_robustness(planted, spec, "float16", sig, deadline=2)
    assert halfway.cut and len(halfway.outcomes) == 2 and not halfway.robust
    assert all(o.status == "nonfinite" for o in halfway.outcomes)
    assert assess(planted, spec, "float16", deadline=-1).robustness.cut


def test_a_margin_below_the_threshold_is_marginal():
    session = Session(digit_run_model(40), bounds=Bounds(max_new_tokens=2))
    session.min_margin = plan_digit_run(40).margin + 0.01  # just out of reach
    a = assess(session, PromptSpec("0" * 40), "float16")
    assert a.verdict.nonfinite and not a.robust and "margin" in a.robustness.reason


def test_the_float32_accumulating_kernel_changes_only_float16_products():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 640, generator=gen), torch.randn(2048, 640, generator=gen)
    with kernels.kernel("fp32-accumulate"):
        f32 = kernels.linear(x, w)
        f16 = kernels.linear(x.half(), w.half())
    assert torch.equal(f32, torch.nn.functional.linear(x, w))  # float32: torch's own kernel
    expected = torch.nn.functional.linear(x.half().float(), w.half().float()).half()
    assert f16.dtype == torch.float16 and torch.equal(f16, expected)  # rounded once
    assert kernels.current_kernel() == "native"
    with pytest.raises(ValueError, match="unknown matmul kernel 'int8'"):
        with kernels.kernel("int8"):
            pass


def _digit_run_finding(run: int = 8) -> tuple[Session, PromptSpec, tuple, int]:
    """A noisy planted finding: the trigger (a run of `run` digits) inside other text."""
    session = Session(digit_run_model(run), bounds=Bounds(max_new_tokens=2))
    spec = PromptSpec("kernel 123" + "4" * run + "9 ms")
    [screened] = session.screen([spec], "float16", set())
    assert screened.new
    return session, spec, screened.signature, screened.verdict.first_nonfinite.step


def test_finalize_runs_the_variations_once_when_the_minimized_prompt_holds(monkeypatch):
    session, spec, sig, step = _digit_run_finding()
    checked = []

    def counted(session, candidate, *args, **kwargs):
        checked.append(candidate.text)
        return check_robustness(session, candidate, *args, **kwargs)

    monkeypatch.setattr(robustness, "check_robustness", counted)
    assessment = robustness.finalize(session, spec, "float16", sig, step)
    assert assessment.robust and is_minimal_trigger(assessment.spec.text, 8)
    assert checked == [assessment.spec.text]  # the minimized prompt's assessment only


def test_finalize_goes_back_to_the_last_prompt_that_held_when_the_minimized_one_does_not(
        monkeypatch):
    """A kernel variation that flips every prompt shorter than 13 characters: the optimistic
    minimizing ends at 8 digits, which do not hold; bisection finds the last accepted prompt
    that did, and minimizing goes on from it checking every deletion."""
    session, spec, sig, step = _digit_run_finding()
    checked = []

    def flips_when_short(session, candidate, policy, signature, *args, **kwargs):
        checked.append(candidate.text)
        real = check_robustness(session, candidate, policy, signature, *args, **kwargs)
        if len(candidate.text) >= 13:
            return real
        return robustness.judge(real.outcomes[:1] + (robustness.Outcome(
            "batched, 1 thread, cpu", "finite", None, "", None),), signature, MIN_MARGIN)

    monkeypatch.setattr(robustness, "check_robustness", flips_when_short)
    assessment = robustness.finalize(session, spec, "float16", sig, step)
    assert assessment.robust and len(assessment.spec.text) == 13
    assert longest_digit_run(assessment.spec.text) >= 8
    assert is_minimal_trigger(checked[0], 8) and checked[1] == spec.text  # the end, the finding


def test_finalize_assesses_a_marginal_finding_as_it_is(monkeypatch):
    session, spec, sig, step = _digit_run_finding()
    monkeypatch.setattr(session, "min_margin", 100.0)  # no margin reaches it
    assessment = robustness.finalize(session, spec, "float16", sig, step)
    assert assessment.spec == spec and not assessment.robust
