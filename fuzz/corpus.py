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
killed. Each save (1) writes a hidden temp file ``.<id>.<pid>.<rand>.tmp`` in the target directory
and fsyncs it, (2) publishes it with ``os.link`` — which fails when the final name exists, so a case
is never overwritten or half-written — and (3) removes the temp name. The signature check and the
publish happen under an exclusive ``fcntl.flock`` on ``<root>/<model>/.lock``, so two workers that
find the same signature at the same moment produce exactly one file. A killed writer leaves at
most an orphan ``.*.tmp`` file: loading never reads those, and :meth:`Corpus.clean_orphans`
removes old ones.

Loading API: :meth:`Corpus.cases` raises :class:`CorpusError` on the first malformed file (what the
replay test wants: a broken case must not be skipped silently); :meth:`Corpus.scan` returns every
good case *and* every error, for the CLI table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import operator
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import fuzz
from fuzz.verdict import NonFinite, Verdict, from_json_safe, json_safe

try:  # POSIX only; see _exclusive_lock for what happens without it
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 1
CASE_ID_HEX_DIGITS = 16
LOCK_NAME = ".lock"
TMP_SUFFIX = ".tmp"

# A model name becomes a directory name: keep it to one portable path component.
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
CASE_FILE_RE = re.compile(rf"[0-9a-f]{{{CASE_ID_HEX_DIGITS}}}\.json")

BOUNDS_KEYS = ("max_new_tokens", "max_prompt_tokens")
FINDER_KEYS = ("seed", "strategy", "date", "tool_version", "torch_version", "device")

RECREATE_HINT = "re-create the case with `python -m fuzz add`"

Signature = tuple[str, str, bool, int, str, str]
SaveStatus = Literal["saved", "duplicate-file", "known-signature"]


