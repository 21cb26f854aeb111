"""`python -m fuzz …` (also `gemma-fuzz`): find the prompts that make Gemma produce NaN/Inf.

Commands: run (the fuzz job), check (one prompt), screen (your own prompt files), sweep (every
vocabulary token after one prefix), add (save a prompt as a case), minimize (finish cases whose
minimizing was cut), replay (the corpus as regression tests), compare (engines side by side),
advise (which policy to ship). Contracts: docs/DESIGN.md.

Exit codes:
  run      0 ran to its budget, 1 a policy declared safe went non-finite (or, with
           --fail-on-new, a new case was saved), 130 interrupted
  check    0 finite, 1 non-finite, 3 inconclusive (the time limit stopped the run)
  screen   0 every policy declared safe stayed finite, 1 one did not (--fail-on-nonfinite: any)
  sweep    0 no token went non-finite under a policy declared safe, 1 one did
           (--fail-on-nonfinite: under any policy)
  add      0 saved (or already covered), 1 refused (finite, inconclusive, or marginal)
  minimize 0 done (or the budget ended), 1 a case no longer fails or its model is not the case's
  replay   0 every check passed, 1 a regression or a case that no longer reproduces
  compare  0 every engine agrees, 1 one diverges
  advise   0 with a recommendation, 1 without one
  every command: 2 on bad input or another error, with a message that names it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from fuzz.advise.rule import DEFAULT_MAX_KLD
from fuzz.advise.text import DEFAULT_CHUNKS as ADVISE_CHUNKS
from fuzz.advise.text import DEFAULT_TOKENS as ADVISE_TOKENS
from fuzz.corpus import Case, Corpus
from fuzz.engine.kernels import KERNELS
from fuzz.engine.loaded import ENGINES
from fuzz.long import LONG_BATCH_SIZE, LONG_MAX_NEW_TOKENS, profile_bounds
from fuzz.precision import POLICIES
from fuzz.report.describe import plural
from fuzz.session import DEFAULT_BATCH_SIZE, ModelOptions, Session
from fuzz.strategies.long import LONG_MAX_PROMPT_TOKENS
from fuzz.verdict import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_PROMPT_TOKENS,
    Bounds,
    PromptSpec,
    json_safe,
)

DEFAULT_CORPUS = "corpus"
# Examples per round of one mode. Hypothesis runs one hill-climbing pass on target() after half
# of max_examples (at least 10) when max_examples < 1000 (its engine's _next_optimise_at): 40 gives
# every round 20 drawn examples and a climb from the best of them, then hands back to the
# schedule, so modes take turns within their shares (fuzz.search.schedule).
ROUND_EXAMPLES = 40
DEFAULT_MODEL = "gemma3-270m"
EXIT = {"finite": 0, "nonfinite": 1, "error": 2, "inconclusive": 3}


class InputError(ValueError):
    """Bad command-line input: the message names it and the fix (exit 2)."""


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1h30m' -> seconds."""
    number = r"(\d+(?:\.\d+)?)"
    parts = re.fullmatch(rf"\s*(?:{number}h)?\s*(?:{number}m)?\s*(?:{number}s?)?\s*", text)
    if not text.strip() or parts is None or not any(parts.groups()):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}; write e.g. 90s, 10m, 1h or 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + s


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help=f"zoo name ({DEFAULT_MODEL} by default, tiny, tiny-digit-run-N, ...), a "
                        ".gguf file, or a gemma_pytorch checkpoint (.ckpt/.pt or directory) with "
                        "--variant/--config and --tokenizer")
    g.add_argument("--variant", help="upstream variant of a checkpoint (2b, 7b, 2b-v2, 9b, 27b, "
                                     "1b, 4b, 12b, 27b_v3, 270m)")
    g.add_argument("--config", help="GemmaConfig JSON (upstream field names) of a checkpoint")
    g.add_argument("--tokenizer", help="SentencePiece .model of a checkpoint")
    g.add_argument("--engine", default="builtin", choices=("builtin", "upstream", "transformers"),
                   help="who computes: the built-in engine, installed google/gemma_pytorch, or "
                        "transformers' own model classes (every policy on Gemma 1/2/3)")
    g.add_argument("--attention", choices=("eager", "sdpa"), default=None,
                   help="transformers' attn_implementation for --engine transformers (default: "
                        "transformers' own choice, sdpa where the model class has it)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")


