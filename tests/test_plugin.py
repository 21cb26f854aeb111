"""End to end through pytest itself: fuzz, shrink, save into corpus/, replay, dedupe; and what the
plugin does (nothing) to a project that did not ask, and (profiles, threads) to one that did."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    # --corpus-dir=PATH, not "--corpus-dir PATH": pytest picks the rootdir (and so the ini file
    # that opts in to the profiles) before it loads plugins, and takes the value of an option it
    # does not know yet for a path once that directory exists.
    return pytester.runpytest_subprocess(
        "-p", "xdist", "-n", "2", "--gemma-model", "tiny-planted", f"--corpus-dir={corpus}",
        "--gemma-max-new-tokens", "2", "-p", "no:cacheprovider", *extra)


def test_two_workers_save_the_minimal_planted_trigger_exactly_once(fuzz_project, tmp_path):
    corpus = tmp_path / "corpus"
    fuzz_project.makepyfile(test_inner=INNER)
    first = _run(fuzz_project, corpus)
    first.assert_outcomes(failed=2)  # both copies (one per worker) find and shrink it
    files = sorted((corpus / "tiny-planted").glob("*.json"))
    assert len(files) == 1, [f.name for f in files]
    case = load_case(files[0])
    assert case.prompt == "7"  # the planted trigger, minimal
    assert (case.policy, case.first_nonfinite.site, case.first_nonfinite.layer) == (
        "float16", "residual_mlp", 2)
    assert json.loads(files[0].read_text())["finder"]["strategy"].startswith("pytest:")
    assert not list((corpus / "tiny-planted").glob(".*.tmp"))

    second = _run(fuzz_project, corpus)  # the signature is known now: nothing new fails or is saved
    second.assert_outcomes(passed=2)
    assert sorted((corpus / "tiny-planted").glob("*.json")) == files


def test_report_header_names_model_policies_and_seed(fuzz_project, tmp_path):
    fuzz_project.makepyfile(test_inner="def test_nothing():\n    pass\n")
    result = fuzz_project.runpytest_subprocess("--gemma-model", "tiny", "--gemma-policies",
                                               "float16,bfloat16", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["gemma-fuzz: model=tiny policies=float16,bfloat16*",
                                 "gemma-fuzz: hypothesis profile=gemma-* seed=*"])


def test_a_project_that_did_not_opt_in_is_told_its_profile_was_left_alone(pytester):
    pytester.makepyfile(test_inner="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("--gemma-model", "tiny", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["gemma-fuzz: model=tiny *",
                                 "gemma-fuzz: hypothesis profile not loaded*"])


def test_unknown_policy_option_is_a_clear_error(pytester):
    pytester.makepyfile(test_inner="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("--gemma-policies", "float8", "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*unknown precision policy 'float8'*float16-clamp*"])


# --- installed in someone else's environment ----------------------------------------------------
# A project that merely shares an environment with gemma-fuzz: the plugin is auto-loaded there
# (the pytest11 entry point), and must change nothing. Each inner test writes what it saw, and the
# project's conftest writes which modules the whole run imported.
UNRELATED_TEST = '''
import json, os, sys
from hypothesis import given, settings, strategies as st


@given(st.integers())
def test_numbers(n):
    assert isinstance(n, int)


def test_what_it_sees(request):
    s = settings()
    seen = {"profile": settings.get_current_profile_name(), "max_examples": s.max_examples,
            "deadline": None if s.deadline is None else s.deadline.total_seconds(),
            "suppressed": [h.name for h in s.suppress_health_check],
            "plugin_loaded": "fuzz.pytest_plugin" in sys.modules,
            "workerinput": sorted(getattr(request.config, "workerinput", {}))}
    name = "seen-" + os.environ.get("PYTEST_XDIST_WORKER", "main") + ".json"
    with open(os.path.join(os.environ["SEEN_DIR"], name), "w") as f:
        json.dump(seen, f)


def test_that_fails():
    assert False, "a failing test of the project, not a fuzz test"
'''
UNRELATED_CONFTEST = '''
import json, os, sys


def pytest_unconfigure(config):
    imported = sorted(m for m in sys.modules if m == "torch" or m.startswith("fuzz."))
    name = "modules-" + os.environ.get("PYTEST_XDIST_WORKER", "main") + ".json"
    with open(os.path.join(os.environ["SEEN_DIR"], name), "w") as f:
        json.dump(imported, f)
'''


def _plugin_args(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """How the subprocess gets the plugin: through the pytest11 entry point when gemma-fuzz is
    installed (tox, CI, `pip install -e .`) — the case this is about — else named with -p."""
    from importlib.metadata import entry_points

    if any(ep.name == "gemma_fuzz" for ep in entry_points(group="pytest11")):
        return []
    root = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("PYTHONPATH", str(root))
    return ["-p", "fuzz.pytest_plugin"]


# Hypothesis loads its own "ci" profile (derandomized, no deadline) when any of these is set
# (hypothesis/_settings.py, _CI_VARS in 6.170). tox sets __TOX_ENVIRONMENT_VARIABLE_ORIGINAL_CI
# beside a passed CI, so deleting CI alone left the project's CI run (tox -e tests, CI=true)
# seeing Hypothesis's "ci" profile in the child pytest: each test says which CI it is in.
HYPOTHESIS_CI_VARIABLES = ("CI", "__TOX_ENVIRONMENT_VARIABLE_ORIGINAL_CI", "TF_BUILD",
                           "bamboo.buildKey", "BUILDKITE", "CIRCLECI", "CIRRUS_CI",
                           "CODEBUILD_BUILD_ID", "GITHUB_ACTIONS", "GITLAB_CI",
                           "HEROKU_TEST_RUN_ID", "TEAMCITY_VERSION")


def _scrub_environment(monkeypatch: pytest.MonkeyPatch, keep_profile_env: bool = False) -> None:
    """The child pytest sees no CI, no xdist worker and no profile of this test's own run."""
    for inherited in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", *HYPOTHESIS_CI_VARIABLES):
        monkeypatch.delenv(inherited, raising=False)
    if not keep_profile_env:
        monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)


