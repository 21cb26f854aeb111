"""Hypothesis strategies that draw prompts for the Gemma float16 NaN/Inf fuzzer.

What the strategies aim at (see shared NUMERICS.md):
- google/gemma_pytorch issue #10: float16 turned hidden states NaN on prompts such as
  "the self-attention is important for transformer because"; "…with 7 billion parameter…" never
  worked while "seven billion" sometimes did, and "just putting an integer into the prompt"
  triggered it. Hence numbers in every written form, technical jargon, and templates mixing them.
- Massive activations sit on BOS, the first "." and the first "\\n"; without BOS a lone '▁' before
  a digit, ',' or '.' forms a secondary attention sink. Hence punctuation runs, separators, and
  numbers placed after spaces.
- Prompt length is a dimension of its own (llama.cpp saw NaN begin at exactly 64 tokens): hence
  repetition, long runs, token-level prompts and lists of fragments up to a length bound.

Shrinking is designed, not incidental. A prompt is a list of fragments, so Hypothesis deletes whole
fragments first; every `one_of` lists its simplest alternative first and every vocabulary lists its
plainest entry first (Hypothesis shrinks a `one_of` toward its first branch and a `sampled_from`
toward its first element); free text is drawn only where no vocabulary exists. The empty prompt
(the minimal float16 BOS overflow) is reachable from any prompt.

The vocabularies ship as JSON under `fuzz/data/` (jargon.json, code.json, scripts.json).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

__all__ = [
    "CHAT_PREFIX",
    "CHAT_SUFFIX",
    "CODE",
    "DEFAULT_MAX_CHARS",
    "DEFAULT_MAX_FRAGMENTS",
    "DOMAINS",
    "FRAGMENT_KINDS",
    "ISSUE_10_PROMPT",
    "JARGON",
    "LANGUAGES",
    "NUMBER_FORMS",
    "OPERATORS",
    "PUNCTUATION",
    "SCRIPTS",
    "SEPARATORS",
    "TEMPLATES",
    "Fragment",
    "Prompt",
    "chat_turn",
    "chat_turns",
    "code_fragments",
    "fragments",
    "jargon",
    "numbers",
    "other_scripts",
    "parse_chat_turn",
    "prompts",
    "punctuation_runs",
    "repetition",
    "roman_numeral",
    "spell_number",
    "structured_prompts",
    "templates",
    "token_prompts",
]

# The prompt from google/gemma_pytorch issue #10 (7b-it, CUDA, float16: NaN after ~13 steps).
ISSUE_10_PROMPT = "the self-attention is important for transformer because"

# Joiners between fragments, the plain space first so that shrinking heads to ordinary prose.
SEPARATORS: tuple[str, ...] = (" ", "", "\n", ", ", ". ")

# Bounds of the top-level strategy. 512 characters is well past the 64-token point where
# llama.cpp's kernels switched; the tokenizer enforces token bounds later.
DEFAULT_MAX_CHARS = 512
DEFAULT_MAX_FRAGMENTS = 8

# Gemma's chat template (one user turn, then the open model turn the model continues).
CHAT_PREFIX = "<start_of_turn>user\n"
CHAT_SUFFIX = "<end_of_turn>\n<start_of_turn>model\n"

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
)

_DIGITS = "0123456789"


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
# Numbers
# --------------------------------------------------------------------------------------------

_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand"))
_ORDINAL_WORDS = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
    "eleventh", "twelfth", "twentieth", "hundredth", "thousandth", "millionth",
)
_ROMAN = (
    (1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"),
    (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"),
)
_UNITS = (
    "B", "M", "K", "GB", "GiB", "MB", "MiB", "kB", "TB", "ms", "s", "µs", "ns", "min", "h",
    "GHz", "MHz", "Hz", "W", "kW", "V", "mA", "°C", "°F", "K", "km", "m", "cm", "mm", "nm",
    "kg", "g", "mg", "L", "mL", "mol", "Pa", "bar", "dB", "px", "fps", "TFLOPS", "tok/s",
    "km/h", "mph", "bit", "x",
)
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
# Numbers with a story: float16's max (65504) and its neighbours, IEEE specials, integer limits,
# float artefacts. The first is the plainest.
_SPECIAL_NUMBERS = (
    "0.1", "65504", "65505", "65535", "65536", "-0", "-0.0", "NaN", "nan", "inf", "-inf",
    "Infinity", "1e308", "3.4028235e38", "2147483647", "4294967296", "9007199254740993",
    "3.141592653589793", "2.718281828", "6.02214076e23", "1e-45", "5.96e-8",
    "0.30000000000000004",
)


def spell_number(n: int) -> str:
    """American English words for an integer, e.g. 7_000_000_000 -> 'seven billion'."""
    if n < 0:
        return "minus " + spell_number(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {spell_number(rest)}" if rest else "")
    if n >= 1000 * _SCALES[0][0]:
        raise ValueError(f"spell_number: {n} is too large (limit {1000 * _SCALES[0][0] - 1})")
    for scale, word in _SCALES:
        if n >= scale:
            head, rest = divmod(n, scale)
            return f"{spell_number(head)} {word}" + (f" {spell_number(rest)}" if rest else "")
    raise AssertionError("unreachable")


def roman_numeral(n: int) -> str:
    """Roman numeral for 1 <= n <= 3999, e.g. 2024 -> 'MMXXIV'."""
    if not 1 <= n <= 3999:
        raise ValueError(f"roman_numeral: {n} is outside 1..3999")
    parts = []
    for value, letters in _ROMAN:
        count, n = divmod(n, value)
        parts.append(letters * count)
    return "".join(parts)


def _ordinal(n: int) -> str:
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _format_date(day: dt.date, style: str) -> str:
    month = _MONTHS[day.month - 1]
    return {
        "iso": f"{day:%Y-%m-%d}",
        "dmy": f"{day:%d/%m/%Y}",
        "mdy": f"{day:%m/%d/%Y}",
        "dotted": f"{day:%d.%m.%Y}",
        "us_long": f"{month} {day.day}, {day.year}",
        "eu_long": f"{day.day} {month} {day.year}",
        "month_year": f"{month[:3]} {day.year}",
    }[style]


def _format_time(moment: dt.datetime, style: str) -> str:
    hour12 = moment.hour % 12 or 12
    meridiem = "am" if moment.hour < 12 else "pm"
    return {
        "hm": f"{moment:%H:%M}",
        "hms": f"{moment:%H:%M:%S}",
        "twelve_hour": f"{hour12}:{moment:%M} {meridiem}",
        "millis": f"{moment:%H:%M:%S}.{moment.microsecond // 1000:03d}",
        "iso": f"{moment:%Y-%m-%dT%H:%M:%S}Z",
        "log": f"{moment:%Y-%m-%d %H:%M:%S}",
    }[style]


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


def _join(*parts: str) -> str:
    return "".join(parts)


def _digit_string(min_size: int, max_size: int) -> SearchStrategy[str]:
    return st.text(alphabet=_DIGITS, min_size=min_size, max_size=max_size)


def _decimal() -> SearchStrategy[str]:
    # "0.0" is the simplest decimal; the fraction keeps leading zeros ("3.05") as free digits.
    return st.builds(lambda whole, frac: f"{whole}.{frac}", st.integers(0, 10**6),
                     _digit_string(1, 8))


def _quantity() -> SearchStrategy[str]:
    """A short plain magnitude: '7', '3.5', '640'."""
    return st.one_of(
        st.integers(0, 999).map(str),
        st.builds(lambda whole, tenths: f"{whole}.{tenths}", st.integers(0, 999),
                  st.integers(0, 99)),
    )


def _scientific() -> SearchStrategy[str]:
    mantissa = st.one_of(
        st.integers(1, 9).map(str),
        st.builds(lambda lead, frac: f"{lead}.{frac}", st.integers(1, 9), _digit_string(1, 6)),
    )
    styles = st.sampled_from(("{m}e{s}{x}", "{m}E{s}{x}", "{m} × 10^{s}{x}", "{m}x10^{s}{x}"))
    return st.builds(
        lambda style, m, s, x: style.format(m=m, s=s, x=x),
        styles, mantissa, st.sampled_from(("", "-", "+")), st.integers(0, 308),
    )


def _hexadecimal() -> SearchStrategy[str]:
    return st.builds(lambda n, upper: f"0x{n:X}" if upper else f"0x{n:x}",
                     st.integers(0, 2**64 - 1), st.booleans())


def _thousands() -> SearchStrategy[str]:
    # Comma, space, underscore, dot (European), apostrophe (Swiss), narrow and plain no-break
    # space: each tokenizes differently.
    separators = st.sampled_from((",", " ", "_", ".", "'", "\u202f", "\u00a0"))
    return st.builds(lambda n, sep: f"{n:,}".replace(",", sep), st.integers(1000, 10**15),
                     separators)


def _negative() -> SearchStrategy[str]:
    # ASCII hyphen-minus and the Unicode minus sign tokenize differently.
    body = st.one_of(st.integers(1, 10**9).map(str), _decimal())
    return st.builds(_join, st.sampled_from(("-", "−")), body)


def _fraction() -> SearchStrategy[str]:
    return st.one_of(
        st.builds(lambda a, b: f"{a}/{b}", st.integers(0, 99), st.integers(1, 99)),
        st.sampled_from(("½", "¼", "¾", "⅓", "⅔", "⅛")),
        st.builds(lambda whole, a, b: f"{whole} {a}/{b}", st.integers(1, 99),
                  st.integers(1, 9), st.integers(2, 16)),
        st.sampled_from(("one half", "a third", "two thirds", "three quarters", "one eighth")),
    )


def _percentage() -> SearchStrategy[str]:
    return st.builds(_join, _quantity(), st.sampled_from(("%", " %", " percent")))


def _ordinals() -> SearchStrategy[str]:
    return st.one_of(st.integers(1, 10**4).map(_ordinal), st.sampled_from(_ORDINAL_WORDS))


def _spelled() -> SearchStrategy[str]:
    scale_words = st.sampled_from(("thousand", "million", "billion", "trillion"))
    return st.one_of(
        st.integers(0, 10**12).map(spell_number),
        # "seven billion" (sometimes worked in issue #10) and "7 billion" (never did).
        st.builds(lambda n, scale: f"{spell_number(n)} {scale}", st.integers(1, 999), scale_words),
        st.builds(lambda q, scale: f"{q} {scale}", _quantity(), scale_words),
    )


def _roman() -> SearchStrategy[str]:
    return st.builds(lambda n, lower: roman_numeral(n).lower() if lower else roman_numeral(n),
                     st.integers(1, 3999), st.booleans())


def _unit() -> SearchStrategy[str]:
    return st.builds(_join, _quantity(), st.sampled_from(("", " ")), st.sampled_from(_UNITS))


def _currency() -> SearchStrategy[str]:
    prefixed = st.builds(_join, st.sampled_from(("$", "€", "£", "¥", "₹", "₩")), _quantity(),
                         st.sampled_from(("", "K", "M", "B", " million", " billion")))
    suffixed = st.builds(_join, _quantity(), st.sampled_from((" USD", " EUR", " JPY", " BTC")))
    return st.one_of(prefixed, suffixed)


def _power() -> SearchStrategy[str]:
    superscripts = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
    return st.builds(
        lambda base, style, exponent: (
            f"{base}{exponent.translate(superscripts)}" if style == "sup"
            else f"{base}{style}{exponent}"
        ),
        st.integers(2, 10), st.sampled_from(("^", "**", "sup")),
        st.builds(_join, st.sampled_from(("", "-")), st.integers(0, 64).map(str)),
    )


def _version() -> SearchStrategy[str]:
    return st.builds(
        lambda prefix, parts, suffix: prefix + ".".join(map(str, parts)) + suffix,
        st.sampled_from(("", "v")), st.lists(st.integers(0, 99), min_size=2, max_size=4),
        st.sampled_from(("", "-rc1", "-beta.2", "a1", ".dev0", "+cu121")),
    )


def _ip_address() -> SearchStrategy[str]:
    return st.builds(
        lambda octets, tail: ".".join(map(str, octets)) + tail,
        st.lists(st.integers(0, 255), min_size=4, max_size=4),
        st.sampled_from(("", "/24", ":8080", ":443")),
    )


def _date() -> SearchStrategy[str]:
    styles = st.sampled_from(("iso", "dmy", "mdy", "dotted", "us_long", "eu_long", "month_year"))
    days = st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2099, 12, 31))
    return st.builds(_format_date, days, styles)


def _time() -> SearchStrategy[str]:
    styles = st.sampled_from(("hm", "hms", "twelve_hour", "millis", "iso", "log"))
    moments = st.datetimes(min_value=dt.datetime(1970, 1, 1),
                           max_value=dt.datetime(2099, 12, 31, 23, 59, 59))
    return st.builds(_format_time, moments, styles)


def _number_range() -> SearchStrategy[str]:
    return st.builds(lambda a, sep, b: f"{a}{sep}{b}", st.integers(0, 999),
                     st.sampled_from(("-", "–", " to ", "..", "~")), st.integers(0, 9999))


_NUMBER_FORM_BUILDERS: dict[str, Callable[[], SearchStrategy[str]]] = {
    # Digit strings, not st.integers: a trigger digit inside "287" shrinks to "7" by deleting
    # characters, which integer shrinking (toward 0 by value) cannot do.
    "integer": lambda: _digit_string(1, 2),
    "big_integer": lambda: _digit_string(3, 19),
    "negative": _negative,
    "decimal": _decimal,
    "fraction": _fraction,
    "percentage": _percentage,
    "ordinal": _ordinals,
    "spelled": _spelled,
    "roman": _roman,
    "unit": _unit,
    "currency": _currency,
    "thousands": _thousands,
    "scientific": _scientific,
    "hex": _hexadecimal,
    "power": _power,
    "version": _version,
    "ip_address": _ip_address,
    "date": _date,
    "time": _time,
    "range": _number_range,
    "digit_run": lambda: _digit_string(10, 128),
    "special": lambda: st.sampled_from(_SPECIAL_NUMBERS),
}
# Simplest form first: `numbers()` shrinks toward an integer, and an integer toward "0".
NUMBER_FORMS: tuple[str, ...] = tuple(_NUMBER_FORM_BUILDERS)


def numbers(forms: Iterable[str] | str | None = None) -> SearchStrategy[str]:
    """Draw a number written in one of `NUMBER_FORMS` (all of them when `forms` is None).

    Forms: small and big integers, negatives (ASCII and Unicode minus), decimals, fractions
    (1/2, ½, 1 3/4, two thirds), percentages, ordinals (21st, twelfth), spelled-out numbers
    ("seven billion", "7 billion", "forty-two"), roman numerals, units (7B, 3.5 GHz, 12 ms,
    64 GiB), currency, thousands separators (1,000,000 and 1 000 000 and 1'000), scientific
    notation (1.5e-3, 6.02E23, 6 × 10^23), hex (0x1F), powers (2^10, 10⁻⁶), versions (v2.13.0),
    IPv4 addresses, dates (2024-03-15, 15/03/2024, March 15, 2024), times (14:30, 2:30 pm, ISO),
    ranges (3-5), long digit runs, and special values (65504, NaN, inf, 1e-45).

    Shrinks toward the first selected form and, within a form, toward its smallest value:
    with all forms, toward the integer "0". Raises ValueError naming the valid forms for an
    unknown one.
    """
    names = _select(forms, NUMBER_FORMS, "number form")
    return _uniform_one_of(_NUMBER_FORM_BUILDERS[name]() for name in names)


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


def chat_turn(text: str) -> str:
    """Wrap `text` in Gemma's chat template: one user turn, then the open model turn."""
    return f"{CHAT_PREFIX}{text}{CHAT_SUFFIX}"


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
# Prompts from the model's own vocabulary
# --------------------------------------------------------------------------------------------

# Control (<bos>, <start_of_turn>, <unused12>) and byte-fallback (<0x0A>) pieces: they are not
# text, and the tokenizer would split their spelling into ordinary pieces anyway. On the Gemma 3
# 270M vocabulary this pattern matched all 6249 control and 256 byte pieces, and 37 others
# (user-defined HTML tags such as <table>, and <start_of_image>); '<?>' or '</h1>' stay usable.
_CONTROL_PIECE = re.compile(r"<[A-Za-z0-9_]+>")
_SPACE_MARK = "\u2581"  # SentencePiece's '▁', meaning a space


def _text_piece_ids(vocabulary: Sequence[str]) -> list[int]:
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
        usable = _text_piece_ids(vocabulary)
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
        lambda ids: "".join(vocabulary[i] for i in ids).replace(_SPACE_MARK, " "))


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
    vocabulary pieces.

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
