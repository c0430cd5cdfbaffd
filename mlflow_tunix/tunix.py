"""Tunix users log to MLflow: a metrics backend for Tunix trainers, their configs as params, RL samples as tables.

Google's Tunix (``pip install 'mlflow-tunix[tunix]'``) sends every scalar a trainer records through
``jax.monitoring`` to the "backends" its ``MetricsLogger`` was given. This module is one more backend, so
adding MLflow to an existing Tunix script is three lines::

    from mlflow_tunix.tunix import metrics_logger_options, log_tunix_config
    config = TrainingConfig(..., metrics_logging_options=metrics_logger_options())
    log_tunix_config(config)

Event names become readable MLflow keys (:func:`metric_key`): ``/train/loss`` -> ``train/loss``,
``/eval/perplexity`` -> ``eval/perplexity``, ``rewards/train/mean`` -> ``rl/rewards/mean``,
``actor/eval/kl`` -> ``rl/eval/actor/kl``. JAX's own events (``/jax/...``) are ignored.

Scalars go through our batched :class:`~mlflow_tunix.tracking.MlflowTracker`: the training thread never waits
on the tracking server, and if the server goes away the points are kept in a spill file that
``mlflow-tunix resend-metrics`` sends later. Training is never interrupted for tracking.

Nothing here imports Tunix (or jax) at import time, and the core package never imports this module.
"""

from __future__ import annotations

import atexit
import dataclasses
import enum
import functools
import inspect
import sys
import threading
import time
import weakref
from typing import Any, Callable, Mapping

from mlflow_tunix.errors import TunixError
from mlflow_tunix.tracking import MlflowTracker, one_line

# Tunix's MetricsLogger records f"{metrics_prefix}/{mode}/{name}"; RLCluster uses these prefixes (the actor and
# critic trainers' metrics_prefix, and the first part of the names its learners buffer).
RL_PREFIXES = ("actor", "critic", "rewards", "completions", "global", "rollout", "perf")
MODES = ("train", "eval")
SAMPLES_DIR = "rl_samples"  # log_rl_samples writes rl_samples/<mode>/step_<step>.json


# --------------------------------------------------------------------------- event names
def metric_key(event: str) -> str | None:
    """The MLflow key for a Tunix metric event, or None for anything that is not one (JAX's own events).

    ``/train/loss`` -> ``train/loss``; ``rewards/train/mean`` -> ``rl/rewards/mean``;
    ``rewards/eval/mean`` -> ``rl/eval/rewards/mean``; ``global/train/x`` -> ``rl/x``; a user's own
    ``metrics_prefix`` stays in front: ``sft/train/loss`` -> ``sft/train/loss``.
    """
    prefix, sep, rest = event.partition("/")
    mode, sep2, name = rest.partition("/")
    if not (sep and sep2 and name) or mode not in MODES or prefix == "jax":
        return None
    if not prefix:
        return f"{mode}/{name}"
    if prefix in RL_PREFIXES:
        path = name if prefix == "global" else f"{prefix}/{name}"
        return f"rl/{path}" if mode == "train" else f"rl/eval/{path}"
    return event


def _scalar(value) -> float | None:
    """A Tunix value (python number, numpy scalar, 0-d or one-element array) as a float; None if not one."""
    import numpy as np

    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return float(array.reshape(-1)[0]) if array.size == 1 else None


# --------------------------------------------------------------------------- the backend
# The backend currently logging each run. Tunix's MetricsLogger.close() cannot unregister its listeners
# (jax 0.10.2's clear_event_listeners misses a `global`), so closed backends keep being called, and two live
# backends of one run would log every point twice: only the owner logs.
_OWNERS: dict[str, "MlflowBackend"] = {}
_LIVE: "weakref.WeakSet[MlflowBackend]" = weakref.WeakSet()
_LOCK = threading.Lock()


