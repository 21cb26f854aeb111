"""Heat maps of findings (fuzz.positions, fuzz.report.heatmap): the data, the picture, and
where they appear (`fuzz check --plot`, the run report's markdown, HTML, JSON)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
from report_data import PNG_SIGNATURE, decoded_pngs, pixel_std, run_summary

from fuzz.cli import main
from fuzz.engine.zoo import load_model
from fuzz.positions import PositionMap, session_position_map
from fuzz.report import RunSummary, write_report
from fuzz.report.heatmap import heatmap_figure, heatmap_path, render_heatmap_png
from fuzz.session import Session
from fuzz.verdict import Bounds, PromptSpec

PLANTED = "kernel 7 ms"  # tiny-planted overflows on "7": layer 2, residual_mlp, channel 0


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(load_model("tiny-planted"), bounds=Bounds(max_new_tokens=3))


@pytest.fixture(scope="module")
def planted(session):
    spec = PromptSpec(PLANTED)
    verdict = session.check(spec, "float16")
    return verdict, session_position_map(session, spec, verdict)


def test_the_map_covers_every_layer_and_position_and_boxes_the_first_nonfinite(planted):
    verdict, m = planted
    first = verdict.first_nonfinite
    assert (first.step, first.layer, first.site) == (0, 2, "residual_mlp")
    assert m.rows == ["embedding", "0", "1", "2", "3", "head"]
    assert m.positions == list(range(len(verdict.prompt_ids)))  # the prefill alone
    assert m.tokens == verdict.prompt_ids
    row, col = m.first
    assert (m.rows[row], m.positions[col]) == ("2", first.position)
    assert m.ratio[row][col] == math.inf  # the overflow itself
    assert all(v is not None and v < 1 for v in m.ratio[row][:col])  # earlier positions fine
    assert m.ratio[m.rows.index("head")][:-1] == [None] * (len(m.positions) - 1)
    # the channel grows across the adds and the last finite add is past the limit
    assert m.channel == first.channel == 0
    values = [v for _, _, v in m.channel_values]
    assert values[0] < m.limit < abs(values[-1])
    assert abs(values[-1]) == pytest.approx(first.unrounded)


def test_a_finite_run_maps_every_decode_step(session):
    spec = PromptSpec("hello there")
    verdict = session.check(spec, "float16")
    m = session_position_map(session, spec, verdict)
    assert verdict.finite and m.first is None and m.channel is None
    assert m.step == verdict.steps - 1
    assert len(m.positions) == len(verdict.prompt_ids) + verdict.steps - 1
    assert 0 < m.peak() < 1 and m.peak(from_position=len(m.positions)) == 0.0


def test_the_map_round_trips_through_strict_json(planted):
    _, m = planted
    text = json.dumps(m.to_dict(), allow_nan=False)
    assert PositionMap.from_dict(json.loads(text)) == m


def test_the_picture_has_the_map_and_the_channel(planted):
    _, m = planted
    fig = heatmap_figure(m)
    heat, channel = fig.axes[0], fig.axes[1]  # fig.axes[2] is the colour bar
    legend = [t.get_text() for t in heat.get_legend().get_texts()]
    assert any("first non-finite: layer 2 residual_mlp" in t for t in legend)
    assert "non-finite (inf/nan)" in legend
    assert "channel 0" in channel.get_legend().get_texts()[0].get_text()
    png = render_heatmap_png(m)
    assert png.startswith(PNG_SIGNATURE) and pixel_std(png) > 0.05


def test_check_plot_writes_the_heat_map_beside_the_plot(tmp_path, capsys):
    plot = tmp_path / "v.png"
    assert main(["check", "--model", "tiny-planted", "--policy", "float16", "--prompt", PLANTED,
                 "--max-new-tokens", "2", "--plot", str(plot)]) == 1
    heat = heatmap_path(plot)
    assert heat.name == "v.positions.png" and str(heat) in capsys.readouterr().out
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert pixel_std(heat.read_bytes()) > 0.05


def _summary_with_map(tmp_path: Path, m: PositionMap) -> RunSummary:
    summary = run_summary(tmp_path)
    fp16 = next(p for p in summary.policies if p.policy == "float16")
    fp16.findings[0].positions = m.to_dict()
    return summary


def test_the_run_report_shows_each_findings_heat_map(planted, tmp_path):
    _, m = planted
    summary = _summary_with_map(tmp_path, m)
    paths = write_report(summary, tmp_path / "rep" / "nightly")
    names = [p.name for p in paths]
    assert names == ["nightly.md", "nightly.html", "nightly.json",
                     "nightly.float16.finding-1.png"]
    assert pixel_std(paths[3].read_bytes()) > 0.05
    assert "![max |x| / limit per layer and position" in paths[0].read_text()
    assert "(nightly.float16.finding-1.png)" in paths[0].read_text()
    assert len(decoded_pngs(paths[1].read_text())) == 3  # two policy plots and the heat map
    back = RunSummary.from_json(paths[2].read_text())
    f = next(p for p in back.policies if p.policy == "float16").findings[0]
    assert PositionMap.from_dict(f.positions) == m


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH")
def test_the_report_with_heat_maps_renders_in_chromium(planted, tmp_path):
    _, m = planted
    page = write_report(_summary_with_map(tmp_path, m), tmp_path / "report")[1]
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,4000", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert pixel_std(shot.read_bytes()) > 0.05
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True,
                         timeout=120, check=True).stdout.decode("utf-8")
    assert dom.count("<img") == 3 and "heat map of finding 1" in dom


def test_fuzz_run_maps_its_findings(tmp_path):
    report = tmp_path / "report"
    rc = main(["run", "--model", "tiny-planted", "--policies", "float16", "--no-bos",
               "--budget", "25s", "--corpus", str(tmp_path / "corpus"), "--database", "",
               "--seed", "3", "--max-new-tokens", "2", "--round-examples", "15", "--quiet",
               "--report", str(report)])
    assert rc == 0
    doc = json.loads(report.with_suffix(".json").read_text())
    findings = [f for p in doc["policies"] for f in p["findings"]]
    assert findings and all(f["positions"] is not None for f in findings)
    assert list(tmp_path.glob("report.float16.finding-*.png"))


def test_a_wider_dtypes_map_and_plot_measure_against_float16(session, tmp_path):
    """`check --plot` under bfloat16 drew one colour (every cell below 1e-4 of bfloat16's limit):
    a wider dtype is measured against float16's limit, as the report's "vs float16" is."""
    from fuzz.report.plots import _headroom_series

    spec = PromptSpec(PLANTED)
    verdict = session.check(spec, "bfloat16")
    m = session_position_map(session, spec, verdict)
    assert verdict.finite and m.against == "float16"
    planted_row = m.rows.index("2")
    # the planted trigger's residual passes float16's limit (finite in bfloat16): ratio > 1
    assert max(v for v in m.ratio[planted_row] if v is not None) > 1.0
    assert "float16's limit (65504)" in heatmap_figure(m).texts[0].get_text()
    series = _headroom_series(verdict, {label: i for i, label in enumerate(verdict.max_abs)},
                              False, "all", "#000000")
    assert min(series.y) < 1.0  # against 65504, not against bfloat16's 3.4e38
    assert verdict.wider_than_float16 and not session.check(spec, "float16").wider_than_float16
