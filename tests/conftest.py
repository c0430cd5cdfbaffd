"""Shared fixtures: a real sqlite MLflow store per test, paths to the repo and the shared fixtures;
helpers for real server subprocesses and the tiny model several test modules use."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "projects" / "tiny" / "config.yaml"
FIXTURES = REPO.parent / "shared" / "fixtures" / "tunix-rt"


def _forget_active_experiment():
    """mlflow.set_experiment outlives its test (a module global and MLFLOW_EXPERIMENT_ID) and would
    point the next test, or a module-scoped fixture, at an experiment of another store."""
    import mlflow.tracking.fluent

    mlflow.tracking.fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(autouse=True)
def _isolated_mlflow_state(tmp_path, monkeypatch):
    """Every test starts (and leaves) MLflow on its default experiment; checkpoints go to its tmp folder."""
    _forget_active_experiment()
    monkeypatch.setenv("MLFLOW_TUNIX_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    yield
    _forget_active_experiment()


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh sqlite tracking + registry store, for this process and its children."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # a sqlite store's default artifact root is ./mlruns: keep it in tmp
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def cli_env(tracking_uri: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") or k.startswith("MLFLOW_TUNIX_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=str(REPO), MLFLOW_TUNIX_SYSTEM_METRICS="0", **extra)
    # `mlflow run` starts `python ...`: make it this interpreter, as an activated venv would.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_cli(args, tracking_uri: str, cwd=None, **extra_env) -> subprocess.CompletedProcess:
    """Run `python -m mlflow_tunix.cli ARGS` as a user would, against the given store."""
    return subprocess.run([sys.executable, "-m", "mlflow_tunix.cli", *map(str, args)], cwd=cwd or os.getcwd(),
                          env=cli_env(tracking_uri, **extra_env), capture_output=True, text=True)


# --------------------------------------------------------------------------- real server subprocesses
# Every test `mlflow server` is quiet and light: MLflow would phone home, and MLflow 3.17 otherwise
# starts ~7 huey job workers that busy-loop on a 2-core box.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(url: str, proc: subprocess.Popen, log_path: Path, what: str) -> None:
    """Poll ``url`` until it answers 200; fail with the tail of ``log_path`` if ``proc`` exits first.

    No deadline: the loop ends when the server answers or dies (a first start migrates a new sqlite
    schema, a model server loads jax: both take seconds on a busy box).
    """
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass  # the whole group is gone already


def stop_process_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """Stop a server started with ``start_new_session=True`` and the workers it forked (they share its group).

    SIGTERM, then SIGKILL if it still runs after ``grace`` seconds; ``grace=0`` kills at once, as a crash would.
    """
    if grace:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def start_mlflow_server(root: Path, env_extra: dict | None = None,
                        backend_store_uri: str | None = None) -> tuple[str, subprocess.Popen]:
    """Start a real `mlflow server` on a free 127.0.0.1 port; return its URL and process once /health answers.

    Its sqlite store (or ``backend_store_uri``), proxied artifacts and log live in ``root``: a second start
    on the same ``root`` serves the same store. It runs in its own process group; stop it with stop_process_group.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # not this test's store
    env.update(SERVER_ENV, **(env_extra or {}))
    log_path = root / "server.log"
    with open(log_path, "ab") as log:  # appended: a restart keeps the first server's log
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'server.db'}",
             "--artifacts-destination", str(root / "server-artifacts")],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{url}/health", proc, log_path, "mlflow server")
    except BaseException:
        stop_process_group(proc)
        raise
    return url, proc


@contextmanager
def mlflow_server_process(root: Path, env_extra: dict | None = None, backend_store_uri: str | None = None):
    """start_mlflow_server for a ``with`` block: yields the URL, stops the process group on the way out."""
    url, proc = start_mlflow_server(root, env_extra, backend_store_uri)
    try:
        yield url
    finally:
        stop_process_group(proc)


@contextmanager
def model_server_process(model_uri: str, tracking_uri: str, log_dir: Path):
    """A real `mlflow models serve -m MODEL_URI --env-manager local` on a free 127.0.0.1 port, reading
    ``tracking_uri``; yields its URL once /ping answers, stops its process group on the way out."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {**cli_env(tracking_uri), "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    log_path = Path(log_dir) / "model-server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "-p", str(port),
             "-h", "127.0.0.1"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_answers(f"{url}/ping", server, log_path, "the model server")
        yield url
    finally:
        stop_process_group(server)


# --------------------------------------------------------------------------- a tiny tokenizer and model
def addition_texts(n: int = 300, seed: int = 0) -> list[str]:
    """``n`` short addition traces (prompt + completion), digit-heavy as the real projects are."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        texts.append(f"What is {a}+{b}?\n<reasoning>{a}+{b}={a + b}</reasoning><answer>{a + b}</answer>")
    return texts


def tiny_tokenizer():
    """The byte-level BPE of the tests: trained on addition_texts() with a vocabulary of 300."""
    from mlflow_tunix.tokenizer import TokenizerConfig, train_tokenizer

    return train_tokenizer(addition_texts(), TokenizerConfig(vocab_size=300))


def assert_same_weights(a: dict, b: dict) -> None:
    """Two {name: array} weight sets (``model.flat_params``) are bit for bit the same, not merely close."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


def tiny_model_and_tokenizer():
    """tiny_tokenizer(), and a tiny model whose greedy output varies.

    A freshly initialised model is so unsure that its greedy output is one token repeated, which
    would make "same generations" hold for any weights at all. Larger weights sharpen the logits,
    so each prompt gets its own text and a wrong weight would show.
    """
    # Imported here: test modules that never build a model should not pay for importing jax.
    from mlflow_tunix.model import ModelConfig, build_model, flat_params

    tokenizer = tiny_tokenizer()
    config = ModelConfig(vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64)
    sharp = {k: v * (20.0 if k == "embed" else 8.0) for k, v in flat_params(build_model(config, seed=0)).items()}
    return build_model(config, params=sharp), tokenizer
