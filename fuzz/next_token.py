"""Every vocabulary token as the next token after one prefix: the prefix runs once, then each
batch of candidate tokens runs as one decode step against copies of its cache.

Why one step decides: in a causal model a position sees only its prefix and itself, so whether
the next token overflows at its own position is a property of that token alone (the prefix's
positions were computed before it existed). With an empty prefix and no BOS that is every
possible first token at position 0; after BOS, every token at position 1.

Per token the probe (fuzz.probe) reduces every site to one max |x| at the new position: the
least headroom (dtype limit / max |x|) over every site, the site where it is least, the least
per layer, and the first non-finite value in execution order. The LM head is not run (the
model's `head=False`): the question is whether the token overflows on its way through the
layers, and on Gemma 3 270M the tied 262144 x 640 head costs as much as its 18 layers together.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from fuzz.engine.interface import Batch, prompt_batch
from fuzz.engine.kernels import kernel
from fuzz.probe import CaptureResidual, Probe, first_nonfinite
from fuzz.verdict import NonFinite, layer_label


class SweepError(ValueError):
    """A sweep that cannot mean anything as asked (the prefix itself overflows, e.g.)."""


@dataclass(frozen=True)
class Prefix:
    """What every swept token follows, as fed to the model."""

    ids: tuple[int, ...]  # BOS first when add_bos
    add_bos: bool
    text: str  # the prefix's text without BOS ("" for none): a finding's prompt starts with it

    @property
    def content_ids(self) -> tuple[int, ...]:
        """The prefix without its BOS: what a finding's prompt text encodes to."""
        return self.ids[1:] if self.add_bos else self.ids

    @property
    def position(self) -> int:
        """The swept token's position in the sequence."""
        return len(self.ids)


def make_prefix(tokenizer: Any, after: Optional[str], after_ids: Optional[Sequence[int]],
                add_bos: bool) -> Prefix:
    """The prefix from --after TEXT or --after-ids IDS (at most one), BOS first with --bos."""
    if after is not None and after_ids is not None:
        raise SweepError("--after and --after-ids both give the prefix: give one")
    if after_ids is not None:
        ids = [int(i) for i in after_ids]
        bad = [i for i in ids if not 0 <= i < tokenizer.n_words]
        if bad:
            raise SweepError(f"--after-ids: {bad} not in the vocabulary "
                             f"(0..{tokenizer.n_words - 1})")
        text = tokenizer.decode(ids)
    else:
        text = after or ""
        ids = tokenizer.encode(text, bos=False) if text else []
    return Prefix(tuple([tokenizer.bos_id] if add_bos else []) + tuple(ids), add_bos, text)


@dataclass(frozen=True)
class TokenResult:
    """One swept token: where it came closest to its dtype's limit, and whether it crossed."""

    token_id: int
    first: Optional[NonFinite]
    least_headroom: float  # over every site; 0 when non-finite
    least_site: tuple[str, str]  # (layer label, site) of the least headroom
    by_layer: tuple[float, ...]  # least headroom per layer: embedding, 0..L-1, head (final norm)
    margin: Optional[float] = None  # non-finite at a residual add: unrounded sum / limit


