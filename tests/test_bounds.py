"""Bounds before cost, and the crashes an attacker (or a typo) found: each input below used to run for
minutes, eat gigabytes or end in a traceback. Now each is one line `error: ...`, exit 2, refused before
an MLflow run starts (the store stays empty).
"""

import json
import time
from pathlib import Path

import mlflow
import pytest

from mlflow_tunix import data
from mlflow_tunix.config import MAX_YAML_ALIASES, load_project
from mlflow_tunix.errors import ConfigError, DataError, ModelLoadError
from mlflow_tunix.model import MAX_SIZES, ModelConfig, build_model, check_memory, flat_params, memory_estimate

from conftest import TINY


def run_cli(args, tracking_uri):
    """The real CLI, in this process (click's runner): no interpreter start per case."""
    from click.testing import CliRunner

    from mlflow_tunix.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

GOOD = {"prompt": "What is 1+2?", "completion": "<reasoning>1+2=3</reasoning><answer>3</answer>"}


def jsonl(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def one_line_error(out) -> str:
    assert out.exit_code == 2, (out.stdout, out.stderr)
    # (MLflow's own INFO lines when it creates a new sqlite store are not ours)
    lines = [line for line in out.stderr.splitlines() if " INFO mlflow." not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert len(lines[0]) < 400
    return lines[0]


def no_runs(tracking_uri) -> bool:
    """Nothing was tracked: the sqlite store was never even created, or holds no run and no model."""
    path = Path(tracking_uri[len("sqlite:///"):])
    if not path.exists():
        return True
    client = mlflow.MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return not client.search_runs(experiments) and not client.search_registered_models()


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "train.seed: must be an integer between 0 and 4294967295, got -1"),
    (["--steps", "1e30"], "train.steps: must be at most 10000000"),
    (["--set", "model.d_model=1e9"], "model.d_model must be at most 65536, got 1000000000"),
    (["--set", "model.d_model=60000"], "model: training with batch_size 32 this model would need about"),
    (["--registered-model-name", "it's"], "registered_model_name: \"it's\" is not a usable registered-model name"),
], ids=["negative-seed", "steps-1e30", "d_model-1e9", "d_model-beyond-ram", "quote-in-name"])
def test_run_refuses_before_any_work(tracking_uri, args, message):
    out = run_cli(["run", "--config", TINY, "--no-progress", *args], tracking_uri)
    assert message in one_line_error(out)
    assert no_runs(tracking_uri)


def test_validate_and_run_refuse_the_same_files(tracking_uri, tmp_path):
    """One reader: whatever `data validate` refuses, `run --train-data` refuses with the same line."""
    good = json.dumps(GOOD)
    cases = {
        "surrogate": (jsonl(tmp_path / "s.jsonl", good, '{"prompt": "What is \\ud800?", "completion": "x"}'),
                      "s.jsonl:2: a string holds a lone surrogate"),
        "duplicate-key": (jsonl(tmp_path / "d.jsonl", '{"prompt": "a", "prompt": "b", "completion": "x"}'),
                          "d.jsonl:1: invalid JSON: duplicate key 'prompt'"),
        "long-line": (jsonl(tmp_path / "l.jsonl", json.dumps({**GOOD, "prompt": "x" * (data.MAX_LINE_BYTES + 1)})),
                      f"l.jsonl:1: line of {data.MAX_LINE_BYTES + 79} bytes; at most {data.MAX_LINE_BYTES} are allowed"),
    }
    for name, (path, message) in cases.items():
        validate = one_line_error(run_cli(["data", "validate", path], tracking_uri))
        assert message in validate, name
        if name == "surrogate":  # the one that used to pass validate and crash run
            run = one_line_error(run_cli(["run", "--config", TINY, "--no-progress", "--train-data", path],
                                         tracking_uri))
            # The same line (each names the file its own way: as given, or relative to the working directory).
            assert run.partition("s.jsonl:2:")[2] == validate.partition("s.jsonl:2:")[2] != ""
    client = mlflow.MlflowClient(tracking_uri)
    assert not client.search_registered_models()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert all(r.info.status == "FAILED" for r in runs)


def test_readers_refuse_non_regular_files(tmp_path):
    with pytest.raises(DataError, match="/dev/zero: not a regular file"):
        data.read_jsonl("/dev/zero")
    with pytest.raises(ConfigError, match="/dev/zero"):
        load_project("/dev/zero")


