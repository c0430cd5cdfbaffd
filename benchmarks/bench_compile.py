"""Where the train step's first-call time goes, cold and warm, each in a fresh process.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_compile.py [--rounds 3] [--json out.json]

The default project's model and step (d_model 128, 2 layers, batch 64 x 64), jitted as train.train
jits it, then its first call taken apart with JAX's stages: ``trace`` (Python -> jaxpr), ``lower``
(-> StableHLO), ``compile`` (XLA, or a load from the persistent compilation cache) and the first
``run``. Three kinds of fresh process, ``--rounds`` of each, interleaved:

- ``cold``: an empty persistent cache (what a first run on a machine pays);
- ``warm``: the persistent cache filled by an earlier process (``pipeline.setup_jax`` turns it on);
- ``saved``: ``train.train``'s own step, whose executable the cold process saved (``mlflow_tunix.aot``):
  loaded and run, no tracing or lowering at all (one figure: the first call, load and run).

The "first step" column is trace + lower + compile + run; a steady-state step is timed too, so
"overhead" (first step minus a steady step) is what compilation costs a run. The persistent cache
keeps every program, as ``pipeline.setup_jax`` sets it up (no minimum compile time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(mode: str, cache: str) -> dict:
    t_start = time.perf_counter()
    import functools

    import jax
    import numpy as np

    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # as pipeline.setup_jax
    from mlflow_tunix import aot
    from mlflow_tunix.model import ModelConfig, build_model
    from mlflow_tunix.train import TrainConfig, _saved_programs, init_state, make_optimizer, train_step

    cfg = ModelConfig(vocab_size=300, d_model=128, n_layers=2, n_heads=4, d_ff=384, max_seq_len=128)
    config = TrainConfig(steps=1000)
    tx, _ = make_optimizer(config)
    graphdef, state = init_state(build_model(cfg, seed=0), tx)
    rng = np.random.RandomState(0)
    batch = {"tokens": rng.randint(0, 300, (64, 64)).astype(np.int32),
             "loss_mask": (rng.rand(64, 64) < 0.6).astype(np.float32)}
    t_ready = time.perf_counter()
    out = {"mode": mode, "import_and_build": t_ready - t_start}
    if mode == "saved":  # train.train's own step: its executable loaded, nothing traced or lowered
        step, _ = _saved_programs(graphdef, tx, state, None, config)
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        t4 = time.perf_counter()
        assert aot.LOADED["train-step"] == 1, "the saved executable was not loaded"
        out.update(trace=float("nan"), lower=float("nan"), compile=float("nan"), run=float("nan"))
    else:
        step = jax.jit(functools.partial(train_step, graphdef, tx), donate_argnums=0)
        t0 = time.perf_counter()
        traced = step.trace(state, batch)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        compiled = lowered.compile()
        t3 = time.perf_counter()
        out.update(trace=t1 - t0, lower=t2 - t1, compile=t3 - t2)
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        t4 = time.perf_counter()
        out["run"] = t4 - t3
        if mode == "cold":  # (untimed) train.train's step, which saves its executable for `saved`
            state, metrics = _saved_programs(graphdef, tx, state, None, config)[0](state, batch)
            jax.block_until_ready(metrics)
        step = compiled
    out["first_step"] = t4 - t0
    times = []
    for _ in range(3):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    out["steady_step"] = min(times)
    out["overhead"] = out["first_step"] - out["steady_step"]
    return out


def main():
    parser = argparse.ArgumentParser(description="Cold vs warm first-call time of the train step, in fresh processes.")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes of each kind (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    def run(mode, cache):
        done = subprocess.run([sys.executable, __file__, "--child", mode, cache], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    results = {"cold": [], "warm": [], "saved": []}
    print(f"load average before: {os.getloadavg()}")
    for r in range(args.rounds):
        cache = tempfile.mkdtemp(prefix="jaxcache_")
        for mode in ("cold", "warm", "saved"):  # cold fills the cache (and saves the executable) for the others
            results[mode].append(run(mode, cache))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    cols = ("trace", "lower", "compile", "run", "first_step", "steady_step", "overhead")
    print(f"\n{'mode':<6}" + "".join(f"{c:>12}" for c in cols) + "   (seconds, median of fresh processes)")
    summary = {}
    for mode, rows in results.items():
        summary[mode] = {c: statistics.median(row[c] for row in rows) for c in cols + ("import_and_build",)}
        print(f"{mode:<6}" + "".join(f"{summary[mode][c]:>12.3f}" for c in cols))
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"median": summary, "runs": results, "load": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
