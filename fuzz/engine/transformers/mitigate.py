"""A precision policy's mitigations (fuzz.engine.interface.Numerics) on transformers' own Gemma.

transformers' Gemma classes have no clamp and no float32 residual stream, so a mitigation is
applied to a built model by replacing forwards, each an instance attribute: nn.Module's __call__
still runs, and with it every hook (the probes of fuzz.engine.transformers.hooks and
fuzz.monitor). The result computes what the built-in engine (fuzz.engine.model) computes under
the same Numerics, op for op:

- layer i's residual stream enters the layer cast to `residual_dtype_at(i, dtype)`. The cast is
  a forward pre-hook on the layer, registered first (prepend), so every other pre-hook (the
  probe's `layer_in`) sees the cast stream, as the built-in Recorder does;
- each decoder layer's forward is transformers' own, re-stated with the built-in engine's adds:
  `clamp_add(residual + branch.to(residual.dtype))`. The attention arguments (masks, RoPE
  tables, cache, position ids and transformers' **kwargs) are passed to `self_attn` unchanged;
- each norm computes in float32, as before (the original forward on x.float(), whose final
  `type_as` is then a no-op), and outputs the dtype the built-in engine gives it: pre-norms
  (input_layernorm, pre_feedforward_layernorm; Gemma 1's post_attention_layernorm, its pre-MLP
  norm) the model dtype, since they feed matmuls; post-norms (Gemma 2/3's
  post_attention_layernorm and post_feedforward_layernorm) the layer's residual dtype; then
  `clamp_norm`. The q/k norms inside attention are left alone (the built-in engine does not
  clamp them either);
- the final norm outputs float32 with `float32_logits` (else the model dtype, unclamped, as the
  built-in engine), and the LM head then multiplies by its weight read as float32.

Faithful Numerics change nothing. Known layers: GemmaDecoderLayer, Gemma2DecoderLayer and
Gemma3DecoderLayer (also inside a multimodal wrapper's language model), checked with
transformers 5.25; any other class (Gemma 3n's AltUp/LAuReL layers, Gemma 4's) or another major
version of transformers is refused with the class and version named: their forwards differ, and
a re-stated forward that silently dropped a step would change the model, not mitigate it.
"""
from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fuzz.engine import kernels
from fuzz.engine.interface import FAITHFUL, Numerics
from fuzz.engine.transformers.hooks import text_parts

TESTED = "5.25"  # the transformers release these forwards were re-stated from
TESTED_MAJOR = 5
# transformers' decoder-layer classes whose forward this module re-states: Gemma 1 (pre-norm
# attention and MLP) and the sandwich-norm Gemma 2/3.
LAYERS = {"GemmaDecoderLayer": "gemma1", "Gemma2DecoderLayer": "sandwich",
          "Gemma3DecoderLayer": "sandwich"}
NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")
_APPLIED = "_gemma_fuzz_mitigation"  # the model attribute that refuses a second application


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


class UnsupportedModel(TypeError, ValueError):
    """A model whose layers (or transformers version) this module does not know. A ValueError
    too, so the command line reports it as the input error it is."""


def _unsupported(what: str, version: str) -> UnsupportedModel:
    return UnsupportedModel(
        f"{what} has no known mitigation in transformers {version}: fuzz's mitigations re-state "
        f"the forwards of {', '.join(LAYERS)} (tested with transformers {TESTED}). Run the plain "
        "policies (float32, bfloat16, float16) on this model, or a transformers 5.x model whose "
        "layers are one of those; a Gemma 3n or Gemma 4 mitigation needs its own forward here")


