"""The zoo's tiny Gemma 3n / Gemma 4 (fuzz.engine.synthetic.transformers_only) through the
transformers engine: what the configs cover, the sites the probe reports on them, the KV cache, the
planted Gemma 4 overflow, and `fuzz run` finding and shrinking it."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import pytest  # noqa: E402
import torch  # noqa: E402
from recording import Keys  # noqa: E402

pytest.importorskip("transformers", reason="Gemma 3n/4 run on transformers only")

from fuzz.cli import main  # noqa: E402
from fuzz.corpus import Corpus  # noqa: E402
from fuzz.engine.interface import Batch, prompt_batch  # noqa: E402
from fuzz.engine.synthetic.transformers_only import GEMMA4_PLANTED_LAYER, tiny_transformers_model  # noqa: E402
from fuzz.engine.zoo import load_model  # noqa: E402
from fuzz.generate import generate
from fuzz.precision import get_policy  # noqa: E402
from fuzz.verdict import Bounds, PromptSpec

pytest_plugins = ["pytester"]

MODELS = ["tiny-gemma3n", "tiny-gemma4"]
IDS = torch.tensor([[2, 40, 41, 300, 301, 302, 77, 78, 79, 80, 81, 90]])  # > the window of 8


def test_configs_cover_what_the_architectures_add():
    g3n = load_model("tiny-gemma3n").transformers.config
    assert g3n.hidden_size_per_layer_input and g3n.altup_num_inputs == 4 and g3n.laurel_rank
    assert {"reuse", "store"} <= set(g3n.kv_sharing_modes)
    assert g3n.activation_sparsity_pattern[0] > 0
    g4 = load_model("tiny-gemma4").transformers.config
    assert g4.hidden_size_per_layer_input and g4.enable_moe_block and g4.num_experts == 4
    assert {"reuse", "store"} <= set(g4.kv_sharing_modes) and g4.attention_k_eq_v


def test_models_and_fingerprints_are_deterministic():
    for name in MODELS:
        a, b = tiny_transformers_model(name), tiny_transformers_model(name)
        assert a.fingerprint == b.fingerprint
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert load_model("tiny-gemma4").fingerprint != load_model("tiny-gemma4-planted").fingerprint


@pytest.mark.parametrize("name", MODELS)
def test_the_builtin_and_upstream_engines_refuse_them(name):
    model = load_model(name)
    for kind in ("builtin", "upstream"):
        with pytest.raises(ValueError, match="only transformers' classes run.*--engine "
                                             "transformers"):
            model.engine(get_policy("float32"), "cpu", kind)


@pytest.mark.parametrize("name", MODELS)
def test_probe_reports_the_builtin_sites_plus_the_architecture_own(name):
    engine = load_model(name).engine(get_policy("float32"), "cpu", "transformers-eager")
    rec = Keys()
    engine(prompt_batch(IDS), engine.new_cache(1, IDS.shape[1]), rec, last_only=False)
    assert rec.keys[0] == (-1, "embedding") and rec.keys[-2:] == [(4, "final_norm"), (4, "logits")]
    layer1 = [site for layer, site in rec.keys if layer == 1]
    common = ["input_layernorm", "qkv", "attn_output", "post_attention_layernorm",
              "residual_attn", "pre_feedforward_layernorm", "mlp_act", "mlp_output",
              "post_feedforward_layernorm", "residual_mlp"]
    assert [s for s in layer1 if s in common] == common  # the built-in order
    own = ({"laurel", "residual_laurel", "post_per_layer_input_norm", "layer_output"}
           if name == "tiny-gemma3n" else
           {"post_feedforward_layernorm_1", "pre_feedforward_layernorm_2", "moe_output",
            "post_feedforward_layernorm_2", "moe_sum", "post_per_layer_input_norm",
            "residual_per_layer", "layer_output"})
    assert set(layer1) - set(common) == own
    assert rec.sums_ok  # every residual's `out` is exactly residual + branch
    # KV-sharing layers (2, 3) project q only: their qkv is narrower than a storing layer's.
    assert rec.shapes[(2, "qkv")][-1] < rec.shapes[(0, "qkv")][-1]
    assert all(len(shape) == 3 for shape in rec.shapes.values())  # [B, T, width] everywhere


def test_every_layer_computes_every_position_when_only_the_last_logits_are_kept():
    """Gemma 4's KV-sharing layers (2, 3) would compute the last position alone under
    generate()'s logits_to_keep=1; the engine keeps every position, as the other engines do."""
    engine = load_model("tiny-gemma4").engine(get_policy("float32"), "cpu", "transformers")
    rec = Keys()
    logits = engine(prompt_batch(IDS), engine.new_cache(1, IDS.shape[1]), rec, last_only=True)
    assert logits.shape == (1, engine.config.vocab_size)
    t = IDS.shape[1]
    assert rec.shapes[(3, "residual_mlp")][1] == rec.shapes[(2, "qkv")][1] == t
    assert rec.shapes[(4, "final_norm")][1] == rec.shapes[(4, "logits")][1] == 1


