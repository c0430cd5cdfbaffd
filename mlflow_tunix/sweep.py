"""Hyper-parameter sweeps on Ray Tune, as nested MLflow runs (``mlflow-tunix sweep``).

One **parent run** (made here, in the driver) holds the search space, the scheduler, the best
trial's params and metrics, and a table of all trials. Each trial is the whole job (``pipeline.run_main``:
train, evaluate, log the model) in a **child run** nested under it with ``mlflow.parentRunId``. The
trial reports its loss to Tune every ``train.log_every`` steps through a tracker wrapper, so an ASHA
scheduler can stop it early.

Why the runs are written by hand rather than by Ray's MLflow integration (measured with Ray 2.60 and
MLflow 3.17): ``MLflowLoggerCallback`` makes one top-level run per trial and cannot nest (ray#19978);
``setup_mlflow`` records nothing unless the URI is set inside the trainable (ray#45456); a trial
stopped by a scheduler ends as FINISHED like a finished one (ray#54564) and never reaches its own
``end_run``: so a driver-side callback (:class:`_TrialRuns`) marks it KILLED with a tag saying who
stopped it. Several processes opening a new sqlite store at once race on its schema migration, so
the store, the experiment and the parent run are made in the driver before any trial starts.

JAX threads of concurrent trials fight over the cores (each at half speed, measured), and Ray's
per-trial CPU count pins nothing: each trial takes a free core of its node (an flock'ed file per
core) and pins its process to it with ``os.sched_setaffinity``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow_tunix.compare import BEST_RUN_TAG  # on the sweep run; compare --parent puts that trial first
from mlflow_tunix.errors import ConfigError, TunixError

KINDS = ("choice", "uniform", "loguniform", "randint", "grid")
# A space key that picks the project itself (e.g. addition vs addition-direct: data that no dotted
# key reaches); every other key is a dotted config key applied to it.
PROJECT_KEY = "project"
INSTALL_HINT = "the sweep needs Ray Tune: pip install 'mlflow-tunix[sweep]'"

STOPPED_BY_TAG = "mlflow_tunix.stopped_by"  # on a child run the scheduler stopped early
TRIAL_TAG = "mlflow_tunix.sweep_trial"  # the Tune trial id of a child run
SWEEP_TAG = "mlflow_tunix.sweep"  # on the parent run: "true"
TRIALS_TABLE = "sweep/trials.json"
SPACE_ARTIFACT = "sweep/space.yaml"
# Environment a trial gets from the driver (a cluster's workers do not share the driver's).
PASSED_ENV = ("MLFLOW_TUNIX_CHECKPOINT_DIR", "MLFLOW_TUNIX_JAX_CACHE", "MLFLOW_TUNIX_SYSTEM_METRICS",
              "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PYTHONPATH")


# --------------------------------------------------------------------------- the search space
@dataclass(frozen=True)
class Dimension:
    key: str  # a dotted config key, e.g. train.learning_rate
    kind: str  # one of KINDS
    values: tuple  # choice/grid: the values; uniform/loguniform: (low, high); randint: (low, high), high excluded

    def candidates(self) -> list:
        """The values to check against the config before anything starts: every listed value, or both ends."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        low, high = self.values
        return [low, high - 1] if self.kind == "randint" else [low, high]


def load_space(path, config: str, overrides: dict | None = None) -> list[Dimension]:
    """Read a space file (``KEY: {KIND: ARGS}`` per line) and check every value against the project.

    Raises ConfigError naming the file and the key: a kind we do not know, bad bounds, or a value
    the project's config refuses (unknown key, wrong type, out of range).
    """
    import yaml

    from mlflow_tunix.config import load_project

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of dotted config keys to {{kind: values}}, e.g. "
                          "train.learning_rate: {loguniform: [0.0003, 0.01]}")
    dims = [_dimension(path, str(key), spec) for key, spec in raw.items()]
    projects = [config]
    for dim in dims:
        if dim.key == PROJECT_KEY:
            if dim.kind not in ("choice", "grid"):
                raise ConfigError(f"{path}: {PROJECT_KEY}: takes choice or grid (of project names or config files)")
            projects = [str(v) for v in dim.values]
    for dim in dims:
        for value in dim.candidates():
            for project in projects:  # every value must fit every project it may be tried with
                try:
                    if dim.key == PROJECT_KEY:
                        load_project(str(value), overrides)
                    else:
                        load_project(project, {**(overrides or {}), dim.key: value})
                except ConfigError as exc:
                    raise ConfigError(f"{path}: {dim.key}={value!r}: {exc}") from None
    return dims


