"""`fuzz advise` on synthetic models: the statistics against hand-computed values, the rule, the
text set, the measurement and its outputs, the command line."""
from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fuzz.advise.inputs import draw_prompts, machine_info, machine_text
from fuzz.advise.measure import advise, first_divergence, rotated
from fuzz.advise.plot import render_png
from fuzz.advise.report import render_markdown, render_text, report_paths, write
from fuzz.advise.result import PolicyAdvice
from fuzz.advise.rule import DEFAULT_MAX_KLD, recommend, safety_rank
from fuzz.advise.stats import (
    Divergence,
    SequenceStats,
    compare_logits,
    median_interval,
    ratio_interval,
    summarize,
)
from fuzz.advise.text import STDLIB_FILES, stdlib_dir, text_set
from fuzz.cli import main
from fuzz.corpus import Corpus
from fuzz.engine.zoo import load_model
from fuzz.precision import POLICIES
from fuzz.report.intervals import wilson_interval
from fuzz.session import Session
from fuzz.verdict import Bounds

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
E = math.e
# softmax([2, 1, 0]) against softmax([1, 2, 0]): log p - log q = [1, -1, 0], so
# KL(p || q) = p0 - p1 = (e^2 - e) / (e^2 + e + 1)
KL_SWAPPED = (E * E - E) / (E * E + E + 1)
# the small text set the measurement tests run on (the CLI's default is 16 x 64)
SMALL_TEXT = ["--text-chunks", "2", "--text-tokens", "8"]


# --- statistics ------------------------------------------------------------------------------
def test_first_divergence() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped early (EOS)
    assert first_divergence([], [4]) == 0  # a run that went non-finite in the prefill


def test_compare_logits_against_hand_computed_values() -> None:
    ref = torch.tensor([[2.0, 1.0, 0.0]] * 3)
    got = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [math.nan, 0.0, 0.0]],
                       dtype=torch.float16)
    s = compare_logits(ref, got, torch.tensor([0, 0, 2]))
    assert s.nonfinite == 1 and s.reference_nonfinite == 0  # the NaN row: counted, left out
    assert s.kld == pytest.approx([0.0, KL_SWAPPED], abs=1e-12)
    assert s.same_top1.tolist() == [True, False]
    # the actual next token 0: NLL under q is 1 nat more (log p0 - log q0 = 1)
    assert s.dnll == pytest.approx([0.0, 1.0], abs=1e-12)
    assert s.dp == pytest.approx([0.0, (E - E * E) / (E * E + E + 1)], abs=1e-12)
    bad_ref = compare_logits(torch.tensor([[math.inf, 0.0, 0.0]]), torch.zeros(1, 3),
                             torch.tensor([1]))
    assert bad_ref.reference_nonfinite == 1 and bad_ref.nonfinite == 0 and len(bad_ref.kld) == 0


def _seq(kld, same, dnll, dp) -> SequenceStats:
    return SequenceStats(np.asarray(kld, float), np.asarray(same, bool), np.asarray(dnll, float),
                         np.asarray(dp, float))


def test_summarize_pools_positions_over_sequences() -> None:
    a = _seq(np.arange(51), [True] * 51, [0.1] * 51, [0.02] * 51)
    b = _seq(np.arange(51, 101), [False] * 50, [0.3] * 50, [-0.02] * 50)
    d = summarize([a, b], ["text", "sampled"])
    assert d.sequences == 2 and d.positions == 101 and d.by_source == {"text": 1, "sampled": 1}
    assert d.mean_kld == pytest.approx(50.0)
    # numpy's linear interpolation over the 101 values 0..100
    assert (d.kld_median, d.kld_p95, d.kld_p99, d.kld_p999) == pytest.approx((50, 95, 99, 99.9))
    assert d.kld_max == 100
    assert d.top1 == pytest.approx(51 / 101)
    assert d.ppl_ratio == pytest.approx(math.exp((51 * 0.1 + 50 * 0.3) / 101))
    assert d.rms_dp == pytest.approx(0.02) and d.rms_dp_ci == pytest.approx((0.02, 0.02))
    lo, hi = d.mean_kld_ci
    assert lo <= d.mean_kld <= hi and lo >= 25.0 and hi <= 75.5  # within the two clusters' means
    assert math.isnan(summarize([a]).mean_kld_ci[0])  # one sequence: no interval


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_sequences() -> None:
    rng = np.random.default_rng(1)
    widths = []
    for n in (10, 200):
        seqs = [_seq(rng.exponential(0.01, 20), [True] * 20, [0.0] * 20, [0.0] * 20)
                for _ in range(n)]
        d = summarize(seqs)
        lo, hi = d.mean_kld_ci
        assert lo < d.mean_kld < hi
        widths.append(hi - lo)
    assert widths[1] < 0.5 * widths[0]  # ~sqrt(20) narrower with 20x the sequences
    assert ratio_interval([1.0, 3.0], [1.0, 1.0]) == ratio_interval([1.0, 3.0], [1.0, 1.0])


