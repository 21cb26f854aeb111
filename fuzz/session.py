"""A loaded model plus how to run it: what the CLI, the pytest plugin and the search share.

`Session.screen()` runs prompts (batched) under a policy and says, for each failing one, whether
its signature is new; fuzz.shrink.robustness measures a finding (margin, kernel variations) and
minimizes it; fuzz.corpus turns it into a case.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from fuzz.engine.kernels import (
    AUTO_CANDIDATE,
    KernelTrial,
    default_screen_kernel,
    kernel,
    screening_kernel,
)
from fuzz.engine.loaded import ENGINES, LoadedModel, engine_class
from fuzz.engine.zoo import load_model
from fuzz.generate import encode_prompt, explain, generate
from fuzz.margin import MIN_MARGIN
from fuzz.precision import POLICIES, PrecisionPolicy, get_policy
from fuzz.verdict import Bounds, PromptSpec, Signature, Verdict

# Prompts per batch, unless a command says otherwise. Each batch is one Hypothesis example, so a
# bigger one also shrinks and targets more coarsely; and float16, the policy that finds things,
# screens fastest at 8 on a CPU without avx512_fp16 (2.33 prompts/s at 8, 2.03 at 32, 2.04 at 64:
# benchmarks/README.md, "Screening throughput").
DEFAULT_BATCH_SIZE = 8

# A verdict from a non-faithful screening kernel is re-run with the faithful one (native float16)
# when its smallest headroom (limit / max |x| over every site, step and position) is under this:
# a near miss could overflow natively. The largest kernel flip measured on Gemma 3 270M without
# BOS was at a margin of 1.040 (a decode-step finding whose greedy tokens diverged; prefill flips
# stayed under 1.010: docs/NUMERICS.md); 1.05 covers it with a quarter to spare, and
# benchmarks/bench_throughput.py measures how often screen and faithful still disagree.
NEAR_MISS_HEADROOM = 1.05

# (model fingerprint, device, batch size) -> "auto"'s trial of the float16 screening kernel
# (kernels.KernelTrial): once per process, as a Session is opened per test and per CLI command
# over one cached model.
_kernel_trials: dict[tuple[str, str, int], KernelTrial] = {}


def needs_faithful_run(verdict: Verdict) -> bool:
    """Whether a verdict of a non-faithful screening kernel must be re-run natively: it is not
    finite, or it is a near miss that could overflow natively."""
    return not verdict.finite or verdict.min_headroom() < NEAR_MISS_HEADROOM


def resolve_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return name


@dataclass
class ModelOptions:
    """How to find and run the model under test (the CLI's and the plugin's shared options)."""

    spec: str = "gemma3-270m"
    variant: Optional[str] = None
    config: Optional[str] = None
    tokenizer: Optional[str] = None
    engine: str = "builtin"
    device: str = "auto"

    def load(self) -> LoadedModel:
        return load_model(self.spec, variant=self.variant, config_path=self.config,
                          tokenizer_path=self.tokenizer)


@dataclass
class Screened:
    verdict: Verdict
    signature: Optional[Signature]  # None when finite
    new: bool  # a signature not in the known set


@dataclass
class Session:
    model: LoadedModel
    engine_kind: str = "builtin"
    device: str = "cpu"
    bounds: Bounds = field(default_factory=Bounds)
    batch_size: int = DEFAULT_BATCH_SIZE
    # The least margin (unrounded sum / limit) a finding needs to become a regression case
    # (fuzz.shrink.robustness, where the default is derived)
    min_margin: float = MIN_MARGIN
    # The kernel that screens float16 policies (fuzz.engine.kernels.SCREEN_KERNEL_CHOICES):
    # "auto" (a trial on this model's first screens, `kernel_trial`, picks fp32-accumulate-wide
    # only where it is clearly faster than native) or a kernel by name;
    # GEMMA_FUZZ_SCREEN_KERNEL sets the default. Verdicts that count are faithful either way.
    screen_kernel: str = field(default_factory=default_screen_kernel)
    # policy name -> the kernel that screened it last (what a report or a benchmark states)
    screened_with: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, options: ModelOptions, bounds: Optional[Bounds] = None,
             batch_size: int = DEFAULT_BATCH_SIZE) -> Session:
        """The model the options name, loaded, on its device; an engine that cannot pad runs one
        prompt at a time."""
        if options.engine not in ENGINES:
            raise ValueError(f"unknown engine {options.engine!r}; valid engines: "
                             f"{', '.join(ENGINES)}")
        pads = engine_class(options.engine).supports_padding
        return cls(options.load(), options.engine, resolve_device(options.device),
                   bounds or Bounds(), batch_size if pads else 1)

    @property
    def safe_policies(self) -> list[str]:
        return [p.name for p in POLICIES.values() if p.expected_safe]

    def engine(self, policy: PrecisionPolicy, device: Optional[str] = None):
        return self.model.engine(policy, device or self.device, self.engine_kind)

    @property
    def supports_padding(self) -> bool:
        """Whether prompts of different lengths can share a batch (the engine says:
        fuzz.engine.interface.Engine.supports_padding)."""
        return engine_class(self.engine_kind).supports_padding

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The model to oneself for the block: one forward at a time on one model (the search's
        gradient proposals and the heat maps run the engine directly)."""
        with self._lock:
            yield

    def run(self, specs: Sequence[PromptSpec], policy: str | PrecisionPolicy,
            bounds: Optional[Bounds] = None) -> list[Verdict]:
        """Every prompt under one policy, in batches of batch_size; verdicts in order."""
        return self.run_on(specs, policy, bounds, self.device, self.batch_size)

    def run_on(self, specs: Sequence[PromptSpec], policy: str | PrecisionPolicy,
               bounds: Optional[Bounds], device: str, batch_size: int) -> list[Verdict]:
        """`run` on a given device and batch size (the kernel variations,
        fuzz.shrink.robustness)."""
        pol = get_policy(policy) if isinstance(policy, str) else policy
        bounds = bounds or self.bounds
        out: list[Verdict] = []
        for i in range(0, len(specs), batch_size):
            chunk = list(specs[i: i + batch_size])
            with self._lock:  # one model, one forward at a time
                out += generate(self.engine(pol, device), self.model.tokenizer, chunk, pol.name,
                                bounds)
        return out

    def check(self, spec: PromptSpec, policy: str, bounds: Optional[Bounds] = None) -> Verdict:
        """One prompt alone, with the overflow explained (channel and terms) when it fails."""
        bounds = bounds or self.bounds
        verdict = self.run([spec], policy, bounds)[0]
        with self._lock:
            return explain(self.engine(get_policy(policy)), self.model.tokenizer, spec, verdict,
                           bounds)

    def runnable(self, spec: PromptSpec) -> bool:
        """False for what cannot run at all: over the token bound, or empty without BOS."""
        try:
            encode_prompt(self.model.tokenizer, spec, self.bounds)
            return True
        except ValueError:
            return False

    def capped(self, step: int) -> Bounds:
        """The bounds cut to `step` decode steps: a failure seen at step k needs no more. While
        shrinking, this turns most candidates into a prefill alone (step 0) — measured, a
        Hypothesis shrink with the full 16 steps ran into its 5-minute limit on Gemma 3 270M."""
        return dataclasses.replace(self.bounds,
                                   max_new_tokens=min(self.bounds.max_new_tokens, step + 1))

    def case_margin(self, policy: str) -> float:
        """The margin a new signature under `policy` needs to become a regression case: none
        under a policy declared safe (any non-finite value there is a regression), `min_margin`
        under an unsafe one (past the limit by what other kernels will reproduce:
        fuzz.shrink.robustness). Below it a failure is marginal: a near miss to edit further, never
        a finding to shrink, or Hypothesis would shrink toward the edge of the limit."""
        return 0.0 if get_policy(policy).expected_safe else self.min_margin

    def screening_kernel(self, policy: str | PrecisionPolicy) -> str:
        """The matmul kernel `screen` runs `policy` with ("auto" while its trial is under way).
        Only the built-in engine on the CPU has a choice (upstream computes its own matmuls;
        the trial is of CPU kernels), and only for float16 products."""
        pol = get_policy(policy) if isinstance(policy, str) else policy
        if self.engine_kind != "builtin" or self.device != "cpu":
            return "native"
        name = screening_kernel(self.screen_kernel, pol.dtype)
        return (self.kernel_trial().choice or "auto") if name == "auto" else name

    def kernel_trial(self) -> KernelTrial:
        """This model's, device's and batch size's trial of "auto" (kernels.KernelTrial)."""
        key = (self.model.fingerprint, self.device, self.batch_size)
        return _kernel_trials.setdefault(key, KernelTrial())

    def _trial_run(self, specs: Sequence[PromptSpec], policy: str,
                   bounds: Optional[Bounds]) -> list[Verdict]:
        """One screen of "auto"'s trial: the batch under both kernels, timed; native's verdicts
        (faithful) returned."""
        timed = {}
        for name in ("native", AUTO_CANDIDATE):
            with kernel(name):
                start = time.perf_counter()
                timed[name] = (self.run(specs, policy, bounds), time.perf_counter() - start)
        (verdicts, native_s), (screened, candidate_s) = timed["native"], timed[AUTO_CANDIDATE]
        rerun = sum(needs_faithful_run(v) for v in screened) / max(1, len(screened))
        self.kernel_trial().add(native_s, candidate_s, rerun)
        return verdicts

    def screen(self, specs: Sequence[PromptSpec], policy: str, known: set[Signature],
               bounds: Optional[Bounds] = None) -> list[Screened]:
        """Runs the prompts in batches; a new signature is confirmed by running its prompt
        alone, which is the canonical verdict (what check, the corpus and replay see).

        Why: CPU matmul kernels round differently for 1 row and for 8 (gemv vs gemm), and an
        overflow near 65504 turns on one float16 ulp (32 there). Measured on Gemma 3 270M
        without BOS: "0 00self-attention" first overflows at step 11, layer 11, residual_mlp
        alone, but at layer 12, residual_attn in a batch of 8 (even of 8 copies of itself).

        With a non-faithful screening kernel (`screening_kernel`), every verdict that is not
        finite or is a near miss (headroom < NEAR_MISS_HEADROOM) is first re-run with the
        faithful kernel, batched as usual; only the clearly finite ones keep the screening
        verdict. So every non-finite verdict returned, and every new signature, is faithful.
        While "auto"'s trial is under way a batch runs under both kernels and keeps native's
        verdicts (`_trial_run`)."""
        name = self.screening_kernel(policy)
        if name == "auto":
            verdicts, name = self._trial_run(specs, policy, bounds), "native"
        else:
            with kernel(name):
                verdicts = self.run(specs, policy, bounds)
        self.screened_with[get_policy(policy).name] = name
        alone = [len(specs) == 1] * len(specs)  # whether a verdict comes from a run alone
        if name != "native":
            redo = [i for i, v in enumerate(verdicts) if needs_faithful_run(v)]
            if redo:
                with kernel("native"):
                    faithful = self.run([specs[i] for i in redo], policy, bounds)
                for i, v in zip(redo, faithful):
                    verdicts[i], alone[i] = v, len(redo) == 1
        results = []
        for i, (spec, v) in enumerate(zip(specs, verdicts)):
            sig = self.signature(v)
            if sig is not None and sig not in known and not alone[i]:
                with kernel("native"):
                    v = self.run([spec], policy, bounds)[0]
                sig = self.signature(v)
            results.append(Screened(v, sig, sig is not None and sig not in known))
        return results

    def signature(self, verdict: Verdict) -> Optional[Signature]:
        """The verdict's crash bucket on this model (None when finite)."""
        return verdict.signature(self.model.fingerprint)
