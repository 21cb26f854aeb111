"""What `fuzz run` shows while it works and prints when it ends.

The progress line names the policy and BOS mode being searched and shows only figures that exist
(no headroom before a prompt ended finite), e.g.
`fuzz ▋ 133/480s | float16 no-BOS | screened 523 (3.9/s) | findings 1 | best headroom 1.04`.
Not on a terminal (a CI log) it is a plain line every LOG_INTERVAL_S instead of a redrawn bar.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Optional, TextIO

from fuzz.report.causes import cause_rows, causes_count
from fuzz.report.commands import add_command
from fuzz.report.describe import fmt_headroom, minimization_text, plural
from fuzz.report.text import (
    headroom_text,
    marginal_text,
    mode_tallies,
    model_layers,
    saved_text,
    unmeasured_text,
)
from fuzz.search.accounting import RunSummary

# Not on a terminal (a CI log), a plain line this often instead of a redrawn bar: tqdm's
# carriage-return updates pile up on one line of a log file.
LOG_INTERVAL_S = 30.0


class Progress:
    """The progress bar on a terminal; a plain line every LOG_INTERVAL_S in a log."""

    def __init__(self, budget_s: float, started: float, quiet: bool,
                 stream: Optional[TextIO] = None) -> None:
        self.started, self.budget_s = started, budget_s
        self.stream = stream or sys.stderr
        self.bar: Optional[Any] = None
        self.lines = not quiet and not self.stream.isatty()
        self._last_line = -math.inf
        if not quiet and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=round(budget_s), unit="s", dynamic_ncols=True, mininterval=0.5,
                            bar_format="fuzz {bar} {n_fmt}/{total_fmt}s {desc}",
                            file=self.stream)

    def tick(self, mode: str, screened: int, findings: int, best_headroom: float,
             against: Optional[str] = None) -> None:
        """`against`: the dtype whose limit the headroom is measured against, when it is not
        the policy's own ("float16" for a float32 or bfloat16 mode)."""
        if self.bar is None and not self.lines:
            return
        now = time.monotonic()
        elapsed = now - self.started
        rate = screened / elapsed if elapsed > 0 else 0.0
        parts = [mode, f"screened {screened} ({rate:.2g}/s)", f"findings {findings}"]
        if math.isfinite(best_headroom):
            parts.append(f"best headroom {fmt_headroom(best_headroom)}"
                         + (f" (vs {against})" if against else ""))
        if self.bar is not None:
            self.bar.n = min(round(elapsed), self.bar.total)
            self.bar.set_description_str("| " + " | ".join(parts), refresh=False)
            self.bar.update(0)
        elif now - self._last_line >= LOG_INTERVAL_S:
            self._last_line = now
            print(f"fuzz {elapsed:.0f}/{self.budget_s:.0f}s | " + " | ".join(parts),
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class CountProgress:
    """Progress over a known number of items (`fuzz screen`): a bar with the rate and ETA on a
    terminal, a plain line every LOG_INTERVAL_S in a log."""

    def __init__(self, total: int, unit: str, quiet: bool,
                 stream: Optional[TextIO] = None) -> None:
        self.total, self.unit, self.done = total, unit, 0
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.bar: Optional[Any] = None
        self.lines = not quiet and not self.stream.isatty()
        self._last_line = -math.inf
        if not quiet and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True, mininterval=0.5,
                            file=self.stream)

    def tick(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.lines and (now - self._last_line >= LOG_INTERVAL_S or self.done >= self.total):
            self._last_line = now
            elapsed = now - self.started
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            print(f"{self.done}/{self.total} {self.unit}s, {rate:.2g}/s, "
                  f"{'ETA ' + f'{eta:.0f}s' if math.isfinite(eta) else 'ETA unknown'}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_summary(run: RunSummary) -> None:
    """Findings, then every (policy, BOS mode): prompts screened, time, non-finite, best
    content headroom (against float16's limit for a wider dtype, as the report states it),
    saturated or never run (a warning: the budget was too short for every mode)."""
    summaries = run.policies
    findings = [f for s in summaries for f in s.findings]
    print(f"\n{run.model}: {run.examples} prompts screened in {run.elapsed_s:.0f}s "
          f"({run.stopped}); {plural(len(findings), 'finding')}: {saved_text(summaries)} to "
          f"{run.corpus_dir}{marginal_text(summaries)}{unmeasured_text(summaries)}")
    for f in findings:
        v, first = f.verdict, f.verdict.first_nonfinite
        bos = "on " if v.add_bos else "off"
        print(f"  {f.status:<16} {f.how:<11} {v.policy:<22} BOS {bos} "
              f"{first.kind} step {first.step} layer {first.layer} {first.site} "
              f"pos {first.position}  prompt {v.prompt!r}  -> {f.case_path}")
        if f.is_unmeasured:
            print(f"    measure and save it: {add_command(run, v)}")
        if f.saved_unminimal:
            print(f"    not 1-minimal ({minimization_text(f.minimization)}): "
                  "`python -m fuzz minimize` finishes it")
    if findings:  # the mechanisms behind them: what a user fixes (fuzz.rootcause)
        print(f"  by root cause ({causes_count(run)}):")
        for cause, _ in cause_rows(run, model_layers(run)):
            print(f"    {cause}")
    for s in summaries:
        for (_, tally), bos in zip(mode_tallies(s), s.bos_modes):
            name = f"{s.policy} {'BOS' if bos else 'no-BOS'}"
            if tally.examples == 0:
                print(f"  warning: {name} screened no prompt (the budget was too short for "
                      "every mode: give a longer --budget or fewer --policies)", file=sys.stderr)
                continue
            note = " (saturated: every prompt failed at BOS under a known signature; given up)" \
                if tally.saturated else ""
            print(f"  {name:<28} {tally.examples:>6} prompts in {tally.seconds:5.0f}s, "
                  f"{tally.nonfinite} non-finite, {tally.marginal} marginal, best content "
                  f"headroom {headroom_text(tally)}{note}")
