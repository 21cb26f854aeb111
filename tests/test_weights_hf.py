"""Hugging Face directories in the built-in engine (fuzz.engine.weights.hf, fuzz.engine.hf_dir).

Tiny random checkpoints written by transformers' own save_pretrained (Gemma 1, 2, 3 text and the
text part of multimodal Gemma 3; one file and sharded) must load to the same float32 logits as
transformers computes; every refusal names what is wrong.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_checkpoints import MODEL_TYPES, hf_logits, save_tiny_hf

from fuzz.cli import main as cli_main
from fuzz.engine.config import AttentionType
from fuzz.engine.hf_dir import load_hf_model
from fuzz.engine.model import full_logits
from fuzz.engine.tokenizer.build import tiny_tokenizer
from fuzz.engine.tokenizer.hf_json import tokenizer_from_json
from fuzz.engine.weights import WeightsError
from fuzz.engine.weights.hf_config import config_from_hf
from fuzz.engine.zoo import load_model
from fuzz.precision import get_policy

transformers = pytest.importorskip("transformers", reason="HF checkpoints are written by "
                                                          "transformers (test extra)")

REL_TOL = 1e-4  # max |ours - theirs| / max |theirs|: the same float32 math in another op order
PROMPTS = ["the transformer attention is important because of the gradient",
           "seven billion parameter model with float precision 12345",
           "<start_of_turn>user\nnan inf tensor kernel matrix layer value<end_of_turn>\n"]


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def _assert_parity(model, directory: Path) -> None:
    loaded = load_hf_model(directory)
    engine = loaded.engine(get_policy("float32"))
    for prompt in PROMPTS:
        ids = torch.tensor([loaded.tokenizer.encode(prompt)])
        assert ids.shape[1] > 2 * 6  # longer than the sliding window: the local mask matters
        ours, theirs = full_logits(engine, ids), hf_logits(model, ids)
        assert ours.shape == theirs.shape
        error = _relative_error(ours, theirs)
        assert error < REL_TOL, f"{prompt!r}: relative logit error {error:.2e}"
        assert theirs.std() > 0.1  # the logits carry signal, so the comparison means something


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_logits_match_transformers(tmp_path, model_type):
    model, directory = save_tiny_hf(model_type, tmp_path / model_type)
    assert (directory / "model.safetensors").is_file()
    _assert_parity(model, directory)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3"])
def test_sharded_checkpoint_matches_transformers(tmp_path, model_type):
    model, directory = save_tiny_hf(model_type, tmp_path / model_type, sharded=True)
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    _assert_parity(model, directory)
    single = load_hf_model(save_tiny_hf(model_type, tmp_path / "single")[1])
    assert load_hf_model(directory).fingerprint == single.fingerprint  # the same weights


def test_transformers_5_multimodal_names_load_too(tmp_path):
    """`model.language_model.` / `model.vision_tower.` (transformers 5's module names) as well as
    the Hub's `language_model.model.` layout that save_pretrained writes."""
    model, directory = save_tiny_hf("gemma3", tmp_path / "g3mm")

    def rename(state):
        for key in list(state):
            new = key.replace("language_model.model.", "model.language_model.")
            new = "model." + new if new.startswith(("vision_tower.", "multi_modal")) else new
            state[new] = state.pop(key)
        assert any(k.startswith("model.vision_tower.") for k in state)

    _edit_weights(directory, rename)
    _assert_parity(model, directory)


def test_config_fields_reach_the_engine(tmp_path):
    _, directory = save_tiny_hf("gemma3_text", tmp_path / "g3")
    config = load_hf_model(directory).config
    assert config.sliding_window_size == 6 and config.query_pre_attn_scalar == 12
    assert [config.attn_type(i) for i in range(4)] == [
        AttentionType.LOCAL_SLIDING, AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL,
        AttentionType.LOCAL_SLIDING]
    assert config.rope_wave_length == {AttentionType.LOCAL_SLIDING: 10_000,
                                       AttentionType.GLOBAL: 1_000_000}
    assert config.rope_scaling_factor == 8 and config.use_qk_norm


def test_the_rope_scaling_factor_matters(tmp_path):
    """The parity above is sharp enough to see the global RoPE scaling: dropping it breaks it."""
    model, directory = save_tiny_hf("gemma3_text", tmp_path / "g3")
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data["rope_parameters"]["full_attention"] = {"rope_type": "default", "rope_theta": 1e6}
    path.write_text(json.dumps(data))
    ids = torch.tensor([tiny_tokenizer().encode(PROMPTS[0])])
    ours = full_logits(load_hf_model(directory).engine(get_policy("float32")), ids)
    assert _relative_error(ours, hf_logits(model, ids)) > 100 * REL_TOL


def test_transformers_4_config_layout_means_the_same(tmp_path):
    """The Hub's original files: rope_theta, rope_local_base_freq, rope_scaling and
    sliding_window_pattern instead of rope_parameters and layer_types."""
    _, directory = save_tiny_hf("gemma3_text", tmp_path / "g3")
    v5 = json.loads((directory / "config.json").read_text())
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
    v4.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=3,
              rope_scaling={"type": "linear", "factor": 8.0})
    v5["layer_types"] = ["sliding_attention", "sliding_attention", "full_attention"] + [
        "sliding_attention"]
    assert config_from_hf(v4, "v4") == config_from_hf(v5, "v5")


