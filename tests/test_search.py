"""The search (fuzz.search.round), its schedule (fuzz.search.schedule) and its progress line
(fuzz.report.progress), on synthetic models: scoring, saturation, budget shares, the hard budget and
its tail, nearest-miss mutants."""
from __future__ import annotations

import dataclasses
import io
import math
import time

import pytest
from hypothesis import find, settings
from hypothesis import strategies as st
from hypothesis.database import InMemoryExampleDatabase

from fuzz.engine.synthetic.planted import digit_run_model
from fuzz.engine.synthetic.tiny import plant_overflow, random_state, synthetic_model, tiny_config
from fuzz.engine.tokenizer.build import tiny_tokenizer
from fuzz.engine.zoo import load_model
from fuzz.precision import parse_policies
from fuzz.report.progress import Progress
from fuzz.search.accounting import ModeCounts, PolicySummary
from fuzz.search.misses import MissPool, open_headroom
from fuzz.search.proposals import Proposer
from fuzz.search.round import (
    SATURATION_PROBE,
    TARGET_CAP,
    BudgetExhausted,
    NewSignature,
    Search,
    is_saturated,
    round_strategy,
    seeded,
    steering_score,
)
from fuzz.search.schedule import MIN_ROUND_S, SHRINK_TAIL_S, TAIL_S, UNSAFE_WEIGHT, Schedule
from fuzz.session import Screened, Session
from fuzz.strategies import mutants, prompts
from fuzz.verdict import Bounds, PromptSpec, Signature

BOS_SIG = Signature("fp", "float16", True, 2, "residual_mlp", "bos")
CONTENT_SIG = Signature("fp", "float16", False, 2, "residual_mlp", "content")


@pytest.fixture(scope="module")
def bos_planted() -> Session:
    """A tiny Gemma 3 whose BOS token itself overflows in float16: every BOS-on prompt fails at
    position 0 under one signature, as Gemma 3 270M does at layer 7."""
    tok = tiny_tokenizer()
    config = tiny_config(vocab_size=tok.n_words)
    state = random_state(config, seed=1234)
    plant_overflow(state, config, tok.bos_id)
    return Session(synthetic_model("tiny-bos-planted", config, state, tok),
                   bounds=Bounds(max_new_tokens=2))


def screened(session: Session, text: str, add_bos: bool, known: set) -> Screened:
    return session.screen([PromptSpec(text, add_bos=add_bos)], "float16", known)[0]


# --- scoring -------------------------------------------------------------------------------------
def test_scores_climb_headroom_and_ignore_known_signatures(bos_planted):
    finite = screened(bos_planted, "hello", False, set())
    assert finite.verdict.finite
    expected = -math.log2(finite.verdict.min_headroom(content_only=True))
    assert steering_score([finite]) == pytest.approx(expected)
    failing = screened(bos_planted, "hello", True, set())
    known = screened(bos_planted, "hello", True, {failing.signature})
    assert failing.new and not known.new
    assert steering_score([finite, failing]) == TARGET_CAP  # a new signature tops everything
    # a known signature scores nothing: its NaN content must not pull the search to it
    assert steering_score([finite, known]) == pytest.approx(expected)
    assert steering_score([known]) == -TARGET_CAP


def test_a_new_signature_short_of_the_case_margin_scores_as_a_near_miss():
    """Steering reaches the limit in small steps: a crossing 1.01x past it is a near miss to
    push further (fuzz.search.misses.distance), not the top score; under a policy declared safe
    (case margin 0) any new signature is a finding."""
    session = Session(load_model("tiny-planted"), bounds=Bounds(max_new_tokens=2))
    failing = screened(session, "a 7", False, set())  # a content position: "7" at layer 2
    assert failing.new and failing.verdict.margin is not None
    above = failing.verdict.margin * 1.01  # a case margin this crossing falls short of
    assert steering_score([failing], case_margin=above) == pytest.approx(-math.log2(1.01))
    assert steering_score([failing], case_margin=failing.verdict.margin) == TARGET_CAP
    assert steering_score([failing], case_margin=0.0) == TARGET_CAP
    assert session.case_margin("float16") == session.min_margin  # unsafe: past the margin
    assert session.case_margin("float32") == session.case_margin("float16-clamp") == 0.0


