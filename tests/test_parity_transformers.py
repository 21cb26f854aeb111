"""Parity of fuzz.engine.model with an independent implementation: transformers' Gemma models.

Same weights on both sides, float32, eager attention; logits over every position of one sequence
are compared with `full_logits`. Synthetic weights cover Gemma 1, 2 (attention and final
soft-capping, query_pre_attn_scalar != head_dim) and 3 (q/k norms, two RoPE bases), each with a
sliding window shorter than the sequence so the local mask matters. The real Gemma 3 270M GGUF
(marker real_weights) is compared the same way. Nothing is downloaded: HF_HUB_OFFLINE is set.
"""
from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from fuzz.engine.config import Architecture, AttentionType, GemmaConfig  # noqa: E402
from fuzz.engine.model import full_logits, materialize  # noqa: E402
from fuzz.engine.synthetic import tiny as synthetic  # noqa: E402

transformers = pytest.importorskip("transformers", reason="parity needs transformers (test extra)")

from fuzz.engine.transformers.build import HF_CLASSES, from_state, hf_config, hf_state  # noqa: E402

SEQ_LEN = 20
# max |ours - theirs| / max |theirs| over all logits. Both sides run the same float32 math in a
# different op order (e.g. transformers scales q @ k^T after the product, upstream scales q).
REL_TOL = 1e-4


def tiny_config(arch: Architecture) -> GemmaConfig:
    """The shared tiny configs, 4 layers, a window of 6 (shorter than SEQ_LEN)."""
    common = dict(max_position_embeddings=128)
    if arch == Architecture.GEMMA_1:
        return synthetic.tiny_config(arch, 300, num_key_value_heads=1, **common)
    if arch == Architecture.GEMMA_2:
        return synthetic.tiny_config(arch, 300, sliding_window_size=6, query_pre_attn_scalar=24,
                                     **common)
    return synthetic.tiny_config(arch, 300, num_key_value_heads=2, query_pre_attn_scalar=16,
                                 attn_types=(AttentionType.LOCAL_SLIDING,) * 2
                                 + (AttentionType.GLOBAL,), sliding_window_size=6, **common)


def random_state(config: GemmaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights large enough that the soft-caps and the norms' (1 + w) visibly act."""
    return synthetic.random_state(config, seed, norm_scale=0.5, matrix_gain=2.0)


def hf_model(config: GemmaConfig, state: dict[str, torch.Tensor]):
    """transformers' class for the config with the same weights (fuzz.engine.transformers.build:
    the mapping the transformers engine runs), float32, eager attention."""
    return from_state(hf_config(config, "eager"), hf_state(state, config), torch.float32, "cpu",
                      "eager")


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def compare(config: GemmaConfig, state: dict[str, torch.Tensor],
            token_ids: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    ours = full_logits(materialize(config, state, torch.float32), token_ids)
    with torch.no_grad():
        theirs = hf_model(config, state)(input_ids=token_ids, use_cache=False).logits
    assert ours.shape == theirs.shape == (*token_ids.shape, config.vocab_size)
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all()
    return relative_error(ours, theirs), ours, theirs


@pytest.mark.parametrize("arch", list(HF_CLASSES), ids=lambda a: a.name)
def test_synthetic_parity(arch):
    config = tiny_config(arch)
    assert config.sliding_window_size is None or config.sliding_window_size < SEQ_LEN
    state = random_state(config)
    token_ids = torch.randint(0, config.vocab_size, (2, SEQ_LEN),
                              generator=torch.Generator().manual_seed(1))
    error, ours, theirs = compare(config, state, token_ids)
    assert error < REL_TOL, f"{arch.name}: relative logit error {error:.2e}"
    assert ours.std() > 0.1  # the logits carry signal, so the comparison means something


def test_synthetic_parity_detects_a_wrong_window():
    """The comparison is sharp enough to see the local mask: shrinking our window breaks it."""
    config = tiny_config(Architecture.GEMMA_3)
    state = random_state(config)
    token_ids = torch.randint(0, config.vocab_size, (1, SEQ_LEN),
                              generator=torch.Generator().manual_seed(1))
    theirs = hf_model(config, state)(input_ids=token_ids, use_cache=False).logits.detach()
    narrower = dataclasses.replace(config, sliding_window_size=3)
    ours = full_logits(materialize(narrower, state, torch.float32), token_ids)
    assert relative_error(ours, theirs) > 100 * REL_TOL


# "<bos>The capital of France is Paris. The capital of Germany is Berlin, and the": pieces looked
# up in the GGUF token list, so no tokenizer is needed.
PROMPT_PIECES = ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", ".", "▁The",
                 "▁capital", "▁of", "▁Germany", "▁is", "▁Berlin", ",", "▁and"]


@pytest.mark.real_weights
def test_real_270m_parity(real_gguf):
    index = {piece: i for i, piece in enumerate(real_gguf.metadata["tokenizer.ggml.tokens"])}
    token_ids = torch.tensor([[index[piece] for piece in PROMPT_PIECES]])
    error, ours, _ = compare(real_gguf.config, real_gguf.state, token_ids)
    assert error < REL_TOL, f"relative logit error {error:.2e}"
    # After "...Germany is" the model should say Berlin: the loaded weights make sense.
    assert ours[0, PROMPT_PIECES.index("▁Germany") + 1].argmax().item() == index["▁Berlin"]
