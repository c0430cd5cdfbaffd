"""Shared fixtures: a real sqlite MLflow store per test, paths to the repo and the shared fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
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


@pytest.fixture
def fixtures_dir():
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES


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