def test_median_interval_and_wilson() -> None:
    lo, hi = median_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert 1.0 <= lo <= 3.0 <= hi <= 5.0
    assert all(math.isnan(x) for x in median_interval([2.0]))  # one batch: no spread known
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


# --- the rule --------------------------------------------------------------------------------
def _advice(name: str, speed: tuple[float, float, float], kld_hi: float = 0.001,
            nonfinite_positions: int = 0) -> PolicyAdvice:
    return PolicyAdvice(name, "float16", True, sampled_runs=10,
                        divergence=Divergence(mean_kld=kld_hi / 2, mean_kld_ci=(0.0, kld_hi),
                                              positions=100,
                                              nonfinite_positions=nonfinite_positions),
                        prompts_per_s=speed[1], speed_ci=(speed[0], speed[2]))


def test_the_safety_order() -> None:
    order = ["float32", "bfloat16", "float16-fp32-norm-residual", "float16-fp32-residual",
             "float16-fp32-layers:3+4", "float16-clip32752", "float16-clamp", "float16"]
    assert [safety_rank(p) for p in order] == sorted(safety_rank(p) for p in order)
    assert len({safety_rank(p) for p in order}) == len(order)
    assert set(POLICIES) <= set(order)  # every shipped policy has its place
    assert safety_rank("something-new") > safety_rank("float16")


def test_overlapping_speeds_tie_and_the_safer_policy_wins() -> None:
    rows = [_advice("float32", (1.0, 1.2, 1.4)), _advice("bfloat16", (1.45, 1.6, 2.0)),
            _advice("float16-fp32-residual", (1.5, 1.8, 2.2))]
    assert recommend(rows, DEFAULT_MAX_KLD) == "bfloat16"  # faster than float32: separated
    why = {r.policy: r for r in rows}
    assert why["bfloat16"].tie_with == ["float16-fp32-residual"]
    assert why["bfloat16"].verdict.startswith("recommended (tied on speed with "
                                              "float16-fp32-residual")
    assert why["float16-fp32-residual"].verdict.startswith("tied on speed with bfloat16")
    assert "bfloat16 is safer" in why["float16-fp32-residual"].verdict
    assert why["float32"].verdict.startswith("slower: 1.2 [1-1.4] prompts/s, below bfloat16's")


def test_separated_speeds_the_faster_policy_wins() -> None:
    rows = [_advice("float32", (1.0, 1.1, 1.2)), _advice("bfloat16", (2.0, 2.2, 2.4))]
    assert recommend(rows, DEFAULT_MAX_KLD) == "bfloat16"
    assert rows[1].verdict == "recommended" and rows[1].tie_with == []
    # one batch each: no interval, nothing separates, the safest wins
    rows = [_advice("float32", (math.nan, 1.0, math.nan)),
            _advice("bfloat16", (math.nan, 9.0, math.nan))]
    assert recommend(rows, DEFAULT_MAX_KLD) == "float32" and rows[0].tie_with == ["bfloat16"]


def test_a_policy_loses_on_kld_or_finiteness_and_says_so() -> None:
    rows = [_advice("float32", (1.0, 1.1, 1.2)), _advice("float16-clamp", (5.0, 6.0, 7.0),
                                                         kld_hi=0.2),
            _advice("float16", (5.0, 6.0, 7.0), nonfinite_positions=3)]
    assert recommend(rows, DEFAULT_MAX_KLD) == "float32"
    assert "mean KLD 0.1 nats [95% 0-0.2]: upper end > 0.01" in rows[1].verdict
    assert "non-finite on 3/103 teacher-forced positions" in rows[2].verdict
    assert recommend([_advice("float32", (1, 1, 1), kld_hi=1.0)], DEFAULT_MAX_KLD) is None


def test_rotated_runs_each_policy_first_once() -> None:
    policies = list(POLICIES.values())
    firsts = [rotated(policies, k)[0].name for k in range(len(policies))]
    assert sorted(firsts) == sorted(POLICIES)
    assert rotated(policies, len(policies)) == policies


# --- the text set ----------------------------------------------------------------------------
def test_the_default_text_set_is_deterministic_and_spans_the_files() -> None:
    tok = load_model("tiny").tokenizer
    a, b = text_set(tok, 4, 16), text_set(tok, 4, 16)
    assert a.chunks == b.chunks and a.sha256 == b.sha256 and len(a.chunks) == 4
    assert all(len(c) == 16 and c[0] == tok.bos_id for c in a.chunks)
    # round-robin over STDLIB_FILES: chunk i is the first piece of file i
    for i in range(4):
        ids = tok.encode((stdlib_dir() / STDLIB_FILES[i]).read_text(encoding="utf-8"),
                         bos=False)
        assert a.chunks[i][1:] == ids[:15]
    assert a.available > 4 and str(stdlib_dir()) in a.source


