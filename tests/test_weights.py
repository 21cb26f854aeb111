"""Tests for fuzz.engine.weights: strict checkpoint loading, GGUF reading, the dequantized cache.

The GGUF path is exercised on small synthetic files written with gguf.GGUFWriter, in llama.cpp's
conventions (norm weights stored as 1 + w, q/k/v stored separately, ne-ordered shapes), so it is
tested without the real weights; the real Gemma 3 270M file is checked under `real_weights`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_files import add_vocabulary, finish

from fuzz.engine import weights
from fuzz.engine.config import Architecture, AttentionType, GemmaConfig, get_model_config
from fuzz.engine.model import parameter_shapes
from fuzz.engine.synthetic import tiny as synthetic
from fuzz.engine.weights import (
    GGUFModel,
    WeightsError,
    load_checkpoint,
    load_gguf,
    read_gguf,
)

VOCAB = 300


# --- small configs and random states -------------------------------------------------------------
def tiny_config(arch: Architecture = Architecture.GEMMA_3, **overrides) -> GemmaConfig:
    """The shared tiny configs, shaped like what `config_from_gguf_metadata` builds for each
    architecture (2 layers, 2 KV heads; Gemma 3 with llama.cpp's 5-local/1-global pattern)."""
    fields: dict = dict(max_position_embeddings=128, num_key_value_heads=2, rms_norm_eps=1e-6)
    if arch != Architecture.GEMMA_1:
        fields.update(query_pre_attn_scalar=16)
    if arch == Architecture.GEMMA_3:
        fields.update(attn_types=(AttentionType.LOCAL_SLIDING,) * 5 + (AttentionType.GLOBAL,))
    return synthetic.tiny_config(arch, VOCAB, layers=2, **{**fields, **overrides})


def random_state(config: GemmaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights holding bfloat16 values, like real Gemma checkpoints: then llama.cpp's
    stored 1 + w gives back w exactly (float32 holds 1 + w exactly for a bfloat16 w of moderate
    size), as on the real file."""
    return synthetic.random_state(config, seed, bfloat16=True)


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == torch.float32, key
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


# --- gemma_pytorch checkpoints -------------------------------------------------------------------
@pytest.fixture(scope="module")
def config() -> GemmaConfig:
    return tiny_config()


@pytest.fixture(scope="module")
def state(config) -> dict[str, torch.Tensor]:
    return random_state(config)


def test_checkpoint_round_trip_ignores_rope_buffers(tmp_path, config, state):
    saved = {k: v.to(torch.bfloat16) for k, v in state.items()}
    # Upstream's model_state_dict also carries its RoPE tables (registered buffers).
    saved["local_freqs_cis"] = torch.zeros(4, 8, dtype=torch.complex64)
    saved["global_freqs_cis"] = torch.zeros(4, 8, dtype=torch.complex64)
    path = tmp_path / "model.ckpt"
    torch.save({"model_state_dict": saved}, path)
    loaded = load_checkpoint(path, config)
    assert_same_state(loaded, {k: v.to(torch.bfloat16).float() for k, v in state.items()})


def test_bare_state_dict_and_safetensors(tmp_path, config, state):
    from safetensors.torch import save_file
    torch.save(state, tmp_path / "bare.pt")
    assert_same_state(load_checkpoint(tmp_path / "bare.pt", config), state)
    save_file(state, tmp_path / "model.safetensors")
    assert_same_state(load_checkpoint(tmp_path / "model.safetensors", config), state)


def test_legacy_non_zip_checkpoint(tmp_path, config, state):
    path = tmp_path / "legacy.pt"
    torch.save({"model_state_dict": state}, path, _use_new_zipfile_serialization=False)
    assert_same_state(load_checkpoint(path, config), state)


def test_sharded_directory_with_index(tmp_path, config, state):
    keys = list(state)
    shards = {"model-00001-of-00002.bin": keys[: len(keys) // 2],
              "model-00002-of-00002.bin": keys[len(keys) // 2:]}
    weight_map = {}
    for shard, shard_keys in shards.items():
        torch.save({k: state[k] for k in shard_keys}, tmp_path / shard)
        weight_map.update({k: shard for k in shard_keys})
    (tmp_path / weights.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    assert_same_state(load_checkpoint(tmp_path, config), state)


def test_quantized_checkpoint_is_dequantized_per_row(tmp_path):
    config = tiny_config(quant=True)
    gen = torch.Generator().manual_seed(1)
    saved, want = {}, {}
    for key, shape in parameter_shapes(config).items():
        if len(shape) == 2:
            q = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
            scaler = torch.rand(shape[0], generator=gen) + 0.01
            saved[key], saved[key + "_scaler"] = q, scaler
            want[key] = q.float() * scaler[:, None]
        else:
            saved[key] = want[key] = torch.randn(shape, generator=gen)
    torch.save({"model_state_dict": saved}, tmp_path / "q.ckpt")
    assert_same_state(load_checkpoint(tmp_path / "q.ckpt", config), want)
    # The same file without quant=True: the scalers are unexpected, and the error says why.
    with pytest.raises(WeightsError, match=r"(?s)embedder\.weight_scaler.*quant=True"):
        load_checkpoint(tmp_path / "q.ckpt", dataclasses.replace(config, quant=False))


def test_quantized_config_needs_scalers(tmp_path, config, state):
    torch.save({"model_state_dict": state}, tmp_path / "f.ckpt")
    with pytest.raises(WeightsError, match=r"missing keys .*embedder\.weight_scaler"):
        load_checkpoint(tmp_path / "f.ckpt", dataclasses.replace(config, quant=True))


def _save(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "bad.ckpt"
    torch.save({"model_state_dict": state}, path)
    return path


def test_missing_keys_are_all_named(tmp_path, config, state):
    broken = dict(state)
    del broken["model.layers.1.mlp.up_proj.weight"], broken["model.norm.weight"]
    with pytest.raises(WeightsError) as err:
        load_checkpoint(_save(tmp_path, broken), config)
    message = str(err.value)
    assert "missing keys (2)" in message
    assert "model.layers.1.mlp.up_proj.weight (expected shape (128, 64))" in message
    assert "model.norm.weight (expected shape (64,))" in message
    assert "--variant" in message and str(tmp_path / "bad.ckpt") in message


def test_unexpected_key_is_named(tmp_path, config, state):
    broken = dict(state, **{"model.layers.2.mlp.up_proj.weight": torch.zeros(128, 64)})
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): model\.layers\.2\.mlp\.up_proj"
                                           r"\.weight \(shape \(128, 64\)\)"):
        load_checkpoint(_save(tmp_path, broken), config)


def test_wrong_shape_names_expected_and_found(tmp_path, config, state):
    broken = dict(state, **{"embedder.weight": torch.zeros(VOCAB + 1, 64)})
    with pytest.raises(WeightsError, match=r"wrong shapes \(1\): embedder\.weight: expected "
                                           r"\(300, 64\), found \(301, 64\)"):
        load_checkpoint(_save(tmp_path, broken), config)


def test_wrong_variant_is_refused(tmp_path, config, state):
    """A checkpoint for another variant fails as a whole rather than half-loading."""
    with pytest.raises(WeightsError, match="wrong shapes"):
        load_checkpoint(_save(tmp_path, state), dataclasses.replace(config, hidden_size=32))


def test_dict_without_model_state_dict(tmp_path, config, state):
    path = tmp_path / "other.ckpt"
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, path)
    with pytest.raises(WeightsError, match=r"has no 'model_state_dict' \(top-level keys: "
                                           r"\['epoch', 'optimizer'\]\)"):
        load_checkpoint(path, config)


def test_not_a_checkpoint(tmp_path, config):
    path = tmp_path / "notes.ckpt"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(WeightsError, match=rf"{path} is not a loadable torch checkpoint"):
        load_checkpoint(path, config)


def test_missing_file(tmp_path, config):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nope.ckpt'} does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt", config)


def test_directory_without_index_or_with_missing_shard(tmp_path, config):
    with pytest.raises(WeightsError, match=rf"{tmp_path} is a directory without "
                                           rf"pytorch_model\.bin\.index\.json"):
        load_checkpoint(tmp_path, config)
    (tmp_path / weights.INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "shard.bin"}}))
    with pytest.raises(WeightsError, match=r"names shard 'shard\.bin'.*does not exist"):
        load_checkpoint(tmp_path, config)


# --- synthetic GGUF files (llama.cpp conventions) ------------------------------------------------
GGUF_ARCH = {Architecture.GEMMA_1: "gemma", Architecture.GEMMA_2: "gemma2",
             Architecture.GEMMA_3: "gemma3"}


def tokens() -> list[str]:
    return ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"tok{i}" for i in range(VOCAB - 4)]


def write_gguf(path: Path, config: GemmaConfig, state: dict[str, torch.Tensor], *,
               drop: tuple[str, ...] = (), quantize_embedding: bool = False) -> None:
    """Writes `state` the way llama.cpp's converter does: norms as 1 + w, q/k/v separate."""
    arch = GGUF_ARCH[config.architecture]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.sliding_window_size is not None:
        writer.add_sliding_window(config.sliding_window_size)
    if config.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if config.rope_wave_length:
        writer.add_rope_freq_base(config.rope_wave_length[AttentionType.GLOBAL])
    add_vocabulary(writer, tokens(), [0.0] * VOCAB, [3] * 4 + [1] * (VOCAB - 4), bos=2,
                   add_bos=True)
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    for gguf_name, key in weights.gguf_tensor_names(config).items():
        if gguf_name in drop:
            continue
        value = state[key]
        part = gguf_name.split(".")[-2]
        if part in ("attn_q", "attn_k", "attn_v"):
            value = dict(zip(("attn_q", "attn_k", "attn_v"),
                             value.split([q_size, kv_size, kv_size]), strict=True))[part]
        if gguf_name.endswith("norm.weight"):
            value = value + 1.0
        array = value.numpy().astype(np.float32)
        if quantize_embedding and gguf_name == "token_embd.weight":
            packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, array)
    finish(writer)


@pytest.mark.parametrize("arch", list(GGUF_ARCH), ids=lambda a: a.name)
def test_gguf_round_trip(tmp_path, arch):
    config = tiny_config(arch)
    state = random_state(config, seed=2)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, config, state)
    model = read_gguf(path)
    assert model.config == config
    # Norms come back exactly (the +1 is undone), q/k/v are fused back in upstream's order.
    assert_same_state(model.state, state)
    assert model.metadata["general.architecture"] == GGUF_ARCH[arch]
    assert model.metadata["tokenizer.ggml.tokens"] == tokens()
    assert model.metadata["tokenizer.ggml.bos_token_id"] == 2
    assert model.sha256 == weights.file_sha256(path)


