"""`fuzz advise --plan`: the fewest layers whose residual stream must run in float32 for every
check to stay finite with headroom in float16.

Why: the overflow of Gemma in float16 sits in the residual stream of some layers only (every
committed Gemma 3 270M case overflows in channel 163 between layers 7 and 14, docs/NUMERICS.md),
so widening every layer (float16-fp32-residual) pays for layers that never come near the limit.
Polygraphy's `debug precision` and onnxruntime's `auto_convert_mixed_precision` answer the same
question for ONNX graphs by searching which layers to keep in float32 against a check; this does
it for Gemma's residual stream, with the checks users care about:
- every corpus case of the model (its prompt, BOS mode and bounds), every sampled prompt (both
  BOS modes) and every prompt of `--prompts FILE` (plain prompts in both BOS modes, chats once);
- a check passes when its run is finite and its least headroom (limit / max |x| over every site,
  step and position, each site against its own dtype's limit) is at least `min_headroom`.

The search grows the plan greedily, then prunes it, as Polygraphy's `--mode linear` does:
1. run every check under the current plan (empty: plain float16); each failing run implicates one
   layer: where its first non-finite value appeared, or where its headroom is least; add every
   implicated layer not yet in the plan and repeat. A failure whose layer is already in the plan
   (a matmul or pre-norm output, which stays float16 in any plan) cannot be fixed by a plan: the
   search stops and says which run and site.
2. drop each layer in turn (deepest first) when every check still passes without it: the plan
   is then 1-minimal (no single layer can go). A trial runs the checks that failed before first
   and stops at its first failing batch: on the real 270M a full evaluation of a passing plan
   took 130-160 s (every run decodes all its steps), a trial that fails one batch a fraction;
3. run every check once more on the final plan (its least headroom is reported).
A widened span returns to float16 where the next layer starts (fuzz.engine.interface.Numerics):
the cast overflows if the stream has not come back below the limit, which implicates that next
layer, so the plan grows until the stream fits again.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from fuzz.atomic import write_atomic
from fuzz.corpus import Corpus
from fuzz.corpus.replay import case_bounds, case_spec
from fuzz.precision import POLICIES, PrecisionPolicy, plan_policy
from fuzz.prompts.chat import chat_spec
from fuzz.prompts.files import read_prompts
from fuzz.session import Session
from fuzz.verdict import Bounds, PromptSpec, Verdict, json_safe

# A check passes with at least this headroom: 2% below float16's limit, the margin a regression
# case needs to hold across kernels (fuzz.margin.MIN_MARGIN is the same 1.02, measured there).
DEFAULT_MIN_HEADROOM = 1.02


@dataclass(frozen=True)
class Check:
    """One run every plan must keep finite: where it came from, what runs, with which bounds."""

    kind: str  # "corpus", "sampled" or "prompts" (a --prompts file)
    source: str  # the case id, "seed N", or the prompt file's file:line
    spec: PromptSpec
    bounds: Bounds


@dataclass
class Failure:
    check: Check
    status: str
    layer: Optional[int]  # the layer the failure implicates (None: not a layer's)
    site: str
    headroom: float


@dataclass
class Plan:
    """The search's outcome; `layers` is None when no plan keeps every check within headroom."""

    model: str
    fingerprint: str
    num_layers: int
    min_headroom: float
    checked: dict[str, int]
    layers: Optional[list[int]]
    least_headroom: float = math.nan
    evaluations: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)
    why_none: str = ""
    command: str = ""

    @property
    def policy(self) -> Optional[PrecisionPolicy]:
        return plan_policy(self.layers) if self.layers else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fp32_layers"] = d.pop("layers")
        d["model_fingerprint"] = d.pop("fingerprint")
        d["policy"] = self.policy.name if self.policy else None
        return d


# --- the checks --------------------------------------------------------------------------------
def corpus_checks(session: Session, corpus: Optional[Corpus]) -> list[Check]:
    if corpus is None:
        return []
    return [Check("corpus", f"case {loaded.path.stem}", case_spec(loaded.case),
                  case_bounds(loaded.case))
            for loaded in corpus.cases(session.model.name)
            if loaded.case.model_fingerprint == session.model.fingerprint]


def prompt_checks(session: Session, texts: Sequence[str], source: str) -> list[Check]:
    """Each sampled text with BOS and without, where it fits the session's bounds."""
    specs = [PromptSpec(t, add_bos=b) for t in texts for b in (True, False)]
    return [Check("sampled", source, s, session.bounds) for s in specs if session.runnable(s)]


def file_checks(session: Session, paths: Sequence[str]) -> list[Check]:
    """The prompts of --prompts files: plain ones in both BOS modes, chats once (with their
    template's BOS), where they fit the session's bounds."""
    out = []
    for record in read_prompts(paths):
        if record.is_chat:
            specs = [chat_spec(record.messages, session.model.chat_template)]
        else:
            specs = [PromptSpec(record.text, add_bos=b) for b in (True, False)]
        out += [Check("prompts", record.source, s, session.bounds) for s in specs
                if session.runnable(s)]
    return out


