"""transformers' own Gemma model classes built for a LoadedModel (the transformers engine).

Three sources, tried in this order:
1. `LoadedModel.transformers`: a `TransformersSource` (an HF config plus a float32 state dict under
   transformers' names) for models only transformers can run (the zoo's tiny Gemma 3n / Gemma 4,
   fuzz.engine.synthetic.transformers_only);
2. `LoadedModel.source` naming a Hugging Face model directory (config.json beside the weights):
   `AutoModelForCausalLM.from_pretrained(dir, dtype=..., attn_implementation=...)`;
3. anything else (a GGUF such as the real Gemma 3 270M, a gemma_pytorch checkpoint, the tiny
   models): our GemmaConfig converted to transformers' config class, and our float32 master state
   mapped to transformers' names (`hf_config`, `hf_state`).

Why (3) rather than `from_pretrained(dir, gguf_file=name)` for a GGUF: the state is the very one
the built-in and upstream engines run (the Q4_K_M weights dequantized once by
fuzz.engine.weights.gguf_file), so a difference between engines is the engines' and never a second
dequantizer's; it needs no temporary directory or second 1 GB float32 copy on 2 cores; and it
works for every source our loaders read, not only GGUF. The mapping is exact: transformers stores
the same 0-centred norm weights (it applies 1 + w, as upstream), only the fused qkv projection is
split and a few modules are renamed; tests/test_parity_transformers.py checks the logits.

Every model is built as `from_pretrained(dtype=...)` builds one: inside that default dtype, so
parameters and the buffers transformers creates from the default dtype are in it, while those it
creates in float32 on purpose (the RoPE inverse frequencies) stay float32; then the state is
loaded cast to the dtype.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from fuzz.engine.config import Architecture, AttentionType, GemmaConfig
from fuzz.engine.weights.hf import is_hf_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every source here is local

ATTENTIONS = ("eager", "sdpa")
INSTALL_HINT = "pip install -U 'transformers>=5' (tested with 5.24)"
# transformers' causal-LM class for each architecture our GemmaConfig describes.
HF_CLASSES = {Architecture.GEMMA_1: "GemmaForCausalLM", Architecture.GEMMA_2: "Gemma2ForCausalLM",
              Architecture.GEMMA_3: "Gemma3ForCausalLM"}


@dataclass(frozen=True)
class TransformersSource:
    """A model only transformers can run: its config and float32 weights under its names."""

    config: Any  # a transformers PretrainedConfig (Gemma3nTextConfig, Gemma4TextConfig, ...)
    state: dict[str, torch.Tensor]
    family: str  # "Gemma 3n", "Gemma 4": what the built-in engine's refusal names


def import_transformers() -> Any:
    """transformers, once checked to be one this engine drives: its models take `cache=` (the
    name that replaced `past_key_values`) and its configs `rope_parameters` (transformers 5)."""
    try:
        import transformers
    except ImportError as err:
        raise RuntimeError(f"the transformers engine needs transformers ({err}); "
                          f"{INSTALL_HINT}") from None
    forward = inspect.signature(transformers.GemmaForCausalLM.forward).parameters
    if "cache" not in forward:
        raise RuntimeError(f"transformers {transformers.__version__} is too old for the "
                          f"transformers engine (its models take no `cache=`); {INSTALL_HINT}")
    return transformers


def check_attention(attention: Optional[str]) -> Optional[str]:
    """None: transformers' own choice (sdpa where the class supports it, else eager)."""
    if attention is not None and attention not in ATTENTIONS:
        raise ValueError(f"unknown attention implementation {attention!r}; valid: "
                         f"{', '.join(ATTENTIONS)} (transformers' attn_implementation)")
    return attention


# --- GemmaConfig -> transformers config ----------------------------------------------------------
def _layer_types(config: GemmaConfig) -> list[str]:
    return ["sliding_attention" if config.attn_type(i) == AttentionType.LOCAL_SLIDING
            else "full_attention" for i in range(config.num_hidden_layers)]


def _gemma3_rope(config: GemmaConfig) -> dict[str, dict[str, Any]]:
    """One RoPE base per layer type; upstream's global scaling factor is transformers' linear
    RoPE scaling (frequencies divided by the factor) on the full-attention layers."""
    rope: dict[str, dict[str, Any]] = {}
    for kind, attn_type in (("sliding_attention", AttentionType.LOCAL_SLIDING),
                            ("full_attention", AttentionType.GLOBAL)):
        params: dict[str, Any] = {"rope_type": "default",
                                  "rope_theta": float(config.rope_theta(attn_type))}
        factor = config.rope_scaling(attn_type)
        if factor is not None:
            params.update(rope_type="linear", factor=float(factor))
        rope[kind] = params
    return rope


