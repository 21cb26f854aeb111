"""Writes a prompt file for `fuzz screen` and the benchmarks: N prompts drawn from the default
strategy (fuzz.strategies.prompts, with the real tokenizer's pieces when it is installed) from a
fixed seed, as JSONL; every 4th a chat (every 8th with a system turn), so that plain and chat
prompts are mixed as a deployment's logs would be.

    .venv/bin/python benchmarks/make_prompts.py --n 1000 --seed 0 > prompts.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from fuzz.strategies import prompts

SYSTEM = "You are a helpful assistant."


def draw_prompts(n: int, seed: int, vocabulary=None, max_chars: int = 200) -> list[str]:
    """n distinct non-blank prompts, the same ones for the same seed and code."""
    out: dict[str, None] = {}

    @hypothesis_seed(seed)
    @settings(max_examples=20 * n, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(prompts(max_chars=max_chars, vocabulary=vocabulary))
    def collect(text: str) -> None:
        if len(out) < n and text.strip() and "\n" not in text.strip("\n"):
            out.setdefault(text, None)

    collect()
    if len(out) < n:
        raise RuntimeError(f"drew only {len(out)} distinct prompts of {n}")
    return list(out)


def records(texts: list[str]) -> list[dict]:
    rows = []
    for i, text in enumerate(texts):
        if i % 4 != 3:
            rows.append({"prompt": text})
            continue
        turns = ([{"role": "system", "content": SYSTEM}] if i % 8 == 7 else []) + \
            [{"role": "user", "content": text}]
        rows.append({"messages": turns})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="no chats: plain prompts only")
    args = parser.parse_args(argv)
    vocabulary = None
    try:
        from fuzz.engine.zoo import load_model

        vocabulary = load_model("gemma3-270m").tokenizer.vocabulary()
    except Exception:  # noqa: BLE001 - without the real weights: the strategy's own words
        pass
    texts = draw_prompts(args.n, args.seed, vocabulary)
    rows = [{"prompt": t} for t in texts] if args.plain else records(texts)
    for row in rows:
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
