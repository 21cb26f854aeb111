"""Small GGUF files written the way llama.cpp's converter writes Gemma's, for the tokenizer and
weight-loading tests (one copy of the writer's vocabulary block and closing steps)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import gguf


def add_vocabulary(writer: gguf.GGUFWriter, tokens: Sequence[str], scores: Sequence[float],
                   types: Sequence[int], *, bos: int, add_bos: bool, eos: Optional[int] = None,
                   unk: Optional[int] = None, pad: Optional[int] = None) -> None:
    """The tokenizer metadata (tokenizer.ggml.*) of a SentencePiece ("llama") vocabulary."""
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    writer.add_bos_token_id(bos)
    for add, token in ((writer.add_eos_token_id, eos), (writer.add_unk_token_id, unk),
                       (writer.add_pad_token_id, pad)):
        if token is not None:
            add(token)
    writer.add_add_bos_token(add_bos)


def finish(writer: gguf.GGUFWriter) -> None:
    """Header, metadata and tensors to the file, and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
