"""Module hooks that report a model's tensors to a Recorder: what the probes of other people's
models (google/gemma_pytorch's: fuzz.engine.upstream.hooks; transformers': transformers_hooks)
share. Each registers forward hooks and pre-hooks and removes them all at once."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class ModuleHooks:
    """The hook handles of one probe, and how it registers them."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre(self, module: nn.Module, fn: Callable[[torch.Tensor], None],
             kwargs: bool = False) -> None:
        """Calls fn with the module's first input (a model or decoder layer may get
        hidden_states by keyword; norms, projections and MLPs get it positionally)."""
        if kwargs:
            def hook(_m: nn.Module, args: tuple, kw: dict) -> None:
                fn(kw["hidden_states"] if "hidden_states" in kw else args[0])
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            self.handles.append(module.register_forward_pre_hook(lambda _m, args: fn(args[0])))

    def _post(self, module: nn.Module, fn: Callable[[Any], None]) -> None:
        self.handles.append(module.register_forward_hook(lambda _m, _args, out: fn(out)))
