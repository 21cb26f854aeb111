"""Long generations on the real Gemma 3 270M (fuzz.long): cost per prompt and headroom past the
512-token sliding window.

Draws --prompts long prompts from the long strategy (fuzz.strategies.long: 513..1024 tokens,
seeded), runs each under --policy without BOS with the long bounds (128 decode steps), alone and
in batches of fuzz.long.LONG_BATCH_SIZE, and re-runs each alone with fuzz.positions' recorder to
read max |x| / limit per position. Prints, per prompt: tokens, positions reached, status, seconds
alone, the least headroom (limit / max |x|) over positions >= 512 and over positions < 512;
then seconds per prompt alone and batched.
"""
from __future__ import annotations

import argparse
import time

from _common import print_header, print_table
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from fuzz.long import LONG_BATCH_SIZE, long_bounds, long_strategy
from fuzz.positions import session_position_map
from fuzz.session import ModelOptions, Session
from fuzz.strategies import SLIDING_WINDOW
from fuzz.verdict import PromptSpec


def draw(session: Session, n: int, seed: int) -> list[str]:
    out: list[str] = []

    @settings(max_examples=2 * n + 5, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(long_strategy(session))
    def collect(text: str) -> None:
        out.append(text)

    hypothesis_seed(seed)(collect)()
    return list(dict.fromkeys(out))[:n]


def headroom(peak: float) -> float:
    return float("inf") if peak == 0 else 1.0 / peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", default="float16")
    args = parser.parse_args()
    print_header(f"long generations, gemma3-270m, {args.policy}, no BOS, {args.prompts} prompts "
                 f"(seed {args.seed})")
    session = Session.open(ModelOptions("gemma3-270m", device="cpu"), long_bounds(),
                           batch_size=LONG_BATCH_SIZE)
    specs = [PromptSpec(t, add_bos=False) for t in draw(session, args.prompts, args.seed)]
    rows, alone_s = [], 0.0
    for spec in specs:
        started = time.perf_counter()
        verdict = session.run_on([spec], args.policy, None, session.device, 1)[0]
        seconds = time.perf_counter() - started
        alone_s += seconds
        m = session_position_map(session, spec, verdict)
        below = max((v for row in m.ratio for p, v in zip(m.positions, row)
                     if v is not None and p < SLIDING_WINDOW), default=0.0)
        rows.append([len(verdict.prompt_ids), len(m.positions), verdict.status,
                     f"{seconds:.1f}", f"{headroom(m.peak(SLIDING_WINDOW)):.3g}",
                     f"{headroom(below):.3g}",
                     (f"step {verdict.first_nonfinite.step}, layer {verdict.first_nonfinite.layer}"
                      f", {verdict.first_nonfinite.site}, position "
                      f"{verdict.first_nonfinite.position}") if verdict.nonfinite else ""])
        print(f"# prompt {len(rows)}/{len(specs)}: {rows[-1]}", flush=True)  # progress
    print_table(["prompt tokens", "positions reached", "status", "seconds alone",
                 f"least headroom at positions >= {SLIDING_WINDOW}",
                 f"least headroom at positions < {SLIDING_WINDOW}", "first non-finite"], rows)
    started = time.perf_counter()
    session.run(specs, args.policy)
    batched_s = time.perf_counter() - started
    print(f"# seconds per prompt: alone {alone_s / len(specs):.1f}, batched "
          f"({LONG_BATCH_SIZE} rows) {batched_s / len(specs):.1f}; policy {args.policy}, "
          f"native kernels, {session.bounds.max_new_tokens} decode steps at most")


if __name__ == "__main__":
    main()