def _unrelated_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                   *extra: str) -> dict:
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir(exist_ok=True)
    monkeypatch.setenv("SEEN_DIR", str(seen_dir))
    _scrub_environment(monkeypatch)
    pytester.makepyfile(test_unrelated=UNRELATED_TEST)
    pytester.makeconftest(UNRELATED_CONFTEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *_plugin_args(monkeypatch),
                                           *extra)
    result.assert_outcomes(passed=2, failed=1)
    assert not [line for line in result.outlines if line.startswith("gemma-fuzz:")]  # no header
    return {p.stem: json.loads(p.read_text()) for p in seen_dir.glob("*.json")}


def test_an_unrelated_project_keeps_hypothesis_defaults_and_imports_no_torch(pytester, monkeypatch,
                                                                            tmp_path):
    seen = _unrelated_run(pytester, monkeypatch, tmp_path)
    assert seen["seen-main"]["plugin_loaded"]  # the plugin was there, and changed nothing:
    assert seen["seen-main"]["profile"] == "default"
    assert seen["seen-main"]["max_examples"] == 100
    assert seen["seen-main"]["deadline"] == 0.2
    assert seen["seen-main"]["suppressed"] == []
    # not even a failing test made it import the package or torch
    assert seen["modules-main"] == ["fuzz.pytest_plugin"]


def test_an_unrelated_project_under_xdist_gets_no_state_and_no_thread_change(pytester, monkeypatch,
                                                                             tmp_path):
    seen = _unrelated_run(pytester, monkeypatch, tmp_path, "-p", "xdist", "-n", "2")
    [worker] = [v for k, v in seen.items() if k.startswith("seen-gw")]
    assert worker["plugin_loaded"] and worker["max_examples"] == 100
    assert not any(key.startswith("gemma_fuzz") for key in worker["workerinput"])
    for key, modules in seen.items():
        if key.startswith("modules-"):
            assert "torch" not in modules, key  # so torch's thread count was never touched


