"""From a parsed JSON document to a :class:`~fuzz.corpus.case.Case`, or to a precise error.

Case files are written by the tool but may be edited by hand or mangled by a merge, so every
problem is reported as a :class:`CorpusError` naming the file, what is wrong and how to fix it;
a broken case is never skipped silently. The store also runs :func:`_case_from_document` on each
case before writing it, so it never writes a file it could not load back.
"""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import fuzz
from fuzz.corpus.case import BOUNDS_KEYS, FINDER_KEYS, MODEL_NAME_RE, SCHEMA_VERSION, Case
from fuzz.verdict import NonFinite, from_json_safe

RECREATE_HINT = "re-create the case with `python -m fuzz add`"


class CorpusError(ValueError):
    """A corpus file that cannot be used. The message starts with the file path."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path}: {problem}; {fix}")


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


def _optional_str(name: str, value: Any) -> str | None:
    if value is None:
        return None
    return _need_str(name, value, non_empty=True)


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
        raise _Invalid(f"missing field 'schema' (the case schema version, {SCHEMA_VERSION})",
                       f"add \"schema\": {SCHEMA_VERSION} or {RECREATE_HINT}")
    version = doc["schema"]
    if not _is_int(version):
        raise _wrong_type("schema", f"the integer {SCHEMA_VERSION}", version)
    if version == 1:
        # Schema 1 bucketed by model name and kept no margin: its case ids cannot be recomputed
        # and its robustness is unknown, so the case must be measured again.
        raise _Invalid(
            "schema 1 (written before cases kept their margin and kernel robustness)",
            "re-create it with `python -m fuzz add --from-case FILE` (measures it again under "
            "every kernel variation), then delete this file")
    if version != SCHEMA_VERSION:
        newer = version > SCHEMA_VERSION
        raise _Invalid(
            f"unknown schema version {version} (gemma-fuzz {fuzz.__version__} reads schema "
            f"{SCHEMA_VERSION})",
            "upgrade gemma-fuzz to read it" if newer else RECREATE_HINT,
        )


_FIELD_TYPES = {f.name: f for f in dataclasses.fields(Case)}
_OPTIONAL_FIELDS = {"safe_policies", "note", "model_location", "minimization"}
MINIMIZATION_STATES = ("1-minimal", "stopped", "not minimized")
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
    known = set(required) | {"channel", "terms", "unrounded"}
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
    unrounded = obj.get("unrounded")
    if unrounded is not None and not (_is_number(unrounded) and unrounded >= 0):
        raise _wrong_type("first_nonfinite.unrounded", "null or a number >= 0", unrounded)
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
        model_location=_optional_str("model_location", doc.get("model_location")),
        margin=_parse_margin(doc["margin"]),
        robustness=_parse_robustness(doc["robustness"]),
        minimization=_parse_minimization(doc.get("minimization")),
    )


def _need_number(name: str, value: Any, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not _is_number(value):
        raise _wrong_type(name, "a number" + (" or null" if optional else ""), value)
    return float(value)


def _parse_margin(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    margin = _need_object("margin", value)
    _need_keys("margin", margin, ("limit", "unrounded", "float32"))
    _need_number("margin.limit", margin["limit"])
    for key in ("unrounded", "float32", "ratio", "float32_ratio"):
        _need_number(f"margin.{key}", margin.get(key), optional=True)
    return dict(margin)


def _parse_robustness(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    rob = _need_object("robustness", value)
    _need_keys("robustness", rob, ("robust", "reason", "margin", "variations"))
    _need_bool("robustness.robust", rob["robust"])
    _need_str("robustness.reason", rob["reason"])
    _need_number("robustness.margin", rob["margin"], optional=True)
    if not isinstance(rob["variations"], list):
        raise _wrong_type("robustness.variations", "an array", rob["variations"])
    for i, item in enumerate(rob["variations"]):
        where = f"robustness.variations[{i}]"
        _need_keys(where, _need_object(where, item), ("variation", "status", "where", "margin"))
        for key in ("variation", "status", "where"):
            _need_str(f"{where}.{key}", item[key])
        _need_number(f"{where}.margin", item["margin"], optional=True)
    return dict(rob)


def _parse_minimization(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    record = _need_object("minimization", value)
    _need_keys("minimization", record, ("state",))
    if record["state"] not in MINIMIZATION_STATES:
        raise _wrong_type("minimization.state", " or ".join(map(json.dumps, MINIMIZATION_STATES)),
                          record["state"])
    for key in ("from_chars", "chars", "chunk", "runs"):
        if key in record:
            _need_int(f"minimization.{key}", record[key], minimum=0)
    if "why" in record:
        _need_str("minimization.why", record["why"])
    return dict(record)


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
