"""`python -m fuzz …` (also `gemma-fuzz`): check, add, replay, run. Contracts: docs/DESIGN.md."""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .corpus import Corpus
from .generate import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_PROMPT_TOKENS, Bounds, PromptSpec
from .precision import POLICIES
from .session import ModelOptions, Session
from .verdict import Verdict, json_safe

DEFAULT_CORPUS = "corpus"


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
    g.add_argument("--model", default="gemma3-270m",
                   help="zoo name (gemma3-270m, tiny, ...), a .gguf file, or a gemma_pytorch "
                        "checkpoint (.ckpt/.pt or directory) with --variant/--config and "
                        "--tokenizer")
    g.add_argument("--variant", help="upstream variant of a checkpoint (2b, 7b, 2b-v2, 9b, 27b, "
                                     "1b, 4b, 12b, 27b_v3, 270m)")
    g.add_argument("--config", help="GemmaConfig JSON (upstream field names) of a checkpoint")
    g.add_argument("--tokenizer", help="SentencePiece .model of a checkpoint")
    g.add_argument("--engine", default="builtin", choices=("builtin", "upstream"),
                   help="who computes: the built-in engine or installed google/gemma_pytorch")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")


def _bounds_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS)
    p.add_argument("--no-bos", action="store_true", help="feed the prompt without BOS")


def _options(args: argparse.Namespace) -> ModelOptions:
    return ModelOptions(args.model, args.variant, args.config, args.tokenizer, args.engine,
                        args.device)


def _bounds(args: argparse.Namespace) -> Bounds:
    return Bounds(max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens)


# --- check -------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    session = Session.open(_options(args), _bounds(args))
    spec = PromptSpec(args.prompt, add_bos=not args.no_bos, chat=args.chat)
    verdict = session.check(spec, args.policy)
    if args.json:
        doc = {"model": session.model.name, **verdict.to_dict()}
        print(json.dumps(json_safe(doc), ensure_ascii=False, allow_nan=False))
    else:
        print(format_verdict(verdict))
    if args.plot:
        from .report import plot_verdict

        plot_verdict(verdict, args.plot)
        print(f"plot written to {args.plot}")
    return 0


SITE_GROUPS = {
    "residual": ("embedding", "residual_attn", "residual_mlp"),
    "post-norm": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "mlp": ("mlp_act", "mlp_output"),
    "attention": ("qkv", "attn_scores", "attn_output"),
    "head": ("final_norm", "logits"),
}


def format_verdict(v: Verdict) -> str:
    """A per-layer table of max |x| and headroom, the first non-finite site highlighted."""
    first = v.first_nonfinite
    lines = [f"policy {v.policy}  BOS {'on' if v.add_bos else 'off'}  prompt {v.prompt!r}",
             f"prompt ids ({len(v.prompt_ids)}): {v.prompt_ids[:24]}"
             f"{' …' if len(v.prompt_ids) > 24 else ''}"]
    header = f"{'layer':>9} " + " ".join(f"{g:>10}" for g in SITE_GROUPS) + f" {'headroom':>9}"
    lines += ["", header, "-" * len(header)]
    headroom = v.headroom()
    for layer, sites in v.max_abs.items():
        cells = []
        for names in SITE_GROUPS.values():
            values = [sites[n] for n in names if n in sites]
            cells.append(f"{_fmt(max(values, key=_order)) if values else '':>10}")
        room = min(headroom[layer].values(), default=float("inf"))
        mark = ""
        if first is not None and layer == _label(first.layer, v):
            mark = f"  <-- first non-finite: {first.site}"
        lines.append(f"{layer:>9} " + " ".join(cells) + f" {_fmt(room):>9}{mark}")
    lines.append("")
    if first is None:
        lines.append(f"FINITE: {v.steps} steps, stopped at {v.stopped}; "
                     f"min headroom {v.min_headroom():.3g} (content {v.min_headroom(True):.3g})")
    else:
        lines.append(f"NON-FINITE ({first.kind}) at step {first.step}, layer {first.layer}, site "
                     f"{first.site}, position {first.position} (token {first.token_id})")
        if first.channel is not None:
            a, b = first.terms
            lines.append(f"  channel {first.channel}: {a:.6g} + {b:.6g} = {a + b:.6g} "
                         f"> {v.limits.get(f'{_label(first.layer, v)}/{first.site}', 65504):.6g}")
    lines.append(f"generated {len(v.tokens)} tokens: {v.text!r}")
    return "\n".join(lines)


