"""`python -m fuzz sweep`: every vocabulary token as the next token after one prefix.

The work: the vocabulary in batches of --batch-size consecutive token ids (batch i holds ids i*B ..
i*B+B-1, whatever --tokens or --shard select), each one forward of the built-in engine
(fuzz.next_token). On a CPU a float16 policy screens with float32-accumulated products
("fp32-accumulate-wide", fuzz.engine.kernels: 3.0x torch's native float16 rate on a CPU without
avx512_fp16, benchmarks/README.md "fuzz sweep's rate"), and every token that went non-finite or came
within NEAR_MISS_HEADROOM of the limit runs again with the native kernel in a batch of its own: its
line holds the native result and says so (`kernel`). One JSON line per token (fuzz.screen.results'
file: one write per batch, fsync, resumable, locked; a file of another sweep refused), a summary, a
report with a picture, and with --save each new signature saved as a case under the corpus rules
(the token's prompt, decoded, must encode back to the same ids; fuzz.screen.command.save_new).

Exit 0 no token went non-finite (or the policy is declared unsafe and --fail-on-nonfinite was not
given), 1 one did, 2 bad input.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional

from fuzz.corpus import Corpus
from fuzz.next_token import (
    Prefix,
    SweepError,
    SweepRunner,
    TokenResult,
    default_kernel,
    flops_per_token,
    make_prefix,
)
from fuzz.precision import get_policy
from fuzz.prompts.files import InputError
from fuzz.report.progress import CountProgress
from fuzz.screen.command import save_new
from fuzz.screen.job import parse_shard
from fuzz.screen.results import ResultsFile
from fuzz.session import NEAR_MISS_HEADROOM, Session
from fuzz.sweep.report import write_report
from fuzz.sweep.summary import SweepSummary
from fuzz.verdict import Signature

# Candidate tokens per forward. Measured on Gemma 3 270M float16, empty prefix, 2-core EPYC
# without avx512_fp16 (benchmarks/bench_sweep.py, "fuzz sweep's rate" in benchmarks/README.md):
# 463 tokens/s at 64, 535 at 256, 554 at 512 (within 256's spread); 256 keeps a long prefix's
# cache copies (batch x prefix x 18 layers) small.
DEFAULT_BATCH_SIZE = 256


def token_range(text: Optional[str], vocab: int) -> range:
    """--tokens START:END (END exclusive, either side may be empty) -> a range of token ids."""
    if text is None:
        return range(vocab)
    try:
        start_text, end_text = text.split(":")
        start = int(start_text) if start_text else 0
        end = int(end_text) if end_text else vocab
    except ValueError:
        start, end = -1, -1
    if not 0 <= start < end <= vocab:
        raise InputError(f"--tokens {text!r}: give START:END with 0 <= START < END <= {vocab} "
                         "(the vocabulary's size), e.g. --tokens 0:1000")
    return range(start, end)


def result_line(prefix: Prefix, tokenizer: Any, policy: str, fingerprint: str,
                result: TokenResult, kernel_name: str, screened_headroom: Optional[float]
                ) -> dict[str, Any]:
    """One token's line (the results file adds the run's identity: policy, add_bos, ...)."""
    first = result.first
    row: dict[str, Any] = {
        "token_id": result.token_id, "piece": tokenizer.piece(result.token_id),
        "finite": first is None,
        "status": "finite" if first is None else "nonfinite",
        "least_headroom": result.least_headroom,
        "least_headroom_site": "/".join(result.least_site),
        "headroom_by_layer": [round(h, 5) for h in result.by_layer],
        "kernel": kernel_name, "first_nonfinite": None, "signature": None,
    }
    if screened_headroom is not None:
        row["screened_headroom"] = screened_headroom
    if first is None:
        return row
    text = tokenizer.decode([*prefix.content_ids, result.token_id])
    row.update(
        first_nonfinite={"step": first.step, "layer": first.layer, "site": first.site,
                         "position": first.position, "token_id": first.token_id,
                         "kind": first.kind},
        margin=result.margin,
        signature=list(Signature.of(fingerprint, policy, prefix.add_bos, first)),
        # what a case would hold: the prompt as text, and whether it encodes back to these ids
        prompt=text, chat=False,
        bos_mode="bos" if prefix.add_bos else "no-bos",
        source=f"sweep token {result.token_id}",
        round_trips=tokenizer.encode(text, bos=prefix.add_bos) == [*prefix.ids,
                                                                   result.token_id])
    return row


def parse_ids(text: Optional[str]) -> Optional[list[int]]:
    """--after-ids '2,1234,5' (commas or spaces) -> [2, 1234, 5]."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"--after-ids {text!r}: give token ids separated by commas, e.g. "
                         "--after-ids 1234,5678") from None


def batches_of(tokens: range, batch_size: int, shard: tuple[int, int], vocab: int
               ) -> list[list[int]]:
    """This shard's batches: batch i holds ids i*B .. i*B+B-1 (cut to `tokens`), and shard K/N
    takes the batches whose number is K-1 modulo N, so that every shard batches as the whole
    sweep does (a token's float16 result can depend on the rows beside it)."""
    k, n = shard
    out = []
    for number, start in enumerate(range(0, vocab, batch_size)):
        batch = [t for t in range(start, min(start + batch_size, vocab)) if t in tokens]
        if batch and number % n == k - 1:
            out.append(batch)
    return out


