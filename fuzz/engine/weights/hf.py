"""Hugging Face model directories: `config.json` + safetensors (one file or a sharded index).

The config is read by `hf_config` (model_type gemma, gemma2, gemma3_text, and the text part of
gemma3). Tensor names are mapped to upstream's, which the built-in engine uses:
- `model.embed_tokens` -> `embedder` (the LM head is tied: a stored `lm_head.weight` must equal
  the embedding, or the engine would silently compute another model);
- `self_attn.{q,k,v}_proj` are fused into upstream's `qkv_proj`, rows [q; k; v] (the GGUF loader
  fuses the same way); the MLP's gate/up/down and o_proj keep their names (upstream does not fuse
  gate and up);
- `q_norm`/`k_norm` -> `query_norm`/`key_norm`. Every RMSNorm weight is stored as w and applied
  as (1 + w), as upstream stores it, so no offset is added (a GGUF stores 1 + w: its loader
  subtracts 1); the real 270M converted to an HF directory loads to exactly the GGUF's weights.
- gemma3 (multimodal) checkpoints keep the language model under `language_model.model.` (the
  Hub's layout, which transformers 5 still writes) or `model.language_model.`; the vision tower
  and the projector are left out.
Loading is strict: missing, unexpected and mis-shaped tensors are named, with the HF names.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fuzz.engine.config import GemmaConfig
from fuzz.engine.model import parameter_shapes
from fuzz.engine.weights.checkpoint import read_safetensors
from fuzz.engine.weights.hf_config import config_from_hf
from fuzz.engine.weights.strict import (
    WeightsError,
    check_state_dict,
    config_summary,
    mismatch_report,
)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"
# Where each layout keeps the language model, and its LM head.
_TEXT_PREFIXES = {"gemma3": ("language_model.model.", "model.language_model.")}
_HEADS = {"gemma3": ("language_model.lm_head.weight", LM_HEAD)}
# The vision half of a gemma3 checkpoint: not part of the text model under test.
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")
_RENAMES = {"self_attn.query_norm": "self_attn.q_norm", "self_attn.key_norm": "self_attn.k_norm"}
_QKV = ("q_proj", "k_proj", "v_proj")


@dataclasses.dataclass
class HFModel:
    """An HF directory read into upstream form: the config, float32 weights, the model_type."""

    config: GemmaConfig
    state: dict[str, torch.Tensor]
    model_type: str
    path: Path


def is_hf_dir(path: str | os.PathLike[str]) -> bool:
    """A directory with a `config.json`: how a model SPEC is recognised as an HF checkpoint."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def read_hf_config(directory: str | os.PathLike[str]) -> tuple[GemmaConfig, dict[str, Any]]:
    """(GemmaConfig, the raw config.json object) of an HF directory."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: an HF model directory needs its "
                                "config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} must hold a JSON object (a transformers config)")
    return config_from_hf(data, str(path)), data


def read_hf(directory: str | os.PathLike[str]) -> HFModel:
    """Reads an HF Gemma directory strictly into upstream names, as float32."""
    directory = Path(directory)
    config, data = read_hf_config(directory)
    model_type = data["model_type"]
    raw = read_safetensors_dir(directory)
    state = hf_to_upstream(raw, config, model_type, str(directory))
    return HFModel(config, state, model_type, directory)


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """`model.safetensors`, or every shard `model.safetensors.index.json` names (each shard
    must hold exactly the tensors the index assigns to it)."""
    index, single = directory / SAFETENSORS_INDEX, directory / SAFETENSORS_FILE
    if index.is_file():
        return _read_sharded(index)
    if single.is_file():
        return read_safetensors(single)
    others = sorted(p.name for p in directory.glob("*.bin"))
    hint = (f" (found {', '.join(others)}: re-save it with save_pretrained, which writes "
            "safetensors)" if others else "")
    raise WeightsError(f"{directory}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}{hint}")


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise WeightsError(f"{index}: not a valid index (needs a 'weight_map' object of tensor "
                           f"name -> shard file): {err!r}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = index.parent / shard
        if not path.is_file():
            raise WeightsError(f"{index} names shard {shard!r}, but {path} does not exist")
        tensors = read_safetensors(path)
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(tensors) != listed:
            missing, extra = sorted(listed - set(tensors)), sorted(set(tensors) - listed)
            raise WeightsError(f"{path} does not hold what {index.name} says: missing "
                               f"{missing[:10]}, not in the index {extra[:10]}")
        state.update(tensors)
    return state


def expected_hf_shapes(config: GemmaConfig, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for every tensor the config needs (the LM head aside)."""
    shapes = parameter_shapes(config)
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if key == "embedder.weight":
            out[prefix + "embed_tokens.weight"] = shape
            continue
        local = key[len("model."):]
        if local.endswith("qkv_proj.weight"):
            stem = local[: -len("qkv_proj.weight")]
            for part, rows in zip(_QKV, (q, kv, kv)):
                out[f"{prefix}{stem}{part}.weight"] = (rows, shape[1])
            continue
        for ours, theirs in _RENAMES.items():
            local = local.replace(ours, theirs)
        out[prefix + local] = shape
    return out


