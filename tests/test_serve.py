"""`mlflow models serve` on a registered mlflow_tunix model: a real server in a subprocess.

The server loads ``models:/<name>/<version>`` from a sqlite registry in a temp dir, with
``--env-manager local`` (this venv) and the repo root on PYTHONPATH so ``mlflow_tunix`` imports.
"""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests

from mlflow_tunix import flavor
from mlflow_tunix.generate import GenerationConfig

from conftest import REPO, free_port, stop_process_group, tiny_model_and_tokenizer, wait_until_answers

PROMPTS = ["What is 12+7?", "What is 3+45?", "Add 8 and 9."]
NAME = "served-adder"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Log and register the tiny model; return (tracking URI, model URI, in-process pyfunc model)."""
    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root}/mlflow.db"
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("serve", artifact_location=(root / "artifacts").as_uri()))
        model, tokenizer = tiny_model_and_tokenizer()
        with mlflow.start_run():
            info = flavor.log_model(model, name=NAME, tokenizer=tokenizer, registered_model_name=NAME,
                                    generation_config=GenerationConfig(max_new_tokens=12))
        model_uri = f"models:/{NAME}/{info.registered_model_version}"
        yield uri, model_uri, mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    """Base URL of a running `mlflow models serve`; the whole process group is killed at teardown."""
    tracking_uri, model_uri, _ = registered
    port = free_port()
    bin_dir = Path(sys.executable).parent  # the server runs `uvicorn` from PATH: this venv's
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
        "JAX_PLATFORMS": "cpu",
    }
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-p", str(port), "-h", "127.0.0.1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{url}/ping", proc, log_path, "the model server")  # loading jax takes seconds
        yield url
    finally:
        stop_process_group(proc)


def invoke(url, payload):
    return requests.post(f"{url}/invocations", json=payload)


def test_dataframe_split_gives_the_in_process_answers(server, registered):
    expected = registered[2].predict(pd.DataFrame({"prompt": PROMPTS})).to_dict("records")
    response = invoke(server, {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in PROMPTS]}})
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": expected}
    assert all(len(set(r["completion"])) > 3 for r in expected)  # real text, not one repeated token


def test_inputs_with_params(server, registered):
    # (Same prompts and max_new_tokens as above, so both processes reuse their compiled code.)
    params = {"temperature": 0.9, "top_k": 20, "seed": 3}
    expected = registered[2].predict(PROMPTS, params=params).to_dict("records")
    response = invoke(server, {"inputs": PROMPTS, "params": params})
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": expected}
    assert expected != registered[2].predict(PROMPTS).to_dict("records")  # the params did reach the model


def test_a_one_column_table_is_the_prompts_and_missing_answers_are_null(server, registered):
    expected = registered[2].predict(PROMPTS).to_dict("records")
    response = invoke(server, {"dataframe_split": {"columns": ["question"], "data": [[p] for p in PROMPTS]}})
    assert response.status_code == 200, response.text
    body = response.json(parse_constant=lambda name: pytest.fail(f"{name} in the served JSON"))
    assert body == {"predictions": expected}
    assert any(r["answer"] is None for r in body["predictions"])


def test_bare_prompt_request(server, registered):
    # MLflow's unified LLM form: prompt and params at the top level, the answer unwrapped.
    expected = registered[2].predict(PROMPTS, params={"seed": 5}).to_dict("records")
    response = invoke(server, {"prompt": PROMPTS, "seed": 5, "max_new_tokens": 12})
    assert response.status_code == 200, response.text
    assert response.json() == expected


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"inputs": PROMPTS[:1], "params": {"temperature": -1.0}}, "temperature must be >= 0 (0 = greedy), got -1.0"),
        ({"inputs": PROMPTS[:1], "params": {"max_new_tokens": 500}}, "max_new_tokens must be between 1 and 63"),
        ({"dataframe_split": {"columns": ["question", "source"], "data": [["What is 1+1?", "a"]]}},
         "the input has no 'prompt' column (got columns: question, source)"),
        ({"inputs": [123]}, "prompt 0 must be a string, got int 123"),
        ({"inputs": [None]}, "prompt 0 must be a string, got NoneType None"),
        ({"inputs": [True]}, "prompt 0 must be a string, got bool True"),
        ({"inputs": ["x" * 1_000_000]}, "prompt 0 has 1000000 characters; at most 65536"),
        ({"inputs": ["fine", " "]}, "prompt 1 is blank"),
        ({"inputs": ["x"] * 300}, "300 prompts in one request; at most 256 are allowed"),
    ],
    ids=["negative-temperature", "max_new_tokens-beyond-context", "no-prompt-column", "int", "null", "bool",
         "megabyte", "blank-prompt", "too-many"],
)
def test_bad_request_gets_400_with_the_message_and_the_server_keeps_serving(server, registered, payload, message):
    response = invoke(server, payload)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert message in body["message"]
    assert len(response.content) < 2000  # a short message, never the input echoed back

    after = invoke(server, {"inputs": PROMPTS})
    assert after.status_code == 200
    assert after.json() == {"predictions": registered[2].predict(PROMPTS).to_dict("records")}
