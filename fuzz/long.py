"""The long-generation profile: `fuzz run --long` and pytest's `--gemma-long`.

Prompts of 513..1,024 tokens (past Gemma 3's 512-token sliding window, fuzz.strategies.long) and
up to 128 decode steps. The bounds are stored in every case saved under the profile (fuzz.corpus
keeps max_new_tokens and max_prompt_tokens), and replay runs a case with its own bounds, so a
long case replays as long as it was found.
"""
from __future__ import annotations

from typing import Any, Optional

from fuzz.session import DEFAULT_BATCH_SIZE
from fuzz.strategies.long import LONG_MAX_PROMPT_TOKENS, SLIDING_WINDOW, long_prompts
from fuzz.verdict import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_PROMPT_TOKENS, Bounds

LONG_MAX_NEW_TOKENS = 128
# Per generate() call. Measured on Gemma 3 270M, 2 shared CPU cores (docs/GUIDE.md, "Long
# generations"): a batch of long prompts with 128 decode steps runs for minutes, and a run cut by
# the time limit is only inconclusive, so the limit is generous.
LONG_TIME_LIMIT_S = 1800.0
# Rows per batch: a long row's prefill is ~10x a default one's, and the KV cache of 1,152 slots
# per row is what decode steps read; 2 rows keep a batch's latency near one row's.
LONG_BATCH_SIZE = 2


def long_bounds(max_new_tokens: Optional[int] = None,
                max_prompt_tokens: Optional[int] = None) -> Bounds:
    """The long profile's bounds; a bound the user gave (not None) wins."""
    return Bounds(
        max_new_tokens=LONG_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
        max_prompt_tokens=LONG_MAX_PROMPT_TOKENS if max_prompt_tokens is None
        else max_prompt_tokens,
        time_limit_s=LONG_TIME_LIMIT_S)


def profile_bounds(long: bool, max_new_tokens: Optional[int] = None,
                   max_prompt_tokens: Optional[int] = None) -> Bounds:
    """A run's bounds: the default profile's (fuzz.verdict.Bounds) or, with `long`, the long
    one's; a bound the user gave (not None) wins either way."""
    if long:
        return long_bounds(max_new_tokens, max_prompt_tokens)
    return Bounds(
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
        max_prompt_tokens=DEFAULT_MAX_PROMPT_TOKENS if max_prompt_tokens is None
        else max_prompt_tokens)


def profile_batch_size(long: bool, given: Optional[int] = None) -> int:
    """A run's batch size: the one the user gave, else the profile's."""
    if given is not None:
        return given
    return LONG_BATCH_SIZE if long else DEFAULT_BATCH_SIZE


def long_strategy(session: Any) -> Any:
    """fuzz.strategies.long_prompts for the session's tokenizer and prompt bound (at least one
    token past the window when the bound allows it)."""
    bound = session.bounds.max_prompt_tokens
    tokenizer = session.model.tokenizer
    return long_prompts(tokenizer, min_tokens=min(SLIDING_WINDOW + 1, bound), max_tokens=bound,
                        vocabulary=tokenizer.vocabulary())
