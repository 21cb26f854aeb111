"""The planted digit-run family (fuzz.engine.synthetic.planted): the trigger is exactly a run of
`run` digits in float16, with BOS on; everything one short of it, and every other policy, is
finite."""
from __future__ import annotations

import dataclasses

import pytest

from fuzz.engine.loaded import LoadedModel
from fuzz.engine.synthetic.planted import (
    COUNT_CHANNEL,
    DIGIT_RUN_LAYER,
    PLANTED_MODELS,
    PLANTED_SITE,
    digit_run_model,
    digit_run_name,
    digit_token_ids,
    is_minimal_trigger,
    longest_digit_run,
    minimal_trigger,
    plan_digit_run,
    plant_digit_run,
)
from fuzz.engine.synthetic.tiny import random_state, tiny_config
from fuzz.generate import generate
from fuzz.margin import MIN_MARGIN
from fuzz.precision import POLICIES, get_policy
from fuzz.session import Session
from fuzz.shrink.robustness import finalize
from fuzz.verdict import Bounds, PromptSpec

FLOAT16_MAX = 65504.0
SHORT = Bounds(max_new_tokens=3)
RUNS = (8, 32)


def run_prompts(model: LoadedModel, policy: str, texts: list[str], bos: bool = True,
                bounds: Bounds = SHORT):
    pol = get_policy(policy)
    specs = [PromptSpec(t, add_bos=bos) for t in texts]
    return generate(model.engine(pol), model.tokenizer, specs, pol.name, bounds)


@pytest.fixture(scope="module", params=RUNS)
def planted(request) -> tuple[int, LoadedModel]:
    return request.param, digit_run_model(request.param)


@pytest.mark.parametrize("run", [2, 8, 24, 32, 40, 41])
def test_plan_puts_the_float16_limit_between_run_minus_one_and_run(run: int) -> None:
    plan = plan_digit_run(run)
    assert plan.peak(run - 1, run) < FLOAT16_MAX
    assert plan.peak(run, run) > 65520.0  # float16 rounds a sum of 65520 or more to inf
    assert plan.margin >= MIN_MARGIN  # the trigger is a regression case (fuzz.shrink.robustness)
    peaks = [plan.peak(m, run) for m in range(1, run + 1)]
    assert peaks == sorted(peaks) and len(set(peaks)) == run  # strictly increasing: a gradient
    assert plan.branch(1.0) < FLOAT16_MAX  # the branch alone is finite: the ADD overflows


@pytest.mark.parametrize("run", [0, 1, 42, 96])
def test_plan_refuses_runs_outside_its_range(run: int) -> None:
    with pytest.raises(ValueError, match="run"):
        plan_digit_run(run)


def test_minimal_trigger_overflows_in_float16_at_the_planted_add(planted) -> None:
    run, model = planted
    [v] = run_prompts(model, "float16", [minimal_trigger(run)])
    assert not v.finite
    first = v.first_nonfinite
    assert (first.layer, first.site, first.step, first.kind) == (DIGIT_RUN_LAYER, PLANTED_SITE,
                                                                 0, "inf")
    assert first.position == run  # BOS is position 0; the run's last digit completes the window
    assert first.token_id in digit_token_ids(model.tokenizer)


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "float16"])
def test_the_trigger_is_finite_in_every_other_policy(planted, policy: str) -> None:
    run, model = planted
    texts = [minimal_trigger(run), "a " + "7" * (run + 3) + " b"]
    assert all(v.finite for v in run_prompts(model, policy, texts))


