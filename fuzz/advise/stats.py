"""The statistics of `fuzz advise`: how far a policy's next-token distributions are from
float32's, with intervals that say how sure the numbers are.

`compare_logits` compares two [T, vocab] logit tensors of one teacher-forced sequence position by
position (llama.cpp's `llama-perplexity --kl-divergence` measures the same things): KL(float32 ||
policy) in nats, whether the top-1 token is the same ("same top p"), the negative log-likelihood
of the actual next token under each (for PPL(policy)/PPL(float32)) and the difference of that
token's probability (for RMS Δp). `summarize` pools the sequences of one policy.

Why a cluster bootstrap: positions of one sequence share their context, so their KLDs are
correlated; treating every position as independent would give an interval far too narrow. The
sequences (text chunks, continuations) are the independent units: the bootstrap resamples whole
sequences, with replacement, BOOTSTRAP_REPS times from a fixed seed (the same data give the same
interval), and takes the 2.5% and 97.5% quantiles of the pooled statistic.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

BOOTSTRAP_REPS = 2000
BOOTSTRAP_SEED = 0
# rows of [T, vocab] logits compared at once, in float64: 16 x 262144 x 8 bytes = 32 MB per
# temporary on Gemma 3's vocabulary, whatever the sequence length
ROWS_AT_ONCE = 16


@dataclass
class SequenceStats:
    """One teacher-forced sequence under one policy, per scored position (the finite ones)."""

    kld: np.ndarray  # KL(float32 || policy), nats
    same_top1: np.ndarray  # bool
    dnll: np.ndarray  # NLL_policy - NLL_float32 of the actual next token
    dp: np.ndarray  # p_policy(next token) - p_float32(next token)
    nonfinite: int = 0  # positions whose policy logits hold a NaN or an infinity
    reference_nonfinite: int = 0  # positions whose float32 logits do (left out for every policy)


@dataclass
class _ReferenceRows:
    """float32's side of ROWS_AT_ONCE positions, in float64: which rows are finite, and for
    those their log-probabilities, probabilities, argmax and the target's log-probability."""

    ok: torch.Tensor  # [rows] bool
    logp: torch.Tensor  # [kept, vocab]
    p: torch.Tensor
    top1: torch.Tensor
    target_logp: torch.Tensor  # [kept]
    targets: torch.Tensor  # [kept, 1]


class Reference:
    """The reference's logits of one sequence, prepared once and compared with every policy
    (its float64 log-softmax over Gemma 3's vocabulary is the costliest step of a comparison)."""

    def __init__(self, ref: torch.Tensor, targets: torch.Tensor) -> None:
        self.rows: list[_ReferenceRows] = []
        for start in range(0, ref.shape[0], ROWS_AT_ONCE):
            r = ref[start:start + ROWS_AT_ONCE].double()
            t = targets[start:start + ROWS_AT_ONCE].long().unsqueeze(1)
            ok = torch.isfinite(r).all(-1)
            logp = torch.log_softmax(r[ok], -1)
            self.rows.append(_ReferenceRows(ok, logp, logp.exp(), r[ok].argmax(-1),
                                            logp.gather(1, t[ok]).squeeze(1), t[ok]))


def compare_logits(ref: torch.Tensor | Reference, got: torch.Tensor,
                   targets: torch.Tensor | None = None) -> SequenceStats:
    """ref (or its prepared Reference), got: [T, vocab] logits of one sequence; targets: [T] the
    token that follows each position (given with raw ref logits). Computed in float64 (a KLD of
    1e-6 is a sum of 262144 tiny terms), ROWS_AT_ONCE rows at a time."""
    reference = ref if isinstance(ref, Reference) else Reference(ref, targets)
    parts: dict[str, list[np.ndarray]] = {"kld": [], "same": [], "dnll": [], "dp": []}
    nonfinite = ref_nonfinite = 0
    for k, rows in enumerate(reference.rows):
        g = got[k * ROWS_AT_ONCE:(k + 1) * ROWS_AT_ONCE].double()
        got_ok = torch.isfinite(g).all(-1)
        ref_nonfinite += int((~rows.ok).sum())
        nonfinite += int((rows.ok & ~got_ok).sum())
        keep = got_ok[rows.ok]  # among the reference's finite rows
        if not keep.any():
            continue
        got_lp = torch.log_softmax(g[rows.ok][keep], -1)
        # the reference's probability is 0 where float32 gives no mass: the term is 0, never
        # 0 * inf
        kld = (rows.p[keep] * (rows.logp[keep] - got_lp)).sum(-1).clamp_min(0.0)  # >= 0
        ref_t, got_t = rows.target_logp[keep], got_lp.gather(1, rows.targets[keep]).squeeze(1)
        parts["kld"].append(kld.numpy())
        parts["same"].append((rows.top1[keep] == got_lp.argmax(-1)).numpy())
        parts["dnll"].append((ref_t - got_t).numpy())
        parts["dp"].append((got_t.exp() - ref_t.exp()).numpy())

    def cat(name: str, dtype: type) -> np.ndarray:
        return np.concatenate(parts[name]) if parts[name] else np.zeros(0, dtype)

    return SequenceStats(cat("kld", np.float64), cat("same", np.bool_), cat("dnll", np.float64),
                         cat("dp", np.float64), nonfinite, ref_nonfinite)


