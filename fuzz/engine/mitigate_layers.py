"""A precision policy's mitigations (fuzz.engine.interface.Numerics) re-stated on another
library's Gemma decoder layers: the part transformers' classes (fuzz.engine.transformers.mitigate)
and google/gemma_pytorch's (fuzz.engine.upstream.mitigate) share.

Both libraries build the same layer: modules input_layernorm, self_attn,
post_attention_layernorm, (pre_feedforward_layernorm), mlp, (post_feedforward_layernorm), and
RMSNorms that compute in float32 and end with `type_as(x)`. Neither has a clamp or a float32
residual stream, so a mitigation replaces forwards, each an instance attribute: nn.Module's
__call__ still runs, and with it every hook (the engines' probes, fuzz.monitor). The result
computes what the built-in engine (fuzz.engine.model) computes under the same Numerics, op for op:

- layer i's residual stream enters the layer cast to `residual_dtype_at(i, dtype)`: a forward
  pre-hook registered first (prepend), so every other pre-hook (a probe's `layer_in`) sees the
  cast stream, as the built-in Recorder does;
- each layer's forward is re-stated with the built-in engine's adds:
  `clamp_add(residual + branch.to(residual.dtype))`; the attention arguments (masks, RoPE tables,
  cache) go to `self_attn` unchanged, through the library's `Attend`;
- each norm runs its own forward on x.float() (whose final `type_as` is then a no-op) and outputs
  the dtype the built-in engine gives it: pre-norms (input_layernorm, pre_feedforward_layernorm,
  Gemma 1's post_attention_layernorm) the model dtype, since they feed matmuls; post-norms the
  layer's residual dtype; then `clamp_norm`. The final norm is not clamped (nor is it in the
  built-in engine) and outputs float32 with `float32_logits`, else the model dtype.

What differs per library (finding the layers, checking their classes, calling self_attn, the
LM head) stays in the library's module.
"""
from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from fuzz.engine.interface import FAITHFUL, Numerics

_APPLIED = "_gemma_fuzz_mitigation"  # the model attribute that refuses a second application
NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
              "post_feedforward_layernorm")
GEMMA1, SANDWICH = "gemma1", "sandwich"  # pre-norm layers; Gemma 2/3's sandwich norms
# How a library calls a layer's self_attn: (the layer, normed x, the layer's other arguments by
# name) -> the attention output (transformers returns a tuple, gemma_pytorch a tensor).
Attend = Callable[[nn.Module, torch.Tensor, dict], torch.Tensor]


class UnsupportedModel(TypeError, ValueError):
    """A model whose layers (or library version) fuzz has no re-stated forward for. A ValueError
    too, so the command line reports it as the input error it is."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(numerics: Numerics, dtype: Optional[torch.dtype] = None) -> str:
    """The numerics in words, e.g. "residual stream in float32 at layers 2, 3 only"; `dtype`,
    the model's, also names where a plan's stream stays."""
    parts = []
    if numerics.residual_dtype is not None:
        where = ("" if numerics.residual_layers is None else
                 f" at layers {', '.join(map(str, sorted(numerics.residual_layers)))} only"
                 + (f" ({dtype_name(dtype)} elsewhere)" if dtype is not None else ""))
        parts.append(f"residual stream in {dtype_name(numerics.residual_dtype)}{where}")
    if numerics.clamp is not None:
        what = "residual adds and norm outputs" if numerics.clamp_norms else "residual adds"
        parts.append(f"{what} clamped to ±{numerics.clamp:g}")
    if numerics.float32_logits:
        parts.append("final norm and logits in float32")
    return "; ".join(parts) or "the model's own numerics"


class Mitigation:
    """What a mitigation changed (`changes`, `str()`), and how to undo it: `remove()`, or use it
    as a context manager. A deepcopy of the model runs mitigated too, on its own modules; this
    handle undoes the original only."""

    def __init__(self, model: nn.Module, numerics: Numerics, label: str = "",
                 described_as: str = "") -> None:
        self.model, self.numerics = model, numerics
        self.label = label  # the policy's name where the caller knows it
        self.described_as = described_as or type(model).__name__  # what str() calls the model
        self.changes: list[str] = []  # one line per kind of module changed, in order
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

    def on_remove(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

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

    def __str__(self) -> str:
        return summary(self.label, self.numerics, self.active, self.described_as, self.changes)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self}>"

    def __enter__(self) -> Mitigation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def summary(label: str, numerics: Numerics, active: bool, model: str,
            changes: Sequence[str]) -> str:
    """A handle's one paragraph: which policy, on what, doing what, and what it changed."""
    name = f"Policy {label}" if label else "A mitigation"
    state = "applied to" if active else "removed from"
    if not changes:
        return f"{name} {state} {model}: nothing changed (the model's own numerics)."
    changed = "Changed" if active else "Had changed (undone)"
    return f"{name} ({describe(numerics)}) {state} {model}. {changed}: {'; '.join(changes)}."


