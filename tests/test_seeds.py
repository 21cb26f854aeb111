"""`fuzz run --seed-prompts`: the user's prompts are every mode's first examples and stay in its
mutation pool; a finding says which seed it grew from; the corpus's seeds/ are the default."""
from __future__ import annotations

import json
from pathlib import Path

from hypothesis import strategies as st

from fuzz.cli import build_parser, main
from fuzz.corpus import Corpus
from fuzz.prompts.files import PromptRecord
from fuzz.run import FuzzJob, seed_files
from fuzz.search.accounting import PolicySummary
from fuzz.search.round import Search, round_strategy
from fuzz.session import ModelOptions, Session
from fuzz.verdict import Bounds

ROOT = Path(__file__).resolve().parent.parent


def _job(tmp_path: Path, model: str, *extra: str) -> FuzzJob:
    args = build_parser().parse_args(
        ["run", "--model", model, "--policies", "float16", "--budget", "30s", "--corpus",
         str(tmp_path / "corpus"), "--database", "", "--seed", "3", "--quiet",
         "--max-new-tokens", "1", "--device", "cpu", *extra])
    from fuzz.cli import bounds_from_args

    return FuzzJob.from_args(args, ModelOptions(model, device="cpu"), bounds_from_args(args))


def test_a_seed_that_fails_is_a_finding_that_grew_from_itself(tmp_path):
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("nothing here\nkernel 7 ms\n")
    job = _job(tmp_path, "tiny-planted", "--no-bos", "--seed-prompts", str(seeds))
    assert job.seed_texts == ["nothing here", "kernel 7 ms"]
    assert job.main() == 0
    [finding] = [f for f in job.summaries["float16"].findings if f.is_new]
    assert finding.grew_from == f"{seeds}:2"
    [loaded] = Corpus(tmp_path / "corpus").cases("tiny-planted")
    assert loaded.case.finder["grew_from"] == f"{seeds}:2"
    assert loaded.case.prompt == "7"  # minimized all the same


def test_the_mutants_edit_the_seeds_and_their_children_inherit_the_origin():
    session = Session.open(ModelOptions("tiny", device="cpu"), Bounds(max_new_tokens=1))
    summary = PolicySummary.for_policy("float16", [True])
    search = Search(session, "float16", True, set(), summary, deadline=1e18,
                    seeds=["abcdefgh"], origins={"abcdefgh": "s.txt:1"})
    assert search.live_pool == ["abcdefgh"]  # no miss yet: the seed alone
    drawn = []

    def note(base: str, mutant: str) -> None:
        drawn.append((base, mutant))
        search.note_draw(base, mutant)

    from hypothesis import given, settings

    @settings(max_examples=20, database=None)
    @given(round_strategy(st.just("fresh"), search.live_pool, on_draw=note))
    def draw(text: str) -> None:
        pass

    draw()
    mutants = [m for base, m in drawn if base == "abcdefgh"]
    assert mutants and all(search.origins[m] == "s.txt:1" for m in mutants)


def test_the_corpus_seeds_are_the_default_and_none_turns_them_off(tmp_path):
    corpus = Corpus(tmp_path)
    assert seed_files(None, corpus) == []
    corpus.seeds_dir.mkdir()
    (corpus.seeds_dir / "public.jsonl").write_text('{"prompt": "a"}\n')
    assert seed_files(None, corpus) == [corpus.seeds_dir / "public.jsonl"]
    assert seed_files(["none"], corpus) == []
    assert seed_files(["x.txt"], corpus) == [Path("x.txt")]
    assert corpus.models() == []  # seeds/ is no model's directory


def test_the_public_seeds_hold_each_reports_source_and_what_was_reported():
    rows = [json.loads(line) for line in
            (ROOT / "corpus" / "seeds" / "public.jsonl").read_text().splitlines()]
    assert {r["source"] for r in rows} >= {
        "google/gemma_pytorch#10", "microsoft/onnxruntime#26732", "keras-team/keras-hub#2424",
        "huggingface/transformers#39686", "vllm-project/vllm#14696"}
    for row in rows:
        assert ("prompt" in row) != ("messages" in row)
        assert row["model"] and row["dtype"] and row["symptom"]


def test_chat_seeds_are_rendered_with_the_template(tmp_path):
    job = _job(tmp_path, "tiny", "--seed-prompts", "none")
    job.use_seeds([PromptRecord(0, "c.jsonl:1", messages=(("user", "hi"),)),
                   PromptRecord(1, "c.jsonl:2", messages=(("system", "S"), ("user", "U")))])
    assert job.seed_texts[0] == "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert job.seed_texts[1].startswith("<start_of_turn>user\nS\n\nU")


def test_a_bad_seed_file_is_named(tmp_path, capsys):
    bad = tmp_path / "s.jsonl"
    bad.write_text("not json\n")
    assert main(["run", "--model", "tiny", "--seed-prompts", str(bad), "--budget", "1s",
                 "--corpus", str(tmp_path / "c")]) == 2
    assert f"{bad}:1: not a JSON line" in capsys.readouterr().err
