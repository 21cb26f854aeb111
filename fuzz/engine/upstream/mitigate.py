"""A precision policy's mitigations (fuzz.engine.interface.Numerics) on google/gemma_pytorch's
GemmaForCausalLM: what `--engine upstream` runs a mitigated policy with, and what
fuzz.mitigate.apply does to a user's gemma_pytorch model.

The layer and norm forwards are re-stated once for both libraries, in fuzz.engine.mitigate_layers
(what is replaced, how, and why it computes what the built-in engine computes). This module is
gemma_pytorch's adapter:
- layers: `model.model.layers`, GemmaDecoderLayer (Gemma 1) or Gemma2DecoderLayer (Gemma 2/3,
  whose pre/post-FFN norms may be None); norms: its RMSNorm (which ends with type_as(x), as
  transformers' does); the final norm: `model.model.norm`;
- self_attn returns a tensor. Gemma 1's layer does not pass local_mask to it (its attention is
  global), so neither does the re-stated one;
- the head is the Sampler, `matmul(hidden_states, embedding.t())` then the final softcap, called
  with the embedder's weight. With `float32_logits` its forward is given that weight read as
  float32 (fuzz.engine.kernels.float32_weight, copied once), so the float32 final norm meets a
  float32 matrix, as in the built-in engine.
Only the classes of gemma.model (checked by module and name: transformers' Gemma classes have the
same names) are known; a quantized model (int8 weights) is refused, as the upstream engine does.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
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

__all__ = ["apply_numerics", "check_supported", "is_upstream_model"]

LAYERS = {"GemmaDecoderLayer": GEMMA1, "Gemma2DecoderLayer": SANDWICH}
NORMS = ("RMSNorm",)
_MODULE = "gemma.model"  # where google/gemma_pytorch defines its text model's classes


def is_upstream_model(model: Any) -> bool:
    """Whether `model` is gemma_pytorch's own text GemmaForCausalLM (or a subclass of it)."""
    return any(c.__module__ == _MODULE and c.__name__ == "GemmaForCausalLM"
               for c in type(model).__mro__)


def _is_known(module: nn.Module, names: Any) -> bool:
    return type(module).__module__ == _MODULE and type(module).__name__ in names


def _unsupported(what: str) -> UnsupportedModel:
    return UnsupportedModel(
        f"{what} has no known mitigation: fuzz's mitigations re-state gemma_pytorch's "
        f"{', '.join(LAYERS)} with its RMSNorm and Sampler (gemma/model.py). Run the plain "
        "policies (float32, bfloat16, float16) on this model, or build an unquantized "
        "gemma.model.GemmaForCausalLM")


def check_supported(model: nn.Module) -> list[str]:
    """Each layer's family, or UnsupportedModel naming the class this module does not know."""
    name = type(model).__name__
    if not is_upstream_model(model):
        raise _unsupported(f"{name} (not gemma_pytorch's gemma.model.GemmaForCausalLM)")
    if getattr(model.config, "quant", False):
        raise _unsupported(f"{name} with quant=True (int8 weights)")
    families = []
    for layer in model.model.layers:
        if not _is_known(layer, LAYERS):
            raise _unsupported(f"{name}'s decoder layer {type(layer).__name__}")
        families.append(LAYERS[type(layer).__name__])
    norms = [model.model.norm] + [getattr(layer, n) for layer in model.model.layers
                                  for n in norm_names(layer)]
    for norm in norms:
        if not _is_known(norm, NORMS):
            raise _unsupported(f"{name}'s norm {type(norm).__name__}")
    refuse_replaced(model, [*model.model.layers, *norms, model.sampler])
    return families


def apply_numerics(model: nn.Module, numerics: Numerics, dtype: Optional[torch.dtype] = None,
                   label: str = "") -> Mitigation:
    """Applies `numerics` to gemma_pytorch's GemmaForCausalLM in place (module docstring);
    returns the Mitigation that undoes it and says what it changed. `dtype`: the model dtype
    (default: the embedder's); `label`: the policy's name, for the handle's description."""
    return apply_parts(model, numerics, lambda: _parts(model), dtype, label)


def _parts(model: nn.Module) -> Parts:
    families = check_supported(model)
    return Parts(model.model.layers, families, model.model.norm, model.embedder.weight.dtype,
                 _attend, model.sampler, _float32_sampler,
                 "sampler: float32 logits (the embedding read as float32)")


def _attend(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    if LAYERS[type(layer).__name__] == GEMMA1:  # upstream's Gemma 1 layer passes no local_mask
        kwargs = {k: v for k, v in kwargs.items() if k != "local_mask"}
    return layer.self_attn(hidden_states=x, **kwargs)


def _float32_sampler(sampler: nn.Module, embedding: torch.Tensor, hidden_states: torch.Tensor,
                     *args: Any, **kwargs: Any) -> Any:
    # onnxruntime-genai's fix (PRs #1441, #1448), as the built-in engine: float32 logits from
    # the float32 final norm; upstream's own sampler code does the product and the softcap.
    return type(sampler).forward(sampler, kernels.float32_weight(embedding), hidden_states,
                                 *args, **kwargs)
