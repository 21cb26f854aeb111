"""The text `fuzz advise` teacher-forces every policy on: the user's `--text FILE`, or by default
text every machine has, Python's own standard library source (docstrings and code).

The default reads STDLIB_FILES, in that order, from the running interpreter's stdlib directory
(sysconfig's "stdlib" path): the same Python version reads the same bytes on every machine, and
the report gives the text's SHA-256 so two runs can be seen to have read the same text (another
Python version edits these files, and so changes the text).

Each file is tokenized alone (no BOS), cut into consecutive pieces of T-1 tokens, and each piece
is prefixed with BOS, as the model always starts (Gemma's first position is its attention sink,
where float16 overflows: a text set without BOS would never see it). N chunks are taken round-robin
over the files (chunk i from file i mod F, its (i div F)-th piece), so a few chunks already span
several kinds of text.
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fuzz.engine.interface import TokenizerLike

# Prose-heavy modules that every CPython 3.x ships, docstrings and code mixed; chosen once,
# never sampled, so every machine with the same Python reads the same text.
STDLIB_FILES = ("textwrap.py", "argparse.py", "statistics.py", "difflib.py", "fractions.py",
                "calendar.py", "heapq.py", "shlex.py", "json/decoder.py", "string.py")
DEFAULT_CHUNKS = 16
# 16 chunks of 64 tokens: float32 logits over Gemma 3's 262144-token vocabulary are 1 MB a
# position, so one chunk's are 64 MB, compared and dropped chunk by chunk
DEFAULT_TOKENS = 64


@dataclass
class TextSet:
    source: str  # "stdlib (…/lib/python3.11)" or the user's file
    chunks: list[list[int]]  # token ids, each starting with BOS
    sha256: str  # of the text read (UTF-8), to compare two runs' text
    available: int  # chunks the text holds (at least len(chunks))


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts() -> list[str]:
    """STDLIB_FILES' contents; an error names the missing file (a Python without its source)."""
    root = stdlib_dir()
    out = []
    for name in STDLIB_FILES:
        path = root / name
        try:
            out.append(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ValueError(f"the default text set reads {path}, which cannot be read "
                             f"({err.strerror}): this Python ships no standard library source; "
                             "give a text file with --text FILE") from None
    return out


def read_text_file(path: str | Path) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--text {path}: no such file; give a plain UTF-8 text file, or leave "
                         "--text out to use the Python standard library's source") from None
    except IsADirectoryError:
        raise ValueError(f"--text {path}: a directory; give one plain UTF-8 text file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"--text {path}: not UTF-8 text (byte {err.start}: {err.reason}); "
                         "convert it to UTF-8") from None


def text_set(tokenizer: TokenizerLike, chunks: int, tokens: int,
             path: Optional[str | Path] = None) -> TextSet:
    """`chunks` sequences of `tokens` tokens (BOS first) from the file, or from the stdlib."""
    if chunks < 2:
        raise ValueError(f"--text-chunks {chunks}: give at least 2 (the interval of the mean "
                         "KLD resamples chunks: one chunk has no spread)")
    if tokens < 2:
        raise ValueError(f"--text-tokens {tokens}: give at least 2 (BOS and one token to "
                         "predict)")
    texts = [read_text_file(path)] if path is not None else stdlib_texts()
    source = str(path) if path is not None else f"Python stdlib source ({stdlib_dir()})"
    pieces = [_pieces(tokenizer.encode(t, bos=False), tokens - 1) for t in texts]
    order = [(f, i) for i in range(max(map(len, pieces), default=0))
             for f in range(len(pieces)) if i < len(pieces[f])]
    available = len(order)
    if path is not None:
        # one file: spread the chunks evenly over it rather than reading its first part only
        step = max(1, available // chunks)
        order = order[::step]
    taken = [[tokenizer.bos_id] + pieces[f][i] for f, i in order[:chunks]]
    if len(taken) < 2:
        raise ValueError(f"--text {source}: {sum(map(len, pieces))} tokens hold "
                         f"{available} chunk(s) of {tokens} tokens; give a longer text or a "
                         "smaller --text-tokens (at least 2 chunks are needed)")
    digest = hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()
    return TextSet(source, taken, digest, available)


def _pieces(ids: list[int], size: int) -> list[list[int]]:
    """Consecutive whole pieces of `size` tokens (a shorter tail is dropped: every chunk has
    the same length)."""
    return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)]
