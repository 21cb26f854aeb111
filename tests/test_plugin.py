"""End to end through pytest itself: fuzz, shrink, save into corpus/, replay, dedupe."""
from __future__ import annotations

import json

import pytest

from fuzz.corpus import load_case

pytest_plugins = ["pytester"]

INNER = '''
import pytest
from hypothesis import Phase, given, settings
from fuzz.strategies import prompts


@pytest.mark.parametrize("copy", [0, 1])
@settings(max_examples=120, derandomize=True, database=None,
          phases=[p for p in Phase if p.name != "explain"])
@given(text=prompts(max_chars=40))
def test_planted(gemma_fuzz, copy, text):
    gemma_fuzz.check(text, "float16")
'''


def _run(pytester: pytest.Pytester, corpus, *extra: str):
    return pytester.runpytest_subprocess(
        "-p", "xdist", "-n", "2", "--gemma-model", "tiny-planted", "--corpus-dir", str(corpus),
        "--gemma-max-new-tokens", "2", "-p", "no:cacheprovider", *extra)


def test_two_workers_save_the_minimal_planted_trigger_exactly_once(pytester, tmp_path):
    corpus = tmp_path / "corpus"
    pytester.makepyfile(test_inner=INNER)
    first = _run(pytester, corpus)
    first.assert_outcomes(failed=2)  # both copies (one per worker) find and shrink it
    files = sorted((corpus / "tiny-planted").glob("*.json"))
    assert len(files) == 1, [f.name for f in files]
    case = load_case(files[0])
    assert case.prompt == "7"  # the planted trigger, minimal
    assert (case.policy, case.first_nonfinite.site, case.first_nonfinite.layer) == (
        "float16", "residual_mlp", 2)
    assert json.loads(files[0].read_text())["finder"]["strategy"].startswith("pytest:")
    assert not list((corpus / "tiny-planted").glob(".*.tmp"))

    second = _run(pytester, corpus)  # the signature is known now: nothing new fails or is saved
    second.assert_outcomes(passed=2)
    assert sorted((corpus / "tiny-planted").glob("*.json")) == files


def test_report_header_names_model_policies_and_seed(pytester, tmp_path):
    pytester.makepyfile(test_inner="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("--gemma-model", "tiny", "--gemma-policies",
                                           "float16,bfloat16", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["gemma-fuzz: model=tiny policies=float16,bfloat16*",
                                 "gemma-fuzz: hypothesis profile=* seed=*"])


def test_unknown_policy_option_is_a_clear_error(pytester):
    pytester.makepyfile(test_inner="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("--gemma-policies", "float8", "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*unknown precision policy 'float8'*float16-clamp*"])