class MlflowBackend:
    """A Tunix logging backend (``log_scalar(event, value, **kwargs)``, ``close()``) writing to one MLflow run.

    Build it with :func:`mlflow_backend` (a zero-argument factory, as Tunix wants). It logs to ``run_id``, else
    to the active run, else to a run it starts itself (in the active experiment) and ends at :meth:`close`.
    The run id is ``backend.run_id``; a run the backend started is also ``mlflow.last_active_run()``.

    Args:
        run_id: The MLflow run to log to.
        run_name: Name of the run the backend starts (when there is neither ``run_id`` nor an active run).
        flush_seconds: Buffered points are handed to the sender at least this often, so the UI follows a run live.
        spill_path: Where points the server did not take are kept (default ``~/.cache/mlflow-tunix/unsent/``).
    """

    def __init__(self, run_id: str | None = None, *, run_name: str | None = None, flush_seconds: float = 5.0,
                 spill_path=None):
        import mlflow

        self.started_run = False
        if run_id is None:
            active = mlflow.active_run()
            if active is not None:
                run_id = active.info.run_id
            else:
                try:
                    run_id = mlflow.start_run(run_name=run_name).info.run_id
                except Exception as exc:
                    raise TunixError(f"cannot start an MLflow run at {mlflow.get_tracking_uri()}: "
                                     f"{one_line(exc)[:300]}") from None
                self.started_run = True
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self.tracker = MlflowTracker(run_id, flush_every=500, spill_path=spill_path)
        self.closed = False
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()  # Tunix's async RL may record scalars from more than one thread
        with _LOCK:
            _OWNERS.setdefault(run_id, self)
            _LIVE.add(self)

    def log_scalar(self, event: str, value, **kwargs) -> None:
        """Called by ``jax.monitoring`` for every scalar event of the process; logs Tunix's metrics."""
        if self.closed or "step" not in kwargs:  # Tunix always gives a step; JAX's own events never do
            return
        key = metric_key(event)
        number = _scalar(value)
        if key is None or number is None:
            return
        with _LOCK:
            if _OWNERS.setdefault(self.run_id, self) is not self:
                return
        with self._lock:
            if self.closed:
                return
            self.tracker.log_scalar(key, number, int(kwargs["step"]))
            if time.monotonic() - self._last_flush > self.flush_seconds:
                self.tracker.flush()
                self._last_flush = time.monotonic()

    def close(self) -> None:
        """Send what is buffered and wait for it (or spill it); end the run if this backend started it.
        Later calls, and the events JAX keeps sending after Tunix's close, are ignored."""
        with _LOCK:
            if self.closed:
                return
            self.closed = True
            if _OWNERS.get(self.run_id) is self:
                del _OWNERS[self.run_id]
            _LIVE.discard(self)
        with self._lock:
            self.tracker.close()
        if self.started_run:
            _end_started_run(self.run_id)

    def __repr__(self):
        return f"MlflowBackend(run_id={self.run_id!r}{', closed' if self.closed else ''})"


def _end_started_run(run_id: str) -> None:
    import mlflow

    try:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run("FINISHED")
        else:
            mlflow.MlflowClient().set_terminated(run_id, "FINISHED")
    except Exception as exc:  # the server may be gone; the metrics are safe in the spill file
        print(f"warning: could not mark MLflow run {run_id} FINISHED: {one_line(exc)[:300]}", file=sys.stderr)


@atexit.register
def _close_live_backends() -> None:
    """A script that never calls trainer.close() still gets its last points sent."""
    for backend in list(_LIVE):
        backend.close()


def mlflow_backend(run_id: str | None = None, **kwargs) -> MlflowBackend:
    """A Tunix backend logging to MLflow: pass the function itself as a backend factory.

    ``MetricsLoggerOptions(log_dir=..., backend_kwargs={"custom_backend": [mlflow_backend]})`` logs to the active
    run (or a new one); ``functools.partial(mlflow_backend, run_id=...)`` to a given run. See
    :class:`MlflowBackend` for the keyword arguments.
    """
    return MlflowBackend(run_id, **kwargs)


