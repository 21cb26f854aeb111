"""Hypothesis strategies that draw prompts for the Gemma float16 NaN/Inf fuzzer.

What the strategies aim at (docs/NUMERICS.md):
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

Layout: `vocabulary` (the shipped vocabularies, punctuation, operators, `token_prompts`, and the
shared helpers), `numbers` (every written form of a number), `compose` (templates, repetition,
chat turns, and whole prompts), `long` (prompts past Gemma 3's 512-token sliding window). The
chat template itself is `fuzz.engine.tokenizer`'s, re-exported here. Import from this package,
not from the submodules: the split is an implementation detail.
"""

from __future__ import annotations

from fuzz.engine.tokenizer import CHAT_PREFIX, CHAT_SUFFIX, chat_turn
from fuzz.strategies.compose import (
    DEFAULT_MAX_CHARS,
    DEFAULT_MAX_FRAGMENTS,
    FRAGMENT_KINDS,
    ISSUE_10_PROMPT,
    SEPARATORS,
    TEMPLATES,
    Fragment,
    Prompt,
    chat_turns,
    fragments,
    parse_chat_turn,
    prompts,
    repetition,
    structured_prompts,
    templates,
)
from fuzz.strategies.long import SLIDING_WINDOW, long_prompts
from fuzz.strategies.mutate import MUTATIONS, mutants
from fuzz.strategies.numbers import NUMBER_FORMS, numbers, roman_numeral, spell_number
from fuzz.strategies.vocabulary import (
    CODE,
    DOMAINS,
    JARGON,
    LANGUAGES,
    OPERATORS,
    PUNCTUATION,
    SCRIPTS,
    code_fragments,
    jargon,
    other_scripts,
    punctuation_runs,
    sink_piece_ids,
    sink_token_prompts,
    token_prompts,
)

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
    "MUTATIONS",
    "NUMBER_FORMS",
    "OPERATORS",
    "PUNCTUATION",
    "SCRIPTS",
    "SEPARATORS",
    "SLIDING_WINDOW",
    "TEMPLATES",
    "Fragment",
    "Prompt",
    "chat_turn",
    "chat_turns",
    "code_fragments",
    "fragments",
    "jargon",
    "long_prompts",
    "mutants",
    "numbers",
    "other_scripts",
    "parse_chat_turn",
    "prompts",
    "punctuation_runs",
    "repetition",
    "roman_numeral",
    "sink_piece_ids",
    "sink_token_prompts",
    "spell_number",
    "structured_prompts",
    "templates",
    "token_prompts",
]
