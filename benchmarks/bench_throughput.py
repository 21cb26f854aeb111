"""Prompts screened per second on the real Gemma 3 270M without BOS, per precision policy.

Side by side, in one run, on one fixed set of varied prompts (PROMPTS: numbers, jargon, code,
other scripts; BOS off, the mode where float16 findings are), the default bounds
(fuzz.generate.Bounds(): 16 new tokens):
  (a) the way upstream's `generate()` is used: one prompt at a time, prefill, then every decode
      step up to max_new_tokens whatever happens (a plain greedy loop over the built-in model's
      forward and KVCache, no probe, no early stop); plus upstream google/gemma_pytorch's own
      `generate()` where it is importable;
  (b) the suite's runner: fuzz.session.Session.run (batched, KV-cached, probe on, early stop at
      EOS or at the first non-finite value) at several batch sizes.
Also: the probe's overhead (a bare forward, rec=None), useful model FLOPs against this CPU's
measured matmul peak per dtype, and the float16 screening kernels (fuzz.engine.kernels: native,
fp32-accumulate, fp32-accumulate-wide, and "auto" with its trial) side by side: prompts/s, the
ratio to (a), and how often the screening verdict disagrees with the faithful one (native,
alone).
`--device cuda` runs the model on a GPU (the same columns; the screening kernels are the CPU's
and are left out): where float16 products are fast, which decides whether float16 screening can
reach 5x the plain loop (on a CPU without avx512_fp16 the plain loop already runs at about half
of float16's matmul peak, benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from _common import print_header, print_table

from fuzz.engine.config import AttentionType, GemmaConfig
from fuzz.engine.interface import Batch, prompt_batch
from fuzz.engine.kernels import KERNELS, kernel
from fuzz.engine.upstream.engine import upstream_available
from fuzz.engine.zoo import load_model
from fuzz.generate import encode_prompt
from fuzz.precision import get_policy
from fuzz.session import Session, resolve_device
from fuzz.verdict import Bounds, PromptSpec, Signature, Verdict

MODEL = "gemma3-270m"

# The throughput set, BOS off: 64 varied prompts of 4-40 tokens (prose, questions, ML jargon,
# numbers, code, JSON/HTML/URLs, 9 other scripts). Chosen from 120 hand-written candidates
# (PROMPTS + EXTRA_PROMPTS) so that the set mostly runs the full 16 steps in float16 without BOS
# (on an avx512_fp16 CPU, alone and at batch 64 alike): 58 stay finite for 16 steps, 3 overflow
# only at a decode step (steps 9-13) and 3 stop at EOS within 3 steps; the 27 candidates that
# overflow in the prefill are left to EXTRA_PROMPTS, since a prompt that dies at step 0 measures
# a prefill, not screening. The first 32 are --quick's.
PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Explain KV-cache eviction in 3 sentences.",
    "Why is the sky blue? Answer briefly.",
    "My favourite recipe for pancakes starts with",
    "Translate to German: the weather is nice today.",
    "List three reasons to learn a second language:",
    "Once upon a time, in a village by the sea,",
    "Dear team, thank you for the great work on the release.",
    "What are the main causes of inflation?",
    "The mitochondria is the powerhouse of the cell because",
    "the self-attention is important for transformer because",
    "Gradient checkpointing trades compute for memory by",
    "The learning rate warmup schedule was linear for the first",
    "Beam search versus greedy decoding: which is better for",
    "A model with 7 billion parameters uses 65504 as float16's max.",
    "What is 3.141592653589793 * 2.718281828?",
    "In 1969, Apollo 11 landed; 384,400 km away.",
    "Temperature dropped from 21.5°C to -3.2°C overnight.",
    "Gradient descent with momentum 0.9 and lr 1e-3 converged after 12,000 steps.",
    "v2.13.0-rc1 fixed CVE-2024-3094 on 192.168.0.1:8080",
    "def softmax(x):\n    e = np.exp(x - x.max())\n    return e / e.sum()",
    "import torch\nmodel = torch.nn.Linear(640, 2048)",
    "<html><body><h1>Hello</h1></body></html>",
    "fn main() { println!(\"hello, world\"); }",
    "git commit -m \"fix: handle empty input\"",
    "{\"name\": \"gemma\", \"layers\": 18, \"hidden\": 640}",
    "public static void main(String[] args) {",
    "東京の人口は約1400万人です。",
    "مرحبا بالعالم 2025",
    "Καλημέρα, τι κάνεις σήμερα;",
    "नमस्ते, आप कैसे हैं?",
    "今天天气很好，我们去公园散步吧。",
    "¿Dónde está la biblioteca más cercana?",
    "Ça va très bien, merci beaucoup !",
    "Hello!!! Are you there??? ... hello?",
    "TODO: refactor this (see issue #1234) -- urgent!",
    "The quick brown fox jumps over the lazy dog.",
    "User: hi\nAssistant: hello, how can I help?",
    "Roses are red, violets are blue,",
    "Chapter 3 - The Return of the King",
    "A: yes; B: no; C: maybe; D: all of the above",
    "https://example.com/path?query=1&lang=en",
    "Monday, Tuesday, Wednesday, Thursday, Friday",
    "#include <stdio.h>\nint main(void) { return 0; }",
    "The meeting is moved to 3:30 PM in room B-204.",
    "An apple a day keeps the doctor away.",
    "Photosynthesis converts light energy into chemical energy.",
    "The stock rose 3.7% to close at $182.45.",
    "Keep calm and carry on.",
    "H2O + CO2 -> H2CO3 (carbonic acid)",
    "The train departs at 07:45 from platform 9.",
    "Error 404: page not found.",
    "1, 1, 2, 3, 5, 8, 13, 21, 34, 55",
    "Newton's second law states that F = ma.",
    "Once the build finishes, run the tests with pytest -q.",
    "How do airplanes stay in the air?",
    "The best way to learn programming is",
    "What is the boiling point of water at sea level?",
    "Tell me a short story about a robot who learns to paint.",
    "The history of the Roman Empire began",
    "A good night's sleep helps the brain",
    "Convert 5 miles to kilometers.",
    "Version 3.11.7 of Python was released in December.",
    "The recipe needs 250 g flour, 2 eggs and 100 ml milk.",
)
# The other 56 candidates: with PROMPTS, the screening-kernel comparison's set (120 prompts, 32
# non-finite in float16 without BOS), so that disagreements on findings can show.
EXTRA_PROMPTS: tuple[str, ...] = (
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "Summarize the plot of Hamlet in one paragraph.",
    "RMSNorm, RoPE, GQA, SwiGLU, sliding-window attention...",
    "Mixed precision training keeps a master copy of weights in",
    "The invoice total was $1,234.56 due on 2024-07-01.",
    "Call me at +1 (555) 010-9999 after 6pm.",
    "Population: 8,045,311,447 people as of 2023.",
    "The answer is 42, but the question is unknown.",
    "for (int i = 0; i < 1024; ++i) { sum += a[i] * b[i]; }",
    "SELECT id, COUNT(*) FROM logs WHERE ts > '2024-03-15' GROUP BY id;",
    "SELECT name FROM users ORDER BY created_at DESC LIMIT 10;",
    "Привет, как дела? Сегодня хорошая погода.",
    "αβγ δ = 6.02214076e23 mol⁻¹; ΔG = −237 kJ/mol",
    "안녕하세요, 만나서 반갑습니다.",
    "Q: What is 0x1F + 0b1010?\nA:",
    "Step 1: open the box. Step 2: remove the cover.",
    "Name: Ada Lovelace; Born: 10 December 1815; Field: mathematics",
    "e^(i*pi) + 1 = 0 is Euler's identity.",
    "Warning: low battery (5%). Connect charger.",
    "Please rate this product from 1 to 5 stars:",
    "Shakespeare wrote 37 plays and 154 sonnets.",
    "I think, therefore I am.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "What's the difference between a list and a tuple in Python?",
    "Bonjour tout le monde, je m'appelle Claude.",
    "Describe the smell of rain in two sentences.",
    "Give me a fun fact about octopuses.",
    "Solve for x: 2x + 3 = 11",
    "class Node:\n    def __init__(self, value):\n        self.value = value",
    "console.log([1, 2, 3].map(x => x * 2));",
    "docker run -p 8080:80 nginx",
    "while True:\n    pass",
    "Das ist ein schöner Tag am See.",
    "Questo è un esempio di testo italiano.",
    "Olá, tudo bem com você?",
    "Merhaba, nasılsın?",
    "שלום עולם",
    "Xin chào, bạn khỏe không?",
    "The weather forecast says rain tomorrow, so",
    "Attention is all you need, said the paper in 2017.",
    "Neural networks learn representations of data.",
    "The function returns None if the list is empty.",
    "Thank you for your order! It will ship soon.",
    "The price of gold reached a record high this week.",
    "Mount Everest is 8,849 meters tall.",
    "Water freezes at 0 degrees Celsius.",
    "Cats sleep for about 13 to 16 hours a day.",
    "She sells sea shells by the sea shore.",
    "To be or not to be, that is the question.",
    "The library opens at nine and closes at five.",
    "Can you recommend a good science fiction book?",
    "My password must contain at least 8 characters.",
    "Please summarize the following article:",
    "Data: [3, 1, 4, 1, 5, 9, 2, 6]",
    "A triangle has three sides and three angles.",
    "Matrix multiplication is associative but not commutative.",
)
QUICK_PROMPTS = 32
PLAIN_PROMPTS = 16  # (a) is timed on the first 16 (--quick: 8): its cost per prompt is fixed
DTYPE_POLICIES = ("float32", "bfloat16", "float16")
BATCHES = (8, 16, 32, 64)
QUICK_BATCHES = (8, 32)
# Every prompts/s figure is the best of this many timed runs (the matmul peaks are best-of too:
# `gflops` loops for >= 0.3 s). On the 2-core VM one run of the same batch of 64 float32 prompts
# took 13.5 s in one benchmark and 9.3-10.5 s in six runs a few minutes later (2026-12-06).
REPEATS = 2


# --- (a): the upstream-style loop ------------------------------------------------------------
def plain_greedy(model, ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Prefill, then every decode step to max_new_tokens, as upstream's generate() runs (argmax
    of NaN logits included: nothing is checked, nothing stops early)."""
    device = model.device
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    logits = model(prompt_batch(torch.tensor([list(ids)], device=device)), cache)
    token = torch.argmax(logits.float(), dim=-1)
    out = [int(token)]
    for step in range(1, max_new_tokens):
        pos = len(ids) + step - 1
        batch = Batch(token_ids=token.view(1, 1), positions=torch.tensor([[pos]], device=device),
                      slot_start=pos,
                      key_valid=torch.ones(1, pos + 1, dtype=torch.bool, device=device),
                      key_positions=torch.arange(pos + 1, device=device).view(1, -1))
        logits = model(batch, cache)
        token = torch.argmax(logits.float(), dim=-1)
        out.append(int(token))
    return out