class CorpusError(ValueError):
    """A corpus file that cannot be used. The message starts with the file path."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path}: {problem}; {fix}")


@dataclass
class Case:
    """One stored finding: a prompt that made one model produce NaN/Inf under one policy.

    In memory ``first_nonfinite`` is a :class:`fuzz.verdict.NonFinite` and ``max_abs`` holds
    floats (inf/nan as floats); on disk they are a dict and json_safe strings.
    """

    prompt: str  # exactly as run
    prompt_ids: list[int]  # as fed to the model, BOS included when add_bos
    add_bos: bool
    model: str  # zoo name or user-given name, e.g. "gemma3-270m", "tiny"
    model_fingerprint: str  # hash of weights + config + tokenizer, computed by the caller
    policy: str  # the precision policy that failed, e.g. "float16"
    bounds: dict[str, int]  # {"max_new_tokens": N, "max_prompt_tokens": N}
    first_nonfinite: NonFinite
    max_abs: dict[str, dict[str, float]]  # {layer_label: {site: max |x|}}
    finder: dict[str, Any]  # see FINDER_KEYS and finder_info()
    chat: bool = False  # chat template applied to the prompt
    safe_policies: list[str] = field(default_factory=list)  # declared safe when found
    note: str = ""
    schema: int = SCHEMA_VERSION

    @classmethod
    def from_verdict(
        cls,
        verdict: Verdict,
        *,
        model: str,
        fingerprint: str,
        bounds: dict[str, int],
        finder: dict[str, Any],
        chat: bool = False,
        safe_policies: list[str] | None = None,
        note: str = "",
    ) -> Case:
        """Build a case from a failing verdict (ValueError for a finite one)."""
        if verdict.first_nonfinite is None:
            raise ValueError(
                f"verdict for policy {verdict.policy!r} on prompt {verdict.prompt[:40]!r} has no "
                "first_nonfinite: only failing verdicts become corpus cases"
            )
        return cls(
            prompt=verdict.prompt,
            prompt_ids=list(verdict.prompt_ids),
            add_bos=verdict.add_bos,
            model=model,
            model_fingerprint=fingerprint,
            policy=verdict.policy,
            bounds=dict(bounds),
            first_nonfinite=verdict.first_nonfinite,
            max_abs={layer: dict(sites) for layer, sites in verdict.max_abs.items()},
            finder=dict(finder),
            chat=chat,
            safe_policies=list(safe_policies or []),
            note=note,
        )

    @property
    def signature(self) -> Signature:
        return signature(self)

    @property
    def case_id(self) -> str:
        return case_id(self)

    def to_document(self) -> dict[str, Any]:
        """The JSON object stored on disk (strict JSON values only)."""
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        doc["prompt_ids"] = _token_ids(self.prompt_ids)
        doc["first_nonfinite"] = self.first_nonfinite.to_dict()
        doc["max_abs"] = {
            str(layer): {str(site): float(v) for site, v in sites.items()}
            for layer, sites in self.max_abs.items()
        }
        doc["bounds"] = dict(self.bounds)
        doc["finder"] = dict(self.finder)
        doc["safe_policies"] = list(self.safe_policies)
        return json_safe(doc)

    def to_json(self) -> str:
        """The exact file text: sorted keys, indent 2, UTF-8 characters kept, trailing newline."""
        text = json.dumps(
            self.to_document(), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False
        )
        return text + "\n"


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


def _token_ids(ids: list[Any]) -> list[int]:
    """Plain ints; numpy/torch integer scalars are accepted (operator.index), floats are not."""
    out = []
    for i, token in enumerate(ids):
        try:
            out.append(operator.index(token))
        except TypeError:
            raise ValueError(
                f"prompt_ids[{i}] = {token!r} is not an integer token id; pass ids as ints "
                "(e.g. tensor.tolist())"
            ) from None
    return out


# --------------------------------------------------------------------------- identity


def signature(case: Case) -> Signature:
    """The crash bucket of a case: what makes two findings 'the same bug'."""
    nf = case.first_nonfinite
    # Position 0 with BOS is the attention sink every prompt shares, so a failure there is one
    # bucket whatever the prompt; anywhere else the failing token is prompt content.
    where = "bos" if (case.add_bos and nf.position == 0) else "content"
    return (case.model, case.policy, bool(case.add_bos), int(nf.layer), str(nf.site), where)


def case_id(case: Case) -> str:
    """First 16 hex digits of sha256 over canonical JSON of [*signature, prompt]."""
    # ensure_ascii keeps the hashed bytes well defined for every Python str (even a lone
    # surrogate); separators without spaces make the encoding canonical.
    canonical = json.dumps(
        [*signature(case), case.prompt], ensure_ascii=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:CASE_ID_HEX_DIGITS]


def short_label(case: Case) -> str:
    """A readable pytest id: model-policy-bos|nobos-<prompt start>-<id prefix>."""
    head = re.sub(r"[^A-Za-z0-9]+", "_", case.prompt[:24]).strip("_") or "empty"
    bos = "bos" if case.add_bos else "nobos"
    return f"{case.model}-{case.policy}-{bos}-{head}-{case.case_id[:8]}"


def finder_info(
    *, seed: int | None, strategy: str, device: str, date: str | None = None
) -> dict[str, Any]:
    """The ``finder`` record with tool and torch versions and the current UTC time filled in."""
    import torch  # only here: the rest of this module must not need torch

    return {
        "seed": seed,
        "strategy": strategy,
        "date": date or datetime.now(UTC).isoformat(timespec="seconds"),
        "tool_version": fuzz.__version__,
        "torch_version": str(torch.__version__),
        "device": device,
    }


def check_model_name(model: str) -> None:
    if not isinstance(model, str) or not MODEL_NAME_RE.fullmatch(model):
        raise ValueError(
            f"model name {model!r} cannot be a corpus directory: use letters, digits, '.', '_' "
            "and '-', starting with a letter or digit (at most 100 characters), e.g. 'gemma3-270m'"
        )


# --------------------------------------------------------------------------- validation


class _Invalid(Exception):
    """A problem in a case document; the caller adds the path."""

    def __init__(self, problem: str, fix: str = f"fix the value by hand or {RECREATE_HINT}"):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _wrong_type(name: str, expected: str, value: Any) -> _Invalid:
    return _Invalid(f"field '{name}' must be {expected}, got {_json_type(value)} {_shown(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _need_int(name: str, value: Any, minimum: int | None = None) -> int:
    if not _is_int(value) or (minimum is not None and value < minimum):
        at_least = f" >= {minimum}" if minimum is not None else ""
        raise _wrong_type(name, f"an integer{at_least}", value)
    return value


def _need_str(name: str, value: Any, non_empty: bool = False) -> str:
    if not isinstance(value, str) or (non_empty and not value):
        raise _wrong_type(name, "a non-empty string" if non_empty else "a string", value)
    return value


def _need_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type(name, "true or false", value)
    return value


def _need_object(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _wrong_type(name, "an object", value)
    return value


def _need_keys(name: str, obj: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise _Invalid(f"field '{name}' lacks {', '.join(repr(k) for k in missing)}",
                       f"add the missing key(s) or {RECREATE_HINT}")


def _check_schema(doc: dict[str, Any]) -> None:
    if "schema" not in doc:
        raise _Invalid("missing field 'schema' (the case schema version, 1)",
                       f"add \"schema\": {SCHEMA_VERSION} or {RECREATE_HINT}")
    version = doc["schema"]
    if not _is_int(version):
        raise _wrong_type("schema", f"the integer {SCHEMA_VERSION}", version)
    if version != SCHEMA_VERSION:
        newer = version > SCHEMA_VERSION
        raise _Invalid(
            f"unknown schema version {version} (gemma-fuzz {fuzz.__version__} reads schema "
            f"{SCHEMA_VERSION})",
            "upgrade gemma-fuzz to read it" if newer else RECREATE_HINT,
        )


_FIELD_TYPES = {f.name: f for f in dataclasses.fields(Case)}
_OPTIONAL_FIELDS = {"safe_policies", "note"}
_REQUIRED_FIELDS = tuple(sorted(set(_FIELD_TYPES) - _OPTIONAL_FIELDS))


def _check_fields_present(doc: dict[str, Any]) -> None:
    missing = [name for name in _REQUIRED_FIELDS if name not in doc]
    if missing:
        names = ", ".join(repr(m) for m in missing)
        raise _Invalid(f"missing field{'s' if len(missing) > 1 else ''} {names}",
                       f"add {'them' if len(missing) > 1 else 'it'} or {RECREATE_HINT}")
    unknown = sorted(set(doc) - set(_FIELD_TYPES))
    if unknown:
        # Unknown fields would be dropped on the next write: refuse rather than lose data.
        raise _Invalid(
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)}"
            f" (schema {SCHEMA_VERSION} has {', '.join(sorted(_FIELD_TYPES))})",
            "remove it (or fix its spelling)",
        )


def _parse_prompt_ids(value: Any) -> list[int]:
    if not isinstance(value, list):
        raise _wrong_type("prompt_ids", "an array of token ids", value)
    for i, token in enumerate(value):
        _need_int(f"prompt_ids[{i}]", token, minimum=0)
    return list(value)


def _parse_bounds(value: Any) -> dict[str, int]:
    bounds = _need_object("bounds", value)
    _need_keys("bounds", bounds, BOUNDS_KEYS)
    for key in BOUNDS_KEYS:
        _need_int(f"bounds.{key}", bounds[key], minimum=0)
    return dict(bounds)


def _parse_nonfinite(value: Any) -> NonFinite:
    obj = _need_object("first_nonfinite", value)
    required = ("step", "layer", "site", "position", "token_id", "kind")
    _need_keys("first_nonfinite", obj, required)
    known = set(required) | {"channel", "terms"}
    unknown = sorted(set(obj) - known)
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise _Invalid(f"field 'first_nonfinite' has unknown key(s) {names}",
                       "remove them (or fix their spelling)")
    _need_int("first_nonfinite.step", obj["step"], minimum=0)
    _need_int("first_nonfinite.layer", obj["layer"], minimum=-1)
    _need_str("first_nonfinite.site", obj["site"], non_empty=True)
    _need_int("first_nonfinite.position", obj["position"], minimum=0)
    _need_int("first_nonfinite.token_id", obj["token_id"], minimum=0)
    if obj["kind"] not in ("nan", "inf"):
        raise _wrong_type("first_nonfinite.kind", "\"nan\" or \"inf\"", obj["kind"])
    if obj.get("channel") is not None:
        _need_int("first_nonfinite.channel", obj["channel"], minimum=0)
    terms = obj.get("terms")
    if terms is not None:
        if not (isinstance(terms, list) and len(terms) == 2
                and all(_is_number(t) or t in ("inf", "-inf", "nan") for t in terms)):
            raise _wrong_type("first_nonfinite.terms", "null or an array of two numbers", terms)
        obj = {**obj, "terms": [from_json_safe(t) for t in terms]}
    return NonFinite.from_dict(obj)


def _parse_max_abs(value: Any) -> dict[str, dict[str, float]]:
    table = _need_object("max_abs", value)
    out: dict[str, dict[str, float]] = {}
    for layer, sites in table.items():
        _need_object(f"max_abs.{layer}", sites)
        for site, v in sites.items():
            if not (_is_number(v) or v in ("inf", "-inf", "nan")):
                raise _wrong_type(f"max_abs.{layer}.{site}", 'a number or "inf"/"-inf"/"nan"', v)
            out.setdefault(layer, {})[site] = float(from_json_safe(v))
    return out


def _parse_finder(value: Any) -> dict[str, Any]:
    finder = _need_object("finder", value)
    _need_keys("finder", finder, FINDER_KEYS)
    if finder["seed"] is not None:
        _need_int("finder.seed", finder["seed"])
    for key in ("strategy", "tool_version", "torch_version", "device"):
        _need_str(f"finder.{key}", finder[key])
    date = _need_str("finder.date", finder["date"])
    try:
        datetime.fromisoformat(date)
    except ValueError:
        raise _wrong_type("finder.date", "an ISO 8601 date, e.g. 2025-01-31T02:00:00+00:00",
                          date) from None
    return dict(finder)


def _parse_str_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _wrong_type(name, "an array of strings", value)
    return list(value)


def _case_from_document(doc: Any) -> Case:
    """Validate a parsed JSON document and build the Case (raises _Invalid)."""
    if not isinstance(doc, dict):
        raise _Invalid(f"the file must hold one JSON object, found {_json_type(doc)}",
                       RECREATE_HINT)
    _check_schema(doc)
    _check_fields_present(doc)
    model = _need_str("model", doc["model"])
    if not MODEL_NAME_RE.fullmatch(model):
        raise _wrong_type("model", "a model name of letters, digits, '.', '_', '-'", model)
    return Case(
        schema=doc["schema"],
        prompt=_need_str("prompt", doc["prompt"]),
        prompt_ids=_parse_prompt_ids(doc["prompt_ids"]),
        add_bos=_need_bool("add_bos", doc["add_bos"]),
        chat=_need_bool("chat", doc["chat"]),
        model=model,
        model_fingerprint=_need_str("model_fingerprint", doc["model_fingerprint"]),
        policy=_need_str("policy", doc["policy"], non_empty=True),
        bounds=_parse_bounds(doc["bounds"]),
        first_nonfinite=_parse_nonfinite(doc["first_nonfinite"]),
        max_abs=_parse_max_abs(doc["max_abs"]),
        finder=_parse_finder(doc["finder"]),
        safe_policies=_parse_str_list("safe_policies", doc.get("safe_policies", [])),
        note=_need_str("note", doc.get("note", "")),
    )


def load_case(path: Path) -> Case:
    """Read and validate one case file; CorpusError (message starts with the path) if unusable."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(path, f"not UTF-8 text (bad byte at offset {exc.start})",
                          f"restore it from version control or delete it and {RECREATE_HINT}"
                          ) from None
    except OSError as exc:
        raise CorpusError(path, f"cannot be read ({exc.strerror})",
                          "check the file's permissions") from None
    try:
        doc = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:  # json.JSONDecodeError, or a bare NaN/Infinity
        raise CorpusError(path, f"not valid JSON ({exc})",
                          f"restore it from version control or delete it and {RECREATE_HINT}"
                          ) from None
    try:
        case = _case_from_document(doc)
    except _Invalid as exc:
        raise CorpusError(path, exc.problem, exc.fix) from None
    expected = case.case_id
    if path.name != f"{expected}.json":
        raise CorpusError(
            path,
            f"file name does not match the case: its signature and prompt give case id {expected}"
            " (was the prompt, model, policy, add_bos or first_nonfinite edited by hand?)",
            f"rename it to {expected}.json if the edit is intended, otherwise undo the edit",
        )
    return case


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"bare {name} is not strict JSON; write it as a string, e.g. \"inf\"")


