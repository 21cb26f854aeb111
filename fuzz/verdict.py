"""What one bounded generation of one prompt under one precision policy is, and what it found.

These plain records travel everywhere: a PromptSpec and its Bounds go in, the probe fills a
Verdict, its Signature buckets a failure; `fuzz check --json` prints them, the corpus stores them,
the report draws them. They hold only JSON-friendly values and need no torch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Optional

StopReason = Literal["eos", "nonfinite", "max_new_tokens", "timeout"]
FLOAT16_MAX = 65504.0

DEFAULT_MAX_NEW_TOKENS = 16  # gemma_pytorch#10 went NaN after ~13 decode steps
DEFAULT_MAX_PROMPT_TOKENS = 96  # covers llama.cpp's 64-token kernel switch with room to spare
# Per generate() call: ~35x the slowest default batch measured (8 prompts, 16 new tokens, float16
# on a 2-core CPU without avx512_fp16: 3.4 s at 2.33 prompts/s, benchmarks/README.md). A run it
# stops is inconclusive, never finite, so it only has to catch a hung or pathological call.
DEFAULT_TIME_LIMIT_S = 120.0


@dataclass(frozen=True)
class Bounds:
    """What keeps every example bounded."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    time_limit_s: float = DEFAULT_TIME_LIMIT_S  # per generate() call

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")

    def to_dict(self) -> dict[str, int]:
        return {"max_new_tokens": self.max_new_tokens, "max_prompt_tokens": self.max_prompt_tokens}


@dataclass(frozen=True)
class PromptSpec:
    """A prompt as the user wrote it and how to feed it."""

    text: str
    add_bos: bool = True
    chat: bool = False  # wrap in Gemma's chat template


class Signature(NamedTuple):
    """A failure's crash bucket: what makes two findings "the same bug". The model's fingerprint
    (weights + config + tokenizer), not its name, so that two different model.gguf files never
    share a bucket. A tuple: it is hashed into case ids (fuzz.corpus.case) and written to JSON
    as a list."""

    fingerprint: str
    policy: str
    add_bos: bool
    layer: int  # the first non-finite value's layer (-1 embedding, L the head)
    site: str
    where: Literal["bos", "content"]  # at the BOS position, or at prompt content

    @property
    def at_bos(self) -> bool:
        return self.where == "bos"

    @classmethod
    def of(cls, fingerprint: str, policy: str, add_bos: bool, first: NonFinite) -> Signature:
        # Position 0 with BOS is the attention sink every prompt shares, so a failure there is
        # one bucket whatever the prompt; anywhere else the failing token is prompt content.
        where = "bos" if failed_at_bos(first, add_bos) else "content"
        return cls(fingerprint, policy, bool(add_bos), int(first.layer), str(first.site), where)

    @classmethod
    def from_list(cls, values: Any) -> Signature:
        """From its JSON form (a list of six values)."""
        if len(values) != len(cls._fields):
            raise ValueError(f"a signature has {len(cls._fields)} parts "
                             f"({', '.join(cls._fields)}), got {list(values)!r}")
        fingerprint, policy, add_bos, layer, site, where = values
        return cls(str(fingerprint), str(policy), bool(add_bos), int(layer), str(site), where)


def failed_at_bos(first: NonFinite, add_bos: bool) -> bool:
    """Whether a failure is at the BOS position (the sink every prompt shares)."""
    return bool(add_bos) and first.position == 0


