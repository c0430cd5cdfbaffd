"""LoRA (train.lora): only low-rank adapters train; the model that comes out has them merged."""


import numpy as np
import pytest

from mlflow_tunix.config import load_project
from mlflow_tunix.errors import ConfigError
from mlflow_tunix.lora import LoraConfig
from mlflow_tunix.model import ModelConfig, build_model, flat_params, param_count
from mlflow_tunix.train import TokenizedData, TrainConfig, train

from conftest import TINY

# Wide enough that rank-8 adapters on every projection are a small share of the weights.
CONFIG = ModelConfig(vocab_size=300, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=768, max_seq_len=64)


def test_only_adapters_train_and_they_are_small():
    model = build_model(CONFIG, seed=0)
    rng = np.random.RandomState(0)
    data = TokenizedData(rng.randint(0, 300, (64, 32)).astype(np.int32), np.ones((64, 32), np.float32))
    config = TrainConfig(steps=20, batch_size=16, learning_rate=1e-2, warmup_steps=2, checkpoint_every=0,
                         lora=LoraConfig(rank=8, alpha=16))
    result = train(model, data, config, progress=False)

    total = param_count(model)
    assert result.trained_params < 0.05 * total
    assert result.optimizer_state_size <= 2 * result.trained_params + 16  # AdamW's two moments (+ counters)
    assert result.final_loss < 5.5  # it learned (ln 300 = 5.7 at the start)
    before, after = flat_params(model), flat_params(result.model)
    changed = []
    for name in before:
        delta = after[name].astype(np.float64) - before[name]
        if name.endswith(("wq", "wk", "wv", "wo", "w1", "w2", "w3")):
            assert 0 < np.linalg.matrix_rank(delta, tol=1e-6) <= 8, name  # W + scale * A @ B, A @ B of rank 8
            changed.append(name)
        else:
            assert after[name].tobytes() == before[name].tobytes(), name  # embeddings, norms: bit-identical
    assert len(changed) == 7 * CONFIG.n_layers


def test_targets_limit_what_changes():
    model = build_model(CONFIG, seed=0)
    data = TokenizedData(np.random.RandomState(1).randint(0, 300, (32, 16)).astype(np.int32), np.ones((32, 16), np.float32))
    config = TrainConfig(steps=3, batch_size=8, warmup_steps=1, checkpoint_every=0,
                         lora=LoraConfig(rank=4, targets=("q", "v")))
    before, after = flat_params(model), flat_params(train(model, data, config, progress=False).model)
    assert sorted(n for n in before if before[n].tobytes() != after[n].tobytes()) == sorted(
        f"blocks.{i}.attn.{w}" for i in range(2) for w in ("wq", "wv"))


def test_lora_in_a_project_config_is_checked_by_key():
    cfg = load_project(str(TINY), {"train.lora": {"rank": 4, "targets": ["q", "o"]}})
    assert cfg.train.lora == LoraConfig(rank=4, alpha=16.0, targets=("q", "o"))
    with pytest.raises(ConfigError, match=r"train.lora.targets: 'qk' is not one of q, k, v, o, gate, up, down"):
        load_project(str(TINY), {"train.lora": {"targets": ["qk"]}})
    with pytest.raises(ConfigError, match=r"train.lora.rank: must be a positive integer"):
        load_project(str(TINY), {"train.lora": {"rank": 0}})
