"""The screening kernel (fuzz.engine.kernels, fuzz.session.Session.screen) and the probe's exact
reductions (fuzz.probe.abs_max), on synthetic models and random tensors.

A screening kernel may only decide which prompts are clearly finite: every finding and every
near miss it reports is re-run with the faithful kernel, so a forced "fp32-accumulate" must yield
exactly the verdicts a native screen yields for the findings of the planted models."""
from __future__ import annotations

import gc

import pytest
import torch

from fuzz import session as session_module
from fuzz.engine import kernels
from fuzz.engine.synthetic.planted import digit_run_model, minimal_trigger
from fuzz.engine.zoo import load_model
from fuzz.generate import greedy_tokens
from fuzz.probe import abs_max
from fuzz.session import Session
from fuzz.verdict import Bounds, PromptSpec, Verdict, json_safe

RUN = 8  # tiny-digit-run-8: overflows on 8 consecutive digits, BOS on


def test_float32_weight_is_cached_until_the_weight_changes_or_dies():
    w = torch.randn(64, 32).half()
    first = kernels.float32_weight(w)
    assert first.dtype == torch.float32 and torch.equal(first, w.float())
    assert kernels.float32_weight(w) is first  # no conversion on the second call
    w[0, 0] = 7.0  # an in-place edit (tests poison embedding rows this way)
    second = kernels.float32_weight(w)
    assert second is not first and second[0, 0] == 7.0
    key = id(w)
    del w, first, second
    gc.collect()
    assert key not in kernels._float32_weights  # freed with its weight


def test_cached_fp32_accumulate_is_the_uncached_product():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 640, generator=gen).half(), torch.randn(2048, 640, generator=gen).half()
    with kernels.kernel("fp32-accumulate"):
        once, twice = kernels.linear(x, w), kernels.linear(x, w)  # the second from the cache
    expected = torch.nn.functional.linear(x.float(), w.float()).half()
    assert torch.equal(once, expected) and torch.equal(twice, expected)


def test_screening_kernel_choice(monkeypatch):
    assert kernels.screening_kernel("fp32-accumulate", torch.float16) == "fp32-accumulate"
    assert kernels.screening_kernel("native", torch.float16) == "native"
    assert kernels.screening_kernel("auto", torch.float16) == "auto"  # for the trial to decide
    # only float16 products have a choice
    assert kernels.screening_kernel("fp32-accumulate", torch.bfloat16) == "native"
    assert kernels.screening_kernel("auto", torch.float32) == "native"
    with pytest.raises(ValueError, match="unknown screening kernel 'fast'"):
        kernels.screening_kernel("fast", torch.float16)
    monkeypatch.setenv(kernels.SCREEN_KERNEL_ENV, "fp32-accumulate")
    assert kernels.default_screen_kernel() == "fp32-accumulate"
    assert Session(load_model("tiny")).screen_kernel == "fp32-accumulate"
    monkeypatch.delenv(kernels.SCREEN_KERNEL_ENV)
    assert kernels.default_screen_kernel() == "auto"


@pytest.mark.parametrize("rows", [1, kernels.WIDE_ROWS - 1, kernels.WIDE_ROWS, 64])
def test_the_wide_kernel_accumulates_in_float32_only_wide_products(rows, monkeypatch):
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 640, generator=gen).half(), torch.randn(512, 640, generator=gen)
    w = w.half()
    with kernels.kernel("fp32-accumulate"):  # the kernels differ on these operands, or the
        assert not torch.equal(kernels.linear(x, w),  # test could not tell them apart
                               torch.nn.functional.linear(x, w))
    wide = rows >= kernels.WIDE_ROWS
    with kernels.kernel("fp32-accumulate-wide"):
        got = kernels.linear(x, w)
    with kernels.kernel("fp32-accumulate" if wide else "native"):
        assert torch.equal(got, kernels.linear(x, w)) and got.dtype == torch.float16
    # Rows, not elements, and every leading dimension counts: [2, rows, 640] has 2 x rows.
    stacked = torch.stack([x, x])
    with kernels.kernel("fp32-accumulate-wide"):
        got = kernels.linear(stacked, w)
    with kernels.kernel("fp32-accumulate" if 2 * rows >= kernels.WIDE_ROWS else "native"):
        assert torch.equal(got, kernels.linear(stacked, w))
    # A batched matmul counts the rows of each product (this CPU's native float16 bmm rounds
    # like fp32-accumulate, so the operands' dtype is what tells).
    operand_dtypes: list[torch.dtype] = []
    real_matmul = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b: (operand_dtypes.append(a.dtype),
                                                       real_matmul(a, b))[1])
    with kernels.kernel("fp32-accumulate-wide"):
        product = kernels.matmul(torch.randn(4, rows, 64).half(), torch.randn(4, 64, 8).half())
    assert operand_dtypes == [torch.float32 if wide else torch.float16]
    assert product.dtype == torch.float16


