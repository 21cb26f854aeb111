"""A finding's root cause: the mechanism a user fixes, coarser than its signature.

A Signature (fuzz.verdict) buckets a failure by its first non-finite *layer*. On real weights that
splits one mechanism into many buckets: every committed Gemma 3 270M float16 case overflows in
residual channel 163, the no-BOS ones at the prompt's last position somewhere between layers 9
and 14 (a secondary attention sink accumulating a massive activation). What names a mechanism is
the overflowing channel and the kind of position that carries it, so a root cause is keyed by
(model fingerprint, policy, channel, position kind) and never by the layer or the token: the
layer moves with the prompt, and the token piece is shown only as an example.

Plain records, no torch: the corpus, the report and replay all derive them.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional

from fuzz.verdict import NonFinite, Signature, Verdict, layer_label, plural

PositionKind = Literal["bos", "first token", "last prompt token", "decode step", "other"]
POSITION_KINDS: tuple[PositionKind, ...] = ("bos", "first token", "last prompt token",
                                            "decode step", "other")


def position_kind(first: NonFinite, prompt_length: int, add_bos: bool) -> PositionKind:
    """What kind of position the first non-finite value is at; `prompt_length` counts the ids
    fed to the model (BOS included when add_bos).

    Precedence, first match wins: a decode step (the position was generated), the BOS position,
    the first token (position 0 without BOS, 1 after it), the last prompt token, other. So a
    one-token prompt's only token is its "first token": the primary sink, whose mechanism a
    position-0 overflow shares whatever the prompt's length."""
    if first.step >= 1 or first.position >= prompt_length:
        return "decode step"
    if add_bos and first.position == 0:
        return "bos"
    if first.position == (1 if add_bos else 0):
        return "first token"
    if first.position == prompt_length - 1:
        return "last prompt token"
    return "other"


class RootCauseKey(NamedTuple):
    """What makes two findings one mechanism. `site` is "" when the channel is known (one
    channel overflows at residual_attn or residual_mlp alike, as the Gemma 3 cases do); without
    a channel (the overflow was not explained, or not at a residual add) the site is the only
    hint of the mechanism left, so it keys instead."""

    fingerprint: str
    policy: str
    channel: Optional[int]
    position_kind: PositionKind
    site: str


@dataclass(frozen=True)
class RootCause:
    """A failure's mechanism: the overflowing channel (None: not explained), the kind of
    position, the tokenizer's piece of the token there (None: no tokenizer at hand), and the
    site (used for grouping only when the channel is unknown)."""

    fingerprint: str
    policy: str
    channel: Optional[int]
    position_kind: PositionKind
    site: str
    piece: Optional[str] = None

    def __post_init__(self) -> None:
        if self.position_kind not in POSITION_KINDS:
            raise ValueError(f"root cause position kind {self.position_kind!r} is not one of "
                             f"{', '.join(map(repr, POSITION_KINDS))}")

    @property
    def key(self) -> RootCauseKey:
        return RootCauseKey(self.fingerprint, self.policy, self.channel, self.position_kind,
                            "" if self.channel is not None else self.site)

    @property
    def label(self) -> str:
        """'channel 163, last prompt token' (or 'attn_scores, channel unknown, bos')."""
        what = f"channel {self.channel}" if self.channel is not None else \
            f"{self.site}, channel unknown"
        return f"{what}, {self.position_kind}"

    @classmethod
    def of(cls, fingerprint: str, policy: str, add_bos: bool, prompt_ids: Sequence[int],
           first: NonFinite, piece: Optional[str] = None) -> RootCause:
        return cls(fingerprint, policy, first.channel,
                   position_kind(first, len(prompt_ids), add_bos), first.site, piece)

    @classmethod
    def of_verdict(cls, verdict: Verdict, fingerprint: str,
                   piece: Optional[str] = None) -> Optional[RootCause]:
        """The root cause of a failing verdict on the model with this fingerprint (None when
        it has no non-finite value)."""
        first = verdict.first_nonfinite
        if first is None:
            return None
        return cls.of(fingerprint, verdict.policy, verdict.add_bos, verdict.prompt_ids, first,
                      piece)

    def to_dict(self) -> dict[str, Any]:
        return {"channel": self.channel, "position_kind": self.position_kind,
                "site": self.site, "piece": self.piece, "label": self.label}


def token_piece(tokenizer: Any, first: Optional[NonFinite]) -> Optional[str]:
    """The tokenizer's piece of the token at the first non-finite position, or None when there
    is none, the tokenizer spells no pieces (fuzz.engine.tokenizer.Tokenizer.piece), or the id
    is not in its vocabulary."""
    spell = getattr(tokenizer, "piece", None)
    if first is None or spell is None:
        return None
    try:
        return str(spell(first.token_id))
    except (ValueError, IndexError):
        return None


@dataclass(frozen=True)
class RootCauseGroup:
    """One root cause and what fell under it: its signatures, each with its finding count."""

    cause: RootCause  # its piece: the most common piece among the members (an example)
    signatures: tuple[tuple[Signature, int], ...]  # most findings first

    @property
    def count(self) -> int:
        return sum(n for _, n in self.signatures)

    @property
    def layers(self) -> tuple[int, int]:
        """The lowest and highest first non-finite layer of its signatures."""
        found = [sig.layer for sig, _ in self.signatures]
        return min(found), max(found)

    def layers_text(self, num_layers: int = 0) -> str:
        """'layer 7' or 'layers 9-14' (labels as the tables write them when num_layers is
        known: 'embedding', 'head')."""
        low, high = (layer_label(x, num_layers) if num_layers else str(x) for x in self.layers)
        return f"layer {low}" if low == high else f"layers {low}-{high}"


def group_root_causes(items: Iterable[tuple[Signature, RootCause]]) -> list[RootCauseGroup]:
    """Findings (their signature and root cause) grouped by root cause: the most findings
    first, then in the order first seen."""
    members: dict[RootCauseKey, list[tuple[Signature, RootCause]]] = {}
    for sig, cause in items:
        members.setdefault(cause.key, []).append((sig, cause))
    groups = []
    for found in members.values():
        pieces = Counter(c.piece for _, c in found if c.piece is not None)
        example = pieces.most_common(1)[0][0] if pieces else None
        cause = found[0][1]
        cause = RootCause(cause.fingerprint, cause.policy, cause.channel, cause.position_kind,
                          cause.site, example)
        per_sig = Counter(Signature.from_list(sig) for sig, _ in found)
        groups.append(RootCauseGroup(cause, tuple(per_sig.most_common())))
    return sorted(groups, key=lambda g: -g.count)  # stable: ties keep first-seen order


def group_text(group: RootCauseGroup, num_layers: int = 0, unit: str = "finding") -> str:
    """'channel 163, last prompt token (float16): 6 findings, layers 9-14, e.g. token '▁''."""
    piece = f", e.g. token {group.cause.piece!r}" if group.cause.piece is not None else ""
    return (f"{group.cause.label} ({group.cause.policy}): {plural(group.count, unit)}, "
            f"{group.layers_text(num_layers)}{piece}")


def counts_text(groups: Sequence[RootCauseGroup], unit: Optional[str] = None) -> str:
    """'7 signatures in 4 root causes', or with `unit` 'case': '8 cases: 7 signatures in 4 root
    causes'. A signature is counted once even when its findings fall under two root causes
    (same layer and site, different channels)."""
    signatures = len({sig for g in groups for sig, _ in g.signatures})
    text = f"{plural(signatures, 'signature')} in {plural(len(groups), 'root cause')}"
    return f"{plural(sum(g.count for g in groups), unit)}: {text}" if unit else text