def test_scores_look_past_the_sites_of_known_signatures(bos_planted):
    finite = screened(bos_planted, "hello", False, set())
    layer, site = finite.verdict.min_headroom_site(content_only=True)
    closed = frozenset({(layer, site)})
    past = open_headroom(finite.verdict, closed)
    assert past > finite.verdict.min_headroom(content_only=True)  # the closest site is closed
    assert steering_score([finite], closed) == pytest.approx(-math.log2(past))


def test_a_round_closes_its_known_sites_and_feeds_the_pool_it_was_given(bos_planted,
                                                                       monkeypatch):
    # outside a Hypothesis run
    monkeypatch.setattr("fuzz.search.round.target", lambda *a, **k: None)
    layers = bos_planted.model.config.num_hidden_layers
    known = {("fp", "float16", False, 1, "residual_mlp", "content"),
             ("fp", "float16", False, layers, "logits", "content"), BOS_SIG}
    pool = MissPool()
    search = Search(bos_planted, "float16", False, known, PolicySummary.for_policy("float16"),
                    deadline=math.inf, misses_pool=pool)
    assert search.closed == {("1", "residual_mlp"), ("head", "logits")}
    assert pool.closed == search.closed
    search.check(["hello there", "12"])
    assert pool.prompts() and search.live_pool == pool.prompts()
    assert all(math.isfinite(open_headroom(v, search.closed)) for v in pool.verdicts())


def test_saturation_needs_every_prompt_at_bos_under_one_known_signature():
    def counts(examples: int, known: dict) -> ModeCounts:
        return ModeCounts(examples=examples, nonfinite=sum(known.values()), known=known)

    assert is_saturated(counts(SATURATION_PROBE, {BOS_SIG: SATURATION_PROBE}))
    assert not is_saturated(counts(SATURATION_PROBE - 1, {BOS_SIG: SATURATION_PROBE - 1}))
    assert not is_saturated(counts(20, {BOS_SIG: 19}))  # one prompt ended otherwise
    assert not is_saturated(counts(20, {CONTENT_SIG: 20}))  # content positions were reached
    assert not is_saturated(counts(20, {BOS_SIG: 10, BOS_SIG._replace(layer=5): 10}))


def test_a_saturated_mode_is_given_up_after_its_probe(bos_planted):
    known = {screened(bos_planted, "x", True, set()).signature}
    summary = PolicySummary.for_policy("float16", [True])
    search = Search(bos_planted, "float16", True, known, summary, time.monotonic() + 600)
    assert search.run(prompts(max_chars=40), 200, None, b"bos-saturated", seed=1) == []
    assert search.saturated
    assert SATURATION_PROBE <= summary.mode(True).examples < 200 * 8  # stopped early


# --- the schedule --------------------------------------------------------------------------------
def test_budget_shares_give_unsafe_policies_more_and_every_mode_a_turn():
    policies = parse_policies("float16,float32")
    schedule = Schedule.plan(policies, [True, False], 400.0, started=0.0)
    shares = {m.name: m.share for m in schedule.modes}
    assert shares["float16 BOS"] == pytest.approx(UNSAFE_WEIGHT * shares["float32 BOS"])
    assert sum(shares.values()) == pytest.approx(1.0)
    seen = set()
    for _ in range(4):  # each round goes to the mode furthest behind its share
        mode = schedule.next_mode(now=1.0)
        seen.add(mode.name)
        mode.used_s += mode.share * 400.0
        mode.rounds += 1
    assert seen == set(shares)
    assert "float16 no-BOS 38%" in schedule.shares_text()


