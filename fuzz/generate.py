"""Bounded, batched, KV-cached greedy generation that watches every value.

Each row stops at EOS, at its first non-finite value, or at the step bound; the batch stops when
every row has (and finished rows are dropped from the batch so later steps cost only live rows).
Rows are left-padded; positions restart at 0 on each row's first real token and padding slots get
zero K/V (fuzz.engine.model), so a row computes what it would compute alone, up to the rounding
of the matmul kernels, which can differ with the batch's row count (gemv for one row, gemm for
several): a verdict that sits within a float16 ulp of the limit can flip. fuzz.session re-runs
every new finding alone, the canonical verdict.

Greedy decoding hides the bug in upstream (argmax of NaN logits returns garbage silently, google/
gemma_pytorch#10): here finiteness is checked at every site of every step instead.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fuzz.engine.interface import RESIDUAL_SITES, Batch, Engine, Recorder, TokenizerLike
from fuzz.probe import (
    CaptureResidual,
    Probe,
    RowState,
    SiteLayout,
    SiteTable,
    StepView,
    update_rows,
)
from fuzz.verdict import Bounds, PromptSpec, Verdict


class EmptyPrompt(ValueError):
    """An empty prompt without BOS: there is no token to run."""


class PromptTooLong(ValueError):
    """The prompt is over --max-prompt-tokens (fuzzers discard such draws; users get the
    message)."""


class UnencodablePrompt(ValueError):
    """The prompt holds a character UTF-8 cannot encode (a lone surrogate), which SentencePiece
    cannot take either."""


def check_encodable(text: str) -> None:
    """A lone surrogate ("x\udcff": what Python makes of an invalid byte in a command line)
    reaches SentencePiece's C++ as a pybind cast error that names nothing; say what and where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UnencodablePrompt(
            f"the prompt {text[:60]!r} holds {text[err.start]!r} at index {err.start}, a lone "
            "surrogate that UTF-8 cannot encode (an invalid byte in the command line?); pass "
            "the prompt as UTF-8 text, e.g. with --prompt-file FILE") from None


def encode_prompt(tokenizer: TokenizerLike, spec: PromptSpec, bounds: Bounds) -> list[int]:
    """Token ids as fed to the model; refuses what cannot or must not run."""
    check_encodable(spec.text)
    text = tokenizer.chat_prompt(spec.text) if spec.chat else spec.text
    ids = tokenizer.encode(text, bos=spec.add_bos)
    if len(ids) > bounds.max_prompt_tokens:
        raise PromptTooLong(
            f"the prompt is {len(ids)} tokens{' (BOS included)' if spec.add_bos else ''}, over "
            f"the bound of {bounds.max_prompt_tokens} tokens; shorten it or raise the bound with "
            f"--max-prompt-tokens {len(ids)} (or more)"
        )
    if not ids:
        raise EmptyPrompt(
            "the prompt is empty and BOS is off (--no-bos): there is no token to run; "
            "give a non-empty prompt or keep BOS on"
        )
    return ids


def stop_token_ids(tokenizer: TokenizerLike) -> set[int]:
    """EOS, and Gemma's <end_of_turn> where the vocabulary has it (chat turns end there)."""
    stops = {tokenizer.eos_id}
    try:
        end_of_turn = tokenizer.encode("<end_of_turn>", bos=False)
        if len(end_of_turn) == 1:
            stops.add(end_of_turn[0])
    except ValueError:
        pass
    return stops


@dataclass
class _Row:
    index: int  # position in the caller's list
    spec: PromptSpec
    ids: list[int]
    state: RowState
    tokens: list[int]
    steps: int = 0
    stopped: Optional[str] = None


def generate(engine: Engine, tokenizer: TokenizerLike, specs: Sequence[PromptSpec],
             policy: str, bounds: Optional[Bounds] = None,
             extra_recorder: Optional[Recorder] = None) -> list[Verdict]:
    """Runs every prompt in one batch and returns one Verdict each, in order."""
    bounds = bounds or Bounds()
    rows = [_Row(i, s, encode_prompt(tokenizer, s, bounds), RowState(s.add_bos), [])
            for i, s in enumerate(specs)]
    if not rows:
        return []
    if len(rows) > 1 and not engine.supports_padding:
        if len({len(r.ids) for r in rows}) > 1:
            raise ValueError("this engine cannot run padded batches: use batch size 1")
    table = _run(engine, tokenizer, rows, bounds, extra_recorder, stop_token_ids(tokenizer))
    return [_verdict(r, policy, table, tokenizer) for r in rows]


