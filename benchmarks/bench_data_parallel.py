"""Training tokens/s of one process against N data-parallel processes (one per core), side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_data_parallel.py [--rounds 3] [--steps 60] [--processes 2]

The default project (addition) is prepared once (data, tokenizer, tokens); then each round runs,
in turn (the order alternating between rounds, so a busy neighbour slows both alike):
  1 process   : ``train.train`` in one process free to use every core (XLA's own threads);
  N processes : the same ``train.train`` in N processes, each pinned to its own core, joined by
                jax.distributed (gloo), the batch split on its rows, the gradients all-reduced.
Both use the real jitted step, the real (seed, step) batches, batch 64, no tracking, no checkpoints.
Throughput is the median over log windows of 10 steps after the first (compilation excluded), in
positions (B x L) per second. Prints the medians of the rounds and the ratio; ``--json`` writes them.
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def child(folder: Path, steps: int, batch_size: int, out: Path) -> None:
    from mlflow_tunix import distributed

    distributed.initialize_from_env()
    from mlflow_tunix.model import ModelConfig, build_model
    from mlflow_tunix.tracking import NullTracker
    from mlflow_tunix.train import TokenizedData, TrainConfig, train

    arrays = np.load(folder / "tokens.npz")
    data = TokenizedData(arrays["tokens"], arrays["loss_mask"])
    model_cfg = ModelConfig(**json.loads((folder / "model.json").read_text()))
    tracker = NullTracker()
    config = TrainConfig(steps=steps, batch_size=batch_size, log_every=10, eval_every=0, checkpoint_every=0)
    result = train(build_model(model_cfg, seed=0), data, config, tracker=tracker, progress=False)
    windows = [v for _, v in tracker.history["tokens_per_sec"][1:]]  # the first holds the compilation
    if distributed.is_main():
        out.write_text(json.dumps({"tokens_per_sec": statistics.median(windows), "final_loss": result.final_loss}))


def run_side(folder: Path, n: int, steps: int, batch_size: int) -> dict:
    from mlflow_tunix import distributed

    out = folder / f"result-{n}.json"
    argv = [sys.executable, __file__, "--child", str(folder), "--steps", str(steps), "--batch-size", str(batch_size),
            "--out", str(out)]
    env = {"PYTHONPATH": str(REPO), "MLFLOW_TUNIX_JAX_CACHE": "0"}
    if n == 1:
        subprocess.run(argv, env={**os.environ, **env}, check=True)
    else:
        distributed.launch(argv, n, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(Path(args.child), args.steps, args.batch_size, Path(args.out))

    from mlflow_tunix.config import load_project
    from mlflow_tunix.pipeline import prepare

    folder = Path(tempfile.mkdtemp(prefix="bench-dp-"))
    prep = prepare(load_project("addition"))
    np.savez(folder / "tokens.npz", tokens=prep.train_tok.tokens, loss_mask=prep.train_tok.loss_mask)
    (folder / "model.json").write_text(json.dumps(dataclasses.asdict(prep.model_cfg)))
    print(f"addition: {len(prep.train_tok.tokens)} rows of {prep.train_tok.tokens.shape[1]} tokens, "
          f"batch {args.batch_size}, {args.steps} steps a side, {args.rounds} rounds; load {os.getloadavg()[0]:.1f}",
          flush=True)
    sides = {1: [], args.processes: []}
    for r in range(args.rounds):
        order = [1, args.processes] if r % 2 == 0 else [args.processes, 1]
        for n in order:
            figures = run_side(folder, n, args.steps, args.batch_size)
            sides[n].append(figures)
            print(f"round {r}: {n} process(es): {figures['tokens_per_sec']:,.0f} tokens/s, "
                  f"final loss {figures['final_loss']:.6f}", flush=True)
    med = {n: statistics.median(f["tokens_per_sec"] for f in runs) for n, runs in sides.items()}
    ratio = med[args.processes] / med[1]
    print(f"median tokens/s: 1 process {med[1]:,.0f} | {args.processes} processes {med[args.processes]:,.0f} "
          f"| ratio {ratio:.2f}x  (load now {os.getloadavg()[0]:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"median_tokens_per_sec": med, "ratio": ratio,
                                               "rounds": {str(k): v for k, v in sides.items()}}, indent=1))


if __name__ == "__main__":
    main()
