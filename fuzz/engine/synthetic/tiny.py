"""Small deterministic synthetic Gemma models: for unit tests, the zoo's `tiny*` models and plants.

- `tiny_config` / `random_state`: the one recipe for tiny configs and random weights (the zoo and
  every test that needs a model without real weights build theirs here).
- `tiny`, `tiny-gemma1`, `tiny-gemma2`: random weights from a fixed seed and the code-built tiny
  tokenizer; they run in milliseconds on 2 cores.
- `tiny-planted`: `tiny` with a planted float16 overflow: a trigger token ("7") carries a massive
  activation in residual channel 0, and layer TINY_PLANTED_LAYER's MLP doubles it, so that in
  float16 the residual add of that layer overflows at the trigger's position, while bfloat16,
  float32 and the mitigated policies stay finite. Its minimal trigger is known: the prompt "7".
The digit-run family (`tiny-digit-run-N`, a trigger that is hard to find by chance) lives in
fuzz.engine.synthetic.planted.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from fuzz.engine.config import Architecture, AttentionType, GemmaConfig
from fuzz.engine.loaded import LoadedModel, fingerprint, state_hash
from fuzz.engine.model import parameter_shapes

TINY_PLANTED_LAYER = 2
PLANTED_CHANNEL = 0
PLANTED_TRIGGER = "7"
TINY_SEED = 1234


def tiny_config(architecture: Architecture = Architecture.GEMMA_3, vocab_size: int = 512,
                layers: int = 4, **overrides: Any) -> GemmaConfig:
    """hidden 64, 4 heads over 1 (Gemma 3), 2 (Gemma 2) or 4 (Gemma 1) KV heads, head_dim 16,
    a sliding window of 8 tokens (smaller than typical prompts, so the local mask matters).

    `overrides` replace any GemmaConfig field (e.g. a test's window, query_pre_attn_scalar or
    attn_types), checked by GemmaConfig's own validation."""
    common = dict(architecture=architecture, vocab_size=vocab_size, max_position_embeddings=512,
                  num_hidden_layers=layers, num_attention_heads=4, hidden_size=64,
                  intermediate_size=128, head_dim=16, dtype="float32", tokenizer=None)
    pattern = (AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL)
    if architecture == Architecture.GEMMA_1:
        config = GemmaConfig(num_key_value_heads=4, **common)
    elif architecture == Architecture.GEMMA_2:
        config = GemmaConfig(num_key_value_heads=2, attn_types=pattern, sliding_window_size=8,
                             use_pre_ffw_norm=True, use_post_ffw_norm=True,
                             final_logit_softcapping=30.0, attn_logit_softcapping=50.0, **common)
    else:
        config = GemmaConfig(num_key_value_heads=1, attn_types=pattern, sliding_window_size=8,
                             use_pre_ffw_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
                             rope_wave_length={AttentionType.LOCAL_SLIDING: 10_000,
                                               AttentionType.GLOBAL: 1_000_000}, **common)
    return dataclasses.replace(config, **overrides) if overrides else config


def random_state(config: GemmaConfig, seed: int = 0, *, norm_scale: float = 0.1,
                 matrix_gain: float = 1.0, bfloat16: bool = False) -> dict[str, torch.Tensor]:
    """Deterministic random float32 weights, drawn in parameter order from one generator:
    matrices ~N(0, matrix_gain^2 / fan_in), the embedding ~N(0, 1), norm weights
    ~N(0, norm_scale^2) around upstream's 0-centred convention (the model adds 1).

    Parity tests raise `norm_scale` and `matrix_gain` so that soft-caps and (1 + w) visibly act;
    `bfloat16` rounds every weight to a bfloat16 number, as real Gemma checkpoints hold (then a
    GGUF's stored 1 + w gives back w exactly)."""
    def scale(name: str, shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
        if name.endswith("norm.weight"):
            x = x * norm_scale
        elif name != "embedder.weight":
            x = x * matrix_gain / shape[1] ** 0.5
        return x.to(torch.bfloat16).float() if bfloat16 else x

    return seeded_draws(parameter_shapes(config), seed, scale)


def seeded_draws(shapes: dict[str, tuple[int, ...]], seed: int,
                 scale: Callable[[str, tuple[int, ...], torch.Tensor], torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """Standard normal float32 draws for every tensor, in the order of `shapes`, from one
    generator seeded with `seed`, each passed through `scale(name, shape, draw)`: the one recipe
    of every synthetic model's weights, so a model and its fingerprint never change."""
    gen = torch.Generator().manual_seed(seed)
    return {name: scale(name, shape, torch.randn(shape, generator=gen, dtype=torch.float32))
            for name, shape in shapes.items()}


def plant_overflow(state: dict[str, torch.Tensor], config: GemmaConfig, trigger_id: int,
                   layer: int = TINY_PLANTED_LAYER, channel: int = PLANTED_CHANNEL) -> None:
    """Plants a float16-only residual overflow at the trigger token (see module docstring).

    The trigger's scaled embedding holds 5000 * sqrt(64) = 40000 in `channel`; no branch writes
    that channel except `layer`'s MLP, whose one hidden unit reads it (normalized: ~8) and whose
    post-FFN norm scales it by 7000: 40000 + ~55000 > 65504 (float16's max), far below bfloat16's.
    Every other token has 0 in that channel, so the branch adds exactly 0 there."""
    hidden = config.hidden_size
    state["embedder.weight"][:, channel] = 0.0
    state["embedder.weight"][trigger_id, channel] = 5000.0
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.o_proj.weight"][channel, :] = 0.0
        state[p + "mlp.down_proj.weight"][channel, :] = 0.0
        state[p + "mlp.gate_proj.weight"][:, channel] = 0.0
        state[p + "mlp.up_proj.weight"][:, channel] = 0.0
    p = f"model.layers.{layer}."
    unit = torch.zeros(hidden)
    unit[channel] = 1.0
    state[p + "mlp.gate_proj.weight"][0] = unit
    state[p + "mlp.up_proj.weight"][0] = unit
    state[p + "mlp.down_proj.weight"][channel, 0] = 1.0
    state[p + "pre_feedforward_layernorm.weight"][channel] = 0.0
    state[p + "post_feedforward_layernorm.weight"][channel] = 7000.0 - 1.0


def synthetic_model(name: str, config: GemmaConfig, state: dict[str, torch.Tensor],
                    tokenizer: Any) -> LoadedModel:
    return LoadedModel(name, config, state, tokenizer,
                       fingerprint(config, state_hash(state), tokenizer), "synthetic")


def tiny_model(name: str, architecture: Architecture = Architecture.GEMMA_3,
               planted: bool = False) -> LoadedModel:
    """The zoo's tiny models: random weights (seed TINY_SEED), the tiny tokenizer."""
    from fuzz.engine.tokenizer.build import tiny_tokenizer

    tok = tiny_tokenizer()
    config = tiny_config(architecture, vocab_size=tok.n_words)
    state = random_state(config, seed=TINY_SEED)
    if planted:
        trigger = tok.encode(PLANTED_TRIGGER, bos=False)
        if len(trigger) != 1:
            raise RuntimeError(f"the tiny tokenizer must encode {PLANTED_TRIGGER!r} as one token")
        plant_overflow(state, config, trigger[0])
    return synthetic_model(name, config, state, tok)
