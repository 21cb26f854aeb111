"""Strict state-dict checks shared by every loader, and upstream's int8 dequantization.

Upstream loads with `strict=False`, so a missing key silently stays an uninitialised `torch.empty`
(docs/NUMERICS.md). Here any missing key, unexpected key or wrong shape is a `WeightsError` that
names every offending key, and the config it was checked against.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from fuzz.engine.config import GemmaConfig
from fuzz.engine.model import parameter_shapes

# Upstream's quantized Linear/Embedding keep one float scale per output row under `X.weight_scaler`.
SCALER_SUFFIX = "_scaler"


class WeightsError(ValueError):
    """Weights that cannot be used with the given config, or a file that is not loadable."""


def config_summary(config: GemmaConfig) -> str:
    """The config fields that decide the parameter shapes, for error messages."""
    return (f"architecture {config.architecture.name}, {config.num_hidden_layers} layers, "
            f"hidden {config.hidden_size}, heads {config.num_attention_heads}/"
            f"{config.num_key_value_heads}, head_dim {config.head_dim}, "
            f"mlp {config.intermediate_size}, vocab {config.vocab_size}, quant {config.quant}")


def mismatch_report(state: Mapping[str, torch.Tensor],
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
        f"{source}: the weights do not match the config ({config_summary(config)}):\n  "
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
    lines = mismatch_report(state, expected)
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


def dequantize_int8(state: dict[str, torch.Tensor], config: GemmaConfig,
                    source: str) -> dict[str, torch.Tensor]:
    """Upstream's quantized Linear/Embedding: int8 `weight` times a per-output-row
    `weight_scaler` (`weight * weight_scaler.unsqueeze(-1)`); norms are never quantized."""
    shapes = parameter_shapes(config)
    expected = dict(shapes)
    expected.update({k + SCALER_SUFFIX: (s[0],) for k, s in shapes.items() if len(s) == 2})
    lines = mismatch_report(state, expected)
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