def test_one_digit_short_is_finite_and_every_deletion_ends_the_overflow(planted) -> None:
    run, model = planted
    short = ["9" * (run - 1), "x" + "1" * (run - 1) + "y" + "2" * (run - 1),
             "0" * (run // 2) + " " + "0" * (run // 2)]
    assert all(v.finite for v in run_prompts(model, "float16", short))
    trigger = "5" * run
    assert [v.finite for v in run_prompts(model, "float16", [trigger[1:], trigger])] == [True,
                                                                                       False]


def test_a_run_anywhere_in_the_prompt_triggers(planted) -> None:
    run, model = planted
    texts = ["the kernel " + "3" * run + " ms", "3" * (run + 5) + " tensor"]
    verdicts = run_prompts(model, "float16", texts)
    assert [v.finite for v in verdicts] == [False, False]
    last_digit = len(model.tokenizer.encode("the kernel " + "3" * run, bos=True)) - 1
    assert verdicts[0].first_nonfinite.position == last_digit


def test_headroom_shrinks_with_every_digit_of_the_run(planted) -> None:
    """max |x| grows with the count: the gradient a targeted search can climb."""
    run, model = planted
    texts = ["the kernel"] + ["4" * m for m in range(1, run)]
    headroom = [v.min_headroom(content_only=True) for v in run_prompts(model, "float16", texts)]
    assert all(h > 1.0 for h in headroom)
    assert headroom == sorted(headroom, reverse=True) and len(set(headroom)) == len(headroom)


def test_greedy_decoding_never_emits_a_digit(planted) -> None:
    """A generated digit would lengthen a run and make a shorter prompt a trigger."""
    run, model = planted
    texts = ["6" * (run - 1), "x " + "1" * (run - 2), "7", "the tensor is"]
    verdicts = run_prompts(model, "float32", texts, bounds=Bounds(max_new_tokens=16))
    digits = set(digit_token_ids(model.tokenizer))
    assert all(v.tokens for v in verdicts)
    assert not any(t in digits for v in verdicts for t in v.tokens)


def test_without_bos_a_short_all_digit_prompt_already_overflows() -> None:
    """Documented limit of the family: without BOS, a window shorter than `run` can be all
    digits, so BOS-off searches find "0"."""
    model = digit_run_model(8)
    verdicts = run_prompts(model, "float16", ["0", "a0"], bos=False)
    assert [v.finite for v in verdicts] == [False, True]


def test_finalize_shrinks_a_noisy_failure_to_exactly_run_digits() -> None:
    run = 8
    model = digit_run_model(run)
    session = Session(model, bounds=Bounds(max_new_tokens=2))
    spec = PromptSpec("kernel 123" + "4" * run + "9 ms")
    [screened] = session.screen([spec], "float16", set())
    assert screened.new
    assessment = finalize(session, spec, "float16", screened.signature,
                          screened.verdict.first_nonfinite.step)
    assert is_minimal_trigger(assessment.spec.text, run), assessment.spec.text
    verdict = assessment.verdict
    assert not verdict.finite and verdict.first_nonfinite.channel == COUNT_CHANNEL
    # robust under every kernel variation, past the margin a regression case needs
    assert assessment.robust and assessment.margin.ratio >= MIN_MARGIN


def test_trigger_helpers() -> None:
    assert minimal_trigger(4) == "0000"
    assert is_minimal_trigger("0123", 4) and is_minimal_trigger("9999", 4)
    assert not is_minimal_trigger("01234", 4) and not is_minimal_trigger(" 0123", 4)
    assert longest_digit_run("a 12 b 34567 c 8") == 5 and longest_digit_run("none") == 0


def test_plant_refuses_a_window_that_is_not_the_run() -> None:
    model = digit_run_model(8)
    config = dataclasses.replace(tiny_config(vocab_size=model.tokenizer.n_words),
                                 sliding_window_size=9)
    state = random_state(config)
    with pytest.raises(ValueError, match="sliding_window_size"):
        plant_digit_run(state, config, digit_token_ids(model.tokenizer), plan_digit_run(8))


def test_models_are_deterministic_and_named() -> None:
    a, b = digit_run_model(8), digit_run_model(8)
    assert a.fingerprint == b.fingerprint and a.name == digit_run_name(8) == "tiny-digit-run-8"
    assert digit_run_model(8, seed=7).fingerprint != a.fingerprint
    assert set(PLANTED_MODELS) >= {"tiny-digit-run-8", "tiny-digit-run-32"}


def test_the_zoo_loads_any_digit_run_by_name() -> None:
    from fuzz.engine.zoo import is_zoo_name, load_model

    model = load_model("tiny-digit-run-12")
    assert model.name == "tiny-digit-run-12" and model.config.sliding_window_size == 12
    assert load_model("tiny-digit-run-8-seed7").fingerprint == \
        digit_run_model(8, seed=7).fingerprint
    assert is_zoo_name("tiny-digit-run-40") and not is_zoo_name("tiny-digit-run-x")
    with pytest.raises(ValueError, match="between 2 and 95"):
        load_model("tiny-digit-run-200")
