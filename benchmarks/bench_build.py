"""How building a model with given weights grows with n_layers: the abstract whole-model
``nnx.eval_shape`` that build_model used to start from, next to what it does now (shapes from a
one-layer model, then a real build), side by side in one run. Median of 5 per size.

    PYTHONPATH=. python benchmarks/bench_build.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from flax import nnx

from mlflow_tunix.model import ModelConfig, Transformer, build_model, param_shapes

REPEATS = 5


def median_seconds(fn) -> float:
    fn()  # warm: the first call compiles the initializers
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    print(f"{'n_layers':>8}  {'eval_shape (old)':>16}  {'build_model (new)':>17}  ratio old/new")
    for layers in (8, 16, 32, 64):
        config = ModelConfig(vocab_size=64, d_model=16, n_layers=layers, n_heads=2, d_ff=32, max_seq_len=32)
        params = {name: np.zeros(shape, np.float32) for name, shape in param_shapes(config).items()}
        old = median_seconds(lambda: nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
        new = median_seconds(lambda: build_model(config, params=params))
        print(f"{layers:>8}  {old:>15.3f}s  {new:>16.3f}s  {old / new:>8.1f}x")


if __name__ == "__main__":
    main()