def sweep_main(args: argparse.Namespace, session_options: Any) -> int:
    policy = get_policy(args.policy)
    if session_options.engine != "builtin":
        raise InputError(f"--engine {session_options.engine}: sweep runs the built-in engine "
                         "only (it needs the forward without its LM head); drop --engine, then "
                         "check a token it finds on your engine with `fuzz check --engine`")
    session = Session.open(session_options, batch_size=args.batch_size or DEFAULT_BATCH_SIZE)
    session.min_margin = args.min_margin
    tokenizer, config = session.model.tokenizer, session.model.config
    vocab = tokenizer.n_words
    try:
        prefix = make_prefix(tokenizer, args.after, parse_ids(args.after_ids), args.bos)
    except SweepError as err:
        raise InputError(str(err)) from None
    tokens = token_range(args.tokens, vocab)
    shard = parse_shard(args.shard) if args.shard else (1, 1)
    engine = session.engine(policy)
    kernel_name = args.kernel or default_kernel(engine.device.type, policy.dtype)
    try:
        runner = SweepRunner(engine, prefix, config.num_hidden_layers)
    except SweepError as err:
        raise InputError(str(err)) from None
    identity = {"model_fingerprint": session.model.fingerprint, "engine": session.engine_kind,
                "policy": policy.name, "prefix_ids": list(prefix.ids),
                "add_bos": prefix.add_bos, "batch_size": session.batch_size,
                "screen_kernel": kernel_name}
    fingerprint = session.model.fingerprint
    swept = 0
    with ResultsFile(args.out, identity, key_of=lambda row: int(row["token_id"]),
                     describe_key=lambda key: f"token {key}", command="fuzz sweep") as results:
        todo = [[t for t in batch if t not in results.done]
                for batch in batches_of(tokens, session.batch_size, shard, vocab)]
        todo = [batch for batch in todo if batch]
        progress = CountProgress(sum(map(len, todo)), "token", args.quiet)
        started = time.monotonic()  # after reading --out: the rate is the sweep's own
        try:
            for batch in todo:
                rows = [result_line(prefix, tokenizer, policy.name, fingerprint, result, kernel,
                                    screened)
                        for result, kernel, screened in runner.run_confirmed(
                            batch, kernel_name, NEAR_MISS_HEADROOM)]
                results.append(rows)
                swept += len(batch)
                progress.tick(len(batch))
        finally:
            progress.close()
        rows = [row for row in results.rows if int(row["token_id"]) in tokens]
    elapsed = time.monotonic() - started
    summary = SweepSummary.of(rows, config.num_hidden_layers)
    summary.explain(runner.explain)
    gflops = flops_per_token(config, prefix.position) * swept / max(elapsed, 1e-9) / 1e9
    facts = {"model": session.model.location or session.model.name,
             "fingerprint": fingerprint, "policy": policy.name,
             "prefix": repr(prefix.text) + (" after BOS" if prefix.add_bos else " (no BOS)"),
             "prefix ids": list(prefix.ids), "swept position": prefix.position,
             "tokens": f"{tokens.start}..{tokens.stop - 1}", "shard": f"{shard[0]}/{shard[1]}",
             "device": str(engine.device), "kernel": kernel_name,
             "batch size": session.batch_size, "result lines": len(rows),
             "this run": (f"{swept} tokens in {elapsed:.0f}s ({swept / max(elapsed, 1e-9):.0f} "
                          f"tokens/s, {gflops:.1f} GFLOP/s without the LM head)" if swept else
                          "nothing left to sweep: --out holds every token's line")}
    print(summary.console_text(facts))
    code = 0
    if summary.nonfinite and (policy.expected_safe or args.fail_on_nonfinite):
        print(f"FAILED: {summary.nonfinite} tokens went non-finite under {policy.name}",
              file=sys.stderr)
        code = 1
    if args.save:
        corpus = Corpus(Path(args.corpus))
        for line in save_findings(session, corpus, policy, rows, args.save_time):
            print(line)
    if args.report:
        for path in write_report(summary, facts, args.report):
            print(f"report: {path}")
    return code


def save_findings(session: Session, corpus: Corpus, policy: Any, rows: list[dict[str, Any]],
                  save_time_s: float) -> list[str]:
    """Each new signature's token with the largest margin, as a case under the corpus rules;
    tokens whose text does not encode back to their ids cannot be a case and are counted."""
    overflowing = [row for row in rows if row["status"] == "nonfinite"]
    usable = [row for row in overflowing if row.get("round_trips")]
    lines = []
    if len(usable) < len(overflowing):
        lines.append(f"{len(overflowing) - len(usable)} non-finite tokens not saveable: their "
                     "prompt text encodes to other ids")
    known = corpus.signatures(session.model.name)
    return lines + save_new(session, corpus, usable, [policy], known, save_time_s,
                            prefer=lambda row: (-(row.get("margin") or 0.0), len(row["prompt"])))
