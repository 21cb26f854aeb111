"""The real Gemma 3 270M through the HF loader: transformers converts the GGUF to an HF directory
(config.json, model.safetensors, tokenizer.json only) and the built-in engine, loaded from that
directory, must be the GGUF's model: the same weights bit for bit (so HF's RMSNorm weights, w
applied as 1 + w, are the GGUF's stored 1 + w minus 1), the same tokenizer ids, the same float32
logits and the same float16 verdicts, a committed corpus finding included."""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hf_checkpoints import convert_real_gguf

from fuzz.corpus import load_case
from fuzz.engine.hf_dir import load_hf_model
from fuzz.engine.loaded import LoadedModel, fingerprint
from fuzz.engine.model import full_logits
from fuzz.engine.zoo import REAL_MODEL, cached_gguf_tokenizer
from fuzz.precision import get_policy
from fuzz.session import Session
from fuzz.verdict import Bounds, PromptSpec, json_safe

pytest.importorskip("transformers", reason="the conversion is transformers' (test extra)")
pytestmark = pytest.mark.real_weights

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / REAL_MODEL
# " ORDERBYIMIT " without BOS: float16 overflows at step 0, layer 10, residual_mlp.
KNOWN_FINDING = CORPUS / "46415d8995f6ea6b.json"


@pytest.fixture(scope="session")
def real_hf(tmp_path_factory, real_gguf) -> Iterator[LoadedModel]:
    directory = tmp_path_factory.mktemp("hf") / "gemma-3-270m-hf"
    convert_real_gguf(real_gguf.path, directory)
    assert not (directory / "tokenizer.model").exists()  # the tokenizer.json route is tested
    yield load_hf_model(directory)
    shutil.rmtree(directory)  # 1.7 GB: pytest keeps the last three temp roots


@pytest.fixture(scope="session")
def gguf_model(real_gguf) -> LoadedModel:
    tok = cached_gguf_tokenizer(real_gguf.path, real_gguf.sha256)
    return LoadedModel(REAL_MODEL, real_gguf.config, real_gguf.state, tok,
                       fingerprint(real_gguf.config, real_gguf.sha256, tok), str(real_gguf.path))


def _sample_texts(vocabulary: list[str], n: int = 600) -> list[str]:
    """Corpus prompts, hand-picked edge cases, and runs of random vocabulary pieces."""
    texts = [json.loads(p.read_text())["prompt"] for p in sorted(CORPUS.glob("*.json"))]
    texts += ["", "The capital of France is", "  two  spaces   three\n\n\nnl\t\ttabs",
              "<start_of_turn>user\nhi<end_of_turn>\n", "<table><tr><td>x</td></tr></table>",
              "日本語のテキスト 😀", "\u2581literal", "a" * 60, "<unused5> <bos> <mask>"]
    rng = random.Random(0)
    for _ in range(n):
        pieces = rng.choices(vocabulary, k=rng.randint(1, 8))
        texts.append("".join(pieces).replace("\u2581", " "))
    return texts


def test_hf_directory_is_the_gguf_model(real_hf, gguf_model):
    # The config: the same, except rms_norm_eps, which transformers wrote as the float32 of
    # 1e-6 (9.99999997e-07); the model adds it to a float32 tensor, where both are one value.
    assert torch.tensor(real_hf.config.rms_norm_eps) == torch.tensor(1e-6)
    assert dataclasses.replace(real_hf.config, rms_norm_eps=1e-6) == gguf_model.config
    assert real_hf.state.keys() == gguf_model.state.keys()
    different = [k for k in gguf_model.state if not torch.equal(real_hf.state[k],
                                                                gguf_model.state[k])]
    assert different == []

    texts = _sample_texts(gguf_model.tokenizer.vocabulary())
    mismatched = [t for t in texts if real_hf.tokenizer.encode(t) != gguf_model.tokenizer.encode(t)]
    assert mismatched == []
    assert real_hf.tokenizer.decode(real_hf.tokenizer.encode(texts[-1])) == \
        gguf_model.tokenizer.decode(gguf_model.tokenizer.encode(texts[-1]))

    ids = torch.tensor([gguf_model.tokenizer.encode("The capital of France is Paris. The "
                                                    "capital of Germany is")])
    f32 = get_policy("float32")
    ours = full_logits(real_hf.engine(f32), ids)
    assert torch.equal(ours, full_logits(gguf_model.engine(f32), ids))
    berlin = gguf_model.tokenizer.encode(" Berlin", bos=False)[0]
    assert ours[0, -1].argmax().item() == berlin  # the weights make sense


def test_float16_verdicts_match_the_gguf_load(real_hf, gguf_model):
    known = load_case(KNOWN_FINDING)
    specs = [PromptSpec(known.prompt, add_bos=known.add_bos), PromptSpec("", add_bos=True),
             PromptSpec("The capital of France is", add_bos=True)]
    bounds = Bounds(max_new_tokens=2)
    got = Session(real_hf, device="cpu").run(specs, "float16", bounds)
    want = Session(gguf_model, device="cpu").run(specs, "float16", bounds)
    for mine, theirs in zip(got, want, strict=True):
        assert (mine.status, mine.prompt_ids, mine.tokens) == (
            theirs.status, theirs.prompt_ids, theirs.tokens)
        assert mine.first_nonfinite == theirs.first_nonfinite
        assert json_safe(mine.max_abs) == json_safe(theirs.max_abs)  # nan == nan as text
    first = got[0].first_nonfinite
    assert (first.layer, first.site) == (known.first_nonfinite.layer, known.first_nonfinite.site)
    assert got[1].first_nonfinite.layer == 7  # BOS alone: the attention sink overflows
