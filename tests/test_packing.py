"""Packed batches (train.packing): several examples per row, a block-diagonal causal mask, positions
restarting per example. Tried on a tiny model with the real jitted loss and training loop: a packed
batch trains exactly what the unpacked one does, no example sees another, resume stays bit-identical."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_same_weights
from mlflow_tunix.errors import ConfigError
from mlflow_tunix.model import ModelConfig, build_model, flat_params
from mlflow_tunix.train import (TokenizedData, TrainConfig, _lengths, choose_packing, completion_loss, packed_batch,
                                row_bucket, train, BatchSampler)

MODEL = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=48)


def skewed_data(n: int = 24, width: int = 48, seed: int = 0, long=(3, 17)) -> TokenizedData:
    """Rows of 6-20 tokens (two of 46), a 2-5 token prompt, padded to ``width``: mostly padding,
    as dev-reasoning is."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), np.float32)
    for i in range(n):
        length = 46 if i in long else int(rng.integers(6, 21))
        prompt = int(rng.integers(2, 6))
        tokens[i, :length] = rng.integers(1, MODEL.vocab_size, length)
        mask[i, prompt:length] = 1.0
    return TokenizedData(tokens, mask)


@pytest.fixture(scope="module")
def model():
    return build_model(MODEL, seed=0)


@functools.cache
def _jitted(model):
    graphdef, params = nnx.split(model, nnx.Param)
    loss_and_grads = jax.jit(jax.value_and_grad(lambda p, b: completion_loss(
        graphdef, p, b["tokens"], b["loss_mask"], b.get("positions"), b.get("segment_ids"))))
    logits = jax.jit(lambda p, tokens, positions=None, segment_ids=None: nnx.merge(graphdef, p)(
        tokens, positions, segment_ids=segment_ids))
    return params, loss_and_grads, logits


def _loss_and_grads(model, batch):
    params, fn, _ = _jitted(model)
    return fn(params, {k: jnp.asarray(v) for k, v in batch.items()})


def test_a_packed_batch_gives_the_loss_and_gradients_of_the_unpacked_examples(model):
    data, idx = skewed_data(), np.arange(24)
    packed = packed_batch(data, idx, _lengths(data), max_rows=24)
    assert packed["tokens"].shape[0] <= 8  # 24 rows packed into a few
    assert packed["loss_mask"].sum() == data.loss_mask[:, 1:].sum()  # every target once (the first never is one)
    loss, grads = _loss_and_grads(model, {"tokens": data.tokens, "loss_mask": data.loss_mask})
    packed_loss, packed_grads = _loss_and_grads(model, packed)
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    # Per example: the loss of example i alone, unpacked, against its segment in the packed rows.
    for i in (0, 3, 11):
        alone, _ = _loss_and_grads(model, {"tokens": data.tokens[i : i + 1], "loss_mask": data.loss_mask[i : i + 1]})
        r, start = next((r, _find(packed, data, i, r)) for r in range(len(packed["tokens"]))
                        if _find(packed, data, i, r) is not None)
        segment = packed["segment_ids"] == packed["segment_ids"][r, start]
        in_row = (np.arange(len(packed["tokens"])) == r)[:, None]
        one, _ = _loss_and_grads(model, dict(packed, loss_mask=packed["loss_mask"] * segment * in_row))
        np.testing.assert_allclose(one, alone, rtol=1e-5)


def _find(packed, data, i, r):
    """Where example i starts in row r of the packed batch, or None."""
    n = int(_lengths(data)[i])
    for start in np.flatnonzero(packed["positions"][r] == 0):
        segment = packed["segment_ids"][r, start]
        if segment and (packed["segment_ids"][r] == segment).sum() == n and \
                (packed["tokens"][r, start : start + n] == data.tokens[i, :n]).all():
            return int(start)
    return None