def _order(x: float) -> float:
    return float("inf") if x != x else x  # nan sorts as the largest


def _fmt(x: float) -> str:
    return "nan" if x != x else ("inf" if x == float("inf") else f"{x:.4g}")


def _label(layer: int, v: Verdict) -> str:
    labels = list(v.max_abs)
    if layer < 0:
        return "embedding"
    return str(layer) if str(layer) in labels else "head"


# --- add ---------------------------------------------------------------------------------------
def cmd_add(args: argparse.Namespace) -> int:
    session = Session.open(_options(args), _bounds(args))
    spec = PromptSpec(args.prompt, add_bos=not args.no_bos, chat=args.chat)
    verdict = session.check(spec, args.policy)
    if verdict.finite:
        print(f"refused: the prompt stays finite under {args.policy} on {session.model.name} "
              f"({verdict.steps} steps, min headroom {verdict.min_headroom():.3g}); nothing saved. "
              "Only prompts that produce NaN/Inf become corpus cases.", file=sys.stderr)
        return 1
    case = session.case(verdict, chat=spec.chat, strategy="manual")
    result = Corpus(Path(args.corpus)).save(case, force=args.force)
    first = verdict.first_nonfinite
    print(f"{result.status}: {result.path}  ({args.policy}: {first.kind} at step {first.step}, "
          f"layer {first.layer}, {first.site}, position {first.position})")
    if result.status == "known-signature":
        print("  this signature is already covered by: "
              + ", ".join(str(p) for p in result.existing) + " (use --force to add it anyway)")
    return 0


# --- replay ------------------------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import replay_corpus

    rows = replay_corpus(Corpus(Path(args.corpus)), model_filter=args.model,
                         device=args.device, engine=args.engine)
    print(f"{'case':<54} {'policy':<22} {'expected':<12} {'got':<44} ok")
    failures = 0
    for row in rows:
        failures += not row.ok
        print(f"{row.label:<54.54} {row.policy:<22} {row.expected:<12} {row.got:<44.44} "
              f"{'yes' if row.ok else 'NO'}")
    stale = sum(1 for r in rows if r.expected == "reproduce" and not r.ok)
    regressions = failures - stale
    print(f"\n{len(rows)} checks: {regressions} regressions (a safe policy went non-finite), "
          f"{stale} cases no longer reproduce")
    return 1 if regressions or (args.strict and stale) else 0


# --- run ---------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .run import FuzzJob

    job = FuzzJob.from_args(args, _options(args), _bounds(args))
    return job.main()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="run one prompt under one policy and locate NaN/Inf")
    _model_args(p)
    _bounds_args(p)
    p.add_argument("--policy", required=True, help=f"one of: {', '.join(POLICIES)}")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", help="also write a per-layer max |x| plot (PNG) here")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("add", help="add a crashing prompt to the corpus by hand")
    _model_args(p)
    _bounds_args(p)
    p.add_argument("--policy", required=True, help=f"one of: {', '.join(POLICIES)}")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--force", action="store_true", help="save even if the signature is known")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("replay", help="replay every corpus case and print a table")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--model", help="only cases of this model")
    p.add_argument("--engine", default="builtin", choices=("builtin", "upstream"))
    p.add_argument("--device", default="auto")
    p.add_argument("--strict", action="store_true",
                   help="also fail when a recorded case no longer reproduces")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("run", help="the fuzz job: search until the budget ends")
    _model_args(p)
    _bounds_args(p)
    p.add_argument("--policies", default="all", help="comma-separated, or 'all'")
    p.add_argument("--budget", type=parse_duration, default=parse_duration("8m"),
                   help="how long to search, e.g. 90s, 10m, 2h (default 8m)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--report", help="write the report here (.md, .html and .json side by side)")
    p.add_argument("--database", default=".hypothesis/fuzz-db",
                   help="Hypothesis example database directory (share it between runs/machines)")
    p.add_argument("--round-examples", type=int, default=40,
                   help="examples per Hypothesis round before switching policy/BOS mode")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
