"""Root causes (fuzz.rootcause): a finding's mechanism — the overflowing channel and the kind of
position — groups signatures that differ only by layer, and splits one layer's different
channels. Position kinds on hand-made records and on the planted tiny models; the committed
Gemma 3 270M corpus grouped without a model."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from report_data import overflow_verdict, run_summary

from fuzz.corpus import Corpus, root_cause
from fuzz.corpus.replay import ReplayRow, root_cause_lines
from fuzz.report import Finding, RunSummary, render_html, render_markdown
from fuzz.rootcause import (
    RootCause,
    counts_text,
    group_root_causes,
    group_text,
    position_kind,
    token_piece,
)
from fuzz.session import ModelOptions, Session
from fuzz.verdict import Bounds, NonFinite, PromptSpec, Signature, Verdict

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
FP = "f" * 32


def nonfinite(position: int, step: int = 0, layer: int = 10, channel: int | None = 163,
              site: str = "residual_mlp", token_id: int = 236743) -> NonFinite:
    return NonFinite(step=step, layer=layer, site=site, position=position, token_id=token_id,
                     kind="inf", channel=channel)


def verdict(first: NonFinite, prompt_length: int = 5, add_bos: bool = False,
            policy: str = "float16") -> Verdict:
    return Verdict(prompt="p", prompt_ids=list(range(prompt_length)), add_bos=add_bos,
                   policy=policy, finite=False, first_nonfinite=first, max_abs={},
                   content_max_abs={})


def finding(first: NonFinite, add_bos: bool = False, piece: str | None = None) -> Finding:
    v = verdict(first, add_bos=add_bos)
    sig = v.signature(FP)
    assert sig is not None
    return Finding(v, "saved", None, sig, piece=piece)


# --------------------------------------------------------------------------- position kinds

@pytest.mark.parametrize(("step", "position", "length", "add_bos", "kind"), [
    (0, 0, 5, True, "bos"),
    (0, 1, 5, True, "first token"),  # the first content token after BOS
    (0, 0, 5, False, "first token"),  # position 0 without BOS
    (0, 0, 1, False, "first token"),  # a one-token prompt: first wins over last
    (0, 4, 5, True, "last prompt token"),
    (0, 4, 5, False, "last prompt token"),
    (2, 6, 5, False, "decode step"),  # the input of decode step 2: the 2nd generated token
    (1, 5, 5, True, "decode step"),
    (0, 2, 5, True, "other"),
    (0, 3, 5, False, "other"),  # next to the last: not the last
])
def test_position_kind(step, position, length, add_bos, kind) -> None:
    assert position_kind(nonfinite(position, step), length, add_bos) == kind
    cause = RootCause.of_verdict(verdict(nonfinite(position, step), length, add_bos), FP)
    assert cause is not None and cause.position_kind == kind and cause.channel == 163


def test_a_finite_verdict_has_no_root_cause() -> None:
    finite = dataclasses.replace(verdict(nonfinite(0)), first_nonfinite=None, finite=True)
    assert RootCause.of_verdict(finite, FP) is None


def test_an_unknown_position_kind_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'middle' is not one of 'bos', 'first token'"):
        RootCause(FP, "float16", 163, "middle", "residual_mlp")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def planted() -> Session:
    return Session.open(ModelOptions("tiny-planted", device="cpu"))


@pytest.mark.parametrize(("text", "add_bos", "kind"), [
    ("7", True, "first token"), ("7", False, "first token"), ("a 7", True, "last prompt token"),
    ("a 7", False, "last prompt token"), ("hello 7 there", True, "other"),
])
def test_position_kinds_on_the_planted_model(planted: Session, text, add_bos, kind) -> None:
    """tiny-planted overflows at its "7" token wherever it stands: the kind follows it, and the
    piece is the tokenizer's."""
    v = planted.check(PromptSpec(text, add_bos=add_bos), "float16", Bounds(max_new_tokens=2))
    cause = RootCause.of_verdict(v, planted.model.fingerprint,
                                 token_piece(planted.model.tokenizer, v.first_nonfinite))
    assert cause is not None
    assert (cause.position_kind, cause.piece) == (kind, "7")
    assert cause.site == "residual_mlp"


def test_token_piece_without_a_tokenizer_that_spells_pieces() -> None:
    assert token_piece(object(), nonfinite(0)) is None
    assert token_piece(object(), None) is None


# --------------------------------------------------------------------------- grouping

def test_one_channel_and_kind_at_different_layers_is_one_root_cause() -> None:
    a = finding(nonfinite(4, layer=9), piece="▁")
    b = finding(nonfinite(4, layer=14, site="residual_attn"), piece="▁")
    c = finding(nonfinite(4, layer=14, site="residual_attn"), piece=".")
    assert a.signature != b.signature and b.signature == c.signature
    assert a.root_cause.key == b.root_cause.key
    groups = group_root_causes([(f.signature, f.root_cause) for f in (a, b, c)])
    assert len(groups) == 1
    group = groups[0]
    assert group.count == 3 and group.layers == (9, 14)
    assert group.signatures[0] == (b.signature, 2)  # most findings first
    assert group_text(group) == ("channel 163, last prompt token (float16): 3 findings, "
                                 "layers 9-14, e.g. token '▁'")
    assert counts_text(groups) == "2 signatures in 1 root cause"


