"""Training: completion-only cross-entropy, Optax AdamW, one jitted pure step.

The step is a pure function ``train_step(graphdef, tx, state, batch) -> (state, metrics)`` over a
pytree ``TrainState`` (step, params, optimizer state), so it can later be sharded over a
``jax.sharding.Mesh`` or wrapped by a sweep without change. The loop around it is plain: sample a
batch, step, every ``log_every`` steps pull the figures to the host and hand them to the tracker
(``mlflow_tunix.tracking``), every ``eval_every`` steps measure the held-out loss, every
``checkpoint_every`` steps save an Orbax checkpoint (``checkpoint.py``). The loop's running figures
live in one small object (:class:`_Loop`).

A run can be resumed from its newest checkpoint to the very same weights: the batches are a
function of (seed, step) alone, the state is saved bit for bit, and the step is the same program.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from mlflow_tunix import aot, distributed, lora
from mlflow_tunix import model as model_module
from mlflow_tunix.checkpoint import Checkpoints, StopOnSignal, TrainingInterrupted, arrays_digest, state_signature
from mlflow_tunix.errors import ConfigError, TrainingError, short
from mlflow_tunix.lora import LoraConfig
from mlflow_tunix.tracking import NullTracker, Tracker


# Ceilings (documented in docs/design.md): far beyond a CPU run, refused before a run starts.
MAX_STEPS = 10_000_000
MAX_BATCH_SIZE = 65_536


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
    # Batches of similar lengths, each cut to its own longest row (rounded up to LENGTH_STEP): when
    # examples differ much in length, padding to the longest of all wastes half the compute.
    group_by_length: bool = False
    # Several examples per row (block-diagonal causal mask, positions restarting per example): a
    # step trains the same examples with far fewer padding positions. "auto": pack when it saves
    # at least PACK_GAIN of the positions over the first steps (see choose_packing).
    packing: Literal[True, False, "auto"] = False
    checkpoint_every: int = 100  # an Orbax checkpoint every N steps and at the last one (0 = none)
    keep_checkpoints: int = 2  # the newest K checkpoints are kept, older ones deleted
    checkpoint_dir: str = ""  # runs keep their checkpoints in <checkpoint_dir>/<run id>/ ("": see resume.checkpoint_root)
    lora: LoraConfig | None = None  # {rank, alpha, targets}: train low-rank adapters only (lora.py)
    # Data-parallel processes (distributed.py): "auto" = one per core on CPU (1 on GPU/TPU, which use
    # their local devices), or a number. The CLI launches them; the batch is split over them.
    processes: str = "1"

    def __post_init__(self):
        # Checked here, so a TrainConfig built in code is checked too: each of these, out of range,
        # stops training, turns the loss into NaN or loses checkpoints.
        for name, lowest, message in (("steps", 1, "must be at least 1"), ("batch_size", 1, "must be at least 1"),
                                      ("log_every", 1, "must be at least 1"), ("warmup_steps", 0, "must be >= 0"),
                                      ("eval_every", 0, "must be >= 0 (0 = never)")):
            if getattr(self, name) < lowest:
                raise ConfigError(f"train.{name}: {message}, got {getattr(self, name)}")
        if self.processes != "auto" and not (str(self.processes).isdigit() and 1 <= int(self.processes) <= 1024):
            raise ConfigError(f"train.processes: must be auto or a whole number from 1 to 1024, got {self.processes!r}")
        if isinstance(self.packing, str) and self.packing.lower() in ("true", "false", "auto"):  # a -P override
            object.__setattr__(self, "packing", {"true": True, "false": False}.get(self.packing.lower(), "auto"))
        if not (isinstance(self.packing, bool) or self.packing == "auto"):
            raise ConfigError(f"train.packing: must be true, false or auto, got {short(self.packing)}")
        if not isinstance(self.group_by_length, bool):
            raise ConfigError(f"train.group_by_length: must be true or false, got {self.group_by_length!r}")
        for name, highest in (("steps", MAX_STEPS), ("batch_size", MAX_BATCH_SIZE)):
            if getattr(self, name) > highest:
                raise ConfigError(f"train.{name}: must be at most {highest}, got {getattr(self, name)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            # numpy's and JAX's generators take an unsigned 32-bit seed; -1 used to end in a numpy traceback.
            raise ConfigError(f"train.seed: must be an integer between 0 and {2**32 - 1}, got {short(self.seed)}")
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


def check_batch_size(batch_size: int, n_examples: int) -> None:
    """A batch must fit in the training set (the pipeline asks before any run starts, the sampler again)."""
    if batch_size > n_examples:
        raise ConfigError(f"train.batch_size: {batch_size} is larger than the training set "
                          f"({n_examples} examples); allowed: 1 to {n_examples}")


LENGTH_STEP = 32  # grouped batches are cut to a multiple of this: a few shapes, so a few compilations
GROUP_BATCHES = 50  # grouped batches are formed within windows of this many batches of a shuffled epoch


class BatchSampler:
    """Seeded epochs of shuffled indices. The order is a function of (seed, step) alone, so a resumed
    run sees exactly the batches the uninterrupted one would have seen.

    With ``lengths``, each window of GROUP_BATCHES batches of the shuffled epoch is sorted by length
    before it is cut into batches, and the window's batches are shuffled again: batches of similar
    lengths, in random order, still a function of (seed, step)."""

    def __init__(self, n: int, batch_size: int, seed: int, lengths: np.ndarray | None = None):
        check_batch_size(batch_size, n)
        self.n, self.batch_size, self.seed, self.lengths = n, batch_size, seed, lengths
        self.per_epoch = n // batch_size
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.n)[: self.per_epoch * self.batch_size]
            if self.lengths is not None:
                batches = []
                window = GROUP_BATCHES * self.batch_size
                for start in range(0, len(order), window):
                    part = order[start : start + window]
                    part = part[np.argsort(self.lengths[part], kind="stable")]
                    batches += [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
                order = np.concatenate([batches[i] for i in rng.permutation(len(batches))])
            self._epoch, self._order = epoch, order
        return self._order

    def indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.per_epoch)
        return self._epoch_order(epoch)[k * self.batch_size : (k + 1) * self.batch_size]


# --------------------------------------------------------------------------- packing
# Written here rather than taken from Grain: Grain packs a stream, so which examples share a step
# depends on the iterator's state, which a checkpoint would then have to carry; here a step packs
# exactly the examples the sampler gives it, so a packed step trains the same examples (the same
# loss, up to float rounding) as an unpacked one, and a batch stays a function of (seed, step).
PACK_GAIN = 0.2  # packing: auto packs when it saves at least this share of the positions (wider rows cost attention)
PACK_PROBE_STEPS = 64  # ... measured over this many first steps
PACK_MIN_WIDTH = 128  # packed rows are at least this wide, so that examples of more than half the longest pair up


def row_bucket(n: int, cap: int, devices: int = 1) -> int:
    """Rows of a packed batch, rounded up to a multiple of cap // 16 (at most ``cap``): a step's row
    count varies little around its mean, so a few shapes, so a few compilations. A multiple of
    ``devices`` too: data parallelism splits the rows (cap, the batch size, already is one)."""
    multiple = math.lcm(max(1, cap // 16), devices)
    return min(-(-n // multiple) * multiple, cap)


def pack_rows(lengths: np.ndarray, width: int) -> list[list[int]]:
    """First-fit decreasing: the positions in ``lengths`` grouped into rows of at most ``width`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for j in np.argsort(-lengths, kind="stable"):
        n = int(lengths[j])
        for r in range(len(rows)):
            if n <= room[r]:
                rows[r].append(int(j))
                room[r] -= n
                break
        else:
            rows.append([int(j)])
            room.append(width - n)
    return rows


def packed_batch(data: TokenizedData, idx: np.ndarray, lengths: np.ndarray, max_rows: int,
                 width: int | None = None, devices: int = 1) -> dict:
    """The examples ``idx`` packed into rows of ``pack_width`` (narrow rows keep attention cheap), with
    ``positions`` restarting at 0 and ``segment_ids`` (1, 2, ... per example, 0 on padding) for the
    block-diagonal causal mask."""
    width = width or pack_width(data, idx, lengths)
    rows = pack_rows(lengths[idx], width)
    shape = (row_bucket(len(rows), max_rows, devices), width)
    tokens, positions, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    loss_mask = np.zeros(shape, np.float32)
    for r, members in enumerate(rows):
        at = 0
        for segment, j in enumerate(members, 1):
            i = idx[j]
            n = int(lengths[i])
            tokens[r, at : at + n] = data.tokens[i, :n]
            # A segment's first token is never a target: it would be predicted from the example before.
            loss_mask[r, at + 1 : at + n] = data.loss_mask[i, 1:n]
            positions[r, at : at + n] = np.arange(n)
            segments[r, at : at + n] = segment
            at += n
    return {"tokens": tokens, "loss_mask": loss_mask, "positions": positions, "segment_ids": segments}


def padded_width(data: TokenizedData, idx: np.ndarray, lengths: np.ndarray | None) -> int:
    """An unpacked batch's width: the data's, or (group_by_length) its longest row's rounded up to LENGTH_STEP."""
    width = data.tokens.shape[1]
    if lengths is not None:  # (a row's padding carries no loss and is never attended to)
        width = min(width, -(-int(lengths[idx].max()) // LENGTH_STEP) * LENGTH_STEP)
    return width


def pack_width(data: TokenizedData, idx: np.ndarray, lengths: np.ndarray) -> int:
    """A packed row's width: the step's longest example rounded up to LENGTH_STEP, at least PACK_MIN_WIDTH."""
    return max(padded_width(data, idx, lengths), PACK_MIN_WIDTH)


def make_batch(data: TokenizedData, idx: np.ndarray, lengths: np.ndarray, config: TrainConfig, pack: bool,
               devices: int = 1) -> dict:
    if pack:
        return packed_batch(data, idx, lengths, config.batch_size, devices=devices)
    width = padded_width(data, idx, lengths if config.group_by_length else None)
    return {"tokens": data.tokens[idx, :width], "loss_mask": data.loss_mask[idx, :width]}


def choose_packing(config: TrainConfig, sampler: "BatchSampler", data: TokenizedData, lengths: np.ndarray) -> bool:
    """``packing: auto``: pack when, over the first PACK_PROBE_STEPS steps, packed batches hold at
    least PACK_GAIN fewer positions than padded ones (the step's cost is nearly linear in them)."""
    if config.packing != "auto":
        return bool(config.packing)
    padded = packed = 0
    for step in range(min(config.steps, PACK_PROBE_STEPS)):
        idx = sampler.indices(step)
        padded += len(idx) * padded_width(data, idx, lengths if config.group_by_length else None)
        width = pack_width(data, idx, lengths)
        packed += row_bucket(len(pack_rows(lengths[idx], width)), config.batch_size) * width
    return packed <= (1 - PACK_GAIN) * padded


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


def completion_loss(graphdef, params, tokens, loss_mask, positions=None, segment_ids=None, count=None):
    """Mean next-token cross-entropy over completion targets; prompt and padding weigh nothing.
    With ``segment_ids`` (a packed batch) each example attends only to itself, at its own ``positions``.
    ``count`` (the data-parallel step's) divides instead of this batch's own number of targets."""
    model = nnx.merge(graphdef, params)
    if segment_ids is None:
        logits = model(tokens[:, :-1])
    else:
        logits = model(tokens[:, :-1], positions[:, :-1], segment_ids=segment_ids[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
    mask = _targets(loss_mask)
    return (ce * mask).sum() / jnp.maximum(mask.sum() if count is None else count, 1.0)


def _targets(loss_mask):
    """Which next-token targets carry loss: position t predicts token t + 1."""
    return loss_mask[:, 1:]


def train_step(graphdef, tx, state: TrainState, batch, base=None, lora_scale: float = 0.0) -> tuple[TrainState, dict]:
    """One AdamW step. With ``base`` (LoRA), ``state.params`` are the adapters and the gradient
    reaches only them: the model runs on the frozen base weights with the adapters merged in."""
    loss, grads = jax.value_and_grad(_batch_loss(graphdef, batch, base, lora_scale))(state.params)
    return _apply(tx, state, loss, grads)


def _batch_loss(graphdef, batch, base, lora_scale: float, count=None) -> Callable:
    """params -> the batch's completion loss (LoRA adapters merged into ``base`` first, if given)."""
    def loss_fn(params):
        if base is not None:
            params = lora.merged(base, params, lora_scale)
        return completion_loss(graphdef, params, batch["tokens"], batch["loss_mask"], batch.get("positions"),
                               batch.get("segment_ids"), count=count)

    return loss_fn


def _eval_loss(graphdef, params, tokens, mask, base=None, lora_scale: float = 0.0):
    """The held-out loss of a batch (LoRA adapters merged into ``base`` first, if given)."""
    return completion_loss(graphdef, params if base is None else lora.merged(base, params, lora_scale), tokens, mask)


def _apply(tx, state: TrainState, loss, grads) -> tuple[TrainState, dict]:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), {"loss": loss, "grad_norm": optax.global_norm(grads)}


def data_parallel_step(graphdef, tx, dp: distributed.DataParallel, lora_scale: float = 0.0) -> Callable:
    """``train_step`` for a batch split on its rows over ``dp``'s mesh (the state and ``base`` replicated),
    written out with ``shard_map``: each device takes the loss of its rows over the whole batch's
    number of completion targets, and the gradients are summed over the devices as **one flat
    vector**. Left to jit's partitioner, the same step all-reduced a tuple of every parameter's
    gradient, which gloo (CPU) sends one array after another: the all-reduce alone took ~70 ms of
    a 165 ms step for two processes (the step itself ~85 ms); one 2 MB vector takes ~4 ms.
    The same mean loss and gradients as ``train_step`` on the whole batch, summed in another
    order (equal to float rounding)."""
    axis, replicated, rows = distributed.AXIS, dp.replicated.spec, dp.sharded.spec

    def local(state, batch, base):
        count = jax.lax.psum(_targets(batch["loss_mask"]).sum().astype(jnp.float32), axis)
        # Varying parameters: their gradients are this device's own, summed below in one piece
        # (with replicated ones, shard_map would sum every gradient array on its own).
        params = jax.lax.pcast(state.params, axis, to="varying")
        loss, grads = jax.value_and_grad(_batch_loss(graphdef, batch, base, lora_scale, count))(params)
        flat, unravel = ravel_pytree(grads)
        return _apply(tx, state, jax.lax.psum(loss, axis), unravel(jax.lax.psum(flat, axis)))

    def step(state, batch, base=None):
        specs = {name: rows for name in batch}
        return jax.shard_map(local, mesh=dp.mesh, in_specs=(replicated, specs, replicated),
                             out_specs=(replicated, replicated))(state, batch, base)

    return step


def _saved_programs(graphdef, tx, state: TrainState, base, config: TrainConfig) -> tuple[Callable, Callable]:
    """``train_step`` and the held-out loss, jitted with their compiled programs saved beside JAX's
    persistent cache (``aot``): a later run with the same model, config and batch shapes loads them
    without tracing or lowering. The saved programs take and return plain lists of the state's arrays
    (their trees are this run's). Returns ``step(state, batch)`` and ``eval(params, tokens, mask)``."""
    state_tree, params_tree = jax.tree.structure(state), jax.tree.structure(state.params)
    base_tree = None if base is None else jax.tree.structure(base)
    scale = config.lora.scale if config.lora is not None else 0.0
    unflatten = lambda tree, leaves: None if leaves is None else jax.tree.unflatten(tree, leaves)

    def flat_step(state_leaves, batch, base_leaves):
        new, metrics = train_step(graphdef, tx, unflatten(state_tree, state_leaves), batch,
                                  unflatten(base_tree, base_leaves), lora_scale=scale)
        return jax.tree.leaves(new), metrics

    def flat_eval(params_leaves, tokens, mask, base_leaves):
        return _eval_loss(graphdef, unflatten(params_tree, params_leaves), tokens, mask,
                          unflatten(base_tree, base_leaves), scale)

    # Everything the programs are built from besides their arguments: the model's graph (with its config),
    # the optimizer's and LoRA's settings (the fields that change the weights), and the code they run.
    key = repr((graphdef, sorted(weight_fields(config).items()), state_tree, base_tree))
    modules = (sys.modules[__name__], model_module, lora)  # the code they run
    saved_step = aot.saved_jit(flat_step, name="train-step", key=key, modules=modules, donate_argnums=0)
    saved_eval = aot.saved_jit(flat_eval, name="eval-loss", key=key, modules=modules)
    base_leaves = None if base is None else jax.tree.leaves(base)

    def step(state, batch):
        leaves, metrics = saved_step(jax.tree.leaves(state), batch, base_leaves)
        return jax.tree.unflatten(state_tree, leaves), metrics

    def eval_loss(params, tokens, mask):
        return saved_eval(jax.tree.leaves(params), tokens, mask, base_leaves)

    return step, eval_loss


def init_state(model, tx) -> tuple[Any, TrainState]:
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


# --------------------------------------------------------------------------- what a checkpoint must match
# The TrainConfig fields that do not change the weights: how often to log, evaluate and
# checkpoint, and where. Every other field must match for a checkpoint to be resumed, so a new
# hyperparameter is covered without anyone having to remember it.
NOT_IN_WEIGHTS = ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "checkpoint_dir",
                  "processes")


def weight_fields(config: TrainConfig) -> dict:
    """The TrainConfig fields the weights depend on, by name."""
    return {name: value for name, value in dataclasses.asdict(config).items() if name not in NOT_IN_WEIGHTS}


def resume_key(config: TrainConfig, model_config, state, data: TokenizedData) -> dict:
    """Everything a checkpoint must agree on to be resumed into this run (JSON-ready): the
    TrainConfig fields the weights depend on (the seed fixes the batch order), the whole model
    config, the state's shapes and the training tokens."""
    key = weight_fields(config)
    key["model"] = dataclasses.asdict(model_config)
    key = json.loads(json.dumps(key))  # as the checkpoint's JSON info holds it (tuples as lists)
    key["state"] = state_signature(state)
    key["data_sha256"] = arrays_digest(data.tokens, data.loss_mask)
    return key


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


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
    trained_params: int = 0  # parameters the optimizer updated (all of them, or the LoRA adapters)
    optimizer_state_size: int = 0  # numbers in the optimizer state
    adapters: Any = None  # lora.Adapters of a train.lora run (``model`` has them merged), else None
    packed: bool = False  # whether the batches were packed (train.packing, or what auto chose)
    completion_tokens_per_sec: float = 0.0  # the tokens that carry loss: comparable packed or not


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
    tx, schedule = make_optimizer(config)
    graphdef, state = init_state(model, tx)
    base, scale = None, 0.0
    if config.lora is not None:
        # The model's weights become the frozen base; the state trains only the adapters.
        base, scale = state.params, config.lora.scale
        adapters = lora.init_adapters(base, config.lora, config.seed)
        state = TrainState(state.step, adapters, tx.init(adapters))
    # Several devices (of this process or, joined by jax.distributed, of several): data parallel,
    # the state replicated, each batch split on its rows; one device: the arrays stay as they are.
    dp = distributed.DataParallel()
    dp = dp if dp.active else None
    shard = dp.shard_rows if dp else (lambda batch: batch)
    if dp:
        dp.check_batch(config.batch_size)
        state, base = dp.replicate(state), (dp.replicate(base) if base is not None else None)
        step_fn = functools.partial(jax.jit(data_parallel_step(graphdef, tx, dp, scale), donate_argnums=0), base=base)
        eval_fn = functools.partial(jax.jit(functools.partial(_eval_loss, graphdef), out_shardings=dp.replicated),
                                    base=base, lora_scale=scale)
    else:
        if base is None:  # the step donates its state: a copy, or the caller's model would lose its arrays
            state = state._replace(params=jax.tree.map(jnp.copy, state.params))
        step_fn, eval_fn = _saved_programs(graphdef, tx, state, base, config)
    lengths = _lengths(data)
    sampler = BatchSampler(len(data.tokens), config.batch_size, config.seed, lengths if config.group_by_length else None)
    pack = choose_packing(config, sampler, data, lengths)
    loop = _Loop(config, tracker or NullTracker(), schedule, eval_fn, eval_data, state,
                 dp)
    if checkpoint_dir is not None and config.checkpoint_every:
        loop.open_checkpoints(checkpoint_dir, resume_key(config, model.config, state, data), resume)

    bar = _progress(config.steps, progress, initial=loop.first_step)
    start = time.perf_counter()
    try:
        with StopOnSignal() as stop:
            for step in range(loop.first_step, config.steps):
                batch = make_batch(data, sampler.indices(step), lengths, config, pack, dp.n_devices if dp else 1)
                loop.state, metrics = step_fn(loop.state, shard(batch))
                signum = stop.signum  # read once: a signal may land at any moment
                loop.after_step(step, metrics, batch["tokens"].size, int(batch["loss_mask"].sum()),
                                interrupted=signum is not None)
                bar.update(1)
                bar.set_postfix(loss=f"{loop.final_loss:.4f}", tok_s=f"{loop.tokens_per_sec:,.0f}", refresh=False)
                if signum is not None:
                    raise TrainingInterrupted(step + 1, signum, loop.checkpoint_path(step + 1))
    finally:
        bar.close()
        loop.close()
    seconds = time.perf_counter() - start
    params = loop.state.params if base is None else lora.merged(base, loop.state.params, scale)  # saved merged
    if dp:  # every process holds all of the replicated weights: back to plain arrays of this process
        params = jax.tree.map(jnp.asarray, dp.gather(params))
    return TrainResult(nnx.merge(graphdef, params), loop.final_loss, loop.eval_loss, config.steps,
                       loop.total_tokens / max(seconds, 1e-9), seconds, loop.first_step,
                       _size(loop.state.params), _size(loop.state.opt_state),
                       None if base is None else lora.Adapters(config.lora, loop.state.params), pack,
                       loop.total_completion / max(seconds, 1e-9))


def _size(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def _lengths(data: TokenizedData) -> np.ndarray:
    """Each row's length: up to its last loss-carrying token (its EOS)."""
    has_loss = data.loss_mask > 0
    return np.where(has_loss.any(axis=1), data.loss_mask.shape[1] - np.argmax(has_loss[:, ::-1], axis=1), 0)


class _Loop:
    """What the loop carries from step to step: the state, the metrics not yet pulled to the host,
    the throughput window, the last figures, and the checkpoints."""

    def __init__(self, config: TrainConfig, tracker: Tracker, schedule, eval_fn, eval_data, state: TrainState,
                 dp: distributed.DataParallel | None = None):
        self.config, self.tracker, self.schedule, self.eval_fn, self.eval_data = config, tracker, schedule, eval_fn, eval_data
        self.state, self.dp = state, dp
        self.checkpoints: Checkpoints | None = None
        self.key: dict = {}
        self.first_step, self.final_loss, self.eval_loss = 0, float("nan"), None
        self.pending: list[tuple[int, dict]] = []  # (step, device metrics) since the last sync
        self.window_tokens, self.window_start = 0, time.perf_counter()
        self.total_tokens, self.tokens_per_sec = 0, 0.0
        self.window_completion, self.total_completion = 0, 0  # completion tokens (those carrying loss)

    def open_checkpoints(self, directory, key: dict, resume: bool) -> None:
        """Checkpoint to ``directory``; with ``resume``, continue from its newest checkpoint (one of
        another run is refused). Without, the directory must hold none."""
        self.checkpoints, self.key = Checkpoints(directory, self.config.keep_checkpoints), key
        try:
            if not resume and self.checkpoints.steps():
                raise ConfigError(f"train.checkpoint_dir: {self.checkpoints.directory} already holds checkpoints "
                                  f"(steps {self.checkpoints.steps()}); resume them or give an empty directory")
            restored = self.checkpoints.restore(self.state, key) if resume else None
        except BaseException:
            self.checkpoints.close()
            raise
        if restored is not None:
            self.state, info = restored
            self.first_step, self.final_loss, self.eval_loss = int(info["step"]), float(info["loss"]), info.get("eval_loss")

    def after_step(self, step: int, metrics, n_tokens: int, n_completion: int, interrupted: bool) -> None:
        """Log every ``log_every`` steps, evaluate every ``eval_every``, checkpoint every ``checkpoint_every``
        (and all three at the last step; a stop request logs and checkpoints at once)."""
        c = self.config
        self.pending.append((step, metrics))
        self.window_tokens += n_tokens  # positions processed (B x L), the usual throughput unit
        self.total_tokens += n_tokens
        self.window_completion += n_completion  # what packing speeds up (it removes padding positions)
        self.total_completion += n_completion
        last = step == c.steps - 1
        save = self.checkpoints is not None and ((step + 1) % c.checkpoint_every == 0 or last or interrupted)
        if (step + 1) % c.log_every == 0 or last or save or interrupted:
            self.log_window(step)
        if (c.eval_every and (step + 1) % c.eval_every == 0) or last:
            self.eval_loss = self.held_out_loss()
            if self.eval_loss is not None:
                self.tracker.log_scalar("eval_loss", self.eval_loss, step)
        if save:
            self.checkpoint(step)

    def log_window(self, step: int) -> None:
        """Pull the window's figures to the host (the one sync per window), check them, log them."""
        fetched = [m for _, m in self.pending]
        fetched = self.dp.gather(fetched) if self.dp else jax.device_get(fetched)
        self.tokens_per_sec = self.window_tokens / max(time.perf_counter() - self.window_start, 1e-9)
        for (s, _), m in zip(self.pending, fetched):
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if not np.isfinite(loss):
                raise self.stopped(s, "the loss", loss)
            if not np.isfinite(grad_norm):
                raise self.stopped(s, "the gradient norm", grad_norm)
            self.tracker.log_scalar("loss", loss, s)
            self.tracker.log_scalar("grad_norm", grad_norm, s)
            self.tracker.log_scalar("learning_rate", float(self.schedule(s)), s)
        self.final_loss = float(fetched[-1]["loss"])
        self.tracker.log_scalar("tokens_per_sec", self.tokens_per_sec, step)
        seconds = max(time.perf_counter() - self.window_start, 1e-9)
        self.tracker.log_scalar("completion_tokens_per_sec", self.window_completion / seconds, step)
        self.pending, self.window_tokens, self.window_completion, self.window_start = [], 0, 0, time.perf_counter()

    def held_out_loss(self) -> float | None:
        data = self.eval_data
        if data is None or len(data.tokens) == 0:
            return None
        b = min(self.config.batch_size, len(data.tokens))
        if self.dp:  # each device takes an equal share of every held-out batch
            b -= b % self.dp.n_devices
            if b == 0:
                return None
        shard = self.dp.shard_rows if self.dp else (lambda batch: batch)
        losses = [self.eval_fn(self.state.params, **shard({"tokens": data.tokens[i : i + b],
                                                           "mask": data.loss_mask[i : i + b]}))
                  for i in range(0, min(len(data.tokens), b * self.config.eval_batches) - b + 1, b)]
        return float(np.mean(self.dp.gather(losses) if self.dp else jax.device_get(losses)))

    def checkpoint(self, step: int) -> None:
        # Only a finite state is ever saved: the window up to this step was checked by log_window,
        # the parameters it produced are checked here.
        finite = _all_finite(self.state.params)
        if not bool(self.dp.gather(finite) if self.dp else finite):
            raise self.stopped(step, "a parameter", "inf or NaN after the update")
        # The metrics of every step before the checkpoint are stored first (sent, or kept locally):
        # a resumed run recomputes only the steps after it, so nothing before it may be missing.
        self.tracker.sync()
        self.checkpoints.save(self.state, {**self.key, "step": step + 1, "loss": self.final_loss,
                                           "eval_loss": self.eval_loss})

    def checkpoint_path(self, step: int) -> str | None:
        return str(self.checkpoints.directory / str(step)) if self.checkpoints is not None else None

    def stopped(self, step: int, what: str, value) -> TrainingError:
        ckpt = self.checkpoints
        kept = (f"; the last good checkpoint (step {ckpt.steps()[-1]}) is kept in {ckpt.directory}"
                if ckpt is not None and ckpt.steps() else "")
        return TrainingError(f"step {step}: {what} is {value}; training stopped{kept}. "
                             f"Lower train.learning_rate (now {self.config.learning_rate})")

    def close(self) -> None:
        self.tracker.flush()
        if self.checkpoints is not None:
            self.checkpoints.close()  # waits for the save in flight: the newest checkpoint is complete


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True,
                mininterval=1.0)
