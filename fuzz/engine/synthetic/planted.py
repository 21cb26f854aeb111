"""Synthetic Gemma 3 models with planted float16 overflows that are hard to find by chance.

`tiny-planted` (fuzz.engine.synthetic.tiny) overflows on one token ("7"): any search finds it at
once.
The family here overflows on a *run of at least `run` consecutive digit tokens* (with BOS on), so
that random prompts rarely trigger it while the distance to the trigger is visible: max |x|
grows smoothly with the number of digits in the window, so headroom can guide a search.

How it is planted (on the tiny Gemma 3 of fuzz.engine.synthetic.tiny: hidden 64, 4 layers, layer 0
local with a sliding window of exactly `run` tokens; four dedicated residual channels):

- Embeddings. Every non-digit row has RMS exactly 1 and holds 1 in BIAS_CHANNEL; every digit
  row holds D in COUNT_CHANNEL and rho in DIGIT_CHANNEL and BIAS_CHANNEL, rho = D / sqrt(62),
  nothing else, so its RMS is rho too. Layer 0's input RMSNorm therefore outputs exactly 1 in
  DIGIT_CHANNEL at digits (0 elsewhere) and exactly 1 in BIAS_CHANNEL everywhere.
- Layer 0's attention counts: q = k = 0, so the (local) attention is uniform over the last
  `run` tokens; its value reads DIGIT_CHANNEL and BIAS_CHANNEL, so the output holds
  f = (#digits in window) / (#tokens in window) and a constant 1. o_proj writes t * f into
  COUNT_CHANNEL and 1 into REF_CHANNEL.
- The post-attention RMSNorm turns that pair into 8 * t f / sqrt(1 + (t f)^2) in COUNT_CHANNEL
  (REF_CHANNEL's weight is -1, so it adds nothing) and scales it by POST_NORM_GAIN: the branch
  B(f) is smooth and increasing in f, at most BRANCH_TOP (< 65504: the branch itself is finite
  in float16). The residual add at a digit adds B(f) to the digit's own 8 D.
- 8 D + B(f) crosses float16's limit between f = (run-1)/run and f = 1: the near miss sums to
  65440 (two float16 ulps under the limit) and a full run to at least 2% past it, the margin a
  regression case needs (fuzz.shrink.robustness.MIN_MARGIN), so a planted finding is saved like any
  other; that caps the run at 41 digits. f = 1 needs
  `run` digits in a full window, i.e. a run of `run` consecutive digits; with BOS, a shorter
  prompt's window holds BOS, which is not a digit, so f < 1 there too.
- No other layer reads or writes the four channels, and the final norm zeroes them, so every
  digit's logit is exactly 0 while the other tokens' logits are random: greedy decoding never
  emits a digit and cannot lengthen a run. bfloat16 and float32 hold the sum (< 70000) easily;
  float16-clamp clamps it and float16-fp32-residual keeps it in float32.

Without BOS the family is easy: a prompt of fewer than `run` tokens that are all digits fills
its whole (short) window with digits, so "0" alone overflows. Benchmarks and tests use BOS on.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fuzz.engine.config import Architecture, AttentionType, GemmaConfig
from fuzz.engine.loaded import LoadedModel
from fuzz.engine.synthetic.tiny import random_state, synthetic_model, tiny_config

COUNT_CHANNEL = 0  # where the overflow happens: the digit's base plus the counting branch
DIGIT_CHANNEL = 1  # 1 at digits (after layer 0's input norm), 0 elsewhere
BIAS_CHANNEL = 2  # 1 at every token (after layer 0's input norm): the attention's reference
REF_CHANNEL = 3  # the reference's slot in the attention output
PLANTED_CHANNELS = (COUNT_CHANNEL, DIGIT_CHANNEL, BIAS_CHANNEL, REF_CHANNEL)
DIGIT_RUN_LAYER = 0
PLANTED_SITE = "residual_attn"

POST_NORM_GAIN = 32769.0  # (1 + w) with w = 2**15, exact in float16 and bfloat16
BRANCH_TOP = 64000.0  # B(1): the counting branch at a full window of digits (< 65504)
FLOAT16_MAX = 65504.0
NEAR_MISS_SUM = 65440.0  # the near miss (run - 1 digits): two float16 ulps under the limit
# The trigger passes the limit by at least fuzz.shrink.robustness.MIN_MARGIN (2%), plus two ulps
# for the rounding of its two terms: a planted finding is a regression case like any other.
TRIGGER_RATIO = 1.02
TERM_ROUNDING = 64.0
DEFAULT_SEED = 1234
DIGITS = "0123456789"


@dataclass(frozen=True)
class DigitRunPlan:
    """The numbers behind a planted digit-run overflow (see the module docstring)."""

    run: int  # minimal run of consecutive digits that overflows
    slope: float  # t: the attention output's COUNT_CHANNEL value at f = 1
    digit_base: float  # D: the digit embedding's COUNT_CHANNEL value (the residual holds 8 D)

    @property
    def residual_base(self) -> float:
        return 8.0 * self.digit_base

    def branch(self, fraction: float) -> float:
        """B(f): the post-attention-norm branch in COUNT_CHANNEL, f = digits / window tokens."""
        x = self.slope * fraction
        return POST_NORM_GAIN * 8.0 * x / math.sqrt(1.0 + x * x)

    def peak(self, digits_in_window: int, window_tokens: int) -> float:
        """The residual after layer 0's attention add at a digit (float64, no rounding)."""
        return self.residual_base + self.branch(digits_in_window / window_tokens)

    @property
    def margin(self) -> float:
        """The trigger's unrounded sum over the float16 limit (1.037 for a run of 24)."""
        return self.peak(self.run, self.run) / FLOAT16_MAX


