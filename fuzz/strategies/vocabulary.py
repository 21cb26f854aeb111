"""The bottom layer of the prompt strategies: shipped vocabularies and the shared combinators.

- The vocabularies that ship as JSON under `fuzz/data/` (jargon.json, code.json, scripts.json),
  checked when this module is imported, and the strategies drawing from them: `jargon`,
  `code_fragments`, `other_scripts`.
- Punctuation and whitespace marks (`punctuation_runs`) and arithmetic operators (for templates).
- `token_prompts`: text built from a model's own SentencePiece vocabulary.
- The small helpers the other modules build on: `_select` (validating a choice of named groups)
  and `_uniform_one_of` (a `one_of` whose alternatives stay equally likely).

Nothing here imports the other strategy modules, so numbers and compose can import from it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from types import MappingProxyType
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from fuzz.engine.tokenizer import SPACE_SYMBOL

# "." and "\n" first: they carry massive activations (Sun et al. 2024) and are the plainest marks.
PUNCTUATION: tuple[str, ...] = (
    ".", "\n", ",", "...", "\n\n", ";", ":", "!", "?", "!!!", "?!", "-", "—", "…", "\t", "  ",
    "\r\n", "'", '"', "(", ")", "[", "]", "{", "}", "*", "#", "/", "\\", "|", "~", "`", "_",
    "=", "。", "、", "¿", "¡",
)

OPERATORS: tuple[str, ...] = (
    "+", "-", "*", "/", "×", "÷", "^", "**", "%", "mod", "plus", "minus", "times",
    "divided by", "to the power of",
)


# --------------------------------------------------------------------------------------------
# Shipped vocabularies
# --------------------------------------------------------------------------------------------


def _read_data(name: str) -> dict[str, Any]:
    path = resources.files("fuzz").joinpath("data", name)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise RuntimeError(f"cannot read vocabulary file fuzz/data/{name}: {error}") from error
    if not isinstance(document, dict):
        raise RuntimeError(f"fuzz/data/{name}: expected a JSON object at the top level")
    return document


def _string_lists(name: str, key: str) -> dict[str, tuple[str, ...]]:
    """Read `{key: {group: [str, ...]}}` from a data file, checking every entry."""
    groups = _read_data(name).get(key)
    if not isinstance(groups, dict) or not groups:
        raise RuntimeError(f"fuzz/data/{name}: key {key!r} must map group names to lists")
    checked: dict[str, tuple[str, ...]] = {}
    for group, entries in groups.items():
        if not isinstance(entries, list) or not entries:
            raise RuntimeError(f"fuzz/data/{name}: {key}.{group} must be a non-empty list")
        if not all(isinstance(entry, str) and entry for entry in entries):
            raise RuntimeError(f"fuzz/data/{name}: {key}.{group} must hold non-empty strings")
        checked[group] = tuple(entries)
    return checked


def _load_scripts() -> dict[str, tuple[tuple[int, int], tuple[str, ...]]]:
    scripts = _read_data("scripts.json").get("scripts")
    if not isinstance(scripts, dict) or not scripts:
        raise RuntimeError("fuzz/data/scripts.json: key 'scripts' must map script names")
    checked = {}
    for script, spec in scripts.items():
        where = f"fuzz/data/scripts.json: scripts.{script}"
        first, last = spec.get("range", (None, None))
        if not (isinstance(first, int) and isinstance(last, int) and 0 < first <= last):
            raise RuntimeError(f"{where}.range must be [first, last] code points")
        samples = spec.get("samples")
        if not isinstance(samples, list) or not samples or not all(samples):
            raise RuntimeError(f"{where}.samples must be a non-empty list of strings")
        checked[script] = ((first, last), tuple(samples))
    return checked


JARGON: Mapping[str, tuple[str, ...]] = MappingProxyType(_string_lists("jargon.json", "domains"))
CODE: Mapping[str, tuple[str, ...]] = MappingProxyType(_string_lists("code.json", "languages"))
_SCRIPT_DATA = MappingProxyType(_load_scripts())

DOMAINS: tuple[str, ...] = tuple(JARGON)
LANGUAGES: tuple[str, ...] = tuple(CODE)
SCRIPTS: tuple[str, ...] = tuple(_SCRIPT_DATA)


def _select(chosen: Iterable[str] | str | None, valid: Sequence[str], what: str) -> tuple[str, ...]:
    """Validate a user's selection of named groups; None selects all of them."""
    if chosen is None:
        return tuple(valid)
    if isinstance(chosen, str):
        chosen = (chosen,)
    names = tuple(dict.fromkeys(chosen))
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(
            f"unknown {what} {', '.join(map(repr, unknown))}; valid {what}s are: {', '.join(valid)}"
        )
    if not names:
        raise ValueError(f"no {what} selected; pass None for all, or some of: {', '.join(valid)}")
    return names


