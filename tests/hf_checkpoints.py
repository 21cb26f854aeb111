"""Hugging Face checkpoints built with transformers itself, for the HF loader's tests.

Tiny, seeded random models of every supported model_type, saved with `save_pretrained` (one
safetensors file, or shards with a small `max_shard_size`) next to the tiny SentencePiece
tokenizer; and the real Gemma 3 270M GGUF converted to an HF directory by transformers. Nothing
is downloaded: HF_HUB_OFFLINE is set before transformers is imported.
"""
from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fuzz.engine.tokenizer.build import TINY_VOCAB_SIZE, tiny_tokenizer  # noqa: E402

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
SEQ_LEN_HINT = 6  # the sliding window: shorter than the test prompts, so the local mask acts
_COMMON = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               max_position_embeddings=128)
_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
# Gemma 3's global layers with linear RoPE scaling (as the 4b/12b/27b have), a local base of 10k.
_G3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}}


def _text_config(transformers: Any, model_type: str) -> Any:
    if model_type == "gemma":
        return transformers.GemmaConfig(**_COMMON)
    sandwich = dict(sliding_window=SEQ_LEN_HINT, query_pre_attn_scalar=12,
                    layer_types=list(_LAYER_TYPES), **_COMMON)
    if model_type == "gemma2":
        return transformers.Gemma2Config(**sandwich)  # soft-caps: the defaults 30 and 50
    return transformers.Gemma3TextConfig(rope_parameters=json.loads(json.dumps(_G3_ROPE)),
                                         **sandwich)


def tiny_hf_model(model_type: str, seed: int = 0) -> Any:
    """A transformers model with random weights large enough that the norms' (1 + w) and the
    soft-caps visibly act (transformers' own init leaves the norms at 0 and the logits tiny)."""
    import transformers

    text = _text_config(transformers, model_type)
    if model_type == "gemma3":
        vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 image_size=28, patch_size=14)
        config = transformers.Gemma3Config(text_config=text.to_dict(),
                                           vision_config=vision.to_dict(), mm_tokens_per_image=4)
        cls = transformers.Gemma3ForConditionalGeneration
    else:
        config = text
        cls = getattr(transformers, {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                                     "gemma3_text": "Gemma3ForCausalLM"}[model_type])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config)
    _randomize(model, seed)
    return model.eval()


def _randomize(model: Any, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(noise * 0.5)
            elif "embed_tokens" in name:
                param.copy_(noise)
            elif param.dim() == 2:
                param.copy_(noise * 2.0 / param.shape[1] ** 0.5)


def save_tiny_hf(model_type: str, directory: Path, *, sharded: bool = False,
                 tokenizer: str = "model", seed: int = 0) -> tuple[Any, Path]:
    """(the transformers model, its directory): weights, config.json and the tiny tokenizer,
    as `tokenizer.model` or (tokenizer="json") as transformers' own `tokenizer.json`."""
    model = tiny_hf_model(model_type, seed)
    model.save_pretrained(directory, max_shard_size="20KB" if sharded else "5GB")
    if tokenizer == "model":
        (directory / "tokenizer.model").write_bytes(tiny_tokenizer().serialized_model_proto())
    elif tokenizer == "json":
        write_tokenizer_json(directory)
    return model, directory


def write_tokenizer_json(directory: Path) -> None:
    """transformers converts the tiny SentencePiece model to its `tokenizer.json` (GemmaConverter)
    and saves only that: a directory without `tokenizer.model`."""
    import transformers

    source = directory / "_spm"
    source.mkdir()
    (source / "tokenizer.model").write_bytes(tiny_tokenizer().serialized_model_proto())
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    for path in source.iterdir():
        path.unlink()
    source.rmdir()
    assert not (directory / "tokenizer.model").exists()


def hf_logits(model: Any, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_ids, use_cache=False).logits


def convert_real_gguf(gguf_path: Path, directory: Path) -> Path:
    """The real Gemma 3 270M as an HF directory, made by transformers: it loads the GGUF
    (gguf_file=, dequantizing it), but refuses to save a GGUF-loaded model, so a fresh model of
    the same class gets its state dict and is saved; the tokenizer is transformers' conversion of
    the GGUF's (tokenizer.json only). ~80 s and 1.7 GB (the head is saved untied) on 2 cores."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The config keeps quantization_config {quant_method: gguf}: how transformers loaded the
    # file; the weights it saves are the dequantized float32 ones (the loader accepts that).
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    fresh.save_pretrained(directory)
    del model, fresh
    gc.collect()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent,
                                                           gguf_file=gguf_path.name)
    tokenizer.save_pretrained(directory)
    return directory