def hf_to_upstream(raw: Mapping[str, torch.Tensor], config: GemmaConfig, model_type: str,
                   source: str) -> dict[str, torch.Tensor]:
    """HF names -> upstream names, strictly (see the module docstring); float32."""
    prefix = _text_prefix(raw, model_type)
    heads = _HEADS.get(model_type, (LM_HEAD,))
    text = {k: v for k, v in raw.items() if not k.startswith(_VISION_PREFIXES)}
    head = {k: text.pop(k) for k in heads if k in text}
    expected = expected_hf_shapes(config, prefix)
    lines = mismatch_report(text, expected)
    if lines:
        raise WeightsError(
            f"{source}: the tensors do not match its config.json ({config_summary(config)}):\n  "
            + "\n  ".join(lines) + "\nThe checkpoint is incomplete, or its config.json is not the "
            "one it was saved with.")
    not_float = [f"{k} ({v.dtype})" for k, v in text.items() if not v.is_floating_point()]
    if not_float:
        raise WeightsError(f"{source}: non-floating-point tensors {', '.join(not_float[:10])}; "
                           "give the float (bfloat16/float16/float32) checkpoint")
    embedding = text[prefix + "embed_tokens.weight"]
    for name, value in head.items():
        _check_tied(name, value, embedding, source)
    return check_state_dict(_rename(text, config, prefix), config, source=source)


def _text_prefix(raw: Mapping[str, torch.Tensor], model_type: str) -> str:
    for prefix in _TEXT_PREFIXES.get(model_type, ()):
        if any(k.startswith(prefix) for k in raw):
            return prefix
    return "model."


def _check_tied(name: str, head: torch.Tensor, embedding: torch.Tensor, source: str) -> None:
    """transformers may save the tied head as its own tensor; the engine ties it to the
    embedding, so any other head would be a different model."""
    if head.shape != embedding.shape or not torch.equal(head.float(), embedding.float()):
        raise WeightsError(f"{source}: {name} differs from the token embedding, but the "
                           "built-in engine's LM head is tied to it (as Gemma's is); an untied "
                           "head cannot be run")


def _rename(text: Mapping[str, torch.Tensor], config: GemmaConfig,
            prefix: str) -> dict[str, torch.Tensor]:
    state = {"embedder.weight": text[prefix + "embed_tokens.weight"]}
    reverse = {theirs: ours for ours, theirs in _RENAMES.items()}
    for key, value in text.items():
        local = key[len(prefix):]
        if local == "embed_tokens.weight" or local.split(".")[-2] in _QKV:
            continue
        for theirs, ours in reverse.items():
            local = local.replace(theirs, ours)
        state["model." + local] = value
    for layer in range(config.num_hidden_layers):
        # Upstream's fused rows are [q; k; v] (its forward splits [q, kv, kv] sizes).
        stem = f"{prefix}layers.{layer}.self_attn."
        state[f"model.layers.{layer}.self_attn.qkv_proj.weight"] = torch.cat(
            [text[stem + part + ".weight"].float() for part in _QKV], dim=0)
    return state
