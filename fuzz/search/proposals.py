"""Gradient-guided proposals: single-token swaps that push a near miss toward float16's limit.

A near miss is a prompt whose float16 run stayed finite but came close to 65504 at some content
site. Random edits of it (fuzz.strategies.mutants) do not know which token matters; the
gradient does. HotFlip (Ebrahimi et al. 2018): with L the worst site's max |x| and e_i the input
embedding at position i, swapping token i for token v changes L by about (e_v - e_i) . dL/de_i,
so one forward + backward scores every (position, token) pair at once, and for all v the scores
are one [T, V] matmul of the gradient with the embedding matrix.

How the gradient is taken (the normal path stays as it is):
- on the float32 copy of the model (`LoadedModel.engine(float32)`): float16 would overflow in
  the backward pass long before the forward, and the objective is the magnitude, not the rounding;
- `GemmaForCausalLM.forward` is decorated with `torch.no_grad`: this module calls the undecorated
  function (`inspect.unwrap`) under `torch.enable_grad`, with a recorder (`_GradCapture`) that
  marks the embedding site's tensor (the scaled embeddings sqrt(hidden) * E[ids], a fresh tensor
  that no weight's graph reaches) as the one leaf that requires grad. Every weight keeps
  requires_grad=False, so nothing accumulates in the shared model and the weights stay frozen;
- the same recorder captures the target site's tensor and then stops the forward (an exception
  it raises itself): nothing after the site changes the objective, so the later layers and the
  262144-row head are never computed.

The objective is the target site's max |x| over content positions (BOS excluded), reduced as
fuzz.probe reduces it, teacher-forced over the prompt plus the tokens the float16 run generated
and fed back (so a decode-step near miss is scored where it happened; by causality the positions
after the worst one add nothing). Only prompt positions are edited; the generated tokens are held
fixed, which is what "first order" means here: an edit that changes the continuation is judged
by screening, not by this estimate.

Measured (benchmarks/bench_proposals.py, 2-core x86-64 with avx512_fp16, 3 seeds x 10 near misses
with content headroom 1.02-1.78, k = 8): some proposal overflowed for 22 of 30 near misses, some
of 8 random single-token swaps (same filters) for 15 of 30; 13% of proposed swaps overflowed
against 10% of random ones. One proposal round costs ~0.4 s on a quiet machine (forward to the
site + backward + the [T, 262144] scores), less than screening the 8 proposals it returns. The
first-order scores overshoot the real change many times over (RMSNorm everywhere): they rank,
they do not predict.

Replacement tokens are text pieces only (fuzz.strategies' notion, `text_piece_ids`, narrowed by
the tokenizer's piece types), and every edit is decoded and re-encoded: an edit whose text
tokenizes to other ids (a piece that merges with its neighbour) is skipped and counted.
"""
from __future__ import annotations

import functools
import inspect
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from fuzz.engine.interface import prompt_batch
from fuzz.engine.model import GemmaForCausalLM
from fuzz.precision import get_policy
from fuzz.probe import abs_max
from fuzz.session import Session
from fuzz.strategies.vocabulary import text_piece_ids
from fuzz.verdict import Verdict

# Candidates decoded (best score first) before giving up on finding k that survive
# re-tokenization: each costs one decode + one encode (tens of microseconds); measured on Gemma
# 3 270M near misses, about 1 candidate in 17 re-tokenizes to other ids.
DEFAULT_MAX_TRIES = 256


class NotANearMiss(ValueError):
    """The verdict cannot be proposed from: it already overflowed, or has nothing to edit."""


@dataclass(frozen=True)
class Edit:
    """One single-token swap of a near miss."""

    position: int  # index into verdict.prompt_ids (0 is BOS when add_bos: never edited)
    old_id: int
    new_id: int
    # First-order estimate of the change of the target site's max |x| (float32, in |x| units):
    # a ranking, not a prediction (max is piecewise linear; the real change is screened).
    score: float
    text: str  # the edited prompt; it encodes back to exactly the edited ids


@dataclass
class Proposals:
    """What `rank_swaps` found for one near miss."""

    layer: int  # the target site (the verdict's worst content site)
    site: str
    objective: float  # its max |x| over content positions in the float32 teacher-forced run
    edits: list[Edit]  # best first, at most k
    tried: int  # candidates decoded, best first, to get `edits`
    retokenized: int  # of those, skipped: their text encodes to other ids
    seconds: float  # forward + backward + scoring + decoding

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.edits]


