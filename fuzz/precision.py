"""Named precision policies: a dtype plus how the model is run in it.

The plain policies run the whole model in one dtype, exactly as upstream does when it builds the
model under `torch.set_default_dtype`. The mitigated ones depart from upstream on purpose, the way
other projects patched the same overflow (docs/NUMERICS.md):
- float16-clamp: clamp the residual stream and every norm output to finfo(float16).max - 1000
  (T5's fix in transformers PR #9487; Gemma 3 fixes #36831/#36832). Declared safe: the replay
  checks it on every corpus prompt.
- float16-fp32-residual: keep the residual stream (and the post-norm branches added to it) in
  float32, matmuls in float16 (the vLLM approach).
`expected_safe` is a declaration, checked by the regression replay: a policy declared safe must stay
finite on every corpus prompt of its model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fuzz.engine.interface import FAITHFUL, Numerics

FLOAT16_CLAMP = torch.finfo(torch.float16).max - 1000


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
    )
}


def get_policy(name: str) -> PrecisionPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown precision policy {name!r}; valid policies are: {', '.join(POLICIES)}"
        ) from None


def parse_policies(text: str | list[str] | tuple[str, ...]) -> list[PrecisionPolicy]:
    """'float16,bfloat16' or a list -> policies (errors name the bad entry); 'all' -> every one."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        names = list(POLICIES)
    if not names:
        raise ValueError(f"no precision policy given; valid policies are: {', '.join(POLICIES)}")
    return [get_policy(n) for n in names]
