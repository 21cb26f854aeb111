"""Hand-built verdicts and summaries shared by the report tests (no model is needed).

Verdicts follow what docs/NUMERICS.md measured on Gemma 3 270M (18 layers): in float16 with BOS,
residual channel 163 at layer 7 holds 55008 after attention and the post-FFN branch adds 13376 ->
68384 > 65504 (inf at residual_mlp, position 0), NaN from layer 8 on.
"""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from fuzz.report import (
    PolicySummary,
    RunSummary,
)
from fuzz.verdict import NonFinite, Verdict

F16_MAX = 65504.0
F32_MAX = 3.4028234663852886e38
LAYERS = 18
SITES = ("input_layernorm", "qkv", "attn_scores", "attn_output", "post_attention_layernorm",
         "residual_attn", "pre_feedforward_layernorm", "mlp_act", "mlp_output",
         "post_feedforward_layernorm", "residual_mlp")
BOS_PROMPT = "the self-attention is important for transformer because"
NAN, INF = float("nan"), float("inf")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def layer_values(layer: int, residual: float) -> dict[str, float]:
    """One layer's max |x| per site with the magnitudes docs/NUMERICS.md reports."""
    return {"input_layernorm": 60.0 + layer, "qkv": 40.0 + layer, "attn_scores": 30.0 + layer,
            "attn_output": 150.0 + 10 * layer, "post_attention_layernorm": residual / 8,
            "residual_attn": residual * 0.9, "pre_feedforward_layernorm": 80.0,
            "mlp_act": 120.0 + 5 * layer, "mlp_output": 200.0, "post_feedforward_layernorm":
            residual / 5, "residual_mlp": residual}


def table(residuals: list[float], poison_from: tuple[int, str] | None = None,
          poison: float = NAN) -> dict[str, dict[str, float]]:
    """embedding, 0..17, head; every site at or after `poison_from` (execution order) is nan."""
    out: dict[str, dict[str, float]] = {"embedding": {"embedding": 24.0}}
    for layer, r in enumerate(residuals):
        out[str(layer)] = layer_values(layer, r)
    out["head"] = {"final_norm": 180.0, "logits": 95.0}
    if poison_from is not None:
        start_layer, start_site = poison_from
        for layer in range(start_layer, LAYERS):
            for site in SITES:
                if layer > start_layer or SITES.index(site) >= SITES.index(start_site):
                    out[str(layer)][site] = poison
        out["head"] = {"final_norm": poison, "logits": poison}
    return out


def limits(value: float) -> dict[str, float]:
    keys = ["embedding/embedding", "head/final_norm", "head/logits"]
    keys += [f"{layer}/{site}" for layer in range(LAYERS) for site in SITES]
    return {k: value for k in keys}


BOS_RESIDUAL = [3.0e3, 8e3, 1.4e4, 2.2e4, 3.1e4, 4.2e4, 5.0e4, 6.8e4, 7.5e4, 8.2e4, 8.8e4,
                9.3e4, 9.8e4, 1.01e5, 1.04e5, 9.9e4, 9.0e4, 8.0e4]


def overflow_verdict(prompt: str = BOS_PROMPT) -> Verdict:
    """float16 with BOS: inf at layer 7 residual_mlp (BOS, channel 163), NaN after it."""
    max_abs = table(BOS_RESIDUAL, poison_from=(8, "input_layernorm"))
    max_abs["7"]["residual_mlp"] = INF
    content = table([r / 2 for r in BOS_RESIDUAL], poison_from=(8, "attn_scores"))
    nf = NonFinite(step=0, layer=7, site="residual_mlp", position=0, token_id=2, kind="inf",
                   channel=163, terms=(55008.0, 13376.0))
    return Verdict(prompt=prompt, prompt_ids=[2, 506, 1207, 236772, 19603], add_bos=True,
                   policy="float16", finite=False, first_nonfinite=nf, max_abs=max_abs,
                   content_max_abs=content, limits=limits(F16_MAX), tokens=[], text="",
                   steps=1, stopped="nonfinite")


def finite_verdict(prompt: str, peak: float, policy: str = "float16", add_bos: bool = False,
                   limit: float = F16_MAX) -> Verdict:
    """A finite run whose residual peaks at `peak` (layer 13), content headroom limit/peak."""
    residual = [min(peak, 2e3 * (layer + 1)) for layer in range(LAYERS)]
    residual[13] = peak
    t = table(residual)
    return Verdict(prompt=prompt, prompt_ids=[506, 1207], add_bos=add_bos, policy=policy,
                   finite=True, first_nonfinite=None, max_abs=t, content_max_abs=t,
                   limits=limits(limit), tokens=[1], text=" it", steps=2, stopped="eos")


def run_summary(tmp_path: Path, extra_prompt: str = "7 billion\nparams\t\x07") -> RunSummary:
    fp16 = PolicySummary(policy="float16", dtype="float16", expected_safe=False)
    fp16.observe(overflow_verdict())
    fp16.add_finding(overflow_verdict(), "saved", str(tmp_path / "corpus/x/abc.json"),
                     ("gemma3-270m", "float16", True, 7, "residual_mlp", "bos"))
    fp16.observe(finite_verdict(extra_prompt, 3.0e4))
    fp16.observe(finite_verdict("seven billion", 1.0e4))
    fp32 = PolicySummary(policy="float32", dtype="float32", expected_safe=True)
    fp32.observe(finite_verdict(BOS_PROMPT, 1.04e5, "float32", True, F32_MAX))
    return RunSummary(model="gemma3-270m", fingerprint="ab12cd34ef56", seed=1234,
                      budget_s=3600.0, elapsed_s=3601.5, examples=4, stopped="budget",
                      device="cpu", tool_version="0.1.0", torch_version="2.13.0",
                      bounds={"max_new_tokens": 16, "max_prompt_tokens": 96},
                      policies=[fp16, fp32], corpus_dir="corpus",
                      started="2025-01-31T02:00:00+00:00")


def decoded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)',
                                                    page)]


def pixel_std(png: bytes) -> float:
    from matplotlib.image import imread

    return float(imread(io.BytesIO(png), format="png")[..., :3].std())


# --------------------------------------------------------------------------- markdown