def _dimension(path: Path, key: str, spec) -> Dimension:
    where = f"{path}: {key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one of {', '.join(KINDS)} with its values, e.g. {{choice: [1, 2]}}")
    (kind, values), = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} takes a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}: {kind} takes [low, high] numbers, got {values!r}")
        low, high = values
        if not low < high:
            raise ConfigError(f"{where}: {kind} needs low < high, got {values!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {low!r}")
        if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: randint takes whole numbers [low, high), got {values!r}")
    return Dimension(key, kind, tuple(values))


def tune_space(dims: list[Dimension]) -> dict:
    """The space as Ray Tune's ``param_space`` (flat: dotted keys are config overrides)."""
    from ray import tune

    make = {"choice": lambda v: tune.choice(list(v)), "grid": lambda v: tune.grid_search(list(v)),
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(int(v[0]), int(v[1]))}
    return {dim.key: make[dim.kind](dim.values) for dim in dims}


# --------------------------------------------------------------------------- inside a trial (a Ray worker)
_core_lock = None  # the open lock file of the core this process is pinned to (held until it exits)


def pin_to_a_free_core() -> int | None:
    """Pin this process (every thread it has, and so every thread they start) to a core no other
    trial on this node holds; None when all are taken (then it runs unpinned).

    A core is held by an flock on a file per core: the kernel drops it when the process ends, even
    when Tune kills the trial."""
    global _core_lock
    if _core_lock is not None:
        return int(Path(_core_lock.name).stem.split("-")[-1])
    folder = Path(tempfile.gettempdir()) / f"mlflow-tunix-cores-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    for core in sorted(os.sched_getaffinity(0)):
        handle = open(folder / f"core-{core}", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _core_lock = handle
        for tid in os.listdir("/proc/self/task"):  # sched_setaffinity(pid) moves one thread only
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), {core})
        return core
    return None


class StoppedByScheduler(KeyboardInterrupt):
    """Ray Tune's scheduler stopped this trial. Tune ends a stopped trial's training thread with
    ``sys.exit(0)`` inside ``tune.report``; as a SystemExit, the trial's run would end FAILED with
    the error "0". As a KeyboardInterrupt the run ends KILLED, as the driver marks it."""


class TuneReporter:
    """A tracker that passes everything on and reports the loss to Ray Tune (for the scheduler).

    The last step's loss is not reported on its own: it goes with the trial's final result, after
    the evaluation. ASHA puts a rung at ``steps`` too (rungs are grace * 2**k below max_t = steps + 1),
    and a trial judged there on its last loss would be killed before it is evaluated: it ran
    everything and kept nothing (seen when a slower trial reached the last rung second)."""

    def __init__(self, inner, run_id: str, steps: int, report=None):
        if report is None:
            from ray import tune

            report = tune.report
        self.inner, self.run_id, self.steps, self.report = inner, run_id, steps, report
        self.last_loss = float("nan")

    def log_scalar(self, name, value, step):
        self.inner.log_scalar(name, value, step)
        if name == "loss":
            self.last_loss = float(value)
            if int(step) + 1 < self.steps:
                try:
                    self.report({"loss": float(value), "step": int(step) + 1, "mlflow_run_id": self.run_id})
                except SystemExit:
                    raise StoppedByScheduler(f"stopped by the scheduler at step {int(step) + 1}") from None

    def flush(self):
        self.inner.flush()

    def sync(self):
        self.inner.sync()

    def close(self):
        self.inner.close()