def propose(session: Session, verdict: Verdict, k: int = 8, *, spread: bool = True,
            decode_steps: bool = True, max_tries: int = DEFAULT_MAX_TRIES) -> list[str]:
    """The prompt texts of the k best single-token swaps for the near miss `verdict` (a finite
    or inconclusive verdict; BOS as in verdict.add_bos), in the order `rank_swaps` gives; fewer
    only when fewer than k candidates survive re-tokenization."""
    return rank_swaps(session, verdict, k, spread=spread, decode_steps=decode_steps,
                      max_tries=max_tries).texts


def rank_swaps(session: Session, verdict: Verdict, k: int = 8, *, spread: bool = True,
               decode_steps: bool = True, max_tries: int = DEFAULT_MAX_TRIES) -> Proposals:
    """HotFlip-ranks every (prompt position, text piece) swap of `verdict` by the first-order
    change of its worst content site's max |x| and keeps k that re-tokenize exactly.

    spread: each position's best swap first (positions in score order), then each one's second
    best, and so on; False: the k best scores overall, which pile onto the position with the
    largest gradient, one large-norm piece after another. Why spread is the default (measured,
    benchmarks/bench_proposals.py, 30 real near misses of Gemma 3 270M without BOS, k = 8):
    some proposal overflowed for 22 of 30 near misses spread, 17 not spread, 15 for random
    swaps; a modest edge on a small sample (per swap: 13%, 16%, 10%). decode_steps:
    teacher-force the generated tokens too (a decode-step near miss is scored at its step);
    False scores the prefill alone.
    max_tries: candidates decoded at most. Raises NotANearMiss for a non-finite verdict or one
    without an editable position, ValueError for k < 1 or ids that are not the prompt's plain
    encoding (a chat-wrapped PromptSpec: pass the template as text instead)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    started = time.perf_counter()
    ids, editable = _check(session, verdict)
    layer, site = target_site(verdict, session.model.config.num_hidden_layers)
    fed = ids + (fed_tokens(verdict) if decode_steps else [])
    engine = session.model.engine(get_policy("float32"), session.device, "builtin")
    first = editable
    if layer >= session.model.config.num_hidden_layers:
        # The head's sites (final norm, logits) exist only at the last prompt position and at
        # each decode step (last_only): the objective must not see the other positions.
        first = max(first, len(ids) - 1)
    usable = usable_mask(session.model.tokenizer)
    with session.exclusive():
        objective, scores = swap_scores(engine, fed, len(ids), layer, site, first, usable)
    scores[:editable] = -torch.inf  # BOS is not an edit (the sink every prompt shares)
    edits: list[Edit] = []
    tried = 0
    for position, new_id in _candidates(scores, max_tries, spread):
        tried += 1
        text = retokenizes(session.model.tokenizer, ids, verdict.add_bos, position, new_id)
        if text is not None:
            edits.append(Edit(position, ids[position], new_id,
                              float(scores[position, new_id]), text))
            if len(edits) == k:
                break
    return Proposals(layer, site, objective, edits, tried, tried - len(edits),
                     time.perf_counter() - started)


def random_swaps(session: Session, verdict: Verdict, k: int, rng: random.Random,
                 max_tries: int = DEFAULT_MAX_TRIES) -> list[str]:
    """k random single-token swaps of the same kind (text pieces, exact re-tokenization): the
    baseline the gradient's proposals are measured against (benchmarks/bench_proposals.py)."""
    ids, editable = _check(session, verdict)
    tokenizer = session.model.tokenizer
    usable = torch.nonzero(usable_mask(tokenizer)).flatten().tolist()
    texts: list[str] = []
    for _ in range(max_tries):
        position = rng.randrange(editable, len(ids))
        new_id = rng.choice(usable)
        if new_id == ids[position]:
            continue
        text = retokenizes(tokenizer, ids, verdict.add_bos, position, new_id)
        if text is not None and text not in texts:
            texts.append(text)
            if len(texts) == k:
                break
    return texts


def target_site(verdict: Verdict, num_layers: int) -> tuple[int, str]:
    """(layer, site) of the smallest content headroom: for float16, the largest content |x|."""
    found = verdict.min_headroom_site(content_only=True)
    if found is None:
        raise NotANearMiss(f"the verdict for {verdict.prompt!r} has no content site measured "
                           "(an empty prompt with BOS has no content position to edit)")
    label, site = found
    layer = -1 if label == "embedding" else num_layers if label == "head" else int(label)
    return layer, site


