"""Named precision policies: a dtype plus how the model is run in it.

The plain policies run the whole model in one dtype, exactly as upstream does when it builds the
model under `torch.set_default_dtype`. The mitigated ones depart from upstream on purpose, the way
other projects patched the same overflow (docs/NUMERICS.md):
- float16-clamp: clamp the residual stream and every norm output to finfo(float16).max - 1000
  (T5's fix in transformers PR #9487; Gemma 3 fixes #36831/#36832). Declared safe: the replay
  checks it on every corpus prompt.
- float16-fp32-residual: keep the residual stream (and the post-norm branches added to it) in
  float32, matmuls in float16 (vLLM PR #17364 for Gemma 3, where it was judged too slow to keep
  for other models; vLLM now refuses float16 for Gemma 2/3).
- float16-clip32752: float16 throughout, every residual add clipped to +-32752 and nothing else
  (onnxruntime PR #29611's fix for gemma-3-270m: Clip nodes on the residual adds).
- float16-fp32-norm-residual: float16 matmuls; norms, the residual stream and the logits in
  float32 (onnxruntime-genai PRs #1441/#1448 for Gemma 2/3: our norms always compute in float32
  as upstream's do, so this is float16-fp32-residual plus a float32 final norm and LM head).
- float16-fp32-layers:I+J+...: a plan (`fuzz advise --plan`): only layers I, J, ... run their
  residual stream in float32; `plan:FILE.json` names the plan file that holds it.
`expected_safe` is a declaration, checked by the regression replay: a policy declared safe must stay
finite on every corpus prompt of its model.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fuzz.engine.interface import FAITHFUL, Numerics

FLOAT16_CLAMP = torch.finfo(torch.float16).max - 1000
ONNXRUNTIME_CLIP = 32752.0  # onnxruntime PR #29611: half of float16's range, rounded to float16
PLAN_PREFIX = "float16-fp32-layers:"


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str
    dtype: torch.dtype  # weights, matmuls and activations
    numerics: Numerics  # departures from upstream (none for plain policies)
    expected_safe: bool
    description: str

    @property
    def faithful(self) -> bool:
        """True when the run is exactly upstream's (only these can run on the upstream engine)."""
        return self.numerics == FAITHFUL


POLICIES: dict[str, PrecisionPolicy] = {
    p.name: p
    for p in (
        PrecisionPolicy("float32", torch.float32, FAITHFUL, True,
                        "whole model in float32 (upstream's CPU default)"),
        PrecisionPolicy("bfloat16", torch.bfloat16, FAITHFUL, True,
                        "whole model in bfloat16 (float32's range, 8-bit mantissa)"),
        PrecisionPolicy("float16", torch.float16, FAITHFUL, False,
                        "whole model in float16, as upstream's run.py did on CUDA (max 65504)"),
        PrecisionPolicy("float16-clamp", torch.float16, Numerics(clamp=FLOAT16_CLAMP), True,
                        "float16, residual stream and norm outputs clamped to 64504 (T5 style)"),
        PrecisionPolicy("float16-fp32-residual", torch.float16,
                        Numerics(residual_dtype=torch.float32), True,
                        "float16 matmuls, residual stream kept in float32 (vLLM style)"),
        PrecisionPolicy("float16-clip32752", torch.float16,
                        Numerics(clamp=ONNXRUNTIME_CLIP, clamp_norms=False), True,
                        "float16, every residual add clipped to +-32752 (onnxruntime PR #29611)"),
        PrecisionPolicy("float16-fp32-norm-residual", torch.float16,
                        Numerics(residual_dtype=torch.float32, float32_logits=True), True,
                        "float16 matmuls; norms, residual stream and logits in float32 "
                        "(onnxruntime-genai PRs #1441, #1448)"),
    )
}


def plan_policy(layers: Iterable[int]) -> PrecisionPolicy:
    """float16 with the residual stream in float32 at these layers only (fuzz advise --plan)."""
    chosen = sorted(set(layers))
    if not chosen or min(chosen) < 0:
        raise ValueError(f"a plan names at least one layer, each >= 0 (got {chosen})")
    name = PLAN_PREFIX + "+".join(str(i) for i in chosen)
    return PrecisionPolicy(
        name, torch.float16,
        Numerics(residual_dtype=torch.float32, residual_layers=frozenset(chosen)), True,
        f"float16, residual stream in float32 at layers {', '.join(map(str, chosen))} only "
        "(a plan of fuzz advise --plan)")


def _plan_from_name(name: str) -> PrecisionPolicy:
    text = name[len(PLAN_PREFIX):]
    try:
        layers = [int(part) for part in text.split("+")]
    except ValueError:
        raise ValueError(f"policy {name!r}: a plan policy is {PLAN_PREFIX}I+J+... with layer "
                         "numbers, e.g. float16-fp32-layers:7+8+9") from None
    return plan_policy(layers)


def _plan_from_file(name: str) -> PrecisionPolicy:
    path = Path(name[len("plan:"):])
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        layers = doc["fp32_layers"]
    except OSError as e:
        raise ValueError(f"policy {name!r}: cannot read the plan file {path}: {e.strerror}; "
                         "write one with `python -m fuzz advise --plan --plan-out FILE.json`"
                         ) from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"policy {name!r}: {path} is not a plan file (a JSON object with "
                         "\"fp32_layers\": [layer, ...]); write one with `python -m fuzz "
                         "advise --plan --plan-out FILE.json`") from None
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
        raise ValueError(f"policy {name!r}: {path}'s \"fp32_layers\" must be a list of layer "
                         f"numbers, got {layers!r}")
    return plan_policy(layers)



def get_policy(name: str) -> PrecisionPolicy:
    """A named policy, a plan by name (float16-fp32-layers:7+8) or a plan file (plan:FILE.json)."""
    if name in POLICIES:
        return POLICIES[name]
    if name.startswith(PLAN_PREFIX):
        return _plan_from_name(name)
    if name.startswith("plan:"):
        return _plan_from_file(name)
    raise ValueError(
        f"unknown precision policy {name!r}; valid policies are: {', '.join(POLICIES)}, "
        f"{PLAN_PREFIX}I+J+... or plan:FILE.json (a plan of fuzz advise --plan)")


def parse_policies(text: str | list[str] | tuple[str, ...]) -> list[PrecisionPolicy]:
    """'float16,bfloat16' or a list -> policies (errors name the bad entry); 'all' -> every one."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        names = list(POLICIES)
    if not names:
        raise ValueError(f"no precision policy given; valid policies are: {', '.join(POLICIES)}")
    return [get_policy(n) for n in names]