def test_a_text_file_is_read_spread_out_and_refused_when_short(tmp_path) -> None:
    tok = load_model("tiny").tokenizer
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    t = text_set(tok, 3, 8, path)
    assert len(t.chunks) == 3 and t.source == str(path) and t.available >= 3
    ids = tok.encode(path.read_text(encoding="utf-8"), bos=False)
    step = t.available // 3
    assert t.chunks[1][1:] == ids[7 * step: 7 * step + 7]  # spread over the file
    path.write_text("short", encoding="utf-8")
    with pytest.raises(ValueError, match="give a longer text or a smaller --text-tokens"):
        text_set(tok, 3, 8, path)
    with pytest.raises(ValueError, match="nope.txt: no such file"):
        text_set(tok, 3, 8, tmp_path / "nope.txt")


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


# --- the measurement -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_advice(tmp_path_factory):
    """tiny-planted (float16 overflows on the token "7") with a one-case corpus, 3 prompts in
    batches of 2, 4 text chunks of 16 tokens; the progress lines kept."""
    root = tmp_path_factory.mktemp("advise")
    corpus = root / "corpus"
    assert main(["add", "--model", "tiny-planted", "--policy", "float16", "--prompt", "a 7",
                 "--corpus", str(corpus), "--max-new-tokens", "2"]) == 0
    session = Session(load_model("tiny-planted"), bounds=Bounds(max_new_tokens=3,
                                                                max_prompt_tokens=24),
                      batch_size=2)
    lines: list[str] = []
    result = advise(session, Corpus(corpus), sample=3, seed=1,
                    text=text_set(session.model.tokenizer, 4, 16), progress=lines.append)
    return result, root, lines


def test_advise_measures_every_policy_against_float32(planted_advice) -> None:
    result, _, _ = planted_advice
    by = {r.policy: r for r in result.policies}
    assert list(by) == list(POLICIES)
    assert result.corpus_cases == 1 and result.sampled_texts == 3
    ref = by["float32"]
    d = ref.divergence
    assert d.mean_kld == 0.0 and d.top1 == 1.0 and d.ppl_ratio == 1.0 and d.rms_dp == 0.0
    assert ref.identical == 1.0 and ref.finite_everywhere and ref.headroom > 1e30
    assert ref.prompts_per_s > 0 and ref.cpu_s_per_run > 0
    assert len(ref.batch_speeds) == math.ceil(result.sampled_runs / 2)
    f16 = by["float16"]
    assert f16.corpus_nonfinite == 1 and not f16.finite_everywhere and f16.headroom == 0.0
    assert "non-finite on 1/1 corpus cases" in f16.verdict
    assert by["float16-clamp"].corpus_nonfinite == 0
    assert result.recommended is not None and result.recommended != "float16"
    assert by[result.recommended].verdict.startswith("recommended")
    assert result.sequences["text"] == 4 and result.sequences["corpus"] == 1
    for r in result.policies:
        assert r.divergence.sequences == sum(result.sequences.values())
        assert r.divergence.positions + r.divergence.nonfinite_positions == d.positions
        assert r.divergence.mean_kld >= 0.0 or math.isnan(r.divergence.mean_kld)


def test_counts_agree_in_progress_summary_and_table(planted_advice) -> None:
    result, _, lines = planted_advice
    sampled = [line for line in lines if line.startswith("sampled: ")]
    assert sampled[-1].startswith(f"sampled: {result.sampled_runs}/{result.planned_runs} runs")
    assert result.sampled_runs == result.planned_runs  # no budget: every run measured
    tf = [line for line in lines if line.startswith("teacher-forced: ")]
    n = sum(result.sequences.values())
    assert len(tf) == n and tf[-1].startswith(f"teacher-forced: {n}/{n} sequences")
    assert all(r.sampled_runs == result.sampled_runs for r in result.policies)
    text = render_text(result)
    assert f"sampled: {result.sampled_runs} of {result.planned_runs} runs" in text
    assert f"teacher-forced: {n} sequences" in text
    assert f"0/{result.sampled_runs}" in text


