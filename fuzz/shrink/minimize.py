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
from typing import TYPE_CHECKING, Optional

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


def minimize_text(session: Session, spec: PromptSpec, policy: str, sig: Signature,
                  bounds: Optional[Bounds] = None, max_evals: int = 96,
                  keeps: Optional[Keeps] = None, deadline: float = math.inf,
                  found: Optional[Verdict] = None) -> tuple[PromptSpec, Optional[Verdict]]:
    """Deletes character runs (halving their length down to one character) while the failure
    keeps its exact signature (and whatever `keeps` asks), within `max_evals` prompts run and
    until `deadline` (time.monotonic()): the job's hard budget bounds minimizing too. Given
    the prompt's verdict (`found`) of a prefill failure, it first tries the prompt cut after
    the failing token (causal_prefix): measured on the planted 40-digit run, Hypothesis's shrink
    left '0'*40 followed by a 76-character chat-like tail, which the 96 deletions did not
    remove (the saved case kept one stray character); the cut removes it in one run.

    Returns the smallest prompt found (1-minimal when the budget allows) and its verdict
    (None when nothing could be deleted)."""
    best, best_verdict, evals = spec, None, 0
    cut = causal_prefix(session, spec, found) if found is not None else None
    if cut is not None and session.runnable(cut):
        hit, evals = _first_with_signature(session, [cut], policy, sig, bounds, keeps)
        if hit is not None:
            best, best_verdict = hit
    chunk = max(1, len(best.text) // 2)
    while chunk >= 1 and evals < max_evals and best.text and time.monotonic() < deadline:
        candidates = [PromptSpec(t, spec.add_bos, spec.chat)
                      for t in deletion_candidates(best.text, chunk)]
        candidates = [c for c in candidates if session.runnable(c)]
        hit = None
        for i in range(0, len(candidates), session.batch_size):
            batch = candidates[i: i + session.batch_size]
            hit, runs = _first_with_signature(session, batch, policy, sig, bounds, keeps)
            evals += runs
            if hit is not None or evals >= max_evals or time.monotonic() >= deadline:
                break
        if hit is None:
            chunk //= 2
        else:
            best, best_verdict = hit
            chunk = min(chunk, max(1, len(best.text) // 2))
    return best, best_verdict


def _first_with_signature(session: Session, specs: list[PromptSpec], policy: str,
                          sig: Signature, bounds: Optional[Bounds], keeps: Optional[Keeps]
                          ) -> tuple[Optional[tuple[PromptSpec, Verdict]], int]:
    """The first candidate that keeps the signature (confirmed alone) and passes `keeps`, and
    the prompts run (not counting what `keeps` runs)."""
    runs = len(specs)
    if not specs:
        return None, runs
    with kernel(_batch_kernel(session, policy)):
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
