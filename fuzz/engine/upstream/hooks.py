"""Probing google/gemma_pytorch's model through module hooks (fuzz.engine.upstream.engine).

The upstream engine's probe (`rec`, a fuzz.engine.model.Recorder) uses forward hooks and
pre-hooks on upstream's modules, registered for one forward and removed afterwards. Sites are
reported with the built-in names, in the built-in order and with the built-in shapes:
- layer -1 'embedding': the scaled embedding, i.e. the input of upstream's `model` (pre-hook);
- per layer: 'input_layernorm', 'qkv' (self_attn.qkv_proj output), 'attn_output' (self_attn
  output), 'post_attention_layernorm', 'residual_attn', 'pre_feedforward_layernorm', 'mlp_act'
  (down_proj input), 'mlp_output', 'post_feedforward_layernorm', 'residual_mlp';
- layer L 'final_norm' (model.norm output; upstream normalises every position, but with last_only
  only the last position is reported, as the built-in model computes it) and 'logits' (the
  sampler's logits, reshaped to [B, 1, vocab] with last_only, as the built-in model's).
- 'attn_scores' is NOT reported: upstream computes the scores inside GemmaAttention.forward with
  no module boundary around them, so no hook can observe them.
- Residual sites are reported through `rec.residual(layer, name, residual, branch, out)` with
  tensors upstream really produced, none recomputed: `residual` is the layer input (or the
  attention residual's result), `branch` the tensor upstream added to it (the post-attention /
  post-FFN norm output for Gemma 2/3, the attention / MLP output for Gemma 1), and `out` the sum as
  upstream stored it, read as the input of the next module (pre-hook) or the layer's output.
"""
from __future__ import annotations

import torch
from torch import nn

from fuzz.engine.config import Architecture, GemmaConfig
from fuzz.engine.hooks import ModuleHooks
from fuzz.engine.interface import Recorder


class HookProbe(ModuleHooks):
    """Registers hooks that report built-in sites from upstream's modules for one forward."""

    def __init__(self, model: nn.Module, config: GemmaConfig, rec: Recorder, last_only: bool):
        self.model, self.rec, self.last_only = model, rec, last_only
        self.sandwich = config.architecture != Architecture.GEMMA_1
        self.last = config.num_hidden_layers
        super().__init__()
        # Per-layer tensors kept between hooks to report the residual adds.
        self.layer_in: torch.Tensor | None = None
        self.attn_branch: torch.Tensor | None = None
        self.mid: torch.Tensor | None = None
        self.mlp_branch: torch.Tensor | None = None

    def attach(self) -> None:
        m = self.model
        self._pre(m.model, lambda x: self.rec.site(-1, "embedding", x), kwargs=True)
        for i, layer in enumerate(m.model.layers):
            self._attach_layer(i, layer)
        self._post(m.model.norm, lambda y: self.rec.site(
            self.last, "final_norm", y[:, -1:] if self.last_only else y))
        # The sampler returns (next_tokens, logits), logits [B, vocab] for one output position,
        # [B, T, vocab] for several; the built-in model reports [B, T or 1, vocab].
        self._post(m.sampler, lambda out: self.rec.site(
            self.last, "logits", out[1].reshape(out[1].shape[0], -1, out[1].shape[-1])))

    def _attach_layer(self, i: int, layer: nn.Module) -> None:
        site = self.rec.site
        self._pre(layer, lambda x: setattr(self, "layer_in", x), kwargs=True)
        self._post(layer.input_layernorm, lambda y: site(i, "input_layernorm", y))
        self._post(layer.self_attn.qkv_proj, lambda y: site(i, "qkv", y))
        self._post(layer.self_attn, lambda y: self._attn_output(i, y))
        post_attn = layer.post_attention_layernorm
        if self.sandwich:
            self._post(post_attn, lambda y: self._branch(i, "post_attention_layernorm", y))
            pre_ffw = getattr(layer, "pre_feedforward_layernorm", None)
            # The attention residual's sum is the input of the pre-FFN norm (or of the MLP).
            self._pre(pre_ffw if pre_ffw is not None else layer.mlp,
                      lambda x: self._residual_attn(i, x))
            if pre_ffw is not None:
                self._post(pre_ffw, lambda y: site(i, "pre_feedforward_layernorm", y))
        else:
            # Gemma 1: the sum feeds post_attention_layernorm, upstream's pre-MLP norm.
            self._pre(post_attn, lambda x: self._residual_attn(i, x))
            self._post(post_attn, lambda y: site(i, "post_attention_layernorm", y))
        self._pre(layer.mlp.down_proj, lambda x: site(i, "mlp_act", x))
        self._post(layer.mlp, lambda y: self._mlp_output(i, y))
        post_ffw = getattr(layer, "post_feedforward_layernorm", None)
        if self.sandwich and post_ffw is not None:
            self._post(post_ffw, lambda y: self._mlp_branch(i, y))
        self._post(layer, lambda y: self.rec.residual(i, "residual_mlp", self.mid,
                                                       self.mlp_branch, y))

    def _attn_output(self, i: int, y: torch.Tensor) -> None:
        self.rec.site(i, "attn_output", y)
        self.attn_branch = y  # Gemma 1 adds it as is; Gemma 2/3 overwrite it with the post-norm

    def _branch(self, i: int, name: str, y: torch.Tensor) -> None:
        self.rec.site(i, name, y)
        self.attn_branch = y

    def _residual_attn(self, i: int, x: torch.Tensor) -> None:
        self.mid = x
        self.rec.residual(i, "residual_attn", self.layer_in, self.attn_branch, x)

    def _mlp_output(self, i: int, y: torch.Tensor) -> None:
        self.rec.site(i, "mlp_output", y)
        self.mlp_branch = y

    def _mlp_branch(self, i: int, y: torch.Tensor) -> None:
        self.rec.site(i, "post_feedforward_layernorm", y)
        self.mlp_branch = y
