"""Search effectiveness on planted float16 overflows whose minimal trigger is known.

Models: fuzz.engine.synthetic.planted's digit-run family: a tiny synthetic Gemma 3 that overflows in
float16 (BOS on) exactly on a run of >= RUN consecutive digit tokens, finite in bfloat16/float32;
its minimal triggers are the prompts of exactly RUN digits. Random prompts rarely hold long runs,
while max |x| grows with every digit in the window (headroom is a gradient).

For each RUN and each of N trials (--trials; seeds 0..N-1), each searcher starts cold (empty
corpus, a fresh example database as `fuzz run` keeps one) and searches policy float16, BOS on,
batch 8, 40-example rounds (`fuzz run`'s defaults) until its first finding or its budget,
drawing what `fuzz run` draws (fuzz.strategies.prompts with the model's vocabulary):
  random    Hypothesis generation only: fuzz.search.round.Search with `target()` disabled and fresh
            draws only (no observations, so Hypothesis's target phase has nothing to climb);
  targeted  target() on -log2(content headroom), fresh draws only;
  default   `fuzz run`'s search: targeted, and each round draws half its prompts as 1-3 stacked
            edits of the nearest misses so far (fuzz.search.round.round_strategy,
            fuzz.strategies.mutants), the pool read live (fuzz.search.round.Search.live_pool);
  gradient  default plus a third arm: gradient-guided single-token swaps of the two best new
            nearest misses per round (fuzz.search.proposals.Proposer), screened as they are;
  seeded    default with one seed prompt (`fuzz run --seed-prompts`): RUN - 1 digits, one edit
            from the trigger, screened first and kept in the mutants' pool.
Figures: prompts screened and seconds until the first failing batch (before shrinking), the
batches Hypothesis then screened while shrinking, and whether the saved case (after the shrink
and Session.finalize: text minimizer and explanation) is a minimal trigger. Targets: a searcher's
median <= 1/3 of random's; >= 90% of saved cases minimal. Per searcher, as FuzzBench reports a
fuzzer (benchmarks/_stats.py): the median prompts with its distribution-free 95% interval, and
against random the Vargha-Delaney A12 and the Mann-Whitney U test's two-sided p; a search that
found nothing within its budget counts as +inf prompts (worse than any that found, tied with the
others that did not: the statistics are rank-based, so only that order matters). --plot writes
the share of trials that had found by each number of prompts screened, per searcher.

Bounds: 1 new token by default (the planted overflow fires in the prefill, so decode steps add
time and change no finding); --max-new-tokens 16 gives fuzz run's bounds. The shrink is capped
(--shrink-batches) only to bound this benchmark's time; 0 lets it run to the end as fuzz run does.
Only BOS on is searched: without BOS the family's minimal trigger is one digit (see
fuzz.engine.synthetic.planted), which any searcher finds at once; `fuzz run` alternates both modes.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _common import OUT_DIR, print_header, print_table
from _stats import (
    Panel,
    compare,
    median_interval,
    require_scipy,
    share_curve,
    write_curves_png,
)
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.reporting import with_reporter

import fuzz.search.round
from fuzz.engine.synthetic.planted import (
    digit_run_model,
    is_minimal_trigger,
    longest_digit_run,
    minimal_trigger,
)
from fuzz.search.accounting import PolicySummary
from fuzz.search.proposals import Proposer
from fuzz.search.round import BudgetExhausted, NewSignature, RoundOver, Search, round_strategy
from fuzz.session import Session
from fuzz.shrink.robustness import finalize
from fuzz.strategies import prompts
from fuzz.verdict import Bounds, PromptSpec

POLICY = "float16"
SEARCHERS = ("random", "targeted", "default", "gradient", "seeded")
DEFAULT_PLOT = OUT_DIR / "bench_search.png"


@dataclass
class RunResult:
    searcher: str
    run: int
    seed: int
    found: bool
    prompts: int  # prompts screened until the first failing batch (or until the budget ran out)
    batches: int  # Hypothesis examples (batches) until then
    seconds: float  # until the first failing batch
    total_seconds: float  # including Hypothesis's shrink and Session.finalize
    rounds: int
    shrink_batches: int = 0  # batches Hypothesis screened while shrinking the first finding
    first_text: str = ""  # the first failing prompt, as drawn
    saved_text: str = ""  # after shrink + finalize
    minimal: bool = False


@dataclass
class Tracker:
    """Counters shared by every round of one search."""

    max_prompts: int
    max_shrink_batches: int  # 0: unlimited
    started: float = field(default_factory=time.perf_counter)
    batches: int = 0
    first: tuple[int, int, float, str] | None = None  # prompts, batches, seconds, prompt

    def count_batch(self) -> None:
        self.batches += 1

    def shrink_capped(self) -> bool:
        return (self.first is not None and self.max_shrink_batches > 0
                and self.batches - self.first[1] >= self.max_shrink_batches)


class _TrackedSearch(Search):
    """fuzz.search.round.Search plus: a prompt budget (so that counts do not depend on the machine's
    speed), the counters at the first failing batch (before any shrinking), and an optional cap
    on the batches Hypothesis may screen while shrinking (past it, every candidate passes
    unscreened, so Hypothesis ends with the smallest failure it has seen)."""

    tracker: Tracker

    def check(self, texts: list[str]) -> None:
        if self.summary.examples >= self.tracker.max_prompts and not self.pending:
            raise RoundOver  # out of budget, as Search does past its deadline
        if self.tracker.shrink_capped():
            return
        try:
            super().check(texts)
        except NewSignature as err:
            if self.tracker.first is None:
                self.tracker.first = (self.summary.examples, self.tracker.batches,
                                      time.perf_counter() - self.tracker.started, err.spec.text)
            raise


@contextlib.contextmanager
def targeting(enabled: bool) -> Iterator[None]:
    """Disables fuzz.search.round's `target()` calls for the random searcher (no file is edited)."""
    original = fuzz.search.round.target
    if not enabled:
        fuzz.search.round.target = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fuzz.search.round.target = original


