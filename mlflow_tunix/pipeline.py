"""The whole job, stage after stage: data -> tokenizer -> model -> train -> generate/evaluate ->
flavor -> registry, inside one MLflow run.

``run_main`` is what ``mlflow run .`` (entry point ``main``) and ``mlflow-tunix run`` do;
``run_train`` stops after logging the model; ``run_evaluate`` scores a logged model. Data and
tokenizer are prepared before the run starts, so a config value that does not fit the data starts
no run. Any later failure marks the MLflow run FAILED before the error reaches the CLI (unless the
tracking server is gone), and registration is the very last step, so a failed run never leaves a
registered version behind. Training is checkpointed; ``resume=RUN_ID`` continues a run that
stopped, to the same weights (docs/fault-tolerance.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from mlflow_tunix import data as data_mod
from mlflow_tunix.config import DataSource, ProjectConfig, to_dict, to_flat_dict
from mlflow_tunix.errors import ConfigError, DataError, TunixError
from mlflow_tunix.tracking import is_connection_error, server_reachable

RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
              "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")
TABLE_FILE = "eval/predictions.json"

# Where a run keeps what --resume needs. The folder <checkpoint root>/<run id>/ holds
# checkpoints/ (Orbax), tokenizer/, unsent-metrics.jsonl (if the server went away) and .lock.
CHECKPOINT_DIR_TAG = "mlflow_tunix.checkpoint_dir"
CONFIG_ARTIFACT = "mlflow_tunix/config.json"  # the exact resolved config, rebuilt by --resume
RESUMED_FROM_TAG = "mlflow_tunix.resumed_from_step"
RESUMED_RUN_TAG = "mlflow_tunix.resumed_run"  # on the run `mlflow run` made for a resume
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
SPILL_FILE = "unsent-metrics.jsonl"


def log(message: str) -> None:
    print(f"[mlflow-tunix] {message}", file=sys.stderr, flush=True)


def setup_jax() -> None:
    """Persistent XLA compilation cache: a second run skips most compile time (1.7 s -> 0.2 s measured)."""
    import jax

    cache = os.environ.get("MLFLOW_TUNIX_JAX_CACHE", str(Path.home() / ".cache" / "mlflow-tunix" / "jax"))
    if cache and cache != "0":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# --------------------------------------------------------------------------- data
@dataclass
class Datasets:
    train: list
    eval: list
    train_source: str
    eval_source: str
    dropped_overlap: int
    extra: dict  # name -> (examples, source description)


def load_source(source: DataSource, base_dir: str) -> list:
    if source.path:
        path = Path(base_dir) / source.path  # a relative path is relative to the config file
        with contextlib.suppress(ValueError):
            path = path.relative_to(Path.cwd())  # error messages read better relative
        return data_mod.read_jsonl(path)
    records = data_mod.generate(source.generator, n=source.n, seed=source.seed, **dict(source.options))
    return data_mod.examples_from_records(records, source=f"generator:{source.generator}")


def build_datasets(cfg: ProjectConfig) -> Datasets:
    train = [ex for src in cfg.data.train for ex in load_source(src, cfg.base_dir)]
    if cfg.data.eval:
        held = [ex for src in cfg.data.eval for ex in load_source(src, cfg.base_dir)]
        eval_source = " + ".join(s.describe() for s in cfg.data.eval)
    else:
        train, held = data_mod.split(train, cfg.data.eval_fraction, cfg.data.split_seed)
        eval_source = f"split({cfg.data.eval_fraction}, seed={cfg.data.split_seed}) of training data"
    for ex in train:
        if ex.completion is None:
            raise DataError(ex.source or "train data", None, f"item {ex.id!r} has no completion to train on "
                            "(an eval-item file was given as training data)")
    extra = {name: ([ex for src in sources for ex in load_source(src, cfg.base_dir)],
                    " + ".join(s.describe() for s in sources))
             for name, sources in cfg.data.extra_eval.items()}
    train, dropped = data_mod.drop_overlap(train, held)
    for examples, _ in extra.values():
        train, n = data_mod.drop_overlap(train, examples)
        dropped += n
    if not train:
        raise DataError(cfg.data.train[0].describe(), None, "no training examples left after holding out the eval set")
    if not held:
        raise DataError(eval_source, None, "the eval set is empty")
    return Datasets(train, held, " + ".join(s.describe() for s in cfg.data.train), eval_source, dropped, extra)


# --------------------------------------------------------------------------- data -> tokens, before any run
@dataclass
class Prepared:
    """Everything training needs that comes from the data, checked against the config."""

    ds: Datasets
    tokenizer: Any
    prompts: list  # the training prompts, rendered with the template
    train_tok: Any  # train.TokenizedData
    eval_tok: Any  # None when no eval example has a completion
    model_cfg: Any  # model.ModelConfig with the tokenizer's vocab_size


def prepare(cfg: ProjectConfig, tokenizer=None) -> Prepared:
    """Data -> tokenizer -> token arrays, and the config checks that need the data (the batch
    against the training set, ``model.max_seq_len`` against the longest example).

    Raises DataError (a bad file) or ConfigError (a value that does not fit this data). Starts no
    MLflow run. ``tokenizer``: use this one (a resumed run's own) instead of training one.
    """
    from mlflow_tunix.tokenizer import train_tokenizer
    from mlflow_tunix.train import tokenize_pairs

    ds = build_datasets(cfg)
    template = cfg.data.template
    prompts = [data_mod.render_prompt(ex.prompt, template) for ex in ds.train]
    completions = [ex.completion for ex in ds.train]
    if cfg.train.batch_size > len(ds.train):
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is larger than the training set "
                          f"({len(ds.train)} examples); allowed: 1 to {len(ds.train)}")
    if tokenizer is None:
        tokenizer = train_tokenizer((p + c for p, c in zip(prompts, completions)), cfg.tokenizer)
    max_len = cfg.model.max_seq_len
    train_tok = tokenize_pairs(prompts, completions, tokenizer, max_len=max_len)
    with_completion = [ex for ex in ds.eval if ex.completion is not None]
    eval_tok = None
    if with_completion:
        eval_tok = tokenize_pairs([data_mod.render_prompt(ex.prompt, template) for ex in with_completion],
                                  [ex.completion for ex in with_completion], tokenizer, max_len=max_len,
                                  what="held-out example")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=len(tokenizer))
    return Prepared(ds, tokenizer, prompts, train_tok, eval_tok, model_cfg)


# --------------------------------------------------------------------------- MLflow run plumbing
@contextlib.contextmanager
def mlflow_run(run_name: str | None, run_id: str | None = None):
    """Start (or, under ``mlflow run``, attach to) a run, or continue run ``run_id``; end it
    FAILED/KILLED if anything escapes.

    Continuing a run under ``mlflow run`` leaves the run ``mlflow run`` made empty but for a tag
    (``mlflow_tunix.resumed_run``) and a note naming the run that was continued.
    """
    import mlflow

    wrapper = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        run = mlflow.start_run(run_id=run_id, log_system_metrics=_system_metrics_available())
        if wrapper and wrapper != run_id:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            client.set_tag(wrapper, RESUMED_RUN_TAG, run_id)
            client.set_tag(wrapper, "mlflow.note.content", f"This `mlflow run` continued run {run_id}; "
                                                           "its results are logged there.")
    else:
        run = mlflow.start_run(run_name=None if wrapper else run_name, log_system_metrics=_system_metrics_available())
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
    import mlflow

    if server_reachable(mlflow.get_tracking_uri()):
        if exc is not None:
            with contextlib.suppress(Exception):
                mlflow.set_tag("mlflow_tunix.error", " ".join(str(exc).split())[:5000])
        mlflow.end_run(status)
        return
    with _temporary_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"), contextlib.suppress(Exception):  # one try
        mlflow.end_run(status)  # pops the run off MLflow's stack before it calls the server


@contextlib.contextmanager
def _temporary_env(**values: str):
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


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path, run_id: str):
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


def _system_metrics_available() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("MLFLOW_TUNIX_SYSTEM_METRICS", "1") != "0"


def version_tags() -> dict[str, str]:
    import flax
    import jax
    import optax

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
    from mlflow.tracking import MlflowClient

    try:
        runs = MlflowClient().search_runs([experiment_id], max_results=len(RUN_COLORS) - 1,
                                          order_by=["attributes.start_time DESC"])
    except Exception:  # a colour is not worth failing a run for
        return fallback
    used = {r.data.tags.get("mlflow.runColor") for r in runs if r.info.run_id != run_id}
    return next((c for c in RUN_COLORS if c not in used), fallback)


def params_sha256(model) -> str:
    """Content address of the weights: sha256 over names, shapes, dtypes and bytes, in name order."""
    from mlflow_tunix.model import flat_params

    h = hashlib.sha256()
    for name, array in sorted(flat_params(model).items()):
        h.update(f"{name}:{array.dtype}:{array.shape};".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def dataset_inputs(ds: Datasets, cfg: ProjectConfig):
    train_ds = data_mod.to_mlflow_dataset(ds.train, name=f"{cfg.name}-train", source=ds.train_source)
    eval_ds = data_mod.to_mlflow_dataset(ds.eval, name=f"{cfg.name}-eval", source=ds.eval_source)
    return train_ds, eval_ds


def set_primary_metric(experiment_id: str, metric: str = "answer_accuracy") -> None:
    """The experiment's primary metric (experiment tags the MLflow UI reads): higher answer_accuracy is better."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import (
        MLFLOW_EXPERIMENT_PRIMARY_METRIC_GREATER_IS_BETTER,
        MLFLOW_EXPERIMENT_PRIMARY_METRIC_NAME,
    )

    client = MlflowClient()
    client.set_experiment_tag(experiment_id, MLFLOW_EXPERIMENT_PRIMARY_METRIC_NAME, metric)
    client.set_experiment_tag(experiment_id, MLFLOW_EXPERIMENT_PRIMARY_METRIC_GREATER_IS_BETTER, "True")


