"""The run report: data model, markdown, self-contained HTML, plots, JSON, and a real browser.

Verdicts are built by hand after what docs/NUMERICS.md measured on Gemma 3 270M (18 layers): in
float16 with BOS, residual channel 163 at layer 7 holds 55008 after attention and the post-FFN
branch adds 13376 -> 68384 > 65504 (inf at residual_mlp, position 0), NaN from layer 8 on.
No model is needed.
"""
from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fuzz.report import (
    Finding,
    PolicySummary,
    RunSummary,
    _group_series,
    _headroom_series,
    _layer_axis,
    md_code,
    plot_verdict,
    render_markdown,
    report_paths,
    shell_quote,
    verdict_figure,
    write_report,
)
from fuzz.verdict import NonFinite, Verdict

F16_MAX = 65504.0
F32_MAX = 3.4028234663852886e38
LAYERS = 18
SITES = ("input_layernorm", "qkv", "attn_scores", "attn_output", "post_attention_layernorm",
         "residual_attn", "pre_feedforward_layernorm", "mlp_act", "mlp_output",
         "post_feedforward_layernorm", "residual_mlp")
BOS_PROMPT = "the self-attention is important for transformer because"
NAN, INF = float("nan"), float("inf")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def layer_values(layer: int, residual: float) -> dict[str, float]:
    """One layer's max |x| per site with the magnitudes docs/NUMERICS.md reports."""
    return {"input_layernorm": 60.0 + layer, "qkv": 40.0 + layer, "attn_scores": 30.0 + layer,
            "attn_output": 150.0 + 10 * layer, "post_attention_layernorm": residual / 8,
            "residual_attn": residual * 0.9, "pre_feedforward_layernorm": 80.0,
            "mlp_act": 120.0 + 5 * layer, "mlp_output": 200.0, "post_feedforward_layernorm":
            residual / 5, "residual_mlp": residual}


def table(residuals: list[float], poison_from: tuple[int, str] | None = None,
          poison: float = NAN) -> dict[str, dict[str, float]]:
    """embedding, 0..17, head; every site at or after `poison_from` (execution order) is nan."""
    out: dict[str, dict[str, float]] = {"embedding": {"embedding": 24.0}}
    for layer, r in enumerate(residuals):
        out[str(layer)] = layer_values(layer, r)
    out["head"] = {"final_norm": 180.0, "logits": 95.0}
    if poison_from is not None:
        start_layer, start_site = poison_from
        for layer in range(start_layer, LAYERS):
            for site in SITES:
                if layer > start_layer or SITES.index(site) >= SITES.index(start_site):
                    out[str(layer)][site] = poison
        out["head"] = {"final_norm": poison, "logits": poison}
    return out


def limits(value: float) -> dict[str, float]:
    keys = ["embedding/embedding", "head/final_norm", "head/logits"]
    keys += [f"{layer}/{site}" for layer in range(LAYERS) for site in SITES]
    return {k: value for k in keys}


BOS_RESIDUAL = [3.0e3, 8e3, 1.4e4, 2.2e4, 3.1e4, 4.2e4, 5.0e4, 6.8e4, 7.5e4, 8.2e4, 8.8e4,
                9.3e4, 9.8e4, 1.01e5, 1.04e5, 9.9e4, 9.0e4, 8.0e4]


def overflow_verdict(prompt: str = BOS_PROMPT) -> Verdict:
    """float16 with BOS: inf at layer 7 residual_mlp (BOS, channel 163), NaN after it."""
    max_abs = table(BOS_RESIDUAL, poison_from=(8, "input_layernorm"))
    max_abs["7"]["residual_mlp"] = INF
    content = table([r / 2 for r in BOS_RESIDUAL], poison_from=(8, "attn_scores"))
    nf = NonFinite(step=0, layer=7, site="residual_mlp", position=0, token_id=2, kind="inf",
                   channel=163, terms=(55008.0, 13376.0))
    return Verdict(prompt=prompt, prompt_ids=[2, 506, 1207, 236772, 19603], add_bos=True,
                   policy="float16", finite=False, first_nonfinite=nf, max_abs=max_abs,
                   content_max_abs=content, limits=limits(F16_MAX), tokens=[], text="",
                   steps=1, stopped="nonfinite")


