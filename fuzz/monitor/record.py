"""Watching your own model's generate(): headroom per layer and forward call, and the first
non-finite value as it happens.

    import fuzz.monitor

    with fuzz.monitor.watch(model, on_nonfinite="raise") as m:
        model.generate(...)          # raises fuzz.monitor.NonFiniteError at the first NaN/Inf
    print(m.report())                # worst site per layer, min headroom per forward call

`model` is the built-in engine (fuzz.engine.model.GemmaForCausalLM), google/gemma_pytorch's
`gemma.model.GemmaForCausalLM` (or fuzz.engine.upstream.engine.UpstreamEngine) or a transformers
Gemma causal LM; fuzz.monitor.attach says how each is hooked. Every site reports under the built-in
names (fuzz.engine.interface), so a monitored run reads like `fuzz check`'s table.

A "step" is one forward call of the model (0: the prefill of a generate(), k: its k-th decode
step). Headroom is the dtype's largest finite value over max |x| (2.0: the site could double
before it overflows; 0: it is non-finite).

`on_nonfinite`: "raise" raises NonFiniteError from the forward that produced the value (out of
your generate()); "log" logs it once on the `fuzz.monitor` logger at WARNING and lets the run go
on; a callable gets the NonFiniteError that "raise" would raise, once, and may raise it.

Cost: the probe (fuzz.probe.Probe) reduces each site to max |x| per (row, position) on the
device; at the end of each forward the per-site maxima go to the host in one transfer: one host
sync per forward, none per site. Only when that shows a non-finite value is the full
[site, row, position] table moved, to say where. benchmarks/bench_monitor.py measures the
overhead on generate(). Hooks are Python callbacks: a torch.compile'd or CUDA-graphed forward
bypasses them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, Optional, Union

import numpy as np
import torch

from fuzz.monitor.attach import Attachment, StepInputs, attachment_for
from fuzz.probe import Probe, SiteTable, first_nonfinite
from fuzz.verdict import NonFinite, layer_label

LOG = logging.getLogger("fuzz.monitor")
ACTIONS = ("raise", "log")


class NonFiniteError(FloatingPointError):
    """The first non-finite value a monitored model produced: `nonfinite` (step, layer, site,
    position, token_id, kind, unrounded; fuzz.verdict.NonFinite), the batch `row`, the dtype's
    `limit` at that site. token_id is -1 when the forward was given embeddings, not ids."""

    def __init__(self, nonfinite: NonFinite, row: int, limit: float, num_layers: int) -> None:
        self.nonfinite, self.row, self.limit = nonfinite, row, limit
        super().__init__(describe(nonfinite, row, limit, num_layers))


def describe(nf: NonFinite, row: int, limit: float, num_layers: int) -> str:
    label = layer_label(nf.layer, num_layers)
    where = "the embedding" if label == "embedding" else (
        "the head" if label == "head" else f"layer {label}")
    token = f"input token id {nf.token_id}" if nf.token_id >= 0 else "input token unknown"
    text = (f"first non-finite value ({nf.kind}) at step {nf.step} (forward call {nf.step}), "
            f"{where}, site {nf.site}, batch row {row}, position {nf.position}, {token}")
    if nf.unrounded is not None:
        text += (f"; the residual add's unrounded sum there is {nf.unrounded:.6g}, "
                 f"{nf.unrounded / limit:.4f}x the dtype's limit {limit:.6g}")
    return text


OnNonFinite = Union[Literal["raise", "log"], Callable[[NonFiniteError], Any]]


class Monitor:
    """Headroom of every site at every forward of one model, while attached (see watch)."""

    def __init__(self, model: Any, on_nonfinite: OnNonFinite = "raise") -> None:
        if not callable(on_nonfinite) and on_nonfinite not in ACTIONS:
            raise ValueError(f"on_nonfinite={on_nonfinite!r}: give 'raise', 'log' or a callable "
                             "that takes a fuzz.monitor.NonFiniteError")
        self.on_nonfinite = on_nonfinite
        self.probe = Probe()
        self._attachment: Attachment = attachment_for(model, self.probe, self._begin, self._end)
        self.num_layers = self._attachment.num_layers
        self.kind = self._attachment.kind  # "builtin", "upstream" or "transformers"
        self._step_max: list[np.ndarray] = []  # per forward: [S] max |x| over rows, positions
        self._widths: list[int] = []  # per forward: tokens fed per row
        self._inputs: Optional[StepInputs] = None
        self.error: Optional[NonFiniteError] = None  # the first non-finite value, once seen

    # --- attaching -------------------------------------------------------------------------
    def __enter__(self) -> Monitor:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        self._attachment.attach()

    def detach(self) -> None:
        self._attachment.detach()

    def reset(self) -> None:
        """Forgets every step seen (steps count forward calls since attach or the last reset):
        call it between two generate() calls to report each alone."""
        self._step_max, self._widths, self._inputs, self.error = [], [], None, None

    # --- one forward -----------------------------------------------------------------------
    def _begin(self, inputs: StepInputs) -> None:
        self._inputs = inputs
        self.probe.begin_step()

    def _end(self) -> None:
        table = self.probe.end_step()  # [S + R, B, T] on the device
        sites = len(self.probe.keys)
        expected = sites + len(self.probe.sum_rows)
        if table.shape[0] != expected:
            raise RuntimeError(
                f"forward call {len(self._step_max)} reported {table.shape[0]} site rows, the "
                f"first forward {expected}: the model's structure changed under the monitor; "
                "watch one model, unchanged, per monitor")
        valid = self._inputs.valid if self._inputs is not None else None
        if valid is not None and tuple(valid.shape) == tuple(table.shape[1:]):
            table = table.masked_fill(~valid.to(table.device), 0.0)  # padding says nothing
        # The one host sync of the forward: [S] maxima, NaN winning (amax propagates NaN).
        site_max = table[:sites].amax(dim=(1, 2)).cpu().numpy()
        self._step_max.append(site_max)
        self._widths.append(int(table.shape[2]))
        if self.error is None and not np.isfinite(site_max).all():
            self._found(self._locate(table, len(self._step_max) - 1))

    def _locate(self, table: torch.Tensor, step: int) -> tuple[NonFinite, int]:
        """The first non-finite site in execution order over every row, its lowest position."""
        full = table.cpu().numpy()  # only on a failure: the second transfer of this forward
        b, t = full.shape[1:]
        inputs = self._inputs
        positions = _host_rows(inputs.positions, b, t) if inputs else np.tile(np.arange(t), (b, 1))
        tokens = (_host_rows(inputs.token_ids, b, t) if inputs and inputs.token_ids is not None
                  else np.full((b, t), -1))
        layout = self.probe.layout
        order = {key: i for i, key in enumerate(layout.keys)}
        found = []
        for row in range(b):
            nf = first_nonfinite(full[:, row], positions[row], tokens[row], step, layout)
            if nf is not None:
                found.append(((order[(nf.layer, nf.site)], nf.position, row), nf))
        (_, _, row), nf = min(found, key=lambda item: item[0])
        return nf, row

    def _found(self, hit: tuple[NonFinite, int]) -> None:
        nf, row = hit
        limit = self.probe.limits[self.probe.keys.index((nf.layer, nf.site))]
        self.error = NonFiniteError(nf, row, limit, self.num_layers)
        if self.on_nonfinite == "raise":
            raise self.error
        if self.on_nonfinite == "log":
            LOG.warning("%s", self.error)
        else:
            self.on_nonfinite(self.error)

    # --- what was seen ---------------------------------------------------------------------
    @property
    def first_nonfinite(self) -> Optional[NonFinite]:
        return self.error.nonfinite if self.error is not None else None

    @property
    def steps(self) -> int:
        """Forward calls seen."""
        return len(self._step_max)

    @property
    def sites(self) -> list[tuple[int, str]]:
        """(layer, site) of each column of max_abs / headroom, in execution order."""
        return list(self.probe.keys)

    @property
    def max_abs(self) -> np.ndarray:
        """[steps, sites] float32: max |x| over rows and real positions (inf/nan kept)."""
        if not self._step_max:
            return np.zeros((0, len(self.probe.keys)), dtype=np.float32)
        return np.stack(self._step_max)

    @property
    def headroom(self) -> np.ndarray:
        """[steps, sites]: limit / max |x| (inf where max |x| is 0, 0 where non-finite)."""
        return headroom_of(self.max_abs, np.asarray(self.probe.limits, dtype=np.float64))

    def headroom_in(self, dtype: torch.dtype) -> np.ndarray:
        """[steps, sites]: `dtype`'s largest finite value / max |x|: whether a float32 run would
        have survived float16 (below 1: it would have overflowed there)."""
        limit = np.full(len(self.probe.keys), float(torch.finfo(dtype).max))
        return headroom_of(self.max_abs, limit)

    def table(self) -> dict[str, dict[str, float]]:
        """{layer_label: {site: min headroom over every step}} (as Verdict.headroom())."""
        h = self.headroom
        lowest = h.min(axis=0) if h.shape[0] else None
        return SiteTable(self.sites, self.probe.limits, self.num_layers).table(lowest)

    def report(self) -> str:
        """A summary line, the worst site of each layer and the lowest headroom of each step."""
        h, labels = self.headroom, [layer_label(layer, self.num_layers) for layer, _ in self.sites]
        if self.error is not None:
            head = f"NON-FINITE: {self.error}"
        elif h.size:
            step, col = np.unravel_index(int(np.argmin(h)), h.shape)
            head = (f"finite: min headroom {h[step, col]:.4g} at step {step}, layer "
                    f"{labels[col]}, site {self.sites[col][1]}")
        else:
            head = "no forward call seen"
        lines = [f"fuzz.monitor ({self.kind}): {self.steps} forward calls, "
                 f"{len(self.sites)} sites; {head}"]
        if not h.size:
            return lines[0]
        lines += ["", "worst site per layer:"]
        lines += _markdown(("layer", "site", "max |x|", "headroom", "step"),
                           self._layer_rows(h, labels))
        lines += ["", "min headroom per step:"]
        lines += _markdown(("step", "tokens", "min headroom", "layer", "site"),
                           self._step_rows(h, labels))
        return "\n".join(lines)

    def _layer_rows(self, h: np.ndarray, labels: list[str]) -> list[tuple]:
        rows, a = [], self.max_abs
        for label in dict.fromkeys(labels):  # layers in execution order
            cols = [c for c, x in enumerate(labels) if x == label]
            step, k = np.unravel_index(int(np.argmin(h[:, cols])), (h.shape[0], len(cols)))
            c = cols[k]
            rows.append((label, self.sites[c][1], _num(a[step, c]), _num(h[step, c]), step))
        return rows

    def _step_rows(self, h: np.ndarray, labels: list[str]) -> list[tuple]:
        rows = []
        for step in range(h.shape[0]):
            c = int(np.argmin(h[step]))
            rows.append((step, self._widths[step], _num(h[step, c]), labels[c], self.sites[c][1]))
        return rows


def _num(x: float) -> str:
    return f"{float(x):.4g}"


def _markdown(headers: tuple[str, ...], rows: list[tuple]) -> list[str]:
    """A fixed-width table that is also Markdown (a "|" inside a cell, as in "max |x|", is
    escaped: unescaped it would split the cell)."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return out


def headroom_of(max_abs: np.ndarray, limits: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        h = limits / max_abs.astype(np.float64)
    h[~np.isfinite(max_abs)] = 0.0
    return h


def _host_rows(x: torch.Tensor, b: int, t: int) -> np.ndarray:
    """A [B, T] or shared [T] tensor as a [b, t] host array; the last t columns when the forward
    was fed more (the table is as wide as the widest site)."""
    a = x.detach().cpu().numpy().astype(np.int64)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim == 1:
        a = np.tile(a, (b, 1))
    a = a[:, -t:]
    if a.shape[1] < t:  # fewer columns than sites (none occurs): left-pad as the probe does
        a = np.pad(a, ((0, 0), (t - a.shape[1], 0)), constant_values=-1)
    return a


def watch(model: Any, on_nonfinite: OnNonFinite = "raise") -> Monitor:
    """A Monitor for `model`, attached for the duration of a `with` block (or call attach() and
    detach() yourself). See the module docstring."""
    return Monitor(model, on_nonfinite)
