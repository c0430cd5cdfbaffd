"""LoRA: train low-rank adapters on the attention and MLP projections, the base weights frozen.

For a target weight W [in, out] the adapter is A [in, r] (small random) and B [r, out] (zeros, so
training starts from the base model exactly); the model computes with W + (alpha / r) * A @ B. The
adapters are merged into the weights once per step, outside the model, so model.py stays plain.
What is saved is the merged weights by default (a standard checkpoint, servable and exportable as
is), or, with ``save: adapters``, only the adapters and a reference to their base (flavor.py).

Our own ~40 lines rather than qwix (the library Tunix uses): qwix swaps LoRA into ``nnx.Linear`` /
einsum calls of matched modules, and our projections are bare ``nnx.Param`` matrices used with ``@``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from mlflow_tunix.errors import ConfigError

# The projections a target name stands for (their parameter names in model.py).
TARGETS = {"q": "attn.wq", "k": "attn.wk", "v": "attn.wv", "o": "attn.wo",
           "gate": "mlp.w1", "up": "mlp.w3", "down": "mlp.w2"}

SAVE_FORMS = ("merged", "adapters")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    # What the run logs: the merged weights (a standalone model) or the adapters and a reference to
    # the base they were trained on (model.init_from), a few percent of the size on a real checkpoint.
    save: str = "merged"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"train.lora.rank: must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"train.lora.alpha: must be > 0, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"train.lora.targets: {unknown[0] if unknown else 'none'!r} is not one of "
                              f"{', '.join(TARGETS)}")
        if self.save not in SAVE_FORMS:
            raise ConfigError(f"train.lora.save: must be one of {', '.join(SAVE_FORMS)}, got {self.save!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _is_target(path, config: LoraConfig) -> bool:
    name = ".".join(str(p) for p in path)
    return any(name.endswith(TARGETS[t]) for t in config.targets)


def init_adapters(base: nnx.State, config: LoraConfig, seed: int) -> dict:
    """{dotted name: {"a": [in, r], "b": [r, out]}} for every target weight of ``base``."""
    adapters, key = {}, jax.random.key(seed)
    for path, var in nnx.to_flat_state(base):
        if _is_target(path, config):
            key, sub = jax.random.split(key)
            n_in, n_out = var.shape
            adapters[".".join(map(str, path))] = {
                "a": jax.random.normal(sub, (n_in, config.rank), jnp.float32) / jnp.sqrt(n_in),
                "b": jnp.zeros((config.rank, n_out), jnp.float32)}
    return adapters


def merged(base: nnx.State, adapters: dict, scale: float) -> nnx.State:
    """The base weights with every adapter added: W + scale * A @ B."""
    flat = []
    for path, var in nnx.to_flat_state(base):
        ad = adapters.get(".".join(map(str, path)))
        value = var[...]
        if ad is not None:
            value = value + (scale * (ad["a"] @ ad["b"])).astype(value.dtype)
        flat.append((path, var.replace(value)))
    return nnx.from_flat_state(flat)


@dataclass
class Adapters:
    """Trained adapters and the config they were trained with (``TrainResult.adapters``)."""

    config: LoraConfig
    weights: dict  # {dotted weight name: {"a": [in, r], "b": [r, out]}}

    def param_count(self) -> int:
        return sum(int(ab["a"].size + ab["b"].size) for ab in self.weights.values())


def apply(module, adapters: Adapters):
    """A copy of ``module`` with the adapters merged into its weights: the arithmetic training's
    final merge does (``merged``, eagerly), so the result is bit for bit the model training returned."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    weights = {name: {k: jnp.asarray(v) for k, v in ab.items()} for name, ab in adapters.weights.items()}
    return nnx.merge(graphdef, merged(params, weights, adapters.config.scale), rest)


def target_shapes(module, config: LoraConfig) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """{dotted name: (A's shape, B's shape)} of the adapters ``config`` puts on ``module``."""
    return {".".join(map(str, path)): ((var.shape[0], config.rank), (config.rank, var.shape[1]))
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)) if _is_target(path, config)}
