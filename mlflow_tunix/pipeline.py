"""The whole job, stage after stage: data -> tokenizer -> model -> train -> generate/evaluate ->
flavor -> registry, inside one MLflow run.

``run_main`` is what ``mlflow run .`` (entry point ``main``) and ``mlflow-tunix run`` do;
``run_train`` stops after logging the model; ``run_evaluate`` scores a logged model. Any failure
marks the MLflow run FAILED before the error reaches the CLI, and registration is the very last
step, so a failed run never leaves a registered version behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mlflow_tunix import data as data_mod
from mlflow_tunix.config import DataSource, ProjectConfig, to_dict, to_flat_dict
from mlflow_tunix.errors import ConfigError, DataError, TunixError

RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
              "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")
TABLE_FILE = "eval/predictions.json"


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


# --------------------------------------------------------------------------- MLflow run plumbing
@contextlib.contextmanager
def mlflow_run(run_name: str | None):
    """Start (or, under ``mlflow run``, attach to) a run; end it FAILED/KILLED if anything escapes."""
    import mlflow

    attached = bool(os.environ.get("MLFLOW_RUN_ID"))
    run = mlflow.start_run(run_name=None if attached else run_name, log_system_metrics=_system_metrics_available())
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        mlflow.set_tag("mlflow_tunix.error", " ".join(str(exc).split())[:5000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


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


def run_color(run_id: str) -> str:
    return RUN_COLORS[int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % len(RUN_COLORS)]


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


def ui_link(experiment_id: str, run_id: str | None = None) -> str:
    """Where to look: the runs table sorted by answer_accuracy (or one run), on this tracking server."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    if run_id:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{base}/#/experiments/{experiment_id}?orderByKey=metrics.%60answer_accuracy%60&orderByAsc=false"


# --------------------------------------------------------------------------- the job
@dataclass
class MainResult:
    run_id: str
    experiment_id: str
    metrics: dict
    model_uri: str
    registered_version: str | None


def run_main(cfg: ProjectConfig, *, evaluate_model: bool = True, register: bool = True,
             progress: bool = True) -> MainResult:
    import mlflow

    from mlflow_tunix import flavor
    from mlflow_tunix.evaluate import evaluate
    from mlflow_tunix.model import build_model, param_count
    from mlflow_tunix.tokenizer import train_tokenizer
    from mlflow_tunix.tracking import MlflowTracker
    from mlflow_tunix.train import tokenize_pairs, train

    setup_jax()
    run_name = f"{cfg.name}-{cfg.train.steps}steps-seed{cfg.train.seed}"
    with mlflow_run(run_name) as run:
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        tracker = MlflowTracker(run_id)
        params = {k: v for k, v in to_flat_dict(cfg).items() if k not in ("base_dir", "model.vocab_size", "description")}
        tracker.log_params(params)
        tracker.set_tags({**version_tags(), "mlflow.runColor": run_color(run_id), "mlflow_tunix.project": cfg.name})
        log(f"run {run_id} in experiment {experiment_id}: project {cfg.name}")

        ds = build_datasets(cfg)
        train_ds, eval_ds = dataset_inputs(ds, cfg)
        mlflow.log_input(train_ds, context="training")
        mlflow.log_input(eval_ds, context="evaluation")
        log(f"data: {len(ds.train)} train examples, {len(ds.eval)} held out"
            + (f" ({ds.dropped_overlap} train examples dropped: their prompt is in the eval set)" if ds.dropped_overlap else ""))

        template = cfg.data.template
        train_prompts = [data_mod.render_prompt(ex.prompt, template) for ex in ds.train]
        tokenizer = train_tokenizer((p + c for p, c in zip(train_prompts, (ex.completion for ex in ds.train))), cfg.tokenizer)
        model_cfg = dataclasses.replace(cfg.model, vocab_size=len(tokenizer))
        train_tok = tokenize_pairs(train_prompts, [ex.completion for ex in ds.train], tokenizer)
        _check_fits(train_tok.tokens.shape[1], cfg)
        with_completion = [ex for ex in ds.eval if ex.completion is not None]
        eval_tok = None
        if with_completion:
            eval_tok = tokenize_pairs([data_mod.render_prompt(ex.prompt, template) for ex in with_completion],
                                      [ex.completion for ex in with_completion], tokenizer)
        if cfg.train.batch_size > len(ds.train):
            raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is larger than the training set ({len(ds.train)} examples)")

        model = build_model(model_cfg, seed=cfg.train.seed)
        tracker.log_params({"model.vocab_size": model_cfg.vocab_size, "model.param_count": param_count(model),
                            "train.seq_len": train_tok.tokens.shape[1]})
        log(f"model: {param_count(model):,} params, vocab {model_cfg.vocab_size}, seq_len {train_tok.tokens.shape[1]}")

        result = train(model, train_tok, cfg.train, eval_data=eval_tok, tracker=tracker, progress=progress)
        tracker.close()
        log(f"trained {result.steps} steps in {result.seconds:.1f}s ({result.tokens_per_sec:,.0f} tokens/s); "
            f"final loss {result.final_loss:.4f}")
        summary = {"final_loss": result.final_loss, "train_seconds": result.seconds,
                   "train_tokens_per_sec": result.tokens_per_sec}
        if result.final_eval_loss is not None:
            summary["final_eval_loss"] = result.final_eval_loss

        generation = dataclasses.replace(cfg.generation, prompt_template=template)
        metrics = {}
        if evaluate_model:
            ev = evaluate(result.model, tokenizer, ds.eval, generation, progress=progress)
            metrics = ev.metrics
            mlflow.log_table(data=_table(ev.rows), artifact_file=TABLE_FILE)
            log("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n_eval"))
            for name, (examples, source) in ds.extra.items():
                extra_ds = data_mod.to_mlflow_dataset(examples, name=f"{cfg.name}-{name}", source=source)
                mlflow.log_input(extra_ds, context=f"evaluation/{name}")
                extra_ev = evaluate(result.model, tokenizer, examples, generation, progress=progress)
                extra_metrics = {f"{name}/{k}": v for k, v in extra_ev.metrics.items()}
                metrics.update(extra_metrics)
                mlflow.log_table(data=_table(extra_ev.rows), artifact_file=f"eval/{name}.json")
                log(f"eval {name}: answer_accuracy {extra_ev.accuracy:.4f}")

        model_name = f"{cfg.name}-{run_id[:8]}"
        sha = params_sha256(result.model)
        info = flavor.log_model(
            result.model, name=model_name, tokenizer=tokenizer, generation_config=generation,
            metadata={"project": cfg.name, "params_sha256": sha, "project_config": _jsonable(to_dict(cfg))},
            input_example=[ds.eval[0].prompt] if evaluate_model else None,
        )
        # Logged with model_id (and the eval dataset), so the model's own page shows the final figures.
        mlflow.log_metrics(summary, step=result.steps, model_id=info.model_id)
        if metrics:
            mlflow.log_metrics(metrics, step=result.steps, model_id=info.model_id, dataset=eval_ds)
        mlflow.set_tag("mlflow_tunix.params_sha256", sha)

        version = None
        if register:
            from mlflow_tunix import registry

            reg = registry.register(cfg.model_name, info.model_uri, run_id=run_id, metrics=metrics,
                                    eval_digest=eval_ds.digest, eval_dataset=eval_ds.name,
                                    train_digest=train_ds.digest, params_sha256=sha, project=cfg.name)
            version = reg.version
            log(f"registered {cfg.model_name} version {reg.version}"
                + (" (new, in Staging)" if reg.created else " (same params as an existing version: not registered twice)"))
    log(f"compare runs: {ui_link(experiment_id)}")
    return MainResult(run_id, experiment_id, metrics, info.model_uri, version)