def ratio_interval(num: np.ndarray, den: np.ndarray, reps: int = BOOTSTRAP_REPS,
                   seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The cluster bootstrap's 95% interval of sum(num) / sum(den), one entry per cluster (a
    sequence: num its sum of a per-position value, den its positions). (nan, nan) under 2
    clusters: one sequence says nothing of how another would differ."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    n = len(num)
    if n < 2:
        return math.nan, math.nan
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=reps)
    totals = weights @ den
    est = (weights @ num)[totals > 0] / totals[totals > 0]
    lo, hi = np.quantile(est, [0.025, 0.975])
    return float(lo), float(hi)


def median_interval(values: Sequence[float], reps: int = BOOTSTRAP_REPS,
                    seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The bootstrap's 95% interval of the median of values (per-batch speeds); (nan, nan) under
    2 values: one batch's time says nothing of the spread."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return math.nan, math.nan
    draws = np.random.default_rng(seed).choice(v, size=(reps, len(v)), replace=True)
    lo, hi = np.quantile(np.median(draws, axis=1), [0.025, 0.975])
    return float(lo), float(hi)


@dataclass
class Divergence:
    """One policy against float32 over every teacher-forced sequence (sources pooled)."""

    sequences: int = 0
    positions: int = 0  # scored positions with finite logits under both
    nonfinite_positions: int = 0
    reference_nonfinite_positions: int = 0
    mean_kld: float = math.nan  # nats
    mean_kld_ci: tuple[float, float] = (math.nan, math.nan)
    kld_median: float = math.nan
    kld_p95: float = math.nan
    kld_p99: float = math.nan
    kld_p999: float = math.nan
    kld_max: float = math.nan
    top1: float = math.nan  # "same top p": share of positions with float32's top-1 token
    top1_ci: tuple[float, float] = (math.nan, math.nan)
    ppl_ratio: float = math.nan  # PPL(policy) / PPL(float32) = exp(mean NLL difference)
    ppl_ratio_ci: tuple[float, float] = (math.nan, math.nan)
    rms_dp: float = math.nan  # root mean square of p_policy(token) - p_float32(token)
    rms_dp_ci: tuple[float, float] = (math.nan, math.nan)
    by_source: dict[str, int] = field(default_factory=dict)  # sequences per source


def summarize(seqs: Sequence[SequenceStats], sources: Sequence[str] = ()) -> Divergence:
    """Pools a policy's sequences: means over positions, intervals by cluster bootstrap over
    sequences, percentiles over positions (numpy's linear interpolation)."""
    out = Divergence(sequences=len(seqs),
                     nonfinite_positions=sum(s.nonfinite for s in seqs),
                     reference_nonfinite_positions=sum(s.reference_nonfinite for s in seqs))
    for source in sources:
        out.by_source[source] = out.by_source.get(source, 0) + 1
    used = [s for s in seqs if len(s.kld)]
    if not used:
        return out
    n = np.array([len(s.kld) for s in used], np.float64)
    kld = np.concatenate([s.kld for s in used])
    out.positions = len(kld)

    def pooled(values: list[np.ndarray]) -> tuple[float, tuple[float, float]]:
        sums = np.array([v.sum() for v in values], np.float64)
        return float(sums.sum() / n.sum()), ratio_interval(sums, n)

    out.mean_kld, out.mean_kld_ci = pooled([s.kld for s in used])
    out.kld_median, out.kld_p95, out.kld_p99, out.kld_p999 = (
        float(x) for x in np.percentile(kld, [50, 95, 99, 99.9]))
    out.kld_max = float(kld.max())
    out.top1, out.top1_ci = pooled([s.same_top1.astype(np.float64) for s in used])
    mean_dnll, (lo, hi) = pooled([s.dnll for s in used])
    out.ppl_ratio, out.ppl_ratio_ci = math.exp(mean_dnll), (math.exp(lo), math.exp(hi))
    mean_dp2, (lo, hi) = pooled([s.dp ** 2 for s in used])
    out.rms_dp, out.rms_dp_ci = math.sqrt(mean_dp2), (math.sqrt(lo), math.sqrt(hi))
    return out