class Mitigation:
    """What `apply_numerics` changed, and how to undo it: `remove()`, or use it as a context
    manager (`with apply_numerics(model, num): ...`). A deepcopy of the model runs mitigated
    too, on its own modules; this handle undoes the original only."""

    def __init__(self, model: nn.Module, numerics: Numerics) -> None:
        self.model, self.numerics = model, numerics
        self._undo: list[Callable[[], None]] = []
        self.active = True

    def replace_forward(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        """module.forward = forward bound to the module: a bound method, so that a deepcopy of
        the model binds its copy to the copied module (a closure would run the original's)."""
        had = "forward" in module.__dict__
        previous = module.__dict__.get("forward")
        module.forward = types.MethodType(forward, module)

        def undo() -> None:
            if had:
                module.forward = previous
            else:
                del module.forward
        self._undo.append(undo)

    def add_handle(self, handle: Any) -> None:
        self._undo.append(handle.remove)

    def remove(self) -> None:
        """Restores every forward and removes the pre-hooks; a second call does nothing."""
        if not self.active:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if getattr(self.model, _APPLIED, None) is self:
            delattr(self.model, _APPLIED)
        self.active = False

    def __enter__(self) -> Mitigation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


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
    norms = [text.norm] + [getattr(layer, n) for layer in text.layers for n in _norm_names(layer)]
    for norm in norms:
        if type(norm).__name__ not in NORMS:
            raise _unsupported(f"{type(model).__name__}'s norm {type(norm).__name__}", version)
    if major != TESTED_MAJOR:
        raise _unsupported(f"{type(model).__name__} (transformers {version}, not 5.x)", version)
    if not isinstance(getattr(head, "lm_head", None), nn.Linear):
        raise _unsupported(f"{type(model).__name__} (no nn.Linear lm_head)", version)
    for module in [*text.layers, *norms, head.lm_head]:
        if "forward" in module.__dict__:
            # Someone else's wrapper (accelerate's offloading hooks replace forward so): ours
            # would bypass it, and theirs would not know the mitigation.
            raise UnsupportedModel(
                f"{type(model).__name__}'s {type(module).__name__} already has its forward "
                "replaced (accelerate's offloading, or another patch); load the model on one "
                "device without device_map offloading, then apply the mitigation")
    return text, head, families


def _norm_names(layer: nn.Module) -> list[str]:
    return [n for n in ("input_layernorm", "post_attention_layernorm",
                        "pre_feedforward_layernorm", "post_feedforward_layernorm")
            if hasattr(layer, n)]


def apply_numerics(model: nn.Module, numerics: Numerics,
                   dtype: Optional[torch.dtype] = None) -> Mitigation:
    """Applies `numerics` to a transformers Gemma causal LM in place (module docstring); returns
    the Mitigation that undoes it. `dtype`: the model dtype (default: the embedding's)."""
    existing = getattr(model, _APPLIED, None)
    if existing is not None:
        raise RuntimeError(f"{type(model).__name__} already runs a mitigation "
                           f"({existing.numerics}); call .remove() on the handle the first "
                           "apply returned before applying another")
    mitigation = Mitigation(model, numerics)
    if numerics == FAITHFUL:  # the model's own numerics: nothing to change, on any class
        setattr(model, _APPLIED, mitigation)
        return mitigation
    text, head, families = check_supported(model)
    setattr(model, _APPLIED, mitigation)
    dtype = dtype or text.embed_tokens.weight.dtype
    try:
        for i, (layer, family) in enumerate(zip(text.layers, families, strict=True)):
            _mitigate_layer(mitigation, layer, i, family, numerics, dtype)
        head_dtype = torch.float32 if numerics.float32_logits else dtype
        # The final norm is not clamped in the built-in engine (only the layers' norms are).
        mitigation.replace_forward(text.norm, _norm_forward(text.norm, head_dtype, FAITHFUL))
        if numerics.float32_logits:
            mitigation.replace_forward(head.lm_head, _float32_head)
    except BaseException:
        mitigation.remove()
        raise
    return mitigation


def _float32_head(lm_head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # onnxruntime-genai's fix (PRs #1441, #1448): float32 logits from the float32 final norm,
    # the weight read exactly as float32 (copied once: the head is the largest matrix).
    return F.linear(x, kernels.float32_weight(lm_head.weight))


def _norm_forward(norm: nn.Module, out_dtype: torch.dtype,
                  numerics: Numerics) -> Callable[..., torch.Tensor]:
    original = type(norm).forward

    def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # transformers' Gemma norms end with type_as(x): on float32 x that is a no-op, so the
        # cast below is the only rounding, as the built-in RMSNorm's `.to(out_dtype)`.
        return numerics.clamp_norm(original(module, x.float()).to(out_dtype))
    return forward


def _mitigate_layer(mitigation: Mitigation, layer: nn.Module, index: int, family: str,
                    num: Numerics, dtype: torch.dtype) -> None:
    residual_dtype = num.residual_dtype_at(index, dtype)

    def cast(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # The built-in engine casts the stream before the layer runs (a plan's float32 span
        # returns to the model dtype where the next layer starts); prepended, so hooks
        # registered later (the probes) see the cast stream.
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].to(residual_dtype)}
        else:
            args = (args[0].to(residual_dtype), *args[1:])
        return args, kwargs
    mitigation.add_handle(layer.register_forward_pre_hook(cast, with_kwargs=True, prepend=True))
    pre_norms = {"input_layernorm", "pre_feedforward_layernorm"}
    if family == "gemma1":
        pre_norms.add("post_attention_layernorm")  # Gemma 1's pre-MLP norm
    for name in _norm_names(layer):
        norm = getattr(layer, name)
        out = dtype if name in pre_norms else residual_dtype
        mitigation.replace_forward(norm, _norm_forward(norm, out, num))
    mitigation.replace_forward(layer, _layer_forward(layer, family, residual_dtype, num))


def _layer_forward(layer: nn.Module, family: str, residual_dtype: torch.dtype,
                   num: Numerics) -> Callable[..., torch.Tensor]:
    # Positional arguments after hidden_states (transformers 5.25 passes them by keyword) are
    # named as transformers' own forward names them, then passed on to self_attn unchanged.
    names = [p.name for p in inspect.signature(type(layer).forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][2:]

    def add(residual: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return num.clamp_add(residual + branch.to(residual.dtype))

    def forward(layer: nn.Module, hidden_states: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        if len(args) > len(names):
            raise TypeError(f"{type(layer).__name__}.forward got {len(args) + 1} positional "
                            f"arguments; it takes at most {len(names) + 1}")
        kwargs.update(zip(names, args))
        h = hidden_states.to(residual_dtype)  # done by the pre-hook already: a no-op then
        x = layer.input_layernorm(h)
        x, _ = layer.self_attn(hidden_states=x, **kwargs)
        if family == "gemma1":
            h = add(h, x)
            x = layer.mlp(layer.post_attention_layernorm(h))
            return add(h, x)
        h = add(h, layer.post_attention_layernorm(x))
        x = layer.mlp(layer.pre_feedforward_layernorm(h))
        return add(h, layer.post_feedforward_layernorm(x))
    return forward
