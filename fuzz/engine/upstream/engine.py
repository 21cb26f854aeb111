"""Runs google/gemma_pytorch itself (import name `gemma`) behind the built-in model's interface.

Why: the built-in model (fuzz.engine.model) reproduces upstream's numerics; this engine lets a user
check a finding on upstream's own code (`--engine upstream`) and lets the tests prove the two agree.
gemma_pytorch is not on PyPI (PyPI's `gemma` is an unrelated JAX library with the same import
name), so everything here imports it lazily and `upstream_available()` says why it cannot be used.

`UpstreamEngine` offers what the generation loop uses on `GemmaForCausalLM`: `forward(batch, cache,
rec=None, last_only=True)` (also as a call), `new_cache(batch, max_len)`, `.dtype`, `.device`,
`.config`, plus `supports_padding = False`. How it drives upstream, and why:
- The model is built as upstream's scripts/run.py does: inside `torch.set_default_dtype(dtype)` so
  every parameter is created in that dtype, then the state is loaded (cast on copy) and the model is
  moved with `.to(device).eval()`. Forward passes run OUTSIDE that context: upstream's float32 mask
  constant -2.3819763e38 cannot be built under a float16 default dtype (docs/NUMERICS.md).
- Upstream's forward takes ONE 1-D `input_positions` for every row and also uses it as the cache
  write index, so only unpadded batches whose positions equal their cache slots can run; a padded
  batch is refused with a specific error.
- Masks: upstream's generate() builds a float32 [max_len, max_len] matrix, `triu(-2.3819763e38,
  diagonal=1)`, adds `tril(-2.3819763e38, diagonal=-window)` for the local mask, and index_selects
  the rows of the current positions; attention then runs over the whole cache (unfilled slots get
  probability exp(-2.38e38) = 0). The same is done here, once per cache length.
- Logits: `temperatures=None` makes upstream's sampler return argmax and its logits. With
  last_only the sampler reads the last position (output_positions=[T-1], as generate() does);
  otherwise output_positions=arange(T) makes the same sampler code return logits at every position.
- Mitigated policies: upstream has no mitigations, so the engine applies a policy's Numerics to
  the built model with fuzz.engine.upstream.mitigate (its layer and norm forwards re-stated with
  the built-in engine's casts and clamps, fuzz.engine.mitigate_layers), kept for its life.
- RoPE scaling: upstream's text GemmaForCausalLM ignores `rope_scaling_factor`, but the model its
  Gemma 3 4b/12b/27b run through (Gemma3ForMultimodalLM) divides the global layers' frequencies
  by it. With a factor, the text model's `global_freqs_cis` is replaced by the very table the
  multimodal model registers (`_scale_global_rope`), so the engine computes the model the config
  describes, as the built-in one does.

Probing (`rec`, fuzz.engine.model.Recorder) uses forward hooks on upstream's modules, registered
for one forward only: fuzz.engine.upstream.hooks.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fuzz.engine.config import AttentionType, GemmaConfig
from fuzz.engine.interface import (
    FAITHFUL,
    MASK_VALUE,
    Batch,
    ForeignEngine,
    KVCache,
    Numerics,
    Recorder,
)
from fuzz.engine.upstream.hooks import HookProbe
from fuzz.engine.upstream.mitigate import apply_numerics

INSTALL_HINT = ("install google/gemma_pytorch from its repository "
                "(pip install git+https://github.com/google/gemma_pytorch)")

# Upstream's config.dtype strings (its _STR_DTYPE_TO_TORCH_DTYPE); generate() builds its KV cache
# from config.get_dtype(), so the string must name the engine's dtype.
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# --- availability ------------------------------------------------------------------------------
def upstream_available() -> tuple[bool, str]:
    """(True, where it is) if `gemma` is google/gemma_pytorch, else (False, why not)."""
    try:
        package = importlib.import_module("gemma")
    except ImportError as err:
        return False, f"the `gemma` package (google/gemma_pytorch) is not importable ({err}); " \
                      f"{INSTALL_HINT}"
    except Exception as err:  # a broken install: say what broke rather than crash the caller
        return False, f"importing `gemma` failed with {type(err).__name__}: {err}"
    where = getattr(package, "__file__", None) or str(getattr(package, "__path__", "?"))
    not_ours = (f"the installed `gemma` ({where}) is not google/gemma_pytorch (PyPI's `gemma` is "
                f"an unrelated JAX library with the same import name); {INSTALL_HINT}")
    if not _has_submodule(package, "model") or not _has_submodule(package, "config"):
        return False, not_ours
    try:
        model_mod = importlib.import_module("gemma.model")
        config_mod = importlib.import_module("gemma.config")
    except Exception as err:
        return False, (f"google/gemma_pytorch at {where} failed to import "
                       f"({type(err).__name__}: {err}); install its requirements")
    if not (hasattr(model_mod, "GemmaForCausalLM") and hasattr(config_mod, "GemmaConfig")
            and hasattr(config_mod, "get_model_config")):
        return False, not_ours
    return True, f"google/gemma_pytorch at {where}"


def _has_submodule(package: Any, name: str) -> bool:
    """True when the package directory holds `name` (without importing it: JAX imports are slow)."""
    for folder in getattr(package, "__path__", []) or []:
        if (Path(folder) / f"{name}.py").is_file() or (Path(folder) / name).is_dir():
            return True
    return False


def _import_upstream() -> tuple[Any, Any]:
    ok, reason = upstream_available()
    if not ok:
        raise ImportError(f"the upstream engine needs google/gemma_pytorch: {reason}")
    return importlib.import_module("gemma.config"), importlib.import_module("gemma.model")


# --- config translation ------------------------------------------------------------------------
def to_upstream_config(config: GemmaConfig, dtype: torch.dtype, tokenizer_path: str,
                       upstream_config_module: Any) -> Any:
    """Our GemmaConfig as upstream's, enums mapped by name, dtype/tokenizer set for this engine."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot run upstream; use one of "
                         f"{', '.join(_DTYPE_NAMES.values())}")
    if config.quant:
        raise ValueError("config.quant=True: the upstream engine loads a float state dict; "
                         "set quant=False (weights are dequantized at load time)")
    if config.vision_config is not None:
        raise ValueError("config.vision_config is set: the upstream engine runs the text model "
                         "only; set vision_config=None")
    up = upstream_config_module
    theirs = {f.name for f in dataclasses.fields(up.GemmaConfig)}
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name not in theirs:
            if value != field.default:
                raise ValueError(f"this gemma_pytorch has no config field {field.name!r} but the "
                                 f"config sets it to {value!r}; update gemma_pytorch")
            continue
        values[field.name] = _translate_enums(value, up)
    values.update(dtype=_DTYPE_NAMES[dtype], tokenizer=tokenizer_path, quant=False,
                  vision_config=None)
    return up.GemmaConfig(**values)


