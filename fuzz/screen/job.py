"""`fuzz screen`: every prompt of the user's files, under every policy and BOS mode, one result
line each; a summary per policy; the new signatures saved to the corpus on request.

Work, per policy: every (prompt, BOS mode) item sorted by token length so that a batch pads
little, cut into batches of the session's size; this shard's batches (`--shard K/N`: the batches
whose number is K - 1 modulo N), less the items already in the results file
(fuzz.screen.results), are screened (fuzz.session.Session.screen: the screening kernel, every new
signature confirmed alone). A chat prompt runs once per policy, with the BOS its template gives
("template" mode); a plain one in each BOS mode asked for. A prompt that cannot run (over
--max-prompt-tokens, empty without BOS, a lone surrogate) gets a result line that says why (in
the shard of its prompt index modulo N).

Why shards split batches, not prompts: a row's float16 or bfloat16 result depends on the rows
batched with it (the matmul's shape changes its reduction order: fact 3 of the developers'
guide). Measured on the real 270M, 1,000 prompts, bfloat16, BOS: with prompts split by index, 16
rows of the two shards generated other greedy tokens than the unsharded run (near ties); with
batches split, every shard batches exactly as the unsharded run, and a resumed run as an
uninterrupted one (a batch is written whole or not at all).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from fuzz.generate import encode_prompt
from fuzz.precision import PrecisionPolicy
from fuzz.prompts.chat import chat_spec
from fuzz.prompts.files import PromptRecord
from fuzz.screen.results import Key
from fuzz.session import Session
from fuzz.verdict import PromptSpec, Signature, Verdict

BOS, NO_BOS, TEMPLATE = "bos", "no-bos", "template"


@dataclass(frozen=True)
class Item:
    record: PromptRecord
    spec: PromptSpec
    bos_mode: str

    def key(self, policy: str) -> Key:
        return self.record.index, policy, self.bos_mode


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N), 1 <= K <= N (a Kubernetes indexed Job: K = JOB_COMPLETION_INDEX + 1)."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise ValueError(f"--shard {text!r}: give K/N with 1 <= K <= N, e.g. 2/8 (shard 2 of "
                         "8); a Slurm array's SLURM_ARRAY_TASK_ID, or a Kubernetes indexed "
                         "Job's JOB_COMPLETION_INDEX + 1, is K")
    return k, n


def plan(records: Sequence[PromptRecord], bos_modes: Sequence[bool],
         template: Optional[str] = None) -> list[Item]:
    """The items: each plain prompt in every BOS mode, each chat once."""
    items = []
    for record in records:
        if record.is_chat:
            items.append(Item(record, chat_spec(record.messages, template), TEMPLATE))
        else:
            items += [Item(record, PromptSpec(record.text, add_bos=bos), BOS if bos else NO_BOS)
                      for bos in bos_modes]
    return items


def result_row(item: Item, policy: str, verdict: Optional[Verdict],
               signature: Optional[Signature], error: str = "") -> dict[str, Any]:
    """One result line (fuzz.screen.results adds the run's identity)."""
    row: dict[str, Any] = {
        "prompt_index": item.record.index, "source": item.record.source, "policy": policy,
        "bos_mode": item.bos_mode, "add_bos": item.spec.add_bos, "chat": item.spec.chat,
        "prompt": item.spec.text,
    }
    if verdict is None:
        return {**row, "status": "not run", "error": error, "finite": False,
                "first_nonfinite": None, "margin": None, "least_headroom": None,
                "signature": None}
    first = verdict.first_nonfinite
    least = verdict.min_headroom(content_only=True)
    return {**row, "status": verdict.status, "finite": verdict.finite,
            "first_nonfinite": None if first is None else {
                "step": first.step, "layer": first.layer, "site": first.site,
                "position": first.position, "token_id": first.token_id, "kind": first.kind},
            "margin": verdict.margin,
            "least_headroom": None if math.isinf(least) else least,
            "prompt_tokens": len(verdict.prompt_ids), "tokens": verdict.tokens,
            "text": verdict.text, "signature": None if signature is None else list(signature)}


def spec_of(row: dict[str, Any]) -> PromptSpec:
    """The prompt a result line ran, as fed."""
    return PromptSpec(row["prompt"], add_bos=bool(row["add_bos"]), chat=bool(row["chat"]))


@dataclass
class ShardPlan:
    """This shard's items in the order they run, every prompt tokenized once: the ones that
    cannot run (with why) and the batches, cut from every item sorted by (token length, prompt
    index, BOS mode), so that they are the unsharded run's batches."""
    not_runnable: list[tuple[Item, str]]
    batches: list[list[Item]]

    @classmethod
    def of(cls, session: Session, items: Sequence[Item],
           shard: tuple[int, int] = (1, 1)) -> ShardPlan:
        k, n = shard
        lengths: dict[int, int] = {}
        not_runnable = []
        for item in items:
            try:
                lengths[id(item)] = len(encode_prompt(session.model.tokenizer, item.spec,
                                                      session.bounds))
            except ValueError as err:  # over --max-prompt-tokens, empty without BOS, ...
                if item.record.index % n == k - 1:
                    not_runnable.append((item, str(err)))
        runnable = sorted((item for item in items if id(item) in lengths),
                          key=lambda i: (lengths[id(i)], i.record.index, i.bos_mode))
        batches = [batch for number, batch in enumerate(_batches(runnable, session.batch_size))
                   if number % n == k - 1]
        return cls(not_runnable, batches)

    def todo(self, policy: str, done: set[Key]
             ) -> tuple[list[tuple[Item, str]], list[list[Item]]]:
        """What is left under `policy`: the unrunnable items and the batches, less `done`."""
        batches = [[item for item in batch if item.key(policy) not in done]
                   for batch in self.batches]
        return ([(item, why) for item, why in self.not_runnable if item.key(policy) not in done],
                [batch for batch in batches if batch])

    def count(self, policies: Sequence[PrecisionPolicy], done: set[Key]) -> int:
        """The result lines still to write (a progress bar's total)."""
        total = 0
        for policy in policies:
            not_runnable, batches = self.todo(policy.name, done)
            total += len(not_runnable) + sum(map(len, batches))
        return total


def screen(session: Session, policies: Sequence[PrecisionPolicy], plan: ShardPlan,
           done: set[Key], write: Callable[[list[dict[str, Any]]], None],
           known: set[Signature] = frozenset(), tick: Optional[Callable[[int], None]] = None
           ) -> int:
    """Screens the plan's items not in `done` under every policy, batch by batch, handing each
    batch's lines to `write` (the results file) as soon as they exist; returns the items
    screened. Session.screen confirms a signature not seen before by running its prompt alone:
    `known` (the corpus's) and every signature an earlier batch showed are not confirmed again."""
    screened, seen = 0, set(known)
    for policy in policies:
        not_runnable, batches = plan.todo(policy.name, done)
        for item, error in not_runnable:
            write([result_row(item, policy.name, None, None, error)])
        screened += len(not_runnable)
        if tick and not_runnable:
            tick(len(not_runnable))
        for batch in batches:
            results = session.screen([i.spec for i in batch], policy.name, seen)
            seen.update(r.signature for r in results if r.signature is not None)
            write([result_row(i, policy.name, r.verdict, r.signature)
                   for i, r in zip(batch, results)])
            screened += len(batch)
            if tick:
                tick(len(batch))
    return screened


def _batches(items: list[Item], size: int) -> Iterable[list[Item]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]
