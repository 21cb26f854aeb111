"""The run report: markdown, self-contained HTML and JSON (tests/report_data.py builds the
verdicts and summaries after what docs/NUMERICS.md measured on Gemma 3 270M)."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from report_data import (
    BOS_PROMPT,
    F16_MAX,
    F32_MAX,
    INF,
    LAYERS,
    finite_verdict,
    overflow_verdict,
    run_summary,
)

from fuzz.report import (
    Finding,
    PolicySummary,
    RunSummary,
    md_code,
    render_markdown,
    shell_quote,
)
from fuzz.verdict import NonFinite


def test_markdown_names_prompt_site_and_overflowing_terms(tmp_path: Path) -> None:
    md = render_markdown(run_summary(tmp_path))
    assert f"`{BOS_PROMPT!r}`" in md
    assert "inf at step 0 (prefill), layer 7, site residual_mlp, position 0 (BOS)" in md
    assert "token id 2" in md
    assert "channel 163: 55008 + 13376 = 68384 > 65504" in md
    assert str(tmp_path / "corpus/x/abc.json") in md
    assert ("| float16 | float16 | no | on | 1 | 0 | 1 | 0 | 1 | 0 | 0 | n/a (no finite example) "
            "| non-finite on 1 of 1 example |") in md
    assert "| float16 | float16 | no | off | 2 | 0 | 0 | 0 | 0 | 0 | 0 | 2.18 |" in md
    assert "python -m fuzz run --model gemma3-270m --policies float16,float32" in md


def test_markdown_escapes_control_characters_in_prompts(tmp_path: Path) -> None:
    md = render_markdown(run_summary(tmp_path, extra_prompt="7 billion\nparams\t\x07"))
    assert r"`'7 billion\nparams\t\x07'`" in md
    assert "\x07" not in md and "params\t" not in md
    # nearest misses: the closer one (3e4 -> headroom 2.18) is listed first
    first, second = md.index("7 billion"), md.index("seven billion")
    assert first < second
    assert "headroom 2.18 at layer 13 residual_mlp" in md


def test_a_repeated_nearest_miss_is_listed_once(tmp_path: Path) -> None:
    s = run_summary(tmp_path)
    repeat = finite_verdict("same prompt", 6e4)
    s.policies[0].nearest_misses = [repeat, finite_verdict("same prompt", 6e4), repeat]
    assert render_markdown(s).count("'same prompt'") == 1


def test_code_span_survives_backticks() -> None:
    assert md_code("a`b") == "``a`b``"
    assert md_code("`x") == "`` `x ``"


def test_shell_quote_round_trips_through_bash() -> None:
    for text in ["plain words", "it's $HOME", "line\nbreak\ttab\x07 '\\' é 日本"]:
        quoted = shell_quote(text)
        assert "\n" not in quoted
        out = subprocess.run(["bash", "-c", f"printf %s {quoted}"], capture_output=True,
                             check=True).stdout.decode("utf-8")
        assert out == text


def test_negative_overflow_is_written_with_its_sign(tmp_path: Path) -> None:
    v = overflow_verdict()
    v.first_nonfinite = NonFinite(0, 7, "residual_mlp", 3, 99, "inf", 5, (-60000.0, -9000.0))
    s = run_summary(tmp_path)
    s.policies[0].findings[0].verdict = v
    assert "channel 5: -60000 + (-9000) = -69000 < -65504" in render_markdown(s)


def test_embedding_and_head_are_named_not_numbered(tmp_path: Path) -> None:
    s = run_summary(tmp_path)
    v = finite_verdict("x", 100.0)
    v.finite, v.add_bos = False, False
    v.first_nonfinite = NonFinite(step=2, layer=LAYERS, site="logits", position=5,
                                  token_id=99, kind="nan")
    s.policies[0].add_finding(v, "saved", None, ("m", "float16", False, LAYERS, "logits",
                                                 "content"))
    md = render_markdown(s)
    assert "nan at step 2 (decode), head, site logits, position 5, token id 99" in md
    assert "Finding 2: logits at a content position, BOS off" in md
    assert "--policy float16 --prompt x --no-bos" in md
    assert ("2 findings: 2 new (saved), 0 marginal (failed short of the margin a case needs: "
            "not saved)") in md


# --------------------------------------------------------------------------- what happened
# The report states what the run counted: hits on known signatures are not saved again, but they
# happened, and a policy with any non-finite example is never "finite on every example".


def test_policy_summary_keeps_the_nearest_misses_sorted_capped_and_unique() -> None:
    p = PolicySummary(policy="float16", dtype="float16", expected_safe=False)
    peaks = [1e3, 5e4, 2e4, 6e4, 3e3, 4e4, 1e4]
    for i, peak in enumerate(peaks):
        p.observe(finite_verdict(f"prompt {i}", peak))
    p.observe(finite_verdict("prompt 3", 6e4))  # a replay of the nearest one
    assert p.examples == len(peaks) + 1
    got = [v.min_headroom(content_only=True) for v in p.nearest_misses]
    assert got == sorted(got) and len(got) == 5
    assert [v.prompt for v in p.nearest_misses][:2] == ["prompt 3", "prompt 1"]
    assert p.best_headroom == pytest.approx(F16_MAX / 6e4)
    assert p.peak is p.nearest_misses[0]
    finding = p.add_finding(overflow_verdict(), "known-signature", None,
                            ["m", "float16", True, 7, "residual_mlp", "bos"])
    assert finding.explained and finding.signature[3] == 7
    assert p.peak is finding.verdict and (p.new_findings, p.known_findings) == (0, 1)
    assert p.bos_modes == [False, True]


def test_bad_records_are_refused_with_the_value_named() -> None:
    with pytest.raises(ValueError, match="'crashed'"):
        Finding(overflow_verdict(), "crashed", None, ())
    with pytest.raises(ValueError, match="finite verdict"):
        Finding(finite_verdict("x", 10.0), "saved", None, ())


def test_json_round_trip_is_exact_and_strict(tmp_path: Path) -> None:
    s = run_summary(tmp_path)
    s.policies[1].nearest_misses[0].text = "inf"  # generated text, not a number
    # the CLI passes SaveResult.path (a Path) straight through
    sig = ("m", "float16", False, 7, "residual_mlp", "content")
    s.policies[0].findings.append(Finding(overflow_verdict("p"), "duplicate-file",
                                          tmp_path / "c.json", sig, True))
    text = s.to_json()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in strict JSON"))
    back = RunSummary.from_json(text)
    assert back.to_json() == text
    finding = back.policies[0].findings[0]
    assert finding.verdict.max_abs["7"]["residual_mlp"] == INF
    assert math.isnan(finding.verdict.max_abs["9"]["qkv"])
    assert finding.verdict.first_nonfinite.terms == (55008.0, 13376.0)
    assert finding.signature == ("gemma3-270m", "float16", True, 7, "residual_mlp", "bos")
    assert back.policies[1].nearest_misses[0].text == "inf"
    assert back.policies[0].findings[1].case_path == str(tmp_path / "c.json")
    assert back.policies[1].best_headroom == pytest.approx(F32_MAX / 1.04e5)
    with pytest.raises(ValueError, match="'colour'"):
        RunSummary.from_json(json.dumps({**json.loads(text), "colour": 1}))


# --------------------------------------------------------------------------- files and plots
