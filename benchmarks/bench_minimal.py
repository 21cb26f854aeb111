"""Are saved cases 1-minimal? `fuzz run` on planted models, then every single-character deletion
of each saved prompt, run alone with the faithful kernel.

A saved case is 1-minimal when no single-character deletion still fails with its signature at
the margin a case needs (fuzz.margin.MIN_MARGIN): what minimizing (fuzz.shrink.minimize) must
reach unless time stops it. Models: `tiny-count-6` (any 6 words of a 3-word family, anywhere:
filler between them must be removed, fuzz.engine.synthetic.count), `tiny-digit-run-24` (24
consecutive digits, fuzz.engine.synthetic.planted) and `tiny-planted` (the token "7"). Each run
is `fuzz run`'s job (fuzz.run.FuzzJob) with its default settings, float16 in both BOS modes, an
empty corpus and no example database, for the budget given (3 minutes by default).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import print_header, print_table

from fuzz.corpus import Corpus
from fuzz.engine.zoo import load_model
from fuzz.margin import passes_margin
from fuzz.precision import parse_policies
from fuzz.run import FuzzJob
from fuzz.session import Session
from fuzz.shrink.minimize import surviving_deletions
from fuzz.verdict import Bounds, PromptSpec

MODELS = ("tiny-count-6", "tiny-digit-run-24", "tiny-planted")


def run_and_check(model: str, seed: int, budget_s: float) -> list[list[object]]:
    """One `fuzz run` on `model`; a row per saved case: its prompt and how many of its
    single-character deletions still fail the same way."""
    session = Session(load_model(model), bounds=Bounds(), batch_size=8)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-minimal-") as tmp:
        corpus = Corpus(Path(tmp) / "corpus")
        job = FuzzJob(session, parse_policies("float16"), [True, False], budget_s, corpus,
                      None, seed, 40, None, quiet=True)
        began = time.monotonic()
        job.main()
        wall = time.monotonic() - began
        for loaded in corpus.cases(session.model.name):
            case = loaded.case
            spec = PromptSpec(case.prompt, case.add_bos, case.chat)
            bounds = Bounds(**case.bounds)
            survivors = surviving_deletions(
                session, spec, case.policy, case.signature, bounds,
                keeps=lambda _spec, v: passes_margin(v, session.min_margin))
            record = getattr(case, "minimization", None) or {}
            rows.append([model, seed, f"{wall:.0f}", "BOS" if case.add_bos else "no-BOS",
                         repr(case.prompt), len(case.prompt), len(survivors),
                         "yes" if not survivors else "no", record.get("state", "-")])
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=180.0, help="seconds per run")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    print_header(f"saved cases' 1-minimality: fuzz run, float16, both BOS modes, budget "
                 f"{args.budget:.0f}s, models {args.models}, seeds {args.seeds}")
    rows = []
    for model in args.models.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += run_and_check(model, seed, args.budget)
    print_table(["model", "seed", "job s", "mode", "saved prompt", "chars",
                 "deletions that still fail", "1-minimal", "recorded"], rows)
    minimal = sum(r[7] == "yes" for r in rows)
    print(f"\n1-minimal saved cases: {minimal}/{len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
