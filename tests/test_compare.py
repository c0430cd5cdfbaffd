"""`mlflow-tunix compare`: runs with known differences in their eval tables list exactly the flipped
items; a real pair of tiny pipeline runs compares item by item."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, run_cli

N_ITEMS = 12


def _log_run(name: str, correct: list[bool], params: dict, accuracy: float, parent: str | None = None) -> str:
    """A run with an eval table whose item i is right exactly when correct[i]."""
    rows = [{"id": f"item-{i}", "category": "", "prompt": f"What is {i}+{i}?", "expected": str(2 * i),
             "answer": str(2 * i) if ok else str(2 * i + 1), "correct": ok, "well_formed": True, "new_tokens": 5,
             "generated": f"<reasoning>{i}+{i}</reasoning><answer>{2 * i if ok else 2 * i + 1}</answer>"}
            for i, ok in enumerate(correct)]
    tags = {"mlflow.parentRunId": parent} if parent else None
    with mlflow.start_run(run_name=name, tags=tags) as run:
        mlflow.log_params(params)
        mlflow.log_metric("answer_accuracy", accuracy)
        mlflow.log_table(pd.DataFrame(rows), artifact_file="eval/predictions.json")
    return run.info.run_id


BASE = [True] * 6 + [False] * 6
# Against BASE: items 1 and 4 go right->wrong, items 7, 8 and 11 wrong->right.
OTHER = [True, False, True, True, False, True, False, True, True, False, False, True]
THIRD = [False] + BASE[1:]  # item 0 right->wrong only


def test_compare_lists_exactly_the_flipped_items(tracking_uri):
    from mlflow_tunix.compare import compare_runs, format_html, format_text

    a = _log_run("a", BASE, {"train.learning_rate": "0.001", "train.steps": "100"}, 0.5)
    b = _log_run("b", OTHER, {"train.learning_rate": "0.003", "train.steps": "100"}, 7 / 12)
    c = _log_run("c", THIRD, {"train.learning_rate": "0.001", "train.steps": "200"}, 5 / 12)
    result = compare_runs([a, b, c])
    assert result.params == {"train.learning_rate": ["0.001", "0.003", "0.001"], "train.steps": ["100", "100", "200"]}
    assert result.metrics["answer_accuracy"] == [0.5, 7 / 12, 5 / 12]
    assert result.flips[0] == {"right_to_wrong": ["item-1", "item-4"], "wrong_to_right": ["item-7", "item-8", "item-11"]}
    assert result.flips[1] == {"right_to_wrong": ["item-0"], "wrong_to_right": []}
    # Disagreements first: items where any run differs from another, in the baseline's order.
    assert [it["id"] for it in result.disagreeing] == ["item-0", "item-1", "item-4", "item-7", "item-8", "item-11"]
    assert [it["id"] for it in result.items[:6]] == [it["id"] for it in result.disagreeing]
    text = format_text(result)
    assert "[1] vs [0]: 2 right->wrong, 3 wrong->right" in text
    assert "[2] vs [0]: 1 right->wrong, 0 wrong->right" in text
    assert "6 of 12 items where the runs disagree" in text
    page = format_html(result)
    assert page.count("<tr><td>item-") == N_ITEMS and "<script" not in page
    # The generated text of each run, side by side with the expected answer.
    assert "&lt;answer&gt;3&lt;/answer&gt;" in page and "<td>2</td>" in page


def test_compare_cli_with_parent_logs_html_to_the_parent(tracking_uri, tmp_path):
    with mlflow.start_run(run_name="sweep") as parent:
        pass
    p = parent.info.run_id
    a = _log_run("a", BASE, {"x": "1"}, 0.5, parent=p)
    b = _log_run("b", OTHER, {"x": "2"}, 7 / 12, parent=p)
    with mlflow.start_run(run_name="stopped", tags={"mlflow.parentRunId": p}):
        pass  # a trial stopped before its eval: no table, left out
    proc = run_cli(["compare", "--parent", p], tracking_uri)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[1] vs [0]: 2 right->wrong, 3 wrong->right" in proc.stdout
    assert "without an eval table, left out" in proc.stdout
    assert a in proc.stdout and b in proc.stdout
    artifacts = [f.path for f in MlflowClient().list_artifacts(p, "compare")]
    assert len(artifacts) == 1 and artifacts[0].endswith(".html")
    page = mlflow.artifacts.load_text(f"runs:/{p}/{artifacts[0]}")
    assert "5 of 12 items where the runs disagree" in page

    from mlflow_tunix.compare import compare_runs
    from mlflow_tunix.errors import TunixError

    with pytest.raises(TunixError, match="compare: need 2 or more runs with an eval table"):
        compare_runs([a])
    with pytest.raises(TunixError, match=f"run {'0' * 32}"):
        compare_runs([a, "0" * 32])


def test_compare_two_real_tiny_runs(tracking_uri, tmp_path):
    """Two seeds of the tiny project: the flips are exactly the items whose `correct` differs in the
    two logged tables, read back independently."""
    from mlflow_tunix.compare import compare_runs
    from mlflow_tunix.config import load_project
    from mlflow_tunix.pipeline import run_main

    runs = [run_main(load_project(str(TINY), {"train.steps": 60, "train.seed": seed}), register=False,
                     progress=False).run_id for seed in (0, 1)]
    tables = []
    for run_id in runs:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/predictions.json",
                                                   dst_path=str(tmp_path / run_id))
        t = json.loads(open(path).read())
        tables.append({row[t["columns"].index("id")]: row[t["columns"].index("correct")] for row in t["data"]})
    result = compare_runs(runs)
    assert len(result.items) == 40
    assert result.flips[0]["right_to_wrong"] == [i for i in tables[0] if tables[0][i] and not tables[1][i]]
    assert result.flips[0]["wrong_to_right"] == [i for i in tables[0] if not tables[0][i] and tables[1][i]]
    assert result.params == {"train.seed": ["0", "1"]}
    # Two different seeds of a model mid-training answer differently somewhere.
    assert any(len(set(it["generated"])) > 1 for it in result.items)
