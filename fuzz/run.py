"""The fuzz job (`python -m fuzz run`): search until the budget ends, save each new signature.

The budget is shared by every (policy, BOS mode) in turn — unsafe policies first, since that is
where findings are expected — in Hypothesis rounds of `--round-examples` examples. A round ends
early when it finds a new signature; the minimal example is explained, saved to the corpus and
added to the known signatures, and the search goes on. Ctrl-C / SIGTERM stops the search, saves
the shortest failing prompt of any signature still being shrunk, and writes the report.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Optional

import torch
from hypothesis.database import DirectoryBasedExampleDatabase

import fuzz

from .corpus import Corpus, Signature
from .generate import Bounds
from .precision import PrecisionPolicy, parse_policies
from .report import PolicySummary, RunSummary
from .robustness import assess, finalize
from .search import BudgetExhausted, NewSignature, Search, mutate_nearest
from .session import ModelOptions, Session
from .strategies import prompts

UNSAFE_ROUND_FACTOR = 3
MUTATION_BATCHES = 4  # mutation batches after each unsafe round (each: 4 near misses x 4 edits)
MARGINAL_TRIES = 2  # marginal findings of one signature before this run stops chasing it


@dataclass
class FuzzJob:
    session: Session
    policies: list[PrecisionPolicy]
    bos_modes: list[bool]
    budget_s: float
    corpus: Corpus
    database: Optional[Path]
    seed: int
    round_examples: int
    report: Optional[str]
    quiet: bool = False
    fail_on_new: bool = False
    summaries: dict[str, PolicySummary] = field(default_factory=dict)  # per policy, in order
    known: set[Signature] = field(default_factory=set)
    marginal_tries: dict[Signature, int] = field(default_factory=dict)
    started: float = 0.0
    started_at: str = ""
    stopped: str = "budget"

    @classmethod
    def from_args(cls, args: argparse.Namespace, options: ModelOptions, bounds: Bounds
                  ) -> FuzzJob:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        session = Session.open(options, bounds, args.batch_size)
        session.min_margin = args.min_margin
        policies = parse_policies(args.policies)
        # Unsafe policies first: that is where overflows are expected.
        policies.sort(key=lambda p: p.expected_safe)
        return cls(session, policies, [False] if args.no_bos else [True, False], args.budget,
                   Corpus(Path(args.corpus)), Path(args.database) if args.database else None,
                   args.seed if args.seed is not None else int(time.time()) % 2**31,
                   args.round_examples, args.report, args.quiet, args.fail_on_new)

    def __post_init__(self) -> None:
        self.summaries = {p.name: PolicySummary.for_policy(p.name, self.bos_modes)
                          for p in self.policies}

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
        self.known = self.session.known_signatures(self.corpus)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        bar = self._progress_bar()
        try:
            self._search(bar)
        except KeyboardInterrupt:
            self.stopped = "interrupted"
        finally:
            signal.signal(signal.SIGTERM, previous)
            if bar is not None:
                bar.close()
        self._print_summary()
        if self.report:
            for path in self._write_report():
                print(f"report: {path}")
        return self.exit_code()

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

    def _search(self, bar) -> None:
        combos = [(p, bos) for p in self.policies for bos in self.bos_modes]
        deadline = self.started + self.budget_s
        round_index = 0
        while time.monotonic() < deadline:
            policy, bos = combos[round_index % len(combos)]
            self._round(policy, bos, round_index, deadline, bar)
            round_index += 1

    def _round(self, policy: PrecisionPolicy, bos: bool, index: int, deadline: float, bar) -> None:
        search = Search(self.session, policy.name, bos, self.known, self.summaries[policy.name],
                        deadline, on_batch=lambda: self._tick(bar))
        digest = hashlib.sha256(
            f"{self.session.model.fingerprint}/{policy.name}/bos={bos}".encode()).digest()
        database = DirectoryBasedExampleDatabase(str(self.database)) if self.database else None
        strategy = prompts(max_chars=4 * self.session.bounds.max_prompt_tokens)
        # Unsafe policies get longer rounds: that is where findings are expected, and
        # Hypothesis's targeting (hill-climbing on headroom) needs examples to climb with.
        examples = self.round_examples * (1 if policy.expected_safe else UNSAFE_ROUND_FACTOR)
        try:
            found = search.run(strategy, examples, database, digest, seed=self.seed + index)
        except BudgetExhausted:  # shrinking outlived the budget: minimize what it had so far
            found = list(search.pending.values())
        except KeyboardInterrupt:  # save at once, unminimized: a second signal may follow
            for err in search.pending.values():
                if err.screened.signature not in self.known:
                    self._save(err, "interrupted")
            raise
        for err in found:
            self._save(err, "shrunk")
        if not policy.expected_safe and time.monotonic() < deadline:
            self._mutation_stage(search, index)

    def _mutation_stage(self, search: Search, index: int) -> None:
        """Edits of the nearest misses, a few batches, until one yields nothing new."""
        rng = random.Random(self.seed * 1000 + index)
        for _ in range(MUTATION_BATCHES):
            found = mutate_nearest(search, rng)
            for err in found:
                self._save(err, "mutated")
            if not found:
                break

    def _save(self, err: NewSignature, how: str) -> None:
        """Minimizes (unless interrupted), measures and saves a finding when it is a regression
        case every machine will reproduce; a marginal one is reported, not saved."""
        found = err.screened.verdict
        if how == "interrupted":  # no time to minimize, but a case must still hold everywhere
            assessment = assess(self.session, err.spec, found.policy)
        else:
            assessment = finalize(self.session, err.spec, found.policy, err.screened.signature,
                                  found.first_nonfinite.step)
        verdict, spec = assessment.verdict, assessment.spec
        if not verdict.nonfinite:  # a deterministic engine fails again; say so if it does not
            print(f"warning: {spec.text!r} did not fail again on replay; not saved",
                  file=sys.stderr)
            return
        case = assessment.case(self.session, seed=self.seed,
                               strategy=f"fuzz.strategies.prompts/{how}")
        if assessment.robust:
            result = self.corpus.save(case)
            self.known.add(case.signature)
            status, path = result.status, result.path
        else:
            self._note_marginal(case.signature)
            status, path = "marginal", None
        self.summaries[verdict.policy].add_finding(verdict, status, path, case.signature, how,
                                                   case.margin, case.robustness)

    def _note_marginal(self, sig: Signature) -> None:
        """After MARGINAL_TRIES marginal findings of one signature, this run stops chasing it
        (each costs a minimization and every kernel variation); the corpus stays open to it."""
        self.marginal_tries[sig] = self.marginal_tries.get(sig, 0) + 1
        if self.marginal_tries[sig] >= MARGINAL_TRIES:
            self.known.add(sig)

    # --- progress and summary ------------------------------------------------------------------
    def _progress_bar(self):
        if self.quiet:
            return None
        from tqdm import tqdm

        return tqdm(total=round(self.budget_s), unit="s", desc="fuzz", dynamic_ncols=True,
                    mininterval=0.5 if sys.stderr.isatty() else 30.0,
                    bar_format="{desc} {bar} {n_fmt}/{total_fmt}s {postfix}", file=sys.stderr)

    def _tick(self, bar) -> None:
        if bar is None:
            return
        elapsed = time.monotonic() - self.started
        bar.n = min(round(elapsed), bar.total)
        rate = self.examples / elapsed if elapsed > 0 else 0.0
        best = " ".join(f"{p}:{s.best_headroom:.3g}" for p, s in self.summaries.items()
                        if s.examples)
        bar.set_postfix_str(f"examples {self.examples} ({rate:.2f}/s) "
                            f"findings {len(self.findings)} headroom {best}", refresh=False)
        bar.update(0)

    def _print_summary(self) -> None:
        elapsed = time.monotonic() - self.started
        findings = self.findings
        print(f"\n{self.session.model.name}: {self.examples} prompts screened in "
              f"{elapsed:.0f}s ({self.stopped}); {len(findings)} new signature(s), "
              f"{sum(f.is_new for f in findings)} saved to {self.corpus.root}")
        for f in findings:
            v, first = f.verdict, f.verdict.first_nonfinite
            bos = "on " if v.add_bos else "off"
            print(f"  {f.status:<16} {f.how:<11} {v.policy:<22} BOS {bos} "
                  f"{first.kind} step {first.step} layer {first.layer} {first.site} "
                  f"pos {first.position}  prompt {v.prompt!r}  -> {f.case_path}")
        for policy, s in sorted(self.summaries.items()):
            if s.examples and s.best_headroom < math.inf:
                print(f"  best content headroom under {policy}: {s.best_headroom:.3g}")

    def _write_report(self) -> list[Path]:
        from .report import write_report

        return write_report(self.summary(), self.report)

    def summary(self) -> RunSummary:
        return RunSummary(
            model=self.session.model.name, fingerprint=self.session.model.fingerprint,
            seed=self.seed, budget_s=self.budget_s, elapsed_s=time.monotonic() - self.started,
            examples=self.examples, stopped=self.stopped, device=self.session.device,
            tool_version=fuzz.__version__, torch_version=str(torch.__version__),
            bounds=self.session.bounds.to_dict(), policies=list(self.summaries.values()),
            corpus_dir=str(self.corpus.root),
            started=self.started_at, engine=self.session.engine_kind,
            batch_size=self.session.batch_size, round_examples=self.round_examples,
            command="python -m fuzz " + " ".join(shlex.quote(a) for a in sys.argv[1:]))


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
