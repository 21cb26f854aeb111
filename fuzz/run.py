"""The fuzz job (`python -m fuzz run`): search until the budget ends, save each new signature.

The budget is shared by every (policy, BOS mode) as fuzz.search.schedule states (unsafe policies get
more); each round is one Hypothesis run of up to `--round-examples` examples on one mode, drawing
fresh prompts and edits of that mode's nearest misses (fuzz.search.round). A round ends early when
it finds a new signature: the minimal example is minimized further, measured under every kernel
variation (fuzz.shrink.robustness), saved to the corpus when it is a regression case, and the
search goes on. The budget is wall time and hard: the job ends, report written, within it plus
fuzz.search.schedule.TAIL_S. Ctrl-C / SIGTERM stops the search, measures and saves the shortest
failing prompt of any signature still being shrunk, and writes the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

import torch

import fuzz
from fuzz.corpus import Case, Corpus
from fuzz.long import long_strategy, profile_batch_size
from fuzz.positions import session_position_map
from fuzz.precision import PrecisionPolicy, parse_policies
from fuzz.prompts.chat import chat_spec
from fuzz.prompts.files import PromptRecord
from fuzz.report import PolicySummary, RunSummary
from fuzz.report.progress import Progress, print_summary
from fuzz.rootcause import token_piece
from fuzz.search.database import open_database
from fuzz.search.extensions import ExtensionArm
from fuzz.search.misses import MissPool
from fuzz.search.proposals import Proposer
from fuzz.search.round import BudgetExhausted, NewSignature, Search, round_strategy
from fuzz.search.schedule import Mode, Schedule
from fuzz.session import ModelOptions, Session
from fuzz.shrink.minimize import not_minimized
from fuzz.shrink.robustness import assess, finalize
from fuzz.strategies import prompts
from fuzz.verdict import Bounds, PromptSpec, Signature, Verdict

# Marginal findings of one signature before this run stops chasing it: each costs a minimization
# and every kernel variation (20-38 s for one on Gemma 3 270M: benchmarks/README.md,
# bench_finalize), and a signature marginal twice is at the edge of the limit on this machine.
MARGINAL_TRIES = 2


@dataclass
class FuzzJob:
    session: Session
    policies: list[PrecisionPolicy]
    bos_modes: list[bool]
    budget_s: float
    corpus: Corpus
    database: Optional[str]  # a directory or redis://HOST:PORT/N (fuzz.search.database)
    seed: int
    round_examples: int
    report: Optional[str]
    quiet: bool = False
    fail_on_new: bool = False
    long: bool = False  # the long-generation profile (fuzz.long): long prompts, 128 steps
    gradient: bool = False  # a third arm per round: gradient-guided swaps (fuzz.search.proposals)
    # after each round, the nearest miss's one-token extensions (fuzz.search.extensions)
    extend: bool = False
    summaries: dict[str, PolicySummary] = field(default_factory=dict)  # per policy, in order
    known: set[Signature] = field(default_factory=set)
    marginal_tries: dict[Signature, int] = field(default_factory=dict)
    # (signature, shrunk prompt) of every marginal finding: the example database replays a
    # failing example in the mode's next round, and Hypothesis shrinks it to the same prompt
    # again (measured: bench_search_real.py's default run assessed one prompt twice).
    # Maps it to the signature its measured case had.
    marginal_prompts: dict[tuple[Signature, str], Signature] = field(default_factory=dict)
    started: float = 0.0
    started_at: str = ""
    stopped: str = "budget"
    schedule: Optional[Schedule] = None
    progress: Optional[Progress] = None
    _proposers: dict[str, Proposer] = field(default_factory=dict)
    _extender: Optional[ExtensionArm] = None
    _misses: dict[str, MissPool] = field(default_factory=dict)  # per mode, across its rounds
    resumed: list[str] = field(default_factory=list)  # cases minimized on first (their outcome)
    # The user's seed prompts (--seed-prompts: fuzz.prompts.files), as texts, and each one's
    # "file:line"; every mode screens them first and its mutants keep editing them.
    seed_texts: list[str] = field(default_factory=list)
    _origins: dict[str, str] = field(default_factory=dict)  # prompt -> the seed it grew from
    _grew_from: dict[Signature, str] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace, options: ModelOptions, bounds: Bounds
                  ) -> FuzzJob:
        """The job the command line describes; `bounds` are the run's, its profile's defaults
        (fuzz.long.profile_bounds) already applied."""
        long = bool(args.long)
        batch_size = profile_batch_size(long, args.batch_size)
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if getattr(args, "extend", False) and options.engine != "builtin":
            raise ValueError(f"--extend runs the built-in engine only (one decode step without "
                             f"the LM head); drop --engine {options.engine} or --extend")
        session = Session.open(options, bounds, batch_size)
        session.min_margin = args.min_margin
        policies = parse_policies(args.policies)
        # Unsafe policies first: that is where overflows are expected.
        policies.sort(key=lambda p: p.expected_safe)
        corpus = Corpus(Path(args.corpus))
        job = cls(session, policies, [False] if args.no_bos else [True, False], args.budget,
                  corpus, args.database or None,
                  args.seed if args.seed is not None else int(time.time()) % 2**31,
                  args.round_examples, args.report, args.quiet, args.fail_on_new, long,
                  bool(getattr(args, "gradient", False)), bool(getattr(args, "extend", False)))
        seeds = seed_files(getattr(args, "seed_prompts", None), corpus)
        if seeds:
            from fuzz.prompts.files import read_prompts

            job.use_seeds(read_prompts(seeds))
        return job

    def __post_init__(self) -> None:
        self.summaries = {p.name: PolicySummary.for_policy(p.name, self.bos_modes)
                          for p in self.policies}

    def use_seeds(self, records: Sequence[PromptRecord]) -> None:
        """The seed prompts of a run: a plain prompt as it is, a chat as its template renders it
        (the text a BOS mode then feeds, fuzz.prompts.chat)."""
        for record in records:
            text = record.text if not record.is_chat else seed_text(
                chat_spec(record.messages, self.session.model.chat_template),
                self.session.model.tokenizer)
            if text not in self._origins:
                self.seed_texts.append(text)
                self._origins[text] = record.source

    @property
    def examples(self) -> int:
        return sum(s.examples for s in self.summaries.values())

    @property
    def findings(self) -> list:
        return [f for s in self.summaries.values() for f in s.findings]

    # --- the loop ------------------------------------------------------------------------------
    def main(self) -> int:
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.known = self.corpus.signatures(self.session.model.name)
        self.schedule = Schedule.plan(self.policies, self.bos_modes, self.budget_s, self.started)
        self.progress = Progress(self.budget_s, self.started, self.quiet)
        self._database = open_database(self.database)  # a bad spec fails here, not mid-run
        self._fresh = (long_strategy(self.session) if self.long else
                       prompts(max_chars=4 * self.session.bounds.max_prompt_tokens,
                               vocabulary=self.session.model.tokenizer.vocabulary()))
        if not self.quiet:
            print(f"budget {self.budget_s:.0f}s shared: {self.schedule.shares_text()}",
                  file=sys.stderr)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._resume_minimizing()
            self._search()
        except KeyboardInterrupt:
            self.stopped = "interrupted"
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.progress.close()
        summary = self.summary()
        print_summary(summary)
        if self.report:
            from fuzz.report import write_report

            for path in write_report(summary, self.report):
                print(f"report: {path}")
        return self.exit_code()

    def _resume_minimizing(self) -> None:
        """First, within one finding's share of the budget (fuzz.search.schedule), this model's
        cases whose minimizing an earlier run stopped (fuzz.corpus.resume): the corpus gets
        1-minimal cases without anyone running `fuzz minimize`."""
        from fuzz.corpus.resume import resume_all, unfinished

        if not unfinished(self.corpus, self.session.model.name):
            return
        rows = resume_all(self.corpus, self.schedule.finding_limit_s, self.session.model.name,
                          device=self.session.device)
        self.resumed = [f"{r.label}: {r.status} ({r.before} -> {r.after or '-'})" for r in rows]
        if not self.quiet:
            for line in self.resumed:
                print(f"resumed minimizing {line}", file=sys.stderr)
        self.known = self.corpus.signatures(self.session.model.name)

    def exit_code(self) -> int:
        """130 interrupted; 1 when a policy declared safe went non-finite (a regression), or
        with --fail-on-new when a new case was saved; else 0 (findings under unsafe policies are
        results, not errors)."""
        if self.stopped == "interrupted":
            return 130
        broken = [s.policy for s in self.summaries.values() if s.expected_safe and s.nonfinite]
        if broken:
            print(f"FAILED: policies declared safe went non-finite: {', '.join(broken)}",
                  file=sys.stderr)
            return 1
        new = sum(s.new_findings for s in self.summaries.values())
        if self.fail_on_new and new:
            print(f"FAILED (--fail-on-new): {new} new case(s) saved", file=sys.stderr)
            return 1
        return 0

    def _search(self) -> None:
        while (mode := self.schedule.next_mode(time.monotonic())) is not None:
            began = time.monotonic()
            try:
                self._round(mode)
            finally:
                mode.used_s += time.monotonic() - began
                mode.rounds += 1
                counts = self.summaries[mode.policy.name].mode(mode.add_bos)
                counts.seconds, counts.saturated = mode.used_s, mode.saturated

    def _round(self, mode: Mode) -> None:
        policy, now = mode.policy, time.monotonic()
        summary = self.summaries[policy.name]
        search = Search(self.session, policy.name, mode.add_bos, self.known, summary,
                        self.schedule.round_deadline(mode, now), self.schedule.shrink_deadline,
                        self.schedule.finding_limit_s, on_batch=lambda: self._tick(mode),
                        misses_pool=self._misses.setdefault(mode.name, MissPool()),
                        seeds=list(self.seed_texts), origins=self._origins,
                        grew_from=self._grew_from)
        digest = hashlib.sha256(f"{self.session.model.fingerprint}/{policy.name}/"
                                f"bos={mode.add_bos}".encode()).digest()
        proposed = self._proposer(mode).for_round(search.misses()) if self.gradient else []
        strategy = round_strategy(self._fresh, search.live_pool, proposed, search.note_draw)
        # a mode's first round screens the seed prompts first, as they are
        first = [] if mode.rounds else batches(self.seed_texts, self.session.batch_size)
        try:
            found = search.run(strategy, self.round_examples, self._database, digest,
                               seed=self.seed * 1000 + sum(m.rounds for m in self.schedule.modes),
                               first=first)
        except BudgetExhausted:  # a shrink outlived the budget: take its best so far, unshrunk
            found = list(search.pending.values())
        except KeyboardInterrupt:  # measure and save what was found: a second signal may follow
            for err in search.pending.values():
                if err.screened.signature not in self.known:
                    self._save(err, "interrupted")
            raise
        mode.saturated = search.saturated
        for i, err in enumerate(found):
            try:
                self._save(err, "shrunk")
            except KeyboardInterrupt:  # stopped while minimizing: keep what is being minimized
                for rest in found[i:]:
                    if rest.screened.signature not in self.known:
                        self._save(rest, "interrupted")
                raise
        if self.extend and time.monotonic() < self.schedule.round_deadline(mode, now):
            self._extend(mode)

    def _extend(self, mode: Mode) -> None:
        """The extension arm (fuzz.search.extensions) on the mode's nearest miss: a failing
        extension with a new signature is a finding, the closest finite one a nearest miss."""
        # the closest *finite* miss: the pool also ranks marginal findings (failures short of a
        # case's margin), whose prefix overflows by itself and could not be extended (measured:
        # a 120 s trial on the real 270M gave the arm 0 turns while it took the first miss)
        miss = next((v for v in self._misses[mode.name].verdicts() if v.finite), None)
        if miss is None:
            return
        if self._extender is None:
            self._extender = ExtensionArm(self.session, self.seed)
        for spec, screened in self._extender.round(miss, mode.policy, self.known):
            if screened.new and screened.signature not in self.known:  # one save per signature
                self._save(NewSignature(screened, spec), "extended")
            elif screened.verdict.finite:
                self._misses[mode.name].offer(screened.verdict)

    def _proposer(self, mode: Mode) -> Proposer:
        """One per mode: its proposals are prompts of that BOS mode."""
        return self._proposers.setdefault(mode.name, Proposer(self.session))

    def _tick(self, mode: Mode) -> None:
        summary = self.summaries[mode.policy.name]
        counts = summary.mode(mode.add_bos)
        wide = summary.dtype != "float16"  # as the summary and the report: against float16's
        self.progress.tick(mode.name, self.examples, len(self.findings),
                           counts.best_float16_headroom if wide else counts.best_headroom,
                           "float16" if wide else None)

    def _save(self, err: NewSignature, how: str) -> None:
        """Minimizes (unless interrupted), measures and saves a finding when it is a regression
        case every machine will reproduce; a marginal one is reported, not saved, and so is one
        the budget left no time to measure ("unmeasured", with the command that measures it)."""
        found = err.screened.verdict
        measured = self.marginal_prompts.get((err.screened.signature, err.spec.text))
        if measured is not None:
            self._note_marginal(measured)  # a try, without measuring the same prompt again
            return
        # After Ctrl-C/SIGTERM the user waits for the measurement (a second signal stops it);
        # otherwise the budget is hard (fuzz.search.schedule).
        measure_by = math.inf if how == "interrupted" else self.schedule.measure_deadline
        if how != "interrupted" and time.monotonic() >= self.schedule.minimize_deadline:
            how = "cut"  # the budget's tail has no time left to minimize: measured as found
        if time.monotonic() >= measure_by:
            self._unmeasured(found, err.screened.signature, how)
            return
        if how in ("interrupted", "cut"):  # unminimized, but a case must still hold everywhere
            assessment = dataclasses.replace(
                assess(self.session, err.spec, found.policy, deadline=measure_by),
                minimization=not_minimized("the run was interrupted" if how == "interrupted"
                                           else "the budget's tail left no time to minimize"))
        else:
            # minimizing gets the finding's own limit too, so that other modes keep their turns
            minimize_by = min(self.schedule.minimize_deadline,
                              time.monotonic() + self.schedule.finding_limit_s)
            assessment = finalize(self.session, err.spec, found.policy, err.screened.signature,
                                  found.first_nonfinite.step, minimize_by, measure_by)
        verdict, spec = assessment.verdict, assessment.spec
        if not verdict.nonfinite:  # a deterministic engine fails again; say so if it does not
            print(f"warning: {spec.text!r} did not fail again on replay; not saved",
                  file=sys.stderr)
            return
        case = Case.of_assessment(self.session, assessment, seed=self.seed,
                               strategy=f"fuzz.strategies.prompts/{how}",
                               grew_from=self._grew_from.get(err.screened.signature))
        if assessment.robustness.cut:
            self._unmeasured(verdict, case.signature, how, case.margin, case.robustness)
            return
        if assessment.robust:
            result = self.corpus.save(case)
            self.known.add(case.signature)
            status, path = result.status, result.path
        else:
            self._note_marginal(case.signature)
            self.marginal_prompts[err.screened.signature, err.spec.text] = case.signature
            status, path = "marginal", None
        finding = self.summaries[verdict.policy].add_finding(
            verdict, status, path, case.signature, how, case.margin, case.robustness,
            self._piece(verdict))
        finding.minimization = case.minimization
        finding.grew_from = case.finder.get("grew_from")
        # the report's heat map: one more run of the saved prompt, keeping per-position maxima
        # (not after Ctrl-C/SIGTERM: the user asked the job to stop; not past the budget)
        if how != "interrupted" and time.monotonic() < measure_by:
            finding.positions = session_position_map(self.session, spec, verdict).to_dict()

    def _unmeasured(self, verdict: Verdict, sig: Signature, how: str,
                    margin: Optional[dict] = None, robustness: Optional[dict] = None) -> None:
        """A finding the budget left no time to measure (at all, or under every variation):
        reported with the `fuzz add` command that measures and saves it; never saved unproven
        (an example database, on by default, keeps it too: the next run of this mode replays it
        first)."""
        self.summaries[verdict.policy].add_finding(verdict, "unmeasured", None, sig, how,
                                                   margin, robustness, self._piece(verdict))

    def _piece(self, verdict: Verdict) -> Optional[str]:
        """The failing token's piece, for the report's root causes (it has no tokenizer)."""
        return token_piece(self.session.model.tokenizer, verdict.first_nonfinite)

    def _note_marginal(self, sig: Signature) -> None:
        """After MARGINAL_TRIES marginal findings of one signature, this run stops chasing it
        (each costs a minimization and every kernel variation); the corpus stays open to it."""
        self.marginal_tries[sig] = self.marginal_tries.get(sig, 0) + 1
        if self.marginal_tries[sig] >= MARGINAL_TRIES:
            self.known.add(sig)

    # --- the report --------------------------------------------------------------------------
    def summary(self) -> RunSummary:
        return RunSummary(
            # The location (a zoo name, or a file model's path): the report's reproduce
            # commands pass it to --model, where a file model's name would not load.
            model=self.session.model.location or self.session.model.name,
            fingerprint=self.session.model.fingerprint,
            seed=self.seed, budget_s=self.budget_s, elapsed_s=time.monotonic() - self.started,
            examples=self.examples, stopped=self.stopped, device=self.session.device,
            tool_version=fuzz.__version__, torch_version=str(torch.__version__),
            bounds=self.session.bounds.to_dict(), policies=list(self.summaries.values()),
            corpus_dir=str(self.corpus.root),
            started=self.started_at, engine=self.session.engine_kind,
            batch_size=self.session.batch_size, round_examples=self.round_examples,
            long=self.long, screening_kernels=dict(self.session.screened_with),
            kernel_trial_speedup=self._kernel_trial_speedup(),
            command="python -m fuzz " + " ".join(shlex.quote(a) for a in sys.argv[1:]))

    def _kernel_trial_speedup(self) -> float | None:
        """What "auto"'s trial measured, when this run screened with "auto" and it decided (a
        forced kernel runs no trial: a trial of another session must not be reported)."""
        if self.session.screen_kernel != "auto":
            return None
        trial = self.session.kernel_trial()
        return trial.speedup if trial.choice is not None else None


def seed_files(given: Optional[list[str]], corpus: Corpus) -> list[Path]:
    """The seed prompt files: --seed-prompts FILE... when given (`none`: no seeds), else every
    JSONL file of the corpus's seeds/ (the prompts that broke Gemma in public:
    seeds/public.jsonl)."""
    if given is not None:
        return [] if given == ["none"] else [Path(g) for g in given]
    return sorted(corpus.seeds_dir.glob("*.jsonl")) if corpus.seeds_dir.is_dir() else []


def batches(texts: Sequence[str], size: int) -> list[list[str]]:
    return [list(texts[i: i + size]) for i in range(0, len(texts), size)]


def seed_text(spec: PromptSpec, tokenizer: Any) -> str:
    """A chat seed's text: a one-turn Gemma chat wrapped in its template, else as rendered."""
    return tokenizer.chat_prompt(spec.text) if spec.chat else spec.text


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