# --- the search --------------------------------------------------------------------------------
def evaluate(session: Session, policy: PrecisionPolicy, checks: Sequence[Check],
             min_headroom: float, stop_at_failure: bool = False) -> tuple[list[Failure], float]:
    """The checks under policy, in order, a batch at a time (per bounds): the failures and the
    least headroom. stop_at_failure: stop after the first batch with a failure (pruning needs
    to know only whether a plan fails, and a plan that lacks a needed layer fails fast on the
    checks that failed before; a passing plan runs every check either way)."""
    by_bounds: dict[Bounds, list[Check]] = {}
    for check in checks:
        by_bounds.setdefault(check.bounds, []).append(check)
    failures, least = [], math.inf
    size = max(1, session.batch_size)
    for bounds, group in by_bounds.items():
        for start in range(0, len(group), size):
            batch = group[start: start + size]
            verdicts = session.run([c.spec for c in batch], policy, bounds)
            for check, verdict in zip(batch, verdicts):
                headroom = verdict.min_headroom()
                least = min(least, headroom)
                if verdict.status != "finite" or headroom < min_headroom:
                    failures.append(_failure(check, verdict, headroom))
            if failures and stop_at_failure:
                return failures, least
    return failures, least


def _failure(check: Check, verdict: Verdict, headroom: float) -> Failure:
    if verdict.first_nonfinite is not None:
        first = verdict.first_nonfinite
        return Failure(check, verdict.status, first.layer, first.site, headroom)
    where = verdict.min_headroom_site(content_only=False)
    layer = int(where[0]) if where and where[0].isdigit() else None
    return Failure(check, verdict.status, layer, where[1] if where else "?", headroom)


def find_plan(session: Session, checks: Sequence[Check],
              min_headroom: float = DEFAULT_MIN_HEADROOM,
              progress: Callable[[str], None] = lambda line: None) -> Plan:
    """Grows, prunes and re-checks the plan (module docstring)."""
    counts: dict[str, int] = {}
    for check in checks:
        counts[check.kind] = counts.get(check.kind, 0) + 1
    num_layers = session.model.config.num_hidden_layers
    plan = Plan(session.model.name, session.model.fingerprint, num_layers, min_headroom, counts,
                None)

    failed_before: list[Check] = []  # every check that failed so far, latest first

    def run(layers: set[int], pruning: bool = False) -> tuple[list[Failure], float]:
        policy = plan_policy(layers) if layers else POLICIES["float16"]
        # a pruning trial runs the checks that failed before first and stops at a failure
        order = ([*failed_before, *(c for c in checks if c not in failed_before)]
                 if pruning else list(checks))
        failures, least = evaluate(session, policy, order, min_headroom, stop_at_failure=pruning)
        session.model.release(policy, session.device, session.engine_kind)  # one model at a time
        for f in failures:
            if f.check in failed_before:
                failed_before.remove(f.check)
            failed_before.insert(0, f.check)
        plan.evaluations += 1
        plan.steps.append({"layers": sorted(layers), "failures": len(failures),
                           "least_headroom": least, "stopped_at_failure": pruning})
        counted = "at least " if pruning and failures else ""
        progress(f"plan: layers {sorted(layers) or 'none'}: {counted}{len(failures)}/"
                 f"{len(checks)} checks fail (least headroom {least:.3g})")
        return failures, least

    layers: set[int] = set()
    failures, least = run(layers)
    while failures:
        implicated = {f.layer for f in failures}
        new = {i for i in implicated if i is not None and 0 <= i < num_layers} - layers
        if not new:
            stuck = next(f for f in failures if f.layer is None or f.layer in layers
                         or not 0 <= f.layer < num_layers)
            plan.why_none = (
                f"{stuck.check.kind} {stuck.check.source} "
                f"({'BOS' if stuck.check.spec.add_bos else 'no BOS'}) is "
                f"{stuck.status} with headroom {stuck.headroom:.3g} at layer {stuck.layer} "
                f"{stuck.site}, which stays float16 in every plan (matmul or pre-norm output): "
                "only a wider policy (bfloat16, float32) keeps it")
            return plan
        layers |= new
        failures, least = run(layers)
    for layer in sorted(layers, reverse=True):  # 1-minimal: no single layer can go
        if len(layers) == 1:
            break
        trial = layers - {layer}
        if not run(trial, pruning=True)[0]:
            layers = trial
    if not layers:
        plan.layers, plan.least_headroom = [], least
        return plan
    failures, least = run(layers)  # the final plan, checked once more
    if failures:  # cannot happen unless a run is not deterministic: say so rather than ship
        plan.why_none = (f"the final plan {sorted(layers)} failed {len(failures)} checks when "
                         "re-run: the runs are not deterministic on this machine")
        return plan
    plan.layers, plan.least_headroom = sorted(layers), least
    return plan


def write_plan(plan: Plan, path: str | Path) -> Path:
    """The plan file (`--policy plan:FILE.json` reads its fp32_layers); never overwrites."""
    p = Path(path)
    if p.exists():
        raise FileExistsError(f"--plan-out {p}: the file exists; remove it or give another "
                              "path (a plan file is never overwritten)")
    doc = json.dumps(json_safe(plan.to_dict()), indent=2, sort_keys=True, allow_nan=False)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(p, (doc + "\n").encode("utf-8"))
    return p


def plan_text(plan: Plan) -> str:
    checked = ", ".join(f"{n} {kind}" for kind, n in plan.checked.items()) or "nothing"
    head = (f"plan for {plan.model} (checks: {checked} runs; pass: finite with headroom >= "
            f"{plan.min_headroom:g}; {plan.evaluations} evaluations)")
    if plan.layers is None:
        return f"{head}\nno plan: {plan.why_none}\n"
    if not plan.layers:
        return (f"{head}\nno layer needs float32: plain float16 passes every check (least "
                f"headroom {plan.least_headroom:.3g})\n")
    return (f"{head}\nplan: residual stream in float32 at layers "
            f"{', '.join(map(str, plan.layers))} ({len(plan.layers)} of {plan.num_layers}; "
            f"policy {plan.policy.name}); least headroom on the final plan "
            f"{plan.least_headroom:.3g}\n")
