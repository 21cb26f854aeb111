"""The commands a report prints: the `fuzz run` that repeats the run, the `fuzz check` that
reproduces one finding, the `fuzz replay` of the corpus.

Built from what the summary recorded, so that every option that changed the run (the seed above
all, which a run draws at random when none is given) is in them.
"""
from __future__ import annotations

import re
import shlex

from fuzz.report.describe import shell_quote
from fuzz.search.accounting import RunSummary
from fuzz.verdict import Verdict

# `fuzz run`'s flag for each bound a summary records (fuzz.generate.Bounds.to_dict()).
BOUND_FLAGS = {"max_new_tokens": "--max-new-tokens", "max_prompt_tokens": "--max-prompt-tokens"}
# RunSummary.device is the device the run resolved ("auto" is not recorded); anything else (a
# hand-written description) is no --device value.
DEVICE_VALUE = re.compile(r"cpu|cuda(:\d+)?")


def _engine_args(summary: RunSummary) -> list[str]:
    """--engine and --device as the run had them: near the limit the verdict depends on the
    kernels, so a reproduction runs where the run ran."""
    parts = []
    if summary.engine != "builtin":
        parts += ["--engine", shlex.quote(summary.engine)]
    if DEVICE_VALUE.fullmatch(summary.device):
        parts += ["--device", summary.device]
    return parts


def _prompt_command(verb: str, summary: RunSummary, verdict: Verdict) -> list[str]:
    """`python -m fuzz VERB` on the finding's model, policy, prompt and BOS mode."""
    parts = ["python", "-m", "fuzz", verb, "--model", shlex.quote(summary.model),
             "--policy", shlex.quote(verdict.policy), "--prompt", shell_quote(verdict.prompt)]
    return parts + ([] if verdict.add_bos else ["--no-bos"])


def check_command(summary: RunSummary, verdict: Verdict) -> str:
    parts = _prompt_command("check", summary, verdict)
    if "max_new_tokens" in summary.bounds:
        parts += ["--max-new-tokens", str(summary.bounds["max_new_tokens"])]
    return " ".join(parts + _engine_args(summary) + ["--json"])


def add_command(summary: RunSummary, verdict: Verdict) -> str:
    """The `fuzz add` that measures a finding's kernel variations under the run's bounds, engine
    and device, and saves it when it holds (what a run does for a finding its budget left no
    time to measure)."""
    parts = _prompt_command("add", summary, verdict)
    for key, flag in BOUND_FLAGS.items():
        if key in summary.bounds:
            parts += [flag, str(summary.bounds[key])]
    return " ".join(parts + _engine_args(summary) + ["--corpus", shlex.quote(summary.corpus_dir)])


def duration_arg(seconds: float) -> str:
    """A --budget value that fuzz.cli.parse_duration reads back as the same seconds."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def run_command(summary: RunSummary) -> str:
    """The `fuzz run` that repeats this run, built from what the summary recorded: never the
    command line as typed (RunSummary.command), which lacks a seed drawn at random and leaves
    "all" policies and defaults to whatever a later version means by them."""
    policies = ",".join(p.policy for p in summary.policies)  # in run order: unsafe first
    parts = ["python", "-m", "fuzz", "run", "--model", shlex.quote(summary.model),
             "--policies", shlex.quote(policies), "--budget", duration_arg(summary.budget_s),
             "--seed", str(summary.seed), "--corpus", shlex.quote(summary.corpus_dir)]
    for key, flag in BOUND_FLAGS.items():
        if key in summary.bounds:
            parts += [flag, str(summary.bounds[key])]
    if summary.batch_size is not None:
        parts += ["--batch-size", str(summary.batch_size)]
    if summary.round_examples is not None:
        parts += ["--round-examples", str(summary.round_examples)]
    if {m for p in summary.policies for m in p.bos_modes} == {False}:
        parts.append("--no-bos")
    if summary.long:  # the long-prompt strategy: the bounds alone would not bring it back
        parts.append("--long")
    return " ".join(parts + _engine_args(summary))


def replay_command(summary: RunSummary) -> str:
    return (f"python -m fuzz replay --corpus {shlex.quote(summary.corpus_dir)} "
            f"--model {shlex.quote(summary.model)}")
