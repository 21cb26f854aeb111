"""The command line on synthetic models: check, add, replay, run (incl. an interrupted run)."""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time

import pytest

from fuzz import cli
from fuzz.cli import main, parse_duration
from fuzz.corpus import Corpus, load_case
from fuzz.engine.zoo import load_model
from fuzz.precision import POLICIES, parse_policies
from fuzz.run import FuzzJob
from fuzz.session import Session
from fuzz.verdict import Bounds, PromptSpec


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fuzz", *args], capture_output=True, text=True,
                          timeout=600)


def test_check_json_locates_the_planted_overflow(capsys):
    rc = main(["check", "--model", "tiny-planted", "--policy", "float16", "--prompt",
               "kernel 7 ms", "--max-new-tokens", "3", "--json"])
    assert rc == 1  # non-finite
    doc = json.loads(capsys.readouterr().out)
    assert doc["finite"] is False and doc["status"] == "nonfinite"
    # the margin: the unrounded sum past 65504, and the same site in a float32 run
    assert doc["margin"]["ratio"] > 1.0 and doc["margin"]["float32_ratio"] > 1.0
    assert doc["first_nonfinite"]["unrounded"] == pytest.approx(doc["margin"]["unrounded"])
    first = doc["first_nonfinite"]
    assert (first["step"], first["layer"], first["site"], first["kind"]) == (
        0, 2, "residual_mlp", "inf")
    assert doc["prompt_ids"][first["position"]] == first["token_id"]
    assert first["channel"] == 0 and len(first["terms"]) == 2
    assert doc["max_abs"]["2"]["residual_mlp"] == "inf"  # strict JSON: inf as a string
    assert doc["headroom"]["2"]["residual_mlp"] == 0.0
    assert doc["tokens"] == [] and doc["text"] == ""


