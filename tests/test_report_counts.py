"""The report states only what happened: known-signature hits, regressions of safe policies,
float16 headroom of wider dtypes, the reproduce command, margins and marginal findings."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from report_data import F16_MAX, F32_MAX, finite_verdict, overflow_verdict, run_summary

from fuzz.report import (
    ModeCounts,
    PolicySummary,
    RunSummary,
    render_html,
    render_markdown,
    run_command,
)
from fuzz.verdict import NonFinite, Verdict

BOS_SIGNATURE = ("ab12cd34ef56", "float16", True, 7, "residual_mlp", "bos")
SIGNATURE_WORDS = "layer 7 residual_mlp at the BOS position, BOS on"


def saturated_summary(tmp_path: Path, policy: str = "float16", safe: bool = False,
                      on: int = 412, off: int = 161) -> RunSummary:
    """A float16 run as a new user sees it: every BOS-on prompt overflows at layer 7 under the
    KNOWN BOS signature (already in the corpus, so no finding), BOS off stays finite."""
    s = run_summary(tmp_path)
    p = PolicySummary(policy=policy, dtype="float16", expected_safe=safe, bos_modes=[True, False])
    sig = (*BOS_SIGNATURE[:1], policy, *BOS_SIGNATURE[2:])
    for i in range(on):
        p.observe(overflow_verdict(f"prompt {i}"), sig, new=False)
    for i in range(off):
        p.observe(finite_verdict(f"finite {i % 7}", 1.0e4 + i))
    s.policies = [p, s.policies[1]]
    s.examples = p.examples + s.policies[1].examples
    return s


def row(md: str, policy: str, bos: str) -> str:
    """The policies-table row of (policy, BOS mode)."""
    return next(line for line in md.splitlines()
                if line.startswith(f"| {policy} | ") and line.split(" | ")[3] == bos)


def test_known_signature_hits_are_counted_and_named(tmp_path: Path) -> None:
    s = saturated_summary(tmp_path)
    md, page = render_markdown(s), render_html(s)
    bos_row = row(md, "float16", "on")
    assert "finite on every example" not in bos_row
    assert "| on | 412 | 0 | 412 | 412 | 0 | 0 | 0 | n/a (no finite example) |" in bos_row
    assert bos_row.endswith("| non-finite on 412 of 412 examples (all under known signatures) |")
    assert row(md, "float16", "off").endswith("| finite on every example |")
    assert "Status: non-finite on 412 of 573 examples (all under known signatures)." in md
    assert f"- {SIGNATURE_WORDS}: 412 examples" in md
    assert "574 examples screened, 412 non-finite (412 under known signatures)" in md
    for text in (f"{SIGNATURE_WORDS}: 412 examples", "non-finite on 412 of 573 examples "
                 "(all under known signatures)", "574 examples screened, 412 non-finite"):
        assert text in page  # the HTML says the same
    assert "finite on every example</td>" in page  # BOS off, and float32: nothing else
    assert page.count("finite on every example</td>") == 2


def test_a_declared_safe_policy_that_went_nonfinite_is_a_regression(tmp_path: Path) -> None:
    s = saturated_summary(tmp_path, policy="float16-clamp", safe=True, on=3, off=5)
    assert not s.policies[0].findings  # known signature: nothing saved, still a regression
    md, page = render_markdown(s), render_html(s)
    alarm = "REGRESSION: declared safe, produced NaN/Inf on 3 of 8 examples"
    assert f"Status: {alarm} (all under known signatures)." in md
    assert "REGRESSION: declared safe, produced NaN/Inf: float16-clamp." in md
    assert row(md, "float16-clamp", "on").endswith(
        "| REGRESSION: declared safe, produced NaN/Inf on 3 of 3 examples "
        "(all under known signatures) |")
    assert f'<p class="alarm">Status: {alarm}' in page
    assert '<td class="alarm">REGRESSION' in page
    empty = PolicySummary(policy="float32", dtype="float32", expected_safe=True)
    s.policies.append(empty)
    assert "| float32 | float32 | yes | none | 0 |" in render_markdown(s)
    assert render_markdown(s).count("| not run |") == 1


def test_wider_dtypes_show_their_float16_headroom(tmp_path: Path) -> None:
    md = render_markdown(run_summary(tmp_path))
    f32 = row(md, "float32", "on")
    assert "| 0.63 (vs float16) |" in f32  # 65504 / 1.04e5: it would overflow in float16
    assert f"{F32_MAX / 1.04e5:.3g}" not in md  # 3.27e+33 tells the reader nothing
    assert "headroom 0.63 (vs float16) at layer 13 residual_mlp" in md
    assert "| 2.18 |" in row(md, "float16", "off")  # float16's own limit: no label


def test_reproduce_command_is_built_from_the_run(tmp_path: Path) -> None:
    from fuzz.cli import build_parser  # here: it imports torch, which the rest does without

    s = run_summary(tmp_path)
    s.command = "python -m fuzz run --model gemma3-270m --budget 90.5s"  # as typed: no seed
    s.budget_s, s.batch_size, s.round_examples = 90.5, 4, 10
    s.engine, s.device = "upstream", "cuda:1"
    for p in s.policies:
        p.bos_modes = [False]
    command = run_command(s)
    assert "--seed 1234" in command and command in render_markdown(s)
    args = build_parser().parse_args(shlex.split(command)[3:])
    assert (args.seed, args.budget, args.batch_size, args.round_examples) == (1234, 90.5, 4, 10)
    assert (args.policies, args.corpus, args.no_bos) == ("float16,float32", "corpus", True)
    assert (args.engine, args.device, args.model) == ("upstream", "cuda:1", "gemma3-270m")
    assert (args.max_new_tokens, args.max_prompt_tokens) == (16, 96)
    s.device = "cpu (a description)"  # not a device name: no --device rather than a wrong one
    assert "--device" not in run_command(s)


def near_limit_verdict(prompt: str, ratio: float, add_bos: bool = False) -> Verdict:
    """float16, no BOS: the residual add at layer 7 went `ratio` past 65504 (unrounded)."""
    v = overflow_verdict(prompt)
    v.add_bos = add_bos
    v.first_nonfinite = NonFinite(step=0, layer=7, site="residual_mlp", position=3,
                                  token_id=506, kind="inf", channel=163,
                                  terms=(55008.0, float(round(ratio * F16_MAX) - 55008)),
                                  unrounded=ratio * F16_MAX)
    return v


MARGIN = {"limit": F16_MAX, "unrounded": 1.012 * F16_MAX, "ratio": 1.012,
          "float32": 66100.0, "float32_ratio": 66100.0 / F16_MAX}
ROBUSTNESS = {"robust": False, "reason": "margin 1.0120 < 1.02", "margin": 1.012,
              "variations": [{"variation": "alone, 2 threads, cpu", "status": "nonfinite",
                              "where": "step 0 layer 7 residual_mlp", "margin": 1.012},
                             {"variation": "batched, 1 thread, cpu", "status": "finite",
                              "where": "", "margin": None}]}


def marginal_summary(tmp_path: Path) -> RunSummary:
    s = run_summary(tmp_path)
    fp16 = s.policies[0]
    v = near_limit_verdict("12345 <script>", 1.012)
    fp16.observe(v, ("ab12cd34ef56", "float16", False, 7, "residual_mlp", "content"), new=True)
    fp16.add_finding(v, "marginal", None,
                     ("ab12cd34ef56", "float16", False, 7, "residual_mlp", "content"),
                     margin=MARGIN, robustness=ROBUSTNESS)
    for prompt in ("1234", "1234", "99 & <b>"):  # a replayed prompt is counted once
        near = near_limit_verdict(prompt, 1.005)
        fp16.observe(near, ("ab12cd34ef56", "float16", False, 7, "residual_mlp", "content"),
                     new=True)
        fp16.observe_marginal(near)
    s.policies[0].findings[0].margin = {**MARGIN, "ratio": 68392.0 / F16_MAX,
                                        "unrounded": 68392.0}
    s.policies[0].findings[0].robustness = {"robust": True, "reason": "", "margin": 1.0436,
                                            "variations": ROBUSTNESS["variations"][:1] * 6}
    s.batch_size, s.round_examples = 8, 40
    return s


def test_margins_and_robustness_are_shown_and_marginal_is_not_saved(tmp_path: Path) -> None:
    s = marginal_summary(tmp_path)
    md = render_markdown(s)
    saved, marginal = md.split("### Finding 2")
    assert "- **Margin:** 1.0441 x the limit (68392 unrounded > 65504)" in saved
    assert "- **Robustness:** held under 6 kernel variations, least margin 1.0436" in saved
    assert marginal.startswith(": layer 7 residual_mlp at a content position, BOS off "
                               "(marginal, not saved)")
    marginal = marginal.split("###")[0]
    assert "- **Status:** marginal: failed here" in marginal and "saved to" not in marginal
    assert "Case file" not in marginal
    assert ("- **Margin:** 1.0120 x the limit (66290 unrounded > 65504); float32 run at the "
            "same site: 66100 (1.0091 x)") in marginal
    assert ("- **Robustness:** not robust: margin 1.0120 < 1.02 (non-finite under 1 of 2 "
            "kernel variations, least margin 1.0120)") in marginal
    assert "batched, 1 thread, cpu: finite" in marginal
    assert "- margin 1.0050 x the limit at step 0 layer 7 residual_mlp: `'1234'`" in md
    assert md.count("`'1234'`") == 1
    # BOS off: 2 finite + 4 non-finite (1 marginal finding, 2 distinct marginal prompts)
    assert "| off | 6 | 0 | 4 | 0 | 0 | 3 | 0 | 2.18 | non-finite on 4 of 6 examples |" in md
    # one count of marginal failures everywhere: the headline, the table and the console
    assert ("2 findings: 1 new (saved), 3 marginal (failed short of the margin a case needs: "
            "not saved)") in md
    page = render_html(s)
    assert "<script>" not in page and "&lt;script&gt;" in page and "99 &amp; &lt;b&gt;" in page
    assert "1.0120 x the limit (66290 unrounded &gt; 65504)" in page
    assert '<div class="finding marginal">' in page


def test_json_round_trip_keeps_the_new_fields(tmp_path: Path) -> None:
    s = marginal_summary(tmp_path)
    s.policies[0].observe(overflow_verdict("known"), BOS_SIGNATURE, new=False)
    text = s.to_json()
    back = RunSummary.from_json(text)
    assert back.to_json() == text
    assert render_markdown(back) == render_markdown(s) and render_html(back) == render_html(s)
    assert (back.batch_size, back.round_examples) == (8, 40)
    bos, no_bos = back.policies[0].modes["bos"], back.policies[0].modes["no-bos"]
    assert isinstance(bos, ModeCounts) and bos.known == {BOS_SIGNATURE: 1}
    assert no_bos.marginal == 2 and no_bos.marginal_examples[0]["margin"] == pytest.approx(1.005)
    assert back.policies[1].modes["bos"].best_float16_headroom == pytest.approx(F16_MAX / 1.04e5)
    marginal = back.policies[0].findings[1]
    assert marginal.is_marginal and marginal.margin == MARGIN
    assert marginal.robustness == ROBUSTNESS
    # A report written before these fields still loads, and says only what it recorded.
    old = json.loads(text)
    for key in ("batch_size", "round_examples"):
        del old[key]
    for p in old["policies"]:
        del p["modes"]
    legacy = RunSummary.from_dict(old)
    md = render_markdown(legacy)
    assert "--batch-size" not in md and "(not counted per mode)" in md
    assert row(md, "float16", "on, off (not counted per mode)").endswith(
        "| non-finite on at least 2 of 8 examples |")  # its 2 findings: all it knows
    assert row(md, "float32", "on (not counted per mode)").endswith(
        "| 3.27e+33 (vs float32) | no finding (this older report did not count non-finite "
        "examples) |")


# --------------------------------------------------------------------------- data model


def test_the_header_names_each_policys_screening_kernel_and_the_trial(tmp_path: Path) -> None:
    s = run_summary(tmp_path)
    assert "Screening kernels" not in render_markdown(s)  # a report that recorded none
    s.screening_kernels = {"float32": "native", "float16": "fp32-accumulate-wide"}
    s.kernel_trial_speedup = 1.274
    md = render_markdown(s)
    assert ("float16 fp32-accumulate-wide, float32 native (auto's trial: "
            "fp32-accumulate-wide ran at 1.27x native's speed, re-runs counted)") in md
    back = RunSummary.from_json(s.to_json())
    assert (back.screening_kernels, back.kernel_trial_speedup) == (s.screening_kernels, 1.274)
    assert render_markdown(back) == md


def test_the_console_summary_counts_and_words_as_the_report_does(tmp_path: Path, capsys) -> None:
    """A first run's console said "0 marginal" where the report's table and JSON said 1, and gave
    float32's headroom against its own limit (6.73e+33) where the report gave it against
    float16's ("1.29 (vs float16)")."""
    from fuzz.report.progress import print_summary

    s = marginal_summary(tmp_path)
    print_summary(s)
    out = capsys.readouterr().out
    assert "3 marginal (failed short of the margin a case needs: not saved)" in out
    assert "float16 no-BOS" in out and ", 3 marginal," in out
    md = render_markdown(s)
    assert "| 0.63 (vs float16) |" in md  # float32 with BOS: 65504 / 1.04e5
    assert "best content headroom 0.63 (vs float16)" in out
    assert "e+33" not in out


def test_a_saved_case_not_known_to_be_minimal_is_counted_with_what_finishes_it(tmp_path: Path,
                                                                               capsys) -> None:
    from fuzz.report.progress import print_summary

    s = run_summary(tmp_path)
    s.policies[0].findings[0].minimization = {"state": "stopped", "why": "time",
                                              "from_chars": 64, "chars": 40, "chunk": 2,
                                              "runs": 96}
    md = render_markdown(s)
    assert "1 new (saved; 1 not 1-minimal: `python -m fuzz minimize` finishes it)" in md
    assert ("- **Minimizing:** stopped by time at 2-character deletions (64 -> 40 characters, "
            "96 runs)") in md
    print_summary(s)
    out = capsys.readouterr().out
    assert "not 1-minimal (stopped by time" in out and "python -m fuzz minimize" in out
    back = RunSummary.from_json(s.to_json())
    assert back.policies[0].findings[0].minimization["state"] == "stopped"
