"""`fuzz advise`'s rule: which policy to ship, and how sure that answer is.

1. A policy qualifies when it is finite everywhere (every corpus case, sampled run and
   teacher-forced position) and the upper end of its mean-KLD 95% interval against float32 is at
   most `max_kld` (DEFAULT_MAX_KLD nats by default).
2. Among the qualifying, one policy beats another only where their speed intervals separate (the
   slower one's upper end below the faster one's lower end); a speed measured on one batch has no
   interval and separates from nothing.
3. The qualifying policies that nothing beats are tied on speed; the tie goes to the safest of
   them by SAFETY_ORDER, and the recommendation names whom it tied with.
Every other policy says why it lost.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

from fuzz.advise.result import PolicyAdvice
from fuzz.precision import PLAN_PREFIX

# A line drawn by choice, not measured: 0.01 nats of mean KL(float32 || policy) per position.
# The rule reads the upper end of the interval, so a policy qualifies only where the data say its
# mean is under the line, not where a lucky sample lands there. --max-kld moves it.
DEFAULT_MAX_KLD = 0.01

# Overflow safety, safest first: float32 (the reference); bfloat16 (float32's range
# everywhere); then the float16 policies by how much of the model keeps float32's range — norms,
# residual stream and logits; the residual stream; a plan's layers' residual stream (PLAN_SLOT);
# clipping every residual add to half of float16's range (overflow inside a layer still
# possible); clamping adds and norm outputs near float16's maximum (later, so less margin);
# nothing. Unknown names rank last.
PLAN_SLOT = "float16-fp32-layers:*"
SAFETY_ORDER = ("float32", "bfloat16", "float16-fp32-norm-residual", "float16-fp32-residual",
                PLAN_SLOT, "float16-clip32752", "float16-clamp", "float16")


def safety_rank(policy: str) -> int:
    """The policy's place in SAFETY_ORDER (0 safest)."""
    key = PLAN_SLOT if policy.startswith(PLAN_PREFIX) else policy
    return SAFETY_ORDER.index(key) if key in SAFETY_ORDER else len(SAFETY_ORDER)


def qualifies(r: PolicyAdvice, max_kld: float) -> bool:
    hi = r.divergence.mean_kld_ci[1]
    return r.finite_everywhere and not math.isnan(hi) and hi <= max_kld


def faster(a: PolicyAdvice, b: PolicyAdvice) -> bool:
    """a is clearly faster than b: a's speed interval lies wholly above b's (nan: unknown, never
    separates)."""
    return a.speed_ci[0] > b.speed_ci[1]  # False whenever either end is nan


def recommend(results: Sequence[PolicyAdvice], max_kld: float) -> Optional[str]:
    """Sets each policy's verdict (and the winner's tie_with); returns the winner's name."""
    qualifying = [r for r in results if qualifies(r, max_kld)]
    front = [r for r in qualifying if not any(faster(o, r) for o in qualifying)]
    best = min(front, key=lambda r: safety_rank(r.policy), default=None)
    for r in results:
        r.tie_with = []
        if r is best:
            r.tie_with = [o.policy for o in front if o is not r]
            r.verdict = "recommended" + (
                f" (tied on speed with {', '.join(r.tie_with)}: the intervals overlap, the "
                "safer policy wins)" if r.tie_with else "")
        else:
            r.verdict = why_lost(r, best, qualifying, max_kld)
    return best.policy if best else None


def _speed(r: PolicyAdvice) -> str:
    lo, hi = r.speed_ci
    spread = "no interval" if math.isnan(lo) else f"{lo:.3g}-{hi:.3g}"
    return f"{r.prompts_per_s:.3g} [{spread}]"


def why_lost(r: PolicyAdvice, best: Optional[PolicyAdvice],
             qualifying: Sequence[PolicyAdvice], max_kld: float) -> str:
    d, reasons = r.divergence, []
    for count, total, what in ((r.corpus_nonfinite, r.corpus_runs, "corpus cases"),
                               (r.sampled_nonfinite, r.sampled_runs, "sampled runs"),
                               (d.nonfinite_positions, d.positions + d.nonfinite_positions,
                                "teacher-forced positions")):
        if count:
            reasons.append(f"non-finite on {count}/{total} {what}")
    if d.reference_nonfinite_positions:
        reasons.append(f"float32 itself non-finite on {d.reference_nonfinite_positions} "
                       "teacher-forced positions")
    inconclusive = r.corpus_inconclusive + r.sampled_inconclusive
    if inconclusive:
        reasons.append(f"{inconclusive} runs inconclusive (time limit)")
    lo, hi = d.mean_kld_ci
    if math.isnan(hi):
        if not reasons:
            reasons.append("mean KLD has no interval (fewer than 2 finite sequences)")
    elif hi > max_kld:
        reasons.append(f"mean KLD {d.mean_kld:.3g} nats [95% {lo:.3g}-{hi:.3g}]: upper end "
                       f"> {max_kld:g}")
    if reasons or best is None:
        return "; ".join(reasons) or "not measured"
    beaters = [o for o in qualifying if faster(o, r)]
    if beaters:
        by = best if best in beaters else max(beaters, key=lambda o: o.prompts_per_s)
        return (f"slower: {_speed(r)} prompts/s, below {by.policy}'s {_speed(by)}")
    return (f"tied on speed with {best.policy} ({_speed(r)} vs {_speed(best)} prompts/s: the "
            f"intervals overlap); {best.policy} is safer")
