"""The long-generation profile: `fuzz run --long` and pytest's `--gemma-long`.

Prompts of 513..1,024 tokens (past Gemma 3's 512-token sliding window, fuzz.strategies.long) and
up to 128 decode steps. The bounds are stored in every case saved under the profile (fuzz.corpus
keeps max_new_tokens and max_prompt_tokens), and replay runs a case with its own bounds, so a
long case replays as long as it was found.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from fuzz.generate import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_PROMPT_TOKENS, Bounds
from fuzz.strategies.long import LONG_MAX_PROMPT_TOKENS, SLIDING_WINDOW, long_prompts

LONG_MAX_NEW_TOKENS = 128
# Per generate() call. Measured on Gemma 3 270M, 2 shared CPU cores (README, "Long
# generations"): a batch of long prompts with 128 decode steps runs for minutes, and a run cut by
# the time limit is only inconclusive, so the limit is generous.
LONG_TIME_LIMIT_S = 1800.0
# Rows per batch: a long row's prefill is ~10x a default one's, and the KV cache of 1,152 slots
# per row is what decode steps read; 2 rows keep a batch's latency near one row's.
LONG_BATCH_SIZE = 2
RUN_BATCH_SIZE = 8  # `fuzz run --batch-size`'s default: under --long, LONG_BATCH_SIZE replaces it


def long_bounds(given: Bounds) -> Bounds:
    """The long profile's bounds; a bound the user set away from its default wins."""
    new = given.max_new_tokens
    prompt = given.max_prompt_tokens
    return dataclasses.replace(
        given,
        max_new_tokens=LONG_MAX_NEW_TOKENS if new == DEFAULT_MAX_NEW_TOKENS else new,
        max_prompt_tokens=(LONG_MAX_PROMPT_TOKENS if prompt == DEFAULT_MAX_PROMPT_TOKENS
                           else prompt),
        time_limit_s=max(given.time_limit_s, LONG_TIME_LIMIT_S))


def long_batch_size(given: int) -> int:
    """The long profile's batch size, unless the user set one."""
    return LONG_BATCH_SIZE if given == RUN_BATCH_SIZE else given


def long_strategy(session: Any) -> Any:
    """fuzz.strategies.long_prompts for the session's tokenizer and prompt bound (at least one
    token past the window when the bound allows it)."""
    bound = session.bounds.max_prompt_tokens
    tokenizer = session.model.tokenizer
    return long_prompts(tokenizer, min_tokens=min(SLIDING_WINDOW + 1, bound), max_tokens=bound,
                        vocabulary=tokenizer.vocabulary())
