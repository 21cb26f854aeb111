"""What the test suite costs: pytest wall time in parallel vs serial, and model load cold vs cached.

Side by side, in one run (each as a subprocess, one after the other, never two at once):
  - `pytest -n auto` vs `pytest -n 0` on the project's tests, wall time and ratio; with
    --omp1 also `-n auto` with OMP_NUM_THREADS=1 (the plugin already gives each xdist worker
    its share of the cores; torch threads that oversubscribe 2 cores spin: a tiny-model decode
    step went from ~3 ms to ~370 ms next to another 2-thread torch process, measured);
  - loading the real Gemma 3 270M: cold (GEMMA_FUZZ_CACHE pointed at an empty temporary
    directory: GGUF dequantization and tokenizer rebuild) vs cached (the default cache).
`--quick` runs only the fast unit-test files (QUICK_TESTS) and one load of each kind.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _common import print_header, print_table

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# Fast files that need no real weights (or skip their real-weight parts quickly).
QUICK_TESTS = ("tests/test_planted.py", "tests/test_generate.py", "tests/test_corpus.py",
               "tests/test_strategies.py")
LOAD_SNIPPET = (
    "import time; t = time.perf_counter(); "
    "from fuzz.engine.zoo import load_model; m = load_model('gemma3-270m'); "
    "print('LOAD_SECONDS', time.perf_counter() - t)"
)


def run_pytest(args: Sequence[str], env_extra: dict[str, str], timeout: float
               ) -> tuple[float, str]:
    env = {**os.environ, **env_extra}
    cmd = [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        out = f"TIMEOUT after {timeout:.0f}s {err.stdout or ''}"
    elapsed = time.perf_counter() - start
    return elapsed, _summary_line(out)


def _summary_line(out: str) -> str:
    lines = [ln for ln in out.strip().splitlines() if re.search(r"\b(passed|failed|error)", ln)]
    return lines[-1].strip("= ") if lines else out.strip().splitlines()[-1][:120]


def load_seconds(cache_dir: str | None) -> tuple[float, float]:
    """(seconds inside load_model, seconds of the whole process) in a fresh interpreter."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["GEMMA_FUZZ_CACHE"] = cache_dir
    start = time.perf_counter()
    proc = subprocess.run([PYTHON, "-c", LOAD_SNIPPET], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    wall = time.perf_counter() - start
    match = re.search(r"LOAD_SECONDS ([0-9.]+)", proc.stdout)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"loading gemma3-270m failed:\n{proc.stderr[-2000:]}")
    return float(match.group(1)), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"only {', '.join(QUICK_TESTS)}; one load of each kind")
    parser.add_argument("--omp1", action="store_true",
                        help="also time -n auto with OMP_NUM_THREADS=1")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds before one pytest run is abandoned (default 1800)")
    args = parser.parse_args(argv)
    targets = list(QUICK_TESTS) if args.quick else ["tests"]
    print_header(f"test-suite cost: pytest on {' '.join(targets)}; model load cold vs cached")

    print("\n## pytest wall time (subprocesses, one at a time)")
    variants = [("-n 0 (serial)", ["-n", "0"], {}), ("-n auto", ["-n", "auto"], {})]
    if args.omp1:
        variants.append(("-n auto, OMP_NUM_THREADS=1", ["-n", "auto"], {"OMP_NUM_THREADS": "1"}))
    rows, times = [], {}
    for label, extra, env in variants:
        print(f"# running pytest {label} ...", flush=True)
        seconds, summary = run_pytest([*extra, *targets], env, args.timeout)
        times[label] = seconds
        rows.append([label, seconds, summary])
    print_table(["variant", "wall s", "pytest summary"], rows)
    serial = times["-n 0 (serial)"]
    for label in [v[0] for v in variants[1:]]:
        ratio = times[label] / serial
        print(f"{label} / serial = {ratio:.2f} (speed-up {1 / ratio:.2f}x)")

    print("\n## Gemma 3 270M load (fresh interpreter each)")
    rows = []
    repeats = 1 if args.quick else 2
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="gemma-fuzz-cold-") as empty:
            load, wall = load_seconds(empty)
        rows.append(["cold (empty GEMMA_FUZZ_CACHE)", load, wall])
    for _ in range(repeats):
        load, wall = load_seconds(None)
        rows.append(["cached (default cache)", load, wall])
    print_table(["load", "load_model s", "process wall s"], rows)
    cold = min(r[1] for r in rows if r[0].startswith("cold"))
    cached = min(r[1] for r in rows if r[0].startswith("cached"))
    print(f"cold / cached = {cold / cached:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
