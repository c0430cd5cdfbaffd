"""The transformer: shapes, causality, weight loading, the KV cache, and that it can learn."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mlflow_tunix.errors import ConfigError, InputError, ModelLoadError
from mlflow_tunix.model import ModelConfig, build_model, flat_params, param_count, rope_angles

TINY = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, seed=0)


def random_tokens(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, TINY.vocab_size, shape), jnp.int32)


def test_logits_shape_and_dtype(model):
    logits = model(random_tokens((3, 11)))
    assert logits.shape == (3, 11, TINY.vocab_size)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_last_only_gives_the_last_positions_logits(model):
    tokens = random_tokens((3, 11), seed=1)
    full = np.asarray(model(tokens))
    last = np.asarray(jax.jit(lambda t: model(t, last_only=True))(tokens))
    assert last.shape == (3, 1, TINY.vocab_size)
    np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-6)
    cached, _ = model(tokens, cache=model.init_cache(3, 16), cache_index=0, last_only=True)
    np.testing.assert_allclose(np.asarray(cached), full[:, -1:], rtol=1e-5, atol=1e-6)


def test_rope_sin_and_cos_are_exact_and_computed_once_per_token_when_decoding(model):
    positions = jnp.arange(2 * 40).reshape(2, 40)
    sin, cos = jax.jit(functools.partial(rope_angles, once=True), static_argnums=(1, 2))(positions, 16, 10000.0)
    angles = positions.astype(jnp.float32)[..., None] * 10000.0 ** (-jnp.arange(0, 16, 2, dtype=jnp.float32) / 16)
    # the same bits as sin and cos themselves (the identity product that keeps XLA from fusing them adds zeros)
    np.testing.assert_array_equal(np.asarray(sin)[:, :, 0], np.asarray(jax.jit(jnp.sin)(angles)))
    np.testing.assert_array_equal(np.asarray(cos)[:, :, 0], np.asarray(jax.jit(jnp.cos)(angles)))
    # XLA on CPU fused them into every head's rotation of q and k in every layer, once per element there
    tokens = random_tokens((2, 9))
    hlo = jax.jit(lambda t: model(t, cache=model.init_cache(2, 16), cache_index=0)).lower(tokens).compile().as_text()
    assert hlo.count(" sine(") == 1 and hlo.count(" cosine(") == 1


def test_changing_a_future_token_leaves_earlier_logits_alone(model):
    tokens = random_tokens((1, 12))
    changed = tokens.at[0, 8].set((tokens[0, 8] + 1) % TINY.vocab_size)
    before, after = np.asarray(model(tokens)), np.asarray(model(changed))
    np.testing.assert_array_equal(before[:, :8], after[:, :8])
    assert np.abs(before[:, 8:] - after[:, 8:]).max() > 1e-4


def test_query_blocks_give_the_logits_of_one_full_square(monkeypatch):
    """causal_attention splits the queries into blocks, each over the keys up to its end: on packed
    rows (two segments, then padding) the real positions' logits equal those of one block."""
    from mlflow_tunix import model as model_module

    config = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=256)
    net = build_model(config, seed=0)
    T = 200
    tokens = random_tokens((2, T), seed=5)
    segments = np.zeros((2, T), np.int32)
    segments[0, :120], segments[0, 120:190] = 1, 2
    segments[1, :150] = 1
    positions = np.zeros((2, T), np.int32)
    positions[0, :120], positions[0, 120:190], positions[1, :150] = np.arange(120), np.arange(70), np.arange(150)
    args = (tokens, jnp.asarray(positions))
    assert model_module.query_block(T) < T  # several blocks
    blocked = np.asarray(model_module.Transformer.__call__(net, *args, segment_ids=jnp.asarray(segments)))
    monkeypatch.setattr(model_module, "QUERY_BLOCK", T)
    whole = np.asarray(model_module.Transformer.__call__(net, *args, segment_ids=jnp.asarray(segments)))
    real = segments > 0
    np.testing.assert_allclose(blocked[real], whole[real], atol=1e-5)
    assert np.abs(blocked[real]).max() > 1e-3


def test_flat_params_names_and_count(model):
    params = flat_params(model)
    d, f, V, L = TINY.d_model, TINY.d_ff, TINY.vocab_size, TINY.n_layers
    assert params["embed"].shape == (V, d)
    assert params["blocks.0.attn.wq"].shape == (d, d)
    assert params["blocks.1.mlp.w2"].shape == (f, d)
    assert params["final_norm.scale"].shape == (d,)
    assert "lm_head" not in params  # tied to the embedding
    expected = V * d + L * (4 * d * d + 3 * d * f + 2 * d) + d
    assert param_count(model) == expected == sum(p.size for p in params.values())


