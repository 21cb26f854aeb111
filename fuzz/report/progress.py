"""What `fuzz run` shows while it works and prints when it ends.

The progress line names the policy and BOS mode being searched and shows only figures that exist
(no headroom before a prompt ended finite), e.g.
`fuzz ▋ 133/480s | float16 no-BOS | screened 523 (3.9/s) | findings 1 | best headroom 1.04`.
Not on a terminal (a CI log) it is written every 30 s instead of redrawn.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Optional

from fuzz.report import RunSummary
from fuzz.report.commands import add_command
from fuzz.report.describe import fmt_headroom
from fuzz.report.text import unmeasured_text


class Progress:
    def __init__(self, budget_s: float, started: float, quiet: bool) -> None:
        self.started = started
        self.bar: Optional[Any] = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=round(budget_s), unit="s", dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 30.0,
                            bar_format="fuzz {bar} {n_fmt}/{total_fmt}s {desc}",
                            file=sys.stderr)

    def tick(self, mode: str, screened: int, findings: int, best_headroom: float) -> None:
        if self.bar is None:
            return
        elapsed = time.monotonic() - self.started
        self.bar.n = min(round(elapsed), self.bar.total)
        rate = screened / elapsed if elapsed > 0 else 0.0
        parts = [f"| {mode}", f"screened {screened} ({rate:.2g}/s)", f"findings {findings}"]
        if math.isfinite(best_headroom):
            parts.append(f"best headroom {fmt_headroom(best_headroom)}")
        self.bar.set_description_str(" | ".join(parts), refresh=False)
        self.bar.update(0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_summary(run: RunSummary) -> None:
    """Findings, then every (policy, BOS mode): prompts screened, time, best headroom, saturated
    or never run (a warning: the budget was too short for every mode to get its share)."""
    summaries = run.policies
    findings = [f for s in summaries for f in s.findings]
    print(f"\n{run.model}: {run.examples} prompts screened in {run.elapsed_s:.0f}s "
          f"({run.stopped}); {len(findings)} new signature(s), "
          f"{sum(f.is_new for f in findings)} saved to {run.corpus_dir}, "
          f"{sum(f.is_marginal for f in findings)} marginal (not saved)"
          f"{unmeasured_text(summaries)}")
    for f in findings:
        v, first = f.verdict, f.verdict.first_nonfinite
        bos = "on " if v.add_bos else "off"
        print(f"  {f.status:<16} {f.how:<11} {v.policy:<22} BOS {bos} "
              f"{first.kind} step {first.step} layer {first.layer} {first.site} "
              f"pos {first.position}  prompt {v.prompt!r}  -> {f.case_path}")
        if f.is_unmeasured:
            print(f"    measure and save it: {add_command(run, v)}")
    for s in summaries:
        for bos in s.bos_modes:
            counts = s.mode(bos)
            name = f"{s.policy} {'BOS' if bos else 'no-BOS'}"
            if counts.examples == 0:
                print(f"  warning: {name} screened no prompt (the budget was too short for "
                      "every mode: give a longer --budget or fewer --policies)", file=sys.stderr)
                continue
            note = " (saturated: every prompt failed at BOS under a known signature; given up)" \
                if counts.saturated else ""
            best = f", best content headroom {fmt_headroom(counts.best_headroom)}" \
                if math.isfinite(counts.best_headroom) else ""
            print(f"  {name:<28} {counts.examples:>6} prompts in {counts.seconds:5.0f}s, "
                  f"{counts.nonfinite} non-finite{best}{note}")
