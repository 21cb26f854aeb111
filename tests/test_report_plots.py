"""The report's pictures and a real browser: plot series, figures, PNGs, headless Chromium."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from report_data import (
    BOS_PROMPT,
    BOS_RESIDUAL,
    F16_MAX,
    F32_MAX,
    LAYERS,
    PNG_SIGNATURE,
    decoded_pngs,
    finite_verdict,
    overflow_verdict,
    pixel_std,
    run_summary,
)

from fuzz.report import (
    RunSummary,
    _group_series,
    _headroom_series,
    _layer_axis,
    plot_verdict,
    report_paths,
    verdict_figure,
    write_report,
)


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
    # float32's limit stays off the max |x| chart; its headroom is drawn against float16's limit
    # (65504 / 1.04e5 = 0.63: this run would overflow in float16), as the report's tables give it
    assert ax_max.get_ylim()[1] < 1e7 and ax_head.get_ylim()[0] < 0.63 < ax_head.get_ylim()[1]
    assert "vs float16" in ax_head.get_ylabel()
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


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH "
                    "(install it with: apt-get install -y chromium)")
def test_a_long_prompt_wraps_instead_of_running_off_the_page(tmp_path: Path) -> None:
    """A first run's float16 nearest-miss table ran off the right edge: a prompt of 300 '['
    (no space to break at) must wrap inside the page's width."""
    summary = run_summary(tmp_path, extra_prompt="[" * 300)
    page = write_report(summary, tmp_path / "report")[1]
    probe = tmp_path / "probe.html"
    measure = ("<script>const misses = [...document.querySelectorAll('table')].find("
               "t => t.textContent.includes('[[[['));"
               "document.body.dataset.widths = document.documentElement.scrollWidth + ' ' + "
               "Math.ceil(misses.getBoundingClientRect().right) + ' ' + window.innerWidth;"
               "</script></body>")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", measure),
                     encoding="utf-8")
    base = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1000,800"]
    dom = subprocess.run([*base, "--dump-dom", probe.as_uri()], capture_output=True,
                         timeout=120, check=True).stdout.decode("utf-8")
    scroll, table, inner = map(int, re.search(r'data-widths="(\d+) (\d+) (\d+)"',
                                              dom).groups())
    assert "[" * 300 in dom.replace("&#91;", "[")  # the prompt is on the page, whole
    assert table <= inner, f"the nearest-miss table reaches {table} px in a {inner} px window"
    # a table too wide for the window (13 policy columns) scrolls in its own box: not the page
    assert scroll <= inner, f"the page is {scroll} px wide in a {inner} px window"
