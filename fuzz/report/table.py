"""`fuzz check`'s table: max |x| and headroom per layer, the first non-finite layer marked."""
from __future__ import annotations

from typing import Optional

from fuzz.margin import Margin
from fuzz.verdict import FLOAT16_MAX, Verdict

SITE_GROUPS = {
    "residual": ("embedding", "residual_attn", "residual_mlp"),
    "post-norm": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "mlp": ("mlp_act", "mlp_output"),
    "attention": ("qkv", "attn_scores", "attn_output"),
    "head": ("final_norm", "logits"),
}


def format_verdict(v: Verdict, margin: Optional[Margin] = None) -> str:
    """A per-layer table of max |x| and headroom, the first non-finite site highlighted, and
    the failure's margin when measured (fuzz.margin)."""
    first = v.first_nonfinite
    lines = [f"policy {v.policy}  BOS {'on' if v.add_bos else 'off'}  prompt {v.prompt!r}",
             f"prompt ids ({len(v.prompt_ids)}): {v.prompt_ids[:24]}"
             f"{' …' if len(v.prompt_ids) > 24 else ''}"]
    header = f"{'layer':>9} " + " ".join(f"{g:>10}" for g in SITE_GROUPS) + f" {'headroom':>9}"
    lines += ["", header, "-" * len(header)]
    headroom = v.headroom()
    for layer, sites in v.max_abs.items():
        cells = []
        for names in SITE_GROUPS.values():
            values = [sites[n] for n in names if n in sites]
            cells.append(f"{_fmt(max(values, key=_order)) if values else '':>10}")
        room = min(headroom[layer].values(), default=float("inf"))
        mark = ""
        if first is not None and layer == v.layer_label(first.layer):
            mark = f"  <-- first non-finite: {first.site}"
        lines.append(f"{layer:>9} " + " ".join(cells) + f" {_fmt(room):>9}{mark}")
    lines.append("")
    if v.inconclusive:
        lines.append(f"INCONCLUSIVE: the time limit stopped the run after {v.steps} steps, "
                     "before EOS or the step bound (no non-finite value so far)")
    elif first is None:
        lines.append(f"FINITE: {v.steps} steps, stopped at {v.stopped}; "
                     f"min headroom {v.min_headroom():.3g} (content {v.min_headroom(True):.3g})")
    else:
        lines.append(f"NON-FINITE ({first.kind}) at step {first.step}, layer {first.layer}, site "
                     f"{first.site}, position {first.position} (token {first.token_id})")
        if first.channel is not None:
            a, b = first.terms
            lines.append(f"  channel {first.channel}: {a:.6g} + {b:.6g} = {a + b:.6g} "
                         f"> {v.limit or FLOAT16_MAX:.6g}")
        if margin is not None:
            lines.append(f"  margin: {margin.describe()}")
    lines.append(f"generated {len(v.tokens)} tokens: {v.text!r}")
    return "\n".join(lines)


def _order(x: float) -> float:
    return float("inf") if x != x else x  # nan sorts as the largest


def _fmt(x: float) -> str:
    return "nan" if x != x else ("inf" if x == float("inf") else f"{x:.4g}")