def test_the_kernel_trial_decides_on_timed_screens_with_reruns_charged():
    trial = kernels.KernelTrial()
    for _ in range(kernels.TRIAL_WARMUP):
        trial.add(100.0, 1.0, 0.0)  # warm-up: not counted (the float32 copies are made here)
    assert (trial.native_s, trial.choice) == (0.0, None)
    trial.add(1.5, 1.0, 0.0)
    assert trial.choice is None  # one screen decides nothing
    trial.add(1.5, 1.0, 0.0)
    assert trial.speedup == 1.5 and trial.choice == "fp32-accumulate-wide"
    charged = kernels.KernelTrial(screens=kernels.TRIAL_WARMUP)
    # As fast alone, but a third of its prompts would be re-run natively: 1.0 + 0.5 = 1.5 s.
    charged.add(1.5, 1.0, 1 / 3), charged.add(1.5, 1.0, 1 / 3)
    assert charged.speedup == pytest.approx(1.0) and charged.choice == "native"
    tiny = kernels.KernelTrial(screens=kernels.TRIAL_WARMUP)
    for _ in range(kernels.TRIAL_MAX_SCREENS - 1):
        tiny.add(0.001, 0.0005, 0.0)  # one-prompt batches: too little time to decide ...
    assert tiny.choice is None
    tiny.add(0.001, 0.0005, 0.0)  # ... until TRIAL_MAX_SCREENS
    assert tiny.choice == "fp32-accumulate-wide"


def test_auto_screens_natively_during_its_trial_then_with_its_choice(monkeypatch):
    """While the trial runs, every batch runs under both kernels and native's verdicts are
    returned; once decided, batches run under the choice alone."""
    model = digit_run_model(RUN)
    auto = Session(model, bounds=Bounds(max_new_tokens=2), screen_kernel="auto")
    native = Session(model, bounds=auto.bounds, screen_kernel="native")
    calls: list[str] = []
    real_run = auto.run
    monkeypatch.setattr(auto, "run", lambda specs, policy, bounds=None: (
        calls.append(kernels.current_kernel()), real_run(specs, policy, bounds))[1])
    specs = [PromptSpec(t) for t in ("hello", "0" * (RUN - 1), "12 34")]
    expected = native.screen(specs, "float16", known=set())
    trial = auto.kernel_trial()
    while trial.choice is None:
        calls.clear()
        got = auto.screen(specs, "float16", known=set())
        assert calls == ["native", "fp32-accumulate-wide"]
        assert auto.screened_with == {"float16": "native"}
        assert all(same(g.verdict, e.verdict) for g, e in zip(got, expected))
    assert trial.screens == kernels.TRIAL_WARMUP + kernels.TRIAL_MAX_SCREENS  # ms per screen
    calls.clear()
    auto.screen(specs[:1], "float16", known=set())
    assert calls == [trial.choice] and auto.screened_with == {"float16": trial.choice}
    # one trial per (model, device, batch size), whatever the bounds
    assert Session(model, bounds=Bounds(max_new_tokens=5), screen_kernel="auto"
                   ).kernel_trial() is trial
    assert Session(model, batch_size=4, screen_kernel="auto").kernel_trial() is not trial


def same(a: Verdict, b: Verdict) -> bool:
    """Bit for bit, NaN included (NaN != NaN in a plain dict comparison)."""
    return json_safe(a.to_dict()) == json_safe(b.to_dict())


SCREENING_KERNELS = ["fp32-accumulate", "fp32-accumulate-wide"]


def _pair(model, bounds: Bounds, name: str) -> tuple[Session, Session]:
    native = Session(model, bounds=bounds, screen_kernel="native")
    forced = Session(model, bounds=bounds, screen_kernel=name)
    return native, forced


def _assert_same_findings(native: Session, forced: Session, specs: list[PromptSpec]) -> None:
    expected = native.screen(specs, "float16", known=set())
    got = forced.screen(specs, "float16", known=set())
    assert forced.screened_with == {"float16": forced.screen_kernel}
    assert native.screened_with == {"float16": "native"}
    assert any(r.new for r in expected)  # the sets hold findings
    for spec, e, g in zip(specs, expected, got):
        assert (g.signature, g.new) == (e.signature, e.new), spec
        if e.verdict.nonfinite:  # a finding's verdict is the faithful one, bit for bit
            assert same(g.verdict, e.verdict), spec


