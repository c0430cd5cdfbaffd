"""Sweep scaling: wall time of the same 4 trials at 1 and at 2 concurrent trials, as a ratio.

    nice -n 10 python benchmarks/bench_sweep.py [--rounds 2] [--steps 200]

Each side is one `mlflow-tunix sweep` of the tiny test project (4 learning rates on a grid, FIFO: every
trial runs to the end) in a fresh sqlite store, as a user runs it: the time includes Ray's start.
Trials pin themselves to a free core each (sweep.pin_to_a_free_core), so 2 concurrent trials do not
share a core. Prints the median of --rounds rounds per side and the speed-up 1-at-once / 2-at-once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "projects" / "tiny" / "config.yaml"
SPACE = "train.learning_rate: {grid: [0.01, 0.003, 0.005, 0.002]}\n"


def one_sweep(concurrent: int, steps: int) -> tuple[float, float]:
    """(wall seconds of the whole command, seconds the sweep itself reported) for one sweep."""
    with tempfile.TemporaryDirectory() as tmp:
        space = Path(tmp) / "space.yaml"
        space.write_text(SPACE)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "MLFLOW_TUNIX_SYSTEM_METRICS": "0",
               "MLFLOW_TUNIX_CHECKPOINT_DIR": f"{tmp}/checkpoints", "PYTHONPATH": str(REPO)}
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mlflow_tunix.cli", "sweep", "--config", str(TINY), "--space",
                               str(space), "--scheduler", "fifo", "--max-concurrent", str(concurrent),
                               "--set", f"train.steps={steps}", "--set", "train.log_every=10"],
                              cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        import mlflow

        runs = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
            ["0"], filter_string="tags.mlflow_tunix.sweep = 'true'")
        return wall, runs[0].data.metrics["sweep_seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    results = {1: [], 2: []}
    for r in range(args.rounds):
        for k in (1, 2):  # side by side in each round: both see the same machine load
            results[k].append(one_sweep(k, args.steps))
            print(f"round {r + 1}: {k} at once: {results[k][-1][0]:.1f} s (trials {results[k][-1][1]:.1f} s)", flush=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(t for _, t in v)) for k, v in results.items()}
    print(f"4 trials x {args.steps} steps, median of {args.rounds} rounds, on {os.cpu_count()} cores")
    print(f"  1 at once: {med[1][0]:.1f} s wall ({med[1][1]:.1f} s in Tune)")
    print(f"  2 at once: {med[2][0]:.1f} s wall ({med[2][1]:.1f} s in Tune)")
    print(f"  speed-up: {med[1][0] / med[2][0]:.2f}x wall, {med[1][1] / med[2][1]:.2f}x in Tune")


if __name__ == "__main__":
    main()
