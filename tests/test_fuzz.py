"""The fuzz tests: Hypothesis prompts through the model under each selected policy.

A policy declared safe fails on any non-finite value; an unsafe one (plain float16) fails only on
a signature the corpus does not hold yet. When Hypothesis has shrunk a failure, the plugin saves
the minimal prompt to corpus/ (fuzz.pytest_plugin).

    pytest tests/test_fuzz.py --gemma-policies float16 --gemma-no-bos --hypothesis-profile nightly
"""
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz.long import long_strategy
from fuzz.strategies import ISSUE_10_PROMPT, prompts

# About 2 characters per token on mixed text; over-long draws are rejected by the harness.
MAX_CHARS = 160


@pytest.mark.fuzz
@given(text=prompts(max_chars=MAX_CHARS))
@example(text=ISSUE_10_PROMPT)  # gemma_pytorch#10's own prompt always runs
def test_prompt_stays_finite_or_known(gemma_fuzz, gemma_policy, gemma_bos, text):
    gemma_fuzz.check(text, gemma_policy, add_bos=gemma_bos)


@pytest.mark.fuzz
@given(data=st.data())
def test_prompt_with_the_models_own_pieces_stays_finite_or_known(gemma_fuzz, gemma_policy,
                                                                 gemma_bos, data):
    """The default strategy plus token-level prompts from the loaded model's vocabulary (its
    digits, punctuation and sink pieces), as `fuzz run` draws them: the vocabulary is known only
    once the model is loaded, so the strategy is drawn from inside the test. With --gemma-long:
    prompts past Gemma 3's 512-token sliding window instead (fuzz.long), 128 decode steps."""
    session = gemma_fuzz.session
    strategy = long_strategy(session) if gemma_fuzz.long else prompts(
        max_chars=MAX_CHARS, vocabulary=session.model.tokenizer.vocabulary())
    text = data.draw(strategy, label="long prompt" if gemma_fuzz.long else "prompt")
    gemma_fuzz.check(text, gemma_policy, add_bos=gemma_bos)