def metrics_logger_options(log_dir: str | None = None, *, run_id: str | None = None, tensorboard: bool = False,
                           backend_kwargs: Mapping[str, Any] | None = None, **options):
    """Tunix ``MetricsLoggerOptions`` whose backend is MLflow, in the shape the installed Tunix wants.

    Tunix 0.1.7 takes backend factories as ``backend_kwargs={"custom_backend": [...]}``; 0.1.4-0.1.6 as
    ``backend_factories=[...]``. Either way a custom list replaces Tunix's defaults (TensorBoard, W&B if
    installed): ``tensorboard=True`` keeps a TensorBoard backend writing to ``log_dir`` beside MLflow.

    Args:
        log_dir: Tunix's log folder (TensorBoard event files); a temporary one when not given.
        run_id: The MLflow run to log to (default: the active run, else a new one).
        tensorboard: Also write TensorBoard event files to ``log_dir``.
        backend_kwargs: Keyword arguments for ``mlflow_backend`` (``run_name``, ``flush_seconds``, ``spill_path``).
        **options: Other ``MetricsLoggerOptions`` fields (``flush_every_n_steps``...).
    """
    from tunix.sft import metrics_logger

    if log_dir is None:
        import tempfile

        log_dir = tempfile.mkdtemp(prefix="tunix-logs-")
    factories: list[Callable] = [functools.partial(mlflow_backend, run_id=run_id, **dict(backend_kwargs or {}))]
    if tensorboard:
        factories.append(functools.partial(metrics_logger.TensorboardBackend, log_dir=log_dir,
                                           flush_every_n_steps=options.get("flush_every_n_steps", 100)))
    fields = {f.name for f in dataclasses.fields(metrics_logger.MetricsLoggerOptions)}
    if "backend_factories" in fields:  # Tunix 0.1.4 - 0.1.6
        return metrics_logger.MetricsLoggerOptions(log_dir=log_dir, backend_factories=factories, **options)
    return metrics_logger.MetricsLoggerOptions(log_dir=log_dir, backend_kwargs={"custom_backend": factories},
                                               **options)


# --------------------------------------------------------------------------- configs as params
def config_params(config, prefix: str = "") -> dict[str, str]:
    """A Tunix config (nested dataclasses, dicts, optax schedules and optimizers) as flat ``{dotted.key: text}``.

    Schedules and optimizers are functions to Python; they become readable calls built from the arguments
    optax closed over: ``join_schedules(boundaries=[10], schedules=[polynomial_schedule(...), ...])``.
    """
    flat: dict[str, str] = {}
    _flatten(config, prefix, flat)
    return flat


def _flatten(value, key: str, out: dict) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            _flatten(getattr(value, field.name), f"{key}.{field.name}" if key else field.name, out)
    elif isinstance(value, Mapping) and value and all(isinstance(k, (str, int, enum.Enum)) for k in value):
        for k, v in value.items():
            name = str(k.value if isinstance(k, enum.Enum) else k)
            _flatten(v, f"{key}.{name}" if key else name, out)
    else:
        out[key or "value"] = describe(value)


