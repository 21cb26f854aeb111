"""A Recorder (fuzz.engine.interface) for tests: every site's key in order, its tensor and shape,
and whether every residual add's output was exactly residual + branch."""
from __future__ import annotations

import torch


class Keys:
    def __init__(self) -> None:
        self.keys: list[tuple[int, str]] = []
        self.values: dict[tuple[int, str], torch.Tensor] = {}
        self.shapes: dict[tuple[int, str], tuple[int, ...]] = {}
        self.sums_ok = True

    def site(self, layer: int, name: str, x: torch.Tensor) -> None:
        self.keys.append((layer, name))
        self.values[(layer, name)] = x.detach().float().clone()
        self.shapes[(layer, name)] = tuple(x.shape)

    def residual(self, layer: int, name: str, residual, branch, out) -> None:
        if name != "residual_laurel":  # Gemma 3n's LAuReL add is (a + b) / sqrt(2)
            self.sums_ok &= bool(torch.equal(out, residual + branch))
        self.site(layer, name, out)