# --------------------------------------------------------------------------- the store


class Corpus:
    """The case files under ``root`` (usually ``corpus/``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def model_dir(self, model: str) -> Path:
        check_model_name(model)
        return self.root / model

    def path_for(self, case: Case) -> Path:
        return self.model_dir(case.model) / f"{case.case_id}.json"

    def models(self) -> list[str]:
        """Every model directory (hidden ones and __pycache__ excluded), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith((".", "__"))
        )

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

    def has_signature(self, sig: Signature) -> bool:
        return sig in self.signatures(sig[0])

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
            if not _publish(directory, final, data):
                return SaveResult("duplicate-file", final, cid, (final,))
        return SaveResult("saved", final, cid)

    def orphans(self) -> list[Path]:
        """Temp files left by killed writers (hidden names ending in .tmp)."""
        return sorted(
            p for model in self.models() for p in (self.root / model).glob(f".*{TMP_SUFFIX}")
        )

    def clean_orphans(self, older_than_s: float = 3600.0) -> list[Path]:
        """Remove orphan temp files last modified more than ``older_than_s`` seconds ago.

        The age limit spares the temp file of a writer that is still running.
        """
        cutoff = time.time() - older_than_s
        removed = []
        for path in self.orphans():
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
        return removed

    def _case_files(self, model: str | None) -> Iterator[Path]:
        models = [model] if model is not None else self.models()
        if model is None and self.root.is_dir():
            # A case file directly under the root belongs to no model: report it, don't skip it.
            yield from sorted(p for p in self.root.glob("*.json") if not p.name.startswith("."))
        for name in models:
            directory = self.model_dir(name) if model is not None else self.root / name
            if directory.is_dir():
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
    """The file bytes, checked to load back as an equal case (so we never write a bad file)."""
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


# errno values meaning "this file system has no hard links" (FAT, some FUSE/SMB mounts).
_NO_LINK_ERRNOS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS,
                   errno.EXDEV}


def _publish(directory: Path, final: Path, data: bytes) -> bool:
    """Write data to a temp file, fsync, then create ``final`` exclusively. False if it exists."""
    tmp = directory / f".{final.stem}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # the content must be on disk before the name that publishes it
        finally:
            os.close(fd)
        try:
            os.link(tmp, final)  # atomic, and fails if final exists: never an overwrite
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINK_ERRNOS:
                raise
            if not _rename_exclusive(tmp, final):
                return False
        _fsync_directory(directory)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _rename_exclusive(tmp: Path, final: Path) -> bool:
    """No hard links: O_CREAT|O_EXCL reserves the name, then rename puts the content in place.

    A kill between the two steps leaves an empty final file, which loading reports as not JSON
    (never a silently wrong case); cooperating writers hold the directory lock, so none races.
    """
    try:
        os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    os.replace(tmp, final)
    return True


def _fsync_directory(directory: Path) -> None:
    """Make the new directory entry durable (best effort: not every OS can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