def test_check_readable_table_marks_the_first_nonfinite_layer(capsys):
    main(["check", "--model", "tiny-planted", "--policy", "float16", "--prompt", "7",
          "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "first non-finite" in line)
    assert line.split()[0] == "2" and "residual_mlp" in line
    assert "channel 0:" in out


def test_check_finite_prompt(capsys):
    assert main(["check", "--model", "tiny", "--policy", "bfloat16", "--prompt", "hello",
                 "--max-new-tokens", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["finite"] is True and doc["first_nonfinite"] is None
    assert doc["status"] == "finite" and doc["margin"] is None
    assert len(doc["tokens"]) == 3


def test_a_run_stopped_by_the_time_limit_is_inconclusive_never_finite(monkeypatch, capsys):
    monkeypatch.setattr(cli, "bounds_from_args", lambda args: Bounds(
        max_new_tokens=args.max_new_tokens, time_limit_s=0.0))
    assert main(["check", "--model", "tiny", "--policy", "float32", "--prompt", "hello",
                 "--max-new-tokens", "5", "--json"]) == 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "inconclusive" and doc["finite"] is False
    assert doc["first_nonfinite"] is None and doc["stopped"] == "timeout"


def test_prompt_from_a_file_and_from_stdin(tmp_path, monkeypatch, capsys):
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"a\x00b 7")  # a NUL byte: argv cannot carry one
    assert main(["check", "--model", "tiny-planted", "--policy", "float16", "--prompt-file",
                 str(path), "--max-new-tokens", "2", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["prompt"] == "a\x00b 7"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello\n")))
    assert main(["check", "--model", "tiny", "--policy", "float32", "--prompt", "-",
                 "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "hello\n"  # taken exactly


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny", "--policy", "float8", "--prompt", "x"],
     "unknown precision policy 'float8'"),
    (["--model", "tiny", "--policy", "float16", "--prompt", "x\udcff"],
     "'\\udcff' at index 1, a lone surrogate that UTF-8 cannot encode"),
    (["--model", "tiny", "--policy", "float16", "--prompt-file", "/nonexistent/p.txt"],
     "--prompt-file /nonexistent/p.txt: cannot be read"),
    (["--model", "nonexistent", "--policy", "float16", "--prompt", "x"], "neither a zoo name"),
    (["--model", "tiny", "--policy", "float16", "--no-bos", "--prompt", ""],
     "empty and BOS is off"),
    (["--model", "tiny", "--policy", "float16", "--max-prompt-tokens", "4", "--prompt",
      "a b c d e f"], "over the bound of 4 tokens"),
])
def test_check_bad_input_is_a_clear_error(args, message, capsys):
    assert main(["check", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9")
    assert main(["check", "--model", "tiny", "--policy", "float16", "--prompt-file",
                 str(path)]) == 2
    assert f"--prompt-file {path}: not UTF-8 text (byte 0xe9 at offset 3)" in \
        capsys.readouterr().err


def test_replay_of_a_missing_corpus_directory_is_an_error(tmp_path, capsys):
    assert main(["replay", "--corpus", str(tmp_path / "typo")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_add_refuses_a_finite_prompt_and_saves_a_failing_one(tmp_path, capsys):
    corpus = str(tmp_path / "corpus")
    assert main(["add", "--model", "tiny-planted", "--policy", "float16", "--prompt", "hello",
                 "--corpus", corpus, "--max-new-tokens", "2"]) == 1
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists() or not list((tmp_path / "corpus").rglob("*.json"))

    assert main(["add", "--model", "tiny-planted", "--policy", "float16", "--prompt", "a 7",
                 "--corpus", corpus, "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("saved:")
    [path] = list((tmp_path / "corpus" / "tiny-planted").glob("*.json"))
    case = load_case(path)
    assert case.prompt == "a 7" and case.first_nonfinite.channel == 0
    assert case.robustness["robust"] and case.margin["ratio"] > 1.02
    assert {v["variation"] for v in case.robustness["variations"]} >= {
        "alone, 1 thread, cpu", "batched, 2 threads, cpu, fp32-accumulate"}

    # Same signature, other prompt: covered already, not saved without --force.
    assert main(["add", "--model", "tiny-planted", "--policy", "float16", "--prompt", "7 b",
                 "--corpus", corpus, "--max-new-tokens", "2"]) == 0
    assert "known-signature" in capsys.readouterr().out
    assert len(list((tmp_path / "corpus" / "tiny-planted").glob("*.json"))) == 1


def test_add_refuses_a_marginal_failure(tmp_path, capsys):
    # A digit run of 40 overflows 2.2% past 65504 (fuzz.engine.synthetic.planted): under a margin
    # of 3% it would not be a regression case.
    corpus = str(tmp_path / "corpus")
    add = ["add", "--model", "tiny-digit-run-40", "--policy", "float16", "--prompt", "0" * 40,
           "--corpus", corpus, "--max-new-tokens", "2", "--min-margin", "1.03"]
    assert main(add) == 1
    assert "marginal (margin 1.0220 < 1.03)" in capsys.readouterr().err
    assert main([*add, "--allow-marginal"]) == 0
    [path] = list((tmp_path / "corpus").rglob("*.json"))
    assert load_case(path).robustness["robust"] is False


def test_add_from_an_old_case_file_measures_it_again(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": 1, "prompt": "x 7", "policy": "float16",
                               "add_bos": True, "model": "tiny-planted"}))
    corpus = tmp_path / "corpus"
    assert main(["add", "--from-case", str(old), "--corpus", str(corpus)]) == 0
    [path] = list(corpus.rglob("*.json"))
    case = load_case(path)
    assert case.prompt == "x 7" and case.schema == 2 and case.margin is not None
    assert case.bounds == Bounds().to_dict()  # it recorded none: the defaults


def test_add_from_a_case_keeps_the_bounds_it_recorded(tmp_path, capsys):
    """An 8-step case from pytest stays an 8-step case; a prompt bound past the default (a
    --long case's) is the case's, so its prompt is not refused as too long."""
    old = tmp_path / "old.json"
    prompt = "x " * 60 + "7"  # over the default 96-token prompt bound
    old.write_text(json.dumps({"schema": 1, "prompt": prompt, "policy": "float16",
                               "add_bos": True, "model": "tiny-planted",
                               "bounds": {"max_new_tokens": 8, "max_prompt_tokens": 200}}))
    corpus = tmp_path / "corpus"
    assert main(["add", "--from-case", str(old), "--corpus", str(corpus)]) == 0
    [path] = list(corpus.rglob("*.json"))
    assert load_case(path).bounds == {"max_new_tokens": 8, "max_prompt_tokens": 200}


@pytest.mark.parametrize("extra", [["--policy", "float32"], ["--no-bos"], ["--chat"],
                                   ["--prompt", "7"], ["--max-new-tokens", "2"]])
def test_add_from_a_case_refuses_an_option_it_would_ignore(tmp_path, capsys, extra):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": 1, "prompt": "7", "policy": "float16",
                               "add_bos": True, "model": "tiny-planted"}))
    assert main(["add", "--from-case", str(old), "--corpus", str(tmp_path / "c"), *extra]) == 2
    assert f"{extra[0]} cannot be used with --from-case" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("extra", [["--no-bos"], ["--chat"], ["--max-prompt-tokens", "50"]])
def test_compare_corpus_refuses_an_option_it_would_ignore(tmp_path, capsys, extra):
    assert main(["compare", "--model", "tiny", "--engines", "builtin", "--corpus",
                 str(tmp_path), *extra]) == 2
    assert f"{extra[0]} cannot be used with --corpus" in capsys.readouterr().err


def test_replay_reports_reproduced_cases_and_safe_policies(tmp_path, capsys):
    corpus = str(tmp_path / "corpus")
    main(["add", "--model", "tiny-planted", "--policy", "float16", "--prompt", "7",
          "--corpus", corpus, "--max-new-tokens", "2"])
    capsys.readouterr()
    assert main(["replay", "--corpus", corpus]) == 0
    out = capsys.readouterr().out
    assert "0 regressions" in out and "0 cases no longer reproduce" in out
    # the recorded case by mechanism: "7" after BOS is the first content token
    assert "; 1 case: 1 signature in 1 root cause" in out
    assert "first token (float16): 1 case, layer 2, e.g. token '7'" in out
    safe = sum(p.expected_safe for p in POLICIES.values())
    assert safe == 6  # float32, bfloat16 and the four float16 fixes
    assert out.count("yes") == 1 + safe  # the recorded float16 + every policy declared safe


def test_parse_duration():
    assert parse_duration("90s") == 90 and parse_duration("10m") == 600
    assert parse_duration("1h30m") == 5400 and parse_duration("45") == 45
    with pytest.raises(Exception, match="invalid duration"):
        parse_duration("soon")


def test_run_saves_each_new_signature_once_and_writes_a_report(tmp_path):
    corpus, report = tmp_path / "corpus", tmp_path / "report"
    args = ["run", "--model", "tiny-planted", "--policies", "float16,bfloat16", "--no-bos",
            "--budget", "45s",
            "--corpus", str(corpus), "--database", str(tmp_path / "db"), "--seed", "3",
            "--max-new-tokens", "2", "--round-examples", "15", "--quiet"]
    first = run_cli(*args, "--report", str(report), "--fail-on-new")
    assert first.returncode == 1, first.stderr  # --fail-on-new: new cases were saved
    assert "FAILED (--fail-on-new)" in first.stderr
    cases = Corpus(corpus).cases("tiny-planted")
    sigs = [c.case.signature for c in cases]
    assert cases and len(sigs) == len(set(sigs))
    assert all(c.case.policy == "float16" for c in cases)
    assert report.with_suffix(".md").exists() and report.with_suffix(".html").exists()
    second = run_cli(*args, "--fail-on-new")
    assert second.returncode == 0, second.stderr  # nothing new the second time
    assert len(Corpus(corpus).cases("tiny-planted")) == len(cases)  # no duplicate


def test_run_exits_1_when_a_policy_declared_safe_went_nonfinite(tmp_path):
    session = Session(load_model("tiny-planted"), bounds=Bounds(max_new_tokens=2))
    job = FuzzJob(session, parse_policies("float16,bfloat16"), [True], 1.0, Corpus(tmp_path),
                  None, 1, 5, None, quiet=True)
    broken = session.run([PromptSpec("7")], "float16")[0]
    job.summaries["float16"].observe(broken)  # an unsafe policy failing: a result
    assert job.exit_code() == 0
    job.summaries["bfloat16"].observe(broken)  # counted as if bfloat16 had gone non-finite
    assert job.exit_code() == 1


def test_an_interrupt_while_minimizing_still_saves_the_finding(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM during the minimizer (after Hypothesis's shrink) keeps the finding,
    measured as found, instead of losing it with the minimizer's work."""
    import fuzz.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fuzz.run, "finalize", interrupted)
    session = Session(load_model("tiny-planted"), bounds=Bounds(max_new_tokens=2))
    job = FuzzJob(session, parse_policies("float16"), [False], 120.0, Corpus(tmp_path / "c"),
                  None, 3, 15, None, quiet=True)
    job.main()
    assert job.stopped == "interrupted"
    [finding] = job.summaries["float16"].findings
    assert finding.how == "interrupted" and finding.case_path is not None
    assert len(Corpus(tmp_path / "c").cases("tiny-planted")) == 1


def test_a_finding_past_the_measuring_deadline_is_reported_with_its_add_command(
        tmp_path, capsys):
    """The budget is hard: a finding the tail leaves no time to measure is never saved unproven;
    the summary and the report say so and give the `fuzz add` that measures and saves it."""
    import shlex

    from fuzz.report import write_report
    from fuzz.report.progress import print_summary
    from fuzz.search.round import NewSignature
    from fuzz.search.schedule import MEASURE_TAIL_S, Schedule

    session = Session(load_model("tiny-planted"), bounds=Bounds(max_new_tokens=2))
    corpus = tmp_path / "c"
    job = FuzzJob(session, parse_policies("float16"), [False], 15.0, Corpus(corpus), None, 3, 15,
                  None, quiet=True)
    job.started = time.monotonic() - 15.0 - MEASURE_TAIL_S  # the budget and its tail are spent
    job.schedule = Schedule.plan(job.policies, job.bos_modes, job.budget_s, job.started)
    spec = PromptSpec("a 7", add_bos=False)
    job._save(NewSignature(session.screen([spec], "float16", set())[0], spec), "shrunk")
    [finding] = job.summaries["float16"].findings
    assert finding.status == "unmeasured" and finding.how == "cut"
    assert finding.case_path is None and not list(corpus.rglob("*.json"))
    print_summary(job.summary())
    out = capsys.readouterr().out
    assert "1 unmeasured (the budget ended first; not saved)" in out
    [command] = [line.split("measure and save it: ", 1)[1] for line in out.splitlines()
                 if "measure and save it: " in line]
    [md, *_] = write_report(job.summary(), str(tmp_path / "r"))
    assert "(unmeasured, not saved)" in md.read_text() and command in md.read_text()
    # the kernel that screened float16 ("native" while auto's trial is under way) is stated
    assert f"**Screening kernels:** float16 {session.screened_with['float16']}" in md.read_text()
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "fuzz", "add"]
    assert main(argv[3:]) == 0  # the command measures it and saves it
    [saved] = Corpus(corpus).cases("tiny-planted")
    assert saved.case.prompt == "a 7" and saved.case.robustness["robust"]


def test_a_marginal_prompt_replayed_by_the_database_is_not_measured_again(tmp_path,
                                                                          monkeypatch):
    """The example database replays a failing example in the mode's next round and Hypothesis
    shrinks it to the same prompt: that counts as the signature's second try, unmeasured."""
    import fuzz.run
    from fuzz.search.round import NewSignature
    from fuzz.search.schedule import Schedule

    measured = []

    def counted(*args, **kwargs):
        measured.append(args[1].text)
        return finalize(*args, **kwargs)

    finalize = fuzz.run.finalize
    monkeypatch.setattr(fuzz.run, "finalize", counted)
    # No margin can reach 100: every finding is marginal.
    session = Session(load_model("tiny-planted"), bounds=Bounds(max_new_tokens=2),
                      min_margin=100.0)
    job = FuzzJob(session, parse_policies("float16"), [False], 120.0, Corpus(tmp_path / "c"),
                  None, 3, 15, None, quiet=True)
    job.started = time.monotonic()
    job.schedule = Schedule.plan(job.policies, job.bos_modes, job.budget_s, job.started)
    spec = PromptSpec("a 7", add_bos=False)
    err = NewSignature(session.screen([spec], "float16", set())[0], spec)
    job._save(err, "shrunk")
    [finding] = job.summaries["float16"].findings
    assert finding.status == "marginal" and err.screened.signature not in job.known
    job._save(err, "shrunk")  # the replay
    assert measured == ["a 7"]  # measured once
    assert len(job.summaries["float16"].findings) == 1  # and reported once
    assert finding.signature in job.known  # MARGINAL_TRIES (2) reached: no longer chased


def test_sigterm_mid_run_keeps_findings_and_leaves_no_partial_file(tmp_path):
    corpus = tmp_path / "corpus"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fuzz", "run", "--model", "tiny-planted", "--policies", "float16",
         "--budget", "10m", "--corpus", str(corpus), "--database", str(tmp_path / "db"),
         "--seed", "5", "--max-new-tokens", "2", "--quiet", "--report", str(tmp_path / "r")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(corpus.rglob("*.json")):
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    files = list(corpus.rglob("*.json"))
    assert files, "the finding made before SIGTERM must be kept"
    for f in files:
        load_case(f)  # every file is a whole, valid case
    assert not list(corpus.rglob("*.tmp"))
    assert "interrupted" in out
    assert (tmp_path / "r.md").exists()  # the report is still written