def finite_verdict(prompt: str, peak: float, policy: str = "float16", add_bos: bool = False,
                   limit: float = F16_MAX) -> Verdict:
    """A finite run whose residual peaks at `peak` (layer 13), content headroom limit/peak."""
    residual = [min(peak, 2e3 * (layer + 1)) for layer in range(LAYERS)]
    residual[13] = peak
    t = table(residual)
    return Verdict(prompt=prompt, prompt_ids=[506, 1207], add_bos=add_bos, policy=policy,
                   finite=True, first_nonfinite=None, max_abs=t, content_max_abs=t,
                   limits=limits(limit), tokens=[1], text=" it", steps=2, stopped="eos")


def run_summary(tmp_path: Path, extra_prompt: str = "7 billion\nparams\t\x07") -> RunSummary:
    fp16 = PolicySummary(policy="float16", dtype="float16", expected_safe=False)
    fp16.observe(overflow_verdict())
    fp16.add_finding(overflow_verdict(), "saved", str(tmp_path / "corpus/x/abc.json"),
                     ("gemma3-270m", "float16", True, 7, "residual_mlp", "bos"))
    fp16.observe(finite_verdict(extra_prompt, 3.0e4))
    fp16.observe(finite_verdict("seven billion", 1.0e4))
    fp32 = PolicySummary(policy="float32", dtype="float32", expected_safe=True)
    fp32.observe(finite_verdict(BOS_PROMPT, 1.04e5, "float32", True, F32_MAX))
    return RunSummary(model="gemma3-270m", fingerprint="ab12cd34ef56", seed=1234,
                      budget_s=3600.0, elapsed_s=3601.5, examples=4, stopped="budget",
                      device="cpu", tool_version="0.1.0", torch_version="2.13.0",
                      bounds={"max_new_tokens": 16, "max_prompt_tokens": 96},
                      policies=[fp16, fp32], corpus_dir="corpus",
                      started="2025-01-31T02:00:00+00:00")


def decoded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)',
                                                    page)]


def pixel_std(png: bytes) -> float:
    from matplotlib.image import imread

    return float(imread(io.BytesIO(png), format="png")[..., :3].std())


# --------------------------------------------------------------------------- markdown


def test_markdown_names_prompt_site_and_overflowing_terms(tmp_path: Path) -> None:
    md = render_markdown(run_summary(tmp_path))
    assert f"`{BOS_PROMPT!r}`" in md
    assert "inf at step 0 (prefill), layer 7, site residual_mlp, position 0 (BOS)" in md
    assert "token id 2" in md
    assert "channel 163: 55008 + 13376 = 68384 > 65504" in md
    assert str(tmp_path / "corpus/x/abc.json") in md
    assert "| float16 | float16 | no | 3 | 1 / 0 |" in md
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
    assert "2 findings, 2 new" in md


# --------------------------------------------------------------------------- data model


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
    s.policies[0].findings.append(Finding(overflow_verdict("p"), "duplicate-file",
                                          tmp_path / "c.json", ("m",), True))
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


@pytest.mark.parametrize("given, stem", [("out/r.md", "out/r"), ("out/r.html", "out/r"),
                                         ("out/nightly.2025-01-31", "out/nightly.2025-01-31"),
                                         ("out/", "out/report")])
def test_report_paths(tmp_path: Path, given: str, stem: str) -> None:
    md, page, js = report_paths(str(tmp_path / given) + ("/" if given.endswith("/") else ""))
    assert (md, page, js) == tuple(tmp_path / (stem + ext) for ext in (".md", ".html", ".json"))


def test_html_is_self_contained_with_real_plots(tmp_path: Path) -> None:
    paths = write_report(run_summary(tmp_path), tmp_path / "rep" / "nightly.md")
    assert [p.name for p in paths] == ["nightly.md", "nightly.html", "nightly.json"]
    page = paths[1].read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "channel 163: 55008 + 13376 = 68384 &gt; 65504" in page
    pngs = decoded_pngs(page)
    assert len(pngs) == 2  # one per policy
    for png in pngs:
        assert png.startswith(PNG_SIGNATURE)
        assert pixel_std(png) > 0.05
    assert RunSummary.from_json(paths[2].read_text()).seed == 1234


