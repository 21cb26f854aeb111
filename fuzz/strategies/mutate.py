"""Stacked mutations of the prompts the search already has (the nearest misses).

Fresh draws rarely land next to the float16 limit: on Gemma 3 270M without BOS random search
stalled at headroom 1.01 for 700+ prompts, while edits of those near misses overflowed in 11 of
64 tries (measured). On the planted digit-run model (benchmarks/bench_search.py, RUN 24, 10 seeds)
drawing half of each round as stacked edits of the nearest misses needed a median of 172 prompts
to the first finding against 406 for random draws — AFL's "havoc" stage, driven by Hypothesis.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from .compose import fragments

# Deletion first: shrinking heads toward fewer, simpler edits.
MUTATIONS: tuple[str, ...] = ("delete", "duplicate", "repeat", "splice")
MAX_STACKED = 3
MAX_SPAN = 32

def mutants(pool: Sequence[str]) -> SearchStrategy[str]:
    """Draw a prompt of `pool` (a snapshot of the nearest misses, taken when the round starts, so
    that a replayed choice sequence draws the same prompt) edited by 1-3 stacked mutations:
    delete a span, duplicate the span before a point, repeat one character, or splice in a fresh
    fragment (fuzz.strategies.fragments). Positions and lengths are integer choices that
    Hypothesis's target phase can tune.

    Shrinks toward the pool's first prompt with one deletion of one character."""
    if not pool:
        raise ValueError("mutants: the pool of prompts to edit is empty; screen some prompts "
                         "first (the nearest misses are the pool)")
    prompts = tuple(pool)

    @st.composite
    def build(draw: st.DrawFn) -> str:
        text = draw(st.sampled_from(prompts))
        for op in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=MAX_STACKED)):
            text = _mutate(draw, op, text)
        return text

    return build()


def _mutate(draw: st.DrawFn, op: str, text: str) -> str:
    at = draw(st.integers(0, len(text)))
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