def plan_digit_run(run: int) -> DigitRunPlan:
    """Solves for the slope and base that put the float16 limit between run - 1 and run digits:
    the near miss sums to NEAR_MISS_SUM, the trigger to at least TRIGGER_RATIO x the limit.

    Raises ValueError when `run` is outside 2..95 or too long for that margin (above 41: the
    branch grows by less than 2% of the limit between run - 1 and run digits)."""
    if not 2 <= run <= 95:
        raise ValueError(f"run must be between 2 and 95 digit tokens (the trigger plus BOS must "
                         f"fit the default 96-token prompt bound), got {run}")
    top = BRANCH_TOP / (8.0 * POST_NORM_GAIN)  # s(1) = t / sqrt(1 + t^2)
    slope = top / math.sqrt(1.0 - top * top)
    near = DigitRunPlan(run, slope, 0.0).branch((run - 1) / run)
    plan = DigitRunPlan(run, slope, (NEAR_MISS_SUM - near) / 8.0)
    needed = FLOAT16_MAX * TRIGGER_RATIO + TERM_ROUNDING
    if plan.peak(run, run) < needed:
        raise ValueError(f"run {run} is too long: its trigger would reach only {plan.margin:.4f}"
                         f" x the float16 limit (a regression case needs {TRIGGER_RATIO}); use a "
                         "run of at most 41")
    return plan


def digit_token_ids(tokenizer: Any) -> list[int]:
    """The ids of "0".."9", each of which must be a single token."""
    ids = []
    for d in DIGITS:
        encoded = tokenizer.encode(d, bos=False)
        if len(encoded) != 1:
            raise ValueError(f"the tokenizer encodes digit {d!r} as {encoded}: the digit-run "
                             "plant needs every digit to be one token")
        ids.append(encoded[0])
    return ids


def plant_digit_run(state: dict[str, torch.Tensor], config: GemmaConfig, digit_ids: list[int],
                    plan: DigitRunPlan) -> None:
    """Plants the digit-run overflow into a Gemma 3 state (in place). Layer 0 must be a local
    layer whose window is exactly `plan.run` tokens (that is what makes f = 1 mean a run)."""
    if config.attn_type(DIGIT_RUN_LAYER) != AttentionType.LOCAL_SLIDING or \
            config.sliding_window_size != plan.run:
        raise ValueError(f"plant_digit_run needs layer {DIGIT_RUN_LAYER} to be local with "
                         f"sliding_window_size == run ({plan.run}); got "
                         f"{config.attn_type(DIGIT_RUN_LAYER).name} with window "
                         f"{config.sliding_window_size}")
    if config.head_dim < 2 or len(PLANTED_CHANNELS) + 1 > config.hidden_size:
        raise ValueError("plant_digit_run needs head_dim >= 2 and hidden_size > 4")
    isolate_channels(state, config.num_hidden_layers, PLANTED_CHANNELS)
    _set_embeddings(state["embedder.weight"], digit_ids, plan)
    _counting_attention(state, config, plan)
    state["model.norm.weight"][list(PLANTED_CHANNELS)] = -1.0  # (1 + w) = 0: digits' logits 0


def isolate_channels(state: dict[str, torch.Tensor], num_layers: int,
                     channels: tuple[int, ...]) -> None:
    """No layer reads or writes the planted channels (layer 0's attention is set afterwards)."""
    ch = list(channels)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.qkv_proj.weight"][:, ch] = 0.0
        state[p + "self_attn.o_proj.weight"][ch, :] = 0.0
        state[p + "mlp.gate_proj.weight"][:, ch] = 0.0
        state[p + "mlp.up_proj.weight"][:, ch] = 0.0
        state[p + "mlp.down_proj.weight"][ch, :] = 0.0


