"""Tiny random Gemma 3n and Gemma 4 text models, which only the transformers engine runs.

Our GemmaConfig (upstream's fields) cannot describe these architectures, so each model is a
transformers config plus float32 weights under transformers' names (a
fuzz.engine.transformers.build.TransformersSource on the LoadedModel); the built-in and upstream
engines refuse them (fuzz.engine.loaded). They run in milliseconds on 2 cores and cover what the
architectures add over Gemma 3 (see the configs in transformers' configuration_gemma3n.py and
configuration_gemma4.py):
- `tiny-gemma3n`: AltUp (4 streams), LAuReL, per-layer inputs, KV sharing (the last 2 of 4
  layers reuse the K/V of the last earlier layer of their type), activation sparsity (the
  gaussian top-k of layer 0), final logit soft-capping;
- `tiny-gemma4`: per-layer inputs, KV sharing (2 of 4 layers, double-wide MLP there), the MoE
  block (4 experts, top 2) beside the dense MLP, K = V on the full-attention layers, a wider
  global head dimension;
- `tiny-gemma4-planted`: `tiny-gemma4` with a planted float16 overflow (`plant_gemma4`): the
  token "7" overflows layer GEMMA4_PLANTED_LAYER's MLP residual add in float16 only.
Weights are drawn from one seeded generator in parameter order (`random_hf_state`), so the models
and their fingerprints never change between runs.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from fuzz.engine.config import Architecture
from fuzz.engine.loaded import LoadedModel, fingerprint, state_hash
from fuzz.engine.synthetic.tiny import (
    PLANTED_CHANNEL,
    PLANTED_TRIGGER,
    TINY_SEED,
    seeded_draws,
    tiny_config,
)
from fuzz.engine.transformers.build import TransformersSource, causal_lm_class, import_transformers

GEMMA4_PLANTED_LAYER = 1
LAYERS = 4
HIDDEN = 64
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def gemma3n_config(vocab_size: int) -> Any:
    return import_transformers().Gemma3nTextConfig(
        vocab_size=vocab_size, vocab_size_per_layer_input=vocab_size, hidden_size=HIDDEN,
        hidden_size_per_layer_input=16, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        sliding_window=8, layer_types=list(LAYER_TYPES), num_kv_shared_layers=2, laurel_rank=8,
        altup_num_inputs=4, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
        final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def gemma4_config(vocab_size: int) -> Any:
    return import_transformers().Gemma4TextConfig(
        vocab_size=vocab_size, vocab_size_per_layer_input=vocab_size, hidden_size=HIDDEN,
        hidden_size_per_layer_input=16, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        max_position_embeddings=512, sliding_window=8, layer_types=list(LAYER_TYPES),
        num_kv_shared_layers=2, use_double_wide_mlp=True, attention_k_eq_v=True,
        num_global_key_value_heads=1, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=32, final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1,
        bos_token_id=2)


def hf_parameter_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every persistent tensor of the config's causal LM (no memory used), the tied head left
    out (tie_weights() makes it the embedding)."""
    with torch.device("meta"):
        model = causal_lm_class(config)(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def random_hf_state(config: Any, seed: int = TINY_SEED) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights in parameter order from one generator: embeddings ~N(0, 1),
    matrices ~N(0, 1 / fan_in) (the last axis: Linear and expert weights alike), vectors (norm
    weights, which Gemma 3n/4 multiply by as they are, and scales) ~1 + N(0, 0.1^2); the
    layer scalars stay exactly 1."""
    def scale(name: str, shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
        if name.endswith("layer_scalar"):
            return torch.ones(shape)
        if len(shape) == 1:
            return 1 + 0.1 * x
        return x if "embed_tokens" in name else x / shape[-1] ** 0.5

    return seeded_draws(hf_parameter_shapes(config), seed, scale)


def plant_gemma4(state: dict[str, torch.Tensor], config: Any, trigger_id: int,
                 layer: int = GEMMA4_PLANTED_LAYER, channel: int = PLANTED_CHANNEL) -> None:
    """A float16-only overflow at the trigger token in `layer`'s MLP residual add.

    The trigger's scaled embedding holds 5000 * sqrt(64) = 40000 in `channel`, every other
    token 0. No branch writes that channel (its rows of o_proj, the MLP and expert down
    projections and the per-layer-input projection are zero) and the per-layer-input gate does
    not read it, except `layer`'s dense MLP: one hidden unit reads the channel and writes it back,
    its post-FFN norm scales it by 7000, so the trigger's branch is ~37000 and 40000 + 37000 >
    65504 (float16's max), far below bfloat16's. Other tokens have 0 there, and the branch adds
    exactly 0 to it."""
    state["model.embed_tokens.weight"][:, channel] = 0.0
    state["model.embed_tokens.weight"][trigger_id, channel] = 5000.0
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight",
                     "per_layer_projection.weight"):
            state[p + name][channel, :] = 0.0
        for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "per_layer_input_gate.weight"):
            state[p + name][:, channel] = 0.0
        state[p + "experts.down_proj"][:, channel, :] = 0.0
    p = f"model.layers.{layer}."
    unit = torch.zeros(config.hidden_size)
    unit[channel] = 1.0
    state[p + "mlp.gate_proj.weight"][0] = unit
    state[p + "mlp.up_proj.weight"][0] = unit
    state[p + "mlp.down_proj.weight"][channel, 0] = 1.0
    state[p + "pre_feedforward_layernorm.weight"][channel] = 1.0
    state[p + "post_feedforward_layernorm_1.weight"][channel] = 1.0
    state[p + "post_feedforward_layernorm.weight"][channel] = 7000.0


def _loaded(name: str, family: str, hf: Any, state: dict[str, torch.Tensor],
            tok: Any) -> LoadedModel:
    # Our GemmaConfig cannot describe the model; a Gemma 3 stand-in with its layer count, widths
    # and vocabulary labels it (the site table, reports). The fingerprint hashes transformers'
    # config with the weights, so it identifies the real architecture.
    stand_in = tiny_config(Architecture.GEMMA_3, vocab_size=hf.vocab_size, layers=LAYERS)
    weights = hashlib.sha256((state_hash(state) + hf.to_json_string()).encode()).hexdigest()
    return LoadedModel(name, stand_in, state, tok, fingerprint(stand_in, weights, tok),
                       "synthetic", transformers=TransformersSource(hf, state, family))


def tiny_transformers_model(name: str) -> LoadedModel:
    """`tiny-gemma3n`, `tiny-gemma4` or `tiny-gemma4-planted` (module docstring)."""
    from fuzz.engine.tokenizer.build import tiny_tokenizer

    tok = tiny_tokenizer()
    if name == "tiny-gemma3n":
        hf = gemma3n_config(tok.n_words)
        return _loaded(name, "Gemma 3n", hf, random_hf_state(hf), tok)
    if name not in ("tiny-gemma4", "tiny-gemma4-planted"):
        raise ValueError(f"unknown transformers-only zoo model {name!r}; valid: "
                         f"{', '.join(TRANSFORMERS_ZOO)}")
    hf = gemma4_config(tok.n_words)
    state = random_hf_state(hf)
    if name.endswith("-planted"):
        trigger = tok.encode(PLANTED_TRIGGER, bos=False)
        if len(trigger) != 1:
            raise RuntimeError(f"the tiny tokenizer must encode {PLANTED_TRIGGER!r} as one token")
        plant_gemma4(state, hf, trigger[0])
    return _loaded(name, "Gemma 4", hf, state, tok)


TRANSFORMERS_ZOO = ("tiny-gemma3n", "tiny-gemma4", "tiny-gemma4-planted")
