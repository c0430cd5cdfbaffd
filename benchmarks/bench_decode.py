"""Batched decoding: tokens/s at batch 1 / 8 / 64 / 256 side by side, and generate's compile time.

    PYTHONPATH=. python benchmarks/bench_decode.py               # scaling with the batch
    PYTHONPATH=. python benchmarks/bench_decode.py --compile     # cold vs warm persistent cache
    PYTHONPATH=. python benchmarks/bench_decode.py --naive       # also the KV cache vs re-encoding
    PYTHONPATH=. python benchmarks/bench_decode.py --parts       # where one decode step's time goes

Scaling: every batch size decodes greedily, with no stop tokens (so every row runs max_new_tokens),
prompts of 16-48 tokens, on a ~1M-parameter model. Rounds are interleaved (batch 1, 8, 64, 256,
then again) so that load from other processes falls on every size alike; each round times enough
calls to decode at least 256 rows. Prints min/median/max tokens/s (new tokens only, prefill
included in the time) and the median's ratio to batch 1.

Parts: one decode step at each batch size (the model called on one token with a KV cache of 48 + 64 slots,
as the decode loop calls it), beside its two big parts timed alone with the same shapes: the matmuls of
every layer and the vocabulary projection (on [B, d] activations), and the cached attention of every layer
(model.cached_attention: the cache write and both attention matmuls). Per-step microseconds, medians of
--rounds; the last column is the tokens/s the step allows. A part's time alone bounds what batching can
reach: at batch 256 the attention reads the whole float32 cache of every layer each step.

Compile: per round and mode, two fresh processes on one empty persistent cache directory (the way
pipeline.setup_jax enables it), "cold" then "warm"; each times its first generate_ids call (trace +
compile or cache load + run) and its second (run only); compile = first - second. Modes: "xla-only"
(XLA's compiled code cached, the decode traced and lowered again) and "saved" (the decode's compiled
executable saved whole and loaded without tracing, ``mlflow_tunix.aot``: generate now).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlflow_tunix.generate import generate_ids
from mlflow_tunix.model import ModelConfig, build_model, param_count

PAD = 0
CONFIG = ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, d_ff=384, max_seq_len=256)


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(1, CONFIG.vocab_size, rng.randint(16, 49)).tolist() for _ in range(n)]


def naive_generate(state, forward, prompts, max_new_tokens):
    """Greedy decoding without a cache: the whole left-padded sequence goes through the model each step."""
    longest = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), longest), PAD, np.int32)
    mask = np.zeros_like(tokens, bool)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p) :] = p
        mask[i, longest - len(p) :] = True
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    for _ in range(max_new_tokens):
        next_token = forward(state, tokens, mask)
        tokens = jnp.concatenate([tokens, next_token[:, None]], axis=1)
        mask = jnp.concatenate([mask, jnp.ones((len(prompts), 1), bool)], axis=1)
    return np.asarray(tokens[:, longest:]).tolist()


def scaling(args) -> dict:
    model = build_model(dataclasses.replace(CONFIG, n_layers=args.layers), seed=0)
    prompts = make_prompts(max(args.batches))
    print(f"model: {param_count(model):,} params; {args.new_tokens} new tokens, prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, {os.cpu_count()} cpus; load average {os.getloadavg()[0]:.2f}")

    def run(batch: int, calls: int):
        for c in range(calls):
            chunk = prompts[(c * batch) % len(prompts) :][:batch]
            generate_ids(model, chunk, max_new_tokens=args.new_tokens, pad_id=PAD, stop_ids=[], batch_size=batch)

    calls = {b: max(1, 256 // b) for b in args.batches}
    for b in args.batches:  # warm-up: compiles every prompt bucket each size meets
        run(b, calls[b])
    rates = {b: [] for b in args.batches}
    for _ in range(args.rounds):
        for b in args.batches:
            start = time.perf_counter()
            run(b, calls[b])
            rates[b].append(b * calls[b] * args.new_tokens / (time.perf_counter() - start))
    base = statistics.median(rates[args.batches[0]])
    result = {}
    for b in args.batches:
        med = statistics.median(rates[b])
        result[b] = {"min": min(rates[b]), "median": med, "max": max(rates[b]), "ratio": med / base}
        print(f"batch {b:>4}: tokens/s median {med:>9,.0f}  (min {min(rates[b]):,.0f}, max {max(rates[b]):,.0f})"
              f"  x{med / base:.2f} batch {args.batches[0]}")

    if args.naive:
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, tokens, mask):
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
            logits = nnx.merge(graphdef, state)(tokens, positions, kv_mask=mask)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

        batch = prompts[:32]
        kv = lambda: generate_ids(model, batch, max_new_tokens=args.new_tokens, pad_id=PAD, stop_ids=[], batch_size=32)
        naive = lambda: naive_generate(state, forward, batch, args.new_tokens)
        print(f"batch 32, KV cache and naive re-encoding decode the same tokens: {kv() == naive()}")
        times = {"kv": [], "naive": []}
        for _ in range(args.rounds):
            for name, fn in (("kv", kv), ("naive", naive)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        speedup = statistics.median(times["naive"]) / statistics.median(times["kv"])
        print(f"speed-up of the KV cache over naive re-encoding (batch 32): {speedup:.1f}x")
        result["kv_vs_naive"] = speedup
    return result


def parts(args) -> dict:
    from mlflow_tunix.model import cached_attention

    config = dataclasses.replace(CONFIG, n_layers=args.layers)
    model = build_model(config, seed=0)
    graphdef, state = nnx.split(model)
    d, f, L, H, K, Dh = (config.d_model, config.d_ff, config.n_layers, config.n_heads, config.n_kv_heads,
                         config.head_dim)
    P, S = 48, 48 + args.new_tokens
    print(f"model: {param_count(model):,} params, {L} layers; a KV cache of {S} slots (prompt {P} + {args.new_tokens})")

    n = args.new_tokens  # every part runs n times inside one while loop, as the decode loop runs its step

    @jax.jit
    def step(state, token, cache, kv_mask):  # n decode steps, as generate's loop makes them
        model = nnx.merge(graphdef, state)

        def body(i, carry):
            token, cache = carry
            logits, cache = model(token, jnp.full(token.shape, P, jnp.int32) + i, cache=cache, cache_index=P + i,
                                  kv_mask=kv_mask)
            return jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32), cache

        return jax.lax.fori_loop(0, n, body, (token, cache))[0]

    @jax.jit
    def matmuls(x, ws, emb):  # the same matmuls on [B, d]: q, k, v, o, gate, up, down per layer, then the vocabulary
        def body(i, x):
            for wq, wk, wv, wo, w1, w3, w2 in ws:
                x = x + ((x @ wq) + jnp.pad(x @ wk, ((0, 0), (0, d - wk.shape[1])))
                         + jnp.pad(x @ wv, ((0, 0), (0, d - wv.shape[1])))) @ wo
                x = x + (jax.nn.silu(x @ w1) * (x @ w3)) @ w2
            return x + (x @ emb.T)[:, :d] * 1e-3
        return jax.lax.fori_loop(0, n, body, x)

    @jax.jit
    def attention(q, kv, caches, mask):  # every layer's cached attention (write, scores, softmax, values)
        def body(i, carry):
            q, caches = carry
            new = []
            for cache in caches:
                q, cache = cached_attention(q, kv, kv, mask, cache, P + i)
                new.append(cache)
            return q, new
        return jax.lax.fori_loop(0, n, body, (q, caches))[0]

    def median_us(fn, *a):
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(max(args.rounds, 5) * 4):
            start = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6 / n  # per step

    rng = np.random.RandomState(0)
    ws = [tuple(jnp.asarray(rng.randn(*shape).astype(np.float32) * 0.02) for shape in
                ((d, H * Dh), (d, K * Dh), (d, K * Dh), (d, d), (d, f), (d, f), (f, d))) for _ in range(L)]
    emb = jnp.asarray(rng.randn(config.vocab_size, d).astype(np.float32) * 0.02)
    result = {}
    print(f"{'batch':>6} {'step us':>9} {'matmuls us':>11} {'attention us':>13} {'rest us':>8} {'step tokens/s':>14}")
    for b in args.batches:
        cache = model.init_cache(b, S)
        kv_mask = jnp.ones((b, S), bool)
        token = jnp.asarray(rng.randint(1, config.vocab_size, (b, 1)).astype(np.int32))
        t_step = median_us(step, state, token, cache, kv_mask)
        t_mm = median_us(matmuls, jnp.asarray(rng.randn(b, d).astype(np.float32)), ws, emb)
        q = jnp.asarray(rng.randn(b, 1, H, Dh).astype(np.float32))
        kv = jnp.asarray(rng.randn(b, 1, K, Dh).astype(np.float32))
        t_att = median_us(attention, q, kv, cache, jnp.ones((b, 1, S), bool))
        result[b] = {"step_us": t_step, "matmuls_us": t_mm, "attention_us": t_att, "tokens_per_sec": b / t_step * 1e6}
        print(f"{b:>6} {t_step:>9.0f} {t_mm:>11.0f} {t_att:>13.0f} {t_step - t_mm - t_att:>8.0f} {b / t_step * 1e6:>14,.0f}")
    base = result[args.batches[0]]["tokens_per_sec"]
    last = args.batches[-1]
    print(f"batch {last} / batch {args.batches[0]} per step: x{result[last]['tokens_per_sec'] / base:.2f}; matmuls and "
          f"attention alone at batch {last} allow x{last / (result[last]['matmuls_us'] + result[last]['attention_us']) * 1e6 / base:.2f}")
    return result


def first_calls(args) -> dict:
    """In this process: seconds of the first and second generate_ids calls (the --compile child)."""
    from mlflow_tunix.pipeline import setup_jax

    setup_jax()  # reads MLFLOW_TUNIX_JAX_CACHE, set by the parent
    if args.no_export:  # XLA's persistent cache only: how a warm process started before the saved decode
        from mlflow_tunix import aot

        aot.SavedJit._load_or_compile = lambda self, args, signature: self._jit.lower(*args).compile()
    model = build_model(CONFIG, seed=0)
    prompts = make_prompts(args.child_batch)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        generate_ids(model, prompts, max_new_tokens=args.new_tokens, pad_id=PAD, stop_ids=[],
                     batch_size=args.child_batch)
        times.append(time.perf_counter() - start)
    return {"first": times[0], "second": times[1]}


def compile_times(args) -> dict:
    # xla-only: XLA's compiled code cached, the decode traced and lowered again in every process;
    # saved: the compiled decode saved whole (what generate does with the cache on). Each mode gets its
    # own empty cache: a cold process fills it, a warm one reads it.
    modes = {"xla-only": ["--no-export"], "saved": []}
    rows = {f"{temp} {mode}": [] for mode in modes for temp in ("cold", "warm")}
    for _ in range(args.compile_rounds):
        for mode, extra in modes.items():
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, MLFLOW_TUNIX_JAX_CACHE=cache)
                for temp in ("cold", "warm"):
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", "--child-batch", str(args.child_batch),
                         "--new-tokens", str(args.new_tokens), *extra],
                        env=env, capture_output=True, text=True, check=True,
                    ).stdout
                    rows[f"{temp} {mode}"].append(json.loads(out.strip().splitlines()[-1]))
    result = {}
    for kind, runs in rows.items():
        first = statistics.median(r["first"] for r in runs)
        second = statistics.median(r["second"] for r in runs)
        result[kind] = {"first_call": first, "second_call": second, "compile": first - second}
        print(f"{kind:>14}: first generate_ids call {first:.2f} s, second {second:.3f} s -> compile ~{first - second:.2f} s"
              f"  (medians of {len(runs)}; firsts: " + " ".join(f"{r['first']:.2f}" for r in runs) + ")")
    for mode in modes:
        print(f"{mode}: warm / cold compile {result[f'warm {mode}']['compile'] / result[f'cold {mode}']['compile']:.2f}")
    print(f"warm compile, saved / xla-only: {result['warm saved']['compile'] / result['warm xla-only']['compile']:.2f}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=CONFIG.n_layers,
                        help="n_layers of the scaling model (2 = the shipped projects' model)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are over these)")
    parser.add_argument("--naive", action="store_true", help="also compare with naive re-encoding at batch 32")
    parser.add_argument("--compile", action="store_true", help="measure cold vs warm compile instead of scaling")
    parser.add_argument("--parts", action="store_true",
                        help="time one decode step per batch size beside its matmuls and its attention alone")
    parser.add_argument("--compile-rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, default=32, help="batch of the --compile processes")
    parser.add_argument("--no-export", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(first_calls(args)))
        return
    result = compile_times(args) if args.compile else parts(args) if args.parts else scaling(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
