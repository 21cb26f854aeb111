"""A sweep's results in words and one picture: how many tokens overflow and where, which pieces
come within 10% of the limit, and in which layer each token comes closest.

Written from the result lines alone (the whole file, an earlier killed run's lines included), so
that a resumed or sharded sweep summarizes the same way (fuzz.sweep.report writes it out).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fuzz.report.describe import prompt_literal
from fuzz.verdict import json_safe

# "Within 10% of the limit": least headroom under this (the line, and the band where a
# kernel's reduction order or one more token of context can decide: docs/NUMERICS.md).
CLOSE_HEADROOM = 1.1
# How many of the closest tokens the text and the picture name.
SHOWN = 20


@dataclass
class SweepSummary:
    swept: int
    nonfinite: int
    native: int  # lines whose result is the native kernel's (confirmed near misses included)
    close: int  # finite, least headroom < CLOSE_HEADROOM
    # (layer, site) of the first non-finite value -> [count, the largest margin, its piece,
    # its token id]
    overflows: dict[tuple[int, str], list[Any]] = field(default_factory=dict)
    # (layer, site) -> the overflowing channel and its two terms, for the largest-margin token
    # run alone (explain); absent when not explained
    channels: dict[tuple[int, str], tuple[int, tuple[float, float]]] = field(
        default_factory=dict)
    closest: list[dict[str, Any]] = field(default_factory=list)  # lowest least headroom first
    peak_layer_all: dict[str, int] = field(default_factory=dict)  # layer -> tokens peaking there
    peak_layer_close: dict[str, int] = field(default_factory=dict)  # the same, close + overflow
    headrooms: list[float] = field(default_factory=list)  # every finite token's least headroom

    @classmethod
    def of(cls, rows: Sequence[dict[str, Any]], num_layers: int) -> SweepSummary:
        finite = [r for r in rows if r["finite"]]
        bad = [r for r in rows if not r["finite"]]
        overflows: dict[tuple[int, str], list[Any]] = {}
        for r in bad:
            first = r["first_nonfinite"]
            entry = overflows.setdefault((first["layer"], first["site"]),
                                         [0, -math.inf, None, None])
            entry[0] += 1
            margin = r.get("margin") or 0.0
            if margin > entry[1]:
                entry[1:] = [margin, r["piece"], r["token_id"]]
        close = [r for r in finite if r["least_headroom"] < CLOSE_HEADROOM]
        layer = lambda r: str(r["least_headroom_site"]).split("/")[0]  # noqa: E731
        by_headroom = sorted(finite, key=lambda r: (r["least_headroom"], r["token_id"]))
        return cls(
            swept=len(rows), nonfinite=len(bad), native=sum(r["kernel"] == "native" for r in rows),
            close=len(close), overflows=overflows,
            closest=[{k: r[k] for k in ("token_id", "piece", "least_headroom",
                                        "least_headroom_site")} for r in by_headroom[:SHOWN]],
            peak_layer_all=dict(Counter(map(layer, finite))),
            peak_layer_close=dict(Counter(
                [layer(r) for r in close]
                + [str(r["first_nonfinite"]["layer"]) for r in bad])),
            headrooms=[float(r["least_headroom"]) for r in finite
                       if math.isfinite(r["least_headroom"])])

    def explain(self, explain: Callable[[int, int, str], Any]) -> None:
        """Each overflow's channel: `explain(token_id, layer, site)` (SweepRunner.explain) on
        its largest-margin token."""
        for (layer, site), (_, _, _, token_id) in self.overflows.items():
            found = explain(token_id, layer, site)
            if found is not None:
                self.channels[(layer, site)] = found

    @property
    def least(self) -> float:
        return min(self.headrooms, default=math.inf)

    def lines(self) -> list[str]:
        out = [f"{self.swept} tokens swept: {self.nonfinite} non-finite, {self.close} finite "
               f"within 10% of the limit (least headroom < {CLOSE_HEADROOM}); least headroom of a "
               f"finite token {self.least:.4f}; {self.native} lines from the native kernel"]
        for (layer, site), (count, margin, piece, _) in sorted(self.overflows.items(),
                                                              key=lambda kv: -kv[1][0]):
            best = f", largest margin {margin:.4f} ({prompt_literal(piece)})" if margin > 0 else ""
            found = self.channels.get((layer, site))
            channel = (f", channel {found[0]} ({found[1][0]:.0f} + {found[1][1]:.0f})"
                       if found else "")
            out.append(f"  {count:>7} x non-finite at layer {layer} {site}{channel}{best}")
        if self.closest:
            out.append("closest finite tokens (least headroom, where):")
            out += [f"  {r['token_id']:>7} {prompt_literal(r['piece']):<24} "
                    f"{r['least_headroom']:.4f} {r['least_headroom_site']}" for r in self.closest]
        out.append("layer where each token comes closest (all finite tokens): "
                   + ", ".join(f"{k}: {v}" for k, v in layer_sorted(self.peak_layer_all)))
        if self.peak_layer_close:
            out.append("... of the non-finite and within-10% tokens: "
                       + ", ".join(f"{k}: {v}" for k, v in layer_sorted(self.peak_layer_close)))
        return out

    def console_text(self, facts: dict[str, Any]) -> str:
        return "\n".join([", ".join(f"{k}: {v}" for k, v in facts.items()), *self.lines()])

    def to_json(self, facts: dict[str, Any]) -> dict[str, Any]:
        return json_safe({
            "facts": facts, "swept": self.swept, "nonfinite": self.nonfinite,
            "close": self.close, "close_headroom": CLOSE_HEADROOM, "least_headroom": self.least,
            "native_lines": self.native,
            "overflows": [{"layer": layer, "site": site, "tokens": count,
                           "largest_margin": margin if margin > 0 else None, "piece": piece,
                           "token_id": token_id,
                           "channel": self.channels.get((layer, site), (None,))[0],
                           "terms": self.channels.get((layer, site), (None, None))[1]}
                          for (layer, site), (count, margin, piece, token_id)
                          in self.overflows.items()],
            "closest": self.closest, "peak_layer_all": self.peak_layer_all,
            "peak_layer_close": self.peak_layer_close})


def layer_sorted(counts: dict[str, int]) -> list[tuple[str, int]]:
    order = lambda k: -1 if k == "embedding" else (int(k) if k.isdigit() else 10**6)  # noqa: E731
    return sorted(counts.items(), key=lambda kv: order(kv[0]))
