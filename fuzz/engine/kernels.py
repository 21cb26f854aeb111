"""The matmul kernels of the built-in engine: torch's own, or float32 accumulation rounded once.

Which float16 kernel torch picks depends on the machine, and near the limit the kernel decides
the verdict (docs/NUMERICS.md). Measured on Gemma 3 270M's committed cases: on a CPU with
avx512_fp16, "30 00:47 000.135" stays finite with torch's native float16 matmuls, while
"fp32-accumulate" (each product computed in float32 from the float16 operands, the result rounded
to float16 once) reproduces what a CPU without avx512_fp16 recorded: step 9, layer 10,
residual_mlp, 1.092 x the limit. So the second kernel is how one machine imitates the other
kind: fuzz.robustness runs every finding under both.

Every tensor keeps its dtype at every op boundary either way: only the reduction inside one
product changes. Only float16 products are affected; other dtypes always use torch's kernel.

The second kernel is also a screening kernel (fuzz.session.Session.screen) on CPUs whose native
float16 matmuls are slow: a CPU without avx512_fp16 ran them at ~35 GFLOP/s against ~148 in
float32 (docs/NUMERICS.md). For that it keeps a float32 copy of each float16 weight (converting
the 262144 x 640 LM head on every call would cost more than the product); `screening_kernel`
decides, from a start-up measurement, whether screening uses it.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Optional

import torch
import torch.nn.functional as F

KERNELS = ("native", "fp32-accumulate")
_kernel: ContextVar[str] = ContextVar("gemma_fuzz_kernel", default="native")


@contextlib.contextmanager
def kernel(name: str) -> Iterator[None]:
    """Runs the block's built-in-engine matmuls with kernel `name` (one of KERNELS)."""
    if name not in KERNELS:
        raise ValueError(f"unknown matmul kernel {name!r}; valid kernels are: "
                         f"{', '.join(KERNELS)}")
    token = _kernel.set(name)
    try:
        yield
    finally:
        _kernel.reset(token)


def current_kernel() -> str:
    return _kernel.get()


def _accumulate_in_float32(*tensors: torch.Tensor) -> bool:
    return _kernel.get() == "fp32-accumulate" and tensors[0].dtype == torch.float16


# --- float32 copies of float16 weights ---------------------------------------------------------
# id(weight) -> (weight._version when copied, the float32 copy). Keyed by id, not by the tensor:
# a tensor's == is elementwise, which a WeakKeyDictionary would call. A finalizer drops the entry
# when the weight is freed (a model dropped from LoadedModel's cache frees its copies with it);
# the version check catches in-place edits of a weight (tests poison an embedding row in place).
_float32_weights: dict[int, tuple[int, torch.Tensor]] = {}
_float32_lock = threading.Lock()


def float32_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight.float(), computed once per weight (and again after an in-place edit).

    Costs 4 bytes per parameter while the model lives: ~1.1 GB for Gemma 3 270M in float16."""
    key = id(weight)
    with _float32_lock:
        entry = _float32_weights.get(key)
        if entry is not None and entry[0] == weight._version:
            return entry[1]
        copy = weight.detach().float()
        if entry is None:
            weakref.finalize(weight, _float32_weights.pop, key, None)
        _float32_weights[key] = (weight._version, copy)
        return copy


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T, as F.linear (weight kept in its [N, K] layout: see GemmaForCausalLM)."""
    if _accumulate_in_float32(x):
        # The same values as weight.float() (the copy is exact): the same products as before.
        return F.linear(x.float(), float32_weight(weight)).to(torch.float16)
    return F.linear(x, weight)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _accumulate_in_float32(a):
        return torch.matmul(a.float(), b.float()).to(torch.float16)
    return torch.matmul(a, b)


