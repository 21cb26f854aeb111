"""Gemma model configuration with upstream gemma_pytorch's field names and variants.

`GemmaConfig` mirrors `gemma/config.py` of google/gemma_pytorch field for field, so a JSON file
written with upstream's field names loads here unchanged. Unlike upstream, an unknown variant,
dtype or field is an error that lists the valid choices (upstream's `get_dtype()` silently returns
None for an unknown dtype string).
"""
from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float": torch.float32,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
}


class AttentionType(enum.Enum):
    GLOBAL = 1
    LOCAL_SLIDING = 2


class Architecture(enum.Enum):
    GEMMA_1 = 1
    GEMMA_2 = 2
    GEMMA_3 = 3


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Maps a dtype name to torch, refusing what upstream would silently turn into None."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}; valid dtypes are: {', '.join(sorted(DTYPES))}"
        ) from None


@dataclasses.dataclass
class GemmaConfig:
    """Upstream's GemmaConfig (text part). Defaults are upstream's (Gemma 1 7b)."""

    architecture: Architecture = Architecture.GEMMA_1
    vocab_size: int = 256000
    max_position_embeddings: int = 8192
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    hidden_size: int = 3072
    intermediate_size: int = 24576
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    dtype: str = "bfloat16"
    quant: bool = False
    tokenizer: Optional[str] = "tokenizer/tokenizer.model"
    attn_types: Optional[Sequence[AttentionType]] = None
    sliding_window_size: Optional[int] = None
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    query_pre_attn_scalar: Optional[int] = None
    use_pre_ffw_norm: bool = False
    use_post_ffw_norm: bool = False
    rope_wave_length: Optional[dict[AttentionType, int]] = None
    use_qk_norm: bool = False
    vision_config: Any = None
    rope_scaling_factor: Optional[int] = None

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.architecture == Architecture.GEMMA_3 and self.rope_wave_length is None:
            raise ValueError("rope_wave_length must be provided for Gemma 3 (as upstream requires)")

    def get_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def attn_type(self, layer: int) -> AttentionType:
        """Upstream cycles `attn_types` over the layers; Gemma 1 is all global."""
        if self.architecture == Architecture.GEMMA_1 or not self.attn_types:
            return AttentionType.GLOBAL
        return self.attn_types[layer % len(self.attn_types)]

    def rope_theta(self, attn_type: AttentionType) -> int:
        """Gemma 3 has one RoPE base per attention type; Gemma 1/2 use 10k everywhere."""
        if self.architecture == Architecture.GEMMA_3 and self.rope_wave_length:
            return self.rope_wave_length.get(attn_type, 10_000)
        return 10_000

    def rope_scaling(self, attn_type: AttentionType) -> Optional[int]:
        """The divisor of this attention type's RoPE frequencies, or None when they are unscaled.

        Upstream's Gemma3ForMultimodalLM (gemma/gemma3_model.py, __init__) passes
        `rope_scaling_factor` to precompute_freqs_cis for the global table only; its local table
        and Gemma 1/2 (gemma/model.py's GemmaForCausalLM) are never scaled."""
        if self.architecture == Architecture.GEMMA_3 and attn_type == AttentionType.GLOBAL:
            return self.rope_scaling_factor
        return None

    # --- JSON round trip with upstream field names -------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, enum.Enum):
                value = value.name
            elif field.name == "attn_types" and value is not None:
                value = [t.name for t in value]
            elif field.name == "rope_wave_length" and value is not None:
                value = {t.name: v for t, v in value.items()}
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> GemmaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown GemmaConfig field(s) {unknown}; valid fields are: "
                f"{', '.join(sorted(known))}"
            )
        kwargs = dict(data)
        if "architecture" in kwargs:
            kwargs["architecture"] = _enum_value(Architecture, kwargs["architecture"], source)
        if kwargs.get("attn_types") is not None:
            kwargs["attn_types"] = tuple(
                _enum_value(AttentionType, t, source) for t in kwargs["attn_types"]
            )
        if kwargs.get("rope_wave_length") is not None:
            kwargs["rope_wave_length"] = {
                _enum_value(AttentionType, k, source): int(v)
                for k, v in kwargs["rope_wave_length"].items()
            }
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> GemmaConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a JSON object of GemmaConfig fields")
        return cls.from_dict(data, source=str(path))

    def fingerprint_text(self) -> str:
        """A canonical text of every field, hashed into corpus fingerprints."""
        return json.dumps(self.to_dict(), sort_keys=True)


