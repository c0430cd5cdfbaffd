"""The train step's saved executable (mlflow_tunix.aot): loaded by a later run without tracing, the same
weights as a traced step; a crafted, truncated or lossy file is never run."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import TINY, run_cli
from mlflow_tunix import aot
from mlflow_tunix.lora import LoraConfig
from mlflow_tunix.model import ModelConfig, build_model, params_sha256
from mlflow_tunix.train import TokenizedData, TrainConfig, _saved_programs, init_state, make_optimizer, train

REPO = Path(__file__).resolve().parent.parent
CFG = ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=32)


def _data(n=64, seed=0):
    rng = np.random.RandomState(seed)
    return TokenizedData(rng.randint(0, 40, (n, 16)).astype(np.int32), (rng.rand(n, 16) < 0.6).astype(np.float32))


@pytest.fixture
def cache_dir(tmp_path):
    """Saved programs go to a temporary folder (as pipeline.setup_jax points them at JAX's cache) for one test."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    yield tmp_path / "jax"
    jax.config.update("jax_compilation_cache_dir", before)


def _train(config, seed=0):
    result = train(build_model(CFG, seed=seed), _data(), config, eval_data=_data(16, seed=1), progress=False)
    return params_sha256(result.model), result.final_loss, result.final_eval_loss


@pytest.mark.parametrize("lora", [None, LoraConfig(rank=2)], ids=["full", "lora"])
def test_a_later_run_loads_the_saved_step_and_trains_to_the_same_weights(cache_dir, lora):
    config = TrainConfig(steps=6, batch_size=8, eval_every=3, lora=lora)
    with _no_cache():
        traced = _train(config)  # plain jax.jit, nothing saved
    assert not cache_dir.exists()
    first = _train(config)  # compiles and saves the step and the held-out loss
    saved = sorted(p.name.rsplit("-", 1)[0] for p in cache_dir.glob("mlflow-tunix-*.xla"))
    assert saved == ["mlflow-tunix-eval-loss", "mlflow-tunix-train-step"]
    assert _train(config) == first == traced  # loaded: the same weights, loss and held-out loss, bit for bit


def test_a_second_mlflow_tunix_train_loads_the_step_the_first_saved(tracking_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    cache = tmp_path / "jax"
    args = ["train", "--config", TINY, "--steps", "6", "--no-progress"]
    first = run_cli(args, tracking_uri, cwd=tmp_path, MLFLOW_TUNIX_JAX_CACHE=str(cache))
    assert first.returncode == 0, first.stderr[-3000:]
    (step,) = cache.glob("mlflow-tunix-train-step-*.xla")
    os.utime(step, (1000, 1000))
    second = run_cli(args, tracking_uri, cwd=tmp_path, MLFLOW_TUNIX_JAX_CACHE=str(cache))
    assert second.returncode == 0, second.stderr[-3000:]
    assert step.stat().st_mtime > 1000  # loaded: a load marks the file used (a compile would have made no other)
    assert list(cache.glob("mlflow-tunix-train-step-*.xla")) == [step]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    losses = [[m.value for m in client.get_metric_history(run.info.run_id, "loss")] for run in runs]
    assert len(losses) == 2 and len(losses[0]) == 6 and losses[0] == losses[1]  # the same steps, bit for bit


def test_the_step_is_loaded_not_traced_and_runs_like_the_traced_one(cache_dir):
    config = TrainConfig(steps=10, batch_size=8)
    tx, _ = make_optimizer(config)
    batch = {"tokens": _data().tokens[:8], "loss_mask": _data().loss_mask[:8]}
    results = []
    for _ in range(2):
        graphdef, state = init_state(build_model(CFG, seed=0), tx)
        step, _ = _saved_programs(graphdef, tx, state, None, config)
        loaded = aot.LOADED["train-step"]
        for _ in range(3):
            state, metrics = step(state, batch)
        results.append((aot.LOADED["train-step"] - loaded, float(metrics["loss"]),
                        [np.asarray(x) for x in jax.tree.leaves(state)]))
    (loaded_first, loss_first, leaves_first), (loaded_second, loss_second, leaves_second) = results
    assert (loaded_first, loaded_second) == (0, 1)
    assert loss_first == loss_second
    assert all(np.array_equal(a, b) for a, b in zip(leaves_first, leaves_second))
    # Another batch shape is another program: compiled (and saved) for it, not loaded
    graphdef, state = init_state(build_model(CFG, seed=0), tx)
    step, _ = _saved_programs(graphdef, tx, state, None, config)
    loaded = aot.LOADED["train-step"]
    step(state, {"tokens": _data().tokens[:4], "loss_mask": _data().loss_mask[:4]})
    assert aot.LOADED["train-step"] == loaded and len(list(cache_dir.glob("mlflow-tunix-train-step-*.xla"))) == 2


def test_a_changed_module_constant_or_source_is_another_program(cache_dir, tmp_path, monkeypatch):
    # A constant read while tracing (a block size, a segment count) changes the program: part of the key,
    # as its value is when the program is compiled or loaded (a test may monkeypatch it)
    source = tmp_path / "scaled.py"
    source.write_text("SCALE = 2.0\n\ndef f(x):\n    return [x[0] * SCALE]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import scaled

    def call():
        loaded = aot.LOADED["scaled"]
        fresh = lambda x: scaled.f(x)  # a new function, as train makes for each run (jax.jit reuses a traced one)
        out = aot.saved_jit(fresh, name="scaled", key="f", modules=[scaled])([np.ones(3, np.float32)])
        return float(out[0][0]), aot.LOADED["scaled"] - loaded

    assert [call(), call()] == [(2.0, 0), (2.0, 1)]  # compiled and saved, then loaded
    monkeypatch.setattr(scaled, "SCALE", 3.0)
    assert [call(), call()] == [(3.0, 0), (3.0, 1)]  # not the program saved for 2.0
    source.write_text(source.read_text() + "# an edit\n")
    aot._static_digest.cache_clear()  # (a new process reads the file again)
    assert call() == (3.0, 0)
    assert len(list(cache_dir.glob("mlflow-tunix-scaled-*.xla"))) == 3


def test_only_the_most_recently_used_saved_executables_are_kept(tmp_path):
    for i in range(5):
        path = tmp_path / f"mlflow-tunix-decode-{i}.xla"
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    (tmp_path / "mlflow-tunix-train-step-0.xla").write_bytes(b"x")  # another name: not counted
    os.utime(tmp_path / "mlflow-tunix-decode-1.xla")  # used just now
    aot._prune(tmp_path, "decode", keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mlflow-tunix-decode-1.xla", "mlflow-tunix-decode-3.xla", "mlflow-tunix-decode-4.xla",
        "mlflow-tunix-train-step-0.xla"]


class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage", ["crafted pickle", "truncated", "another writer"])
def test_a_crafted_or_damaged_saved_step_is_never_run_and_is_replaced(cache_dir, tmp_path, damage):
    config = TrainConfig(steps=4, batch_size=8)
    expected = _train(config)
    (path,) = cache_dir.glob("mlflow-tunix-train-step-*.xla")
    good = path.read_bytes()
    marker = tmp_path / "ran"
    tree = _step_tree(config)
    if damage == "crafted pickle":  # a well-formed file whose executable description calls os.system
        in_proto, out_proto, _ = aot._unpack(good)
        path.write_bytes(aot._pack([in_proto, out_proto, pickle.dumps(_RunsAShellCommand(marker))]))
        with pytest.raises(pickle.UnpicklingError, match="posix.system is not a JAX type"):
            aot._load(path.read_bytes(), tree)
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        path.write_bytes(b"PK\x03\x04" + good[4:])
    assert _train(config) == expected  # compiled again, the same weights
    assert not marker.exists()
    # The damaged file is gone: saved again whole (or, when JAX's own cache gave the program back, not at all)
    assert not path.exists() or aot._load(path.read_bytes(), tree)


def _step_tree(config):
    """The structure of the saved step's arguments: (the state's arrays, a batch, no LoRA base)."""
    tx, _ = make_optimizer(config)
    _, state = init_state(build_model(CFG, seed=0), tx)
    return jax.tree.structure(([0] * len(jax.tree.leaves(state)), {"loss_mask": 0, "tokens": 0}, None))


def test_an_executable_from_jaxs_own_cache_is_not_saved(tmp_path):
    """JAX serializes an executable it loaded from its persistent cache without part of its code: saved,
    a later run would fail on its first step. Three fresh processes: the second finds the program in
    JAX's cache only (the saved file deleted); the third must still train, to the same weights."""
    script = (
        "import sys, jax\n"
        "from mlflow_tunix import pipeline\n"
        "pipeline.setup_jax()\n"
        "from test_aot import _train, TrainConfig\n"
        "print(_train(TrainConfig(steps=3, batch_size=8, eval_every=0)))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "MLFLOW_TUNIX_JAX_CACHE": str(tmp_path / "jax")}
    outputs = []
    for attempt in range(3):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout.strip().splitlines()[-1])
        saved = list((tmp_path / "jax").glob("mlflow-tunix-train-step-*.xla"))
        if attempt == 0:
            assert len(saved) == 1
            saved[0].unlink()
        else:
            assert saved == []  # what JAX's cache gave back is not written as a saved executable
    assert outputs[0] == outputs[1] == outputs[2]


class _no_cache:
    def __enter__(self):
        self.before = jax.config.jax_compilation_cache_dir
        jax.config.update("jax_compilation_cache_dir", None)

    def __exit__(self, *exc):
        jax.config.update("jax_compilation_cache_dir", self.before)
