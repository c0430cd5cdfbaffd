"""The spine, driven the way a user drives it: the CLI and `mlflow run` against a real sqlite store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY, cli_env, run_cli
from mlflow_tunix import data, generators
from mlflow_tunix.config import load_project
from mlflow_tunix.pipeline import build_datasets, run_main, run_train


def _only_run(client: MlflowClient):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_mlflow_run_main_entry_point_logs_everything(tracking_uri, tmp_path):
    """`mlflow run . --env-manager local` (tiny project): FINISHED with params, a loss history of >= 100
    points, eval metrics, the eval table, two dataset inputs, a logged model and a Staging version."""
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local",
         "-P", f"config={TINY}", "-P", "steps=120", "-P", "registered_model_name=tiny-adder"],
        cwd=tmp_path, env=cli_env(tracking_uri), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    run = _only_run(client)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "120"
    assert run.data.params["model.d_model"] == "32"
    assert run.data.tags["jax_version"] and run.data.tags["device_platform"] == "cpu"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) == 120 and sorted(m.step for m in losses) == list(range(120))
    assert losses[-1].value < losses[0].value / 2  # it learned something
    assert run.data.metrics["eval_loss"] > 0
    # The logged datasets are the project's, fingerprinted by their content.
    ds = build_datasets(load_project(str(TINY)))
    digests = {i.tags[0].value: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert digests == {"training": data.digest(ds.train)[:16], "evaluation": data.digest(ds.eval)[:16]}
    # The eval metrics are the eval table's rows summed up, and each row is scored by tunix-rt's rule.
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="eval/predictions.json",
                                               dst_path=str(tmp_path))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [r["id"] for r in rows] == [ex.id for ex in ds.eval] and len(rows) == 40
    assert [r["expected"] for r in rows] == [ex.answer for ex in ds.eval]
    for r in rows:
        assert r["correct"] == data.answers_match(data.parse_answer(r["generated"]), r["expected"])
        assert r["well_formed"] == data.is_well_formed(r["generated"])
    metrics = run.data.metrics
    assert metrics["answer_accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 40)
    assert metrics["accuracy/2-digit"] == metrics["answer_accuracy"]  # every eval item is 2-digit
    assert metrics["format_rate"] == pytest.approx(sum(r["well_formed"] for r in rows) / 40)
    assert metrics["mean_new_tokens"] == pytest.approx(sum(r["new_tokens"] for r in rows) / 40)
    assert metrics["n_eval"] == 40
    versions = client.search_model_versions("name='tiny-adder'")
    assert [v.current_stage for v in versions] == ["Staging"]
    assert versions[0].run_id == run.info.run_id


def test_same_seed_same_final_loss(tracking_uri):

    cfg = load_project(str(TINY), {"train.steps": 40})
    a = run_train(cfg, progress=False)
    b = run_train(cfg, progress=False)
    client = MlflowClient(tracking_uri)
    la = client.get_run(a.run_id).data.metrics["final_loss"]
    lb = client.get_run(b.run_id).data.metrics["final_loss"]
    assert abs(la - lb) <= 1e-6
    c = run_train(load_project(str(TINY), {"train.steps": 40, "train.seed": 1}), progress=False)
    assert abs(client.get_run(c.run_id).data.metrics["final_loss"] - la) > 1e-6


@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "a", "completion": "<reasoning></reasoning><answer>1</answer>"}\n{"prompt": "b", "completion": \n',
     "bad.jsonl:2:"),
    ('{"trace_version": "1.0", "prompt": "p", "steps": [], "meta": {}}\n', "bad.jsonl:1: 'final_answer'"),
    ("", "bad.jsonl"),
])
def test_malformed_data_fails_the_run_with_one_line(tracking_uri, tmp_path, content, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    proc = run_cli(["run", "--config", TINY, "--train-data", "bad.jsonl", "--no-progress",
                    "--registered-model-name", "never"], tracking_uri, cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: " + expected), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    client = MlflowClient(tracking_uri)
    assert _only_run(client).info.status == "FAILED"
    assert client.search_registered_models() == []


def test_config_errors_are_refused_before_any_run(tracking_uri, tmp_path):
    proc = run_cli(["run", "--config", TINY, "--set", "train.learning_rat=0.1"], tracking_uri, cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.learning_rat: unknown key; allowed: steps, batch_size, learning_rate" in proc.stderr
    proc = run_cli(["run", "--config", TINY, "--set", "train.steps=-5"], tracking_uri, cwd=tmp_path)
    assert proc.returncode == 2 and "train.steps: must be at least 1, got -5" in proc.stderr
    proc = run_cli(["run", "--config", "no-such-project"], tracking_uri, cwd=tmp_path)
    assert proc.returncode == 2 and "projects: addition, addition-direct" in proc.stderr
    assert MlflowClient(tracking_uri).search_runs(["0"]) == []


def test_evaluate_command_scores_a_logged_model(tracking_uri, tmp_path):

    result = run_main(load_project(str(TINY), {"train.steps": 60}), register=True, progress=False)
    eval_file = tmp_path / "eval.jsonl"
    data.write_jsonl(generators.generate("addition", n=12, seed=5, digits=(2, 2)), eval_file)
    proc = run_cli(["evaluate", "--model-uri", "models:/tunix-tiny/1", "--eval-data", eval_file, "--no-progress"],
                   tracking_uri, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(tracking_uri)
    (run,) = [r for r in client.search_runs(["0"]) if r.info.run_id != result.run_id]
    assert run.data.params["model_uri"] == "models:/tunix-tiny/1"
    # It scored the given file, item by item, and its accuracy is its rows' mean.
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="eval/predictions.json",
                                               dst_path=str(tmp_path))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    items = data.read_jsonl(eval_file)
    assert [(r["id"], r["expected"]) for r in rows] == [(ex.id, ex.answer) for ex in items]
    assert [r["correct"] for r in rows] == [data.answers_match(data.parse_answer(r["generated"]), r["expected"])
                                            for r in rows]
    assert run.data.metrics["n_eval"] == 12
    assert run.data.metrics["answer_accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 12)


def test_default_project_learns_held_out_addition(tracking_uri, tmp_path):
    """The README's main command, unchanged: the default project must answer >= 98 % of 500 held-out
    4-digit sums (never seen in training) right, through generation, and say so in MLflow."""
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local"],
                          cwd=tmp_path, env=cli_env(tracking_uri), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    run = _only_run(client)
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    assert metrics["n_eval"] >= 500
    assert metrics["answer_accuracy"] >= 0.98, metrics
    assert metrics["format_rate"] >= 0.98
    assert "5-digit/answer_accuracy" in metrics  # the length-generalization probe is reported too
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 100
    train_input = next(i for i in run.inputs.dataset_inputs if i.tags[0].value == "training")
    eval_input = next(i for i in run.inputs.dataset_inputs if i.tags[0].value == "evaluation")
    assert train_input.dataset.digest != eval_input.dataset.digest
    version = client.get_model_version("tunix-addition", "1")
    assert version.current_stage == "Staging" and float(version.tags["metric.answer_accuracy"]) >= 0.98
    assert "compare runs: http://" in proc.stderr


def test_evaluate_an_unknown_model_is_one_line(tracking_uri, tmp_path):
    proc = run_cli(["evaluate", "--model-uri", "models:/no-such-model/1"], tracking_uri, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: models:/no-such-model/1: Registered Model with name=no-such-model not found"
    assert "Traceback" not in proc.stderr
