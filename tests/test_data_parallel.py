"""Data parallel training (distributed.py): two real JAX processes on 127.0.0.1, joined by
jax.distributed (gloo), train a tiny model exactly as one process does, resume bit for bit, and a
worker that dies stops the group with a message naming it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, cli_env, run_cli
from mlflow_tunix import distributed

REPO = Path(__file__).resolve().parent.parent

# The worker: the same program in every process. Process 0 writes the loss history and a digest of
# the final weights.
WORKER = textwrap.dedent("""
    import json, os, sys
    from mlflow_tunix import distributed
    distributed.initialize_from_env()
    import numpy as np
    from mlflow_tunix.model import ModelConfig, build_model, params_sha256
    from mlflow_tunix.tracking import NullTracker
    from mlflow_tunix.train import TokenizedData, TrainConfig, train

    out, steps, ckpt, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    # Rows counting up from a random start: learnable in a few steps, so the losses move.
    tokens = ((np.random.default_rng(0).integers(0, 61, size=(64, 1)) + np.arange(24)) % 61 + 3).astype(np.int32)
    mask = np.zeros(tokens.shape, np.float32)
    mask[:, 8:] = 1.0
    data = TokenizedData(tokens, mask)

    tracker = NullTracker()
    config = TrainConfig(steps=steps, batch_size=8, log_every=1, eval_every=0, warmup_steps=2, learning_rate=1e-2,
                         checkpoint_every=3 if ckpt else 0)
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32), seed=0)
    result = train(model, data, config, eval_data=data, tracker=tracker, progress=False,
                   checkpoint_dir=ckpt or None, resume=resume)
    if os.environ.get("MLFLOW_TUNIX_PROCESS_ID", "0") == "0":
        with open(out, "w") as f:
            json.dump({"loss": tracker.history["loss"], "eval_loss": result.final_eval_loss,
                       "sha": params_sha256(result.model), "first_step": result.first_step}, f)
