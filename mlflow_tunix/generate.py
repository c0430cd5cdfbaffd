"""Batched generation with a KV cache, the whole decode inside one jax.jit.

A batch of prompts is left-padded to a bucketed length, prefilled in one call, then extended one
token per step by a ``jax.lax.while_loop`` that stops as soon as every row has emitted a stop
token (a long decode: by a few loops, each over a cache only as long as it needs; see
cache_segments). Shapes are bucketed so the compiled function is reused across batches and calls.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mlflow_tunix import aot
from mlflow_tunix import model as model_module
from mlflow_tunix.data import check_template
from mlflow_tunix.errors import ConfigError, InputError

# Prompt lengths are rounded up to a multiple of this, so that prompts of similar length share
# one compiled function.
PROMPT_BUCKET = 16
# What one batch's prefill may hold at once (its attention scores and logits), in bytes: a batch whose
# longest prompt would take more runs as several smaller ones (see _rows_within).
PREFILL_BYTES = 1 << 30


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    seed: int = 0
    batch_size: int = 64
    prompt_template: str = "plain"  # applied by callers with mlflow_tunix.data.render_prompt

    def __post_init__(self):
        # The one place these values are checked: project configs, saved models and served
        # requests all build a GenerationConfig. (Whether max_new_tokens leaves room for a prompt
        # depends on the model: config.validate and the flavor check that.)
        for name in ("max_new_tokens", "top_k", "seed", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"generation.{name}: must be an integer, got {value!r}")
        t = self.temperature
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, float, np.number)):
            raise ConfigError(f"generation.temperature: must be a number, got {t!r}")
        for name, ok, allowed in (
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", math.isfinite(t) and t >= 0, ">= 0 (0 = greedy)"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = no top-k filter)"),
            ("seed", 0 <= self.seed < 2**32, f"between 0 and {2**32 - 1} (the sampler keys on 32 bits)"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
        ):
            if not ok:
                raise ConfigError(f"generation.{name}: must be {allowed}, got {getattr(self, name)!r}")
        check_template(self.prompt_template, "generation.prompt_template")


def generate_ids(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_ids: Sequence[int],
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    prefill_bytes: int = PREFILL_BYTES,
) -> list[list[int]]:
    """New tokens for each prompt, cut after the first stop token (the stop token is kept).

    Greedy when temperature == 0, else sampled from softmax(logits / temperature), restricted to
    the top_k most likely tokens when top_k > 0. Sampling is keyed by seed and the prompt's index,
    so a prompt gets the same sample whatever batch it lands in.
    """
    config = model.config
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    _check_request(prompts, config, max_new_tokens, pad_id, stop_ids, temperature, top_k, batch_size)
    if not prompts:
        return []

    # A full batch always has the same shape; a request smaller than batch_size runs the next
    # power of two rows instead of paying for batch_size rows.
    rows = min(batch_size, 1 << (len(prompts) - 1).bit_length())
    streams = _streams()
    if streams > 1:  # fewer batches than streams: smaller batches, one for each stream
        rows = min(rows, 1 << (-(-len(prompts) // streams) - 1).bit_length())
    # top_k >= vocab keeps every token: the same as no filter.
    top_k = 0 if top_k >= config.vocab_size else int(top_k)
    stop = tuple(sorted({int(s) for s in stop_ids}))
    graphdef, state = nnx.split(model)

    def batch(start: int) -> list[list[int]]:
        chunk, done = prompts[start : start + rows], []
        # One very long prompt pads every row of its batch to its length: such a batch runs in
        # pieces of fewer rows, each padded to its own longest prompt (the tokens are the same).
        # The budget is shared by the batches running at once.
        fit = _rows_within(config, _prompt_len(chunk, config, max_new_tokens), max_new_tokens, rows,
                           prefill_bytes // streams)
        for offset in range(0, len(chunk), fit):
            piece = chunk[offset : offset + fit]
            out = _run_batch(graphdef, state, piece, fit, start + offset, config, max_new_tokens, pad_id, stop,
                             temperature, top_k, seed)
            done.extend(_cut_after_stop(out[i].tolist(), stop) for i in range(len(piece)))
        return done

    starts = range(0, len(prompts), rows)
    results = []
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=len(starts), desc="generate", unit="batch", disable=not progress))
        if streams > 1 and len(starts) > 1:
            pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(min(streams, len(starts))))
            done_in_order = pool.map(batch, starts)  # each batch's tokens depend on its prompts alone
        else:
            done_in_order = map(batch, starts)
        for done in done_in_order:
            results.extend(done)
            bar.update(1)
    return results


# Decode batches run in this many threads at once on a CPU (at most one per core): one decode call leaves a
# core idle for much of each step (XLA runs the batched attention matmuls on one thread), a second call at
# the same time fills it. Measured on 2 cores: 256 prompts as two concurrent batches of 128 decode 1.64x
# as fast as one batch of 256, the same tokens (docs/benchmarks.md).
DECODE_STREAMS = 2


def _streams() -> int:
    if jax.default_backend() != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(DECODE_STREAMS, cores))


def _prompt_len(chunk, config, max_new_tokens: int) -> int:
    """The padded prompt length of a batch: its longest prompt rounded up for reuse, but never past
    what the KV cache may hold."""
    longest = max(len(p) for p in chunk)
    return min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, config.max_seq_len - max_new_tokens)


def _rows_within(config, prompt_len: int, max_new_tokens: int, rows: int, budget: int) -> int:
    """The rows (``rows`` halved until it fits, at least 1) whose prefill at ``prompt_len`` keeps
    one layer's attention scores [rows, heads, prompt_len, cache] and the logits [rows, vocab] (float32;
    the prefill computes the last position's only) within ``budget`` bytes. (dev-reasoning-v2 has a
    1410-token prompt: with 128 rows its scores alone were ~5 GB a layer and the evaluation peaked at 13 GB.)"""
    per_row = 4 * (prompt_len * config.n_heads * (prompt_len + max_new_tokens) + config.vocab_size)
    fit = rows
    while fit > 1 and fit * per_row > budget:
        fit //= 2
    return fit


def _run_batch(graphdef, state, chunk, rows, start, config, max_new_tokens, pad_id, stop, temperature, top_k, seed):
    """Token ids [rows, max_new_tokens] for the prompts of chunk (at most rows; the rest are dummy
    rows), prompt i keyed as prompt start + i for sampling."""
    prompt_len = _prompt_len(chunk, config, max_new_tokens)
    tokens = np.full((rows, prompt_len), pad_id, np.int32)
    prompt_mask = np.zeros((rows, prompt_len), bool)
    live = np.zeros((rows,), bool)
    for i, p in enumerate(chunk):
        tokens[i, prompt_len - len(p) :] = p
        prompt_mask[i, prompt_len - len(p) :] = True
        live[i] = True
    # Dummy rows hold one pad token so that no row is fully masked; they start "done".
    prompt_mask[len(chunk) :, -1] = True
    row_ids = np.arange(start, start + rows, dtype=np.int32)

    # NumPy arguments, not jnp ones: each jnp.asarray/jnp.int32 here was an eager op that a new
    # process compiled again (too small for the persistent cache), ~0.3 s of every first call.
    out = _decode(
        graphdef,
        state,
        tokens,
        prompt_mask,
        live,
        row_ids,
        np.asarray(stop, np.int32),
        np.int32(pad_id),
        np.float32(max(temperature, 1e-6)),
        np.uint32(seed % 2**32),  # any Python int is a valid seed
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0,
        top_k=top_k,
    )
    return np.asarray(out)


def _cut_after_stop(ids: list[int], stop: tuple[int, ...]) -> list[int]:
    for n, token in enumerate(ids):
        if token in stop:
            return ids[: n + 1]
    return ids


def request_error(exc: ConfigError) -> InputError:
    """A GenerationConfig error as a request error: "generation.top_k: must be ..." -> "top_k must be ..."."""
    key, _, problem = str(exc).removeprefix("generation.").partition(": ")
    return InputError(f"{key} {problem}")


def _check_request(prompts, config, max_new_tokens, pad_id, stop_ids, temperature, top_k, batch_size):
    try:  # (any Python int is a valid seed here: it is taken modulo 2**32)
        GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, batch_size=batch_size)
    except ConfigError as exc:
        raise request_error(exc) from None
    vocab = config.vocab_size
    for name, token in [("pad_id", pad_id)] + [("stop id", s) for s in stop_ids]:
        if not 0 <= token < vocab:
            raise InputError(f"{name} {token} is outside the vocabulary (size {vocab})")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > config.max_seq_len:
            raise InputError(
                f"prompt {i} has {len(p)} tokens + max_new_tokens {max_new_tokens} = "
                f"{len(p) + max_new_tokens}, more than the model's max_seq_len {config.max_seq_len}"
            )
        if p.min() < 0 or p.max() >= vocab:
            bad = int(p[(p < 0) | (p >= vocab)][0])
            raise InputError(f"prompt {i} has token id {bad} outside the vocabulary (size {vocab})")


def _decode(graphdef, state, *args, max_new_tokens, greedy, top_k):
    """_generate_batch jitted, with its compiled executable saved beside JAX's persistent cache
    (``aot``): a new process loads it instead of tracing and lowering the whole decode (prefill and
    loop step: the model twice), most of a warm first call. Keyed on the model's graph with its config,
    the static options, the argument shapes and the source of this module and model.py (and aot's
    environment: versions, devices). Compiled once per process and shape, whichever thread asks first."""
    leaves, treedef = jax.tree.flatten(state)  # saved programs take builtin containers: the state's leaves
    statics = (("greedy", greedy), ("max_new_tokens", max_new_tokens), ("top_k", top_k))
    with _MAKING:  # batches decoded at once in several threads share one program
        saved = _saved_decode(graphdef, treedef, statics)
    return saved(leaves, *args)


_MAKING = threading.Lock()


@functools.lru_cache(maxsize=64)
def _saved_decode(graphdef, treedef, statics) -> aot.SavedJit:
    """One saved program per model graph and options (made once: the graph's repr alone took ~0.5 ms)."""
    flat = lambda leaves, *args: _generate_batch(graphdef, jax.tree.unflatten(treedef, leaves), *args, **dict(statics))
    return aot.saved_jit(flat, name="decode", key=repr((graphdef, treedef, statics)),
                         modules=(sys.modules[__name__], model_module))  # the code it runs


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k")
)
def _generate_batch(
    graphdef, state, tokens, prompt_mask, live, row_ids, stop_ids, pad_id, temperature, seed,
    *, max_new_tokens, greedy, top_k,
):
    """Token ids [B, max_new_tokens] for left-padded prompts [B, P]; pad after a row stops.

    graphdef is a static argument, so jit's own cache keys compiled code on graphdef + shapes:
    any model with the same architecture reuses it.
    """
    model = nnx.merge(graphdef, state)
    B, P = tokens.shape
    lengths = prompt_mask.sum(axis=-1)
    # Each row counts positions from its first real token, so left padding does not shift RoPE.
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
    # Pad slots are never attended; generated slots become visible as the causal mask reaches them.
    kv_mask = jnp.concatenate([prompt_mask, jnp.ones((B, max_new_tokens), bool)], axis=1)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), row_ids)

    def pick(logits, step):  # logits [B, V] -> token ids [B]
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / temperature
        if top_k:
            kth_best = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth_best, -jnp.inf, logits)
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
        return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

    def is_stop(token):
        return (token[:, None] == stop_ids[None, :]).any(axis=-1)

    ends = cache_segments(P, max_new_tokens)
    cache = model.init_cache(B, ends[0])
    logits, cache = model(tokens, positions, cache=cache, cache_index=0, kv_mask=kv_mask[:, : ends[0]], last_only=True)
    token = jnp.where(live, pick(logits[:, -1], 0), pad_id)
    done = ~live | is_stop(token)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    carry = (jnp.int32(1), out, token, done)

    for i, slots in enumerate(ends):
        if i:  # the next segment's slots, empty (and masked until written)
            cache = model.extend_cache(cache, slots)
        # Steps up to slots - P write the slots this cache holds; each step attends only over them.
        last_step, segment_mask = min(slots - P, max_new_tokens - 1), kv_mask[:, :slots]

        def keep_going(carry, last_step=last_step):
            step, _, _, done, _ = carry
            return (step <= last_step) & ~jnp.all(done)

        def one_step(carry, segment_mask=segment_mask):
            step, out, token, done, cache = carry
            # The previous token goes in slot P + step - 1 at its row's own position.
            logits, cache = model(
                token[:, None], (lengths + step - 1)[:, None],
                cache=cache, cache_index=P + step - 1, kv_mask=segment_mask,
            )
            token = jnp.where(done, pad_id, pick(logits[:, -1], step))
            out = out.at[:, step].set(token)
            return step + 1, out, token, done | is_stop(token), cache

        *carry, cache = jax.lax.while_loop(keep_going, one_step, (*carry, cache))
    return carry[1]


