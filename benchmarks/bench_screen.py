"""`fuzz screen` against what a user would write instead, side by side in one run.

On the real Gemma 3 270M, N plain prompts (benchmarks/make_prompts.py, seed 0; no BOS, 16 new
tokens), per policy (float32, bfloat16, float16) and batch size (8, 16, 32, 64):
  screen        fuzz.screen.job.screen: prompts sorted by length, batched by the session, rows
                that end dropped, the probe on every site, the default screening kernel;
  transformers  the ten-line loop: the same prompts in file order, left-padded batches through
                transformers' own Gemma3ForCausalLM (built from the same float32 state) and its
                batched generate(do_sample=False, max_new_tokens=16, output_logits=True), every
                step's logits checked for NaN/Inf;
  loop          one prompt at a time, no early stop (the upstream-style greedy loop of
                benchmarks/bench_throughput.py), on the first --loop prompts.
Figures: prompts/s (each the best of --repeats runs) and the useful GFLOP/s of what each computed
(prompt and generated tokens, the LM head only where logits are used) over this CPU's measured
F.linear peak for the dtype. The header prints the CPU's name and flags.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from _common import print_header, print_table
from bench_throughput import measure_matmuls, plain_greedy, run_flops
from make_prompts import draw_prompts

from fuzz.engine.zoo import load_model
from fuzz.generate import encode_prompt
from fuzz.precision import get_policy
from fuzz.prompts.files import PromptRecord
from fuzz.screen.job import ShardPlan, plan, screen
from fuzz.session import Session
from fuzz.verdict import Bounds

NEW_TOKENS = 16


def screen_once(loaded, policy: str, records: Sequence[PromptRecord], batch: int,
                bounds: Bounds) -> tuple[float, int, int]:
    """(seconds, useful FLOPs, prompts found non-finite) of one screen of every prompt."""
    session = Session(loaded, bounds=bounds, batch_size=batch)
    rows: list[dict] = []
    start = time.perf_counter()
    screen(session, [get_policy(policy)], ShardPlan.of(session, plan(records, [False])), set(),
           rows.extend)
    seconds = time.perf_counter() - start
    flops = sum(run_flops(loaded.config, r["prompt_tokens"], max(1, len(r["tokens"])))
                for r in rows if "prompt_tokens" in r)
    return seconds, flops, sum(r["status"] == "nonfinite" for r in rows)


def transformers_once(loaded, policy: str, ids: Sequence[list[int]], batch: int
                      ) -> tuple[float, int, int]:
    """(seconds, useful FLOPs, prompts with a non-finite step) of the ten-line loop."""
    model = loaded.engine(get_policy(policy), "cpu", "transformers").model
    pad, eos = loaded.tokenizer.pad_id, loaded.tokenizer.eos_id
    flops = nonfinite = 0
    start = time.perf_counter()
    for i in range(0, len(ids), batch):
        chunk = ids[i: i + batch]
        width = max(map(len, chunk))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=NEW_TOKENS, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=pad,
                                 eos_token_id=eos)
        bad = torch.zeros(len(chunk), dtype=torch.bool)
        for step_logits in out.logits:  # every step's logits, checked as a user would
            bad |= ~torch.isfinite(step_logits).all(dim=-1)
        nonfinite += int(bad.sum())
        generated = out.sequences[:, width:]
        for row, prompt in zip(generated.tolist(), chunk):
            steps = next((k + 1 for k, t in enumerate(row) if t == eos), len(row))
            flops += run_flops(loaded.config, len(prompt), steps)
    return time.perf_counter() - start, flops, nonfinite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000, help="prompts screened")
    parser.add_argument("--policies", default="float32,bfloat16,float16")
    parser.add_argument("--batches", default="8,16,32,64")
    parser.add_argument("--loop", type=int, default=32, help="prompts for the one-at-a-time loop")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each; the best")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    loaded = load_model("gemma3-270m")
    bounds = Bounds(max_new_tokens=NEW_TOKENS)
    texts = draw_prompts(args.prompts, 0, loaded.tokenizer.vocabulary())
    records = [PromptRecord(i, f"drawn:{i + 1}", t) for i, t in enumerate(texts)]
    runnable = [r for r in records if _fits(loaded, r.text, bounds)]
    ids = [encode_prompt(loaded.tokenizer, s.spec, bounds) for s in plan(runnable, [False])]
    print_header(f"fuzz screen vs transformers' batched generate() vs a one-at-a-time loop: "
                 f"real Gemma 3 270M, {len(runnable)} prompts (of {len(records)} drawn; the rest"
                 f" over {bounds.max_prompt_tokens} tokens), no BOS, {NEW_TOKENS} new tokens")
    peak = measure_matmuls()
    rows = []
    for policy in args.policies.split(","):
        dtype = str(get_policy(policy).dtype).removeprefix("torch.")
        model = loaded.engine(get_policy(policy), "cpu")
        plain_greedy(model, ids[0], 2)
        start = time.perf_counter()
        for x in ids[: args.loop]:
            plain_greedy(model, x, NEW_TOKENS)
        loop_rate = min(args.loop, len(ids)) / (time.perf_counter() - start)
        screen_once(loaded, policy, runnable[:8], 8, bounds)  # warm-up
        transformers_once(loaded, policy, ids[:8], 8)
        for batch in batches:
            s_s, s_flops, s_bad = min(screen_once(loaded, policy, runnable, batch, bounds)
                               for _ in range(args.repeats))
            t_s, t_flops, t_bad = min(transformers_once(loaded, policy, ids, batch)
                                      for _ in range(args.repeats))
            rows.append([policy, batch, f"{len(runnable) / s_s:.3g}",
                         f"{100 * s_flops / s_s / 1e9 / peak[dtype]:.1f}%",
                         f"{len(ids) / t_s:.3g}",
                         f"{100 * t_flops / t_s / 1e9 / peak[dtype]:.1f}%",
                         f"{t_s / s_s:.2f}x",
                         s_bad, t_bad, f"{loop_rate:.3g}"])
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    print_table(["policy", "batch", "screen p/s", "screen % of peak", "transformers p/s",
                 "transformers % of peak", "screen / transformers", "screen non-finite",
                 "transformers non-finite",
                 "loop p/s"], rows)
    return 0


def _fits(loaded, text: str, bounds: Bounds) -> bool:
    from fuzz.verdict import PromptSpec

    try:
        encode_prompt(loaded.tokenizer, PromptSpec(text, add_bos=False), bounds)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
