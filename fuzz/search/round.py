"""The search of one (policy, BOS mode) for one round: Hypothesis draws batches of prompts, the
model screens them, a new signature fails the property.

An example is a LIST of prompts screened in one batched generation (batching amortises reading
the weights, docs/NUMERICS.md); the example fails when a prompt shows a signature that is not
known yet, past the margin a regression case needs (fuzz.shrink.robustness). Each signature raises
its own exception class, so Hypothesis treats each as a separate bug and shrinks each to its own
minimal example (a list of one minimal prompt). Only those final, shrunk examples are returned by
`Search.run`: the intermediate ones never reach the corpus.

Steering, the default of `fuzz run` (measured against random draws in benchmarks/bench_search.py):
- each round draws half of its prompts fresh and half as stacked edits of this mode's nearest
  misses as they are when the prompt is drawn (`Search.live_pool`, refreshed after every batch
  and frozen while a failure is shrunk; fuzz.strategies.mutants);
- every example reports `hypothesis.target()` on -log2 of its prompts' distance to a new
  regression case (fuzz.search.misses.distance: content headroom, or how far a marginal finding is
  short of the margin a case needs), and the cap for a new signature past that margin; failures
  under KNOWN signatures score nothing, or targeting would climb toward bugs the corpus already
  holds, and so does headroom at the sites of known signatures: misses and scores look only at
  the sites still open (fuzz.search.misses);
- a mode whose every prompt fails under one known signature at the BOS position before any
  content position is reached (Gemma 3 270M in float16 with BOS: layer 7) is *saturated*: its
  content headroom means nothing, so it is given up after SATURATION_PROBE prompts.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import hypothesis.core
from hypothesis import HealthCheck, Phase, example, given, settings, target
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.database import ExampleDatabase
from hypothesis.errors import Flaky
from hypothesis.reporting import with_reporter

from fuzz.margin import MIN_MARGIN, passes_margin
from fuzz.search.accounting import ModeCounts, PolicySummary
from fuzz.search.misses import MissPool, Site, closed_sites, distance
from fuzz.session import Screened, Session
from fuzz.strategies import mutants
from fuzz.verdict import Bounds, PromptSpec, Signature, Verdict

# target() scores lie in [-TARGET_CAP, TARGET_CAP]: -log2 of a distance to a new case. A finite
# run's distance is its headroom (>= 1, so its score <= 0); max |x| ~1 against float16's 65504 is
# 2^16 away, so every headroom a float16 run can show scores above -16, and a new signature's
# +16 is above every miss.
TARGET_CAP = 16.0
# Prompts a mode screens before it may be called saturated: two batches of the default 8, so one
# unlucky batch does not give a mode up; with BOS, float16 on Gemma 3 270M is given up after its
# first two batches (every prompt dies at layer 7 on the BOS position: docs/NUMERICS.md).
SATURATION_PROBE = 16


class RoundOver(BaseException):
    """The round's time is up and nothing is being shrunk. A BaseException, so Hypothesis lets
    it through instead of treating it as a failure to shrink."""


class BudgetExhausted(BaseException):
    """A shrink in progress outlived the job's hard limit or its own (Search.shrink_limit_s):
    the caller takes the shortest failing prompt per signature (Search.pending)."""


class NewSignature(AssertionError):
    """A prompt produced a non-finite value with a signature not seen before."""

    def __init__(self, screened: Screened, spec: PromptSpec) -> None:
        first = screened.verdict.first_nonfinite
        super().__init__(
            f"{screened.verdict.policy}: first non-finite {first.kind} at step {first.step}, "
            f"layer {first.layer}, {first.site}, position {first.position} "
            f"(token {first.token_id}) for prompt {spec.text!r}"
        )
        self.screened, self.spec = screened, spec


_SIGNATURE_ERRORS: dict[Signature, type[NewSignature]] = {}


def error_for(sig: Signature) -> type[NewSignature]:
    """One exception class per signature: Hypothesis shrinks each class as its own bug."""
    if sig not in _SIGNATURE_ERRORS:
        name = "NewSignature_" + "_".join(str(p) for p in sig[1:]).replace("-", "_")
        _SIGNATURE_ERRORS[sig] = type(name, (NewSignature,), {})
    return _SIGNATURE_ERRORS[sig]


def steering_score(results: Sequence[Screened], closed: frozenset[Site] = frozenset(),
                   case_margin: float = MIN_MARGIN) -> float:
    """-log2 of the batch's least distance to a new regression case (fuzz.search.misses.distance:
    bigger = closer), outside the `closed` sites of known signatures; TARGET_CAP when a prompt
    shows a new signature past `case_margin` (the margin a case needs: fuzz.shrink.robustness);
    known-signature failures and inconclusive runs score nothing."""
    if any(r.new and passes_margin(r.verdict, case_margin) for r in results):
        return TARGET_CAP
    worst = min((distance(r.verdict, closed, case_margin) for r in results), default=math.inf)
    if math.isinf(worst):
        return -TARGET_CAP
    if worst <= 0:
        return TARGET_CAP
    return max(-TARGET_CAP, min(TARGET_CAP, -math.log2(worst)))


def is_saturated(counts: ModeCounts, probe: int = SATURATION_PROBE) -> bool:
    """Every prompt so far (at least `probe`) failed under one known signature at the BOS
    position: nothing this mode screens can reach a content position."""
    if counts.examples < probe or len(counts.known) != 1:
        return False
    [(sig, hits)] = counts.known.items()
    return sig.at_bos and hits == counts.examples


def round_strategy(fresh: st.SearchStrategy[str], pool: Sequence[str],
                   proposed: Sequence[str] = (),
                   on_draw: Optional[Callable[[str, str], None]] = None
                   ) -> st.SearchStrategy[str]:
    """Half fresh draws, half stacked edits of `pool` (the mode's nearest misses and the seed
    prompts, read at each draw: pass `Search.live_pool`; splices of fresh fragments while it is
    empty); with `proposed` (gradient-guided swaps of the nearest misses,
    fuzz.search.proposals), a third arm that screens those prompts as they are. `on_draw` hears
    which pool prompt each mutant came from (Search.note_draw)."""
    arms = [fresh, mutants(pool, on_draw)] + \
        ([st.sampled_from(tuple(proposed))] if proposed else [])
    return st.one_of(*arms)


@dataclass
class Search:
    """Searches one (policy, BOS mode) until its round ends or a new signature is found."""

    session: Session
    policy: str
    add_bos: bool
    known: set[Signature]
    summary: PolicySummary  # this policy's counts and nearest misses, shared by every round
    deadline: float  # time.monotonic() when the round ends (unless a shrink is in progress)
    shrink_deadline: float = math.inf  # when a shrink in progress must give up
    shrink_limit_s: float = math.inf  # the most a shrink may take from its first failure
    on_batch: Optional[Callable[[], None]] = None  # progress callback
    # The shortest failing prompt seen so far per new signature: what is saved when Hypothesis
    # had no time to finish shrinking.
    pending: dict[Signature, NewSignature] = field(default_factory=dict)
    saturated: bool = False
    # This mode's nearest misses at sites with no known signature (fuzz.search.misses), kept across
    # rounds by the caller; when not given, started from the summary's nearest misses.
    misses_pool: Optional[MissPool] = None
    # What the mutants edit: misses_pool's prompts, updated in place after every batch that raised
    # nothing, frozen once a failure is pending so that Hypothesis's replays of the failing
    # choice sequence draw the same prompt (a pool read once per round left the first round
    # without mutants: docs/SEARCH.md, "The live pool").
    live_pool: list[str] = field(default_factory=list)
    # The user's seed prompts (fuzz run --seed-prompts): always in the pool the mutants edit.
    seeds: Sequence[str] = ()
    # prompt text -> the seed (its "file:line") it grew from, kept by the caller across rounds
    # and modes: a seed is its own origin, a mutant inherits its base's (note_draw)
    origins: dict[str, str] = field(default_factory=dict)
    # new signature -> the seed the first prompt failing under it grew from
    grew_from: dict[Signature, str] = field(default_factory=dict)

    # time.monotonic() when the round's first failure was seen: its shrink's limit starts there
    _shrink_since: Optional[float] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.misses_pool is None:
            self.misses_pool = MissPool(min_margin=self.case_margin)
            for verdict in self.summary.nearest_misses:
                if verdict.add_bos == self.add_bos:
                    self.misses_pool.offer(verdict)
        self.misses_pool.min_margin = self.case_margin  # one mode's pool: one policy's margin
        self.misses_pool.close(closed_sites(self.known, self.policy, self.add_bos,
                                            self.session.model.config.num_hidden_layers))
        self.live_pool[:] = self.pool()

    @property
    def closed(self) -> frozenset[Site]:
        """The content sites of the mode's known signatures: steering looks past them."""
        return self.misses_pool.closed

    def shrink_over(self, now: float) -> bool:
        since = self._shrink_since
        return now > self.shrink_deadline or (since is not None and
                                               now > since + self.shrink_limit_s)

    @property
    def counts(self) -> ModeCounts:
        return self.summary.mode(self.add_bos)

    def pool(self) -> list[str]:
        """This mode's nearest misses at open sites, closest first, then the seed prompts: what
        the mutants edit."""
        misses = self.misses_pool.prompts()
        return misses + [s for s in self.seeds if s not in misses]

    def note_draw(self, base: str, mutant: str) -> None:
        """A mutant of `base` inherits the seed `base` grew from (if any)."""
        origin = self.origins.get(base)
        if origin is not None:
            self.origins.setdefault(mutant, origin)

    def misses(self) -> list[Verdict]:
        return self.misses_pool.verdicts()

    def check(self, texts: list[str]) -> None:
        """The property: no prompt in the batch shows an unknown signature past the margin."""
        now = time.monotonic()
        if not self.pending and now > self.deadline:
            raise RoundOver
        if self.pending and self.shrink_over(now):
            raise BudgetExhausted
        specs = self.runnable_specs(texts)
        if not specs:
            return
        # Once a failure is being shrunk, candidates need run no further than its step.
        cap = max((e.screened.verdict.first_nonfinite.step for e in self.pending.values()),
                  default=None)
        results = self.screen(specs, self.session.capped(cap) if cap is not None else None)
        target(steering_score(results, self.closed, self.case_margin), label=self.policy)
        if self.on_batch:
            self.on_batch()
        for spec, r in zip(specs, results):
            if r.new and not self.counts_as_finding(r):
                self.summary.observe_marginal(r.verdict)
            elif r.new:
                err = error_for(r.signature)(r, spec)
                if spec.text in self.origins:
                    self.grew_from.setdefault(r.signature, self.origins[spec.text])
                best = self.pending.get(r.signature)
                if best is None or len(spec.text) < len(best.spec.text):
                    self.pending[r.signature] = err
                if self._shrink_since is None:
                    self._shrink_since = time.monotonic()
                raise err
        if not self.pending and is_saturated(self.counts):
            self.saturated = True
            raise RoundOver
        if not self.pending:
            self.live_pool[:] = self.pool()

    @property
    def case_margin(self) -> float:
        """This mode's Session.case_margin."""
        return self.session.case_margin(self.policy)

    def counts_as_finding(self, r: Screened) -> bool:
        return passes_margin(r.verdict, self.case_margin)

    def runnable_specs(self, texts: list[str]) -> list[PromptSpec]:
        """Over-long prompts and (without BOS) the empty prompt cannot run: leave them out."""
        specs = [PromptSpec(t, add_bos=self.add_bos) for t in texts]
        return [s for s in specs if self.session.runnable(s)]

    def screen(self, specs: list[PromptSpec], bounds: Optional[Bounds] = None) -> list[Screened]:
        """Screens a batch and counts every verdict into the policy's summary."""
        results = self.session.screen(specs, self.policy, self.known, bounds)
        for r in results:
            self.summary.observe(r.verdict, r.signature, r.new)
            self.misses_pool.offer(r.verdict)
        return results

    def run(self, prompts: st.SearchStrategy[str], max_examples: int,
            database: Optional[ExampleDatabase], digest: bytes,
            seed: Optional[int] = None, first: Sequence[Sequence[str]] = ()
            ) -> list[NewSignature]:
        """One Hypothesis run (a round); returns the minimal example of every new signature it
        found. `first`: batches screened before anything is drawn (Hypothesis's explicit
        examples: the seed prompts, in a mode's first round). Ends early at the round's deadline,
        or when the mode proves saturated."""
        batch = st.lists(prompts, min_size=1, max_size=self.session.batch_size)

        def prompts_stay_finite(texts: list[str]) -> None:
            self.check(texts)

        # Distinct database keys per model/policy/BOS mode (Hypothesis keys by function digest).
        prompts_stay_finite._hypothesis_internal_add_digest = digest  # type: ignore[attr-defined]
        test = settings(
            max_examples=max_examples, deadline=None, database=database, derandomize=False,
            phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
            suppress_health_check=list(HealthCheck), report_multiple_bugs=True,
            print_blob=False,
        )(given(batch)(prompts_stay_finite))
        for texts in reversed(first):  # example() decorators run bottom-up: keep their order
            test = example(list(texts))(test)
        test = seeded(test, seed, database)
        try:
            # The job reports findings itself; Hypothesis's "Falsifying example" / "@seed(...)"
            # lines would only interleave with the progress line.
            with with_reporter(lambda *_: None):
                test()
        except RoundOver:
            return []
        except NewSignature as err:
            return [err]
        except Flaky:  # a replay met a pool that had changed since (live_pool): keep what failed
            if not self.pending:  # nothing of ours failed: a flaky engine, which must be seen
                raise
            return list(self.pending.values())
        except BaseExceptionGroup as group:  # several signatures, each shrunk on its own
            matched, rest = group.split(NewSignature)
            if rest is not None:
                raise rest from None
            return list(_leaves(matched))
        return []


def seeded(test: Callable, seed: Optional[int], database: Optional[ExampleDatabase]) -> Callable:
    """The round's draws made reproducible from `seed` without giving up the database:
    hypothesis.seed() switches the database off (it sets database=None, so a failure found by
    one run or machine would never be replayed by the next), so with a database the seed goes to
    the generator Hypothesis draws each test's own seed from instead."""
    if seed is None:
        return test
    if database is None:
        return hypothesis_seed(seed)(test)
    local = getattr(hypothesis.core, "threadlocal", None)  # Hypothesis 6.1xx
    if local is not None and hasattr(local, "_hypothesis_global_random"):
        local._hypothesis_global_random = random.Random(seed)
    return test


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
