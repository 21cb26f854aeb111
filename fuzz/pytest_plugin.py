"""pytest plugin: options, markers, model fixtures, saving shrunk failures — and, when a project
asks for them, Hypothesis profiles and thread sharing.

Registered through the `pytest11` entry point (and the root conftest.py of this repository), so
it loads in every pytest run of an environment where gemma-fuzz is installed. It therefore
changes nothing that was not asked for (as Hypothesis's own plugin does):

- importing it imports neither Hypothesis nor torch nor the rest of the package; the fixtures
  load the model lazily, on first use;
- Hypothesis's settings are left alone unless the project opts in (ini `gemma_fuzz_profiles =
  true`, or `--gemma-profile NAME`): then the profiles `gemma-ci`, `gemma-dev`, `gemma-nightly`
  are registered and one is loaded (`auto`: gemma-ci under CI=true, else gemma-dev;
  `--hypothesis-profile` and HYPOTHESIS_PROFILE still win);
- torch's thread count is left alone unless the project opts in (ini `gemma_fuzz_share_threads =
  true`, or `--gemma-share-threads`; `--gemma-no-share-threads` opts out again): then each
  pytest-xdist worker gets its share of the cores;
- the report header is written only when the plugin was asked for (an ini opt-in or a
  `--gemma-*` option);
- a failing test's exception is looked at only when fuzz.search.round was imported (a fuzz test
  of this plugin ran), so other projects' failures never import the package.

Decisions the controller makes (the profile, each worker's threads) reach pytest-xdist workers
through `pytest_configure_node` / `workerinput`, as pytest-randomly passes its seed; the plugin's
own state lives in `config.stash`.

- `gemma_policy` is parametrised over `--gemma-policies`; `gemma_bos` over the BOS modes.
- A fuzz test fails with `fuzz.search.round.NewSignature` (an AssertionError). When Hypothesis
  has finished shrinking, the exception it finally raises comes from the minimal example: this
  plugin saves exactly that one (never an intermediate) into the corpus, deduplicated by
  signature under a file lock, so two xdist workers finding the same bug write one case.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pytest

if TYPE_CHECKING:
    from fuzz.corpus import Corpus
    from fuzz.session import ModelOptions, Session
    from fuzz.verdict import Bounds, Signature

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
OPT_PROFILE = "--gemma-profile"
OPT_SHARE_THREADS = "--gemma-share-threads"
OPT_NO_SHARE_THREADS = "--gemma-no-share-threads"
# A gemma_pytorch checkpoint given as --gemma-model needs these (the CLI's --variant/--config/
# --tokenizer); a GGUF file or a Hugging Face directory carries its own.
OPT_VARIANT = "--gemma-variant"
OPT_CONFIG = "--gemma-config"
OPT_TOKENIZER = "--gemma-tokenizer"
INI_PROFILES = "gemma_fuzz_profiles"
INI_SHARE_THREADS = "gemma_fuzz_share_threads"

DEFAULT_MODEL = "gemma3-270m"
DEFAULT_POLICIES = "all"
DEFAULT_ENGINE = "builtin"
# Fewer decode steps than `fuzz run` (fuzz.verdict.DEFAULT_MAX_NEW_TOKENS, 16): a test suite's
# examples must stay cheap; the nightly job runs the longer bound.
PYTEST_MAX_NEW_TOKENS = 8
# --gemma-profile NAME loads Hypothesis's profile "gemma-NAME" (prefixed, so that a project's own
# "ci" or "dev" profile is never replaced); "auto": ci under CI=true, else dev.
PROFILES = ("ci", "dev", "nightly")
PROFILE_CHOICES = ("auto", "none", *PROFILES)
# The names of the engines (fuzz.engine.loaded.ENGINES, which imports torch).
ENGINE_CHOICES = ("builtin", "upstream", "transformers", "transformers-eager", "transformers-sdpa")
# workerinput keys: what the controller decided, for every xdist worker
WORKER_PROFILE = "gemma_fuzz_profile"
WORKER_THREADS = "gemma_fuzz_threads"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("gemma-fuzz", "Gemma NaN/Inf fuzzing")
    g.addoption(OPT_MODEL, default=None,
                help=f"model SPEC (default {DEFAULT_MODEL}): zoo name (gemma3-270m, tiny, "
                     "tiny-planted…), a .gguf file, a Hugging Face directory (config.json + "
                     f"safetensors), or a gemma_pytorch checkpoint with {OPT_VARIANT}/{OPT_CONFIG}"
                     f" and {OPT_TOKENIZER}")
    g.addoption(OPT_VARIANT, default=None,
                help="upstream variant of a gemma_pytorch checkpoint (2b, 7b, 9b, 1b, 270m, …)")
    g.addoption(OPT_CONFIG, default=None,
                help="GemmaConfig JSON (upstream field names) of a gemma_pytorch checkpoint")
    g.addoption(OPT_TOKENIZER, default=None, help="SentencePiece .model of a checkpoint")
    g.addoption(OPT_POLICIES, default=None,
                help="comma-separated precision policies, or 'all' (the default): float32, "
                     "bfloat16, float16, float16-clamp, float16-fp32-residual")
    g.addoption(OPT_ENGINE, default=None, choices=ENGINE_CHOICES,
                help=f"who computes (default {DEFAULT_ENGINE}): builtin, upstream "
                     "(google/gemma_pytorch), transformers (its default attention), "
                     "transformers-eager or transformers-sdpa")
    g.addoption(OPT_NO_BOS, action="store_true", help="fuzz without BOS (raw continuation)")
    g.addoption(OPT_BOTH_BOS, action="store_true", help="fuzz with and without BOS")
    g.addoption(OPT_MAX_NEW_TOKENS, type=int, default=None,
                help=f"decode steps per example (default {PYTEST_MAX_NEW_TOKENS}; "
                     f"with {OPT_LONG}, 128)")
    g.addoption(OPT_DEVICE, default=None, help="auto (the default), cpu, cuda, cuda:N")
    g.addoption(OPT_CORPUS, default=None, help="corpus directory (default: <rootdir>/corpus)")
    g.addoption(OPT_NO_SAVE, action="store_true", help="do not save shrunk failures to corpus")
    g.addoption(OPT_STRICT_SITE, action="store_true",
                help="corpus replay: fail when a case still fails but its first site moved")
    g.addoption(OPT_LONG, action="store_true",
                help="long generations (fuzz.long): 128 decode steps (unless "
                     f"{OPT_MAX_NEW_TOKENS} is given), prompts up to 1024 tokens, and "
                     "tests/test_fuzz.py's long-prompt test")
    g.addoption(OPT_PROFILE, default=None, choices=PROFILE_CHOICES,
                help="load one of gemma-fuzz's Hypothesis profiles, registered as gemma-ci (10 "
                     "examples, derandomized), gemma-dev (25), gemma-nightly (2000); auto: ci "
                     "under CI=true, else dev; none: leave Hypothesis's settings alone. Default: "
                     f"auto when the ini option {INI_PROFILES} is true, else none")
    g.addoption(OPT_SHARE_THREADS, action="store_true", default=None,
                help="under pytest-xdist give each worker its share of the CPU cores as torch "
                     f"threads (default: the ini option {INI_SHARE_THREADS}, else off)")
    g.addoption(OPT_NO_SHARE_THREADS, action="store_false", dest="gemma_share_threads",
                help="leave torch's thread count alone even where the ini option asks")
    parser.addini(INI_PROFILES, type="bool", default=False,
                  help="gemma-fuzz: load its Hypothesis profile (gemma-ci / gemma-dev)")
    parser.addini(INI_SHARE_THREADS, type="bool", default=False,
                  help="gemma-fuzz: one share of the cores per xdist worker for torch")


@dataclass
class PluginState:
    """What the plugin decided for this pytest process (config.stash[STATE])."""

    asked: bool  # an ini opt-in or a --gemma-* option: the header and policy checks apply
    profile: Optional[str]  # the Hypothesis profile loaded, None when left alone
    threads: Optional[int]  # torch threads set in this process, None when left alone
    harness: Optional[FuzzHarness] = field(default=None, repr=False)


STATE = pytest.StashKey[PluginState]()


def _given(config: pytest.Config, name: str) -> Any:
    return config.getoption(name)


def asked_for(config: pytest.Config) -> bool:
    """Whether this run uses the plugin: an ini opt-in or any --gemma-* option on the command
    line (options default to None or False, so "given" is not a comparison with a default)."""
    if config.getini(INI_PROFILES) or config.getini(INI_SHARE_THREADS):
        return True
    gemma_dests = {"gemma_model", "gemma_variant", "gemma_config", "gemma_tokenizer",
                   "gemma_policies", "gemma_engine", "gemma_no_bos", "gemma_both_bos",
                   "gemma_max_new_tokens", "gemma_device", "corpus_dir", "gemma_no_save",
                   "gemma_strict_site", "gemma_long", "gemma_profile", "gemma_share_threads"}
    return any(getattr(config.option, d, None) not in (None, False) for d in gemma_dests)


def resolve_profile(config: pytest.Config) -> Optional[str]:
    """The gemma-fuzz profile to load, or None to leave Hypothesis's settings alone."""
    choice = config.getoption(OPT_PROFILE)
    if choice is None:
        choice = "auto" if config.getini(INI_PROFILES) else "none"
    if choice == "none":
        return None
    if choice == "auto":
        choice = "ci" if os.environ.get("CI") else "dev"
    return f"gemma-{choice}"


