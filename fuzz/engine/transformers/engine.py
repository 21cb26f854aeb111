"""`--engine transformers`: transformers' own Gemma model classes behind the engine interface.

Why: most people run Gemma through transformers, whose code differs from upstream's in op order
(it scales q @ k^T after the product, rotates with cos/sin tables instead of complex numbers, has
SDPA kernels, its own masks) and which alone runs Gemma 3n and Gemma 4. A finding here is about
transformers' model as its users run it; `fuzz compare` sets it beside the other engines.

How it drives transformers (fuzz.engine.interface's protocol: `engine(batch, cache, recorder) ->
logits`, `new_cache`, `dtype`, `device`):
- the model comes from fuzz.engine.transformers.build (our weights mapped to transformers' names,
  an HF directory through from_pretrained, or a transformers-only zoo model), built in the
  policy's dtype;
- the KV cache is transformers' own `DynamicCache` (sliding-window layers keep their window only,
  Gemma 3n/4's KV-sharing layers read the storing layer's states), created per generation;
- left padding: `attention_mask` is the batch's [B, S] key validity, `position_ids` the per-row
  positions (0 at each row's first real token), as transformers' generate() passes them. Padding
  slots keep their (pad-token) K/V, masked out; unlike the built-in engine nothing zeroes them, so
  a padding slot that overflowed could reach a real row through 0 x NaN: verdicts that count are
  confirmed alone (fuzz.session), where no padding exists;
- last_only keeps the logits of the last position only, as generate() does, but as a position
  tensor rather than generate()'s `logits_to_keep=1`: on Gemma 4 the integer also lets the
  KV-sharing layers compute the last position alone (a prefill shortcut: no output depends on
  their other positions), and then no engine would check the same positions as the others, nor
  could a finding there be explained position by position (fuzz.generate.explain). Every layer
  computes every position, as in the built-in and upstream engines;
- every precision policy: a mitigated one's Numerics (clamps, a float32 residual stream, float32
  logits) are applied to the built model by fuzz.engine.transformers.mitigate, which re-states
  the Gemma 1/2/3 layers' forwards with the built-in engine's adds, casts and clamps, hooks
  intact. Gemma 3n and Gemma 4 run the plain policies only (their layers have no such forward);
- attention: `eager` or `sdpa` (transformers' attn_implementation), or transformers' own choice
  (engine kind `transformers`: sdpa where the class has it, eager for Gemma 2). `.attention` says
  which one ran.
Probing: fuzz.engine.transformers.hooks, hooks registered for one forward.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from fuzz.engine.interface import Batch, ForeignEngine, Recorder
from fuzz.engine.transformers.build import (
    ATTENTIONS,
    build_transformers_model,
    check_attention,
    import_transformers,
)
from fuzz.engine.transformers.hooks import TransformersHookProbe
from fuzz.engine.transformers.mitigate import apply_numerics

KINDS = ("transformers", *(f"transformers-{a}" for a in ATTENTIONS))


def engine_kind(engine: str, attention: Optional[str]) -> str:
    """The engine kind of `--engine E [--attention A]`: 'transformers' + 'eager' ->
    'transformers-eager'; an attention for another engine is an error naming the fix."""
    if attention is None:
        return engine
    check_attention(attention)
    if engine != "transformers":
        raise ValueError(f"--attention {attention} applies to --engine transformers only (the "
                         f"{engine} engine has one attention); drop it or use --engine "
                         "transformers")
    return f"transformers-{attention}"


def attention_of(kind: str) -> Optional[str]:
    """'transformers-eager' -> 'eager'; 'transformers' -> None: transformers' own choice (sdpa
    where the class supports it; Gemma 2 has eager only)."""
    if kind not in KINDS:
        raise ValueError(f"unknown transformers engine {kind!r}; valid: {', '.join(KINDS)}")
    return None if kind == "transformers" else kind[len("transformers-"):]


class TransformersCache:
    """transformers' DynamicCache for one generation, with the interface's keep_rows."""

    def __init__(self, model_config: Any) -> None:
        self.hf = import_transformers().DynamicCache(config=model_config)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drops finished rows (early stop) from every layer, as contrastive search does."""
        self.hf.batch_select_indices(rows)


class TransformersEngine(ForeignEngine):
    """A transformers Gemma causal LM run by the generation loop (fuzz.generate)."""

    supports_padding = True

    def __init__(self, loaded: Any, policy: Any, device: torch.device | str,
                 attention: Optional[str] = None) -> None:
        super().__init__(loaded.config, policy.dtype, device)
        self.model = build_transformers_model(loaded, policy.dtype, self._device,
                                              check_attention(attention))
        # A mitigated policy's numerics, applied to transformers' classes as the built-in engine
        # applies them (fuzz.engine.transformers.mitigate); kept for the engine's life.
        self.numerics = policy.numerics
        self.mitigation = (None if policy.faithful
                           else apply_numerics(self.model, policy.numerics, policy.dtype,
                                               policy.name))
        self.attention: str = self.model.config._attn_implementation

    def new_cache(self, batch: int, max_len: int) -> TransformersCache:
        """A fresh DynamicCache (it grows as it goes: batch and max_len need not be fixed)."""
        return TransformersCache(self.model.config)

    def __call__(self, batch: Batch, cache: TransformersCache, rec: Recorder | None = None,
                 last_only: bool = True) -> torch.Tensor:
        return self.forward(batch, cache, rec, last_only)

    @torch.no_grad()
    def forward(self, batch: Batch, cache: TransformersCache, rec: Recorder | None = None,
                last_only: bool = True) -> torch.Tensor:
        """One forward over the batch's new tokens; logits [B, vocab] (last_only) or
        [B, T, vocab]."""
        if not isinstance(cache, TransformersCache):
            raise TypeError(f"the transformers engine needs its own cache (new_cache()), got "
                            f"{type(cache).__name__}")
        t = batch.token_ids.shape[1]
        # A tensor, not the integer 1: see the module docstring (Gemma 4's KV-sharing layers).
        keep = torch.tensor([t - 1], device=self._device) if last_only else 0
        probe = TransformersHookProbe(self.model, rec, last_only) if rec is not None else None
        try:
            if probe is not None:
                probe.attach()
            out = self.model(
                input_ids=batch.token_ids.to(self._device),
                attention_mask=batch.key_valid.to(self._device, torch.long),
                position_ids=batch.positions.to(self._device),
                cache=cache.hf, use_cache=True, logits_to_keep=keep)
        finally:  # hooks live for this forward only, even when a recorder raises
            if probe is not None:
                probe.detach()
        return out.logits[:, -1] if last_only else out.logits
