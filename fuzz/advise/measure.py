"""`fuzz advise`: which precision policy to run this model in, measured on this machine.

Every policy of fuzz.precision runs, in one process, on the same inputs: every corpus case of the
model (its prompt, BOS mode and bounds) and N prompts drawn from fuzz.strategies with a fixed
seed, each run with BOS and without. Per policy it measures
- finiteness: a non-finite or inconclusive run anywhere disqualifies the policy;
- agreement with float32 on the sampled prompts: identical greedy continuations (% of runs), the
  median first diverging step (over the runs that diverge), and top-1 agreement and mean
  KL(float32 || policy) of the step-0 next-token distributions (the prefill's last logits,
  captured through generate's extra recorder: no second forward);
- speed: sampled runs per second of wall time (batched as `fuzz run` batches, native kernels);
- peak headroom: the least limit / max |x| over every site, step and position (fuzz.verdict).

The recommendation is the fastest policy that is finite everywhere and whose greedy
continuations match float32's on at least AGREEMENT_THRESHOLD of the sampled runs; each other
policy says why it lost. float32 is the reference, so it always qualifies when finite.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from fuzz.corpus import Corpus
from fuzz.corpus.replay import case_bounds, case_spec
from fuzz.generate import generate
from fuzz.precision import POLICIES, PrecisionPolicy
from fuzz.session import Session
from fuzz.verdict import Bounds, PromptSpec

# Greedy continuations identical to float32's on at least this share of the sampled runs. 90% is a
# line drawn by choice, not measured: a policy that changes one answer in ten is taken for a
# different model.
AGREEMENT_THRESHOLD = 0.90
REFERENCE = "float32"
DEFAULT_SAMPLE = 32
DEFAULT_SEED = 0
# CPU flags that decide which matmul kernels torch can use for each dtype.
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                "amx_tile", "amx_bf16", "amx_fp16")


# --- inputs ------------------------------------------------------------------------------------
def draw_prompts(n: int, seed: int, max_chars: int = 200) -> list[str]:
    """n prompts from fuzz.strategies' default strategy, reproducibly (Hypothesis, fixed seed)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from fuzz.strategies import prompts

    out: list[str] = []

    # Hypothesis skips draws it has already made, so ask for more than n and keep the first n
    # distinct ones (drawing is cheap next to running them)
    @settings(max_examples=2 * n + 10, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(prompts(max_chars=max_chars))
    def collect(text: str) -> None:
        out.append(text)

    if n > 0:
        hypothesis_seed(seed)(collect)()
    return list(dict.fromkeys(out))[:n]


def runnable_prompts(session: Session, n: int, seed: int) -> list[str]:
    """The first n drawn prompts that fit the session's bounds in at least one BOS mode (a draw
    over --max-prompt-tokens is skipped, not counted)."""
    texts = draw_prompts(3 * n + 10, seed)
    return [t for t in texts if any(session.runnable(PromptSpec(t, add_bos=b))
                                    for b in (True, False))][:n]


def machine_info(device: str) -> dict[str, Any]:
    """The CPU's name and kernel-relevant flags (Linux /proc/cpuinfo), threads, torch, GPU."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(),
                                                         platform.processor()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass  # not Linux: the name from platform, no flags
    info = {"cpu": name, "cpu_flags": [f for f in KERNEL_FLAGS if f in flags],
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "load_average": _load_average()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _load_average() -> Optional[float]:
    """The 1-minute load average at the start: above the thread count, other work shared the
    CPU and the wall-time speeds are skewed (the CPU-time column much less)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_text(info: dict[str, Any]) -> str:
    flags = ", ".join(info["cpu_flags"]) or "none of " + ", ".join(KERNEL_FLAGS)
    gpu = f"; GPU {info['gpu']}" if info.get("gpu") else ""
    load = info.get("load_average")
    busy = (f"; load average {load} at the start" + (" (shared: wall-time speeds skewed)"
                                                     if load > info["threads"] else "")
            if load is not None else "")
    return (f"CPU {info['cpu']} (flags: {flags}), {info['threads']} threads, torch "
            f"{info['torch']}, device {info['device']}{gpu}{busy}")


# --- one policy over one batch -----------------------------------------------------------------
class _Step0Logits:
    """A Recorder that keeps the first logits it sees (the prefill's last position, [B, vocab])
    as float32 log-probabilities on the CPU."""

    def __init__(self) -> None:
        self.logp: Optional[torch.Tensor] = None

    def site(self, layer: int, name: str, x: torch.Tensor) -> None:
        if name == "logits" and self.logp is None:
            last = x[:, -1] if x.dim() == 3 else x
            self.logp = torch.log_softmax(last.detach().float(), dim=-1).cpu()

    def residual(self, layer: int, name: str, residual: torch.Tensor, branch: torch.Tensor,
                 out: torch.Tensor) -> None:
        pass


@dataclass
class _Runs:
    """What one policy produced on the sampled runs, in order."""

    tokens: list[list[int]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    # step-0 log-probabilities ([vocab] each): kept for the reference only (1 MB a run on a
    # 262144-token vocabulary); every other policy is compared batch by batch as it runs
    logp: list[torch.Tensor] = field(default_factory=list)
    step0: list[Optional[tuple[bool, float]]] = field(default_factory=list)  # (top-1 same, KL)
    headroom: float = math.inf
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def _run_batch(session: Session, policy: PrecisionPolicy, specs: Sequence[PromptSpec],
               bounds: Bounds, runs: _Runs, ref: Optional[_Runs]) -> list[str]:
    """Runs specs as one batch under policy and appends to runs (comparing the step-0
    distributions with ref's, the reference's runs of the same specs, unless this is the
    reference); returns the verdicts' statuses."""
    engine = session.engine(policy)
    capture = _Step0Logits()
    started, cpu = time.perf_counter(), time.process_time()
    verdicts = generate(engine, session.model.tokenizer, list(specs), policy.name, bounds,
                        capture)
    runs.seconds += time.perf_counter() - started
    runs.cpu_seconds += time.process_time() - cpu
    if capture.logp is None:
        raise RuntimeError(f"the {session.engine_kind} engine recorded no 'logits' site: advise "
                           "needs the step-0 logits; run it with --engine builtin")
    for v, logp in zip(verdicts, capture.logp):
        if ref is None:
            runs.logp.append(logp)
        else:
            runs.step0.append(step0_pair(ref.logp[len(runs.tokens)], logp))
        runs.tokens.append(list(v.tokens))
        runs.statuses.append(v.status)
        runs.headroom = min(runs.headroom, v.min_headroom())
    return [v.status for v in verdicts]


# --- agreement ---------------------------------------------------------------------------------
def first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """The first decode step whose token differs (a prefix that ends early diverges where it
    ends); None when the two continuations are identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def step0_pair(ref: torch.Tensor, got: torch.Tensor) -> Optional[tuple[bool, float]]:
    """(same top-1 token, KL(ref || got) in nats) of two step-0 log-probability rows; None when
    either is not a distribution (a NaN row, as a float16 overflow leaves it)."""
    if torch.isnan(ref).any() or torch.isnan(got).any() or not torch.isfinite(got).any():
        return None
    ref_p = ref.exp()
    # where float32 gives probability 0 the term is 0 (not 0 * -inf); where the policy gives 0
    # and float32 does not, KL is infinite, as it should be
    diff = torch.where(ref_p > 0, ref - got, torch.zeros_like(ref))
    # KL >= 0: a negative sum is the float32 rounding of two equal distributions
    kl = max(0.0, float((ref_p.double() * diff.double()).sum()))
    return bool(torch.argmax(ref) == torch.argmax(got)), kl


# --- the measurement ---------------------------------------------------------------------------
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
    identical: float = math.nan  # share of sampled runs with float32's exact continuation
    median_divergence: Optional[float] = None  # over the runs that diverge; None: none did
    diverged: int = 0
    step0_compared: int = 0
    top1: float = math.nan  # share of compared runs whose step-0 argmax is float32's
    mean_kl: float = math.nan  # nats
    prompts_per_s: float = math.nan
    seconds: float = 0.0
    # CPU time of this process (all its threads) per sampled run: on a machine shared with other
    # work, wall time swings with the load while CPU time stays close to the uncontended cost
    cpu_s_per_run: float = math.nan
    headroom: float = math.inf  # least limit / max |x| over every run, site, step, position
    verdict: str = ""  # "recommended", or why it lost

    @property
    def finite_everywhere(self) -> bool:
        return not (self.corpus_nonfinite or self.corpus_inconclusive or self.sampled_nonfinite
                    or self.sampled_inconclusive)


@dataclass
class Advice:
    model: str
    fingerprint: str
    machine: dict[str, Any]
    bounds: dict[str, int]
    sample: int  # prompts asked for
    sampled_texts: int  # prompts measured (the budget can stop earlier)
    seed: int
    corpus_cases: int
    threshold: float
    budget_s: Optional[float]
    stopped_by_budget: bool
    policies: list[PolicyAdvice]
    recommended: Optional[str]
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def advise(session: Session, corpus: Optional[Corpus], sample: int = DEFAULT_SAMPLE,
           seed: int = DEFAULT_SEED, budget_s: Optional[float] = None,
           threshold: float = AGREEMENT_THRESHOLD,
           policies: Sequence[PrecisionPolicy] = tuple(POLICIES.values()),
           progress: Callable[[str], None] = lambda line: None) -> Advice:
    """Measures every policy on the corpus cases and the sampled prompts; picks one.
    `progress` receives a line after each stage (the CLI prints them to stderr)."""
    names = [p.name for p in policies]
    if REFERENCE not in names:
        raise ValueError(f"advise compares every policy with {REFERENCE}: include it "
                         f"(got {', '.join(names)})")
    policies = sorted(policies, key=lambda p: p.name != REFERENCE)  # the reference first
    results = {p.name: PolicyAdvice(p.name, str(p.dtype).removeprefix("torch."),
                                    p.expected_safe) for p in policies}
    cases = _corpus_cases(session, corpus)
    for p in policies:
        _measure_corpus(session, p, cases, results[p.name])
        progress(f"corpus: {len(cases)} cases under {p.name}, "
                 f"{results[p.name].corpus_nonfinite} non-finite")
    texts = runnable_prompts(session, sample, seed)
    runs = {p.name: _Runs() for p in policies}
    deadline = None if budget_s is None else time.monotonic() + budget_s
    measured, stopped = _measure_sampled(session, policies, texts, runs, results, deadline,
                                         progress)
    for p in policies:
        _agreement(results[p.name], runs[REFERENCE], runs[p.name])
    ranked = [results[p.name] for p in policies]
    recommended = recommend(ranked, threshold)
    return Advice(session.model.name, session.model.fingerprint, machine_info(session.device),
                  session.bounds.to_dict(), sample, measured, seed, len(cases), threshold,
                  budget_s, stopped, ranked, recommended)


def _corpus_cases(session: Session, corpus: Optional[Corpus]) -> list:
    if corpus is None:
        return []
    return [loaded.case for loaded in corpus.cases(session.model.name)
            if loaded.case.model_fingerprint == session.model.fingerprint]


def _measure_corpus(session: Session, policy: PrecisionPolicy, cases: list,
                    out: PolicyAdvice) -> None:
    """Each case alone (its own bounds, as replay runs it)."""
    for case in cases:
        verdict = session.run([case_spec(case)], policy, case_bounds(case))[0]
        out.corpus_runs += 1
        out.corpus_nonfinite += verdict.nonfinite
        out.corpus_inconclusive += verdict.inconclusive
        out.headroom = min(out.headroom, verdict.min_headroom())


def _measure_sampled(session: Session, policies: Sequence[PrecisionPolicy], texts: list[str],
                     runs: dict[str, _Runs], results: dict[str, PolicyAdvice],
                     deadline: Optional[float], progress: Callable[[str], None]
                     ) -> tuple[int, bool]:
    """Batch by batch, every policy on the same batch (so a budget that stops the loop leaves
    every policy measured on the same prompts). Returns (texts measured, stopped by budget)."""
    specs = [(i, s) for i, t in enumerate(texts)
             for s in (PromptSpec(t, add_bos=True), PromptSpec(t, add_bos=False))
             if session.runnable(s)]
    size = max(1, session.batch_size)
    done = 0
    for start in range(0, len(specs), size):
        if deadline is not None and time.monotonic() > deadline and start:
            return len({i for i, _ in specs[:start]}), True
        chunk = [s for _, s in specs[start: start + size]]
        if not session.supports_padding:
            chunk_groups = [[s] for s in chunk]
        else:
            chunk_groups = [chunk]
        for p in policies:
            for group in chunk_groups:
                ref = None if p.name == REFERENCE else runs[REFERENCE]
                statuses = _run_batch(session, p, group, session.bounds, runs[p.name], ref)
                r = results[p.name]
                r.sampled_runs += len(statuses)
                r.sampled_nonfinite += statuses.count("nonfinite")
                r.sampled_inconclusive += statuses.count("inconclusive")
        done = start + len(chunk)
        progress(f"sampled: {done}/{len(specs)} runs under every policy")
    return len({i for i, _ in specs[:done]}), False


def _agreement(out: PolicyAdvice, ref: _Runs, got: _Runs) -> None:
    out.seconds = got.seconds
    out.prompts_per_s = len(got.tokens) / got.seconds if got.seconds > 0 else math.nan
    out.cpu_s_per_run = got.cpu_seconds / len(got.tokens) if got.tokens else math.nan
    out.headroom = min(out.headroom, got.headroom)
    if not got.tokens:
        return
    divergences = []
    identical = 0
    for a, b, status in zip(ref.tokens, got.tokens, got.statuses):
        d = first_divergence(a, b)
        if d is None and status == "finite":
            identical += 1
        elif d is not None:
            divergences.append(d)
    out.identical = identical / len(got.tokens)
    out.diverged = len(divergences)
    out.median_divergence = float(statistics.median(divergences)) if divergences else None
    pairs = ([(True, 0.0)] * len(got.logp) if got is ref
             else [pair for pair in got.step0 if pair is not None])
    out.step0_compared = len(pairs)
    if pairs:
        out.top1 = sum(same for same, _ in pairs) / len(pairs)
        out.mean_kl = sum(kl for _, kl in pairs) / len(pairs)


def recommend(results: Sequence[PolicyAdvice], threshold: float) -> Optional[str]:
    """Sets each policy's verdict; returns the fastest qualifying policy's name."""
    qualifying = [r for r in results if r.finite_everywhere and r.identical >= threshold]
    best = max(qualifying, key=lambda r: r.prompts_per_s, default=None)
    for r in results:
        r.verdict = "recommended" if r is best else _why_lost(r, best, threshold)
    return best.policy if best else None


def _why_lost(r: PolicyAdvice, best: Optional[PolicyAdvice], threshold: float) -> str:
    reasons = []
    if r.corpus_nonfinite:
        reasons.append(f"non-finite on {r.corpus_nonfinite}/{r.corpus_runs} corpus cases")
    if r.sampled_nonfinite:
        reasons.append(f"non-finite on {r.sampled_nonfinite}/{r.sampled_runs} sampled runs")
    inconclusive = r.corpus_inconclusive + r.sampled_inconclusive
    if inconclusive:
        reasons.append(f"{inconclusive} runs inconclusive (time limit)")
    if not math.isnan(r.identical) and r.identical < threshold:
        reasons.append(f"identical greedy continuations {r.identical:.0%} < {threshold:.0%}")
    elif math.isnan(r.identical):
        reasons.append("no sampled run to compare")
    if not reasons and best is not None:
        reasons.append(f"slower: {r.prompts_per_s:.3g} vs {best.prompts_per_s:.3g} prompts/s "
                       f"({best.policy})")
    return "; ".join(reasons) or "not measured"
