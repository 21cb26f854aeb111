"""Where in the sequence a run came close to its limit: max |x| / limit per layer and position.

The probe (fuzz.probe) reduces every site to [rows, positions] on the device but folds the
positions away on the host: screening needs only the maxima. A finding's picture (fuzz.report.
heatmap) needs them per position, so the finding is re-run once, alone, with `PositionRecorder`
as generate's extra recorder — screening runs pay nothing for it.

What is kept: for each step up to the failing one (every step of a finite run), each layer's max
over its sites of max |x| / finfo(site dtype).max at each position that step computed (the prefill
computes the prompt's positions, decode step k one more: with the KV cache each position is
computed once, so the steps' columns side by side cover every position). On the failing step, the
overflowing channel's unrounded value at every residual add (embedding, then each layer's
residual_attn and residual_mlp): how it grew layer by layer to the limit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from fuzz.engine.interface import Engine, TokenizerLike
from fuzz.generate import generate
from fuzz.probe import abs_max
from fuzz.verdict import FLOAT16_MAX, Bounds, PromptSpec, Verdict, from_json_safe, json_safe


@dataclass
class PositionMap:
    """rows: 'embedding', '0'..'L-1', 'head'; ratio[row][column]: max |x| / limit (inf: a
    non-finite value; None: not computed there — the head computes the last position only)."""

    policy: str
    step: int  # the last step covered
    rows: list[str]
    positions: list[int]
    tokens: list[int]  # the input token at each position
    ratio: list[list[Optional[float]]]
    first: Optional[tuple[int, int]] = None  # (row, column) of the first non-finite value
    first_site: Optional[str] = None
    channel: Optional[int] = None
    # (where, x on the layer axis, unrounded value): x = row index of the layer, + 0.5 for
    # residual_mlp (after residual_attn), so the line reads in execution order
    channel_values: list[tuple[str, float, float]] = field(default_factory=list)
    limit: Optional[float] = None  # the limit at the first non-finite site
    # "float16" when the ratios are against float16's limit: a wider dtype's own (~3.4e38) is
    # never near, and one colour over the whole map says nothing (reference_limit)
    against: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PositionMap:
        d = dict(d)
        d["ratio"] = [[None if v is None else float(from_json_safe(v)) for v in row]
                      for row in d["ratio"]]
        d["first"] = tuple(d["first"]) if d.get("first") is not None else None
        d["channel_values"] = [(w, float(x), float(from_json_safe(v)))
                               for w, x, v in d.get("channel_values", [])]
        d["limit"] = None if d.get("limit") is None else float(from_json_safe(d["limit"]))
        return cls(**d)

    def peak(self, from_position: int = 0) -> float:
        """The largest ratio at positions >= from_position (inf when something overflowed)."""
        values = [v for row in self.ratio for p, v in zip(self.positions, row)
                  if v is not None and p >= from_position]
        return max(values, default=0.0)


def reference_limit(dtype: torch.dtype) -> tuple[float, Optional[str]]:
    """What a site's values are measured against: its dtype's largest value, or float16's for a
    wider dtype (the question a float32 or bfloat16 run answers: would it survive in float16?
    as the report's "vs float16"); the second item names float16 in that case."""
    own = float(torch.finfo(dtype).max)
    return (FLOAT16_MAX, "float16") if own > FLOAT16_MAX else (own, None)


class PositionRecorder:
    """A Recorder for a run alone (batch of one): per step, each layer's per-position max of
    max |x| / limit; on `channel_step`, `channel`'s unrounded value at `column` of each add."""

    def __init__(self, num_layers: int, last_step: int, channel: Optional[int] = None,
                 channel_step: int = 0, column: int = 0) -> None:
        self.num_layers, self.last_step = num_layers, last_step
        self.channel, self.channel_step, self.column = channel, channel_step, column
        self.step = -1
        # per step: {row index: tensor [T] of ratios}
        self.steps: list[dict[int, torch.Tensor]] = []
        self.channel_values: list[tuple[str, float, float]] = []
        self.against: Optional[str] = None

    def site(self, layer: int, name: str, x: torch.Tensor) -> None:
        if name == "embedding":
            self.step += 1
            if self.step <= self.last_step:
                self.steps.append({})
            self._channel(-1, "embedding", x.float())
        if self.step > self.last_step:
            return
        # NaN counts as non-finite: an inf ratio, which the picture marks
        limit, against = reference_limit(x.dtype)
        self.against = self.against or against
        ratio = abs_max(x, (1, 3) if x.dim() == 4 else -1)[0] / limit
        ratio = torch.nan_to_num(ratio.cpu(), nan=math.inf, posinf=math.inf)
        row = layer + 1
        table = self.steps[-1]
        table[row] = torch.maximum(table[row], ratio) if row in table else ratio

    def residual(self, layer: int, name: str, residual: torch.Tensor, branch: torch.Tensor,
                 out: torch.Tensor) -> None:
        self.site(layer, name, out)
        self._channel(layer, name, residual.float() + branch.float())

    def _channel(self, layer: int, name: str, value: torch.Tensor) -> None:
        if self.channel is None or self.step != self.channel_step:
            return
        v = float(value[0, self.column, self.channel])
        if not math.isfinite(v):  # past the overflow the channel holds inf/nan: nothing to draw
            return
        x = layer + 1 + (0.5 if name == "residual_mlp" else 0.0)
        where = "embedding" if layer < 0 else f"{layer} {name}"
        self.channel_values.append((where, x, v))


def position_map(engine: Engine, tokenizer: TokenizerLike, spec: PromptSpec, verdict: Verdict,
                 bounds: Bounds) -> PositionMap:
    """Re-runs `verdict`'s prompt alone (up to its failing step) and maps it."""
    first = verdict.first_nonfinite
    layers = engine.config.num_hidden_layers
    last_step = first.step if first is not None else verdict.steps - 1
    column = (first.position if first.step == 0 else 0) if first is not None else 0
    recorder = PositionRecorder(layers, max(0, last_step),
                                first.channel if first is not None else None,
                                first.step if first is not None else 0, column)
    run_bounds = Bounds(max(1, last_step + 1), bounds.max_prompt_tokens, bounds.time_limit_s)
    generate(engine, tokenizer, [spec], verdict.policy, run_bounds, recorder)
    return _assemble(recorder, verdict, layers)


def _assemble(rec: PositionRecorder, verdict: Verdict, layers: int) -> PositionMap:
    labels = ["embedding", *map(str, range(layers)), "head"]
    ids = list(verdict.prompt_ids) + list(verdict.tokens)
    columns: list[list[Optional[float]]] = [[] for _ in labels]
    positions: list[int] = []
    for table in rec.steps:
        width = max(t.shape[0] for t in table.values())
        start = len(positions)
        positions += range(start, start + width)
        for row in range(len(labels)):
            values = table.get(row)
            if values is None:
                columns[row] += [None] * width
            else:  # right-aligned: the head's one column is the step's last position
                columns[row] += [None] * (width - values.shape[0]) + values.tolist()
    first = verdict.first_nonfinite
    cell = None
    if first is not None and first.position in positions:
        cell = (min(first.layer + 1, len(labels) - 1), positions.index(first.position))
    return PositionMap(
        policy=verdict.policy, step=len(rec.steps) - 1, rows=labels, positions=positions,
        tokens=[ids[p] if p < len(ids) else -1 for p in positions], ratio=columns, first=cell,
        first_site=first.site if first else None, channel=first.channel if first else None,
        channel_values=rec.channel_values, limit=verdict.limit, against=rec.against)


def session_position_map(session: Any, spec: PromptSpec, verdict: Verdict,
                         bounds: Optional[Bounds] = None) -> PositionMap:
    """position_map on a fuzz.session.Session's engine for the verdict's policy (the session's
    model to itself: Session.exclusive)."""
    from fuzz.precision import get_policy

    with session.exclusive():
        return position_map(session.engine(get_policy(verdict.policy)), session.model.tokenizer,
                            spec, verdict, bounds or session.bounds)
