"""KV-cache decoding (generate_ids) vs naive re-encoding, on a ~1M-parameter model.

    PYTHONPATH=. /work/venv/bin/python benchmarks/bench_decode.py

Both sides decode greedily, with no stop tokens, the same left-padded batch of prompts. The naive
side re-runs the full jitted forward on the growing sequence every step (one compiled function per
length, all compiled in a warm-up run that is not timed). Prints the median of 5 runs each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlflow_tunix.generate import generate_ids
from mlflow_tunix.model import ModelConfig, build_model, param_count

PAD = 0


def naive_generate(graphdef, state, forward, prompts, max_new_tokens):
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    config = ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, d_ff=384, max_seq_len=256)
    model = build_model(config, seed=0)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(1, config.vocab_size, rng.randint(16, 49)).tolist() for _ in range(args.batch)]
    print(f"model: {param_count(model):,} params; batch {args.batch}, {args.new_tokens} new tokens, "
          f"prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens; jax {jax.__version__} "
          f"on {jax.devices()[0].platform}")

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, mask):
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits = nnx.merge(graphdef, state)(tokens, positions, kv_mask=mask)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def kv_cache():
        return generate_ids(model, prompts, max_new_tokens=args.new_tokens, pad_id=PAD, stop_ids=[],
                            batch_size=args.batch)

    def naive():
        return naive_generate(graphdef, state, forward, prompts, args.new_tokens)

    # Warm-up (compiles) and a check that both sides decode the same tokens.
    same = kv_cache() == naive()
    print(f"same tokens on both sides: {same}")

    times = {"kv-cache generate_ids": [], "naive re-encode": []}
    for _ in range(args.runs):
        for name, run in (("kv-cache generate_ids", kv_cache), ("naive re-encode", naive)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    tokens = args.batch * args.new_tokens
    for name, median in medians.items():
        print(f"{name:>22}: median {median:.3f} s  ({tokens / median:,.0f} tokens/s)  runs: "
              + " ".join(f"{t:.3f}" for t in times[name]))
    print(f"speed-up of the KV cache: {medians['naive re-encode'] / medians['kv-cache generate_ids']:.1f}x")


if __name__ == "__main__":
    main()
