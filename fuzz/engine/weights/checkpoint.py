"""gemma_pytorch checkpoints: `.ckpt`/`.pt` files, sharded directories, safetensors; build_model.

Files are read as upstream writes them (`torch.save({'model_state_dict': ...})`, or a directory
whose `pytorch_model.bin.index.json` names the shards), then checked strictly (see `strict`).
"""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fuzz.engine.config import GemmaConfig
from fuzz.engine.interface import FAITHFUL, Numerics
from fuzz.engine.model import GemmaForCausalLM, materialize
from fuzz.engine.weights.gguf_file import GGUF_MAGIC
from fuzz.engine.weights.strict import WeightsError, check_state_dict, dequantize_int8

INDEX_FILE = "pytorch_model.bin.index.json"
# Upstream registers its RoPE tables as (persistent) buffers, so they can appear in a saved
# `model_state_dict`; they are recomputed here, never loaded.
ROPE_BUFFERS = frozenset({"freqs_cis", "local_freqs_cis", "global_freqs_cis"})


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only (as upstream); mmap only for the zip format, which needs it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True,
                          mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        with open(path, "rb") as f:
            is_gguf = f.read(4) == GGUF_MAGIC
        hint = " (it is a GGUF file: load it with load_gguf)" if is_gguf else ""
        raise WeightsError(
            f"{path} is not a loadable torch checkpoint ({type(err).__name__}: {err}); "
            f"expected a gemma_pytorch .ckpt/.pt file saved with torch.save{hint}"
        ) from None


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Upstream saves {'model_state_dict': ...}; a bare state dict (all tensors) is accepted too."""
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    elif isinstance(obj, Mapping) and obj and not all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"{path}: checkpoint has no 'model_state_dict' (top-level keys: "
            f"{sorted(map(str, obj))}); gemma_pytorch checkpoints are "
            f"torch.save({{'model_state_dict': model.state_dict()}})")
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise WeightsError(f"{path}: expected a state dict of name -> tensor, found "
                           f"{type(obj).__name__}")
    if not obj:
        raise WeightsError(f"{path}: the state dict is empty")
    return dict(obj)


def _read_sharded(directory: Path) -> dict[str, torch.Tensor]:
    """Upstream's directory form: pytorch_model.bin.index.json whose weight_map names the shards."""
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise WeightsError(f"{directory} is a directory without {INDEX_FILE}; give a checkpoint "
                           f"file (.ckpt/.pt/.safetensors) or a directory with that index")
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise WeightsError(f"{index_path}: not a valid index (needs a 'weight_map' object of "
                           f"parameter name -> shard file): {err!r}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = directory / shard
        if not shard_path.is_file():
            raise WeightsError(f"{index_path} names shard {shard!r}, but {shard_path} does not "
                               f"exist")
        state.update(_as_state_dict(_torch_load(shard_path), shard_path))
    return state


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path} is not a loadable safetensors file: {err}") from None


def load_checkpoint(path: str | os.PathLike[str], config: GemmaConfig) -> dict[str, torch.Tensor]:
    """Loads a gemma_pytorch checkpoint strictly, as float32 with upstream parameter names.

    `path`: a `.ckpt`/`.pt` file (`{'model_state_dict': ...}` or a bare state dict), a
    `.safetensors` file with upstream names, or a directory with `pytorch_model.bin.index.json`.
    With `config.quant`, int8 weights are dequantized with their per-row `weight_scaler`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; give a gemma_pytorch "
                                f".ckpt/.pt file or a directory with {INDEX_FILE}")
    if path.is_dir():
        raw = _read_sharded(path)
    elif path.suffix == ".safetensors":
        raw = read_safetensors(path)
    else:
        raw = _as_state_dict(_torch_load(path), path)
    raw = {k: v for k, v in raw.items() if k not in ROPE_BUFFERS}
    if config.quant:
        raw = dequantize_int8(raw, config, str(path))
    return check_state_dict(raw, config, source=str(path))


def build_model(config: GemmaConfig, state: Mapping[str, torch.Tensor], dtype: torch.dtype,
                numerics: Numerics = FAITHFUL,
                device: torch.device | str = "cpu") -> GemmaForCausalLM:
    """Checks `state` strictly, then builds the model in `dtype` (see model.materialize)."""
    return materialize(config, check_state_dict(state, config), dtype, numerics, device)