def _run(engine: Engine, tokenizer: TokenizerLike, rows: list[_Row], bounds: Bounds,
         extra: Optional[Recorder], stops: set[int]) -> SiteTable:
    device = engine.device
    width = max(len(r.ids) for r in rows)
    max_len = width + bounds.max_new_tokens
    ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), max_len), dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, width - len(r.ids):] = torch.tensor(r.ids)
        valid[b, width - len(r.ids):] = True
    # Position of each slot in its row's own sequence; padding gets -1 (0 for RoPE).
    slot_pos = torch.cumsum(valid.long(), dim=1) - 1
    slot_pos[~valid] = -1
    # Host mirrors of what each step feeds (positions, tokens): the probe's attribution needs
    # them on the host, and reading them back from the device would be more syncs per step.
    pos_host, feed_host = slot_pos.numpy().copy(), ids.numpy()
    ids, valid, slot_pos = ids.to(device), valid.to(device), slot_pos.to(device)
    probe = Probe()
    recorder = Tee(probe, extra)
    cache = engine.new_cache(len(rows), max_len)
    live = list(range(len(rows)))  # indices into rows of the rows still in the batch
    deadline = time.monotonic() + bounds.time_limit_s
    step, start, feed = 0, 0, ids
    while live:
        end = start + feed.shape[1]
        batch = Batch(token_ids=feed, positions=slot_pos[:, start:end].clamp(min=0),
                      slot_start=start, key_valid=valid[:, :end],
                      key_positions=slot_pos[:, :end].clamp(min=0))
        probe.begin_step()
        logits = engine(batch, cache, recorder)
        next_ids = greedy_tokens(logits)
        stats = probe.end_step()
        # The one host transfer per step: the probe table and the next tokens together (token
        # ids are < 2**24, exact in float32); positions and fed tokens have host mirrors.
        packet = torch.cat([stats.flatten(), next_ids.float()]).cpu().numpy()
        stats_np = packet[: stats.numel()].reshape(stats.shape)
        next_np = packet[stats.numel():].astype(np.int64)
        still = _advance(rows, live, step, stats_np, pos_host[:, start:end], feed_host,
                         next_np, probe.layout, stops, bounds, time.monotonic() > deadline)
        step += 1
        if not still:
            break
        if len(still) < len(live):
            kept = [live.index(i) for i in still]
            keep = torch.tensor(kept, device=device)
            cache.keep_rows(keep)
            valid, slot_pos = valid.index_select(0, keep), slot_pos.index_select(0, keep)
            next_ids, next_np = next_ids.index_select(0, keep), next_np[kept]
            pos_host = pos_host[kept]
            live = still
        # Decode: each live row feeds its last token at the next slot.
        start = end
        pos_host[:, start] = [len(rows[i].ids) + step - 1 for i in live]
        slot_pos[:, start] = torch.from_numpy(pos_host[:, start]).to(device)
        valid[:, start] = True
        feed, feed_host = next_ids.view(-1, 1), next_np.reshape(-1, 1)
    return SiteTable(probe.keys, probe.limits, engine.config.num_hidden_layers)


