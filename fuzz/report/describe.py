"""A run's pieces in words: numbers, prompts, shell quoting, a verdict's first non-finite value,
its overflowing terms, a corpus signature.

Plain text with no report layout: text.py builds the report's wording from these, plots.py its
labels. Kept apart from text.py so that each module stays one concern (and readable in one go).
"""
from __future__ import annotations

import math
import shlex
from typing import Any

from fuzz.search.accounting import DTYPE_MAX
from fuzz.verdict import NonFinite, Signature, Verdict, failed_at_bos, layer_label, plural


def fmt_value(x: float) -> str:
    """Activation magnitudes: integers as integers (55008), huge/tiny ones in e-notation."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and (abs(x) >= 1e7 or abs(x) < 1e-3):
        return f"{x:.4g}"
    if x == int(x):
        return str(int(x))
    return f"{x:.4g}"


def fmt_headroom(h: float) -> str:
    if math.isinf(h):
        return "inf"
    return f"{h:.3g}"


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return str(seconds)
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h {m:02d}m {s:02d}s"
    return f"{m}m {s:02d}s" if m else f"{s}s"


def prompt_literal(prompt: str) -> str:
    """repr(): newlines, tabs and control characters visible as escapes, quotes delimit it."""
    return repr(prompt)


def shell_quote(text: str) -> str:
    """Quote for bash on one line: shlex for printable text, $'...' when it holds control chars
    (a newline inside '...' would split the command across lines in a log)."""
    if text.isprintable():
        return shlex.quote(text)
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("\\'")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "$'" + "".join(out) + "'"


def describe_position(verdict: Verdict, nf: NonFinite) -> str:
    bos = " (BOS)" if failed_at_bos(nf, verdict.add_bos) else ""
    return f"position {nf.position}{bos}, token id {nf.token_id}"


def describe_step(step: int) -> str:
    return "step 0 (prefill)" if step == 0 else f"step {step} (decode)"


def describe_nonfinite(verdict: Verdict) -> str:
    """'inf at step 0 (prefill), layer 7, site residual_mlp, position 0 (BOS), token id 2'."""
    nf = verdict.first_nonfinite
    assert nf is not None
    layer = verdict.layer_label(nf.layer)
    layer_text = layer if layer in ("embedding", "head") else f"layer {layer}"
    return (f"{nf.kind} at {describe_step(nf.step)}, {layer_text}, site {nf.site}, "
            f"{describe_position(verdict, nf)}")


def site_limit(verdict: Verdict, layer: str, site: str, dtype: str | None = None) -> float:
    limit = verdict.limits.get(f"{layer}/{site}")
    if limit is None and dtype is not None:
        limit = DTYPE_MAX.get(dtype)
    return math.nan if limit is None else float(limit)


def describe_terms(verdict: Verdict, dtype: str | None = None) -> str | None:
    """'channel 163: 55008 + 13376 = 68384 > 65504', or None when the probe found no channel."""
    nf = verdict.first_nonfinite
    if nf is None or nf.channel is None:
        return None
    text = f"channel {nf.channel}"
    if nf.terms is None:
        return text
    a, b = nf.terms
    total = a + b
    b_text = fmt_value(b) if b >= 0 else f"({fmt_value(b)})"
    text += f": {fmt_value(a)} + {b_text} = {fmt_value(total)}"
    limit = site_limit(verdict, verdict.layer_label(nf.layer), nf.site, dtype)
    if not math.isnan(limit):
        text += f" > {fmt_value(limit)}" if total >= 0 else f" < -{fmt_value(limit)}"
    return text


def layer_site_text(layer: str, site: str) -> str:
    """'layer 7 residual_mlp'; the embedding and the head by their name alone."""
    return site if layer in ("embedding", "head") else f"layer {layer} {site}"


def bos_text(add_bos: bool) -> str:
    return "BOS on" if add_bos else "BOS off (--no-bos)"


def signature_text(signature: Signature, layers: int | None) -> str:
    """A signature in words: 'layer 7 residual_mlp at the BOS position, BOS on'. `layers`
    (decoder layers) tells the head from a layer; None or 0 when no verdict of the model is at
    hand: the layer is then written as its number (never guessed to be the head)."""
    place = "the BOS position" if signature.at_bos else "a content position"
    index = signature.layer
    label = layer_label(index, layers) if layers else ("embedding" if index < 0 else str(index))
    return f"{layer_site_text(label, signature.site)} at {place}, " \
        f"{'BOS on' if signature.add_bos else 'BOS off'}"


def bounds_text(bounds: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in bounds.items()) or "defaults"


def fmt_ratio(ratio: float) -> str:
    """A margin: the unrounded sum over the limit, 4 decimals (the 1.02 threshold needs them)."""
    return f"{ratio:.4f}"


def margin_text(margin: dict[str, Any] | None) -> str | None:
    """fuzz.margin.Margin.to_dict() in words: '1.0440 x the limit (68385 unrounded > 65504);
    float32 run: 68390 (1.0441 x)'. None when nothing was measured. (fuzz.margin's own describe()
    needs torch, which the report never imports.)"""
    if not margin:
        return None
    parts = []
    if margin.get("ratio") is not None:
        # unrounded sums are float32 values: 6 digits, as fuzz.margin writes them
        parts.append(f"{fmt_ratio(margin['ratio'])} x the limit ({margin['unrounded']:.6g}"
                     f" unrounded > {fmt_value(margin['limit'])})")
    else:
        parts.append("no unrounded sum (the first non-finite site is not a residual add)")
    if margin.get("float32") is not None:
        ratio = margin.get("float32_ratio")
        of_limit = f" ({fmt_ratio(ratio)} x)" if ratio is not None else ""
        parts.append(f"float32 run at the same site: {margin['float32']:.6g}{of_limit}")
    return "; ".join(parts)


def minimization_text(record: dict[str, Any] | None) -> str | None:
    """fuzz.corpus.Case.minimization in words: '1-minimal (64 -> 12 characters, 210 runs)' or
    'stopped by time at 2-character deletions (64 -> 30 characters, 96 runs)'."""
    if not record:
        return None
    state = record.get("state", "?")
    if state == "not minimized":
        return f"not minimized ({record.get('why') or 'no reason recorded'})"
    sizes = ""
    if "from_chars" in record and "chars" in record:
        sizes = f"{record['from_chars']} -> {plural(record['chars'], 'character')}"
        if "runs" in record:
            sizes += f", {plural(record['runs'], 'run')}"
    if state == "1-minimal":
        return "1-minimal" + (f" ({sizes})" if sizes else "")
    chunk = record.get("chunk")
    at = f" at {chunk}-character deletions" if chunk else ""
    return f"stopped by {record.get('why') or '?'}{at}" + (f" ({sizes})" if sizes else "")


def robustness_text(robustness: dict[str, Any] | None) -> str | None:
    """fuzz.shrink.robustness.Robustness.to_dict() in words: held under every variation, or
    why not."""
    if not robustness:
        return None
    variations = robustness.get("variations", [])
    failed = sum(v.get("status") == "nonfinite" for v in variations)
    least = robustness.get("margin")
    least_text = f", least margin {fmt_ratio(least)}" if least is not None else ""
    if robustness.get("robust"):
        return f"held under {plural(len(variations), 'kernel variation')}{least_text}"
    return (f"not robust: {robustness.get('reason') or 'no reason recorded'} (non-finite under "
            f"{failed} of {plural(len(variations), 'kernel variation')}{least_text})")


def variations_text(robustness: dict[str, Any] | None) -> str | None:
    """Each kernel variation's outcome, for a finding that did not hold under all of them."""
    if not robustness or robustness.get("robust") or not robustness.get("variations"):
        return None
    out = []
    for v in robustness["variations"]:
        margin = v.get("margin")
        extra = ", ".join(x for x in (v.get("where") or "",
                                      "" if margin is None else f"margin {fmt_ratio(margin)}") if x)
        out.append(f"{v.get('variation', '?')}: {v.get('status', '?')}"
                   + (f" ({extra})" if extra else ""))
    return "; ".join(out)