def _enum_value(enum_cls: type[enum.Enum], value: Any, source: str) -> Any:
    """Accepts an enum member, its name ('GEMMA_3', 'LOCAL_SLIDING') or its number."""
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        key = value.split(".")[-1].upper()
        if key in enum_cls.__members__:
            return enum_cls[key]
    elif isinstance(value, int):
        try:
            return enum_cls(value)
        except ValueError:
            pass
    raise ValueError(
        f"{source}: {value!r} is not a valid {enum_cls.__name__}; valid: "
        f"{', '.join(enum_cls.__members__)}"
    )


# --- Variants (upstream's get_config_for_*, text part only; plus 270m) -------------------------
_G3_PATTERN = (AttentionType.LOCAL_SLIDING,) * 5 + (AttentionType.GLOBAL,)
_G3_ROPE = {AttentionType.LOCAL_SLIDING: 10_000, AttentionType.GLOBAL: 1_000_000}
_G3_TOKENIZER = "tokenizer/gemma3_cleaned_262144_v2.spiece.model"


def _gemma2(**kw: Any) -> dict[str, Any]:
    layers = kw["num_hidden_layers"]
    return dict(
        architecture=Architecture.GEMMA_2, use_pre_ffw_norm=True, use_post_ffw_norm=True,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, head_dim=256,
        attn_types=(AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL) * (layers // 2),
        sliding_window_size=4096, **kw,
    )


def _gemma3(**kw: Any) -> dict[str, Any]:
    base = dict(
        architecture=Architecture.GEMMA_3, use_pre_ffw_norm=True, use_post_ffw_norm=True,
        head_dim=256, attn_types=_G3_PATTERN, rope_wave_length=dict(_G3_ROPE),
        vocab_size=262_144, tokenizer=_G3_TOKENIZER, use_qk_norm=True,
    )
    base.update(kw)
    return base


VARIANTS: dict[str, dict[str, Any]] = {
    # Gemma 1
    "7b": dict(),
    "2b": dict(num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
               hidden_size=2048, intermediate_size=16384),
    # Gemma 2
    "2b-v2": _gemma2(num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                     hidden_size=2304, intermediate_size=9216),
    "9b": _gemma2(num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                  hidden_size=3584, intermediate_size=14336),
    "27b": {**_gemma2(num_hidden_layers=46, num_attention_heads=32, num_key_value_heads=16,
                      hidden_size=4608, intermediate_size=36864),
            "head_dim": 128, "query_pre_attn_scalar": 144},
    # Gemma 3 (text part: upstream's 4b/12b/27b_v3 also carry a vision tower, left out here)
    "1b": _gemma3(num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                  hidden_size=1152, intermediate_size=6912, sliding_window_size=512,
                  max_position_embeddings=32_768),
    "4b": _gemma3(num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                  hidden_size=2560, intermediate_size=10240, sliding_window_size=1024,
                  rope_scaling_factor=8),
    "12b": _gemma3(num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8,
                   hidden_size=3840, intermediate_size=3840 * 8 // 2, sliding_window_size=1024,
                   max_position_embeddings=131_072, rope_scaling_factor=8),
    "27b_v3": _gemma3(num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16,
                      hidden_size=5376, intermediate_size=5376 * 8 // 2, head_dim=128,
                      query_pre_attn_scalar=5376 // 32, sliding_window_size=1024,
                      max_position_embeddings=131_072, rope_scaling_factor=8),
    # Not in upstream: Gemma 3 270M (docs/NUMERICS.md), otherwise like 1b.
    "270m": _gemma3(num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                    hidden_size=640, intermediate_size=2048, sliding_window_size=512,
                    query_pre_attn_scalar=256, max_position_embeddings=32_768),
}


def get_model_config(variant: str, dtype: str = "bfloat16") -> GemmaConfig:
    """Upstream's `get_model_config`, with `270m` added and a helpful error."""
    try:
        fields = VARIANTS[variant]
    except KeyError:
        raise ValueError(
            f"unknown variant {variant!r}; valid variants are: {', '.join(VARIANTS)}"
        ) from None
    return GemmaConfig(dtype=dtype, **fields)
