"""Long prompts: past Gemma 3's 512-token sliding window (`fuzz run --long`, `--gemma-long`).

Gemma 3's local layers attend over the last 512 positions only; a prompt that runs past the
window exercises what short prompts never reach: local layers that no longer see BOS or the
prompt's first sinks, the global layers' long-range RoPE, and KV caches of ~1,000 slots. Drawing
1,000 tokens of free text would exhaust Hypothesis's choice buffer, so a long prompt is built
from pieces Hypothesis can draw cheaply and shrink well:

    filler, repeated up to the drawn token count + tail

- filler: one ordinary prompt (fuzz.strategies.prompts), repeated to fill the window: what the
  sliding window slides over;
- tail: another ordinary prompt at the end, past position 512: where a trigger has to act
  without the early context.

The length is drawn in tokens (characters per token range from 1 for digits and CJK to ~4 for
English), so the strategy takes the model's tokenizer: every prompt it yields fits the bound,
and shrinking lowers the token count toward just past the window before it simplifies the
filler and the tail.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from fuzz.strategies.compose import prompts

LONG_MAX_PROMPT_TOKENS = 1024
SLIDING_WINDOW = 512  # Gemma 3's; what the prompts must get past
LONG_SEPARATORS = ("\n", " ", "\n\n", ". ")


class Tokenizer(Protocol):
    def encode(self, s: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def long_prompts(tokenizer: Tokenizer, *, min_tokens: int = SLIDING_WINDOW + 1,
                 max_tokens: int = LONG_MAX_PROMPT_TOKENS,
                 vocabulary: Sequence[str] | None = None) -> SearchStrategy[str]:
    """Prompts of min_tokens..max_tokens tokens (BOS included): a filler repeated up to a drawn
    token count, then a tail. The count shrinks toward min_tokens (just past the window)."""
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"long_prompts needs 1 <= min_tokens <= max_tokens, got "
                         f"min_tokens={min_tokens}, max_tokens={max_tokens}")
    # A non-empty filler: with an empty one standing in for a fixed default, a short run's few
    # examples were all that default repeated (measured: 3 of 3 in a 5-minute `run --long`)
    piece = prompts(max_chars=400, vocabulary=vocabulary).filter(lambda t: t.strip() != "")
    tail = prompts(max_chars=200, vocabulary=vocabulary)

    @st.composite
    def build(draw: st.DrawFn) -> str:
        target = draw(st.integers(min_tokens, max_tokens))
        unit = draw(piece) + draw(st.sampled_from(LONG_SEPARATORS))
        end = draw(tail)
        text = fill_at_least(tokenizer, unit, end, target, min_tokens, max_tokens)
        assume(text is not None)  # no cut of this unit lands in the range (never seen)
        return text

    return build()


def fill_at_least(tokenizer: Tokenizer, unit: str, end: str, target: int, min_tokens: int,
                  max_tokens: int) -> str | None:
    """fill() to `target` tokens, or to the next target that gives at least `min_tokens`:
    fill() keeps at most `target` tokens, and a unit whose pieces merge across the cut can fall
    short of it (seen in CI: '——\n' repeated to a target of 513 gave 512 tokens, inside the
    sliding window the long prompts must get past). None when no target up to max_tokens does."""
    for t in range(target, max_tokens + 1):
        text = fill(tokenizer, unit, end, t)
        if len(tokenizer.encode(text, bos=True)) >= min_tokens:
            return text
    return None


def fill(tokenizer: Tokenizer, unit: str, end: str, target: int) -> str:
    """unit repeated, then end: the longest such text of at most `target` tokens with BOS (the
    tail kept whole when it fits). A binary search over the body's length in characters:
    re-encoding merges pieces across the cut, so a token count cannot be cut exactly."""
    def fits(text: str) -> bool:
        return len(tokenizer.encode(text, bos=True)) <= target

    per_unit = max(1, len(tokenizer.encode(unit, bos=False)))
    body = unit * (2 * target // per_unit + 2)  # more than target tokens
    lo, hi = 0, len(body)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(body[:mid] + end):
            lo = mid
        else:
            hi = mid - 1
    text = body[:lo] + end
    while not fits(text):  # the tail alone is over the target
        text = text[:-1]
    return text
