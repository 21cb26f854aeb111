"""The long-generation profile (fuzz.long, fuzz.strategies.long): long prompts, long bounds, and
the bounds stored in and replayed from each case."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.cli import bounds_from_args, build_parser
from fuzz.corpus import Corpus
from fuzz.corpus.replay import case_bounds
from fuzz.engine.zoo import load_model
from fuzz.long import (
    LONG_BATCH_SIZE,
    LONG_MAX_NEW_TOKENS,
    LONG_TIME_LIMIT_S,
    long_bounds,
    profile_batch_size,
    profile_bounds,
)
from fuzz.report import run_command
from fuzz.run import FuzzJob
from fuzz.session import DEFAULT_BATCH_SIZE, ModelOptions
from fuzz.strategies import SLIDING_WINDOW, long_prompts
from fuzz.strategies.long import fill
from fuzz.verdict import Bounds

pytest_plugins = ["pytester"]

TOKENIZER = load_model("tiny").tokenizer


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(long_prompts(TOKENIZER))
def test_long_prompts_run_past_the_sliding_window_within_the_bound(text: str) -> None:
    n = len(TOKENIZER.encode(text, bos=True))
    assert SLIDING_WINDOW < n <= 1024


def test_a_unit_that_merges_across_the_cut_still_gets_past_the_window():
    """'——\n' repeated to 513 tokens gives 512 (found by CI's random seed): fill_at_least
    takes the next target that reaches the minimum."""
    from fuzz.strategies.long import fill_at_least

    short = fill(TOKENIZER, "——\n", "", SLIDING_WINDOW + 1)
    assert len(TOKENIZER.encode(short, bos=True)) == SLIDING_WINDOW  # what fill() alone gives
    text = fill_at_least(TOKENIZER, "——\n", "", SLIDING_WINDOW + 1, SLIDING_WINDOW + 1, 1024)
    assert SLIDING_WINDOW < len(TOKENIZER.encode(text, bos=True)) <= 1024


@settings(max_examples=25, deadline=None)
@given(unit=st.text(min_size=1, max_size=30), end=st.text(max_size=60),
       target=st.integers(2, 300))
def test_fill_never_exceeds_the_target(unit: str, end: str, target: int) -> None:
    assert len(TOKENIZER.encode(fill(TOKENIZER, unit, end, target), bos=True)) <= target


def test_fill_keeps_the_tail_and_repeats_the_filler() -> None:
    text = fill(TOKENIZER, "ab ", " END", 200)
    assert text.endswith(" END") and text.count("ab ") > 20
    assert len(TOKENIZER.encode(text, bos=True)) <= 200


def test_long_prompts_refuse_impossible_bounds() -> None:
    with pytest.raises(ValueError, match="min_tokens=600, max_tokens=500"):
        long_prompts(TOKENIZER, min_tokens=600, max_tokens=500)


def test_long_bounds_replace_defaults_but_not_what_the_user_set() -> None:
    b = long_bounds()
    assert (b.max_new_tokens, b.max_prompt_tokens) == (LONG_MAX_NEW_TOKENS, 1024)
    assert b.time_limit_s == LONG_TIME_LIMIT_S
    mine = long_bounds(max_new_tokens=4, max_prompt_tokens=600)
    assert (mine.max_new_tokens, mine.max_prompt_tokens) == (4, 600)
    assert profile_batch_size(True) == LONG_BATCH_SIZE and profile_batch_size(True, 3) == 3
    assert profile_batch_size(False) == DEFAULT_BATCH_SIZE


def test_an_explicit_value_equal_to_the_default_still_wins_under_long() -> None:
    """--long --batch-size 8 --max-new-tokens 16 asks for 8 and 16 (the defaults' values): the
    profile must not take them for unset (it did when it compared with the defaults)."""
    assert profile_batch_size(True, DEFAULT_BATCH_SIZE) == DEFAULT_BATCH_SIZE
    b = profile_bounds(True, max_new_tokens=16, max_prompt_tokens=96)
    assert (b.max_new_tokens, b.max_prompt_tokens) == (16, 96)
    assert profile_bounds(False) == Bounds()


def _job(tmp_path, *extra: str) -> FuzzJob:
    args = build_parser().parse_args(
        ["run", "--model", "tiny-planted", "--policies", "float16", "--no-bos", "--budget",
         "20s", "--corpus", str(tmp_path / "corpus"), "--database", "", "--seed", "5",
         "--round-examples", "6", "--quiet", *extra])
    return FuzzJob.from_args(args, ModelOptions("tiny-planted"), bounds_from_args(args))


def test_run_long_sets_the_profile(tmp_path) -> None:
    job = _job(tmp_path, "--long")
    assert job.long and job.session.batch_size == LONG_BATCH_SIZE
    assert (job.session.bounds.max_new_tokens, job.session.bounds.max_prompt_tokens) == (128, 1024)
    plain = _job(tmp_path)
    assert not plain.long and plain.session.bounds.max_prompt_tokens == 96


def test_run_long_keeps_an_explicit_batch_size_and_bound_equal_to_the_defaults(tmp_path) -> None:
    job = _job(tmp_path, "--long", "--batch-size", "8", "--max-new-tokens", "16")
    assert job.session.batch_size == 8 and job.session.bounds.max_new_tokens == 16
    assert job.session.bounds.max_prompt_tokens == 1024  # the one bound not given: the profile's


def test_a_long_run_saves_cases_with_their_bounds_and_replay_uses_them(tmp_path) -> None:
    # 600 tokens, not 1024: still past the window, and every kernel variation of each finding
    # costs less
    job = _job(tmp_path, "--long", "--max-new-tokens", "2", "--max-prompt-tokens", "600")
    assert job.main() == 0
    command = run_command(job.summary())
    assert "--long" in command and "--max-prompt-tokens 600" in command
    cases = Corpus(tmp_path / "corpus").cases("tiny-planted")
    assert cases, "tiny-planted overflows on '7': a long search finds it"
    for loaded in cases:
        case = loaded.case
        assert case.bounds == {"max_new_tokens": 2, "max_prompt_tokens": 600}
        assert case_bounds(case).max_prompt_tokens == 600


LONG_INNER = '''
from hypothesis import given, settings, strategies as st
from fuzz.long import long_strategy


@settings(max_examples=3, derandomize=True, database=None, deadline=None)
@given(data=st.data())
def test_long(gemma_fuzz, data):
    bounds = gemma_fuzz.session.bounds
    assert (bounds.max_new_tokens, bounds.max_prompt_tokens) == (3, 1024)
    text = data.draw(long_strategy(gemma_fuzz.session))
    assert len(gemma_fuzz.session.model.tokenizer.encode(text, bos=True)) > 512
    gemma_fuzz.check(text, "bfloat16")
'''


def test_the_plugin_runs_long_generations_with_gemma_long(fuzz_project, tmp_path):
    fuzz_project.makepyfile(test_inner=LONG_INNER)
    result = fuzz_project.runpytest_subprocess(
        "--gemma-model", "tiny", "--gemma-long", "--gemma-max-new-tokens", "3",
        f"--corpus-dir={tmp_path / 'corpus'}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "long=on" in result.stdout.str()
