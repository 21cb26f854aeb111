"""Do gradient-guided swaps (fuzz.search.proposals) bring real near misses closer to overflow than
random swaps?

On the real Gemma 3 270M, float16 without BOS: draws prompts from the default strategy (Hypothesis,
fixed seed), screens them, re-runs the NEAR finite ones with the lowest content headroom alone
(the canonical verdict), and for each near miss screens
  gradient     k HotFlip swaps as fuzz.search.proposals.propose gives them (one forward + backward;
               spread: each position's best swap first, then each one's second best, ...);
  gradient/top the k best scores overall (spread=False: they pile onto one position);
  random       k random single-token swaps of the same kind (text pieces, exact
               re-tokenization: fuzz.search.proposals.random_swaps), the baseline.
Figures per near miss: the best (lowest) content headroom of each arm's k prompts (0 when one
overflowed), how many overflowed; then how often each arm's best lowered the headroom, the
median change, how many near misses got an overflow, how many swaps overflowed, and the
gradient's cost (seconds of forward + backward + scoring + decoding).

Measured 2026-12-02 (2-core x86-64 with avx512_fp16, seeds 1, 2, 3; 30 near misses, content
headroom 1.02-1.78, worst sites layer 14 residual_attn and layer 17 residual_mlp):
| arm          | near misses with an overflow | overflowing swaps |
|--------------|------------------------------|-------------------|
| gradient     | 22/30 (9, 6, 7)              | 32/240            |
| gradient/top | 17/30 (4, 8, 5)              | 38/240            |
| random       | 15/30 (4, 6, 5)              | 23/240            |
"Best of 8 lowered the headroom" held for 26-28 of 30 in every arm (any 8 edits of a no-BOS
prompt spread its headroom widely), so it does not tell the arms apart. Gradient cost: median
0.40 s per near miss on a quiet machine (0.45-2.9 s medians under other load).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from _common import print_header, print_table
from bench_margins import draw

from fuzz.search.proposals import random_swaps, rank_swaps
from fuzz.session import ModelOptions, Session
from fuzz.verdict import Bounds, PromptSpec, Verdict

POLICY = "float16"


def best_headroom(session: Session, texts: list[str]) -> tuple[float, int]:
    """The lowest content headroom among the prompts (0 for an overflow), and the overflows."""
    if not texts:
        return float("nan"), 0
    verdicts = session.run([PromptSpec(t, add_bos=False) for t in texts], POLICY)
    return (min(v.min_headroom(content_only=True) for v in verdicts),
            sum(v.nonfinite for v in verdicts))


def near_misses(session: Session, count: int, prompts: int, seed: int) -> list[Verdict]:
    specs = [s for s in (PromptSpec(t, add_bos=False) for t in draw(prompts, seed))
             if session.runnable(s)]
    specs = list({s.text: s for s in specs}.values())  # Hypothesis repeats some draws
    finite = sorted((v for v in session.run(specs, POLICY) if v.finite),
                    key=lambda v: v.min_headroom(content_only=True))
    alone = [session.run([PromptSpec(v.prompt, add_bos=False)], POLICY)[0]
             for v in finite[:count]]
    return [v for v in alone if v.finite]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--near-misses", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=80, help="fresh prompts to draw")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print_header(f"gradient vs random single-token swaps of {args.near_misses} real near misses "
                 f"(gemma3-270m, {POLICY}, no BOS, k={args.k}, seed {args.seed})")
    session = Session.open(ModelOptions("gemma3-270m", device="cpu"), Bounds(), batch_size=8)
    started = time.perf_counter()
    misses = near_misses(session, args.near_misses, args.prompts, args.seed)
    print(f"# {len(misses)} near misses from {args.prompts} prompts in "
          f"{time.perf_counter() - started:.0f} s")
    rng = random.Random(args.seed)
    arms = ("gradient", "gradient/top", "random")
    rows, seconds, tried, skipped = [], [], 0, 0
    changes: dict[str, list[float]] = {a: [] for a in arms}
    overflowed: dict[str, int] = dict.fromkeys(arms, 0)
    swaps: dict[str, list[int]] = {a: [0, 0] for a in arms}  # [overflowing, screened]
    for v in misses:
        before = v.min_headroom(content_only=True)
        ranked = rank_swaps(session, v, args.k)
        seconds.append(ranked.seconds)
        tried, skipped = tried + ranked.tried, skipped + ranked.retokenized
        top = rank_swaps(session, v, args.k, spread=False)
        texts = {"gradient": ranked.texts, "gradient/top": top.texts,
                 "random": random_swaps(session, v, args.k, rng)}
        results = {arm: best_headroom(session, t) for arm, t in texts.items()}
        for arm, (after, overflows) in results.items():
            changes[arm].append(after - before)
            overflowed[arm] += overflows > 0
            swaps[arm][0] += overflows
            swaps[arm][1] += len(texts[arm])
        proposed = f"{len(ranked.edits)}/{len(top.edits)}"
        rows.append([repr(v.prompt[:32]), len(v.prompt_ids), proposed,
                     f"{ranked.layer}/{ranked.site}",
                     before, *(f"{h:.3f} ({n})" for h, n in results.values()),
                     f"{ranked.seconds:.2f}"])
    print_table(["near miss", "tokens", "proposed", "worst site", "headroom",
                 *(f"{a}: best (overflows)" for a in arms), "gradient s"], rows)
    print_table(["arm", "best of k lowered the headroom", "median change",
                 "near misses with an overflow", "overflowing swaps"],
                [[a, f"{sum(c < 0 for c in changes[a])}/{len(changes[a])}",
                  f"{statistics.median(changes[a]):+.3f}" if changes[a] else "n/a",
                  f"{overflowed[a]}/{len(rows)}", f"{swaps[a][0]}/{swaps[a][1]}"] for a in arms])
    print(f"# gradient cost: median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s "
          f"per near miss (forward + backward + [T, V] scores + decoding); re-tokenization "
          f"skipped {skipped} of {tried} candidates decoded")


if __name__ == "__main__":
    main()
