"""SentencePiece tokenizer with upstream gemma_pytorch's interface, buildable from a GGUF file.

`Tokenizer` behaves like upstream's `gemma/tokenizer.py` (`encode(s, bos=True, eos=False)`,
`decode(ids)`, `n_words`, `bos_id`, `eos_id`, `pad_id`) and adds what a fuzzer needs:

- `tokenizer_from_gguf(path)` (fuzz.engine.tokenizer.build) rebuilds a real SentencePiece model
  (`ModelProto`) from the tokenizer metadata llama.cpp writes into a GGUF file, so the Gemma 3
  270M GGUF needs no separate `tokenizer.model`. The rebuilt model gives the same ids as
  transformers' GGUF tokenizer.
- Control tokens written in the text (`<start_of_turn>`, `<bos>`, ...) become their ids, as in
  transformers; SentencePiece alone would spell them out character by character.
- `encode(..., max_tokens=N)` refuses a prompt longer than the fuzzer's prompt bound.
- `tiny_tokenizer()` (fuzz.engine.tokenizer.build) builds a small, deterministic SentencePiece
  model in code for synthetic test models (no training, no file).

Decoding renders control tokens as their literal text (transformers' default), so
`decode(encode(s, bos=False)) == s` for every string without U+2581 (SentencePiece escapes a space
as U+2581, so a literal U+2581 in the input decodes as a space; the real Gemma tokenizer does the
same). `decode(ids, skip_special=True)` drops control tokens, which is upstream's `DecodeIds`.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

PieceType = sp_pb2.ModelProto.SentencePiece.Type

# SentencePiece writes a space inside a piece as U+2581 ("▁").
SPACE_SYMBOL = "\u2581"

# Gemma's chat template: one user turn, then the open model turn the model continues. The one
# copy of it: fuzz.generate applies it (PromptSpec.chat), fuzz.strategies draws chat prompts.
CHAT_PREFIX = "<start_of_turn>user\n"
CHAT_SUFFIX = "<end_of_turn>\n<start_of_turn>model\n"
CHAT_TEMPLATE = CHAT_PREFIX + "{text}" + CHAT_SUFFIX


def chat_turn(text: str) -> str:
    """Wraps `text` in Gemma's chat template: one user turn, then the open model turn."""
    return f"{CHAT_PREFIX}{text}{CHAT_SUFFIX}"

# Tokens whose literal text in a prompt is replaced by their id (transformers adds every GGUF
# control token, <unk> included, as a special token and splits the text on it).
_SPECIAL_TYPES = (PieceType.CONTROL, PieceType.UNKNOWN)


