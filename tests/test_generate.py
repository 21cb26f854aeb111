"""Bounded batched generation and the probe, on synthetic models (no real weights needed)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fuzz.engine.loaded import LoadedModel
from fuzz.engine.synthetic.tiny import PLANTED_TRIGGER, TINY_PLANTED_LAYER
from fuzz.engine.zoo import load_model
from fuzz.generate import PromptTooLong, explain, generate
from fuzz.precision import POLICIES, get_policy
from fuzz.verdict import Bounds, PromptSpec

SHORT = Bounds(max_new_tokens=4, max_prompt_tokens=64)
PROMPTS = [
    PromptSpec("the transformer has 7 billion parameters"),
    PromptSpec("hello", add_bos=False),
    PromptSpec(""),
    PromptSpec("kernel 7", add_bos=False),
    PromptSpec("a much longer prompt about gradient descent and attention, 1.5e-3 and 0x1F"),
]


def run(model: LoadedModel, policy: str, specs, bounds: Bounds = SHORT):
    pol = get_policy(policy)
    return generate(model.engine(pol), model.tokenizer, specs, pol.name, bounds)


@pytest.fixture(scope="module")
def planted() -> LoadedModel:
    return load_model("tiny-planted")


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("tiny")


@pytest.mark.parametrize("policy", ["float16", "bfloat16", "float16-clamp"])
def test_batch_verdict_equals_alone(planted: LoadedModel, policy: str) -> None:
    together = run(planted, policy, PROMPTS)
    for spec, v in zip(PROMPTS, together):
        alone = run(planted, policy, [spec])[0]
        assert v.first_nonfinite == alone.first_nonfinite, spec
        assert v.tokens == alone.tokens, spec
        assert v.prompt_ids == alone.prompt_ids


def test_planted_overflow_is_attributed_to_its_layer_site_and_token(planted: LoadedModel) -> None:
    spec = PromptSpec("kernel 7 ms")
    v = run(planted, "float16", [spec])[0]
    trigger = planted.tokenizer.encode(PLANTED_TRIGGER, bos=False)[0]
    assert not v.finite and v.stopped == "nonfinite"
    first = v.first_nonfinite
    assert (first.step, first.layer, first.site, first.kind) == (0, TINY_PLANTED_LAYER,
                                                                  "residual_mlp", "inf")
    assert first.token_id == trigger
    assert v.prompt_ids[first.position] == trigger
    assert v.tokens == []  # stopped before choosing a token from NaN logits
    # The residual stream at the trigger is the culprit: headroom 0 there, finite before.
    assert v.headroom()[str(TINY_PLANTED_LAYER)]["residual_mlp"] == 0.0
    assert v.headroom()[str(TINY_PLANTED_LAYER - 1)]["residual_mlp"] > 1.0


@pytest.mark.parametrize("policy", ["float32", "bfloat16", "float16-clamp",
                                    "float16-fp32-residual"])
def test_planted_overflow_is_float16_only(planted: LoadedModel, policy: str) -> None:
    v = run(planted, policy, [PromptSpec("kernel 7 ms")])[0]
    assert v.finite, v.first_nonfinite
    assert v.stopped == "max_new_tokens" and len(v.tokens) == SHORT.max_new_tokens


def test_explain_names_the_channel_and_the_two_terms(planted: LoadedModel) -> None:
    spec = PromptSpec("kernel 7 ms")
    engine = planted.engine(POLICIES["float16"])
    v = explain(engine, planted.tokenizer, spec, run(planted, "float16", [spec])[0], SHORT)
    first = v.first_nonfinite
    assert first.channel == 0
    residual, branch = first.terms
    assert abs(residual) < 65504 and abs(branch) < 65504
    assert abs(residual + branch) > 65504


def test_padding_never_poisons_real_rows(planted: LoadedModel) -> None:
    """Make the PAD token a planted trigger too: its own slots overflow in float16 at the planted
    layer, yet padded rows must stay finite and equal to themselves run alone."""
    state = {k: v.clone() for k, v in planted.state.items()}
    trigger = planted.tokenizer.encode(PLANTED_TRIGGER, bos=False)[0]
    pad = planted.tokenizer.pad_id
    state["embedder.weight"][pad] = state["embedder.weight"][trigger]
    model = dataclasses.replace(planted, state=state, name="poisoned-pad", _engines={})
    specs = [PromptSpec("hello"), PromptSpec("a much longer prompt with many more tokens in it")]
    together = run(model, "float16", specs)
    assert together[0].finite and together[1].finite
    assert together[0].tokens == run(model, "float16", specs[:1])[0].tokens


def test_step_bound_and_eos(tiny: LoadedModel) -> None:
    v = run(tiny, "float32", [PromptSpec("hello")], Bounds(max_new_tokens=3))[0]
    assert v.stopped == "max_new_tokens" and len(v.tokens) == 3 and v.steps == 3
    first_token = v.tokens[0]

    class EosIsFirstToken:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        eos_id = property(lambda self: first_token)

    tok = EosIsFirstToken(tiny.tokenizer)
    v = generate(tiny.engine(POLICIES["float32"]), tok, [PromptSpec("hello")], "float32",
                 Bounds(max_new_tokens=5))[0]
    assert v.stopped == "eos" and v.tokens == [first_token] and v.steps == 1


class PoisonAtStep:
    """Wraps an engine: on forward number `step`, the fed token's embedding overflows float16."""

    def __init__(self, engine, step: int) -> None:
        self.engine, self.step, self.calls = engine, step, 0
        self.config, self.dtype, self.device = engine.config, engine.dtype, engine.device

    def new_cache(self, batch: int, max_len: int):
        return self.engine.new_cache(batch, max_len)

    def __call__(self, batch, cache, rec=None, last_only=True):
        self.calls += 1
        if self.calls - 1 != self.step:
            return self.engine(batch, cache, rec, last_only)
        weight = self.engine.embedder.weight
        saved = weight.clone()
        weight[batch.token_ids[:, -1]] = torch.finfo(torch.float16).max  # x8 -> inf
        try:
            return self.engine(batch, cache, rec, last_only)
        finally:
            weight.copy_(saved)


