"""Stacked mutations of the prompts the search already has (the nearest misses).

Fresh draws rarely land next to the float16 limit: on Gemma 3 270M without BOS random search
stalled at headroom 1.01 for 700+ prompts, while edits of those near misses overflowed in 11 of
64 tries (measured). On the planted digit-run model (benchmarks/bench_search.py, 10 seeds) drawing
half of the prompts as stacked edits of the nearest misses, read live, needed a median of 88
prompts to the first finding against 376 (RUN 24) and 782 (RUN 40) for random draws — AFL's
"havoc" stage, driven by Hypothesis.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Optional

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from fuzz.strategies.compose import fragments

# Deletion first: shrinking heads toward fewer, simpler edits.
MUTATIONS: tuple[str, ...] = ("delete", "duplicate", "repeat", "splice")
MAX_STACKED = 3
MAX_SPAN = 32

# Every choice below has the same range whatever the pool holds (pool indices are taken modulo
# its size, positions as a fraction of the text's length): Hypothesis replays a choice sequence
# and requires it to draw the same kinds of choices each time (FlakyStrategyDefinition otherwise),
# and the pool may change under a strategy that is already built (fuzz.search.round's live misses).
MAX_POOL_INDEX = 63
POSITION_STEPS = 1024


def mutants(pool: Sequence[str],
            on_draw: Optional[Callable[[str, str], None]] = None) -> SearchStrategy[str]:
    """Draw a prompt of `pool` edited by 1-3 stacked mutations: delete a span, duplicate the
    span before a point, repeat one character, or splice in a fresh fragment
    (fuzz.strategies.fragments). Positions and lengths are integer choices that Hypothesis's
    target phase can tune.

    `pool` is read at every draw, so a list the caller keeps up to date (fuzz.search.round: the
    mode's nearest misses, closest first, frozen while a failure is shrunk so that a replayed choice
    sequence draws the same prompt) steers every draw by what the search has just seen. While
    it is empty the edits apply to the empty text: only splices then yield a prompt.

    `on_draw(base, mutant)` is told which pool prompt each mutant was edited from (what a finding
    grew from: fuzz.search.round). Shrinks toward the pool's first prompt with one deletion of one
    character."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        index = draw(st.integers(0, MAX_POOL_INDEX))
        base = text = pool[index % len(pool)] if pool else ""
        for op in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=MAX_STACKED)):
            text = _mutate(draw, op, text)
        if on_draw is not None:
            on_draw(base, text)
        return text

    return build()


def _mutate(draw: st.DrawFn, op: str, text: str) -> str:
    at = draw(st.integers(0, POSITION_STEPS - 1)) * (len(text) + 1) // POSITION_STEPS
    size = draw(st.integers(1, MAX_SPAN))
    if op == "delete":
        return text[:at] + text[at + size:]
    if op == "duplicate":  # copy the `size` characters before `at` in after them
        return text[:at] + text[max(0, at - size):at] + text[at:]
    if op == "repeat":
        return text[:at] + text[at:at + 1] * size + text[at:] if text else text
    return text[:at] + draw(_splice_fragments()).text + text[at:]


@functools.cache
def _splice_fragments() -> SearchStrategy:
    """Built once: fragments() builds a dozen strategies, and _mutate draws on every example."""
    return fragments()
