"""A decoder-only transformer in Flax NNX: the Llama architecture and its Qwen2/Qwen3 variants.

Reads top to bottom: the config, RMSNorm, rotary position embeddings, attention, the gated MLP,
a block, the model, then ``build_model`` (the one place a model is built and its weights loaded)
and the helpers that turn weights into a flat dict for saving. The maths is exactly that of
Hugging Face's ``LlamaForCausalLM``/``Qwen2ForCausalLM``/``Qwen3ForCausalLM``, so their checkpoints
load into it and every model trained here exports to one (``mlflow_tunix.hf``).

Every weight is an ``nnx.Param`` and there is no other state, so the training step can work on
the pure form::

    graphdef, params = nnx.split(model, nnx.Param)
    logits = nnx.merge(graphdef, params)(tokens)      # inside jax.jit
"""

from __future__ import annotations

import dataclasses
import contextvars
import hashlib
import math
from dataclasses import dataclass
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlflow_tunix.errors import ConfigError, InputError, ModelLoadError, short

# Ceilings on a config's sizes: far above any model trained on this package's CPUs (or read from a
# Hugging Face checkpoint), low enough that a typo (d_model: 1e9) is refused before anything is built.
# Within them, check_memory compares the estimated memory with what the machine has.
MAX_SIZES = {"vocab_size": 1 << 20, "d_model": 1 << 16, "n_layers": 1024, "n_heads": 1024, "d_ff": 1 << 18,
             "max_seq_len": 1 << 20, "n_kv_heads": 1024, "head_dim": 1 << 16}


# The architectures a model can have, named as Hugging Face names them. All are Llama-shaped
# (pre-norm RMSNorm, rotate-half RoPE, SwiGLU MLP, grouped-query attention); they differ in two
# places: Qwen2 adds biases to the q/k/v projections, Qwen3 RMS-normalises each head of q and k.
FAMILIES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 384  # hidden width of the gated (SwiGLU) MLP
    max_seq_len: int = 256  # longest prompt + completion; the KV cache size limit
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    family: str = "llama"  # one of FAMILIES
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: n_heads
    head_dim: int | None = None  # width of one head; None: d_model // n_heads
    # A local Hugging Face folder to start from (mlflow_tunix.hf): its architecture, weights and
    # tokenizer replace the fields above (max_seq_len caps its context) and tokenizer training.
    init_from: str | None = None

    def __post_init__(self):
        def check_size(*names):
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ConfigError(f"model.{name} must be a positive integer, got {short(value)}")
                if value > MAX_SIZES[name]:
                    raise ConfigError(f"model.{name} must be at most {MAX_SIZES[name]}, got {value}")

        check_size("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads "
                                  f"({self.n_heads}), or give model.head_dim")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        check_size("n_kv_heads", "head_dim")
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family: {short(self.family)} is not one of {', '.join(FAMILIES)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            # RoPE rotates pairs of features, so each head needs an even width.
            raise ConfigError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)!r}")

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"


# One entry per layer, each {"k": [B, K, S, Dh], "v": [B, K, S, Dh]}: a plain pytree, so it can
# be carried through jax.lax.while_loop.
Cache = list[dict[str, jax.Array]]

# Masked attention scores. A finite minimum (not -inf) keeps a fully masked row (a padding query)
# from producing NaNs: its softmax is merely uniform, and its output is never used.
_MASKED = float(jnp.finfo(jnp.float32).min)

# causal_attention's query blocks (see there): a row of T positions is split into blocks of
# max(QUERY_BLOCK, T / MAX_QUERY_BLOCKS) queries.
QUERY_BLOCK = 64
MAX_QUERY_BLOCKS = 8


# Set while build_model fills a model with given weights: the big matrices start as np.empty, which
# the OS backs with memory only when written (never: each is replaced), so a streamed checkpoint is
# never held twice and no time goes into random numbers that are thrown away.
_WEIGHTS_GIVEN = contextvars.ContextVar("weights_given", default=False)