def _translate_enums(value: Any, up: Any) -> Any:
    """Maps our Architecture/AttentionType members (also inside lists and dict keys) by name."""
    if isinstance(value, enum.Enum):
        return getattr(up, type(value).__name__)[value.name]
    if isinstance(value, (list, tuple)):
        return type(value)(_translate_enums(v, up) for v in value)
    if isinstance(value, dict):
        return {_translate_enums(k, up): v for k, v in value.items()}
    return value


# --- masks and positions (upstream's generate() semantics) -------------------------------------
def upstream_masks(max_len: int, window: int | None,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Upstream's full float32 masks [1, 1, max_len, max_len]: causal, and causal + sliding window.

    The dtype is given explicitly: upstream relies on the default dtype being float32 here.
    """
    full = torch.full((1, 1, max_len, max_len), MASK_VALUE, dtype=torch.float32, device=device)
    causal = torch.triu(full, diagonal=1)
    if not window:  # upstream: `if self.config.sliding_window_size` (None and 0 mean no window)
        return causal, None
    return causal, causal + torch.tril(full, diagonal=-window)


def shared_positions(batch: Batch, max_len: int) -> torch.Tensor:
    """The 1-D positions every row shares; refuses what upstream's forward cannot express."""
    if not bool(batch.key_valid.all()):
        rows = (~batch.key_valid).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"the upstream engine cannot run padded batches (Batch.key_valid has padding in rows "
            f"{rows}): upstream's forward takes one position vector for all rows. Run prompts of "
            f"equal length together, or use the builtin engine")
    t = batch.token_ids.shape[1]
    expected = torch.arange(batch.slot_start, batch.slot_start + t, device=batch.positions.device)
    if not bool((batch.positions == expected).all()):
        raise ValueError(
            f"Batch.positions must equal the cache slots "
            f"{batch.slot_start}..{batch.slot_start + t - 1} in every row for the upstream engine "
            f"(upstream writes the cache at the positions); "
            f"got {batch.positions.tolist()}")
    if batch.slot_start + t > max_len:
        raise ValueError(f"the batch reaches cache slot {batch.slot_start + t - 1} but the cache "
                         f"holds {max_len} slots; make new_cache(max_len) larger")
    return expected