def best_of(fn, repeats: int = REPEATS) -> float:
    """The least wall time of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_plain(model, prompt_ids: list[list[int]], max_new_tokens: int) -> float:
    def loop() -> None:
        for ids in prompt_ids:
            plain_greedy(model, ids, max_new_tokens)  # int(token) waits for each step's argmax
    return best_of(loop)


def time_upstream(loaded, policy: str, texts: Sequence[str], max_new_tokens: int,
                  device: str = "cpu") -> tuple[float | None, str]:
    """Upstream's own generate(), one prompt at a time (greedy: temperature None). Upstream's
    generate() always prepends BOS (its tokenizer encodes with bos=True): its prompts are one
    token longer than the no-BOS ones the other columns run."""
    ok, why = upstream_available()
    if not ok:
        return None, f"upstream not importable: {why.split(';')[0]}"
    pol = get_policy(policy)
    if not pol.faithful:
        return None, "mitigation: upstream has no such policy"
    try:
        engine = loaded.engine(pol, device, "upstream")
        up = engine.upstream_model
        up.generate([texts[0]], device, output_len=2, temperature=None)  # warm-up

        def loop() -> None:
            for text in texts:
                up.generate([text], device, output_len=max_new_tokens, temperature=None)
            synchronize(device)
        return best_of(loop), "ok"
    except Exception as err:  # report, do not abort the other figures
        return None, f"upstream generate() failed: {type(err).__name__}: {err}"


# --- (b) with a bare forward: the probe's overhead ---------------------------------------------
class BareForward:
    """The engine with rec=None inside the forward. To keep fuzz.generate's loop (and its early
    stop) intact, only the logits' max |x| is reported, as a [B, T] table of which the last
    column is real: so the difference to the instrumented run is the per-site reductions in
    the forward and the size of the per-step table."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.config = inner.config
        self.supports_padding = getattr(inner, "supports_padding", True)

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def new_cache(self, batch: int, max_len: int):
        return self.inner.new_cache(batch, max_len)

    def __call__(self, batch: Batch, cache, rec=None, last_only: bool = True) -> torch.Tensor:
        logits = self.inner(batch, cache, None, last_only)
        if rec is not None:
            b, t = batch.token_ids.shape
            table = torch.zeros(b, t, 1, dtype=torch.float32, device=logits.device)
            table[:, -1, 0] = logits.float().abs().amax(dim=-1)
            rec.site(self.config.num_hidden_layers, "logits", table)
        return logits


