"""A Hugging Face `config.json` (Gemma 1/2/3 text) as upstream's GemmaConfig.

Both layouts transformers writes are read: transformers 5 (`rope_parameters`, per layer type for
Gemma 3) and transformers 4 / the Hub's original files (`rope_theta`, `rope_local_base_freq`,
`rope_scaling`, `sliding_window_pattern`). A field left out takes transformers' class default for
that model type, so a config means here what it means to transformers.

What the built-in engine cannot run is refused with the field that asks for it (an exact-GELU
MLP, attention biases, bidirectional attention, RoPE bases other than upstream's for Gemma 1/2,
RoPE scaling other than Gemma 3's linear scaling of the global layers, an untied LM head, a
quantized checkpoint), rather than run as something else.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fuzz.engine.config import Architecture, AttentionType, GemmaConfig
from fuzz.engine.weights.strict import WeightsError

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
_ARCHITECTURES = {"gemma": Architecture.GEMMA_1, "gemma2": Architecture.GEMMA_2,
                  "gemma3_text": Architecture.GEMMA_3}
_LAYER_TYPES = {"sliding_attention": AttentionType.LOCAL_SLIDING,
                "full_attention": AttentionType.GLOBAL}
_TANH_GELU = "gelu_pytorch_tanh"
# transformers' class defaults for the fields a config may leave out (configuration_gemma*.py).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": dict(rms_norm_eps=1e-6, max_position_embeddings=8192, head_dim=256),
    "gemma2": dict(rms_norm_eps=1e-6, max_position_embeddings=8192, head_dim=256,
                   query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(rms_norm_eps=1e-6, max_position_embeddings=131_072, head_dim=256,
                        query_pre_attn_scalar=256, sliding_window=4096,
                        final_logit_softcapping=None, attn_logit_softcapping=None),
}
_DEFAULT_THETA = {"gemma": 10_000.0, "gemma2": 10_000.0}
_GEMMA3_THETA = {AttentionType.GLOBAL: 1_000_000.0, AttentionType.LOCAL_SLIDING: 10_000.0}
# Upstream's Gemma 1/2 (and so the built-in engine) have one fixed RoPE base.
_UPSTREAM_GEMMA12_THETA = 10_000


def text_part(data: Mapping[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """(text model_type, the text model's fields): a multimodal `gemma3` config keeps its language
    model under `text_config` (the vision tower is left out, as in fuzz.engine.config)."""
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise WeightsError(
            f"{source}: model_type {model_type!r} is not supported by the built-in engine; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (Gemma 1, 2 and 3; for a gemma3 "
            "checkpoint its text part)")
    if model_type != "gemma3":
        return model_type, dict(data)
    text = data.get("text_config")
    if not isinstance(text, Mapping):
        raise WeightsError(f"{source}: a model_type 'gemma3' config needs a 'text_config' object "
                           "(the language model's fields)")
    text = dict(text)
    inner = text.setdefault("model_type", "gemma3_text")
    if inner != "gemma3_text":
        raise WeightsError(f"{source}: text_config.model_type is {inner!r}; a gemma3 config's "
                           "text part must be 'gemma3_text'")
    # The multimodal config carries the tie flag at its top level.
    text.setdefault("tie_word_embeddings", data.get("tie_word_embeddings", True))
    return "gemma3_text", text


def config_from_hf(data: Mapping[str, Any], source: str) -> GemmaConfig:
    """Upstream's GemmaConfig for a transformers Gemma config (see the module docstring)."""
    model_type, text = text_part(data, source)
    _refuse_quantized(data.get("quantization_config") or text.get("quantization_config"), source)
    fields = {**_DEFAULTS[model_type], **{k: v for k, v in text.items() if v is not None}}
    _refuse_unsupported(model_type, fields, source)
    arch = _ARCHITECTURES[model_type]
    layers = _need_int(fields, "num_hidden_layers", source)
    common: dict[str, Any] = dict(
        architecture=arch, vocab_size=_need_int(fields, "vocab_size", source),
        max_position_embeddings=_need_int(fields, "max_position_embeddings", source),
        num_hidden_layers=layers,
        num_attention_heads=_need_int(fields, "num_attention_heads", source),
        num_key_value_heads=_need_int(fields, "num_key_value_heads", source),
        hidden_size=_need_int(fields, "hidden_size", source),
        intermediate_size=_need_int(fields, "intermediate_size", source),
        head_dim=_need_int(fields, "head_dim", source),
        rms_norm_eps=float(fields["rms_norm_eps"]), dtype="float32", quant=False,
        tokenizer=None,  # the tokenizer is a file of the directory, not a config field
    )
    rope = _rope(model_type, text, source)
    if arch == Architecture.GEMMA_1:
        return _build(common, source)
    sandwich = dict(
        use_pre_ffw_norm=True, use_post_ffw_norm=True,
        attn_types=_layer_types(model_type, fields, layers, source),
        sliding_window_size=_need_int(fields, "sliding_window", source),
        query_pre_attn_scalar=_integral(fields["query_pre_attn_scalar"],
                                        "query_pre_attn_scalar", source),
        # text.get: a softcap given as null means "none", not the class default.
        final_logit_softcapping=_softcap(text, fields, "final_logit_softcapping"),
        attn_logit_softcapping=_softcap(text, fields, "attn_logit_softcapping"),
    )
    if arch == Architecture.GEMMA_2:
        return _build({**common, **sandwich}, source)
    return _build({**common, **sandwich, "use_qk_norm": True, **rope}, source)


def _refuse_quantized(quant: Any, source: str) -> None:
    """A quantized checkpoint stores no float weights to run. A model transformers loaded from a
    GGUF keeps `quant_method: gguf` in its config, but it dequantized the weights at load time:
    what save_pretrained wrote is float."""
    if quant and not (isinstance(quant, Mapping) and quant.get("quant_method") == "gguf"):
        method = quant.get("quant_method") if isinstance(quant, Mapping) else quant
        raise WeightsError(f"{source}: a quantized checkpoint (quantization_config, "
                           f"quant_method {method!r}); give the float (bfloat16/float16/"
                           "float32) weights")


def _build(fields: dict[str, Any], source: str) -> GemmaConfig:
    try:
        return GemmaConfig(**fields)
    except ValueError as err:
        raise WeightsError(f"{source}: {err}") from None


def _need_int(fields: Mapping[str, Any], key: str, source: str) -> int:
    if key not in fields:
        raise WeightsError(f"{source}: the config lacks {key!r}, needed to build the model")
    return _integral(fields[key], key, source)


def _integral(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise WeightsError(f"{source}: {key} must be a whole number, found {value!r}")
    return int(value)


def _softcap(text: Mapping[str, Any], fields: Mapping[str, Any], key: str) -> float | None:
    value = text[key] if key in text else fields.get(key)
    return None if value is None else float(value)


def _refuse_unsupported(model_type: str, fields: Mapping[str, Any], source: str) -> None:
    """Fields asking for what the built-in engine (upstream's forward pass) does not compute."""
    if model_type == "gemma":
        # transformers maps the Hub's legacy hidden_act "gelu" to the tanh GELU Gemma was
        # trained with (configuration_gemma.py); an explicit hidden_activation wins (4.x).
        act = fields.get("hidden_activation") or fields.get("hidden_act", _TANH_GELU)
        act = _TANH_GELU if act == "gelu" and not fields.get("hidden_activation") else act
    else:
        act = fields.get("hidden_activation", _TANH_GELU)
    problems = []
    if act != _TANH_GELU:
        problems.append(f"activation {act!r} (the engine's MLP is {_TANH_GELU!r}, as upstream)")
    if fields.get("attention_bias"):
        problems.append("attention_bias true (Gemma's projections have no bias)")
    if fields.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention true (the engine is a causal LM)")
    if fields.get("tie_word_embeddings", True) is False:
        problems.append("tie_word_embeddings false (the engine's LM head is the embedding)")
    if problems:
        raise WeightsError(f"{source}: the built-in engine cannot run this {model_type} config: "
                           + "; ".join(problems))


def _layer_types(model_type: str, fields: Mapping[str, Any], layers: int,
                 source: str) -> tuple[AttentionType, ...]:
    """Per-layer attention types: `layer_types`, or transformers' default pattern (Gemma 2
    alternates sliding/full; Gemma 3 repeats `sliding_window_pattern` - 1 sliding, 1 full)."""
    names = fields.get("layer_types")
    if names is None:
        pattern = 2 if model_type == "gemma2" else int(
            fields.get("sliding_window_pattern", fields.get("_sliding_window_pattern", 6)))
        names = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(layers)]
    if not isinstance(names, list) or len(names) != layers:
        raise WeightsError(f"{source}: layer_types must list one type per layer ({layers}), "
                           f"found {names!r}")
    unknown = sorted({n for n in names if n not in _LAYER_TYPES})
    if unknown:
        raise WeightsError(f"{source}: unknown layer_types {unknown}; valid: "
                           f"{', '.join(_LAYER_TYPES)}")
    types = tuple(_LAYER_TYPES[n] for n in names)
    # GemmaConfig.attn_type cycles attn_types over the layers: keep the shortest period that
    # reproduces every layer, so Gemma 3's 5-local/1-global pattern reads as upstream's and the
    # GGUF loader's (the same config, the same fingerprint text).
    period = next((p for p in range(1, layers + 1)
                   if all(types[i] == types[i % p] for i in range(layers))), layers)
    return types[:period]


# --- RoPE ---------------------------------------------------------------------------------------
def _rope_entries(model_type: str, text: Mapping[str, Any]) -> dict[AttentionType, dict]:
    """Layer type -> {rope_type, rope_theta, factor, ...}, from either transformers layout."""
    params = text.get("rope_parameters")
    if model_type != "gemma3_text":
        entry = dict(params or text.get("rope_scaling") or {})
        entry.setdefault("rope_theta", text.get("rope_theta", _DEFAULT_THETA[model_type]))
        return {AttentionType.GLOBAL: entry}
    if isinstance(params, Mapping) and set(params) & set(_LAYER_TYPES):
        entries = {kind: dict(params.get(name) or {}) for name, kind in _LAYER_TYPES.items()}
    else:
        # transformers 4: rope_scaling applies to the global layers only; the local layers
        # take rope_local_base_freq unscaled (modeling_gemma3's rotary_emb_local).
        entries = {AttentionType.GLOBAL: dict(params or text.get("rope_scaling") or {}),
                   AttentionType.LOCAL_SLIDING: {}}
        entries[AttentionType.LOCAL_SLIDING].setdefault(
            "rope_theta", text.get("rope_local_base_freq", _GEMMA3_THETA[
                AttentionType.LOCAL_SLIDING]))
        entries[AttentionType.GLOBAL].setdefault("rope_theta", text.get("rope_theta"))
    for kind, entry in entries.items():
        if entry.get("rope_theta") is None:
            entry["rope_theta"] = _GEMMA3_THETA[kind]
    return entries


def _rope(model_type: str, text: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The GemmaConfig RoPE fields (Gemma 3: rope_wave_length, rope_scaling_factor), after
    refusing what the engine does not compute."""
    entries = _rope_entries(model_type, text)
    scaling: dict[AttentionType, float] = {}
    for kind, entry in entries.items():
        rope_type = entry.get("rope_type", entry.get("type", "default"))
        if rope_type == "linear" and model_type == "gemma3_text" and kind == AttentionType.GLOBAL:
            scaling[kind] = float(entry.get("factor", 1.0))
        elif rope_type != "default":
            where = "" if model_type != "gemma3_text" else f" on {kind.name} layers"
            raise WeightsError(
                f"{source}: RoPE type {rope_type!r}{where} is not supported; the engine computes "
                "upstream's default RoPE (and, on Gemma 3's global layers, linear scaling)")
    thetas = {kind: _integral(entry["rope_theta"], f"rope_theta ({kind.name})", source)
              for kind, entry in entries.items()}
    if model_type != "gemma3_text":
        if thetas[AttentionType.GLOBAL] != _UPSTREAM_GEMMA12_THETA:
            raise WeightsError(
                f"{source}: rope_theta {thetas[AttentionType.GLOBAL]} is not supported for "
                f"{model_type}; upstream's Gemma 1/2 (and the engine) use "
                f"{_UPSTREAM_GEMMA12_THETA}")
        return {}
    factor = scaling.get(AttentionType.GLOBAL, 1.0)
    if not math.isfinite(factor) or factor <= 0:
        raise WeightsError(f"{source}: RoPE scaling factor {factor!r} must be a positive number")
    return dict(rope_wave_length=thetas,
                rope_scaling_factor=None if factor == 1.0 else _integral(
                    factor, "rope scaling factor", source))
