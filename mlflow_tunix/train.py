"""Training: completion-only cross-entropy, Optax AdamW, one jitted pure step.

The step is a pure function ``train_step(graphdef, tx, state, batch) -> (state, metrics)`` over a
pytree ``TrainState`` (step, params, optimizer state), so it can later be sharded over a
``jax.sharding.Mesh`` or wrapped by a sweep without change. The loop around it is plain: sample a
batch, step, every ``log_every`` steps pull the figures to the host and hand them to the tracker
(``mlflow_tunix.tracking``), every ``eval_every`` steps measure the held-out loss, every
``checkpoint_every`` steps save an Orbax checkpoint (:class:`Checkpoints`).

A run can be resumed from its newest checkpoint to the very same weights: the batches are a
function of (seed, step) alone, the state is saved bit for bit, and the step is the same program.
"""

from __future__ import annotations

import functools
import hashlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mlflow_tunix.errors import ConfigError, TrainingError
from mlflow_tunix.tracking import NullTracker, Tracker, one_line


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    grad_clip: float = 1.0  # global-norm clipping
    log_every: int = 10
    eval_every: int = 250  # held-out loss every N steps (0 = only at the end)
    eval_batches: int = 4  # held-out batches per eval-loss measurement
    seed: int = 0
    checkpoint_every: int = 100  # an Orbax checkpoint every N steps and at the last one (0 = none)
    keep_checkpoints: int = 2  # the newest K checkpoints are kept, older ones deleted
    checkpoint_dir: str = ""  # checkpoints go to <checkpoint_dir>/<run id>/ ("" = DEFAULT_CHECKPOINT_DIR)

    def __post_init__(self):
        # Checked here, so a TrainConfig built in code is checked too: each of these, out of range,
        # stops training, turns the loss into NaN or loses checkpoints.
        for name, lowest, message in (("steps", 1, "must be at least 1"), ("batch_size", 1, "must be at least 1"),
                                      ("log_every", 1, "must be at least 1"), ("warmup_steps", 0, "must be >= 0"),
                                      ("eval_every", 0, "must be >= 0 (0 = never)")):
            if getattr(self, name) < lowest:
                raise ConfigError(f"train.{name}: {message}, got {getattr(self, name)}")
        for name, lowest, meaning in (("checkpoint_every", 0, " (0 = no checkpoints)"), ("keep_checkpoints", 1, ""),
                                      ("eval_batches", 1, "")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise ConfigError(f"train.{name}: must be an integer >= {lowest}{meaning}, got {value!r}")
        for name, ok, allowed in (
            ("learning_rate", lambda v: 0 < v < math.inf, "a finite number > 0"),
            ("grad_clip", lambda v: 0 < v < math.inf, "a finite number > 0"),
            ("weight_decay", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
            ("min_lr_ratio", lambda v: 0 <= v <= 1, "between 0 and 1"),
            ("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ConfigError(f"train.{name}: must be {allowed}, got {value!r}")


DEFAULT_CHECKPOINT_DIR = "~/.cache/mlflow-tunix/checkpoints"


# --------------------------------------------------------------------------- tokenized data
class TokenizedData(NamedTuple):
    """Right-padded token ids and a mask that is 1 where the *target* token is part of the completion."""

    tokens: np.ndarray  # int32 [N, L]
    loss_mask: np.ndarray  # float32 [N, L]: loss_mask[i, t] weights predicting tokens[i, t] from tokens[i, :t]

    @property
    def n_tokens(self) -> int:
        return int(self.loss_mask.sum())


def tokenize_pairs(prompts: Sequence[str], completions: Sequence[str], tokenizer, *, max_len: int | None = None,
                   multiple_of: int = 8, what: str = "training example") -> TokenizedData:
    """Tokenize ``prompt + completion + EOS``; only completion and EOS tokens carry loss.

    Rows are padded to the longest example rounded up to a multiple of ``multiple_of``, but never
    past ``max_len`` (the model's ``max_seq_len``); an example longer than that is a ConfigError.
    """
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    rows = [p + c + [tokenizer.eos_token_id] for p, c in zip(prompt_ids, completion_ids)]
    longest = max((len(r) for r in rows), default=1)
    seq_len = -(-longest // multiple_of) * multiple_of
    if max_len is not None:
        if longest > max_len:
            raise ConfigError(f"model.max_seq_len: {max_len} is shorter than the longest {what} "
                              f"({longest} tokens); allowed: {longest} or more")
        seq_len = min(seq_len, max_len)
    tokens = np.full((len(rows), seq_len), tokenizer.pad_token_id, dtype=np.int32)
    mask = np.zeros((len(rows), seq_len), dtype=np.float32)
    for i, (row, p) in enumerate(zip(rows, prompt_ids)):
        tokens[i, : len(row)] = row
        mask[i, len(p) : len(row)] = 1.0
    return TokenizedData(tokens, mask)


class BatchSampler:
    """Seeded epochs of shuffled indices. The order is a function of (seed, step) alone, so a resumed
    run sees exactly the batches the uninterrupted one would have seen."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ConfigError(f"train.batch_size: {batch_size} is larger than the training set ({n} examples)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size

    def indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return order[k * self.batch_size : (k + 1) * self.batch_size]


# --------------------------------------------------------------------------- the pure step
class TrainState(NamedTuple):
    step: jax.Array
    params: Any  # nnx.State of the model's nnx.Param leaves
    opt_state: Any


def make_optimizer(config: TrainConfig) -> tuple[optax.GradientTransformation, Callable]:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=min(config.warmup_steps, config.steps),
        decay_steps=max(config.steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.min_lr_ratio,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay),
    )
    return tx, schedule


def completion_loss(graphdef, params, tokens, loss_mask):
    """Mean next-token cross-entropy over completion targets; prompt and padding weigh nothing."""
    model = nnx.merge(graphdef, params)
    logits = model(tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
    mask = loss_mask[:, 1:]
    return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def train_step(graphdef, tx, state: TrainState, batch) -> tuple[TrainState, dict]:
    loss, grads = jax.value_and_grad(completion_loss, argnums=1)(graphdef, state.params, batch["tokens"], batch["loss_mask"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), {"loss": loss, "grad_norm": optax.global_norm(grads)}


def init_state(model, tx) -> tuple[Any, TrainState]:
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


# --------------------------------------------------------------------------- checkpoints
class Checkpoints:
    """Orbax checkpoints of a :class:`TrainState` in ``directory/<step>/``, the newest ``keep`` kept.

    Each holds the whole state (step, params, optimizer state) and a JSON ``info`` dict: the step,
    the last loss, and what the run was (the TrainConfig fields the weights depend on, among them
    the seed that fixes the batch order; the state's shapes; a digest of the training tokens), so
    a checkpoint is never resumed into another run. There is no other RNG state: nothing in the
    step draws random numbers. Orbax writes each one into a temporary directory and renames it
    when complete, so a crash mid-save leaves the previous checkpoint as the newest.
    """

    def __init__(self, directory, keep: int):
        import logging

        import orbax.checkpoint as ocp

        absl_logger = logging.getLogger("absl")
        if absl_logger.level == logging.NOTSET:
            # Orbax warns through absl about the leftovers of a killed save, which it then cleans up.
            absl_logger.setLevel(logging.ERROR)
        self._ocp = ocp
        self.directory = Path(directory).expanduser().absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            cleanup_tmp_directories=True,  # half-written saves of a killed process
            create=True,
        ))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, info: dict) -> None:
        # A host copy: the next step donates (reuses) the state's buffers while Orbax writes in the background.
        host = jax.tree.map(lambda x: np.array(x, copy=True), state)
        self.manager.save(info["step"], force=True, args=self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(host), info=self._ocp.args.JsonSave(info)))

    def restore(self, like: TrainState, expected: dict) -> tuple[TrainState, dict] | None:
        """The newest readable checkpoint as (state, info), or None when there is none.

        A checkpoint of another run (``info`` differs from ``expected``) is refused with
        :class:`TrainingError`. A damaged one (a disk that filled up, a file cut short) is moved
        aside to ``damaged-<step>`` and the one before it is tried.
        """
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        for step in reversed(self.steps()):
            try:
                info = dict(self.manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore())).info)
            except Exception as exc:  # Orbax/TensorStore raise many types for a damaged file
                self._set_aside(step, exc)
                continue
            for key, value in expected.items():
                if info.get(key) != value:
                    raise TrainingError(f"{self.directory / str(step)}: written by a run with {key}={info.get(key)!r}, "
                                        f"this one has {value!r}; it cannot be resumed")
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            except Exception as exc:
                self._set_aside(step, exc)
                continue
            return restored.state, info
        return None

    def _set_aside(self, step: int, exc: BaseException) -> None:
        damaged = self.directory / f"damaged-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        (self.directory / str(step)).rename(damaged)  # out of Orbax's sight, kept for a post-mortem
        self.manager.reload()
        _note(f"checkpoint step {step} is unreadable ({one_line(exc)[:300]}); moved to {damaged}, "
              "trying the one before")

    def close(self) -> None:
        """Wait for the save in flight (so the newest checkpoint is complete), then release Orbax's threads."""
        self.manager.wait_until_finished()
        self.manager.close()


# The TrainConfig fields the weights depend on (not: logging, eval and checkpoint cadence).
WEIGHT_FIELDS = ("steps", "batch_size", "learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay", "b1", "b2",
                 "grad_clip", "seed")


def state_signature(state) -> str:
    """sha256 of every leaf's path, shape and dtype: the model and optimizer a checkpoint fits."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    text = ";".join(f"{jax.tree_util.keystr(path)}:{tuple(x.shape)}:{x.dtype}" for path, x in leaves)
    return hashlib.sha256(text.encode()).hexdigest()


def data_digest(data: TokenizedData) -> str:
    """sha256 of the token arrays: a resumed run must see the very same examples."""
    h = hashlib.sha256()
    for array in (data.tokens, data.loss_mask):
        h.update(f"{array.dtype}{array.shape};".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C stopped training at a step boundary, after checkpointing that step."""

    def __init__(self, step: int, signum: int, checkpoint: str | None):
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (train.checkpoint_every is 0)"
        super().__init__(f"{name}: training stopped after step {step}; {where}")


class _StopOnSignal:
    """While training, a first SIGTERM (a preempted machine) or Ctrl-C asks the loop to stop at the
    next step boundary, checkpointed; a second Ctrl-C stops at once. Main thread only (Python
    delivers signals there); elsewhere the default behaviour stays."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        return False


# --------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    model: Any  # the trained nnx model
    final_loss: float
    final_eval_loss: float | None
    steps: int
    tokens_per_sec: float
    seconds: float
    first_step: int = 0  # > 0 when resumed from the checkpoint of that step


def train(model, data: TokenizedData, config: TrainConfig, *, eval_data: TokenizedData | None = None,
          tracker: Tracker | None = None, progress: bool = True, checkpoint_dir=None,
          resume: bool = False) -> TrainResult:
    """Train ``model`` for ``config.steps`` steps and return it trained (the input model is not modified).

    With ``checkpoint_dir`` (and ``config.checkpoint_every`` > 0) the state is checkpointed there;
    ``resume=True`` continues from the newest checkpoint in it (from step 0 if there is none).
    A NaN or inf loss, gradient norm or parameter raises :class:`TrainingError` naming the step;
    no checkpoint is ever written from such a state. SIGTERM/Ctrl-C raise :class:`TrainingInterrupted`
    after checkpointing the current step.
    """
    tracker = tracker or NullTracker()
    tx, schedule = make_optimizer(config)
    graphdef, state = init_state(model, tx)
    step_fn = jax.jit(functools.partial(train_step, graphdef, tx), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(completion_loss, graphdef))
    sampler = BatchSampler(len(data.tokens), config.batch_size, config.seed)

    checkpoints = None
    first_step, final_loss, eval_loss = 0, float("nan"), None
    if checkpoint_dir is not None and config.checkpoint_every:
        checkpoints = Checkpoints(checkpoint_dir, config.keep_checkpoints)
        # What a checkpoint must agree on to be resumed here; the batch order follows from seed and step.
        run_setup = {**{name: getattr(config, name) for name in WEIGHT_FIELDS},
                     "state": state_signature(state), "data_sha256": data_digest(data)}
        if resume:
            try:
                restored = checkpoints.restore(state, run_setup)
            except BaseException:
                checkpoints.close()
                raise
            if restored is not None:
                state, info = restored
                first_step, final_loss, eval_loss = int(info["step"]), float(info["loss"]), info.get("eval_loss")
        elif checkpoints.steps():
            checkpoints.close()
            raise ConfigError(f"train.checkpoint_dir: {checkpoints.directory} already holds checkpoints "
                              f"(steps {checkpoints.steps()}); resume them or give an empty directory")

    def held_out_loss(params) -> float | None:
        if eval_data is None or len(eval_data.tokens) == 0:
            return None
        b = min(config.batch_size, len(eval_data.tokens))
        losses = [eval_fn(params, eval_data.tokens[i : i + b], eval_data.loss_mask[i : i + b])
                  for i in range(0, min(len(eval_data.tokens), b * config.eval_batches) - b + 1, b)]
        return float(np.mean(jax.device_get(losses)))

    def stopped(step: int, what: str, value) -> TrainingError:
        kept = (f"; the last good checkpoint (step {checkpoints.steps()[-1]}) is kept in {checkpoints.directory}"
                if checkpoints is not None and checkpoints.steps() else "")
        return TrainingError(f"step {step}: {what} is {value}; training stopped{kept}. "
                             f"Lower train.learning_rate (now {config.learning_rate})")

    bar = _progress(config.steps, progress, initial=first_step)
    pending: list[tuple[int, dict]] = []
    window_tokens, window_start, total_tokens = 0, time.perf_counter(), 0
    start, tokens_per_sec = time.perf_counter(), 0.0

    def log_window(step: int) -> None:
        """Pull the window's figures to the host (the one sync per window), check them, log them."""
        nonlocal pending, window_tokens, window_start, tokens_per_sec, final_loss
        fetched = jax.device_get([m for _, m in pending])
        tokens_per_sec = window_tokens / max(time.perf_counter() - window_start, 1e-9)
        for (s, _), m in zip(pending, fetched):
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if not np.isfinite(loss):
                raise stopped(s, "the loss", loss)
            if not np.isfinite(grad_norm):
                raise stopped(s, "the gradient norm", grad_norm)
            tracker.log_scalar("loss", loss, s)
            tracker.log_scalar("grad_norm", grad_norm, s)
            tracker.log_scalar("learning_rate", float(schedule(s)), s)
        final_loss = float(fetched[-1]["loss"])
        tracker.log_scalar("tokens_per_sec", tokens_per_sec, step)
        bar.set_postfix(loss=f"{final_loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
        pending, window_tokens, window_start = [], 0, time.perf_counter()

    def checkpoint(step: int) -> None:
        # Only a finite state is ever saved: the window up to this step was checked by log_window,
        # the parameters it produced are checked here.
        if not bool(_all_finite(state.params)):
            raise stopped(step, "a parameter", "inf or NaN after the update")
        # The metrics of every step before the checkpoint are stored first (sent, or kept locally):
        # a resumed run recomputes only the steps after it, so nothing before it may be missing.
        tracker.sync()
        checkpoints.save(state, {**run_setup, "step": step + 1, "loss": final_loss, "eval_loss": eval_loss})

    try:
        with _StopOnSignal() as stop:
            for step in range(first_step, config.steps):
                idx = sampler.indices(step)
                batch = {"tokens": data.tokens[idx], "loss_mask": data.loss_mask[idx]}
                state, metrics = step_fn(state, batch)
                pending.append((step, metrics))
                n_tokens = batch["tokens"].size  # positions processed (B x L), the usual throughput unit
                window_tokens += n_tokens
                total_tokens += n_tokens
                last = step == config.steps - 1
                save = checkpoints is not None and ((step + 1) % config.checkpoint_every == 0 or last)
                interrupted = stop.signum is not None
                if (step + 1) % config.log_every == 0 or last or save or interrupted:
                    log_window(step)
                if (config.eval_every and (step + 1) % config.eval_every == 0) or last:
                    eval_loss = held_out_loss(state.params)
                    if eval_loss is not None:
                        tracker.log_scalar("eval_loss", eval_loss, step)
                if save or (interrupted and checkpoints is not None):
                    checkpoint(step)
                bar.update(1)
                if interrupted:
                    where = str(checkpoints.directory / str(step + 1)) if checkpoints is not None else None
                    raise TrainingInterrupted(step + 1, stop.signum, where)
    finally:
        bar.close()
        tracker.flush()
        if checkpoints is not None:
            checkpoints.close()  # waits for the save in flight: the newest checkpoint is complete
    seconds = time.perf_counter() - start
    trained = nnx.merge(graphdef, state.params)
    return TrainResult(trained, final_loss, eval_loss, config.steps, total_tokens / max(seconds, 1e-9), seconds,
                       first_step)


def _note(message: str) -> None:
    print(f"[mlflow-tunix] {message}", file=sys.stderr, flush=True)


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True,
                mininterval=1.0)
