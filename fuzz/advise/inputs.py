"""`fuzz advise`'s inputs: the sampled prompts (fuzz.strategies, a fixed seed) and the facts of
the machine the measurement ran on."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Optional

import torch

from fuzz.session import Session
from fuzz.verdict import PromptSpec

# CPU flags that decide which matmul kernels torch can use for each dtype.
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                "amx_tile", "amx_bf16", "amx_fp16")


# --- inputs ------------------------------------------------------------------------------------
def draw_prompts(n: int, seed: int, max_chars: int = 200) -> list[str]:
    """n prompts from fuzz.strategies' default strategy, reproducibly (Hypothesis, fixed seed)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from fuzz.strategies import prompts

    out: list[str] = []

    # Hypothesis skips draws it has already made, so ask for more than n and keep the first n
    # distinct ones (drawing is cheap next to running them)
    @settings(max_examples=2 * n + 10, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(prompts(max_chars=max_chars))
    def collect(text: str) -> None:
        out.append(text)

    if n > 0:
        hypothesis_seed(seed)(collect)()
    return list(dict.fromkeys(out))[:n]


def runnable_prompts(session: Session, n: int, seed: int) -> list[str]:
    """The first n drawn prompts that fit the session's bounds in at least one BOS mode (a draw
    over --max-prompt-tokens is skipped, not counted)."""
    texts = draw_prompts(3 * n + 10, seed)
    return [t for t in texts if any(session.runnable(PromptSpec(t, add_bos=b))
                                    for b in (True, False))][:n]


def machine_info(device: str) -> dict[str, Any]:
    """The CPU's name and kernel-relevant flags (Linux /proc/cpuinfo), threads, torch, GPU."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(),
                                                         platform.processor()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass  # not Linux: the name from platform, no flags
    info = {"cpu": name, "cpu_flags": [f for f in KERNEL_FLAGS if f in flags],
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "load_average": _load_average()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _load_average() -> Optional[float]:
    """The 1-minute load average at the start: above the thread count, other work shared the
    CPU and the wall-time speeds are skewed (the CPU-time column much less)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_text(info: dict[str, Any]) -> str:
    flags = ", ".join(info["cpu_flags"]) or "none of " + ", ".join(KERNEL_FLAGS)
    gpu = f"; GPU {info['gpu']}" if info.get("gpu") else ""
    load = info.get("load_average")
    busy = (f"; load average {load} at the start" + (" (shared: wall-time speeds skewed)"
                                                     if load > info["threads"] else "")
            if load is not None else "")
    return (f"CPU {info['cpu']} (flags: {flags}), {info['threads']} threads, torch "
            f"{info['torch']}, device {info['device']}{gpu}{busy}")