def run_train(cfg: ProjectConfig, *, progress: bool = True) -> MainResult:
    """Data -> tokenizer -> model -> train -> log the model (no generation eval, no registration)."""
    return run_main(cfg, evaluate_model=False, register=False, progress=progress)


def run_evaluate(model_uri: str, *, eval_data: str | None = None, progress: bool = True) -> MainResult:
    """Score a logged mlflow_tunix model on a held-out set in a new run (or the run ``mlflow run`` made)."""
    import mlflow

    from mlflow_tunix import flavor
    from mlflow_tunix.config import from_dict
    from mlflow_tunix.evaluate import evaluate

    setup_jax()
    loaded = flavor.load_model(model_uri)
    with mlflow_run(f"evaluate-{model_uri.replace('/', '-').replace(':', '')}") as run:
        mlflow.set_tags({**version_tags(), "mlflow_tunix.evaluated_model": model_uri,
                         "mlflow.runColor": run_color(run.info.run_id)})
        mlflow.log_param("model_uri", model_uri)
        if eval_data:
            examples, source, name = data_mod.read_jsonl(eval_data), eval_data, Path(eval_data).stem
        else:
            project = _project_from_model(model_uri, from_dict)
            ds = build_datasets(project)
            examples, source, name = ds.eval, ds.eval_source, f"{project.name}-eval"
        eval_ds = data_mod.to_mlflow_dataset(examples, name=name, source=source)
        mlflow.log_input(eval_ds, context="evaluation")
        ev = evaluate(loaded.module, loaded.tokenizer, examples, loaded.generation, progress=progress)
        mlflow.log_metrics(ev.metrics, dataset=eval_ds)
        mlflow.log_table(data=_table(ev.rows), artifact_file=TABLE_FILE)
        log("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.metrics.items() if k != "n_eval"))
        return MainResult(run.info.run_id, run.info.experiment_id, ev.metrics, model_uri, None)


# --------------------------------------------------------------------------- helpers
def _check_fits(seq_len: int, cfg: ProjectConfig) -> None:
    if seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"model.max_seq_len: {cfg.model.max_seq_len} is shorter than the longest training "
                          f"example ({seq_len} tokens)")


def _table(rows: Sequence[dict]):
    import pandas as pd

    return pd.DataFrame(rows)


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def _project_from_model(model_uri: str, from_dict) -> ProjectConfig:
    from mlflow.models import Model

    meta = Model.load(model_uri).metadata or {}
    raw = meta.get("project_config")
    if not raw:
        raise TunixError(f"{model_uri}: the model does not record its project; give --eval-data")
    return from_dict(ProjectConfig, raw)