def test_gguf_quantized_tensor_is_dequantized_in_torch_order(tmp_path, config, state):
    path = tmp_path / "q8.gguf"
    write_gguf(path, config, state, quantize_embedding=True)
    loaded = read_gguf(path).state["embedder.weight"]
    array = state["embedder.weight"].numpy()
    packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
    want = torch.from_numpy(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0))
    assert loaded.shape == (VOCAB, 64)
    assert torch.equal(loaded, want)
    assert not torch.equal(loaded, state["embedder.weight"])  # Q8_0 really was applied


def test_gguf_metadata_builds_the_270m_config():
    """The metadata keys of the real 270M file (as read from it) give the 270m variant."""
    meta = {"general.architecture": "gemma3", "gemma3.context_length": 32768,
            "gemma3.embedding_length": 640, "gemma3.block_count": 18,
            "gemma3.feed_forward_length": 2048, "gemma3.attention.head_count": 4,
            "gemma3.attention.layer_norm_rms_epsilon": float(np.float32(1e-6)),
            "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
            "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 512,
            "gemma3.attention.head_count_kv": 1, "tokenizer.ggml.tokens": [""] * 262144}
    got = weights.config_from_gguf_metadata(meta, Path("x.gguf"))
    assert got == dataclasses.replace(get_model_config("270m", "float32"), tokenizer=None)


