"""Kernel-robust findings: does a failure hold under every kernel variation this machine offers?

Near the float16 limit a verdict depends on the reduction order of the matmul kernels: the number
of rows (one prompt alone: gemv; a batch: gemm), the thread count, the CPU model, the GPU
(docs/NUMERICS.md: a case saved 0.5% past 65504 failed on one machine and not on the next). A
regression case must hold on every machine, so a finding becomes one only if

- it is non-finite with the same signature under every variation the suite can produce here:
  alone and inside a mixed batch (other rows of other lengths, so the prompt is padded and the
  kernels see other shapes), with 1 thread and with all threads, with torch's native float16
  matmuls and with float32-accumulated ones (fuzz.engine.kernels: how a CPU with avx512_fp16
  imitates one without, measured), and on the GPU and the CPU when the session runs on a GPU;
  and
- its margin (the unrounded sum over the dtype's limit, fuzz.probe) is at least MIN_MARGIN in
  every variation: another CPU's kernel cannot be imitated here, and flips seen across machines
  were within 0.5%.

A finding that fails only some of this is *marginal*: the report lists it with its margin and
why; it is not saved as a regression case.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from fuzz.engine.kernels import kernel
from fuzz.margin import Margin, measure, passes_margin
from fuzz.precision import get_policy
from fuzz.shrink.minimize import Minimized, minimize_text, not_minimized
from fuzz.verdict import Bounds, PromptSpec, Signature, Verdict

if TYPE_CHECKING:
    from fuzz.session import Session

# Rows that share the batch with the prompt in the "batched" variations: a short one, a long one
# (so the prompt itself gets left padding), one in between. What they compute does not matter:
# rows never see each other (per-row masks, zeroed padding K/V).
FILLERS = (
    "Hello",
    "The quick brown fox jumps over the lazy dog, then it runs 3 miles north and 4 east: "
    "how far is it from where it started?",
    "def add(a, b):\n    return a + b",
)


@dataclass(frozen=True)
class Variation:
    """One way to run a prompt: alone or batched, with a thread count (CPU), on a device, with
    a matmul kernel (fuzz.engine.kernels)."""

    batched: bool
    threads: Optional[int]  # None: leave the thread count as it is (GPU runs)
    device: str
    kernel: str = "native"

    @property
    def name(self) -> str:
        where = "batched" if self.batched else "alone"
        threads = "" if self.threads is None else f", {self.threads} thread" + \
            ("s" if self.threads != 1 else "")
        kernel = "" if self.kernel == "native" else f", {self.kernel}"
        return f"{where}{threads}, {self.device}{kernel}"


@dataclass(frozen=True)
class Outcome:
    """What one variation gave."""

    variation: str
    status: str  # finite | nonfinite | inconclusive
    signature: Optional[Signature]
    where: str  # "step S layer L site" or ""
    margin: Optional[float]

    def to_dict(self) -> dict:
        return {"variation": self.variation, "status": self.status, "where": self.where,
                "margin": self.margin}


@dataclass(frozen=True)
class Robustness:
    """The verdict over every variation: robust, or marginal and why."""

    outcomes: tuple[Outcome, ...]
    robust: bool
    reason: str  # "" when robust
    margin: Optional[float]  # the least margin over the variations (None: none measured)
    cut: bool = False  # the deadline came before every variation ran: not judged, not robust

    def to_dict(self) -> dict:
        return {"robust": self.robust, "reason": self.reason, "margin": self.margin,
                "cut": self.cut, "variations": [o.to_dict() for o in self.outcomes]}


def thread_counts() -> list[int]:
    """1 and all of the machine's cores (at least 2): the extremes of the reduction order."""
    return sorted({1, max(2, os.cpu_count() or 1)})


def variations(device: str = "cpu", engine: str = "builtin") -> list[Variation]:
    """Every variation to run for a session on `device` with `engine`: the canonical one (alone,
    all threads, that device) first. The float32-accumulating kernel exists only in the
    built-in engine."""
    most = thread_counts()[-1]
    cpu = [Variation(batched, threads, "cpu") for batched in (False, True)
           for threads in reversed(thread_counts())]
    if engine == "builtin":
        cpu += [Variation(batched, most, "cpu", "fp32-accumulate") for batched in (False, True)]
    if not device.startswith("cuda"):
        return cpu
    return [Variation(False, None, device), Variation(True, None, device), *cpu]


