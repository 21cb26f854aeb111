"""The search: which prompts to try next and what the run has seen so far.

- ``round``: one Hypothesis round of one (policy, BOS mode): the property, the steering score,
  saturation, the round strategy (fresh draws, mutants, proposals);
- ``misses``: the nearest misses a mode steers by (closest to overflowing where no signature is
  known yet);
- ``proposals``: gradient-guided single-token swaps of a near miss (HotFlip);
- ``schedule``: the budget: each mode's share, round deadlines, the hard tail;
- ``database``: the Hypothesis example database (a directory or redis://HOST:PORT/N);
- ``accounting``: the run's counts (ModeCounts, PolicySummary, Finding, RunSummary) and their
  strict-JSON form (``jsonform``), which the report renders.
"""
