"""What every engine offers the generation loop (fuzz.generate), and what it is given.

An engine (the built-in fuzz.engine.model, google/gemma_pytorch through
fuzz.engine.upstream.engine) is
called as `engine(batch, cache, recorder) -> logits` with a `Batch` of new tokens and a `KVCache`
it writes; a `Recorder` (fuzz.probe) sees every instrumented tensor in execution order, under the
site names below. `Numerics` says how a run departs from upstream on purpose (the mitigated
precision policies of fuzz.precision); `FAITHFUL` departs in nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from fuzz.engine.config import GemmaConfig

# Upstream's mask constant (float32), `-2.3819763e38`.
MASK_VALUE = -2.3819763e38


class Recorder(Protocol):
    """Receives each instrumented tensor in execution order (see fuzz.probe)."""

    def site(self, layer: int, name: str, x: torch.Tensor) -> None: ...

    def residual(self, layer: int, name: str, residual: torch.Tensor, branch: torch.Tensor,
                 out: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class Numerics:
    """How the forward departs from upstream on purpose. The default departs in nothing.

    Every engine that runs a mitigation applies these the same way (the built-in forward;
    transformers' and gemma_pytorch's layers through fuzz.engine.mitigate_layers): the residual
    stream of layer i enters the layer cast to `residual_dtype_at(i)`; post-norms output in that
    dtype, pre-norms in the model dtype (they feed matmuls); `clamp_add` follows every residual
    add, `clamp_norm` every norm's output.
    """

    residual_dtype: Optional[torch.dtype] = None  # None: the model dtype, as upstream
    # None: residual_dtype applies to every layer; otherwise only to these layers (a plan from
    # `fuzz advise --plan`): the others run their residual stream in the model dtype
    residual_layers: Optional[frozenset[int]] = None
    clamp: Optional[float] = None  # clamp residual adds (and norm outputs) to +-clamp
    clamp_norms: bool = True  # False: the clamp follows the residual adds only
    # the final norm's output and the LM head's product in float32 (float32 logits)
    float32_logits: bool = False

    def residual_dtype_at(self, layer: int, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype layer `layer`'s residual stream runs in."""
        if self.residual_dtype is None:
            return model_dtype
        if self.residual_layers is not None and layer not in self.residual_layers:
            return model_dtype
        return self.residual_dtype

    def clamp_add(self, x: torch.Tensor) -> torch.Tensor:
        if self.clamp is None:
            return x
        return x.clamp(-self.clamp, self.clamp)

    def clamp_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.clamp is None or not self.clamp_norms:
            return x
        return x.clamp(-self.clamp, self.clamp)


FAITHFUL = Numerics()


@dataclass
class Batch:
    """Per-forward inputs. Shapes: [B, T] for the new tokens; [B, S] for every cache slot so far."""

    token_ids: torch.Tensor  # [B, T] int64
    positions: torch.Tensor  # [B, T] int64, RoPE positions (0 at each row's first real token)
    slot_start: int  # cache slot of token_ids[:, 0] (same for every row: left padding)
    key_valid: torch.Tensor  # [B, S] bool, S = slot_start + T: which cache slots hold real tokens
    key_positions: torch.Tensor  # [B, S] int64


class KVCache:
    """Per-layer (k, v) of shape [B, max_len, kv_heads, head_dim] in the model dtype."""

    def __init__(self, config: GemmaConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device),
             torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drops finished rows (early stop) so later steps compute only the live ones."""
        self.layers = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.layers]


# Sites in execution order inside one layer; the embedding is layer -1, final norm/logits layer L.
LAYER_SITES = (
    "input_layernorm", "qkv", "attn_scores", "attn_output", "post_attention_layernorm",
    "residual_attn", "pre_feedforward_layernorm", "mlp_act", "mlp_output",
    "post_feedforward_layernorm", "residual_mlp",
)
RESIDUAL_SITES = ("embedding", "residual_attn", "residual_mlp")


def prompt_batch(token_ids: torch.Tensor) -> Batch:
    """Unpadded rows starting at slot 0 (whole-sequence forwards, parity tests)."""
    b, t = token_ids.shape
    pos = torch.arange(t, device=token_ids.device).expand(b, t)
    return Batch(token_ids=token_ids, positions=pos, slot_start=0,
                 key_valid=torch.ones(b, t, dtype=torch.bool, device=token_ids.device),
                 key_positions=pos)


class Engine(Protocol):
    """What generation needs of a model: the built-in one, the upstream adapter
    (fuzz.engine.upstream) or the transformers one (fuzz.engine.transformers)."""

    config: object
    # Whether prompts of different lengths can share a batch: upstream's forward takes one
    # position vector for every row; the built-in model and transformers take per-row positions.
    # The one place an engine says so (fuzz.engine.loaded.engine_class reads it too).
    supports_padding: bool

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def new_cache(self, batch: int, max_len: int): ...

    def __call__(self, batch: Batch, cache, rec: Optional[Recorder] = None,
                 last_only: bool = True) -> torch.Tensor: ...


class TokenizerLike(Protocol):
    """What generation needs of a tokenizer (fuzz.engine.tokenizer.Tokenizer)."""

    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, s: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def chat_prompt(self, text: str) -> str: ...


class ForeignEngine:
    """What the adapters around other projects' models (fuzz.engine.upstream,
    fuzz.engine.transformers) hold alike: our config (the layer count for the site table), the
    dtype and device they run in, and no departure from their own numerics."""

    # Another project's model departs from itself in nothing, unless the adapter runs a
    # mitigated policy on it (fuzz.engine.mitigate_layers): then the adapter sets its own.
    numerics = FAITHFUL

    def __init__(self, config: GemmaConfig, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.config = config
        self._dtype, self._device = dtype, torch.device(device)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device