def test_plot_series_put_nonfinite_layers_on_the_edge() -> None:
    v = overflow_verdict()
    labels, xpos = _layer_axis(v)
    assert labels[0] == "embedding" and labels[-1] == "head" and len(labels) == LAYERS + 2
    residual = _group_series(v.max_abs, xpos, "residual", ("embedding", "residual_attn",
                                                           "residual_mlp"), "red")
    assert residual.bad_x == list(range(xpos["7"], xpos["17"] + 1))
    # layer 7 still shows its finite residual_attn (just under the limit) next to the marker
    assert residual.x == list(range(0, xpos["7"] + 1)) and residual.y[0] == 24.0
    assert residual.y[-1] == pytest.approx(0.9 * BOS_RESIDUAL[7])
    logits = _group_series(v.max_abs, xpos, "logits", ("logits",), "orange")
    assert (logits.x, logits.bad_x) == ([], [xpos["head"]])
    headroom = _headroom_series(v, xpos, False, "all", "black")
    assert headroom.bad_x == list(range(xpos["7"], xpos["head"] + 1))
    assert headroom.x == list(range(0, xpos["7"]))
    assert headroom.y[-1] == pytest.approx(F16_MAX / BOS_RESIDUAL[6])


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_figure_draws_groups_limit_and_nonfinite_markers_at_the_top() -> None:
    v = overflow_verdict(BOS_PROMPT * 3)
    fig = verdict_figure(v)
    ax_max, ax_head = fig.axes
    assert ax_max.get_yscale() == ax_head.get_yscale() == "log"
    assert "float16: 'the self-attention" in fig.get_suptitle()
    assert len(fig.get_suptitle()) < 100  # the prompt is shortened
    lines = lines_by_label(ax_max)
    residual = lines["residual stream"]
    assert list(residual.get_xdata()) == list(range(0, 9))  # embedding, layers 0..7
    assert max(residual.get_ydata()) == pytest.approx(0.9 * BOS_RESIDUAL[7])
    assert list(lines["float16 max = 65504"].get_ydata()) == [F16_MAX, F16_MAX]
    assert "residual stream, excluding BOS" in lines
    top = ax_max.get_ylim()[1]
    assert top > F16_MAX
    markers = [c.get_offsets() for c in ax_max.collections if len(c.get_offsets())]
    residual_markers = [m for m in markers if m[0][0] == 8]  # layer 7 is x = 8
    assert residual_markers and all(y == top for _, y in residual_markers[0])
    first = next(line for label, line in lines.items() if label.startswith("first inf"))
    assert "layer 7 residual_mlp" in first.get_label() and first.get_xdata()[0] == 8
    assert list(lines_by_label(ax_head)["headroom 1 (overflow below)"].get_ydata()) == [1, 1]


def test_figure_keeps_far_limits_off_the_chart() -> None:
    fig = verdict_figure(finite_verdict("x", 1.04e5, "float32", True, F32_MAX))
    ax_max, ax_head = fig.axes
    assert ax_max.get_ylim()[1] < 1e7 and ax_head.get_ylim()[0] > 1e30
    labels = [t.get_text() for t in ax_max.get_legend().get_texts()]
    assert any("float32 max" in t and "off the chart" in t for t in labels)
    assert not ax_max.collections  # nothing non-finite to mark


def test_plot_verdict_writes_a_png(tmp_path: Path) -> None:
    path = plot_verdict(overflow_verdict("x$y$ 日本"), tmp_path / "v.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert pixel_std(path.read_bytes()) > 0.05
    with pytest.raises(ValueError, match="v.svg"):
        plot_verdict(overflow_verdict(), tmp_path / "v.svg")


# --------------------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH "
                    "(install it with: apt-get install -y chromium)")
def test_headless_chromium_renders_the_report(tmp_path: Path) -> None:
    page = write_report(run_summary(tmp_path), tmp_path / "report")[1]
    profile = tmp_path / "profile"
    shot = tmp_path / "shot.png"
    base = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2000",
                    page.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.read_bytes().startswith(PNG_SIGNATURE)
    assert pixel_std(shot.read_bytes()) > 0.05
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True,
                         timeout=120, check=True).stdout.decode("utf-8")
    assert BOS_PROMPT in dom
    assert dom.count("<img") == 2
