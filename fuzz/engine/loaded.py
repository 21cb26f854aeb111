"""A model loaded for testing: config, float32 master weights, tokenizer and fingerprint.

A LoadedModel keeps one float32 master copy of the weights; each policy's model is cast from it
(never re-reading the weights) and cached, one per (policy, device, engine).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from fuzz.engine.config import GemmaConfig
from fuzz.engine.model import materialize

# "transformers" runs transformers' own classes with its default attention; the -eager/-sdpa
# kinds name the attention (fuzz.engine.transformers.engine).
ENGINES = ("builtin", "upstream", "transformers", "transformers-eager", "transformers-sdpa")


@dataclass
class LoadedModel:
    name: str
    config: GemmaConfig
    state: dict[str, torch.Tensor]  # float32 master copy, upstream parameter names
    tokenizer: Any  # fuzz.engine.tokenizer.Tokenizer
    fingerprint: str  # sha256 of weights + config + tokenizer
    source: str  # where the weights came from (path or "synthetic")
    # A model only transformers runs (Gemma 3n/4: fuzz.engine.synthetic.transformers_only): its
    # HF config and state (then `state` holds transformers' names too); None for every other.
    transformers: Any = None
    # Where to find the model again, recorded in its corpus cases: a zoo model's name, or the
    # absolute path of a file or directory model (set by fuzz.engine.zoo.load_model).
    location: str = ""
    # The chat template a Hugging Face directory's tokenizer carries (fuzz.engine.hf_dir); None:
    # Gemma's own (fuzz.prompts.chat). It is the model's: a chat prompt is rendered with it.
    chat_template: str | None = None
    _engines: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def engine(self, policy: Any, device: str | torch.device = "cpu",
               kind: str = "builtin") -> Any:
        """The model cast for a precision policy (fuzz.precision.PrecisionPolicy), cached."""
        key = (policy.name, str(device), kind)
        if key not in self._engines:
            self._engines[key] = self._build(policy, device, kind)
        return self._engines[key]

    def release(self, policy: Any, device: str | torch.device = "cpu",
                kind: str = "builtin") -> None:
        """Drops the cached model of a policy that will not run again (each plan that `fuzz
        advise --plan` tries is its own policy: keeping all of them cost ~0.5 GB each on Gemma 3
        270M, 13.8 GB peak over one search)."""
        self._engines.pop((policy.name, str(device), kind), None)

    def _build(self, policy: Any, device: str | torch.device, kind: str) -> Any:
        if kind.startswith("transformers"):
            from fuzz.engine.transformers.engine import TransformersEngine, attention_of

            return TransformersEngine(self, policy, device, attention_of(kind))
        if self.transformers is not None and kind in ENGINES:
            raise ValueError(
                f"model {self.name!r} is a {self.transformers.family} model, which only "
                f"transformers' classes run; use --engine transformers (not {kind})")
        if kind == "builtin":
            return materialize(self.config, self.state, policy.dtype, policy.numerics, device)
        if kind == "upstream":
            from fuzz.engine.upstream.engine import UpstreamEngine

            return UpstreamEngine(self.config, self.state, policy.dtype, device,
                                  self.tokenizer.serialized_model_proto(), policy.numerics)
        raise ValueError(f"unknown engine {kind!r}; valid engines are: {', '.join(ENGINES)}")


def engine_class(kind: str) -> type:
    """The class that runs engine `kind` (imported only when asked for): what it can do, e.g.
    `supports_padding`, without building one."""
    if kind.startswith("transformers"):
        from fuzz.engine.transformers.engine import TransformersEngine

        return TransformersEngine
    if kind == "upstream":
        from fuzz.engine.upstream.engine import UpstreamEngine

        return UpstreamEngine
    if kind == "builtin":
        from fuzz.engine.model import GemmaForCausalLM

        return GemmaForCausalLM
    raise ValueError(f"unknown engine {kind!r}; valid engines are: {', '.join(ENGINES)}")


def state_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint(config: GemmaConfig, weights_hash: str, tokenizer: Any) -> str:
    """What identifies a model: its config, its weights and its tokenizer (32 hex digits)."""
    h = hashlib.sha256()
    h.update(config.fingerprint_text().encode())
    h.update(weights_hash.encode())
    h.update(tokenizer.fingerprint().encode())
    return h.hexdigest()[:32]
