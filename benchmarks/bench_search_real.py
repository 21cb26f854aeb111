"""Search effectiveness on the real Gemma 3 270M: distinct kernel-robust signatures per searcher.

Each searcher runs `fuzz run`'s job itself (fuzz.run.FuzzJob) on Gemma 3 270M, float16, BOS off
(with BOS every prompt dies at layer 7 on the BOS position: one signature, docs/NUMERICS.md),
from an empty corpus and a cold example database, for the same budget, once per trial (seed):
  random    fresh draws only (fuzz.strategies.prompts with the model's vocabulary), `target()`
            disabled: Hypothesis generation with nothing to steer it;
  default   `fuzz run`'s search (steered: targeted on content headroom, half of each round
            stacked edits of the nearest misses);
  gradient  default plus gradient-guided swaps of the nearest misses (`fuzz run --gradient`);
  extend    default plus the extension arm (`fuzz run --extend`, fuzz.search.extensions): after
            each round, 1024 vocabulary tokens as the next token of the nearest miss.
Per trial: prompts screened, the job's wall time against its budget (the tail, limit 60 s:
fuzz.search.schedule), the distinct signatures saved as regression cases (kernel-robust: they
hold under every kernel variation at the margin a case needs, fuzz.shrink.robustness) and the
distinct root causes among them (fuzz.rootcause: channel and kind of position, whatever the
layer), each with the time it was saved, marginal findings and findings the budget's tail left
unmeasured (neither saved), and the best content headroom.
Per searcher, as FuzzBench reports a fuzzer (benchmarks/_stats.py): the median of signatures and
of root causes at the job's end with distribution-free 95% intervals, and against random the
Vargha-Delaney A12 and the two-sided Mann-Whitney U test; a PNG of the median count over time.

One process runs its searchers one after another, so a busy machine skews their prompt counts
(the header prints the load average; --budget-prompts gives every searcher the same number of
prompts instead of the same time). To run searchers side by side, one thread each, give each
process --json FILE and combine the files with --merge (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from _common import (
    OUT_DIR,
    machine_facts,
    machine_text,
    print_header,
    print_table,
    reproduce_command,
)
from _stats import (
    Panel,
    compare,
    count_curve,
    median_interval,
    require_scipy,
    write_curves_png,
)

import fuzz.run
import fuzz.search.round
from fuzz.atomic import write_atomic
from fuzz.corpus import Case, Corpus
from fuzz.corpus.store import SaveResult
from fuzz.engine.zoo import load_model
from fuzz.precision import parse_policies
from fuzz.run import FuzzJob
from fuzz.session import Session
from fuzz.verdict import Bounds, Signature

SEARCHERS = ("random", "default", "gradient", "extend")
FORMAT = "bench_search_real/1"  # the raw-data file's format, checked by --merge
DEFAULT_PLOT = OUT_DIR / "bench_search_real.png"


@contextlib.contextmanager
def unsteered(enabled: bool) -> Iterator[None]:
    """random: no target() and no nearest-miss edits (fresh draws only); no file is edited."""
    target, strategy = fuzz.search.round.target, fuzz.run.round_strategy
    if enabled:
        fuzz.search.round.target = lambda *args, **kwargs: None
        # whatever else round_strategy is given (pool, proposals, draw callback): fresh only
        fuzz.run.round_strategy = lambda fresh, *args, **kwargs: fresh
    try:
        yield
    finally:
        fuzz.search.round.target, fuzz.run.round_strategy = target, strategy


class _TimedCorpus(Corpus):
    """A corpus that notes when each case was saved: FuzzJob keeps no save times, and this is
    the one place every saved case passes through (its minimizing and measuring done)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.saved_at: dict[Signature, float] = {}  # time.monotonic() of the save

    def save(self, case: Case, *, force: bool = False) -> SaveResult:
        result = super().save(case, force=force)
        if result.saved:
            self.saved_at.setdefault(case.signature, time.monotonic())
        return result


