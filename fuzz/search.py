"""The search: Hypothesis generates batches of prompts, the model screens them, new signatures fail.

One Hypothesis run searches one (policy, BOS mode). An example is a LIST of prompts screened in one
batched generation (batching amortises reading the weights, docs/NUMERICS.md); the example fails
when a prompt shows a signature that is not known yet. Each signature raises its own exception
class, so Hypothesis treats each as a separate bug and shrinks each to its own minimal example (a
list of one minimal prompt). Only those final, shrunk examples are returned by `Search.run`: the
intermediate ones never reach the corpus.

Steering: every example reports `hypothesis.target()` on -log2(content headroom) — how close the
batch came to the dtype's limit, away from the BOS sink every prompt shares — so Hypothesis's
targeted phase climbs toward an overflow; between rounds, `mutate_nearest` screens small edits
of the nearest misses (a fuzzer's mutation stage).
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from hypothesis import HealthCheck, Phase, given, settings, target
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.database import ExampleDatabase

from .corpus import Signature
from .generate import Bounds, PromptSpec
from .precision import get_policy
from .report import PolicySummary
from .robustness import describe_where, passes_margin
from .session import Screened, Session
from .verdict import Verdict

TARGET_CAP = 16.0  # score given to a non-finite batch (headroom 0): above any finite score


SHRINK_GRACE_S = 120.0  # how far past the budget a shrink in progress may run


class BudgetExhausted(BaseException):
    """Raised from inside a Hypothesis run (a BaseException, so Hypothesis lets it through
    instead of treating it as a failure to shrink) when a shrink outlives the budget's grace."""


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


def headroom_score(verdicts: list[Verdict]) -> float:
    """-log2 of the smallest content headroom in the batch (bigger = closer to overflow)."""
    worst = min((v.min_headroom(content_only=True) for v in verdicts), default=math.inf)
    if worst <= 0:
        return TARGET_CAP
    if math.isinf(worst):
        return -TARGET_CAP
    return max(-TARGET_CAP, min(TARGET_CAP, -math.log2(worst)))


@dataclass
class Search:
    """Searches one (policy, BOS mode) until a new signature is found or the round ends."""

    session: Session
    policy: str
    add_bos: bool
    known: set[Signature]
    summary: PolicySummary  # this policy's counts and nearest misses, shared by every round
    deadline: float  # time.monotonic() after which examples return at once
    on_batch: Optional[Callable[[], None]] = None  # progress callback
    # The shortest failing prompt seen so far per new signature: what an interrupted run saves
    # when Hypothesis had no time to finish shrinking.
    pending: dict[Signature, NewSignature] = field(default_factory=dict)

    def check(self, texts: list[str]) -> None:
        """The property: no prompt in the batch shows an unknown signature."""
        now = time.monotonic()
        if now > self.deadline and not self.pending:
            return  # out of budget: the remaining examples of this round cost nothing
        if now > self.deadline + SHRINK_GRACE_S:
            raise BudgetExhausted  # the caller saves the shortest failing prompt per signature
        specs = self.runnable_specs(texts)
        if not specs:
            return
        # Once a failure is being shrunk, candidates need run no further than its step.
        cap = max((e.screened.verdict.first_nonfinite.step for e in self.pending.values()),
                  default=None)
        bounds = self.session.capped(cap) if cap is not None else None
        results = self.screen(specs, bounds)
        target(headroom_score([r.verdict for r in results]), label=self.policy)
        if self.on_batch:
            self.on_batch()
        for spec, r in zip(specs, results):
            if r.new and not self.counts_as_finding(r):
                self.summary.observe_marginal(r.verdict, describe_where(r.verdict))
            elif r.new:
                err = error_for(r.signature)(r, spec)
                best = self.pending.get(r.signature)
                if best is None or len(spec.text) < len(best.spec.text):
                    self.pending[r.signature] = err
                raise err

    def counts_as_finding(self, r: Screened) -> bool:
        """A new signature fails the property when a regression case could come of it: under
        a policy declared safe always (any non-finite value there is a regression), under an
        unsafe one only at a margin past the limit that other kernels will reproduce
        (fuzz.robustness): otherwise Hypothesis would shrink toward the edge of the limit."""
        return get_policy(self.policy).expected_safe or \
            passes_margin(r.verdict, self.session.min_margin)

    def runnable_specs(self, texts: list[str]) -> list[PromptSpec]:
        """Over-long prompts and (without BOS) the empty prompt cannot run: leave them out."""
        specs = [PromptSpec(t, add_bos=self.add_bos) for t in texts]
        return [s for s in specs if self.session.runnable(s)]

    def screen(self, specs: list[PromptSpec], bounds: Optional[Bounds] = None) -> list[Screened]:
        """Screens a batch and counts every verdict into the policy's summary."""
        results = self.session.screen(specs, self.policy, self.known, bounds)
        for r in results:
            self.summary.observe(r.verdict, r.signature, r.new)
        return results

    def run(self, prompts: st.SearchStrategy[str], max_examples: int,
            database: Optional[ExampleDatabase], digest: bytes,
            seed: Optional[int] = None) -> list[NewSignature]:
        """One Hypothesis run; returns the minimal example of every new signature it found."""
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
        if seed is not None:
            test = hypothesis_seed(seed)(test)
        try:
            test()
        except NewSignature as err:
            return [err]
        except BaseExceptionGroup as group:  # several signatures, each shrunk on its own
            matched, rest = group.split(NewSignature)
            if rest is not None:
                raise rest from None
            return list(_leaves(matched))
        return []


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


# Small edits that move a near miss across the limit: digits and the punctuation and lone spaces
# that form secondary attention sinks (docs/NUMERICS.md: a lone "▁" before a digit, "," or ".").
MUTATION_PIECES = (" 0", " 1", " 7", "0", ",", ".", " ", "\n", " 0 0", " 30")


def mutate(text: str, rng: random.Random) -> str:
    """One random edit: insert a piece, delete a character, or append a piece."""
    i = rng.randrange(len(text) + 1)
    kind = rng.randrange(3)
    if kind == 0:
        return text[:i] + rng.choice(MUTATION_PIECES) + text[i:]
    if kind == 1 and len(text) > 1:
        return text[:i] + text[i + 1:]
    return text + rng.choice(MUTATION_PIECES)


def mutate_nearest(search: Search, rng: random.Random, parents: int = 4,
                   children: int = 4) -> list[NewSignature]:
    """Screens random edits of the nearest misses of `search`'s policy and BOS mode.

    Hypothesis's targeting climbs slowly when each example costs a generation: on Gemma 3 270M
    without BOS, random search stalled at headroom 1.01 for 700+ prompts, while edits of those
    near misses overflowed in 11 of 64 tries (measured). Returns new signatures (unshrunk: the
    caller minimizes them) and counts every result into the policy's summary as usual."""
    near = [v for v in search.summary.nearest_misses if v.add_bos == search.add_bos][:parents]
    specs = search.runnable_specs([mutate(v.prompt, rng) for v in near for _ in range(children)])
    if not specs:
        return []
    results = search.screen(specs)
    new: dict[Signature, NewSignature] = {}
    for spec, r in zip(specs, results):
        if r.new and not search.counts_as_finding(r):
            search.summary.observe_marginal(r.verdict, describe_where(r.verdict))
        elif r.new and r.signature not in new:
            new[r.signature] = NewSignature(r, spec)
    return list(new.values())
