"""Weight loaders: gemma_pytorch checkpoints, safetensors, llama.cpp GGUF (+ a dequantized cache).

Every loader returns a float32 state dict whose keys are exactly those of
`fuzz.engine.model.parameter_shapes(config)` (upstream gemma_pytorch names). Loading is strict:
upstream loads with `strict=False`, so a missing key silently stays an uninitialised `torch.empty`
(NUMERICS.md); here any missing key, unexpected key or wrong shape is a `WeightsError` that names
every offending key.

GGUF conventions (llama.cpp's convert_hf_to_gguf.py, checked on the Gemma 3 270M file):
- tensor shapes are stored in ggml `ne` order, i.e. reversed with respect to torch;
- every RMSNorm weight (q/k norms included) was stored as `1 + w`: on the 270M file, `stored - 1`
  is exactly a bfloat16 number for 100% of the norm elements (the original checkpoint's dtype)
  while only 50-92% of the stored values are, so 1 is subtracted at load time;
- `attn_q`/`attn_k` rows are NOT permuted for Gemma (llama.cpp permutes them only for llama-style
  archs); the transformers parity test and transformers' own GGUF mapping confirm the plain order;
- `token_embd` is also the LM head (tied), as upstream.

Reading the 270M Q4_K_M file cold takes ~30 s on 2 busy cores (gguf's GGUFReader parses the
262144-entry token arrays one element at a time: 12-25 s; dequantizing: ~12 s). `load_gguf` caches
the float32 state (1.08 GB) as a safetensors file keyed by the GGUF's sha256: a cached load takes
~0.5-0.9 s, most of it hashing the 253 MB GGUF.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Architecture, AttentionType, GemmaConfig
from .model import FAITHFUL, GemmaForCausalLM, Numerics, materialize, parameter_shapes

INDEX_FILE = "pytorch_model.bin.index.json"
# Upstream registers its RoPE tables as (persistent) buffers, so they can appear in a saved
# `model_state_dict`; they are recomputed here, never loaded.
ROPE_BUFFERS = frozenset({"freqs_cis", "local_freqs_cis", "global_freqs_cis"})
SCALER_SUFFIX = "_scaler"
CACHE_ENV = "GEMMA_FUZZ_CACHE"
# Bump when the cache layout or the GGUF mapping changes: older cache files are then rebuilt.
CACHE_FORMAT = "gemma-fuzz-gguf-cache-1"
GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


class WeightsError(ValueError):
    """Weights that cannot be used with the given config, or a file that is not loadable."""


# --- strict state checking ---------------------------------------------------------------------
def _config_summary(config: GemmaConfig) -> str:
    return (f"architecture {config.architecture.name}, {config.num_hidden_layers} layers, "
            f"hidden {config.hidden_size}, heads {config.num_attention_heads}/"
            f"{config.num_key_value_heads}, head_dim {config.head_dim}, "
            f"mlp {config.intermediate_size}, vocab {config.vocab_size}, quant {config.quant}")


def _mismatch_report(state: Mapping[str, torch.Tensor],
                     expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """One line per problem kind, naming every offending key."""
    missing = [k for k in expected if k not in state]
    unexpected = sorted(k for k in state if k not in expected)
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    lines = []
    if missing:
        lines.append(f"missing keys ({len(missing)}): " + ", ".join(
            f"{k} (expected shape {expected[k]})" for k in missing))
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(
            f"{k} (shape {tuple(state[k].shape)})" for k in unexpected))
    if wrong:
        lines.append(f"wrong shapes ({len(wrong)}): " + ", ".join(
            f"{k}: expected {expected[k]}, found {tuple(state[k].shape)}" for k in wrong))
    return lines


def _raise_mismatch(lines: list[str], config: GemmaConfig, source: str, hint: str = "") -> None:
    raise WeightsError(
        f"{source}: the weights do not match the config ({_config_summary(config)}):\n  "
        + "\n  ".join(lines)
        + "\nCheck that the variant (--variant) or config file (--config) is the one these "
          "weights were trained with (layers, hidden size, heads, vocab, quant)." + hint
    )


def check_state_dict(state: Mapping[str, torch.Tensor], config: GemmaConfig,
                     source: str = "state dict") -> dict[str, torch.Tensor]:
    """Checks keys and shapes against the config; returns the tensors as contiguous float32 (no
    copy where they already are), in the model's parameter order. Raises WeightsError naming
    every missing, unexpected or mis-shaped key."""
    expected = parameter_shapes(config)
    lines = _mismatch_report(state, expected)
    if lines:
        hint = ""
        if any(k.endswith(SCALER_SUFFIX) for k in state) and not config.quant:
            hint = (" The checkpoint holds int8 weights with `weight_scaler` keys: it is a "
                    "quantized checkpoint, so use a config with quant=True.")
        _raise_mismatch(lines, config, source, hint)
    not_float = [f"{k} ({state[k].dtype})" for k in expected if not state[k].is_floating_point()]
    if not_float:
        raise WeightsError(
            f"{source}: non-floating-point weights {', '.join(not_float)} in a checkpoint loaded "
            f"with quant=False; an int8 checkpoint needs quant=True and `weight_scaler` keys")
    return {k: state[k].to(torch.float32).contiguous() for k in expected}


def _dequantize_int8(state: dict[str, torch.Tensor], config: GemmaConfig,
                     source: str) -> dict[str, torch.Tensor]:
    """Upstream's quantized Linear/Embedding: int8 `weight` times a per-output-row
    `weight_scaler` (`weight * weight_scaler.unsqueeze(-1)`); norms are never quantized."""
    shapes = parameter_shapes(config)
    expected = dict(shapes)
    expected.update({k + SCALER_SUFFIX: (s[0],) for k, s in shapes.items() if len(s) == 2})
    lines = _mismatch_report(state, expected)
    if lines:
        _raise_mismatch(lines, config, source,
                        " With quant=True every embedding and linear `X.weight` needs an int8 "
                        "`X.weight_scaler` with one scale per output row.")
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        weight = state[key]
        if len(shape) != 2:
            out[key] = weight
            continue
        if weight.dtype != torch.int8:
            raise WeightsError(f"{source}: {key} is {weight.dtype}, but quant=True expects int8 "
                               f"weights; use quant=False for a float checkpoint")
        out[key] = weight.to(torch.float32) * state[key + SCALER_SUFFIX].to(torch.float32)[:, None]
    return out


# --- gemma_pytorch checkpoints -------------------------------------------------------------------
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


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
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
        raw = _read_safetensors(path)
    else:
        raw = _as_state_dict(_torch_load(path), path)
    raw = {k: v for k, v in raw.items() if k not in ROPE_BUFFERS}
    if config.quant:
        raw = _dequantize_int8(raw, config, str(path))
    return check_state_dict(raw, config, source=str(path))


def build_model(config: GemmaConfig, state: Mapping[str, torch.Tensor], dtype: torch.dtype,
                numerics: Numerics = FAITHFUL,
                device: torch.device | str = "cpu") -> GemmaForCausalLM:
    """Checks `state` strictly, then builds the model in `dtype` (see model.materialize)."""
    return materialize(config, check_state_dict(state, config), dtype, numerics, device)


# --- GGUF ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class GGUFModel:
    """A GGUF file read into upstream form.

    `metadata` holds every key-value of the file except the container's own `GGUF.*` header
    fields, as plain Python values (str, int, float, bool, lists of them), e.g.
    `tokenizer.ggml.tokens`, `tokenizer.ggml.scores`, `tokenizer.ggml.token_type`,
    `tokenizer.ggml.bos_token_id`, `tokenizer.ggml.add_bos_token`, `general.architecture`.
    """

    config: GemmaConfig
    state: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    sha256: str
    path: Path | None = None


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _field_value(field: Any, key: str, path: Path) -> Any:
    """A GGUF key-value as plain Python (gguf's ReaderField.contents, done by hand because it
    only exists in recent gguf releases)."""
    from gguf import GGUFValueType

    def text(part: np.ndarray) -> str:
        try:
            return bytes(part).decode("utf-8")
        except UnicodeDecodeError as err:
            raise WeightsError(f"{path}: metadata {key} holds invalid UTF-8 ({err})") from None

    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [text(field.parts[i]) for i in field.data]
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if main == GGUFValueType.STRING:
        return text(field.parts[field.data[0]])
    return field.parts[field.data[0]].tolist()[0]


def _open_gguf(path: Path) -> Any:
    from gguf import GGUFReader
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise WeightsError(f"{path} is not a GGUF file: it starts with {magic!r}, "
                           f"not {GGUF_MAGIC!r}")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # gguf raises ValueError/IndexError/... on short or garbled files
        raise WeightsError(f"{path}: unreadable GGUF, truncated or corrupt "
                           f"({type(err).__name__}: {err}); re-download or re-assemble it"
                           ) from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise WeightsError(f"{path}: truncated, tensor {tensor.name} ends at byte "
                               f"{tensor.data_offset + tensor.n_bytes} but the file has {size}")
    return reader


def _metadata(reader: Any, path: Path) -> dict[str, Any]:
    return {key: _field_value(field, key, path) for key, field in reader.fields.items()
            if not key.startswith("GGUF.")}


def _shortest_float(value: float) -> float:
    """GGUF stores floats as float32: 1e-6 comes back as 9.99999997e-07. The shortest decimal
    that round-trips in float32 restores the intended value (numerics are identical: the model
    adds eps to a float32 tensor)."""
    return float(str(np.float32(value)))


def _require(meta: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise WeightsError(f"{path}: GGUF metadata lacks {key!r}, needed to build the config")
    return meta[key]


# llama.cpp scales queries by 1/sqrt(hidden/heads) instead of 1/sqrt(head_dim) for exactly these
# (architecture, block_count) pairs: Gemma 2 27B and Gemma 3 27B (upstream query_pre_attn_scalar
# 144 = 4608/32 and 168 = 5376/32). GGUF carries no query_pre_attn_scalar key.
_SCALAR_FROM_HIDDEN = {("gemma2", 46), ("gemma3", 62)}


def config_from_gguf_metadata(meta: Mapping[str, Any], path: Path) -> GemmaConfig:
    """Builds upstream's GemmaConfig from `<arch>.*` keys (architecture gemma, gemma2, gemma3)."""
    arch = _require(meta, "general.architecture", path)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise WeightsError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")

    def get(key: str, default: Any = ...) -> Any:
        full = f"{arch}.{key}"
        return _require(meta, full, path) if default is ... else meta.get(full, default)

    layers, hidden, heads = get("block_count"), get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    scalar = hidden // heads if (arch, layers) in _SCALAR_FROM_HIDDEN else head_dim
    common = dict(
        vocab_size=len(_require(meta, "tokenizer.ggml.tokens", path)),
        max_position_embeddings=get("context_length"), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=get("attention.head_count_kv", heads),
        hidden_size=hidden, intermediate_size=get("feed_forward_length"), head_dim=head_dim,
        rms_norm_eps=_shortest_float(get("attention.layer_norm_rms_epsilon")),
        dtype="float32", quant=False,
        tokenizer=None,  # the tokenizer is in the GGUF metadata, not a .model file
    )
    if arch == "gemma":
        return GemmaConfig(architecture=Architecture.GEMMA_1, **common)
    softcaps = {name: (None if get(name, None) is None else _shortest_float(get(name)))
                for name in ("final_logit_softcapping", "attn_logit_softcapping")}
    sandwich = dict(use_pre_ffw_norm=True, use_post_ffw_norm=True, query_pre_attn_scalar=scalar,
                    sliding_window_size=get("attention.sliding_window"), **softcaps)
    if arch == "gemma2":
        pattern = (AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL) * (layers // 2)
        return GemmaConfig(architecture=Architecture.GEMMA_2, attn_types=pattern,
                           **sandwich, **common)
    # Gemma 3: llama.cpp hard-codes the 5-local/1-global pattern and a 10k local RoPE base;
    # only the global base (rope.freq_base) and the global linear RoPE scaling are stored.
    rope = {AttentionType.LOCAL_SLIDING: int(get("rope.freq_base_swa", 10_000.0)),
            AttentionType.GLOBAL: int(get("rope.freq_base", 1_000_000.0))}
    linear = get("rope.scaling.type", None) == "linear"
    scaling = get("rope.scaling.factor", None) if linear else None
    return GemmaConfig(
        architecture=Architecture.GEMMA_3,
        attn_types=(AttentionType.LOCAL_SLIDING,) * 5 + (AttentionType.GLOBAL,),
        rope_wave_length=rope, use_qk_norm=True,
        rope_scaling_factor=None if scaling in (None, 1.0) else int(scaling),
        **sandwich, **common)


# Upstream per-layer name -> llama.cpp's (blk.N.<name>.weight). Gemma 1 has no pre-FFN norm: its
# llama.cpp `ffn_norm` is upstream's post_attention_layernorm (the pre-MLP norm), see below.
_LAYER_NAMES_TO_GGUF = {
    "self_attn.o_proj": "attn_output",
    "self_attn.query_norm": "attn_q_norm",
    "self_attn.key_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_QKV = ("attn_q", "attn_k", "attn_v")


def gguf_tensor_names(config: GemmaConfig) -> dict[str, str]:
    """llama.cpp tensor name -> upstream parameter name, for every tensor the config needs.
    attn_q/attn_k/attn_v all map to the fused upstream qkv_proj."""
    names = {"token_embd.weight": "embedder.weight", "output_norm.weight": "model.norm.weight"}
    shapes = parameter_shapes(config)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for part in _QKV:
            names[f"blk.{layer}.{part}.weight"] = prefix + "self_attn.qkv_proj.weight"
        for key in shapes:
            if not key.startswith(prefix) or key.endswith("qkv_proj.weight"):
                continue
            local = key[len(prefix):-len(".weight")]
            gguf = _LAYER_NAMES_TO_GGUF[local]
            if config.architecture == Architecture.GEMMA_1 and local == "post_attention_layernorm":
                gguf = "ffn_norm"
            names[f"blk.{layer}.{gguf}.weight"] = key
    return names


def _torch_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(reversed([int(d) for d in tensor.shape]))  # ggml `ne` order is reversed


def _expected_gguf_shape(gguf_name: str, upstream: str, config: GemmaConfig,
                         shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    part = gguf_name.split(".")[-2]
    if part in _QKV:
        heads = config.num_attention_heads if part == "attn_q" else config.num_key_value_heads
        return (heads * config.head_dim, config.hidden_size)
    return shapes[upstream]


def _check_gguf_names(reader: Any, config: GemmaConfig, path: Path) -> dict[str, str]:
    """Fails before any dequantization if a tensor is missing, has no Gemma counterpart or has
    the wrong shape."""
    names = gguf_tensor_names(config)
    present = [t.name for t in reader.tensors]
    set_present = set(present)
    missing = [n for n in names if n not in set_present]
    unknown = [n for n in present if n not in names]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if unknown:
        untied = "output.weight" in unknown
        hint = " (an untied LM head: Gemma ties it to token_embd)" if untied else ""
        problems.append(f"tensors with no Gemma counterpart ({len(unknown)}): "
                        f"{', '.join(unknown)}{hint}")
    if not problems:
        shapes = parameter_shapes(config)
        wrong = [f"{t.name}: expected {expected}, found {found}" for t in reader.tensors
                 if (expected := _expected_gguf_shape(t.name, names[t.name], config, shapes))
                 != (found := _torch_shape(t))]
        if wrong:
            problems.append(f"wrong shapes (torch order) ({len(wrong)}): {', '.join(wrong)}")
    if problems:
        raise WeightsError(f"{path}: the GGUF tensors do not match its own metadata "
                           f"({_config_summary(config)}):\n  " + "\n  ".join(problems)
                           + "\nThe file is incomplete or not a Gemma GGUF.")
    return names


def _dequantized(tensor: Any, path: Path) -> torch.Tensor:
    from gguf.quants import dequantize
    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except Exception as err:
        raise WeightsError(f"{path}: cannot dequantize tensor {tensor.name} "
                           f"({tensor.tensor_type.name}): {err}") from None
    # A copy: F32 tensors come back as views of the read-only memory-mapped file.
    out = torch.from_numpy(np.array(array, dtype=np.float32, copy=True)
                           .reshape(_torch_shape(tensor)))
    # aminmax propagates NaN and +-Inf and is ~30x faster than isfinite().all() on 1 GiB.
    if out.numel() and not torch.isfinite(torch.stack(torch.aminmax(out))).all():
        raise WeightsError(f"{path}: tensor {tensor.name} holds NaN/Inf after dequantization; "
                           f"the file is corrupt")
    return out


def _gguf_state(reader: Any, config: GemmaConfig, path: Path) -> dict[str, torch.Tensor]:
    names = _check_gguf_names(reader, config, path)
    state: dict[str, torch.Tensor] = {}
    qkv_parts: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        value = _dequantized(tensor, path)
        if tensor.name.endswith("norm.weight"):
            value -= 1.0  # llama.cpp stored 1 + w (see the module docstring)
        if tensor.name.split(".")[-2] in _QKV:
            qkv_parts[tensor.name] = value
        else:
            state[names[tensor.name]] = value
    for layer in range(config.num_hidden_layers):
        # Upstream's fused qkv_proj rows are [q; k; v] (its forward splits [q, kv, kv] sizes).
        state[f"model.layers.{layer}.self_attn.qkv_proj.weight"] = torch.cat(
            [qkv_parts.pop(f"blk.{layer}.{part}.weight") for part in _QKV], dim=0)
    return check_state_dict(state, config,
                            source=f"{path} (GGUF tensors mapped to upstream names)")


def read_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Reads and dequantizes a llama.cpp GGUF (Gemma 1/2/3) into float32 upstream form.
    No cache: see load_gguf."""
    return _read_gguf(Path(path), None)


def _read_gguf(path: Path, sha256: str | None) -> GGUFModel:
    reader = _open_gguf(path)
    metadata = _metadata(reader, path)
    config = config_from_gguf_metadata(metadata, path)
    state = _gguf_state(reader, config, path)
    return GGUFModel(config=config, state=state, metadata=metadata,
                     sha256=sha256 or file_sha256(path), path=path)


# --- the dequantized cache ----------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gemma-fuzz")


def _cache_file(cache_dir: Path, sha256: str) -> Path:
    return cache_dir / f"{sha256}.safetensors"


def _read_cache(file: Path, sha256: str, path: Path) -> GGUFModel | None:
    """The cached model, or None when the file is absent, stale or corrupt (then it is rebuilt)."""
    from safetensors import safe_open
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != CACHE_FORMAT or header.get("sha256") != sha256:
                return None
            config = GemmaConfig.from_dict(json.loads(header["config"]), source=str(file))
            metadata = json.loads(header["gguf_metadata"])
            state = {key: f.get_tensor(key) for key in f.keys()}
        state = check_state_dict(state, config, source=str(file))
    except Exception as err:  # any failure means the cache cannot be trusted: rebuild it
        warnings.warn(f"ignoring unreadable GGUF cache {file} ({type(err).__name__}: {err}); "
                      f"rebuilding it", stacklevel=3)
        return None
    return GGUFModel(config=config, state=state, metadata=metadata, sha256=sha256, path=path)


def _write_cache(model: GGUFModel, file: Path) -> None:
    """Temp file in the same directory + os.replace: readers see the old file or the whole new
    one, never a partial file, even with concurrent pytest-xdist workers or a killed process."""
    from safetensors.torch import save_file
    header = {"format": CACHE_FORMAT, "sha256": model.sha256,
              "config": json.dumps(model.config.to_dict(), sort_keys=True),
              "gguf_metadata": json.dumps(model.metadata)}
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(model.state, tmp, metadata=header)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared between users
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_stale_temp_files(file: Path) -> None:
    """Temp files of this cache entry left by a killed build (1 GB each). Called under the build
    lock, so no live process is writing one (without fcntl a concurrent build's file may go: its
    os.replace then fails, and that process only warns)."""
    for stale in file.parent.glob(f".{file.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


@contextlib.contextmanager
def _build_lock(lock_path: Path) -> Iterator[None]:
    """Serialises cold builds of one file across processes, so parallel workers dequantize it
    once instead of each spending ~20 s and 1 GiB; the OS drops the lock if a holder dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: builds may run twice, the atomic replace keeps them safe
        yield
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+b")
    except OSError as err:
        warnings.warn(f"GGUF cache directory {lock_path.parent} is not usable ({err}); "
                      f"loading without the cache lock", stacklevel=4)
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_gguf(path: str | os.PathLike[str],
              cache_dir: str | os.PathLike[str] | None = None) -> GGUFModel:
    """read_gguf through a float32 safetensors cache keyed by the GGUF file's sha256.

    cache_dir defaults to $GEMMA_FUZZ_CACHE or ~/.cache/gemma-fuzz. The cache file is
    `<sha256>.safetensors` whose header also holds the config and the GGUF metadata. A cache that
    cannot be written only costs speed (a warning); one that cannot be read is rebuilt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist (or is not a file)")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sha256 = file_sha256(path)
    file = _cache_file(cache, sha256)
    cached = _read_cache(file, sha256, path)
    if cached is not None:
        return cached
    with _build_lock(cache / f".{sha256}.lock"):
        cached = _read_cache(file, sha256, path)  # another process may have built it meanwhile
        if cached is not None:
            return cached
        _remove_stale_temp_files(file)
        model = _read_gguf(path, sha256)
        try:
            _write_cache(model, file)
        except OSError as err:
            warnings.warn(f"could not write the GGUF cache {file} ({err}); the next load will "
                          f"dequantize again", stacklevel=2)
        return model