def share_threads_asked(config: pytest.Config) -> bool:
    given = config.getoption("gemma_share_threads")
    return bool(config.getini(INI_SHARE_THREADS)) if given is None else bool(given)


def register_profiles() -> None:
    """gemma-fuzz's Hypothesis profiles: cheap examples for CI and development, many at night.
    Each example is a model generation, so deadlines and the slow-data health checks do not
    apply, and the explain phase (which re-runs the minimal example ~90 times) is left out."""
    from hypothesis import HealthCheck, Phase, settings

    slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    phases = [p for p in Phase if p != Phase.explain]
    settings.register_profile("gemma-ci", max_examples=10, derandomize=True, deadline=None,
                              suppress_health_check=slow_ok, phases=phases, print_blob=True)
    settings.register_profile("gemma-dev", max_examples=25, deadline=None,
                              suppress_health_check=slow_ok, phases=phases)
    settings.register_profile("gemma-nightly", max_examples=2000, deadline=None,
                              suppress_health_check=slow_ok, phases=phases)


def threads_per_worker(workers: int) -> int:
    """Each of `workers` processes' share of the cores. torch's OpenMP threads spin while
    waiting: with more threads than cores in all, every worker slows down (benchmarks/README.md,
    "Threads under xdist")."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


class XdistHooks:
    """Registered only when pytest-xdist is loaded (its hook must exist to be implemented)."""

    @staticmethod
    def pytest_configure_node(node: Any) -> None:
        state = node.config.stash[STATE]
        if state.profile is not None:
            node.workerinput[WORKER_PROFILE] = state.profile
        if share_threads_asked(node.config):
            node.workerinput[WORKER_THREADS] = threads_per_worker(node.workerinput["workercount"])


@pytest.hookimpl(tryfirst=True)  # before Hypothesis's plugin loads --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuzz: Hypothesis prompt fuzzing through the model")
    config.addinivalue_line("markers", "regression: replays of corpus/ cases")
    worker = getattr(config, "workerinput", None)
    if worker is not None:  # an xdist worker: the controller decided
        profile, threads = worker.get(WORKER_PROFILE), worker.get(WORKER_THREADS)
    else:
        profile, threads = resolve_profile(config), None
    if profile is not None:
        from hypothesis import settings

        register_profiles()
        # HYPOTHESIS_PROFILE names one itself (gemma-nightly, or the project's own); Hypothesis's
        # plugin loads --hypothesis-profile after this hook (tryfirst), so that one wins too.
        settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or profile)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    config.stash[STATE] = PluginState(asked_for(config), profile, threads)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(), "gemma_fuzz_xdist")
    if config.getoption(OPT_POLICIES) is not None:  # a bad name fails here, listing valid ones
        from fuzz.precision import parse_policies

        parse_policies(config.getoption(OPT_POLICIES))


def corpus_dir(config: pytest.Config) -> Path:
    given = config.getoption(OPT_CORPUS)
    return Path(given) if given else Path(config.rootpath) / "corpus"


def bos_modes(config: pytest.Config) -> list[bool]:
    if config.getoption(OPT_BOTH_BOS):
        return [True, False]
    return [False] if config.getoption(OPT_NO_BOS) else [True]


def policy_names(config: pytest.Config) -> list[str]:
    from fuzz.precision import parse_policies

    return [p.name for p in parse_policies(config.getoption(OPT_POLICIES) or DEFAULT_POLICIES)]


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash.get(STATE, None)
    if state is None or not state.asked:
        return []
    seed = config.getoption("hypothesis_seed", default=None)
    lines = [
        f"gemma-fuzz: model={config.getoption(OPT_MODEL) or DEFAULT_MODEL} "
        f"policies={','.join(policy_names(config))} "
        f"engine={config.getoption(OPT_ENGINE) or DEFAULT_ENGINE} "
        f"bos={'/'.join(map(str, bos_modes(config)))} "
        f"max_new_tokens={max_new_tokens(config)} corpus={corpus_dir(config)}"
        + (" long=on" if config.getoption(OPT_LONG) else ""),
    ]
    if state.profile is None:
        lines.append("gemma-fuzz: hypothesis profile not loaded (Hypothesis's settings as the "
                     f"project has them; {OPT_PROFILE} or ini {INI_PROFILES} loads one)")
    else:
        from hypothesis import settings

        if seed is None:
            seed = "derandomized" if settings().derandomize else "random"
        lines.append(f"gemma-fuzz: hypothesis profile={settings.get_current_profile_name()} "
                     f"seed={seed}")
    if state.threads is not None:
        lines.append(f"gemma-fuzz: torch threads per worker={state.threads}")
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    if "gemma_policy" in metafunc.fixturenames:
        metafunc.parametrize("gemma_policy", policy_names(config), scope="session")
    if "gemma_bos" in metafunc.fixturenames:
        modes = bos_modes(config)
        metafunc.parametrize("gemma_bos", modes, ids=["bos" if m else "nobos" for m in modes],
                             scope="session")


def max_new_tokens(config: pytest.Config) -> Optional[int]:
    """--gemma-max-new-tokens, else the plugin's default (None under --gemma-long: the long
    profile's own bound, fuzz.long)."""
    given = config.getoption(OPT_MAX_NEW_TOKENS)
    if given is not None or config.getoption(OPT_LONG):
        return given
    return PYTEST_MAX_NEW_TOKENS


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

    return ModelOptions(config.getoption(OPT_MODEL) or DEFAULT_MODEL,
                        config.getoption(OPT_VARIANT), config.getoption(OPT_CONFIG),
                        config.getoption(OPT_TOKENIZER),
                        engine=config.getoption(OPT_ENGINE) or DEFAULT_ENGINE,
                        device=worker_device(config.getoption(OPT_DEVICE) or "auto"))