def test_a_saturated_mode_gives_its_time_to_the_others():
    schedule = Schedule.plan(parse_policies("float16"), [True, False], 100.0, started=0.0)
    bos, no_bos = schedule.modes
    bos.saturated = True
    assert schedule.next_mode(1.0) is no_bos
    no_bos.saturated = True
    assert schedule.next_mode(1.0) is None


def test_rounds_and_shrinks_end_with_the_budget():
    schedule = Schedule.plan(parse_policies("float16"), [False], 100.0, started=1000.0)
    [mode] = schedule.modes
    assert schedule.round_deadline(mode, 1095.0) == schedule.hard_deadline == 1100.0
    assert schedule.round_deadline(mode, 1000.0) == 1100.0  # its whole share
    mode.used_s = 100.0
    assert schedule.round_deadline(mode, 1050.0) == 1050.0 + MIN_ROUND_S
    assert schedule.next_mode(1100.0) is None
    assert schedule.shrink_deadline == 1100.0 + SHRINK_TAIL_S
    assert schedule.hard_deadline < schedule.minimize_deadline < schedule.hard_deadline + TAIL_S


def test_one_findings_shrink_and_minimizing_get_a_tenth_of_the_budget_at_least_20s():
    assert Schedule.plan(parse_policies("float16"), [False], 480.0, 0.0).finding_limit_s == 48.0
    assert Schedule.plan(parse_policies("float16"), [False], 60.0, 0.0).finding_limit_s == 20.0


def test_a_shrink_past_its_own_limit_hands_over_its_best_prompt(bos_planted, monkeypatch):
    """However far the job's deadline is, one finding's shrink ends at shrink_limit_s."""
    # outside a Hypothesis run
    monkeypatch.setattr("fuzz.search.round.target", lambda *a, **k: None)
    summary = PolicySummary.for_policy("float16", [True])
    search = Search(bos_planted, "float16", True, set(), summary, deadline=math.inf,
                    shrink_deadline=math.inf, shrink_limit_s=0.0)
    with pytest.raises(NewSignature):  # BOS overflows in this model: a first, new signature
        search.check(["x"])
    [pending] = search.pending.values()
    with pytest.raises(BudgetExhausted):
        search.check(["hello"])
    assert search.pending == {pending.screened.signature: pending}


def test_a_shrink_past_its_deadline_hands_over_its_best_prompt(bos_planted):
    summary = PolicySummary.for_policy("float16", [False])
    now = time.monotonic()
    search = Search(bos_planted, "float16", False, set(), summary, deadline=now - 1,
                    shrink_deadline=now - 1)
    search.pending[CONTENT_SIG] = object()  # a shrink in progress
    with pytest.raises(BudgetExhausted):
        search.check(["hello"])


# --- mutants of the nearest misses ---------------------------------------------------------------
def test_mutants_edit_the_pool_and_shrink_to_one_deletion():
    pool = ["the tensor is 4096", "x"]
    drawn = find(mutants(pool), lambda t: t != pool[0] and "tensor" in t,
                 settings=settings(database=None, max_examples=200))
    assert drawn in {pool[0][1:], pool[0][:-1]} or len(drawn) == len(pool[0]) - 1


def test_mutants_read_the_pool_when_they_draw_and_splice_into_nothing_while_it_is_empty():
    pool: list[str] = []
    strategy = mutants(pool)
    # The profile's 25 examples can all miss a splice (a suite run failed so, 2026-12-02): find()
    # stops at the first match anyway.
    enough = settings(database=None, max_examples=1000)
    spliced = find(strategy, lambda t: len(t) > 0, settings=enough)
    assert spliced  # only a splice gives text while the pool is empty
    pool.append("the tensor is 4096")  # the same strategy now edits what the pool holds
    drawn = find(strategy, lambda t: "tensor" in t, settings=enough)
    assert drawn in {pool[0][1:], pool[0][:-1]} or len(drawn) == len(pool[0]) - 1


