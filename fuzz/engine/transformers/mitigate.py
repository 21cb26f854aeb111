"""A precision policy's mitigations (fuzz.engine.interface.Numerics) on transformers' own Gemma.

The layer and norm forwards are re-stated once for both libraries, in fuzz.engine.mitigate_layers
(what is replaced, how, and why it computes what the built-in engine computes). This module is
transformers' adapter: where the text decoder is (also inside a Gemma 3 multimodal wrapper),
which classes are known, how self_attn is called (it returns a tuple; the masks, RoPE tables,
cache, position ids and transformers' **kwargs pass unchanged), and the LM head: with
`float32_logits` it multiplies the float32 final norm by its weight read as float32. The q/k
norms inside attention are left alone (the built-in engine does not clamp them either).

Faithful Numerics change nothing. Known layers: GemmaDecoderLayer, Gemma2DecoderLayer and
Gemma3DecoderLayer, checked with transformers 5.25; any other class (Gemma 3n's AltUp/LAuReL
layers, Gemma 4's) or another major version of transformers is refused with the class and version
named: their forwards differ, and a re-stated forward that silently dropped a step would change
the model, not mitigate it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fuzz.engine import kernels
from fuzz.engine.interface import Numerics
from fuzz.engine.mitigate_layers import (
    GEMMA1,
    SANDWICH,
    Mitigation,
    Parts,
    UnsupportedModel,
    apply_parts,
    norm_names,
    refuse_replaced,
)
from fuzz.engine.transformers.hooks import text_parts

__all__ = ["Mitigation", "UnsupportedModel", "apply_numerics", "check_supported"]

TESTED = "5.25"  # the transformers release these forwards were re-stated from
TESTED_MAJOR = 5
# transformers' decoder-layer classes whose forward this module re-states: Gemma 1 (pre-norm
# attention and MLP) and the sandwich-norm Gemma 2/3.
LAYERS = {"GemmaDecoderLayer": GEMMA1, "Gemma2DecoderLayer": SANDWICH,
          "Gemma3DecoderLayer": SANDWICH}
NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _unsupported(what: str, version: str) -> UnsupportedModel:
    return UnsupportedModel(
        f"{what} has no known mitigation in transformers {version}: fuzz's mitigations re-state "
        f"the forwards of {', '.join(LAYERS)} (tested with transformers {TESTED}). Run the plain "
        "policies (float32, bfloat16, float16) on this model, or a transformers 5.x model whose "
        "layers are one of those; a Gemma 3n or Gemma 4 mitigation needs its own forward here")


def check_supported(model: nn.Module) -> tuple[nn.Module, nn.Module, list[str]]:
    """(text decoder, the module holding lm_head, each layer's family), or UnsupportedModel naming
    the class and transformers' version that this module does not know."""
    version = _transformers_version()
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else -1
    text, head = text_parts(model)
    families = []
    for layer in text.layers:
        name = type(layer).__name__
        if name not in LAYERS:
            raise _unsupported(f"{type(model).__name__}'s decoder layer {name}", version)
        families.append(LAYERS[name])
    norms = [text.norm] + [getattr(layer, n) for layer in text.layers for n in norm_names(layer)]
    for norm in norms:
        if type(norm).__name__ not in NORMS:
            raise _unsupported(f"{type(model).__name__}'s norm {type(norm).__name__}", version)
    if major != TESTED_MAJOR:
        raise _unsupported(f"{type(model).__name__} (transformers {version}, not 5.x)", version)
    if not isinstance(getattr(head, "lm_head", None), nn.Linear):
        raise _unsupported(f"{type(model).__name__} (no nn.Linear lm_head)", version)
    refuse_replaced(model, [*text.layers, *norms, head.lm_head])
    return text, head, families


def apply_numerics(model: nn.Module, numerics: Numerics, dtype: Optional[torch.dtype] = None,
                   label: str = "") -> Mitigation:
    """Applies `numerics` to a transformers Gemma causal LM in place (module docstring); returns
    the Mitigation that undoes it and says what it changed. `dtype`: the model dtype (default:
    the embedding's); `label`: the policy's name, for the handle's description."""
    return apply_parts(model, numerics, lambda: _parts(model), dtype, label)


def _parts(model: nn.Module) -> Parts:
    text, head, families = check_supported(model)
    return Parts(text.layers, families, text.norm, text.embed_tokens.weight.dtype, _attend,
                 head.lm_head, _float32_head,
                 "lm_head: float32 logits (its weight read as float32)")


def _attend(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return layer.self_attn(hidden_states=x, **kwargs)[0]  # transformers' (output, weights)


def _float32_head(lm_head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # onnxruntime-genai's fix (PRs #1441, #1448): float32 logits from the float32 final norm,
    # the weight read exactly as float32 (copied once: the head is the largest matrix).
    return F.linear(x, kernels.float32_weight(lm_head.weight))
