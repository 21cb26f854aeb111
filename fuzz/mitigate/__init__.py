"""Library API: run your own Gemma under one of fuzz's mitigated precision policies.

    import torch
    from transformers import AutoModelForCausalLM
    from fuzz.mitigate import apply
    from fuzz.monitor import watch

    model = AutoModelForCausalLM.from_pretrained("google/gemma-3-270m", dtype=torch.float16)
    with apply(model, "float16-fp32-residual"), watch(model, on_nonfinite="raise") as m:
        model.generate(**inputs, max_new_tokens=16)
    print(m.report())

`apply(model, policy)` changes the model in place and returns a handle that undoes it
(`.remove()`, or leave its `with` block) and says what it changed (`.changes`, one line per
kind of module; `str(handle)`, a paragraph). `policy` is a policy name of fuzz.precision
(float16-clamp, float16-fp32-residual, float16-clip32752, float16-fp32-norm-residual, a plan
`float16-fp32-layers:7+8` or `plan:FILE.json` from `fuzz advise --plan`) or a PrecisionPolicy.
The model must already be in the policy's dtype (every mitigated policy is float16: convert it
with `model.to(torch.float16)`); its numerics are then the ones fuzz measured, op for op:

- a transformers GemmaForCausalLM, Gemma2ForCausalLM or Gemma3ForCausalLM (or the language model
  of a Gemma 3 multimodal wrapper): forwards replaced by fuzz.engine.transformers.mitigate, the
  same code `--engine transformers` runs; module hooks (fuzz.monitor's) keep working;
- google/gemma_pytorch's gemma.model.GemmaForCausalLM (Gemma 1/2/3): forwards replaced by
  fuzz.engine.upstream.mitigate, the same code `--engine upstream` runs (both libraries share
  the re-stated layers, fuzz.engine.mitigate_layers);
- the built-in engine's fuzz.engine.model.GemmaForCausalLM: its `numerics` set.

Gemma 3n and Gemma 4 have no mitigation here (their layers differ); a second `apply` before the
first is removed is refused.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from fuzz.engine.interface import FAITHFUL, Numerics
from fuzz.engine.mitigate_layers import Mitigation, begin, describe, mark
from fuzz.engine.model import GemmaForCausalLM as BuiltinModel
from fuzz.engine.upstream.mitigate import is_upstream_model
from fuzz.precision import PrecisionPolicy, get_policy

__all__ = ["Mitigation", "apply", "model_dtype"]


def _apply_builtin(model: BuiltinModel, numerics: Numerics, label: str) -> Mitigation:
    """The built-in forward reads `model.numerics` itself: one change, undone on remove()."""
    if model.numerics != FAITHFUL:  # built with a policy's numerics, or applied already
        raise RuntimeError(f"this built-in model already runs a policy (numerics "
                           f"{model.numerics}); remove() the handle that applied it, or "
                           "build the model faithful (fuzz.engine.model.materialize without "
                           "numerics), before applying another")
    mitigation = begin(model, numerics, label, "the built-in GemmaForCausalLM")
    if numerics != FAITHFUL:
        model.numerics = numerics
        mitigation.on_remove(lambda: setattr(model, "numerics", FAITHFUL))
        mitigation.changes.append(f"numerics set to {describe(numerics, model.dtype)}")
    mark(model, mitigation)
    return mitigation


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: its input embedding's (transformers' `model.dtype` is the
    first floating parameter's, which a multimodal wrapper's vision tower may hold)."""
    if isinstance(model, BuiltinModel):
        return model.dtype
    if is_upstream_model(model):  # gemma_pytorch: its tied embedding is `embedder`
        return model.embedder.weight.dtype
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embedding = get_embeddings() if callable(get_embeddings) else None
    if embedding is None or not hasattr(embedding, "weight"):
        raise TypeError(f"{type(model).__name__} is not a Gemma causal LM fuzz can mitigate "
                        "(no input embedding); pass a transformers Gemma*ForCausalLM, "
                        "gemma_pytorch's gemma.model.GemmaForCausalLM or the built-in engine's "
                        "fuzz.engine.model.GemmaForCausalLM")
    return embedding.weight.dtype


def apply(model: nn.Module, policy: Union[str, PrecisionPolicy]) -> Mitigation:
    """Runs `model` under `policy` from now on (module docstring); returns the handle that undoes
    it (`.remove()`, or a context manager)."""
    chosen = get_policy(policy) if isinstance(policy, str) else policy
    if not isinstance(chosen, PrecisionPolicy):
        raise TypeError(f"policy must be a policy name or a fuzz.precision.PrecisionPolicy, got "
                        f"{type(policy).__name__}")
    dtype = model_dtype(model)
    if dtype != chosen.dtype:
        raise ValueError(f"{type(model).__name__} is in {dtype} but policy {chosen.name!r} runs "
                         f"in {chosen.dtype}: convert the model first, e.g. "
                         f"model.to({chosen.dtype}), then apply the policy")
    if isinstance(model, BuiltinModel):
        return _apply_builtin(model, chosen.numerics, chosen.name)
    if is_upstream_model(model):
        from fuzz.engine.upstream.mitigate import apply_numerics as upstream_apply

        return upstream_apply(model, chosen.numerics, chosen.dtype, chosen.name)
    from fuzz.engine.transformers.mitigate import apply_numerics

    return apply_numerics(model, chosen.numerics, chosen.dtype, chosen.name)
