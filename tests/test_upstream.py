"""The upstream engine (fuzz.engine.upstream.engine) against the built-in model and upstream's
generate().

google/gemma_pytorch is not on any package registry: `tox -e tests` installs a local copy when one
is at hand (.ci/install_upstream.py). Without it every test that needs it is skipped with the
reason `upstream_available()` gives, unless GEMMA_FUZZ_REQUIRE_UPSTREAM=1 (.ci/run sets it when it
finds the copy): then each of them fails with that reason, so parity cannot silently vanish. The
mask, position, availability and RoPE-scaling checks of the built-in model run everywhere. With
gemma_pytorch importable, tiny random Gemma 1/2/3 models (Gemma 3 with a sliding layer whose window
is shorter than the prompts, also with upstream's global RoPE scaling factor 8) must give the
built-in model's logits, greedy tokens and per-site max |x|, and the real Gemma 3 270M its float32
logits and float16/bfloat16 verdicts.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sentencepiece as spm
import torch

from fuzz.engine.config import Architecture, AttentionType, GemmaConfig
from fuzz.engine.model import (
    MASK_VALUE,
    Attention,
    Batch,
    GemmaForCausalLM,
    KVCache,
    full_logits,
    materialize,
    prompt_batch,
    rope_frequencies,
)
from fuzz.engine.synthetic import tiny as synthetic
from fuzz.engine.tokenizer import Tokenizer
from fuzz.engine.tokenizer.build import tiny_tokenizer
from fuzz.engine.upstream.engine import shared_positions, upstream_available, upstream_masks
from fuzz.generate import explain, generate
from fuzz.verdict import Bounds, PromptSpec, Verdict

REQUIRE_UPSTREAM = "GEMMA_FUZZ_REQUIRE_UPSTREAM"
_Test = TypeVar("_Test", bound=Callable[..., Any])


def upstream_gate(available: bool, reason: str,
                  environ: Mapping[str, str]) -> Callable[[_Test], _Test]:
    """The decorator of every test that runs gemma_pytorch: the test as is when upstream is
    importable; otherwise a skip with `reason`, or, when environ[REQUIRE_UPSTREAM] is "1", a test
    that fails with it (in its call phase: a failure, not a setup error)."""
    if available:
        return lambda test: test
    if environ.get(REQUIRE_UPSTREAM) != "1":
        return pytest.mark.skip(reason=reason)
    message = f"{REQUIRE_UPSTREAM}=1 but google/gemma_pytorch cannot run: {reason}"

    def fail_instead(test: _Test) -> _Test:
        # functools.wraps keeps the signature (pytest follows __wrapped__) and the marks
        # (__dict__ is copied), so parametrize and fixtures apply as to the real test.
        @functools.wraps(test)
        def failing(*args: Any, **kwargs: Any) -> None:
            pytest.fail(message, pytrace=False)
        return failing  # type: ignore[return-value]
    return fail_instead


AVAILABLE, REASON = upstream_available()
requires_upstream = upstream_gate(AVAILABLE, REASON, os.environ)

LOCAL, GLOBAL = AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL
WINDOW = 3  # shorter than every prompt below, so the local mask matters
PROMPTS = ["seven billion tokens, 3.14 and 42", "the self-attention is important because 7"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The project's tiny Gemma-style tokenizer (512 ids; pad 0, eos 1, bos 2, unk 3)."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_bytes(tokenizer: Tokenizer) -> bytes:
    return tokenizer.serialized_model_proto()


@pytest.fixture(scope="module")
def sp(tokenizer_bytes: bytes) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=tokenizer_bytes)


def tiny_config(arch: Architecture, vocab: int, **overrides: Any) -> GemmaConfig:
    """The shared tiny configs with 1 KV head and a local window (WINDOW) shorter than every
    prompt; Gemma 3 with two local layers before the global one. `overrides` replace fields."""
    fields: dict[str, Any] = dict(max_position_embeddings=64, num_key_value_heads=1)
    if arch == Architecture.GEMMA_1:
        layers = 2
    elif arch == Architecture.GEMMA_2:
        layers = 2
        fields.update(sliding_window_size=WINDOW, query_pre_attn_scalar=24)
    else:
        layers = 3
        fields.update(attn_types=(LOCAL, LOCAL, GLOBAL), sliding_window_size=WINDOW,
                      query_pre_attn_scalar=16)
    return synthetic.tiny_config(arch, vocab, layers=layers, **{**fields, **overrides})


def random_state(config: GemmaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Norm weights at 0.3 (upstream adds 1), so that the norms visibly act."""
    return synthetic.random_state(config, seed, norm_scale=0.3)


