"""A planted float16 overflow on a *count*: any `count` words of a small family, anywhere in the
prompt (BOS on), whatever stands between them.

The digit-run family (fuzz.engine.synthetic.planted) needs its trigger's tokens next to each
other; here filler may sit anywhere, so a prompt the search found can be long while its minimal
form is short: `count` family words and the spaces before them (" nan nan nan nan nan nan" for
6). It is what shows whether minimizing really removes every filler character (a 1-minimal case:
no single deletion keeps the failure).

How it is planted, on the tiny Gemma 3 (hidden 64, head_dim 16, QK norm), in layer 0, whose
window here covers every prompt (sliding_window_size = max_position_embeddings) and whose RoPE
base is 1e6 (the query and key pair turns by at most 6e-4 rad over a whole prompt):

- Embeddings, as in the digit-run plant: every non-family row has RMS exactly 1 and holds 1 in
  BIAS_CHANNEL (BOS also 1 in BOS_CHANNEL); a family row holds D in COUNT_CHANNEL and rho in
  FAMILY_CHANNEL and BIAS_CHANNEL, so layer 0's input norm gives 1 in FAMILY_CHANNEL at family
  words (0 elsewhere) and 1 in BIAS_CHANNEL everywhere.
- Head 0's query reads BIAS_CHANNEL into its dimension 7: after the QK norm every query is the
  same vector 4 G e_7. The key of BOS is 4 G e_7 (BOS_CHANNEL), the key of a family word is
  4 G (cos psi e_7 + sin psi e_6) (FAMILY_CHANNEL), every other key is 0 (the norm of 0 is 0).
  Scores: S for BOS, S cos psi for a family word, 0 for the rest, with S = 16 G^2 / 4 = 40: other
  tokens weigh e^-38 against a family word, nothing. Softmax then gives the family words the
  share r(n) = n / (c + n), c = e^(S (1 - cos psi)) = `count`: it depends on how many family
  words there are, not on where.
- The value reads FAMILY_CHANNEL and BIAS_CHANNEL; o_proj writes t r into COUNT_CHANNEL and the
  constant 1 into REF_CHANNEL; the post-attention norm turns the pair into
  POST_NORM_GAIN * 8 t r / sqrt(1 + (t r)^2) (planted.DigitRunPlan.branch, at fraction r).
- 8 D + B(r) crosses the limit between count - 1 and count words: the near miss sums to
  NEAR_MISS_SUM (two ulps under 65504), `count` words to at least 2% past it plus rounding.
- Every other layer and the final norm leave the five channels alone, as in the digit-run plant;
  a family row's logit is exactly 0, so greedy decoding does not add family words.

Without BOS there is no c: one family word overflows.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch

from fuzz.engine.config import Architecture, AttentionType, GemmaConfig
from fuzz.engine.loaded import LoadedModel
from fuzz.engine.synthetic.planted import (
    BIAS_CHANNEL,
    BRANCH_TOP,
    COUNT_CHANNEL,
    DEFAULT_SEED,
    FLOAT16_MAX,
    NEAR_MISS_SUM,
    POST_NORM_GAIN,
    REF_CHANNEL,
    TERM_ROUNDING,
    TRIGGER_RATIO,
    DigitRunPlan,
    isolate_channels,
)
from fuzz.engine.synthetic.tiny import random_state, synthetic_model, tiny_config

FAMILY_CHANNEL = 1  # 1 at family words (after layer 0's input norm), 0 elsewhere
BOS_CHANNEL = 4  # 1 at BOS only: its key
COUNT_CHANNELS = (COUNT_CHANNEL, FAMILY_CHANNEL, BIAS_CHANNEL, REF_CHANNEL, BOS_CHANNEL)
COUNT_LAYER = 0
COUNT_SITE = "residual_attn"
FAMILY = ("nan", "inf", "value")  # pieces "▁nan", "▁inf", "▁value" of the tiny vocabulary
DEFAULT_COUNT = 6
QUERY_DIM, SIDE_DIM = 7, 6  # head dimensions (RoPE pairs (7, 15) and (6, 14))
# After the QK norm (a vector of one or two non-zero dimensions has length 4 = sqrt(head_dim))
# the query is 4 QUERY_GAIN e_7, times head_dim^-0.5 = 4.0, and BOS's key 4 KEY_GAIN e_7 = 10.0:
# BOS scores exactly 40 (SCORE) in every dtype. A family key's e_7 component is rounded to a
# float16 number (`family_key`), so its score is exact too, and c follows from it.
QUERY_GAIN, KEY_GAIN = 4.0, 2.5
SCORE = 40.0
ROPE_BASE = 1_000_000


@dataclasses.dataclass(frozen=True)
class CountPlan:
    """The numbers behind a planted count overflow (see the module docstring)."""

    count: int  # the fewest family words that overflow
    branch_plan: DigitRunPlan  # slope t and base D, its branch B(r)

    @property
    def family_key(self) -> float:
        """A family key's e_7 component (of 10 = 4 KEY_GAIN): 10 cos psi with c near `count`,
        rounded to float16's grid (steps of 2^-7 between 8 and 16), so that the score is the
        same in float16 as in float32."""
        exact = 4 * KEY_GAIN * (1.0 - math.log(self.count) / SCORE)
        return round(exact * 128) / 128

    @property
    def c(self) -> float:
        """BOS's weight over one family word's: e^(S - S_family)."""
        return math.exp(SCORE - (SCORE / (4 * KEY_GAIN)) * self.family_key)

    def share(self, words: int) -> float:
        """r(n): the family words' share of the attention, BOS on."""
        return words / (self.c + words)

    def peak(self, words: int) -> float:
        """The residual after layer 0's attention add at the last of `words` family words."""
        return self.branch_plan.residual_base + self.branch_plan.branch(self.share(words))

    @property
    def margin(self) -> float:
        return self.peak(self.count) / FLOAT16_MAX


