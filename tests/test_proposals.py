"""Gradient-guided proposals (fuzz.search.proposals) on the planted digit-run model: the gradient
of a near miss's worst site points at the trigger, and screening the proposals finds the
overflow."""
from __future__ import annotations

import random

import pytest
import torch

from fuzz.engine.synthetic.planted import (
    DIGIT_RUN_LAYER,
    PLANTED_SITE,
    digit_token_ids,
    longest_digit_run,
)
from fuzz.engine.zoo import load_model
from fuzz.precision import get_policy
from fuzz.search.proposals import (
    NotANearMiss,
    _candidates,
    fed_tokens,
    propose,
    random_swaps,
    rank_swaps,
    usable_mask,
)
from fuzz.session import Session
from fuzz.verdict import Bounds, PromptSpec, Verdict

RUN = 8
# Seven digits (RUN - 1) with a non-digit before them inside the window: a near miss whose
# trigger is one swap away ("▁" -> a digit makes a run of RUN).
NEAR_MISSES = ("ab 1234567 cd", "x1234567", "the 7777777 and more")


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(load_model(f"tiny-digit-run-{RUN}"), bounds=Bounds(max_new_tokens=2))


def near_miss(session: Session, text: str, add_bos: bool = True) -> Verdict:
    [v] = session.run([PromptSpec(text, add_bos=add_bos)], "float16")
    assert v.finite and v.min_headroom(content_only=True) < 1.01  # a near miss indeed
    return v


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_the_gradient_points_at_the_trigger_and_screening_finds_it(session: Session,
                                                                   text: str) -> None:
    v = near_miss(session, text)
    ranked = rank_swaps(session, v, k=8)
    assert (ranked.layer, ranked.site) == (DIGIT_RUN_LAYER, PLANTED_SITE)
    digits = set(digit_token_ids(session.model.tokenizer))
    # The run's last digit is where |x| peaks; the non-digit just before the run shares its window.
    before_run = _non_digit_before_run(v.prompt_ids, digits)
    best = ranked.edits[0]
    assert best.position == before_run and best.new_id in digits
    assert any(longest_digit_run(t) >= RUN for t in ranked.texts)
    screened = session.run([PromptSpec(t) for t in ranked.texts], "float16")
    hits = [s.first_nonfinite for s in screened if s.nonfinite]
    assert hits and all((h.layer, h.site) == (DIGIT_RUN_LAYER, PLANTED_SITE) for h in hits)


def _non_digit_before_run(ids: list[int], digits: set[int]) -> int:
    """The position of the non-digit token right before the (only) run of digits."""
    first_digit = next(i for i, t in enumerate(ids) if t in digits)
    return first_digit - 1


def test_random_swaps_are_single_swaps_that_retokenize(session: Session) -> None:
    v = near_miss(session, NEAR_MISSES[0])
    texts = random_swaps(session, v, 8, random.Random(0))
    assert len(texts) == 8 and len(set(texts)) == 8
    for t in texts:  # single swaps that re-tokenize to as many ids
        assert len(session.model.tokenizer.encode(t)) == len(v.prompt_ids)


@pytest.mark.parametrize("k", [1, 3, 20])
def test_k_is_respected(session: Session, k: int) -> None:
    v = near_miss(session, NEAR_MISSES[0])
    texts = propose(session, v, k)
    # On this model only a digit before the run raises the max (ten of them): every other swap
    # is estimated to lower it or (outside the window) to change nothing, and is not proposed.
    assert len(texts) == min(k, 10) and len(set(texts)) == len(texts)
    assert v.prompt not in texts
    assert all(longest_digit_run(t) == RUN for t in texts)


def test_spread_takes_each_positions_best_first() -> None:
    scores = torch.tensor([[5.0, 4.0, -torch.inf], [3.0, 2.0, 1.0]])
    assert _candidates(scores, 10, spread=True) == [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2)]
    assert _candidates(scores, 10, spread=False) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert _candidates(scores, 3, spread=True) == [(0, 0), (1, 0), (0, 1)]  # max_tries


def test_proposals_never_contain_control_or_byte_pieces(session: Session) -> None:
    tok = session.model.tokenizer
    sp = tok.sp_model
    mask = usable_mask(tok)
    for special in (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id):
        assert not mask[special]
    assert not any(mask[i] for i in range(tok.n_words)
                   if sp.IsControl(i) or sp.IsByte(i) or sp.IsUnknown(i))
    assert all(not tok.piece(i).startswith("<0x") for i in torch.nonzero(mask).flatten().tolist())
    for text in NEAR_MISSES:
        v = near_miss(session, text)
        ranked = rank_swaps(session, v, 64)
        assert ranked.edits
        for e in ranked.edits:
            assert mask[e.new_id]
            ids = tok.encode(e.text)  # the text re-encodes to the edited ids exactly
            assert ids[e.position] == e.new_id and ids[:e.position] == v.prompt_ids[:e.position]
        for t in random_swaps(session, v, 64, random.Random(1)):  # the baseline's pieces too
            ids = tok.encode(t)
            assert [i for i, (a, b) in enumerate(zip(ids, v.prompt_ids)) if a != b] and \
                all(mask[i] for i, old in zip(ids, v.prompt_ids) if i != old)


def test_a_verdict_that_overflowed_is_refused(session: Session) -> None:
    [v] = session.run([PromptSpec("ab 12345678 cd")], "float16")
    assert v.nonfinite
    with pytest.raises(NotANearMiss, match="non-finite.*not a near miss"):
        propose(session, v)


def test_bad_requests_are_refused(session: Session) -> None:
    v = near_miss(session, NEAR_MISSES[0])
    with pytest.raises(ValueError, match="k must be >= 1"):
        propose(session, v, 0)
    [chat] = session.run([PromptSpec("1234567", chat=True)], "float16")
    with pytest.raises(ValueError, match="plain encoding"):
        propose(session, chat)
    [empty] = session.run([PromptSpec("")], "float16")  # BOS alone: nothing to edit
    with pytest.raises(NotANearMiss):
        propose(session, empty)


def test_the_objective_is_the_float32_runs_max_at_the_site(session: Session) -> None:
    """The captured site, reduced over content positions, is what the probe measures."""
    bounds = Bounds(max_new_tokens=1)  # the prefill alone: no generated token to teacher-force
    spec = PromptSpec(NEAR_MISSES[0])
    [v16] = session.run([spec], "float16", bounds)
    [v32] = session.run([spec], "float32", bounds)
    ranked = rank_swaps(session, v16, 1)
    expected = v32.content_max_abs[str(ranked.layer)][ranked.site]
    assert ranked.objective == pytest.approx(expected, rel=1e-6)
    assert fed_tokens(v16) == []


def test_gradients_leave_the_shared_model_frozen(session: Session) -> None:
    v = near_miss(session, NEAR_MISSES[1])
    engine = session.model.engine(get_policy("float32"), session.device, "builtin")
    propose(session, v)
    assert all(not p.requires_grad and p.grad is None for p in engine.parameters())
    assert torch.is_grad_enabled()  # the caller's grad mode is untouched
    [again] = session.run([PromptSpec(v.prompt)], "float16")
    assert again.content_max_abs == v.content_max_abs


def test_fed_tokens_are_the_decode_steps_inputs() -> None:
    v = Verdict(prompt="x", prompt_ids=[2, 7], add_bos=True, policy="float16", finite=True,
                first_nonfinite=None, max_abs={}, content_max_abs={}, tokens=[11, 12, 13],
                steps=3)
    assert fed_tokens(v) == [11, 12]  # the third token was generated, never fed
