"""What the trainer learns from: the loss mask of `tokenize_pairs` and the batches of `BatchSampler`."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import tiny_tokenizer
from mlflow_tunix.errors import ConfigError
from mlflow_tunix.model import ModelConfig, build_model
from mlflow_tunix.train import BatchSampler, completion_loss, tokenize_pairs

PROMPTS = ["What is 3+4?\n", "What is 12+90?\n", "Add 7 and 8, please.\n"]
COMPLETIONS = ["<reasoning>3+4=7</reasoning><answer>7</answer>",
               "<reasoning>2+0+0=2\n1+9+0=10</reasoning><answer>102</answer>",
               "<answer>15</answer>"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- the loss mask
def test_rows_are_prompt_completion_eos_then_padding(tokenizer):
    data = tokenize_pairs(PROMPTS, COMPLETIONS, tokenizer, multiple_of=1)
    lengths = [len(_ids(tokenizer, p)) + len(_ids(tokenizer, c)) + 1 for p, c in zip(PROMPTS, COMPLETIONS)]
    assert data.tokens.shape == data.loss_mask.shape == (3, max(lengths))
    assert (data.tokens.dtype, data.loss_mask.dtype) == (np.int32, np.float32)
    for row, mask, prompt, completion in zip(data.tokens, data.loss_mask, PROMPTS, COMPLETIONS):
        p, c = _ids(tokenizer, prompt), _ids(tokenizer, completion)
        end = len(p) + len(c) + 1
        assert row[:end].tolist() == p + c + [tokenizer.eos_token_id]
        assert (row[end:] == tokenizer.pad_token_id).all()
        # 1 exactly where the target is a completion token or the EOS; the prompt and padding weigh 0.
        assert mask.tolist() == [0.0] * len(p) + [1.0] * (len(c) + 1) + [0.0] * (len(row) - end)
    assert data.n_tokens == sum(len(_ids(tokenizer, c)) + 1 for c in COMPLETIONS)


def test_the_loss_targets_are_the_completion_and_eos_each_once(tokenizer):
    """The loss shifts by one (position t predicts token t from tokens before it): the masked targets,
    read the way completion_loss reads them, are each row's completion + EOS, nothing else, once."""
    data = tokenize_pairs(PROMPTS, COMPLETIONS, tokenizer)
    targets, weights = data.tokens[:, 1:], data.loss_mask[:, 1:]
    for row_targets, row_weights, completion in zip(targets, weights, COMPLETIONS):
        assert set(row_weights.tolist()) <= {0.0, 1.0}
        assert row_targets[row_weights == 1].tolist() == _ids(tokenizer, completion) + [tokenizer.eos_token_id]


def test_completion_loss_is_the_mean_over_every_completion_token(tokenizer):
    """The masked loss equals the plain mean of next-token cross-entropies over each row's completion
    + EOS positions, found here from the token counts alone: an off-by-one in the mask, a padded
    position that counts, or a token counted twice would each change the number. (The padding cannot
    reach earlier logits: attention is causal, tests/test_model.py checks that.)"""
    data = tokenize_pairs(PROMPTS, COMPLETIONS, tokenizer, multiple_of=16)
    config = ModelConfig(vocab_size=len(tokenizer), d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64)
    model = build_model(config, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    masked = float(jax.jit(completion_loss, static_argnums=0)(graphdef, params, data.tokens, data.loss_mask))

    forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))  # jitted: eager NNX is slow
    logits = np.asarray(forward(params, data.tokens[:, :-1]), np.float32)
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, data.tokens[:, 1:]))
    losses = []
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        start = len(_ids(tokenizer, prompt))  # the first completion token's position
        end = start + len(_ids(tokenizer, completion)) + 1  # one past the EOS
        losses.extend(ce[i, start - 1 : end - 1])  # logits at t-1 predict token t
    assert len(losses) == data.n_tokens
    assert masked == pytest.approx(float(np.mean(losses)), rel=1e-5)
    assert masked != pytest.approx(float(ce[:, : data.tokens.shape[1] - 1].mean()), rel=1e-3)  # padding would show


@pytest.mark.parametrize("multiple_of, max_len, width", [(1, None, None), (8, None, 8), (16, None, 16),
                                                        (64, None, 64), (64, "longest", None)])
