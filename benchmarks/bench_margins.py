"""How far past the float16 limit do raw findings go, and which of them flip between kernels?

The measurement behind fuzz.shrink.robustness.MIN_MARGIN. On the real Gemma 3 270M, float16 without
BOS (the mode where findings depend on the prompt), it screens prompts drawn from the default
strategy plus random edits of the nearest misses (fuzz.search.round.mutate), and for every prompt
that
overflows
alone (a raw finding) it records the margin (the unrounded sum at the first non-finite residual
add over 65504, fuzz.probe) and runs every kernel variation of fuzz.shrink.robustness (alone /
inside a mixed batch, 1 / all threads). It then minimizes some findings WITHOUT any margin
constraint, as the suite did before, to show where minimizing walks.

Output: per margin band, how many raw findings there were and how many held under every
variation (same signature everywhere); the fraction that would be marginal at MIN_MARGIN.
"""
from __future__ import annotations

import argparse
import random
import time

from _common import print_header, print_table
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from fuzz.margin import MIN_MARGIN
from fuzz.session import ModelOptions, Session
from fuzz.shrink.minimize import minimize_text
from fuzz.shrink.robustness import check_robustness
from fuzz.strategies import prompts
from fuzz.verdict import Bounds, PromptSpec

POLICY = "float16"
BANDS = (1.0, 1.005, 1.01, 1.02, 1.05, float("inf"))
# Small edits that move a near miss across the limit: digits, and the punctuation and lone spaces
# that form secondary attention sinks (docs/NUMERICS.md).
EDIT_PIECES = (" 0", " 1", " 7", "0", ",", ".", " ", "\n", " 0 0", " 30")


def mutate(text: str, rng: random.Random) -> str:
    """One random edit of a near miss: insert a piece, delete a character, or append a piece
    (more raw findings to measure than fresh draws give)."""
    i = rng.randrange(len(text) + 1)
    kind = rng.randrange(3)
    if kind == 0:
        return text[:i] + rng.choice(EDIT_PIECES) + text[i:]
    if kind == 1 and len(text) > 1:
        return text[:i] + text[i + 1:]
    return text + rng.choice(EDIT_PIECES)


def draw(n: int, seed: int) -> list[str]:
    """n prompts from the default strategy, reproducibly (Hypothesis with a fixed seed)."""
    out: list[str] = []

    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(prompts(max_chars=200))
    def collect(text: str) -> None:
        out.append(text)

    hypothesis_seed(seed)(collect)()
    return out


def band(margin: float | None) -> str:
    if margin is None:
        return "no margin (not a residual add)"
    for lo, hi in zip(BANDS, BANDS[1:]):
        if lo <= margin < hi:
            return f"[{lo}, {hi})"
    return "< 1.0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=400, help="fresh prompts to draw")
    parser.add_argument("--mutants", type=int, default=200, help="edits of near misses")
    parser.add_argument("--minimize", type=int, default=6, help="findings to minimize")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print_header(f"raw float16 findings on gemma3-270m without BOS: margins and kernel flips "
                 f"({args.prompts} prompts + {args.mutants} mutants, seed {args.seed})")
    session = Session.open(ModelOptions("gemma3-270m", device="cpu"), Bounds(), batch_size=8)
    session.min_margin = 0.0  # judge flips under the variations alone; margins are tabled below
    started = time.perf_counter()
    texts = draw(args.prompts, args.seed)
    specs = [s for s in (PromptSpec(t, add_bos=False) for t in texts) if session.runnable(s)]
    screened = session.screen(specs, POLICY, set())
    near = sorted((r.verdict for r in screened if r.verdict.finite),
                  key=lambda v: v.min_headroom(True))[:8]
    rng = random.Random(args.seed)
    edits = [mutate(near[i % len(near)].prompt, rng) for i in range(args.mutants)] if near else []
    edit_specs = [s for s in (PromptSpec(t, add_bos=False) for t in edits) if session.runnable(s)]
    screened += session.screen(edit_specs, POLICY, set())
    raw = [r for r in screened if r.verdict.nonfinite]
    print(f"# screened {len(screened)} prompts in {time.perf_counter() - started:.0f} s: "
          f"{len(raw)} raw findings")

    rows: dict[str, list[int]] = {}
    examples = []
    for r in raw:
        spec = PromptSpec(r.verdict.prompt, add_bos=False)
        capped = session.capped(r.verdict.first_nonfinite.step)
        rob = check_robustness(session, spec, POLICY, r.signature, capped)
        counts = rows.setdefault(band(r.verdict.margin), [0, 0])
        counts[0] += 1
        counts[1] += rob.robust
        examples.append((r.verdict.margin, rob, r.verdict.first_nonfinite.step))
    print_table(["margin band (unrounded sum / 65504)", "raw findings",
                 "held under every variation", "flipped"],
                [[k, n, ok, n - ok] for k, (n, ok) in sorted(rows.items())])
    flips = [m for m, rob, _ in examples if not rob.robust and m is not None]
    print(f"# largest margin that flipped: {max(flips) if flips else 'none'}")
    prefill = [(m, rob) for m, rob, step in examples if step == 0]
    print(f"# prefill findings (step 0): {len(prefill)}, flipped: "
          f"{sum(not rob.robust for _, rob in prefill)}; decode-step findings: "
          f"{len(examples) - len(prefill)}, flipped: "
          f"{sum(not rob.robust for _, rob, step in examples if step > 0)}")
    marginal = sum(1 for m, rob, _ in examples if not rob.robust or m is None or m < MIN_MARGIN)
    print(f"# marginal at MIN_MARGIN={MIN_MARGIN} (or flipping): {marginal}/{len(examples)} "
          f"= {marginal / max(1, len(examples)):.0%}")
    for m, rob, step in examples:
        if not rob.robust:
            print(f"#   flip at margin {m} (step {step}): {rob.reason}")

    minimized = []
    for r in raw[: args.minimize]:
        spec = PromptSpec(r.verdict.prompt, add_bos=False)
        result = minimize_text(session, spec, POLICY, r.signature,
                               session.capped(r.verdict.first_nonfinite.step))
        small, verdict = result.spec, result.verdict
        after = verdict.margin if verdict is not None else r.verdict.margin
        minimized.append([repr(r.verdict.prompt[:40]), r.verdict.margin, repr(small.text[:40]),
                          after])
    if minimized:
        print("# minimizing without a margin constraint (the suite before fuzz.shrink.robustness):")
        print_table(["raw prompt", "margin", "minimized", "margin after"], minimized)


if __name__ == "__main__":
    main()
