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
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

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


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T, as F.linear (weight kept in its [N, K] layout: see GemmaForCausalLM)."""
    if _accumulate_in_float32(x):
        return F.linear(x.float(), weight.float()).to(torch.float16)
    return F.linear(x, weight)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _accumulate_in_float32(a):
        return torch.matmul(a.float(), b.float()).to(torch.float16)
    return torch.matmul(a, b)
