"""How fuzz.monitor attaches its probe to each kind of model, and what it reads of each forward.

Three kinds, each reporting the built-in site names (fuzz.engine.interface) to one
fuzz.probe.Probe:
- the built-in engine (fuzz.engine.model.GemmaForCausalLM): its forward takes a Recorder; a
  pre-hook hands it the probe (teed with the caller's own recorder when one is passed), so the
  sites are exactly those fuzz.generate sees;
- google/gemma_pytorch's `gemma.model.GemmaForCausalLM` (also inside fuzz.engine.upstream.engine's
  UpstreamEngine): module hooks, fuzz.engine.upstream.hooks.HookProbe;
- a transformers Gemma causal LM: module hooks, fuzz.engine.transformers.hooks.
Around each forward of the model itself, a pre-hook calls `begin(StepInputs)` with the input
token ids, their positions and which columns are real (not padding), and a post-hook calls
`end()`; hooks stay registered from attach() to detach().
"""
from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from fuzz.engine.config import GemmaConfig
from fuzz.engine.model import GemmaForCausalLM as BuiltinModel
from fuzz.engine.upstream.hooks import HookProbe
from fuzz.generate import Tee
from fuzz.probe import Probe


@dataclass(frozen=True)
class StepInputs:
    """What one forward was fed: token ids [B, T] (None when the caller passed embeddings),
    positions in each row's sequence ([B, T] or a shared [T]), real columns [B, T] (None: all)."""

    token_ids: Optional[torch.Tensor]
    positions: torch.Tensor
    valid: Optional[torch.Tensor] = None


Begin = Callable[[StepInputs], None]
End = Callable[[], None]


