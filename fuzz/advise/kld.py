"""Teacher-forced divergence from float32: every policy on the same token sequences, logits at
every position, compared with float32's (fuzz.advise.stats).

Sequences come from three sources: the text set (fuzz.advise.text), the sampled prompts'
float32 greedy continuations and the corpus cases' (prompt + float32's generated tokens). A
sequence runs alone, unpadded, from slot 0 (the engines' `last_only=False` forward); float32's
logits are computed once per sequence and every other policy is compared with them before the
next sequence starts, so at most two sequences' logits are alive (a 64-token chunk of Gemma 3's
262144-token vocabulary is 64 MB in float32). Positions where the policy's logits are not
finite are counted and left out of the statistics; the policy is then not finite everywhere.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fuzz.advise.stats import (
    Divergence,
    Reference,
    SequenceStats,
    compare_logits,
    summarize,
)
from fuzz.engine.interface import prompt_batch
from fuzz.precision import PrecisionPolicy
from fuzz.session import Session

# A corpus case whose prompt and continuation exceed this is not teacher-forced (its logits at
# every position would be 1 MB each); generation still checks its finiteness.
MAX_SEQUENCE_TOKENS = 512


@dataclass
class TokenSequence:
    source: str  # "text", "sampled" or "corpus"
    ids: list[int]


def continuation(prompt_ids: Sequence[int], generated: Sequence[int]) -> list[int]:
    """The teacher-forced sequence of a greedy run: its prompt, then what float32 generated."""
    return list(prompt_ids) + list(generated)


def logits(session: Session, policy: PrecisionPolicy, ids: Sequence[int]) -> torch.Tensor:
    """[T, vocab] logits of one unpadded sequence under the policy (the model lock held: one
    forward at a time on one model)."""
    engine = session.engine(policy)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=engine.device)
    with session.exclusive():
        out = engine(prompt_batch(tokens), engine.new_cache(1, len(ids)), None, last_only=False)
    return out[0].detach().cpu()


def teacher_forced(session: Session, policies: Sequence[PrecisionPolicy], reference: str,
                   sequences: Sequence[TokenSequence],
                   progress: Callable[[str], None] = lambda line: None
                   ) -> dict[str, Divergence]:
    """Every policy against `reference` on every sequence; the reference's own row is the
    comparison with itself (zero divergence, unless its own logits were not finite)."""
    by_name = {p.name: p for p in policies}
    per: dict[str, list[SequenceStats]] = {p.name: [] for p in policies}
    for k, seq in enumerate(sequences):
        if len(seq.ids) < 2:
            raise ValueError(f"a teacher-forced sequence needs 2 tokens, got {len(seq.ids)} "
                             f"({seq.source})")
        ref = logits(session, by_name[reference], seq.ids)[:-1]
        prepared = Reference(ref, torch.tensor(seq.ids[1:]))  # once, for every policy
        for p in policies:
            got = ref if p.name == reference else logits(session, p, seq.ids)[:-1]
            per[p.name].append(compare_logits(prepared, got))
            del got
        progress(f"teacher-forced: {k + 1}/{len(sequences)} sequences under every policy "
                 f"({seq.source}, {len(seq.ids)} tokens)")
    sources = [s.source for s in sequences]
    return {name: summarize(stats, sources) for name, stats in per.items()}
