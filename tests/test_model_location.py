"""Checkpoints everywhere: cases record where their model is; replay finds a file model by that
path or by --model PATH, and refuses a file that is not the case's model; the pytest plugin takes
checkpoints and HF directories as the CLI does."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_checkpoints import save_tiny_hf

from fuzz.cli import main as cli_main
from fuzz.corpus import Case, Corpus, CorpusError, load_case
from fuzz.corpus.replay import replay_corpus
from fuzz.engine.synthetic import tiny as synthetic
from fuzz.engine.tokenizer.build import tiny_tokenizer
from fuzz.session import ModelOptions, Session
from fuzz.verdict import Bounds, PromptSpec

pytest.importorskip("transformers", reason="HF checkpoints are written by transformers")
pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent
PROMPT = "the model"


def _overflowing_hf_dir(directory: Path, scale: float = 3e4) -> Path:
    """A tiny HF Gemma 3 whose embedding times sqrt(hidden) passes 65504: float16 overflows on
    every prompt (and float32 does not), so a case and its replay are quick to get."""
    from safetensors.torch import load_file, save_file

    save_tiny_hf("gemma3_text", directory)
    path = directory / "model.safetensors"
    state = load_file(str(path))
    state["model.embed_tokens.weight"] = torch.full_like(state["model.embed_tokens.weight"],
                                                         scale)
    save_file(state, str(path), metadata={"format": "pt"})
    return directory


def _save_case(directory: Path, corpus: Path) -> Path:
    session = Session.open(ModelOptions(str(directory), device="cpu"), Bounds(max_new_tokens=1))
    verdict = session.check(PromptSpec(PROMPT), "float16")
    assert verdict.nonfinite
    result = Corpus(corpus).save(Case.of(session, verdict))
    assert result.saved
    return result.path


def _reproduce_rows(rows):
    return [r for r in rows if r.expected == "reproduce"]


def test_old_corpus_files_load_and_stay_byte_for_byte():
    """Committed cases written before `model_location` existed load without one; every committed
    case, old or new, is written back byte for byte."""
    old = 0
    for path in sorted((REPO / "corpus").glob("*/*.json")):
        text = path.read_text(encoding="utf-8")
        case = load_case(path)
        if "model_location" not in json.loads(text):
            old += 1
            assert case.model_location is None
        assert case.to_json() == text
    assert old > 0, "no committed case predates model_location any more: test with a fixture"


def test_zoo_case_records_the_zoo_name():
    session = Session.open(ModelOptions("tiny-planted", device="cpu"), Bounds(max_new_tokens=1))
    case = Case.of(session, session.check(PromptSpec("7"), "float16"))
    assert case.model_location == "tiny-planted"
    assert json.loads(case.to_json())["model_location"] == "tiny-planted"


def test_file_case_records_its_path_and_replays_from_it(tmp_path, monkeypatch):
    directory = _overflowing_hf_dir(tmp_path / "hfmodel")
    saved = _save_case(directory, tmp_path / "corpus")
    case = load_case(saved)
    assert case.model == "hfmodel" and case.model_location == str(directory.resolve())
    monkeypatch.chdir(REPO)  # replay from elsewhere: the path is absolute
    rows = _reproduce_rows(replay_corpus(Corpus(tmp_path / "corpus"), device="cpu"))
    assert [(r.ok, r.error) for r in rows] == [(True, False)]
    assert "skipped" not in rows[0].got and "inf" in rows[0].got


def test_moved_model_is_skipped_then_found_with_model_path(tmp_path):
    directory = _overflowing_hf_dir(tmp_path / "hfmodel")
    _save_case(directory, tmp_path / "corpus")
    moved = tmp_path / "elsewhere" / "hfmodel"
    moved.parent.mkdir()
    shutil.move(directory, moved)
    corpus = Corpus(tmp_path / "corpus")
    row = _reproduce_rows(replay_corpus(corpus, device="cpu"))[0]
    assert row.ok and "does not exist here" in row.got and "--model PATH" in row.got
    row = _reproduce_rows(replay_corpus(corpus, model_filter=str(moved), device="cpu"))[0]
    assert (row.ok, row.error) == (True, False) and "skipped" not in row.got


def test_another_model_at_the_path_is_an_error_naming_both_fingerprints(tmp_path, capsys):
    directory = _overflowing_hf_dir(tmp_path / "a" / "hfmodel")
    saved = _save_case(directory, tmp_path / "corpus")
    recorded = load_case(saved).model_fingerprint
    other = _overflowing_hf_dir(tmp_path / "b" / "hfmodel", scale=4e4)  # same name, new weights
    rows = replay_corpus(Corpus(tmp_path / "corpus"), model_filter=str(other), device="cpu")
    assert rows and all(r.error and not r.ok for r in rows)
    assert not any(r.regression or r.stale for r in rows)
    message = rows[0].got
    assert recorded in message and str(other.resolve()) in message
    assert "fingerprint" in message and message.count("fingerprint") >= 2
    code = cli_main(["replay", "--corpus", str(tmp_path / "corpus"), "--model", str(other),
                     "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and f"error: {saved}" in err and recorded in err


def test_add_from_case_reloads_a_file_model_from_its_location(tmp_path, capsys):
    saved = _save_case(_overflowing_hf_dir(tmp_path / "hfmodel"), tmp_path / "corpus")
    code = cli_main(["add", "--from-case", str(saved), "--corpus", str(tmp_path / "again"),
                     "--device", "cpu"])  # the case's own bounds: 1 new token
    assert code == 0 and capsys.readouterr().out.startswith("saved: ")
    [again] = (tmp_path / "again" / "hfmodel").glob("*.json")
    assert load_case(again).model_location == load_case(saved).model_location


def test_model_location_must_be_a_string(tmp_path):
    path = sorted((REPO / "corpus").glob("*/*.json"))[0]
    doc = json.loads(path.read_text())
    doc["model_location"] = 7
    bad = tmp_path / path.name
    bad.write_text(json.dumps(doc))
    with pytest.raises(CorpusError, match="field 'model_location' must be a non-empty string"):
        load_case(bad)


# --- the pytest plugin --------------------------------------------------------------------------
INNER = '''
import json, os

def test_model(gemma_fuzz):
    model = gemma_fuzz.session.model
    want = json.loads(os.environ["WANT"])
    assert model.location == want["location"]
    assert model.config.architecture.name == want["architecture"]
    assert model.config.num_hidden_layers == want["layers"]
'''


def _inner(pytester, monkeypatch, want: dict, *options: str):
    pytester.makepyfile(test_inner=INNER)
    monkeypatch.setenv("WANT", json.dumps(want))
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly",
                                         "-p", "no:xdist", *options)


def _checkpoint(tmp_path: Path) -> tuple[Path, Path, Path, int]:
    config = synthetic.tiny_config(synthetic.Architecture.GEMMA_2, vocab_size=512)
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"model_state_dict": synthetic.random_state(config)}, checkpoint)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.to_dict()))
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(tiny_tokenizer().serialized_model_proto())
    return checkpoint, config_file, tokenizer, config.num_hidden_layers


def test_plugin_takes_a_gemma_pytorch_checkpoint(fuzz_project, tmp_path, monkeypatch):
    checkpoint, config_file, tokenizer, layers = _checkpoint(tmp_path)
    result = _inner(fuzz_project, monkeypatch,
                    {"location": str(checkpoint), "architecture": "GEMMA_2", "layers": layers},
                    "--gemma-model", str(checkpoint), "--gemma-config", str(config_file),
                    "--gemma-tokenizer", str(tokenizer))
    result.assert_outcomes(passed=1)


def test_plugin_variant_reaches_the_loader(fuzz_project, tmp_path, monkeypatch):
    """--gemma-variant 270m on the tiny checkpoint: the loader checks it against that variant."""
    checkpoint, _, tokenizer, _ = _checkpoint(tmp_path)
    result = _inner(fuzz_project, monkeypatch, {}, "--gemma-model", str(checkpoint),
                    "--gemma-variant", "270m", "--gemma-tokenizer", str(tokenizer))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the weights do not match the config (architecture GEMMA_3, "
                                 "18 layers*"])


def test_plugin_takes_an_hf_directory(fuzz_project, tmp_path, monkeypatch):
    _, directory = save_tiny_hf("gemma2", tmp_path / "g2")
    result = _inner(fuzz_project, monkeypatch,
                    {"location": str(directory), "architecture": "GEMMA_2", "layers": 4},
                    "--gemma-model", str(directory))
    result.assert_outcomes(passed=1)