def test_one_layer_with_two_channels_is_two_root_causes() -> None:
    a, b = finding(nonfinite(4, channel=163)), finding(nonfinite(4, channel=7))
    assert a.signature == b.signature and a.root_cause.key != b.root_cause.key
    groups = group_root_causes([(f.signature, f.root_cause) for f in (a, b)])
    assert [g.cause.channel for g in groups] == [163, 7]
    assert counts_text(groups) == "1 signature in 2 root causes"


def test_policy_and_kind_split_root_causes_but_the_piece_does_not() -> None:
    base = RootCause(FP, "float16", 163, "other", "residual_mlp", piece="a")
    assert base.key == dataclasses.replace(base, piece="b", site="residual_attn").key
    assert base.key != dataclasses.replace(base, policy="float16-clamp").key
    assert base.key != dataclasses.replace(base, position_kind="decode step").key


def test_without_a_channel_the_site_tells_mechanisms_apart() -> None:
    attn = RootCause(FP, "float16", None, "other", "attn_scores")
    mlp = RootCause(FP, "float16", None, "other", "mlp_output")
    assert attn.key != mlp.key
    assert attn.label == "attn_scores, channel unknown, other"


# --------------------------------------------------------------------------- the corpus

def test_the_committed_gemma3_270m_cases_form_four_root_causes_all_channel_163() -> None:
    """What the committed float16 cases say (no model needed): all 8 overflow in channel 163;
    5 no-BOS cases at the prompt's last token (layers 9-13) are one root cause that their
    signatures split five ways; the BOS case, the decode-step case and the one next to the
    last token are one each."""
    cases = [loaded.case for loaded in Corpus(CORPUS).cases("gemma3-270m")]
    assert len(cases) == 8
    groups = group_root_causes([(case.signature, root_cause(case)) for case in cases])
    assert counts_text(groups) == "7 signatures in 4 root causes"
    assert {g.cause.channel for g in groups} == {163}
    kinds = [(g.cause.position_kind, g.count, g.layers) for g in groups]
    assert kinds[0] == ("last prompt token", 5, (9, 13))
    assert sorted(kinds[1:]) == [("bos", 1, (7, 7)), ("decode step", 1, (10, 10)),
                                 ("other", 1, (14, 14))]


# --------------------------------------------------------------------------- report and replay

def test_a_finding_carries_its_root_cause_through_json(tmp_path: Path) -> None:
    s = run_summary(tmp_path)
    s.policies[0].findings[0].piece = "<bos>"
    doc = json.loads(s.to_json())
    written = doc["policies"][0]["findings"][0]["root_cause"]
    assert written == {"channel": 163, "position_kind": "bos", "site": "residual_mlp",
                       "piece": "<bos>", "label": "channel 163, bos"}
    back = RunSummary.from_json(s.to_json()).policies[0].findings[0]
    assert back.root_cause == s.policies[0].findings[0].root_cause


def test_the_report_groups_findings_by_root_cause(tmp_path: Path) -> None:
    s = run_summary(tmp_path)
    fp16 = s.policies[0]
    deeper = dataclasses.replace(overflow_verdict("q"), first_nonfinite=dataclasses.replace(
        overflow_verdict().first_nonfinite, layer=9))
    fp16.add_finding(deeper, "saved", None, deeper.signature("gemma3-270m"), piece="<bos>")
    md = render_markdown(s)
    assert "2 signatures in 1 root cause." in md
    assert ("## Root causes" in md and "- channel 163, bos (float16): 2 findings, layers 7-9, "
            "e.g. token '<bos>'") in md
    assert "  - layer 9 residual_mlp at the BOS position, BOS on: 1 finding" in md
    assert "- **Root cause:** channel 163, bos (token '<bos>')" in md
    page = render_html(s)
    assert "<h2>Root causes</h2>" in page and "layers 7-9" in page


def test_a_run_without_findings_lists_no_root_causes(tmp_path: Path) -> None:
    s = run_summary(tmp_path)
    s.policies[0].findings.clear()
    md = render_markdown(s)
    assert "Root cause" not in md and "root cause" not in md


def test_replay_counts_the_recorded_cases_by_root_cause() -> None:
    sig = Signature(FP, "float16", False, 10, "residual_mlp", "content")
    deeper = sig._replace(layer=12)
    cause = RootCause(FP, "float16", 163, "last prompt token", "residual_mlp", "▁")
    rows = [ReplayRow("a", "float16", "reproduce", "inf", True, signature=sig, cause=cause),
            ReplayRow("b", "float16", "reproduce", "inf", True, signature=deeper, cause=cause),
            ReplayRow("a", "float32", "finite", "finite", True)]  # no case of its own
    counts, lines = root_cause_lines(rows)
    assert counts == "2 cases: 2 signatures in 1 root cause"
    assert lines == ["channel 163, last prompt token (float16): 2 cases, layers 10-12, "
                     "e.g. token '▁'"]


def test_the_printed_summary_lists_root_causes(tmp_path: Path, capsys) -> None:
    from fuzz.report.progress import print_summary

    print_summary(run_summary(tmp_path))
    out = capsys.readouterr().out
    assert "  by root cause (1 signature in 1 root cause):\n" in out
    assert "    channel 163, bos (float16): 1 finding, layer 7\n" in out
