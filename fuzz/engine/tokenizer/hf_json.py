"""A Hugging Face `tokenizer.json` (Gemma's BPE) rebuilt as a SentencePiece model.

An HF directory without `tokenizer.model` still gets the project's one Tokenizer (SentencePiece
with upstream's interface, fingerprinted by its serialized model), so the upstream engine, the
vocabulary strategies and the fingerprints work unchanged; the `tokenizers` library is not needed.

The mapping (what transformers' GemmaConverter wrote, read backwards):
- vocabulary ids and texts are kept; `<0xNN>` pieces are byte pieces (byte fallback);
- special added tokens are control pieces (the unk token: the unknown piece), matched in the text
  by fuzz.engine.tokenizer as transformers does; non-special added tokens (newline runs, HTML
  tags) are user-defined pieces, which SentencePiece matches as whole pieces;
- BPE priority: SentencePiece merges the adjacent pair whose result has the highest score, HF the
  pair of lowest merge rank. The converter wrote the merges in the order of the original scores,
  so each piece scores minus the rank of the first merge that builds it.
On the real Gemma 3 270M the result encodes exactly as the GGUF's tokenizer
(tests/test_weights_hf.py).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fuzz.engine.tokenizer import PieceType, Tokenizer
from fuzz.engine.tokenizer.build import new_model_proto

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
# The normalizer Gemma's tokenizer.json carries: spaces become U+2581, nothing else changes;
# new_model_proto's identity normalizer with escaped whitespace is the same.
_SPACE_REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}


def tokenizer_from_json(path: str | Path, config_dir: str | Path | None = None) -> Tokenizer:
    """The Tokenizer a Gemma `tokenizer.json` describes. `config_dir` (default: the file's
    directory) may hold `tokenizer_config.json`, whose special tokens and add_bos_token win.
    Raises ValueError naming the file and what it cannot rebuild."""
    path = Path(path)
    data = _read_json(path)
    model = data.get("model")
    if not isinstance(model, Mapping) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, Mapping) else model
        raise ValueError(f"{path}: model type {kind!r}; only Gemma's BPE tokenizer.json can be "
                         "rebuilt (or put its tokenizer.model beside it)")
    _check_normalizer(data.get("normalizer"), path)
    vocab = model.get("vocab")
    if not isinstance(vocab, Mapping) or not vocab:
        raise ValueError(f"{path}: model.vocab must be a non-empty object of piece -> id")
    texts = _texts_by_id(vocab, path)
    settings = _read_tokenizer_config(Path(config_dir) if config_dir else path.parent)
    added = {int(a["id"]): a for a in data.get("added_tokens") or []}
    special_ids = _special_ids(vocab, settings, model)
    pieces = _pieces(texts, added, _merge_scores(model.get("merges") or [], path),
                     special_ids.get("unk", -1), bool(model.get("byte_fallback")))
    proto = new_model_proto(pieces, special_ids)
    return Tokenizer(serialized_proto=proto.SerializeToString(),
                     add_bos=bool(settings.get("add_bos_token", True)))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _check_normalizer(normalizer: Any, path: Path) -> None:
    """Gemma's tokenizer.json replaces spaces by U+2581 and does nothing else; another
    normalizer (NFKC, lowercasing, a dummy prefix) would tokenize differently."""
    steps = (normalizer.get("normalizers") if isinstance(normalizer, Mapping)
             and normalizer.get("type") == "Sequence" else [normalizer])
    if [s for s in steps if s is not None] != [_SPACE_REPLACE]:
        raise ValueError(f"{path}: normalizer {json.dumps(normalizer)[:200]} is not Gemma's "
                         "(spaces -> U+2581 only); put the model's tokenizer.model beside it")


def _texts_by_id(vocab: Mapping[str, Any], path: Path) -> list[str]:
    size = len(vocab)
    texts: list[str | None] = [None] * size
    for text, token_id in vocab.items():
        if not isinstance(token_id, int) or not 0 <= token_id < size \
                or texts[token_id] is not None:
            raise ValueError(f"{path}: vocab id {token_id!r} of {text!r} is not a unique id "
                             f"in 0..{size - 1}")
        texts[token_id] = text
    return texts  # type: ignore[return-value]  # every slot filled: ids are unique and in range


def _merge_scores(merges: list[Any], path: Path) -> dict[str, float]:
    """Piece -> minus the rank of the first merge building it (see the module docstring).
    Merges are [left, right] pairs (tokenizers >= 0.20) or "left right" strings (older)."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        pair = merge.split(" ", 1) if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError(f"{path}: merge {rank} is {merge!r}, not a pair of pieces")
        scores.setdefault(pair[0] + pair[1], -float(rank))
    return scores


def _pieces(texts: list[str], added: Mapping[int, Mapping[str, Any]],
            merge_scores: Mapping[str, float], unk_id: int,
            byte_fallback: bool) -> list[tuple[str, float, int]]:
    # Pieces no merge builds (single characters) never result from a merge; they score below
    # every merge so that their score cannot matter.
    floor = -float(len(merge_scores) + 1)
    pieces = []
    for token_id, text in enumerate(texts):
        token = added.get(token_id)
        if token_id == unk_id:
            kind, score = PieceType.UNKNOWN, 0.0
        elif token is not None and token.get("special"):
            kind, score = PieceType.CONTROL, 0.0
        elif token is not None:
            kind, score = PieceType.USER_DEFINED, 0.0
        elif byte_fallback and _BYTE_PIECE.fullmatch(text):
            kind, score = PieceType.BYTE, 0.0
        else:
            kind, score = PieceType.NORMAL, merge_scores.get(text, floor)
        pieces.append((text.replace(" ", "\u2581") if kind == PieceType.USER_DEFINED else text,
                       score, kind))
    return pieces


def _read_tokenizer_config(directory: Path) -> dict[str, Any]:
    path = directory / TOKENIZER_CONFIG
    return _read_json(path) if path.is_file() else {}


def _special_ids(vocab: Mapping[str, int], settings: Mapping[str, Any],
                 model: Mapping[str, Any]) -> dict[str, int]:
    """bos/eos/unk/pad ids: tokenizer_config.json's tokens, else Gemma's usual spellings."""
    defaults = {"bos": "<bos>", "eos": "<eos>", "unk": model.get("unk_token") or "<unk>",
                "pad": "<pad>"}
    out = {}
    for name, default in defaults.items():
        token = settings.get(f"{name}_token", default)
        if isinstance(token, Mapping):  # transformers 4 writes {"content": ..., ...}
            token = token.get("content")
        out[name] = int(vocab.get(token, -1)) if isinstance(token, str) else -1
    return out
