"""The nearest misses one (policy, BOS mode) steers by: closest to overflowing where no signature
is known yet.

- Ranked by headroom at the *open* sites only (no known signature of the mode there): climbing
  toward a known site yields known failures, which score nothing.
- At most PER_FAMILY prompts of one *family* (prompts that differ only in the length of their
  runs of one character): otherwise the "repeat" mutation fills every slot with one family.
- A marginal finding (a failure at an open site short of the case margin) is a near miss
  `min_margin / margin` away: steering crosses the limit in small steps, and the pool edits it
  further past.
What each of these changed, measured, is in docs/SEARCH.md. The report's nearest misses
(fuzz.search.accounting.PolicySummary) stay ranked by headroom anywhere: what a user shipping
float16 needs to know.
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