# --- which kernel screens ----------------------------------------------------------------------
SCREEN_KERNEL_ENV = "GEMMA_FUZZ_SCREEN_KERNEL"
SCREEN_KERNEL_CHOICES = ("auto", *KERNELS)
# "auto" screens with fp32-accumulate only when it is at least this much faster than native on
# the start-up measurement. Screening with it costs extra faithful runs (every candidate finding
# and near miss is re-run natively, fuzz.session), so a marginal gain would be a loss. The
# measurement is not a verdict on the whole run: on a 2-core AMD EPYC without avx512_fp16 it
# read 0.47-0.57 once and 1.63 later (both busy), and at 1.63 the fp32-accumulate screen still
# ran slower over the real run (0.99 vs 1.21 prompts/s, bench_throughput.py --quick); a Xeon
# with avx512_fp16 read ~0.55-1.1. GEMMA_FUZZ_SCREEN_KERNEL=native overrides it.
SCREEN_SPEEDUP_NEEDED = 1.5
# Representative shapes (M, K, N) of a screening batch on Gemma 3 270M: a decode MLP projection
# and a slice of the 262144 x 640 LM head, at 32 rows. ~0.4 GFLOP each way: ~15 ms at float16's
# 35 GFLOP/s on the slow kind, a few ms elsewhere; 5 rounds of each: ~0.1 s here.
SPEED_SHAPES = ((32, 640, 2048), (32, 640, 8192))


def parse_screen_kernel(name: str) -> str:
    """A screening-kernel choice as given (a Session attribute, SCREEN_KERNEL_ENV), checked."""
    if name not in SCREEN_KERNEL_CHOICES:
        raise ValueError(f"unknown screening kernel {name!r} (from {SCREEN_KERNEL_ENV} or "
                         f"Session.screen_kernel); valid: {', '.join(SCREEN_KERNEL_CHOICES)}")
    return name


def default_screen_kernel() -> str:
    """SCREEN_KERNEL_ENV, or "auto" when unset."""
    return parse_screen_kernel(os.environ.get(SCREEN_KERNEL_ENV, "auto").strip() or "auto")


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_float16_speedup(rounds: int = 5) -> float:
    """native float16 time / fp32-accumulate time over SPEED_SHAPES (> 1: fp32-accumulate is
    faster), the weight's float32 copy made beforehand, as the cache does.

    The two kernels are timed in alternation and each keeps its best round, so a burst of other
    work on the machine slows both alike instead of one (measured on a busy 2-core machine:
    best-of-3 timed back to back once read 1.87 where quiet runs read 0.77-0.90)."""
    gen = torch.Generator().manual_seed(0)
    native = accumulated = 0.0
    for m, k, n in SPEED_SHAPES:
        x = torch.randn(m, k, generator=gen).half()
        w = torch.randn(n, k, generator=gen).half()
        w32 = w.float()

        def run_native(x: torch.Tensor = x, w: torch.Tensor = w) -> torch.Tensor:
            return F.linear(x, w)

        def run_accumulated(x: torch.Tensor = x, w32: torch.Tensor = w32) -> torch.Tensor:
            return F.linear(x.float(), w32).to(torch.float16)

        run_native(), run_accumulated()  # warm-up: kernel selection, first-touch allocations
        times = [(_seconds(run_native), _seconds(run_accumulated)) for _ in range(rounds)]
        native += min(t[0] for t in times)
        accumulated += min(t[1] for t in times)
    return native / accumulated


_measured: Optional[tuple[str, float]] = None


def auto_screen_kernel() -> tuple[str, float]:
    """The float16 screening kernel "auto" picks on this machine, and the measured speedup
    (measured once per process, ~0.1 s). A speedup past the threshold is measured a second
    time and the smaller one kept: a skewed first reading cannot switch the kernel alone."""
    global _measured
    if _measured is None:
        speedup = measure_float16_speedup()
        if speedup >= SCREEN_SPEEDUP_NEEDED:
            speedup = min(speedup, measure_float16_speedup())
        _measured = ("fp32-accumulate" if speedup >= SCREEN_SPEEDUP_NEEDED else "native",
                     speedup)
    return _measured


def screening_kernel(choice: str, dtype: torch.dtype) -> str:
    """The kernel that screens a model of `dtype`: only float16 products have a choice."""
    choice = parse_screen_kernel(choice)
    if dtype != torch.float16:
        return "native"
    if choice == "auto":
        return auto_screen_kernel()[0]
    return choice