""")


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dp") / "worker.py"
    path.write_text(WORKER)
    return path


def _run(worker: Path, out: Path, n: int, *, steps: int = 6, ckpt: Path | None = None, resume: bool = False) -> dict:
    argv = [sys.executable, str(worker), str(out), str(steps), str(ckpt or ""), "1" if resume else "0"]
    env = {"PYTHONPATH": str(REPO), "MLFLOW_TUNIX_JAX_CACHE": "0"}
    if n == 1:
        subprocess.run(argv, env={**os.environ, **env}, check=True)
    else:
        distributed.launch(argv, n, env=env)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_and_two(worker, tmp_path_factory) -> tuple[dict, dict, Path]:
    """The same 6 steps in 1 process and in 2 (checkpointed at steps 3 and 6)."""
    folder = tmp_path_factory.mktemp("runs")
    one = _run(worker, folder / "one.json", 1)
    two = _run(worker, folder / "two.json", 2, ckpt=folder / "ckpt")
    return one, two, folder / "ckpt"


def test_two_processes_have_the_loss_history_of_one(one_and_two):
    one, two, _ = one_and_two
    assert [s for s, _ in two["loss"]] == list(range(6))
    np.testing.assert_allclose([v for _, v in two["loss"]], [v for _, v in one["loss"]], rtol=0, atol=1e-5)
    # The held-out loss is sharded over the processes too, and is the same number.
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-5)
    # The loss moved: the comparison is between runs that learned, not two copies of the initial loss.
    assert two["loss"][-1][1] < two["loss"][0][1] - 0.1


def test_two_processes_resume_bit_identical(worker, one_and_two, tmp_path):
    _, whole, checkpoints = one_and_two
    shutil.copytree(checkpoints, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "6")  # as if killed after the checkpoint of step 3
    resumed = _run(worker, tmp_path / "resumed.json", 2, ckpt=tmp_path / "b", resume=True)
    assert resumed["first_step"] == 3
    assert resumed["sha"] == whole["sha"]
    assert resumed["loss"] == whole["loss"][3:]


# --------------------------------------------------------------------------- the whole job, from the CLI
def _children(pid: int) -> list[int]:
    return [int(c) for tid in os.listdir(f"/proc/{pid}/task")
            for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]


def _process_id(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"MLFLOW_TUNIX_PROCESS_ID="):
                return item.split(b"=", 1)[1].decode()
    return None


def test_cli_two_processes_run_the_job_and_a_dead_worker_fails_the_run(tracking_uri, tmp_path):
    """`train.processes: 2` from the CLI: the job finishes in one run, evaluated on both processes'
    shares of the prompts, registered; then a run whose worker is killed mid-training ends FAILED
    with one line naming the worker, and registers nothing."""
    from mlflow.tracking import MlflowClient

    common = ["--config", TINY, "--no-progress", "--set", "train.processes=2",
              "--set", f"train.checkpoint_dir={tmp_path / 'ckpt'}", "--set", "train.checkpoint_every=10"]
    proc = run_cli(["run", *common, "--steps", "20", "--registered-model-name", "dp"], tracking_uri, cwd=tmp_path,
                   MLFLOW_TUNIX_JAX_CACHE=str(tmp_path / "jax"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A group saves no executables: one bound to process 0's device, loaded by process 1, hung the group
    assert list((tmp_path / "jax").glob("mlflow-tunix-*.xla")) == []
    assert "data parallel: 2 processes" in proc.stderr
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["n_eval"] == 40  # both shares of the 40 held-out prompts were scored
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(20))
    assert [str(v.version) for v in client.search_model_versions("name='dp'")] == ["1"]

    # A worker killed mid-training: the group stops, the run is FAILED, nothing more is registered.
    argv = [sys.executable, "-m", "mlflow_tunix.cli", "run", *map(str, common), "--steps", "100000",
            "--registered-model-name", "dead"]
    launcher = subprocess.Popen(argv, cwd=tmp_path, env=cli_env(tracking_uri), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until the second run has checkpointed: training is under way
            runs = client.search_runs([run.info.experiment_id], "attributes.status = 'RUNNING'")
            if runs and (tmp_path / "ckpt" / runs[0].info.run_id / "checkpoints" / "10").is_dir():
                break
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        group = _children(launcher.pid)
        (worker,) = [pid for pid in group if _process_id(pid) == "1"]
        os.kill(worker, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    failed = runs[0].info.run_id
    assert last == (f"error: data-parallel process 1 of 2 exited with code -9 (killed by a signal); the group was "
                    f"stopped and run {failed} is FAILED; continue with: mlflow-tunix run --resume {failed}"), last
    assert client.get_run(failed).info.status == "FAILED"
    assert client.search_model_versions("name='dead'") == []
    assert len(group) == 2 and not [pid for pid in group if Path(f"/proc/{pid}").exists()]  # none left behind


def test_processes_setting_is_checked_before_anything_starts(tracking_uri, tmp_path):
    from mlflow_tunix.errors import ConfigError
    from mlflow_tunix.train import TrainConfig

    for bad in ("two", "0", "-1"):
        with pytest.raises(ConfigError, match=r"^train.processes: must be auto or a whole number from 1 to 1024"):
            TrainConfig(processes=bad)
    assert distributed.processes_for("auto", "cpu") == len(os.sched_getaffinity(0))
    assert (distributed.processes_for("auto", "gpu"), distributed.processes_for("3")) == (1, 3)
    proc = run_cli(["run", "--config", TINY, "--set", "train.processes=3"], tracking_uri, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: train.batch_size: 32 does not split over 3 data-parallel "
                                                    "processes (train.processes=3); use a multiple of 3")


# --------------------------------------------------------------------------- the step's one all-reduce
DEVICES = textwrap.dedent("""
    import json, re, sys
    import jax, numpy as np
    from mlflow_tunix import distributed
    from mlflow_tunix.lora import LoraConfig
    from mlflow_tunix.model import ModelConfig, build_model, param_count
    from mlflow_tunix.tracking import NullTracker
    from mlflow_tunix.train import TokenizedData, TrainConfig, data_parallel_step, init_state, make_optimizer, train

    tokens = ((np.random.default_rng(0).integers(0, 61, size=(64, 1)) + np.arange(24)) % 61 + 3).astype(np.int32)
    mask = np.zeros(tokens.shape, np.float32)
    mask[:, 8:] = 1.0
    data = TokenizedData(tokens, mask)
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32), seed=0)
    # Rows of 10-24 tokens (padding after), for packing: several examples a row, the rows' count varying.
    ends = np.random.default_rng(1).integers(10, 25, size=64)
    short = TokenizedData(np.where(np.arange(24) < ends[:, None], tokens, 0).astype(np.int32),
                          np.where(np.arange(24) < ends[:, None], mask, 0).astype(np.float32))
    out = {"devices": jax.device_count(), "params": param_count(model)}
    for name, lora, rows, packing in (("full", None, data, False), ("lora", LoraConfig(rank=2), data, False),
                                      ("packed", None, short, True)):
        tracker = NullTracker()
        config = TrainConfig(steps=4, batch_size=8, log_every=1, eval_every=0, warmup_steps=1, learning_rate=1e-2,
                             checkpoint_every=0, lora=lora, packing=packing)
        result = train(model, rows, config, tracker=tracker, progress=False)
        assert result.packed == packing, name
        out[name] = [v for _, v in tracker.history["loss"]]
    if jax.device_count() > 1:  # the compiled step's all-reduces: (operand shapes) of each
        dp = distributed.DataParallel()
        tx, _ = make_optimizer(TrainConfig(steps=4, batch_size=8))
        graphdef, state = init_state(model, tx)
        batch = dp.shard_rows({"tokens": tokens[:8], "loss_mask": mask[:8]})
        hlo = jax.jit(data_parallel_step(graphdef, tx, dp)).lower(
            dp.replicate(state), batch).compile().as_text()
        out["all_reduces"] = re.findall(r"= (\\(?[^=]*?\\)?) all-reduce\\(", hlo)
    json.dump(out, sys.stdout)
""")


def test_data_parallel_step_sums_the_gradients_as_one_vector(tmp_path):
    """Left to jit's partitioner, the data-parallel step all-reduced a tuple of every parameter's
    gradient, which gloo sent array by array (~70 ms of a 165 ms step for two CPU processes); the
    step is written with shard_map to send one flat vector. Two host devices in one process (the
    same step as two processes), against one device: the same losses, full, LoRA and packed, and one
    all-reduce operand as big as the model besides two scalars (the loss and the number of targets).
    The model is trained twice: train() must leave the caller's model usable (its step donates a copy)."""
    script = tmp_path / "devices.py"
    script.write_text(DEVICES)

    def run(devices: int) -> dict:
        env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TUNIX_JAX_CACHE": "0",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    one, two = run(1), run(2)
    assert (one["devices"], two["devices"]) == (1, 2)
    for name in ("full", "lora", "packed"):
        np.testing.assert_allclose(two[name], one[name], rtol=0, atol=1e-5)
        assert two[name][-1] < two[name][0] - 0.05, name  # it learned
    # XLA may combine them: (f32[12384]{0}, f32[]) all-reduce, f32[] all-reduce.
    operands = [shape for op in two["all_reduces"] for shape in re.findall(r"f32\[[\d,]*\]", op)]
    assert sorted(operands) == sorted(["f32[]", "f32[]", f"f32[{two['params']}]"]), two["all_reduces"]
