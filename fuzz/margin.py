"""How far past the limit a failure went: the margin a regression case is kept for.

Two magnitudes at the first non-finite value (its site, decode step and position):
- `unrounded`: max |residual + branch| over the channels, the two float16 terms added in float32
  by the probe during the failing run itself (fuzz.probe). Over the limit it says how far this
  machine's run went past 65504: 1.044 for Gemma 3 270M's BOS sink.
- `float32`: the same site, step and position in a float32 run fed the same tokens (the prompt
  and the tokens the failing run generated before that step): the magnitude free of float16's
  rounding, the same on every machine up to float32 noise.
A finding becomes a regression case only when its unrounded margin is at least MIN_MARGIN under
every kernel variation (fuzz.shrink.robustness).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from fuzz.engine.interface import prompt_batch
from fuzz.verdict import Verdict

# The least margin a regression case needs: the unrounded sum 2% past the limit. Measured on
# Gemma 3 270M without BOS (benchmarks/bench_margins.py, 91 raw float16 findings): no finding
# flipped with the thread count or the batch on an avx512_fp16 CPU; under the float32-accumulating
# kernel, prefill findings flipped up to a margin of 1.010 and none above; decode-step findings
# flipped up to 1.040, because their greedy tokens diverged (which the variations, not a margin,
# catch). 1.02 is twice the largest prefill flip. Session.min_margin carries it (--min-margin).
MIN_MARGIN = 1.02


def passes_margin(verdict: Verdict, min_margin: float) -> bool:
    """The canonical run's margin is enough (a site that is not a residual add has none to
    measure: only the variations judge it)."""
    return verdict.margin is None or verdict.margin >= min_margin


@dataclass(frozen=True)
class Margin:
    limit: float  # the dtype's largest finite value at the site
    unrounded: Optional[float]  # None when the site is not a residual add
    float32: Optional[float]  # None when not measured

    @property
    def ratio(self) -> Optional[float]:
        return None if self.unrounded is None else self.unrounded / self.limit

    @property
    def float32_ratio(self) -> Optional[float]:
        return None if self.float32 is None else self.float32 / self.limit

    def to_dict(self) -> dict[str, Any]:
        return {"limit": self.limit, "unrounded": self.unrounded, "ratio": self.ratio,
                "float32": self.float32, "float32_ratio": self.float32_ratio}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Margin:
        return cls(float(d["limit"]), _opt_float(d.get("unrounded")), _opt_float(d.get("float32")))

    def describe(self) -> str:
        parts = []
        if self.ratio is not None:
            parts.append(f"unrounded {self.unrounded:.6g} = {self.ratio:.4f} x the limit "
                         f"{self.limit:.6g}")
        if self.float32_ratio is not None:
            parts.append(f"float32 run {self.float32:.6g} = {self.float32_ratio:.4f} x")
        return "; ".join(parts) or "no margin (the first non-finite site is not a residual add)"


def _opt_float(x: Any) -> Optional[float]:
    return None if x is None else float(x)


class _SiteCapture:
    """A Recorder keeping max |x| over channels at one (layer, site), at every position."""

    def __init__(self, layer: int, site: str) -> None:
        self.layer, self.name = layer, site
        self.values: Optional[torch.Tensor] = None

    def site(self, layer: int, name: str, x: torch.Tensor) -> None:
        if layer == self.layer and name == self.name and x.dim() == 3 and self.values is None:
            self.values = x.detach().float().abs().amax(dim=-1)[0].cpu()  # [T]

    def residual(self, layer: int, name: str, residual: torch.Tensor, branch: torch.Tensor,
                 out: torch.Tensor) -> None:
        self.site(layer, name, out)


def float32_magnitude(engine: Any, verdict: Verdict) -> Optional[float]:
    """max |x| at the first non-finite site and position in a float32 forward over the prompt
    and the tokens generated before the failing step (teacher-forced: the same inputs the
    failing step saw; causal attention makes one full forward equal to the incremental decode).
    `engine` is a float32 built-in model (fuzz.engine.model.GemmaForCausalLM)."""
    first = verdict.first_nonfinite
    if first is None:
        return None
    ids = list(verdict.prompt_ids) + list(verdict.tokens[: first.step])
    if first.position >= len(ids):
        return None
    capture = _SiteCapture(first.layer, first.site)
    token_ids = torch.tensor([ids], device=engine.device)
    cache = engine.new_cache(1, len(ids))
    engine(prompt_batch(token_ids), cache, capture, last_only=False)
    if capture.values is None:
        return None
    return float(capture.values[first.position])


def measure(verdict: Verdict, float32_engine: Any = None) -> Optional[Margin]:
    """The margin of a failing verdict (None when finite); float32 measured when an engine is
    given."""
    if verdict.first_nonfinite is None or verdict.limit is None:
        return None
    f32 = float32_magnitude(float32_engine, verdict) if float32_engine is not None else None
    return Margin(verdict.limit, verdict.first_nonfinite.unrounded, f32)
