"""Search effectiveness on the real Gemma 3 270M: distinct kernel-robust signatures per searcher.

Each searcher runs `fuzz run`'s job itself (fuzz.run.FuzzJob) on Gemma 3 270M, float16, BOS off
(with BOS every prompt dies at layer 7 on the BOS position: one signature, docs/NUMERICS.md),
from an empty corpus and a cold example database, for the same budget and seed:
  random    fresh draws only (fuzz.strategies.prompts with the model's vocabulary), `target()`
            disabled: Hypothesis generation with nothing to steer it;
  default   `fuzz run`'s search (steered: targeted on content headroom, half of each round
            stacked edits of the nearest misses);
  gradient  default plus gradient-guided swaps of the nearest misses (`fuzz run --gradient`).
Figures: prompts screened, the job's wall time against its budget (the tail, limit 60 s:
fuzz.search.schedule), distinct signatures saved as regression cases (kernel-robust: they hold under
every kernel variation at the margin a case needs, fuzz.shrink.robustness), marginal signatures (not
saved), findings the budget's tail left unmeasured (not saved), and the best content headroom.
The searchers run one after another, so a busy machine skews their prompt counts: the header
prints the load average, and --budget-prompts gives every searcher the same number of prompts
instead of the same time.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _common import print_header, print_table

import fuzz.run
import fuzz.search.round
from fuzz.corpus import Corpus
from fuzz.engine.zoo import load_model
from fuzz.precision import parse_policies
from fuzz.run import FuzzJob
from fuzz.session import Session
from fuzz.verdict import Bounds

SEARCHERS = ("random", "default", "gradient")


@contextlib.contextmanager
def unsteered(enabled: bool) -> Iterator[None]:
    """random: no target() and no nearest-miss edits (fresh draws only); no file is edited."""
    target, strategy = fuzz.search.round.target, fuzz.run.round_strategy
    if enabled:
        fuzz.search.round.target = lambda *args, **kwargs: None
        fuzz.run.round_strategy = lambda fresh, pool, proposed=(): fresh
    try:
        yield
    finally:
        fuzz.search.round.target, fuzz.run.round_strategy = target, strategy


class _PromptBudget(FuzzJob):
    """FuzzJob whose rounds stop once `max_prompts` prompts were screened (the time budget
    stays as a safety net): the same work for every searcher however busy the machine is."""

    max_prompts: int = 0

    def _tick(self, mode) -> None:
        super()._tick(mode)
        if self.max_prompts and self.examples >= self.max_prompts:  # the budget ends now
            spent = time.monotonic() - self.schedule.started
            self.schedule.budget_s = min(self.schedule.budget_s, spent)


def run_searcher(session: Session, searcher: str, seed: int, budget_s: float,
                 max_prompts: int) -> list:
    with tempfile.TemporaryDirectory(prefix="bench-search-real-") as tmp:
        job = _PromptBudget(session, parse_policies("float16"), [False], budget_s,
                            Corpus(Path(tmp) / "corpus"), str(Path(tmp) / "db"), seed, 40, None,
                            quiet=True, gradient=searcher == "gradient")
        job.max_prompts = max_prompts
        began = time.monotonic()
        with unsteered(searcher == "random"):
            job.main()
        wall = time.monotonic() - began  # the whole job, tail and report included
        summary = job.summaries["float16"]
        counts = summary.mode(False)
        saved = [f for f in summary.findings if f.is_new]
        marginal = [f for f in summary.findings if f.is_marginal]
        unmeasured = [f for f in summary.findings if f.is_unmeasured]
        proposer = job._proposers.get(next(iter(m.name for m in job.schedule.modes)))
        return [searcher, seed, counts.examples, f"{counts.seconds:.0f}",
                f"{wall:.0f} ({wall - budget_s:+.0f})", len(saved), len(marginal),
                len(unmeasured), f"{counts.best_headroom:.4f}"
                if math.isfinite(counts.best_headroom) else "-",
                f"{proposer.seconds:.0f}" if proposer else "-",
                "; ".join(f"L{f.verdict.first_nonfinite.layer} {f.verdict.first_nonfinite.site} "
                          f"step {f.verdict.first_nonfinite.step}" for f in saved) or "-"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=600.0, help="seconds per search")
    parser.add_argument("--budget-prompts", type=int, default=0,
                        help="stop each search after this many prompts (0: time only)")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds")
    parser.add_argument("--searchers", default=",".join(SEARCHERS))
    args = parser.parse_args(argv)
    searchers = args.searchers.split(",")
    unknown = [s for s in searchers if s not in SEARCHERS]
    if unknown:
        parser.error(f"unknown searcher(s) {unknown}; valid: {', '.join(SEARCHERS)}")
    session = Session(load_model("gemma3-270m"), bounds=Bounds(), batch_size=8)
    print_header(f"real Gemma 3 270M, float16, BOS off, empty corpus, budget {args.budget:.0f}s"
                 f"{f' or {args.budget_prompts} prompts' if args.budget_prompts else ''} per "
                 f"search, searchers {searchers}, seeds {args.seeds}")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for searcher in searchers:
            rows.append(run_searcher(session, searcher, seed, args.budget, args.budget_prompts))
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    print_table(["searcher", "seed", "prompts", "seconds searching", "job s (past budget)",
                 "robust signatures saved", "marginal", "unmeasured", "best headroom",
                 "s proposing", "saved (first non-finite)"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
