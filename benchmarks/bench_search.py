"""Search effectiveness on planted float16 overflows whose minimal trigger is known.

Models: fuzz.engine.planted's digit-run family: a tiny synthetic Gemma 3 that overflows in
float16 (BOS on) exactly on a run of >= RUN consecutive digit tokens, finite in bfloat16/float32;
its minimal triggers are the prompts of exactly RUN digits. Random prompts rarely hold long runs,
while max |x| grows with every digit in the window (headroom is a gradient).

For each RUN and each of SEEDS seeds, two searchers, each from an empty corpus and no example
database (a cold start), policy float16, BOS on, batch 8, 40-example rounds (`fuzz run`'s
defaults), until the first finding or the per-run budget:
  random    Hypothesis generation only: fuzz.search.Search with `target()` disabled (no
            observations, so Hypothesis's target phase has nothing to climb);
  targeted  fuzz.search.Search exactly as `fuzz run` uses it (target() on -log2(headroom)).
Figures: prompts screened and seconds until the first failing batch (before shrinking), and
whether the saved case (after Hypothesis's shrink and Session.finalize: text minimizer and
explanation) is a minimal trigger. Targets: targeted median <= 1/3 of random's; >= 90% minimal.

Only the BOS-on mode is searched: without BOS the family's minimal trigger is a single digit
(see fuzz.engine.planted), which every searcher finds at once; `fuzz run` would alternate modes.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from _common import print_header, print_table
from hypothesis.reporting import with_reporter

import fuzz.search
from fuzz.engine.planted import digit_run_model, is_minimal_trigger, longest_digit_run
from fuzz.generate import Bounds
from fuzz.search import NewSignature, Search, Stats
from fuzz.session import Session
from fuzz.strategies import prompts

POLICY = "float16"
MODES = ("random", "targeted")


@dataclass
class RunResult:
    mode: str
    run: int
    seed: int
    found: bool
    prompts: int  # prompts screened until the first failing batch (or until the budget ran out)
    batches: int  # Hypothesis examples (batches) until then
    seconds: float  # until the first failing batch
    total_seconds: float  # including Hypothesis's shrink and Session.finalize
    first_text: str = ""  # the first failing prompt, as drawn
    saved_text: str = ""  # after shrink + finalize
    minimal: bool = False


class _FirstFinding(Search):
    """Search that notes the counters at its first failing batch (before any shrinking)."""

    first: tuple[int, int, float, str] | None = None
    batches: int = 0
    started: float = 0.0

    def check(self, texts: list[str]) -> None:
        try:
            super().check(texts)
        except NewSignature as err:
            if _FirstFinding.first is None:
                _FirstFinding.first = (self.stats.examples, _FirstFinding.batches,
                                       time.perf_counter() - _FirstFinding.started, err.spec.text)
            raise


@contextlib.contextmanager
def targeting(enabled: bool) -> Iterator[None]:
    """Disables fuzz.search's `target()` calls for the random searcher (no file is edited)."""
    original = fuzz.search.target
    if not enabled:
        fuzz.search.target = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fuzz.search.target = original


def search_once(session: Session, mode: str, run: int, seed: int, budget_s: float,
                round_examples: int) -> RunResult:
    stats = Stats()
    strategy = prompts(max_chars=4 * session.bounds.max_prompt_tokens)  # as fuzz run draws
    _FirstFinding.first, _FirstFinding.batches = None, 0
    _FirstFinding.started = time.perf_counter()
    deadline = time.monotonic() + budget_s
    found: list[NewSignature] = []
    digest = hashlib.sha256(f"{session.model.fingerprint}/{POLICY}/bos=True".encode()).digest()
    with targeting(mode == "targeted"), with_reporter(lambda *_: None):
        for round_index in range(10_000):
            if time.monotonic() > deadline or found:
                break
            search = _FirstFinding(session, POLICY, True, set(), stats, deadline,
                                   on_batch=_count_batch)
            found = search.run(strategy, round_examples, None, digest,
                               seed=seed * 1000 + round_index)
    if not found:
        return RunResult(mode, run, seed, False, stats.examples, _FirstFinding.batches,
                         budget_s, time.perf_counter() - _FirstFinding.started)
    err = found[0]
    saved, _ = session.finalize(err.spec, POLICY, err.screened.signature,
                                err.screened.verdict.first_nonfinite.step)
    prompts_n, batches, seconds, first_text = _FirstFinding.first
    return RunResult(mode, run, seed, True, prompts_n, batches, seconds,
                     time.perf_counter() - _FirstFinding.started, first_text, saved.text,
                     is_minimal_trigger(saved.text, run))