def test_tokenizer_json_only_directory_encodes_as_sentencepiece(tmp_path):
    model, directory = save_tiny_hf("gemma", tmp_path / "g1", tokenizer="json")
    reference = tiny_tokenizer()
    rebuilt = tokenizer_from_json(directory / "tokenizer.json")
    texts = [*PROMPTS, "", "  two  spaces\n\n\ttab", "héllo wörld 中文 😀", "7777777 0.5e-3",
             "<bos><eos><unk>", "\u2581literal"]
    for text in texts:
        assert rebuilt.encode(text) == reference.encode(text), text
        assert rebuilt.decode(rebuilt.encode(text, bos=False)) == reference.decode(
            reference.encode(text, bos=False))
    _assert_parity(model, directory)  # the whole directory loads with that tokenizer


# --- refusals -----------------------------------------------------------------------------------
@pytest.fixture
def g3_dir(tmp_path) -> Path:
    return save_tiny_hf("gemma3_text", tmp_path / "g3")[1]


def _edit_weights(directory: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _error(directory: Path, kind: type[Exception] = WeightsError) -> str:
    with pytest.raises(kind) as info:
        load_hf_model(directory)
    return str(info.value)


K_PROJ = "model.layers.1.self_attn.k_proj.weight"


def test_missing_tensor_is_named(g3_dir):
    _edit_weights(g3_dir, lambda s: s.pop(K_PROJ))
    message = _error(g3_dir)
    assert "missing keys (1)" in message and K_PROJ in message and "(16, 32)" in message


def test_unexpected_tensor_is_named(g3_dir):
    _edit_weights(g3_dir, lambda s: s.update({"model.layers.1.self_attn.extra.weight":
                                               torch.zeros(2, 2)}))
    assert "unexpected keys (1): model.layers.1.self_attn.extra.weight" in _error(g3_dir)


def test_wrong_shape_is_named(g3_dir):
    _edit_weights(g3_dir, lambda s: s.update({K_PROJ: torch.zeros(24, 32)}))
    assert f"{K_PROJ}: expected (16, 32), found (24, 32)" in _error(g3_dir)


def test_untied_head_is_refused(g3_dir):
    _edit_weights(g3_dir, lambda s: s.update({"lm_head.weight": torch.ones(512, 32)}))
    assert "lm_head.weight differs from the token embedding" in _error(g3_dir)


def test_stored_tied_head_is_accepted(g3_dir):
    def add_head(state):
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()

    _edit_weights(g3_dir, add_head)
    assert load_hf_model(g3_dir).config.vocab_size == 512


@pytest.mark.parametrize("model_type", ["llama", "gemma3n", None])
def test_unsupported_model_type_is_named(g3_dir, model_type):
    _edit_config(g3_dir, model_type=model_type)
    message = _error(g3_dir)
    assert f"model_type {model_type!r} is not supported" in message
    assert "gemma, gemma2, gemma3_text, gemma3" in message


@pytest.mark.parametrize("change, named", [
    (dict(hidden_activation="gelu"), "activation 'gelu'"),
    (dict(attention_bias=True), "attention_bias true"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings false"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0},
                           "sliding_attention": {"rope_type": "default"}}), "RoPE type 'yarn'"),
    (dict(quantization_config={"quant_method": "bitsandbytes"}), "quant_method 'bitsandbytes'"),
    (dict(num_hidden_layers=5), "layer_types must list one type per layer (5)"),
])
def test_what_the_engine_cannot_run_is_refused(g3_dir, change, named):
    _edit_config(g3_dir, **change)
    assert named in _error(g3_dir)


def test_gemma1_theta_other_than_upstreams_is_refused(tmp_path):
    _, directory = save_tiny_hf("gemma", tmp_path / "g1")
    _edit_config(directory, rope_parameters={"rope_type": "default", "rope_theta": 500_000.0})
    assert "rope_theta 500000 is not supported for gemma" in _error(directory)


def test_missing_shard_is_named(tmp_path):
    _, directory = save_tiny_hf("gemma2", tmp_path / "g2", sharded=True)
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    message = _error(directory)
    assert f"names shard {shard.name!r}" in message and "does not exist" in message


def test_no_weights_and_no_tokenizer_are_named(g3_dir):
    (g3_dir / "tokenizer.model").unlink()
    assert "neither tokenizer.model nor tokenizer.json" in _error(g3_dir, FileNotFoundError)
    (g3_dir / "model.safetensors").unlink()
    assert "no model.safetensors or model.safetensors.index.json" in _error(g3_dir)


def test_foreign_tokenizer_json_is_refused(tmp_path):
    _, directory = save_tiny_hf("gemma", tmp_path / "g1", tokenizer="json")
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    data["normalizer"] = {"type": "NFKC"}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is not Gemma's"):
        tokenizer_from_json(path)


def test_tokenizer_larger_than_the_embedding_is_refused(g3_dir):
    embedding = "model.embed_tokens.weight"
    _edit_weights(g3_dir, lambda s: s.update({embedding: s[embedding][:300].clone()}))
    _edit_config(g3_dir, vocab_size=300)
    with pytest.raises(ValueError, match="the tokenizer has 512 ids but config.json's vocab_size "
                                         "is 300"):
        load_hf_model(g3_dir)


def test_variant_with_an_hf_directory_is_refused(g3_dir):
    with pytest.raises(ValueError, match="drop --variant/--config"):
        load_model(str(g3_dir), variant="270m")


# --- the command line ---------------------------------------------------------------------------
def test_cli_recognises_an_hf_directory(g3_dir, capsys):
    code = cli_main(["check", "--model", str(g3_dir), "--policy", "float32", "--prompt",
                     "the model", "--max-new-tokens", "2", "--json", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["status"] == "finite" and out["model"] == "g3"


def test_cli_bad_hf_directory_exits_2(g3_dir, capsys):
    _edit_config(g3_dir, model_type="llama")
    code = cli_main(["check", "--model", str(g3_dir), "--policy", "float32", "--prompt", "x",
                     "--device", "cpu"])
    assert code == 2 and "model_type 'llama' is not supported" in capsys.readouterr().err
