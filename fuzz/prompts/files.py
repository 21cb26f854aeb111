"""The prompt sets a user deploys with, read as `fuzz screen` and `fuzz run --seed-prompts` take
them: text, JSONL, CSV/TSV and Parquet files, each prompt with where it came from (file:line).

- text (any other extension): one prompt per line (blank lines skipped; the line ending is not
  part of the prompt), or with `separator` the pieces between separators, taken exactly;
- JSONL (`.jsonl`, `.ndjson`): one JSON object per line, the prompt in `field` ("prompt"), or a
  chat in `messages` ([{"role", "content"}, ...]) that fuzz.prompts.chat renders with the model's
  template;
- CSV/TSV (`.csv`, `.tsv`): a header row, the prompt in column `field` ("prompt");
- Parquet (`.parquet`, needs pyarrow: `pip install 'gemma-fuzz[parquet]'`): column `field`.

Bad input is an InputError that names the file and line (or row) and how to fix it, raised before
anything runs; an option that cannot apply to a file (`separator` to JSONL, `field` to text) is one
too.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

DEFAULT_FIELD = "prompt"
TEXT, JSONL, CSV, TSV, PARQUET = "text", "jsonl", "csv", "tsv", "parquet"
FORMAT_OF_SUFFIX = {".jsonl": JSONL, ".ndjson": JSONL, ".csv": CSV, ".tsv": TSV,
                    ".parquet": PARQUET}
ROLES = ("system", "user", "assistant", "model")


class InputError(ValueError):
    """A prompt file that cannot be read as given: the message names file:line and the fix."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of the user's set: plain text or chat turns, and where it came from."""

    index: int  # 0-based, over every file in the order given
    source: str  # "file:line" (1-based; Parquet: the row)
    text: Optional[str] = None
    messages: Optional[tuple[tuple[str, str], ...]] = None  # (role, content) per turn

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def file_format(path: Path) -> str:
    return FORMAT_OF_SUFFIX.get(path.suffix.lower(), TEXT)


def read_prompts(paths: Sequence[str | Path], field: Optional[str] = None,
                 separator: Optional[str] = None) -> list[PromptRecord]:
    """Every prompt of every file, in order; InputError on the first problem."""
    if not paths:
        raise InputError("no prompt file given: pass --prompts FILE [FILE ...]")
    if separator == "":
        raise InputError("--separator '': give the string that separates prompts, e.g. "
                         "--separator '\\n---\\n'")
    records: list[PromptRecord] = []
    for raw in paths:
        path = Path(raw)
        kind = file_format(path)
        if kind == TEXT and field is not None:
            raise InputError(f"{path}: --field {field} applies to JSONL, CSV, TSV and Parquet "
                             "files, and this one is read as text (one prompt per line); drop "
                             "--field or give a .jsonl/.csv/.tsv/.parquet file")
        if kind != TEXT and separator is not None:
            raise InputError(f"{path}: --separator applies to text files, and this one is "
                             f"{kind}; drop --separator")
        for source, text, messages in _read(path, kind, field or DEFAULT_FIELD, separator):
            records.append(PromptRecord(len(records), source, text, messages))
    return records


def _read(path: Path, kind: str, field: str, separator: Optional[str]
          ) -> Iterator[tuple[str, Optional[str], Optional[tuple[tuple[str, str], ...]]]]:
    if kind == PARQUET:
        yield from _parquet(path, field)
        return
    text = _text_of(path)
    if kind == TEXT:
        yield from _text(path, text, separator)
    elif kind == JSONL:
        yield from _jsonl(path, text, field)
    else:
        yield from _table(path, text, field, "\t" if kind == TSV else ",")


def _text_of(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror}); give the path of a prompt "
                         "file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 (byte {data[err.start]:#04x}); save the "
                         "file as UTF-8") from None


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) split at "\n" only ("\r\n" too), as editors number lines.
    Not str.splitlines(): it also splits at U+2028, U+0085 and other breaks that a JSON string
    may hold unescaped (json.dumps(..., ensure_ascii=False) writes them as they are), which would
    cut such a prompt's line in two."""
    for n, line in enumerate(text.split("\n"), start=1):
        yield n, line.removesuffix("\r")


def _text(path: Path, text: str, separator: Optional[str]) -> Iterator[tuple]:
    if separator is None:
        for n, line in numbered_lines(text):
            if line.strip():
                yield f"{path}:{n}", line, None
        return
    line = 1  # where the piece starts, counted as we go (one pass over the file)
    for piece in text.split(separator):
        if piece:
            yield f"{path}:{line}", piece, None
        line += piece.count("\n") + separator.count("\n")


def _jsonl(path: Path, text: str, field: str) -> Iterator[tuple]:
    for n, line in numbered_lines(text):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            doc = json.loads(line)
        except ValueError as err:
            raise InputError(f"{where}: not a JSON line ({err.msg}, column {err.colno}); write "
                             "one JSON object per line") from None
        if not isinstance(doc, dict):
            raise InputError(f"{where}: a JSON line must be an object, e.g. "
                             f'{{"{field}": "..."}}, not {type(doc).__name__}')
        if field in doc:
            value = doc[field]
            if not isinstance(value, str):
                raise InputError(f"{where}: field {field!r} must be a string, got "
                                 f"{type(value).__name__}")
            yield where, value, None
        elif "messages" in doc:
            yield where, None, _messages(where, doc["messages"])
        else:
            raise InputError(f"{where}: no {field!r} field and no 'messages' (keys: "
                             f"{', '.join(map(repr, doc)) or 'none'}); give the prompt's field "
                             "with --field NAME")


def _messages(where: str, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: 'messages' must be a non-empty list of "
                         '{"role": ..., "content": ...} objects')
    turns = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or \
                message.get("role") not in ROLES:
            raise InputError(f"{where}: messages[{i}] must be an object with a role "
                             f"({', '.join(ROLES)}) and a string content, got "
                             f"{json.dumps(message, ensure_ascii=False)[:80]}")
        turns.append((message["role"], message["content"]))
    return tuple(turns)


def _table(path: Path, text: str, field: str, delimiter: str) -> Iterator[tuple]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{path}:1: empty file: a header row naming the columns comes "
                         f"first, one of them {field!r}") from None
    except csv.Error as err:
        raise InputError(f"{path}:1: not a {delimiter!r}-separated table ({err})") from None
    if field not in header:
        raise InputError(f"{path}:1: no column {field!r} in the header ({', '.join(header)}); "
                         "name the prompt's column with --field NAME")
    column = header.index(field)
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise InputError(f"{path}:{line}: not a well-formed row ({err})") from None
        if not row:
            continue
        if len(row) != len(header):
            raise InputError(f"{path}:{line}: {len(row)} cells where the header has "
                             f"{len(header)}; quote a cell that holds the delimiter")
        yield f"{path}:{line}", row[column], None


def _parquet(path: Path, field: str) -> Iterator[tuple]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow: pip install "
                         "'gemma-fuzz[parquet]'") from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable Parquet file ({err})") from None
    if field not in table.column_names:
        raise InputError(f"{path}: no column {field!r} ({', '.join(table.column_names)}); name "
                         "the prompt's column with --field NAME")
    for n, value in enumerate(table.column(field).to_pylist(), start=1):
        if not isinstance(value, str):
            raise InputError(f"{path}:{n}: column {field!r} must hold strings, row {n} holds "
                             f"{type(value).__name__}")
        yield f"{path}:{n}", value, None
