"""The report's wording, shared by the markdown and HTML reports.

Each policy's counts per BOS mode and its status, the totals line, a finding's facts, the known
signatures hit, the marginal prompts, the nearest misses and the fixed sentences. Each returns
plain text; markdown.py and html.py lay out the same content and add only their markup (and
escaping), so the two files cannot drift apart in wording. The pieces below a report (numbers,
prompts, a verdict or a signature in words) are describe.py's; the commands that reproduce a run
or a finding are commands.py's.

What a status says is only what was counted: a policy with any non-finite example is never called
finite, whether or not a finding came of it (hits on known signatures are not saved again, but
they happened).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from fuzz.report.causes import cause_text, causes_count
from fuzz.report.commands import add_command, check_command
from fuzz.report.describe import (
    bos_text,
    bounds_text,
    describe_nonfinite,
    describe_terms,
    fmt_duration,
    fmt_headroom,
    fmt_ratio,
    layer_site_text,
    margin_text,
    minimization_text,
    plural,
    prompt_literal,
    robustness_text,
    signature_text,
    variations_text,
)
from fuzz.search.accounting import (
    Finding,
    ModeCounts,
    PolicySummary,
    RunSummary,
    mode_name,
    unique_misses,
)

# --------------------------------------------------------------------------- counts and status


@dataclass(frozen=True)
class Tally:
    """What a policy (or one BOS mode of it) saw, as the report counts it."""

    examples: int
    nonfinite: int  # under any signature
    known: int  # of those, under a signature already in the corpus
    inconclusive: int
    new: int  # findings saved as new cases
    marginal: int  # marginal findings plus marginal prompts: failed, not saved
    finite: int  # examples that ended finite
    headroom: float  # best content headroom, against `against`'s limit
    against: str | None  # "float16" for a wider dtype; None: the policy's own dtype
    # False for a report written before non-finite examples were counted: only its findings
    # are known to have failed, so the wording says "at least" and never "finite"
    counted: bool = True
    seconds: float = 0.0  # wall time spent on it
    saturated: bool = False  # given up: every prompt failed at the BOS position (fuzz.search.round)


def _tally(p: PolicySummary, counts: ModeCounts, findings: list[Finding],
           counted: bool = True) -> Tally:
    # Every finding was screened as a non-finite example; a summary filled by hand (or an older
    # one) may lack the counts, and a finding must never read as "finite".
    nonfinite = max(counts.nonfinite, len(findings))
    examples = max(counts.examples, nonfinite)
    # float32's and bfloat16's own limit (~3.4e38) is never near: what tells the reader something
    # is whether the same run would survive in float16 (counted only since per-mode counts).
    wide = p.dtype != "float16" and counted
    return Tally(examples=examples, nonfinite=nonfinite, known=sum(counts.known.values()),
                 inconclusive=counts.inconclusive, new=sum(f.is_new for f in findings),
                 marginal=counts.marginal + sum(f.is_marginal for f in findings),  # as
                 # PolicySummary.marginal_total counts it
                 finite=examples - nonfinite - counts.inconclusive,
                 headroom=counts.best_float16_headroom if wide else counts.best_headroom,
                 against="float16" if wide else (None if p.dtype == "float16" else p.dtype),
                 counted=counted, seconds=counts.seconds, saturated=counts.saturated)


def mode_tallies(p: PolicySummary) -> list[tuple[str, Tally]]:
    """(BOS mode in words, its tally) for each mode the policy ran, in run order."""
    if not p.modes and p.examples:  # a report written before per-mode counts: one row
        legacy = _tally(p, ModeCounts(examples=p.examples, best_headroom=p.best_headroom),
                        p.findings, counted=False)
        if not p.nearest_misses:  # observe() keeps a nearest miss whenever one ended finite
            legacy = dataclasses.replace(legacy, finite=0)
        modes = ", ".join("on" if m else "off" for m in p.bos_modes) or "none"
        return [(f"{modes} (not counted per mode)", legacy)]
    if not p.bos_modes:
        return [("none", _tally(p, ModeCounts(), p.findings))]
    return [("on" if bos else "off",
             _tally(p, p.modes.get(mode_name(bos), ModeCounts()),
                    [f for f in p.findings if f.verdict.add_bos == bos]))
            for bos in p.bos_modes]


def policy_tally(p: PolicySummary) -> Tally:
    tallies = [t for _, t in mode_tallies(p)]
    return Tally(*(sum(getattr(t, name) for t in tallies) for name in
                   ("examples", "nonfinite", "known", "inconclusive", "new", "marginal",
                    "finite")),
                 headroom=min(t.headroom for t in tallies), against=tallies[0].against,
                 counted=all(t.counted for t in tallies),
                 seconds=sum(t.seconds for t in tallies))


def _known_note(t: Tally) -> str:
    if t.known and t.known == t.nonfinite:
        return " (all under known signatures)"
    return f" ({t.known} under known signatures)" if t.known else ""


def status_words(expected_safe: bool, t: Tally) -> str:
    """The status of a policy or a mode: any non-finite example is said, and is the alarm
    under a policy declared safe whether or not a finding was saved."""
    failed = f"{'' if t.counted else 'at least '}{t.nonfinite} of {plural(t.examples, 'example')}"
    saturated = ("; saturated: every prompt failed at the BOS position under a known signature, "
                 "so this mode was given up" if t.saturated else "")
    if t.nonfinite and expected_safe:
        return f"REGRESSION: declared safe, produced NaN/Inf on {failed}{_known_note(t)}"
    if t.nonfinite:
        return f"non-finite on {failed}{_known_note(t)}{saturated}"
    if t.examples == 0:
        return "not run"
    if not t.counted:
        return "no finding (this older report did not count non-finite examples)"
    if t.inconclusive:
        return (f"finite on every conclusive example ({t.inconclusive} inconclusive: stopped by "
                "the time limit)")
    return "finite on every example"


def policy_status(p: PolicySummary) -> str:
    return status_words(p.expected_safe, policy_tally(p))


def tone(expected_safe: bool, t: Tally) -> str:
    """'alarm' (declared safe, non-finite), 'ok' (screened and finite) or '' (as declared)."""
    if t.nonfinite:
        return "alarm" if expected_safe else ""
    return "ok" if t.examples else ""


def headroom_text(t: Tally) -> str:
    """The best content headroom in words; a wider dtype's is against float16's limit (its own,
    ~3.4e38, is never near), and says so."""
    if not t.finite:
        return "n/a (no finite example)"
    return fmt_headroom(t.headroom) + (f" (vs {t.against})" if t.against else "")


POLICY_COLUMNS = ("policy", "dtype", "declared safe", "BOS", "examples", "seconds", "non-finite",
                  "under known signatures", "new findings", "marginal", "inconclusive",
                  "best content headroom", "status")
NUMERIC_COLUMNS = frozenset({"examples", "seconds", "non-finite", "under known signatures",
                             "new findings",
                             "marginal", "inconclusive", "best content headroom"})


@dataclass(frozen=True)
class PolicyRow:
    cells: tuple[str, ...]  # one per POLICY_COLUMNS entry
    tone: str  # see tone()


def policy_rows(s: RunSummary) -> list[PolicyRow]:
    """The policies table: one row per (policy, BOS mode)."""
    rows = []
    for p in s.policies:
        for bos, t in mode_tallies(p):
            rows.append(PolicyRow(
                (p.policy, p.dtype, "yes" if p.expected_safe else "no", bos, str(t.examples),
                 f"{t.seconds:.0f}", str(t.nonfinite), str(t.known), str(t.new), str(t.marginal),
                 str(t.inconclusive), headroom_text(t), status_words(p.expected_safe, t)),
                tone(p.expected_safe, t)))
    return rows


# --------------------------------------------------------------------------- findings


def group_findings(findings: Iterable[Finding]) -> list[tuple[Finding, int]]:
    """One representative per signature (a new one if any) and how many findings share it."""
    groups: dict[tuple, list[Finding]] = {}
    for f in findings:
        groups.setdefault(f.signature, []).append(f)
    out = []
    for members in groups.values():
        first = next((f for f in members if f.is_new), members[0])
        out.append((first, len(members)))
    return out


def also_hit(count: int) -> str:
    """Findings are bucketed by signature: say how many others fell in the same bucket."""
    return f"; {plural(count - 1, 'more example')} hit this signature" if count > 1 else ""


def status_text(f: Finding) -> str:
    return {"saved": "new, saved to the corpus",
            "known-signature": "known signature (already in the corpus, not saved again)",
            "duplicate-file": "already in the corpus (same case file)",
            "marginal": "marginal: failed here, but not a regression case every machine would "
                        "reproduce (see Robustness); not saved",
            "unmeasured": "unmeasured: the budget ended before its kernel variations were "
                          "measured; not saved (Save it: measures and saves it)"}[f.status]


def finding_margin(f: Finding) -> dict | None:
    """The margin measured for the finding, else what its verdict's unrounded sum gives."""
    if f.margin:
        return f.margin
    v, first = f.verdict, f.verdict.first_nonfinite
    if v.margin is None or first is None:
        return None
    return {"limit": v.limit, "unrounded": first.unrounded, "ratio": v.margin}