def test_untied_model_has_its_own_lm_head():
    config = ModelConfig(**{**TINY.__dict__, "tie_embeddings": False})
    params = flat_params(build_model(config))
    assert params["lm_head"].shape == (TINY.d_model, TINY.vocab_size)


def test_build_model_with_params_reproduces_logits(model):
    tokens = random_tokens((2, 9))
    reloaded = build_model(TINY, seed=123, params=flat_params(model))
    np.testing.assert_array_equal(np.asarray(reloaded(tokens)), np.asarray(model(tokens)))


def test_build_model_rejects_missing_key(model):
    params = flat_params(model)
    del params["blocks.1.attn.wk"]
    with pytest.raises(ModelLoadError, match=r"missing parameter 'blocks\.1\.attn\.wk'"):
        build_model(TINY, params=params)


def test_build_model_rejects_wrong_shape(model):
    params = flat_params(model)
    params["blocks.0.mlp.w1"] = np.zeros((32, 65), np.float32)
    message = r"'blocks\.0\.mlp\.w1' has shape \(32, 65\), expected \(32, 64\)"
    with pytest.raises(ModelLoadError, match=message):
        build_model(TINY, params=params)


def test_build_model_rejects_unexpected_key(model):
    params = {**flat_params(model), "lm_head": np.zeros((32, 50), np.float32)}
    with pytest.raises(ModelLoadError, match="unexpected parameter 'lm_head'"):
        build_model(TINY, params=params)


def test_config_rejects_heads_that_do_not_divide_d_model():
    with pytest.raises(ConfigError, match=r"d_model \(30\) must be divisible by model.n_heads \(4\)"):
        ModelConfig(d_model=30, n_heads=4)


def test_cache_longer_than_max_seq_len_is_refused(model):
    with pytest.raises(InputError, match="65 tokens exceeds the model's max_seq_len 64"):
        model.init_cache(1, 65)


def test_cached_forward_equals_full_forward(model):
    tokens = random_tokens((2, 10), seed=1)
    full = np.asarray(model(tokens))

    cache = model.init_cache(2, 16)
    logits, cache = model(tokens[:, :6], cache=cache, cache_index=0)
    steps = [logits]
    for t in range(6, 10):
        logits, cache = model(tokens[:, t : t + 1], cache=cache, cache_index=t)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4)


def test_cached_forward_with_left_padding_equals_unpadded(model):
    # Row 0 is 10 real tokens; row 1 is 6 real tokens left-padded by 4 pad slots. With kv_mask
    # and per-row positions, each row must give the logits of its own unpadded sequence.
    a, b = random_tokens((1, 10), seed=2), random_tokens((1, 6), seed=3)
    pad = 7
    tokens = jnp.concatenate([a, jnp.concatenate([jnp.full((1, 4), pad), b], axis=1)])
    prompt_mask = jnp.array([[True] * 10, [False] * 4 + [True] * 6])
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    kv_mask = jnp.concatenate([prompt_mask, jnp.ones((2, 4), bool)], axis=1)  # 14 cache slots

    cache = model.init_cache(2, 14)
    logits, cache = model(tokens[:, :7], positions[:, :7], cache=cache, cache_index=0, kv_mask=kv_mask)
    steps = [logits]
    for t in range(7, 10):
        logits, cache = model(
            tokens[:, t : t + 1], positions[:, t : t + 1], cache=cache, cache_index=t, kv_mask=kv_mask
        )
        steps.append(logits)
    cached = np.concatenate(steps, axis=1)

    np.testing.assert_allclose(cached[0], np.asarray(model(a))[0], atol=1e-4)
    np.testing.assert_allclose(cached[1, 4:], np.asarray(model(b))[0], atol=1e-4)


def test_left_padding_without_cache_equals_unpadded(model):
    b = random_tokens((1, 6), seed=3)
    tokens = jnp.concatenate([jnp.full((1, 3), 7), b], axis=1)
    kv_mask = jnp.array([[False] * 3 + [True] * 6])
    positions = jnp.maximum(jnp.cumsum(kv_mask, axis=1) - 1, 0)
    padded = np.asarray(model(tokens, positions, kv_mask=kv_mask))
    np.testing.assert_allclose(padded[0, 3:], np.asarray(model(b))[0], atol=1e-4)


def test_jitted_adam_on_split_params_memorises_a_sequence():
    # The trainer's pure form: params split out, merged back inside a jitted step.
    model = build_model(TINY, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.tile(jnp.arange(1, 9, dtype=jnp.int32), 4)[None]  # 1..8 repeated, [1, 32]
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    first = None
    for _ in range(100):
        params, opt_state, loss = step(params, opt_state)
        first = float(loss) if first is None else first
    assert first > 3.0  # about log(50) at random init
    assert float(loss_fn(params)) < 0.1
