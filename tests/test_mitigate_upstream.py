"""Mitigated policies on google/gemma_pytorch's GemmaForCausalLM (fuzz.engine.upstream.mitigate,
through fuzz.engine.mitigate_layers): `--engine upstream --policy <mitigation>` and
fuzz.mitigate.apply on a user's gemma_pytorch model; and what apply's handle says it changed, on
every kind of model.

The upstream engine is faithful to the built-in one op for op in the plain policies
(tests/test_upstream.py: verdicts, first non-finite value, tokens, steps and max |x| table equal);
under every mitigation it must agree as strictly, on the tiny Gemma 1/2/3 models (the planted
trigger "7" included). Needs gemma_pytorch: skipped without it, or failing when
GEMMA_FUZZ_REQUIRE_UPSTREAM=1 (tests/test_upstream.py's gate).
"""
from __future__ import annotations

import pytest
import torch
from test_mitigate import (
    MITIGATED,
    PLANS,
    SPECS,
    TINY,
    replay_runs_the_mitigations,
    tiny_transformers,
)
from test_upstream import assert_same_verdict, requires_upstream

from fuzz.engine.model import full_logits, materialize
from fuzz.engine.synthetic.tiny import PLANTED_TRIGGER
from fuzz.engine.zoo import load_model
from fuzz.mitigate import apply
from fuzz.precision import get_policy
from fuzz.verdict import Bounds


# --- gemma_pytorch: the upstream engine and apply() on its model -------------------------------
@requires_upstream
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("policy", MITIGATED + PLANS)
def test_the_upstream_engine_runs_each_mitigation_as_the_builtin_engine(name, policy):
    """Each prompt alone (upstream runs no padded batch), explained, on both engines."""
    model = load_model(name)
    chosen, bounds = get_policy(policy), Bounds(max_new_tokens=4)
    ours, theirs = model.engine(chosen), model.engine(chosen, "cpu", "upstream")
    assert theirs.numerics == chosen.numerics and theirs.mitigation.active
    verdicts = [assert_same_verdict(ours, theirs, model.tokenizer, spec, bounds, policy)
                for spec in SPECS]
    if name == "tiny-planted":  # the trigger: what holds and what does not
        fails = policy in PLANS[1:]
        assert [v.status for v in verdicts[:2]] == ["nonfinite" if fails else "finite"] * 2


def bare_upstream(name: str, dtype: torch.dtype = torch.float16):
    """A user's gemma_pytorch GemmaForCausalLM (built as upstream's run.py does), unmitigated, and
    the engine around it (its forward only calls the model)."""
    from fuzz.engine.upstream.engine import UpstreamEngine

    loaded = load_model(name)
    engine = UpstreamEngine(loaded.config, loaded.state, dtype, "cpu",
                            loaded.tokenizer.serialized_model_proto())
    return loaded, engine


@requires_upstream
@pytest.mark.parametrize("name", ["tiny-planted", "tiny-gemma1"])
def test_apply_on_a_bare_upstream_model_and_remove_restores_it(name):
    loaded, engine = bare_upstream(name)
    model = engine.upstream_model
    ids = torch.tensor([loaded.tokenizer.encode(f"a {PLANTED_TRIGGER} b, a longer prompt")])
    plain = full_logits(engine, ids)
    for policy in MITIGATED + PLANS[:1]:
        chosen = get_policy(policy)
        with apply(model, policy) as handle:
            got = full_logits(engine, ids)
            with pytest.raises(RuntimeError, match="already runs a mitigation.*remove()"):
                apply(model, "float16-clamp")
        expected = full_logits(materialize(loaded.config, loaded.state, torch.float16,
                                           chosen.numerics), ids)
        assert torch.isfinite(got).all() and torch.equal(got, expected), policy
        assert got.dtype == (torch.float32 if chosen.numerics.float32_logits else torch.float16)
        assert not handle.active
    # Removed: every forward is the class's again, no pre-hook is left, and the model computes
    # what it computed before (on tiny-planted: the overflow).
    for module in model.modules():
        assert "forward" not in module.__dict__ and not module._forward_pre_hooks
    assert not hasattr(model, "_gemma_fuzz_mitigation")
    again = full_logits(engine, ids)
    assert torch.equal(again, plain) or (name == "tiny-planted"
                                         and not torch.isfinite(again).any())
    if name == "tiny-planted":
        assert not torch.isfinite(plain).all()
    with pytest.raises(ValueError, match=r"torch.float32 but policy 'float16-clamp' runs in "
                       r"torch.float16.*model.to\(torch.float16\)"):
        apply(bare_upstream(name, torch.float32)[1].upstream_model, "float16-clamp")


