"""Training tokens/s of one process against N data-parallel processes (one per core), side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_data_parallel.py [--rounds 3] [--steps 60] [--processes 2]

The default project (addition) is prepared once (data, tokenizer, tokens); then each round runs,
in turn (the order alternating between rounds, so a busy neighbour slows both alike):
  1 process   : ``train.train`` in one process free to use every core (XLA's own threads);
  N processes : the same ``train.train`` in N processes, each pinned to its own core, joined by
                jax.distributed (gloo), the batch split on its rows, the gradients all-reduced;
  N devices   : one process with N forced host devices (XLA_FLAGS), the batch sharded over them.
Both use the real jitted step, the real (seed, step) batches, batch 64, no tracking, no checkpoints.
Throughput is the median over log windows of 10 steps after the first (compilation excluded), in
positions (B x L) per second; with it, the CPU time per step summed over the processes (the work a
layout costs, less disturbed by a busy machine than the wall clock). Prints the medians of the rounds and the ratios to 1 process; ``--json`` writes them.
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def child(folder: Path, steps: int, batch_size: int, out: Path) -> None:
    from mlflow_tunix import distributed

    distributed.initialize_from_env()
    import jax

    from mlflow_tunix.model import ModelConfig, build_model
    from mlflow_tunix.tracking import NullTracker
    from mlflow_tunix.train import TokenizedData, TrainConfig, train

    arrays = np.load(folder / "tokens.npz")
    data = TokenizedData(arrays["tokens"], arrays["loss_mask"])
    model_cfg = ModelConfig(**json.loads((folder / "model.json").read_text()))
    class CpuClock(NullTracker):  # this process's CPU seconds at the end of each log window
        cpu: list = []

        def log_scalar(self, name, value, step):
            super().log_scalar(name, value, step)
            if name == "tokens_per_sec":
                self.cpu.append(time.process_time())

    tracker = CpuClock()
    config = TrainConfig(steps=steps, batch_size=batch_size, log_every=10, eval_every=0, checkpoint_every=0)
    result = train(build_model(model_cfg, seed=0), data, config, tracker=tracker, progress=False)
    windows = [v for _, v in tracker.history["tokens_per_sec"][1:]]  # the first holds the compilation
    # CPU seconds per step after the first window, summed over the processes: what the layout costs
    # in work, a figure a busy machine disturbs less than the wall clock.
    cpu = (tracker.cpu[-1] - tracker.cpu[0]) / (10 * (len(tracker.cpu) - 1))
    cpu = sum(distributed.gather(cpu)) if jax.process_count() > 1 else cpu
    if distributed.is_main():
        out.write_text(json.dumps({"tokens_per_sec": statistics.median(windows), "final_loss": result.final_loss,
                                   "cpu_ms_per_step": 1000 * cpu}))


def run_side(folder: Path, side: str, n: int, steps: int, batch_size: int) -> dict:
    from mlflow_tunix import distributed

    out = folder / f"result-{side}.json"
    argv = [sys.executable, __file__, "--child", str(folder), "--steps", str(steps), "--batch-size", str(batch_size),
            "--out", str(out)]
    env = {"PYTHONPATH": str(REPO), "MLFLOW_TUNIX_JAX_CACHE": "0"}
    if side == "devices":  # one process, n host devices, the batch sharded over them (the same train path)
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    if side == "processes" and os.environ.get("BENCH_WORKER_XLA_FLAGS"):  # e.g. one XLA thread per pinned process
        env["XLA_FLAGS"] = os.environ["BENCH_WORKER_XLA_FLAGS"]
    if side != "processes":
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
    n = args.processes
    names = {"one": "1 process", "processes": f"{n} processes", "devices": f"1 process, {n} host devices"}
    sides = {side: [] for side in names}
    for r in range(args.rounds):
        order = list(names) if r % 2 == 0 else list(reversed(names))
        for side in order:
            figures = run_side(folder, side, n, args.steps, args.batch_size)
            sides[side].append(figures)
            print(f"round {r}: {names[side]}: {figures['tokens_per_sec']:,.0f} tokens/s, "
                  f"{figures['cpu_ms_per_step']:.0f} CPU ms/step, final loss {figures['final_loss']:.6f}", flush=True)
    med = {side: statistics.median(f["tokens_per_sec"] for f in runs) for side, runs in sides.items()}
    cpu = {side: statistics.median(f["cpu_ms_per_step"] for f in runs) for side, runs in sides.items()}
    print("median tokens/s: " + " | ".join(f"{names[s]} {med[s]:,.0f} ({med[s] / med['one']:.2f}x)" for s in names)
          + f"  (load now {os.getloadavg()[0]:.1f})")
    print("median CPU ms per step (all processes): "
          + " | ".join(f"{names[s]} {cpu[s]:.0f} ({cpu[s] / cpu['one']:.2f}x)" for s in names))
    if args.json:
        Path(args.json).write_text(json.dumps({"median_tokens_per_sec": med, "median_cpu_ms_per_step": cpu, "names": names, "rounds": sides},
                                              indent=1))


if __name__ == "__main__":
    main()
