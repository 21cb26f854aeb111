"""The case schema and a finding's identity: what a case holds, how it is named and bucketed.

:class:`Case` is one stored finding; :func:`signature` is its crash bucket, :func:`root_cause`
its mechanism (coarser: no layer) and :func:`case_id` its file name. Turning a file back into a
Case lives in :mod:`fuzz.corpus.validate`; storing it in :mod:`fuzz.corpus.store`. Nothing here
touches the file system or needs torch (except :func:`finder_info`, which imports it when called).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import fuzz
from fuzz.rootcause import RootCause
from fuzz.verdict import NonFinite, Signature, Verdict, json_safe

if TYPE_CHECKING:  # what a case is made from: no import at run time (the corpus needs no torch)
    from fuzz.session import Session
    from fuzz.shrink.robustness import Assessment

# 2: signatures name the model by fingerprint; cases carry their margin and kernel robustness.
SCHEMA_VERSION = 2
CASE_ID_HEX_DIGITS = 16

# A model name becomes a directory name: keep it to one portable path component.
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
CASE_FILE_RE = re.compile(rf"[0-9a-f]{{{CASE_ID_HEX_DIGITS}}}\.json")

BOUNDS_KEYS = ("max_new_tokens", "max_prompt_tokens")
FINDER_KEYS = ("seed", "strategy", "date", "tool_version", "torch_version", "device")


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
    # Where the model was found (fuzz.engine.zoo.model_location): a zoo name, or the absolute
    # path of a file or directory model, which replay loads again. Optional: cases written
    # before it existed have none (their model is a zoo name), and then it is not written.
    model_location: str | None = None
    # How far past the limit the failure went (fuzz.margin.Margin.to_dict), and whether it held
    # under every kernel variation (fuzz.shrink.robustness.Robustness.to_dict); None: not measured.
    margin: dict[str, Any] | None = None
    robustness: dict[str, Any] | None = None
    # How far minimizing got: {"state": "1-minimal" | "stopped" | "not minimized", ...}
    # (fuzz.shrink.minimize.Minimized.record): a stopped or unminimized case is what
    # `fuzz minimize` resumes. Optional: cases written before it existed, and prompts added by
    # hand, have none (and then it is not written).
    minimization: dict[str, Any] | None = None
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
        margin: dict[str, Any] | None = None,
        robustness: dict[str, Any] | None = None,
        model_location: str | None = None,
        minimization: dict[str, Any] | None = None,
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
            margin=margin,
            robustness=robustness,
            model_location=model_location,
            minimization=minimization,
        )

    @classmethod
    def of(cls, session: Session, verdict: Verdict, *, chat: bool = False,
           seed: int | None = None, strategy: str = "manual",
           margin: dict[str, Any] | None = None, robustness: dict[str, Any] | None = None,
           minimization: dict[str, Any] | None = None, grew_from: str | None = None) -> Case:
        """The case of a failing verdict of this session's model, with the session's bounds,
        device and declared-safe policies; `grew_from`: the seed prompt ("file:line") the
        finding was edited from, recorded in the finder."""
        finder = finder_info(seed=seed, strategy=strategy, device=session.device)
        if grew_from is not None:
            finder["grew_from"] = grew_from
        return cls.from_verdict(
            verdict, model=session.model.name, fingerprint=session.model.fingerprint,
            bounds=session.bounds.to_dict(), finder=finder,
            chat=chat, safe_policies=session.safe_policies, margin=margin,
            robustness=robustness, model_location=session.model.location or None,
            minimization=minimization)

    @classmethod
    def of_assessment(cls, session: Session, assessment: Assessment, *,
                      seed: int | None = None, strategy: str = "manual",
                      grew_from: str | None = None) -> Case:
        """The case of a measured finding (fuzz.shrink.robustness.assess), its margin and
        robustness included."""
        margin = assessment.margin
        return cls.of(session, assessment.verdict, chat=assessment.spec.chat, seed=seed,
                      strategy=strategy, margin=margin.to_dict() if margin else None,
                      robustness=assessment.robustness.to_dict(),
                      minimization=assessment.minimization, grew_from=grew_from)

    @property
    def minimal(self) -> bool | None:
        """Whether the prompt is known to be 1-minimal (None: not recorded)."""
        if self.minimization is None:
            return None
        return self.minimization.get("state") == "1-minimal"

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
        for optional in ("model_location", "minimization"):
            if doc[optional] is None:
                del doc[optional]  # an older case's file stays byte for byte what it was
        return json_safe(doc)

    def to_json(self) -> str:
        """The exact file text: sorted keys, indent 2, UTF-8 characters kept, trailing newline."""
        text = json.dumps(
            self.to_document(), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False
        )
        return text + "\n"


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


def signature(case: Case) -> Signature:
    """The crash bucket of a case: what makes two findings 'the same bug'."""
    return Signature.of(case.model_fingerprint, case.policy, case.add_bos, case.first_nonfinite)


def root_cause(case: Case, piece: str | None = None) -> RootCause:
    """The mechanism of a case (fuzz.rootcause): coarser than its signature, the layer left out.
    `piece`: the tokenizer's piece of the failing token, when a tokenizer is at hand (a case
    stores ids only)."""
    return RootCause.of(case.model_fingerprint, case.policy, case.add_bos, case.prompt_ids,
                        case.first_nonfinite, piece)


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
    import torch  # only here: the rest of the corpus package must not need torch

    return {
        "seed": seed,
        "strategy": strategy,
        "date": date or datetime.now(UTC).isoformat(timespec="seconds"),
        "tool_version": fuzz.__version__,
        "torch_version": str(torch.__version__),
        "device": device,
    }


def check_model_name(model: str) -> None:
    """ValueError unless ``model`` can safely be one corpus directory name."""
    if not isinstance(model, str) or not MODEL_NAME_RE.fullmatch(model):
        raise ValueError(
            f"model name {model!r} cannot be a corpus directory: use letters, digits, '.', '_' "
            "and '-', starting with a letter or digit (at most 100 characters), e.g. 'gemma3-270m'"
        )