def _trial(values: dict, *, setup: dict) -> None:
    """One trial: the whole job with ``values`` (dotted overrides) in a child run of the sweep."""
    import mlflow
    from ray import tune

    core = pin_to_a_free_core()  # before jax starts its threads
    os.environ.pop("MLFLOW_RUN_ID", None)  # (the driver's, under `mlflow run`: not this trial's run)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    mlflow.set_tracking_uri(setup["tracking_uri"])
    mlflow.set_registry_uri(setup["tracking_uri"])
    mlflow.set_experiment(experiment_id=setup["experiment_id"])

    from mlflow_tunix.config import load_project
    from mlflow_tunix.pipeline import run_main

    values = dict(values)
    project = values.pop(PROJECT_KEY, None)
    cfg = load_project(_config_path(project) if project else setup["config"], {**setup["overrides"], **values})
    trial_id = tune.get_context().get_trial_id()
    tags = {"mlflow.parentRunId": setup["parent_run_id"], TRIAL_TAG: trial_id,
            "mlflow_tunix.pinned_core": "none" if core is None else str(core)}
    reporters = []

    def wrap(tracker, run_id):
        reporters.append(TuneReporter(tracker, run_id, cfg.train.steps))
        return reporters[-1]

    try:
        result = run_main(cfg, register=False, progress=False, tags=tags, wrap_tracker=wrap)
    except StoppedByScheduler:
        sys.exit(0)  # as Tune ends a stopped trial (anything else would be reported as the trial's error)
    final = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    # The last result says the run ended by itself (the driver marks the others stopped).
    tune.report({**final, "loss": reporters[-1].last_loss, "step": cfg.train.steps, "mlflow_run_id": result.run_id,
                 "trial_finished": 1})


# --------------------------------------------------------------------------- the driver
def _trial_callback_class():
    from ray import tune

    class _TrialRuns(tune.Callback):
        """Driver side: ends the child runs the trials could not end themselves.

        A trial the scheduler stopped is killed before its run ends: KILLED, tagged with the
        scheduler's name. A trial that crashed is FAILED (a child run is made for it if it crashed
        before starting its own)."""

        def __init__(self, scheduler: str, tracking_uri: str, experiment_id: str, parent_run_id: str):
            self.scheduler, self.uri, self.experiment_id, self.parent = scheduler, tracking_uri, experiment_id, parent_run_id
            self.last: dict[str, dict] = {}  # trial id -> its last result
            self.stopped: dict[str, str] = {}  # run id -> why (for the trials table)

        def _client(self):
            from mlflow.tracking import MlflowClient

            return MlflowClient(self.uri)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.last[trial.trial_id] = dict(result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = self.last.get(trial.trial_id, {})
            run_id = result.get("mlflow_run_id")
            if run_id and not result.get("trial_finished"):  # ended by the scheduler, mid-training
                step = result.get("step", "?")
                why = f"stopped by the {self.scheduler} scheduler at step {step}"
                self.stopped[run_id] = why
                client = self._client()
                client.set_tag(run_id, STOPPED_BY_TAG, why)
                client.set_terminated(run_id, "KILLED")

        def on_trial_error(self, iteration, trials, trial, **info):
            from mlflow_tunix.tracking import one_line

            client = self._client()
            run_id = self.last.get(trial.trial_id, {}).get("mlflow_run_id") or _run_of_trial(
                client, self.experiment_id, self.parent, trial.trial_id)
            error = _trial_error(trial)
            if run_id is None:  # it failed before its run started (e.g. a value that does not fit the data)
                run = client.create_run(self.experiment_id, run_name=f"trial-{trial.trial_id}", tags={
                    "mlflow.parentRunId": self.parent, TRIAL_TAG: trial.trial_id})
                run_id = run.info.run_id
                from mlflow.entities import Param

                client.log_batch(run_id, params=[Param(k, str(v)) for k, v in trial.config.items()])
            run = client.get_run(run_id)
            if "mlflow_tunix.error" not in run.data.tags:  # (the job tags its own errors)
                client.set_tag(run_id, "mlflow_tunix.error", one_line(Exception(error))[:5000])
            if run.info.status == "RUNNING":
                client.set_terminated(run_id, "FAILED")

    return _TrialRuns


def _run_of_trial(client, experiment_id: str, parent: str, trial_id: str) -> str | None:
    found = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}' "
                                                              f"AND tags.`{TRIAL_TAG}` = '{trial_id}'")
    return found[0].info.run_id if found else None


def _trial_error(trial) -> str:
    """The last line of the trial's error (Ray keeps the traceback in a file)."""
    path = getattr(trial, "error_file", None) or ""
    with contextlib.suppress(OSError):
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1].strip()
    return "the trial crashed"


def _config_path(config: str) -> str:
    """A project name or config file as an absolute path (trials may run in another folder)."""
    from mlflow_tunix.config import resolve_path

    return str(resolve_path(config).absolute())


