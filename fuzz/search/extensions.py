"""The extension arm of `fuzz run --extend`: after each round, the mode's nearest miss with a
slice of the vocabulary as its next token.

Why this arm: in a causal model whether one more token overflows at its own position depends on that
token alone, given the prompt before it (fuzz.next_token), and one decode step per candidate is
cheap — on Gemma 3 270M 535 candidates per second on a 2-core CPU against ~2 whole prompts of 16 new
tokens (benchmarks/README.md, "fuzz sweep's rate"). Every committed no-BOS case of the real model
overflows at or next to its last prompt token, so the one-token extensions of the prompt that came
closest are where the next finding most likely is.

Each round takes the next PER_ROUND ids of a seeded permutation of the vocabulary for that nearest
miss (the whole vocabulary over enough rounds on one miss), runs them as next tokens (the screening
kernel, non-finite ones and near misses again natively), and returns, screened as ordinary prompts
(Session.screen: the faithful verdict, a new signature confirmed alone), every extension that went
non-finite and the closest finite one: the job saves the first as findings and offers the second to
the mode's nearest misses, so that the next round can extend it again. An extension whose text does
not encode back to the same ids is not a prompt anyone can replay: it is left out.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

from fuzz.next_token import Prefix, SweepError, SweepRunner, default_kernel
from fuzz.precision import PrecisionPolicy
from fuzz.session import NEAR_MISS_HEADROOM, Screened, Session
from fuzz.verdict import PromptSpec, Signature, Verdict

# Candidate next tokens per round: ~2 s on Gemma 3 270M on this repository's 2-core CPU
# (fp32-accumulate-wide, batch 256), a fraction of a round of 40 whole prompts.
PER_ROUND = 1024
BATCH = 256
# Non-finite extensions screened as prompts per round (each costs a whole generation).
MAX_FAILING = 8


@dataclass
class ExtensionArm:
    session: Session
    seed: int
    per_round: int = PER_ROUND
    tokens: int = 0  # candidate next tokens run so far (what the arm screened)
    rounds: int = 0  # turns in which it ran any
    _cursor: dict[tuple[int, ...], int] = field(default_factory=dict)
    _runner: Optional[tuple[tuple[tuple[int, ...], str], SweepRunner]] = None
    _order: Optional[tuple[tuple[int, ...], list[int]]] = None  # (prompt ids, its permutation)

    def round(self, miss: Verdict, policy: PrecisionPolicy, known: set[Signature]
              ) -> list[tuple[PromptSpec, Screened]]:
        ids = tuple(miss.prompt_ids)
        if len(ids) + 1 > self.session.bounds.max_prompt_tokens:
            return []  # no room for one more token
        runner = self._runner_for(ids, miss, policy)
        if runner is None:
            return []
        tokens = self._next_slice(ids)
        kernel = default_kernel(runner.engine.device.type, policy.dtype)
        results = [r for i in range(0, len(tokens), BATCH)
                   for r, _, _ in runner.run_confirmed(tokens[i: i + BATCH], kernel,
                                                       NEAR_MISS_HEADROOM)]
        self.tokens += len(tokens)
        self.rounds += 1
        failing = sorted((r for r in results if r.first is not None),
                         key=lambda r: -(r.margin or 0.0))[:MAX_FAILING]
        finite = [r for r in results if r.first is None]
        closest = min(finite, key=lambda r: r.least_headroom, default=None)
        specs = [spec for r in [*failing, *([closest] if closest else [])]
                 if (spec := self._prompt(runner.prefix, r.token_id)) is not None]
        if not specs:
            return []
        return list(zip(specs, self.session.screen(specs, policy.name, known)))

    def _runner_for(self, ids: tuple[int, ...], miss: Verdict, policy: PrecisionPolicy
                    ) -> Optional[SweepRunner]:
        """The prefix run once per (prompt, policy); refused prefixes give no runner."""
        key = (ids, policy.name)
        if self._runner is not None and self._runner[0] == key:
            return self._runner[1]
        tokenizer = self.session.model.tokenizer
        content = ids[1:] if miss.add_bos else ids
        prefix = Prefix(ids, miss.add_bos, tokenizer.decode(list(content)))
        try:
            runner = SweepRunner(self.session.engine(policy), prefix,
                                 self.session.model.config.num_hidden_layers)
        except SweepError:  # the miss overflows by itself in this run: nothing to extend
            return None
        self._runner = (key, runner)
        return runner

    def _next_slice(self, ids: tuple[int, ...]) -> list[int]:
        """The next per_round ids of this prompt's own seeded permutation of the vocabulary (the
        last prompt's permutation kept: shuffling 262,144 ids again each round costs more than
        the slice's lookup)."""
        vocab = self.session.model.tokenizer.n_words
        start = self._cursor.get(ids, 0)
        if self._order is None or self._order[0] != ids:
            order = list(range(vocab))
            random.Random(f"{self.seed}/{ids}").shuffle(order)
            self._order = (ids, order)
        order = self._order[1]
        self._cursor[ids] = (start + self.per_round) % vocab
        return [order[(start + i) % vocab] for i in range(min(self.per_round, vocab))]

    def _prompt(self, prefix: Prefix, token_id: int) -> Optional[PromptSpec]:
        """The extension as a prompt text, when that text encodes back to the same ids."""
        tokenizer = self.session.model.tokenizer
        text = tokenizer.decode([*prefix.content_ids, token_id])
        if tokenizer.encode(text, bos=prefix.add_bos) != [*prefix.ids, token_id]:
            return None
        return PromptSpec(text, add_bos=prefix.add_bos)
