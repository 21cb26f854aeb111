"""The precision policies' numerics on the built-in engine (fuzz.precision, fuzz.engine.model):
the shipped fixes do what their sources did, and plans name the layers they widen."""
from __future__ import annotations

import json

import pytest
import torch

from fuzz.engine.interface import prompt_batch
from fuzz.engine.model import full_logits
from fuzz.engine.synthetic.planted import DIGIT_RUN_LAYER, digit_run_model, minimal_trigger
from fuzz.engine.zoo import load_model
from fuzz.precision import (
    ONNXRUNTIME_CLIP,
    POLICIES,
    get_policy,
    parse_policies,
    plan_policy,
)


class SiteMax:
    """Max |x| per (layer, site) and the dtype each site's tensor had."""

    def __init__(self) -> None:
        self.peak: dict[tuple[int, str], float] = {}
        self.dtype: dict[tuple[int, str], torch.dtype] = {}

    def site(self, layer: int, name: str, x: torch.Tensor) -> None:
        self.peak[layer, name] = float(x.detach().abs().float().nan_to_num(posinf=1e30).max())
        self.dtype[layer, name] = x.dtype

    def residual(self, layer: int, name: str, residual: torch.Tensor, branch: torch.Tensor,
                 out: torch.Tensor) -> None:
        self.site(layer, name, out)


def record(model, policy: str, text: str) -> tuple[SiteMax, torch.Tensor]:
    engine = model.engine(get_policy(policy))
    ids = torch.tensor([model.tokenizer.encode(text, bos=True)])
    rec = SiteMax()
    logits = engine(prompt_batch(ids), engine.new_cache(1, ids.shape[1]), rec, last_only=False)
    return rec, logits


@pytest.fixture(scope="module")
def planted():
    return digit_run_model(8)


def test_clip32752_clips_the_residual_adds_only(planted) -> None:
    rec, logits = record(planted, "float16-clip32752", minimal_trigger(8))
    assert torch.isfinite(logits).all()
    # the planted add would overflow; clipped, it sits exactly at onnxruntime's bound
    assert rec.peak[DIGIT_RUN_LAYER, "residual_mlp"] == ONNXRUNTIME_CLIP
    adds = [v for (_, name), v in rec.peak.items() if name.startswith("residual")]
    assert max(adds) <= ONNXRUNTIME_CLIP
    # norm outputs are not clamped (float16-clamp clamps them, at 64504)
    clamp = get_policy("float16-clamp").numerics
    assert clamp.clamp_norms and not get_policy("float16-clip32752").numerics.clamp_norms


def test_fp32_norm_residual_gives_float32_logits_and_a_float32_final_norm(planted) -> None:
    rec, logits = record(planted, "float16-fp32-norm-residual", minimal_trigger(8))
    last = planted.config.num_hidden_layers
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert rec.dtype[last, "final_norm"] == torch.float32
    assert rec.dtype[0, "residual_attn"] == torch.float32
    assert rec.dtype[0, "qkv"] == torch.float16  # matmuls stay float16
    rec_residual, logits_residual = record(planted, "float16-fp32-residual", minimal_trigger(8))
    assert logits_residual.dtype == torch.float16
    assert rec_residual.dtype[last, "final_norm"] == torch.float16
    # the same residual stream: only the head differs, and only by float16's rounding
    assert rec.peak[DIGIT_RUN_LAYER, "residual_mlp"] == rec_residual.peak[DIGIT_RUN_LAYER,
                                                                         "residual_mlp"]
    torch.testing.assert_close(logits, logits_residual.float(), atol=2e-2, rtol=2e-3)


def test_a_plan_of_every_layer_is_float16_fp32_residual_bit_for_bit() -> None:
    model = load_model("tiny")
    every = plan_policy(range(model.config.num_hidden_layers))
    ids = torch.tensor([model.tokenizer.encode("12345 hello 678", bos=True)])
    got = full_logits(model.engine(every), ids)
    want = full_logits(model.engine(get_policy("float16-fp32-residual")), ids)
    assert torch.equal(got, want)


def test_a_plan_widens_only_its_layers(planted) -> None:
    plan = f"float16-fp32-layers:{DIGIT_RUN_LAYER}"
    rec, logits = record(planted, plan, minimal_trigger(8))
    assert rec.dtype[DIGIT_RUN_LAYER, "residual_mlp"] == torch.float32
    others = {layer for (layer, name) in rec.dtype if name == "residual_mlp"} - {DIGIT_RUN_LAYER}
    assert others and all(rec.dtype[layer, "residual_mlp"] == torch.float16 for layer in others)
    # the planted add exceeds float16's range inside the widened layer, finite there; the
    # stream never comes back down in this model, so the next layer's entry cast overflows: a
    # plan must widen every layer up to where the stream fits float16 again
    assert rec.peak[DIGIT_RUN_LAYER, "residual_mlp"] > 65504
    assert not torch.isfinite(logits).all()
    layers = range(DIGIT_RUN_LAYER, planted.config.num_hidden_layers)
    _, logits = record(planted, plan_policy(layers).name, minimal_trigger(8))
    assert torch.isfinite(logits).all()


def test_plan_names_are_canonical_and_round_trip() -> None:
    policy = get_policy("float16-fp32-layers:9+7+9")
    assert policy.name == "float16-fp32-layers:7+9"
    assert policy.numerics.residual_layers == frozenset({7, 9})
    assert get_policy(policy.name) == policy
    assert [p.name for p in parse_policies("float16,float16-fp32-layers:3+4")] == [
        "float16", "float16-fp32-layers:3+4"]
    assert not policy.faithful and policy.dtype == torch.float16


def test_plan_files_load_and_bad_ones_say_how_to_fix_them(tmp_path) -> None:
    good = tmp_path / "plan.json"
    good.write_text(json.dumps({"fp32_layers": [8, 7]}))
    assert get_policy(f"plan:{good}").name == "float16-fp32-layers:7+8"
    with pytest.raises(ValueError, match="cannot read the plan file.*advise --plan"):
        get_policy(f"plan:{tmp_path / 'missing.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"layers\": [1]}")
    with pytest.raises(ValueError, match="not a plan file"):
        get_policy(f"plan:{bad}")
    bad.write_text("{\"fp32_layers\": [\"7\"]}")
    with pytest.raises(ValueError, match="list of layer numbers"):
        get_policy(f"plan:{bad}")
    with pytest.raises(ValueError, match="layer numbers, e.g."):
        get_policy("float16-fp32-layers:7,8")
    with pytest.raises(ValueError, match="at least one layer"):
        plan_policy([])
    with pytest.raises(ValueError, match="plan:FILE.json"):
        get_policy("float16-fp32")


@pytest.mark.parametrize("name", ["float16-clip32752", "float16-fp32-norm-residual"])
def test_the_shipped_fixes_are_declared_safe_and_name_their_source(name: str) -> None:
    policy = POLICIES[name]
    assert policy.expected_safe and policy.dtype == torch.float16 and not policy.faithful
    assert "onnxruntime" in policy.description and "#" in policy.description