# --------------------------------------------------------------------------------------------
# Combinators shared by the strategy modules
# --------------------------------------------------------------------------------------------


def _uniform_one_of(strategies: Iterable[SearchStrategy[str]]) -> SearchStrategy[Any]:
    """`st.one_of` that keeps each alternative whole.

    Hypothesis flattens a `one_of` (even a mapped one) nested in another `one_of` into its
    branches, which would make a kind with many sub-forms (numbers: 22) crowd out the others.
    Drawing each alternative through a composite hides its branches: the alternatives stay
    about equally likely, and shrinking still heads to the first one.
    """
    return st.one_of([_whole(strategy) for strategy in strategies])


@st.composite
def _whole(draw: st.DrawFn, strategy: SearchStrategy[Any]) -> Any:
    return draw(strategy)


# --------------------------------------------------------------------------------------------
# Words, code, scripts, punctuation
# --------------------------------------------------------------------------------------------


def _grouped_vocabulary(groups: Mapping[str, tuple[str, ...]],
                        names: Sequence[str]) -> SearchStrategy[str]:
    # Group first, then entry: each selected group is equally likely however long its list is,
    # and shrinking goes to the first group's first entry.
    # One strategy per group, built once: flatmap would otherwise build (and Hypothesis
    # re-validate) a new strategy on every draw.
    by_name = {name: st.sampled_from(groups[name]) for name in names}
    return st.sampled_from(tuple(names)).flatmap(by_name.__getitem__)


def jargon(domains: Iterable[str] | str | None = None) -> SearchStrategy[str]:
    """Draw one technical term from the shipped vocabulary (fuzz/data/jargon.json).

    `domains` selects among `DOMAINS` (ml, systems, maths, physics, medicine, law, finance,
    chemistry, networking); None means all. A domain is drawn first, then a term of it, so every
    selected domain is equally likely. Some terms carry digits (IPv6, SHA-256, COVID-19).

    Shrinks toward the first selected domain and toward the front of its list ("attention",
    "self-attention", "transformer" for ml). Raises ValueError listing the valid domains for an
    unknown one.
    """
    return _grouped_vocabulary(JARGON, _select(domains, DOMAINS, "domain"))


def code_fragments(languages: Iterable[str] | str | None = None) -> SearchStrategy[str]:
    """Draw a code snippet (fuzz/data/code.json): python, c, sql, shell, json, latex, markdown,
    html; `languages` selects among `LANGUAGES`. Snippets bring indentation, whitespace runs,
    newlines, brackets and digits.

    Shrinks toward the first selected language and its shortest snippet ("x = 1" for python).
    Raises ValueError listing the valid languages for an unknown one.
    """
    return _grouped_vocabulary(CODE, _select(languages, LANGUAGES, "language"))


def other_scripts(scripts: Iterable[str] | str | None = None) -> SearchStrategy[str]:
    """Draw non-Latin text: a real word or sequence of a script in `SCRIPTS` (Greek, Cyrillic,
    CJK, Japanese kana, Korean, Arabic, Hebrew, Devanagari, Thai, fullwidth forms, emoji with
    ZWJ sequences, flags, skin tones and keycaps), or 1-16 random assigned characters from that
    script's code point range (fuzz/data/scripts.json).

    Shrinks toward the first selected script's first real sample (Greek "π"); random characters
    are the second alternative and shrink toward one character at the start of the range.
    Raises ValueError listing the valid scripts for an unknown one.
    """
    names = _select(scripts, SCRIPTS, "script")
    samples = _grouped_vocabulary({name: _SCRIPT_DATA[name][1] for name in names}, names)
    characters = {name: _script_characters(name) for name in names}
    random_text = st.sampled_from(names).flatmap(characters.__getitem__)
    return st.one_of(samples, random_text)


def _script_characters(script: str) -> SearchStrategy[str]:
    first, last = _SCRIPT_DATA[script][0]
    # Only assigned letters, marks, numbers, punctuation and symbols: unassigned (Cn), private
    # use (Co) and surrogate (Cs) code points are not text a user would type.
    characters = st.characters(min_codepoint=first, max_codepoint=last,
                               categories=("L", "M", "N", "P", "S"))
    return st.text(characters, min_size=1, max_size=16)