def plan_count(count: int) -> CountPlan:
    """The slope and base that put the float16 limit between count - 1 and count words.

    ValueError outside 2..40 (the trigger and BOS must fit the prompt bound, and each further
    word adds less to the branch) or when the trigger would fall short of the case margin."""
    if not 2 <= count <= 40:
        raise ValueError(f"count must be between 2 and 40 family words, got {count}")
    top = BRANCH_TOP / (8.0 * POST_NORM_GAIN)
    slope = top / math.sqrt(1.0 - top * top)
    probe = CountPlan(count, DigitRunPlan(count, slope, 0.0))
    base = (NEAR_MISS_SUM - probe.branch_plan.branch(probe.share(count - 1))) / 8.0
    plan = CountPlan(count, DigitRunPlan(count, slope, base))
    if plan.peak(count) < FLOAT16_MAX * TRIGGER_RATIO + TERM_ROUNDING:
        raise ValueError(f"count {count} is too large: its trigger would reach only "
                         f"{plan.margin:.4f} x the float16 limit (a case needs {TRIGGER_RATIO})")
    return plan


def family_token_ids(tokenizer: Any, words: tuple[str, ...] = FAMILY) -> list[int]:
    """The ids of "▁word" for each family word, each of which must be one token."""
    ids = []
    for word in words:
        encoded = tokenizer.encode(" " + word, bos=False)
        if len(encoded) != 1:
            raise ValueError(f"the tokenizer encodes {' ' + word!r} as {encoded}: the count "
                             "plant needs every family word, after a space, to be one token")
        ids.append(encoded[0])
    return ids


def plant_count(state: dict[str, torch.Tensor], config: GemmaConfig, family_ids: list[int],
                bos_id: int, plan: CountPlan) -> None:
    """Plants the count overflow into a Gemma 3 state (in place): layer 0 must see the whole
    prompt, with the QK norm on."""
    if config.attn_type(COUNT_LAYER) == AttentionType.LOCAL_SLIDING and \
            config.sliding_window_size < config.max_position_embeddings:
        raise ValueError("plant_count needs layer 0 to see every position (sliding_window_size "
                         f"{config.sliding_window_size} < {config.max_position_embeddings})")
    if not config.use_qk_norm or config.head_dim <= QUERY_DIM:
        raise ValueError("plant_count needs the QK norm and head_dim > 7 (a Gemma 3 config)")
    isolate_channels(state, config.num_hidden_layers, COUNT_CHANNELS)
    _set_embeddings(state["embedder.weight"], family_ids, bos_id, plan)
    _counting_attention(state, config, plan)
    state["model.norm.weight"][list(COUNT_CHANNELS)] = -1.0  # (1 + w) = 0: family logits 0