@pytest.mark.parametrize("name", SCREENING_KERNELS)
def test_a_forced_screening_kernel_keeps_the_faithful_findings_of_tiny_planted(name):
    native, forced = _pair(load_model("tiny-planted"), Bounds(max_new_tokens=3), name)
    specs = [PromptSpec(t) for t in ("hello", "a 7", "kernel 7 ms", "the cat", "7")] + \
        [PromptSpec("x 7", add_bos=False)]
    _assert_same_findings(native, forced, specs)


@pytest.mark.parametrize("name", SCREENING_KERNELS)
def test_a_forced_screening_kernel_keeps_the_faithful_findings_of_a_digit_run(name):
    native, forced = _pair(digit_run_model(RUN), Bounds(max_new_tokens=2), name)
    trigger = minimal_trigger(RUN)
    specs = [PromptSpec(t) for t in (trigger, "0" * (RUN - 1), f"a {trigger} b", "hello",
                                     "12 34")]
    _assert_same_findings(native, forced, specs)


def test_near_misses_and_failures_are_rerun_with_the_faithful_kernel(monkeypatch):
    """What runs under which kernel: the whole batch under the screening kernel, then the rows
    that are not clearly finite (here the digit run's near miss, 2 ulps under the limit, and the
    trigger) under the native one."""
    session = Session(digit_run_model(RUN), bounds=Bounds(max_new_tokens=2),
                      screen_kernel="fp32-accumulate")
    calls: list[tuple[str, list[str]]] = []
    real_run = session.run

    def recording_run(specs, policy, bounds=None):
        calls.append((kernels.current_kernel(), [s.text for s in specs]))
        return real_run(specs, policy, bounds)

    monkeypatch.setattr(session, "run", recording_run)
    trigger, near = minimal_trigger(RUN), "0" * (RUN - 1)
    specs = [PromptSpec(t) for t in ("hello", near, trigger)]
    results = session.screen(specs, "float16", known=set())
    assert calls[0] == ("fp32-accumulate", ["hello", near, trigger])
    assert calls[1] == ("native", [near, trigger])
    assert calls[2:] == [("native", [trigger])]  # the new signature, confirmed alone
    assert [r.new for r in results] == [False, False, True]
    # Every row re-run: the screen is then the native one, verdict for verdict.
    monkeypatch.setattr(session_module, "NEAR_MISS_HEADROOM", float("inf"))
    native = Session(session.model, bounds=session.bounds, screen_kernel="native")
    again = session.screen(specs, "float16", known=set())
    for a, b in zip(again, native.screen(specs, "float16", known=set())):
        assert same(a.verdict, b.verdict)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [-1, (1, 3)])
def test_abs_max_is_abs_amax_with_nan_and_inf(dtype, dim):
    """The probe's one-pass reduction gives the values of x.abs().amax(dim).float()."""
    gen = torch.Generator().manual_seed(3)
    for trial in range(40):
        x = torch.randn(3, 4, 5, 70, generator=gen).to(dtype)
        flat = x.view(-1)
        for _ in range(trial % 5):
            i = int(torch.randint(0, flat.numel(), (1,), generator=gen))
            flat[i] = (float("nan"), float("inf"), -float("inf"))[trial % 3]
        expected, got = x.abs().amax(dim=dim).float(), abs_max(x, dim)
        assert got.dtype == torch.float32
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_tokens_is_argmax(dtype):
    """The chunked argmax of fuzz.generate on LM-head-wide rows: ties (the first index wins),
    inf, -inf and NaN rows included."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(12, 1 << 16, generator=gen).to(dtype)
    logits[1, 4464] = logits[1, 5] = logits[1].max() + 1  # a tie: index 5 wins
    logits[2, 123], logits[2, 9000] = float("inf"), float("inf")
    logits[3] = -float("inf")
    logits[4, 77], logits[4, 30000] = float("nan"), float("nan")
    logits[5, 40000], logits[5, 3] = float("nan"), float("inf")
    logits[6, -1] = logits[6].max() + 1  # in the last chunk
    logits[7] = 0.0  # every index ties
    expected = torch.argmax(logits.float(), dim=-1)
    assert torch.equal(greedy_tokens(logits), expected)
    short = logits[:, :1000]  # under ARGMAX_CHUNKED_FROM: torch's argmax itself
    assert torch.equal(greedy_tokens(short), torch.argmax(short.float(), dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_abs_max_of_long_rows_is_abs_amax(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1, 1 << 16, generator=gen).to(dtype)
    x[1, 0, 10] = float("nan")
    x[2, 0, 99] = -float("inf")
    x[3, 0, 5], x[3, 0, 6] = float("inf"), float("nan")
    x[4] = -0.0
    x[5] = -x[5].abs()  # all negative: the max |x| is -min
    expected, got = x.abs().amax(dim=-1).float(), abs_max(x, -1)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))
    assert not torch.signbit(got[4]).any()  # 0.0, as abs() gives, not -0.0
