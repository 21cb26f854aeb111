"""`fuzz advise` on synthetic models: the measurement, the recommendation, the outputs."""
from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
import torch

from fuzz.advise.measure import (
    AGREEMENT_THRESHOLD,
    PolicyAdvice,
    advise,
    draw_prompts,
    first_divergence,
    machine_info,
    machine_text,
    recommend,
    step0_pair,
)
from fuzz.advise.report import render_png, render_text, write
from fuzz.cli import main
from fuzz.corpus import Corpus
from fuzz.engine.zoo import load_model
from fuzz.session import Session
from fuzz.verdict import Bounds

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_first_divergence() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped early (EOS)
    assert first_divergence([], [4]) == 0  # a run that went non-finite in the prefill


def test_step0_pair_compares_distributions() -> None:
    p = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0]), dim=0)
    q = torch.log_softmax(torch.tensor([1.0, 2.0, 0.0]), dim=0)
    assert step0_pair(p, p) == (True, 0.0)
    same, kl = step0_pair(p, q)
    assert not same and kl == pytest.approx(float((p.exp() * (p - q)).sum()))
    assert step0_pair(p, torch.full((3,), math.nan)) is None


def _advice(name: str, speed: float, identical: float, nonfinite: int = 0) -> PolicyAdvice:
    return PolicyAdvice(name, "float16", True, corpus_runs=2, corpus_nonfinite=nonfinite,
                        sampled_runs=10, identical=identical, prompts_per_s=speed)


def test_recommend_picks_the_fastest_qualifying_policy_and_says_why_others_lost() -> None:
    rows = [_advice("float32", 1.0, 1.0), _advice("fast-but-wrong", 9.0, 0.5),
            _advice("fast-but-nan", 8.0, 1.0, nonfinite=1), _advice("good", 3.0, 0.95),
            _advice("slow", 2.0, 1.0)]
    assert recommend(rows, AGREEMENT_THRESHOLD) == "good"
    why = {r.policy: r.verdict for r in rows}
    assert why["good"] == "recommended"
    assert "identical greedy continuations 50% < 90%" in why["fast-but-wrong"]
    assert "non-finite on 1/2 corpus cases" in why["fast-but-nan"]
    assert why["slow"].startswith("slower: 2 vs 3 prompts/s (good)")
    assert recommend([_advice("float32", 1.0, 0.5)], AGREEMENT_THRESHOLD) is None


def test_draw_prompts_is_seeded_and_distinct() -> None:
    a, b = draw_prompts(12, 3), draw_prompts(12, 3)
    assert a == b and len(a) == 12 and len(set(a)) == 12
    assert draw_prompts(12, 4) != a


def test_machine_info_names_the_cpu_and_the_load() -> None:
    info = machine_info("cpu")
    assert info["cpu"] and info["threads"] >= 1 and info["torch"] == torch.__version__
    busy = machine_text({**info, "load_average": info["threads"] + 5.0})
    assert busy.startswith(f"CPU {info['cpu']} (flags: ") and "wall-time speeds skewed" in busy
    assert "skewed" not in machine_text({**info, "load_average": 0.0})


@pytest.fixture(scope="module")
def planted_advice(tmp_path_factory):
    """tiny-planted (float16 overflows on the token "7") with a one-case corpus."""
    root = tmp_path_factory.mktemp("advise")
    corpus = root / "corpus"
    assert main(["add", "--model", "tiny-planted", "--policy", "float16", "--prompt", "a 7",
                 "--corpus", str(corpus), "--max-new-tokens", "2"]) == 0
    session = Session(load_model("tiny-planted"), bounds=Bounds(max_new_tokens=3))
    return advise(session, Corpus(corpus), sample=3, seed=1), root


def test_advise_measures_every_policy_against_float32(planted_advice) -> None:
    result, _ = planted_advice
    by = {r.policy: r for r in result.policies}
    assert list(by) == ["float32", "bfloat16", "float16", "float16-clamp",
                        "float16-fp32-residual"]
    assert result.corpus_cases == 1 and result.sampled_texts == 3
    ref = by["float32"]
    assert ref.identical == 1.0 and ref.top1 == 1.0 and ref.mean_kl == 0.0
    assert ref.sampled_runs >= 5 and ref.prompts_per_s > 0 and ref.headroom > 1e30
    assert ref.cpu_s_per_run > 0
    f16 = by["float16"]
    assert f16.corpus_nonfinite == 1 and not f16.finite_everywhere
    assert f16.headroom == 0.0  # it overflowed
    assert "non-finite on 1/1 corpus cases" in f16.verdict
    assert by["float16-clamp"].corpus_nonfinite == 0
    assert result.recommended is not None and by[result.recommended].verdict == "recommended"
    assert result.recommended != "float16"
    for r in result.policies:
        assert r.sampled_runs == ref.sampled_runs  # the same prompts under every policy
        assert 0.0 <= r.identical <= 1.0 and r.mean_kl >= 0.0


def test_advise_outputs_markdown_html_json_and_a_picture(planted_advice, tmp_path) -> None:
    result, _ = planted_advice
    text = render_text(result)
    assert "Recommended: " in text and "CPU " in text and "float16-fp32-residual" in text
    paths = write(result, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["advise.html", "advise.json", "advise.md", "advise.png"]
    md = (tmp_path / "advise.md").read_text()
    assert "| float16 | no | 1/1 |" in md and "flags:" in md and "![agreement vs speed]" in md
    doc = json.loads((tmp_path / "advise.json").read_text())
    assert doc["recommended"] == result.recommended and len(doc["policies"]) == 5
    png = render_png(result)
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000
    page = (tmp_path / "advise.html").read_text()
    assert page.count("<img") == 1 and "data:image/png;base64," in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH")
def test_advise_html_renders_in_chromium(planted_advice, tmp_path) -> None:
    result, _ = planted_advice
    page = write(result, tmp_path / "out" / "adv")[1]
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          page.as_uri()], capture_output=True, timeout=120, check=True)
    html = dom.stdout.decode("utf-8")
    assert "Recommended: " in html or "No recommendation" in html
    assert html.count("<tr>") == 6


def test_advise_cli_writes_a_report_and_refuses_bad_input(planted_advice, tmp_path, capsys):
    _, root = planted_advice
    report = tmp_path / "rep"
    rc = main(["advise", "--model", "tiny-planted", "--corpus", str(root / "corpus"),
               "--sample", "1", "--max-new-tokens", "2", "--report", str(report) + "/"])
    out = capsys.readouterr().out
    assert rc == 0 and "Recommended:" in out and (report / "advise.png").exists()
    assert main(["advise", "--model", "tiny", "--sample", "0"]) == 2
    assert "--sample 0" in capsys.readouterr().err
    assert main(["advise", "--model", "tiny", "--corpus", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