def header_facts(s: RunSummary) -> list[tuple[str, str]]:
    stopped = s.stopped + (f" ({s.error})" if s.error else "")
    return [
        ("Model", s.model), ("Fingerprint", s.fingerprint), ("Engine", s.engine),
        ("Started", s.started),
        ("Budget / elapsed", f"{fmt_duration(s.budget_s)} / {fmt_duration(s.elapsed_s)}"),
        ("Stopped", stopped), ("Examples", str(s.examples)), ("Seed", str(s.seed)),
        ("Bounds", bounds_text(s.bounds)), ("Device", s.device),
        *([("Screening kernels", screening_text(s))] if s.screening_kernels else []),
        ("Versions", f"gemma-fuzz {s.tool_version}, torch {s.torch_version}"),
        ("Corpus", s.corpus_dir),
    ]


def screening_text(s: RunSummary) -> str:
    """Which matmul kernel screened each policy, and what "auto"'s trial measured."""
    text = ", ".join(f"{policy} {name}" for policy, name in sorted(s.screening_kernels.items()))
    if s.kernel_trial_speedup is not None:
        text += (f" (auto's trial: fp32-accumulate-wide ran at {s.kernel_trial_speedup:.2f}x "
                 "native's speed, re-runs counted); non-finite verdicts are always native")
    return text


