"""Prompts screened per second on the real Gemma 3 270M, per precision policy.

Side by side, in one run, on one fixed set of varied prompts (numbers, jargon, code, other
scripts), BOS on, the default bounds (fuzz.generate.Bounds(): 16 new tokens):
  (a) the way upstream's `generate()` is used: one prompt at a time, prefill, then every decode
      step up to max_new_tokens whatever happens (a plain greedy loop over the built-in model's
      forward and KVCache, no probe, no early stop); plus upstream google/gemma_pytorch's own
      `generate()` where it is importable (it is not installed in CI);
  (b) the suite's runner: fuzz.session.Session.run (batched, KV-cached, probe on, early stop at
      EOS or at the first non-finite value) at batch 1, 8 and 16.
Also: the probe's overhead (the same batched runs with a bare forward, rec=None), and the
ceiling: useful model FLOPs per prompt against this CPU's measured matmul throughput per dtype.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _common import print_header, print_table

from fuzz.engine.config import AttentionType, GemmaConfig
from fuzz.engine.interface import Batch, prompt_batch
from fuzz.engine.upstream import upstream_available
from fuzz.engine.zoo import load_model
from fuzz.generate import Bounds, PromptSpec, encode_prompt
from fuzz.precision import POLICIES, get_policy
from fuzz.session import Session

MODEL = "gemma3-270m"

# A fixed, varied set: numbers in several forms, jargon, code, other scripts, punctuation; the
# first 8 are used by --quick. Lengths run from 4 to about 40 tokens.
PROMPTS: tuple[str, ...] = (
    "the self-attention is important for transformer because",
    "A model with 7 billion parameters uses 65504 as float16's max.",
    "def softmax(x):\n    e = np.exp(x - x.max())\n    return e / e.sum()",
    "東京の人口は約1400万人です。",
    "What is 3.141592653589793 * 2.718281828?",
    "SELECT id, COUNT(*) FROM logs WHERE ts > '2024-03-15' GROUP BY id;",
    "Гradient descent with momentum 0.9 and lr 1e-3 converged after 12,000 steps.",
    "Explain KV-cache eviction in 3 sentences.",
    "The capital of France is",
    "Q: What is 0x1F + 0b1010?\nA:",
    "αβγ δ = 6.02214076e23 mol⁻¹; ΔG = −237 kJ/mol",
    "for (int i = 0; i < 1024; ++i) { sum += a[i] * b[i]; }",
    "مرحبا بالعالم 2025",
    "RMSNorm, RoPE, GQA, SwiGLU, sliding-window attention...",
    "v2.13.0-rc1 fixed CVE-2024-3094 on 192.168.0.1:8080",
    "In 1969, Apollo 11 landed; 384,400 km away.",
)
QUICK_PROMPTS = 8
POLICY_NAMES = tuple(POLICIES)  # float32, bfloat16, float16, float16-clamp, float16-fp32-residual


# --- (a): the upstream-style loop ------------------------------------------------------------
def plain_greedy(model, ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Prefill, then every decode step to max_new_tokens, as upstream's generate() runs (argmax
    of NaN logits included: nothing is checked, nothing stops early)."""
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    logits = model(prompt_batch(torch.tensor([list(ids)])), cache)
    token = torch.argmax(logits.float(), dim=-1)
    out = [int(token)]
    for step in range(1, max_new_tokens):
        pos = len(ids) + step - 1
        batch = Batch(token_ids=token.view(1, 1), positions=torch.tensor([[pos]]),
                      slot_start=pos, key_valid=torch.ones(1, pos + 1, dtype=torch.bool),
                      key_positions=torch.arange(pos + 1).view(1, -1))
        logits = model(batch, cache)
        token = torch.argmax(logits.float(), dim=-1)
        out.append(int(token))
    return out


def time_plain(model, prompt_ids: list[list[int]], max_new_tokens: int) -> float:
    start = time.perf_counter()
    for ids in prompt_ids:
        plain_greedy(model, ids, max_new_tokens)
    return time.perf_counter() - start


