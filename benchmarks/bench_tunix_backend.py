"""What logging Tunix's metrics to MLflow costs a Tunix training loop.

The same tiny PeftTrainer run (Tunix's Qwen3, 2 layers, embed 32, batch 4 x 16 tokens; eval every 20 steps) with:

* ``none``: ``metrics_logging_options=None`` (no backend at all: the floor);
* ``tunix-default``: Tunix's default backends (TensorBoard through tensorboardX; W&B only if installed);
* ``mlflow``: ``mlflow_tunix.tunix.metrics_logger_options()`` logging to a local sqlite MLflow store;
* ``mlflow-http``: the same, to a real ``mlflow server`` on 127.0.0.1.

Timed from the 5th training step to the end of ``trainer.train()`` (which closes the logger, so MLflow's last
flush is in the figure; jit compilation is not). Rounds interleave the variants; medians of ROUNDS rounds,
reported as ratios to ``tunix-default``. Run from the repo root in a venv with the ``[tunix]`` extra::

    python benchmarks/bench_tunix_backend.py [--steps 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def timed_run(options, steps: int) -> float:
    from test_tunix import batches, model_inputs, tiny_qwen3
    import optax
    from tunix.sft import hooks, peft_trainer

    class Clock(hooks.TrainingHooks):
        start = None

        def on_train_step_end(self, trainer, step, loss):
            if trainer.train_steps == 5:
                self.start = time.perf_counter()

        on_train_start = on_train_end = on_train_step_start = on_eval_step_start = lambda self, *a: None
        on_eval_step_end = lambda self, *a: None  # noqa: E731

    clock = Clock()
    config = peft_trainer.TrainingConfig(eval_every_n_steps=20, max_steps=steps, metrics_logging_options=options,
                                         pbar_description=None)
    trainer = peft_trainer.PeftTrainer(tiny_qwen3(0), optax.adamw(3e-3), config)
    trainer = trainer.with_gen_model_input_fn(model_inputs) or trainer
    trainer.with_training_hooks(clock)
    trainer.train(batches(steps, 0), batches(2, 99))
    return time.perf_counter() - clock.start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import mlflow
    from tunix.sft import metrics_logger

    from conftest import mlflow_server_process
    from mlflow_tunix.tunix import metrics_logger_options

    work = Path(tempfile.mkdtemp(prefix="bench-tunix-"))
    os.chdir(work)
    sqlite_uri = f"sqlite:///{work / 'mlflow.db'}"
    times: dict[str, list[float]] = {}
    with mlflow_server_process(work) as http_uri:
        variants = {
            "none": lambda: None,
            "tunix-default": lambda: metrics_logger.MetricsLoggerOptions(log_dir=tempfile.mkdtemp(dir=work)),
            "mlflow": lambda: _mlflow_options(sqlite_uri, metrics_logger_options),
            "mlflow-http": lambda: _mlflow_options(http_uri, metrics_logger_options),
        }
        timed_run(None, 10)  # warm imports and caches
        for r in range(args.rounds):
            for name, make in variants.items():
                options = make()
                times.setdefault(name, []).append(timed_run(options, args.steps))
                mlflow.end_run() if mlflow.active_run() else None
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                  flush=True)
    base = statistics.median(times["tunix-default"])
    print(f"\n{args.steps} steps, median of {args.rounds} rounds (from step 5 to the end of train()):")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:14s} {median:6.2f} s  {1000 * median / (args.steps - 5):6.2f} ms/step  "
              f"x{median / base:.3f} of tunix-default")


def _mlflow_options(uri, metrics_logger_options):
    import mlflow

    mlflow.set_tracking_uri(uri)
    run_id = mlflow.MlflowClient().create_run("0").info.run_id
    return metrics_logger_options(run_id=run_id)


if __name__ == "__main__":
    main()
