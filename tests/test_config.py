"""Project configs are strict: unknown keys, wrong types and bad values are named by dotted key."""

from __future__ import annotations

import pytest

from conftest import TINY
from mlflow_tunix.config import ProjectConfig, from_dict, load_project, to_flat_dict
from mlflow_tunix.errors import ConfigError


def test_overrides_and_flat_params():
    cfg = load_project(str(TINY), {"train.steps": "7", "train.learning_rate": 0.01, "model.n_layers": 2.0})
    assert (cfg.train.steps, cfg.train.learning_rate, cfg.model.n_layers) == (7, 0.01, 2)
    flat = to_flat_dict(cfg)
    assert flat["train.steps"] == 7 and flat["data.train.0.generator"] == "addition"
    assert cfg.model_name == "tunix-tiny"


@pytest.mark.parametrize("overrides, message", [
    ({"train.stepz": 1}, "train.stepz: unknown key; allowed: steps,"),
    ({"train.steps": "many"}, "train.steps: expected an integer, got 'many'"),
    ({"train.steps": 0}, "train.steps: must be at least 1, got 0"),
    ({"train.batch_size": -1}, "train.batch_size: must be at least 1"),
    ({"model.n_heads": 3}, "model.d_model (32) must be divisible by model.n_heads (3)"),
    ({"generation.temperature": -1}, "generation.temperature: must be >= 0"),
    ({"data.template": "chatml"}, "data.template: 'chatml' is not one of plain, gemma"),
    ({"generation.max_new_tokens": 64}, "generation.max_new_tokens: 64 leaves no room for a prompt"),
    ({"train.log_every": True}, "train.log_every: expected an integer, got True"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_project(str(TINY), overrides)
    assert str(err.value).startswith(message), str(err.value)


def test_data_source_needs_one_of_path_or_generator():
    with pytest.raises(ConfigError, match=r"data.train\[0\]: give exactly one of path or generator"):
        load_project(str(TINY), {"data.train": [{"n": 3}]})
    with pytest.raises(ConfigError, match=r"data.train\[0\].generator: 'sums' is not one of addition"):
        load_project(str(TINY), {"data.train": [{"generator": "sums"}]})


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="^nmae: unknown key; allowed: name,"):
        from_dict(ProjectConfig, {"name": "x", "nmae": "y"})


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("train: {steps: [1,\n")
    with pytest.raises(ConfigError, match=r"config.yaml: not valid YAML"):
        load_project(str(bad))
