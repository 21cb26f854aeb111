"""Shared by the benchmarks: the reproduce-command header, machine facts, tables (statistics
across trials: _stats.py).

Benchmarks print what they measured side by side in one run; they never assert on timings (the
figures depend on the machine and on whatever else runs on it: the header prints the load
average before the run so a reader can tell a quiet run from a contended one).
"""
from __future__ import annotations

import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

# Where benchmarks write files (plots, raw per-trial data) unless told otherwise; git ignores it.
OUT_DIR = Path(__file__).resolve().parent / "out"


def reproduce_command() -> str:
    """The command line that produced this output, runnable from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]))
    return " ".join([".venv/bin/python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])])


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_facts() -> dict[str, str]:
    """What print_header says about where and when, as data: a benchmark's raw-data file keeps
    it, so that figures merged from several files still say where each was measured."""
    return {"command": reproduce_command(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{os.cpu_count()}-core {platform.machine()} {_cpu_name()}",
            "cpu_flags": cpu_flags() or "n/a", "python": platform.python_version(),
            "torch": str(torch.__version__), "torch_threads": str(torch.get_num_threads()),
            "load_before": load_average()}


def print_header(title: str) -> None:
    """The reproduce command first, then when and where the figures were measured."""
    facts = machine_facts()
    print(f"# reproduce: {facts['command']}")
    print(f"# {title}")
    print(f"# date: {facts['date']}")
    print(f"# machine: {machine_text(facts)}")
    print(f"# cpu flags (the ones that pick matmul kernels): {facts['cpu_flags']}")
    if torch.cuda.is_available():
        print(f"# gpus: {', '.join(gpu_names())} (CUDA {torch.version.cuda})")
    print(f"# load average before the run (1/5/15 min): {facts['load_before']}"
          + ("   <- other processes were running: timings are skewed"
             if _busy() else ""))
    sys.stdout.flush()


def machine_text(facts: dict[str, str]) -> str:
    return (f"{facts['machine']}, python {facts['python']}, torch {facts['torch']}, "
            f"torch threads {facts['torch_threads']}")


def _busy() -> bool:
    try:
        return os.getloadavg()[0] > 0.5
    except OSError:
        return False


def gpu_names() -> list[str]:
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return "(" + line.split(":", 1)[1].strip() + ")"
    except OSError:
        pass
    return ""


# Flags that change which float16/bfloat16/float32 matmul kernels torch picks on x86 (measured:
# float16 matmuls ~35 GFLOP/s without avx512_fp16, ~258 with it, on two machines of one kind).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16",
                "amx_tile")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return " ".join(flag for flag in KERNEL_FLAGS if flag in present)
    except OSError:
        pass
    return ""


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A plain fixed-width table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


def _fmt(x: object) -> str:
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return str(x)
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
