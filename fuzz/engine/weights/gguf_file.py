"""Reading a llama.cpp GGUF file (Gemma 1/2/3): metadata, config, tensors in upstream form.

`open_gguf_reader` and `gguf_field_value` are the project's one way to open a GGUF and read its
key-values; the tokenizer (`fuzz.engine.tokenizer`) reads its vocabulary through them too.

GGUF conventions (llama.cpp's convert_hf_to_gguf.py, checked on the Gemma 3 270M file):
- tensor shapes are stored in ggml `ne` order, i.e. reversed with respect to torch;
- every RMSNorm weight (q/k norms included) was stored as `1 + w`: on the 270M file, `stored - 1`
  is exactly a bfloat16 number for 100% of the norm elements (the original checkpoint's dtype)
  while only 50-92% of the stored values are, so 1 is subtracted at load time;
- `attn_q`/`attn_k` rows are NOT permuted for Gemma (llama.cpp permutes them only for llama-style
  archs); the transformers parity test and transformers' own GGUF mapping confirm the plain order;
- `token_embd` is also the LM head (tied), as upstream.

Reading the 270M Q4_K_M file cold takes ~30 s on 2 busy cores (gguf's GGUFReader parses the
262144-entry token arrays one element at a time: 12-25 s; dequantizing: ~12 s), which is why
`load_gguf` (see `cache`) keeps the result.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fuzz.engine.config import Architecture, AttentionType, GemmaConfig
from fuzz.engine.model import parameter_shapes
from fuzz.engine.weights.strict import WeightsError, check_state_dict, config_summary

if TYPE_CHECKING:
    import gguf

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


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
    """The file's SHA-256 (hex), read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- opening and metadata ------------------------------------------------------------------------
def open_gguf_reader(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """A GGUFReader on `path`, after checking that it is a GGUF file and that no tensor's data
    runs past its end. Raises FileNotFoundError, or WeightsError naming what is wrong."""
    from gguf import GGUFReader
    path = Path(path)
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


def gguf_field_value(reader: gguf.GGUFReader, key: str,
                     path: str | os.PathLike[str] = "GGUF file") -> Any:
    """Metadata `key` as plain Python: a scalar, a str, or a list for arrays. KeyError when the
    file has no such key; `path` only names the file in the error for invalid UTF-8.

    Reads the field's raw parts (what gguf's `ReaderField.contents()` does) by hand, because
    `contents()` only exists in recent gguf releases and the project allows gguf>=0.10.
    """
    from gguf import GGUFValueType

    field = reader.fields[key]

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


def _metadata(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    return {key: gguf_field_value(reader, key, path) for key in reader.fields
            if not key.startswith("GGUF.")}


# --- the config ----------------------------------------------------------------------------------
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


# --- tensors -------------------------------------------------------------------------------------
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
            gguf_name = _LAYER_NAMES_TO_GGUF[local]
            if config.architecture == Architecture.GEMMA_1 and local == "post_attention_layernorm":
                gguf_name = "ffn_norm"
            names[f"blk.{layer}.{gguf_name}.weight"] = key
    return names


def _torch_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(reversed([int(d) for d in tensor.shape]))  # ggml `ne` order is reversed


def _expected_gguf_shape(gguf_name: str, upstream: str, config: GemmaConfig,
                         shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    part = gguf_name.split(".")[-2]
    if part in _QKV:
        heads = config.num_attention_heads if part == "attn_q" else config.num_key_value_heads
        return (heads * config.head_dim, config.hidden_size)
    return shapes[upstream]


def _check_gguf_names(reader: gguf.GGUFReader, config: GemmaConfig, path: Path) -> dict[str, str]:
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
                           f"({config_summary(config)}):\n  " + "\n  ".join(problems)
                           + "\nThe file is incomplete or not a Gemma GGUF.")
    return names


def _dequantized(tensor: gguf.ReaderTensor, path: Path) -> torch.Tensor:
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


def _gguf_state(reader: gguf.GGUFReader, config: GemmaConfig,
                path: Path) -> dict[str, torch.Tensor]:
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


def read_gguf(path: str | os.PathLike[str], *, sha256: str | None = None) -> GGUFModel:
    """Reads and dequantizes a llama.cpp GGUF (Gemma 1/2/3) into float32 upstream form.

    No cache: see load_gguf. `sha256`, when the caller has already hashed the file (load_gguf
    does, to find its cache entry), is recorded as is instead of hashing the file again.
    """
    path = Path(path)
    reader = open_gguf_reader(path)
    metadata = _metadata(reader, path)
    config = config_from_gguf_metadata(metadata, path)
    state = _gguf_state(reader, config, path)
    return GGUFModel(config=config, state=state, metadata=metadata,
                     sha256=sha256 or file_sha256(path), path=path)
