"""`fuzz advise` as a command (fuzz.cli wires the arguments): checks the input, measures, prints
the text report, writes the files; with --plan, first the plan (fuzz.advise.plan), measured
beside the whole-model policies. Exit 0 with a recommendation (and, with --plan, a plan or no
need for one), 1 without, 2 on bad input (a ValueError whose message names the option and the
fix; fuzz.cli prints it)."""
from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from fuzz.advise.inputs import runnable_prompts
from fuzz.advise.measure import advise
from fuzz.advise.plan import (
    DEFAULT_MIN_HEADROOM,
    Plan,
    corpus_checks,
    file_checks,
    find_plan,
    plan_text,
    prompt_checks,
    write_plan,
)
from fuzz.advise.report import render_json, render_text, write
from fuzz.advise.text import read_text_file, text_set
from fuzz.corpus import Corpus
from fuzz.precision import POLICIES
from fuzz.session import Session

DEFAULT_CORPUS = "corpus"
NO_CORPUS = "none"


def resolve_corpus(arg: Optional[str]) -> tuple[Optional[Corpus], str]:
    """(the corpus, how the output names it). Unset: ./corpus when that directory exists (what
    `fuzz run` saves to), else none; "none": none on purpose; a path: that directory."""
    if arg is None:
        if Path(DEFAULT_CORPUS).is_dir():
            return Corpus(Path(DEFAULT_CORPUS)), f"{DEFAULT_CORPUS} (the default; --corpus none " \
                                                 "leaves it out)"
        return None, f"none (no ./{DEFAULT_CORPUS} directory here)"
    if arg == NO_CORPUS:
        return None, "none (--corpus none)"
    if not Path(arg).is_dir():
        raise ValueError(f"--corpus {arg}: no such directory; give the corpus directory (e.g. "
                         f"{DEFAULT_CORPUS}), or --corpus {NO_CORPUS} to run without one")
    return Corpus(Path(arg)), arg


def check_args(args: Any) -> None:
    """The numbers, before the model loads (a typo costs no model load)."""
    for option, value, least in (("--sample", args.sample, 1), ("--batch-size", args.batch_size, 1),
                                 ("--text-chunks", args.text_chunks, 2),
                                 ("--text-tokens", args.text_tokens, 2)):
        if value < least:
            raise ValueError(f"{option} {value}: give at least {least}")
    if not args.max_kld > 0:
        raise ValueError(f"--max-kld {args.max_kld}: give a positive number of nats (default "
                         "0.01)")
    if args.text is not None:
        read_text_file(args.text)  # a missing or non-UTF-8 file is named now
    if not args.plan:
        given = [option for option, value in (("--plan-out", args.plan_out),
                                              ("--prompts", args.prompts),
                                              ("--min-headroom", args.min_headroom))
                 if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to --plan only; add --plan or drop them")
        return
    if args.min_headroom is not None and not args.min_headroom >= 1:
        raise ValueError(f"--min-headroom {args.min_headroom}: give a ratio of at least 1 "
                         f"(limit / max |x|; default {DEFAULT_MIN_HEADROOM})")
    if args.plan_out is not None and Path(args.plan_out).exists():
        raise ValueError(f"--plan-out {args.plan_out}: the file exists; remove it or give "
                         "another path (a plan file is never overwritten)")


def main(args: Any, options: Any, bounds: Any) -> int:
    check_args(args)
    corpus, corpus_label = resolve_corpus(args.corpus)
    session = Session.open(options, bounds, args.batch_size)
    limit = getattr(session.model.config, "max_position_embeddings", None)
    if limit is not None and args.text_tokens > limit:
        raise ValueError(f"--text-tokens {args.text_tokens}: over {session.model.name}'s "
                         f"{limit} positions; give at most {limit}")
    text = text_set(session.model.tokenizer, args.text_chunks, args.text_tokens, args.text)
    # --json: stdout holds the JSON document only; everything else goes to stderr
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    policies = list(POLICIES.values())
    plan = None
    if args.plan:
        plan = _plan(args, session, corpus, say)
        if plan.policy is not None:
            policies.append(plan.policy)  # measured beside the whole-model policies
    result = advise(session, corpus, sample=args.sample, seed=args.seed, budget_s=args.budget,
                    max_kld=args.max_kld, text=text, corpus_label=corpus_label,
                    policies=policies, progress=_progress)
    result.command = command_line(args, session.bounds)
    result.plan = plan.to_dict() if plan is not None else None
    print(render_json(result) if args.json else render_text(result), end="")
    if args.report:
        for path in write(result, args.report):
            say(f"wrote {path}")
    planned = plan is None or plan.layers is not None
    return 0 if result.recommended and planned else 1


def _progress(line: str) -> None:
    print(f"advise: {line}", file=sys.stderr, flush=True)


def _plan(args: Any, session: Session, corpus: Optional[Corpus],
          say: Callable[[str], None]) -> Plan:
    """--plan: the checks (corpus cases, the sampled prompts advise measures, --prompts files),
    the plan and its file (none when no plan exists or none is needed)."""
    checks = (corpus_checks(session, corpus)
              + prompt_checks(session, runnable_prompts(session, args.sample, args.seed),
                              f"seed {args.seed}")
              + file_checks(session, args.prompts or []))
    plan = find_plan(session, checks, args.min_headroom or DEFAULT_MIN_HEADROOM, _progress)
    plan.command = command_line(args, session.bounds)
    say(plan_text(plan).rstrip("\n"))
    if plan.policy is not None:
        out = args.plan_out or f"plan-{session.model.name}.json"
        say(f"wrote {write_plan(plan, out)} (use it as --policy plan:{out})")
    return plan


def command_line(args: Any, bounds: Any) -> str:
    """The command that repeats this measurement (every option that changes it, spelled out)."""
    parts = ["python", "-m", "fuzz", "advise", "--model", args.model or "gemma3-270m",
             "--sample", str(args.sample), "--seed", str(args.seed),
             "--batch-size", str(args.batch_size), "--max-new-tokens", str(bounds.max_new_tokens),
             "--max-prompt-tokens", str(bounds.max_prompt_tokens),
             "--text-chunks", str(args.text_chunks), "--text-tokens", str(args.text_tokens),
             "--max-kld", f"{args.max_kld:g}"]
    if args.corpus:
        parts += ["--corpus", args.corpus]
    if args.text:
        parts += ["--text", args.text]
    if args.budget is not None:
        parts += ["--budget", f"{args.budget:g}s"]
    if args.device != "auto":
        parts += ["--device", args.device]
    if args.plan:
        parts += ["--plan", *(["--prompts", *args.prompts] if args.prompts else []),
                  *(["--min-headroom", f"{args.min_headroom:g}"] if args.min_headroom else [])]
    return " ".join(shlex.quote(part) for part in parts)
