"""Numerics probe: max |x| per layer, site and position, and the first non-finite value.

Cost model: every site is reduced on the device to one float32 max |x| per (row, position) —
one extra memory pass per instrumented tensor, no host sync. At the end of a forward step the
generation loop moves the stacked [sites, rows, positions] table to the host together with the
next tokens: one sync per step (see fuzz.generate). Attribution then runs on the host with numpy.

A NaN anywhere in a row makes that row's max NaN (torch.amax propagates NaN), an inf makes it
inf: so the tiny table is enough to find the first non-finite site, position and kind.

Margin: at each residual add the probe also keeps max |residual + branch| computed in float32 —
what the sum would have been without the dtype's limit. When the first non-finite value is such
an add (on Gemma it nearly always is, docs/NUMERICS.md), that value over the limit says how far
past it the run went: 68384 / 65504 = 1.044 for Gemma 3 270M's BOS sink, 1.005 for a case that
flipped on another CPU. It costs one float32 add per residual site, no extra run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from fuzz.verdict import NonFinite, layer_label


class Probe:
    """A fuzz.engine.model.Recorder that reduces each site to [rows, positions] on the device."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, str]] = []  # (layer, site) in execution order
        self.limits: list[float] = []  # finfo(dtype).max of each site's tensor
        # For each residual site (index into keys), the row of its unrounded sum in end_step's
        # table: len(keys) + k for the k-th residual site.
        self.sum_rows: dict[int, int] = {}
        self._stats: list[torch.Tensor] = []
        self._sums: list[torch.Tensor] = []

    def begin_step(self) -> None:
        self._stats, self._sums = [], []

    def site(self, layer: int, name: str, x: torch.Tensor) -> None:
        index = len(self._stats)
        if index == len(self.keys):  # first step: learn the site order once
            self.keys.append((layer, name))
            self.limits.append(float(torch.finfo(x.dtype).max))
        self._stats.append(abs_max(x, (1, 3) if x.dim() == 4 else -1))

    def residual(self, layer: int, name: str, residual: torch.Tensor, branch: torch.Tensor,
                 out: torch.Tensor) -> None:
        self.site(layer, name, out)
        site_index = len(self._stats) - 1
        if site_index not in self.sum_rows:
            self.sum_rows[site_index] = len(self.sum_rows)  # offset by len(keys) in end_step
        # The float32 sum (exact conversions, one float32 rounding, as before); in place on the
        # upcast copy, or one new tensor when the residual is float32 already (never in place
        # on the model's own tensor).
        if residual.dtype == torch.float32:
            unrounded = residual + branch.float()
        else:
            unrounded = residual.float().add_(branch)
        self._sums.append(abs_max(unrounded, -1))

    def end_step(self) -> torch.Tensor:
        """Stacks this step's sites, then the residual sums, into [S + R, B, T] (still on the
        device).

        The final norm and logits exist only for the last position (last_only): they are
        left-padded with zeros so that their one column lines up with the last position."""
        width = max(s.shape[-1] for s in self._stats)
        rows = [F.pad(s, (width - s.shape[-1], 0)) if s.shape[-1] < width else s
                for s in self._stats + self._sums]
        return torch.stack(rows)

    @property
    def layout(self) -> SiteLayout:
        offset = len(self.keys)
        return SiteLayout(self.keys, {s: offset + r for s, r in self.sum_rows.items()})


# Rows at least this long (the 262144-wide logits) are reduced by amax and amin instead of
# abs().amax(): measured at batch 64 on a 2-core avx512 CPU, 3.6 / 5.9 / 3.0 ms instead of
# 24.5 / 9.5 / 4.6 ms in float32 / bfloat16 / float16 (the |x| temporary costs more than the
# reduction); for the model's 640-2048-wide rows abs().amax() stays the faster of the two.
LONG_ROW = 1 << 16


