"""Atomic file writes: a reader sees the old file or the whole new one, never a partial file.

Every writer of the project goes through here: corpus cases (exclusive: never overwrite), the
dequantized weights cache, the rebuilt tokenizer cache and the run report (replace). Several
pytest-xdist workers, a nightly job and a killed process may write at once.

How: the data goes to a hidden temp file in the target's own directory
(``.<name>.<pid>.<rand>.tmp``, so the final step never crosses a file system), is fsynced, then
published:
- ``exclusive=True``: ``os.link(tmp, final)`` — atomic, and it fails when ``final`` exists, so a
  file is never overwritten. File systems without hard links (FAT, some FUSE/SMB mounts) fall back
  to reserving the name with O_CREAT|O_EXCL and renaming over it;
- ``exclusive=False``: ``os.replace(tmp, final)``.
The temp name is removed whatever happens; a killed writer leaves at most an orphan ``.*.tmp``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"

# errno values meaning "this file system has no hard links" (FAT, some FUSE/SMB mounts).
_NO_LINK_ERRNOS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS,
                   errno.EXDEV}

Writer = Callable[[Path], None]


def temp_name(final: Path) -> Path:
    """The hidden temp file a write of ``final`` uses (same directory, unique per writer)."""
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def temp_glob(final: Path) -> str:
    """A glob (in ``final``'s directory) matching the temp files of writes of ``final`` only:
    what a cleanup of a killed writer's leftovers may remove."""
    return f".{final.name}.*{TMP_SUFFIX}"


def write_atomic(final: str | os.PathLike[str], data: bytes | Writer, *,
                 exclusive: bool = False, mode: int = 0o644) -> bool:
    """Writes ``data`` (bytes, or a function that writes the given temp path) to ``final``.

    Returns False, writing nothing, when ``exclusive`` and ``final`` already exists; True once the
    file is published. ``mode`` is the published file's permission bits (0644: the corpus, the
    cache and reports are meant to be read by others).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        _write_temp(tmp, data, mode)
        if exclusive:
            published = _link_exclusive(tmp, final)
        else:
            os.replace(tmp, final)
            published = True
        if published:
            fsync_directory(final.parent)
        return published
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write_temp(tmp: Path, data: bytes | Writer, mode: int) -> None:
    if callable(data):
        data(tmp)  # e.g. safetensors' save_file, which wants a path
        fd, rest = os.open(tmp, os.O_RDONLY), memoryview(b"")
    else:
        fd, rest = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), memoryview(data)
    try:
        while rest:  # inside the try: a failed write (ENOSPC, EIO) must not leak the descriptor
            rest = rest[os.write(fd, rest):]
        os.fsync(fd)  # the content must be on disk before the name that publishes it
    finally:
        os.close(fd)
    os.chmod(tmp, mode)


def _link_exclusive(tmp: Path, final: Path) -> bool:
    try:
        os.link(tmp, final)  # atomic, and fails if final exists: never an overwrite
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
    # No hard links: O_CREAT|O_EXCL reserves the name, then rename puts the content in place. A
    # kill between the two steps leaves an empty final file, which a reader of JSON reports as
    # "not JSON" (never a silently wrong file); the corpus's writers hold a directory lock.
    try:
        os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    os.replace(tmp, final)
    return True


def fsync_directory(directory: Path) -> None:
    """Makes a new directory entry durable (best effort: not every OS can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