def _set_embeddings(embedding: torch.Tensor, family_ids: list[int], bos_id: int,
                    plan: CountPlan) -> None:
    hidden = embedding.shape[1]
    embedding[:, list(COUNT_CHANNELS)] = 0.0
    embedding[:, BIAS_CHANNEL] = 1.0
    embedding[bos_id, BOS_CHANNEL] = 1.0
    # Rows other than the family's: RMS exactly 1, so layer 0's input norm leaves them as they
    # are (BOS: its two ones and the free channels scaled to fill the rest).
    free = [c for c in range(hidden) if c not in COUNT_CHANNELS]
    fixed = embedding[:, [BIAS_CHANNEL, BOS_CHANNEL]].pow(2).sum(dim=1, keepdim=True)
    rest = embedding[:, free]
    rest *= torch.sqrt((hidden - fixed) / rest.pow(2).sum(dim=1, keepdim=True))
    embedding[:, free] = rest
    base = plan.branch_plan.digit_base
    rho = base / math.sqrt(hidden - 2)
    for token in family_ids:
        embedding[token] = 0.0
        embedding[token, COUNT_CHANNEL] = base
        embedding[token, FAMILY_CHANNEL] = rho
        embedding[token, BIAS_CHANNEL] = rho


def _counting_attention(state: dict[str, torch.Tensor], config: GemmaConfig,
                        plan: CountPlan) -> None:
    p = f"model.layers.{COUNT_LAYER}."
    norm = state[p + "input_layernorm.weight"]
    norm[[FAMILY_CHANNEL, BIAS_CHANNEL, BOS_CHANNEL]] = 0.0  # (1 + w) = 1: exact values
    heads, kv, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    qkv = state[p + "self_attn.qkv_proj.weight"]
    qkv.zero_()  # every other head and dimension: q = k = v = 0
    key_row, value_row = heads * dim, (heads + kv) * dim
    cos_psi = plan.family_key / (4 * KEY_GAIN)
    qkv[QUERY_DIM, BIAS_CHANNEL] = 1.0  # head 0's query
    qkv[key_row + QUERY_DIM, BOS_CHANNEL] = 1.0
    qkv[key_row + QUERY_DIM, FAMILY_CHANNEL] = cos_psi
    qkv[key_row + SIDE_DIM, FAMILY_CHANNEL] = math.sqrt(1.0 - cos_psi * cos_psi)
    qkv[value_row, FAMILY_CHANNEL] = 1.0
    qkv[value_row + 1, BIAS_CHANNEL] = 1.0
    state[p + "self_attn.query_norm.weight"][QUERY_DIM] = QUERY_GAIN - 1.0
    state[p + "self_attn.key_norm.weight"][[QUERY_DIM, SIDE_DIM]] = KEY_GAIN - 1.0
    o_proj = state[p + "self_attn.o_proj.weight"]
    o_proj.zero_()
    o_proj[COUNT_CHANNEL, 0] = plan.branch_plan.slope  # head 0, value dim 0: r
    o_proj[REF_CHANNEL, 1] = 1.0  # head 0, value dim 1: the constant 1
    post = state[p + "post_attention_layernorm.weight"]
    post[COUNT_CHANNEL] = POST_NORM_GAIN - 1.0
    post[REF_CHANNEL] = -1.0


def count_model(count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> LoadedModel:
    """A tiny Gemma 3 whose float16 run overflows on `count` family words anywhere (BOS on)."""
    from fuzz.engine.tokenizer.build import tiny_tokenizer

    plan = plan_count(count)
    tok = tiny_tokenizer()
    base = tiny_config(Architecture.GEMMA_3, vocab_size=tok.n_words)
    config = dataclasses.replace(
        base, sliding_window_size=base.max_position_embeddings,
        rope_wave_length={AttentionType.LOCAL_SLIDING: ROPE_BASE,
                          AttentionType.GLOBAL: ROPE_BASE})
    state = random_state(config, seed=seed)
    plant_count(state, config, family_token_ids(tok), tok.bos_id, plan)
    return synthetic_model(count_name(count, seed), config, state, tok)


def count_name(count: int, seed: int = DEFAULT_SEED) -> str:
    return f"tiny-count-{count}" + ("" if seed == DEFAULT_SEED else f"-seed{seed}")


COUNT_NAME = re.compile(r"tiny-count-(\d+)(?:-seed(\d+))?")


def count_model_named(name: str) -> LoadedModel | None:
    """The model a `tiny-count-N[-seedS]` name describes (None for other names)."""
    match = COUNT_NAME.fullmatch(name)
    if match is None:
        return None
    seed = DEFAULT_SEED if match.group(2) is None else int(match.group(2))
    return count_model(int(match.group(1)), seed)


def minimal_count_trigger(count: int = DEFAULT_COUNT) -> str:
    """A minimal trigger: `count` times the shortest family word, each after its space."""
    return (" " + min(FAMILY, key=len)) * count


def family_words(text: str) -> int:
    """How many family words the text holds as whole pieces (each after a space)."""
    return len(re.findall(r"(?<= )(?:" + "|".join(FAMILY) + r")(?![a-z])", text))