def fed_tokens(verdict: Verdict) -> list[int]:
    """The generated tokens the run fed back: one per decode step (the last token generated,
    EOS or the one at the step bound, was never fed)."""
    return list(verdict.tokens[: max(verdict.steps - 1, 0)])


def swap_scores(engine: GemmaForCausalLM, ids: list[int], prompt_len: int, layer: int,
                site: str, first: int, usable: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(objective, scores [prompt_len, V] on the CPU) for the sequence `ids` (the prompt, then
    any fed tokens): the site's max |x| over positions `first`.. (the content positions: 1 with
    BOS), and (h_v - h_i) . dL/dh_i for every prompt position i and token v, -inf where that is
    not a proposal (an unusable token, the position's own token, an estimate <= 0).
    h = sqrt(hidden) * E[id] is the scaled embedding the model adds up, so the scores are in
    |x| units; the scale is common to all v, so ranking by h or by e is the same (HotFlip's
    (e_v - e_i) . dL/de_i)."""
    if not isinstance(engine, GemmaForCausalLM):
        raise TypeError(f"gradients need the built-in engine, got {type(engine).__name__}")
    device = engine.device
    token_ids = torch.tensor([ids], dtype=torch.long, device=device)
    capture = _GradCapture(layer, site)
    forward = inspect.unwrap(GemmaForCausalLM.forward)  # without its torch.no_grad
    with torch.enable_grad():
        try:
            forward(engine, prompt_batch(token_ids), engine.new_cache(1, len(ids)), capture,
                    last_only=False)
        except _SiteReached:
            pass
        if capture.embedding is None or capture.captured is None:
            raise ValueError(f"the forward never produced site ({layer}, {site!r})")
        objective = _reduce(capture.captured)[0, first:].max()
        (grad,) = torch.autograd.grad(objective, capture.embedding)
    # Only prompt positions are edited: the fed tokens' rows are never scored.
    h, g = capture.embedding.detach()[0, :prompt_len], grad[0, :prompt_len]  # [T, D]
    normalizer = h.new_tensor(engine.config.hidden_size ** 0.5)  # as the forward scales E
    scores = F.linear(g, engine.embedder.weight) * normalizer - (h * g).sum(-1, keepdim=True)
    # Only increases are proposals: a swap estimated to lower the max is not one, and a
    # position with no gradient at all (after the worst position: causality) has no estimate.
    scores[scores <= 0] = -torch.inf
    scores = scores.cpu()
    scores[:, ~usable] = -torch.inf
    scores[torch.arange(prompt_len), torch.tensor(ids[:prompt_len])] = -torch.inf  # no edit
    return float(objective.detach()), scores


def retokenizes(tokenizer: Any, ids: list[int], add_bos: bool, position: int,
                new_id: int) -> Optional[str]:
    """The text of `ids` with ids[position] = new_id, or None when that text encodes to other
    ids (SentencePiece would merge or split the new piece with its neighbours: the model would
    never see the edit that was scored)."""
    edited = list(ids)
    edited[position] = new_id
    text = tokenizer.decode(edited[1:] if add_bos else edited)
    return text if tokenizer.encode(text, bos=add_bos) == edited else None


@functools.lru_cache(maxsize=4)
def usable_mask(tokenizer: Any) -> torch.Tensor:
    """[V] bool: the pieces a swap may write. fuzz.strategies' text pieces (not spelled like a
    control or byte piece), minus whatever SentencePiece itself types as control, unknown,
    unused or byte (a tokenizer whose special pieces are spelled otherwise). Cached: listing and
    typing Gemma 3's 262144 pieces takes 0.3 s."""
    sp = tokenizer.sp_model
    mask = torch.zeros(tokenizer.n_words, dtype=torch.bool)
    mask[text_piece_ids(tokenizer.vocabulary())] = True
    for i in torch.nonzero(mask).flatten().tolist():
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i) or sp.IsByte(i):
            mask[i] = False
    return mask


