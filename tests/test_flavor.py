"""The mlflow_tunix flavor: save/log/load round trips, integrity checks, the pyfunc, requirements.

One tiny model and tokenizer for the whole module, a real sqlite tracking store in a temp dir.
"""

import json
import pickle
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException

from mlflow_tunix import flavor
from mlflow_tunix.errors import ConfigError, InputError, ModelLoadError
from mlflow_tunix.generate import GenerationConfig
from mlflow_tunix.model import flat_params

from conftest import assert_same_weights, tiny_model_and_tokenizer

PROMPTS = ["What is 12+7?", "What is 3+45?", "Add 8 and 9."]
GENERATION = GenerationConfig(max_new_tokens=12)
NAME = "adder"  # the LoggedModel's name and the registered model's name


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_model_and_tokenizer()
    return flavor.TunixModel(model, tokenizer, GENERATION)


@pytest.fixture(scope="module")
def expected(tiny):
    """Greedy generations of the in-memory model, before anything is saved."""
    results = tiny.generate(PROMPTS)
    completions = [r["completion"] for r in results]
    assert len(set(completions)) == len(PROMPTS) and all(len(set(c)) > 3 for c in completions)
    return results


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "model"
    flavor.save_model(tiny.module, path, tokenizer=tiny.tokenizer, generation_config=GENERATION)
    return path


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A real sqlite tracking store and registry, with artifacts in the same temp dir."""
    root = tmp_path_factory.mktemp("mlflow")
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    mlflow.set_registry_uri(f"sqlite:///{root}/mlflow.db")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("flavor", artifact_location=(root / "artifacts").as_uri()))
    yield root
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])


@pytest.fixture(scope="module")
def logged(tiny, tracking):
    with mlflow.start_run() as run:
        info = flavor.log_model(
            tiny.module, name=NAME, tokenizer=tiny.tokenizer, generation_config=GENERATION,
            registered_model_name=NAME,
        )
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", info.registered_model_version)
    return run, info


def same_params(a, b):
    assert_same_weights(flat_params(a), flat_params(b))


def copy_of(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "copy"))


# --------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_is_bit_identical(tiny, saved):
    loaded = flavor.load_model(saved)
    same_params(tiny.module, loaded.module)
    assert loaded.config == tiny.config
    assert loaded.generation == GENERATION
    assert loaded.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()


def test_greedy_generations_survive_save_load_and_pyfunc(saved, expected):
    assert flavor.load_model(saved).generate(PROMPTS) == expected
    out = mlflow.pyfunc.load_model(str(saved)).predict(pd.DataFrame({"prompt": PROMPTS}))
    assert list(out.columns) == ["completion", "answer", "reasoning"]
    assert out.to_dict("records") == expected
    assert isinstance(mlflow.pyfunc.load_model(str(saved)).get_raw_model(), flavor.TunixModel)


def test_a_loaded_model_saves_again_identically(tiny, saved, tmp_path):
    loaded = flavor.load_model(saved)
    flavor.save_model(loaded, tmp_path / "again")  # tokenizer and generation come with it
    again = flavor.load_model(tmp_path / "again")
    same_params(tiny.module, again.module)
    assert again.generation == GENERATION
    manifest = lambda p: json.loads((p / "tunix" / "manifest.json").read_text())  # noqa: E731
    weights = "tunix/model.safetensors"
    assert manifest(tmp_path / "again")["files"][weights] == manifest(saved)["files"][weights]


@pytest.mark.parametrize("kind", ["runs", "logged_model", "version", "alias"])
def test_every_model_uri_kind_loads(kind, logged, tiny, expected):
    run, info = logged
    uri = {
        "runs": f"runs:/{run.info.run_id}/{NAME}",
        "logged_model": info.model_uri,
        "version": f"models:/{NAME}/{info.registered_model_version}",
        "alias": f"models:/{NAME}@champion",
    }[kind]
    if kind == "logged_model":
        assert uri.startswith("models:/m-")
    loaded = flavor.load_model(uri)
    same_params(tiny.module, loaded.module)
    assert loaded.generate(PROMPTS[:1]) == expected[:1]


def test_pyfunc_from_the_registry(logged, expected):
    out = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(PROMPTS)
    assert out.to_dict("records") == expected


# --------------------------------------------------------------------------------------------
# What is on disk


def test_layout_flavor_section_and_no_pickle(saved, tiny):
    files = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file())
    for name in ["MLmodel", "requirements.txt", "conda.yaml", "python_env.yaml", "tunix/model.safetensors",
                 "tunix/config.json", "tunix/generation.json", "tunix/manifest.json", "tunix/tokenizer/tokenizer.json"]:
        assert name in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".bin", ".pt"))]

    mlmodel = yaml.safe_load((saved / "MLmodel").read_text())
    section = mlmodel["flavors"]["mlflow_tunix"]
    assert section["format_version"] == flavor.FORMAT_VERSION
    assert section["data"] == "tunix"
    assert section["model_family"] == tiny.config.family
    assert section["model_config"]["d_model"] == 32
    assert section["jax_version"] and section["flax_version"]
    assert section["mlflow_tunix_version"] == "0.1.0"
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow_tunix.flavor"

    manifest = json.loads((saved / "tunix" / "manifest.json").read_text())["files"]
    # Every file of the model directory but MLmodel (which records the manifest's own sha256).
    assert sorted(manifest) == sorted(f for f in files if f not in ("MLmodel", "tunix/manifest.json"))
    assert all(len(entry["sha256"]) == 64 for entry in manifest.values())
    assert json.loads((saved / "tunix" / "generation.json").read_text())["max_new_tokens"] == 12


def test_requirements_pin_the_flavor_and_jax(saved):
    reqs = (saved / "requirements.txt").read_text().split("\n")
    assert "mlflow-tunix==0.1.0" in reqs
    import flax
    import jax

    assert f"jax=={jax.__version__}" in reqs and f"flax=={flax.__version__}" in reqs
    for package in ["optax", "safetensors", "tokenizers", "transformers", "mlflow"]:
        assert any(r.startswith(f"{package}==") for r in reqs), package
    assert flavor.get_default_pip_requirements()[0] == "mlflow-tunix==0.1.0"


def test_default_signature_carries_the_generation_defaults(saved):
    meta = mlflow.models.get_model_info(str(saved))
    defaults = {p.name: p.default for p in meta.signature.params.params}
    assert defaults == {"max_new_tokens": 12, "temperature": 0.0, "top_k": 0, "seed": 0}
    assert [c.name for c in meta.signature.outputs.inputs] == ["completion", "answer", "reasoning"]


def test_input_example_is_a_valid_serving_input(tiny, tmp_path, expected):
    path = tmp_path / "m"
    flavor.save_model(tiny, path, input_example=[PROMPTS[0]])
    request = tmp_path / "request.json"  # what Model.log checks when a model is logged with an example
    request.write_text(mlflow.models.Model.load(str(path)).get_serving_input(str(path)))
    mlflow.models.predict(str(path), input_path=str(request), env_manager="local", output_path=str(tmp_path / "out.json"))
    assert json.loads((tmp_path / "out.json").read_text()) == {"predictions": expected[:1]}


def test_default_max_new_tokens_leaves_room_for_the_prompt(tiny, tmp_path):
    flavor.save_model(tiny.module, tmp_path / "m", tokenizer=tiny.tokenizer)
    assert flavor.load_model(tmp_path / "m").generation.max_new_tokens == 32  # half of max_seq_len 64


# --------------------------------------------------------------------------------------------
# Integrity: altered, truncated, unexpected files; no unpickling


def test_altered_weights_are_refused_naming_the_file(saved, tmp_path):
    model_dir = copy_of(saved, tmp_path)
    weights = model_dir / "tunix" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of a tensor: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: altered"):
        flavor.load_model(model_dir)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: altered"):
        mlflow.pyfunc.load_model(str(model_dir))


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer/tokenizer.json", "config.json"])
def test_truncated_files_are_refused_naming_the_file(saved, tmp_path, name):
    model_dir = copy_of(saved, tmp_path)
    path = model_dir / "tunix" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=rf"{name}: truncated or altered \(\d+ bytes, expected \d+\)"):
        flavor.load_model(model_dir)


def test_missing_and_unexpected_files_are_refused(saved, tmp_path):
    model_dir = copy_of(saved, tmp_path)
    (model_dir / "tunix" / "extra.pkl").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ModelLoadError, match=r"extra\.pkl: not listed in manifest\.json"):
        flavor.load_model(model_dir)
    (model_dir / "tunix" / "extra.pkl").unlink()
    (model_dir / "tunix" / "generation.json").unlink()
    with pytest.raises(ModelLoadError, match=r"generation\.json: missing"):
        flavor.load_model(model_dir)


def test_edited_manifest_is_refused(saved, tmp_path):
    model_dir = copy_of(saved, tmp_path)
    manifest = model_dir / "tunix" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format_version": 2', '"format_version":  2'))
    with pytest.raises(ModelLoadError, match=r"manifest\.json: altered"):
        flavor.load_model(model_dir)


def test_newer_format_is_refused(saved, tmp_path):
    model_dir = copy_of(saved, tmp_path)
    mlmodel = model_dir / "MLmodel"
    mlmodel.write_text(mlmodel.read_text().replace("format_version: 2", "format_version: 99"))
    with pytest.raises(ModelLoadError, match="format version 99"):
        flavor.load_model(model_dir)


def test_loading_never_unpickles(saved, logged, monkeypatch, tiny):
    def refuse(*args, **kwargs):
        raise AssertionError("a model load called pickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    try:
        import cloudpickle

        monkeypatch.setattr(cloudpickle, "load", refuse)
        monkeypatch.setattr(cloudpickle, "loads", refuse)
    except ImportError:
        pass
    same_params(tiny.module, flavor.load_model(saved).module)
    same_params(tiny.module, flavor.load_model(f"models:/{NAME}@champion").module)
    assert len(mlflow.pyfunc.load_model(str(saved)).predict(PROMPTS[:1])) == 1


# --------------------------------------------------------------------------------------------
# Saving: atomic, refuses to overwrite, refuses bad arguments


class _TokenizerThatFailsToSave:
    """Injects a failure half-way through a save (after the weights are written)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __len__(self):
        return len(self.tokenizer)

    def save_pretrained(self, path):
        raise OSError("No space left on device")