def test_the_live_pool_follows_the_misses_and_freezes_while_a_failure_is_pending(bos_planted,
                                                                                monkeypatch):
    # outside a Hypothesis run
    monkeypatch.setattr("fuzz.search.round.target", lambda *a, **k: None)
    summary = PolicySummary.for_policy("float16", [False])
    search = Search(bos_planted, "float16", False, set(), summary, deadline=math.inf)
    pool = search.live_pool
    assert pool == []
    search.check(["hello there", "12"])
    assert pool == search.pool() and pool  # refreshed in place after the batch
    failing = screened(bos_planted, "x", True, set())  # BOS overflows in this model
    # a failure being shrunk: Hypothesis's replays must draw the same prompts
    search.pending[CONTENT_SIG] = NewSignature(failing, PromptSpec("x", add_bos=True))
    before = list(pool)
    search.check(["the tensor is 4096"])
    assert pool == before and search.pool() != before


def test_nearest_misses_are_kept_per_bos_mode(bos_planted):
    summary = PolicySummary.for_policy("float16")
    for text in ("a", "b", "c", "d", "e", "f"):
        summary.observe(screened(bos_planted, text, False, set()).verdict)
    summary.observe(screened(bos_planted, "a", True, set()).verdict)  # non-finite: no miss
    search = Search(bos_planted, "float16", False, set(), summary, time.monotonic())
    assert len(search.pool()) == 5 and all(isinstance(t, str) for t in search.pool())


# --- seeds, databases and the progress line ------------------------------------------------------
def test_a_seeded_round_keeps_its_example_database():
    db = InMemoryExampleDatabase()

    @settings(database=db, max_examples=5)
    def body(x):
        pass

    from hypothesis import given

    test = seeded(given(st.integers())(body), 7, db)
    assert test._hypothesis_internal_use_settings.database is db  # @seed would drop it
    unseeded = seeded(given(st.integers())(body), 7, None)
    assert unseeded._hypothesis_internal_use_seed == 7


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_line_names_the_mode_and_only_figures_that_exist(monkeypatch):
    progress = Progress(480.0, time.monotonic() - 10.0, quiet=False, stream=_Terminal())
    progress.tick("float16 no-BOS", 23, 0, math.inf)
    first = progress.bar.desc
    progress.tick("float16 no-BOS", 40, 1, 1.04)
    second = progress.bar.desc
    progress.tick("float32 BOS", 41, 1, 0.63, "float16")  # a wider dtype: against float16's
    third = progress.bar.desc
    progress.close()
    assert third.endswith("best headroom 0.63 (vs float16)")
    assert first.startswith("| float16 no-BOS | screened 23") and "headroom" not in first
    assert ", " not in first and "findings 0" in first
    assert second.endswith("best headroom 1.04")


# --- the gradient arm -------------------------------------------------------------------------
def test_the_round_strategy_screens_proposals_as_they_are():
    proposed = ["0000 0000 7", "kernel 65504"]
    fresh = st.just("fresh")
    for wanted in proposed:
        assert find(round_strategy(fresh, [], proposed), lambda t, w=wanted: t == w,
                    settings=settings(database=None, max_examples=200)) == wanted
    pool: list[str] = []  # empty now, filled by the search later: the mutant arm is there
    assert find(round_strategy(fresh, pool, []), lambda t: t != "fresh",
                settings=settings(database=None, max_examples=200)) != "fresh"


def test_the_proposer_proposes_once_per_near_miss_and_only_on_the_builtin_engine():
    session = Session(digit_run_model(8), bounds=Bounds(max_new_tokens=1))
    near = session.run([PromptSpec("a " + "0" * 7)], "float16")[0]
    assert near.finite
    proposer = Proposer(session, k=4)
    first = proposer.for_round([near])
    assert 0 < len(first) <= 4 and all(t != near.prompt for t in first)
    assert all(session.runnable(PromptSpec(t)) for t in first)
    assert proposer.for_round([near]) == first  # the same miss is not proposed from again
    elsewhere = Proposer(dataclasses.replace(session, engine_kind="upstream"))
    assert elsewhere.for_round([near]) == []