def test_generator_ceilings_are_one_line_errors(tracking_uri, tmp_path):
    out = run_cli(["data", "generate", "addition", "--out", tmp_path / "x.jsonl", "--digits", "5000", "5000"],
                  tracking_uri)
    assert "digits must be (min, max) operand lengths with 1 <= min <= max <= 100, got (5000, 5000)" in one_line_error(out)
    assert not (tmp_path / "x.jsonl").exists()


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    bomb = ["name: bomb", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 13)]
    bomb.append("train: *a12")
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(bomb) + "\n")
    with pytest.raises(ConfigError, match=f"more than {MAX_YAML_ALIASES} YAML aliases") as err:
        load_project(str(path))
    assert len(str(err.value)) < 300


def test_a_few_aliases_are_fine_and_values_print_short(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("name: t\nx: &big [" + ", ".join(["1"] * 50) + "]\ntrain: {steps: *big}\n")
    with pytest.raises(ConfigError) as err:
        load_project(str(path))
    assert "x: unknown key" in str(err.value) or "train.steps" in str(err.value)
    path.write_text("name: t\ntrain: {steps: &big [" + ", ".join(["1"] * 5000) + "]}\nmodel: {d_model: *big}\n")
    with pytest.raises(ConfigError, match=r"expected an integer, got \[1, 1, 1, 1, 1, 1, \.\.\.\]") as err:
        load_project(str(path))


# --------------------------------------------------------------------------------------------
# Model sizes: ceilings, the memory estimate, the header checked before the weights are read


def test_model_ceilings_and_memory_estimate():
    for name, ceiling in MAX_SIZES.items():
        with pytest.raises(ConfigError, match=f"model.{name} must be at most {ceiling}"):
            ModelConfig(**{name: ceiling + 1})
    config = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64)
    n_params = sum(v.size for v in flat_params(build_model(config)).values())
    assert memory_estimate(config) >= 8 * n_params  # weights and the file's copy, at least
    assert memory_estimate(config, batch_size=8, training=True) > memory_estimate(config)
    huge = ModelConfig(vocab_size=1 << 20, d_model=1 << 16, n_layers=64, n_heads=64, d_ff=1 << 18)
    with pytest.raises(ConfigError, match=r"model: loading this model would need about \d+\.\d GiB of memory .* "
                                          r"GiB are available"):
        check_memory(huge)
    # A long max_seq_len costs only when the data is long: batches are as long as the longest example.
    long = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, d_ff=384, max_seq_len=2048)  # projects/reasoning
    assert memory_estimate(long, batch_size=64, training=True) > 20 * 2**30
    assert memory_estimate(long, batch_size=64, training=True, seq_len=224) < 2**30
    wide = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_ff=1 << 16, max_seq_len=4096)
    with pytest.raises(ConfigError, match=r"model: training with batch_size 512 this model would need about .*, batches of 4000 positions\); "):
        check_memory(wide, batch_size=512, training=True, seq_len=4000)
    check_memory(wide, batch_size=512, training=True, seq_len=1)  # (what config.validate checks)


def test_build_time_grows_linearly_with_layers():
    """The ratio of two build times, not a wall-clock limit: 4x the layers may cost at most ~8x the time
    (nnx.eval_shape of the whole model grew with the square: 4x layers took ~13x)."""
    from mlflow_tunix.model import param_shapes

    def seconds(layers):
        config = ModelConfig(vocab_size=64, d_model=16, n_layers=layers, n_heads=2, d_ff=32, max_seq_len=32)
        params = {name: __import__("numpy").zeros(shape, "float32") for name, shape in param_shapes(config).items()}
        build_model(config, params=params)  # warm: the first build compiles the initializers
        best = []
        for _ in range(3):
            start = time.perf_counter()
            build_model(config, params=params)
            best.append(time.perf_counter() - start)
        return min(best)

    assert seconds(64) < 8 * seconds(16)


def test_a_config_json_that_disagrees_with_the_weights_is_refused_before_reading_them(tmp_path):
    from conftest import tiny_model_and_tokenizer
    from mlflow_tunix import flavor
    from test_trust import forge

    model, tokenizer = tiny_model_and_tokenizer()
    path = tmp_path / "m"
    flavor.save_model(model, path, tokenizer=tokenizer)
    config = path / "tunix" / "config.json"
    config.write_text(config.read_text().replace('"n_layers": 2', '"n_layers": 1000'))
    forge(path)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: missing parameter 'blocks\.2\.\S+' "
                                             r"\(model config n_layers=1000\)"):
        flavor.load_model(path)
    config.write_text(config.read_text().replace('"n_layers": 1000', '"n_layers": 100000'))
    forge(path)
    with pytest.raises(ModelLoadError, match=r"config\.json: model\.n_layers must be at most 1024, got 100000"):
        flavor.load_model(path)