def test_rows_are_padded_to_a_multiple_but_never_past_max_len(tokenizer, multiple_of, max_len, width):
    longest = max(len(_ids(tokenizer, p)) + len(_ids(tokenizer, c)) + 1 for p, c in zip(PROMPTS, COMPLETIONS))
    max_len = longest if max_len == "longest" else max_len
    data = tokenize_pairs(PROMPTS, COMPLETIONS, tokenizer, multiple_of=multiple_of, max_len=max_len)
    expected = longest if width is None else -(-longest // width) * width
    assert data.tokens.shape[1] == expected
    assert expected % multiple_of == 0 or expected == max_len


def test_an_example_longer_than_max_len_is_a_config_error(tokenizer):
    longest = max(len(_ids(tokenizer, p)) + len(_ids(tokenizer, c)) + 1 for p, c in zip(PROMPTS, COMPLETIONS))
    with pytest.raises(ConfigError) as err:
        tokenize_pairs(PROMPTS, COMPLETIONS, tokenizer, max_len=longest - 1, what="held-out example")
    assert str(err.value) == (f"model.max_seq_len: {longest - 1} is shorter than the longest held-out example "
                              f"({longest} tokens); allowed: {longest} or more")


# --------------------------------------------------------------------------- the batch sampler
def test_same_seed_and_step_give_the_same_batch_in_any_order():
    a, b = BatchSampler(100, 8, seed=3), BatchSampler(100, 8, seed=3)
    later_first = [b.indices(s) for s in reversed(range(40))][::-1]  # as a resumed run asks: out of order
    for step in range(40):
        assert a.indices(step).tolist() == later_first[step].tolist()
        assert len(a.indices(step)) == 8


def test_different_seeds_give_different_batches():
    a, b = BatchSampler(100, 8, seed=0), BatchSampler(100, 8, seed=1)
    assert sum(a.indices(s).tolist() != b.indices(s).tolist() for s in range(12)) == 12


def test_each_epoch_is_a_permutation():
    sampler = BatchSampler(100, 10, seed=0)
    epochs = [np.concatenate([sampler.indices(e * 10 + k) for k in range(10)]).tolist() for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(100))  # every index exactly once
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch


def test_an_uneven_epoch_drops_the_remainder_and_repeats_nothing():
    sampler = BatchSampler(23, 5, seed=7)  # 4 batches per epoch, 3 items left out, differently each epoch
    assert sampler.per_epoch == 4
    left_out = []
    for epoch in range(6):
        seen = np.concatenate([sampler.indices(epoch * 4 + k) for k in range(4)]).tolist()
        assert len(set(seen)) == 20 and set(seen) <= set(range(23))
        left_out.append(frozenset(range(23)) - set(seen))
    assert len(set(left_out)) > 1


def test_a_batch_of_the_whole_set_is_every_index_each_step():
    sampler = BatchSampler(10, 10, seed=0)
    for step in range(3):
        assert sorted(sampler.indices(step).tolist()) == list(range(10))


def test_a_batch_larger_than_the_data_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        BatchSampler(10, 11, seed=0)
    assert str(err.value) == "train.batch_size: 11 is larger than the training set (10 examples); allowed: 1 to 10"


# --------------------------------------------------------------------------- what a checkpoint must match
def test_every_setting_but_the_cadence_is_in_the_resume_key():
    """Safe by construction: a field added to TrainConfig or ModelConfig is in the key unless it is
    named in NOT_IN_WEIGHTS, so a checkpoint of other settings is never resumed silently."""
    import dataclasses

    from mlflow_tunix.train import NOT_IN_WEIGHTS, TrainConfig, TokenizedData, init_state, make_optimizer, resume_key

    config, model_config = TrainConfig(steps=10), ModelConfig(vocab_size=50, d_model=16, n_heads=2, d_ff=32)
    data = TokenizedData(np.ones((4, 8), np.int32), np.ones((4, 8), np.float32))
    _, state = init_state(build_model(model_config, seed=0), make_optimizer(config)[0])
    key = resume_key(config, model_config, state, data)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(key) == (fields - set(NOT_IN_WEIGHTS)) | {"model", "state", "data_sha256"}
    assert key["model"] == dataclasses.asdict(model_config)
    changed = {"b2": 0.95, "weight_decay": 0.0, "min_lr_ratio": 0.5, "seed": 3}
    for name, value in changed.items():
        assert resume_key(dataclasses.replace(config, **{name: value}), model_config, state, data) != key, name
    assert resume_key(config, dataclasses.replace(model_config, norm_eps=1e-5), state, data) != key
    cadence = dataclasses.replace(config, log_every=3, eval_every=7, checkpoint_every=2, keep_checkpoints=5)
    assert resume_key(cadence, model_config, state, data) == key