def _count_batch() -> None:
    _FirstFinding.batches += 1


def summarize(results: list[RunResult], runs: list[int]) -> None:
    print("\n## Summary (median over seeds; a run that found nothing counts as +inf)")
    rows = []
    medians: dict[tuple[int, str], float] = {}
    for run in runs:
        for mode in MODES:
            rs = [r for r in results if r.run == run and r.mode == mode]
            if not rs:
                continue
            prompts_n = [r.prompts if r.found else math.inf for r in rs]
            seconds = [r.seconds if r.found else math.inf for r in rs]
            found = [r for r in rs if r.found]
            medians[(run, mode)] = statistics.median(prompts_n)
            rows.append((run, mode, f"{len(found)}/{len(rs)}", statistics.median(prompts_n),
                         min(prompts_n), max(prompts_n), statistics.median(seconds),
                         statistics.median([r.total_seconds for r in rs]),
                         f"{sum(r.minimal for r in found)}/{len(found)}"))
    print_table(["run", "searcher", "found", "median prompts", "min", "max", "median s to 1st",
                 "median s total", "saved minimal"], rows)
    print()
    for run in runs:
        a, b = medians.get((run, "random")), medians.get((run, "targeted"))
        if a is None or b is None:
            continue
        ratio = b / a if math.isfinite(a) and a > 0 else math.nan
        verdict = "meets" if ratio <= 1 / 3 else "MISSES"
        print(f"run {run}: targeted/random median prompts = {b:.0f}/{a:.0f} = {ratio:.2f} "
              f"({verdict} the <= 0.33 target)")
    found = [r for r in results if r.found]
    if found:
        share = sum(r.minimal for r in found) / len(found)
        print(f"saved cases that are exactly a minimal trigger: {sum(r.minimal for r in found)}"
              f"/{len(found)} = {share:.0%} ({'meets' if share >= 0.9 else 'MISSES'} the 90% "
              "target)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one run length, 10 seeds, short budget (~2-3 minutes)")
    parser.add_argument("--runs", default=None,
                        help="comma-separated digit-run lengths (default 24,48; quick: 32)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per search before giving up (default 20; quick: 6)")
    parser.add_argument("--round-examples", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    runs = [int(x) for x in (args.runs or ("32" if args.quick else "24,48")).split(",")]
    budget = args.budget if args.budget is not None else (6.0 if args.quick else 20.0)
    print_header("search effectiveness on planted digit-run float16 overflows "
                 f"(runs {runs}, {args.seeds} seeds, budget {budget:.0f}s per search, "
                 f"batch {args.batch_size}, {args.round_examples}-example rounds)")
    print("# searchers: random = Hypothesis generation, target() disabled; targeted = "
          "fuzz.search.Search as `fuzz run` uses it. float16, BOS on, cold start.")
    results = []
    for run in runs:
        session = Session(digit_run_model(run), bounds=Bounds(), batch_size=args.batch_size)
        print(f"\n## run {run}: {session.model.name} (minimal trigger: {run} digits)")
        print_table(["searcher", "seed", "found", "prompts", "batches", "s to 1st", "s total",
                     "first failing prompt (longest digit run)", "saved case", "minimal"], [])
        for seed in range(args.seeds):
            for mode in MODES:
                r = search_once(session, mode, run, seed, budget, args.round_examples)
                results.append(r)
                first = (f"{r.first_text[:40]!r} ({longest_digit_run(r.first_text)})"
                         if r.found else "-")
                print(f"| {mode} | {seed} | {r.found} | {r.prompts} | {r.batches} | "
                      f"{r.seconds:.2f} | {r.total_seconds:.2f} | {first} | "
                      f"{r.saved_text!r} | {r.minimal} |")
                sys.stdout.flush()
    summarize(results, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
