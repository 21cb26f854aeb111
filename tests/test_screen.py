"""`fuzz screen`: the user's prompt files (every format, chat rendering), the results file (written
as it goes, resumed, never a partial or duplicate line, shards), the summary, --save and the exit
codes. tiny-planted overflows in float16 on the token "7" (fuzz.engine.synthetic.tiny)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuzz.cli import main
from fuzz.corpus import Corpus
from fuzz.prompts.chat import TemplateError, chat_spec, gemma_render, jinja_render
from fuzz.prompts.files import read_prompts
from fuzz.report.intervals import wilson_interval
from fuzz.screen.command import exit_code
from fuzz.screen.results import read_rows, row_key
from fuzz.screen.summary import PolicyScreen

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny-planted", "--max-new-tokens", "2", "--quiet", "--device", "cpu"]


def screen(*args: str) -> int:
    return main(["screen", *TINY, *args])


# --- formats -----------------------------------------------------------------------------------
def test_text_files_are_one_prompt_per_line_or_split_by_a_separator(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("first\n\n  \nsecond line\r\nthird")
    records = read_prompts([lines])
    assert [(r.source, r.text) for r in records] == [
        (f"{lines}:1", "first"), (f"{lines}:4", "second line"), (f"{lines}:5", "third")]
    multi = tmp_path / "m.prompts"  # any other extension is text too
    multi.write_text("one\nprompt\n---\ntwo\n---\n")
    records = read_prompts([multi], separator="\n---\n")
    assert [(r.source, r.text) for r in records] == [(f"{multi}:1", "one\nprompt"),
                                                      (f"{multi}:4", "two")]


def test_jsonl_prompts_fields_and_chats(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"q": "b", "prompt": "c"}\n'
                    '{"messages": [{"role": "system", "content": "S"}, '
                    '{"role": "user", "content": "U"}]}\n')
    records = read_prompts([path])
    assert [r.text for r in records] == ["a", "c", None]
    assert records[2].messages == (("system", "S"), ("user", "U")) and records[2].is_chat
    assert records[2].source == f"{path}:4" and records[2].index == 2
    path.write_text('{"q": "b"}\n')
    assert read_prompts([path], field="q")[0].text == "b"


def test_csv_tsv_and_parquet_columns(tmp_path):
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('id,prompt\n1,"a, quoted\nmulti-line prompt"\n2,plain\n')
    records = read_prompts([csv_file])
    assert [(r.source, r.text) for r in records] == [
        (f"{csv_file}:2", "a, quoted\nmulti-line prompt"), (f"{csv_file}:4", "plain")]
    tsv = tmp_path / "p.tsv"
    tsv.write_text("text\tid\nhello there\t1\n")
    assert read_prompts([tsv], field="text")[0].text == "hello there"
    pq = pytest.importorskip("pyarrow.parquet", reason="pip install 'gemma-fuzz[parquet]'")
    import pyarrow

    parquet = tmp_path / "p.parquet"
    pq.write_table(pyarrow.table({"prompt": ["x", "y 7"]}), parquet)
    assert [(r.source, r.text) for r in read_prompts([parquet])] == [
        (f"{parquet}:1", "x"), (f"{parquet}:2", "y 7")]
    # indices run on over files, in the order given
    assert [r.index for r in read_prompts([csv_file, parquet])] == [0, 1, 2, 3]


@pytest.mark.parametrize(("name", "content", "extra", "message"), [
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": \n', [], "p.jsonl:2: not a JSON line"),
    ("p.jsonl", '{"prompt": "a"}\n["a"]\n', [], "p.jsonl:2: a JSON line must be an object"),
    ("p.jsonl", '{"text": "a"}\n', [], "p.jsonl:1: no 'prompt' field and no 'messages' "
                                       "(keys: 'text'); give the prompt's field with --field"),
    ("p.jsonl", '{"prompt": 7}\n', [], "p.jsonl:1: field 'prompt' must be a string"),
    ("p.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', [],
     "p.jsonl:1: messages[0] must be an object with a role"),
    ("p.csv", "id,text\n1,a\n", [], "p.csv:1: no column 'prompt' in the header (id, text)"),
    ("p.csv", "prompt,id\na,1\nb,2,3\n", [], "p.csv:3: 3 cells where the header has 2"),
    ("p.txt", "a\n", ["--field", "q"], "p.txt: --field q applies to JSONL, CSV, TSV"),
    ("p.jsonl", '{"prompt": "a"}\n', ["--separator", "~~"], "p.jsonl: --separator applies to "
                                                             "text files"),
    ("missing.txt", None, [], "missing.txt: cannot be read"),
])
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, capsys, name, content, extra,
                                                          message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    out = tmp_path / "results.jsonl"
    assert screen("--prompts", str(path), "--out", str(out), *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ")
    assert not out.exists()  # nothing half-written


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine\nbad \xff here\n")
    assert screen("--prompts", str(path)) == 2
    assert f"{path}:2: not UTF-8 (byte 0xff)" in capsys.readouterr().err


# --- chat --------------------------------------------------------------------------------------
def test_gemma_renders_a_system_turn_into_the_first_user_turn():
    text = gemma_render([("system", "Be brief."), ("user", " What is 7? "),
                         ("assistant", "Seven."), ("user", "And 8?")])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nWhat is 7?<end_of_turn>\n"
                    "<start_of_turn>model\nSeven.<end_of_turn>\n"
                    "<start_of_turn>user\nAnd 8?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(TemplateError, match="alternate user/model"):
        gemma_render([("user", "a"), ("user", "b")])
    spec = chat_spec([("system", "S"), ("user", "U")])
    assert spec.add_bos and not spec.chat and not spec.text.startswith("<bos>")
    assert chat_spec([("user", " hi ")]) == type(spec)("hi", add_bos=True, chat=True)


def test_a_models_own_template_is_rendered_with_jinja():
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}[bot]{% endif %}")
    assert jinja_render(template, [("user", "hi")]) == "<bos>[user] hi\n[bot]"
    spec = chat_spec([("user", "hi")], template)
    assert spec.text == "[user] hi\n[bot]" and spec.add_bos and not spec.chat
    no_bos = chat_spec([("user", "hi")], "{{ messages[0]['content'] }}")
    assert no_bos.text == "hi" and not no_bos.add_bos
    with pytest.raises(TemplateError, match="only users"):
        jinja_render("{{ raise_exception('only users') }}", [("user", "x")])


def test_an_hf_directory_carries_its_chat_template(tmp_path):
    from fuzz.engine.hf_dir import chat_template

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "T1"}))
    assert chat_template(tmp_path) == "T1"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T2"},
                           {"name": "default", "template": "T3"}]}))
    assert chat_template(tmp_path) == "T3"
    (tmp_path / "chat_template.jinja").write_text("T4")
    assert chat_template(tmp_path) == "T4"


@pytest.mark.parametrize("engine", ["upstream", "transformers"])
def test_a_chat_is_fed_the_same_tokens_on_every_engine(tmp_path, engine):
    if engine == "upstream":
        from fuzz.engine.upstream.engine import upstream_available

        if not upstream_available()[0]:
            pytest.skip("google/gemma_pytorch is not installed")
    else:
        pytest.importorskip("transformers")
    chats = tmp_path / "c.jsonl"
    chats.write_text('{"messages": [{"role": "system", "content": "Be brief."}, '
                     '{"role": "user", "content": "Is 7 prime?"}]}\n'
                     '{"messages": [{"role": "user", "content": "hello"}]}\n')
    rows = {}
    for name in ("builtin", engine):
        out = tmp_path / f"{name}.jsonl"
        screen("--prompts", str(chats), "--policies", "float16", "--out", str(out),
               "--engine", name)
        rows[name] = {r["prompt_index"]: r for r in read_rows(out)}
    for index, ours in rows["builtin"].items():
        theirs = rows[engine][index]
        assert (ours["prompt"], ours["add_bos"], ours["chat"], ours["prompt_tokens"]) == \
            (theirs["prompt"], theirs["add_bos"], theirs["chat"], theirs["prompt_tokens"])
        assert ours["status"] == theirs["status"] and ours["bos_mode"] == "template"
    assert rows["builtin"][0]["status"] == "nonfinite"  # "7" in the user's turn


# --- the results file --------------------------------------------------------------------------
def _prompts(tmp_path: Path, n: int = 40) -> Path:
    path = tmp_path / "p.txt"
    # every third prompt holds the trigger "7"; the others no digit 7 at all (letters name them)
    names = ["".join(chr(ord("a") + int(d)) for d in str(i)) for i in range(n)]
    path.write_text("".join(f"prompt {name} {'7' if i % 3 == 0 else 'x'} end\n"
                            for i, name in enumerate(names)))
    return path


def test_a_prompt_holding_unicode_line_breaks_stays_one_prompt_and_resumes(tmp_path):
    # U+2028, U+2029 and U+0085 are line breaks to str.splitlines() but not to JSON or editors;
    # json.dumps(ensure_ascii=False) writes them raw, into the prompt file and the results file
    odd = "a\u2028b\u2029c\x85d"
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": odd}, ensure_ascii=False) + "\n"
                    + json.dumps({"prompt": "next"}) + "\n", encoding="utf-8")
    records = read_prompts([path])
    assert [(r.source, r.text) for r in records] == [(f"{path}:1", odd), (f"{path}:2", "next")]
    out = tmp_path / "r.jsonl"
    args = ["--prompts", str(path), "--policies", "float32", "--out", str(out)]
    assert screen(*args) == 0
    assert screen(*args) == 0  # resumed: the raw U+2028 in its results line is read back
    assert sorted(r["prompt"] for r in read_rows(out)) == sorted([odd, "next"])


def test_every_line_once_written_as_it_goes_and_resumed(tmp_path, capsys):
    prompts, out = _prompts(tmp_path, 12), tmp_path / "r.jsonl"
    args = ["--prompts", str(prompts), "--policies", "float16,float32", "--both-bos", "--out",
            str(out), "--batch-size", "4"]
    assert screen(*args) == 0
    rows = read_rows(out)
    assert len(rows) == 12 * 2 * 2 and len({row_key(r) for r in rows}) == len(rows)
    # a kill inside a write: the last line cut short
    data = out.read_bytes()
    out.write_bytes(data[: -40])
    capsys.readouterr()
    assert screen(*args) == 0
    assert "removed an unfinished last line" in capsys.readouterr().err
    again = read_rows(out)
    assert sorted(map(row_key, again)) == sorted(map(row_key, rows))
    assert out.read_bytes().endswith(b"\n")


def test_a_results_file_of_another_run_is_refused(tmp_path, capsys):
    prompts, out = _prompts(tmp_path, 3), tmp_path / "r.jsonl"
    assert screen("--prompts", str(prompts), "--policies", "float32", "--out", str(out)) == 0
    before = out.read_bytes()
    assert main(["screen", "--model", "tiny-planted", "--max-new-tokens", "3", "--quiet",
                 "--prompts", str(prompts), "--policies", "float32", "--out", str(out)]) == 2
    assert "holds another run's results (bounds" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_a_screen_killed_with_sigkill_twice_then_resumed_has_every_line_once(tmp_path):
    prompts, out = _prompts(tmp_path, 60), tmp_path / "r.jsonl"
    command = [sys.executable, "-m", "fuzz", "screen", *TINY, "--prompts", str(prompts),
               "--policies", "float16,float32,bfloat16", "--both-bos", "--out", str(out),
               "--batch-size", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        started = time.monotonic()
        while (not out.exists() or out.stat().st_size < 20000) and proc.poll() is None \
                and time.monotonic() - started < 120:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the screen ended before it was killed"
    partial = len(out.read_text().splitlines())
    assert 0 < partial < 60 * 3 * 2
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    rows = read_rows(out)
    keys = [row_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == 60 * 3 * 2


def test_two_shards_are_the_unsharded_run(tmp_path):
    prompts = _prompts(tmp_path, 25)
    whole, first, second = (tmp_path / f"{n}.jsonl" for n in ("whole", "s1", "s2"))
    base = ["--prompts", str(prompts), "--policies", "float16,float32", "--batch-size", "4"]
    assert screen(*base, "--out", str(whole)) == 0
    assert screen(*base, "--shard", "1/2", "--out", str(first)) == 0
    assert screen(*base, "--shard", "2/2", "--out", str(second)) == 0

    def essence(rows):
        return sorted((row_key(r), r["status"], json.dumps(r["first_nonfinite"], sort_keys=True),
                       r["tokens"]) for r in rows)

    assert essence(read_rows(first) + read_rows(second)) == essence(read_rows(whole))
    for policy in ("float16", "float32"):  # shard 1/2: the unsharded run's batches 1, 3, 5, ...
        keys = [row_key(r) for r in read_rows(whole) if r["policy"] == policy]
        odd = [keys[i: i + 4] for i in range(0, len(keys), 4)][0::2]
        assert [row_key(r) for r in read_rows(first) if r["policy"] == policy] == sum(odd, [])


@pytest.mark.parametrize("shard", ["0/2", "3/2", "2", "a/b"])
def test_a_bad_shard_is_named(tmp_path, capsys, shard):
    assert screen("--prompts", str(_prompts(tmp_path, 2)), "--shard", shard) == 2
    assert f"--shard {shard!r}: give K/N with 1 <= K <= N" in capsys.readouterr().err


def test_a_prompt_that_cannot_run_gets_a_line_that_says_why(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("fine\n" + "word " * 200 + "\n")
    out = tmp_path / "r.jsonl"
    assert screen("--prompts", str(path), "--policies", "float32", "--out", str(out)) == 0
    rows = {r["prompt_index"]: r for r in read_rows(out)}
    assert rows[0]["status"] == "finite"
    assert rows[1]["status"] == "not run" and "over the bound of 96 tokens" in rows[1]["error"]


# --- summary, --save, exit codes -----------------------------------------------------------------
def test_the_summary_gives_each_policy_its_share_with_an_interval_and_its_signatures(tmp_path,
                                                                                    capsys):
    prompts, report = _prompts(tmp_path, 9), tmp_path / "report"
    assert screen("--prompts", str(prompts), "--policies", "float16,float32",
                  "--report", str(report)) == 0
    out = capsys.readouterr().out
    assert "float16 (declared unsafe): 3 of 9 non-finite (33.3%, 95% interval 12.1-64.6%)" in out
    assert "3 x layer 2 residual_mlp at a content position, BOS on; shortest:" in out
    assert "float32 (declared safe): 0 of 9 non-finite" in out
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["policies"][0]["nonfinite_ci95"] == pytest.approx([0.1206, 0.6458], abs=1e-3)
    assert "| float16 | no | 9 | 3 | 33.3% (12.1-64.6%)" in (tmp_path / "report.md").read_text()
    assert "<table>" in (tmp_path / "report.html").read_text()


def test_wilson_intervals():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_exit_codes():
    safe_failed = PolicyScreen("float32", True, screened=5, nonfinite=1)
    unsafe_failed = PolicyScreen("float16", False, screened=5, nonfinite=5)
    assert exit_code([unsafe_failed], any_policy=False) == 0
    assert exit_code([unsafe_failed], any_policy=True) == 1
    assert exit_code([safe_failed, unsafe_failed], any_policy=False) == 1


def test_fail_on_nonfinite(tmp_path):
    prompts = _prompts(tmp_path, 3)
    assert screen("--prompts", str(prompts), "--policies", "float16") == 0
    assert screen("--prompts", str(prompts), "--policies", "float16",
                  "--fail-on-nonfinite") == 1


def test_save_minimizes_and_saves_each_new_signature_once(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    prompts = _prompts(tmp_path, 9)
    args = ["--prompts", str(prompts), "--policies", "float16", "--corpus", str(corpus),
            "--save"]
    assert screen(*args) == 0
    assert "saved: " in capsys.readouterr().out
    [loaded] = Corpus(corpus).cases("tiny-planted")
    case = loaded.case
    assert case.prompt == "7" and case.minimal  # minimized from "prompt a 7 end"
    assert case.finder["strategy"].startswith("fuzz screen ")
    assert screen(*args) == 0  # known now: nothing new
    assert "no new signature to save" in capsys.readouterr().out
    assert len(Corpus(corpus).cases("tiny-planted")) == 1


def test_options_that_cannot_apply_are_errors(tmp_path, capsys):
    prompts = str(_prompts(tmp_path, 2))
    assert screen("--prompts", prompts, "--save-time", "10s") == 2
    assert "--save-time applies to --save" in capsys.readouterr().err
    assert screen("--prompts", prompts, "--no-bos", "--both-bos") == 2
    assert "--no-bos and --both-bos contradict" in capsys.readouterr().err