def _check(session: Session, verdict: Verdict) -> tuple[list[int], int]:
    """The verdict's ids and its first editable position, or a clear refusal."""
    if verdict.nonfinite:
        first = verdict.first_nonfinite
        raise NotANearMiss(
            f"the verdict for {verdict.prompt!r} is non-finite ({first.kind} at step "
            f"{first.step}, layer {first.layer}, {first.site}): it is a finding, not a near "
            "miss; propose from a finite verdict (the nearest misses)")
    ids = list(verdict.prompt_ids)
    if session.model.tokenizer.encode(verdict.prompt, bos=verdict.add_bos) != ids:
        raise ValueError(
            f"the verdict's token ids are not the plain encoding of its prompt {verdict.prompt!r}"
            " (run with PromptSpec(chat=True)?): proposals edit the prompt text itself, so put "
            "the chat template in the text (fuzz.strategies.chat_turn) instead")
    editable = 1 if verdict.add_bos else 0
    if len(ids) <= editable:
        raise NotANearMiss(f"the prompt {verdict.prompt!r} has no token to edit")
    return ids, editable


def _candidates(scores: torch.Tensor, max_tries: int, spread: bool) -> list[tuple[int, int]]:
    """At most `max_tries` (position, token) pairs with a finite score, in the order rank_swaps
    tries them: by score, or (spread) by rank within the position first, then by score. Built
    from a top-k per position, never a sort of all T x V scores."""
    values, tokens = torch.topk(scores, min(max_tries, scores.shape[1]), dim=1)  # rows sorted
    flat = values.flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    if spread:  # a candidate's column is its rank within its row; stable: score order inside
        order = order[torch.argsort(order % values.shape[1], stable=True)]
    order = order[torch.isfinite(flat[order])][:max_tries]
    rows, cols = order // values.shape[1], order % values.shape[1]
    return list(zip(rows.tolist(), tokens[rows, cols].tolist()))


def _reduce(x: torch.Tensor) -> torch.Tensor:
    """max |x| per (row, position), with the dims fuzz.probe.Probe.site reduces (attention
    scores [B, heads, T, S]: over heads and keys)."""
    return abs_max(x, (1, 3) if x.dim() == 4 else -1)


class _SiteReached(Exception):
    """Raised by _GradCapture once the target site exists: stops the forward there."""


class _GradCapture:
    """A Recorder: makes the embedding site's tensor the leaf of the graph and captures the
    target site's tensor (a residual add's output, as the probe sees it)."""

    def __init__(self, layer: int, site: str) -> None:
        self.layer, self.name = layer, site
        self.embedding: Optional[torch.Tensor] = None
        self.captured: Optional[torch.Tensor] = None

    def site(self, layer: int, name: str, x: torch.Tensor) -> None:
        if name == "embedding" and self.embedding is None:
            # h = E[ids] * sqrt(hidden) was computed from frozen weights, so it is a leaf; from
            # here on every op records its graph (the caller enabled grad).
            x.requires_grad_(True)
            self.embedding = x
        if layer == self.layer and name == self.name:
            self.captured = x
            raise _SiteReached

    def residual(self, layer: int, name: str, residual: torch.Tensor, branch: torch.Tensor,
                 out: torch.Tensor) -> None:
        self.site(layer, name, out)


@dataclass
class Proposer:
    """The gradient arm of the search (fuzz.search.round.round_strategy): at each round's start,
    swaps proposed for the `per_round` nearest misses not proposed from yet, kept across rounds (the
    newest `keep`), so that a round screens them as they are beside fresh draws and mutants.

    Only the built-in engine has the gradients (fuzz.search.proposals.swap_scores); other engines,
    and a near miss that has nothing to edit, get no proposals."""

    session: Session
    k: int = 8
    per_round: int = 2
    keep: int = 64
    proposed: list[str] = field(default_factory=list)
    _done: set[tuple[str, bool]] = field(default_factory=set)
    seconds: float = 0.0  # spent proposing, for the benchmark

    def for_round(self, misses: Sequence[Verdict]) -> list[str]:
        if self.session.engine_kind != "builtin":
            return []
        started = time.perf_counter()
        fresh = [v for v in misses if (v.prompt, v.add_bos) not in self._done][: self.per_round]
        for verdict in fresh:
            self._done.add((verdict.prompt, verdict.add_bos))
            try:
                texts = propose(self.session, verdict, self.k)
            except (NotANearMiss, ValueError):
                continue  # nothing to edit, or a chat-wrapped prompt: the other arms remain
            self.proposed = [t for t in texts if t not in self.proposed] + self.proposed
        del self.proposed[self.keep:]
        self.seconds += time.perf_counter() - started
        return list(self.proposed)