def test_decode_step_attribution(tiny: LoadedModel) -> None:
    spec = PromptSpec("kernel")
    engine = PoisonAtStep(load_model("tiny").engine(POLICIES["float16"]), step=3)
    clean = run(tiny, "float16", [spec], Bounds(max_new_tokens=8))[0]
    v = generate(engine, tiny.tokenizer, [spec], "float16", Bounds(max_new_tokens=8))[0]
    first = v.first_nonfinite
    assert (first.step, first.layer, first.site, first.kind) == (3, -1, "embedding", "inf")
    assert first.position == len(v.prompt_ids) + 2  # step k feeds the token at len + k - 1
    assert first.token_id == clean.tokens[2]
    assert v.tokens == clean.tokens[:3] and v.steps == 4


def test_prompt_beyond_bound_is_refused(tiny: LoadedModel) -> None:
    with pytest.raises(PromptTooLong, match=r"over the bound of 16 tokens.*--max-prompt-tokens"):
        run(tiny, "float32", [PromptSpec("x " * 200)], Bounds(max_prompt_tokens=16))


def test_empty_prompt_without_bos_is_refused(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="empty.*BOS"):
        run(tiny, "float32", [PromptSpec("", add_bos=False)])


def test_unknown_policy_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="float16-clamp"):
        get_policy("float8")


@pytest.mark.parametrize("name", ["tiny", "tiny-gemma1", "tiny-gemma2"])
def test_every_architecture_runs_finite_in_every_policy(name: str) -> None:
    model = load_model(name)
    for policy in POLICIES:
        v = run(model, policy, [PromptSpec("attention 42")], Bounds(max_new_tokens=2))[0]
        assert v.finite, (name, policy, v.first_nonfinite)
        assert set(v.max_abs) >= {"embedding", "0", "head"}
