"""Tests of the Hypothesis prompt strategies (fuzz/strategies.py).

What the fuzzer relies on: every written form of a number is drawn, the jargon comes from the
shipped multi-domain vocabulary, prompts respect their length bound exactly, and shrinking ends at
the simplest prompt ("" when anything fails, "0" when a digit is needed, "transformer" when that
word is). Expected values come from the shipped JSON files read here directly and from regular
expressions written here, not from the module under test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

import fuzz
from fuzz import strategies as S

DATA = Path(fuzz.__file__).parent / "data"

# find() settings: deterministic, no example database, no "explain" phase (it replays the
# failing example many times and only helps error messages).
SEARCH = settings(database=None, derandomize=True, max_examples=3000,
                  phases=(Phase.generate, Phase.shrink),
                  suppress_health_check=[HealthCheck.too_slow])
GENERATE_ONLY = settings(SEARCH, phases=(Phase.generate,))
FEW = settings(database=None, derandomize=True, max_examples=60,
               suppress_health_check=[HealthCheck.too_slow])


def _load(name: str, key: str) -> dict:
    return json.loads((DATA / name).read_text(encoding="utf-8"))[key]


JARGON_FILE = _load("jargon.json", "domains")
CODE_FILE = _load("code.json", "languages")
ALL_TERMS = {term for terms in JARGON_FILE.values() for term in terms}
ALL_SNIPPETS = {snippet for snippets in CODE_FILE.values() for snippet in snippets}


# ---------------------------------------------------------------------------------------------
# numbers()
# ---------------------------------------------------------------------------------------------

NUMBER_SHAPES = {
    "decimal": r"\d+\.\d+",
    "negative": r"[-−]\d+(?:\.\d+)?",
    "big integer": r"[1-9]\d{6,}",
    "long digit run": r"\d{20,}",
    "scientific 1.5e-3": r"\d\.\d+[eE]-\d+",
    "scientific 6.02E23": r"\d\.\d+E\+?\d+",
    "hex": r"0[xX][0-9a-fA-F]+",
    "thousands 1,000,000": r"\d{1,3}(?:,\d{3}){2,}",
    "thousands 1 000 000": r"\d{1,3}(?: \d{3}){2,}",
    "percentage": r"\d+(?:\.\d+)? ?%",
    "date 2024-03-15": r"\d{4}-\d{2}-\d{2}",
    "date 15/03/2024": r"\d{2}/\d{2}/\d{4}",
    "time": r"\d{1,2}:\d{2}(?::\d{2})?",
    "version v2.13.0": r"v\d+\.\d+\.\d+",
    "unit": r"\d+(?:\.\d+)? ?[A-Za-zµ°/]+",
    "ordinal": r"\d*(?:1st|2nd|3rd|[04-9]th|1[1-3]th)",
    "spelled seven billion": r"[a-z]+(?:[ -][a-z]+)* billion",
    "fraction": r"\d+/\d+|[½¼¾⅓⅔⅛]",
    "roman": r"M{0,3}(?:CM|CD|D?C{0,3})(?:XC|XL|L?X{0,3})(?:IX|IV|V?I{0,3})",
}


@pytest.mark.parametrize("shape", sorted(NUMBER_SHAPES))
def test_numbers_draws_every_written_form(shape):
    pattern = re.compile(NUMBER_SHAPES[shape])
    found = find(S.numbers(), lambda s: pattern.fullmatch(s) is not None and s != "",
                 settings=GENERATE_ONLY)
    assert pattern.fullmatch(found)


UNIT_SHAPES = {"7B": r"\d+B", "3.5 GHz": r"\d+\.\d+ GHz", "64 GiB": r"\d+ GiB",
               "12 ms": r"\d+ ms"}


@pytest.mark.parametrize("shape", sorted(UNIT_SHAPES))
def test_numbers_with_units_include_the_issue_examples(shape):
    pattern = re.compile(UNIT_SHAPES[shape])
    found = find(S.numbers("unit"), lambda s: pattern.fullmatch(s) is not None,
                 settings=GENERATE_ONLY)
    assert pattern.fullmatch(found)


def test_numbers_shrink_to_zero_when_a_digit_is_needed():
    assert find(S.numbers(), lambda s: any(c.isdigit() for c in s), settings=SEARCH) == "0"


def test_numbers_mostly_carry_digits():
    drawn = []

    @settings(FEW, max_examples=200, phases=(Phase.generate,))
    @given(S.numbers())
    def collect(number):
        drawn.append(number)

    collect()
    with_digits = sum(any(c.isdigit() for c in number) for number in drawn)
    assert with_digits >= 0.7 * len(drawn), drawn[:20]


def test_numbers_rejects_unknown_form_naming_the_valid_ones():
    with pytest.raises(ValueError, match="'hexx'") as raised:
        S.numbers(["hex", "hexx"])
    for form in ("integer", "scientific", "date"):
        assert form in str(raised.value)


def test_spelled_and_roman_helpers():
    assert S.spell_number(7_000_000_000) == "seven billion"
    assert S.spell_number(42) == "forty-two"
    assert S.spell_number(1_105) == "one thousand one hundred five"
    assert S.roman_numeral(2024) == "MMXXIV"
    with pytest.raises(ValueError, match="4000"):
        S.roman_numeral(4000)


# ---------------------------------------------------------------------------------------------
# jargon()
# ---------------------------------------------------------------------------------------------


def test_shipped_jargon_has_several_domains_of_a_few_dozen_distinct_terms():
    assert set(JARGON_FILE) >= {"ml", "systems", "maths", "physics", "medicine", "law",
                                "finance", "chemistry", "networking"}
    for domain, terms in JARGON_FILE.items():
        assert len(terms) >= 24, domain
        assert len(set(terms)) == len(terms), domain
    assert tuple(JARGON_FILE) == S.DOMAINS


@settings(FEW)
@given(S.jargon())
def test_jargon_draws_only_shipped_terms(term):
    assert term in ALL_TERMS


@pytest.mark.parametrize("domain", ["ml", "law", "chemistry", "networking"])
def test_jargon_reaches_each_domain_and_selects_it(domain):
    terms = set(JARGON_FILE[domain])
    others = {t for d, ts in JARGON_FILE.items() if d != domain for t in ts}
    only_here = terms - others
    assert find(S.jargon(), lambda t: t in only_here, settings=GENERATE_ONLY) in only_here

    @settings(FEW, max_examples=30)
    @given(S.jargon(domains=[domain]))
    def only_that_domain(term):
        assert term in terms

    only_that_domain()


def test_jargon_covers_several_domains_in_few_draws():
    seen = set()

    @settings(FEW, max_examples=150, phases=(Phase.generate,))
    @given(S.jargon())
    def collect(term):
        seen.update(domain for domain, terms in JARGON_FILE.items() if term in terms)

    collect()
    assert len(seen) >= 6, seen


def test_unknown_domain_error_lists_the_valid_domains():
    with pytest.raises(ValueError) as raised:
        S.jargon(domains=["ml", "astrology"])
    message = str(raised.value)
    assert "'astrology'" in message
    for domain in JARGON_FILE:
        assert domain in message


# ---------------------------------------------------------------------------------------------
# The other building blocks
# ---------------------------------------------------------------------------------------------


def test_templates_fill_the_issue_10_sentence_shape():
    sentence = re.compile(r"the .+ is important for .+ because")
    found = find(S.templates(), lambda s: sentence.fullmatch(s) is not None,
                 settings=GENERATE_ONLY)
    assert sentence.fullmatch(found)
    words = found[len("the "):-len(" because")].split(" is important for ")
    assert all(word in ALL_TERMS for word in words), words


def test_templates_shrink_by_dropping_words():
    assert find(S.templates(), lambda s: "transformer" in s, settings=SEARCH) == "transformer"
    assert find(S.templates(), lambda s: "because" in s, settings=SEARCH) == "because"


def test_templates_put_numbers_in_sentences():
    shape = re.compile(r"What is .+ .+ .+\?")
    found = find(S.templates(), lambda s: shape.fullmatch(s) is not None and
                 any(c.isdigit() for c in s), settings=GENERATE_ONLY)
    assert found.startswith("What is ")


@settings(FEW)
@given(S.code_fragments())
def test_code_fragments_come_from_the_shipped_snippets(snippet):
    assert snippet in ALL_SNIPPETS


def test_code_fragments_select_a_language():
    sql = set(CODE_FILE["sql"])
    assert find(S.code_fragments("sql"), lambda s: True, settings=SEARCH) in sql
    with pytest.raises(ValueError, match="'cobol'.*python"):
        S.code_fragments(["cobol"])


PUNCTUATION_CHARS = set("".join(S.PUNCTUATION))


@settings(FEW)
@given(S.punctuation_runs())
def test_punctuation_runs_hold_only_punctuation(run):
    assert run and set(run) <= PUNCTUATION_CHARS


def test_punctuation_runs_shrink_to_a_period_and_reach_long_runs():
    assert find(S.punctuation_runs(), lambda s: True, settings=SEARCH) == "."
    long_run = find(S.punctuation_runs(), lambda s: len(s) >= 100, settings=GENERATE_ONLY)
    assert len(long_run) >= 100


SCRIPT_RANGES = {
    "cjk": (0x4E00, 0x9FFF),
    "cyrillic": (0x0400, 0x04FF),
    "arabic": (0x0600, 0x06FF),
    "devanagari": (0x0900, 0x097F),
    "greek": (0x0370, 0x03FF),
    "emoji": (0x1F300, 0x1FAFF),
}


@pytest.mark.parametrize("script", sorted(SCRIPT_RANGES))
def test_other_scripts_reach_each_script(script):
    low, high = SCRIPT_RANGES[script]
    found = find(S.other_scripts(), lambda s: any(low <= ord(c) <= high for c in s),
                 settings=GENERATE_ONLY)
    assert any(low <= ord(c) <= high for c in found)


@settings(FEW)
@given(S.other_scripts())
def test_other_scripts_are_not_latin_letters(text):
    assert text and not re.search(r"[A-Za-z]", text)


@settings(FEW)
@given(st.data())
def test_repetition_repeats_one_value(data):
    text = data.draw(S.repetition(st.sampled_from(["ab", "7"]), min_times=3, max_times=9))
    assert any(text == sep.join([unit] * times)
               for unit in ("ab", "7") for sep in ("", " ", "\n") for times in range(3, 10))


def test_repetition_shrinks_to_fewest_repeats():
    assert find(S.repetition(st.just("ab"), min_times=2, max_times=9), lambda s: True,
                settings=SEARCH) == "abab"


@settings(FEW)
@given(st.text(max_size=50))
def test_chat_turn_parses_back_to_its_content(text):
    assert S.parse_chat_turn(S.chat_turn(text)) == text


@settings(FEW)
@given(S.chat_turns(S.templates()))
def test_chat_turns_use_gemma_template(prompt):
    assert prompt.startswith("<start_of_turn>user\n")
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
    content = S.parse_chat_turn(prompt)
    assert prompt == f"<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"


def test_parse_chat_turn_rejects_plain_text():
    with pytest.raises(ValueError, match="not a Gemma chat turn"):
        S.parse_chat_turn("hello")


# ---------------------------------------------------------------------------------------------
# token_prompts()
# ---------------------------------------------------------------------------------------------

VOCABULARY = ["<pad>", "<eos>", "<bos>", "<unk>", "<0x0A>", "<start_of_turn>",
              "▁the", "▁cat", "s", "▁7", ",", ".", "▁", "ing", "Q"]
TEXT_PIECES = [piece.replace("▁", " ") for piece in VOCABULARY if not piece.startswith("<")]


def _fewest_pieces(text: str, pieces: list[str]) -> int | None:
    """Fewest pieces that spell `text` exactly, or None."""
    best: list[int | None] = [0] + [None] * len(text)
    for end in range(1, len(text) + 1):
        for piece in pieces:
            start = end - len(piece)
            if start >= 0 and text[start:end] == piece and best[start] is not None:
                count = best[start] + 1
                best[end] = count if best[end] is None else min(best[end], count)
    return best[len(text)]


@settings(FEW)
@given(S.token_prompts(VOCABULARY, max_tokens=6))
def test_token_prompts_use_only_text_pieces_of_the_vocabulary(text):
    count = _fewest_pieces(text, TEXT_PIECES)
    assert count is not None and count <= 6, text
    assert "<" not in text and "▁" not in text


def test_token_prompts_shrink_to_fewer_and_lower_pieces():
    assert find(S.token_prompts(VOCABULARY, 6), lambda s: True, settings=SEARCH) == ""
    assert find(S.token_prompts(VOCABULARY, 6), lambda s: s != "", settings=SEARCH) == " the"


def test_token_prompts_honour_allowed_ids_and_refuse_empty_choice():
    found = find(S.token_prompts(VOCABULARY, 4, allowed_ids=[7]), lambda s: len(s) > 8,
                 settings=SEARCH)
    assert found == " cat cat cat"
    with pytest.raises(ValueError, match="usable"):
        S.token_prompts(["<bos>", "<eos>"], 4)


# ---------------------------------------------------------------------------------------------
# prompts() and structured_prompts()
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_chars", [0, 1, 7, 60, 512])
def test_prompts_respect_max_chars(max_chars):
    @settings(FEW, max_examples=40)
    @given(S.prompts(max_chars=max_chars))
    def bounded(prompt):
        assert len(prompt) <= max_chars

    bounded()


def test_prompts_reach_their_max_chars_exactly():
    assert len(find(S.prompts(max_chars=60), lambda s: len(s) == 60,
                    settings=GENERATE_ONLY)) == 60


def test_empty_prompt_is_the_minimal_prompt():
    assert find(S.prompts(), lambda s: True, settings=SEARCH) == ""


def test_digit_prompt_shrinks_to_a_single_digit():
    assert find(S.prompts(), lambda s: any(c.isdigit() for c in s), settings=SEARCH) == "0"


def test_transformer_prompt_shrinks_to_the_word():
    assert find(S.prompts(), lambda s: "transformer" in s, settings=SEARCH) == "transformer"


def test_prompts_shrink_by_dropping_fragments():
    found = find(S.prompts(), lambda s: "transformer" in s and any(c.isdigit() for c in s),
                 settings=SEARCH)
    assert "transformer" in found and len(found) <= len("transformer") + 3, found


@settings(FEW)
@given(S.structured_prompts(max_chars=200))
def test_structured_prompt_text_is_its_fragments_joined(prompt):
    assert set(prompt.kinds) <= set(S.FRAGMENT_KINDS)
    body = "".join(f.separator + f.text for f in prompt.fragments)
    assert prompt.text == (S.chat_turn(body) if prompt.chat else body)
    assert len(prompt.text) <= 200
    if prompt.fragments:
        assert prompt.fragments[0].separator == ""
        assert all(f.separator in S.SEPARATORS for f in prompt.fragments[1:])


def test_structured_prompts_mix_every_kind_and_use_the_vocabulary():
    strategy = S.structured_prompts(vocabulary=VOCABULARY)
    for kind in S.FRAGMENT_KINDS:
        found = find(strategy, lambda p, kind=kind: kind in p.kinds, settings=GENERATE_ONLY)
        assert kind in found.kinds


def test_chat_can_be_forced_and_needs_room():
    prompt = find(S.prompts(chat=True), lambda s: True, settings=SEARCH)
    assert S.parse_chat_turn(prompt) == ""
    with pytest.raises(ValueError, match="max_chars"):
        S.prompts(max_chars=10, chat=True)
    assert find(S.prompts(max_chars=10), lambda s: len(s) == 10, settings=GENERATE_ONLY)


def test_custom_fragments_and_separators():
    strategy = S.prompts(fragment_strategy=st.just("x"), separators=("+",), chat=False)
    assert find(strategy, lambda s: len(s) >= 5, settings=SEARCH) == "x+x+x"
