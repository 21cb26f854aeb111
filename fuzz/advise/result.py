"""What `fuzz advise` measured: one PolicyAdvice per policy, and the Advice that holds them (what
the report renders and the JSON holds)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from fuzz.advise.stats import Divergence

REFERENCE = "float32"


@dataclass
class PolicyAdvice:
    """What one policy did on this machine."""

    policy: str
    dtype: str
    expected_safe: bool
    corpus_runs: int = 0
    corpus_nonfinite: int = 0
    corpus_inconclusive: int = 0
    sampled_runs: int = 0
    sampled_nonfinite: int = 0
    sampled_inconclusive: int = 0
    # teacher-forced against float32 (fuzz.advise.kld): what the rule reads
    divergence: Divergence = field(default_factory=Divergence)
    # secondary: sampled runs whose whole greedy continuation is float32's (a harsh measure: one
    # benign rounding flip of a near-tie changes every later token), with its Wilson interval
    identical_runs: int = 0
    identical: float = math.nan
    identical_ci: tuple[float, float] = (math.nan, math.nan)
    median_divergence: Optional[float] = None  # first differing decode step, over the diverged
    diverged: int = 0
    # speed: sampled runs per second of wall time, one value per batch (every policy runs every
    # batch, in a rotated order), their median and the bootstrap 95% interval of the median
    batch_speeds: list[float] = field(default_factory=list)
    prompts_per_s: float = math.nan
    speed_ci: tuple[float, float] = (math.nan, math.nan)
    seconds: float = 0.0  # wall, summed over the batches
    cpu_seconds: float = 0.0
    # CPU time of this process (all its threads) per sampled run: on a machine shared with other
    # work, wall time swings with the load while CPU time stays close to the uncontended cost
    cpu_s_per_run: float = math.nan
    headroom: float = math.inf  # least limit / max |x| over every run, site, step, position
    verdict: str = ""  # "recommended", or why it lost
    tie_with: list[str] = field(default_factory=list)  # the recommended one: whom it tied with

    @property
    def finite_everywhere(self) -> bool:
        return not (self.corpus_nonfinite or self.corpus_inconclusive or self.sampled_nonfinite
                    or self.sampled_inconclusive or self.divergence.nonfinite_positions
                    or self.divergence.reference_nonfinite_positions)


@dataclass
class Advice:
    model: str
    fingerprint: str
    machine: dict[str, Any]
    bounds: dict[str, int]
    sample: int  # prompts asked for
    sampled_texts: int  # prompts measured (the budget can stop earlier)
    sampled_runs: int  # runs measured under every policy (prompts x runnable BOS modes)
    planned_runs: int  # runs the sampled prompts make (what the progress line counts to)
    seed: int
    corpus: str  # the directory read, or why none
    corpus_cases: int
    text: dict[str, Any]  # source, sha256, chunks, tokens per chunk, chunks available
    sequences: dict[str, int]  # teacher-forced sequences per source
    skipped_sequences: int  # corpus continuations too long to teacher-force
    max_kld: float
    budget_s: Optional[float]
    stopped_by_budget: bool
    policies: list[PolicyAdvice]
    recommended: Optional[str]
    command: str = ""
    plan: Optional[dict[str, Any]] = None  # `--plan`: the plan file's content (fuzz.advise.plan)

    def to_dict(self) -> dict[str, Any]:
        """Everything measured; per policy also the flat keys scripts rely on
        (/work/shared/DESIGN.md: finite_everywhere, kld_mean, kld_ci95, top1_agreement,
        prompts_per_s; `recommended` at the top)."""
        doc = asdict(self)
        for row, r in zip(doc["policies"], self.policies):
            row["finite_everywhere"] = r.finite_everywhere
            row["kld_mean"] = r.divergence.mean_kld
            row["kld_ci95"] = list(r.divergence.mean_kld_ci)
            row["top1_agreement"] = r.divergence.top1
        return doc