class Tokenizer:
    """A SentencePiece model with upstream gemma_pytorch's `Tokenizer` interface.

    Build it from a `.model` file (`Tokenizer(path)` or `Tokenizer.from_file(path)`), from a GGUF
    file (fuzz.engine.tokenizer.build.tokenizer_from_gguf) or from a serialized `ModelProto`
    (`serialized_proto=`).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        serialized_proto: bytes | None = None,
        add_bos: bool = True,
    ) -> None:
        if (model_path is None) == (serialized_proto is None):
            raise ValueError("give exactly one of model_path and serialized_proto")
        if model_path is not None:
            serialized_proto = _read_model_file(Path(model_path))
        assert serialized_proto is not None
        self._proto_bytes = serialized_proto
        self.sp_model = _load_processor(serialized_proto, source=str(model_path or "<bytes>"))
        self.n_words: int = self.sp_model.GetPieceSize()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        self.unk_id: int = self.sp_model.unk_id()
        # Whether the model's own metadata asks for BOS (GGUF `tokenizer.ggml.add_bos_token`);
        # `encode` keeps upstream's default `bos=True` regardless.
        self.add_bos: bool = add_bos
        self._special_ids = self._find_special_ids()
        self._special_pieces = {token_id: text for text, token_id in self._special_ids.items()}
        self._scanner = _SpecialTokenScanner(self._special_ids) if self._special_ids else None

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Loads a SentencePiece `.model` file (upstream's `tokenizer.model`)."""
        return cls(path)

    # ------------------------------------------------------------------------------- interface
    def encode(
        self,
        s: str,
        bos: bool = True,
        eos: bool = False,
        *,
        parse_special: bool = True,
        max_tokens: int | None = None,
    ) -> list[int]:
        """Converts a string into token ids, with BOS first when `bos` (upstream's default).

        With `parse_special`, control tokens written in the text (`<start_of_turn>`) become their
        ids. With `max_tokens`, a result longer than that (BOS and EOS included) is refused.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode() takes a str, got {type(s).__name__}")
        ids = self._encode_text(s, parse_special)
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        if max_tokens is not None and len(ids) > max_tokens:
            raise ValueError(
                f"the prompt is {len(ids)} tokens{' (BOS included)' if bos else ''}, over the "
                f"bound of {max_tokens} tokens; shorten the prompt or raise the bound with "
                f"--max-prompt-tokens {len(ids)} (or more)"
            )
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Converts token ids into a string.

        Control tokens are written as their literal text (the inverse of `parse_special`);
        `skip_special=True` drops them, as upstream's `DecodeIds` does.
        """
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        out: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in self._special_pieces:
                out.append(self.sp_model.DecodeIds(run))
                run = []
                if not skip_special:
                    out.append(self._special_pieces[token_id])
            else:
                run.append(token_id)
        out.append(self.sp_model.DecodeIds(run))
        return "".join(out)

    def vocabulary(self) -> list[str]:
        """Every piece, indexed by id."""
        return [self.sp_model.IdToPiece(i) for i in range(self.n_words)]

    def piece(self, token_id: int) -> str:
        """The piece of one id, as SentencePiece spells it (a space is U+2581)."""
        self._check_ids([token_id])
        return self.sp_model.IdToPiece(token_id)

    def serialized_model_proto(self) -> bytes:
        """The SentencePiece `ModelProto`, serialized: write it to a file to get a `.model`."""
        return self._proto_bytes

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the serialized model: equal fingerprints tokenize identically."""
        return hashlib.sha256(self._proto_bytes).hexdigest()

    @staticmethod
    def chat_prompt(user_text: str) -> str:
        """Wraps one user turn in Gemma's chat template, ready for the model's reply."""
        return chat_turn(user_text)

    def __repr__(self) -> str:
        return f"Tokenizer(n_words={self.n_words}, fingerprint={self.fingerprint()[:12]})"

    # --------------------------------------------------------------------------------- helpers
    def _find_special_ids(self) -> dict[str, int]:
        proto = sp_pb2.ModelProto.FromString(self._proto_bytes)
        return {p.piece: i for i, p in enumerate(proto.pieces) if p.type in _SPECIAL_TYPES}

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special or self._scanner is None:
            return list(self.sp_model.EncodeAsIds(text))
        ids: list[int] = []
        for part in self._scanner.split(text):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(self.sp_model.EncodeAsIds(part))
        return ids

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.n_words]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside this tokenizer's vocabulary of "
                f"{self.n_words} ids (0..{self.n_words - 1})"
            )


# ------------------------------------------------------------------------------- file loading
def _read_model_file(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer model {str(path)!r} does not exist or is not a file; pass the path of a "
            "SentencePiece .model file (upstream's tokenizer.model)"
        )
    return path.read_bytes()


def _load_processor(serialized: bytes, source: str) -> sentencepiece.SentencePieceProcessor:
    hint = (
        f"{source!r} is not a SentencePiece model; pass a SentencePiece .model file "
        "(for a GGUF file use fuzz.engine.tokenizer.build.tokenizer_from_gguf)"
    )
    try:
        proto = sp_pb2.ModelProto.FromString(serialized)
    except DecodeError as error:
        raise ValueError(f"{hint} ({error})") from None
    if not proto.pieces:
        raise ValueError(f"{hint} (it holds no pieces)")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(serialized)
    except (RuntimeError, OSError) as error:
        raise ValueError(f"{hint} ({error})") from None
    return processor


class _SpecialTokenScanner:
    """Finds special tokens' literal text in a string, longest match first.

    Gemma 3 has 6,249 control tokens; one regex alternation of them takes over a second to
    compile, so candidates are found by their first character and checked by exact lookup.
    """

    def __init__(self, specials: dict[str, int]) -> None:
        self._ids = specials
        lengths: dict[str, set[int]] = {}
        for text in specials:
            lengths.setdefault(text[0], set()).add(len(text))
        self._lengths = {first: sorted(ls, reverse=True) for first, ls in lengths.items()}
        self._starts = re.compile("[" + "".join(map(re.escape, sorted(lengths))) + "]")

    def split(self, text: str) -> list[str | int]:
        """`text` cut into plain pieces (str) and special token ids (int), in order."""
        parts: list[str | int] = []
        done = 0
        search_from = 0
        while match := self._starts.search(text, search_from):
            start = match.start()
            found = self._longest_at(text, start)
            if found is None:
                search_from = start + 1
                continue
            if start > done:
                parts.append(text[done:start])
            parts.append(self._ids[found])
            done = search_from = start + len(found)
        if done < len(text):
            parts.append(text[done:])
        return parts

    def _longest_at(self, text: str, start: int) -> str | None:
        for length in self._lengths[text[start]]:
            candidate = text[start:start + length]
            if candidate in self._ids:
                return candidate
        return None
