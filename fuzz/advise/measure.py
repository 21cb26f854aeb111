"""`fuzz advise`: which precision policy to run this model in, measured on this machine.

Every policy of fuzz.precision runs, in one process, on the same inputs:
- every corpus case of the model (its prompt, BOS mode and bounds), alone, as replay runs it;
- N prompts drawn from fuzz.strategies with a fixed seed, each with BOS and without, generated
  greedily in batches. Every policy runs every batch, in an order rotated by one per batch (so
  no policy always runs first, on cold caches, or last); each batch's wall time gives that
  policy one speed sample;
- teacher-forced sequences (fuzz.advise.kld): the text set (fuzz.advise.text), then the sampled
  runs' and the corpus cases' float32 greedy continuations; logits at every position against
  float32's (fuzz.advise.stats).
fuzz.advise.rule turns these into the recommendation and says how sure it is.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Optional

from fuzz.advise.inputs import machine_info, runnable_prompts
from fuzz.advise.kld import MAX_SEQUENCE_TOKENS, TokenSequence, continuation, teacher_forced
from fuzz.advise.result import REFERENCE, Advice, PolicyAdvice
from fuzz.advise.rule import DEFAULT_MAX_KLD, recommend
from fuzz.advise.stats import median_interval
from fuzz.advise.text import DEFAULT_CHUNKS, DEFAULT_TOKENS, TextSet, text_set
from fuzz.corpus import Corpus
from fuzz.corpus.replay import case_bounds, case_spec
from fuzz.generate import encode_prompt
from fuzz.precision import POLICIES, PrecisionPolicy
from fuzz.report.intervals import wilson_interval
from fuzz.session import Session
from fuzz.verdict import PromptSpec, Verdict

DEFAULT_SAMPLE = 32
DEFAULT_SEED = 0


def first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """The first decode step whose token differs (a prefix that ends early diverges where it
    ends); None when the two continuations are identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def rotated(policies: Sequence[PrecisionPolicy], k: int) -> list[PrecisionPolicy]:
    """The policies in the order batch k runs them: shifted by k, so each runs first (and last)
    in turn."""
    k %= max(1, len(policies))
    return list(policies[k:]) + list(policies[:k])


def advise(session: Session, corpus: Optional[Corpus], sample: int = DEFAULT_SAMPLE,
           seed: int = DEFAULT_SEED, budget_s: Optional[float] = None,
           max_kld: float = DEFAULT_MAX_KLD, text: Optional[TextSet] = None,
           policies: Sequence[PrecisionPolicy] = tuple(POLICIES.values()),
           corpus_label: Optional[str] = None,
           progress: Callable[[str], None] = lambda line: None) -> Advice:
    """Measures every policy on the corpus cases, the sampled prompts and the teacher-forced
    sequences; picks one. `text`: the text set (default: the stdlib's, DEFAULT_CHUNKS chunks
    of DEFAULT_TOKENS tokens). `progress` receives a line after each step (the CLI prints them
    to stderr)."""
    names = [p.name for p in policies]
    if REFERENCE not in names:
        raise ValueError(f"advise compares every policy with {REFERENCE}: include it "
                         f"(got {', '.join(names)})")
    if text is None:
        text = text_set(session.model.tokenizer, DEFAULT_CHUNKS, DEFAULT_TOKENS)
    policies = sorted(policies, key=lambda p: p.name != REFERENCE)  # the reference first
    results = {p.name: PolicyAdvice(p.name, str(p.dtype).removeprefix("torch."),
                                    p.expected_safe) for p in policies}
    for p in policies:
        session.engine(p)  # built (weights cast) before any timing
    cases = _corpus_cases(session, corpus)
    corpus_refs = _measure_corpus(session, policies, cases, results, progress)
    texts = runnable_prompts(session, sample, seed)
    specs = [(i, s) for i, t in enumerate(texts)
             for s in (PromptSpec(t, add_bos=True), PromptSpec(t, add_bos=False))
             if session.runnable(s)]
    deadline = None if budget_s is None else time.monotonic() + budget_s
    tokens, measured, stopped = _measure_sampled(session, policies, specs, results, deadline,
                                                 progress)
    for p in policies:
        _agreement(results[p.name], tokens[REFERENCE], tokens[p.name])
    sequences, skipped = _sequences(session, text, specs[:measured], tokens[REFERENCE],
                                    corpus_refs)
    divergence = teacher_forced(session, policies, REFERENCE, sequences, progress)
    for name, d in divergence.items():
        results[name].divergence = d
    ranked = [results[p.name] for p in policies]
    recommended = recommend(ranked, max_kld)
    return Advice(
        session.model.name, session.model.fingerprint, machine_info(session.device),
        session.bounds.to_dict(), sample, len({i for i, _ in specs[:measured]}), measured,
        len(specs), seed, corpus_label or ("none" if corpus is None else str(corpus.root)),
        len(cases), {"source": text.source, "sha256": text.sha256, "chunks": len(text.chunks),
                     "tokens": len(text.chunks[0]), "available": text.available},
        _count_sources(sequences), skipped, max_kld, budget_s, stopped, ranked, recommended)