def describe(value, depth: int = 0) -> str:
    """A short readable text for a config value: numbers and strings as they are, an optax schedule or
    optimizer as the call that built it, anything else by its ``repr`` (cut at 250 characters)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return str(value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    if hasattr(value, "init") and hasattr(value, "update") and callable(value.update):  # an optax transformation
        return describe(value.update, depth)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe(v, depth + 1) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v, depth + 1)}" for k, v in value.items()) + "}"
    if isinstance(value, functools.partial):
        args = [describe(a, depth + 1) for a in value.args]
        args += [f"{k}={describe(v, depth + 1)}" for k, v in value.keywords.items()]
        return f"{_name(value.func)}({', '.join(args)})"
    if inspect.isfunction(value):
        name = _name(value)
        if depth > 8 or "<locals>" not in value.__qualname__:
            return name
        # An optax schedule/transformation is a closure: the arguments it was built from are its free variables.
        try:
            free = inspect.getclosurevars(value).nonlocals
        except (TypeError, ValueError):
            return name
        if name == "with_extra_args_support" and "tx" in free:  # optax's wrapper: say what it wraps
            return describe(free["tx"], depth)
        args = [f"{k}={describe(v, depth + 1)}" for k, v in sorted(free.items()) if _simple(v)]
        return f"{name}({', '.join(args)})"
    if hasattr(value, "shape") and hasattr(value, "dtype") and getattr(value, "size", 2) == 1:
        return describe(_scalar(value), depth)
    text = repr(value)
    return text if len(text) <= 250 else text[:247] + "..."


def _name(fn) -> str:
    # "warmup_cosine_decay_schedule.<locals>.schedule" -> "warmup_cosine_decay_schedule"
    return getattr(fn, "__qualname__", getattr(fn, "__name__", type(fn).__name__)).split(".<locals>")[0]


def _simple(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, enum.Enum, functools.partial)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_simple(v) for v in value)
    if isinstance(value, Mapping):
        return all(_simple(v) for v in value.values())
    if hasattr(value, "shape") and getattr(value, "size", 2) == 1:
        return True
    return inspect.isfunction(value) or (hasattr(value, "init") and hasattr(value, "update"))


def log_tunix_config(config, *, prefix: str = "", run_id: str | None = None) -> dict[str, str]:
    """Log a Tunix config (``TrainingConfig``, ``RLTrainingConfig``, ``ClusterConfig``, ``GRPOConfig``, any
    nested dataclass) as flat MLflow params of the active (or given) run; returns what was logged."""
    import mlflow
    from mlflow.entities import Param

    params = config_params(config, prefix)
    run_id = run_id or _active_run_id()
    items = [Param(k[:250], v[:6000]) for k, v in params.items()]
    client = mlflow.MlflowClient()
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    return params


def _active_run_id() -> str:
    import mlflow

    run = mlflow.active_run()
    if run is None:
        run = mlflow.start_run()
    return run.info.run_id


# --------------------------------------------------------------------------- RL samples
class log_rl_samples:  # noqa: N801 - used like a function: rl_cluster.with_external_metrics_logger(log_rl_samples())
    """An external metrics logger for Tunix's ``RLCluster``: each logging step's prompts, completions and rewards
    as an MLflow table, and the reward statistics per step.

    ``rl_cluster.with_external_metrics_logger(log_rl_samples())``. Tables are ``rl_samples/<mode>/step_<step>.json``
    artifacts of the run: the same file name in two runs compares them row by row in the UI's artifact view.
    The reward scalars (``rl/rewards/mean``...) are logged here only when no :class:`MlflowBackend` is
    logging the run already (it records them from Tunix's own events).

    Args:
        run_id: The run to log to (default: the active run, else a new one).
        every_n_steps: Log a table every this many steps (scalars every step).
        max_rows: Rows kept per table (long runs with big batches).
    """

    def __init__(self, run_id: str | None = None, *, every_n_steps: int = 1, max_rows: int = 256):
        self.run_id = run_id
        self.every_n_steps = max(1, int(every_n_steps))
        self.max_rows = max_rows
        self.tables: list[str] = []  # artifact files logged so far

    def __call__(self, metrics_buffer) -> None:
        import mlflow

        run_id = self.run_id = self.run_id or _active_run_id()
        step, mode = int(metrics_buffer.global_steps), str(metrics_buffer.mode)
        metrics = metrics_buffer.metrics
        try:
            if run_id not in _OWNERS:
                self._log_reward_scalars(run_id, metrics, step, mode)
            rows = sample_rows(metrics, step=step, mode=mode)[: self.max_rows]
            if rows and step % self.every_n_steps == 0:
                artifact_file = f"{SAMPLES_DIR}/{mode}/step_{step:06d}.json"
                mlflow.log_table(_columns(rows), artifact_file=artifact_file, run_id=run_id)
                self.tables.append(artifact_file)
        except Exception as exc:  # never stop an RL run for tracking
            print(f"warning: RL samples of step {step} not logged to MLflow: {one_line(exc)[:300]}", file=sys.stderr)

    @staticmethod
    def _log_reward_scalars(run_id, metrics, step, mode):
        import mlflow
        import numpy as np
        from mlflow.entities import Metric

        now, points = int(time.time() * 1000), []
        for name, (values, op) in metrics.items():
            if not name.startswith("rewards/"):
                continue
            try:
                array = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError):
                continue
            value = _scalar((op or np.mean)(array)) if array.size else None
            key = metric_key(f"rewards/{mode}/{name.split('/', 1)[1]}")
            if value is not None and key:
                points.append(Metric(key, value, now, step))
        if points:
            mlflow.MlflowClient().log_batch(run_id, metrics=points)


def sample_rows(metrics: Mapping[str, tuple], *, step: int, mode: str) -> list[dict]:
    """One row per sampled completion from an RLCluster metrics buffer: step, mode, prompt, completion, reward
    (the sum of the reward functions) and one column per reward function.

    The buffer holds one list entry per reward call; each entry has one value per completion, in the same
    order in ``prompts``, ``completions`` and ``rewards/sum`` (Tunix's reward manager writes them together).
    """
    import numpy as np

    prompts = _flat(metrics.get("prompts"))
    completions = _flat(metrics.get("completions"))
    if not completions:
        return []
    columns = {"reward": _flat(metrics.get("rewards/sum"))}
    for name, entry in metrics.items():
        fn = name.split("/", 1)[1] if name.startswith("rewards/") else None
        if fn and fn not in ("sum", "mean", "min", "max") and not fn.startswith("score/"):
            values = _flat(entry)
            if len(values) == len(completions):
                columns[f"reward/{fn}"] = values
    rows = []
    for i, completion in enumerate(completions):
        row = {"step": step, "mode": mode, "prompt": str(prompts[i]) if i < len(prompts) else "",
               "completion": str(completion)}
        for column, values in columns.items():
            if len(values) == len(completions):
                row[column] = float(np.asarray(values[i], dtype=np.float64))
        rows.append(row)
    return rows


def _flat(entry) -> list:
    """The per-completion values of one buffered metric (a list of per-call lists or arrays)."""
    import numpy as np

    if not entry:
        return []
    values = []
    for part in entry[0]:
        if isinstance(part, str):
            values.append(part)
        elif isinstance(part, (list, tuple)):
            values.extend(part)
        else:
            values.extend(np.asarray(part).reshape(-1).tolist())
    return values


def _columns(rows: list[dict]) -> dict[str, list]:
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {name: [row.get(name) for row in rows] for name in names}


# --------------------------------------------------------------------------- Tunix models with our flavor
def model_from_tunix(model, *, max_seq_len: int = 2048):
    """Our Transformer (``family="qwen3"``) holding a trained Tunix ``Qwen3``'s weights, ready for the
    mlflow_tunix flavor (``mlflow_tunix.log_model``). Same logits (tested).

    Tunix keeps each projection head-shaped (q_proj ``[d, heads, head_dim]``, o_proj ``[heads, head_dim, d]``); ours
    are plain ``[in, out]`` matrices in the same head-major order, so each is a reshape, never a transpose.
    LoRA adapters are not folded in: merge them first (Tunix's ``safetensors_saver`` merges for export).
    """
    import numpy as np
    from flax import nnx

    from mlflow_tunix.model import ModelConfig, build_model

    if not has_qwen3_family():
        raise TunixError("this mlflow-tunix has no qwen3 model family: logging Tunix models needs it")
    cfg = model.config
    if type(model).__name__ != "Qwen3" or getattr(cfg, "num_experts", None):
        raise TunixError(f"only Tunix's dense Qwen3 is supported, not {type(model).__name__}")
    if any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model))):
        raise TunixError("the model has LoRA adapters: merge them into the weights first")
    config = ModelConfig(family="qwen3", vocab_size=cfg.vocab_size, d_model=cfg.embed_dim, n_layers=cfg.num_layers,
                         n_heads=cfg.num_heads, n_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                         d_ff=cfg.hidden_dim, max_seq_len=max_seq_len, rope_theta=float(cfg.rope_theta),
                         norm_eps=float(cfg.norm_eps), tie_embeddings=bool(cfg.use_tied_embedding))
    d, H, K, Dh = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    config = dataclasses.replace(config, rope_theta=_tunix_rope_theta(model))

    def get(x):
        return np.asarray(x[...], dtype=np.float32)

    params = {"embed": get(model.embedder.input_embedding), "final_norm.scale": get(model.final_norm.w)}
    if not cfg.use_tied_embedding:
        params["lm_head"] = get(model.lm_head.w)  # [d, vocab] in both
    for i, layer in enumerate(model.layers):
        attn, mlp, ours = layer.attn, layer.mlp, f"blocks.{i}"
        params.update({
            f"{ours}.attn_norm.scale": get(layer.input_layernorm.w),
            f"{ours}.mlp_norm.scale": get(layer.post_attention_layernorm.w),
            f"{ours}.attn.wq": get(attn.q_proj.w).reshape(d, H * Dh),
            f"{ours}.attn.wk": get(attn.k_proj.w).reshape(d, K * Dh),
            f"{ours}.attn.wv": get(attn.v_proj.w).reshape(d, K * Dh),
            f"{ours}.attn.wo": get(attn.o_proj.w).reshape(H * Dh, d),
            f"{ours}.attn.q_norm.scale": get(attn.q_norm.w),
            f"{ours}.attn.k_norm.scale": get(attn.k_norm.w),
            f"{ours}.mlp.w1": get(mlp.gate_proj.kernel),
            f"{ours}.mlp.w3": get(mlp.up_proj.kernel),
            f"{ours}.mlp.w2": get(mlp.down_proj.kernel),
        })
    return build_model(config, params=params)


def has_qwen3_family() -> bool:
    """Whether our model has the qwen3 family (grouped-query attention, q/k norm, untied head)."""
    from mlflow_tunix import model

    return "qwen3" in getattr(model, "FAMILIES", ())


def _tunix_rope_theta(model) -> float:
    """The RoPE base Tunix's Qwen3 really uses. In 0.1.7 its attention calls ``apply_rope`` without the config's
    ``rope_theta``, so the function's default (1e6, Qwen3's own value) applies whatever the config says."""
    import importlib

    apply_rope = importlib.import_module(type(model).__module__).apply_rope
    default = inspect.signature(apply_rope).parameters["rope_theta"].default
    attention = inspect.getsource(importlib.import_module(type(model).__module__).Attention.__call__)
    return float(model.config.rope_theta if "rope_theta" in attention else default)


def log_tunix_model(model, name: str, *, tokenizer, max_seq_len: int = 2048, **kwargs):
    """Log a trained Tunix ``Qwen3`` with the mlflow_tunix flavor (safetensors, no pickle): it loads back as a pyfunc
    that generates. ``kwargs`` are :func:`mlflow_tunix.flavor.log_model`'s (``registered_model_name``...)."""
    from mlflow_tunix import flavor

    return flavor.log_model(model_from_tunix(model, max_seq_len=max_seq_len), name, tokenizer=tokenizer, **kwargs)