def ui_link(experiment_id: str, run_id: str | None = None) -> str:
    """Where to look: the runs table sorted by answer_accuracy (or one run), on this tracking server."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    if run_id:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{base}/#/experiments/{experiment_id}/runs?orderByKey=metrics.%60answer_accuracy%60&orderByAsc=false"


# --------------------------------------------------------------------------- the job
@dataclass
class MainResult:
    run_id: str
    experiment_id: str
    metrics: dict
    model_uri: str
    registered_version: str | None


@dataclass
class _Resume:
    """What ``--resume RUN_ID`` continues: the run, its own config and its checkpoint folder."""

    run_id: str
    cfg: ProjectConfig
    run_dir: Path
    has_inputs: bool  # the run logged its datasets already
    params: set  # the names of the params it logged


def checkpoint_root(cfg: ProjectConfig) -> Path:
    """Where runs keep their checkpoints: ``train.checkpoint_dir`` (relative to the current folder),
    else $MLFLOW_TUNIX_CHECKPOINT_DIR, else ``~/.cache/mlflow-tunix/checkpoints``."""
    from mlflow_tunix.train import DEFAULT_CHECKPOINT_DIR

    root = cfg.train.checkpoint_dir or os.environ.get("MLFLOW_TUNIX_CHECKPOINT_DIR") or DEFAULT_CHECKPOINT_DIR
    return Path(root).expanduser().absolute()


def _resume_target(run_id: str) -> _Resume:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mlflow_tunix.config import from_dict, validate

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
        with _temporary_env(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):  # one small file: no progress bar
            raw = mlflow.artifacts.load_dict(f"runs:/{run_id}/{CONFIG_ARTIFACT}")
    except Exception:
        raw = None
    if not run_dir or raw is None:
        raise TunixError(f"{where}: the run was not started by `mlflow-tunix run/train` (it has no "
                         f"{CHECKPOINT_DIR_TAG} tag or {CONFIG_ARTIFACT} artifact); it cannot be resumed")
    cfg = from_dict(ProjectConfig, raw)
    validate(cfg)
    return _Resume(run_id, cfg, Path(run_dir), bool(run.inputs.dataset_inputs), set(run.data.params))


def run_main(cfg: ProjectConfig | None, *, evaluate_model: bool = True, register: bool = True,
             progress: bool = True, resume: str | None = None) -> MainResult:
    """The whole job in one MLflow run; ``resume=RUN_ID`` continues that run instead, from its
    newest checkpoint, with its own config (``cfg`` is then ignored and may be None).

    Errors, in the order they can happen (see docs/fault-tolerance.md):
    a config value that does not fit the data -> ConfigError, no run started (a run ``mlflow run``
    made is marked FAILED); a bad data file -> DataError, the run FAILED; NaN/inf -> TrainingError,
    the run FAILED, the last good checkpoint kept; SIGTERM/Ctrl-C -> checkpoint, the run KILLED;
    the tracking server gone -> training finishes, checkpoints and unsent metrics kept, TunixError
    saying how to continue. Registration is the very last step, so no failure registers anything.
    """
    import mlflow

    from mlflow_tunix.tokenizer import load_tokenizer

    setup_jax()
    command = "run" if (evaluate_model or register) else "train"
    uri = mlflow.get_tracking_uri()
    if not server_reachable(uri):
        raise TunixError(f"the tracking server {uri} does not answer; start it or point MLFLOW_TRACKING_URI elsewhere")
    target = _resume_target(resume) if resume else None
    with contextlib.ExitStack() as stack:
        if target is not None:
            # First of all: the run may be alive in another process; then it is not ours to touch.
            stack.enter_context(_run_dir_lock(target.run_dir, resume))
            cfg = target.cfg
            log(f"resuming run {resume} (project {cfg.name}) from {target.run_dir}")
        run_name = f"{cfg.name}-{cfg.train.steps}steps-seed{cfg.train.seed}"

        try:
            saved = target.run_dir / TOKENIZER_DIR if target is not None else None
            prep = prepare(cfg, tokenizer=load_tokenizer(saved) if saved is not None and saved.is_dir() else None)
        except TunixError as exc:
            # A bad data file is part of the run's record: the run exists and says FAILED, naming the
            # data. A value that does not fit the data is refused before any run, unless one exists
            # already (`mlflow run` made it, or this is a resume): then it is FAILED with the reason.
            if isinstance(exc, DataError) or resume or os.environ.get("MLFLOW_RUN_ID"):
                with mlflow_run(run_name, run_id=resume) as run:
                    if not resume:
                        _log_config(cfg, run.info.run_id, checkpoint_root(cfg) / run.info.run_id)
                    raise
            raise

        run = stack.enter_context(mlflow_run(run_name, run_id=resume))
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        run_dir = target.run_dir if target is not None else checkpoint_root(cfg) / run_id
        if target is None:
            stack.enter_context(_run_dir_lock(run_dir, run_id))
        return _train_and_log(cfg, prep, run_id, experiment_id, run_dir, target, command=command,
                              evaluate_model=evaluate_model, register=register, progress=progress)


def _log_config(cfg: ProjectConfig, run_id: str, run_dir: Path) -> None:
    """The resolved config as params, the exact config as an artifact (what --resume rebuilds), the tags."""
    import mlflow

    from mlflow_tunix.tracking import MlflowTracker

    tracker = MlflowTracker(run_id)
    # Under `mlflow run` the run already holds the MLproject parameters (registered_model_name among
    # them, written its own way, e.g. '' quoted): MLflow refuses a second value, so those stay as they are.
    run = tracker.client.get_run(run_id)
    there = run.data.params
    params = {k: v for k, v in to_flat_dict(cfg).items()
              if k not in ("base_dir", "model.vocab_size", "description") and k not in there}
    tracker.log_params(params)
    mlflow.log_dict(_jsonable(to_dict(cfg)), CONFIG_ARTIFACT)
    tracker.set_tags({**version_tags(), "mlflow.runColor": run_color(run_id, run.info.experiment_id),
                      "mlflow_tunix.project": cfg.name,
                      CHECKPOINT_DIR_TAG: str(run_dir)})


def _train_and_log(cfg: ProjectConfig, prep: Prepared, run_id: str, experiment_id: str, run_dir: Path,
                   target: _Resume | None, *, command: str, evaluate_model: bool, register: bool,
                   progress: bool) -> MainResult:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mlflow_tunix import flavor
    from mlflow_tunix.model import build_model, param_count
    from mlflow_tunix.tracking import MlflowTracker, resend_metrics
    from mlflow_tunix.train import train

    uri = mlflow.get_tracking_uri()
    ds, tokenizer = prep.ds, prep.tokenizer
    resumed = target is not None
    spill = run_dir / SPILL_FILE
    continue_with = f"mlflow-tunix {command} --resume {run_id}"
    train_ds, eval_ds = dataset_inputs(ds, cfg)
    if not resumed:
        _log_config(cfg, run_id, run_dir)
        set_primary_metric(experiment_id)
        log(f"run {run_id} in experiment {experiment_id}: project {cfg.name}")
    if not (run_dir / TOKENIZER_DIR).is_dir():  # (a run that failed on its data has none yet)
        _save_tokenizer(tokenizer, run_dir / TOKENIZER_DIR)
    if not (resumed and target.has_inputs):
        mlflow.log_input(train_ds, context="training")
        mlflow.log_input(eval_ds, context="evaluation")
    if resumed and spill.is_file():
        sent, there = resend_metrics(spill, run_id)
        spill.unlink()
        log(f"re-sent {sent} metric points kept while the tracking server was away ({there} were there already)")
    log(f"data: {len(ds.train)} train examples, {len(ds.eval)} held out"
        + (f" ({ds.dropped_overlap} train examples dropped: their prompt is in the eval set)" if ds.dropped_overlap else ""))

    model = build_model(prep.model_cfg, seed=cfg.train.seed)
    seq_len = prep.train_tok.tokens.shape[1]
    if not (resumed and "model.param_count" in target.params):
        MlflowTracker(run_id).log_params({"model.vocab_size": prep.model_cfg.vocab_size,
                                          "model.param_count": param_count(model), "train.seq_len": seq_len})
    log(f"model: {param_count(model):,} params, vocab {prep.model_cfg.vocab_size}, seq_len {seq_len}")

    tracker = MlflowTracker(run_id, skip_logged=resumed, spill_path=spill)
    checkpoints = run_dir / CHECKPOINTS_DIR
    try:
        result = train(model, prep.train_tok, cfg.train, eval_data=prep.eval_tok, tracker=tracker, progress=progress,
                       checkpoint_dir=checkpoints, resume=resumed)
    except KeyboardInterrupt as exc:
        log(f"{exc or 'interrupted'}. Continue with: {continue_with}")
        raise
    finally:
        tracker.close()
    if resumed:
        log(f"resumed at step {result.first_step}" if result.first_step else "no checkpoint: trained again from step 0")
    log(f"trained {result.steps - result.first_step} steps in {result.seconds:.1f}s "
        f"({result.tokens_per_sec:,.0f} tokens/s); final loss {result.final_loss:.4g}")

    kept = (f"the final checkpoint is in {checkpoints}" if cfg.train.checkpoint_every
            else "checkpoints are off (train.checkpoint_every=0), so resuming trains again")
    if tracker.spilled or not server_reachable(uri):
        raise TunixError(f"the tracking server {uri} stopped answering during training; training finished and {kept}"
                         + (f"; {tracker.spilled} metric points are kept in {spill}" if tracker.spilled else "")
                         + f". When the server is back, continue with: {continue_with} (it re-sends them first)")

    summary = {"final_loss": result.final_loss, "train_seconds": result.seconds,
               "train_tokens_per_sec": result.tokens_per_sec}
    if result.final_eval_loss is not None:
        summary["final_eval_loss"] = result.final_eval_loss
    generation = dataclasses.replace(cfg.generation, prompt_template=cfg.data.template)
    metrics, version, stage = {}, None, "evaluating"
    try:
        if evaluate_model:
            metrics = dict(_evaluate_and_log(result.model, tokenizer, ds.eval, generation, TABLE_FILE, progress))
            for name, (examples, source) in ds.extra.items():
                extra_ds = data_mod.to_mlflow_dataset(examples, name=f"{cfg.name}-{name}", source=source)
                mlflow.log_input(extra_ds, context=f"evaluation/{name}")
                extra = _evaluate_and_log(result.model, tokenizer, examples, generation, f"eval/{name}.json",
                                          progress, label=name)
                per_category = [k for k in extra if k.startswith("accuracy/")]
                metrics.update({f"{name}/{k}": v for k, v in extra.items()
                                if not (len(per_category) == 1 and k in per_category)})  # = answer_accuracy

        stage = "logging the model"
        if resumed:
            MlflowClient().set_tag(run_id, RESUMED_FROM_TAG, str(result.first_step))
        model_name = f"{cfg.name}-{run_id[:8]}"
        sha = params_sha256(result.model)
        # The flavor writes the model completely before MLflow uploads it, and an upload that fails
        # leaves the LoggedModel FAILED: a partial model can exist, but is never registered (below).
        info = flavor.log_model(
            result.model, name=model_name, tokenizer=tokenizer, generation_config=generation,
            metadata={"project": cfg.name, "params_sha256": sha, "project_config": _jsonable(to_dict(cfg))},
            input_example=[ds.eval[0].prompt] if evaluate_model else None,
        )
        # Logged with model_id (and the eval dataset), so the model's own page shows the final figures.
        _log_metrics_once(run_id, summary, result.steps, resumed, model_id=info.model_id)
        if metrics:
            _log_metrics_once(run_id, metrics, result.steps, resumed, model_id=info.model_id, dataset=eval_ds)
        mlflow.set_tag("mlflow_tunix.params_sha256", sha)

        if register:  # the very last step: nothing before it can leave a registered version behind
            from mlflow_tunix import registry

            stage = "registering the model"
            reg = registry.register(cfg.model_name, info.model_uri, run_id=run_id, metrics=metrics,
                                    eval_digest=eval_ds.digest, eval_dataset=eval_ds.name,
                                    train_digest=train_ds.digest, params_sha256=sha, project=cfg.name)
            version = reg.version
            log(f"registered {cfg.model_name} version {reg.version}"
                + (" (new, in Staging)" if reg.created else " (same params as an existing version: not registered twice)"))
    except (MlflowException, OSError) as exc:
        # The weights are safe in the final checkpoint: say what failed and how to finish the job,
        # in one line. (A bug elsewhere still shows its traceback.)
        why = "the tracking server does not answer" if is_connection_error(exc) else " ".join(str(exc).split())[:500]
        raise TunixError(f"{stage} failed: {why}; {kept}. Fix it, then continue with: {continue_with}") from None
    log(f"compare runs: {ui_link(experiment_id)}")
    return MainResult(run_id, experiment_id, metrics, info.model_uri, version)


def _log_metrics_once(run_id: str, metrics: dict, step: int, resumed: bool, **kwargs) -> None:
    """``mlflow.log_metrics`` at ``step``, minus the metrics a resumed run already has a point of there."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if resumed:
        client = MlflowClient()
        metrics = {k: v for k, v in metrics.items()
                   if step not in {m.step for m in client.get_metric_history(run_id, k)}}
    if metrics:
        mlflow.log_metrics(metrics, step=step, **kwargs)