def encode(sp: spm.SentencePieceProcessor, prompt: str) -> list[int]:
    return [sp.bos_id()] + sp.encode(prompt)  # what upstream's Tokenizer.encode does


def build_pair(arch: Architecture, dtype: torch.dtype, tokenizer: Any,
               sp: spm.SentencePieceProcessor,
               **overrides: Any) -> tuple[GemmaForCausalLM, Any]:
    from fuzz.engine.upstream.engine import UpstreamEngine

    config = tiny_config(arch, sp.vocab_size(), **overrides)
    state = random_state(config)
    return materialize(config, state, dtype), UpstreamEngine(config, state, dtype, "cpu", tokenizer)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def step_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """Upstream attends over the whole cache, the built-in model over its filled slots only: the
    softmax and probs @ V reduce over different lengths. Measured on CPU: up to 3.8e-6 on float32
    logits of magnitude ~80 on tiny models; on the real 270M 1.05e-5 (relative 4.7e-7) on a Xeon
    with avx512_fp16 and 2.57e-5 (relative 1.15e-6) on an AMD EPYC without it: the float32
    reduction order is the kernel's. None at all in bfloat16 and float16.
    Allowed: relative 1e-5 of the largest logit in float32 (about 84 float32 ulps of it: still 1000x
    under a bfloat16 rounding), one ulp of it in half precision."""
    scale = reference.float().abs().max().item()
    return 1e-5 * scale if dtype == torch.float32 else torch.finfo(dtype).eps * scale


