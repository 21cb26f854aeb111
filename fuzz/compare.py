"""`fuzz compare`: the same prompts through several engines under one policy, side by side.

A finding is about one engine (docs/DESIGN.md). This command says whether it transfers: each
prompt runs alone (the canonical verdict) on every engine named in `--engines` (builtin,
upstream, transformers, transformers-eager, transformers-sdpa), and the table gives each verdict:
`finite`, or the first non-finite step, layer and site with its margin (unrounded sum / limit).
Under it, one line per engine after the first (the reference) says how many of the reference's
failures it reproduces at the same first layer and site ("transfer"), and one line lists where
the verdicts diverge (a different status, layer or site).

Prompts: `--prompt TEXT`, `--prompt-file FILE` (the one prompt, with --no-bos / --chat), or
`--corpus DIR`: every case of the model there, each with its own BOS mode, chat flag and
generation bounds. Exit 0 when every engine agrees on every prompt, 1 when any diverges, 2 on an
error (an engine that cannot run, e.g. upstream without google/gemma_pytorch, is an error naming
the install command).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fuzz.corpus import Corpus
from fuzz.engine.loaded import ENGINES
from fuzz.precision import get_policy
from fuzz.report.describe import prompt_literal
from fuzz.session import ModelOptions, Session
from fuzz.verdict import Bounds, PromptSpec, Verdict


@dataclass(frozen=True)
class Item:
    """One prompt to compare, with the bounds it runs under and where it came from."""

    spec: PromptSpec
    bounds: Bounds
    label: str  # "--prompt" or the case id


@dataclass(frozen=True)
class Cell:
    """One engine's verdict on one prompt, reduced to what the table shows."""

    status: str  # finite | nonfinite | inconclusive
    step: Optional[int] = None
    layer: Optional[int] = None
    site: Optional[str] = None
    margin: Optional[float] = None

    @classmethod
    def of(cls, verdict: Verdict) -> Cell:
        first = verdict.first_nonfinite
        if first is None:
            return cls(verdict.status)
        return cls("nonfinite", first.step, first.layer, first.site, verdict.margin)

    @property
    def where(self) -> Optional[tuple[int, str]]:
        return None if self.layer is None else (self.layer, self.site)

    def text(self) -> str:
        if self.status != "nonfinite":
            return self.status
        margin = "" if self.margin is None else f" x{self.margin:.3f}"
        return f"step {self.step} L{self.layer} {self.site}{margin}"


@dataclass
class Comparison:
    engines: list[str]
    policy: str
    items: list[Item]
    cells: list[dict[str, Cell]] = field(default_factory=list)  # one dict per item

    def diverging(self) -> list[int]:
        """Items whose engines disagree on the status or on the first layer and site."""
        return [i for i, row in enumerate(self.cells)
                if len({(c.status, c.where) for c in row.values()}) > 1]

    def transfer(self, engine: str) -> tuple[int, int]:
        """(reference failures this engine reproduces at the same first layer and site,
        reference failures)."""
        ref = self.engines[0]
        failing = [row for row in self.cells if row[ref].status == "nonfinite"]
        same = sum(row[engine].status == "nonfinite" and row[engine].where == row[ref].where
                   for row in failing)
        return same, len(failing)


def parse_engines(text: str) -> list[str]:
    """'builtin,transformers-sdpa' -> kinds, each checked; at least two, no repeats."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ENGINES]
    if bad:
        raise ValueError(f"unknown engine(s) {', '.join(bad)} in --engines; valid: "
                         f"{', '.join(ENGINES)}")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"--engines needs at least two different engines to compare, got "
                         f"{text!r}; e.g. --engines builtin,transformers")
    return names


def corpus_items(corpus: Path, model: str) -> list[Item]:
    """Every case of `model` in the corpus, with its BOS mode, chat flag and bounds."""
    cases = Corpus(corpus).cases(model)
    if not cases:
        raise ValueError(f"the corpus {corpus} holds no case of model {model!r}; give another "
                         "--corpus or --model, or compare --prompt TEXT")
    items = []
    for loaded in cases:
        case = loaded.case
        bounds = Bounds(max_new_tokens=case.bounds["max_new_tokens"],
                        max_prompt_tokens=case.bounds["max_prompt_tokens"])
        items.append(Item(PromptSpec(case.prompt, case.add_bos, case.chat), bounds,
                          loaded.case_id))
    return items


def run_comparison(options: ModelOptions, engines: Sequence[str], policy: str,
                   items: Sequence[Item]) -> Comparison:
    """Every item alone on every engine (one Session per engine, one model load)."""
    get_policy(policy)  # a bad name fails before any model runs
    comparison = Comparison(list(engines), policy, list(items))
    sessions = {kind: Session.open(dataclasses.replace(options, engine=kind), batch_size=1)
                for kind in engines}
    for item in items:
        comparison.cells.append({kind: Cell.of(s.run([item.spec], policy, item.bounds)[0])
                                 for kind, s in sessions.items()})
    return comparison


def format_comparison(c: Comparison) -> str:
    """The Markdown table and the transfer and divergence lines."""
    head = ["#", "prompt", "BOS", *c.engines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (item, row) in enumerate(zip(c.items, c.cells), 1):
        prompt = prompt_literal(item.spec.text).replace("|", "\\|")
        cells = [row[e].text() for e in c.engines]
        lines.append(f"| {i} | `{prompt}` | {'on' if item.spec.add_bos else 'off'} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    ref = c.engines[0]
    for engine in c.engines[1:]:
        same, total = c.transfer(engine)
        lines.append(f"transfer {ref} -> {engine}: {same} of {total} {c.policy} failures "
                     "fail at the same first layer and site")
    diverging = c.diverging()
    if not diverging:
        lines.append(f"the engines agree on all {len(c.items)} prompts")
    else:
        where = "; ".join(f"#{i + 1} (" + ", ".join(f"{e}: {c.cells[i][e].text()}"
                                                     for e in c.engines) + ")"
                          for i in diverging)
        lines.append(f"diverge on {len(diverging)} of {len(c.items)} prompts: {where}")
    return "\n".join(lines)


def compare_main(options: ModelOptions, engines_text: str, policy: str, *,
                 prompt: Optional[PromptSpec], corpus: Optional[str], bounds: Bounds) -> int:
    """`fuzz compare`: prints the table; 0 when the engines agree, 1 when they diverge."""
    engines = parse_engines(engines_text)
    if (prompt is None) == (corpus is None):
        raise ValueError("give the prompts to compare: --prompt TEXT, --prompt-file FILE or "
                         "--corpus DIR (one of them)")
    if corpus is not None:
        model = Session.open(dataclasses.replace(options, engine=engines[0])).model.name
        items = corpus_items(Path(corpus), model)
    else:
        items = [Item(prompt, bounds, "--prompt")]
    try:
        comparison = run_comparison(options, engines, policy, items)
    except ImportError as err:  # an engine's package is missing: say which and how to install
        raise ValueError(str(err)) from None
    print(format_comparison(comparison))
    return 1 if comparison.diverging() else 0