def _save_tokenizer(tokenizer, path: Path) -> None:
    """Keep the run's tokenizer next to its checkpoints (written aside, then renamed into place),
    so a resumed run tokenizes exactly as the first one did."""
    staging = path.with_name(f".{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(str(staging))
    os.replace(staging, path)


def run_train(cfg: ProjectConfig | None, *, progress: bool = True, resume: str | None = None) -> MainResult:
    """Data -> tokenizer -> model -> train -> log the model (no generation eval, no registration)."""
    return run_main(cfg, evaluate_model=False, register=False, progress=progress, resume=resume)


def run_evaluate(model_uri: str, *, eval_data: str | None = None, progress: bool = True) -> MainResult:
    """Score a logged mlflow_tunix model on a held-out set in a new run (or the run ``mlflow run`` made)."""
    import mlflow

    from mlflow_tunix import flavor

    setup_jax()
    loaded = flavor.load_model(model_uri)
    with mlflow_run(f"evaluate-{model_uri.replace('/', '-').replace(':', '')}") as run:
        mlflow.set_tags({**version_tags(), "mlflow_tunix.evaluated_model": model_uri,
                         "mlflow.runColor": run_color(run.info.run_id, run.info.experiment_id)})
        mlflow.log_param("model_uri", model_uri)
        if eval_data:
            examples, source, name = data_mod.read_jsonl(eval_data), eval_data, Path(eval_data).stem
        else:
            project = _project_from_model(model_uri)
            ds = build_datasets(project)
            examples, source, name = ds.eval, ds.eval_source, f"{project.name}-eval"
        eval_ds = data_mod.to_mlflow_dataset(examples, name=name, source=source)
        mlflow.log_input(eval_ds, context="evaluation")
        metrics = _evaluate_and_log(loaded.module, loaded.tokenizer, examples, loaded.generation, TABLE_FILE, progress)
        mlflow.log_metrics(metrics, dataset=eval_ds)
        return MainResult(run.info.run_id, run.info.experiment_id, metrics, model_uri, None)


# --------------------------------------------------------------------------- helpers
def _evaluate_and_log(model, tokenizer, examples, generation, table_file: str, progress: bool,
                      label: str = "") -> dict:
    """Generate and score ``examples``, log every item as the table ``table_file``; return the metrics
    (the caller logs them: with the model's id, the dataset, a prefix)."""
    import mlflow
    import pandas as pd

    from mlflow_tunix.evaluate import evaluate

    ev = evaluate(model, tokenizer, examples, generation, progress=progress)
    mlflow.log_table(data=pd.DataFrame(ev.rows), artifact_file=table_file)
    log(f"eval{' ' + label if label else ''}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in ev.metrics.items() if k != "n_eval"))
    return ev.metrics


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def _project_from_model(model_uri: str) -> ProjectConfig:
    from mlflow.models import Model

    from mlflow_tunix.config import from_dict

    meta = Model.load(model_uri).metadata or {}
    raw = meta.get("project_config")
    if not raw:
        raise TunixError(f"{model_uri}: the model does not record its project; give --eval-data")
    return from_dict(ProjectConfig, raw)
