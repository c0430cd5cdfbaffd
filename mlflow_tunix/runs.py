"""MLflow-run plumbing for the pipeline: start or continue a run and end it with the right status,
log the resolved config, the datasets and final metrics, and the cosmetics the UI reads (run
colours, the experiment's primary metric, a link to the sorted runs table).

The pipeline (``pipeline.py``) says *what* a run holds; this module knows *how* MLflow wants it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from typing import Sequence

import flax
import jax
import mlflow
import mlflow.data
import optax
import pandas as pd
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_EXPERIMENT_PRIMARY_METRIC_GREATER_IS_BETTER,
    MLFLOW_EXPERIMENT_PRIMARY_METRIC_NAME,
)

from mlflow_tunix.config import ProjectConfig, to_dict, to_flat_dict
from mlflow_tunix.data import Example, digest
from mlflow_tunix.tracking import MlflowTracker, logged_steps, one_line, server_reachable

RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
              "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")
TABLE_FILE = "eval/predictions.json"

# What a run records so that --resume can continue it (resume.py reads these back).
CHECKPOINT_DIR_TAG = "mlflow_tunix.checkpoint_dir"
CONFIG_ARTIFACT = "mlflow_tunix/config.json"  # the exact resolved config, rebuilt by --resume
RESUMED_FROM_TAG = "mlflow_tunix.resumed_from_step"
RESUMED_RUN_TAG = "mlflow_tunix.resumed_run"  # on the run `mlflow run` made for a resume
ERROR_TAG = "mlflow_tunix.error"
PARAMS_SHA256_TAG = "mlflow_tunix.params_sha256"


# --------------------------------------------------------------------------- a run's life
@contextlib.contextmanager
def mlflow_run(run_name: str | None, run_id: str | None = None, tags: dict | None = None):
    """Start (or, under ``mlflow run``, attach to) a run, or continue run ``run_id``; end it
    FAILED/KILLED if anything escapes. ``tags`` go on a new run as it starts (a sweep's trial gets
    ``mlflow.parentRunId`` so, nested under the sweep's run).

    Continuing a run under ``mlflow run`` leaves the run ``mlflow run`` made empty but for a tag
    (``mlflow_tunix.resumed_run``) and a note naming the run that was continued.
    """
    wrapper = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        run = mlflow.start_run(run_id=run_id, log_system_metrics=_system_metrics_available())
        if wrapper and wrapper != run_id:
            client = MlflowClient()
            client.set_tag(wrapper, RESUMED_RUN_TAG, run_id)
            client.set_tag(wrapper, "mlflow.note.content", f"This `mlflow run` continued run {run_id}; "
                                                           "its results are logged there.")
    else:
        run = mlflow.start_run(run_name=None if wrapper else run_name, tags=tags,
                               log_system_metrics=_system_metrics_available())
        if wrapper and run_name:  # `mlflow run` names its run at random: give it the project's name
            mlflow.set_tag("mlflow.runName", run_name)
    try:
        yield run
    except KeyboardInterrupt:
        _end_run("KILLED")
        raise
    except BaseException as exc:
        _end_run("FAILED", exc)
        raise
    else:
        mlflow.end_run("FINISHED")


def _end_run(status: str, exc: BaseException | None = None) -> None:
    """End the active run with ``status`` (and the error as a tag); if the tracking server is gone,
    only forget the run locally: MLflow would retry the dead server for minutes, and the run is
    continued (``--resume``) once it is back."""
    if server_reachable(mlflow.get_tracking_uri()):
        if exc is not None:
            with contextlib.suppress(Exception):
                mlflow.set_tag(ERROR_TAG, one_line(exc)[:5000])
        mlflow.end_run(status)
        return
    with temporary_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"), contextlib.suppress(Exception):  # one try
        mlflow.end_run(status)  # pops the run off MLflow's stack before it calls the server


@contextlib.contextmanager
def temporary_env(**values: str):
    """Set environment variables for the block, then put back what was there."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _system_metrics_available() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("MLFLOW_TUNIX_SYSTEM_METRICS", "1") != "0"


def version_tags() -> dict[str, str]:
    devices = jax.devices()
    return {
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "optax_version": optax.__version__,
        "device_platform": devices[0].platform,
        "device_count": str(len(devices)),
    }


def run_color(run_id: str, experiment_id: str | None = None) -> str:
    """A chart colour for the run: the first palette colour no recent run of the experiment uses (so
    curves compared side by side differ), else one picked by the run id."""
    fallback = RUN_COLORS[int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % len(RUN_COLORS)]
    if experiment_id is None:
        return fallback
    try:
        runs = MlflowClient().search_runs([experiment_id], max_results=len(RUN_COLORS) - 1,
                                          order_by=["attributes.start_time DESC"])
    except Exception:  # a colour is not worth failing a run for
        return fallback
    used = {r.data.tags.get("mlflow.runColor") for r in runs if r.info.run_id != run_id}
    return next((c for c in RUN_COLORS if c not in used), fallback)


def set_primary_metric(experiment_id: str, metric: str = "answer_accuracy") -> None:
    """The experiment's primary metric (experiment tags the MLflow UI reads): higher answer_accuracy is better."""
    client = MlflowClient()
    client.set_experiment_tag(experiment_id, MLFLOW_EXPERIMENT_PRIMARY_METRIC_NAME, metric)
    client.set_experiment_tag(experiment_id, MLFLOW_EXPERIMENT_PRIMARY_METRIC_GREATER_IS_BETTER, "True")


def ui_link(experiment_id: str, run_id: str | None = None) -> str:
    """Where to look: the runs table sorted by answer_accuracy (or one run), on this tracking server."""
    uri = mlflow.get_tracking_uri()
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    if run_id:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{base}/#/experiments/{experiment_id}/runs?orderByKey=metrics.%60answer_accuracy%60&orderByAsc=false"


# The runs table's columns in the link the job prints (MLflow keeps chosen columns out of the URL).
TABLE_COLUMNS = ("answer_accuracy", "format_rate", "mean_new_tokens", "final_loss", "train_seconds")
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: a view of the runs table, as the UI's Share button saves it


def table_link(experiment_id: str, metrics=TABLE_COLUMNS, params=(), sort: str = "answer_accuracy") -> str:
    """A link to the runs table sorted by ``sort`` (best first) that shows ``metrics`` and ``params``
    as columns.

    MLflow's URL holds the sort but not the columns; its "Share" button saves the whole view as an
    experiment tag and links to it by key (``?viewStateShareKey=``). This does the same: the key is
    the view's hash, so asking again for the same view writes the same tag. Falls back to the plain
    sorted link if the tag cannot be written."""
    def column(kind, name):
        return f"{kind}.`{name}`"

    view = {"orderByKey": column("metrics", sort), "orderByAsc": False,
            "selectedColumns": [column("metrics", m) for m in metrics] + [column("params", p) for p in params]}
    text = json.dumps(view, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    try:
        MlflowClient().set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, text)
    except Exception:  # a link is not worth failing a run for
        return ui_link(experiment_id)
    return ui_link(experiment_id).split("?")[0] + f"?viewStateShareKey={key}"


# --------------------------------------------------------------------------- what a run logs
def log_config(cfg: ProjectConfig, run_id: str, run_dir) -> None:
    """The resolved config as params, the exact config as an artifact (what --resume rebuilds), the tags."""
    tracker = MlflowTracker(run_id)
    # Under `mlflow run` the run already holds the MLproject parameters (registered_model_name among
    # them, written its own way, e.g. '' quoted): MLflow refuses a second value, so those stay as they are.
    run = tracker.client.get_run(run_id)
    there = run.data.params
    params = {k: v for k, v in to_flat_dict(cfg).items()
              if k not in ("base_dir", "model.vocab_size", "description") and k not in there}
    tracker.log_params(params)
    mlflow.log_dict(jsonable(to_dict(cfg)), CONFIG_ARTIFACT)
    tracker.set_tags({**version_tags(), "mlflow.runColor": run_color(run_id, run.info.experiment_id),
                      "mlflow_tunix.project": cfg.name,
                      CHECKPOINT_DIR_TAG: str(run_dir)})


def log_metrics_once(run_id: str, metrics: dict, step: int, resumed: bool, **kwargs) -> None:
    """``mlflow.log_metrics`` at ``step``, minus the metrics a resumed run already has a point of there."""
    if resumed:
        client = MlflowClient()
        metrics = {k: v for k, v in metrics.items() if step not in logged_steps(client, run_id, k)}
    if metrics:
        mlflow.log_metrics(metrics, step=step, **kwargs)


def log_eval_table(rows: list[dict], table_file: str) -> None:
    """Every scored item as one row of an MLflow table (the UI compares runs row by row)."""
    mlflow.log_table(data=pd.DataFrame(rows), artifact_file=table_file)


def jsonable(value):
    """``value`` as plain JSON types (tuples and sets as lists, anything else as its str)."""
    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


# --------------------------------------------------------------------------- datasets
MLFLOW_DIGEST_CHARS = 16  # MLflow stores dataset digests in a 36-char column


def log_input(dataset, context: str, tries: int = 5) -> None:
    """``mlflow.log_input``, again when another run logged the same dataset at the same moment.

    MLflow's SQL store looks the dataset up, then inserts it: two runs of one project starting
    together (a sweep's trials) both insert, and the second fails on the store's unique key
    (sqlite "UNIQUE constraint failed", PostgreSQL "duplicate key"). Once the row exists the
    look-up finds it."""
    for attempt in range(tries):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as exc:
            text = str(exc)
            if attempt == tries - 1 or not ("UNIQUE constraint failed" in text or "duplicate key" in text):
                raise
            time.sleep(0.05 * (attempt + 1))


def to_mlflow_dataset(examples: Sequence[Example], name: str, source: str):
    """An ``mlflow.data.PandasDataset`` (columns id, prompt, completion, answer, category; target
    "answer") whose digest is the first 16 chars of :func:`digest`, ready for
    ``mlflow.log_input``. A path becomes a file source; anything MLflow cannot resolve (such as
    "generator:addition?n=1000&seed=0") is recorded as a code source naming it."""
    df = pd.DataFrame(
        [[ex.id, ex.prompt, ex.completion, ex.answer, ex.category] for ex in examples],
        columns=["id", "prompt", "completion", "answer", "category"],
    )
    try:
        with warnings.catch_warnings():
            # A local path matches two equivalent resolvers; MLflow warns and picks one.
            warnings.simplefilter("ignore", UserWarning)
            resolved = resolve_dataset_source(str(source))
    except MlflowException:
        resolved = CodeDatasetSource(tags={"mlflow.source.name": str(source)})
    return mlflow.data.from_pandas(
        df, source=resolved, name=name, targets="answer", digest=digest(examples)[:MLFLOW_DIGEST_CHARS]
    )
