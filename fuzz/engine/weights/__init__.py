"""Weight loaders: gemma_pytorch checkpoints, safetensors, llama.cpp GGUF (+ a dequantized cache).

Every loader returns a float32 state dict whose keys are exactly those of
`fuzz.engine.model.parameter_shapes(config)` (upstream gemma_pytorch names). Loading is strict:
any missing key, unexpected key or wrong shape is a `WeightsError` that names every offending key
(upstream's `strict=False` would leave it an uninitialised `torch.empty`).

- `strict`: WeightsError, check_state_dict, int8 dequantization (upstream's quantized layers);
- `checkpoint`: gemma_pytorch `.ckpt`/`.pt` files, sharded directories, safetensors; build_model;
- `gguf_file`: llama.cpp GGUF files (their conventions are in its docstring): read_gguf, and the
  one GGUF metadata reader (open_gguf_reader, gguf_field_value) the tokenizer uses too;
- `cache`: load_gguf, read_gguf behind a float32 safetensors cache keyed by the GGUF's sha256;
- `hf` and `hf_config`: Hugging Face directories (config.json + safetensors), read_hf
  (fuzz.engine.hf_dir adds the tokenizer and makes the LoadedModel).
"""
from __future__ import annotations

from fuzz.engine.weights.cache import CACHE_ENV, CACHE_FORMAT, default_cache_dir, load_gguf
from fuzz.engine.weights.checkpoint import INDEX_FILE, ROPE_BUFFERS, build_model, load_checkpoint
from fuzz.engine.weights.gguf_file import (
    GGUF_MAGIC,
    SUPPORTED_GGUF_ARCHITECTURES,
    GGUFModel,
    config_from_gguf_metadata,
    file_sha256,
    gguf_field_value,
    gguf_tensor_names,
    open_gguf_reader,
    read_gguf,
)
from fuzz.engine.weights.strict import (
    SCALER_SUFFIX,
    WeightsError,
    check_state_dict,
    dequantize_int8,
)

__all__ = [
    "CACHE_ENV",
    "CACHE_FORMAT",
    "GGUF_MAGIC",
    "INDEX_FILE",
    "ROPE_BUFFERS",
    "SCALER_SUFFIX",
    "SUPPORTED_GGUF_ARCHITECTURES",
    "GGUFModel",
    "WeightsError",
    "build_model",
    "check_state_dict",
    "config_from_gguf_metadata",
    "default_cache_dir",
    "dequantize_int8",
    "file_sha256",
    "gguf_field_value",
    "gguf_tensor_names",
    "load_checkpoint",
    "load_gguf",
    "open_gguf_reader",
    "read_gguf",
]