class _PromptBudget(FuzzJob):
    """FuzzJob whose rounds stop once `max_prompts` prompts were screened (the time budget
    stays as a safety net): the same work for every searcher however busy the machine is."""

    max_prompts: int = 0

    def _tick(self, mode) -> None:
        super()._tick(mode)
        if self.max_prompts and self.examples >= self.max_prompts:  # the budget ends now
            spent = time.monotonic() - self.schedule.started
            self.schedule.budget_s = min(self.schedule.budget_s, spent)


@dataclass
class Trial:
    """One searcher's job on one seed: the raw data the figures are computed from (--json)."""

    searcher: str
    seed: int
    prompts: int
    rounds_s: float  # seconds in the mode's rounds: search, shrink, minimizing and measuring
    wall_s: float  # the whole job, its report included
    # one per saved (kernel-robust) signature: "t" seconds since the job started, "signature"
    # (fuzz.verdict.Signature as a list), "site" in words, "root_cause" (its key as a list) and
    # "root_cause_label"
    saved: list[dict]
    marginal: int  # failures short of a case's margin (PolicySummary.marginal_total), not saved
    unmeasured: int  # findings the budget's tail left no time to measure, not saved
    best_headroom: float | None  # None: no finite prompt
    proposing_s: float | None  # the gradient arm's time (None: no gradient arm)
    # the extension arm's turns and candidate tokens (None: no extension arm, or a raw-data file
    # written before they were recorded)
    arm_turns: int | None = None
    arm_tokens: int | None = None

    @property
    def signature_times(self) -> list[float]:
        return sorted(s["t"] for s in self.saved)

    @property
    def root_cause_times(self) -> list[float]:
        """When each distinct root cause was first saved (under any of its signatures)."""
        first: dict[tuple, float] = {}
        for s in self.saved:
            key = tuple(s["root_cause"])
            first[key] = min(first.get(key, math.inf), s["t"])
        return sorted(first.values())


def run_trial(session: Session, searcher: str, seed: int, budget_s: float,
              max_prompts: int) -> Trial | None:
    """One job, cold (empty corpus, fresh example database); None when it was interrupted."""
    with tempfile.TemporaryDirectory(prefix="bench-search-real-") as tmp:
        corpus = _TimedCorpus(Path(tmp) / "corpus")
        job = _PromptBudget(session, parse_policies("float16"), [False], budget_s,
                            corpus, str(Path(tmp) / "db"), seed, 40, None, quiet=True,
                            gradient=searcher == "gradient", extend=searcher == "extend")
        job.max_prompts = max_prompts
        began = time.monotonic()
        # the job's own summary goes to stderr: stdout holds the benchmark's tables only
        with unsteered(searcher == "random"), contextlib.redirect_stdout(sys.stderr):
            job.main()
        wall = time.monotonic() - began
    if job.stopped == "interrupted":
        return None
    summary = job.summaries["float16"]
    counts = summary.mode(False)
    saved = []
    for f in summary.findings:
        if f.is_new:
            first, cause = f.verdict.first_nonfinite, f.root_cause
            saved.append({"t": round(corpus.saved_at[f.signature] - job.started, 2),
                          "signature": list(f.signature),
                          "site": f"L{first.layer} {first.site} step {first.step}",
                          "root_cause": list(cause.key), "root_cause_label": cause.label})
    proposer = next(iter(job._proposers.values()), None)
    return Trial(searcher, seed, counts.examples, round(counts.seconds, 1), round(wall, 1), saved,
                 summary.marginal_total, summary.unmeasured_findings,
                 counts.best_headroom if math.isfinite(counts.best_headroom) else None,
                 round(proposer.seconds, 1) if proposer else None,
                 job._extender.rounds if job._extender else None,
                 job._extender.tokens if job._extender else None)


def write_data(path: Path, setup: dict, facts: dict, trials: list[Trial]) -> None:
    """The raw per-trial data, rewritten after every trial (a killed run keeps what ended)."""
    data = {"format": FORMAT, "setup": setup, "facts": facts,
            "trials": [asdict(t) for t in trials]}
    write_atomic(path, (json.dumps(data, indent=1) + "\n").encode())


