"""What ``--resume RUN_ID`` continues, and the folder a run keeps for it.

Every run trained by the pipeline owns a folder ``<checkpoint root>/<run id>/`` holding
``checkpoints/`` (Orbax), ``tokenizer/`` (so a resumed run tokenizes exactly as the first one did),
``unsent-metrics.jsonl`` (if the tracking server went away) and ``.lock`` (held while training).
The run itself records where that folder is (a tag) and its exact config (an artifact), so
``--resume`` needs nothing else (docs/fault-tolerance.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_tunix.config import ProjectConfig, from_dict, validate
from mlflow_tunix.errors import TunixError
from mlflow_tunix.runs import CHECKPOINT_DIR_TAG, CONFIG_ARTIFACT, temporary_env
from mlflow_tunix.tokenizer import load_tokenizer

DEFAULT_CHECKPOINT_ROOT = "~/.cache/mlflow-tunix/checkpoints"
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
SPILL_FILE = "unsent-metrics.jsonl"


@dataclass
class Resume:
    """A run to continue: its id, its own config and its folder."""

    run_id: str
    cfg: ProjectConfig
    run_dir: Path
    has_inputs: bool  # the run logged its datasets already
    params: set  # the names of the params it logged


def checkpoint_root(cfg: ProjectConfig) -> Path:
    """Where runs keep their folders: ``train.checkpoint_dir`` (relative to the current folder),
    else $MLFLOW_TUNIX_CHECKPOINT_DIR, else ``~/.cache/mlflow-tunix/checkpoints``."""
    root = cfg.train.checkpoint_dir or os.environ.get("MLFLOW_TUNIX_CHECKPOINT_DIR") or DEFAULT_CHECKPOINT_ROOT
    return Path(root).expanduser().absolute()


def find(run_id: str) -> Resume:
    """The run ``run_id`` as something to continue, or a TunixError saying why it cannot be."""
    where = f"--resume {run_id}"
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        raise TunixError(f"{where}: no such run in the tracking store {mlflow.get_tracking_uri()}") from None
    if run.info.lifecycle_stage == "deleted":
        raise TunixError(f"{where}: the run is deleted; restore it first (mlflow runs restore --run-id {run_id})")
    if run.info.status == "FINISHED":
        raise TunixError(f"{where}: the run FINISHED; there is nothing to resume")
    run_dir = run.data.tags.get(CHECKPOINT_DIR_TAG)
    try:
        with temporary_env(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):  # one small file: no progress bar
            raw = mlflow.artifacts.load_dict(f"runs:/{run_id}/{CONFIG_ARTIFACT}")
    except Exception:
        raw = None
    if not run_dir or raw is None:
        raise TunixError(f"{where}: the run was not started by `mlflow-tunix run/train` (it has no "
                         f"{CHECKPOINT_DIR_TAG} tag or {CONFIG_ARTIFACT} artifact); it cannot be resumed")
    cfg = from_dict(ProjectConfig, raw)
    validate(cfg)
    return Resume(run_id, cfg, Path(run_dir), bool(run.inputs.dataset_inputs), set(run.data.params))


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, run_id: str):
    """Hold ``run_dir/.lock`` while training: two processes must never write one run's checkpoints.
    The OS drops the lock when the process dies, even by SIGKILL."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TunixError(f"run {run_id} is being trained by another process right now ({run_dir}/.lock is held); "
                             "wait for it or stop it first") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save_tokenizer(tokenizer, run_dir: Path) -> None:
    """Keep the run's tokenizer in its folder (written aside, then renamed into place), unless it is there."""
    path = run_dir / TOKENIZER_DIR
    if path.is_dir():
        return
    staging = path.with_name(f".{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(str(staging))
    os.replace(staging, path)


def saved_tokenizer(target: Resume | None):
    """The tokenizer a resumed run saved (None for a new run, or one that failed before saving it)."""
    path = target.run_dir / TOKENIZER_DIR if target is not None else None
    return load_tokenizer(path) if path is not None and path.is_dir() else None