def punctuation_runs() -> SearchStrategy[str]:
    """Draw punctuation and whitespace: one mark from `PUNCTUATION` (".", "\\n", ",", "...",
    "\\n\\n", ";", "!!!", tab, CJK marks, …), one mark repeated 2-256 times, or a mixed run of
    2-32 marks.

    Shrinks toward a single "." (the first mark), then shorter runs of earlier marks.
    """
    marks = st.sampled_from(PUNCTUATION)
    return st.one_of(
        marks,
        st.builds(lambda mark, times: mark * times, marks, st.integers(2, 256)),
        st.lists(marks, min_size=2, max_size=32).map("".join),
    )


# --------------------------------------------------------------------------------------------
# Prompts from the model's own vocabulary
# --------------------------------------------------------------------------------------------

# Control (<bos>, <start_of_turn>, <unused12>) and byte-fallback (<0x0A>) pieces: they are not
# text, and the tokenizer would split their spelling into ordinary pieces anyway. On the Gemma 3
# 270M vocabulary this pattern matched all 6249 control and 256 byte pieces, and 37 others
# (user-defined HTML tags such as <table>, and <start_of_image>); '<?>' or '</h1>' stay usable.
_CONTROL_PIECE = re.compile(r"<[A-Za-z0-9_]+>")


def text_piece_ids(vocabulary: Sequence[str]) -> list[int]:
    return [
        piece_id for piece_id, piece in enumerate(vocabulary)
        if piece and not _CONTROL_PIECE.fullmatch(piece)
    ]


def token_prompts(vocabulary: Sequence[str], max_tokens: int = 64, *, min_tokens: int = 0,
                  allowed_ids: Iterable[int] | None = None) -> SearchStrategy[str]:
    """Draw text built from `min_tokens`..`max_tokens` pieces of the model's own vocabulary
    (`vocabulary[id]` is the SentencePiece piece of id; '▁' becomes a space). Pieces spelled
    like `<...>` (control and byte-fallback pieces) are skipped, unless `allowed_ids` gives the
    usable ids exactly (e.g. from the tokenizer's piece types). The text may re-tokenize to
    other ids; the tokenizer enforces token bounds later.

    Shrinks toward fewer pieces (deleting pieces) and toward lower ids.
    Raises ValueError when the bounds are inverted or no usable piece exists.
    """
    if not 0 <= min_tokens <= max_tokens:
        raise ValueError(
            f"token_prompts: need 0 <= min_tokens <= max_tokens, got min_tokens={min_tokens}, "
            f"max_tokens={max_tokens}"
        )
    if allowed_ids is None:
        usable = text_piece_ids(vocabulary)
    else:
        usable = sorted(set(allowed_ids))
        outside = [i for i in usable if not 0 <= i < len(vocabulary)]
        if outside:
            raise ValueError(f"token_prompts: allowed_ids {outside[:5]} are outside the "
                             f"vocabulary of {len(vocabulary)} pieces")
    if not usable:
        raise ValueError(f"token_prompts: none of the {len(vocabulary)} vocabulary pieces is "
                         "usable text; pass the model's piece list or allowed_ids")
    pieces = st.lists(st.sampled_from(usable), min_size=min_tokens, max_size=max_tokens)
    return pieces.map(
        lambda ids: "".join(vocabulary[i] for i in ids).replace(SPACE_SYMBOL, " "))


# Pieces that form massive activations or secondary attention sinks (docs/NUMERICS.md: BOS, the
# first "." or "\n", a lone space before a digit, "," or "."): digits, punctuation, whitespace.
_SINK_PIECE = re.compile(r"[\u2581\s0-9.,:;!?\-+*/=%()\[\]{}#<>'\"`_|\\~^&@$]+")


def sink_piece_ids(vocabulary: Sequence[str]) -> list[int]:
    """Ids of the pieces made only of digits, punctuation and whitespace (SentencePiece's '▁'):
    on Gemma 3's 262144 pieces, the prompt-dependent float16 overflows sit on such tokens."""
    return [i for i, piece in enumerate(vocabulary) if piece and _SINK_PIECE.fullmatch(piece)]


def sink_token_prompts(vocabulary: Sequence[str], max_tokens: int = 32) -> SearchStrategy[str]:
    """Draw 1..max_tokens of the model's own sink-prone pieces (digits, punctuation, whitespace
    runs, lone '▁'), as text. Shrinks toward fewer pieces and lower ids (as token_prompts)."""
    return token_prompts(vocabulary, max_tokens, min_tokens=1,
                         allowed_ids=sink_piece_ids(vocabulary))