def plugin_bounds(config: pytest.Config) -> Bounds:
    """The generation bounds of this run: the plugin's step bound, or fuzz.long's profile under
    --gemma-long (where an explicit --gemma-max-new-tokens still wins)."""
    from fuzz.long import long_bounds
    from fuzz.verdict import Bounds

    steps = max_new_tokens(config)
    if config.getoption(OPT_LONG):
        return long_bounds(max_new_tokens=steps)
    return Bounds(max_new_tokens=steps)


class FuzzHarness:
    """What a fuzz test calls: run one prompt, fail on a new signature (or on any non-finite
    value under a policy declared safe)."""

    def __init__(self, config: pytest.Config) -> None:
        from fuzz.corpus import Corpus

        self.config = config
        self._session: Optional[Session] = None
        self.corpus: Corpus = Corpus(corpus_dir(config))
        self._known: Optional[set[Signature]] = None

    @property
    def session(self) -> Session:
        if self._session is None:
            from fuzz.engine.zoo import ModelNotInstalled
            from fuzz.session import Session

            try:
                self._session = Session.open(model_options(self.config),
                                             plugin_bounds(self.config), batch_size=8)
            except ModelNotInstalled as err:
                pytest.skip(str(err))
        return self._session

    @property
    def long(self) -> bool:
        return bool(self.config.getoption(OPT_LONG))

    @property
    def known(self) -> set[Signature]:
        if self._known is None:
            self._known = self.corpus.signatures(self.session.model.name)
        return self._known

    def check(self, text: str, policy: str, add_bos: bool = True) -> None:
        from hypothesis import reject, target

        from fuzz.generate import EmptyPrompt, PromptTooLong
        from fuzz.margin import passes_margin
        from fuzz.precision import get_policy
        from fuzz.search.round import error_for, steering_score
        from fuzz.verdict import PromptSpec

        spec = PromptSpec(text, add_bos=add_bos)
        safe = get_policy(policy).expected_safe
        try:
            screened = self.session.screen([spec], policy, set() if safe else self.known)[0]
        except (PromptTooLong, EmptyPrompt):
            reject()  # over the token bound, or no token at all: not a prompt this run can feed
        # Under an unsafe policy a failure below the margin a case needs is marginal: it would
        # not reproduce on every machine, so it is not a new bug to shrink (fuzz.margin).
        # Steer as `fuzz run` does: toward content headroom, never toward known signatures.
        case_margin = self.session.case_margin(policy)
        target(steering_score([screened], case_margin=case_margin))
        if screened.new and passes_margin(screened.verdict, case_margin):
            raise error_for(screened.signature)(screened, spec)


