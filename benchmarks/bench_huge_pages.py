"""Train steps with and without glibc's malloc on transparent huge pages, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_huge_pages.py [--rounds 3] [--steps 10]

`mlflow-tunix` re-runs itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (cli.huge_pages_environment):
XLA on CPU allocates a step's temporaries afresh every step, and with 4 KB pages each step faults all of
them in again. This measures what that costs on the machine at hand: fresh worker processes, alternately
without and with the tunable (the tunable is read only at process start), each training the `reasoning`
project's model on a packed batch of its shape (64 examples of its length mix in rows 288 wide; the
lengths are drawn from the project's families) and reporting the median over rounds of the time per step,
minor page faults per step and kernel (sys) time per step.
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

steps = int(sys.argv[1])
rng = np.random.RandomState(0)
# the reasoning project's mix (tokens per example, measured from its generator): ~21 % unit cost at ~232,
# the rest from ~65 to ~170
lengths = np.concatenate([rng.randint(200, 285, 14), rng.randint(40, 195, 50)]).astype(np.int64)
data = TokenizedData(rng.randint(0, 284, (64, 288)).astype(np.int32), np.ones((64, 288), np.float32))
batch = {k: jnp.asarray(v) for k, v in packed_batch(data, np.arange(64), lengths, 64, width=288).items()}
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="worker processes per side (alternating)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per worker, after 3 warm-up steps")
    args = parser.parse_args()
    sides = {"4 KB pages": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
             "huge pages": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}}
    results = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            env = {**os.environ, **sides[name]}
            out = subprocess.run([sys.executable, "-c", WORKER, str(args.steps)], env=env, capture_output=True,
                                 text=True, check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("step_s", "faults", "sys_s")}
           for name, rs in results.items()}
    for name, m in med.items():
        print(f"{name:>10}: {m['step_s'] * 1e3:6.0f} ms/step, {m['faults']:8.0f} page faults/step, "
              f"{m['sys_s'] * 1e3:5.0f} ms sys/step (medians of {args.rounds})")
    print(f"huge pages / 4 KB pages, time per step: {med['huge pages']['step_s'] / med['4 KB pages']['step_s']:.2f}")


if __name__ == "__main__":
    main()
