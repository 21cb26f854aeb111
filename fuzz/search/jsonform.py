"""The report JSON's helpers: a key that must be there, a verdict without its derived table.

Verdicts are stored without their headroom table (a quarter of the file's size; it is derived),
and read back with fuzz.verdict.from_json_safe applied to their numeric fields only.
"""
from __future__ import annotations

from typing import Any

from fuzz.verdict import Verdict, from_json_safe


def need(d: dict[str, Any], key: str, where: str) -> Any:
    try:
        return d[key]
    except (KeyError, TypeError):
        raise ValueError(f"report JSON: {where} lacks key {key!r}") from None


def verdict_to_dict(verdict: Verdict) -> dict[str, Any]:
    """Verdict.to_dict without the derived headroom table (a quarter of the file's size;
    Verdict.headroom() recomputes it from max_abs and limits)."""
    d = verdict.to_dict()
    d.pop("headroom", None)
    return d


def verdict_from_dict(d: dict[str, Any]) -> Verdict:
    """Verdict.from_dict plus json_safe's inverse on the numeric fields only (a prompt or a
    generated text that reads "inf" must stay a string)."""
    d = dict(d)
    for key in ("max_abs", "content_max_abs", "limits"):
        if key in d:
            d[key] = from_json_safe(d[key])
    nf = d.get("first_nonfinite")
    if nf is not None and nf.get("terms") is not None:
        d["first_nonfinite"] = {**nf, "terms": [float(from_json_safe(t)) for t in nf["terms"]]}
    try:
        return Verdict.from_dict(d)
    except TypeError as exc:
        raise ValueError(f"report JSON: a verdict does not fit fuzz.verdict.Verdict ({exc})"
                         ) from None