def read_data(paths: Sequence[Path]) -> tuple[dict, list[tuple[Path, dict]], list[Trial]]:
    """The files' common setup, each file's machine facts, and all their trials; ValueError
    where they cannot be merged (another format, another budget, one trial twice)."""
    if len({Path(p).resolve() for p in paths}) != len(paths):
        raise ValueError(f"a file is given twice: {' '.join(map(str, paths))}")
    setup, facts, trials, seen = None, [], [], {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not readable as JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (write one with --json)")
        if setup is None:
            setup = data["setup"]
        elif data["setup"] != setup:
            raise ValueError(f"{path}: measured with {data['setup']}, the first file with "
                             f"{setup}: figures of different budgets do not merge")
        facts.append((path, data["facts"]))
        for t in data["trials"]:
            trial = Trial(**t)
            where = seen.setdefault((trial.searcher, trial.seed), path)
            if where != path:
                raise ValueError(f"{trial.searcher} seed {trial.seed} is in both {where} and "
                                 f"{path}")
            trials.append(trial)
    return setup or {}, facts, trials


def report(trials: list[Trial], budget_s: float, plot: Path) -> None:
    """The per-trial table, then per searcher the medians and the comparison with random, and
    the curves PNG."""
    searchers = [s for s in SEARCHERS if any(t.searcher == s for t in trials)]
    print_table(["searcher", "seed", "prompts", "s in rounds", "job s (past budget)",
                 "robust signatures", "root causes", "marginal", "unmeasured", "best headroom",
                 "s proposing", "arm turns (tokens)", "saved: site @ s since start"],
                [(t.searcher, t.seed, t.prompts, f"{t.rounds_s:.0f}",
                  f"{t.wall_s:.0f} ({t.wall_s - budget_s:+.0f})", len(t.signature_times),
                  len(t.root_cause_times), t.marginal, t.unmeasured,
                  "-" if t.best_headroom is None else f"{t.best_headroom:.4f}",
                  "-" if t.proposing_s is None else f"{t.proposing_s:.0f}",
                  "-" if t.arm_turns is None else f"{t.arm_turns} ({t.arm_tokens})",
                  "; ".join(f"{s['site']} @ {s['t']:.0f}" for s in t.saved) or "-")
                 for t in sorted(trials, key=lambda t: (SEARCHERS.index(t.searcher), t.seed))])
    by = {s: [t for t in trials if t.searcher == s] for s in searchers}
    signatures = {s: [len(t.signature_times) for t in ts] for s, ts in by.items()}
    causes = {s: [len(t.root_cause_times) for t in ts] for s, ts in by.items()}
    print("\n## Per searcher at the job's end: median [distribution-free 95% interval; none "
          "below 6 trials]; vs random: A12 = the chance that this searcher's trial saves more "
          "than random's (ties half), U its Mann-Whitney statistic, p two-sided")
    rows = []
    for s, ts in by.items():
        versus = [compare(counts[s], counts["random"]).text()
                  if s != "random" and "random" in by else "-" for counts in (signatures, causes)]
        rows.append((s, len(ts), median_interval(signatures[s]).text(),
                     " ".join(map(str, signatures[s])), median_interval(causes[s]).text(),
                     " ".join(map(str, causes[s])),
                     median_interval([t.prompts for t in ts]).text(), *versus))
    print_table(["searcher", "trials", "robust signatures", "per trial", "root causes",
                 "per trial", "prompts screened", "signatures vs random",
                 "root causes vs random"], rows)
    end = max(t.wall_s for t in trials)
    grid = [end * i / 300 for i in range(301)]
    panels = [Panel(what, {f"{s} ({len(ts)} trials)": count_curve([times(t) for t in ts], grid)
                           for s, ts in by.items()})
              for what, times in (("robust signatures saved", lambda t: t.signature_times),
                                  ("root causes saved", lambda t: t.root_cause_times))]
    path = write_curves_png(plot, panels, "Gemma 3 270M, float16, BOS off: median over trials "
                            f"(shaded: 95% interval), budget {budget_s:.0f} s + tail",
                            "seconds since the job started",
                            mark=(budget_s, "budget's end (the tail follows)"))
    print(f"\ncurves: {path}")


def run_trials(session: Session, searchers: list[str], seeds: list[int], setup: dict,
               data: Path | None) -> list[Trial]:
    """Every searcher on every seed (seed by seed, so that a stopped run leaves the searchers
    level), the raw data rewritten to `data` after each; stops at an interrupted trial."""
    facts, trials = machine_facts(), []
    for seed in seeds:
        for searcher in searchers:
            trial = run_trial(session, searcher, seed, setup["budget_s"], setup["budget_prompts"])
            if trial is None:
                print(f"interrupted in {searcher} seed {seed}: reporting the trials that ended",
                      file=sys.stderr)
                return trials
            trials.append(trial)
            print(f"{searcher} seed {seed}: {trial.prompts} prompts, "
                  f"{len(trial.signature_times)} signatures, {len(trial.root_cause_times)} "
                  f"root causes, {trial.wall_s:.0f} s", file=sys.stderr, flush=True)
            if data is not None:
                write_data(data, setup, facts, trials)
    return trials


def parse_seeds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    if args.trials is not None and args.seeds is not None:
        parser.error("give --trials N (seeds 1..N) or --seeds LIST, not both")
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    else:
        trials = 10 if args.trials is None else args.trials
        if trials < 1:
            parser.error(f"--trials must be >= 1, got {trials}")
        seeds = list(range(1, trials + 1))
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=600.0,
                        help="seconds per trial (the job's budget; it ends within 60 s past it)")
    parser.add_argument("--budget-prompts", type=int, default=0,
                        help="stop each trial after this many prompts (0: time only)")
    parser.add_argument("--trials", type=int, default=None,
                        help="trials per searcher, seeds 1..N (default 10)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds instead of --trials")
    parser.add_argument("--searchers", default="random,default",
                        help=f"comma-separated, of {', '.join(SEARCHERS)} (default random,default)")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the raw per-trial data here (after every trial), for --merge")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON", default=None,
                        help="no search: report the trials of these --json files together")
    parser.add_argument("--plot", type=Path, default=None,
                        help="the curves PNG (default: next to --json as .png, next to the first "
                             "--merge file as bench_search_real-merged.png, else "
                             "benchmarks/out/bench_search_real.png)")
    args = parser.parse_args(argv)
    require_scipy()
    if args.merge:
        if args.json is not None:
            parser.error("--merge reads --json files; it writes none")
        try:
            setup, facts, trials = read_data(args.merge)
        except ValueError as exc:
            parser.error(str(exc))
        if not trials:
            parser.error("the --merge files hold no trials")
        # no machine line of this process's own: the figures were measured where the files say
        print(f"# reproduce: {reproduce_command()}")
        print(f"# merged: {len(trials)} trials from {len(args.merge)} files; real Gemma 3 270M, "
              f"float16, BOS off, empty corpus, {setup_text(setup)}")
        for path, f in facts:
            print(f"# data: {path}: {f['date']}, {machine_text(f)}, cpu flags {f['cpu_flags']}, "
                  f"load before {f['load_before']}; {f['command']}")
        report(trials, setup["budget_s"],
               args.plot or Path(args.merge[0]).with_name("bench_search_real-merged.png"))
        return 0
    searchers = args.searchers.split(",")
    unknown = [s for s in searchers if s not in SEARCHERS]
    if unknown:
        parser.error(f"unknown searcher(s) {unknown}; valid: {', '.join(SEARCHERS)}")
    seeds = parse_seeds(parser, args)
    if args.budget <= 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    setup = {"budget_s": args.budget, "budget_prompts": args.budget_prompts}
    session = Session(load_model("gemma3-270m"), bounds=Bounds(), batch_size=8)
    print_header(f"real Gemma 3 270M, float16, BOS off, empty corpus, {setup_text(setup)}, "
                 f"searchers {searchers}, seeds {','.join(map(str, seeds))}")
    trials = run_trials(session, searchers, seeds, setup, args.json)
    if not trials:
        return 130
    report(trials, args.budget,
           args.plot or (args.json.with_suffix(".png") if args.json else DEFAULT_PLOT))
    return 0


def setup_text(setup: dict) -> str:
    prompts = f" or {setup['budget_prompts']} prompts" if setup.get("budget_prompts") else ""
    return f"budget {setup['budget_s']:.0f} s{prompts} per trial (+ the job's tail, <= 60 s)"


if __name__ == "__main__":
    sys.exit(main())
