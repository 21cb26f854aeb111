"""The nearest misses one (policy, BOS mode) steers by: closest to overflowing where no signature
is known yet.

A near miss counts for where it could lead. Once a signature at (layer, site) is known for the
mode, prompts that come close there lead back to it: the first non-finite value decides the
signature, so climbing toward that site yields known failures, which score nothing. Measured on
Gemma 3 270M in float16 without BOS (benchmarks/bench_search_real.py, 10 minutes), with misses
ranked by their least headroom anywhere: the default search kept editing runs of 224-260 `[` and
found 4 kernel-robust signatures, all among the 6 that random draws found. Ranked here by the
headroom at the *open* sites only, a miss is worth editing for the sites still unexplored. That
alone did not change the count (same command and seed, 2026-12-02, benchmarks/README.md): the
default found the same 4 signatures from `[` runs again, random 5. One family is near many sites
at once: 200 `[` and a newline (finite) has headroom 1.08-1.24 at the residuals of layers 11-15
(`python -m fuzz check --policy float16 --no-bos --prompt "$(printf '[%.0s' $(seq 200))"$'\n'`),
and 224 / 240 / 248 / 260 of them first overflow at layer 14 attention / 13 MLP / 13 attention /
11 MLP: closing a site leaves the family next to the others.

So the pool keeps at most PER_FAMILY prompts of one *family*: prompts that differ only in how long
their runs of one character are (`family`). The "repeat" mutation climbs a run's length, and
without the cap every slot of the pool held one family's run lengths, so every mutant edited it.
Same command and seed on another machine (2026-12-02, benchmarks/README.md): before the cap the
default saved 3 signatures in 226 prompts, two of them `[` runs; with it 4 in 326 prompts, from
four families (one `[` run); random draws 5 and 4 (its draws change with the code's literals).

A marginal finding is a near miss too: a failure at an open site whose margin falls short of the
one a regression case needs (fuzz.shrink.robustness) is `min_margin / margin` away from a case.
Steering climbs toward the limit in small steps, so its first crossings are barely past it: on Gemma
3 270M without BOS (benchmarks/bench_search_real.py, seeds 3 and 4, each prompt's arm logged) the
edits of near misses first crossed it for 6 new signatures, every one at 1.002-1.017 (marginal,
given up), fresh draws for 6, 5 of them at 1.022-1.125. Kept in the pool, such a failure is
edited further past the limit.

The report's nearest misses (fuzz.report.PolicySummary) stay ranked by headroom anywhere: what a
user shipping float16 needs to know. Before any signature of the mode is known the two rankings
are the same, but this pool takes no prompt without a content site measured (the empty prompt
with BOS): there is nothing in it to edit toward.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from fuzz.margin import MIN_MARGIN
from fuzz.search.accounting import NEAREST_MISSES
from fuzz.verdict import Signature, Verdict, layer_label

Site = tuple[str, str]  # (layer label, site) as in Verdict.content_max_abs
PER_FAMILY = 1  # prompts of one family the pool may hold
_RUN = re.compile(r"(.)\1+", re.DOTALL)


def family(prompt: str) -> str:
    """The prompt with every run of one character cut to one character: 224 and 260 `[` and a
    newline are both "[\n"; "1e308" is its own family."""
    return _RUN.sub(r"\1", prompt)


def closed_sites(known: Iterable[Signature], policy: str, add_bos: bool,
                 num_layers: int) -> frozenset[Site]:
    """The content sites of `known` signatures of this policy and BOS mode: where a failure is
    already in the corpus. A failure at the BOS position closes nothing: it says nothing about
    what the content positions at that site can reach."""
    return frozenset(
        (layer_label(sig.layer, num_layers), sig.site)
        for sig in map(Signature._make, known)
        if sig.policy == policy and sig.add_bos == add_bos and not sig.at_bos
    )


def open_headroom(verdict: Verdict, closed: frozenset[Site]) -> float:
    """The least content headroom over the sites not in `closed` (inf when none is measured)."""
    return min((h for layer, sites in verdict.headroom(content_only=True).items()
                for site, h in sites.items() if (layer, site) not in closed), default=math.inf)


def distance(verdict: Verdict, closed: frozenset[Site], min_margin: float = MIN_MARGIN) -> float:
    """How far a run is from a new regression case: its least open headroom when finite;
    `min_margin / margin` when it failed at an open content site short of that margin (a
    marginal finding: 1.011 past the limit is 1.009 short of 1.02); inf otherwise (a failure
    at a closed site leads back to it, one past the margin is a finding, not a miss)."""
    if verdict.finite:
        return open_headroom(verdict, closed)
    first, margin = verdict.first_nonfinite, verdict.margin
    if first is None or margin is None or margin >= min_margin:
        return math.inf
    site = (verdict.layer_label(first.layer), first.site)
    return math.inf if verdict.at_bos or site in closed else min_margin / margin


@dataclass
class MissPool:
    """The `keep` prompts closest to a new regression case (`distance`: finite prompts by their
    open headroom, marginal findings by their margin), closest first, at most `per_family` of
    one family. Kept for a mode across rounds (fuzz.run): a round starts from what the last one
    came closest with."""

    keep: int = NEAREST_MISSES
    per_family: int = PER_FAMILY
    closed: frozenset[Site] = frozenset()
    min_margin: float = MIN_MARGIN  # the margin a case needs (Session.min_margin)
    _ranked: list[tuple[float, Verdict]] = field(default_factory=list, repr=False)

    def close(self, closed: frozenset[Site]) -> None:
        """Rank from now on by the headroom outside `closed` (the sites of known signatures)."""
        if closed != self.closed:
            self.closed = closed
            ranked = ((distance(v, closed, self.min_margin), v) for _, v in self._ranked)
            self._ranked = sorted((kept for kept in ranked if math.isfinite(kept[0])),
                                  key=lambda kept: kept[0])

    def offer(self, verdict: Verdict) -> None:
        """Keeps a verdict when it is closer (`distance`) than the farthest kept one, and than
        the farthest kept one of its family when that family has its `per_family` already."""
        headroom = distance(verdict, self.closed, self.min_margin)
        if math.isinf(headroom):
            return
        if len(self._ranked) >= self.keep and headroom >= self._ranked[-1][0]:
            return
        if any(v.prompt == verdict.prompt for _, v in self._ranked):
            return  # Hypothesis replays examples: one prompt must not fill the pool
        kin = [i for i, (_, v) in enumerate(self._ranked) if family(v.prompt) ==
               family(verdict.prompt)]
        if len(kin) >= self.per_family:
            if headroom >= self._ranked[kin[-1]][0]:
                return
            del self._ranked[kin[-1]]  # the family's farthest gives way
        self._ranked.append((headroom, verdict))
        self._ranked.sort(key=lambda kept: kept[0])
        del self._ranked[self.keep:]

    def verdicts(self) -> list[Verdict]:
        return [v for _, v in self._ranked]

    def prompts(self) -> list[str]:
        return [v.prompt for _, v in self._ranked]