def plural(n: int, word: str) -> str:
    """'1 case', '2 cases': here, at the bottom, so that every layer words its counts alike."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def layer_label(layer: int, num_layers: int) -> str:
    """Layers are counted from 0; the embedding is 'embedding' and the head is 'head'."""
    if layer < 0:
        return "embedding"
    if layer >= num_layers:
        return "head"
    return str(layer)


@dataclass(frozen=True)
class NonFinite:
    """The first non-finite value of a run, in execution order.

    step: 0 is the prefill, k >= 1 the k-th decode step. layer: 0-based (-1 embedding, L the
    final norm / logits). position: index in the full token sequence (0 is BOS when present).
    token_id: the input token at that position. kind: 'nan' or 'inf' (nan wins when both).
    """

    step: int
    layer: int
    site: str
    position: int
    token_id: int
    kind: Literal["nan", "inf"]
    # Optional explanation of a residual-stream overflow: the channel and the two terms whose sum
    # passed the dtype's limit (filled by fuzz.generate.explain for residual sites).
    channel: Optional[int] = None
    terms: Optional[tuple[float, float]] = None
    # At a residual add: max |residual + branch| over the channels at this position, computed in
    # float32 by the probe: the value without the dtype's limit. None at other sites.
    unrounded: Optional[float] = None

    @property
    def where(self) -> str:
        """'step S layer L site': where it happened, in one short phrase."""
        return f"step {self.step} layer {self.layer} {self.site}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["terms"] is not None:
            d["terms"] = list(d["terms"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NonFinite:
        d = dict(d)
        if d.get("terms") is not None:
            d["terms"] = tuple(d["terms"])
        return cls(**d)


Status = Literal["finite", "nonfinite", "inconclusive"]


@dataclass
class Verdict:
    """One prompt, one policy, one bounded greedy generation.

    `finite` is True only for a run that ended (EOS or the step bound) with every value finite: a
    run stopped by the time limit before either is *inconclusive*, never finite."""

    prompt: str
    prompt_ids: list[int]  # as fed to the model, BOS included when add_bos
    add_bos: bool
    policy: str
    finite: bool
    first_nonfinite: Optional[NonFinite]
    # max |x| over every step and every real position: {layer_label: {site: value}};
    # non-finite values are stored as float('inf') / float('nan').
    max_abs: dict[str, dict[str, float]]
    # the same, excluding position 0 when it is BOS (the attention sink every prompt shares)
    content_max_abs: dict[str, dict[str, float]]
    # the largest finite value each site's dtype can hold: {site_key: limit} where site_key is
    # "layer_label/site"; headroom = limit / max_abs
    limits: dict[str, float] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)  # generated ids
    text: str = ""
    steps: int = 0  # forward passes run
    stopped: StopReason = "max_new_tokens"

    @property
    def nonfinite(self) -> bool:
        return self.first_nonfinite is not None

    @property
    def inconclusive(self) -> bool:
        return self.first_nonfinite is None and not self.finite

    @property
    def status(self) -> Status:
        if self.first_nonfinite is not None:
            return "nonfinite"
        return "finite" if self.finite else "inconclusive"

    @property
    def num_layers(self) -> int:
        """Decoder layers, read off the table (labels '0'..'L-1'); 0 when it has none."""
        numeric = [int(k) for k in self.max_abs if k.isdigit()]
        return max(numeric) + 1 if numeric else 0

    def layer_label(self, layer: int) -> str:
        """A layer index as the tables label it: 'embedding', '0'..'L-1', 'head'."""
        return layer_label(layer, self.num_layers) if self.max_abs else \
            ("embedding" if layer < 0 else str(layer))

    @property
    def at_bos(self) -> bool:
        """The first non-finite value is at the BOS position (False when finite)."""
        first = self.first_nonfinite
        return first is not None and failed_at_bos(first, self.add_bos)

    @property
    def where(self) -> str:
        """'step S layer L site' of the first non-finite value; '' when there is none."""
        return "" if self.first_nonfinite is None else self.first_nonfinite.where

    def signature(self, fingerprint: str) -> Optional[Signature]:
        """The failure's crash bucket on the model with this fingerprint (None when finite)."""
        first = self.first_nonfinite
        return None if first is None else Signature.of(fingerprint, self.policy, self.add_bos,
                                                       first)

    @property
    def limit(self) -> Optional[float]:
        """The dtype limit of the first non-finite site (None when finite)."""
        first = self.first_nonfinite
        if first is None:
            return None
        return self.limits.get(f"{self.layer_label(first.layer)}/{first.site}")

    @property
    def margin(self) -> Optional[float]:
        """How far past its dtype's limit the first non-finite value went, as the ratio of the
        unrounded sum to the limit (1.044: 4.4% past). None when finite, or when the site is not
        a residual add (no unrounded value)."""
        first, limit = self.first_nonfinite, self.limit
        if first is None or first.unrounded is None or not limit:
            return None
        return first.unrounded / limit

    def headroom(self, content_only: bool = False,
                 against: Optional[float] = None) -> dict[str, dict[str, float]]:
        """{layer: {site: limit / max |x|}}, each site against its dtype's limit, or against
        `against` (FLOAT16_MAX: would this run survive in float16?)."""
        table = self.content_max_abs if content_only else self.max_abs
        out: dict[str, dict[str, float]] = {}
        for layer, sites in table.items():
            for site, value in sites.items():
                limit = against or self.limits.get(f"{layer}/{site}", float("inf"))
                out.setdefault(layer, {})[site] = _headroom(limit, value)
        return out

    @property
    def wider_than_float16(self) -> bool:
        """Every site's dtype holds far more than float16 (a float32 or bfloat16 run): its own
        headroom, ~1e33, says nothing; float16's does."""
        return bool(self.limits) and min(self.limits.values()) > FLOAT16_MAX

    def float16_headroom(self, content_only: bool = True) -> float:
        """65504 over the largest |x| anywhere: whether this run would survive in float16 (the
        figure that means something for a float32 or bfloat16 run, whose own limit is ~1e38)."""
        table = self.headroom(content_only, against=FLOAT16_MAX)
        return min((h for sites in table.values() for h in sites.values()), default=float("inf"))

    def min_headroom(self, content_only: bool = False) -> float:
        """The smallest headroom over every site (0 when something was non-finite)."""
        values = [v for sites in self.headroom(content_only).values() for v in sites.values()]
        return min(values, default=float("inf"))

    def min_headroom_site(self, content_only: bool = True) -> Optional[tuple[str, str]]:
        """(layer label, site) where the headroom is smallest; on a tie the earliest layer,
        whatever the table's key order (the report JSON sorts keys: "10" comes back before
        "4")."""
        best: Optional[tuple[float, float, str, str]] = None
        for layer, sites in self.headroom(content_only).items():
            for site, h in sites.items():
                candidate = (h, layer_order(layer), layer, site)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        return None if best is None else (best[2], best[3])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["first_nonfinite"] = self.first_nonfinite.to_dict() if self.first_nonfinite else None
        d["headroom"] = self.headroom()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        d = {k: v for k, v in d.items() if k != "headroom"}
        if d.get("first_nonfinite") is not None:
            d["first_nonfinite"] = NonFinite.from_dict(d["first_nonfinite"])
        return cls(**d)


def layer_order(layer: str) -> float:
    """A layer label's place in execution order: embedding, 0..L-1, head."""
    if layer == "embedding":
        return -1.0
    return float(layer) if layer.isdigit() else math.inf


def _headroom(limit: float, value: float) -> float:
    if value != value or value == float("inf"):  # nan or inf: no headroom left
        return 0.0
    if value == 0:
        return float("inf")
    return limit / value


def json_safe(value: Any) -> Any:
    """Strict JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def from_json_safe(value: Any) -> Any:
    """Inverse of json_safe for the numeric tables (max_abs, limits)."""
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: from_json_safe(v) for k, v in value.items()}
    return value