class BareSession(Session):
    def engine(self, policy, device: str | None = None):
        return BareForward(super().engine(policy, device))


# --- FLOPs -------------------------------------------------------------------------------------
def matmul_params(config: GemmaConfig) -> tuple[int, int]:
    """(parameters in one layer's matmuls, parameters in the LM head)."""
    h, d = config.hidden_size, config.head_dim
    qkv = h * (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    o = config.num_attention_heads * d * h
    mlp = 3 * h * config.intermediate_size
    return qkv + o + mlp, config.vocab_size * h


def token_flops(config: GemmaConfig, position: int, with_head: bool) -> int:
    """Useful FLOPs (multiply-add = 2) of one token at `position`: 2 * matmul params, plus
    attention (q k^T and p v: 4 * heads * head_dim * keys per layer), plus the LM head when the
    token's logits are computed (the runner computes them for each row's last token only)."""
    per_layer, head = matmul_params(config)
    flops = 2 * per_layer * config.num_hidden_layers + (2 * head if with_head else 0)
    for i in range(config.num_hidden_layers):
        keys = position + 1
        if config.attn_type(i) == AttentionType.LOCAL_SLIDING and config.sliding_window_size:
            keys = min(keys, config.sliding_window_size)
        flops += 4 * config.num_attention_heads * config.head_dim * keys
    return flops


def run_flops(config: GemmaConfig, prompt_len: int, steps: int) -> int:
    """A prefill of prompt_len tokens (logits for the last) and steps - 1 decode tokens."""
    flops = sum(token_flops(config, p, p == prompt_len - 1) for p in range(prompt_len))
    flops += sum(token_flops(config, prompt_len + s - 1, True) for s in range(1, steps))
    return flops


def verdict_flops(config: GemmaConfig, verdicts: Sequence[Verdict]) -> int:
    return sum(run_flops(config, len(v.prompt_ids), v.steps) for v in verdicts)


# --- matmul throughput -------------------------------------------------------------------------
MATMUL_SHAPES = (  # (label, M, K, N): F.linear(x[M, K], W[N, K])
    ("prefill MLP (256 tok)", 256, 640, 2048),
    ("decode MLP (batch 16)", 16, 640, 2048),
    ("decode MLP (batch 64)", 64, 640, 2048),
    ("LM head (batch 16)", 16, 640, 262144),
    ("LM head (batch 64)", 64, 640, 262144),
    ("LM head (batch 1)", 1, 640, 262144),
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synchronize(device: str) -> None:
    """Waits for a GPU's queued work (a CPU's ops are synchronous), so that a timer reads it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def gflops(fn, flops: int, min_seconds: float = 0.3, device: str = "cpu") -> float:
    fn()
    synchronize(device)
    reps, start = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return flops * reps / elapsed / 1e9


def measure_matmuls(device: str = "cpu") -> dict[str, float]:
    """Prints F.linear GFLOP/s per dtype and shape (and float16 through fp32-accumulate, the
    weight's float32 copy made beforehand as fuzz.engine.kernels caches it); returns the best
    per dtype: the peak the runner is measured against."""
    print(f"\n## Matmul throughput of this {device.split(':')[0].upper()} (torch F.linear, as "
          "the model computes)")
    rows, peak = [], {}
    gen = torch.Generator().manual_seed(0)
    for label, m, k, n in MATMUL_SHAPES:
        row: list[object] = [label]
        x32 = torch.randn(m, k, generator=gen).to(device)
        w32 = torch.randn(n, k, generator=gen).to(device)
        for name, dtype in DTYPES.items():
            x, w = x32.to(dtype), w32.to(dtype)
            g = gflops(lambda x=x, w=w: F.linear(x, w), 2 * m * k * n, device=device)
            peak[name] = max(peak.get(name, 0.0), g)
            row.append(g)
        xh, wh32 = x32.half(), w32.half().float()
        row.append(gflops(lambda xh=xh, wh32=wh32: F.linear(xh.float(), wh32).half(),
                          2 * m * k * n, device=device))
        rows.append(row)
    print_table(["shape", *(f"{d} GFLOP/s" for d in DTYPES), "float16 fp32-accumulate"], rows)
    return peak


def measure_layouts() -> None:
    """The layouts that matter for float16 on this CPU (one call each; they can be slow)."""
    print("\n## Matmul layout (one call each, ms): F.linear(h, W) vs h @ W.t() (a transposed "
          "view) vs h @ Wt (a contiguous [K, N] copy)")
    rows = []
    gen = torch.Generator().manual_seed(0)
    for label, shape, n in (("decode MLP, h [16,1,640], W [2048,640]", (16, 1, 640), 2048),
                            ("LM head, h [16,1,640], E [262144,640]", (16, 1, 640), 262144)):
        h32, w32 = torch.randn(*shape, generator=gen), torch.randn(n, 640, generator=gen)
        for name, dtype in DTYPES.items():
            h, w = h32.to(dtype), w32.to(dtype)
            wt = w.t().contiguous()
            times = []
            for fn in (lambda h=h, w=w: F.linear(h, w), lambda h=h, w=w: h @ w.t(),
                       lambda h=h, wt=wt: h @ wt):
                fn()
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            rows.append([label, name, *times, times[2] / times[0]])
            del wt
    print_table(["shape", "dtype", "F.linear ms", "h @ W.t() ms", "h @ Wt ms",
                 "Wt / linear"], rows)


# --- the runner --------------------------------------------------------------------------------
@dataclass
class PolicyFigures:
    policy: str
    n: int
    n_plain: int
    plain_s: float
    upstream_s: float | None
    upstream_note: str
    batched_s: dict[int, float]
    bare_s: dict[int, float]
    steps: float  # mean forward steps per prompt in the suite's runner
    flops_plain: float  # useful FLOPs of (a)'s prompts
    flops_runner: float  # useful FLOPs, all prompts, (b)
    finite: int
    finite16: int  # finite after the full 16 steps

    @property
    def best(self) -> int:
        """The batch size of the fastest runner."""
        return min(self.batched_s, key=self.batched_s.__getitem__)


def timed_run(session: Session, specs: list[PromptSpec], policy: str
              ) -> tuple[float, list[Verdict]]:
    """The best of REPEATS runs of every prompt (after a warm-up: first-call allocations,
    kernel selection), and the verdicts."""
    session.run(specs[:2], policy)
    runs: list[list[Verdict]] = []
    seconds = best_of(lambda: runs.append(session.run(specs, policy)))
    return seconds, runs[-1]


def bench_policy(loaded, policy: str, specs: list[PromptSpec], n_plain: int, bounds: Bounds,
                 batch_sizes: Sequence[int], device: str = "cpu") -> PolicyFigures:
    pol = get_policy(policy)
    model = loaded.engine(pol, device)
    ids = [encode_prompt(loaded.tokenizer, s, bounds) for s in specs[:n_plain]]
    plain_greedy(model, ids[0], 2)  # warm-up: first-call allocations and kernel selection
    plain_s = time_plain(model, ids, bounds.max_new_tokens)
    upstream_s, note = time_upstream(loaded, policy, [s.text for s in specs[:n_plain]],
                                     bounds.max_new_tokens, device)
    batched, verdicts = {}, []
    for b in batch_sizes:
        batched[b], verdicts = timed_run(
            Session(loaded, device=device, bounds=bounds, batch_size=b, screen_kernel="native"),
            specs, policy)
    best = min(batched, key=batched.__getitem__)
    bare_s, _ = timed_run(BareSession(loaded, device=device, bounds=bounds, batch_size=best),
                          specs, policy)
    config = loaded.config
    return PolicyFigures(
        policy, len(specs), n_plain, plain_s, upstream_s, note, batched, {best: bare_s},
        statistics.mean(v.steps for v in verdicts),
        sum(run_flops(config, len(i), bounds.max_new_tokens) for i in ids),
        verdict_flops(config, verdicts), sum(v.finite for v in verdicts),
        sum(v.finite and v.steps == bounds.max_new_tokens for v in verdicts))


def report(figures: list[PolicyFigures], batch_sizes: Sequence[int],
           peak: dict[str, float]) -> None:
    f0 = figures[0]
    print(f"\n## Prompts screened per second ({f0.n} prompts, BOS off, 16 new tokens max; "
          f"(a) on the first {f0.n_plain})")
    rows = []
    for f in figures:
        a = f.n_plain / f.plain_s
        dtype = str(get_policy(f.policy).dtype).replace("torch.", "")
        useful = f.flops_runner / f.batched_s[f.best] / 1e9
        rows.append([f.policy, f"{f.finite}/{f.n} ({f.finite16} to 16)", f.steps, a,
                     (f.n_plain / f.upstream_s) if f.upstream_s else "-",
                     *(f.n / f.batched_s[b] for b in batch_sizes),
                     f"**{(f.n / f.batched_s[f.best]) / a:.2f}** (b{f.best})",
                     f"{useful:.0f} = **{useful / peak[dtype]:.1%}** of {peak[dtype]:.0f}"])
    print_table(["policy", "finite", "steps/prompt (b)", "(a) plain loop p/s",
                 "(a) upstream generate() p/s", *(f"(b) batch {b} p/s" for b in batch_sizes),
                 "(b best)/(a)", "(b best) useful GFLOP/s vs matmul peak"], rows)
    for note in sorted({f.upstream_note for f in figures if f.upstream_s is None}):
        print(f"(a) upstream: {note}")
    print("Useful FLOPs = 2 x matmul parameters x tokens (qkv, o, gate/up/down per layer; the "
          "262144 x 640 LM head once per row per step, for the last token) + attention "
          "(4 x heads x head_dim x keys per token per layer); padding, norms, RoPE, softmax "
          "and the probe are not counted. Peak: the best F.linear GFLOP/s of the shapes above.")
    rows = []
    for f in figures:
        rows += [[f.policy, b, f.batched_s[b], f.bare_s[b], f.batched_s[b] / f.bare_s[b]]
                 for b in f.bare_s]
    print("\n## Probe overhead at the best batch: instrumented forward vs a bare forward")
    print_table(["policy", "batch", "probe on s", "bare s", "on / bare"], rows)
    rows = []
    for f in figures:
        rows.append([f.policy, f.flops_plain / f.n_plain / 1e9, f.flops_runner / f.n / 1e9,
                     f.flops_plain / f.plain_s / 1e9])
    print_table(["policy", "GFLOP/prompt (a)", "GFLOP/prompt (b)", "(a) GFLOP/s"], rows)


# --- the float16 screening kernels -------------------------------------------------------------
@dataclass
class KernelFigures:
    label: str
    seconds: float
    verdicts: list[Verdict]
    runs: int = 0  # prompts run (screen: the screening pass plus every faithful re-run)
    notes: list[str] = field(default_factory=list)


def where(v: Verdict) -> tuple | None:
    f = v.first_nonfinite
    return None if f is None else (f.step, f.layer, f.site, f.position)


def disagreement(verdicts: Sequence[Verdict], faithful: Sequence[Verdict]) -> tuple[int, int, int]:
    """(finite/non-finite differs, first site differs among both non-finite, faithful
    non-finite but screened finite: a missed finding)."""
    status = sum(v.nonfinite != f.nonfinite for v, f in zip(verdicts, faithful))
    site = sum(v.nonfinite and f.nonfinite and where(v) != where(f)
               for v, f in zip(verdicts, faithful))
    missed = sum(f.nonfinite and not v.nonfinite for v, f in zip(verdicts, faithful))
    return status, site, missed


class CountingSession(Session):
    """Counts the prompts each screen runs (the screening pass and the faithful re-runs)."""

    runs: int = 0

    def run(self, specs, policy, bounds=None):
        self.runs += len(specs)
        return super().run(specs, policy, bounds)

    def screen_all(self, specs, policy, known):
        """One screen per batch, as a fuzz run makes them (one per Hypothesis example)."""
        return [r for i in range(0, len(specs), self.batch_size)
                for r in self.screen(specs[i:i + self.batch_size], policy, known)]


def bench_screen_kernels(loaded, specs: list[PromptSpec], batch: int, bounds: Bounds,
                         plain_ps: float | None) -> None:
    policy = "float16"
    print(f"\n## float16 screening kernels ({len(specs)} prompts, BOS off, batch {batch}): "
          "prompts/s and disagreement with the faithful verdict (native, alone)")
    alone = Session(loaded, bounds=bounds, batch_size=1, screen_kernel="native")
    start = time.perf_counter()
    faithful = alone.run(specs, policy)
    alone_s = time.perf_counter() - start
    # Signatures the faithful runs found count as known: as in a fuzz run, where nearly every
    # failing prompt hits a known signature, the screens then confirm nothing alone and the
    # figures are the screening cost (a new signature costs one alone run under either kernel).
    known: set[Signature] = {alone.signature(v) for v in faithful if v.nonfinite}
    results = [KernelFigures("native, alone (the faithful verdict)", alone_s, faithful,
                             len(specs))]
    for name in KERNELS:
        session = Session(loaded, bounds=bounds, batch_size=batch, screen_kernel="native")
        with kernel(name):
            seconds, verdicts = timed_run(session, specs, policy)
        results.append(KernelFigures(f"{name}, batched: Session.run", seconds, verdicts,
                                     len(specs)))
    for name in (*KERNELS, "auto"):
        counting = CountingSession(loaded, bounds=bounds, batch_size=batch, screen_kernel=name)
        if name != "auto":  # auto's trial starts cold, as in a run: its cost is counted
            counting.screen(specs[:2], policy, known)  # warm-up
        counting.runs = 0
        start = time.perf_counter()
        screened = counting.screen_all(specs, policy, known)
        seconds = time.perf_counter() - start
        label = f"{name}: Session.screen (with its faithful re-runs)"
        if name == "auto":
            trial = counting.kernel_trial()
            label = (f"auto: Session.screen, its trial included (picked {trial.choice}, "
                     f"{trial.speedup:.2f}x, after {trial.screens} batches)")
        results.append(KernelFigures(label, seconds, [r.verdict for r in screened],
                                     counting.runs))
    n_bad = sum(v.nonfinite for v in faithful)
    rows = []
    for r in results:
        status, site, missed = disagreement(r.verdicts, faithful)
        ratio = f"{len(specs) / r.seconds / plain_ps:.2f}x" if plain_ps else "-"
        rows.append([r.label, len(specs) / r.seconds, ratio, r.runs,
                     sum(v.nonfinite for v in r.verdicts),
                     f"{status} ({status / len(specs):.1%})",
                     f"{site} of {min(n_bad, sum(v.nonfinite for v in r.verdicts))}",
                     missed])
    print_table(["kernel", "p/s", "vs (a) plain loop", "prompts run", "non-finite",
                 "finite/non-finite differs",
                 "first site differs", "missed findings"], rows)
    print(f"The faithful verdicts: {n_bad}/{len(specs)} non-finite. 'first site differs': among "
          "prompts non-finite in both (step, layer, site, position). A screen's non-finite "
          "verdicts and its near misses (headroom < fuzz.session.NEAR_MISS_HEADROOM) are "
          "re-run natively, so it can only miss a finding the screening kernel ran clearly "
          "finite; only its disagreements on first sites are batch-vs-alone rounding, which "
          "Session.screen resolves alone for every new signature.")


def runnable(loaded, texts: Sequence[str], bounds: Bounds) -> list[PromptSpec]:
    """The prompts, BOS off, that fit the token bound (all of them on Gemma 3 270M; the tiny
    models' byte-level tokenizer makes some other-script prompts too long)."""
    session = Session(loaded, bounds=bounds)
    specs = [PromptSpec(t, add_bos=False) for t in texts]
    kept = [s for s in specs if session.runnable(s)]
    if len(kept) < len(specs):
        print(f"# {len(specs) - len(kept)} prompts over the {bounds.max_prompt_tokens}-token "
              "bound on this tokenizer left out")
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_PROMPTS} prompts, batches "
                             f"{', '.join(map(str, QUICK_BATCHES))}, no layout table, the "
                             "screening kernels on 48 prompts (~3 minutes)")
    parser.add_argument("--policies", default=",".join(DTYPE_POLICIES),
                        help="comma-separated (default: %(default)s; the mitigations run too "
                             "when named)")
    parser.add_argument("--batches", default=None,
                        help=f"comma-separated batch sizes (default "
                             f"{','.join(map(str, BATCHES))})")
    parser.add_argument("--model", default=MODEL,
                        help=f"zoo name (default {MODEL}; 'tiny' for a fast functional check)")
    parser.add_argument("--no-screen-kernels", action="store_true",
                        help="skip the float16 screening-kernel comparison")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda or cuda:N: where the model runs (the "
                             "screening kernels are the CPU's: skipped on a GPU)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    texts = PROMPTS[:QUICK_PROMPTS] if args.quick else PROMPTS
    screen_texts = (PROMPTS[:24] + EXTRA_PROMPTS[:24]) if args.quick else PROMPTS + EXTRA_PROMPTS
    batch_sizes = (tuple(int(b) for b in args.batches.split(",")) if args.batches
                   else QUICK_BATCHES if args.quick else BATCHES)
    n_plain = PLAIN_PROMPTS // 2 if args.quick else PLAIN_PROMPTS
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bounds = Bounds()
    print_header(f"throughput on {args.model} ({device}), BOS off: policies "
                 f"{', '.join(policies)}; "
                 f"{len(texts)} prompts; batches {', '.join(map(str, batch_sizes))}; "
                 f"bounds {bounds.to_dict()}")
    start = time.perf_counter()
    loaded = load_model(args.model)
    print(f"# model loaded in {time.perf_counter() - start:.1f}s (cached dequantized weights)")
    specs = runnable(loaded, texts, bounds)
    lengths = [len(encode_prompt(loaded.tokenizer, s, bounds)) for s in specs]
    print(f"# prompt lengths (tokens, no BOS): {min(lengths)}-{max(lengths)}, mean "
          f"{statistics.mean(lengths):.1f}")
    peak = measure_matmuls(device)
    if not args.quick and device == "cpu":
        measure_layouts()
    figures = []
    for policy in policies:
        print(f"# timing {policy} ...", flush=True)
        figures.append(bench_policy(loaded, policy, specs, n_plain, bounds, batch_sizes,
                                    device))
        loaded._engines.clear()  # one cast model in memory at a time
        gc.collect()
    report(figures, batch_sizes, peak)
    if not args.no_screen_kernels and device == "cpu":
        f16 = next((f for f in figures if f.policy == "float16"), None)
        best = f16.best if f16 else max(batch_sizes)
        bench_screen_kernels(loaded, runnable(loaded, screen_texts, bounds), best, bounds,
                             f16.n_plain / f16.plain_s if f16 else None)
    print(f"\n# total wall time {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
