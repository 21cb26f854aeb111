"""`fuzz compare` (fuzz.compare): the table, transfer and divergence lines, prompts from the
command line or a corpus, and its refusals, on the tiny models."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import pytest  # noqa: E402

pytest.importorskip("transformers", reason="compare runs the transformers engine")

from fuzz.cli import main  # noqa: E402
from fuzz.compare import Cell, Comparison, Item, format_comparison, parse_engines  # noqa: E402
from fuzz.verdict import Bounds, PromptSpec

ENGINES = "builtin,transformers-eager,transformers-sdpa"


def test_planted_overflow_transfers_to_transformers(capsys):
    rc = main(["compare", "--model", "tiny-planted", "--engines", ENGINES, "--prompt", "a 7",
               "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("step 0 L2 residual_mlp x") == 3  # one cell per engine
    assert "transfer builtin -> transformers-sdpa: 1 of 1 float16 failures" in out
    assert "the engines agree on all 1 prompts" in out


def test_corpus_cases_are_compared_with_their_own_bos_mode(tmp_path, capsys):
    corpus = str(tmp_path / "corpus")
    assert main(["add", "--model", "tiny-planted", "--policy", "float16", "--prompt", "7 a",
                 "--no-bos", "--corpus", corpus, "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    rc = main(["compare", "--model", "tiny-planted", "--engines", "builtin,transformers",
               "--corpus", corpus])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| `'7 a'` | off | step 0 L2 residual_mlp" in out


def test_divergence_and_transfer_counts():
    items = [Item(PromptSpec(p), Bounds(), "--prompt") for p in ("a", "b", "c")]
    fail = Cell("nonfinite", 0, 7, "residual_mlp", 1.04)
    moved = Cell("nonfinite", 0, 8, "residual_attn", 1.01)
    c = Comparison(["builtin", "transformers"], "float16", items, [
        {"builtin": fail, "transformers": fail},
        {"builtin": fail, "transformers": moved},
        {"builtin": Cell("finite"), "transformers": Cell("finite")},
    ])
    assert c.diverging() == [1]
    assert c.transfer("transformers") == (1, 2)
    text = format_comparison(c)
    assert "transfer builtin -> transformers: 1 of 2 float16 failures" in text
    assert "diverge on 1 of 3 prompts: #2 (builtin: step 0 L7 residual_mlp x1.040, " \
           "transformers: step 0 L8 residual_attn x1.010)" in text


def test_bad_engine_lists_are_refused():
    with pytest.raises(ValueError, match="unknown engine.*nope.*valid: builtin"):
        parse_engines("builtin,nope")
    with pytest.raises(ValueError, match="at least two different engines"):
        parse_engines("builtin,builtin")
    assert parse_engines(" builtin , transformers-sdpa ") == ["builtin", "transformers-sdpa"]


def test_errors_exit_2_with_what_to_fix(tmp_path, capsys):
    assert main(["compare", "--model", "tiny", "--engines", "builtin"]) == 2
    assert main(["compare", "--model", "tiny", "--engines", ENGINES]) == 2
    assert "--prompt TEXT, --prompt-file FILE or --corpus DIR" in capsys.readouterr().err
    assert main(["compare", "--model", "tiny", "--engines", ENGINES, "--corpus",
                 str(tmp_path)]) == 2
    assert "holds no case of model 'tiny'" in capsys.readouterr().err
    assert main(["compare", "--model", "tiny-gemma4", "--engines", "builtin,transformers",
                 "--prompt", "7"]) == 2
    assert "use --engine transformers" in capsys.readouterr().err