@contextlib.contextmanager
def num_threads(n: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to n for the block (process-wide), then restored."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_variation(session: Session, spec: PromptSpec, policy: str, variation: Variation,
                  bounds: Bounds) -> Verdict:
    """The prompt's verdict under one variation (its own row of a batch when batched)."""
    batch = [spec]
    if variation.batched and session.supports_padding:
        fillers = [PromptSpec(t, spec.add_bos, spec.chat) for t in FILLERS]
        batch = [f for f in fillers[:1] if session.runnable(f)] + [spec] + \
            [f for f in fillers[1:] if session.runnable(f)]
    with num_threads(variation.threads), kernel(variation.kernel):
        verdicts = session.run_on(batch, policy, bounds, variation.device, batch_size=len(batch))
    return verdicts[batch.index(spec)]


def check_robustness(session: Session, spec: PromptSpec, policy: str, signature: Signature,
                     bounds: Optional[Bounds] = None, deadline: float = math.inf) -> Robustness:
    """Runs every variation (bounds capped by the caller, e.g. to the failing step) and says
    whether the finding is a regression case every machine will reproduce. No variation starts
    at or after `deadline` (a time.monotonic() value): what the deadline cut is not robust, and
    says so (`Robustness.cut`)."""
    bounds = bounds or session.bounds
    outcomes: list[Outcome] = []
    planned = variations(session.device, session.engine_kind)
    for variation in planned:
        if time.monotonic() >= deadline:
            return cut_short(tuple(outcomes), len(planned))
        v = run_variation(session, spec, policy, variation, bounds)
        sig = session.signature(v)
        outcomes.append(Outcome(variation.name, v.status, sig, v.where, v.margin))
    return judge(tuple(outcomes), signature, session.min_margin)


def least_margin(outcomes: tuple[Outcome, ...]) -> Optional[float]:
    return min((o.margin for o in outcomes if o.margin is not None), default=None)


def cut_short(outcomes: tuple[Outcome, ...], planned: int) -> Robustness:
    return Robustness(outcomes, False, f"cut by the budget after {len(outcomes)} of {planned} "
                      "kernel variations", least_margin(outcomes), cut=True)


def judge(outcomes: tuple[Outcome, ...], signature: Signature, min_margin: float) -> Robustness:
    least = least_margin(outcomes)
    for o in outcomes:
        if o.status != "nonfinite":
            return Robustness(outcomes, False, f"{o.status} {o.variation}", least)
        if o.signature != signature:
            return Robustness(outcomes, False, f"first site moves to {o.where} {o.variation}",
                              least)
    if least is not None and least < min_margin:
        return Robustness(outcomes, False, f"margin {least:.4f} < {min_margin}", least)
    return Robustness(outcomes, True, "", least)


@dataclass
class Assessment:
    """A failing prompt measured for the corpus: its explained verdict under the full bounds,
    its margin (with the float32 magnitude) and its kernel robustness."""

    spec: PromptSpec
    verdict: Verdict
    margin: Optional[Margin]
    robustness: Robustness
    # How far minimizing got (fuzz.shrink.minimize.Minimized.record, or not_minimized(why));
    # None: a prompt measured as it was given (`fuzz add`)
    minimization: Optional[dict[str, Any]] = None

    @property
    def robust(self) -> bool:
        return self.robustness.robust


def assess(session: Session, spec: PromptSpec, policy: str,
           bounds: Optional[Bounds] = None, deadline: float = math.inf) -> Assessment:
    """Explains the failure (channel and terms), measures its margin against a float32 run fed
    the same tokens, and runs every kernel variation (the full bounds: what replay will run)
    until `deadline` (fuzz.search.schedule: the job's budget is hard)."""
    bounds = bounds or session.bounds
    verdict = session.check(spec, policy, bounds)
    if not verdict.nonfinite:
        none = Outcome("alone", verdict.status, None, "", None)
        return Assessment(spec, verdict, None, Robustness((none,), False, verdict.status, None))
    f32 = session.engine(get_policy("float32"))  # the session's engine: the finding's
    sig = session.signature(verdict)
    return Assessment(spec, verdict, measure(verdict, f32),
                      check_robustness(session, spec, policy, sig, bounds, deadline))


