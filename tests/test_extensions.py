"""`fuzz run --extend` (fuzz.search.extensions): the nearest miss's one-token extensions. On the
digit-run family a run of RUN-1 digits after BOS is the nearest miss one token from its trigger:
the arm must find the digits among the whole vocabulary, and offer the closest finite extension."""
from __future__ import annotations

import argparse

import pytest

from fuzz.engine.synthetic.planted import digit_token_ids
from fuzz.engine.zoo import load_model
from fuzz.precision import get_policy
from fuzz.run import FuzzJob
from fuzz.search.extensions import ExtensionArm
from fuzz.session import ModelOptions, Session
from fuzz.verdict import Bounds, PromptSpec

RUN = 4


def test_the_arm_finds_the_trigger_among_the_whole_vocabulary():
    model = load_model(f"tiny-digit-run-{RUN}")
    session = Session(model, bounds=Bounds(max_new_tokens=2))
    miss = session.check(PromptSpec("0" * (RUN - 1), add_bos=True), "float16")
    assert miss.finite and len(miss.prompt_ids) == RUN  # BOS and RUN-1 digits
    arm = ExtensionArm(session, seed=0, per_round=model.tokenizer.n_words)
    found = arm.round(miss, get_policy("float16"), known=set())
    assert arm.tokens == model.tokenizer.n_words
    failing = [(spec, s) for spec, s in found if not s.verdict.finite]
    digits = {model.tokenizer.decode([t]) for t in digit_token_ids(model.tokenizer)}
    assert failing and all(spec.text[:-1] == "0" * (RUN - 1) and spec.text[-1] in digits
                           for spec, _ in failing)
    assert all(s.new and s.verdict.first_nonfinite.position == RUN for _, s in failing)
    closest = [s for _, s in found if s.verdict.finite]
    assert len(closest) == 1  # the closest finite extension, for the nearest misses
    # the next round on the same miss takes the next slice of its permutation
    small = ExtensionArm(session, seed=0, per_round=100)
    small.round(miss, get_policy("float16"), set())
    first = small._cursor[tuple(miss.prompt_ids)]
    small.round(miss, get_policy("float16"), set())
    assert (first, small._cursor[tuple(miss.prompt_ids)]) == (100, 200)


def test_extend_is_refused_on_another_engine():
    args = argparse.Namespace(long=False, batch_size=8, extend=True, min_margin=1.02)
    with pytest.raises(ValueError, match="--extend runs the built-in engine only"):
        FuzzJob.from_args(args, ModelOptions(spec="tiny", engine="upstream"), Bounds())


def test_a_run_with_extend_saves_what_only_the_arm_can_reach(tmp_path, monkeypatch):
    """The rounds draw only a non-digit prompt (the strategy replaced), so the digit run is out
    of their reach; the seed prompt (RUN-1 digits after BOS) becomes the nearest miss, and the
    arm's digit extension is the finding, saved as "extended"."""
    from hypothesis import strategies as st

    import fuzz.run
    from fuzz.corpus import Corpus
    from fuzz.precision import parse_policies

    run = 6
    monkeypatch.setattr(fuzz.run, "round_strategy",
                        lambda fresh, *args, **kwargs: st.just("abc"))
    session = Session(load_model(f"tiny-digit-run-{run}"), bounds=Bounds(max_new_tokens=2))
    job = FuzzJob(session, parse_policies("float16"), [True], 20.0, Corpus(tmp_path / "corpus"),
                  None, 0, 40, None, quiet=True, extend=True)
    job.seed_texts = ["0" * (run - 1)]
    job.main()
    findings = job.summaries["float16"].findings
    assert [(f.how, f.status) for f in findings] == [("extended", "saved")]
    assert findings[0].verdict.prompt.startswith("0" * (run - 1))
    assert job._extender.tokens >= session.model.tokenizer.n_words