def _bounds_args(p: argparse.ArgumentParser, bos: bool = True) -> None:
    # Default None: whether the user gave a bound must not be guessed by comparing with a
    # default (an explicit value equal to it must win over a profile's: fuzz.long).
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"decode steps after the prompt (default {DEFAULT_MAX_NEW_TOKENS}; "
                        f"{LONG_MAX_NEW_TOKENS} with --long where there is one)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help=f"the longest prompt in tokens, BOS included (default "
                        f"{DEFAULT_MAX_PROMPT_TOKENS}; {LONG_MAX_PROMPT_TOKENS} with --long)")
    if bos:
        p.add_argument("--no-bos", action="store_true", help="feed the prompt without BOS")


def _prompt_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--prompt", help="the prompt; '-' reads it from standard input")
    g.add_argument("--prompt-file", help="read the prompt from this file (UTF-8, taken exactly: "
                                         "a trailing newline is part of the prompt; NUL bytes "
                                         "are fine)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat template")


def _save_args(p: argparse.ArgumentParser, what: str) -> None:
    """screen's and sweep's --save, --save-time and --corpus (checked by _save_time)."""
    p.add_argument("--save", action="store_true",
                   help=f"save {what} to --corpus, minimized and measured under every kernel "
                        "variation, as `run` saves findings")
    p.add_argument("--save-time", type=parse_duration, default=None,
                   help="with --save: how long one finding's minimizing may take (default 2m)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help="the corpus whose signatures are known (and --save's target)")


def _save_time(args: argparse.Namespace) -> None:
    """--save-time only with --save; its default otherwise."""
    from fuzz.screen.command import SAVE_TIME_S

    if args.save_time is not None and not args.save:
        raise InputError("--save-time applies to --save: add --save or drop --save-time")
    if args.save_time is None:
        args.save_time = SAVE_TIME_S


def _margin_arg(p: argparse.ArgumentParser) -> None:
    from fuzz.margin import MIN_MARGIN

    p.add_argument("--min-margin", type=float, default=MIN_MARGIN,
                   help=f"the least unrounded-sum / limit ratio a finding needs to become a "
                        f"regression case (default {MIN_MARGIN}: derived in docs/NUMERICS.md)")


def _options(args: argparse.Namespace, model: Optional[str] = None) -> ModelOptions:
    from fuzz.engine.transformers.engine import engine_kind

    kind = engine_kind(args.engine, getattr(args, "attention", None))
    return ModelOptions(model or args.model or DEFAULT_MODEL, args.variant, args.config,
                        args.tokenizer, kind, args.device)


def bounds_from_args(args: argparse.Namespace) -> Bounds:
    """The bounds the options give, the profile's defaults (fuzz.long) for the rest."""
    return profile_bounds(bool(getattr(args, "long", False)), args.max_new_tokens,
                          args.max_prompt_tokens)


def refuse_options(args: argparse.Namespace, given_with: str, options: dict[str, str],
                   why: str) -> None:
    """An option that cannot apply is an error, not silently ignored: InputError naming every
    such option given (dest -> how the user spells it) and why it cannot apply."""
    given = [flag for dest, flag in options.items() if getattr(args, dest, None) not in
             (None, False)]
    if given:
        raise InputError(f"{', '.join(given)} cannot be used with {given_with}: {why}; drop "
                         f"{'it' if len(given) == 1 else 'them'}")


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt of --prompt TEXT, --prompt - (standard input) or --prompt-file FILE, exactly."""
    if args.prompt_file is not None:
        try:
            data = Path(args.prompt_file).read_bytes()
        except OSError as err:
            raise InputError(f"--prompt-file {args.prompt_file}: cannot be read "
                             f"({err.strerror}); give the path of a UTF-8 text file") from None
        return _decode(data, f"--prompt-file {args.prompt_file}")
    if args.prompt == "-":
        return _decode(sys.stdin.buffer.read(), "--prompt - (standard input)")
    return args.prompt


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: not UTF-8 text (byte {data[err.start]:#04x} at offset "
                         f"{err.start}); save the prompt as UTF-8") from None


# --- check -------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    from fuzz.margin import measure
    from fuzz.precision import get_policy
    from fuzz.report.table import format_verdict

    session = Session.open(_options(args), bounds_from_args(args))
    spec = PromptSpec(read_prompt(args), add_bos=not args.no_bos, chat=args.chat)
    verdict = session.check(spec, args.policy)
    margin = None
    if verdict.nonfinite:  # the float32 magnitude of the failing site: one float32 forward
        f32 = session.engine(get_policy("float32"))  # the session's engine: the finding's
        margin = measure(verdict, f32)
    if args.json:
        doc = {"model": session.model.name, "status": verdict.status, **verdict.to_dict(),
               "margin": margin.to_dict() if margin else None}
        print(json.dumps(json_safe(doc), ensure_ascii=False, allow_nan=False))
    else:
        print(format_verdict(verdict, margin))
    if args.plot:
        from fuzz.positions import session_position_map
        from fuzz.report import plot_verdict
        from fuzz.report.heatmap import heatmap_path, write_heatmap

        plot_verdict(verdict, args.plot)
        # the layers x positions heat map: one more run of the prompt, with per-position maxima
        heat = write_heatmap(session_position_map(session, spec, verdict), heatmap_path(args.plot))
        print(f"plot written to {args.plot}, heat map to {heat}",
              file=sys.stderr if args.json else sys.stdout)
    return EXIT[verdict.status]


# --- add ---------------------------------------------------------------------------------------
def cmd_add(args: argparse.Namespace) -> int:
    from fuzz.shrink.robustness import assess

    if args.from_case:
        # The case says what to run: its prompt, policy, BOS mode, chat flag and bounds.
        refuse_options(args, "--from-case", {
            "policy": "--policy", "prompt": "--prompt", "prompt_file": "--prompt-file",
            "no_bos": "--no-bos", "chat": "--chat", "max_new_tokens": "--max-new-tokens",
            "max_prompt_tokens": "--max-prompt-tokens"},
            "the case file gives the prompt, policy, BOS mode, chat flag and bounds")
        old = read_old_case(Path(args.from_case))
        # A file model's case names it by its recorded path; a zoo case by its name.
        model = args.model or old.get("model_location") or old["model"]
        policy, add_bos, chat = old["policy"], old["add_bos"], old["chat"]
        text, bounds = old["prompt"], case_file_bounds(old, Path(args.from_case))
    else:
        if args.policy is None:
            raise InputError("add needs --policy P (or --from-case FILE)")
        if args.prompt is None and args.prompt_file is None:
            raise InputError("add needs --prompt TEXT, --prompt -, --prompt-file FILE or "
                             "--from-case FILE")
        policy, model, add_bos, chat = args.policy, None, not args.no_bos, args.chat
        text, bounds = read_prompt(args), bounds_from_args(args)
    session = Session.open(_options(args, model), bounds)
    session.min_margin = args.min_margin
    assessment = assess(session, PromptSpec(text, add_bos=add_bos, chat=chat), policy)
    verdict = assessment.verdict
    if not verdict.nonfinite:
        print(f"refused: the prompt is {verdict.status} under {policy} on {session.model.name} "
              f"({verdict.steps} steps, min headroom {verdict.min_headroom():.3g}); nothing "
              "saved. Only prompts that produce NaN/Inf become corpus cases.", file=sys.stderr)
        return 1
    if not assessment.robust and not args.allow_marginal:
        print(f"refused: the failure is marginal ({assessment.robustness.reason}): it would not "
              "reproduce on every machine, so it is no regression case; nothing saved. "
              "--allow-marginal saves it anyway, flagged.", file=sys.stderr)
        return 1
    case = Case.of_assessment(session, assessment, strategy="manual")
    result = Corpus(Path(args.corpus)).save(case, force=args.force)
    first = verdict.first_nonfinite
    print(f"{result.status}: {result.path}  ({policy}: {first.kind} at step {first.step}, "
          f"layer {first.layer}, {first.site}, position {first.position}; "
          f"{assessment.margin.describe() if assessment.margin else 'no margin'})")
    if result.status == "known-signature":
        print("  this signature is already covered by: "
              + ", ".join(str(p) for p in result.existing) + " (use --force to add it anyway)")
    return 0


def case_file_bounds(doc: dict[str, Any], path: Path) -> Bounds:
    """The bounds a case file recorded (a case saved by `run --long` or by pytest's 8 steps
    replays with its own); the defaults for a file that recorded none (schema 1)."""
    recorded = doc.get("bounds") or {}
    try:
        return profile_bounds(False, recorded.get("max_new_tokens"),
                              recorded.get("max_prompt_tokens"))
    except (TypeError, ValueError) as err:
        raise InputError(f"{path}: its bounds {recorded!r} are not usable ({err})") from None


def read_old_case(path: Path) -> dict[str, Any]:
    """What `add --from-case` needs of a case file of any schema (1 included)."""
    try:
        doc = json.loads(_decode(path.read_bytes(), str(path)))
    except ValueError as err:
        raise InputError(f"{path}: not a JSON case file ({err})") from None
    missing = [k for k in ("prompt", "policy", "add_bos", "model") if k not in doc]
    if not isinstance(doc, dict) or missing:
        raise InputError(f"{path}: not a corpus case (lacks {', '.join(missing) or 'an object'})")
    return {**doc, "chat": bool(doc.get("chat", False))}


# --- compare -----------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    from fuzz.compare import compare_main

    if args.corpus is not None:  # every case runs with its own BOS mode, chat flag and bounds
        refuse_options(args, "--corpus", {
            "no_bos": "--no-bos", "chat": "--chat", "max_new_tokens": "--max-new-tokens",
            "max_prompt_tokens": "--max-prompt-tokens"},
            "every case runs with its own BOS mode, chat flag and bounds")
    given = args.prompt is not None or args.prompt_file is not None
    prompt = (PromptSpec(read_prompt(args), add_bos=not args.no_bos, chat=args.chat)
              if given else None)
    options = ModelOptions(args.model or DEFAULT_MODEL, args.variant, args.config,
                           args.tokenizer, device=args.device)
    return compare_main(options, args.engines, args.policy, prompt=prompt, corpus=args.corpus,
                        bounds=bounds_from_args(args))


# --- replay ------------------------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace) -> int:
    from fuzz.corpus.replay import replay_corpus, root_cause_lines

    model = ModelOptions(variant=args.variant, config=args.config, tokenizer=args.tokenizer)
    rows = replay_corpus(Corpus(Path(args.corpus)), model_filter=args.model,
                         device=args.device, engine=args.engine, strict_site=args.strict_site,
                         model=model)
    print(f"{'case':<54} {'policy':<22} {'expected':<12} {'got':<60} ok")
    for row in rows:
        print(f"{row.label:<54.54} {row.policy:<22} {row.expected:<12} {row.got:<60.60} "
              f"{'yes' if row.ok else 'NO'}")
    regressions = sum(r.regression for r in rows)
    stale = sum(r.stale for r in rows)
    moved = sum(r.moved for r in rows)
    errors = [r for r in rows if r.error]
    for row in errors:  # in full: the table cuts the fingerprints and the path
        print(f"error: {row.got}", file=sys.stderr)
    counts, causes = root_cause_lines(rows)  # the recorded cases by mechanism (fuzz.rootcause)
    if causes:
        print("\nroot causes (recorded):", *(f"  {line}" for line in causes), sep="\n")
    print(f"\n{len(rows)} checks: {regressions} regressions (a safe policy went non-finite), "
          f"{stale} cases no longer reproduce, {moved} first sites moved"
          + (" (a failure: --strict-site)" if args.strict_site and moved else "")
          + (f", {len(errors)} not run (not the case's model)" if errors else "")
          + f"; {counts}")
    return 1 if regressions or stale or errors else 0


# --- minimize ----------------------------------------------------------------------------------
def cmd_minimize(args: argparse.Namespace) -> int:
    from fuzz.corpus.replay import is_model_path
    from fuzz.corpus.resume import resume_all

    corpus = Corpus(Path(args.corpus))
    if not corpus.root.is_dir():
        raise InputError(f"--corpus {args.corpus}: no such directory; give the directory holding "
                         "<model>/<case-id>.json files")
    override, model = None, args.model
    if is_model_path(args.model):  # a file model's cases, on the file given
        override = ModelOptions(args.model, args.variant, args.config, args.tokenizer)
        model = Session.open(dataclasses.replace(override, device=args.device)).model.name
    rows = resume_all(corpus, args.budget, model, unrecorded=args.all, device=args.device,
                      override=override)
    for row in rows:
        print(f"{row.label:<22} {row.status:<16} {row.before:>28} -> {row.after:<28} "
              f"{row.detail}")
    counts = {status: sum(r.status == status for r in rows) for status in
              ("finished", "progressed", "unchanged", "left", "skipped", "no-longer-fails",
               "error")}
    if rows:
        print(f"\n{plural(len(rows), 'case')} to minimize: "
              + ", ".join(f"{n} {status}" for status, n in counts.items() if n))
    else:
        print("no case to minimize: every case is 1-minimal"
              + ("" if args.all else " or records nothing (--all minimizes those too)"))
    return 1 if any(r.failed for r in rows) else 0


# --- run ---------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from fuzz.run import FuzzJob

    job = FuzzJob.from_args(args, _options(args), bounds_from_args(args))
    return job.main()


# --- sweep -------------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    from fuzz.sweep.command import sweep_main

    _save_time(args)
    return sweep_main(args, _options(args))


# --- screen ------------------------------------------------------------------------------------
def cmd_screen(args: argparse.Namespace) -> int:
    from fuzz.screen.command import screen_main

    if args.no_bos and args.both_bos:
        raise InputError("--no-bos and --both-bos contradict each other: give one")
    _save_time(args)
    # a prompt file's InputError (fuzz.prompts.files) is a ValueError too: exit 2, file:line
    return screen_main(args, _options(args), bounds_from_args(args))


# --- advise ------------------------------------------------------------------------------------
def cmd_advise(args: argparse.Namespace) -> int:
    from fuzz.advise.command import main as advise_main

    return advise_main(args, _options(args), bounds_from_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="run one prompt under one policy and locate NaN/Inf")
    _model_args(p)
    _bounds_args(p)
    p.add_argument("--policy", required=True, help=f"one of: {', '.join(POLICIES)}")
    _prompt_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", help="also write a per-layer max |x| plot (PNG) here, and a "
                                  "layers x positions heat map beside it (FILE.positions.png)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("add", help="add a crashing prompt to the corpus by hand")
    _model_args(p)
    _bounds_args(p)
    p.add_argument("--policy", help=f"one of: {', '.join(POLICIES)}")
    _prompt_args(p, required=False)
    p.add_argument("--from-case", help="re-measure this case file's prompt under its policy, BOS "
                                       "mode, chat flag and bounds (any schema: how older cases "
                                       "are upgraded); --model may name where the model is now")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--force", action="store_true", help="save even if the signature is known")
    p.add_argument("--allow-marginal", action="store_true",
                   help="save a failure that does not hold under every kernel variation")
    _margin_arg(p)
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("replay", help="replay every corpus case and print a table")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--model", help="only cases of this model: its name, or the path of a file or "
                                   "directory model to replay its cases on (instead of the "
                                   "path they recorded)")
    p.add_argument("--variant", help="upstream variant of a gemma_pytorch --model checkpoint")
    p.add_argument("--config", help="GemmaConfig JSON of a gemma_pytorch --model checkpoint")
    p.add_argument("--tokenizer", help="SentencePiece .model of a gemma_pytorch --model checkpoint")
    p.add_argument("--engine", default="builtin", choices=ENGINES,
                   help="transformers-eager / transformers-sdpa name the attention")
    p.add_argument("--device", default="auto")
    p.add_argument("--strict-site", action="store_true",
                   help="also fail when a case still fails but its first site moved")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "minimize", help="finish minimizing the cases whose minimizing was stopped",
        description="Resumes the cases whose minimizing was stopped (or never ran) until each "
                    "is 1-minimal (no single-character deletion keeps its failure) or the "
                    "budget ends, under the rules a run uses: signature and margin kept, the "
                    "result checked under every kernel variation, the case's own bounds; a case "
                    "file is replaced only by a prompt that holds everywhere. Exit 0 done (or "
                    "the budget ended), 1 a case no longer fails or its model is not the case's,"
                    " 2 bad input.")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--model", help="only cases of this model: its name, or the path of a file or "
                                   "directory model to run its cases on")
    p.add_argument("--variant", help="upstream variant of a gemma_pytorch --model checkpoint")
    p.add_argument("--config", help="GemmaConfig JSON of a gemma_pytorch --model checkpoint")
    p.add_argument("--tokenizer", help="SentencePiece .model of a gemma_pytorch --model checkpoint")
    p.add_argument("--budget", type=parse_duration, default=parse_duration("10m"),
                   help="how long to minimize in all, e.g. 90s, 10m (default 10m)")
    p.add_argument("--all", action="store_true",
                   help="also cases that record nothing about minimizing (written before the "
                        "record existed, or added by hand with `add`)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_minimize)

    p = sub.add_parser("compare", help="the same prompts through several engines, side by side")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=f"model SPEC ({DEFAULT_MODEL} by default)")
    g.add_argument("--variant", help="upstream variant of a gemma_pytorch checkpoint")
    g.add_argument("--config", help="GemmaConfig JSON of a gemma_pytorch checkpoint")
    g.add_argument("--tokenizer", help="SentencePiece .model of a checkpoint")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--engines", default="builtin,upstream,transformers",
                   help=f"comma-separated, the first is the reference ({', '.join(ENGINES)})")
    p.add_argument("--policy", default="float16", help=f"one of: {', '.join(POLICIES)}")
    _bounds_args(p)
    _prompt_args(p, required=False)
    p.add_argument("--corpus", help="compare every case of the model in this corpus directory")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "run", help="the fuzz job: search until the budget ends",
        description="The fuzz job: every policy in every BOS mode gets a share of the budget "
                    "(unsafe policies 3x); Hypothesis draws prompts, steered toward content "
                    "headroom and unknown signatures; each new kernel-robust signature is shrunk, "
                    "minimized and saved to the corpus; a summary and a report at the end. Exit 0 "
                    "ran to its budget, 1 a policy declared safe went non-finite (or --fail-on-new "
                    "and a case was saved), 130 interrupted, 2 bad input.")
    _model_args(p)
    _bounds_args(p)
    p.add_argument("--policies", default="all",
                   help=f"comma-separated, or 'all' (the default): {', '.join(POLICIES)}")
    p.add_argument("--budget", type=parse_duration, default=parse_duration("8m"),
                   help="how long to search, e.g. 90s, 10m, 2h (default 8m; the job ends at most "
                        "60 s past it, report written)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help="where cases are read (known signatures are not searched again) and new "
                        "ones saved, as <corpus>/<model>/<case-id>.json (default "
                        f"{DEFAULT_CORPUS})")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the rounds' draws: the same seed, code and example database "
                        "draw the same prompts (default: from the clock; the report states it)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"prompts screened together: one Hypothesis example (default "
                        f"{DEFAULT_BATCH_SIZE}; {LONG_BATCH_SIZE} with --long)")
    p.add_argument("--report", help="write the report here (.md, .html and .json side by side)")
    p.add_argument("--database", default=".hypothesis/fuzz-db",
                   help="Hypothesis example database: a directory, or redis://HOST:PORT/N to "
                        "share one between machines (pip install 'gemma-fuzz[redis]'); '' for "
                        "none")
    p.add_argument("--round-examples", type=int, default=ROUND_EXAMPLES,
                   help="examples per Hypothesis round before switching policy/BOS mode (default "
                        f"{ROUND_EXAMPLES})")
    p.add_argument("--fail-on-new", action="store_true",
                   help="exit 1 when a new case was saved (findings are otherwise results)")
    _margin_arg(p)
    p.add_argument("--seed-prompts", nargs="+", metavar="FILE",
                   help="prompt files (as `screen` reads them) that every mode screens first "
                        "and keeps editing; a finding says which seed it grew from. Default: "
                        "every .jsonl of <corpus>/seeds/ (the prompts that broke Gemma in public); "
                        "'none' for no seeds")
    p.add_argument("--extend", action=argparse.BooleanOptionalAction, default=False,
                   help="after each round, run a slice of the vocabulary as the next token of "
                        "the mode's nearest miss, one decode step each (fuzz.search.extensions; "
                        "built-in engine only)")
    p.add_argument("--gradient", action=argparse.BooleanOptionalAction, default=False,
                   help="add gradient-guided token swaps of the nearest misses to each round "
                        "(fuzz.search.proposals; built-in engine only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--long", action="store_true",
                   help="long generations: prompts of 513-1024 tokens (past Gemma 3's sliding "
                        "window), 128 decode steps, batch size 2 (fuzz.long; --max-new-tokens, "
                        "--max-prompt-tokens and --batch-size, when given, win)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "screen", help="screen your own prompt files under every policy",
        description="Every prompt of the files (text: one per line or --separator; JSONL: a "
                    "'prompt' field or chat 'messages'; CSV/TSV: a 'prompt' column; Parquet), "
                    "under every policy and BOS mode (a chat with the BOS its template gives), "
                    "batched; one JSON line per (prompt, policy, BOS mode) in --out, written as "
                    "it goes and resumable with the same command; a summary per policy. Exit 0 "
                    "every policy declared safe stayed finite, 1 one did not (--fail-on-"
                    "nonfinite: any policy), 2 bad input (file:line named, nothing written).")
    _model_args(p)
    _bounds_args(p)
    p.add_argument("--prompts", nargs="+", required=True, metavar="FILE",
                   help="prompt files: .txt (or any other: text), .jsonl, .csv, .tsv, .parquet")
    p.add_argument("--field", help="the prompt's JSONL field or CSV/TSV/Parquet column "
                                   "(default: prompt)")
    p.add_argument("--separator", help="text files: the string between prompts (default: one "
                                       "prompt per line)")
    p.add_argument("--policies", default="all",
                   help=f"comma-separated, or 'all' (the default): {', '.join(POLICIES)}")
    p.add_argument("--both-bos", action="store_true", help="plain prompts with and without BOS")
    p.add_argument("--out", help="the results file (JSONL): written as it goes; the same command "
                                 "again resumes it")
    p.add_argument("--shard", help="K/N (1 <= K <= N): one shard per machine, each with the same "
                                   "--batch-size; this one screens the batches (of the prompts "
                                   "sorted by length) whose number is K-1 modulo N; their --out "
                                   "files concatenated are the whole run's, batch for batch")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"prompts screened together (default {DEFAULT_BATCH_SIZE})")
    _save_args(p, "each new signature's shortest prompt")
    p.add_argument("--report", help="also write PATH.md, PATH.html and PATH.json")
    p.add_argument("--fail-on-nonfinite", action="store_true",
                   help="exit 1 when any policy went non-finite (not only one declared safe)")
    _margin_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser(
        "sweep", help="every vocabulary token as the next token after one prefix",
        description="Every vocabulary token (or --tokens START:END) as the next token after the "
                    "prefix (default: empty, no BOS: every possible first token), the prefix run "
                    "once, the tokens in batches of --batch-size, one decode step each without "
                    "the LM head (built-in engine); per token the least headroom (overall, per "
                    "layer, where) and the first non-finite value. One JSON line per token in "
                    "--out, written as it goes and resumable with the same command; --shard K/N "
                    "as screen's. On a CPU, float16 screens with float32-accumulated products "
                    "and re-runs non-finite tokens and near misses natively. Exit 0 no token "
                    "went non-finite under a policy declared safe, 1 one did (--fail-on-"
                    "nonfinite: any policy), 2 bad input.")
    _model_args(p)
    p.add_argument("--policy", default="float16",
                   help=f"one policy (default float16): {', '.join(POLICIES)}, or plan:FILE.json")
    after = p.add_mutually_exclusive_group()
    after.add_argument("--after", metavar="TEXT", help="the prefix as text (encoded without BOS)")
    after.add_argument("--after-ids", metavar="IDS",
                       help="the prefix as token ids, comma-separated (e.g. a nearest miss's)")
    p.add_argument("--bos", action="store_true", help="BOS first, before the prefix")
    p.add_argument("--tokens", metavar="START:END",
                   help="only these token ids (END exclusive; default: the whole vocabulary)")
    p.add_argument("--out", help="the results file (JSONL): one line per token, written as it "
                                 "goes; the same command again resumes it")
    p.add_argument("--shard", help="K/N: this machine sweeps the batches whose number is K-1 "
                                   "modulo N (the same --batch-size everywhere)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="tokens per forward (default 256)")
    p.add_argument("--kernel", default=None, choices=KERNELS,
                   help="the matmul kernel that screens (default: fp32-accumulate-wide for "
                        "float16 on a CPU, else native)")
    _save_args(p, "each new signature's token with the largest margin")
    p.add_argument("--report", help="also write PATH.md, PATH.json and PATH.png (the picture)")
    p.add_argument("--fail-on-nonfinite", action="store_true",
                   help="exit 1 when any token went non-finite, whatever the policy")
    _margin_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "advise", help="measure every policy here and recommend one",
        description="Every precision policy on the corpus cases, on --sample seeded prompts "
                    "(greedy, batched, every policy on every batch: speed with its interval) "
                    "and teacher-forced on a text set and the float32 continuations: KL "
                    "divergence from float32 at every position, with cluster-bootstrap 95% "
                    "intervals. Recommends a policy finite everywhere whose mean-KLD interval "
                    "ends at or under --max-kld; the fastest where speed intervals separate, "
                    "else the safest. Exit 0 with a recommendation, 1 without, 2 bad input.")
    _model_args(p)
    _bounds_args(p, bos=False)
    p.add_argument("--corpus", default=None,
                   help=f"also run every case of the model from this corpus directory (default: "
                        f"./{DEFAULT_CORPUS} when it exists; 'none': no corpus)")
    p.add_argument("--sample", type=int, default=32,
                   help="prompts to draw from the strategies, each run with and without BOS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=parse_duration, default=None,
                   help="stop sampling once this is spent, e.g. 8m (the corpus and the "
                        "teacher-forced text always run)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text", metavar="FILE",
                   help="plain UTF-8 text to teacher-force (default: the Python standard "
                        "library's source, read from this interpreter)")
    p.add_argument("--text-chunks", type=int, default=ADVISE_CHUNKS,
                   help=f"chunks of the text to teacher-force (at least 2; default "
                        f"{ADVISE_CHUNKS})")
    p.add_argument("--text-tokens", type=int, default=ADVISE_TOKENS,
                   help=f"tokens per chunk, BOS included (default {ADVISE_TOKENS})")
    p.add_argument("--max-kld", type=float, default=DEFAULT_MAX_KLD,
                   help="a policy qualifies when the upper end of its mean-KLD 95%% interval "
                        f"is at most this many nats (default {DEFAULT_MAX_KLD:g}, a chosen line)")
    p.add_argument("--report", metavar="PATH",
                   help="write PATH/advise.md, .html, .json, .png (PATH a directory, created "
                        "if missing), or PATH.md etc. for a PATH ending in .md/.html/.json")
    p.add_argument("--json", action="store_true",
                   help="print the report's JSON document to stdout (progress, the plan's "
                        "lines and 'wrote' lines go to stderr)")
    p.add_argument("--plan", action="store_true",
                   help="first find the fewest layers whose residual stream must run in "
                        "float32 for every corpus case, sampled prompt and --prompts prompt to "
                        "stay finite with headroom (greedy growth, then pruning); write it as a "
                        "plan file and measure it beside the other policies")
    p.add_argument("--plan-out", metavar="FILE.json",
                   help="with --plan: where the plan goes (default plan-MODEL.json; never "
                        "overwritten); use it as --policy plan:FILE.json")
    p.add_argument("--prompts", nargs="+", metavar="FILE",
                   help="with --plan: prompt files (as fuzz screen reads them) the plan must "
                        "also keep finite")
    p.add_argument("--min-headroom", type=float, default=None,
                   help="with --plan: the least limit / max |x| a check must keep (default "
                        "1.02)")
    p.set_defaults(func=cmd_advise)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # OSError: a missing file, a full disk; ImportError: an engine whose package is not installed
    except (ValueError, RuntimeError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT["error"]
