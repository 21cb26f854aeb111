"""`fuzz sweep`: every vocabulary token after one prefix. On the tiny models (512 tokens) the whole
vocabulary runs in a second: tiny-planted overflows in float16 on the token "7" alone; the
digit-run family (fuzz.engine.synthetic.planted) overflows, after BOS and RUN-1 digits, on
exactly the digit tokens.
"""
from __future__ import annotations

import json
import math

import pytest

from fuzz.cli import main
from fuzz.corpus import Corpus
from fuzz.engine.model import parameter_shapes
from fuzz.engine.synthetic.planted import digit_token_ids
from fuzz.engine.zoo import load_model
from fuzz.next_token import SweepRunner, flops_per_token, make_prefix
from fuzz.precision import get_policy
from fuzz.screen.results import read_rows
from fuzz.session import Session
from fuzz.verdict import Bounds, PromptSpec

CPU = ["--quiet", "--device", "cpu"]


def sweep(*args: str) -> int:
    return main(["sweep", *CPU, *args])


def test_every_token_once_and_only_the_planted_token_overflows(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert sweep("--model", "tiny-planted", "--out", str(out), "--report",
                 str(tmp_path / "rep")) == 0  # float16 is declared unsafe: a result, not a failure
    rows = read_rows(out)
    tokenizer = load_model("tiny-planted").tokenizer
    assert sorted(r["token_id"] for r in rows) == list(range(tokenizer.n_words))
    bad = [r for r in rows if not r["finite"]]
    assert [r["piece"] for r in bad] == ["7"]
    (row,) = bad
    # the contract's keys (../shared/DESIGN.md), and what a case needs
    assert row["first_nonfinite"]["layer"] == 2 and row["first_nonfinite"]["position"] == 0
    assert row["least_headroom"] == 0.0 and row["margin"] > 1.02 and row["round_trips"]
    assert row["kernel"] == "native" and row["screened_headroom"] == 0.0  # confirmed natively
    assert row["prompt"] == "7" and row["signature"][3:] == [2, "residual_mlp", "content"]
    finite = [r for r in rows if r["finite"]]
    assert all(r["first_nonfinite"] is None and r["least_headroom"] > 1.1 for r in finite)
    assert all(len(r["headroom_by_layer"]) == 6 for r in rows)  # embedding, 4 layers, head
    text = capsys.readouterr().out
    assert "512 tokens swept: 1 non-finite" in text and "layer 2 residual_mlp" in text
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["nonfinite"] == 1 and report["swept"] == 512
    # the overflow's channel and terms, as `fuzz check` explains the one-token prompt
    checked = Session(load_model("tiny-planted")).check(PromptSpec("7", add_bos=False),
                                                        "float16").first_nonfinite
    (overflow,) = report["overflows"]
    assert (overflow["channel"], tuple(overflow["terms"])) == (checked.channel,
                                                                tuple(checked.terms))
    assert f"channel {checked.channel} (" in text
    assert (tmp_path / "rep.png").read_bytes()[:4] == b"\x89PNG"
    assert "![sweep](rep.png)" in (tmp_path / "rep.md").read_text()


def test_fail_on_nonfinite_and_a_safe_policy(tmp_path):
    assert sweep("--model", "tiny-planted", "--fail-on-nonfinite") == 1
    assert sweep("--model", "tiny-planted", "--policy", "float16-fp32-residual") == 0
    assert sweep("--model", "tiny-planted", "--policy", "bfloat16") == 0


def test_after_a_nearest_miss_exactly_the_digits_overflow(tmp_path):
    run = 4
    model = load_model(f"tiny-digit-run-{run}")
    digits = digit_token_ids(model.tokenizer)
    out = tmp_path / "s.jsonl"
    prefix = ",".join(str(digits[0]) for _ in range(run - 1))
    assert sweep("--model", f"tiny-digit-run-{run}", "--bos", "--after-ids", prefix,
                 "--out", str(out)) == 0
    rows = read_rows(out)
    assert {r["token_id"] for r in rows if not r["finite"]} == set(digits)
    for r in rows:
        assert r["prefix_ids"] == [model.tokenizer.bos_id, *[digits[0]] * (run - 1)]
        if not r["finite"]:
            assert r["first_nonfinite"]["position"] == run and r["first_nonfinite"]["layer"] == 0
    # every other token: the counting branch alone (it sees only whether a token is a digit),
    # the same least headroom for all, at layer 0
    others = [r for r in rows if r["finite"]]
    assert max(r["least_headroom"] for r in others) == pytest.approx(
        min(r["least_headroom"] for r in others)) and others[0]["least_headroom"] > 1.02
    assert {r["least_headroom_site"].split("/")[0] for r in others} == {"0"}


def test_results_match_an_ordinary_run_of_the_one_token_prompt():
    """The sweep's numbers are the ordinary generation's: tiny, native, one row, the prompt being
    the token alone (the LM head left out of the comparison: the sweep does not run it)."""
    model = load_model("tiny")
    session = Session(model, bounds=Bounds(max_new_tokens=1), batch_size=1)
    engine = session.engine(get_policy("float16"))
    runner = SweepRunner(engine, make_prefix(model.tokenizer, None, None, False),
                         model.config.num_hidden_layers)
    tokenizer = model.tokenizer
    round_trip = [t for t in range(100, tokenizer.n_words)
                  if tokenizer.encode(tokenizer.decode([t]), bos=False) == [t]]
    for token in round_trip[:: len(round_trip) // 3][:3]:
        (result,) = runner.run([token], "native")
        text = tokenizer.decode([token])
        verdict = session.check(PromptSpec(text, add_bos=False), "float16")
        table = verdict.headroom(content_only=True)
        per_layer = [min(v for s, v in table[label].items() if s != "logits")
                     for label in ["embedding", *map(str, range(4)), "head"]]
        assert list(result.by_layer) == pytest.approx(per_layer, rel=1e-6)
        assert result.least_headroom == pytest.approx(min(per_layer), rel=1e-6)


def test_resume_refuses_another_sweep_and_shards_batch_as_the_whole(tmp_path, capsys):
    whole, a, b = (tmp_path / f"{n}.jsonl" for n in ("whole", "a", "b"))
    common = ["--model", "tiny-planted", "--batch-size", "64"]
    assert sweep(*common, "--out", str(whole)) == 0
    assert sweep(*common, "--out", str(a), "--shard", "1/2") == 0
    assert sweep(*common, "--out", str(b), "--shard", "2/2") == 0
    key = lambda r: r["token_id"]  # noqa: E731
    assert sorted(read_rows(a) + read_rows(b), key=key) == sorted(read_rows(whole), key=key)
    # a killed run: its first 100 lines and half a line; the same command finishes it
    lines = whole.read_text().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:100]) + lines[100][:40])
    assert sweep(*common, "--out", str(part)) == 0
    assert sorted(read_rows(part), key=key) == sorted(read_rows(whole), key=key)
    capsys.readouterr()
    # another policy's (or model's) file is refused, naming file:line
    assert sweep(*common, "--policy", "bfloat16", "--out", str(whole)) == 2
    err = capsys.readouterr().err
    assert f"{whole}:1" in err and "policy" in err and "another --out" in err


