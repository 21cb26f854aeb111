"""pytest plugin: options, markers, Hypothesis profiles, model fixtures, saving shrunk failures.

Registered through the `pytest11` entry point (and the root conftest.py of this repository).

- One model load per process (per xdist worker), lazily, on first use; every policy's model is
  cast from the same float32 master copy (fuzz.engine.loaded.LoadedModel.engine).
- `gemma_policy` is parametrised over `--gemma-policies`; `gemma_bos` over the BOS modes.
- A fuzz test fails with `fuzz.search.round.NewSignature` (an AssertionError). When Hypothesis has
  finished shrinking, the exception it finally raises comes from the minimal example: this plugin
  saves exactly that one (never an intermediate) into the corpus, deduplicated by signature under
  a file lock, so two xdist workers finding the same bug write one case.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import pytest
from hypothesis import HealthCheck, Phase, settings

from fuzz.corpus import Corpus
from fuzz.engine.loaded import ENGINES
from fuzz.precision import POLICIES, get_policy, parse_policies

if TYPE_CHECKING:
    from fuzz.generate import Bounds
    from fuzz.session import ModelOptions

OPT_MODEL = "--gemma-model"
OPT_POLICIES = "--gemma-policies"
OPT_ENGINE = "--gemma-engine"
OPT_NO_BOS = "--gemma-no-bos"
OPT_BOTH_BOS = "--gemma-both-bos"
OPT_MAX_NEW_TOKENS = "--gemma-max-new-tokens"
OPT_DEVICE = "--gemma-device"
OPT_CORPUS = "--corpus-dir"
OPT_NO_SAVE = "--gemma-no-save"
OPT_STRICT_SITE = "--gemma-strict-site"
OPT_LONG = "--gemma-long"
# A gemma_pytorch checkpoint given as --gemma-model needs these (the CLI's --variant/--config/
# --tokenizer); a GGUF file or a Hugging Face directory carries its own.
OPT_VARIANT = "--gemma-variant"
OPT_CONFIG = "--gemma-config"
OPT_TOKENIZER = "--gemma-tokenizer"

DEFAULT_MODEL = "gemma3-270m"
DEFAULT_POLICIES = "all"
DEFAULT_MAX_NEW_TOKENS = 8  # CI-sized; the nightly job uses fuzz.generate's default (16)

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
# Hypothesis's explain phase re-runs the minimal example ~90 times (measured): each run is a
# model generation here, so it is left out.
_PHASES = [p for p in Phase if p != Phase.explain]
settings.register_profile("ci", max_examples=10, derandomize=True, deadline=None,
                          suppress_health_check=_SLOW_OK, phases=_PHASES, print_blob=True)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=_SLOW_OK,
                          phases=_PHASES)
settings.register_profile("nightly", max_examples=2000, deadline=None,
                          suppress_health_check=_SLOW_OK, phases=_PHASES)
# Without --hypothesis-profile: "ci" under CI (CI=true), else "dev". Hypothesis's own plugin
# loads --hypothesis-profile after this, so the option always wins.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI")
                                                                else "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("gemma-fuzz", "Gemma NaN/Inf fuzzing")
    g.addoption(OPT_MODEL, default=DEFAULT_MODEL,
                help="model SPEC: zoo name (gemma3-270m, tiny, tiny-planted…), a .gguf file, a "
                     "Hugging Face directory (config.json + safetensors), or a gemma_pytorch "
                     f"checkpoint with {OPT_VARIANT}/{OPT_CONFIG} and {OPT_TOKENIZER}")
    g.addoption(OPT_VARIANT, default=None,
                help="upstream variant of a gemma_pytorch checkpoint (2b, 7b, 9b, 1b, 270m, …)")
    g.addoption(OPT_CONFIG, default=None,
                help="GemmaConfig JSON (upstream field names) of a gemma_pytorch checkpoint")
    g.addoption(OPT_TOKENIZER, default=None, help="SentencePiece .model of a checkpoint")
    g.addoption(OPT_POLICIES, default=DEFAULT_POLICIES,
                help=f"comma-separated policies or 'all' ({', '.join(POLICIES)})")
    g.addoption(OPT_ENGINE, default="builtin", choices=ENGINES,
                help="who computes: builtin, upstream (google/gemma_pytorch), transformers "
                     "(its default attention), transformers-eager or transformers-sdpa")
    g.addoption(OPT_NO_BOS, action="store_true", help="fuzz without BOS (raw continuation)")
    g.addoption(OPT_BOTH_BOS, action="store_true", help="fuzz with and without BOS")
    g.addoption(OPT_MAX_NEW_TOKENS, type=int, default=DEFAULT_MAX_NEW_TOKENS)
    g.addoption(OPT_DEVICE, default="auto", help="auto, cpu, cuda, cuda:N")
    g.addoption(OPT_CORPUS, default=None, help="corpus directory (default: <rootdir>/corpus)")
    g.addoption(OPT_NO_SAVE, action="store_true", help="do not save shrunk failures to corpus")
    g.addoption(OPT_STRICT_SITE, action="store_true",
                help="corpus replay: fail when a case still fails but its first site moved")
    g.addoption(OPT_LONG, action="store_true",
                help="long generations (fuzz.long): 128 decode steps (unless "
                     f"{OPT_MAX_NEW_TOKENS} is given), prompts up to 1024 tokens, and "
                     "tests/test_fuzz.py's long-prompt test")


def pytest_configure(config: pytest.Config) -> None:
    share_cpu_threads()
    config.addinivalue_line("markers", "fuzz: Hypothesis prompt fuzzing through the model")
    config.addinivalue_line("markers", "regression: replays of corpus/ cases")
    parse_policies(config.getoption(OPT_POLICIES))  # a bad name fails here, listing valid ones


def share_cpu_threads() -> None:
    """Under pytest-xdist, give each worker its share of the cores. torch's OpenMP threads spin
    while waiting: two workers with two threads each on 2 cores ran a 270M decode step ~20x
    slower than one worker alone (measured)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def corpus_dir(config: pytest.Config) -> Path:
    given = config.getoption(OPT_CORPUS)
    return Path(given) if given else Path(config.rootpath) / "corpus"


