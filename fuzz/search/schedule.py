"""How `fuzz run` shares its budget among (policy, BOS mode) pairs, and when its time is up.

Shares: every (policy, BOS mode) of `--policies` gets a stated share of the budget, unsafe
policies UNSAFE_WEIGHT times more (that is where findings are expected), so a default run screens
all five policies in both modes (measured before shares: an 8-minute run screened float16 573
prompts, float32 83 and the other three none). The next round goes to the mode furthest behind
its share; a saturated mode drops out and its time flows to the others.

Time: the budget is wall time. One finding's shrink, and then its minimizing, each take at most
`finding_limit_s` (a tenth of the budget, at least MIN_FINDING_S), so that one slow finding
cannot starve the other modes. Rounds end at the budget; a shrink in progress may run
SHRINK_TAIL_S past it, minimizing stops at MINIMIZE_TAIL_S past it (what is left is measured and
saved unminimized, said as "cut"), measuring findings (their kernel variations and heat maps)
stops at MEASURE_TAIL_S past it (a finding not measured by then is reported "unmeasured" with the
`fuzz add` command that measures and saves it, never saved unproven), and the report gets the
rest of TAIL_S: the job ends within the budget plus TAIL_S. Each step may overrun its deadline by
the one model run in progress (a batch of 8 on Gemma 3 270M at the 0.22 prompts/s seen on a busy
2-core CPU: 8 / 0.22 = ~36 s; on the idle one the job ended 3 s past an 8-minute budget).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fuzz.precision import PrecisionPolicy

# An unsafe policy's share over a safe one's. With the five default policies (float16 the only
# unsafe one) in both BOS modes, float16 gets 6 of 14 parts, about what the four safe policies get
# together (8), and each safe mode still 1/14 (34 s of the default 8 minutes).
UNSAFE_WEIGHT = 3.0
TAIL_S = 60.0  # the most the job runs past its budget, report included
SHRINK_TAIL_S = 15.0
MINIMIZE_TAIL_S = 35.0
MEASURE_TAIL_S = 50.0  # the last 10 s of TAIL_S are the report's (text, markdown, html, pictures)
MIN_ROUND_S = 10.0  # a round is worth its Hypothesis set-up and its database replay
# The most one finding's shrink may take, and then its minimizing, as a share of the budget (at
# least MIN_FINDING_S each): measured on a fresh clone (`tox -e fuzz`, 8 minutes, Gemma 3 270M on a
# busy 2-core CPU at 0.22 prompts/s), float16 without BOS took 526 s, shrinking one finding until
# the budget ended, and no other policy screened a prompt. What a limit cuts is saved as it stands.
FINDING_SHARE = 0.1
MIN_FINDING_S = 20.0


@dataclass
class Mode:
    policy: PrecisionPolicy
    add_bos: bool
    share: float  # of the budget
    used_s: float = 0.0
    rounds: int = 0
    saturated: bool = False

    @property
    def name(self) -> str:
        return f"{self.policy.name} {'BOS' if self.add_bos else 'no-BOS'}"


@dataclass
class Schedule:
    modes: list[Mode]
    budget_s: float
    started: float  # time.monotonic() at the start of the job
    notes: list[str] = field(default_factory=list)

    @classmethod
    def plan(cls, policies: list[PrecisionPolicy], bos_modes: list[bool], budget_s: float,
             started: float) -> Schedule:
        weights = [(p, bos, 1.0 if p.expected_safe else UNSAFE_WEIGHT)
                   for p in policies for bos in bos_modes]
        total = sum(w for _, _, w in weights)
        return cls([Mode(p, bos, w / total) for p, bos, w in weights], budget_s, started)

    @property
    def hard_deadline(self) -> float:
        return self.started + self.budget_s

    @property
    def shrink_deadline(self) -> float:
        return self.hard_deadline + SHRINK_TAIL_S

    @property
    def minimize_deadline(self) -> float:
        return self.hard_deadline + MINIMIZE_TAIL_S

    @property
    def measure_deadline(self) -> float:
        return self.hard_deadline + MEASURE_TAIL_S

    @property
    def finding_limit_s(self) -> float:
        """Seconds one finding's shrink may take, and then its minimizing (FINDING_SHARE)."""
        return max(MIN_FINDING_S, FINDING_SHARE * self.budget_s)

    def next_mode(self, now: float) -> Optional[Mode]:
        """The active mode furthest behind its share; None once the budget is spent."""
        active = [m for m in self.modes if not m.saturated]
        if now >= self.hard_deadline or not active:
            return None
        return min(active, key=lambda m: (m.used_s / m.share, m.rounds))

    def round_deadline(self, mode: Mode, now: float) -> float:
        """A round runs until the mode's share is used (at least MIN_ROUND_S), never past the
        budget."""
        owed = mode.share * self.budget_s - mode.used_s
        return min(self.hard_deadline, now + max(MIN_ROUND_S, owed))

    def shares_text(self) -> str:
        return ", ".join(f"{m.name} {m.share:.0%}" for m in self.modes)
