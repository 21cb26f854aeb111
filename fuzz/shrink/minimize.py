"""The text minimizer: delta debugging on a failing prompt after Hypothesis has shrunk it.

Hypothesis shrinks the structure it drew, but its strategies cannot always reach the plainest text
(a trigger "7" drawn inside the integer "287" shrinks by value toward 0, not by deleting "2" and
"8"); fuzzers finish the same way (AFL's tmin, C-Reduce). Candidates are screened in batches with
the session's screening kernel and a hit is confirmed alone with the faithful one (the canonical
verdict, fuzz.session.Session.screen).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from fuzz.engine.kernels import kernel
from fuzz.verdict import Bounds, PromptSpec, Signature, Verdict

if TYPE_CHECKING:
    from fuzz.session import Session


def deletion_candidates(text: str, chunk: int) -> list[str]:
    """Every way to delete one run of `chunk` characters (aligned to chunk boundaries)."""
    return [text[:i] + text[i + chunk:] for i in range(0, len(text), chunk)]


# What else a smaller prompt must keep besides the signature, judged on its canonical (alone)
# verdict: fuzz.shrink.robustness keeps the margin and every kernel variation, so that minimizing
# cannot walk a case to the edge of the limit.
Keeps = Callable[[PromptSpec, Verdict], bool]


def causal_prefix(session: Session, spec: PromptSpec, found: Verdict) -> Optional[PromptSpec]:
    """The prompt cut after the token where a prefill failure happened: attention is causal, so
    nothing after that position feeds the failing value (decode steps read the whole prompt,
    and a chat prompt's template must stay whole: None for both). Only a candidate: the
    tokenizer may merge pieces differently at the cut, so it is screened like any other."""
    first = found.first_nonfinite
    if first is None or first.step != 0 or spec.chat:
        return None
    ids = found.prompt_ids[int(spec.add_bos):first.position + 1]
    if len(ids) >= len(found.prompt_ids) - int(spec.add_bos):
        return None  # the failure is at the last token: nothing to cut
    text = session.model.tokenizer.decode(ids)
    return PromptSpec(text, spec.add_bos, spec.chat) if text != spec.text else None


@dataclass(frozen=True)
class Minimized:
    """What minimizing gave: the smallest prompt it reached and whether it is 1-minimal."""

    spec: PromptSpec
    verdict: Optional[Verdict]  # its canonical verdict; None when nothing could be deleted
    one_minimal: bool  # no single-character deletion keeps the failure (faithful kernel)
    stopped: str  # why it stopped short of that ("time"); "" when 1-minimal
    start_chars: int  # the prompt's length before minimizing
    chunk: int  # the deletion size it had reached (1: single characters)
    runs: int  # prompts run

    def record(self) -> dict[str, Any]:
        """What a case stores of it (Case.minimization)."""
        record: dict[str, Any] = {"state": "1-minimal" if self.one_minimal else "stopped"}
        if not self.one_minimal:
            record["why"] = self.stopped
        record.update(from_chars=self.start_chars, chars=len(self.spec.text), chunk=self.chunk,
                      runs=self.runs)
        return record


def not_minimized(why: str) -> dict[str, Any]:
    """The record of a case saved as found (Case.minimization): `why` minimizing did not run."""
    return {"state": "not minimized", "why": why}


def minimize_text(session: Session, spec: PromptSpec, policy: str, sig: Signature,
                  bounds: Optional[Bounds] = None, keeps: Optional[Keeps] = None,
                  deadline: float = math.inf, found: Optional[Verdict] = None) -> Minimized:
    """Deletes character runs (halving their length down to one character) while the failure
    keeps its exact signature (and whatever `keeps` asks), until the prompt is 1-minimal (no
    single-character deletion keeps it) or `deadline` (time.monotonic()) comes: the job's hard
    budget bounds minimizing too, and the result says which of the two ended it.

    Candidates run in batches under the session's screening kernel (`_batch_kernel`); a hit is
    confirmed alone with the faithful one. The screening kernel may run finite a candidate the
    faithful one would not, so before calling a prompt 1-minimal the single-character pass runs
    once more with the faithful kernel. No count of candidates bounds it: a cap of 96 left a
    planted count trigger with 18 filler tokens that single deletions still removed (halving
    a 64-character prompt down to single characters alone runs 2 + 4 + ... + 64 = 126
    candidates; benchmarks/README.md, "1-minimal saved cases").

    Given the prompt's verdict (`found`) of a prefill failure, it first tries the prompt cut
    after the failing token (causal_prefix): measured on the planted 40-digit run, it removes a
    76-character tail in one run."""
    best, best_verdict, runs = spec, None, 0
    cut = causal_prefix(session, spec, found) if found is not None else None
    if cut is not None and session.runnable(cut):
        hit, runs = _first_with_signature(session, [cut], policy, sig, bounds, keeps,
                                          _batch_kernel(session, policy))
        if hit is not None:
            best, best_verdict = hit
    chunk, batch_kernel = max(1, len(best.text) // 2), _batch_kernel(session, policy)

    def result(one_minimal: bool, stopped: str = "") -> Minimized:
        return Minimized(best, best_verdict, one_minimal, stopped, len(spec.text), chunk, runs)

    while best.text:
        candidates = [PromptSpec(t, spec.add_bos, spec.chat)
                      for t in dict.fromkeys(deletion_candidates(best.text, chunk))]
        candidates = [c for c in candidates if session.runnable(c)]
        hit = None
        for i in range(0, len(candidates), session.batch_size):
            if time.monotonic() >= deadline:
                return result(False, "time")
            batch = candidates[i: i + session.batch_size]
            hit, n = _first_with_signature(session, batch, policy, sig, bounds, keeps,
                                           batch_kernel)
            runs += n
            if hit is not None:
                break
        if hit is not None:
            best, best_verdict = hit
            chunk = min(chunk, max(1, len(best.text) // 2))
        elif chunk > 1:
            chunk //= 2
        elif batch_kernel != "native":  # a pass that found nothing, checked faithfully
            batch_kernel = "native"
        else:
            break
    return result(True)


def _first_with_signature(session: Session, specs: list[PromptSpec], policy: str,
                          sig: Signature, bounds: Optional[Bounds], keeps: Optional[Keeps],
                          batch_kernel: str
                          ) -> tuple[Optional[tuple[PromptSpec, Verdict]], int]:
    """The first candidate that keeps the signature (confirmed alone) and passes `keeps`, and
    the prompts run (not counting what `keeps` runs)."""
    runs = len(specs)
    if not specs:
        return None, runs
    with kernel(batch_kernel):
        screened = session.run(specs, policy, bounds)
    for spec, verdict in zip(specs, screened):
        if not verdict.nonfinite or session.signature(verdict) != sig:
            continue
        runs += 1
        alone = session.run([spec], policy, bounds)[0]  # the canonical verdict (see screen)
        if alone.nonfinite and session.signature(alone) == sig and \
                (keeps is None or keeps(spec, alone)):
            return (spec, alone), runs
    return None, runs


def _batch_kernel(session: Session, policy: str) -> str:
    """The kernel that runs a batch of candidates: the session's screening kernel once chosen
    (native while "auto" is still on trial). No faithful re-run is needed: a hit is confirmed
    alone with the faithful kernel, and a candidate the screening kernel runs finite where the
    faithful one would not costs only one deletion, never a wrong case. Why: a finding's
    candidates are prefills of 8 prompts at once, products of hundreds of rows, which a CPU
    without avx512_fp16 computes ~3.8x faster accumulated in float32 (139 vs 36.5 GFLOP/s for
    the MLP at 256 rows, benchmarks/bench_throughput.py on a 2-core AMD EPYC, 2026-12-05)."""
    name = session.screening_kernel(policy)
    return "native" if name == "auto" else name


def surviving_deletions(session: Session, spec: PromptSpec, policy: str, sig: Signature,
                        bounds: Optional[Bounds] = None,
                        keeps: Optional[Keeps] = None) -> list[PromptSpec]:
    """Every single-character deletion of the prompt that still fails with the signature (and
    passes `keeps`), each run alone with the faithful kernel: empty for a 1-minimal prompt.
    What a benchmark or a test uses to check minimizing; it runs len(prompt) prompts."""
    survivors = []
    candidates = [PromptSpec(t, spec.add_bos, spec.chat)
                  for t in dict.fromkeys(deletion_candidates(spec.text, 1))]
    with kernel("native"):
        for candidate in (c for c in candidates if session.runnable(c)):
            verdict = session.run([candidate], policy, bounds)[0]
            if session.signature(verdict) == sig and (keeps is None or keeps(candidate, verdict)):
                survivors.append(candidate)
    return survivors