def bos_modes(config: pytest.Config) -> list[bool]:
    if config.getoption(OPT_BOTH_BOS):
        return [True, False]
    return [False] if config.getoption(OPT_NO_BOS) else [True]


def pytest_report_header(config: pytest.Config) -> list[str]:
    seed = config.getoption("hypothesis_seed", default=None)
    profile = settings._current_profile  # noqa: SLF001 (Hypothesis has no public getter)
    return [
        f"gemma-fuzz: model={config.getoption(OPT_MODEL)} "
        f"policies={','.join(p.name for p in parse_policies(config.getoption(OPT_POLICIES)))} "
        f"engine={config.getoption(OPT_ENGINE)} bos={'/'.join(map(str, bos_modes(config)))} "
        f"max_new_tokens={config.getoption(OPT_MAX_NEW_TOKENS)} corpus={corpus_dir(config)}"
        + (" long=on" if config.getoption(OPT_LONG) else ""),
        f"gemma-fuzz: hypothesis profile={profile} seed="
        f"{seed if seed is not None else ('derandomized' if settings().derandomize else 'random')}",
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    if "gemma_policy" in metafunc.fixturenames:
        names = [p.name for p in parse_policies(config.getoption(OPT_POLICIES))]
        metafunc.parametrize("gemma_policy", names, scope="session")
    if "gemma_bos" in metafunc.fixturenames:
        modes = bos_modes(config)
        metafunc.parametrize("gemma_bos", modes, ids=["bos" if m else "nobos" for m in modes],
                             scope="session")


def worker_device(device: str) -> str:
    """'auto' under pytest-xdist with several GPUs: worker gwN takes cuda:(N mod GPUs), so
    `pytest -n <GPUs>` runs one worker per GPU (they share the corpus and the example database)."""
    import torch

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if device != "auto" or not worker.startswith("gw") or not torch.cuda.is_available():
        return device
    return f"cuda:{int(worker[2:]) % torch.cuda.device_count()}"


def model_options(config: pytest.Config) -> ModelOptions:
    """The model under test as the options name it (the CLI's --model/--variant/--config/
    --tokenizer/--engine/--device)."""
    from fuzz.session import ModelOptions

    return ModelOptions(config.getoption(OPT_MODEL), config.getoption(OPT_VARIANT),
                        config.getoption(OPT_CONFIG), config.getoption(OPT_TOKENIZER),
                        engine=config.getoption(OPT_ENGINE),
                        device=worker_device(config.getoption(OPT_DEVICE)))


class FuzzHarness:
    """What a fuzz test calls: run one prompt, fail on a new signature (or on any non-finite
    value under a policy declared safe)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._session = None
        self.corpus = Corpus(corpus_dir(config))
        self._known: Optional[set] = None

    @property
    def session(self):
        if self._session is None:
            from fuzz.engine.zoo import ModelNotInstalled
            from fuzz.generate import Bounds
            from fuzz.session import Session

            options = model_options(self.config)
            bounds = Bounds(max_new_tokens=self.config.getoption(OPT_MAX_NEW_TOKENS))
            if self.long:
                bounds = plugin_long_bounds(bounds)
            try:
                self._session = Session.open(options, bounds, batch_size=8)
            except ModelNotInstalled as err:
                pytest.skip(str(err))
        return self._session

    @property
    def long(self) -> bool:
        return bool(self.config.getoption(OPT_LONG))

    @property
    def known(self) -> set:
        if self._known is None:
            self._known = self.session.known_signatures(self.corpus)
        return self._known

    def check(self, text: str, policy: str, add_bos: bool = True) -> None:
        from hypothesis import reject, target

        from fuzz.generate import EmptyPrompt, PromptSpec, PromptTooLong
        from fuzz.search.round import error_for, steering_score
        from fuzz.shrink.robustness import passes_margin

        spec = PromptSpec(text, add_bos=add_bos)
        safe = get_policy(policy).expected_safe
        try:
            screened = self.session.screen([spec], policy, set() if safe else self.known)[0]
        except (PromptTooLong, EmptyPrompt):
            reject()  # over the token bound, or no token at all: not a prompt this run can feed
        # Under an unsafe policy a failure below the margin a case needs is marginal: it would
        # not reproduce on every machine, so it is not a new bug to shrink (fuzz.shrink.robustness).
        # Steer as `fuzz run` does: toward content headroom, never toward known signatures.
        case_margin = self.session.case_margin(policy)
        target(steering_score([screened], case_margin=case_margin))
        if screened.new and passes_margin(screened.verdict, case_margin):
            raise error_for(screened.signature)(screened, spec)


def plugin_long_bounds(bounds: Bounds) -> Bounds:
    """fuzz.long's bounds; this plugin's own step default (8) counts as a default too."""
    import dataclasses

    from fuzz.long import LONG_MAX_NEW_TOKENS, long_bounds

    if bounds.max_new_tokens == DEFAULT_MAX_NEW_TOKENS:
        bounds = dataclasses.replace(bounds, max_new_tokens=LONG_MAX_NEW_TOKENS)
    return long_bounds(bounds)


@pytest.fixture(scope="session")
def gemma_fuzz(request: pytest.FixtureRequest) -> FuzzHarness:
    """The session-wide harness (one model load per worker, lazily)."""
    return _harness(request.config)


def _harness(config: pytest.Config) -> FuzzHarness:
    if not hasattr(config, "_gemma_harness"):
        config._gemma_harness = FuzzHarness(config)  # type: ignore[attr-defined]
    return config._gemma_harness  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    if call.when != "call" or call.excinfo is None or item.config.getoption(OPT_NO_SAVE):
        return
    from fuzz.search.round import NewSignature

    errors = list(_new_signatures(call.excinfo.value, NewSignature))
    if not errors:
        return
    from fuzz.shrink.robustness import finalize

    harness = _harness(item.config)
    lines = []
    for err in errors:
        found = err.screened.verdict
        assessment = finalize(harness.session, err.spec, found.policy, err.screened.signature,
                              found.first_nonfinite.step)
        prompt = (f"prompt={assessment.spec.text!r} "
                  f"(Hypothesis's minimal example: {err.spec.text!r})")
        if not assessment.robust:  # would not hold on every machine: a regression case must
            lines.append(f"marginal, not saved ({assessment.robustness.reason}): {prompt}")
            continue
        case = assessment.case(harness.session, strategy=f"pytest:{item.nodeid}")
        result = harness.corpus.save(case)
        lines.append(f"{result.status}: {result.path}  {prompt}")
    outcome.get_result().sections.append(("gemma-fuzz corpus", "\n".join(lines)))


def _new_signatures(exc: BaseException, kind: type) -> Iterator[BaseException]:
    if isinstance(exc, kind):
        yield exc
    elif isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _new_signatures(inner, kind)