# --- what the handle says ----------------------------------------------------------------------
def test_the_handle_says_what_it_changed():
    """`changes` (a line per kind of module) and str()/repr() (one paragraph), on each model."""
    loaded, model = tiny_transformers("tiny")
    n = loaded.config.num_hidden_layers
    with apply(model, "float16-clamp") as handle:
        assert handle.changes[0] == (f"{n} decoder layers' forward re-stated (float16-clamp: "
                                     "residual adds and norm outputs clamped to ±64504)")
        # Four per Gemma 3 layer (its q/k norms are left alone); the final norm has its line.
        assert handle.changes[1].startswith(f"{4 * n} RMSNorm forwards: ")
        assert handle.changes[1].endswith("clamped to ±64504")
        assert handle.changes[2] == "final norm: output in float16, unclamped"
        text = str(handle)
        assert text.startswith("Policy float16-clamp (residual adds and norm outputs clamped to "
                               "±64504) applied to Gemma3ForCausalLM. Changed: ")
        assert "\n" not in text and repr(handle) == f"<Mitigation {text}>"
    assert str(handle).startswith("Policy float16-clamp") and "removed from" in str(handle)
    with apply(model, "float16-fp32-norm-residual") as handle:
        assert handle.changes[-1] == "lm_head: float32 logits (its weight read as float32)"
        assert "residual stream in float32; final norm and logits in float32" in str(handle)
    with apply(model, "float16-fp32-layers:1+2") as handle:
        assert "residual stream in float32 at layers 1, 2 only (float16 elsewhere)" in \
            handle.changes[0]
    with apply(model, "float16") as handle:  # a plain policy: nothing to say but that
        assert handle.changes == [] and "nothing changed" in str(handle)
    builtin = materialize(loaded.config, loaded.state, torch.float16)
    with apply(builtin, "float16-clip32752") as handle:
        assert handle.changes == ["numerics set to residual adds clamped to ±32752"]
        assert str(handle) == ("Policy float16-clip32752 (residual adds clamped to ±32752) "
                               "applied to the built-in GemmaForCausalLM. Changed: numerics set "
                               "to residual adds clamped to ±32752.")


@requires_upstream
def test_the_upstream_handle_says_what_it_changed():
    loaded, engine = bare_upstream("tiny-gemma2")
    with apply(engine.upstream_model, "float16-fp32-norm-residual") as handle:
        n = loaded.config.num_hidden_layers
        assert handle.changes == [
            f"{n} decoder layers' forward re-stated (float16-fp32-norm-residual: residual "
            "stream in float32; final norm and logits in float32)",
            f"{4 * n} RMSNorm forwards: computed on a float32 input, output in float16 "
            "(pre-norms) or the residual stream's dtype (post-norms), unclamped",
            "final norm: output in float32, unclamped",
            "sampler: float32 logits (the embedding read as float32)"]
        assert str(handle).startswith("Policy float16-fp32-norm-residual (residual stream in "
                                      "float32; final norm and logits in float32) applied to "
                                      "GemmaForCausalLM. Changed: ")


@requires_upstream
def test_cli_runs_a_mitigation_on_the_upstream_engine(capsys):
    from fuzz.cli import main

    assert main(["check", "--model", "tiny-planted", "--engine", "upstream", "--policy",
                 "float16-clamp", "--prompt", PLANTED_TRIGGER, "--max-new-tokens", "2"]) == 0
    assert main(["check", "--model", "tiny-planted", "--engine", "upstream", "--policy",
                 "float16-fp32-layers:0+1", "--prompt", PLANTED_TRIGGER,
                 "--max-new-tokens", "2"]) == 1
    assert "residual_mlp" in capsys.readouterr().out


@requires_upstream
def test_replay_checks_the_mitigated_policies_on_the_upstream_engine(tmp_path):
    replay_runs_the_mitigations(tmp_path, "upstream")