class Attachment:
    """The model-level pre/post hooks every kind shares, plus the kind's own site hooks."""

    kind = "?"

    def __init__(self, model: nn.Module, probe: Probe, begin: Begin, end: End,
                 num_layers: int) -> None:
        self.model, self.probe, self.begin, self.end = model, probe, begin, end
        self.num_layers = num_layers
        self._handles: list[Any] = []

    def attach(self) -> None:
        if self._handles:
            raise RuntimeError("this monitor is already attached; use one `with watch(...)` "
                               "block at a time per monitor")
        # Registered before the site hooks, so that begin() precedes every site of a forward.
        self._handles.append(self.model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self._attach_sites()
        # Registered after them, so that end() follows every site (a site hook on the model
        # itself would otherwise run after it).
        self._handles.append(self.model.register_forward_hook(lambda *_: self.end()))

    def detach(self) -> None:
        self._detach_sites()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre(self, _module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        self.begin(self.inputs(args, kwargs))
        return None

    def inputs(self, args: tuple, kwargs: dict) -> StepInputs:
        raise NotImplementedError

    def _attach_sites(self) -> None:
        pass

    def _detach_sites(self) -> None:
        pass


class BuiltinAttachment(Attachment):
    """fuzz.engine.model.GemmaForCausalLM: forward(batch, cache, rec=None, last_only=True)."""

    kind = "builtin"

    def _pre(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        self.begin(self.inputs(args, kwargs))
        # The recorder is forward's third parameter, passed by position or by keyword.
        if len(args) >= 3:
            args = (*args[:2], Tee(self.probe, args[2]), *args[3:])
        else:
            kwargs = {**kwargs, "rec": Tee(self.probe, kwargs.get("rec"))}
        return args, kwargs

    def inputs(self, args: tuple, kwargs: dict) -> StepInputs:
        batch = args[0] if args else kwargs["batch"]
        t = batch.token_ids.shape[1]
        # The new tokens' cache slots tell padding (left-padded rows) from real tokens.
        valid = batch.key_valid[:, batch.slot_start: batch.slot_start + t]
        return StepInputs(batch.token_ids, batch.positions, valid)


class UpstreamAttachment(Attachment):
    """google/gemma_pytorch's GemmaForCausalLM: forward(input_token_ids, input_positions, ...)."""

    kind = "upstream"

    def __init__(self, model: nn.Module, config: GemmaConfig, probe: Probe, begin: Begin,
                 end: End) -> None:
        super().__init__(model, probe, begin, end, config.num_hidden_layers)
        # Every position of the final norm (upstream normalises them all), not only the last.
        self.hooks = HookProbe(model, config, probe, last_only=False)

    def inputs(self, args: tuple, kwargs: dict) -> StepInputs:
        ids = kwargs["input_token_ids"] if "input_token_ids" in kwargs else args[0]
        positions = kwargs["input_positions"] if "input_positions" in kwargs else args[1]
        return StepInputs(ids, positions)

    def _attach_sites(self) -> None:
        self.hooks.attach()

    def _detach_sites(self) -> None:
        self.hooks.detach()


class TransformersAttachment(Attachment):
    """A transformers Gemma causal LM: forward(input_ids, attention_mask, position_ids,
    past_key_values, inputs_embeds, ..., cache_position, ...)."""

    kind = "transformers"

    def __init__(self, model: nn.Module, probe: Probe, begin: Begin, end: End) -> None:
        from fuzz.engine.transformers.hooks import TransformersHookProbe

        hooks = TransformersHookProbe(model, probe, last_only=False)
        super().__init__(model, probe, begin, end, hooks.last)  # the text model's layer count
        self.hooks = hooks

    def inputs(self, args: tuple, kwargs: dict) -> StepInputs:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = ids.shape if ids is not None else embeds.shape[:2]
        device = ids.device if ids is not None else embeds.device
        return StepInputs(ids, _hf_positions(kwargs, shape[1], device),
                          _hf_valid(kwargs.get("attention_mask"), shape))

    def _attach_sites(self) -> None:
        self.hooks.attach()

    def _detach_sites(self) -> None:
        self.hooks.detach()


def _hf_positions(kwargs: dict, t: int, device: torch.device) -> torch.Tensor:
    """position_ids when given (per row, padding-aware), else the cache slots (cache_position, or
    the cache length + arange), else 0..T-1 (a forward without a cache)."""
    for name in ("position_ids", "cache_position"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    start = 0
    past = kwargs.get("past_key_values")
    if past is not None and hasattr(past, "get_seq_length"):
        start = int(past.get_seq_length())
    return torch.arange(start, start + t, device=device)


def _hf_valid(mask: Any, shape: torch.Size) -> Optional[torch.Tensor]:
    """The new tokens' columns of a 2-D attention_mask [B, past + T] (1 real, 0 padding); None
    for a 4-D or absent mask (every column counts)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return mask[:, -shape[1]:].bool()


def attachment_for(model: Any, probe: Probe, begin: Begin, end: End) -> Attachment:
    """The attachment for `model`, or TypeError naming what was given and what is supported."""
    if isinstance(model, BuiltinModel):
        return BuiltinAttachment(model, probe, begin, end, model.config.num_hidden_layers)
    upstream_model = getattr(model, "upstream_model", None)  # fuzz.engine.upstream.engine's adapter
    if upstream_model is not None and isinstance(getattr(model, "config", None), GemmaConfig):
        return UpstreamAttachment(upstream_model, model.config, probe, begin, end)
    if _is_upstream(model):
        return UpstreamAttachment(model, builtin_config(model.config), probe, begin, end)
    if _is_transformers(model):
        return TransformersAttachment(model, probe, begin, end)
    raise TypeError(
        f"fuzz.monitor cannot watch a {type(model).__module__}.{type(model).__qualname__}: give "
        "fuzz.engine.model.GemmaForCausalLM (e.g. LoadedModel.engine(policy)), an UpstreamEngine "
        "or google/gemma_pytorch's gemma.model.GemmaForCausalLM, or a transformers Gemma causal "
        "LM (e.g. transformers.Gemma3ForCausalLM)")


def _is_upstream(model: Any) -> bool:
    module = sys.modules.get("gemma.model")
    return module is not None and isinstance(model, getattr(module, "GemmaForCausalLM", ()))


def _is_transformers(model: Any) -> bool:
    # Only when transformers is already imported: whoever built the model imported it.
    transformers = sys.modules.get("transformers")
    return (transformers is not None and isinstance(model, transformers.PreTrainedModel)
            and "gemma" in str(getattr(model.config, "model_type", "")).lower())


def builtin_config(upstream_config: Any) -> GemmaConfig:
    """gemma_pytorch's GemmaConfig as ours (the same field names; enums mapped by name), for
    HookProbe, which needs the architecture and the layer count."""
    ours = {f.name for f in dataclasses.fields(GemmaConfig)}
    values = {}
    for field in dataclasses.fields(upstream_config):
        if field.name in ours:
            values[field.name] = _by_name(getattr(upstream_config, field.name))
    values["vision_config"] = None  # the text model is what the hooks watch
    return GemmaConfig.from_dict(values, source="gemma_pytorch's config")


def _by_name(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_by_name(v) for v in value]
    if isinstance(value, dict):
        return {_by_name(k): v for k, v in value.items()}
    return value