# --- the engine --------------------------------------------------------------------------------
class UpstreamEngine(ForeignEngine):
    """google/gemma_pytorch's GemmaForCausalLM behind the built-in model's interface, run in
    `dtype` under `numerics` (a mitigated policy's, applied by fuzz.engine.upstream.mitigate).
    """

    supports_padding = False

    def __init__(self, config: GemmaConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str,
                 tokenizer: str | os.PathLike[str] | bytes | Any,
                 numerics: Numerics = FAITHFUL) -> None:
        """state: float32 tensors under upstream's parameter names. tokenizer: a SentencePiece
        .model path, its bytes, or an object with `serialized_model_proto() -> bytes`."""
        up_config_mod, up_model_mod = _import_upstream()
        super().__init__(config, dtype, device)
        with _TokenizerFile(tokenizer) as tokenizer_path:
            up_config = to_upstream_config(config, dtype, tokenizer_path, up_config_mod)
            self.upstream_model = _build(up_model_mod, up_config, state, dtype, self._device,
                                         config)
        self.upstream_config = up_config
        # A mitigated policy's numerics (upstream has none of its own), kept for the engine's
        # life and named by `numerics`, as the built-in model and the transformers engine do.
        self.numerics = numerics
        self.mitigation = (None if numerics == FAITHFUL
                           else apply_numerics(self.upstream_model, numerics, dtype))
        # The last (max_len, masks) built: 2 * max_len**2 float32s, so only one is kept.
        self._masks: tuple[int, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """Zeroed (k, v) [batch, max_len, kv_heads, head_dim] per layer, as in upstream's
        generate(); the KVCache type offers keep_rows(rows) for early stop."""
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"max_len={max_len} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings} (upstream asserts this too)")
        return KVCache(self.config, batch, max_len, self._dtype, self._device)

    def __call__(self, batch: Batch, cache: KVCache, rec: Recorder | None = None,
                 last_only: bool = True) -> torch.Tensor:
        return self.forward(batch, cache, rec, last_only)

    @torch.no_grad()
    def forward(self, batch: Batch, cache: KVCache, rec: Recorder | None = None,
                last_only: bool = True) -> torch.Tensor:
        """One upstream forward over the batch's new tokens; logits [B, vocab] (last_only) or
        [B, T, vocab]. The cache is written in place by upstream's index_copy_."""
        b, t = batch.token_ids.shape
        max_len = cache.layers[0][0].shape[1]
        positions = shared_positions(batch, max_len).to(self._device)
        causal, local = self._full_masks(max_len)
        # Upstream's generate() index_selects the rows of the current positions ([1, 1, T, L]);
        # expanding over the batch is a view with the same values.
        mask = causal.index_select(2, positions).expand(b, 1, t, max_len)
        local_mask = (None if local is None
                      else local.index_select(2, positions).expand(b, 1, t, max_len))
        out_positions = (torch.tensor([t - 1], device=self._device) if last_only
                         else torch.arange(t, device=self._device))
        probe = HookProbe(self.upstream_model, self.config, rec, last_only) if rec else None
        try:
            if probe is not None:
                probe.attach()
            _, logits = self.upstream_model(
                input_token_ids=batch.token_ids.to(self._device),
                input_positions=positions,
                kv_write_indices=positions,  # upstream overwrites it with input_positions anyway
                kv_caches=cache.layers,
                mask=mask,
                output_positions=out_positions,
                temperatures=None,  # greedy: the sampler returns argmax and the logits
                top_ps=torch.ones(b, device=self._device),
                top_ks=torch.full((b,), self.config.vocab_size, device=self._device),
                local_mask=local_mask,
            )
        finally:  # hooks live for this forward only, even when a recorder raises
            if probe is not None:
                probe.detach()
        return logits.reshape(b, -1) if last_only else logits.reshape(b, t, -1)

    def _full_masks(self, max_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._masks is None or self._masks[0] != max_len:
            self._masks = (max_len, upstream_masks(max_len, self.config.sliding_window_size,
                                                   self._device))
        return self._masks[1]


class _TokenizerFile:
    """Context manager yielding a path to the SentencePiece model (bytes go to a temp file that is
    removed once upstream's Tokenizer has loaded it)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> str:
        tok = self._tokenizer
        if hasattr(tok, "serialized_model_proto"):
            tok = tok.serialized_model_proto()
        if isinstance(tok, (bytes, bytearray)):
            self._tmp = tempfile.TemporaryDirectory(prefix="gemma-fuzz-tokenizer-")
            path = Path(self._tmp.name) / "tokenizer.model"
            path.write_bytes(bytes(tok))
            return str(path)
        if isinstance(tok, (str, os.PathLike)):
            path = Path(tok)
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer model {path} does not exist (upstream's "
                                        f"GemmaForCausalLM loads it with sentencepiece)")
            return str(path)
        raise TypeError(f"tokenizer must be a .model path, its bytes, or an object with "
                        f"serialized_model_proto(); got {type(tok).__name__}")

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _build(up_model_mod: Any, up_config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype,
           device: torch.device, config: GemmaConfig) -> nn.Module:
    """Upstream's scripts/run.py: build under the default dtype, load, `.to(device).eval()`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = up_model_mod.GemmaForCausalLM(up_config)
        _scale_global_rope(model, up_model_mod, config)
        # strict=False as upstream's load_weights, because upstream's RoPE tables are buffers
        # that no checkpoint holds; anything else missing would stay uninitialised torch.empty.
        result = model.load_state_dict(state, strict=False)
        buffers = {name for name, _ in model.named_buffers()}
        missing = sorted(set(result.missing_keys) - buffers)
        if missing or result.unexpected_keys:
            raise ValueError(
                f"the state dict does not fit upstream's GemmaForCausalLM: missing keys {missing}, "
                f"unexpected keys {sorted(result.unexpected_keys)}; load weights through "
                f"fuzz.engine.weights, which checks the names against the config")
        model = model.to(device).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def _scale_global_rope(model: nn.Module, up_model_mod: Any, config: GemmaConfig) -> None:
    """Gives upstream's text model the global RoPE table of upstream's Gemma 3 multimodal model.

    Why: upstream's text GemmaForCausalLM (gemma/model.py, __init__) registers `global_freqs_cis`
    without the factor, while Gemma3ForMultimodalLM (gemma/gemma3_model.py, __init__ and
    _register_freqs_cis), the model upstream runs Gemma 3 4b/12b/27b (factor 8) through, registers
    `precompute_freqs_cis(head_dim, max_seq_len * 2, theta=<global theta>,
    rope_scaling_factor=config.rope_scaling_factor)`. That table is computed here by upstream's own
    function, in the same build context (it is float32/complex64 whatever the default dtype), so
    the engine runs what upstream runs for such a config; the local table stays as it is."""
    factor = config.rope_scaling(AttentionType.GLOBAL)
    if factor is None:
        return
    table = up_model_mod.precompute_freqs_cis(
        config.head_dim, config.max_position_embeddings * 2,
        theta=config.rope_theta(AttentionType.GLOBAL), rope_scaling_factor=factor)
    model.register_buffer("global_freqs_cis", table)  # replaces the unscaled buffer in place