class SweepRunner:
    """The prefix run once under one policy's engine, then batches of candidate tokens."""

    def __init__(self, engine: Any, prefix: Prefix, num_layers: int) -> None:
        self.engine, self.prefix, self.num_layers = engine, prefix, num_layers
        self.prefix_cache = None
        if prefix.ids:
            self.prefix_cache = self._run_prefix()

    def _run_prefix(self):
        """The prefix's own forward (faithful kernel), its cache kept; refused if it overflows:
        every token after it would inherit the overflow."""
        ids = torch.tensor([self.prefix.ids], device=self.engine.device)
        n = ids.shape[1]
        cache = self.engine.new_cache(1, n)
        batch = prompt_batch(ids)
        probe = Probe()
        probe.begin_step()
        with kernel("native"):
            self.engine(batch, cache, probe, last_only=True, head=False)
        table = probe.end_step().float().cpu().numpy()
        first = first_nonfinite(table[:, 0, :], np.arange(n), np.array(self.prefix.ids), 0,
                                probe.layout)
        if first is not None:
            where = ("its BOS" if first.position == 0 and self.prefix.add_bos
                     else f"position {first.position}")
            raise SweepError(
                f"the prefix itself goes non-finite ({first.kind} at layer {first.layer} "
                f"{first.site}, {where}): every token after it would inherit that; sweep "
                "without --bos, after a shorter prefix, or under another policy")
        return cache

    def _batch(self, tokens: torch.Tensor) -> tuple[Batch, Any]:
        b, p = tokens.shape[0], self.prefix.position
        cache = self.engine.new_cache(b, p + 1)
        if self.prefix_cache is not None:
            for (k, v), (pk, pv) in zip(cache.layers, self.prefix_cache.layers):
                k[:, :p] = pk[:, :p]  # [1, P, kv, hd] broadcast to every row
                v[:, :p] = pv[:, :p]
        device = tokens.device
        batch = Batch(token_ids=tokens[:, None],
                      positions=torch.full((b, 1), p, dtype=torch.long, device=device),
                      slot_start=p, key_valid=torch.ones(b, p + 1, dtype=torch.bool,
                                                         device=device),
                      key_positions=torch.arange(p + 1, device=device).expand(b, p + 1))
        return batch, cache

    def run(self, token_ids: Sequence[int], kernel_name: str = "native") -> list[TokenResult]:
        """One forward of these tokens, each as the next token after the prefix."""
        tokens = torch.tensor(list(token_ids), dtype=torch.long, device=self.engine.device)
        batch, cache = self._batch(tokens)
        probe = Probe()
        probe.begin_step()
        with kernel(kernel_name):
            self.engine(batch, cache, probe, last_only=True, head=False)
        table = probe.end_step().float().cpu().numpy()  # [S + R, B, 1]
        return self._results(table, probe, list(token_ids))

    def run_confirmed(self, token_ids: Sequence[int], kernel_name: str, near_miss: float
                      ) -> list[tuple[TokenResult, str, Optional[float]]]:
        """One batch under the screening kernel; its non-finite tokens and those under
        `near_miss` headroom again with the native kernel, together: per token (the result that
        counts, the kernel that computed it, the screening kernel's least headroom when it was
        re-run)."""
        screened = self.run(token_ids, kernel_name)
        if kernel_name == "native":
            return [(r, "native", None) for r in screened]
        again = [r.token_id for r in screened if r.first is not None
                 or r.least_headroom < near_miss]
        native = {r.token_id: r for r in self.run(again, "native")} if again else {}
        return [(native[r.token_id], "native", r.least_headroom) if r.token_id in native
                else (r, kernel_name, None) for r in screened]

    def explain(self, token_id: int, layer: int, site: str
                ) -> Optional[tuple[int, tuple[float, float]]]:
        """The channel whose two finite terms summed past the limit at (layer, site) when this
        token runs alone (native), and the terms; None when it does not overflow there alone."""
        batch, cache = self._batch(torch.tensor([token_id], device=self.engine.device))
        capture = CaptureResidual(layer, site)
        capture.armed = True
        with kernel("native"):
            self.engine(batch, cache, capture, last_only=True, head=False)
        return capture.channel_and_terms(0)

    def _results(self, table: np.ndarray, probe: Probe, token_ids: list[int]
                 ) -> list[TokenResult]:
        layout = probe.layout
        n_sites = len(layout.keys)
        maxima = table[:n_sites, :, 0]  # [S, B]
        limits = np.asarray(probe.limits, dtype=np.float64)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            headroom = np.where(np.isfinite(maxima), limits / maxima.astype(np.float64), 0.0)
        headroom = np.where(maxima == 0, np.inf, headroom)
        layers = [layer for layer, _ in layout.keys]
        # sites run in execution order, so each layer's sites are one contiguous run
        starts = [i for i, layer in enumerate(layers) if i == 0 or layers[i - 1] != layer]
        per_layer = np.minimum.reduceat(headroom, starts, axis=0)  # [layers, B]
        least = headroom.argmin(axis=0)
        position = np.array([self.prefix.position])
        out = []
        for b, token in enumerate(token_ids):
            first, margin = None, None
            if not np.isfinite(maxima[:, b]).all():
                first = first_nonfinite(table[:, b, :], position, np.array([token]), 0, layout)
                if first is not None and first.unrounded is not None:
                    site_index = layout.keys.index((first.layer, first.site))
                    margin = first.unrounded / float(limits[site_index, 0])
            layer, site = layout.keys[int(least[b])]
            out.append(TokenResult(token, first, float(headroom[least[b], b]),
                                   (layer_label(layer, self.num_layers), site),
                                   tuple(float(h) for h in per_layer[:, b]), margin))
        return out


def default_kernel(device_type: str, dtype: torch.dtype) -> str:
    """fp32-accumulate-wide on a CPU for float16 (torch's native float16 products are ~4x slower
    there, and every product of a batch of next tokens is wide); native everywhere else."""
    return ("fp32-accumulate-wide" if device_type == "cpu" and dtype == torch.float16
            else "native")


def flops_per_token(config: Any, position: int) -> float:
    """Multiply-adds x 2 of one token's decode step without the LM head: every layer's
    projections and MLP, and its attention over `position + 1` keys."""
    h, heads, kv, hd = (config.hidden_size, config.num_attention_heads,
                        config.num_key_value_heads, config.head_dim)
    projections = h * (heads + 2 * kv) * hd + heads * hd * h + 3 * h * config.intermediate_size
    attention = 2 * heads * hd * (position + 1)
    return 2.0 * config.num_hidden_layers * (projections + attention)
