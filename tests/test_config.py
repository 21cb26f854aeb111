"""GemmaConfig: upstream field names and variants, JSON round trip, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from fuzz.engine.config import (
    VARIANTS,
    Architecture,
    AttentionType,
    GemmaConfig,
    get_model_config,
    parse_dtype,
)


def test_every_upstream_text_variant_and_270m_exist():
    assert set(VARIANTS) == {"2b", "7b", "2b-v2", "9b", "27b", "1b", "4b", "12b", "27b_v3",
                             "270m"}


@pytest.mark.parametrize("variant, layers, heads, kv, hidden, mlp", [
    ("2b", 18, 8, 1, 2048, 16384), ("7b", 28, 16, 16, 3072, 24576),
    ("2b-v2", 26, 8, 4, 2304, 9216), ("9b", 42, 16, 8, 3584, 14336),
    ("27b", 46, 32, 16, 4608, 36864), ("1b", 26, 4, 1, 1152, 6912),
    ("270m", 18, 4, 1, 640, 2048),
])
def test_variant_shapes_match_upstream(variant, layers, heads, kv, hidden, mlp):
    c = get_model_config(variant)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size,
            c.intermediate_size) == (layers, heads, kv, hidden, mlp)


def test_gemma3_270m_details():
    c = get_model_config("270m", "float16")
    assert c.architecture == Architecture.GEMMA_3 and c.get_dtype() == torch.float16
    assert c.head_dim == 256 and c.query_pre_attn_scalar == 256 and c.sliding_window_size == 512
    assert [c.attn_type(i) for i in range(6)] == [AttentionType.LOCAL_SLIDING] * 5 + [
        AttentionType.GLOBAL]
    assert c.rope_theta(AttentionType.LOCAL_SLIDING) == 10_000
    assert c.rope_theta(AttentionType.GLOBAL) == 1_000_000


def test_gemma2_softcaps_and_27b_query_scalar():
    c = get_model_config("27b")
    assert (c.final_logit_softcapping, c.attn_logit_softcapping) == (30.0, 50.0)
    assert (c.head_dim, c.query_pre_attn_scalar, c.sliding_window_size) == (128, 144, 4096)


def test_json_round_trip_with_upstream_field_names(tmp_path):
    c = get_model_config("1b", "bfloat16")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(c.to_dict()))
    assert json.loads(path.read_text())["attn_types"][:2] == ["LOCAL_SLIDING", "LOCAL_SLIDING"]
    assert GemmaConfig.from_json(path) == c


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown variant '3b'; valid variants are: 7b, 2b"):
        get_model_config("3b")


def test_unknown_dtype_is_an_error_not_none():
    with pytest.raises(ValueError, match=r"unknown dtype 'fp16'; valid dtypes are: .*float16"):
        parse_dtype("fp16")
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        GemmaConfig(dtype="half")


def test_unknown_field_in_json_names_it(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"num_layers": 4}))
    message = r"bad.json: unknown GemmaConfig field\(s\) \['num_layers'\]"
    with pytest.raises(ValueError, match=message):
        GemmaConfig.from_json(path)


def test_bad_enum_and_bad_json_are_named(tmp_path):
    with pytest.raises(ValueError, match="'GEMMA_9' is not a valid Architecture"):
        GemmaConfig.from_dict({"architecture": "GEMMA_9"})
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        GemmaConfig.from_json(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GemmaConfig.from_json(tmp_path / "missing.json")


def test_gemma3_without_rope_wave_length_is_refused():
    with pytest.raises(ValueError, match="rope_wave_length"):
        GemmaConfig(architecture=Architecture.GEMMA_3)