def test_gguf_missing_tensor_is_named(tmp_path, config, state):
    path = tmp_path / "missing.gguf"
    write_gguf(path, config, state, drop=("blk.1.ffn_up.weight", "blk.0.attn_k.weight"))
    with pytest.raises(WeightsError, match=r"missing tensors \(2\): blk\.0\.attn_k\.weight, "
                                           r"blk\.1\.ffn_up\.weight"):
        read_gguf(path)


def test_gguf_wrong_shape_is_named(tmp_path, config, state):
    path = tmp_path / "shape.gguf"
    bad = dict(state, **{"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 96)})
    write_gguf(path, config, bad)
    with pytest.raises(WeightsError, match=r"blk\.0\.ffn_down\.weight: expected \(64, 128\), "
                                           r"found \(64, 96\)"):
        read_gguf(path)


def test_gguf_unsupported_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(tokens())
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, 8), dtype=np.float32))
    finish(writer)
    with pytest.raises(WeightsError, match=r"architecture 'llama' is not supported; supported: "
                                           r"gemma, gemma2, gemma3"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [0.3, 0.999], ids=["header", "tensor-data"])
def test_truncated_gguf(tmp_path, config, state, keep):
    path = tmp_path / "full.gguf"
    write_gguf(path, config, state)
    data = path.read_bytes()
    short = tmp_path / "short.gguf"
    short.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(WeightsError, match=rf"{short}.*(truncated|corrupt)"):
        read_gguf(short)
    with pytest.raises(WeightsError, match=rf"{short}"):
        load_gguf(short, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.safetensors"))


def test_corrupt_gguf_values(tmp_path, config, state):
    path = tmp_path / "nan.gguf"
    write_gguf(path, config, dict(state, **{"model.norm.weight": torch.full((64,), float("nan"))}))
    with pytest.raises(WeightsError, match=r"output_norm\.weight holds NaN/Inf"):
        read_gguf(path)


def test_not_a_gguf(tmp_path, config, state):
    path = tmp_path / "model.gguf"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(WeightsError, match=rf"{path} is not a GGUF file: it starts with b'PK"):
        read_gguf(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_gguf(tmp_path / "absent.gguf")


# --- the dequantized cache -----------------------------------------------------------------------
@pytest.fixture
def tiny_gguf(tmp_path, config, state) -> Path:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, config, state)
    return path


def _forbid_reading(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the GGUF was read again instead of the cache")
    monkeypatch.setattr(weights.cache, "read_gguf", fail)


def test_cache_second_load_hits_cache(tmp_path, tiny_gguf, config, state, monkeypatch):
    cache = tmp_path / "cache"
    first = load_gguf(tiny_gguf, cache_dir=cache)
    files = list(cache.glob("*.safetensors"))
    assert [f.name for f in files] == [f"{first.sha256}.safetensors"]
    assert not list(cache.glob("*.tmp"))  # the temp file was renamed, not left behind
    _forbid_reading(monkeypatch)
    second = load_gguf(tiny_gguf, cache_dir=cache)
    assert isinstance(second, GGUFModel)
    assert second.config == first.config == config
    assert second.metadata == first.metadata
    assert second.sha256 == first.sha256
    assert_same_state(second.state, state)


def test_cache_default_dir_from_env(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "envcache"))
    model = load_gguf(tiny_gguf)
    assert (tmp_path / "envcache" / f"{model.sha256}.safetensors").is_file()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-file"])
def test_corrupt_cache_is_rebuilt(tmp_path, tiny_gguf, state, damage):
    cache = tmp_path / "cache"
    sha = load_gguf(tiny_gguf, cache_dir=cache).sha256
    file = cache / f"{sha}.safetensors"
    if damage == "garbage":
        file.write_bytes(b"\x00" * 64)
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[:-100])
    else:  # a valid cache file of some other GGUF under this name
        other = tmp_path / "other.gguf"
        write_gguf(other, tiny_config(), random_state(tiny_config(), seed=9))
        os.replace(cache / f"{load_gguf(other, cache_dir=cache).sha256}.safetensors", file)
    expect_warning = damage != "other-file"  # a stale file for another sha is skipped quietly
    with pytest.warns(UserWarning, match="rebuilding") if expect_warning else nullcontext():
        rebuilt = load_gguf(tiny_gguf, cache_dir=cache)
    assert_same_state(rebuilt.state, state)
    assert weights.cache._read_cache(file, sha, tiny_gguf) is not None  # the file was rewritten