# --------------------------------------------------------------------------- report content

# Header facts whose value is a name or a path: shown as code.
CODE_FACTS = frozenset({"Model", "Fingerprint", "Corpus"})
# Fixed sentences: plain text without markup characters (html.py escapes them all the same).
HEADROOM_NOTE = ("Headroom is the dtype's largest finite value divided by the largest |x| seen "
                 "(below 1 means overflow), over content positions (the BOS attention sink "
                 "excluded). For float32 and bfloat16 policies it is measured against float16's "
                 "65504 instead (vs float16): would the same run survive in float16? Their own "
                 "limit, about 3.4e38, is never near.")
COUNTS_NOTE = ("Counts are screened examples, Hypothesis's replays and shrink candidates "
               "included, not distinct prompts; marginal counts distinct prompts that failed "
               "below the margin a regression case needs, or not under every kernel variation "
               "(reported, not saved).")
REPRODUCE_NOTE = ("The seed fixes which prompts are drawn in which order; the budget is wall "
                  "time, so a faster or slower machine screens more or fewer of them, and the "
                  "Hypothesis database (--database) replays what earlier runs stored in it.")
KNOWN_TITLE = "Non-finite under known signatures (already in the corpus, not saved again)"
MARGINAL_TITLE = ("Marginal prompts (new failures below the margin a regression case needs: "
                  "not shrunk, not saved)")
MISSES_TITLE = "Nearest misses (finite, lowest content headroom)"
NO_FINITE_EXAMPLE = "No finite example to report."

# One piece of a fact's value: its text, and whether it is set as code (a prompt, a path, a
# command: what a reader copies).
Segment = tuple[str, bool]


def model_layers(s: RunSummary) -> int:
    """Decoder layers of the run's model, from any verdict it kept (0 when it kept none)."""
    verdicts = [v for p in s.policies for v in
                [*(f.verdict for f in p.findings), *p.nearest_misses, p.peak] if v is not None]
    return max((v.num_layers for v in verdicts), default=0)


def findings_total(s: RunSummary) -> str:
    """'573 examples screened, 412 non-finite (412 under known signatures); 0 findings: ...'"""
    t = [policy_tally(p) for p in s.policies]
    examples, nonfinite = sum(x.examples for x in t), sum(x.nonfinite for x in t)
    text = (f"{plural(examples, 'example')} screened, {nonfinite} non-finite "
            f"({sum(x.known for x in t)} under known signatures); "
            f"{plural(len(s.findings), 'finding')}: {saved_text(s.policies)}"
            f"{marginal_text(s.policies)}{unmeasured_text(s.policies)}.")
    if s.findings:
        text += f" {causes_count(s)}."
    broken = [p.policy for p, x in zip(s.policies, t) if p.expected_safe and x.nonfinite]
    if broken:
        text += f" REGRESSION: declared safe, produced NaN/Inf: {', '.join(broken)}."
    return text


def saved_text(policies: Iterable[PolicySummary]) -> str:
    """'2 new (saved; 1 not 1-minimal: `python -m fuzz minimize` finishes it)'."""
    policies = list(policies)
    new, unminimal = (sum(p.new_findings for p in policies),
                      sum(p.unminimal_findings for p in policies))
    note = (f"; {unminimal} not 1-minimal: `python -m fuzz minimize` finishes "
            f"{'it' if unminimal == 1 else 'them'}") if unminimal else ""
    return f"{new} new (saved{note})"


def marginal_text(policies: Iterable[PolicySummary]) -> str:
    """', 3 marginal (failed short of the case margin: not saved)': prompts and findings alike,
    the count the tables give."""
    return (f", {sum(p.marginal_total for p in policies)} marginal (failed short of the margin "
            "a case needs: not saved)")