def finalize(session: Session, spec: PromptSpec, policy: str, sig: Signature, step: int,
             deadline: float = math.inf, measure_deadline: float = math.inf) -> Assessment:
    """The case to save for a finding: minimized while it keeps its signature and its margin
    (bounds cut to the failing step while minimizing; minimizing stops at `deadline`, a
    time.monotonic() value), then assessed under the full bounds, every kernel variation
    included, until `measure_deadline`. A prompt whose own margin falls short is assessed as
    it is.

    Why the variations are checked once, at the end, and not on every deletion: checked on
    every accepted deletion they took 54-79% of minimizing three real findings of Gemma 3 270M
    (float16 without BOS, 2-core AMD EPYC: 30-53 s of 56-67 s, 5-13 checks of 6 runs each), while
    a prompt that keeps its margin nearly always keeps every variation (prefill flips were
    measured only below a margin of 1.010, MIN_MARGIN). When the minimized prompt does not
    hold everywhere, the last deletion that still did is found by bisection, and minimizing goes
    on from there checking every deletion (`_minimize_carefully`): what is saved holds
    everywhere either way."""
    capped = session.capped(step)
    start = session.run([spec], policy, capped)[0]
    if not (start.nonfinite and session.signature(start) == sig
            and passes_margin(start, session.min_margin)):
        short = assess(session, spec, policy, deadline=measure_deadline)
        return dataclasses.replace(short, minimization=not_minimized(
            "under its failing step's bounds it does not fail alone past the case margin"))
    trail = [spec]  # every prompt minimizing accepted, the finding first

    def keeps_margin(candidate: PromptSpec, alone: Verdict) -> bool:
        if passes_margin(alone, session.min_margin):
            trail.append(candidate)
            return True
        return False

    minimized = minimize_text(session, spec, policy, sig, capped, keeps=keeps_margin,
                              deadline=deadline, found=start)
    assessment = assess(session, minimized.spec, policy, deadline=measure_deadline)
    if assessment.robust or assessment.robustness.cut or len(trail) == 1:
        return dataclasses.replace(assessment, minimization=minimized.record())
    careful = _minimize_carefully(session, trail[:-1], policy, sig, capped, deadline)
    if careful is None:  # the finding itself does not hold everywhere: measured as it was
        return dataclasses.replace(assess(session, spec, policy, deadline=measure_deadline),
                                   minimization=not_minimized("it does not hold under every "
                                                              "kernel variation"))
    careful = dataclasses.replace(careful, start_chars=len(spec.text))
    return dataclasses.replace(assess(session, careful.spec, policy, deadline=measure_deadline),
                               minimization=careful.record())


def _minimize_carefully(session: Session, trail: list[PromptSpec], policy: str, sig: Signature,
                        bounds: Bounds, deadline: float) -> Optional[Minimized]:
    """From the last prompt of `trail` (minimizing's accepted prompts in order, the finding
    first) that holds under every variation, found by bisection (a deletion rarely makes a
    flip go away again), minimizes on, checking every deletion under every variation; None
    when the finding itself does not hold (checked first: it is the usual case, a marginal
    finding)."""

    def robust(candidate: PromptSpec) -> bool:
        return check_robustness(session, candidate, policy, sig, bounds, deadline).robust

    if not robust(trail[0]):  # the finding itself is marginal: nothing to bisect
        return None
    good, bad = 0, len(trail)  # trail[good] holds, trail[bad] does not (the end: minimized)
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if robust(trail[middle]) else (good, middle)

    def holds(candidate: PromptSpec, alone: Verdict) -> bool:
        return passes_margin(alone, session.min_margin) and robust(candidate)

    return minimize_text(session, trail[good], policy, sig, bounds, keeps=holds,
                         deadline=deadline)
