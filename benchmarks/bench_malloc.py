"""Train steps under three glibc malloc settings, side by side in fresh processes.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_malloc.py [--rounds 3] [--steps 10] [--shapes addition,reasoning]

`mlflow-tunix` re-runs itself with GLIBC_TUNABLES set (cli.malloc_environment): XLA on CPU mallocs a
step's temporaries as one block every step (139 MB for the default project's step), above glibc's mmap
threshold, so with glibc's defaults each step maps it, faults it in page by page and unmaps it. This
measures what that costs on the machine at hand: worker processes started fresh (tunables are read at
process start), the settings in turn with the order alternating between rounds, each training a real
step of the project's model, reporting medians over rounds of the time per step, minor page faults per
step and kernel (sys) time per step. Settings: `glibc` (its defaults), `huge pages` (only
glibc.malloc.hugetlb=1, what mlflow-tunix used before) and `ours` (cli.MALLOC_TUNABLES). Shapes:
`addition` (the default project's 64 x 64 batch) and `reasoning` (its packed rows: 64 examples of its
length mix, 288 wide).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp, numpy as np
from mlflow_tunix.model import ModelConfig, build_model
from mlflow_tunix.train import TrainConfig, init_state, make_optimizer, packed_batch, train_step, TokenizedData

steps, shape = int(sys.argv[1]), sys.argv[2]
rng = np.random.RandomState(0)
if shape == "reasoning":
    # the reasoning project's mix (tokens per example, measured from its generator): ~21 % unit cost at
    # ~232, the rest from ~65 to ~170
    lengths = np.concatenate([rng.randint(200, 285, 14), rng.randint(40, 195, 50)]).astype(np.int64)
    data = TokenizedData(rng.randint(0, 284, (64, 288)).astype(np.int32), np.ones((64, 288), np.float32))
    batch = {k: jnp.asarray(v) for k, v in packed_batch(data, np.arange(64), lengths, 64, width=288).items()}
else:  # the default project's batch: 64 rows of 64 tokens, ~60 % of them completion
    batch = {"tokens": jnp.asarray(rng.randint(0, 300, (64, 64)).astype(np.int32)),
             "loss_mask": jnp.asarray((rng.rand(64, 64) < 0.6).astype(np.float32))}
config = ModelConfig(vocab_size=300, d_model=128, n_layers=2, n_heads=4, d_ff=384, max_seq_len=2048)
tx, _ = make_optimizer(TrainConfig(steps=1000))
graphdef, state = init_state(build_model(config, seed=0), tx)
step = jax.jit(lambda s, b: train_step(graphdef, tx, s, b))
for _ in range(3):
    state, m = step(state, batch)
jax.block_until_ready(m)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    state, m = step(state, batch)
jax.block_until_ready(m)
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
print(json.dumps({"step_s": (t1 - t0) / steps, "faults": (r1.ru_minflt - r0.ru_minflt) / steps,
                  "sys_s": (r1.ru_stime - r0.ru_stime) / steps, "shape": list(batch["tokens"].shape)}))
"""


def main():
    from mlflow_tunix.cli import MALLOC_TUNABLES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="worker processes per setting and shape (order alternating)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per worker, after 3 warm-up steps")
    parser.add_argument("--shapes", default="addition,reasoning", help="steps to time (default addition,reasoning)")
    args = parser.parse_args()
    settings = {"glibc": "", "huge pages": "glibc.malloc.hugetlb=1", "ours": ":".join(MALLOC_TUNABLES)}
    shapes = args.shapes.split(",")
    results = {(shape, name): [] for shape in shapes for name in settings}
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    for r in range(args.rounds):
        for shape in shapes:
            for name in (list(settings) if r % 2 == 0 else list(settings)[::-1]):
                env = {**base, "GLIBC_TUNABLES": settings[name]} if settings[name] else base
                out = subprocess.run([sys.executable, "-c", WORKER, str(args.steps), shape], env=env,
                                     capture_output=True, text=True, check=True).stdout
                results[(shape, name)].append(json.loads(out.strip().splitlines()[-1]))
                print(f"round {r + 1} {shape} {name}: {results[(shape, name)][-1]}", flush=True)
    for shape in shapes:
        med = {name: {k: statistics.median(x[k] for x in results[(shape, name)]) for k in ("step_s", "faults", "sys_s")}
               for name in settings}
        print(f"\n{shape} (medians of {args.rounds}):")
        for name, m in med.items():
            print(f"  {name:>10}: {m['step_s'] * 1e3:6.1f} ms/step, {m['faults']:8.0f} page faults/step, "
                  f"{m['sys_s'] * 1e3:5.1f} ms sys/step, speed x{med['glibc']['step_s'] / m['step_s']:.2f} glibc's")


if __name__ == "__main__":
    main()
