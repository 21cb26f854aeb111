"""Are saved cases 1-minimal? `fuzz run` on planted models, then every single-character deletion
of each saved prompt, run alone with the faithful kernel.

A saved case is 1-minimal when no single-character deletion still fails with its signature at
the margin a case needs (fuzz.margin.MIN_MARGIN): what minimizing (fuzz.shrink.minimize) must
reach unless time stops it. Models: `tiny-count-5` (any 5 words of a 3-word family, anywhere:
filler between them must be removed, fuzz.engine.synthetic.count), `tiny-digit-run-24` (24
consecutive digits, fuzz.engine.synthetic.planted) and `tiny-planted` (the token "7"). Each run
is `fuzz run`'s job (fuzz.run.FuzzJob) with its default settings, float16 in both BOS modes, an
empty corpus and no example database, for the budget given (3 minutes by default).

`--constructed N` also minimizes N long count-trigger findings built here (6 family words at
seeded random places among filler words, 60-100 characters, each checked to fail), as a 3-minute
run would (fuzz.shrink.robustness.finalize, minimizing cut at the finding's time limit of a
3-minute budget, 20 s): the same inputs for every version of the minimizer.
"""
from __future__ import annotations

import argparse
import random
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
from fuzz.shrink.robustness import finalize
from fuzz.verdict import Bounds, PromptSpec

MODELS = ("tiny-count-5", "tiny-digit-run-24", "tiny-planted")
FAMILY = ("nan", "inf", "value")  # fuzz.engine.synthetic.count.FAMILY
FILLER = ("the", "is", "for", "because", "tensor", "gradient", "kernel", "matrix", "and", "of",
          "12", "3.5", "x", "=", ";", "(", ")", "layer", "float", "token")
FINDING_LIMIT_S = 20.0  # fuzz.search.schedule: a tenth of a 3-minute budget, at least 20 s


def constructed_findings(n: int, seed: int = 0) -> list[str]:
    """n prompts of 60-100 characters holding exactly 6 family words (each after a space)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        words = [rng.choice(FILLER) for _ in range(rng.randint(8, 14))]
        for _ in range(6):
            words.insert(rng.randint(1, len(words)), rng.choice(FAMILY))
        text = "x " + " ".join(words)
        if 60 <= len(text) <= 100:
            out.append(text)
    return out


def minimize_constructed(n: int) -> list[list[object]]:
    session = Session(load_model("tiny-count-6"), bounds=Bounds(max_new_tokens=1),
                      batch_size=8)
    rows = []
    for text in constructed_findings(n):
        spec = PromptSpec(text)
        found = session.run([spec], "float16")[0]
        sig = session.signature(found)
        if sig is None:
            raise AssertionError(f"{text!r} was built to fail, and did not")
        began = time.monotonic()
        assessment = finalize(session, spec, "float16", sig, 0,
                              deadline=began + FINDING_LIMIT_S)
        seconds = time.monotonic() - began
        survivors = surviving_deletions(
            session, assessment.spec, "float16", sig, session.capped(0),
            keeps=lambda _spec, v: passes_margin(v, session.min_margin))
        record = getattr(assessment, "minimization", None) or {}
        rows.append([len(text), repr(assessment.spec.text), len(assessment.spec.text),
                     f"{seconds:.1f}", len(survivors), "yes" if not survivors else "no",
                     record.get("state", "-")])
        print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    return rows


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
    parser.add_argument("--models", default=",".join(MODELS),
                        help="'' runs no search (with --constructed: only those)")
    parser.add_argument("--constructed", type=int, default=0,
                        help="also minimize this many constructed count-trigger findings")
    args = parser.parse_args(argv)
    print_header(f"saved cases' 1-minimality: fuzz run, float16, both BOS modes, budget "
                 f"{args.budget:.0f}s, models {args.models}, seeds {args.seeds}")
    rows = []
    for model in filter(None, args.models.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += run_and_check(model, seed, args.budget)
    if rows:
        print_table(["model", "seed", "job s", "mode", "saved prompt", "chars",
                     "deletions that still fail", "1-minimal", "recorded"], rows)
        minimal = sum(r[7] == "yes" for r in rows)
        print(f"\n1-minimal saved cases: {minimal}/{len(rows)}")
    if args.constructed:
        built = minimize_constructed(args.constructed)
        print_table(["chars found", "minimized prompt", "chars", "s", "deletions that still fail",
                     "1-minimal", "recorded"], built)
        minimal = sum(r[5] == "yes" for r in built)
        print(f"\n1-minimal constructed findings: {minimal}/{len(built)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