class MaxRecorder:
    """Records (layer, site, shape, max |x|) in call order; residual sites also their operands."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    @staticmethod
    def _max(x: torch.Tensor) -> float:
        return x.float().abs().max().item()

    def site(self, layer: int, name: str, x: torch.Tensor) -> None:
        self.events.append((layer, name, tuple(x.shape), self._max(x)))

    def residual(self, layer: int, name: str, residual: torch.Tensor, branch: torch.Tensor,
                 out: torch.Tensor) -> None:
        self.events.append((layer, name, tuple(out.shape), self._max(out), self._max(residual),
                            self._max(branch)))


def greedy(model: Any, prompt_ids: torch.Tensor, steps: int,
           keep_after: tuple[int, list[int]] | None = None,
           logits_seen: list[torch.Tensor] | None = None) -> dict[int, list[int]]:
    """Minimal KV-cached greedy loop over unpadded rows; optionally keeps only some rows after a
    step (as early stop does). Returns the generated ids per original row; appends each step's
    logits to logits_seen."""
    b, t = prompt_ids.shape
    rows = list(range(b))
    out: dict[int, list[int]] = {r: [] for r in rows}
    cache = model.new_cache(b, t + steps)
    logits = model(prompt_batch(prompt_ids), cache)
    for step in range(steps):
        if logits_seen is not None:
            logits_seen.append(logits)
        nxt = logits.argmax(-1)
        for i, r in enumerate(rows):
            out[r].append(int(nxt[i]))
        if keep_after is not None and step == keep_after[0]:
            keep = torch.tensor(keep_after[1])
            cache.keep_rows(keep)
            nxt, rows = nxt[keep], [rows[i] for i in keep_after[1]]
        pos = t + step
        n = len(rows)
        batch = Batch(token_ids=nxt.view(n, 1), positions=torch.full((n, 1), pos), slot_start=pos,
                      key_valid=torch.ones(n, pos + 1, dtype=torch.bool),
                      key_positions=torch.arange(pos + 1).expand(n, -1))
        logits = model(batch, cache)
    return out


# --- availability (runs everywhere) ------------------------------------------------------------
def test_availability_gives_a_reason() -> None:
    ok, reason = upstream_available()
    assert isinstance(ok, bool) and reason
    if ok:
        assert "gemma_pytorch" in reason
    else:
        assert "gemma_pytorch" in reason and "install" in reason


def test_a_foreign_gemma_package_is_not_taken_for_gemma_pytorch(tmp_path, monkeypatch) -> None:
    # PyPI's JAX `gemma` shares the import name; a package without gemma/model.py must be refused.
    (tmp_path / "gemma").mkdir()
    (tmp_path / "gemma" / "__init__.py").write_text("JAX_LIKE = True\n")
    saved = {k: v for k, v in sys.modules.items() if k == "gemma" or k.startswith("gemma.")}
    monkeypatch.syspath_prepend(str(tmp_path))
    for key in saved:
        monkeypatch.delitem(sys.modules, key)
    importlib.invalidate_caches()
    try:
        ok, reason = upstream_available()
    finally:
        for key in [k for k in sys.modules if k == "gemma" or k.startswith("gemma.")]:
            del sys.modules[key]
    assert not ok
    assert "not google/gemma_pytorch" in reason and "JAX" in reason and str(tmp_path) in reason


def _fresh_test() -> Callable[..., str]:
    """A new parametrized test function each call (a skip mark is stored on what it decorates)."""
    @pytest.mark.parametrize("dtype", ["f16"])
    def test(dtype: str, sp: Any) -> str:
        return dtype
    return test


@pytest.mark.parametrize(("available", "environ", "outcome"), [
    (True, {}, "run"), (True, {REQUIRE_UPSTREAM: "1"}, "run"),
    (False, {}, "skip"), (False, {REQUIRE_UPSTREAM: "0"}, "skip"),
    (False, {REQUIRE_UPSTREAM: "1"}, "fail"),
])
def test_the_upstream_gate_runs_skips_or_fails_as_the_environment_says(
        available: bool, environ: dict[str, str], outcome: str) -> None:
    test = _fresh_test()
    gated = upstream_gate(available, "gemma is not importable", environ)(test)
    marks = [m.name for m in getattr(gated, "pytestmark", [])]
    if outcome == "run":
        assert gated is test and gated("f16", None) == "f16" and marks == ["parametrize"]
    elif outcome == "skip":
        assert marks == ["parametrize", "skip"]
        assert gated.pytestmark[-1].kwargs["reason"] == "gemma is not importable"
    else:  # the same parameters and fixtures, then a failure that names the switch and the reason
        assert marks == ["parametrize"]
        assert list(inspect.signature(gated).parameters) == ["dtype", "sp"]
        with pytest.raises(pytest.fail.Exception,
                           match=f"{REQUIRE_UPSTREAM}=1 .*gemma is not importable"):
            gated("f16", None)


def _install_script() -> Any:
    """.ci/install_upstream.py (run by tox before the tests) as a module."""
    path = Path(__file__).resolve().parent.parent / ".ci" / "install_upstream.py"
    spec = importlib.util.spec_from_file_location("install_upstream", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_install_script_takes_only_a_gemma_pytorch_checkout(tmp_path) -> None:
    script = _install_script()
    source = tmp_path / "gemma_pytorch"
    source.mkdir()
    with pytest.raises(SystemExit, match="not a google/gemma_pytorch checkout"):
        script.source({script.ENV: str(source)})  # a wrong explicit path is an error, not a skip
    for name in ["gemma/model.py", "setup.py", "build/lib/gemma/model.py",
                 "gemma.egg-info/PKG-INFO"]:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("")
    (source / "gemma" / "model.py").chmod(0o444)  # the shared copy is read-only
    assert script.source({script.ENV: str(source)}) == source
    copy = tmp_path / "copy"
    script.writable_copy(source, copy)
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()) == [
        "gemma/model.py", "setup.py"]  # no earlier build output
    assert (copy / "gemma" / "model.py").stat().st_mode & 0o200  # pip may build in the copy


# --- masks and positions (runs everywhere) -----------------------------------------------------
@pytest.mark.parametrize("window", [None, 1, WINDOW])
def test_upstream_masks_equal_builtin_masks(window: int | None) -> None:
    config = tiny_config(Architecture.GEMMA_2, 16)
    config.sliding_window_size = window
    length = 7
    causal, local = upstream_masks(length, window)
    assert causal.dtype == torch.float32 and causal.shape == (1, 1, length, length)
    batch = prompt_batch(torch.zeros(1, length, dtype=torch.long))
    expected_global = Attention(config, GLOBAL).mask(batch)
    assert torch.equal(causal, expected_global)
    assert set(causal.unique().tolist()) == {0.0, torch.tensor(MASK_VALUE).item()}
    if window is None:
        assert local is None
    else:
        assert torch.equal(local, Attention(config, LOCAL).mask(batch))


def _batch(positions: list[int], rows: int = 2, pad_row: int | None = None) -> Batch:
    t = len(positions)
    start = positions[0]
    valid = torch.ones(rows, start + t, dtype=torch.bool)
    if pad_row is not None:
        valid[pad_row, 0] = False
    pos = torch.tensor(positions).expand(rows, t)
    return Batch(token_ids=torch.zeros(rows, t, dtype=torch.long), positions=pos, slot_start=start,
                 key_valid=valid, key_positions=torch.arange(start + t).expand(rows, -1))


def test_shared_positions_accepts_unpadded_rows() -> None:
    assert shared_positions(_batch([4, 5, 6]), max_len=8).tolist() == [4, 5, 6]


def test_shared_positions_refuses_padding_naming_the_rows() -> None:
    with pytest.raises(ValueError, match=r"padded batches .*rows \[1\]"):
        shared_positions(_batch([0, 1, 2], pad_row=1), max_len=8)


def test_shared_positions_refuses_positions_off_the_slots() -> None:
    batch = _batch([0, 1, 2])
    batch.positions = batch.positions + 1
    with pytest.raises(ValueError, match="must equal the cache slots 0..2"):
        shared_positions(batch, max_len=8)


def test_shared_positions_refuses_a_short_cache() -> None:
    with pytest.raises(ValueError, match="cache holds 5 slots"):
        shared_positions(_batch([4, 5, 6]), max_len=5)


# --- parity with the built-in model (needs gemma_pytorch) --------------------------------------
ARCHS = [Architecture.GEMMA_1, Architecture.GEMMA_2, Architecture.GEMMA_3]
# Upstream's 4b/12b/27b_v3 factor (gemma/config.py); with it upstream runs Gemma 3 through
# Gemma3ForMultimodalLM, whose global RoPE table is divided by it (fuzz.engine.upstream.engine).
SCALED = {"rope_scaling_factor": 8}
PARITY_MODELS = [*(pytest.param(a, {}, id=a.name) for a in ARCHS),
                 pytest.param(Architecture.GEMMA_3, SCALED, id="GEMMA_3-rope_scaling_8")]


@requires_upstream
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("arch", "overrides"), PARITY_MODELS)
def test_prefill_logits_equal_builtin(arch, overrides, dtype, tokenizer_bytes, sp) -> None:
    # The prompts (19 tokens once cut to one length) are 6x the local window: the global layer
    # attends over every position, so its RoPE (scaled or not) decides the logits.
    ours, theirs = build_pair(arch, dtype, tokenizer_bytes, sp, **overrides)
    assert torch.get_default_dtype() == torch.float32  # the build context was left
    assert theirs.dtype == dtype and next(theirs.upstream_model.parameters()).dtype == dtype
    n = min(len(encode(sp, p)) for p in PROMPTS)
    ids = torch.tensor([encode(sp, p)[:n] for p in PROMPTS])
    expected, got = full_logits(ours, ids), full_logits(theirs, ids)
    assert got.shape == expected.shape == (2, n, sp.vocab_size())
    assert got.dtype == dtype and torch.isfinite(got).all()
    # Measured on CPU: bit-identical in float32, bfloat16 and float16 (same ops, same shapes).
    assert max_abs_diff(got, expected) <= (1e-6 if dtype == torch.float32 else 0.0)
    # Last-only through a longer cache: upstream attends over 4 empty slots as well.
    last = theirs(prompt_batch(ids), theirs.new_cache(2, n + 4))
    expected_last = ours(prompt_batch(ids), ours.new_cache(2, n + 4))
    assert last.shape == expected_last.shape == (2, sp.vocab_size())
    assert max_abs_diff(last, expected_last) <= step_tolerance(dtype, expected_last)


@requires_upstream
@pytest.mark.parametrize("overrides", [{}, SCALED], ids=["unscaled", "rope_scaling_8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_decode_greedy_tokens_equal_builtin(dtype, overrides, tokenizer_bytes, sp) -> None:
    ours, theirs = build_pair(Architecture.GEMMA_3, dtype, tokenizer_bytes, sp, **overrides)
    n = min(len(encode(sp, p)) for p in PROMPTS)
    ids = torch.tensor([encode(sp, p)[:n] for p in PROMPTS])
    keep = (2, [1])  # after the third token only row 1 goes on, through KVCache.keep_rows
    expected_logits: list[torch.Tensor] = []
    got_logits: list[torch.Tensor] = []
    expected = greedy(ours, ids, steps=6, keep_after=keep, logits_seen=expected_logits)
    got = greedy(theirs, ids, steps=6, keep_after=keep, logits_seen=got_logits)
    assert got == expected
    assert len(got[0]) == 3 and len(got[1]) == 6
    assert len(got_logits) == len(expected_logits) == 6
    for e, g in zip(expected_logits, got_logits, strict=True):
        assert g.shape == e.shape and max_abs_diff(g, e) <= step_tolerance(dtype, e)


@requires_upstream
def test_upstream_generate_gives_our_greedy_tokens(tokenizer_bytes, sp) -> None:
    ours, theirs = build_pair(Architecture.GEMMA_3, torch.float32, tokenizer_bytes, sp)
    prompt, steps = PROMPTS[1], 5
    sampled: list[int] = []
    handle = theirs.upstream_model.sampler.register_forward_hook(
        lambda _m, _a, out: sampled.append(int(out[0].reshape(-1)[0])))
    try:
        text = theirs.upstream_model.generate(prompt, "cpu", output_len=steps, temperature=None)
    finally:
        handle.remove()
    ids = torch.tensor([encode(sp, prompt)])
    ours_tokens = greedy(ours, ids, steps)[0]
    assert sampled == ours_tokens == greedy(theirs, ids, steps)[0]
    trimmed = ours_tokens[:ours_tokens.index(sp.eos_id())] if sp.eos_id() in ours_tokens \
        else ours_tokens
    assert text == sp.decode(trimmed)


# --- RoPE scaling (rope_scaling_factor) --------------------------------------------------------
def _builtin_logits(config: GemmaConfig, ids: torch.Tensor) -> torch.Tensor:
    return full_logits(materialize(config, random_state(config), torch.float32), ids)


def test_rope_scaling_factor_changes_only_the_gemma3_global_layers(sp) -> None:
    # The factor must never be silently ignored again; and it acts where upstream applies it
    # only: Gemma 3's global table (gemma/gemma3_model.py), not its local layers nor Gemma 1/2.
    ids = torch.tensor([encode(sp, PROMPTS[1])])
    vocab = sp.vocab_size()
    unscaled = _builtin_logits(tiny_config(Architecture.GEMMA_3, vocab), ids)
    scaled = _builtin_logits(tiny_config(Architecture.GEMMA_3, vocab, **SCALED), ids)
    # Measured: max |delta| 1.56 on float32 logits of magnitude ~65 (28 tokens).
    assert max_abs_diff(unscaled, scaled) > 0.5
    for arch, overrides in [(Architecture.GEMMA_3, {"attn_types": (LOCAL,)}),
                            (Architecture.GEMMA_2, {})]:
        unscaled = tiny_config(arch, vocab, **overrides)
        scaled = tiny_config(arch, vocab, **overrides, **SCALED)
        assert torch.equal(_builtin_logits(unscaled, ids), _builtin_logits(scaled, ids))


@requires_upstream
@pytest.mark.parametrize("factor", [None, 8])
@pytest.mark.parametrize("head_dim", [16, 256])
def test_builtin_rope_frequencies_are_rows_of_upstreams_table(head_dim, factor) -> None:
    from gemma.model import precompute_freqs_cis

    theta, length = 1_000_000, 2 * 32_768  # Gemma 3's global base; upstream's table length
    table = precompute_freqs_cis(head_dim, length, theta=theta, rope_scaling_factor=factor or 1)
    positions = torch.tensor([[0, 1, 2, 3, 17], [511, 4095, 8191, 32_767, length - 1]])
    ours = rope_frequencies(head_dim, positions, theta, factor)
    assert ours.dtype == table.dtype == torch.complex64
    assert torch.equal(ours, table[positions])  # bit for bit


@requires_upstream
def test_upstream_engine_has_the_multimodal_models_global_table(tokenizer_bytes, sp) -> None:
    # What Gemma3ForMultimodalLM registers (gemma/gemma3_model.py): the global table divided by
    # the factor, the local one not.
    from gemma.model import precompute_freqs_cis

    _, theirs = build_pair(Architecture.GEMMA_3, torch.float16, tokenizer_bytes, sp, **SCALED)
    head_dim, length = theirs.config.head_dim, 2 * theirs.config.max_position_embeddings
    model = theirs.upstream_model
    scaled = precompute_freqs_cis(head_dim, length, theta=1_000_000, rope_scaling_factor=8)
    assert torch.equal(model.global_freqs_cis, scaled)
    assert torch.equal(model.local_freqs_cis, precompute_freqs_cis(head_dim, length, theta=10_000))


# --- probing through hooks ---------------------------------------------------------------------
def _without_scores(events: list[tuple]) -> list[tuple]:
    return [e for e in events if e[1] != "attn_scores"]


@requires_upstream
@pytest.mark.parametrize("last_only", [True, False])
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_hooks_report_the_builtin_sites(arch, last_only, tokenizer_bytes, sp) -> None:
    ours, theirs = build_pair(arch, torch.float32, tokenizer_bytes, sp)
    ids = torch.tensor([encode(sp, PROMPTS[0])])
    t = ids.shape[1]
    records = []
    for model in (ours, theirs):
        rec_prefill, rec_decode = MaxRecorder(), MaxRecorder()
        cache = model.new_cache(1, t + 1)
        logits = model(prompt_batch(ids), cache, rec=rec_prefill, last_only=last_only)
        nxt = logits[:, -1].argmax(-1) if not last_only else logits.argmax(-1)
        step = Batch(token_ids=nxt.view(1, 1), positions=torch.tensor([[t]]), slot_start=t,
                     key_valid=torch.ones(1, t + 1, dtype=torch.bool),
                     key_positions=torch.arange(t + 1).view(1, -1))
        model(step, cache, rec=rec_decode)
        records.append((rec_prefill.events, rec_decode.events))
    for expected, got in zip(records[0], records[1], strict=True):
        expected = _without_scores(expected)
        assert [e[:3] for e in got] == [e[:3] for e in expected]  # same sites, order and shapes
        for e, g in zip(expected, got, strict=True):
            assert g[3:] == pytest.approx(e[3:], rel=1e-6, abs=1e-6), (e, g)
    names = {e[1] for e in records[1][0]}
    assert {"embedding", "qkv", "mlp_act", "residual_attn", "residual_mlp", "final_norm",
            "logits"} <= names and "attn_scores" not in names
    assert all(not m._forward_hooks and not m._forward_pre_hooks
               for m in theirs.upstream_model.modules())


@requires_upstream
def test_hooks_are_removed_when_the_recorder_raises(tokenizer_bytes, sp) -> None:
    _, theirs = build_pair(Architecture.GEMMA_3, torch.float32, tokenizer_bytes, sp)

    class Stop(MaxRecorder):
        def site(self, layer: int, name: str, x: torch.Tensor) -> None:
            if name == "mlp_act":
                raise RuntimeError("stop here")

    ids = torch.tensor([encode(sp, PROMPTS[0])])
    with pytest.raises(RuntimeError, match="stop here"):
        theirs(prompt_batch(ids), theirs.new_cache(1, ids.shape[1]), rec=Stop())
    assert all(not m._forward_hooks and not m._forward_pre_hooks
               for m in theirs.upstream_model.modules())


# --- refusals (needs gemma_pytorch) ------------------------------------------------------------
@requires_upstream
def test_padded_batch_is_refused(tokenizer_bytes, sp) -> None:
    _, theirs = build_pair(Architecture.GEMMA_3, torch.float32, tokenizer_bytes, sp)
    assert theirs.supports_padding is False
    with pytest.raises(ValueError, match="padded batches"):
        theirs(_batch([0, 1, 2], pad_row=0), theirs.new_cache(2, 8))


@requires_upstream
@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_a_state_that_does_not_fit_is_refused_by_name(change, tokenizer_bytes, sp) -> None:
    from fuzz.engine.upstream.engine import UpstreamEngine

    config = tiny_config(Architecture.GEMMA_3, sp.vocab_size())
    state = random_state(config)
    key = "model.layers.1.self_attn.key_norm.weight"
    if change == "missing":
        del state[key]
    else:
        state[key := "model.layers.9.mlp.gate_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=f"{change} keys .*{key}"):
        UpstreamEngine(config, state, torch.float16, "cpu", tokenizer_bytes)
    assert torch.get_default_dtype() == torch.float32  # restored on the error path too


@requires_upstream
def test_tokenizer_may_be_a_path_but_must_exist(tmp_path, tokenizer_bytes, sp) -> None:
    from fuzz.engine.upstream.engine import UpstreamEngine

    config = tiny_config(Architecture.GEMMA_3, sp.vocab_size())
    path = tmp_path / "tiny.model"
    path.write_bytes(tokenizer_bytes)
    engine = UpstreamEngine(config, random_state(config), torch.float32, "cpu", path)
    assert engine.upstream_model.tokenizer.n_words == sp.vocab_size()
    with pytest.raises(FileNotFoundError, match="missing.model does not exist"):
        UpstreamEngine(config, random_state(config), torch.float32, "cpu",
                       tmp_path / "missing.model")


@requires_upstream
def test_cache_longer_than_max_positions_is_refused(tokenizer_bytes, sp) -> None:
    _, theirs = build_pair(Architecture.GEMMA_1, torch.float32, tokenizer_bytes, sp)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        theirs.new_cache(1, 65)
    assert isinstance(theirs.new_cache(1, 64), KVCache)


# --- through the suite's generation loop (fuzz.generate) ---------------------------------------
def _overflowing_state(config: GemmaConfig) -> dict[str, torch.Tensor]:
    """Post-FFN norm weights raised by 14000 (the real 270M's post-norms amplify up to ~1.6e3):
    in float16 the residual stream of this model overflows at layer 2's residual_mlp."""
    state = random_state(config)
    for i in range(config.num_hidden_layers):
        state[f"model.layers.{i}.post_feedforward_layernorm.weight"] += 14000.0
    return state


def _same_table(a: dict, b: dict) -> bool:
    """Tables of max |x| equal value for value (NaN equals NaN), attn_scores left out of `a`."""
    a = {layer: {k: v for k, v in sites.items() if k != "attn_scores"}
         for layer, sites in a.items()}
    if a.keys() != b.keys() or any(a[k].keys() != b[k].keys() for k in a):
        return False
    return all(a[k][s] == b[k][s] or (math.isnan(a[k][s]) and math.isnan(b[k][s]))
               for k in a for s in a[k])


def assert_same_verdict(ours: GemmaForCausalLM, theirs: Any, tokenizer: Any, spec: PromptSpec,
                        bounds: Bounds, policy: str) -> Verdict:
    """Runs the suite's generation loop (and explain) on both engines; asserts the verdicts agree
    in finiteness, first non-finite value (step, layer, site, position, channel, terms), tokens,
    steps and max |x| table. Returns upstream's verdict."""
    expected, got = (explain(m, tokenizer, spec, generate(m, tokenizer, [spec], policy, bounds)[0],
                             bounds) for m in (ours, theirs))
    assert got.finite == expected.finite
    assert got.first_nonfinite == expected.first_nonfinite
    assert got.tokens == expected.tokens and got.steps == expected.steps
    assert _same_table(expected.max_abs, got.max_abs)
    return got


@requires_upstream
@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("overflow", [False, True])
def test_suite_generation_finds_the_same_verdict(overflow, add_bos, tokenizer) -> None:
    from fuzz.engine.upstream.engine import UpstreamEngine

    config = tiny_config(Architecture.GEMMA_3, tokenizer.n_words)
    state = _overflowing_state(config) if overflow else random_state(config)
    ours = materialize(config, state, torch.float16)
    theirs = UpstreamEngine(config, state, torch.float16, "cpu", tokenizer)
    spec, bounds = PromptSpec("seven billion parameter", add_bos=add_bos), Bounds(max_new_tokens=5)
    got = assert_same_verdict(ours, theirs, tokenizer, spec, bounds, "p")
    assert got.finite == (not overflow)
    if overflow:
        assert got.first_nonfinite.site == "residual_mlp" and got.first_nonfinite.terms


# --- the real Gemma 3 270M (needs gemma_pytorch and the weights package) -----------------------
REAL_PROMPT = "The capital of France is"  # BOS + 5 tokens: short, so that CI's 2 cores keep up


@pytest.fixture(scope="module")
def real_270m(real_gguf: Any) -> tuple[GemmaConfig, dict[str, torch.Tensor], Tokenizer]:
    """The GGUF-loaded config and float32 state (conftest's real_gguf) and the zoo's tokenizer."""
    from fuzz.engine.zoo import load_model

    return real_gguf.config, real_gguf.state, load_model("gemma3-270m").tokenizer


def real_pair(real_270m: tuple[GemmaConfig, dict[str, torch.Tensor], Tokenizer],
              dtype: torch.dtype) -> tuple[GemmaForCausalLM, Any]:
    """The built-in model and upstream's own GemmaForCausalLM, both from the same GGUF state."""
    from fuzz.engine.upstream.engine import UpstreamEngine

    config, state, tokenizer = real_270m
    return (materialize(config, state, dtype),
            UpstreamEngine(config, state, dtype, "cpu", tokenizer))


@requires_upstream
@pytest.mark.real_weights
def test_real_270m_float32_logits_equal_builtin(real_270m) -> None:
    ours, theirs = real_pair(real_270m, torch.float32)
    ids = torch.tensor([real_270m[2].encode(REAL_PROMPT)])
    # Measured on CPU: the prefill is bit-identical (max |delta| 0.0 over every position, logits
    # up to 22.4); decode steps, where upstream attends over the whole cache, differ by up to
    # 1.05e-5 on one CPU, 2.57e-5 on another (relative 4.7e-7, 1.15e-6: step_tolerance allows 1e-5).
    assert max_abs_diff(full_logits(theirs, ids), full_logits(ours, ids)) == 0.0
    expected_logits: list[torch.Tensor] = []
    got_logits: list[torch.Tensor] = []
    expected = greedy(ours, ids, steps=3, logits_seen=expected_logits)
    assert greedy(theirs, ids, steps=3, logits_seen=got_logits) == expected
    for e, g in zip(expected_logits, got_logits, strict=True):
        assert max_abs_diff(g, e) <= step_tolerance(torch.float32, e)


@requires_upstream
@pytest.mark.real_weights
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_real_270m_verdicts_equal_builtin(dtype, real_270m) -> None:
    # docs/NUMERICS.md: with BOS, float16 overflows in the prefill at the BOS position in layer 7's
    # residual stream (channel 163, 55008 + 13376); bfloat16 stays finite. Upstream's own code must
    # give the same verdicts through the suite's generation loop.
    ours, theirs = real_pair(real_270m, dtype)
    got = assert_same_verdict(ours, theirs, real_270m[2], PromptSpec(REAL_PROMPT),
                              Bounds(max_new_tokens=3), str(dtype).removeprefix("torch."))
    if dtype == torch.bfloat16:
        assert got.finite and got.steps == 3
    else:
        first = got.first_nonfinite
        assert not got.finite and first is not None and first.terms is not None
        assert (first.step, first.layer, first.site, first.position) == (0, 7, "residual_mlp", 0)
