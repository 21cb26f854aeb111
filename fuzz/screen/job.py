"""`fuzz screen`: every prompt of the user's files, under every policy and BOS mode, one result
line each; a summary per policy; the new signatures saved to the corpus on request.

Work: the (prompt, policy, BOS mode) items not yet in the results file (fuzz.screen.results), of
this shard (`--shard K/N`: the prompts whose index is K - 1 modulo N), sorted by token length
within a policy so that a batch pads little, screened in batches of the session's size
(fuzz.session.Session.screen: the screening kernel, every new signature confirmed alone). A chat
prompt runs once per policy, with the BOS its template gives ("template" mode); a plain one in
each BOS mode asked for. A prompt that cannot run (over --max-prompt-tokens, empty without BOS, a
lone surrogate) gets a result line that says why.
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
         template: Optional[str] = None, shard: tuple[int, int] = (1, 1)) -> list[Item]:
    """The items of this shard: each plain prompt in every BOS mode, each chat once."""
    k, n = shard
    items = []
    for record in records:
        if record.index % n != k - 1:
            continue
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


def not_runnable(session: Session, spec: PromptSpec) -> str:
    """Why the prompt cannot run under the session's bounds ("" when it can)."""
    try:
        encode_prompt(session.model.tokenizer, spec, session.bounds)
    except ValueError as err:
        return str(err)
    return ""


def screen(session: Session, policies: Sequence[PrecisionPolicy], items: Sequence[Item],
           done: set[Key], write: Callable[[list[dict[str, Any]]], None],
           known: set[Signature] = frozenset(), tick: Optional[Callable[[int], None]] = None
           ) -> int:
    """Screens every item not in `done` under every policy, batch by batch, handing each batch's
    lines to `write` (the results file) as soon as they exist; returns the items screened.
    Session.screen confirms a signature not seen before by running its prompt alone: `known`
    (the corpus's) and every signature an earlier batch showed are not confirmed again."""
    screened, seen = 0, set(known)
    for policy in policies:
        todo = [item for item in items if item.key(policy.name) not in done]
        lengths = {id(item): _length(session, item) for item in todo}
        todo.sort(key=lambda item: (lengths[id(item)], item.record.index))
        runnable = []
        for item in todo:
            error = not_runnable(session, item.spec) if lengths[id(item)] < 0 else ""
            if error:
                write([result_row(item, policy.name, None, None, error)])
                screened += 1
                if tick:
                    tick(1)
            else:
                runnable.append(item)
        for batch in _batches(runnable, session.batch_size):
            results = session.screen([i.spec for i in batch], policy.name, seen)
            seen.update(r.signature for r in results if r.signature is not None)
            write([result_row(i, policy.name, r.verdict, r.signature)
                   for i, r in zip(batch, results)])
            screened += len(batch)
            if tick:
                tick(len(batch))
    return screened


def _length(session: Session, item: Item) -> int:
    try:
        return len(encode_prompt(session.model.tokenizer, item.spec, session.bounds))
    except ValueError:
        return -1  # not runnable: its line says why, first


def _batches(items: list[Item], size: int) -> Iterable[list[Item]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]