def test_a_failed_save_leaves_nothing_behind(tiny, tmp_path):
    with pytest.raises(OSError, match="No space left"):
        flavor.save_model(tiny.module, tmp_path / "m", tokenizer=_TokenizerThatFailsToSave(tiny.tokenizer))
    assert list(tmp_path.iterdir()) == []


def test_save_into_an_empty_dir_works_a_non_empty_one_is_refused(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    flavor.save_model(tiny, tmp_path / "empty")
    assert (tmp_path / "empty" / "MLmodel").is_file()
    with pytest.raises(MlflowException, match="already exists and is not empty"):
        flavor.save_model(tiny, tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no staging dirs left over


def test_save_needs_a_tokenizer_and_usable_defaults(tiny, tmp_path):
    with pytest.raises(TypeError, match="needs tokenizer="):
        flavor.save_model(tiny.module, tmp_path / "a")
    with pytest.raises(ConfigError, match=r"generation.temperature: must be >= 0 \(0 = greedy\)"):
        flavor.save_model(tiny, tmp_path / "b", generation_config=GenerationConfig(max_new_tokens=8, temperature=-1.0))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# The pyfunc: input forms, params, bad requests


@pytest.fixture(scope="module")
def pyfunc_model(saved):
    return mlflow.pyfunc.load_model(str(saved))


def test_every_input_form_gives_the_same_answers(pyfunc_model, expected):
    one = [expected[0]]
    assert pyfunc_model.predict(PROMPTS[0]).to_dict("records") == one
    assert pyfunc_model.predict([PROMPTS[0]]).to_dict("records") == one
    assert pyfunc_model.predict({"prompt": PROMPTS[0]}).to_dict("records") == one
    assert pyfunc_model.predict({"prompt": PROMPTS}).to_dict("records") == expected
    assert pyfunc_model.predict(PROMPTS).to_dict("records") == expected
    assert pyfunc_model.predict(pd.DataFrame({"prompt": PROMPTS})).to_dict("records") == expected


def test_params_change_generation(pyfunc_model, tiny):
    df = pd.DataFrame({"prompt": PROMPTS[:2]})
    short = pyfunc_model.predict(df, params={"max_new_tokens": 4})
    assert short["completion"].tolist() == [r["completion"] for r in tiny.generate(PROMPTS[:2], max_new_tokens=4)]
    sample = {"temperature": 1.0, "top_k": 20, "seed": 1}
    first = pyfunc_model.predict(df, params=sample)
    assert first.equals(pyfunc_model.predict(df, params=sample))  # a seed gives the same sample
    assert not first.equals(pyfunc_model.predict(df, params={**sample, "seed": 2}))


LONG_PROMPT = " ".join(str(i) for i in range(30))  # every digit is a token: ~80 tokens


@pytest.mark.parametrize(
    "data, params, message",
    [
        (PROMPTS[:1], {"temperature": -0.5}, r"temperature must be >= 0 \(0 = greedy\), got -0\.5"),
        (PROMPTS[:1], {"top_k": -1}, r"top_k must be >= 0"),
        (PROMPTS[:1], {"max_new_tokens": 64}, r"max_new_tokens must be between 1 and 63 .* got 64"),
        (PROMPTS[:1], {"max_new_tokens": 0}, r"max_new_tokens must be between 1 and 63"),
        (PROMPTS[:1], {"seed": -1}, r"seed must be between 0 and"),
        ([LONG_PROMPT], None, r"prompt 0 has \d+ tokens \+ max_new_tokens 12 = \d+, more than the model's max_seq_len 64"),
        (["fine", "   "], None, r"prompt 1 is blank"),
        (["x"] * 257, None, r"257 prompts in one request; at most 256"),
        (pd.DataFrame({"question": ["What is 1+1?"], "expected": ["2"]}), None,
         r"no 'prompt' column \(got columns: question, expected\); with several columns, the prompts must be in one named 'prompt'"),
        ([123], None, r"prompt 0 must be a string, got int 123"),
        ([None], None, r"prompt 0 must be a string, got NoneType None"),
        (pd.DataFrame({"q": [True]}), None, r"prompt 0 must be a string, got bool True"),
        (["x" * 1_000_000], None, r"prompt 0 has 1000000 characters; at most 65536"),
        ({"question": "What is 1+1?"}, None, r"no 'prompt' key \(got keys: question\)"),
    ],
    ids=["negative-temperature", "negative-top_k", "max_new_tokens-fills-context", "zero-max_new_tokens",
         "negative-seed", "prompt-too-long", "blank-prompt", "too-many-prompts", "no-prompt-column", "int-prompt",
         "null-prompt", "bool-prompt", "megabyte-prompt", "no-prompt-key"],
)
def test_bad_requests_are_refused_with_a_clear_message(pyfunc_model, data, params, message):
    with pytest.raises(InputError, match=message) as caught:
        pyfunc_model.predict(data, params=params)
    # ...and as an MlflowException that `mlflow models serve` turns into HTTP 400 with this message.
    assert isinstance(caught.value, MlflowException)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert caught.value.get_http_status_code() == 400
    assert len(str(caught.value)) < 300  # never the whole input echoed back


def test_generate_refuses_unknown_options(tiny):
    with pytest.raises(InputError, match="unknown generation option 'temprature'"):
        tiny.generate(PROMPTS[:1], temprature=0.5)
    with pytest.raises(InputError, match="prompt_template 'chatml' is not one of plain, gemma"):
        tiny.generate(PROMPTS[:1], prompt_template="chatml")


def test_mlflow_models_predict_matches_in_process(logged, pyfunc_model, tmp_path):
    _, info = logged
    want = pyfunc_model.predict(PROMPTS).to_dict("records")
    out = tmp_path / "predictions.json"
    mlflow.models.predict(info.model_uri, input_data=pd.DataFrame({"prompt": PROMPTS}), env_manager="local",
                          output_path=str(out))
    assert json.loads(out.read_text()) == {"predictions": want}
    # A bare {"prompt": ...} is MLflow's unified LLM request: the answer comes back unwrapped.
    mlflow.models.predict(info.model_uri, input_data={"prompt": PROMPTS}, env_manager="local", output_path=str(out))
    assert json.loads(out.read_text()) == want


def test_a_one_column_table_is_the_prompts_whatever_its_name(pyfunc_model, expected):
    for column in ("inputs", "question", 0):
        assert pyfunc_model.predict(pd.DataFrame({column: PROMPTS})).to_dict("records") == expected


def test_missing_answers_are_served_as_null_not_nan():
    from mlflow.pyfunc.scoring_server import predictions_to_json
    import io

    frame = flavor._results_frame([{"completion": "<answer>3</answer>", "answer": "3", "reasoning": None},
                                   {"completion": "hello", "answer": None, "reasoning": None}])
    out = io.StringIO()
    predictions_to_json(frame, out)  # what `mlflow models serve` sends

    def no_nan(name):
        raise AssertionError(f"{name} in the served JSON")

    body = json.loads(out.getvalue(), parse_constant=no_nan)
    assert [r["answer"] for r in body["predictions"]] == ["3", None]


def test_mlflow_models_evaluate_drives_a_registered_model(logged, pyfunc_model):
    """What MLflow's own client sends: mlflow.models.evaluate on models:/NAME/VERSION. It drops the targets
    column and hands the rest to predict: one column is the prompts, several need a 'prompt' column."""
    _, info = logged
    uri = f"models:/{NAME}/{info.registered_model_version}"
    targets = ["19", "48", "17"]
    frame = pd.DataFrame({"question": PROMPTS, "source": ["a", "b", "c"], "expected": targets})
    with mlflow.start_run(), pytest.raises(MlflowException, match=r"the input has no 'prompt' column \(got columns: "
                                                                 r"question, source\)"):
        mlflow.models.evaluate(model=uri, data=frame, targets="expected", model_type="question-answering",
                               predictions="answer", evaluators=["default"])

    want = pyfunc_model.predict(PROMPTS)["completion"].tolist()
    seen = []

    def record(predictions, targets):  # a real custom metric that keeps what it was given
        seen.append(list(predictions))
        return mlflow.metrics.MetricValue(aggregate_results={"n": len(predictions)})

    recorder = mlflow.metrics.make_metric(eval_fn=record, greater_is_better=True, name="recorded")
    for column in ("prompt", "inputs"):
        frame = pd.DataFrame({column: PROMPTS, "source": ["a", "b", "c"], "expected": targets})
        if column != "prompt":
            frame = frame.drop(columns="source")
        with mlflow.start_run():
            # model_type="question-answering" also computes token_count, which needs tiktoken (not installed);
            # the predictions it would score are these.
            result = mlflow.models.evaluate(model=uri, data=frame, targets="expected", predictions="completion",
                                            extra_metrics=[mlflow.metrics.exact_match(), recorder],
                                            evaluators=["default"])
        assert seen[-1] == want
        assert result.metrics["exact_match/v1"] == 0.0 and result.metrics["recorded/n"] == 3