def _set_embeddings(embedding: torch.Tensor, digit_ids: list[int], plan: DigitRunPlan) -> None:
    hidden = embedding.shape[1]
    free = [c for c in range(hidden) if c not in PLANTED_CHANNELS]
    embedding[:, list(PLANTED_CHANNELS)] = 0.0
    embedding[:, BIAS_CHANNEL] = 1.0
    # Non-digit rows: RMS exactly 1, so layer 0's input norm returns them unchanged.
    rest = embedding[:, free]
    rest *= torch.sqrt((hidden - 1.0) / rest.pow(2).sum(dim=1, keepdim=True))
    embedding[:, free] = rest
    rho = plan.digit_base / math.sqrt(hidden - 2)
    for d in digit_ids:
        embedding[d] = 0.0
        embedding[d, COUNT_CHANNEL] = plan.digit_base
        embedding[d, DIGIT_CHANNEL] = rho
        embedding[d, BIAS_CHANNEL] = rho


def _counting_attention(state: dict[str, torch.Tensor], config: GemmaConfig,
                        plan: DigitRunPlan) -> None:
    p = f"model.layers.{DIGIT_RUN_LAYER}."
    norm = state[p + "input_layernorm.weight"]
    norm[DIGIT_CHANNEL] = norm[BIAS_CHANNEL] = 0.0  # (1 + w) = 1: the values stay exactly 1
    qkv = state[p + "self_attn.qkv_proj.weight"]
    o_proj = state[p + "self_attn.o_proj.weight"]
    # qkv rows: q (heads * head_dim), then k, then v (kv_heads * head_dim each).
    value_row = (config.num_attention_heads + config.num_key_value_heads) * config.head_dim
    qkv.zero_()  # q = k = 0: uniform attention over the window
    qkv[value_row, DIGIT_CHANNEL] = 1.0
    qkv[value_row + 1, BIAS_CHANNEL] = 1.0
    o_proj.zero_()
    o_proj[COUNT_CHANNEL, 0] = plan.slope  # head 0, value dim 0: f
    o_proj[REF_CHANNEL, 1] = 1.0  # head 0, value dim 1: the constant 1
    post = state[p + "post_attention_layernorm.weight"]
    post[COUNT_CHANNEL] = POST_NORM_GAIN - 1.0
    post[REF_CHANNEL] = -1.0


def digit_run_model(run: int, seed: int = DEFAULT_SEED) -> LoadedModel:
    """A tiny Gemma 3 whose float16 run overflows exactly on a run of >= `run` digits (BOS on)."""
    from fuzz.engine.tokenizer.build import tiny_tokenizer

    plan = plan_digit_run(run)
    tok = tiny_tokenizer()
    config = dataclasses.replace(tiny_config(Architecture.GEMMA_3, vocab_size=tok.n_words),
                                 sliding_window_size=run)
    state = random_state(config, seed=seed)
    plant_digit_run(state, config, digit_token_ids(tok), plan)
    return synthetic_model(digit_run_name(run, seed), config, state, tok)


def digit_run_name(run: int, seed: int = DEFAULT_SEED) -> str:
    return f"tiny-digit-run-{run}" + ("" if seed == DEFAULT_SEED else f"-seed{seed}")


DIGIT_RUN_NAME = re.compile(r"tiny-digit-run-(\d+)(?:-seed(\d+))?")


def digit_run_model_named(name: str) -> LoadedModel | None:
    """The model a `tiny-digit-run-N[-seedS]` name describes (None for other names); a run
    outside the plant's range is a ValueError naming the range."""
    match = DIGIT_RUN_NAME.fullmatch(name)
    if match is None:
        return None
    seed = DEFAULT_SEED if match.group(2) is None else int(match.group(2))
    return digit_run_model(int(match.group(1)), seed)


def minimal_trigger(run: int) -> str:
    """The canonical minimal trigger: the shortlex-smallest prompt that overflows."""
    return "0" * run


def is_minimal_trigger(text: str, run: int) -> bool:
    """True for exactly `run` digits and nothing else (every such prompt is a minimal trigger:
    all digits are the same token to the plant, and deleting any character ends the overflow)."""
    return re.fullmatch(f"[0-9]{{{run}}}", text) is not None


def longest_digit_run(text: str) -> int:
    """The longest run of consecutive ASCII digits (each is one token in the tiny vocabulary)."""
    return max((len(m) for m in re.findall(r"[0-9]+", text)), default=0)


# The runs the benchmarks and docs name; any `tiny-digit-run-N` (2 <= N <= 95) loads from the zoo.
PLANTED_MODELS: dict[str, Callable[[], LoadedModel]] = {
    digit_run_name(run): (lambda run=run: digit_run_model(run)) for run in (8, 24, 32, 40)
}
