"""A Hugging Face model directory as a LoadedModel: weights, config and tokenizer from one place.

`--model DIR` with a `config.json` needs no --variant, --config or --tokenizer: the config comes
from `config.json` (fuzz.engine.weights.hf_config), the weights from its safetensors
(fuzz.engine.weights.hf), the tokenizer from `tokenizer.model` (SentencePiece) when the directory
has one, else from `tokenizer.json` (rebuilt as SentencePiece by fuzz.engine.tokenizer.hf_json,
cached: ~8 s for Gemma 3's 262k pieces on 2 busy cores, measured).

The fingerprint hashes the float32 weights (not the files), so the same model saved as one file
or as shards, in bfloat16 or float32 of the same values, is one model.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from fuzz.atomic import write_atomic
from fuzz.engine.loaded import LoadedModel, fingerprint, state_hash
from fuzz.engine.tokenizer import Tokenizer

SENTENCEPIECE_FILE = "tokenizer.model"
# Bump when tokenizer_json's mapping changes: older cached models are then rebuilt.
_TOKENIZER_CACHE_FORMAT = b"gemma-fuzz-tokenizer-json-1"


def load_hf_model(path: str | Path, name: Optional[str] = None, *,
                  variant: Optional[str] = None, config_path: Optional[str] = None,
                  tokenizer_path: Optional[str] = None) -> LoadedModel:
    """The model of an HF directory. `tokenizer_path` (a SentencePiece .model) replaces the
    directory's tokenizer; a variant or config file is refused: config.json says what it is."""
    from fuzz.engine.weights.hf import read_hf

    path = Path(path)
    if variant is not None or config_path is not None:
        raise ValueError(f"{path} is a Hugging Face directory: its config.json says which Gemma "
                         "it is, so drop --variant/--config")
    loaded = read_hf(path)
    tok = Tokenizer.from_file(tokenizer_path) if tokenizer_path else hf_tokenizer(path)
    # The embedding may have more rows than the tokenizer has ids (Gemma 3 4b+ pad theirs to
    # 262208 for image tokens); fewer rows would leave token ids without an embedding.
    if tok.n_words > loaded.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tok.n_words} ids but config.json's "
                         f"vocab_size is {loaded.config.vocab_size}; give the model's own "
                         "tokenizer")
    return LoadedModel(name or path.resolve().name, loaded.config, loaded.state, tok,
                       fingerprint(loaded.config, state_hash(loaded.state), tok), str(path),
                       chat_template=chat_template(path))


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def chat_template(directory: Path) -> Optional[str]:
    """The directory's chat template: chat_template.jinja (transformers 4.43+ writes it there),
    else tokenizer_config.json's `chat_template` (a string, or the "default" of a list of named
    ones); None when it has none (Gemma's own template applies: fuzz.prompts.chat)."""
    from fuzz.engine.tokenizer.hf_json import TOKENIZER_CONFIG

    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / TOKENIZER_CONFIG
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{config}: not a JSON object ({err}); fix or remove it") from None
    if isinstance(value, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def hf_tokenizer(directory: Path) -> Tokenizer:
    """`tokenizer.model` when present (the original SentencePiece model), else `tokenizer.json`."""
    from fuzz.engine.tokenizer.hf_json import TOKENIZER_CONFIG, TOKENIZER_JSON, tokenizer_from_json

    sentencepiece = directory / SENTENCEPIECE_FILE
    if sentencepiece.is_file():
        return Tokenizer.from_file(sentencepiece)
    source = directory / TOKENIZER_JSON
    if not source.is_file():
        raise FileNotFoundError(f"{directory} has neither {SENTENCEPIECE_FILE} nor "
                                f"{TOKENIZER_JSON}; save the tokenizer beside the weights "
                                "(tokenizer.save_pretrained(DIR)) or give --tokenizer FILE.model")
    settings = directory / TOKENIZER_CONFIG
    digest = hashlib.sha256(_TOKENIZER_CACHE_FORMAT)
    for part in (source, settings):
        digest.update(part.read_bytes() if part.is_file() else b"-")
    return cached_tokenizer(f"{digest.hexdigest()}.tokenizer.model",
                            lambda: tokenizer_from_json(source))


def cached_tokenizer(file_name: str, build: Callable[[], Tokenizer]) -> Tokenizer:
    """A tokenizer rebuilt in code, kept as a SentencePiece model in the weights cache directory
    ($GEMMA_FUZZ_CACHE or ~/.cache/gemma-fuzz) under `file_name` (a content hash of its source).
    An unwritable cache only costs time; workers never read half a file (write_atomic)."""
    from fuzz.engine.weights import default_cache_dir

    cached = default_cache_dir() / file_name
    try:
        return Tokenizer(serialized_proto=cached.read_bytes())
    except (OSError, ValueError):
        pass
    tok = build()
    try:
        write_atomic(cached, tok.serialized_model_proto())
    except OSError:
        pass
    return tok