def begin(model: nn.Module, numerics: Numerics, label: str = "",
          described_as: str = "") -> Mitigation:
    """A new Mitigation for `model`, refused while another one is applied to it."""
    existing = getattr(model, _APPLIED, None)
    if existing is not None:
        what = existing.label or describe(existing.numerics)
        raise RuntimeError(f"{type(model).__name__} already runs a mitigation ({what}); call "
                           ".remove() on the handle the first apply returned before applying "
                           "another")
    return Mitigation(model, numerics, label, described_as)


def mark(model: nn.Module, mitigation: Mitigation) -> None:
    setattr(model, _APPLIED, mitigation)


@dataclass(frozen=True)
class Parts:
    """What a library's adapter finds in a model it supports: the decoder layers and their
    families, the final norm, the model dtype, how to call a layer's attention, and the module
    whose forward `float32_logits` replaces (with what, and how the handle says so)."""

    layers: Sequence[nn.Module]
    families: Sequence[str]
    final_norm: nn.Module
    dtype: torch.dtype
    attend: Attend
    head: nn.Module
    float32_head: Callable[..., Any]
    head_change: str


def apply_parts(model: nn.Module, numerics: Numerics, parts_of: Callable[[], Parts],
                dtype: Optional[torch.dtype] = None, label: str = "") -> Mitigation:
    """Applies `numerics` in place with the parts the adapter's `parts_of()` finds (it raises
    UnsupportedModel for a model it does not know; faithful numerics never ask it); returns the
    Mitigation that undoes it and says what it changed."""
    mitigation = begin(model, numerics, label)
    if numerics == FAITHFUL:  # the model's own numerics: nothing to change, on any class
        mark(model, mitigation)
        return mitigation
    parts = parts_of()
    mark(model, mitigation)
    try:
        restate(mitigation, parts.layers, parts.families, parts.final_norm,
                dtype or parts.dtype, parts.attend)
        if numerics.float32_logits:
            mitigation.replace_forward(parts.head, parts.float32_head)
            mitigation.changes.append(parts.head_change)
    except BaseException:
        mitigation.remove()
        raise
    return mitigation


def norm_names(layer: nn.Module) -> list[str]:
    """The layer's norms (gemma_pytorch sets an absent pre/post-FFN norm to None)."""
    return [n for n in NORM_NAMES if getattr(layer, n, None) is not None]


def refuse_replaced(model: nn.Module, modules: Sequence[nn.Module]) -> None:
    """Someone else's wrapper (accelerate's offloading hooks replace forward so): ours would
    bypass it, and theirs would not know the mitigation."""
    for module in modules:
        if "forward" in module.__dict__:
            raise UnsupportedModel(
                f"{type(model).__name__}'s {type(module).__name__} already has its forward "
                "replaced (accelerate's offloading, or another patch); load the model on one "
                "device without device_map offloading, then apply the mitigation")