def round_prompts(searcher: str, fresh: st.SearchStrategy[str], search: Search,
                  proposer: Proposer) -> st.SearchStrategy[str]:
    """random and targeted draw fresh prompts only; default is fuzz run's round strategy
    (half fresh, half stacked edits of the mode's nearest misses); gradient adds the swaps
    proposed for the nearest misses."""
    if searcher == "gradient":
        return round_strategy(fresh, search.live_pool, proposer.for_round(search.misses()))
    if searcher == "seeded":
        return round_strategy(fresh, search.live_pool, on_draw=search.note_draw)
    return round_strategy(fresh, search.live_pool) if searcher == "default" else fresh


def one_edit_away(run: int) -> str:
    """The seeded searcher's seed prompt: one digit short of the trigger (a near miss that one
    "repeat" or "duplicate" edit turns into it), as a user's prompt next to a bug would be."""
    return "0" * (run - 1)


def verify_plant(session: Session, run: int) -> str:
    """The model's contract, checked before searching: the minimal trigger overflows in float16
    only, and one digit fewer (alone or next to other text) is finite."""
    trigger, short = minimal_trigger(run), "9" * (run - 1)
    checks = {
        "trigger overflows in float16": not session.run([PromptSpec(trigger)], POLICY)[0].finite,
        "trigger finite in bfloat16/float32": all(
            session.run([PromptSpec(trigger)], p)[0].finite for p in ("bfloat16", "float32")),
        "one short finite in float16": all(
            v.finite for v in session.run([PromptSpec(short), PromptSpec(f"x {short} y")],
                                          POLICY)),
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise RuntimeError(f"{session.model.name}: planted contract broken: {failed}")
    return "; ".join(checks) + ": verified"



def search_once(session: Session, searcher: str, run: int, seed: int, budget_s: float,
                 max_prompts: int, round_examples: int, max_shrink_batches: int,
                 finalize_found: bool = True) -> RunResult:
    summary, tracker = PolicySummary.for_policy(POLICY), Tracker(max_prompts, max_shrink_batches)
    # as fuzz run draws: the default prompts plus pieces of the model's own vocabulary
    fresh = prompts(max_chars=4 * session.bounds.max_prompt_tokens,
                    vocabulary=session.model.tokenizer.vocabulary())
    deadline = time.monotonic() + budget_s
    found: list[NewSignature] = []
    digest = hashlib.sha256(f"{session.model.fingerprint}/{POLICY}/bos=True".encode()).digest()
    rounds = 0
    proposer = Proposer(session)
    with tempfile.TemporaryDirectory(prefix="bench-search-db-") as db_dir, \
            targeting(searcher != "random"), with_reporter(lambda *_: None):
        database = DirectoryBasedExampleDatabase(db_dir)  # fuzz run keeps one (cold here)
        while not found and time.monotonic() < deadline and summary.examples < max_prompts:
            seeds = [one_edit_away(run)] if searcher == "seeded" else []
            search = _TrackedSearch(session, POLICY, True, set(), summary, deadline,
                                    on_batch=tracker.count_batch, seeds=seeds,
                                    origins={s: "seed" for s in seeds})
            search.tracker = tracker
            try:
                found = search.run(round_prompts(searcher, fresh, search, proposer),
                                   round_examples,
                                   database, digest, seed=seed * 1000 + rounds,
                                   first=[seeds] if seeds and rounds == 0 else [])
            except BudgetExhausted:  # as fuzz run: a shrink outlived the grace; take its best
                found = list(search.pending.values())
            rounds += 1
    if not found:
        return RunResult(searcher, run, seed, False, summary.examples, tracker.batches,
                         time.perf_counter() - tracker.started,
                         time.perf_counter() - tracker.started, rounds)
    err = found[0]
    prompts_n, batches, seconds, first_text = tracker.first
    if not finalize_found:  # --first-only: the counts to the first failing batch are the figures
        return RunResult(searcher, run, seed, True, prompts_n, batches, seconds,
                         time.perf_counter() - tracker.started, rounds, 0, first_text)
    saved = finalize(session, err.spec, POLICY, err.screened.signature,
                     err.screened.verdict.first_nonfinite.step).spec
    return RunResult(searcher, run, seed, True, prompts_n, batches, seconds,
                     time.perf_counter() - tracker.started, rounds, tracker.batches - batches,
                     first_text, saved.text, is_minimal_trigger(saved.text, run))


def ratio_text(b: float, a: float, max_prompts: int) -> str:
    """b/a against the <= 1/3 target; a median past the budget is only known to exceed it."""
    if math.isinf(a) and math.isinf(b):
        return "undetermined (both medians are beyond the budget)"
    if math.isinf(b):
        return (f"(>{max_prompts})/{a:.0f} > {max_prompts / a:.2f} (MISSES the <= 0.33 target; "
                "this searcher's median is beyond the budget)")
    if math.isinf(a):
        bound = b / max_prompts
        verdict = "meets" if bound <= 1 / 3 else "undetermined against"
        return (f"{b:.0f}/(>{max_prompts}) < {bound:.2f} ({verdict} the <= 0.33 target; "
                "random's median is beyond the budget)")
    ratio = b / a
    return f"{b:.0f}/{a:.0f} = {ratio:.2f} ({'meets' if ratio <= 1 / 3 else 'MISSES'} the <= " \
           "0.33 target)"


def prompts_to_first(rs: list[RunResult]) -> list[float]:
    """Prompts screened until each trial's first finding; +inf for a search that found nothing
    within its budget (worse than any that found; rank-based statistics need only that order)."""
    return [r.prompts if r.found else math.inf for r in rs]


def summarize(results: list[RunResult], runs: list[int], searchers: list[str],
              shrink_cap: int, max_prompts: int, minimality: bool = True) -> None:
    print("\n## Summary (per searcher over its trials: median prompts to the first finding "
          "[distribution-free 95% interval]; a search that found nothing within its budget "
          f"counts as +inf, written >{max_prompts})")

    def fmt(v: float) -> str:
        return f">{max_prompts}" if math.isinf(v) else f"{v:g}"

    rows, versus_rows = [], []
    medians: dict[tuple[int, str], float] = {}
    for run in runs:
        baseline = prompts_to_first([r for r in results if r.run == run
                                     and r.searcher == "random"])
        for searcher in searchers:
            rs = [r for r in results if r.run == run and r.searcher == searcher]
            if not rs:
                continue
            prompts_n = prompts_to_first(rs)
            seconds = [r.seconds if r.found else math.inf for r in rs]
            found = [r for r in rs if r.found]
            median = median_interval(prompts_n)
            medians[(run, searcher)] = median.median
            rows.append((run, searcher, f"{len(found)}/{len(rs)}", median.text(fmt),
                         fmt(min(prompts_n)), fmt(max(prompts_n)), statistics.median(seconds),
                         statistics.median([r.total_seconds for r in rs]),
                         statistics.median([r.shrink_batches for r in found] or [0]),
                         sum(bool(shrink_cap) and r.shrink_batches >= shrink_cap for r in found),
                         f"{sum(r.minimal for r in found)}/{len(found)}",
                         f"{sum(r.saved_text == '0' * run for r in found)}/{len(found)}"))
            # fewer prompts is better: both samples negated, so A12 > 0.5 favours `searcher`
            versus = (compare([-v for v in prompts_n], [-v for v in baseline]).text()
                      if searcher != "random" and baseline else "-")
            versus_rows.append((run, searcher, " ".join(fmt(v) for v in prompts_n), versus))
    print_table(["run", "searcher", "found", "median prompts [95%]", "min", "max",
                 "median s to 1st", "median s total", "median shrink batches", "shrink capped",
                 "saved minimal", "saved = '0'*run"], rows)
    print("\nPrompts to the first finding per trial (seeds in order), and against random "
          "(A12: the chance that this searcher's trial needs fewer prompts than random's, "
          "ties half; U: this searcher's, on negated counts; p: two-sided Mann-Whitney):")
    print_table(["run", "searcher", "per seed", "vs random"], versus_rows)
    print()
    for run in runs:
        a = medians.get((run, "random"))
        for searcher in searchers:
            b = medians.get((run, searcher))
            if searcher == "random" or a is None or b is None:
                continue
            print(f"run {run}: {searcher}/random median prompts = {ratio_text(b, a, max_prompts)}")
    for searcher in searchers if minimality else []:  # --first-only measures no saved case
        found = [r for r in results if r.found and r.searcher == searcher]
        if found:
            n = sum(r.minimal for r in found)
            share = n / len(found)
            print(f"{searcher}: saved cases that are exactly a minimal trigger: {n}/{len(found)}"
                  f" = {share:.0%} ({'meets' if share >= 0.9 else 'MISSES'} the 90% target)")


def plot_found(results: list[RunResult], runs: list[int], searchers: list[str],
               max_prompts: int, path: Path) -> Path:
    """One panel per RUN: the share of trials that had found by each number of prompts
    screened, a line per searcher with its Wilson 95% interval shaded."""
    top = max([max_prompts] + [r.prompts for r in results if r.found])
    grid = list(range(top + 1))
    panels = []
    for run in runs:
        curves = {}
        for searcher in searchers:
            rs = [r for r in results if r.run == run and r.searcher == searcher]
            if rs:
                curves[f"{searcher} ({len(rs)} trials)"] = share_curve(
                    [r.prompts if r.found else None for r in rs], grid)
        panels.append(Panel("share of trials that found", curves,
                            f"tiny-digit-run-{run} (minimal trigger: {run} digits)"))
    return write_curves_png(path, panels, "Planted float16 overflow: trials that found it by "
                            "prompts screened (shaded: Wilson 95% interval)", "prompts screened")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="run 16 only, random and targeted, 400 prompts (~2-3 minutes "
                             "with 10 trials)")
    parser.add_argument("--runs", default=None,
                        help="comma-separated digit-run lengths (default 24; quick: 16)")
    parser.add_argument("--searchers", default=None,
                        help=f"comma-separated, of {', '.join(SEARCHERS)} (default all; "
                             "quick: random,targeted)")
    parser.add_argument("--trials", "--seeds", dest="trials", type=int, default=10,
                        help="trials per searcher and run, seeds 0..N-1 (default 10; --seeds N "
                             "is the older name of the same option)")
    parser.add_argument("--max-prompts", type=int, default=None,
                        help="prompts per search before giving up (default 1500; quick: 400)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per search before giving up: a safety net behind the "
                             "prompt budget (default 180; quick: 60)")
    parser.add_argument("--shrink-batches", type=int, default=None,
                        help="cap on batches screened while Hypothesis shrinks a finding, to "
                             "bound this benchmark's time (0: none, as fuzz run; default 1000; "
                             "quick: 300)")
    parser.add_argument("--first-only", action="store_true",
                        help="stop each search at its first failing batch: no shrink, no "
                             "minimizing (the prompt counts only; minimality is not measured)")
    parser.add_argument("--round-examples", type=int, default=40,
                        help="Hypothesis examples per round (default: fuzz run's, 40)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=1,
                        help="new tokens per prompt (default 1: the planted overflow fires in "
                             "the prefill, so decode steps add time but change no finding; "
                             "fuzz run's bound is 16)")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT,
                        help="PNG of the share of trials that found, by prompts screened "
                             "(default benchmarks/out/bench_search.png)")
    args = parser.parse_args(argv)
    require_scipy()
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")
    try:
        runs = [int(x) for x in (args.runs or ("16" if args.quick else "24")).split(",")]
    except ValueError:
        parser.error(f"--runs takes comma-separated integers (e.g. 24,40), got {args.runs!r}")
    searchers = (args.searchers or ("random,targeted" if args.quick else ",".join(SEARCHERS))
                 ).split(",")
    unknown = [s for s in searchers if s not in SEARCHERS]
    if unknown:
        parser.error(f"unknown searcher(s) {unknown}; valid: {', '.join(SEARCHERS)}")
    max_prompts = args.max_prompts or (400 if args.quick else 1500)
    budget = args.budget if args.budget is not None else (60.0 if args.quick else 180.0)
    shrink_cap = (args.shrink_batches if args.shrink_batches is not None
                  else (300 if args.quick else 1000))
    bounds = Bounds(max_new_tokens=args.max_new_tokens)
    print_header("search effectiveness on planted digit-run float16 overflows "
                 f"(runs {runs}, searchers {searchers}, {args.trials} trials, budget "
                 f"{max_prompts} prompts or {budget:.0f}s per search, batch {args.batch_size}, "
                 f"{args.round_examples}-example rounds, bounds {bounds.to_dict()}, shrink cap "
                 f"{shrink_cap or 'none'} batches)")
    print("# random = Hypothesis generation, target() disabled; targeted = with target(); "
          "default = fuzz run's search (targeted + nearest-miss edits). float16, BOS on, fresh "
          "example database per search.")
    results = []
    for run in runs:
        session = Session(digit_run_model(run), bounds=bounds, batch_size=args.batch_size)
        print(f"\n## run {run}: {session.model.name} (minimal trigger: {run} digits)")
        print(f"# {verify_plant(session, run)}")
        print_table(["searcher", "seed", "found", "prompts", "batches", "rounds", "s to 1st",
                     "s total", "shrink batches", "first failing prompt (longest digit run)",
                     "saved case", "minimal"], [])
        for seed in range(args.trials):
            for searcher in searchers:
                r = search_once(session, searcher, run, seed, budget, max_prompts,
                                args.round_examples, 1 if args.first_only else shrink_cap,
                                not args.first_only)
                results.append(r)
                first = (f"{r.first_text[:32]!r} ({longest_digit_run(r.first_text)})"
                         if r.found else "-")
                print(f"| {searcher} | {seed} | {r.found} | {r.prompts} | {r.batches} | "
                      f"{r.rounds} | {r.seconds:.1f} | {r.total_seconds:.1f} | "
                      f"{r.shrink_batches} | {first} | "
                      f"{r.saved_text!r} | {r.minimal} |", flush=True)
    summarize(results, runs, searchers, shrink_cap, max_prompts, not args.first_only)
    print(f"\ncurves: {plot_found(results, runs, searchers, max_prompts, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