# A decode of SEGMENT_FROM new tokens or more runs its loop in SEGMENTS pieces, each over a KV cache only
# as long as the slots written by its end: a step reads every slot of its cache, so a cache of the final
# length made the early steps read mostly empty slots. Each piece is compiled on its own: for a shorter
# decode the extra compile cost more than the reads saved (docs/benchmarks.md).
SEGMENTS, SEGMENT_FROM = 4, 128


def cache_segments(prompt_len: int, max_new_tokens: int) -> list[int]:
    """The cache length (slots) of each piece of the decode loop, the last one prompt_len + max_new_tokens."""
    full = prompt_len + max_new_tokens
    if max_new_tokens < SEGMENT_FROM:
        return [full]
    step = -(-max_new_tokens // SEGMENTS)
    return [min(prompt_len + step * (i + 1), full) for i in range(SEGMENTS)]


def generate_text(
    model,
    tokenizer,
    prompts: Sequence[str],
    config: GenerationConfig,
    *,
    stop_tokens: Sequence[str] = ("</answer>",),
    progress: bool = False,
) -> list[str]:
    """Completion text for each (already templated) prompt.

    tokenizer is a transformers PreTrainedTokenizerFast with pad_token and eos_token set.
    Generation stops at EOS or any of stop_tokens; a stop token is kept in the text, special tokens
    such as <reasoning> are kept, pad and EOS are removed.
    """
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None or eos_id is None:
        raise InputError("the tokenizer needs a pad_token and an eos_token for generation")

    # A stop token that is one token id stops generation in the loop; a longer stop string can
    # only be found in the decoded text, so it is cut there.
    stop_ids, stop_strings = [eos_id], []
    for stop in stop_tokens:
        ids = tokenizer.encode(stop, add_special_tokens=False)
        if len(ids) == 1 and tokenizer.decode(ids) == stop:
            stop_ids.append(ids[0])
        else:
            stop_strings.append(stop)

    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    new_ids = generate_ids(
        model,
        encoded,
        max_new_tokens=config.max_new_tokens,
        pad_id=pad_id,
        stop_ids=stop_ids,
        temperature=config.temperature,
        top_k=config.top_k,
        seed=config.seed,
        batch_size=config.batch_size,
        progress=progress,
    )

    texts = []
    for ids in new_ids:
        ids = [t for t in ids if t != pad_id and t != eos_id]
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for stop in stop_strings:
            if stop in text:
                text = text[: text.index(stop) + len(stop)]
        texts.append(text)
    return texts