def _count_sources(sequences: Sequence[TokenSequence]) -> dict[str, int]:
    out = {"text": 0, "sampled": 0, "corpus": 0}
    for s in sequences:
        out[s.source] += 1
    return out


def _corpus_cases(session: Session, corpus: Optional[Corpus]) -> list:
    if corpus is None:
        return []
    return [loaded.case for loaded in corpus.cases(session.model.name)
            if loaded.case.model_fingerprint == session.model.fingerprint]


def _measure_corpus(session: Session, policies: Sequence[PrecisionPolicy], cases: list,
                    results: dict[str, PolicyAdvice], progress: Callable[[str], None]
                    ) -> list[tuple[object, Verdict]]:
    """Each case alone (its own bounds, as replay runs it) under every policy; returns the
    cases with float32's verdicts (their continuations are teacher-forced later)."""
    refs = []
    for k, case in enumerate(cases):
        for p in rotated(policies, k):
            verdict = session.run([case_spec(case)], p, case_bounds(case))[0]
            out = results[p.name]
            out.corpus_runs += 1
            out.corpus_nonfinite += verdict.nonfinite
            out.corpus_inconclusive += verdict.inconclusive
            out.headroom = min(out.headroom, verdict.min_headroom())
            if p.name == REFERENCE:
                refs.append((case, verdict))
        progress(f"corpus: {k + 1}/{len(cases)} cases under every policy")
    return refs


def _measure_sampled(session: Session, policies: Sequence[PrecisionPolicy],
                     specs: list[tuple[int, PromptSpec]], results: dict[str, PolicyAdvice],
                     deadline: Optional[float], progress: Callable[[str], None]
                     ) -> tuple[dict[str, list[Verdict]], int, bool]:
    """Batch by batch, every policy on the same batch (so a budget that stops the loop leaves
    every policy measured on the same runs). Returns each policy's verdicts in order, the runs
    measured and whether the budget stopped the loop."""
    size = max(1, session.batch_size)
    verdicts: dict[str, list[Verdict]] = {p.name: [] for p in policies}
    batches = (len(specs) + size - 1) // size
    for k, start in enumerate(range(0, len(specs), size)):
        if deadline is not None and time.monotonic() > deadline and start:
            return verdicts, start, True
        chunk = [s for _, s in specs[start: start + size]]
        for p in rotated(policies, k):
            wall, cpu = time.perf_counter(), time.process_time()
            got = session.run(chunk, p)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            r = results[p.name]
            r.seconds += wall
            r.cpu_seconds += cpu
            r.batch_speeds.append(len(chunk) / wall if wall > 0 else float("inf"))
            r.sampled_runs += len(got)
            r.sampled_nonfinite += sum(v.nonfinite for v in got)
            r.sampled_inconclusive += sum(v.inconclusive for v in got)
            r.headroom = min([r.headroom] + [v.min_headroom() for v in got])
            verdicts[p.name] += got
        progress(f"sampled: {start + len(chunk)}/{len(specs)} runs under every policy "
                 f"(batch {k + 1}/{batches})")
    return verdicts, len(specs), False


def _agreement(out: PolicyAdvice, ref: list[Verdict], got: list[Verdict]) -> None:
    """Identical greedy continuations (Wilson interval), first divergences, the speed."""
    if out.sampled_runs:
        out.cpu_s_per_run = out.cpu_seconds / out.sampled_runs
    if out.batch_speeds:
        out.prompts_per_s = float(statistics.median(out.batch_speeds))
        out.speed_ci = median_interval(out.batch_speeds)
    if not got:
        return
    divergences = []
    for a, b in zip(ref, got):
        d = first_divergence(a.tokens, b.tokens)
        if d is None and b.status == "finite":
            out.identical_runs += 1
        elif d is not None:
            divergences.append(d)
    out.identical = out.identical_runs / len(got)
    out.identical_ci = wilson_interval(out.identical_runs, len(got))
    out.diverged = len(divergences)
    out.median_divergence = float(statistics.median(divergences)) if divergences else None


def _sequences(session: Session, text: TextSet, specs: Sequence[tuple[int, PromptSpec]],
               ref: Sequence[Verdict], corpus_refs: Sequence[tuple[object, Verdict]]
               ) -> tuple[list[TokenSequence], int]:
    """The teacher-forced sequences: the text chunks, then float32's finite continuations of
    the sampled runs and of the corpus cases (one over MAX_SEQUENCE_TOKENS is skipped and
    counted). Returns (sequences, skipped)."""
    tok = session.model.tokenizer
    out = [TokenSequence("text", ids) for ids in text.chunks]
    for (_, spec), v in zip(specs, ref):
        if v.status == "finite" and v.tokens:
            ids = continuation(encode_prompt(tok, spec, session.bounds), v.tokens)
            out.append(TokenSequence("sampled", ids))
    skipped = 0
    for case, v in corpus_refs:
        if v.status != "finite" or not v.tokens:
            continue
        ids = continuation(encode_prompt(tok, case_spec(case), case_bounds(case)), v.tokens)
        if len(ids) > MAX_SEQUENCE_TOKENS:
            skipped += 1
        else:
            out.append(TokenSequence("corpus", ids))
    return out, skipped

