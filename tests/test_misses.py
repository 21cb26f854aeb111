"""The nearest misses steering edits: ranked by headroom at the sites no known signature holds."""
from __future__ import annotations

import math

import pytest

from fuzz.margin import MIN_MARGIN
from fuzz.search.misses import MissPool, closed_sites, distance, family, open_headroom
from fuzz.verdict import NonFinite, Verdict

LIMIT = 65504.0
LAYERS = 4


def verdict(prompt: str, values: dict[tuple[str, str], float], finite: bool = True) -> Verdict:
    """A finite float16 run without BOS whose content max |x| per (layer, site) is `values`."""
    table: dict[str, dict[str, float]] = {}
    for (layer, site), value in values.items():
        table.setdefault(layer, {})[site] = value
    return Verdict(prompt=prompt, prompt_ids=[1, 2], add_bos=False, policy="float16",
                   finite=finite, first_nonfinite=None, max_abs=table, content_max_abs=table,
                   limits={f"{layer}/{site}": LIMIT for layer, site in values})


def failure(prompt: str, layer: int, site: str, margin: float, position: int = 3,
            add_bos: bool = False) -> Verdict:
    """A float16 run that first overflowed at (layer, site), `margin` x the limit unrounded."""
    table = {str(layer): {site: math.inf}}
    first = NonFinite(step=0, layer=layer, site=site, position=position, token_id=7,
                      kind="inf", unrounded=margin * LIMIT)
    return Verdict(prompt=prompt, prompt_ids=[1, 2, 3, 4], add_bos=add_bos, policy="float16",
                   finite=False, first_nonfinite=first, max_abs=table, content_max_abs=table,
                   limits={f"{layer}/{site}": LIMIT})


def test_the_content_signatures_of_this_policy_and_bos_mode_close_their_sites():
    known = {
        ("fp", "float16", False, 2, "residual_mlp", "content"),
        ("fp", "float16", False, -1, "embedding", "content"),
        ("fp", "float16", False, LAYERS, "logits", "content"),
        ("fp", "float16", False, 3, "residual_attn", "bos"),  # BOS position: not content
        ("fp", "float16", True, 1, "residual_mlp", "content"),  # the other BOS mode
        ("fp", "float16-clamp", False, 0, "residual_mlp", "content"),  # another policy
    }
    assert closed_sites(known, "float16", False, LAYERS) == {
        ("2", "residual_mlp"), ("embedding", "embedding"), ("head", "logits")}


def test_open_headroom_looks_past_the_closed_sites():
    v = verdict("[[[[", {("2", "residual_mlp"): 60000.0, ("3", "residual_attn"): 30000.0})
    assert open_headroom(v, frozenset()) == LIMIT / 60000.0
    assert open_headroom(v, frozenset({("2", "residual_mlp")})) == LIMIT / 30000.0
    assert math.isinf(open_headroom(v, frozenset({("2", "residual_mlp"),
                                                   ("3", "residual_attn")})))


def test_the_pool_keeps_the_closest_at_open_sites_and_reranks_when_a_site_closes():
    near_closed = verdict("[[[[", {("2", "residual_mlp"): 64000.0, ("3", "residual_attn"): 1000.0})
    near_open = verdict("1e308", {("2", "residual_mlp"): 2000.0, ("3", "residual_attn"): 50000.0})
    far = verdict("hello", {("2", "residual_mlp"): 3000.0, ("3", "residual_attn"): 3000.0})
    pool = MissPool(keep=2)
    for v in (far, near_open, near_closed, near_closed):  # a replay must not fill the pool
        pool.offer(v)
    assert pool.prompts() == ["[[[[", "1e308"]  # least headroom anywhere first
    pool.close(frozenset({("2", "residual_mlp")}))
    assert pool.prompts() == ["1e308", "[[[["]  # past layer 2's MLP, "[[[[" is far
    pool.offer(far)  # closer than "[[[[" now at the open sites
    assert pool.prompts() == ["1e308", "hello"]


def test_the_pool_takes_only_finite_runs_with_an_open_site_measured():
    pool = MissPool(closed=frozenset({("2", "residual_mlp")}))
    pool.offer(verdict("nan", {("2", "residual_mlp"): 1.0}, finite=False))
    pool.offer(verdict("only-closed", {("2", "residual_mlp"): 65000.0}))
    assert pool.prompts() == []


def test_a_family_is_the_prompt_with_its_runs_of_one_character_cut_to_one():
    assert family("[" * 224 + "\n") == family("[" * 260 + "\n") == "[\n"
    assert family("1e308") == "1e308"
    assert family("a\n\n\nbb") == "a\nb"
    assert family("[[") != family("[]")


def test_one_family_holds_one_slot_and_its_closest_member_keeps_it():
    def run(length: int, value: float) -> Verdict:
        return verdict("[" * length + "\n", {("2", "residual_mlp"): value})

    pool = MissPool(keep=3)
    for v in (run(200, 60000.0), run(224, 61000.0), run(210, 50000.0),
              verdict("1e308", {("2", "residual_mlp"): 20000.0}),
              verdict("hello", {("2", "residual_mlp"): 3000.0})):
        pool.offer(v)
    # Without the cap the three runs would fill the pool and "hello" would be out.
    assert pool.prompts() == ["[" * 224 + "\n", "1e308", "hello"]
    pool.offer(run(230, 62000.0))  # a closer run replaces its kin, not the others
    assert pool.prompts() == ["[" * 230 + "\n", "1e308", "hello"]
    wider = MissPool(keep=3, per_family=2)
    for v in (run(200, 60000.0), run(224, 61000.0), run(210, 50000.0)):
        wider.offer(v)
    assert wider.prompts() == ["[" * 224 + "\n", "[" * 200 + "\n"]


def test_a_marginal_finding_at_an_open_site_is_as_far_as_its_margin_is_short():
    marginal = failure("1e308", 2, "residual_mlp", 1.011)
    assert distance(marginal, frozenset()) == pytest.approx(MIN_MARGIN / 1.011)
    assert distance(marginal, frozenset(), min_margin=1.05) == pytest.approx(1.05 / 1.011)
    assert math.isinf(distance(marginal, frozenset({("2", "residual_mlp")})))  # known site
    assert math.isinf(distance(failure("1e308", 2, "residual_mlp", 1.03), frozenset()))  # a case
    at_bos = failure("", 2, "residual_mlp", 1.011, position=0, add_bos=True)
    assert math.isinf(distance(at_bos, frozenset()))  # says nothing about content positions
    finite = verdict("hello", {("2", "residual_mlp"): 60000.0})
    assert distance(finite, frozenset()) == open_headroom(finite, frozenset())


def test_the_pool_edits_a_marginal_finding_until_its_site_closes():
    pool = MissPool(keep=3)
    pool.offer(verdict("far", {("2", "residual_mlp"): 30000.0}))
    pool.offer(failure("just past", 3, "residual_attn", 1.015))  # 1.005 short of 1.02
    pool.offer(verdict("near", {("2", "residual_mlp"): 64000.0}))  # headroom 1.0235
    pool.offer(failure("a case", 3, "residual_attn", 1.03))  # a finding, not a miss
    assert pool.prompts() == ["just past", "near", "far"]
    pool.close(frozenset({("3", "residual_attn")}))  # its signature became known
    assert pool.prompts() == ["near", "far"]