def test_positions_restart_and_no_example_sees_another(model):
    data = skewed_data()
    packed = packed_batch(data, np.arange(24), _lengths(data), max_rows=24)
    row = int(np.argmax([len(set(s[s > 0])) for s in packed["segment_ids"]]))  # the row with most examples
    segments = packed["segment_ids"][row]
    assert len(set(segments[segments > 0])) >= 3
    for s in set(segments[segments > 0]):
        assert packed["positions"][row][segments == s].tolist() == list(range((segments == s).sum()))

    params, _, jitted_logits = _jitted(model)

    def logits(tokens):
        return np.asarray(jitted_logits(params, tokens[None, :], packed["positions"][row][None, :], segments[None, :])[0])

    before = logits(packed["tokens"][row])
    changed = packed["tokens"][row].copy()
    first = segments == 1
    changed[first] = (changed[first] + 7) % MODEL.vocab_size  # another first example
    after = logits(changed)
    others = (segments > 1)
    np.testing.assert_array_equal(after[others], before[others])  # the others' logits do not move at all
    assert np.abs(after[first] - before[first]).max() > 1e-3  # (while the changed one's do)
    # And each example's logits are those it has alone, at positions 0..n-1.
    s = segments == 2
    alone = np.asarray(jitted_logits(params, packed["tokens"][row][s][None, :])[0])
    np.testing.assert_allclose(before[s], alone, atol=2e-5)


def test_packed_training_follows_the_unpacked_loss_and_resumes_bit_identical(tmp_path):
    data = skewed_data(n=32, long=())  # rows of <= 20 tokens: a few shapes to compile
    config = TrainConfig(steps=8, batch_size=8, warmup_steps=2, log_every=1, eval_every=0, checkpoint_every=4,
                         keep_checkpoints=3, packing=True)
    fresh = lambda: build_model(MODEL, seed=0)  # noqa: E731
    packed = train(fresh(), data, config, progress=False, checkpoint_dir=tmp_path / "ckpt")
    plain = train(fresh(), data, dataclasses.replace(config, packing=False), progress=False)
    assert packed.packed and not plain.packed
    # the same completion tokens trained either way (tokens_per_sec counts positions, padding included)
    completion = [r.completion_tokens_per_sec * r.seconds for r in (packed, plain)]
    expected = sum(data.loss_mask[BatchSampler(32, 8, 0).indices(step)].sum() for step in range(8))
    assert completion == pytest.approx([expected, expected], rel=1e-9) and expected > 0
    np.testing.assert_allclose(packed.final_loss, plain.final_loss, rtol=1e-4)
    for name, value in flat_params(packed.model).items():
        np.testing.assert_allclose(value, flat_params(plain.model)[name], atol=1e-4, err_msg=name)

    import shutil

    shutil.rmtree(tmp_path / "ckpt" / "8")  # as if killed after step 4's checkpoint
    resumed = train(fresh(), data, config, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert resumed.first_step == 4
    assert_same_weights(flat_params(resumed.model), flat_params(packed.model))


def test_auto_packs_skewed_rows_and_not_full_ones():
    config = TrainConfig(steps=20, batch_size=8, packing="auto")
    skewed = skewed_data(n=32)
    assert choose_packing(config, BatchSampler(32, 8, 0), skewed, _lengths(skewed))
    full = TokenizedData(np.ones((32, 48), np.int32), np.ones((32, 48), np.float32))  # nothing to gain
    assert not choose_packing(config, BatchSampler(32, 8, 0), full, _lengths(full))
    assert [row_bucket(n, 64) for n in (1, 4, 5, 25, 62)] == [4, 4, 8, 28, 64]
    assert [row_bucket(n, 16) for n in (1, 5, 16)] == [1, 5, 16] and row_bucket(31, 30) == 30  # never more rows than examples
    # data parallelism splits the rows: a multiple of the device count too (the batch size is one)
    assert [row_bucket(n, 16, devices=2) for n in (1, 5, 16)] == [2, 6, 16] and row_bucket(5, 64, devices=8) == 8


@pytest.mark.parametrize("value", ["yes", 2, 1.0, None, "pack"])
def test_bad_packing_values_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^train\.packing: must be true, false or auto, got"):
        TrainConfig(packing=value)


def test_packing_from_a_project_config():
    from mlflow_tunix.config import from_dict

    assert from_dict(TrainConfig, {"packing": "auto"}, "train").packing == "auto"
    assert from_dict(TrainConfig, {"packing": "True"}, "train").packing is True
    with pytest.raises(ConfigError, match=r"^train\.packing: "):
        from_dict(TrainConfig, {"packing": 3}, "train")