def abs_max(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """max |x| over `dim` as float32, NaN winning: the values of x.abs().amax(dim).float().

    For long rows, max(amax(x), -amin(x)) without the |x| temporary: the same value (max |x|
    is the larger of max x and -min x; both reductions let NaN win, and so does maximum; the
    final abs turns a -0.0 of an all-zero row into abs()'s 0.0). tests/test_kernels.py checks
    it against abs().amax() with NaN and inf."""
    if x.shape[-1] >= LONG_ROW and dim == -1:
        return torch.maximum(x.amax(dim=dim), x.amin(dim=dim).neg()).abs().float()
    return x.abs().amax(dim=dim).float()


@dataclass(frozen=True)
class SiteLayout:
    """What the rows of a step's table are: the sites in execution order, then the unrounded
    residual sums (`sum_row[site index]` is the row of that site's sum)."""

    keys: list[tuple[int, str]]
    sum_row: dict[int, int]


@dataclass
class RowState:
    """What the probe has seen of one prompt so far (host side)."""

    add_bos: bool
    max_abs: Optional[np.ndarray] = None  # [S] over every step and position
    content_max_abs: Optional[np.ndarray] = None  # [S] excluding the BOS position
    first: Optional[NonFinite] = None


@dataclass
class StepView:
    """One step's table for the live rows, with each column's sequence position and input
    token."""

    stats: np.ndarray  # [S + R, B, T] float32 (SiteLayout: the sites, then the residual sums)
    positions: np.ndarray  # [B, T] position in each row's token sequence, -1 for padding
    token_ids: np.ndarray  # [B, T]


def update_rows(rows: list[RowState], step: int, view: StepView, layout: SiteLayout) -> None:
    """Folds one step into each row's maxima (rows[b] is column b of the table) and records
    its first non-finite value, if any.

    Per row: the max over its real positions (and, with BOS, over its content positions: 0 when
    it has none), NaN winning. Computed for every row at once — padding and excluded columns
    masked with -inf, which a max ignores — instead of ~10 numpy calls per row per step."""
    sites = view.stats[: len(layout.keys)]  # [S, B, T]
    real = view.positions >= 0  # [B, T]
    step_max = np.where(real, sites, -np.inf).max(axis=2)  # [S, B]; numpy's max lets NaN win
    content = real & ((view.positions != 0) | ~np.array([r.add_bos for r in rows])[:, None])
    step_content = np.where(content, sites, -np.inf).max(axis=2)
    step_max[:, ~real.any(axis=1)] = 0.0  # as for a row with no real position (none occurs)
    step_content[:, ~content.any(axis=1)] = 0.0  # no content position this step (BOS alone)
    hit = (~np.isfinite(sites) & real).any(axis=(0, 2))  # [B]
    for b, row in enumerate(rows):
        row.max_abs = (step_max[:, b] if row.max_abs is None
                       else np.maximum(row.max_abs, step_max[:, b]))
        row.content_max_abs = (step_content[:, b] if row.content_max_abs is None
                               else np.maximum(row.content_max_abs, step_content[:, b]))
        if row.first is None and hit[b]:
            keep = real[b]
            row.first = first_nonfinite(view.stats[:, b, keep], view.positions[b, keep],
                                        view.token_ids[b, keep], step, layout)


def first_nonfinite(table: np.ndarray, positions: np.ndarray, tokens: np.ndarray, step: int,
                    layout: SiteLayout) -> Optional[NonFinite]:
    """The first site (execution order) with a non-finite value; within it, the lowest position;
    with the unrounded sum there when the site is a residual add."""
    bad = ~np.isfinite(table[: len(layout.keys)])  # [S, T]
    hit_sites = np.flatnonzero(bad.any(axis=1))
    if hit_sites.size == 0:
        return None
    s = int(hit_sites[0])
    t = int(np.flatnonzero(bad[s])[0])
    layer, site = layout.keys[s]
    kind = "nan" if np.isnan(table[s, t]) else "inf"
    row = layout.sum_row.get(s)
    unrounded = float(table[row, t]) if row is not None else None
    if unrounded is not None and not np.isfinite(unrounded):
        unrounded = None  # a term was already non-finite: no magnitude to measure
    return NonFinite(step=step, layer=layer, site=site, position=int(positions[t]),
                     token_id=int(tokens[t]), kind=kind, unrounded=unrounded)


@dataclass
class SiteTable:
    """Per-site values rendered as {layer_label: {site: value}} for a Verdict."""

    keys: list[tuple[int, str]]
    limits: list[float]
    num_layers: int
    labels: list[tuple[str, str]] = field(init=False)

    def __post_init__(self) -> None:
        self.labels = [(layer_label(layer, self.num_layers), site) for layer, site in self.keys]

    def table(self, values: Optional[np.ndarray]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        if values is None:
            return out
        for (layer, site), v in zip(self.labels, values.tolist()):
            out.setdefault(layer, {})[site] = float(v)
        return out

    def limit_table(self) -> dict[str, float]:
        return {f"{layer}/{site}": limit for (layer, site), limit in zip(self.labels, self.limits)}


class CaptureResidual:
    """A Recorder that keeps the two terms of one residual add, to explain an overflow.

    Used once per finding (fuzz.generate.explain): the run is replayed with this recorder, which
    captures `residual` and `branch` at (layer, site) on the given step; the overflowing channel
    is where the finite terms sum past the dtype's limit (e.g. layer 7, channel 163: 55008 +
    13376 -> 68384 > 65504 on Gemma 3 270M with BOS, docs/NUMERICS.md)."""

    def __init__(self, layer: int, site: str) -> None:
        self.layer, self.name = layer, site
        self.captured: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self.armed = False

    def site(self, layer: int, name: str, x: torch.Tensor) -> None:
        pass

    def residual(self, layer: int, name: str, residual: torch.Tensor, branch: torch.Tensor,
                 out: torch.Tensor) -> None:
        if self.armed and layer == self.layer and name == self.name and self.captured is None:
            self.captured = (residual.detach().float().cpu(), branch.detach().float().cpu(),
                             out.detach().float().cpu())

    def channel_and_terms(self, column: int) -> Optional[tuple[int, tuple[float, float]]]:
        """The first channel at `column` (sequence slot) whose finite terms summed to non-finite."""
        if self.captured is None:
            return None
        residual, branch, out = (t[0, column] for t in self.captured)
        culprit = (~torch.isfinite(out)) & torch.isfinite(residual) & torch.isfinite(branch)
        hits = torch.nonzero(culprit).flatten()
        if hits.numel() == 0:
            return None
        c = int(hits[0])
        return c, (float(residual[c]), float(branch[c]))
