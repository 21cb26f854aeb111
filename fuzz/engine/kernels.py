"""The matmul kernels of the built-in engine: torch's own, or float32 accumulation rounded once.

Which float16 kernel torch picks depends on the machine, and near the limit the kernel decides
the verdict (docs/NUMERICS.md). Measured on Gemma 3 270M's committed cases: on a CPU with
avx512_fp16, "30 00:47 000.135" stays finite with torch's native float16 matmuls, while
"fp32-accumulate" (each product computed in float32 from the float16 operands, the result rounded
to float16 once) reproduces what a CPU without avx512_fp16 recorded: step 9, layer 10,
residual_mlp, 1.092 x the limit. So the second kernel is how one machine imitates the other
kind: fuzz.shrink.robustness runs every finding under both.

Every tensor keeps its dtype at every op boundary either way: only the reduction inside one
product changes. Only float16 products are affected; other dtypes always use torch's kernel.

The second kernel is also a screening kernel (fuzz.session.Session.screen) on CPUs whose native
float16 matmuls are slow: a CPU without avx512_fp16 ran them at ~35 GFLOP/s against ~148 in
float32 (docs/NUMERICS.md). For that it keeps a float32 copy of each float16 weight (converting
the 262144 x 640 LM head on every call would cost more than the product); "auto" decides,
from a trial on the loaded model's own first screens (`KernelTrial`), whether screening uses
"fp32-accumulate-wide": float32 accumulation only where it pays on such a CPU (WIDE_ROWS).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

KERNELS = ("native", "fp32-accumulate", "fp32-accumulate-wide")
# "fp32-accumulate-wide" accumulates in float32 only the products of at least this many rows (M
# of an M x K by K x N product; of each one in a batched matmul), native float16 the others: a
# screening kernel, not a machine's imitation. Why, measured on a 2-core AMD EPYC with avx2/fma
# only (no avx512), 2026-12-02: native float16 is compute-bound at every M (~17 GFLOP/s) while
# fp32-accumulate reads float32 weights, twice the bytes. Over Gemma 3 270M's layer weights
# fp32-accumulate was 0.38x native at 1 row, 0.97x at 8, 1.59x at 16, 3.49x at 128; on the
# 262144 x 640 head 0.79x at 8, 1.33x at 16. So a prefill (batch x prompt rows) gains and the
# decode of a batch of 8 loses: a whole screen (8 prompts, 16 new tokens) ran 6.5 s under
# fp32-accumulate, 6.1 s native, 3.6-4.6 s under this kernel.
WIDE_ROWS = 16
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
    """The kernel the built-in engine's matmuls run with here (`kernel` sets it)."""
    return _kernel.get()


def _accumulate_in_float32(x: torch.Tensor, rows: int) -> bool:
    """Whether the current kernel computes this product (float16 operand `x`, `rows` rows) as
    float32 products rounded to float16 once."""
    name = current_kernel()
    if x.dtype != torch.float16 or name == "native":
        return False
    return name == "fp32-accumulate" or rows >= WIDE_ROWS


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
    if _accumulate_in_float32(x, x.numel() // max(1, x.shape[-1])):
        # The same values as weight.float() (the copy is exact): the same products as before.
        return F.linear(x.float(), float32_weight(weight)).to(torch.float16)
    return F.linear(x, weight)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _accumulate_in_float32(a, a.shape[-2] if a.dim() > 1 else 1):
        return torch.matmul(a.float(), b.float()).to(torch.float16)
    return torch.matmul(a, b)


# --- which kernel screens ----------------------------------------------------------------------
SCREEN_KERNEL_ENV = "GEMMA_FUZZ_SCREEN_KERNEL"
SCREEN_KERNEL_CHOICES = ("auto", *KERNELS)
# The kernel "auto" may pick instead of native, after a trial on the model's own first screens
# (KernelTrial).
AUTO_CANDIDATE = "fp32-accumulate-wide"
# ... and only when it is at least this much faster, its faithful re-runs counted (every
# candidate finding and near miss is re-run natively, fuzz.session): a margin for the noise of a
# busy machine, where a wrong pick costs the whole run. GEMMA_FUZZ_SCREEN_KERNEL (one of
# SCREEN_KERNEL_CHOICES) overrides the trial.
SCREEN_SPEEDUP_NEEDED = 1.2
# The trial: the first TRIAL_WARMUP screens of a model run under both kernels untimed (kernel
# selection, first-touch allocations, the float32 weight copies), then screens run under both
# and timed until native has taken TRIAL_SECONDS over at least TRIAL_SCREENS of them, so that a
# handful of one-prompt batches (no product wide enough to differ) cannot decide alone.
TRIAL_WARMUP = 1
TRIAL_SCREENS = 2
TRIAL_SECONDS = 2.0
TRIAL_MAX_SCREENS = 8


def parse_screen_kernel(name: str) -> str:
    """A screening-kernel choice as given (a Session attribute, SCREEN_KERNEL_ENV), checked."""
    if name not in SCREEN_KERNEL_CHOICES:
        raise ValueError(f"unknown screening kernel {name!r} (from {SCREEN_KERNEL_ENV} or "
                         f"Session.screen_kernel); valid: {', '.join(SCREEN_KERNEL_CHOICES)}")
    return name


def default_screen_kernel() -> str:
    """SCREEN_KERNEL_ENV, or "auto" when unset."""
    return parse_screen_kernel(os.environ.get(SCREEN_KERNEL_ENV, "auto").strip() or "auto")


def screening_kernel(choice: str, dtype: torch.dtype) -> str:
    """The kernel that screens a model of `dtype` ("auto": still to be decided by a
    KernelTrial): only float16 products have a choice."""
    choice = parse_screen_kernel(choice)
    return choice if dtype == torch.float16 else "native"


@dataclass
class KernelTrial:
    """"auto"'s measurement, on the screens a run makes anyway: each of a model's first screens
    runs under native (whose verdicts it keeps: they are faithful) and under AUTO_CANDIDATE,
    the same batch, and the candidate is charged its time plus its share of faithful re-runs
    (the prompts it would re-run natively, at native's time per prompt). `choice` is set once
    enough was timed.

    Why the model's own screens and not bare matmuls: bare products of the model's shapes
    read fp32-accumulate 1.63-1.85x faster than native on an AMD EPYC with avx512f/avx512_bf16
    (no avx512_fp16), while the whole model ran slower with it (8 prompts of 16 tokens, 16 new
    tokens: 3.70 s against 3.48 s natively); a small product's weights stay in cache, the
    model's stream from memory (WIDE_ROWS)."""

    native_s: float = 0.0
    candidate_s: float = 0.0
    screens: int = 0
    choice: Optional[str] = None

    def add(self, native_s: float, candidate_s: float, rerun_fraction: float) -> None:
        """One screen timed under both kernels; `rerun_fraction` of its prompts the candidate
        would have re-run natively."""
        self.screens += 1
        if self.screens <= TRIAL_WARMUP:
            return
        self.native_s += native_s
        self.candidate_s += candidate_s + rerun_fraction * native_s
        timed = self.screens - TRIAL_WARMUP
        if (timed >= TRIAL_SCREENS and self.native_s >= TRIAL_SECONDS) or \
                timed >= TRIAL_MAX_SCREENS:
            self.choice = AUTO_CANDIDATE if self.speedup >= SCREEN_SPEEDUP_NEEDED else "native"

    @property
    def speedup(self) -> float:
        """native / candidate time over the timed screens (NaN before any)."""
        return self.native_s / self.candidate_s if self.candidate_s else math.nan
