"""Whole prompts composed from the other strategies: templates, repetition, chat turns, and
the top-level `fragments`, `structured_prompts` and `prompts`.

A prompt is a list of tagged `Fragment`s (joined by `SEPARATORS`, cut at a character bound), so
Hypothesis shrinks it by deleting whole fragments first. The chat template is
`fuzz.engine.tokenizer`'s, the one copy of it; `parse_chat_turn` inverts it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from fuzz.engine.tokenizer import CHAT_PREFIX, CHAT_SUFFIX, chat_turn
from fuzz.strategies.numbers import numbers
from fuzz.strategies.vocabulary import (
    OPERATORS,
    _uniform_one_of,
    code_fragments,
    jargon,
    other_scripts,
    punctuation_runs,
    sink_piece_ids,
    sink_token_prompts,
    token_prompts,
)

# The prompt from google/gemma_pytorch issue #10 (7b-it, CUDA, float16: NaN after ~13 steps).
ISSUE_10_PROMPT = "the self-attention is important for transformer because"

# Joiners between fragments, the plain space first so that shrinking heads to ordinary prose.
SEPARATORS: tuple[str, ...] = (" ", "", "\n", ", ", ". ")

# Bounds of the top-level strategy. 512 characters is well past the 64-token point where
# llama.cpp's kernels switched; the tokenizer enforces token bounds later.
DEFAULT_MAX_CHARS = 512
DEFAULT_MAX_FRAGMENTS = 8

# Sentences with slots, the shortest first. Slots: {number}, {jargon}, {op}; each occurrence is
# drawn independently.
TEMPLATES: tuple[str, ...] = (
    "{number} {jargon}",
    "with {number} parameters",
    "What is {number} {op} {number}?",
    "Explain {jargon} in {number} words.",
    "the {jargon} is important for {jargon} because",
    "{number} {op} {number} =",
    "The {jargon} of the {jargon} is {number}.",
    "A model with {number} parameters uses {jargon}.",
    "Why does {jargon} need {number} {jargon}?",
    "In {number}, {jargon} changed {jargon}.",
    "Q: What is the {jargon} of {number}?\nA:",
    "Step {number}: compute the {jargon}.\nStep {number}: apply {jargon}.\n",
    "{jargon}: {number}\n{jargon}: {number}\n{jargon}: {number}\n",
    "Translate into French: the {jargon} costs {number}.",
    "Summarize {jargon}, {jargon} and {jargon} in {number} sentences.",
    "Compare {jargon} and {jargon}. Use {number} examples.",
    "The answer is {number}. The {jargon} is {number} {op} {number}.",
)
_TEMPLATE_SLOTS = frozenset({"number", "jargon", "op"})

# Kinds of fragment in the top-level mix, in the order `fragments()` tries them (simplest first).
FRAGMENT_KINDS: tuple[str, ...] = (
    "number", "jargon", "punctuation", "template", "script", "code", "repetition", "tokens",
    "sink_tokens",
)


# --------------------------------------------------------------------------------------------
# Repetition and templates
# --------------------------------------------------------------------------------------------


def repetition(strategy: SearchStrategy[str], *, min_times: int = 2, max_times: int = 64,
               separators: Sequence[str] = ("", " ", "\n")) -> SearchStrategy[str]:
    """Draw one value of `strategy` and repeat it `min_times`..`max_times` times, joined by one
    of `separators` ("the the the …", "7\\n7\\n7…"): long, self-similar prompts for the length
    dimension.

    Shrinks the repeated value as `strategy` does, the count toward `min_times`, and the
    separator toward the first one.
    """
    if not 1 <= min_times <= max_times:
        raise ValueError(
            f"repetition: need 1 <= min_times <= max_times, got min_times={min_times}, "
            f"max_times={max_times}"
        )
    if not separators:
        raise ValueError("repetition: separators must not be empty (use ('',) for none)")
    return st.builds(lambda value, times, sep: sep.join([value] * times), strategy,
                     st.integers(min_times, max_times), st.sampled_from(tuple(separators)))


# A template is split into units: a word, a slot or a punctuation mark, each with the whitespace
# before it; whitespace at the very end is a unit of its own.
_TEMPLATE_UNIT = re.compile(r"\s*(?:\{[a-z]+\}|[^\s{]+)|\s+$")
_SLOT = re.compile(r"\{([a-z]+)\}")


def _template_units(template: str) -> tuple[tuple[str, str, str | None], ...]:
    """(leading whitespace, literal text, slot name or None) for each unit of a template."""
    units = []
    for unit in _TEMPLATE_UNIT.findall(template):
        body = unit.lstrip()
        space = unit[: len(unit) - len(body)]
        slot = _SLOT.fullmatch(body)
        if slot and slot.group(1) not in _TEMPLATE_SLOTS:
            raise AssertionError(f"template {template!r} uses unknown slot {body}")
        units.append((space, "" if slot else body, slot.group(1) if slot else None))
    if "".join(space + body + (f"{{{slot}}}" if slot else "")
               for space, body, slot in units) != template:
        raise AssertionError(f"template {template!r} does not split into units losslessly")
    return tuple(units)


_TEMPLATE_UNITS = tuple(_template_units(template) for template in TEMPLATES)

# Each unit of a template is kept unless its presence choice is 0. Hypothesis draws a bound of
# a range more often than its inner values: 0 came up for about 3.5% of draws from 0..255
# (measured, Hypothesis 6.170), so most drawn sentences are whole, while shrinking lowers each
# presence to 0 and so drops words one by one.
_UNIT_PRESENCE = st.integers(0, 255)


def templates(jargon_terms: SearchStrategy[str] | None = None,
              number_values: SearchStrategy[str] | None = None) -> SearchStrategy[str]:
    """Draw a sentence from `TEMPLATES` with its slots filled: {jargon} from `jargon_terms`
    (default `jargon()`), {number} from `number_values` (default `numbers()`), {op} from
    `OPERATORS`. Examples: "the {jargon} is important for {jargon} because",
    "with {number} parameters", "What is {number} {op} {number}?". Now and then a word or slot
    is left out ("the transformer because").

    Shrinks by dropping words and slots one by one (so "Explain transformer in 0 words."
    can shrink to "transformer"), toward the first (shortest) template, and each slot as its
    own strategy shrinks (toward "0", "attention" and "+").
    """
    slot_strategies = {
        "jargon": jargon() if jargon_terms is None else jargon_terms,
        "number": numbers() if number_values is None else number_values,
        "op": st.sampled_from(OPERATORS),
    }

    @st.composite
    def filled(draw: st.DrawFn) -> str:
        units = _TEMPLATE_UNITS[draw(st.integers(0, len(TEMPLATES) - 1))]
        pieces: list[str] = []
        for space, literal, slot in units:
            if draw(_UNIT_PRESENCE) == 0:
                continue
            text = literal if slot is None else draw(slot_strategies[slot])
            # The first kept unit loses its leading space: a dropped first word must not leave
            # " transformer", which the shrinker could not trim.
            pieces.append((space if pieces else "") + text)
        return "".join(pieces)

    return filled()


# --------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------

# CHAT_PREFIX, CHAT_SUFFIX and chat_turn come from fuzz.engine.tokenizer, the one copy of the
# template (fuzz.generate applies the same one), so drawn chat prompts cannot drift from it.


def parse_chat_turn(prompt: str) -> str:
    """Return the user text of a prompt made by `chat_turn`; ValueError if it is not one."""
    if not (prompt.startswith(CHAT_PREFIX) and prompt.endswith(CHAT_SUFFIX)
            and len(prompt) >= len(CHAT_PREFIX) + len(CHAT_SUFFIX)):
        raise ValueError(
            f"not a Gemma chat turn: expected {CHAT_PREFIX!r} … {CHAT_SUFFIX!r}, "
            f"got {prompt[:60]!r}"
        )
    return prompt[len(CHAT_PREFIX):len(prompt) - len(CHAT_SUFFIX)]


def chat_turns(strategy: SearchStrategy[str]) -> SearchStrategy[str]:
    """Draw a value of `strategy` wrapped by `chat_turn`:
    "<start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n".

    Shrinks exactly as `strategy` does (the wrapper is fixed); `parse_chat_turn` recovers it.
    """
    return strategy.map(chat_turn)


# --------------------------------------------------------------------------------------------
# Whole prompts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fragment:
    """One piece of a prompt: `kind` (one of FRAGMENT_KINDS, or "custom"), its `text`, and the
    `separator` placed before it ("" for the first fragment)."""

    kind: str
    text: str
    separator: str = ""


@dataclass(frozen=True)
class Prompt:
    """A drawn prompt kept in parts, for reports: which kinds of fragment it mixes, and whether
    it is wrapped in the chat template. `text` is the exact prompt string."""

    fragments: tuple[Fragment, ...]
    chat: bool = False

    @property
    def body(self) -> str:
        """The prompt without the chat wrapper."""
        return "".join(fragment.separator + fragment.text for fragment in self.fragments)

    @property
    def text(self) -> str:
        return chat_turn(self.body) if self.chat else self.body

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(fragment.kind for fragment in self.fragments)


def fragments(vocabulary: Sequence[str] | None = None,
              max_tokens: int = 64) -> SearchStrategy[Fragment]:
    """Draw one tagged `Fragment` of any kind in `FRAGMENT_KINDS`: a number, a jargon term, a
    punctuation run, a filled template, other-script text, a code snippet, a repetition of a
    number/term/punctuation, and (only when `vocabulary` is given) up to `max_tokens`
    vocabulary pieces, any or only the sink-prone ones (digits, punctuation, whitespace).

    Shrinks toward the earlier kinds, number first (so toward "0"), then within the kind.
    """
    simple = _uniform_one_of((numbers(), jargon(), punctuation_runs()))
    by_kind: dict[str, SearchStrategy[str]] = {
        "number": numbers(),
        "jargon": jargon(),
        "punctuation": punctuation_runs(),
        "template": templates(),
        "script": other_scripts(),
        "code": code_fragments(),
        "repetition": repetition(simple),
    }
    if vocabulary is not None:
        by_kind["tokens"] = token_prompts(vocabulary, max_tokens)
        if sink_piece_ids(vocabulary):
            by_kind["sink_tokens"] = sink_token_prompts(vocabulary, max_tokens)
    return _uniform_one_of(
        strategy.map(functools.partial(Fragment, kind)) for kind, strategy in by_kind.items()
    )


def structured_prompts(max_chars: int = DEFAULT_MAX_CHARS, *,
                       max_fragments: int = DEFAULT_MAX_FRAGMENTS,
                       fragment_strategy: SearchStrategy[str] | None = None,
                       vocabulary: Sequence[str] | None = None,
                       chat: bool | None = None,
                       separators: Sequence[str] = SEPARATORS) -> SearchStrategy[Prompt]:
    """Draw a `Prompt`: 0..`max_fragments` fragments (from `fragments(vocabulary)`, or untagged
    "custom" ones from `fragment_strategy`) joined by `separators`, at most `max_chars`
    characters in all, chat wrapper included. A fragment that would cross the bound is cut and
    the prompt ends there. `chat`: True always wraps in Gemma's chat template, False never,
    None draws it.

    Shrinks toward fewer fragments (deleting any of them), each fragment as its kind shrinks,
    separators toward " ", chat toward off: the empty prompt is reachable from any prompt.
    """
    if max_chars < 0 or max_fragments < 0:
        raise ValueError(f"structured_prompts: max_chars ({max_chars}) and max_fragments "
                         f"({max_fragments}) must be >= 0")
    if not separators:
        raise ValueError("structured_prompts: separators must not be empty (use ('',) for none)")
    wrapper_chars = len(CHAT_PREFIX) + len(CHAT_SUFFIX)
    if chat and wrapper_chars > max_chars:
        raise ValueError(f"structured_prompts: chat=True needs max_chars >= {wrapper_chars} "
                         f"(the chat template's length), got {max_chars}")
    if fragment_strategy is None:
        tagged = fragments(vocabulary)
    else:
        tagged = fragment_strategy.map(functools.partial(Fragment, "custom"))
    parts = st.lists(st.tuples(st.sampled_from(tuple(separators)), tagged),
                     max_size=max_fragments)
    if chat is None and wrapper_chars <= max_chars:
        # One prompt in four is a chat turn (IT checkpoints see the template; base ones do not).
        # 0 is "off", so shrinking unwraps.
        chat_flags = st.integers(0, 3).map(lambda n: n == 3)
    elif chat is None:
        chat_flags = st.just(False)
    else:
        chat_flags = st.just(bool(chat))

    @st.composite
    def build(draw: st.DrawFn) -> Prompt:
        wrapped = draw(chat_flags)
        budget = max_chars - (wrapper_chars if wrapped else 0)
        return Prompt(_fit(draw(parts), budget), wrapped)

    return build()


def _fit(parts: Sequence[tuple[str, Fragment]], budget: int) -> tuple[Fragment, ...]:
    """Join fragments until `budget` characters are used, cutting the one that crosses it."""
    kept: list[Fragment] = []
    used = 0
    for separator, fragment in parts:
        separator = separator if kept else ""
        room = budget - used - len(separator)
        if room <= 0:
            break
        text = fragment.text[:room]
        kept.append(Fragment(fragment.kind, text, separator))
        used += len(separator) + len(text)
        if len(text) < len(fragment.text):
            break
    return tuple(kept)


def prompts(max_chars: int = DEFAULT_MAX_CHARS, *, max_fragments: int = DEFAULT_MAX_FRAGMENTS,
            fragment_strategy: SearchStrategy[str] | None = None,
            vocabulary: Sequence[str] | None = None, chat: bool | None = None,
            separators: Sequence[str] = SEPARATORS) -> SearchStrategy[str]:
    """The default top-level strategy: the text of `structured_prompts(...)` (same arguments),
    at most `max_chars` characters, mixing numbers, jargon, punctuation, templates, other
    scripts, code, repetitions and (with `vocabulary`) model pieces.

    Shrinks toward fewer fragments, then simpler ones, ending at "" when anything is accepted;
    a prompt that must contain a digit shrinks to "0".
    """
    return structured_prompts(
        max_chars, max_fragments=max_fragments, fragment_strategy=fragment_strategy,
        vocabulary=vocabulary, chat=chat, separators=separators,
    ).map(lambda prompt: prompt.text)