def unmeasured_text(policies: Iterable[PolicySummary]) -> str:
    """', 1 unmeasured (the budget ended first; not saved)', or nothing when there is none."""
    n = sum(p.unmeasured_findings for p in policies)
    return f", {n} unmeasured (the budget ended first; not saved)" if n else ""


def safety_text(p: PolicySummary) -> str:
    return "declared safe" if p.expected_safe else "declared unsafe"


def policy_counts(p: PolicySummary) -> list[str]:
    """A policy section's opening sentences: its status, its counts, its best headroom."""
    t = policy_tally(p)
    modes = " and ".join("on" if m else "off" for m in p.bos_modes) or "not run"
    return [f"Status: {policy_status(p)}.",
            f"{plural(t.examples, 'example')} (BOS {modes}): {t.nonfinite} non-finite ({t.known} "
            f"under known signatures), {t.inconclusive} inconclusive. "
            f"{plural(len(p.findings), 'finding')}: {saved_text([p])}, "
            f"{p.known_findings} already in the corpus{marginal_text([p])}"
            f"{unmeasured_text([p])}.",
            f"Best content headroom: {headroom_text(t)}."]


def known_rows(s: RunSummary, p: PolicySummary) -> list[str]:
    """'layer 7 residual_mlp at the BOS position, BOS on: 412 examples', most examples first."""
    hits: dict[tuple, int] = {}
    for counts in p.modes.values():
        for sig, n in counts.known.items():
            hits[sig] = hits.get(sig, 0) + n
    layers = model_layers(s)
    return [f"{signature_text(sig, layers)}: {plural(n, 'example')}"
            for sig, n in sorted(hits.items(), key=lambda kv: -kv[1])]


def marginal_rows(p: PolicySummary) -> list[tuple[str, str, str]]:
    """(margin and where, prompt literal, BOS) for each marginal prompt the summary kept."""
    rows = []
    for counts in p.modes.values():
        for ex in counts.marginal_examples:
            margin = ex.get("margin")
            text = ("margin not measured" if margin is None
                    else f"margin {fmt_ratio(margin)} x the limit")
            where = ex.get("where") or ""
            rows.append((text + (f" at {where}" if where else ""),
                         prompt_literal(ex.get("prompt", "")), bos_text(bool(ex.get("add_bos")))))
    return rows


def marginal_more(p: PolicySummary) -> str | None:
    """How many marginal prompts were counted but not kept as examples."""
    more = sum(c.marginal - len(c.marginal_examples) for c in p.modes.values())
    return f"… and {plural(more, 'more marginal prompt')}." if more > 0 else None


def finding_heading(f: Finding, i: int) -> str:
    marginal = " (marginal, not saved)" if f.is_marginal else \
        " (unmeasured, not saved)" if f.is_unmeasured else ""
    return f"Finding {i}: {signature_text(f.signature, f.verdict.num_layers)}{marginal}"


def finding_facts(s: RunSummary, p: PolicySummary, f: Finding,
                  count: int) -> list[tuple[str, list[Segment]]]:
    """The facts listed under a finding, in order: (label, value as segments)."""
    v = f.verdict
    empty = " (empty: BOS alone)" if v.prompt == "" else ""
    facts = [("Status", [(status_text(f) + also_hit(count), False)]),
             ("Prompt", [(prompt_literal(v.prompt), True),
                         (f"{empty} ({plural(len(v.prompt_ids), 'token')})", False)]),
             ("BOS", [("on" if v.add_bos else "off", False)]),
             ("First non-finite", [(describe_nonfinite(v), False)]),
             ("Root cause", [(cause_text(f.root_cause), False)])]
    optional = [("Overflow", describe_terms(v, p.dtype)),
                ("Margin", margin_text(finding_margin(f))),
                ("Robustness", robustness_text(f.robustness)),
                ("Variations", variations_text(f.robustness)),
                ("Minimizing", minimization_text(f.minimization)),
                ("Grew from seed", f.grew_from)]
    facts += [(label, [(value, False)]) for label, value in optional if value]
    if f.case_path:
        facts.append(("Case file", [(f.case_path, True)]))
    facts.append(("Reproduce", [(check_command(s, v), True)]))
    if f.is_unmeasured:
        facts.append(("Save it", [(add_command(s, v), True)]))
    return facts


def miss_rows(p: PolicySummary) -> list[tuple[str, str, str, str]]:
    """(headroom, where or '', prompt literal, BOS) for each nearest miss, each example once;
    a wider dtype's headroom against float16, as in the policies table."""
    rows = []
    for v in unique_misses(p):
        where = v.min_headroom_site()
        headroom = (fmt_headroom(v.min_headroom(content_only=True)) if p.dtype == "float16"
                    else f"{fmt_headroom(v.float16_headroom())} (vs float16)")
        rows.append((headroom, layer_site_text(*where) if where else "", prompt_literal(v.prompt),
                     bos_text(v.add_bos)))
    return rows
