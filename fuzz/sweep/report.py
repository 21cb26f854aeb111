"""A sweep's report files: PATH.md, PATH.json and PATH.png (the picture, fuzz.sweep.plot), each
written whole (fuzz.atomic)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fuzz.atomic import write_atomic
from fuzz.sweep.plot import plot_sweep
from fuzz.sweep.summary import SweepSummary


def markdown(summary: SweepSummary, facts: dict[str, Any], picture: str) -> str:
    out = ["# gemma-fuzz sweep", ""]
    out += [f"- **{k}:** {v}" for k, v in facts.items()]
    out += ["", *[f"    {line}" for line in summary.lines()], "", f"![sweep]({picture})", ""]
    return "\n".join(out)


def write_report(summary: SweepSummary, facts: dict[str, Any], path: str) -> list[Path]:
    """PATH.md, PATH.json and PATH.png (each written whole, fuzz.atomic)."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".md", ".json", ".png") else base
    base.parent.mkdir(parents=True, exist_ok=True)
    png, md, js = (base.with_name(base.name + s) for s in (".png", ".md", ".json"))
    plot_sweep(summary, png, title=f"{facts.get('model')}, {facts.get('policy')}, prefix "
                                   f"{facts.get('prefix')}")
    write_atomic(md, markdown(summary, facts, png.name).encode("utf-8"))
    write_atomic(js, (json.dumps(summary.to_json(facts), indent=1, ensure_ascii=False,
                                 allow_nan=False) + "\n").encode("utf-8"))
    return [md, js, png]
