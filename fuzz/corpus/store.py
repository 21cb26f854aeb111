"""The store: case files under ``<root>/<model>/``, loaded in order, saved once per signature.

Saving runs the signature check and the publish under an exclusive ``flock`` on
``<root>/<model>/.lock``, and publishes with :func:`fuzz.atomic.write_atomic` (``exclusive=True``:
never an overwrite, never a partial file). See :mod:`fuzz.corpus` for the whole story.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fuzz.atomic import TMP_SUFFIX, fsync_directory, write_atomic
from fuzz.corpus.case import Case, check_model_name, short_label
from fuzz.corpus.validate import CorpusError, _case_from_document, _Invalid, load_case
from fuzz.verdict import Signature

try:  # POSIX only; see _exclusive_lock for what happens without it
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"

SaveStatus = Literal["saved", "duplicate-file", "known-signature"]
SEEDS_DIR = "seeds"  # corpus/seeds/: seed prompts, never a model's cases


@dataclass(frozen=True)
class LoadedCase:
    case: Case
    path: Path

    @property
    def case_id(self) -> str:
        return self.path.stem


@dataclass(frozen=True)
class SaveResult:
    """What save() did. ``existing``: the files already holding this id or signature."""

    status: SaveStatus
    path: Path  # where the case is (saved / duplicate-file) or would have gone (known-signature)
    case_id: str
    existing: tuple[Path, ...] = ()

    @property
    def saved(self) -> bool:
        return self.status == "saved"


@dataclass(frozen=True)
class ScanResult:
    cases: list[LoadedCase]
    errors: list[CorpusError]


class Corpus:
    """The case files under ``root`` (usually ``corpus/``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def model_dir(self, model: str) -> Path:
        check_model_name(model)
        return self.root / model

    def models(self) -> list[str]:
        """Every model directory (hidden ones, __pycache__ and seeds/ excluded), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith((".", "__")) and p.name != SEEDS_DIR
        )

    @property
    def seeds_dir(self) -> Path:
        """<root>/seeds: prompts that seed the search (fuzz run --seed-prompts), not cases."""
        return self.root / SEEDS_DIR

    def scan(self, model: str | None = None) -> ScanResult:
        """Every good case and every error (malformed file, misplaced file), never raising."""
        good: list[LoadedCase] = []
        errors: list[CorpusError] = []
        for path in self._case_files(model):
            try:
                good.append(LoadedCase(self._load_placed(path), path))
            except CorpusError as exc:
                errors.append(exc)
        return ScanResult(good, errors)

    def cases(self, model: str | None = None) -> list[LoadedCase]:
        """Every case (of one model, or all), sorted by path; raises on the first bad file."""
        return [LoadedCase(self._load_placed(path), path) for path in self._case_files(model)]

    def signatures(self, model: str) -> set[Signature]:
        return {loaded.case.signature for loaded in self.cases(model)}

    def save(self, case: Case, *, force: bool = False) -> SaveResult:
        """Store a new case unless its id exists or (without force) its signature is known.

        An existing file is never overwritten. Raises CorpusError if a file already in the
        model's directory is malformed (dedup cannot be trusted until it is fixed), and
        ValueError if the case itself could not be loaded back.
        """
        directory = self.model_dir(case.model)
        data = _serialize(case)
        cid = case.case_id
        final = directory / f"{cid}.json"
        directory.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(directory):
            if final.exists():
                return SaveResult("duplicate-file", final, cid, (final,))
            if not force:
                same = [lc.path for lc in self.cases(case.model)
                        if lc.case.signature == case.signature]
                if same:
                    return SaveResult("known-signature", final, cid, tuple(same))
            # exclusive: a writer that ignores the lock (or a platform without flock) still
            # cannot overwrite the file; False means the name appeared since the check above.
            if not write_atomic(final, data, exclusive=True):
                return SaveResult("duplicate-file", final, cid, (final,))
        return SaveResult("saved", final, cid)

    def replace(self, old: LoadedCase, new: Case) -> SaveResult:
        """Puts `new` (the same signature: a minimized or re-measured case) in place of `old`.

        Under the directory lock the new file is published first and the old one removed
        after, so a process killed in between leaves both, never neither nor half of one (the
        next `fuzz minimize` finishes the job: it minimizes the old prompt to the same new one,
        finds that file and removes the old). A new case with the old one's id (the same
        prompt, a new record) is rewritten atomically: a reader sees the old file or the new."""
        if new.signature != old.case.signature:
            raise ValueError(f"{old.path}: a case is replaced only by one of its own signature, "
                             f"not {new.signature}")
        directory = self.model_dir(new.model)
        data = _serialize(new)
        final = directory / f"{new.case_id}.json"
        with _exclusive_lock(directory):
            if final == old.path:
                write_atomic(final, data)
                return SaveResult("saved", final, new.case_id, (old.path,))
            published = write_atomic(final, data, exclusive=True)
            old.path.unlink(missing_ok=True)
            fsync_directory(directory)
        return SaveResult("saved" if published else "duplicate-file", final, new.case_id,
                          (old.path,))

    def orphans(self) -> list[Path]:
        """Temp files left by killed writers (hidden names ending in .tmp)."""
        return sorted(
            p for model in self.models() for p in (self.root / model).glob(f".*{TMP_SUFFIX}")
        )

    def _case_files(self, model: str | None) -> Iterator[Path]:
        models = [model] if model is not None else self.models()
        if model is None and self.root.is_dir():
            # A case file directly under the root belongs to no model: report it, don't skip it.
            yield from sorted(p for p in self.root.glob("*.json") if not p.name.startswith("."))
        for name in models:
            directory = self.model_dir(name) if model is not None else self.root / name
            if directory.is_dir():
                # Hidden names are skipped: write_atomic's temp files (.<id>.<pid>.<rand>.tmp)
                # start with a dot, so a killed writer's leftovers are never loaded.
                yield from sorted(
                    p for p in directory.glob("*.json")
                    if not p.name.startswith(".") and p.is_file()
                )

    def _load_placed(self, path: Path) -> Case:
        if path.parent == self.root:
            raise CorpusError(path, "case file lies directly in the corpus root",
                              "move it into <corpus>/<model-name>/")
        case = load_case(path)
        if path.parent.name != case.model:
            raise CorpusError(
                path, f"case of model '{case.model}' is stored under '{path.parent.name}/'",
                f"move it to {self.root / case.model}/",
            )
        return case


def _serialize(case: Case) -> bytes:
    """The file bytes, checked to pass the loader's validation (so we never write a bad file)."""
    text = case.to_json()
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"case {short_label(case)}: the prompt or note holds a character UTF-8 cannot store "
            f"({exc.object[exc.start:exc.end]!r}, a lone surrogate?); remove it"
        ) from None
    try:
        _case_from_document(json.loads(text))
    except _Invalid as exc:
        raise ValueError(f"case {short_label(case)} cannot be saved: {exc.problem}") from None
    return data


@contextlib.contextmanager
def _exclusive_lock(directory: Path) -> Iterator[None]:
    """flock on <dir>/.lock: serializes check-signature-then-write across processes."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        # Without fcntl (Windows) only id-level dedup holds (the final name is created
        # exclusively); two different prompts of one signature may then both be saved.
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
