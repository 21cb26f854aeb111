"""fuzz.monitor's overhead on a user's own generate(), side by side in one run.

On the real Gemma 3 270M, float32 and float16, the same prompts (bench_throughput's set, BOS off,
the first --prompts), --new-tokens greedy tokens each (every step runs: the loops do not stop at
EOS), timed without and with `fuzz.monitor.watch(model, on_nonfinite=<no-op>)` around each
generate() (attach and detach included), alternating (ABBA) per prompt so that load from other
processes hits both sides alike:
- builtin: fuzz.engine.model.GemmaForCausalLM (`load_model("gemma3-270m").engine(policy)`) with
  bench_throughput's plain greedy loop (prefill, then one forward per token, no recorder);
- transformers: `Gemma3ForCausalLM.from_pretrained(dir, gguf_file=...)` on the same GGUF, its own
  `model.generate(do_sample=False, min_new_tokens=max_new_tokens=N)`.
The no-op callback keeps a run that overflows (float16) going, so both sides do the same work.
Figures: wall and CPU seconds (this process), per prompt the best of --repeats tries per side,
summed; the ratios with / without; and the seconds spent inside the monitor's callbacks (site
reductions, per-forward begin/end and host transfer), which on the CPU is the work the monitor
adds: the figure a busy shared machine skews least.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import print_header, print_table  # noqa: E402
from bench_throughput import PROMPTS, plain_greedy  # noqa: E402

from fuzz import monitor  # noqa: E402
from fuzz.engine.zoo import load_model, real_gguf_path  # noqa: E402
from fuzz.precision import get_policy  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def ignore(_err: monitor.NonFiniteError) -> None:
    """on_nonfinite for timing: neither stop nor log, so every run does the same work."""


class InMonitor:
    """Seconds spent inside the monitor's callbacks (each site's reduction, the begin and end of
    each forward with its host transfer). On the CPU every op runs synchronously, so this is the
    work the monitor adds, hook dispatch aside: a figure that other processes on a shared machine
    skew far less than a difference of two wall times."""

    def __init__(self) -> None:
        self.seconds, self._depth = 0.0, 0

    def wrap(self, fn: Callable[..., object]) -> Callable[..., object]:
        def timed_fn(*args: object, **kwargs: object) -> object:
            self._depth += 1  # Probe.residual calls Probe.site: count the outer call only
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start
        return timed_fn


def watched_run(fn: Callable[[], object], model: torch.nn.Module) -> tuple[int, float]:
    """fn() under the monitor: (forward calls, seconds inside the monitor's callbacks)."""
    m = monitor.watch(model, on_nonfinite=ignore)
    clock = InMonitor()
    # Before attach: the transformers hooks bind probe.site when they are registered.
    for owner, name in ((m.probe, "site"), (m.probe, "residual"), (m._attachment, "begin"),
                        (m._attachment, "end")):
        setattr(owner, name, clock.wrap(getattr(owner, name)))
    with m:
        fn()
    return m.steps, clock.seconds


def timed(fn: Callable[[], object], model: torch.nn.Module,
          watched: bool) -> tuple[np.ndarray, int, float]:
    """[wall, CPU] seconds for fn(), with the monitor around it when `watched`; forward calls
    and seconds inside the monitor. CPU time (this process, every thread) is what other
    processes on a shared machine disturb least."""
    start = np.array([time.perf_counter(), time.process_time()])
    if watched:
        steps, inside = watched_run(fn, model)
    else:
        fn()
        steps, inside = 0, 0.0
    return np.array([time.perf_counter(), time.process_time()]) - start, steps, inside


def compare(model: torch.nn.Module, runs: Sequence[Callable[[], object]],
            repeats: int) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Per run, the best [wall, CPU] of `repeats` tries without and with the monitor (in ABBA
    order, so that neither side always goes first), summed over the runs; the forward calls of
    one round, and the seconds inside the monitor of the best watched tries."""
    runs[0]()  # warm-up: first-call allocations and kernel selection
    totals = {False: np.zeros(2), True: np.zeros(2)}
    calls, inside = 0, 0.0
    for run in runs:
        best: dict[bool, tuple[np.ndarray, int, float]] = {}
        for r in range(repeats):
            for watched in ((False, True) if r % 2 == 0 else (True, False)):
                got = timed(run, model, watched)
                if watched not in best or got[0][1] < best[watched][0][1]:
                    best[watched] = got
        totals = {w: totals[w] + best[w][0] for w in totals}
        calls += best[True][1]
        inside += best[True][2]
    return totals[False], totals[True], calls, inside


def builtin_runs(dtype: str, prompts: Sequence[list[int]], new_tokens: int):
    model = load_model("gemma3-270m").engine(get_policy(dtype))
    return model, [lambda ids=ids: plain_greedy(model, ids, new_tokens) for ids in prompts]


def transformers_runs(base: torch.nn.Module, dtype: str, prompts: Sequence[list[int]],
                      new_tokens: int):
    model = base.to(DTYPES[dtype])  # in place: float32 first, then float16

    def run(ids: list[int]) -> None:
        model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)
    return model, [lambda ids=ids: run(ids) for ids in prompts]


def load_transformers() -> torch.nn.Module:
    import transformers

    path = real_gguf_path()
    started = time.perf_counter()
    model = transformers.Gemma3ForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    print(f"# transformers: loaded {path.name} in {time.perf_counter() - started:.0f} s "
          f"(attention: {model.config._attn_implementation})")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per configuration")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3,
                        help="tries per prompt and side; the best (least CPU) is kept")
    parser.add_argument("--engines", default="builtin,transformers",
                        help="comma-separated: builtin, transformers")
    args = parser.parse_args(argv)
    engines = args.engines.split(",")
    print_header(f"fuzz.monitor overhead on generate(): gemma3-270m, {args.prompts} prompts "
                 f"(BOS off), {args.new_tokens} new tokens, best of {args.repeats}")
    tokenizer = load_model("gemma3-270m").tokenizer
    prompts = [tokenizer.encode(t, bos=False) for t in PROMPTS[: args.prompts]]
    base = load_transformers() if "transformers" in engines else None
    rows = []
    for engine in engines:
        for dtype in DTYPES:
            if engine == "builtin":
                model, runs = builtin_runs(dtype, prompts, args.new_tokens)
            elif engine == "transformers":
                model, runs = transformers_runs(base, dtype, prompts, args.new_tokens)
            else:
                parser.error(f"unknown engine {engine!r}; give builtin and/or transformers")
            without, with_, calls, inside = compare(model, runs, args.repeats)
            ratio = with_ / without
            rows.append((engine, dtype, calls, without[0], with_[0], f"{ratio[0]:.3f}x",
                         without[1], with_[1], f"{ratio[1]:.3f}x", inside,
                         f"{100 * inside / with_[0]:.1f}%", 1000 * inside / max(calls, 1)))
            print(f"# {engine} {dtype}: wall {ratio[0]:.3f}x, CPU {ratio[1]:.3f}x, in the "
                  f"monitor {inside:.2f} s", flush=True)
    print_table(("engine", "dtype", "forward calls", "wall s without", "wall s with",
                 "wall ratio", "CPU s without", "CPU s with", "CPU ratio", "s in monitor",
                 "monitor share of watched wall", "ms in monitor / forward"), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