def test_killed_build_leaves_no_cache_entry(tmp_path, tiny_gguf, state):
    """A process killed between writing and renaming leaves only a temp file, never a cache
    entry; the next load ignores it, rebuilds, and removes the stale temp file."""
    cache = tmp_path / "cache"
    script = ("import os, sys\nfrom fuzz.engine import weights\n"
              "os.replace = lambda *args: os._exit(3)\n"
              "weights.load_gguf(sys.argv[1], cache_dir=sys.argv[2])\n")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_gguf), str(cache)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert not list(cache.glob("*.safetensors"))
    assert len(list(cache.glob(".*.tmp"))) == 1
    model = load_gguf(tiny_gguf, cache_dir=cache)
    assert_same_state(model.state, state)
    assert not list(cache.glob(".*.tmp"))
    assert (cache / f"{model.sha256}.safetensors").is_file()


def test_unwritable_cache_still_loads(tmp_path, tiny_gguf, state):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    with pytest.warns(UserWarning, match="not usable|could not write"):
        model = load_gguf(tiny_gguf, cache_dir=blocker / "cache")
    assert_same_state(model.state, state)


# --- the real Gemma 3 270M file ------------------------------------------------------------------
@pytest.mark.real_weights
def test_real_270m_gguf(real_gguf):
    want = get_model_config("270m", "float32")
    assert real_gguf.config == dataclasses.replace(want, tokenizer=None)
    assert list(real_gguf.state) == list(parameter_shapes(want))
    assert sum(v.numel() for v in real_gguf.state.values()) == 268_098_176
    assert len(real_gguf.metadata["tokenizer.ggml.tokens"]) == 262_144


@pytest.mark.real_weights
def test_real_270m_norms_had_one_subtracted(real_gguf):
    """The original checkpoint is bfloat16, so a correctly recovered norm weight w is exactly a
    bfloat16 number; llama.cpp's stored 1 + w often is not (measured: 50-92% per norm kind)."""
    norms = torch.cat([v for k, v in real_gguf.state.items() if k.endswith("norm.weight")])
    assert torch.equal(norms.to(torch.bfloat16).float(), norms)
    stored = norms + 1.0
    assert (stored.to(torch.bfloat16).float() != stored).float().mean() > 0.1
    for kind in ("query_norm", "key_norm"):  # the q/k norms follow the same convention
        w = torch.cat([v for k, v in real_gguf.state.items() if kind in k])
        assert torch.equal(w.to(torch.bfloat16).float(), w)