def time_upstream(loaded, policy: str, texts: Sequence[str], max_new_tokens: int
                  ) -> tuple[float | None, str]:
    """Upstream's own generate(), one prompt at a time (greedy: temperature None)."""
    ok, why = upstream_available()
    if not ok:
        return None, f"upstream not importable: {why.split(';')[0]}"
    pol = get_policy(policy)
    if not pol.faithful:
        return None, "mitigation: upstream has no such policy"
    try:
        engine = loaded.engine(pol, "cpu", "upstream")
        up = engine.upstream_model
        up.generate([texts[0]], "cpu", output_len=2, temperature=None)  # warm-up
        start = time.perf_counter()
        for text in texts:
            up.generate([text], "cpu", output_len=max_new_tokens, temperature=None)
        return time.perf_counter() - start, "ok"
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
    def engine(self, policy):
        return BareForward(super().engine(policy))


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


# --- matmul throughput -------------------------------------------------------------------------
MATMUL_SHAPES = (  # (label, M, K, N): F.linear(x[M, K], W[N, K])
    ("prefill MLP (256 tok)", 256, 640, 2048),
    ("decode MLP (batch 16)", 16, 640, 2048),
    ("LM head (batch 16)", 16, 640, 262144),
    ("LM head (batch 1)", 1, 640, 262144),
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gflops(fn, flops: int, min_seconds: float = 0.3) -> float:
    fn()
    reps, start = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return flops * reps / elapsed / 1e9


def measure_matmuls() -> dict[str, float]:
    """Prints F.linear GFLOP/s per dtype and shape; returns the best per dtype."""
    print("\n## Matmul throughput of this CPU (torch F.linear, as the model computes)")
    rows, peak = [], {}
    gen = torch.Generator().manual_seed(0)
    for label, m, k, n in MATMUL_SHAPES:
        row: list[object] = [label]
        x32, w32 = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        for name, dtype in DTYPES.items():
            x, w = x32.to(dtype), w32.to(dtype)
            g = gflops(lambda x=x, w=w: F.linear(x, w), 2 * m * k * n)
            peak[name] = max(peak.get(name, 0.0), g)
            row.append(g)
        rows.append(row)
    print_table(["shape", *(f"{d} GFLOP/s" for d in DTYPES)], rows)
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


# --- the benchmark -----------------------------------------------------------------------------
@dataclass
class PolicyFigures:
    policy: str
    plain_s: float
    plain_steps: float
    upstream_s: float | None
    upstream_note: str
    batched_s: dict[int, float]
    bare_s: dict[int, float]
    steps: float  # mean forward steps per prompt in the suite's runner
    flops_plain: float  # useful FLOPs, all prompts, (a)
    flops_runner: float  # useful FLOPs, all prompts, (b)
    finite: int


def bench_policy(loaded, policy: str, texts: Sequence[str], bounds: Bounds,
                 batch_sizes: Sequence[int], bare_batches: Sequence[int]) -> PolicyFigures:
    pol = get_policy(policy)
    model = loaded.engine(pol)
    specs = [PromptSpec(t) for t in texts]
    ids = [encode_prompt(loaded.tokenizer, s, bounds) for s in specs]
    plain_greedy(model, ids[0], 2)  # warm-up: first-call allocations and kernel selection
    plain_s = time_plain(model, ids, bounds.max_new_tokens)
    upstream_s, note = time_upstream(loaded, policy, texts, bounds.max_new_tokens)
    batched, bare, verdicts = {}, {}, []
    for b in batch_sizes:
        session = Session(loaded, bounds=bounds, batch_size=b)
        session.run(specs[:1], policy)  # warm-up
        start = time.perf_counter()
        verdicts = session.run(specs, policy)
        batched[b] = time.perf_counter() - start
    for b in bare_batches:
        session = BareSession(loaded, bounds=bounds, batch_size=b)
        session.run(specs[:1], policy)
        start = time.perf_counter()
        session.run(specs, policy)
        bare[b] = time.perf_counter() - start
    config = loaded.config
    return PolicyFigures(
        policy, plain_s, float(bounds.max_new_tokens), upstream_s, note, batched, bare,
        statistics.mean(v.steps for v in verdicts),
        sum(run_flops(config, len(i), bounds.max_new_tokens) for i in ids),
        sum(run_flops(config, len(v.prompt_ids), v.steps) for v in verdicts),
        sum(v.finite for v in verdicts))


def report(figures: list[PolicyFigures], n: int, batch_sizes: Sequence[int],
           bare_batches: Sequence[int], peak: dict[str, float]) -> None:
    print(f"\n## Prompts screened per second ({n} prompts, BOS on, 16 new tokens max)")
    rows = []
    for f in figures:
        a = n / f.plain_s
        row: list[object] = [f.policy, f"{f.finite}/{n}", f.steps, a,
                             (n / f.upstream_s) if f.upstream_s else "-"]
        for b in batch_sizes:
            row += [n / f.batched_s[b]]
        best = max(batch_sizes)
        row += [(n / f.batched_s[best]) / a]
        rows.append(row)
    print_table(["policy", "finite", "steps/prompt (b)", "(a) plain loop p/s", "(a) upstream p/s",
                 *(f"(b) batch {b} p/s" for b in batch_sizes),
                 f"(b{max(batch_sizes)})/(a)"], rows)
    notes = {f.upstream_note for f in figures if f.upstream_s is None}
    for note in sorted(notes):
        print(f"(a) upstream: {note}")

    print("\n## Probe overhead: the runner with the instrumented forward vs a bare forward")
    rows = []
    for f in figures:
        for b in bare_batches:
            rows.append([f.policy, b, f.batched_s[b], f.bare_s[b], f.batched_s[b] / f.bare_s[b]])
    print_table(["policy", "batch", "probe on s", "bare s", "on / bare"], rows)

    print("\n## Ceiling: useful model FLOPs vs this CPU's measured matmul peak")
    print("Useful FLOPs = 2 x matmul parameters x tokens (qkv, o, gate/up/down per layer; the "
          "262144 x 640 LM head once per row per step, for the last token) + attention "
          "(4 x heads x head_dim x keys per token per layer); padding, norms, RoPE, softmax "
          "and the probe are not counted.")
    rows = []
    best = max(batch_sizes)
    for f in figures:
        dtype = str(get_policy(f.policy).dtype).replace("torch.", "")
        achieved_a = f.flops_plain / f.plain_s / 1e9
        achieved_b = f.flops_runner / f.batched_s[best] / 1e9
        rows.append([f.policy, f.flops_plain / n / 1e9, f.flops_runner / n / 1e9, achieved_a,
                     achieved_b, peak[dtype], f"{achieved_b / peak[dtype]:.1%}"])
    print_table(["policy", "GFLOP/prompt (a)", "GFLOP/prompt (b)", "(a) GFLOP/s",
                 f"(b{best}) GFLOP/s", "matmul peak GFLOP/s", f"(b{best}) / peak"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_PROMPTS} prompts, batches 1 and 8, policies float32, "
                             "bfloat16, float16 (~2-3 minutes)")
    parser.add_argument("--policies", default=None, help="comma-separated (default: all)")
    parser.add_argument("--model", default=MODEL,
                        help=f"zoo name (default {MODEL}; 'tiny' for a fast functional check)")
    args = parser.parse_args(argv)
    texts = PROMPTS[:QUICK_PROMPTS] if args.quick else PROMPTS
    batch_sizes = (1, 8) if args.quick else (1, 8, 16)
    bare_batches = (8,) if args.quick else (8, 16)
    policies = (args.policies.split(",") if args.policies
                else (("float32", "bfloat16", "float16") if args.quick else POLICY_NAMES))
    bounds = Bounds()
    print_header(f"throughput on {args.model}: policies {', '.join(policies)}; "
                 f"{len(texts)} prompts; batches {', '.join(map(str, batch_sizes))}; "
                 f"bounds {bounds.to_dict()}")
    start = time.perf_counter()
    loaded = load_model(args.model)
    print(f"# model loaded in {time.perf_counter() - start:.1f}s (cached dequantized weights)")
    ids = [encode_prompt(loaded.tokenizer, PromptSpec(t), bounds) for t in texts]
    print(f"# prompt lengths (tokens, BOS included): {[len(i) for i in ids]}")
    peak = measure_matmuls()
    measure_layouts()
    figures = []
    for policy in policies:
        print(f"# timing {policy} ...", flush=True)
        figures.append(bench_policy(loaded, policy, texts, bounds, batch_sizes, bare_batches))
        loaded._engines.clear()  # one cast model in memory at a time
        gc.collect()
    report(figures, len(texts), batch_sizes, bare_batches, peak)
    print(f"\n# total wall time {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
