"""`python -m fuzz screen`: read the prompt files, screen, summarize, save, exit.

Exit 0 when every policy declared safe stayed finite on every prompt (with --fail-on-nonfinite:
every policy), 1 when one did not, 2 on bad input (a file, a line, an option: named, and nothing
written). A summary counts every line of the results file, the ones an earlier, killed run of the
same command wrote included.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fuzz.corpus import Case, Corpus
from fuzz.precision import PrecisionPolicy, parse_policies
from fuzz.prompts.chat import TemplateError
from fuzz.prompts.files import InputError, read_prompts
from fuzz.report.progress import CountProgress
from fuzz.screen.job import ShardPlan, parse_shard, plan, screen, spec_of
from fuzz.screen.report import console_text, write_report
from fuzz.screen.results import ResultsFile
from fuzz.screen.summary import PolicyScreen, summarize
from fuzz.session import DEFAULT_BATCH_SIZE, Session
from fuzz.shrink.robustness import finalize
from fuzz.verdict import Bounds, Signature

# A saved finding's minimizing stops after this long (a run gives a tenth of its budget, at least
# 20 s): real Gemma 3 270M findings took 14-24 s each to finalize (benchmarks/README.md,
# bench_finalize), so two minutes leaves room on a slower machine.
SAVE_TIME_S = 120.0


def screen_main(args: argparse.Namespace, session_options: Any, bounds: Bounds) -> int:
    records = read_prompts(args.prompts, args.field, args.separator)
    policies = parse_policies(args.policies)
    shard = parse_shard(args.shard) if args.shard else (1, 1)
    bos_modes = [True, False] if args.both_bos else [not args.no_bos]
    session = Session.open(session_options, bounds, args.batch_size or DEFAULT_BATCH_SIZE)
    session.min_margin = args.min_margin
    try:
        items = plan(records, bos_modes, session.model.chat_template)
    except TemplateError as err:
        raise InputError(str(err)) from None
    identity = {"model_fingerprint": session.model.fingerprint, "engine": session.engine_kind,
                "bounds": bounds.to_dict()}
    corpus = Corpus(Path(args.corpus))
    known = corpus.signatures(session.model.name)
    started = time.monotonic()
    with ResultsFile(args.out, identity) as results:
        work = ShardPlan.of(session, items, shard)
        progress = CountProgress(work.count(policies, results.done), "result", args.quiet)
        try:
            screen(session, policies, work, results.done, results.append, known,
                   tick=progress.tick)
        finally:
            progress.close()
        rows = list(results.rows)
    summaries = summarize(rows, policies)
    header = (f"{session.model.name}: {len(records)} prompts from {len(args.prompts)} "
              f"file(s), shard {shard[0]}/{shard[1]}, {len(rows)} result lines "
              f"({len(rows) - results.rows_before} new in {time.monotonic() - started:.0f}s)"
              + (f" in {args.out}" if args.out else ""))
    print(console_text(summaries, header))
    if args.save:
        for line in save_new(session, corpus, rows, policies, known, args.save_time):
            print(line)
    if args.report:
        facts = {"model": session.model.location or session.model.name,
                 "fingerprint": session.model.fingerprint, "engine": session.engine_kind,
                 "bounds": bounds.to_dict(), "prompt files": ", ".join(map(str, args.prompts)),
                 "prompts": len(records), "shard": f"{shard[0]}/{shard[1]}",
                 "result lines": len(rows)}
        for path in write_report(summaries, facts, args.report):
            print(f"report: {path}")
    return exit_code(summaries, args.fail_on_nonfinite)


def exit_code(summaries: list[PolicyScreen], any_policy: bool) -> int:
    broken = [p.policy for p in summaries if p.nonfinite and (p.expected_safe or any_policy)]
    if broken:
        which = "policies" if any_policy else "policies declared safe"
        print(f"FAILED: {which} went non-finite: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


def save_new(session: Session, corpus: Corpus, rows: list[dict[str, Any]],
             policies: list[PrecisionPolicy], known: set[Signature],
             save_time_s: float = SAVE_TIME_S,
             prefer: Callable[[dict[str, Any]], Any] = lambda row: len(row["prompt"])
             ) -> list[str]:
    """Each new signature's preferred prompt (the shortest, unless `prefer` ranks otherwise:
    lower first), minimized, measured under every kernel variation and saved when it holds
    everywhere, as `fuzz run` saves its findings."""
    shortest: dict[Signature, dict[str, Any]] = {}
    safe = {p.name for p in policies if p.expected_safe}
    for row in rows:
        if row["status"] != "nonfinite" or row.get("signature") is None:
            continue
        sig = Signature.from_list(row["signature"])
        if sig in known or sig.fingerprint != session.model.fingerprint:
            continue
        best = shortest.get(sig)
        if best is None or prefer(row) < prefer(best):
            shortest[sig] = row
    lines = []
    for sig, row in shortest.items():
        step = row["first_nonfinite"]["step"]
        assessment = finalize(session, spec_of(row), row["policy"], sig, step,
                              deadline=time.monotonic() + save_time_s, measure_deadline=math.inf)
        where = f"{row['source']} ({row['policy']}, {row['bos_mode']})"
        if not assessment.robust:
            lines.append(f"marginal, not saved ({assessment.robustness.reason}): {where}")
            continue
        case = Case.of_assessment(session, assessment, strategy=f"fuzz screen {row['source']}")
        result = corpus.save(case)
        regression = " (a policy declared safe: a regression)" if row["policy"] in safe else ""
        lines.append(f"{result.status}: {result.path}  {where}{regression}, minimized to "
                     f"{assessment.spec.text!r}")
    if not shortest:
        lines.append("no new signature to save: every failure is under a signature the corpus "
                     "holds")
    return lines