# --- a project that asks ----------------------------------------------------------------------
OPTED_IN_TEST = '''
import json, os
from hypothesis import settings


def test_what_it_sees(request):
    import torch

    s = settings()
    seen = {"profile": settings.get_current_profile_name(), "max_examples": s.max_examples,
            "derandomize": s.derandomize, "threads": torch.get_num_threads(),
            "workerinput": {k: v for k, v in getattr(request.config, "workerinput", {}).items()
                            if k.startswith("gemma_fuzz")}}
    name = "seen-" + os.environ.get("PYTEST_XDIST_WORKER", "main") + ".json"
    with open(os.path.join(os.environ["SEEN_DIR"], name), "w") as f:
        json.dump(seen, f)
'''


def _opted_in_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                  ini: str, *extra: str, ci: bool = False, keep_profile_env: bool = False
                  ) -> dict:
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir(exist_ok=True)
    monkeypatch.setenv("SEEN_DIR", str(seen_dir))
    _scrub_environment(monkeypatch, keep_profile_env=keep_profile_env)
    if ci:
        monkeypatch.setenv("CI", "true")
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_opted=OPTED_IN_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *_plugin_args(monkeypatch),
                                           *extra)
    result.assert_outcomes(passed=1)
    [seen] = [json.loads(p.read_text()) for p in seen_dir.glob("seen-*.json")]
    return seen


@pytest.mark.parametrize(("extra", "ci", "profile", "max_examples"), [
    ((), False, "gemma-dev", 25),
    ((), True, "gemma-ci", 10),
    (("--gemma-profile", "nightly"), False, "gemma-nightly", 2000),
    (("--hypothesis-profile", "default"), False, "default", 100),  # Hypothesis's option wins
])
def test_a_project_that_opts_in_gets_the_profiles(pytester, monkeypatch, tmp_path, extra, ci,
                                                  profile, max_examples):
    seen = _opted_in_run(pytester, monkeypatch, tmp_path, "gemma_fuzz_profiles = true", *extra,
                         ci=ci)
    assert (seen["profile"], seen["max_examples"]) == (profile, max_examples)
    assert seen["derandomize"] == ci


def test_hypothesis_profile_in_the_environment_names_the_profile(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "gemma-nightly")
    seen = _opted_in_run(pytester, monkeypatch, tmp_path, "gemma_fuzz_profiles = true",
                         keep_profile_env=True)
    assert (seen["profile"], seen["max_examples"]) == ("gemma-nightly", 2000)


def _default_threads() -> int:
    """torch's own thread count in a fresh process."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def test_opted_in_thread_sharing_reaches_each_xdist_worker_through_workerinput(pytester,
                                                                                monkeypatch,
                                                                                tmp_path):
    from fuzz.pytest_plugin import threads_per_worker

    share = threads_per_worker(2)
    seen = _opted_in_run(pytester, monkeypatch, tmp_path, "gemma_fuzz_share_threads = true",
                         "-p", "xdist", "-n", "2")
    assert seen["workerinput"] == {"gemma_fuzz_threads": share}
    assert seen["threads"] == share


def test_thread_sharing_has_an_opt_out(pytester, monkeypatch, tmp_path):
    from fuzz.pytest_plugin import threads_per_worker

    default = _default_threads()
    if default == threads_per_worker(2):
        pytest.skip(f"on this machine a worker's share is torch's default ({default} threads): "
                    "the opt-out cannot be told from the opt-in")
    seen = _opted_in_run(pytester, monkeypatch, tmp_path, "gemma_fuzz_share_threads = true",
                         "-p", "xdist", "-n", "2", "--gemma-no-share-threads")
    assert seen["workerinput"] == {} and seen["threads"] == default


def test_the_scrubbed_ci_variables_cover_hypothesis_s_list():
    from hypothesis import _settings

    if not hasattr(_settings, "_CI_VARS"):
        pytest.skip("this Hypothesis keeps its CI detection elsewhere: update "
                    "HYPOTHESIS_CI_VARIABLES")
    assert set(_settings._CI_VARS) <= set(HYPOTHESIS_CI_VARIABLES)