def _normal(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
    if _WEIGHTS_GIVEN.get():
        return nnx.Param(np.empty(shape, np.float32))
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


def _zeros(width: int) -> nnx.Param:
    return nnx.Param(jnp.zeros((width,), jnp.float32))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))  # HF: "weight"
        self.eps = eps

    def __call__(self, x):
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.scale


def rope_angles(positions, head_dim: int, theta: float, *, once: bool = False):
    """sin, cos of shape [B, T, 1, head_dim/2] for integer positions [B, T].

    XLA on CPU fuses sin and cos into each consumer and evaluates them per element there: once per head
    of q and k in every layer (its optimization barrier is dropped on CPU). At batch 256 that was ~25 % of
    a decode step. With ``once`` they go through a product with the identity (exact: each entry is itself
    plus zeros), and a matmul is never fused into what reads it: computed once per token. The decode uses
    it; training does not (measured: no faster on the default project's step, 1-2 % slower in its runs).
    """
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    if not once:
        return jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # broadcast over heads
    eye = jnp.eye(head_dim // 2, dtype=jnp.float32)
    return (jnp.sin(angles) @ eye)[:, :, None, :], (jnp.cos(angles) @ eye)[:, :, None, :]


def apply_rope(x, sin, cos):
    # The "rotate half" layout of Llama/Qwen checkpoints: feature i pairs with feature i + Dh/2.
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, Dh = config.d_model, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, Dh
        q_width, kv_width = config.n_heads * Dh, config.n_kv_heads * Dh
        self.wq = _normal(rngs, (d, q_width), 0.02)
        self.wk = _normal(rngs, (d, kv_width), 0.02)
        self.wv = _normal(rngs, (d, kv_width), 0.02)
        # GPT-2: scale the projections that write into the residual stream by depth.
        self.wo = _normal(rngs, (q_width, d), 0.02 / math.sqrt(2 * config.n_layers))
        if config.qkv_bias:  # Qwen2: biases on q, k and v
            self.bq, self.bk, self.bv = _zeros(q_width), _zeros(kv_width), _zeros(kv_width)
        else:
            self.bq = self.bk = self.bv = None
        # Qwen3: each head of q and k is RMS-normalised before RoPE.
        self.q_norm = RMSNorm(Dh, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(Dh, config.norm_eps) if config.qk_norm else None

    def __call__(self, x2d, B: int, T: int, sin, cos, mask, layer_cache=None, cache_index=None):
        """x2d [B*T, d]; mask bool [B, T, S]. Returns ([B*T, d], new layer cache or None)."""
        H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = x2d @ self.wq, x2d @ self.wk, x2d @ self.wv
        if self.bq is not None:
            q, k, v = q + self.bq, k + self.bk, v + self.bv
        q, k, v = q.reshape(B, T, H, Dh), k.reshape(B, T, K, Dh), v.reshape(B, T, K, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)

        new_cache = None
        if layer_cache is not None:
            out, new_cache = cached_attention(q, k, v, mask, layer_cache, cache_index)
            return out.reshape(B * T, H * Dh) @ self.wo, new_cache

        if K != H:
            # Grouped-query attention: each key/value head serves H // K query heads (HF's repeat_kv).
            k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
        out = causal_attention(q, k, v, mask).reshape(B * T, H * Dh)
        return out @ self.wo, new_cache


def query_block(T: int) -> int:
    """Queries per block of causal_attention: QUERY_BLOCK, or more for long rows (at most
    MAX_QUERY_BLOCKS blocks, so a long row does not unroll into many small matmuls)."""
    return max(QUERY_BLOCK, -(-T // MAX_QUERY_BLOCKS))


def causal_attention(q, k, v, mask):
    """Attention of q over k, v (all [B, T, H, Dh]) under mask [B, T, T] (causal, so query t never
    sees a key after t): queries go in blocks, each over the keys up to its own end only. The keys
    after a block are masked for all of its queries, so skipping them changes no real output
    (a fully masked padding query averages over fewer keys; it is never used). Measured on the
    `reasoning` project's packed rows (288 wide, 2 cores): a train step 0.82 -> 0.63 s with blocks
    of 64 or 96 (the work is ~(1 + 1/n)/2 of the full square for n blocks, and each block's scores
    stay in cache)."""
    B, T, H, Dh = q.shape
    block = query_block(T)
    outs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        scores = jnp.einsum("bthd,bshd->bhts", q[:, start:end], k[:, :end], preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, start:end, :end], scores / math.sqrt(Dh), _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bhts,bshd->bthd", probs, v[:, :end]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def cached_attention(q, k, v, mask, layer_cache, cache_index):
    """Write k, v [B, T, K, Dh] at slot cache_index of layer_cache, then attend q [B, T, H, Dh] over
    the whole cache (the mask [B, T, S] hides the slots not written yet). Returns ([B, T, H, Dh], cache).

    The cache keeps heads before slots ([B, K, S, Dh]) so each decode step reads it where it lies:
    with slots first, every step copied the whole cache of every layer into the [B, K, S, Dh] order the
    two attention matmuls need, which made batched decoding memory-bound (batch 256 hardly faster per
    token than batch 1). Query heads are grouped by the key/value head they share (GQA) instead of
    repeating the cache H // K times.
    """
    B, T, H, Dh = q.shape
    K = layer_cache["k"].shape[1]
    at = (0, 0, cache_index, 0)
    k = jax.lax.dynamic_update_slice(layer_cache["k"], k.transpose(0, 2, 1, 3).astype(layer_cache["k"].dtype), at)
    v = jax.lax.dynamic_update_slice(layer_cache["v"], v.transpose(0, 2, 1, 3).astype(layer_cache["v"].dtype), at)
    q = q.reshape(B, T, K, H // K, Dh)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores / math.sqrt(Dh), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(B, T, H, Dh)
    return out, {"k": k, "v": v}


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        self.w1 = _normal(rngs, (d, f), 0.02)  # gate
        self.w3 = _normal(rngs, (d, f), 0.02)  # up
        self.w2 = _normal(rngs, (f, d), 0.02 / math.sqrt(2 * config.n_layers))  # down

    def __call__(self, x2d):
        return (jax.nn.silu(x2d @ self.w1) * (x2d @ self.w3)) @ self.w2


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x2d, B, T, sin, cos, mask, layer_cache=None, cache_index=None):
        h, new_cache = self.attn(self.attn_norm(x2d), B, T, sin, cos, mask, layer_cache, cache_index)
        x2d = x2d + h
        x2d = x2d + self.mlp(self.mlp_norm(x2d))
        return x2d, new_cache


class Transformer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = _normal(rngs, (config.vocab_size, config.d_model), 0.02)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = _normal(rngs, (config.d_model, config.vocab_size), 0.02)

    def __call__(self, tokens, positions=None, *, cache=None, cache_index=None, kv_mask=None, segment_ids=None,
                 last_only=False):
        """tokens int32 [B, T] -> logits float32 [B, T, V], or (logits, new_cache) with a cache.

        Without cache: causal attention over the T tokens; positions default to arange(T);
        kv_mask (bool [B, T], optional) hides padding tokens; segment_ids (int [B, T], optional, for
        rows packed with several examples) lets a token attend only to tokens of its own segment
        (a block-diagonal causal mask; give positions restarting at 0 in each segment too).
        With cache (from init_cache, S slots): this chunk's K/V are written at cache_index (a
        traced int scalar, the same for the whole batch); positions default to cache_index +
        arange(T); kv_mask (bool [B, S]) is False for left-padding slots, never attended.
        last_only: logits [B, 1, V] of the last position only (a prefill needs no more; the full
        [B, T, V] logits of a long prompt batch with a real vocabulary are gigabytes).
        """
        B, T = tokens.shape
        if cache is None:
            q_slot, S = jnp.arange(T), T
        else:
            if cache_index is None:
                raise TypeError("cache_index (where this chunk goes in the cache) is required with a cache")
            q_slot, S = cache_index + jnp.arange(T), cache[0]["k"].shape[2]
        if positions is None:
            positions = jnp.broadcast_to(q_slot, (B, T))

        # mask[b, t, s]: may query t of row b look at key slot s?
        mask = jnp.broadcast_to(jnp.arange(S)[None, :] <= q_slot[:, None], (B, T, S))
        if kv_mask is not None:
            mask = mask & kv_mask.astype(bool)[:, None, :]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        sin, cos = rope_angles(positions, self.config.head_dim, self.config.rope_theta, once=cache is not None)

        # Activations stay 2-D [B*T, d] so every linear layer is one plain matmul
        # (~40% faster training on CPU than 3-D einsums).
        x2d = jnp.take(self.embed[...], tokens.reshape(B * T), axis=0)
        new_cache = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            x2d, layer_new = block(x2d, B, T, sin, cos, mask, layer_cache, cache_index)
            new_cache.append(layer_new)
        if last_only:
            x2d, T = x2d.reshape(B, T, -1)[:, -1], 1
        x2d = self.final_norm(x2d)
        head = self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]
        logits = (x2d @ head).astype(jnp.float32).reshape(B, T, self.config.vocab_size)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> Cache:
        """An empty KV cache with max_len slots per row (at most config.max_seq_len)."""
        self._check_cache_len(max_len)
        shape = (batch_size, self.config.n_kv_heads, max_len, self.config.head_dim)  # see cached_attention
        return [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(self.config.n_layers)
        ]

    def extend_cache(self, cache: Cache, max_len: int) -> Cache:
        """``cache`` with empty slots added up to max_len (the slots it holds keep their place)."""
        self._check_cache_len(max_len)
        return [{name: jnp.pad(c, ((0, 0), (0, 0), (0, max_len - c.shape[2]), (0, 0))) for name, c in layer.items()}
                for layer in cache]

    def _check_cache_len(self, max_len: int) -> None:
        if max_len > self.config.max_seq_len:
            raise InputError(
                f"KV cache of {max_len} tokens exceeds the model's max_seq_len {self.config.max_seq_len}"
            )


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight of a model with this config, without building it.

    Shapes come from an abstract one-layer model, repeated for each block: ``nnx.eval_shape`` of the
    whole model grows with the square of n_layers (5 s at 64 layers), this grows linearly.
    """
    abstract = nnx.eval_shape(lambda: Transformer(dataclasses.replace(config, n_layers=1), rngs=nnx.Rngs(0)))
    shapes: dict[str, tuple[int, ...]] = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name, shape = _dotted(path), tuple(var.shape)
        if name.startswith("blocks.0."):
            for i in range(config.n_layers):
                shapes[f"blocks.{i}.{name[len('blocks.0.'):]}"] = shape
        else:
            shapes[name] = shape
    return shapes


def check_param_shapes(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Weights named and shaped as this config's model needs, else ModelLoadError naming the first
    missing, unexpected or misshapen one (called on a safetensors header, before anything is loaded)."""
    expected = param_shapes(config)
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise ModelLoadError(f"unexpected parameter {short(unexpected[0])} for this {config.family} model config "
                             f"(n_layers={config.n_layers})")
    for key, shape in expected.items():
        if key not in shapes:
            raise ModelLoadError(f"missing parameter {key!r} (model config n_layers={config.n_layers})")
        if tuple(shapes[key]) != shape:
            raise ModelLoadError(
                f"parameter {key!r} has shape {tuple(shapes[key])}, expected {shape} from the model config"
            )


def memory_estimate(config: ModelConfig, *, batch_size: int = 1, training: bool = False,
                    seq_len: int | None = None) -> int:
    """Bytes a model with this config needs, roughly: float32 weights (with gradients, two Adam moments and
    the copy training updates in place of the caller's model when training, or the file's copy while
    loading) plus the activations of one batch of ``seq_len`` positions (default: full length,
    ``max_seq_len``; training batches are as long as the longest example)."""
    n_params = sum(math.prod(shape) for shape in param_shapes(config).values())
    T, L = seq_len or config.max_seq_len, config.n_layers
    per_layer = batch_size * T * (6 * config.d_model + 3 * config.d_ff + config.n_heads * T)
    activations = 4 * (L * per_layer * (2 if training else 1) + batch_size * T * config.vocab_size * (3 if training else 1))
    return n_params * (20 if training else 8) + activations


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(config: ModelConfig, *, batch_size: int = 1, training: bool = False,
                 seq_len: int | None = None) -> None:
    """ConfigError (one line: how much it would need) when the model cannot fit in available memory."""
    need = memory_estimate(config, batch_size=batch_size, training=training, seq_len=seq_len)
    have = available_memory()
    if have is not None and need > have:
        doing = f"training with batch_size {batch_size}" if training else "loading"
        raise ConfigError(f"model: {doing} this model would need about {need / 2**30:.1f} GiB of memory "
                          f"(d_model={config.d_model}, n_layers={config.n_layers}, vocab_size={config.vocab_size}"
                          + (f", batches of {seq_len} positions" if seq_len and seq_len > 1 else "") + "); "
                          f"{have / 2**30:.1f} GiB are available")


def build_model(
    config: ModelConfig, *, seed: int = 0, params: Mapping[str, np.ndarray] | None = None, dtype=None
) -> Transformer:
    """Build a Transformer: randomly initialised from seed, or with the given weights.

    params is a flat dict as returned by flat_params (or any mapping with those keys: hf.py
    passes one that reads each tensor from disk when asked). A missing or unexpected key, or a
    shape that does not match the config, raises ModelLoadError naming the key. dtype: the dtype
    the given weights are stored in (default float32). A model that would not fit in the machine's
    memory raises ConfigError before anything is allocated.
    """
    check_memory(config)
    if params is None:
        return Transformer(config, rngs=nnx.Rngs(seed))
    # Built for real, linear in n_layers (tracing it abstractly with nnx.eval_shape grows with the
    # square), its matrices as untouched placeholders (_WEIGHTS_GIVEN).
    token = _WEIGHTS_GIVEN.set(True)
    try:
        model = Transformer(config, rngs=nnx.Rngs(seed))
    finally:
        _WEIGHTS_GIVEN.reset(token)
    weights = {_dotted(path): var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
    unexpected = sorted(set(params) - set(weights))
    if unexpected:
        raise ModelLoadError(f"unexpected parameter {short(unexpected[0])} for this {config.family} model config")
    # One tensor at a time, in place.
    for key, var in weights.items():
        if key not in params:
            raise ModelLoadError(f"missing parameter {key!r}")
        value = jnp.asarray(params[key], dtype=dtype or var.get_value().dtype)
        if value.shape != tuple(var.shape):
            raise ModelLoadError(
                f"parameter {key!r} has shape {value.shape}, "
                f"expected {tuple(var.shape)} from the model config"
            )
        var.set_value(value)
    return model


def _dotted(path) -> str:
    return ".".join(str(part) for part in path)


def flat_params(model: Transformer) -> dict[str, np.ndarray]:
    """Weights as {"blocks.0.attn.wq": array, ...}, the layout safetensors stores."""
    state = nnx.state(model, nnx.Param)
    return {_dotted(path): np.asarray(var[...]) for path, var in nnx.to_flat_state(state)}


def param_count(model: Transformer) -> int:
    state = nnx.state(model, nnx.Param)
    return sum(int(np.prod(var.shape)) for _, var in nnx.to_flat_state(state))


def params_sha256(model: Transformer) -> str:
    """Content address of the weights: sha256 over names, shapes, dtypes and bytes, in name order."""
    h = hashlib.sha256()
    for name, array in sorted(flat_params(model).items()):
        h.update(f"{name}:{array.dtype}:{array.shape};".encode())
        h.update(array.tobytes())
    return h.hexdigest()
