"""Training: completion-only cross-entropy, Optax AdamW, one jitted pure step.

The step is a pure function ``train_step(state, batch) -> (state, metrics)`` over a pytree
``TrainState`` (step, params, optimizer state), so it can later be sharded over a
``jax.sharding.Mesh`` or wrapped by a sweep without change. The loop around it is plain: sample a
batch, step, every ``log_every`` steps pull the figures to the host and hand them to the tracker
(``mlflow_tunix.tracking``), every ``eval_every`` steps measure the held-out loss.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mlflow_tunix.errors import ConfigError, TrainingError
from mlflow_tunix.tracking import NullTracker, Tracker


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


# --------------------------------------------------------------------------- tokenized data
class TokenizedData(NamedTuple):
    """Right-padded token ids and a mask that is 1 where the *target* token is part of the completion."""

    tokens: np.ndarray  # int32 [N, L]
    loss_mask: np.ndarray  # float32 [N, L]: loss_mask[i, t] weights predicting tokens[i, t] from tokens[i, :t]

    @property
    def n_tokens(self) -> int:
        return int(self.loss_mask.sum())


def tokenize_pairs(prompts: Sequence[str], completions: Sequence[str], tokenizer, *, seq_len: int | None = None,
                   multiple_of: int = 8) -> TokenizedData:
    """Tokenize ``prompt + completion + EOS``; only completion and EOS tokens carry loss.

    ``seq_len`` defaults to the longest example, rounded up to a multiple of ``multiple_of``.
    """
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    rows = [p + c + [tokenizer.eos_token_id] for p, c in zip(prompt_ids, completion_ids)]
    longest = max((len(r) for r in rows), default=1)
    if seq_len is None:
        seq_len = -(-longest // multiple_of) * multiple_of
    if longest > seq_len:
        raise ConfigError(f"model.max_seq_len: the longest example has {longest} tokens, more than {seq_len}")
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


# --------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    model: Any  # the trained nnx model
    final_loss: float
    final_eval_loss: float | None
    steps: int
    tokens_per_sec: float
    seconds: float


def train(model, data: TokenizedData, config: TrainConfig, *, eval_data: TokenizedData | None = None,
          tracker: Tracker | None = None, progress: bool = True) -> TrainResult:
    """Train ``model`` for ``config.steps`` steps and return it trained (the input model is not modified)."""
    tracker = tracker or NullTracker()
    tx, schedule = make_optimizer(config)
    graphdef, state = init_state(model, tx)
    step_fn = jax.jit(functools.partial(train_step, graphdef, tx), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(completion_loss, graphdef))
    sampler = BatchSampler(len(data.tokens), config.batch_size, config.seed)

    def held_out_loss(params) -> float | None:
        if eval_data is None or len(eval_data.tokens) == 0:
            return None
        b = min(config.batch_size, len(eval_data.tokens))
        losses = [eval_fn(params, eval_data.tokens[i : i + b], eval_data.loss_mask[i : i + b])
                  for i in range(0, min(len(eval_data.tokens), b * config.eval_batches) - b + 1, b)]
        return float(np.mean(jax.device_get(losses)))

    bar = _progress(config.steps, progress)
    pending: list[tuple[int, dict]] = []
    window_tokens, window_start, total_tokens = 0, time.perf_counter(), 0
    start, tokens_per_sec, final_loss, eval_loss = time.perf_counter(), 0.0, float("nan"), None
    for step in range(config.steps):
        idx = sampler.indices(step)
        batch = {"tokens": data.tokens[idx], "loss_mask": data.loss_mask[idx]}
        state, metrics = step_fn(state, batch)
        pending.append((step, metrics))
        n_tokens = batch["tokens"].size  # positions processed (B x L), the usual throughput unit
        window_tokens += n_tokens
        total_tokens += n_tokens
        last = step == config.steps - 1
        if (step + 1) % config.log_every == 0 or last:
            fetched = jax.device_get([m for _, m in pending])  # the one host sync per logging window
            elapsed = time.perf_counter() - window_start
            tokens_per_sec = window_tokens / max(elapsed, 1e-9)
            for (s, _), m in zip(pending, fetched):
                loss = float(m["loss"])
                if not np.isfinite(loss) or not np.isfinite(float(m["grad_norm"])):
                    bar.close()
                    raise TrainingError(f"step {s}: the loss or gradient norm is {loss if not np.isfinite(loss) else float(m['grad_norm'])}; "
                                        f"lower train.learning_rate (now {config.learning_rate})")
                tracker.log_scalar("loss", loss, s)
                tracker.log_scalar("grad_norm", float(m["grad_norm"]), s)
                tracker.log_scalar("learning_rate", float(schedule(s)), s)
            final_loss = float(fetched[-1]["loss"])
            tracker.log_scalar("tokens_per_sec", tokens_per_sec, step)
            bar.set_postfix(loss=f"{final_loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
            pending, window_tokens, window_start = [], 0, time.perf_counter()
        if (config.eval_every and (step + 1) % config.eval_every == 0) or last:
            eval_loss = held_out_loss(state.params)
            if eval_loss is not None:
                tracker.log_scalar("eval_loss", eval_loss, step)
        bar.update(1)
    bar.close()
    tracker.flush()
    seconds = time.perf_counter() - start
    trained = nnx.merge(graphdef, state.params)
    return TrainResult(trained, final_loss, eval_loss, config.steps, total_tokens / seconds, seconds)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", disable=not enabled, dynamic_ncols=True, mininterval=1.0)
