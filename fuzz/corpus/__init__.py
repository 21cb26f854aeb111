"""The corpus: one JSON file per finding, named by a content hash, written atomically.

Layout: ``<root>/<model-name>/<case-id>.json`` (UTF-8, sorted keys, indent 2, trailing newline,
strict JSON: inf/nan are stored as the strings "inf", "-inf", "nan").

A finding is identified by its *signature* — (model, policy, add_bos, first non-finite layer,
first non-finite site, "bos" | "content") — like a crash bucket in a fuzzer. A known signature is
not saved again (unless a person forces it, e.g. ``python -m fuzz add``), so a dtype that fails on
every prompt yields one minimal case, not thousands.

The case id is the first 16 hex digits of sha256 over the canonical JSON of the signature plus the
prompt text: the same finding always gets the same file name, two different prompts for one
signature get two names, and a hand-edited prompt no longer matches its file name (loading says so).

Concurrency: several pytest-xdist workers and a nightly job may save at once, and any of them may be
killed. Each save writes through :func:`fuzz.atomic.write_atomic` with ``exclusive=True``: a hidden
temp file ``.<id>.<pid>.<rand>.tmp`` in the target directory, fsynced, then published with
``os.link`` — which fails when the final name exists, so a case is never overwritten or
half-written — and the temp name removed. The signature check and the publish happen under an
exclusive ``fcntl.flock`` on ``<root>/<model>/.lock``, so two workers that find the same signature
at the same moment produce exactly one file. A killed writer leaves at most an orphan ``.*.tmp``
file: loading never reads those, and :meth:`Corpus.orphans` lists them.

Loading API: :meth:`Corpus.cases` raises :class:`CorpusError` on the first malformed file (what the
replay test wants: a broken case must not be skipped silently); :meth:`Corpus.scan` returns every
good case *and* every error, for the CLI table.

Modules: :mod:`.case` (the schema, signature and case id), :mod:`.validate` (a parsed document to
a Case or a CorpusError) and :mod:`.store` (the directory, the lock, saving). Import from
``fuzz.corpus``; the split is an implementation detail.
"""
from __future__ import annotations

from fuzz.atomic import TMP_SUFFIX
from fuzz.corpus.case import (
    BOUNDS_KEYS,
    CASE_FILE_RE,
    CASE_ID_HEX_DIGITS,
    FINDER_KEYS,
    MODEL_NAME_RE,
    SCHEMA_VERSION,
    Case,
    case_id,
    check_model_name,
    finder_info,
    root_cause,
    short_label,
    signature,
)
from fuzz.corpus.store import LOCK_NAME, Corpus, LoadedCase, SaveResult, SaveStatus, ScanResult
from fuzz.corpus.validate import RECREATE_HINT, CorpusError, load_case

__all__ = [
    "BOUNDS_KEYS",
    "CASE_FILE_RE",
    "CASE_ID_HEX_DIGITS",
    "FINDER_KEYS",
    "LOCK_NAME",
    "MODEL_NAME_RE",
    "RECREATE_HINT",
    "SCHEMA_VERSION",
    "TMP_SUFFIX",
    "Case",
    "Corpus",
    "CorpusError",
    "LoadedCase",
    "SaveResult",
    "SaveStatus",
    "ScanResult",
    "case_id",
    "check_model_name",
    "finder_info",
    "load_case",
    "root_cause",
    "short_label",
    "signature",
]
