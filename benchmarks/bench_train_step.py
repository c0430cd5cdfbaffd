"""Training speed of model.py at a git revision vs the working tree, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_train_step.py [--rev main] [--rounds 7]

Both models are built from the default project's model config (addition: d_model 128, 2 layers,
4 heads, d_ff 384, vocab 300) and trained with the same jitted ``train.train_step`` (AdamW, clipped)
on the same random batch of 64 x 96 tokens. Rounds alternate between the two sides (so a busy
neighbour on the machine slows both alike, and who goes first
alternates); each round times ``--steps`` steps after a warm-up.
Prints the median tokens/s of each side and their ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mlflow_tunix import model as current
from mlflow_tunix.train import TrainConfig, init_state, make_optimizer, train_step

REPO = Path(__file__).resolve().parent.parent


def model_module_at(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:mlflow_tunix/model.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "model_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("model_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def stepper(module, batch):
    config = module.ModelConfig(vocab_size=300, d_model=128, n_layers=2, n_heads=4, d_ff=384, max_seq_len=128)
    tx, _ = make_optimizer(TrainConfig(steps=1000))
    graphdef, state = init_state(module.build_model(config, seed=0), tx)
    step = jax.jit(lambda s, b: train_step(graphdef, tx, s, b))
    holder = {"state": state}

    def run(n: int) -> float:
        t0 = time.perf_counter()
        s = holder["state"]
        for _ in range(n):
            s, metrics = step(s, batch)
        jax.block_until_ready(metrics["loss"])
        holder["state"] = s
        return time.perf_counter() - t0

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="main", help="git revision of the baseline model.py")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30, help="train steps per round")
    args = parser.parse_args()

    rng = np.random.RandomState(0)
    B, T = 64, 96
    batch = {"tokens": jnp.asarray(rng.randint(0, 300, (B, T)), jnp.int32),
             "loss_mask": jnp.asarray(rng.rand(B, T) < 0.7, jnp.float32)}
    sides = {args.rev: stepper(model_module_at(args.rev), batch), "worktree": stepper(current, batch)}
    for run in sides.values():
        run(3)  # compile and warm up
    times = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):  # who goes first alternates
            times[name].append(sides[name](args.steps))
    rates = {name: args.steps * B * (T - 1) / statistics.median(ts) for name, ts in times.items()}
    for name, rate in rates.items():
        print(f"{name:>10}: {rate:,.0f} tokens/s (median of {args.rounds} rounds of {args.steps} steps)")
    print(f"worktree / {args.rev}: {rates['worktree'] / rates[args.rev]:.3f}")


if __name__ == "__main__":
    main()