def test_bad_input_is_named(tmp_path, capsys):
    assert sweep("--model", "tiny-planted", "--tokens", "9:3") == 2
    assert "--tokens '9:3'" in capsys.readouterr().err
    assert sweep("--model", "tiny-planted", "--after-ids", "1,x") == 2
    assert "--after-ids" in capsys.readouterr().err
    assert sweep("--model", "tiny-planted", "--engine", "upstream") == 2
    assert "built-in engine only" in capsys.readouterr().err
    assert sweep("--model", "tiny-planted", "--save-time", "10s") == 2
    assert "--save-time applies to --save" in capsys.readouterr().err
    # a prefix that overflows itself: every token after it would inherit the overflow
    assert sweep("--model", "tiny-planted", "--after", "7") == 2
    assert "the prefix itself goes non-finite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep("--model", "tiny-planted", "--after", "a", "--after-ids", "1")


def test_save_keeps_one_case_per_new_signature(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    assert sweep("--model", "tiny-planted", "--save", "--corpus", str(corpus)) == 0
    cases = Corpus(corpus).cases("tiny-planted")
    assert [c.case.prompt for c in cases] == ["7"] and not cases[0].case.add_bos
    capsys.readouterr()
    assert sweep("--model", "tiny-planted", "--save", "--corpus", str(corpus)) == 0
    assert "no new signature to save" in capsys.readouterr().out


def test_flops_per_token_counts_the_layers_not_the_head():
    """Two FLOPs per weight of every layer's projections and MLP (counted from the model's own
    parameter shapes, not from the formula), plus attention over position + 1 keys."""
    config = load_model("tiny").config
    layer_weights = sum(math.prod(shape) for name, shape in parameter_shapes(config).items()
                        if name.startswith("model.layers.") and "proj" in name)
    attention = 2 * config.num_attention_heads * config.head_dim  # QK and AV per key
    for position in (0, 100):
        assert flops_per_token(config, position) == 2 * (
            layer_weights + config.num_hidden_layers * attention * (position + 1))