def hf_config(config: GemmaConfig, attention: Optional[str] = "eager",
              tokenizer: Any = None) -> Any:
    """transformers' config for the model our GemmaConfig describes (tied LM head)."""
    tf = import_transformers()
    if config.architecture == Architecture.GEMMA_3 and not config.use_qk_norm:
        raise ValueError("a Gemma 3 config with use_qk_norm=False has no transformers class "
                         "(Gemma3ForCausalLM always normalises q and k); run it with --engine "
                         "builtin")
    ids = {}
    if tokenizer is not None:  # only generation defaults: the forward reads none of them
        ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                   pad_token_id=tokenizer.pad_id)
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True, attn_implementation=check_attention(attention), **ids)
    if config.architecture == Architecture.GEMMA_1:
        return tf.GemmaConfig(hidden_act="gelu_pytorch_tanh",
                              rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
                              **common)
    sandwich = dict(
        hidden_activation="gelu_pytorch_tanh", layer_types=_layer_types(config),
        sliding_window=config.sliding_window_size,
        query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
        final_logit_softcapping=config.final_logit_softcapping,
        attn_logit_softcapping=config.attn_logit_softcapping, **common)
    if config.architecture == Architecture.GEMMA_2:
        return tf.Gemma2Config(rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
                               **sandwich)
    return tf.Gemma3TextConfig(rope_parameters=_gemma3_rope(config), **sandwich)


def hf_state(state: dict[str, torch.Tensor], config: GemmaConfig) -> dict[str, torch.Tensor]:
    """Upstream names -> transformers names: split the fused qkv, rename the embedding and the
    q/k norms, tie the LM head. Both sides store norm weights centred at 0 and apply (1 + w)."""
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    out = {}
    for key, value in state.items():
        if key == "embedder.weight":
            out["model.embed_tokens.weight"] = out["lm_head.weight"] = value
        elif key.endswith("qkv_proj.weight"):
            prefix = key[: -len("qkv_proj.weight")]
            for name, part in zip("qkv", value.split([q_size, kv_size, kv_size]), strict=True):
                out[f"{prefix}{name}_proj.weight"] = part
        else:
            out[key.replace("query_norm", "q_norm").replace("key_norm", "k_norm")] = value
    return out


# --- building --------------------------------------------------------------------------------
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _no_init_weights() -> Any:
    from transformers.initialization import no_init_weights

    return no_init_weights()


def causal_lm_class(config: Any) -> type:
    """The *ForCausalLM class of a transformers text config (Gemma3nTextConfig ->
    Gemma3nForCausalLM, ...), as AutoModelForCausalLM maps it."""
    tf = import_transformers()
    mapping = tf.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    name = mapping.get(config.model_type)
    if name is None:
        raise ValueError(f"transformers has no causal LM for model_type {config.model_type!r}")
    return getattr(tf, name)


def from_state(config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype,
               device: torch.device | str, attention: Optional[str]) -> nn.Module:
    """transformers' class for `config`, built in `dtype` and given `state` (cast), in eval mode."""
    config._attn_implementation = check_attention(attention)
    cls = causal_lm_class(config)
    with _no_init_weights(), default_dtype(dtype), _attention_refusal(cls, attention):
        model = cls(config)  # every parameter is assigned below
    cast = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    result = model.load_state_dict(cast, strict=False, assign=True)
    # Non-persistent buffers (RoPE tables, embedding scales) are built, not loaded; everything
    # else must come from the state, or it would stay uninitialised.
    missing = sorted(set(result.missing_keys) - {"lm_head.weight"})
    if missing or result.unexpected_keys:
        raise ValueError(f"the weights do not fit {cls.__name__}: missing {missing[:8]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:8]}")
    model.tie_weights()
    return model.to(device).eval()


@contextlib.contextmanager
def _attention_refusal(cls: Any, attention: Optional[str]) -> Iterator[None]:
    """transformers refuses an attention a class lacks (Gemma 2 has no sdpa: its soft-capping)
    with a message about from_pretrained; say it in this tool's terms."""
    try:
        yield
    except ValueError as err:
        if attention is None or "attention implementation" not in str(err):
            raise
        others = [a for a in ATTENTIONS if a != attention]
        raise ValueError(f"transformers' {getattr(cls, '__name__', cls)} does not offer "
                         f"attention {attention!r} for this model; use {' or '.join(others)} "
                         f"(--attention {others[0]}, engine transformers-{others[0]})") from None


def from_directory(path: Path, dtype: torch.dtype, device: torch.device | str,
                   attention: Optional[str]) -> nn.Module:
    """A Hugging Face model directory, as a user loads it."""
    tf = import_transformers()
    with _attention_refusal(tf.AutoModelForCausalLM, attention):
        model = tf.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation=check_attention(attention))
    return model.to(device).eval()


def build_transformers_model(loaded: Any, dtype: torch.dtype, device: torch.device | str,
                attention: Optional[str]) -> nn.Module:
    """transformers' model for a fuzz.engine.loaded.LoadedModel (sources: module docstring)."""
    source = getattr(loaded, "transformers", None)
    if source is not None:
        return from_state(source.config.__class__.from_dict(source.config.to_dict()),
                          source.state, dtype, device, attention)
    if is_hf_dir(loaded.source):
        return from_directory(Path(loaded.source), dtype, device, attention)
    config = hf_config(loaded.config, attention, loaded.tokenizer)
    return from_state(config, hf_state(loaded.state, loaded.config), dtype, device, attention)
