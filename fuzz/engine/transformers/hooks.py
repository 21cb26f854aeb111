"""Probing a transformers Gemma causal LM through module hooks (fuzz.engine.transformers.engine).

`TransformersHookProbe` registers forward hooks and pre-hooks on a transformers Gemma, Gemma 2,
Gemma 3 (text), Gemma 3n (text) or Gemma 4 (text) causal LM and reports to a Recorder
(fuzz.engine.interface) with the built-in engine's site names, layer indices and order, as
fuzz.engine.upstream.hooks does for google/gemma_pytorch:

- layer -1 'embedding': `model.embed_tokens`'s output (transformers scales inside that module);
- per layer, in execution order: 'input_layernorm', 'qkv' (q_proj, k_proj and v_proj outputs
  concatenated along the last axis: the built-in engine's fused projection), 'attn_output'
  (self_attn's output), 'post_attention_layernorm', 'residual_attn',
  'pre_feedforward_layernorm', 'mlp_act' (down_proj's input), 'mlp_output',
  'post_feedforward_layernorm', 'residual_mlp';
- layer L 'final_norm' (`model.norm`'s output, last position only with last_only) and 'logits'
  (the causal LM's output logits, after final soft-capping, [B, T or 1, vocab]).

Per architecture:
- Gemma 1: no pre/post-FFN norms; 'post_attention_layernorm' is the pre-MLP norm (as upstream).
- Gemma 3n: the residual stream is AltUp's active prediction (input_layernorm's input); 'qkv'
  has no k/v part on KV-sharing layers (they reuse an earlier layer's K/V); four sites the others
  lack: 'laurel' (the LAuReL block's output), 'residual_laurel' (the add (attention residual +
  LAuReL) / sqrt(2), reported as a residual add of those two terms: the division cannot bring
  an overflowed sum back), 'post_per_layer_input_norm' (the per-layer input branch) and
  'layer_output' (the layer's AltUp output, max |x| over the AltUp streams).
- Gemma 4: 'qkv' as for 3n (and no v part where K = V); with the MoE block,
  'post_feedforward_layernorm_1' (the dense MLP's norm), 'pre_feedforward_layernorm_2',
  'moe_output' (the experts' weighted sum), 'post_feedforward_layernorm_2' and 'moe_sum' (the add
  of the dense and expert branches, a residual-style add); with per-layer inputs,
  'post_per_layer_input_norm' and 'residual_per_layer' (its residual add); always
  'layer_output' (after the layer's `layer_scalar`).
- Never recorded: 'attn_scores' (transformers computes them inside an attention function, eager
  or SDPA, with no module boundary), Gemma 3n's AltUp predict/correct internals and the
  per-layer-input preparation at layer -1 (plain tensor code in the text model's forward).

Residual adds are reported through `rec.residual(layer, name, residual, branch, out)`. Where
the sum is a module's input (Gemma 1/2/3: the pre-MLP norm's input, the layer's output) `out` is
the tensor transformers produced. Where it is not (Gemma 3n's adds, Gemma 4's MoE, MLP and
per-layer adds, whose result `layer_scalar` then scales in place), `out` is `residual + branch`
computed here from the two tensors transformers added: the same elementwise add in the same
dtype, so the same bits, and a fresh tensor that no later in-place op changes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fuzz.engine.hooks import ModuleHooks
from fuzz.engine.interface import Recorder

GEMMA_1, SANDWICH, GEMMA_3N, GEMMA_4 = "gemma1", "sandwich", "gemma3n", "gemma4"


def text_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the text decoder with embed_tokens/layers/norm, the module whose output has .logits)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        inner = inner.language_model  # a multimodal wrapper: probe its text model
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        raise TypeError(f"{type(model).__name__} is not a transformers Gemma causal LM (expected "
                        "`.model` with embed_tokens, layers and norm); load it with "
                        "AutoModelForCausalLM or a Gemma*ForCausalLM class")
    return inner, model


def layer_family(layer: nn.Module) -> str:
    """Which decoder-layer structure transformers built (see the module docstring)."""
    if hasattr(layer, "altup") and hasattr(layer, "laurel"):
        return GEMMA_3N
    if hasattr(layer, "layer_scalar"):
        return GEMMA_4
    if hasattr(layer, "pre_feedforward_layernorm"):
        return SANDWICH
    return GEMMA_1


class TransformersHookProbe(ModuleHooks):
    """Reports built-in sites from a transformers Gemma model's modules while attached.

    Usable as a context manager: `with TransformersHookProbe(model, rec): model(...)`."""

    def __init__(self, model: nn.Module, rec: Recorder, last_only: bool = False) -> None:
        self.model, self.rec, self.last_only = model, rec, last_only
        self.text, self.head = text_parts(model)
        self.last = len(self.text.layers)
        super().__init__()
        # Per-layer tensors kept between hooks to report each residual add.
        self.layer_in: torch.Tensor | None = None
        self.branch: torch.Tensor | None = None
        self.mid: torch.Tensor | None = None
        self.qkv: list[torch.Tensor] = []
        self.laurel_out: torch.Tensor | None = None  # Gemma 3n's LAuReL output
        self.dense: torch.Tensor | None = None  # Gemma 4's normed dense-MLP branch (MoE layers)

    def __enter__(self) -> TransformersHookProbe:
        self.attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def attach(self) -> None:
        if self.handles:
            raise RuntimeError("TransformersHookProbe is already attached; detach() it first")
        self._post(self.text.embed_tokens, lambda y: self.rec.site(-1, "embedding", y))
        for i, layer in enumerate(self.text.layers):
            self._attach_layer(i, layer, layer_family(layer))
        self._post(self.text.norm, lambda y: self.rec.site(
            self.last, "final_norm", y[:, -1:] if self.last_only else y))
        self._post(self.head, self._logits)

    # --- per layer ---------------------------------------------------------------------------
    def _attach_layer(self, i: int, layer: nn.Module, family: str) -> None:
        site = self.rec.site
        if family == GEMMA_3N:
            # The residual stream is AltUp's active prediction: input_layernorm's input.
            self._pre(layer.input_layernorm, lambda x: setattr(self, "layer_in", x))
        else:
            self._pre(layer, lambda x: setattr(self, "layer_in", x), kwargs=True)
        self._post(layer.input_layernorm, lambda y: site(i, "input_layernorm", y))
        if family == GEMMA_3N:
            self._post(layer.laurel, lambda y: self._laurel(i, y))
        self._attach_qkv(i, layer.self_attn)
        # Gemma 1 adds the attention output itself; the others overwrite it with the post-norm.
        self._post(layer.self_attn, lambda out: self._branch(i, "attn_output", out[0]))
        if family == GEMMA_1:
            self._attach_gemma1_tail(i, layer)
            return
        self._post(layer.post_attention_layernorm,
                   lambda y: self._branch(i, "post_attention_layernorm", y))
        if family == GEMMA_3N:
            self._attach_gemma3n_tail(i, layer)
            return
        # Gemma 2/3/4: the attention residual's sum is the pre-FFN norm's input.
        self._pre(layer.pre_feedforward_layernorm, lambda x: self._residual_attn(i, x))
        self._post(layer.pre_feedforward_layernorm,
                   lambda y: site(i, "pre_feedforward_layernorm", y))
        self._attach_mlp(i, layer)
        if family == GEMMA_4:
            self._attach_gemma4_tail(i, layer)
            return
        self._post(layer.post_feedforward_layernorm,
                   lambda y: self._branch(i, "post_feedforward_layernorm", y))
        self._post(layer, lambda out: self.rec.residual(i, "residual_mlp", self.mid,
                                                         self.branch, out))

    def _attach_qkv(self, i: int, attn: nn.Module) -> None:
        projections = [p for p in (getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj"))
                       if p is not None]  # KV-sharing layers have no k/v; K = V has no v
        for k, proj in enumerate(projections):
            final = k == len(projections) - 1
            self._post(proj, lambda y, final=final: self._qkv_part(i, y, final))

    def _qkv_part(self, i: int, y: torch.Tensor, final: bool) -> None:
        self.qkv.append(y)
        if final:
            parts, self.qkv = self.qkv, []
            self.rec.site(i, "qkv", parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))

    def _attach_mlp(self, i: int, layer: nn.Module) -> None:
        self._pre(layer.mlp.down_proj, lambda x: self.rec.site(i, "mlp_act", x))
        self._post(layer.mlp, lambda y: self._branch(i, "mlp_output", y))

    def _attach_gemma1_tail(self, i: int, layer: nn.Module) -> None:
        # Gemma 1 adds the attention output itself; the sum feeds the pre-MLP norm.
        self._pre(layer.post_attention_layernorm, lambda x: self._residual_attn(i, x))
        self._post(layer.post_attention_layernorm,
                   lambda y: self.rec.site(i, "post_attention_layernorm", y))
        self._attach_mlp(i, layer)
        self._post(layer, lambda out: self.rec.residual(i, "residual_mlp", self.mid,
                                                         self.branch, out))

    def _attach_gemma3n_tail(self, i: int, layer: nn.Module) -> None:
        site = self.rec.site
        # attn_gated = active_prediction + attn is no module's input: recomputed (same bits).
        self._post(layer.post_attention_layernorm, lambda _y: self._recomputed(i, "residual_attn"))
        self._pre(layer.pre_feedforward_layernorm, lambda x: self._residual_laurel(i, x))
        self._post(layer.pre_feedforward_layernorm,
                   lambda y: site(i, "pre_feedforward_layernorm", y))
        self._attach_mlp(i, layer)
        self._post(layer.post_feedforward_layernorm,
                   lambda y: self._branch(i, "post_feedforward_layernorm", y))
        self._post(layer.post_feedforward_layernorm, lambda _y: self._recomputed(i, "residual_mlp"))
        self._post(layer.post_per_layer_input_norm,
                   lambda y: site(i, "post_per_layer_input_norm", y))
        # [altup streams, B, T, D] -> [B, T, D] of max |x| over the streams (NaN wins).
        self._post(layer, lambda out: site(i, "layer_output", out.abs().amax(dim=0)))

    def _attach_gemma4_tail(self, i: int, layer: nn.Module) -> None:
        site = self.rec.site
        if getattr(layer, "enable_moe_block", False):
            self._post(layer.post_feedforward_layernorm_1,
                       lambda y: self._keep_dense(i, y))
            # The expert path runs on [B * T, D] rows; the probe wants [B, T, D].
            self._post(layer.pre_feedforward_layernorm_2,
                       lambda y: site(i, "pre_feedforward_layernorm_2", y.view(self.mid.shape)))
            self._post(layer.experts, lambda y: site(i, "moe_output", y.view(self.mid.shape)))
            self._post(layer.post_feedforward_layernorm_2, lambda y: self._moe_sum(i, y))
        self._post(layer.post_feedforward_layernorm,
                   lambda y: self._branch(i, "post_feedforward_layernorm", y))
        # The sum is scaled in place by layer_scalar before the layer returns: recomputed.
        self._post(layer.post_feedforward_layernorm, lambda _y: self._recomputed(i, "residual_mlp"))
        if getattr(layer, "hidden_size_per_layer_input", 0):
            self._post(layer.post_per_layer_input_norm,
                       lambda y: self._branch(i, "post_per_layer_input_norm", y))
            self._post(layer.post_per_layer_input_norm,
                       lambda _y: self._recomputed(i, "residual_per_layer"))
        self._post(layer, lambda out: site(i, "layer_output", out))

    # --- what the hooks report ---------------------------------------------------------------
    def _branch(self, i: int, name: str, y: torch.Tensor) -> None:
        self.rec.site(i, name, y)
        self.branch = y

    def _residual_attn(self, i: int, x: torch.Tensor) -> None:
        self.mid = x
        self.rec.residual(i, "residual_attn", self.layer_in, self.branch, x)

    def _recomputed(self, i: int, name: str) -> None:
        """A residual add with no module boundary after it: residual + branch, as the model did.
        The attention add's residual is the layer input; later adds build on the previous sum."""
        residual = self.layer_in if name == "residual_attn" else self.mid
        out = residual + self.branch
        self.mid = out
        self.rec.residual(i, name, residual, self.branch, out)

    def _laurel(self, i: int, y: torch.Tensor) -> None:
        self.rec.site(i, "laurel", y)
        self.laurel_out = y

    def _residual_laurel(self, i: int, x: torch.Tensor) -> None:
        # x = (attn_gated + laurel) / sqrt(2), the pre-FFN norm's input: reported as the add of
        # its two terms (the unrounded float32 sum is what overflows, before the division).
        self.rec.residual(i, "residual_laurel", self.mid, self.laurel_out, x)
        self.mid = x

    def _keep_dense(self, i: int, y: torch.Tensor) -> None:
        self.rec.site(i, "post_feedforward_layernorm_1", y)
        self.dense = y

    def _moe_sum(self, i: int, y: torch.Tensor) -> None:
        self.rec.site(i, "post_feedforward_layernorm_2", y)
        # hidden_states_1 + hidden_states_2: recomputed (the sum feeds a norm, whose pre-hook
        # would fire after this one's site; recomputing keeps the report in execution order).
        self.rec.residual(i, "moe_sum", self.dense, y, self.dense + y)

    def _logits(self, out: Any) -> None:
        logits = out.logits if hasattr(out, "logits") else out[0]
        if self.last_only:
            logits = logits[:, -1:]
        self.rec.site(self.last, "logits", logits)
