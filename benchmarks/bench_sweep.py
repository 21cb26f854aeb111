"""`fuzz sweep`'s rate on the real Gemma 3 270M, float16: tokens/s per screening kernel and batch
size, side by side in one run, against this CPU's measured F.linear peak.

Each configuration (kernel x batch size) sweeps the same --tokens slice after the same prefix
(fuzz.next_token.SweepRunner, as the command runs it, the native re-runs of near misses not
counted); the configurations run in a rotated order, --repeats times, so that a busy machine
slows them alike. Figures: median tokens/s with the min-max spread over the repeats, the useful
GFLOP/s (fuzz.next_token.flops_per_token: the layers, no LM head), and that over the best F.linear
GFLOP/s of the dtype the products run in (float32 for fp32-accumulate-wide, float16 for native:
bench_throughput.measure_matmuls). Also whether the two kernels agree on every token's verdict,
and their largest relative difference in least headroom.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import print_header, print_table
from bench_throughput import measure_matmuls

from fuzz.engine.zoo import load_model
from fuzz.next_token import SweepRunner, flops_per_token, make_prefix
from fuzz.precision import get_policy
from fuzz.session import Session

KERNEL_DTYPE = {"native": "float16", "fp32-accumulate-wide": "float32"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="20000:22048", help="START:END of the token slice")
    parser.add_argument("--batches", default="64,256,512")
    parser.add_argument("--kernels", default="native,fp32-accumulate-wide")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--after-ids", default="", help="the prefix (comma-separated ids)")
    args = parser.parse_args(argv)
    start, end = (int(x) for x in args.tokens.split(":"))
    tokens = list(range(start, end))
    batches = [int(b) for b in args.batches.split(",")]
    kernels = args.kernels.split(",")
    print_header(f"fuzz sweep rate: real Gemma 3 270M, float16, tokens {start}..{end - 1}, "
                 f"prefix ids [{args.after_ids}], batches {batches}, kernels {kernels}, "
                 f"{args.repeats} repeats")
    loaded = load_model("gemma3-270m")
    session = Session(loaded)
    engine = session.engine(get_policy("float16"))
    prefix_ids = [int(i) for i in args.after_ids.split(",") if i]
    runner = SweepRunner(engine, make_prefix(loaded.tokenizer, None, prefix_ids, False),
                         loaded.config.num_hidden_layers)
    flops = flops_per_token(loaded.config, len(prefix_ids))
    configs = [(k, b) for k in kernels for b in batches]
    rates: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    verdicts: dict[str, dict[int, tuple[bool, float]]] = {}
    for k in kernels:  # warm-up: kernel selection, the float32 weight copies
        runner.run(tokens[:64], k)
    for repeat in range(args.repeats):
        for kernel_name, batch in configs[repeat % len(configs):] + configs[:repeat % len(configs)]:
            began = time.perf_counter()
            for i in range(0, len(tokens), batch):
                for r in runner.run(tokens[i: i + batch], kernel_name):
                    verdicts.setdefault(kernel_name, {})[r.token_id] = (r.first is None,
                                                                        r.least_headroom)
            rates[(kernel_name, batch)].append(len(tokens) / (time.perf_counter() - began))
            print(f"{kernel_name} batch {batch}: {rates[(kernel_name, batch)][-1]:.0f} tokens/s",
                  file=sys.stderr, flush=True)
    peak = measure_matmuls()
    rows = []
    for kernel_name, batch in configs:
        r = rates[(kernel_name, batch)]
        med = statistics.median(r)
        dtype = KERNEL_DTYPE.get(kernel_name, "float16")
        useful = med * flops / 1e9
        rows.append([kernel_name, batch, f"{med:.0f}", f"{min(r):.0f}-{max(r):.0f}",
                     f"{useful:.1f}", dtype, f"{100 * useful / peak[dtype]:.0f}%",
                     f"{262144 / med / 60:.1f}"])
    print(f"\n## Sweep rate ({flops / 1e9:.3f} GFLOP per token without the LM head)")
    print_table(["kernel", "batch", "median tokens/s", "min-max", "useful GFLOP/s",
                 "products in", "of that dtype's F.linear peak", "whole vocabulary (min)"], rows)
    if len(verdicts) == 2:
        a, b = (verdicts[k] for k in kernels)
        differ = [t for t in tokens if a[t][0] != b[t][0]]
        finite = [t for t in tokens if a[t][0] and b[t][0]]
        rel = max((abs(a[t][1] - b[t][1]) / a[t][1] for t in finite), default=0.0)
        print(f"\nverdicts that differ between {kernels[0]} and {kernels[1]}: {len(differ)} of "
              f"{len(tokens)}; largest relative difference in least headroom: {rel:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
