"""Library API: watch your own model's generate() for the first non-finite value.

    from fuzz.monitor import watch

    with watch(model, on_nonfinite="raise") as m:
        model.generate(...)
    print(m.report())

``record`` holds the Monitor (per-step headroom, the first non-finite value) and ``watch``;
``attach`` hooks the built-in engine, gemma_pytorch's model and transformers' Gemma.
"""
from __future__ import annotations

from fuzz.monitor.record import LOG, Monitor, NonFiniteError, OnNonFinite, describe, watch

__all__ = ["LOG", "Monitor", "NonFiniteError", "OnNonFinite", "describe", "watch"]
