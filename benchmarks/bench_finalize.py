"""What a finding costs between its discovery and its regression case: minimizing and measuring.

Four findings of a fuzz run on the real Gemma 3 270M (FINDINGS: float16, BOS off, the prompts as
the search met them, before any minimizing), each taken to its case by fuzz.shrink.robustness's
finalize in three ways, side by side in one run:
  every deletion   the kernel variations (fuzz.shrink.robustness.check_robustness: alone and
  batched,
                   1 and 2 threads, native and float32-accumulated products) checked on every
                   deletion the minimizer accepts, candidate batches native: finalize before
                   2026-12-06;
  once             fuzz.shrink.robustness.finalize: deletions keep the signature and the margin, the
                   variations are checked on the minimized prompt (bisecting back to the last
                   accepted prompt that holds when it does not), candidate batches native;
  once, screening  the same, candidate batches under fp32-accumulate-wide, the screening kernel
                   `auto` picks on a CPU without avx512_fp16 (fuzz.engine.kernels), hits
                   confirmed alone natively.
Figures per finding and way: seconds (minimizing, explaining, the margin's float32 run and every
variation), check_robustness calls, the saved prompt's length and whether it is a regression
case. The saved prompts should agree across the ways: the faster ones must not save less.
"""
from __future__ import annotations

import argparse
import sys
import time

from _common import print_header, print_table

import fuzz.shrink.robustness
from fuzz.engine.zoo import load_model
from fuzz.margin import passes_margin
from fuzz.session import Session
from fuzz.shrink.minimize import minimize_text
from fuzz.shrink.robustness import assess, finalize
from fuzz.verdict import Bounds, PromptSpec

POLICY = "float16"
# Met by bench_search_real.py's random searcher (seed 1, 2026-12-05; the second while Hypothesis
# shrank the first): first non-finite at step 0, layer 11 / 10 residual_mlp, 14 residual_attn
# (margin 1.024 alone, 1.018 batched: marginal), 13 residual_mlp.
FINDINGS = (
    "v83.74.61.32a1 SELECT a.id, b.value FROM a LEFT JOIN b ON a.id = b.a_id; \u0658\u0609",
    "83.74.61.2a1 SELECT a.id, b.value FROM a LEFT JOIN b ON a.id = b.a_id; \u0658\u0609",
    "<start_of_turn>user\n" + "\u2014" * 51 + " ={, \u0e43\u0e4e\u0e37\u0e43\u0e4f\u0e31\u0e5b"
    "\u0e0f\u0e38\u0e2d\u0e1a\u0e56\u0e45\u0e17\u0e4e\u0e41Translate into French: the DNS costs "
    "17/09/1903. |!!!\u6ce8\u610f\u6a5f\u69cb\u306f\u91cd\u8981\u3067\u3059<end_of_turn>\n"
    "<start_of_turn>model\n",
    "<start_of_turn>user\n%) ------------;\u2014\u0e04\u0e08\u0e44\u0e0e\u0e1c\u0e2c\u0e52\u0e47,"
    " The thermodynamics of the epoll is 5525601026. 379076423338009820 !)[, 19/03/1964pH"
    "<end_of_turn>\n<start_of_turn>model\n",
)
WAYS = ("every deletion", "once", "once, screening")


def finalize_every_deletion(session: Session, spec: PromptSpec, sig, step: int):
    """finalize as it was before 2026-12-06: every accepted deletion checked under every
    variation."""
    capped = session.capped(step)

    def holds(candidate: PromptSpec, alone) -> bool:
        return passes_margin(alone, session.min_margin) and fuzz.shrink.robustness.check_robustness(
            session, candidate, POLICY, sig, capped).robust

    start = session.run([spec], POLICY, capped)[0]
    if start.nonfinite and session.signature(start) == sig and holds(spec, start):
        spec = minimize_text(session, spec, POLICY, sig, capped, keeps=holds, found=start).spec
    return assess(session, spec, POLICY)


def measure(session: Session, way: str, spec: PromptSpec) -> list:
    calls = []
    real = fuzz.shrink.robustness.check_robustness

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    session.screen_kernel = "fp32-accumulate-wide" if way == "once, screening" else "native"
    found = session.run([spec], POLICY)[0]
    sig, step = session.signature(found), found.first_nonfinite.step
    fuzz.shrink.robustness.check_robustness = counted
    try:
        start = time.perf_counter()
        if way == "every deletion":
            assessment = finalize_every_deletion(session, spec, sig, step)
        else:
            assessment = finalize(session, spec, POLICY, sig, step)
        seconds = time.perf_counter() - start
    finally:
        fuzz.shrink.robustness.check_robustness = real
    first = found.first_nonfinite
    return [f"L{first.layer} {first.site}, {len(spec.text)} chars", way, f"{seconds:.1f}",
            len(calls), len(assessment.spec.text),
            "robust" if assessment.robust else f"marginal: {assessment.robustness.reason}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--findings", type=int, default=len(FINDINGS),
                        help=f"how many of the {len(FINDINGS)} findings to take")
    args = parser.parse_args(argv)
    print_header(f"finalize on {args.findings} real Gemma 3 270M findings, float16, BOS off; "
                 f"ways: {', '.join(WAYS)}")
    session = Session(load_model("gemma3-270m"), bounds=Bounds(), batch_size=8)
    # first-call costs (the float32 weight copies of fp32-accumulate) outside the timings
    warm = PromptSpec(FINDINGS[0], add_bos=False)
    finalize(session, warm, POLICY, session.signature(session.run([warm], POLICY)[0]), 0,
             deadline=0.0)
    rows = []
    for text in FINDINGS[: args.findings]:
        for way in WAYS:
            rows.append(measure(session, way, PromptSpec(text, add_bos=False)))
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    print_table(["finding (first non-finite, as found)", "variations checked", "seconds",
                 "check_robustness calls", "saved chars", "case"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
