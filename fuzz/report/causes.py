"""The run's findings grouped by root cause (fuzz.rootcause), their signatures under each.

A signature splits one mechanism by the layer it first overflowed in; users fix mechanisms, so
the report lists root causes first ("channel 163, last prompt token: 6 findings, layers 9-14")
and counts them beside the signatures ("8 signatures in 4 root causes"). Plain text, laid out by
markdown.py and html.py as the rest of text.py's wording.
"""
from __future__ import annotations

from fuzz.report.describe import plural, signature_text
from fuzz.rootcause import RootCause, RootCauseGroup, counts_text, group_root_causes, group_text
from fuzz.search.accounting import Finding, RunSummary
from fuzz.verdict import Signature

CAUSES_TITLE = "Root causes"
CAUSES_NOTE = ("A root cause is a mechanism: the overflowing residual channel and the kind of "
               "position it overflowed at (BOS, first token, last prompt token, decode step or "
               "other), per policy. Its signatures split it by the layer that first overflowed, "
               "which moves with the prompt; the token is an example, the most common one.")


def run_root_causes(s: RunSummary) -> list[RootCauseGroup]:
    """Every finding of the run, every policy, grouped by root cause (most findings first)."""
    return group_root_causes(root_cause_items(s.findings))


def root_cause_items(findings: list[Finding]) -> list[tuple[Signature, RootCause]]:
    return [(f.signature, f.root_cause) for f in findings]


def causes_count(s: RunSummary) -> str:
    """'8 signatures in 4 root causes' ('' for a run without findings)."""
    return counts_text(run_root_causes(s)) if s.findings else ""


def cause_rows(s: RunSummary, layers: int) -> list[tuple[str, list[str]]]:
    """(a root cause in words, its signatures in words with their finding counts), for each
    root cause of the run; `layers`: the model's decoder layers (text.model_layers)."""
    return [(group_text(g, layers),
             [f"{signature_text(sig, layers)}: {plural(n, 'finding')}" for sig, n in g.signatures])
            for g in run_root_causes(s)]


def cause_text(cause: RootCause) -> str:
    """A finding's root cause in words: 'channel 163, last prompt token (token '▁')'."""
    piece = f" (token {cause.piece!r})" if cause.piece is not None else ""
    return cause.label + piece
