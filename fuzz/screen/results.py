"""`fuzz screen --out RESULTS.jsonl`: one JSON line per (prompt, policy, BOS mode), written as the
screen goes, resumable, never a partial or duplicate line.

- Every line carries its key (prompt_index, policy, bos_mode) and the run it belongs to (model
  fingerprint, engine, bounds): the same command again reads the file, skips the keys it holds and
  refuses a file of another run (another model, engine or bounds would mix two experiments).
- A batch's lines go out in one write, then fsync: a process killed (SIGKILL included) loses at
  most the batch in flight. Should the kill land inside that write, the next run finds a last line
  without its newline and cuts it off before it appends (said on stderr): no partial line is ever
  read as a result, and no key is written twice.
- The file is held under an exclusive lock while a screen writes it: a second screen on the same
  file is refused instead of interleaving.
- Shards (`--shard K/N`) write one file each; their lines concatenated are the unsharded run's.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any, Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two screens on one file are the user's to avoid
    fcntl = None  # type: ignore[assignment]

from fuzz.prompts.files import InputError, numbered_lines
from fuzz.verdict import json_safe

Key = tuple[int, str, str]  # (prompt_index, policy, bos_mode)


def row_key(row: dict[str, Any]) -> Key:
    return int(row["prompt_index"]), str(row["policy"]), str(row["bos_mode"])


def key_text(key: Hashable) -> str:
    """How an error names a screen's key: 'prompt 3, policy float16, no-bos'."""
    index, policy, bos_mode = key  # type: ignore[misc]
    return f"prompt {index}, policy {policy}, {bos_mode}"


class ResultsFile:
    """The results file of one screen (or sweep, fuzz.sweep: its own key, identity and name):
    what it holds already, and appending batches to it. Every key of `identity` must agree on
    every line."""

    def __init__(self, path: Optional[str | Path], identity: dict[str, Any],
                 key_of: Callable[[dict[str, Any]], Hashable] = row_key,
                 describe_key: Callable[[Hashable], str] = key_text,
                 command: str = "fuzz screen") -> None:
        self.path = None if path is None else Path(path)  # None: the lines stay in memory
        self.identity = identity
        self.key_of, self.describe_key, self.command = key_of, describe_key, command
        self.done: set[Hashable] = set()
        self.rows: list[dict[str, Any]] = []  # every line: the file's, then this run's
        self.rows_before = 0
        self._fd: Optional[int] = None

    def __enter__(self) -> ResultsFile:
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                raise InputError(f"{self.path}: another {self.command} is writing this "
                                 "file; wait for it or give another --out") from None
        self._load()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        tail = data[end:]
        try:
            text = data[:end].decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: not a results file of `fuzz screen` (not UTF-8); "
                             "give another --out") from None
        self._check(text)
        if tail:  # a line cut by a kill inside the write: never a result
            if not tail.startswith(b"{"):
                raise InputError(f"{self.path}: its last line is not a result line; give "
                                 "another --out, or move this file away")
            os.ftruncate(self._fd, end)
            print(f"{self.path}: removed an unfinished last line ({len(tail)} bytes) left by a "
                  f"killed {self.command}; its batch runs again", file=sys.stderr)
        self.rows_before = len(self.done)

    def _check(self, text: str) -> None:
        """Every line a result of this run, each key once (InputError naming file:line)."""
        for n, line in numbered_lines(text):
            if not line:
                continue  # the end of the last line
            try:
                row = json.loads(line)
                key = self.key_of(row)
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{self.path}:{n}: not a result line of `{self.command}`; "
                                 "give another --out, or move this file away") from None
            theirs = {k: row.get(k) for k in self.identity}
            if theirs != self.identity:
                differ = ", ".join(f"{k} {theirs[k]!r} (this run: {self.identity[k]!r})"
                                   for k in self.identity if theirs[k] != self.identity[k])
                raise InputError(f"{self.path}:{n}: this file holds another run's results "
                                 f"({differ}); give another --out to keep both")
            if key in self.done:
                raise InputError(f"{self.path}:{n}: a second line for "
                                 f"{self.describe_key(key)}: the file was edited or merged by "
                                 "hand")
            self.done.add(key)
            self.rows.append(row)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """One write for the whole batch, then fsync (see the module docstring)."""
        rows = [json_safe({**row, **self.identity}) for row in rows]  # strict JSON values
        if not rows:
            return
        if self.path is None:
            self.rows += rows
            self.done.update(self.key_of(r) for r in rows)
            return
        data = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False, sort_keys=True) + "\n"
                       for r in rows).encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):  # a full disk: cut the partial batch off again
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            raise OSError(f"{self.path}: wrote {written} of {len(data)} bytes (disk full?)")
        os.fsync(self._fd)
        self.rows += rows
        self.done.update(self.key_of(r) for r in rows)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every complete line of a results file (one of several shards' files, e.g.)."""
    with contextlib.suppress(FileNotFoundError):
        text = Path(path).read_text(encoding="utf-8")
        return [json.loads(line) for _, line in numbered_lines(text) if line.strip()]
    return []