@pytest.mark.parametrize("name", MODELS)
def test_decoding_through_the_cache_equals_a_full_forward(name):
    engine = load_model(name).engine(get_policy("float32"), "cpu", "transformers-sdpa")
    full = engine(prompt_batch(IDS), engine.new_cache(1, 12), last_only=False)[0, -1]
    cache = engine.new_cache(1, 12)
    engine(prompt_batch(IDS[:, :11]), cache)
    pos = torch.tensor([[11]])
    step = Batch(IDS[:, 11:], pos, 11, torch.ones(1, 12, dtype=torch.bool),
                 torch.arange(12).view(1, -1))
    last = engine(step, cache)[0]
    assert (last - full).abs().max() < 1e-4 * full.abs().max()


@pytest.mark.parametrize("name", MODELS)
def test_plain_policies_stay_finite_on_random_weights(name):
    model = load_model(name)
    specs = [PromptSpec("hello world 7"), PromptSpec("a b c d e f g h i j k l", add_bos=False)]
    for policy in ("float32", "bfloat16", "float16"):
        engine = model.engine(get_policy(policy), "cpu", "transformers")
        verdicts = generate(engine, model.tokenizer, specs, policy, Bounds(max_new_tokens=4))
        assert all(v.finite and len(v.tokens) == 4 for v in verdicts), policy


def test_planted_gemma4_overflows_in_float16_only_on_the_trigger():
    model = load_model("tiny-gemma4-planted")
    specs = [PromptSpec("a 7 b"), PromptSpec("no trigger here"), PromptSpec("7", add_bos=False)]
    bounds = Bounds(max_new_tokens=2)
    f16 = generate(model.engine(get_policy("float16"), "cpu", "transformers"), model.tokenizer,
                   specs, "float16", bounds)
    first = f16[0].first_nonfinite
    assert (first.step, first.layer, first.site, first.kind) == (0, GEMMA4_PLANTED_LAYER,
                                                                 "residual_mlp", "inf")
    assert first.token_id == model.tokenizer.encode("7", bos=False)[0]
    assert f16[1].finite and f16[2].nonfinite
    for policy in ("bfloat16", "float32"):
        engine = model.engine(get_policy(policy), "cpu", "transformers")
        assert all(v.finite for v in generate(engine, model.tokenizer, specs, policy, bounds))


def test_fuzz_run_finds_and_shrinks_the_planted_gemma4_overflow(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    rc = main(["run", "--model", "tiny-gemma4-planted", "--engine", "transformers",
               "--policies", "float16", "--budget", "40s", "--no-bos", "--seed", "3",
               "--max-new-tokens", "2", "--round-examples", "15", "--corpus", str(corpus),
               "--database", "", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    [case] = [c.case for c in Corpus(corpus).cases("tiny-gemma4-planted")]
    first = case.first_nonfinite
    assert (case.policy, first.layer, first.site) == ("float16", GEMMA4_PLANTED_LAYER,
                                                      "residual_mlp")
    assert "7" in case.prompt and len(case.prompt) <= 3  # shrunk (to "7" given the time)


INNER = '''
from hypothesis import Phase, given, settings, strategies as st


@settings(max_examples=10, derandomize=True, database=None,
          phases=[p for p in Phase if p.name != "explain"])
@given(text=st.sampled_from(["hello", "a 7 b", "no"]))
def test_planted(gemma_fuzz, text):
    gemma_fuzz.check(text, "float16")
'''


def test_pytest_plugin_runs_gemma4_on_the_transformers_engine(fuzz_project, tmp_path):
    corpus = tmp_path / "corpus"
    fuzz_project.makepyfile(test_inner=INNER)
    result = fuzz_project.runpytest_subprocess(
        "--gemma-model", "tiny-gemma4-planted", "--gemma-engine", "transformers",
        f"--corpus-dir={corpus}", "--gemma-max-new-tokens", "2", "-p", "no:cacheprovider",
        "-p", "no:randomly")
    result.assert_outcomes(failed=1)  # the new signature, shrunk and saved
    [case] = [c.case for c in Corpus(corpus).cases("tiny-gemma4-planted")]
    assert case.prompt == "7"  # minimized to the planted trigger
    assert (case.first_nonfinite.layer, case.first_nonfinite.site) == (GEMMA4_PLANTED_LAYER,
                                                                       "residual_mlp")
