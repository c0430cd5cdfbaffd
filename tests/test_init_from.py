"""Fine-tuning a Hugging Face checkpoint folder end to end: `mlflow run . -P init_from=DIR` trains,
logs and registers it, and the registered model serves through `mlflow models serve`."""

import subprocess
import sys

import numpy as np
import pytest
import requests
from mlflow import MlflowClient

from mlflow_tunix import flavor
from mlflow_tunix.config import load_project
from mlflow_tunix.errors import ConfigError
from mlflow_tunix.hf import load_checkpoint
from mlflow_tunix.model import flat_params

from conftest import REPO, cli_env, model_server_process

CHECKPOINT = REPO / "tests" / "fixtures" / "hf" / "qwen3"
PROJECT = REPO / "tests" / "projects" / "tiny-init" / "config.yaml"


def test_chat_template_needs_a_checkpoint():
    with pytest.raises(ConfigError, match=r"data.template: 'chat' .*set model.init_from"):
        load_project(str(PROJECT))


def test_mlflow_run_fine_tunes_a_checkpoint_and_the_model_serves(tracking_uri, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", "-P", f"config={PROJECT}",
         "-P", f"init_from={CHECKPOINT}", "-P", "registered_model_name=ft"],
        cwd=tmp_path, env=cli_env(tracking_uri), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.params["model.init_from"] == str(CHECKPOINT)
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5]) / 2
    (version,) = client.search_model_versions("name='ft'")

    # The logged model is the checkpoint's architecture and tokenizer with new weights.
    base = load_checkpoint(CHECKPOINT)
    logged = flavor.load_model(f"models:/ft/{version.version}")
    assert logged.config.family == "qwen3" and logged.config.head_dim == 16 and logged.config.n_kv_heads == 2
    assert logged.tokenizer.get_vocab() == base.tokenizer.get_vocab()
    a, b = flat_params(base.model), flat_params(logged.module)
    assert sorted(a) == sorted(b) and any(a[k].tobytes() != b[k].tobytes() for k in a)
    expected = logged.generate(["What is 12 + 7?"])[0]["completion"]

    with model_server_process(f"models:/ft/{version.version}", tracking_uri, tmp_path) as url:
        reply = requests.post(f"{url}/invocations", json={"inputs": ["What is 12 + 7?"]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"][0]["completion"] == expected
