"""The whole job, stage after stage: data -> tokenizer -> model -> train -> generate/evaluate ->
flavor -> registry, inside one MLflow run.

``run_main`` is what ``mlflow run .`` (entry point ``main``) and ``mlflow-tunix run`` do;
``run_train`` stops after logging the model; ``run_evaluate`` scores a logged model. Data and
tokenizer are prepared before the run starts, so a config value that does not fit the data starts
no run. Any later failure marks the MLflow run FAILED before the error reaches the CLI (unless the
tracking server is gone), and registration is the very last step, so a failed run never leaves a
registered version behind. Training is checkpointed; ``resume=RUN_ID`` continues a run that
stopped, to the same weights (``resume.py``, docs/fault-tolerance.md). How MLflow is told all this
lives in ``runs.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from mlflow_tunix import data as data_mod
from mlflow_tunix import distributed
from mlflow_tunix import flavor, generators, hf, registry, runs
from mlflow_tunix import resume as resume_mod  # (run_main's keyword argument is called resume)
from mlflow_tunix.config import DataSource, ProjectConfig, from_dict, to_dict
from mlflow_tunix.errors import DataError, ResumableError, TunixError
from mlflow_tunix.evaluate import evaluate, score
from mlflow_tunix.model import build_model, check_memory, param_count, params_sha256
from mlflow_tunix.tokenizer import train_tokenizer
from mlflow_tunix.tracking import MlflowTracker, is_connection_error, one_line, resend_metrics, server_reachable
from mlflow_tunix.train import TokenizedData, check_batch_size, tokenize_pairs, train


def log(message: str) -> None:
    print(f"[mlflow-tunix] {message}", file=sys.stderr, flush=True)


def setup_jax() -> None:
    """Persistent XLA compilation cache: a second run skips most compile time (1.7 s -> 0.2 s measured).

    Every program is kept, however quick to compile: a new process otherwise compiles again each small
    one it meets (building the model, the optimizer's state, a schedule: ~17 ms each, ~0.9 s in all of
    a warm `mlflow-tunix train`). Beside it, train.py saves its step's whole executable (``aot``).
    """
    cache = os.environ.get("MLFLOW_TUNIX_JAX_CACHE", str(Path.home() / ".cache" / "mlflow-tunix" / "jax"))
    if cache and cache != "0":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


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
    records = generators.generate(source.generator, n=source.n, seed=source.seed, **dict(source.options))
    return data_mod.examples_from_records(records, source=f"generator:{source.generator}")


def _load_all(sources, base_dir: str) -> tuple[list, str]:
    return [ex for src in sources for ex in load_source(src, base_dir)], " + ".join(s.describe() for s in sources)


def build_datasets(cfg: ProjectConfig) -> Datasets:
    train, train_source = _load_all(cfg.data.train, cfg.base_dir)
    if cfg.data.eval:
        held, eval_source = _load_all(cfg.data.eval, cfg.base_dir)
    else:
        train, held = data_mod.split(train, cfg.data.eval_fraction, cfg.data.split_seed)
        eval_source = f"split({cfg.data.eval_fraction}, seed={cfg.data.split_seed}) of training data"
    for ex in train:
        if ex.completion is None:
            raise DataError(ex.source or "train data", None, f"item {ex.id!r} has no completion to train on "
                            "(an eval-item file was given as training data)")
    extra = {name: _load_all(sources, cfg.base_dir) for name, sources in cfg.data.extra_eval.items()}
    train, dropped = data_mod.drop_overlap(train, held)
    for examples, _ in extra.values():
        train, n = data_mod.drop_overlap(train, examples)
        dropped += n
    if not train:
        raise DataError(train_source, None, "no training examples left after holding out the eval set")
    if not held:
        raise DataError(eval_source, None, "the eval set is empty")
    return Datasets(train, held, train_source, eval_source, dropped, extra)


# --------------------------------------------------------------------------- data -> tokens, before any run
@dataclass
class Prepared:
    """Everything training needs that comes from the data, checked against the config."""

    ds: Datasets
    tokenizer: Any
    train_tok: TokenizedData
    eval_tok: TokenizedData | None  # None when no eval example has a completion
    model_cfg: Any  # model.ModelConfig with the tokenizer's vocab_size, or the checkpoint's
    init_model: Any = None  # the imported checkpoint's Transformer (model.init_from), else None


def init_from_source(cfg: ProjectConfig) -> str:
    """``model.init_from`` as given, or relative to the config file when a folder is there."""
    beside_config = Path(cfg.base_dir) / cfg.model.init_from
    return str(beside_config) if beside_config.is_dir() else cfg.model.init_from


def prepare(cfg: ProjectConfig, tokenizer=None) -> Prepared:
    """Data -> tokenizer -> token arrays, and the config checks that need the data (the batch
    against the training set, ``model.max_seq_len`` against the longest example).

    Raises DataError (a bad file) or ConfigError (a value that does not fit this data). Starts no
    MLflow run. ``tokenizer``: use this one (a resumed run's own) instead of training one.
    With ``model.init_from`` the checkpoint brings the architecture, the weights and the tokenizer.
    """
    ds = build_datasets(cfg)
    check_batch_size(cfg.train.batch_size, len(ds.train))
    model_cfg, init_model = cfg.model, None
    if cfg.model.init_from:
        ckpt = hf.load_checkpoint(init_from_source(cfg), max_seq_len=cfg.model.max_seq_len)
        init_model, model_cfg = ckpt.model, ckpt.model.config
        tokenizer = tokenizer or ckpt.tokenizer

    def pairs(examples):
        return [data_mod.render_prompt(ex.prompt, cfg.data.template, tokenizer) for ex in examples], [ex.completion for ex in examples]

    prompts, completions = pairs(ds.train)
    if tokenizer is None:
        tokenizer = train_tokenizer((p + c for p, c in zip(prompts, completions)), cfg.tokenizer)
    max_len = cfg.model.max_seq_len
    train_tok = tokenize_pairs(prompts, completions, tokenizer, max_len=max_len)
    with_completion = [ex for ex in ds.eval if ex.completion is not None]
    eval_tok = (tokenize_pairs(*pairs(with_completion), tokenizer, max_len=max_len, what="held-out example")
                if with_completion else None)
    if init_model is None:
        model_cfg = dataclasses.replace(cfg.model, vocab_size=len(tokenizer))
    check_memory(model_cfg, batch_size=cfg.train.batch_size, training=True, seq_len=train_tok.tokens.shape[1])
    return Prepared(ds, tokenizer, train_tok, eval_tok, model_cfg, init_model)


# --------------------------------------------------------------------------- the job
@dataclass
class MainResult:
    run_id: str
    experiment_id: str
    metrics: dict
    model_uri: str
    registered_version: str | None


def run_main(cfg: ProjectConfig | None, *, evaluate_model: bool = True, register: bool = True,
             progress: bool = True, resume: str | None = None, tags: dict | None = None,
             wrap_tracker=None) -> MainResult:
    """The whole job in one MLflow run; ``resume=RUN_ID`` continues that run instead, from its
    newest checkpoint, with its own config (``cfg`` is then ignored and may be None).

    ``tags`` go on the new run as it starts (``mlflow.parentRunId`` nests it); ``wrap_tracker(tracker,
    run_id)`` may wrap the trainer's tracker (a sweep reports the loss to Ray Tune through it).

    Errors, in the order they can happen (see docs/fault-tolerance.md):
    a config value that does not fit the data -> ConfigError, no run started (a run ``mlflow run``
    made is marked FAILED); a bad data file -> DataError, the run FAILED; NaN/inf -> TrainingError,
    the run FAILED, the last good checkpoint kept; SIGTERM/Ctrl-C -> checkpoint, the run KILLED;
    the tracking server gone -> training finishes, checkpoints and unsent metrics kept, ResumableError;
    logging or registering the model fails -> ResumableError. Registration is the very last step, so
    no failure registers anything.
    """
    setup_jax()
    if jax.process_count() > 1 and not distributed.is_main():
        return _run_worker(cfg, resume)
    uri = mlflow.get_tracking_uri()
    if not server_reachable(uri):
        raise TunixError(f"the tracking server {uri} does not answer; start it or point MLFLOW_TRACKING_URI elsewhere")
    target = resume_mod.find(resume) if resume else None
    with contextlib.ExitStack() as stack:
        if target is not None:
            # First of all: the run may be alive in another process; then it is not ours to touch.
            stack.enter_context(resume_mod.run_dir_lock(target.run_dir, resume))
            cfg = target.cfg
            log(f"resuming run {resume} (project {cfg.name}) from {target.run_dir}")
        prep = _prepare_in_run_if_any(cfg, target)
        run = stack.enter_context(runs.mlflow_run(_run_name(cfg), run_id=resume, tags=tags))
        job = _Job(cfg, prep, run.info.run_id, run.info.experiment_id, target, wrap_tracker, evaluate_model)
        distributed.announce_run(job.run_id)
        if target is None:
            stack.enter_context(resume_mod.run_dir_lock(job.run_dir, job.run_id))
        job.start()
        result = job.train(progress)
        metrics, info, version = {}, None, None
        with job.stage("evaluating"):
            if evaluate_model:
                metrics = job.evaluate(result.model, progress)
        with job.stage("logging the model"):
            info = job.log_model(result, metrics, input_example=evaluate_model)
        if register:  # the very last step: nothing before it can leave a registered version behind
            with job.stage("registering the model"):
                version = job.register(info, metrics)
        log(f"compare runs: {runs.table_link(job.experiment_id)}")
        return MainResult(job.run_id, job.experiment_id, metrics, info.model_uri, version)


def _run_name(cfg: ProjectConfig) -> str:
    return f"{cfg.name}-{cfg.train.steps}steps-seed{cfg.train.seed}"


def _prepare_in_run_if_any(cfg: ProjectConfig, target: resume_mod.Resume | None) -> Prepared:
    """``prepare``, before any run starts. A bad data file is part of the run's record: the run
    exists and says FAILED, naming the data. A value that does not fit the data is refused before
    any run, unless one exists already (`mlflow run` made it, or this is a resume): then that run is
    FAILED with the reason."""
    try:
        return prepare(cfg, tokenizer=resume_mod.saved_tokenizer(target))
    except TunixError as exc:
        run_id = target.run_id if target is not None else None
        if isinstance(exc, DataError) or run_id or os.environ.get("MLFLOW_RUN_ID"):
            with runs.mlflow_run(_run_name(cfg), run_id=run_id) as run:
                if run_id is None:
                    runs.log_config(cfg, run.info.run_id, resume_mod.checkpoint_root(cfg) / run.info.run_id)
                raise
        raise


@dataclass
class _Job:
    """One run of the job, step by step: start (config, datasets, tokenizer), train, evaluate, log
    the model, register it. A resumed run (``target``) skips what it logged the first time."""

    cfg: ProjectConfig
    prep: Prepared
    run_id: str
    experiment_id: str
    target: resume_mod.Resume | None
    wrap_tracker: Any = None  # (tracker, run_id) -> a Tracker that passes everything on
    evaluate_model: bool = True  # (data-parallel workers evaluate their share of the prompts too)

    def __post_init__(self):
        self.resumed = self.target is not None
        self.run_dir = self.target.run_dir if self.resumed else resume_mod.checkpoint_root(self.cfg) / self.run_id
        self.spill = self.run_dir / resume_mod.SPILL_FILE
        self.checkpoints = self.run_dir / resume_mod.CHECKPOINTS_DIR
        self.kept = (f"the final checkpoint is in {self.checkpoints}" if self.cfg.train.checkpoint_every
                     else "checkpoints are off (train.checkpoint_every=0), so resuming trains again")
        self.train_ds = runs.to_mlflow_dataset(self.prep.ds.train, name=f"{self.cfg.name}-train",
                                               source=self.prep.ds.train_source)
        self.eval_ds = runs.to_mlflow_dataset(self.prep.ds.eval, name=f"{self.cfg.name}-eval",
                                              source=self.prep.ds.eval_source)

    def start(self) -> None:
        """Config, datasets and tokenizer into the run (a resumed run has them already), and the
        metric points a resumed run kept while its server was away."""
        ds = self.prep.ds
        if not self.resumed:
            runs.log_config(self.cfg, self.run_id, self.run_dir)
            runs.set_primary_metric(self.experiment_id)
            log(f"run {self.run_id} in experiment {self.experiment_id}: project {self.cfg.name}")
        resume_mod.save_tokenizer(self.prep.tokenizer, self.run_dir)  # (a run that failed on its data has none yet)
        if not (self.resumed and self.target.has_inputs):
            runs.log_input(self.train_ds, context="training")
            runs.log_input(self.eval_ds, context="evaluation")
        if self.resumed and self.spill.is_file():
            sent, there = resend_metrics(self.spill, self.run_id)
            self.spill.unlink()
            log(f"re-sent {sent} metric points kept while the tracking server was away ({there} were there already)")
        log(f"data: {len(ds.train)} train examples, {len(ds.eval)} held out" + (
            f" ({ds.dropped_overlap} train examples dropped: their prompt is in the eval set)" if ds.dropped_overlap
            else ""))

    def train(self, progress: bool):
        """Build the model and train it, checkpointed; metrics go through one MlflowTracker."""
        prep = self.prep
        model = prep.init_model if prep.init_model is not None else build_model(prep.model_cfg, seed=self.cfg.train.seed)
        seq_len = prep.train_tok.tokens.shape[1]
        if not (self.resumed and "model.param_count" in self.target.params):
            MlflowTracker(self.run_id).log_params({"model.vocab_size": prep.model_cfg.vocab_size,
                                                   "model.param_count": param_count(model), "train.seq_len": seq_len})
        log(f"model: {param_count(model):,} params, vocab {prep.model_cfg.vocab_size}, seq_len {seq_len}")
        tracker = MlflowTracker(self.run_id, skip_logged=self.resumed, spill_path=self.spill)
        if jax.process_count() > 1:  # the data-parallel workers train beside this process (_run_worker)
            distributed.share({"run_dir": str(self.run_dir), "resumed": self.resumed, "evaluate": self.evaluate_model})
        try:
            wrapped = self.wrap_tracker(tracker, self.run_id) if self.wrap_tracker else tracker
            result = train(model, prep.train_tok, self.cfg.train, eval_data=prep.eval_tok, tracker=wrapped,
                           progress=progress, checkpoint_dir=self.checkpoints, resume=self.resumed)
        except KeyboardInterrupt as exc:
            exc.run_id = self.run_id  # the CLI says how to continue
            raise
        finally:
            tracker.close()
        if self.resumed:
            log(f"resumed at step {result.first_step}" if result.first_step else "no checkpoint: trained again from step 0")
        log(f"trained {result.steps - result.first_step} steps in {result.seconds:.1f}s "
            f"({result.tokens_per_sec:,.0f} tokens/s); final loss {result.final_loss:.4g}")
        uri = mlflow.get_tracking_uri()
        if tracker.spilled or not server_reachable(uri):
            raise ResumableError(
                f"the tracking server {uri} stopped answering during training; training finished and {self.kept}"
                + (f"; {tracker.spilled} metric points are kept in {self.spill}" if tracker.spilled else ""),
                self.run_id, then="When the server is back,", note=" (it re-sends them first)")
        return result

    @contextlib.contextmanager
    def stage(self, name: str):
        """A failure of MLflow or the disk in this stage, in one line with how to finish the job
        (the weights are safe in the final checkpoint). A bug elsewhere still shows its traceback."""
        try:
            yield
        except (MlflowException, OSError) as exc:
            why = "the tracking server does not answer" if is_connection_error(exc) else one_line(exc)[:500]
            raise ResumableError(f"{name} failed: {why}; {self.kept}", self.run_id) from None

    def evaluate(self, model, progress: bool) -> dict:
        """The held-out set, then each extra probe set (its metrics prefixed with its name)."""
        tokenizer, generation, ds = self.prep.tokenizer, self.cfg.generation, self.prep.ds
        metrics = dict(_evaluate_and_log(model, tokenizer, ds.eval, generation, runs.TABLE_FILE, progress))
        for name, (examples, source) in ds.extra.items():
            extra_ds = runs.to_mlflow_dataset(examples, name=f"{self.cfg.name}-{name}", source=source)
            runs.log_input(extra_ds, context=f"evaluation/{name}")
            extra = _evaluate_and_log(model, tokenizer, examples, generation, f"eval/{name}.json", progress, label=name)
            per_category = [k for k in extra if k.startswith("accuracy/")]
            metrics.update({f"{name}/{k}": v for k, v in extra.items()
                            if not (len(per_category) == 1 and k in per_category)})  # = answer_accuracy
        return metrics

    def log_model(self, result, metrics: dict, input_example: bool):
        """The model with the mlflow_tunix flavor, then the final figures linked to it."""
        if self.resumed:
            MlflowClient().set_tag(self.run_id, runs.RESUMED_FROM_TAG, str(result.first_step))
        self.sha = params_sha256(result.model)
        lora = self.cfg.train.lora
        # train.lora.save: adapters logs the adapters and a reference to the checkpoint folder they
        # were trained on (its weights' sha256 checked at every load), not the merged weights.
        as_adapters = {"adapters": result.adapters, "base": init_from_source(self.cfg)} if (
            lora is not None and lora.save == "adapters") else {}
        # The flavor writes the model completely before MLflow uploads it, and an upload that fails
        # leaves the LoggedModel FAILED: a partial model can exist, but is never registered.
        info = flavor.log_model(
            result.model, name=f"{self.cfg.name}-{self.run_id[:8]}", tokenizer=self.prep.tokenizer,
            generation_config=self.cfg.generation,
            metadata={"project": self.cfg.name, "params_sha256": self.sha, "project_config": runs.jsonable(to_dict(self.cfg))},
            input_example=[self.prep.ds.eval[0].prompt] if input_example else None, **as_adapters,
        )
        # Logged with model_id (and the eval dataset), so the model's own page shows the final figures.
        summary = {"final_loss": result.final_loss, "train_seconds": result.seconds,
                   "train_tokens_per_sec": result.tokens_per_sec,
                   "train_completion_tokens_per_sec": result.completion_tokens_per_sec}
        if result.final_eval_loss is not None:
            summary["final_eval_loss"] = result.final_eval_loss
        runs.log_metrics_once(self.run_id, summary, result.steps, self.resumed, model_id=info.model_id)
        if metrics:
            runs.log_metrics_once(self.run_id, metrics, result.steps, self.resumed, model_id=info.model_id,
                                  dataset=self.eval_ds)
        mlflow.set_tag(runs.PARAMS_SHA256_TAG, self.sha)
        return info

    def register(self, info, metrics: dict) -> str:
        reg = registry.register(self.cfg.model_name, info.model_uri, run_id=self.run_id, metrics=metrics,
                                eval_digest=self.eval_ds.digest, eval_dataset=self.eval_ds.name,
                                train_digest=self.train_ds.digest, params_sha256=self.sha, project=self.cfg.name)
        log(f"registered {self.cfg.model_name} version {reg.version}"
            + (" (new, in Staging)" if reg.created else " (same params as an existing version: not registered twice)"))
        return reg.version


def _run_worker(cfg: ProjectConfig | None, resume: str | None) -> None:
    """A data-parallel worker (process 1..N-1 of train.processes): the same data, model and training
    as process 0, in step with it; it logs nothing. Process 0 tells it the run's folder (the
    tokenizer and the checkpoints; on several hosts a shared file system).

    A new run's worker prepares its data while process 0 starts the run (which took it ~16 s
    on the default project, and preparing after it ~8 s more on one core): its own tokenizer is
    trained on the same data, so it is the run's, and is kept only if it equals the one process 0
    saved (the data is then tokenized again with that one)."""
    early = None
    if resume:
        cfg = resume_mod.find(resume).cfg
    else:
        with contextlib.suppress(Exception):  # bad data: process 0 meets it too and says so
            early = prepare(cfg)
    job = distributed.share(None)
    run_dir = Path(job["run_dir"])
    tokenizer = resume_mod.load_tokenizer(run_dir / resume_mod.TOKENIZER_DIR)
    same = early is not None and early.tokenizer.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    prep = early if same else prepare(cfg, tokenizer=tokenizer)
    model = prep.init_model if prep.init_model is not None else build_model(prep.model_cfg, seed=cfg.train.seed)
    result = train(model, prep.train_tok, cfg.train, eval_data=prep.eval_tok, progress=False,
                   checkpoint_dir=run_dir / resume_mod.CHECKPOINTS_DIR, resume=job["resumed"])
    if job["evaluate"]:  # its share of every prompt set, in _Job.evaluate's order
        for examples in [prep.ds.eval] + [examples for examples, _ in prep.ds.extra.values()]:
            _evaluate_sharded(result.model, prep.tokenizer, examples, cfg.generation, progress=False)
    return None


def run_train(cfg: ProjectConfig | None, *, progress: bool = True, resume: str | None = None) -> MainResult:
    """Data -> tokenizer -> model -> train -> log the model (no generation eval, no registration)."""
    return run_main(cfg, evaluate_model=False, register=False, progress=progress, resume=resume)


def run_evaluate(model_uri: str, *, eval_data: str | None = None, progress: bool = True) -> MainResult:
    """Score a logged mlflow_tunix model on a held-out set in a new run (or the run ``mlflow run`` made)."""
    setup_jax()
    loaded = flavor.load_model(model_uri)
    with runs.mlflow_run(f"evaluate-{model_uri.replace('/', '-').replace(':', '')}") as run:
        mlflow.set_tags({**runs.version_tags(), "mlflow_tunix.evaluated_model": model_uri,
                         "mlflow.runColor": runs.run_color(run.info.run_id, run.info.experiment_id)})
        mlflow.log_param("model_uri", model_uri)
        if eval_data:
            examples, source, name = data_mod.read_jsonl(eval_data), eval_data, Path(eval_data).stem
        else:
            project = _project_from_model(model_uri)
            ds = build_datasets(project)
            examples, source, name = ds.eval, ds.eval_source, f"{project.name}-eval"
        eval_ds = runs.to_mlflow_dataset(examples, name=name, source=source)
        runs.log_input(eval_ds, context="evaluation")
        metrics = _evaluate_and_log(loaded.module, loaded.tokenizer, examples, loaded.generation, runs.TABLE_FILE,
                                    progress)
        mlflow.log_metrics(metrics, dataset=eval_ds)
        return MainResult(run.info.run_id, run.info.experiment_id, metrics, model_uri, None)


# --------------------------------------------------------------------------- helpers
def _evaluate_and_log(model, tokenizer, examples, generation, table_file: str, progress: bool,
                      label: str = "") -> dict:
    """Generate and score ``examples``, log every item as the table ``table_file``; return the metrics
    (the caller logs them: with the model's id, the dataset, a prefix)."""
    ev = _evaluate_sharded(model, tokenizer, examples, generation, progress)
    runs.log_eval_table(ev.rows, table_file)
    log(f"eval{' ' + label if label else ''}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in ev.metrics.items() if k != "n_eval"))
    return ev.metrics


def _evaluate_sharded(model, tokenizer, examples, generation, progress: bool):
    """``evaluate``; in a data-parallel group each process generates its share of the prompts and
    every process scores all of them (the workers call this in the same order as process 0)."""
    if jax.process_count() == 1:
        return evaluate(model, tokenizer, examples, generation, progress=progress)
    mine = evaluate(model, tokenizer, distributed.my_part(examples), generation, progress=progress)
    parts = distributed.gather([[r["generated"], r["new_tokens"]] for r in mine.rows])
    generated = [row for part in parts for row in part]
    return score(examples, [g for g, _ in generated], [t for _, t in generated])


def _project_from_model(model_uri: str) -> ProjectConfig:
    raw = (Model.load(model_uri).metadata or {}).get("project_config")
    if not raw:
        raise TunixError(f"{model_uri}: the model does not record its project; give --eval-data")
    return from_dict(ProjectConfig, raw)