def test_a_budget_stops_the_sampling_for_every_policy_alike() -> None:
    session = Session(load_model("tiny"), bounds=Bounds(max_new_tokens=2, max_prompt_tokens=24),
                      batch_size=2)
    lines: list[str] = []
    result = advise(session, None, sample=3, seed=1, budget_s=0.0,
                    text=text_set(session.model.tokenizer, 2, 8), progress=lines.append)
    assert result.stopped_by_budget and result.sampled_runs == 2 < result.planned_runs
    assert all(r.sampled_runs == 2 for r in result.policies)
    assert result.sequences["sampled"] == 2  # only the measured runs' continuations
    assert f"sampled: 2 of {result.planned_runs} runs" in render_text(result)


def test_advise_outputs_markdown_html_json_and_a_picture(planted_advice, tmp_path) -> None:
    result, _, _ = planted_advice
    text = render_text(result)
    assert "Recommended: " in text and "CPU " in text and "float16-fp32-norm-residual" in text
    assert "sha256" in text and "corpus: " in text
    paths = write(result, tmp_path / "new" / "dir")  # a missing directory is created
    assert sorted(p.name for p in paths) == ["advise.html", "advise.json", "advise.md",
                                             "advise.png"]
    assert all(p.parent == tmp_path / "new" / "dir" for p in paths)
    md = (tmp_path / "new" / "dir" / "advise.md").read_text()
    assert "| float16 | no | 1/1 |" in md and "|---|---|---:|" in md
    assert "![mean KLD vs speed](advise.png)" in md
    doc = json.loads((tmp_path / "new" / "dir" / "advise.json").read_text())
    assert doc["recommended"] == result.recommended and len(doc["policies"]) == len(POLICIES)
    f16 = next(p for p in doc["policies"] if p["policy"] == "float16")
    assert f16["finite_everywhere"] is False and "mean_kld_ci" in f16["divergence"]
    png = render_png(result)
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000
    page = (tmp_path / "new" / "dir" / "advise.html").read_text()
    assert page.count("<img") == 1 and "data:image/png;base64," in page


def test_report_paths() -> None:
    assert [p.name for p in report_paths("out/nightly.md")] == [
        "nightly.md", "nightly.html", "nightly.json", "nightly.png"]
    assert report_paths("out/x.json")[0].as_posix() == "out/x.md"
    assert report_paths("out/dir")[0].as_posix() == "out/dir/advise.md"
    assert report_paths("out/v1.2")[3].as_posix() == "out/v1.2/advise.png"


def test_the_picture_names_every_policy_in_a_legend(planted_advice) -> None:
    from fuzz.advise.plot import figure

    result, _, _ = planted_advice
    ax = figure(result).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    for r in result.policies:
        assert any(label.startswith(r.policy) for label in labels)
    assert ax.get_yscale() == "log" and not ax.texts  # no annotations beside the points
    assert "![mean KLD vs speed](x.png)" in render_markdown(result, "x.png")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH")
def test_advise_html_renders_in_chromium(planted_advice, tmp_path) -> None:
    result, _, _ = planted_advice
    page = write(result, tmp_path / "out" / "adv.html")[1]
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          page.as_uri()], capture_output=True, timeout=120, check=True)
    html = dom.stdout.decode("utf-8")
    assert "Recommended: " in html or "No recommendation" in html
    assert html.count("<tr>") == 2 * (len(POLICIES) + 1)  # two tables


# --- the command line ------------------------------------------------------------------------
def test_advise_cli_reads_the_corpus_directory_by_default_and_writes_a_report_directory(
        planted_advice, tmp_path, monkeypatch, capsys) -> None:
    _, root, _ = planted_advice
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root / "corpus", tmp_path / "corpus")
    argv = ["advise", "--model", "tiny-planted", "--sample", "1", "--max-new-tokens", "2",
            "--max-prompt-tokens", "24", *SMALL_TEXT]
    rc = main(argv + ["--report", "rep"])
    out = capsys.readouterr().out
    assert rc == 0 and "Recommended:" in out
    assert "corpus: corpus (the default; --corpus none leaves it out) (1 case of" in out
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "advise.html", "advise.json", "advise.md", "advise.png"]
    assert main(argv + ["--corpus", "none"]) == 0
    assert "corpus: none (--corpus none) (0 cases of" in capsys.readouterr().out


def test_advise_cli_refuses_bad_input(tmp_path, capsys) -> None:
    base = ["advise", "--model", "tiny"]
    for extra, message in ((["--sample", "0"], "--sample 0: give at least 1"),
                           (["--text-chunks", "1"], "--text-chunks 1: give at least 2"),
                           (["--max-kld", "0"], "--max-kld 0.0: give a positive number"),
                           (["--corpus", str(tmp_path / "nope")], "no such directory"),
                           (["--text", str(tmp_path / "missing.txt")],
                            f"--text {tmp_path / 'missing.txt'}: no such file"),
                           (["--text-tokens", "100000"], "--text-tokens 100000: over tiny's")):
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