@pytest.fixture(scope="session")
def gemma_fuzz(request: pytest.FixtureRequest) -> FuzzHarness:
    """The session-wide harness (one model load per worker, lazily)."""
    return _harness(request.config)


def _harness(config: pytest.Config) -> FuzzHarness:
    state = config.stash[STATE]
    if state.harness is None:
        state.harness = FuzzHarness(config)
    return state.harness


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    # A NewSignature can only come from fuzz.search.round: when that module was never imported
    # (another project's failing test), there is nothing to save and nothing to import.
    search = sys.modules.get("fuzz.search.round")
    if search is None or call.when != "call" or call.excinfo is None or \
            item.config.getoption(OPT_NO_SAVE):
        return
    errors = list(_new_signatures(call.excinfo.value, search.NewSignature))
    if not errors:
        return
    from fuzz.corpus import Case
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
        case = Case.of_assessment(harness.session, assessment, strategy=f"pytest:{item.nodeid}")
        result = harness.corpus.save(case)
        lines.append(f"{result.status}: {result.path}  {prompt}")
    outcome.get_result().sections.append(("gemma-fuzz corpus", "\n".join(lines)))


def _new_signatures(exc: BaseException, kind: type) -> Iterator[BaseException]:
    if isinstance(exc, kind):
        yield exc
    elif isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _new_signatures(inner, kind)