def absolute_tracking_uri(uri: str) -> str:
    """A sqlite URI with an absolute path: trials run elsewhere than the driver's current folder."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).absolute())
    return uri


@dataclass
class SweepResult:
    parent_run_id: str
    experiment_id: str
    trials: list[dict]  # the trials table's rows
    best: dict | None  # the best finished trial's row
    registered_version: str | None


def run_sweep(config: str, space_path, *, trials: int = 1, metric: str = "answer_accuracy", mode: str = "max",
              scheduler: str = "asha", max_concurrent: int | None = None, ray_address: str | None = None,
              register_best: bool = False, overrides: dict | None = None) -> SweepResult:
    """Run the sweep; see the module docstring. ``trials`` is Tune's ``num_samples`` (each grid point
    is run ``trials`` times, each random draw once)."""
    try:
        import ray
        from ray import tune
    except ImportError:
        raise TunixError(INSTALL_HINT) from None
    import mlflow

    from mlflow_tunix import runs
    from mlflow_tunix.config import load_project, resolve_path

    if mode not in ("max", "min"):
        raise ConfigError(f"--mode: {mode!r} is not max or min")
    if scheduler not in ("asha", "fifo"):
        raise ConfigError(f"--scheduler: {scheduler!r} is not asha or fifo")
    overrides = dict(overrides or {})
    path = resolve_path(config)
    config = str(path.absolute())
    cfg = load_project(config, overrides)
    dims = load_space(space_path, config, overrides)
    uri = absolute_tracking_uri(mlflow.get_tracking_uri())
    mlflow.set_tracking_uri(uri)

    with runs.mlflow_run(f"sweep-{cfg.name}") as parent:
        parent_id, experiment_id = parent.info.run_id, parent.info.experiment_id
        mlflow.set_tags({SWEEP_TAG: "true", "mlflow_tunix.project": cfg.name})
        mlflow.log_params({"sweep.space": json.dumps({d.key: {d.kind: list(d.values)} for d in dims}),
                           "sweep.scheduler": scheduler, "sweep.metric": metric, "sweep.mode": mode,
                           "sweep.trials": trials, "sweep.max_concurrent": max_concurrent or "cores",
                           "sweep.project": cfg.name, "sweep.ray_address": ray_address or "local",
                           **{f"sweep.set.{k}": v for k, v in overrides.items()}})
        mlflow.log_text(Path(space_path).read_text(encoding="utf-8"), SPACE_ARTIFACT)
        runs.set_primary_metric(experiment_id, metric)
        _log(f"sweep run {parent_id}: {len(dims)} dimension(s), {trials} sample(s), scheduler {scheduler}")

        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update(MLFLOW_TRACKING_URI=uri, RAY_CHDIR_TO_TRIAL_DIR="0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 writes a token under ~ otherwise
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=ray_address or "local", runtime_env={"env_vars": env}, include_dashboard=False,
                 log_to_driver=False, configure_logging=True, logging_level="WARNING")
        storage = tempfile.mkdtemp(prefix="mlflow-tunix-tune-")
        try:
            callback = _trial_callback_class()(scheduler, uri, experiment_id, parent_id)
            setup = {"config": config, "overrides": overrides, "tracking_uri": uri, "experiment_id": experiment_id,
                     "parent_run_id": parent_id}
            started = time.time()
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(_trial, setup=setup), {"cpu": 1}),
                param_space=tune_space(dims),
                tune_config=tune.TuneConfig(num_samples=trials, scheduler=_scheduler(scheduler, cfg),
                                            max_concurrent_trials=max_concurrent, reuse_actors=False),
                run_config=tune.RunConfig(name=f"sweep-{parent_id[:8]}", storage_path=storage, callbacks=[callback],
                                          verbose=1, failure_config=tune.FailureConfig(max_failures=0)),
            )
            tuner.fit()
            seconds = time.time() - started
        finally:
            ray.shutdown()
            shutil.rmtree(storage, ignore_errors=True)
        rows = _trials_table(experiment_id, parent_id, dims, metric, callback.stopped)
        mlflow.log_table(_as_frame(rows), artifact_file=TRIALS_TABLE)
        mlflow.log_metric("sweep_seconds", seconds)
        best = _best(rows, metric, mode)
        version, model_name = None, cfg.model_name
        if best is not None:
            mlflow.set_tag(BEST_RUN_TAG, best["run_id"])
            mlflow.log_params({f"best.{d.key}": best[d.key] for d in dims})
            model_name = best["registered_model_name"] or model_name
            mlflow.log_metrics({f"best/{k}": v for k, v in best["metrics"].items()
                                if isinstance(v, (int, float)) and math.isfinite(v)})
            _log(f"best trial: run {best['run_id']} {metric}={best['metrics'].get(metric)} "
                 + " ".join(f"{d.key}={best[d.key]}" for d in dims))
            if register_best:
                version = _register(best["run_id"], model_name)
                mlflow.set_tag("mlflow_tunix.registered_version", version)
        else:
            _log(f"no trial finished with {metric}: nothing is best")
        counts = {s: sum(r["status"] == s for r in rows) for s in ("FINISHED", "KILLED", "FAILED")}
        _log(f"{len(rows)} trials in {seconds:.0f}s: " + ", ".join(f"{n} {s}" for s, n in counts.items())
             + f"; compare them: mlflow-tunix compare --parent {parent_id}")
        _log(f"see them: {runs.table_link(experiment_id, params=[d.key for d in dims if d.key != PROJECT_KEY], sort=metric)}")
        return SweepResult(parent_id, experiment_id, rows, best, version)


def _scheduler(name: str, cfg):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if name == "fifo":
        return FIFOScheduler()
    steps = cfg.train.steps
    # Rungs at a quarter and a half of training (and one at the end, which only the final result,
    # after the evaluation, reaches: TuneReporter). max_t past the last step: ASHA stops any trial
    # whose step reaches max_t, and it must not stop one before its evaluation.
    return ASHAScheduler(time_attr="step", metric="loss", mode="min", max_t=steps + 1,
                         grace_period=max(1, steps // 4), reduction_factor=2)


def _trials_table(experiment_id: str, parent_id: str, dims, metric: str, stopped: dict) -> list[dict]:
    from mlflow.tracking import MlflowClient

    from mlflow_tunix import runs

    client = MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                               order_by=["attributes.start_time ASC"], max_results=10000)
    rows = []
    for run in found:
        info, data = run.info, run.data
        if info.run_id in stopped and info.status != "KILLED":  # a stopped trial's own late end lost the race
            client.set_terminated(info.run_id, "KILLED")
            info = client.get_run(info.run_id).info
        end = info.end_time or int(time.time() * 1000)
        project = data.tags.get("mlflow_tunix.project", "")
        named = data.params.get("registered_model_name")
        rows.append({
            "trial": data.tags.get(TRIAL_TAG, ""),
            "run_id": info.run_id,
            "status": info.status,
            **{d.key: (project if d.key == PROJECT_KEY else data.params.get(d.key, "")) for d in dims},
            metric: data.metrics.get(metric),
            "final_loss": data.metrics.get("final_loss"),
            "metrics": dict(data.metrics),
            "seconds": round((end - info.start_time) / 1000, 1),
            "stopped_by": data.tags.get(STOPPED_BY_TAG, ""),
            "error": data.tags.get("mlflow_tunix.error", ""),
            "link": runs.ui_link(experiment_id, info.run_id),
            "registered_model_name": named if named not in (None, "", "None") else f"tunix-{project}" if project else "",
        })
    return rows


def _as_frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame([{k: v for k, v in r.items() if k != "metrics"} for r in rows])


def _best(rows: list[dict], metric: str, mode: str) -> dict | None:
    done = [r for r in rows if r["status"] == "FINISHED" and r[metric] is not None and math.isfinite(r[metric])]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r[metric])


def _register(run_id: str, model_name: str) -> str:
    """Register the best trial's logged model, as the job registers its own (registry.register)."""
    from mlflow.tracking import MlflowClient

    from mlflow_tunix import registry, runs

    client = MlflowClient()
    run = client.get_run(run_id)
    digests = {}
    for item in run.inputs.dataset_inputs:
        context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), "")
        digests[context] = item.dataset
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    if not models:
        raise TunixError(f"run {run_id} logged no model to register")
    eval_keys = ("answer_accuracy", "format_rate", "mean_new_tokens", "n_eval")
    metrics = {k: v for k, v in run.data.metrics.items()
               if k in eval_keys or k.startswith("accuracy/") or "/answer_accuracy" in k}
    reg = registry.register(model_name, models[0].model_uri, run_id=run_id, metrics=metrics,
                            eval_digest=digests["evaluation"].digest, eval_dataset=digests["evaluation"].name,
                            train_digest=digests["training"].digest,
                            params_sha256=run.data.tags.get(runs.PARAMS_SHA256_TAG, ""),
                            project=run.data.tags.get("mlflow_tunix.project", ""))
    _log(f"registered {model_name} version {reg.version} (the best trial's model)")
    return reg.version


def _log(message: str) -> None:
    print(f"[mlflow-tunix] {message}", file=sys.stderr, flush=True)
