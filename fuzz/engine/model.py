"""Built-in Gemma 1/2/3 forward pass, numerically faithful to google/gemma_pytorch.

Every multiply, add and cast happens in the dtype upstream uses (docs/NUMERICS.md):
- the embedding is scaled by sqrt(hidden_size) in the model dtype;
- RMSNorm upcasts to float32, multiplies by (1 + w) in float32 and casts back;
- the MLP, the q/k/v/o projections, q scaling, q @ k^T and attention soft-capping run in the model
  dtype; the float32 mask add promotes the scores to float32 for the softmax, cast back after;
- RoPE runs in float32 complex and is cast back; Gemma 3's global layers divide their frequencies
  by `rope_scaling_factor` when it is set (upstream's Gemma3ForMultimodalLM, the path its 4b/12b/
  27b take; its text GemmaForCausalLM ignores the factor, see fuzz.engine.upstream.engine);
- residual adds run in the model dtype; the LM head is tied to the embedding.

Parameter names are upstream's (`embedder.weight`, `model.layers.N.self_attn.qkv_proj.weight`, ...)
so an upstream `model_state_dict` loads as is.

Two deliberate, numerics-neutral departures, both needed for batched fuzzing:
- positions are per row (left padding), and the attention mask is built per row;
- keys/values of padding slots are zeroed, so a padding row that itself overflows can never leak
  NaN into a real row (0-probability x NaN value would still be NaN).
Attention runs over the filled part of the KV cache only: upstream runs over the whole cache, where
the extra slots get exp(-2.38e38) = 0 probability, so the result is the same.

A policy's `Numerics` (fuzz.engine.interface, set by fuzz.precision) decides how a run departs
from upstream on purpose (mitigations): the residual stream's dtype and an optional clamp; the
plain policies depart in nothing. A `Recorder` (fuzz.probe) sees every site's tensor as it is
produced, in execution order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fuzz.engine import kernels
from fuzz.engine.config import Architecture, AttentionType, GemmaConfig
from fuzz.engine.interface import (
    FAITHFUL,
    MASK_VALUE,
    Batch,
    KVCache,
    Numerics,
    Recorder,
    prompt_batch,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        # Upstream: float32 norm, times (1 + w) in float32, cast back to x's dtype. A float32
        # residual stream (mitigation) still feeds the matmuls in the model dtype: out_dtype.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y * (1 + self.weight.float())
        return y.to(out_dtype or x.dtype)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight)


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim), requires_grad=False)


def rope_frequencies(head_dim: int, positions: torch.Tensor, theta: float,
                     scaling_factor: Optional[int] = None) -> torch.Tensor:
    """Upstream's precompute_freqs_cis, evaluated at the positions needed ([B, T] -> complex).

    scaling_factor: GemmaConfig.rope_scaling, the divisor of the global layers' frequencies."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device)[: head_dim // 2]
                             .float() / head_dim))
    if scaling_factor is not None:
        # Upstream's own op and place (gemma/model.py precompute_freqs_cis): one float32 division
        # of the base frequencies, before the product with the positions. Upstream's text model
        # divides by its default 1, which is exact, so skipping the division for None is too.
        freqs = freqs / scaling_factor
    angles = positions.unsqueeze(-1).float() * freqs  # same float32 product as torch.outer
    return torch.polar(torch.ones_like(angles), angles)  # [B, T, head_dim/2] complex64


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]. Pairs (i, i + D/2) rotate, in float32 complex, cast back (as upstream)."""
    xf = x.float()
    half = x.shape[-1] // 2
    xc = torch.complex(xf[..., :half], xf[..., half:])
    rotated = xc * freqs.unsqueeze(2)
    return torch.cat([rotated.real, rotated.imag], dim=-1).type_as(x)


def attention_mask(batch: Batch, window: Optional[int]) -> torch.Tensor:
    """[B, 1, T, S] float32 additive mask: causal, padding, and the sliding window (if any)."""
    q_pos = batch.positions.unsqueeze(-1)  # [B, T, 1]
    k_pos = batch.key_positions.unsqueeze(1)  # [B, 1, S]
    slots = torch.arange(batch.key_valid.shape[1], device=q_pos.device)
    q_slot = batch.slot_start + torch.arange(q_pos.shape[1], device=q_pos.device)
    allowed = (slots.view(1, 1, -1) <= q_slot.view(1, -1, 1)) & batch.key_valid.unsqueeze(1)
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    zero = torch.zeros((), dtype=torch.float32, device=q_pos.device)
    return torch.where(allowed, zero, MASK_VALUE).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, attn_type: AttentionType) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.attn_type = attn_type
        local = attn_type == AttentionType.LOCAL_SLIDING
        self.window = config.sliding_window_size if local else None
        self.softcap = config.attn_logit_softcapping
        self.qkv_proj = Linear(config.hidden_size,
                               (self.num_heads + 2 * self.num_kv_heads) * self.head_dim)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size)
        if config.use_qk_norm:
            self.query_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.query_norm = self.key_norm = None

    def mask(self, batch: Batch) -> torch.Tensor:
        return attention_mask(batch, self.window)

    def forward(self, x: torch.Tensor, batch: Batch, freqs: torch.Tensor, mask: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor], layer: int,
                rec: Optional[Recorder]) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        if rec:
            rec.site(layer, "qkv", qkv)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        xq, xk, xv = qkv.split([q_size, kv_size, kv_size], dim=-1)
        xq = xq.view(b, t, self.num_heads, self.head_dim)
        xk = xk.view(b, t, self.num_kv_heads, self.head_dim)
        xv = xv.view(b, t, self.num_kv_heads, self.head_dim)
        if self.query_norm is not None:
            xq, xk = self.query_norm(xq), self.key_norm(xk)
        xq, xk = apply_rope(xq, freqs), apply_rope(xk, freqs)

        # Padding slots get zero K/V: a padding row that overflows must not poison real rows.
        new_valid = batch.key_valid[:, batch.slot_start:].view(b, t, 1, 1)
        xk = torch.where(new_valid, xk, torch.zeros((), dtype=xk.dtype, device=xk.device))
        xv = torch.where(new_valid, xv, torch.zeros((), dtype=xv.dtype, device=xv.device))
        k_cache, v_cache = cache
        end = batch.slot_start + t
        k_cache[:, batch.slot_start:end] = xk
        v_cache[:, batch.slot_start:end] = xv
        # Grouped-query attention as upstream's repeat_interleave of K/V over each group's rep
        # query heads, without materialising the repeat: q is viewed [B, kv, rep, T, D] and
        # K/V broadcast over rep. torch.matmul copies its operands into the same contiguous
        # [B * heads, ...] bmm operands either way (the repeat's copy was a second one), so
        # bmm computes the same products bit for bit (checked on Gemma 3 270M's verdicts in
        # every policy, batched and alone); it saves one [B, S, heads, D] copy of K and of V
        # per layer and step.
        key, value = k_cache[:, :end], v_cache[:, :end]  # [B, S, kv, D]
        kv, rep, s = self.num_kv_heads, self.num_heads // self.num_kv_heads, end
        q = xq.transpose(1, 2) * self.scaling  # model dtype, before q @ k^T (as upstream)
        keys_t = key.permute(0, 2, 3, 1).unsqueeze(2).expand(b, kv, rep, self.head_dim, s)
        scores = kernels.matmul(q.reshape(b, kv, rep, t, self.head_dim), keys_t)
        scores = scores.view(b, self.num_heads, t, s)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if rec:
            rec.site(layer, "attn_scores", scores)
        scores = scores + mask  # float32 mask promotes the scores to float32
        probs = F.softmax(scores.float(), dim=-1).type_as(q)
        values = value.transpose(1, 2).unsqueeze(2).expand(b, kv, rep, s, self.head_dim)
        out = kernels.matmul(probs.view(b, kv, rep, t, s), values)
        out = out.view(b, self.num_heads, t, self.head_dim)
        out = out.transpose(1, 2).contiguous().view(b, t, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor, layer: int, rec: Optional[Recorder]) -> torch.Tensor:
        act = F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)
        if rec:
            rec.site(layer, "mlp_act", act)
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    """Gemma 1: pre-norm attention + pre-norm MLP. Gemma 2/3: sandwich norms around both."""

    def __init__(self, config: GemmaConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.sandwich = config.architecture != Architecture.GEMMA_1
        self.attn_type = config.attn_type(index)
        self.self_attn = Attention(config, self.attn_type)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        if self.sandwich and config.use_pre_ffw_norm:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        if self.sandwich and config.use_post_ffw_norm:
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def _norm(self, name: str, x: torch.Tensor, dtype: torch.dtype, num: Numerics,
              rec: Optional[Recorder]) -> torch.Tensor:
        y = num.clamp_norm(getattr(self, name)(x, dtype))
        if rec:
            rec.site(self.index, name, y)
        return y

    def _add(self, name: str, residual: torch.Tensor, branch: torch.Tensor, num: Numerics,
             rec: Optional[Recorder]) -> torch.Tensor:
        # Upstream adds in the model dtype; a float32 residual (mitigation) upcasts the branch.
        out = num.clamp_add(residual + branch.to(residual.dtype))
        if rec:
            rec.residual(self.index, name, residual, branch, out)
        return out

    def forward(self, h: torch.Tensor, batch: Batch, freqs: torch.Tensor, mask: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype, num: Numerics,
                rec: Optional[Recorder]) -> torch.Tensor:
        x = self._norm("input_layernorm", h, dtype, num, rec)
        x = self.self_attn(x, batch, freqs, mask, cache, self.index, rec)
        if rec:
            rec.site(self.index, "attn_output", x)
        if self.sandwich:
            # Gemma 2/3: post-attention norm on the branch, then the residual add.
            # Post-norms feed only the residual: they output in the residual's dtype.
            x = self._norm("post_attention_layernorm", x, h.dtype, num, rec)
            h = self._add("residual_attn", h, x, num, rec)
            x = h
            if hasattr(self, "pre_feedforward_layernorm"):
                x = self._norm("pre_feedforward_layernorm", h, dtype, num, rec)
            x = self.mlp(x, self.index, rec)
            if rec:
                rec.site(self.index, "mlp_output", x)
            if hasattr(self, "post_feedforward_layernorm"):
                x = self._norm("post_feedforward_layernorm", x, h.dtype, num, rec)
            return self._add("residual_mlp", h, x, num, rec)
        # Gemma 1: upstream's post_attention_layernorm is the pre-MLP norm.
        h = self._add("residual_attn", h, x, num, rec)
        x = self._norm("post_attention_layernorm", h, dtype, num, rec)
        x = self.mlp(x, self.index, rec)
        if rec:
            rec.site(self.index, "mlp_output", x)
        return self._add("residual_mlp", h, x, num, rec)


class GemmaStack(nn.Module):
    """Upstream's `GemmaModel` (`model.` prefix): the layers and the final norm."""

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class GemmaForCausalLM(nn.Module):
    """The model under test. Build it with `build_model` (fuzz.engine.weights) to load weights."""

    supports_padding = True  # per-row positions and zeroed padding K/V (fuzz.engine.interface)

    def __init__(self, config: GemmaConfig, numerics: Numerics = FAITHFUL) -> None:
        super().__init__()
        self.config = config
        self.numerics = numerics
        self.embedder = Embedding(config.vocab_size, config.hidden_size)
        self.model = GemmaStack(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedder.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device)

    @torch.no_grad()
    def forward(self, batch: Batch, cache: KVCache, rec: Optional[Recorder] = None,
                last_only: bool = True, head: bool = True) -> torch.Tensor:
        """Runs the new tokens through the model, writing the cache; returns logits.

        With last_only, logits only for the last new token of each row: [B, vocab]. Without
        head, the final norm's output instead ([B, T or 1, hidden]): `fuzz sweep` asks whether
        a token overflows, not what comes next, and the tied 262144-row head would cost it as
        much as the 18 layers of Gemma 3 270M together.
        """
        cfg, dtype, num = self.config, self.dtype, self.numerics
        h = F.embedding(batch.token_ids, self.embedder.weight)
        normalizer = torch.tensor(cfg.hidden_size ** 0.5, dtype=h.dtype, device=h.device)
        h = h * normalizer  # in the model dtype: sqrt(3072) becomes 55.5 in float16 (upstream)
        if rec:
            rec.site(-1, "embedding", h)
        # RoPE tables and masks depend only on the attention type: built once per forward.
        kinds = {layer.attn_type: layer.self_attn.window for layer in self.model.layers}
        freqs = {t: rope_frequencies(cfg.head_dim, batch.positions, cfg.rope_theta(t),
                                     cfg.rope_scaling(t))
                 for t in kinds}
        masks = {t: attention_mask(batch, window) for t, window in kinds.items()}
        for i, (layer, layer_cache) in enumerate(zip(self.model.layers, cache.layers)):
            t = layer.attn_type
            # A mitigation's residual dtype (every layer, or a plan's layers): cast on entry, so
            # a plan's float32 span returns to the model dtype where the next layer starts.
            h = h.to(num.residual_dtype_at(i, dtype))
            h = layer(h, batch, freqs[t], masks[t], layer_cache, dtype, num, rec)
        if last_only:
            h = h[:, -1:]
        # onnxruntime-genai's Gemma fix (float32_logits; PRs #1441, #1448) keeps the final norm
        # in float32 and computes float32 logits, the head's weights read exactly as float32.
        head_dtype = torch.float32 if num.float32_logits else dtype
        h = self.model.norm(h, head_dtype)
        if rec:
            rec.site(cfg.num_hidden_layers, "final_norm", h)
        if not head:
            return h
        # Tied head: h @ E^T, as upstream's matmul(h, E.t()): F.linear computes the same products.
        # Measured on this CPU (benchmarks/bench_throughput.py): float16 matmuls whose right
        # operand is a contiguous [K, N] matrix fall to a kernel ~80x slower (11.3 s vs 0.14 s
        # for 16 rows of the LM head); F.linear keeps every weight in its [N, K] layout.
        if num.float32_logits:
            logits = F.linear(h, kernels.float32_weight(self.embedder.weight))
        else:
            logits = kernels.linear(h, self.embedder.weight)
        if cfg.final_logit_softcapping is not None:
            cap = cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        if rec:
            rec.site(cfg.num_hidden_layers, "logits", logits)
        return logits[:, -1] if last_only else logits


def materialize(config: GemmaConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                numerics: Numerics = FAITHFUL,
                device: torch.device | str = "cpu") -> GemmaForCausalLM:
    """Builds a model whose parameters are `state` cast to `dtype` (upstream builds the whole model
    in one dtype under torch.set_default_dtype). `state` must hold exactly the model's keys: load
    it through fuzz.engine.weights, which checks that and names what is wrong."""
    with torch.device("meta"):
        model = GemmaForCausalLM(config, numerics)
    cast = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval()


def parameter_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name upstream uses for this config, with its shape (no memory used)."""
    with torch.device("meta"):
        model = GemmaForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def full_logits(model: GemmaForCausalLM, token_ids: torch.Tensor) -> torch.Tensor:
    """Logits at every position of unpadded rows [B, T] -> [B, T, vocab] (parity tests)."""
    cache = model.new_cache(token_ids.shape[0], token_ids.shape[1])
    return model(prompt_batch(token_ids), cache, last_only=False)