def restate(mitigation: Mitigation, layers: Sequence[nn.Module], families: Sequence[str],
            final_norm: nn.Module, dtype: torch.dtype, attend: Attend) -> None:
    """Re-states every layer's and norm's forward (module docstring); the caller does the head.
    On an error the caller removes the mitigation."""
    num = mitigation.numerics
    norms = 0
    for i, (layer, family) in enumerate(zip(layers, families, strict=True)):
        norms += _mitigate_layer(mitigation, layer, i, family, num, dtype, attend)
    head_dtype = torch.float32 if num.float32_logits else dtype
    mitigation.replace_forward(final_norm, norm_forward(final_norm, head_dtype, FAITHFUL))
    label = f"{mitigation.label}: " if mitigation.label else ""
    mitigation.changes.append(f"{len(layers)} decoder layers' forward re-stated "
                              f"({label}{describe(num, dtype)})")
    mitigation.changes.append(
        f"{norms} RMSNorm forwards: computed on a float32 input, output in "
        f"{dtype_name(dtype)} (pre-norms) or the residual stream's dtype (post-norms), "
        f"{_clamped(num)}")
    mitigation.changes.append(f"final norm: output in {dtype_name(head_dtype)}, unclamped")


def _clamped(num: Numerics) -> str:
    if num.clamp is None or not num.clamp_norms:
        return "unclamped"
    return f"clamped to ±{num.clamp:g}"


def norm_forward(norm: nn.Module, out_dtype: torch.dtype,
                 numerics: Numerics) -> Callable[..., torch.Tensor]:
    original = type(norm).forward

    def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Both libraries' Gemma norms end with type_as(x): on float32 x that is a no-op, so the
        # cast below is the only rounding, as the built-in RMSNorm's `.to(out_dtype)`.
        return numerics.clamp_norm(original(module, x.float()).to(out_dtype))
    return forward


def _mitigate_layer(mitigation: Mitigation, layer: nn.Module, index: int, family: str,
                    num: Numerics, dtype: torch.dtype, attend: Attend) -> int:
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
    if family == GEMMA1:
        pre_norms.add("post_attention_layernorm")  # Gemma 1's pre-MLP norm
    names = norm_names(layer)
    for name in names:
        norm = getattr(layer, name)
        out = dtype if name in pre_norms else residual_dtype
        mitigation.replace_forward(norm, norm_forward(norm, out, num))
    mitigation.replace_forward(layer, _layer_forward(layer, family, residual_dtype, num, attend))
    return len(names)


def _layer_forward(layer: nn.Module, family: str, residual_dtype: torch.dtype, num: Numerics,
                   attend: Attend) -> Callable[..., torch.Tensor]:
    # Positional arguments after hidden_states are named as the library's own forward names
    # them, then passed on to self_attn by name.
    names = [p.name for p in inspect.signature(type(layer).forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][2:]

    def add(residual: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return num.clamp_add(residual + branch.to(residual.dtype))

    def optional(module: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
        return x if module is None else module(x)  # gemma_pytorch: absent FFN norms are None

    def forward(layer: nn.Module, hidden_states: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        if len(args) > len(names):
            raise TypeError(f"{type(layer).__name__}.forward got {len(args) + 1} positional "
                            f"arguments; it takes at most {len(names) + 1}")
        kwargs.update(zip(names, args))
        h = hidden_states.to(residual_dtype)  # done by the pre-hook already: a no-op then
        x = attend(layer, layer.input_layernorm(h), kwargs)
        if family == GEMMA1:
            h = add(h, x)
            x = layer.mlp(layer.post_attention_layernorm(h))
            return add(h, x)
        h = add(h, layer.post_attention_layernorm(x))
        x = layer.mlp(optional(getattr(layer, "pre_feedforward_layernorm", None), h))
        return add(h, optional(getattr(layer, "post_feedforward_layernorm", None), x))
    return forward
