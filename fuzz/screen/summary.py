"""What a screen found, from its result lines: per policy the non-finite share with a 95%
interval, the inconclusive and unrunnable counts, and every signature with its count and its
shortest prompt. Built from the lines (not from this process's verdicts), so a resumed screen, or
shards' files read together, summarize the whole run."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fuzz.report.intervals import wilson_interval
from fuzz.verdict import Signature


@dataclass
class SignatureCount:
    signature: Signature
    count: int = 0
    shortest: dict[str, Any] = field(default_factory=dict)  # the row of its shortest prompt


@dataclass
class PolicyScreen:
    policy: str
    expected_safe: bool
    screened: int = 0  # rows that ran (finite, non-finite or inconclusive)
    nonfinite: int = 0
    inconclusive: int = 0
    not_run: int = 0
    signatures: dict[Signature, SignatureCount] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.nonfinite / self.screened if self.screened else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.nonfinite, self.screened)

    def add(self, row: dict[str, Any]) -> None:
        status = row["status"]
        if status == "not run":
            self.not_run += 1
            return
        self.screened += 1
        if status == "inconclusive":
            self.inconclusive += 1
        if status != "nonfinite":
            return
        self.nonfinite += 1
        sig = Signature.from_list(row["signature"])
        entry = self.signatures.setdefault(sig, SignatureCount(sig))
        entry.count += 1
        if not entry.shortest or len(row["prompt"]) < len(entry.shortest["prompt"]):
            entry.shortest = row

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {"policy": self.policy, "expected_safe": self.expected_safe,
                "screened": self.screened, "nonfinite": self.nonfinite,
                "nonfinite_share": self.share, "nonfinite_ci95": [low, high],
                "inconclusive": self.inconclusive, "not_run": self.not_run,
                "signatures": [{"signature": list(s.signature), "count": s.count,
                                "shortest_source": s.shortest["source"],
                                "shortest_prompt": s.shortest["prompt"],
                                "shortest_bos_mode": s.shortest["bos_mode"]}
                               for s in self.by_count()]}

    def by_count(self) -> list[SignatureCount]:
        return sorted(self.signatures.values(), key=lambda s: (-s.count, s.signature))


def summarize(rows: Iterable[dict[str, Any]], policies: Iterable[Any]) -> list[PolicyScreen]:
    """One PolicyScreen per policy (fuzz.precision.PrecisionPolicy), in the order given."""
    out = {p.name: PolicyScreen(p.name, p.expected_safe) for p in policies}
    for row in rows:
        if row["policy"] in out:
            out[row["policy"]].add(row)
    return list(out.values())