# greedy_tokens splits rows this long into ARGMAX_CHUNKS chunks (262144 = 256 x 1024).
ARGMAX_CHUNKS = 256
ARGMAX_CHUNKED_FROM = 1 << 16


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits.float(), dim=-1), faster on the CPU: the first index of each row's
    maximum, NaN winning (the float32 conversion is exact and monotonic, so the logits' own
    dtype gives the same index without a [B, vocab] copy).

    Long rows on the CPU: the row max (amax), each chunk's max, the first chunk that holds the
    row max, then argmax inside that chunk alone — the same first index, since every earlier
    chunk's max is smaller (inf and -inf included). Rows whose max is NaN take torch.argmax's
    answer. Measured at batch 64 on the 262144-wide head (2-core avx512 CPU): 3.6 / 6.4 / 4.2 ms
    instead of torch.argmax's 24 / 32 / 47 ms in float32 / bfloat16 / float16, several percent
    of a decode step. Elsewhere torch.argmax (a GPU's is fast, and the NaN check would add a
    sync there)."""
    b, vocab = logits.shape
    if logits.device.type != "cpu" or vocab < ARGMAX_CHUNKED_FROM or vocab % ARGMAX_CHUNKS:
        return torch.argmax(logits, dim=-1)
    chunks = logits.view(b, ARGMAX_CHUNKS, vocab // ARGMAX_CHUNKS)
    top = logits.amax(dim=-1)
    first = (chunks.amax(dim=-1) == top.unsqueeze(-1)).to(torch.uint8).argmax(dim=-1)  # [B]
    tokens = first * chunks.shape[-1] + chunks[torch.arange(b), first].argmax(dim=-1)
    nan = torch.isnan(top)
    if bool(nan.any()):
        tokens[nan] = torch.argmax(logits[nan], dim=-1)
    return tokens


def _advance(rows: list[_Row], live: list[int], step: int, stats: np.ndarray, pos: np.ndarray,
             feed: np.ndarray, next_ids: np.ndarray, layout: SiteLayout, stops: set[int],
             bounds: Bounds, timed_out: bool) -> list[int]:
    """Folds one step into each live row; returns the rows that go on."""
    still = []
    update_rows([rows[i].state for i in live], step, StepView(stats, pos, feed), layout)
    for b, i in enumerate(live):
        row = rows[i]
        row.steps = step + 1
        if row.state.first is not None:
            row.stopped = "nonfinite"
            continue
        token = int(next_ids[b])
        row.tokens.append(token)
        if token in stops:
            row.stopped = "eos"
        elif len(row.tokens) >= bounds.max_new_tokens:
            row.stopped = "max_new_tokens"
        elif timed_out:
            row.stopped = "timeout"
        else:
            still.append(i)
    return still


def _verdict(row: _Row, policy: str, table: SiteTable, tokenizer: TokenizerLike) -> Verdict:
    first = row.state.first
    return Verdict(
        prompt=row.spec.text, prompt_ids=list(row.ids), add_bos=row.spec.add_bos, policy=policy,
        finite=first is None and row.stopped != "timeout", first_nonfinite=first,
        max_abs=table.table(row.state.max_abs),
        content_max_abs=table.table(row.state.content_max_abs),
        limits=table.limit_table(), tokens=list(row.tokens),
        text=tokenizer.decode([t for t in row.tokens if t not in (tokenizer.eos_id,)]),
        steps=row.steps, stopped=row.stopped or "max_new_tokens",
    )


class Tee:
    """Sends each site to the probe and, optionally, to a second recorder."""

    def __init__(self, first: Recorder, second: Optional[Recorder]) -> None:
        self.first, self.second = first, second

    def site(self, layer: int, name: str, x: torch.Tensor) -> None:
        self.first.site(layer, name, x)
        if self.second:
            self.second.site(layer, name, x)

    def residual(self, layer: int, name: str, residual: torch.Tensor, branch: torch.Tensor,
                 out: torch.Tensor) -> None:
        self.first.residual(layer, name, residual, branch, out)
        if self.second:
            self.second.residual(layer, name, residual, branch, out)


def explain(engine: Engine, tokenizer: TokenizerLike, spec: PromptSpec, verdict: Verdict,
            bounds: Bounds) -> Verdict:
    """Adds the overflowing channel and the two terms to a residual-stream finding.

    Replays the prompt alone with a recorder that captures the residual add where the first
    non-finite value appeared; returns the verdict unchanged when there is nothing to explain."""
    first = verdict.first_nonfinite
    if first is None or first.site not in RESIDUAL_SITES or first.site == "embedding":
        return verdict
    capture = _StepCapture(first.layer, first.site, first.step)
    generate(engine, tokenizer, [spec], verdict.policy,
             Bounds(first.step + 1, bounds.max_prompt_tokens, bounds.time_limit_s), capture)
    column = first.position if first.step == 0 else 0
    found = capture.inner.channel_and_terms(column)
    if found is None:
        return verdict
    channel, terms = found
    verdict.first_nonfinite = dataclasses.replace(first, channel=channel, terms=terms)
    return verdict


class _StepCapture:
    """Arms a CaptureResidual on one step only (steps counted by the embedding site)."""

    def __init__(self, layer: int, site: str, step: int) -> None:
        self.inner = CaptureResidual(layer, site)
        self.step, self.seen = step, -1

    def site(self, layer: int, name: str, x: torch.Tensor) -> None:
        if name == "embedding":
            self.seen += 1
            self.inner.armed = self.seen == self.step

    def residual(self, layer: int, name: str, residual: torch.Tensor, branch: torch.Tensor,
                 out: torch.Tensor) -> None:
        self.inner.residual(layer, name, residual, branch, out)
