"""The registry as leaderboard, on real stores: a sqlite file and a real `mlflow server` process.

Versions are tiny pyfunc models (the Flax flavor is tested on its own); promotions go through the
real CLI in subprocesses, ten at once for the concurrency guarantee.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlflow_tunix import registry
from mlflow_tunix.cli import main as cli_main
from mlflow_tunix.errors import TunixError

from conftest import REPO, mlflow_server_process

EVAL_DIGEST = "e" * 64
OTHER_EVAL_DIGEST = "f" * 64


class EchoModel(mlflow.pyfunc.PythonModel):
    """The smallest real model: returns its input."""

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


# --------------------------------------------------------------------------- stores
def _use_store(uri, monkeypatch, tmp_path):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(var, uri)
    # The registry's promotion lock files live in $XDG_CACHE_HOME: keep this test's in its tmp_path,
    # shared with the CLI processes it starts (they inherit the variable).
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


@pytest.fixture(scope="module")
def empty_sqlite_db(tmp_path_factory):
    """An MLflow sqlite database with its schema, made once: migrating a new one takes seconds."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sqlite_store(empty_sqlite_db, tmp_path, monkeypatch):
    shutil.copy(empty_sqlite_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _use_store(uri, monkeypatch, tmp_path)
    yield uri
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free local port, shared by the module's server tests."""
    with mlflow_server_process(tmp_path_factory.mktemp("server")) as uri:
        yield uri


@pytest.fixture
def server_store(mlflow_server, tmp_path, monkeypatch):
    _use_store(mlflow_server, monkeypatch, tmp_path)
    yield mlflow_server
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture(params=["sqlite", "server"])
def store(request):
    """Each scenario runs on a sqlite file and against a real tracking server."""
    return request.getfixturevalue(f"{request.param}_store")


# --------------------------------------------------------------------------- helpers
def _log_and_register(name, accuracy, *, sha=None, eval_digest=EVAL_DIGEST, runs_uri=False):
    """One training run: log a real model, register it with its eval metrics. Returns (Registration, run_id)."""
    if accuracy is None:  # a version evaluated without the ranking metric
        metrics = {"eval_loss": 1.0}
    else:
        metrics = {"answer_accuracy": accuracy, "eval_loss": round(1.0 - accuracy, 6)}
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=EchoModel(), pip_requirements=["mlflow"])
        mlflow.log_metrics(metrics)  # the scores' one source: the leaderboard reads them from the run
    model_uri = f"runs:/{run.info.run_id}/model" if runs_uri else info.model_uri
    reg = registry.register(
        name, model_uri, run_id=run.info.run_id, metrics=metrics, eval_digest=eval_digest,
        eval_dataset="addition-eval", train_digest="t" * 64, params_sha256=sha or uuid.uuid4().hex,
        project="addition")
    return reg, run.info.run_id


def _model_name():
    return f"addition-{uuid.uuid4().hex[:8]}"  # the server is shared by the module's tests


def _cli_env(uri):
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri, PYTHONPATH=str(REPO))
    env.pop("PYTEST_CURRENT_TEST", None)  # run as a user would, not under MLflow's test-mode checks
    return env


def _cli_args(*args):
    return [sys.executable, "-m", "mlflow_tunix.cli", *args]


def _run_cli(uri, *args):
    return subprocess.run(_cli_args(*args), env=_cli_env(uri), capture_output=True, text=True)


def _stages(name):
    """{version: stage} and the version holding @champion, read straight from MLflow."""
    client = MlflowClient()
    stages = {str(mv.version): mv.current_stage for mv in client.search_model_versions(f"name = '{name}'")}
    champion = client.get_registered_model(name).aliases.get(registry.CHAMPION)
    return stages, None if champion is None else str(champion)


# --------------------------------------------------------------------------- leaderboard
def test_leaderboard_ranks_versions_and_is_the_description(sqlite_store):
    name = _model_name()
    regs = [_log_and_register(name, acc)[0] for acc in (0.90, 0.97, 0.93)]
    no_metric, _ = _log_and_register(name, None)
    tie, _ = _log_and_register(name, 0.93)
    assert [r.version for r in regs] == ["1", "2", "3"] and all(r.created for r in regs)

    rows = registry.leaderboard(name)
    assert [(r["rank"], r["version"]) for r in rows] == [(1, "2"), (2, "3"), (3, tie.version), (4, "1"), (5, no_metric.version)]
    assert rows[0]["metrics"] == {"answer_accuracy": 0.97, "eval_loss": 0.03}
    assert rows[-1]["metrics"] == {"eval_loss": 1.0}
    assert {r["stage"] for r in rows} == {registry.STAGING}
    assert rows[0]["eval_digest"] == EVAL_DIGEST and rows[0]["created"].endswith("Z")
    assert rows[0]["aliases"] == []

    # Filters come before ranking, top after; another metric ranks differently.
    assert [r["version"] for r in registry.leaderboard(name, top=2)] == ["2", "3"]
    assert registry.leaderboard(name, eval_digest=OTHER_EVAL_DIGEST) == []
    assert [r["version"] for r in registry.leaderboard(name, metric="eval_loss")][:2] == [no_metric.version, "1"]

    # The run knows its version; the version carries every tag the leaderboard needs.
    client = MlflowClient()
    run = client.get_run(rows[0]["run_id"])
    assert run.data.tags[registry.RUN_MODEL_TAG] == name and run.data.tags[registry.RUN_VERSION_TAG] == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["metric.answer_accuracy"] == "0.97" and tags["eval_dataset"] == "addition-eval"
    assert tags["project"] == "addition" and tags["run_id"] == rows[0]["run_id"] and tags["train_digest"] == "t" * 64

    # The registered model's page shows the same ranking as a markdown table.
    description = client.get_registered_model(name).description
    table = [line for line in description.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert [line.split("|")[2].strip() for line in table] == ["2", "3", tie.version, "1", no_metric.version]
    assert f"| 1 | 2 | Staging |  | 0.97 | eval_loss=0.03 | [{rows[0]['run_id']}](#/runs/{rows[0]['run_id']}) |" in description
    assert description == registry.render_description(rows, "answer_accuracy")


def test_leaderboard_formats_and_cli(sqlite_store):
    name = _model_name()
    for acc in (0.5, 0.75):
        _log_and_register(name, acc)
    runner = CliRunner()
    result = runner.invoke(cli_main, ["leaderboard", "--model", name, "--format", "json"])
    assert result.exit_code == 0, result.output
    objects = json.loads(result.output)
    assert [o["version"] for o in objects] == ["2", "1"] and [o["rank"] for o in objects] == [1, 2]
    assert {"rank", "version", "stage", "aliases", "metrics", "run_id", "created"} <= set(objects[0])
    assert objects[0]["metrics"] == {"answer_accuracy": 0.75, "eval_loss": 0.25}

    rows = registry.leaderboard(name)
    csv_lines = registry.format_leaderboard(rows, fmt="csv").splitlines()
    assert csv_lines[0] == "rank,version,stage,aliases,answer_accuracy,eval_loss,run_id,created,eval_digest"
    assert csv_lines[1].startswith("1,2,Staging,,0.75,0.25,")
    table = registry.format_leaderboard(rows).splitlines()
    assert table[0].split() == ["rank", "version", "stage", "aliases", "answer_accuracy", "run_id", "created", "other", "metrics"]
    assert table[1].split()[:4] == ["1", "2", "Staging", "0.75"]
    assert len({line.index("Staging") for line in table[1:]}) == 1  # columns line up

    result = runner.invoke(cli_main, ["leaderboard", "--model", name, "--stage", "Production"])
    assert (result.exit_code, result.output) == (0, "no versions match\n")
    result = runner.invoke(cli_main, ["leaderboard", "--model", name, "--top", "1"])
    assert result.exit_code == 0 and len(result.output.splitlines()) == 2 and " 0.75 " in result.output

    result = runner.invoke(cli_main, ["leaderboard", "--model", "no-such-model"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: no registered model named 'no-such-model'"
    with pytest.raises(TunixError, match="no registered model named 'no-such-model'"):
        registry.leaderboard("no-such-model")


def test_register_reuses_the_version_with_the_same_params(sqlite_store):
    name = _model_name()
    first, _ = _log_and_register(name, 0.8, sha="a" * 64)
    again, second_run = _log_and_register(name, 0.8, sha="a" * 64, runs_uri=True)
    other, _ = _log_and_register(name, 0.8, sha="b" * 64, runs_uri=True)
    assert (first.version, first.created) == ("1", True)
    assert (again.version, again.created) == ("1", False)
    assert (other.version, other.created) == ("2", True)
    client = MlflowClient()
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    assert client.get_run(second_run).data.tags[registry.RUN_VERSION_TAG] == "1"
    # runs:/<run>/model names a LoggedModel in MLflow 3; the version points at it.
    assert client.get_model_version(name, "2").source.startswith("models:/m-")


def test_description_fits_mlflows_column():
    rows = [{"rank": i + 1, "version": str(i + 1), "stage": "Staging", "aliases": [], "run_id": "r" * 32,
             "metrics": {"answer_accuracy": 0.5, "eval_loss": 0.5}} for i in range(300)]
    text = registry.render_description(rows, "answer_accuracy")
    assert len(text) <= registry.DESCRIPTION_MAX_CHARS - 500
    shown = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert text.endswith(f"{300 - len(shown)} more versions: see `mlflow-tunix leaderboard`.")
    assert shown[0].startswith("| 1 | 1 | Staging |") and len(shown) > 20


# --------------------------------------------------------------------------- promote
def test_promote_gate_and_stages(store):
    name = _model_name()
    for acc in (0.90, 0.97, 0.93):
        _log_and_register(name, acc)

    best = _run_cli(store, "promote", "--model", name, "--best")
    assert best.returncode == 0, best.stderr
    assert best.stdout.strip() == f"promoted {name} v2 (answer_accuracy 0.97) to Production and @champion"
    assert best.stderr == ""  # no FutureWarning: stages are deprecated in MLflow, our users are not told every time
    assert _stages(name) == ({"1": "Staging", "2": "Production", "3": "Staging"}, "2")

    worse = _run_cli(store, "promote", "--model", name, "--version", "1")
    assert worse.returncode == 2
    assert worse.stderr.strip() == (
        f"error: refused: {name} v1 answer_accuracy 0.9 is 0.07 (7.2%) below champion v2 0.97; "
        "--max-regression 0.05 allows at least 0.9215")
    assert _stages(name) == ({"1": "Staging", "2": "Production", "3": "Staging"}, "2")

    # Within the margin: v3 takes over, v2 is archived; again is a no-op.
    promotion = registry.promote(name, version="3")
    assert (promotion.version, promotion.previous) == ("3", "2")
    assert promotion.message == f"promoted {name} v3 (answer_accuracy 0.93) to Production and @champion; archived v2 (0.97)"
    assert _stages(name) == ({"1": "Staging", "2": "Archived", "3": "Production"}, "3")
    again = registry.promote(name, version="3")
    assert again.previous is None and "nothing changed" in again.message
    # With a looser gate the archived v2 comes back (a rollback), and v1 stays refused at the default.
    assert registry.promote(name, version="2", max_regression=0.0).previous == "3"
    with pytest.raises(TunixError, match=r"v1 answer_accuracy 0.9 is 0.07 \(7.2%\) below champion v2 0.97"):
        registry.promote(name, version="1")
    assert _stages(name) == ({"1": "Staging", "2": "Production", "3": "Archived"}, "2")

    description = MlflowClient().get_registered_model(name).description
    assert "| 1 | 2 | Production | @champion | 0.97 |" in description
    assert "| 2 | 3 | Archived |  | 0.93 |" in description


def test_promote_refuses_another_eval_set(sqlite_store):
    name = _model_name()
    _log_and_register(name, 0.80)
    _log_and_register(name, 0.99, eval_digest=OTHER_EVAL_DIGEST)
    assert registry.promote(name, version="1").message.startswith(f"promoted {name} v1 ")
    with pytest.raises(TunixError) as refused:
        registry.promote(name, best=True)
    assert str(refused.value) == (
        f"refused: {name} v2 was evaluated on eval set ffffffffffff (addition-eval) but champion v1 on "
        "eeeeeeeeeeee (addition-eval); answer_accuracy figures on different eval sets are not comparable")
    assert _stages(name) == ({"1": "Production", "2": "Staging"}, "1")
    with pytest.raises(TunixError, match="has no version '7'"):
        registry.promote(name, version="7")
    with pytest.raises(TunixError, match="exactly one of"):
        registry.promote(name)


def test_description_keeps_the_users_own_text(sqlite_store):
    name = _model_name()
    _log_and_register(name, 0.5)
    MlflowClient().update_registered_model(name, description="Adds numbers.\n\n" + registry.DESCRIPTION_HEADING + "\nstale table")
    _log_and_register(name, 0.6)
    description = MlflowClient().get_registered_model(name).description
    assert description.startswith("Adds numbers.\n\n### Leaderboard\n")
    assert "stale table" not in description and description.count(registry.DESCRIPTION_HEADING) == 1
    assert "| 1 | 2 | Staging |  | 0.6 |" in description


# --------------------------------------------------------------------------- concurrency
WAITING = "[mlflow-tunix] waiting for another process registering or promoting"
ACCURACIES = {"1": 0.60, "2": 0.90, "3": 0.93, "4": 0.95, "5": 0.94}


def _promote_all_at_once(uri, name):
    """Ten `mlflow-tunix promote` processes started together; returns {version asked: [exit codes]}."""
    requests = ["1", "2", "3", "4", "5", "--best", "3", "2", "5", "--best"]
    procs = []
    for req in requests:
        args = ["--best"] if req == "--best" else ["--version", req]
        procs.append((req, subprocess.Popen(_cli_args("promote", "--model", name, *args), env=_cli_env(uri),
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    outcomes = []
    for req, proc in procs:
        out, err = proc.communicate()
        # A process that finds the lock held says so once, then waits.
        err = "\n".join(line for line in err.splitlines() if not line.startswith(WAITING))
        outcomes.append((req, proc.returncode, out.strip(), err.strip()))
    return outcomes


def _assert_one_champion(name, outcomes):
    stages, champion = _stages(name)
    production = [v for v, s in stages.items() if s == "Production"]
    assert production == [champion], (stages, champion, outcomes)
    assert champion != "1"  # 0.60 never survives a champion >= 0.90, and all others beat it
    for req, code, out, err in outcomes:
        if code == 2:
            assert err.startswith("error: refused: ") and "\n" not in err, err
        else:
            assert code == 0 and (out.startswith(f"promoted {name} v") or "nothing changed" in out), (req, out, err)
            assert "Warning" not in err, err
    # Every version that won at some point and is not the champion now was archived, not left in Production.
    winners = {"4" if req == "--best" else req for req, code, _, _ in outcomes if code == 0}
    assert all(stages[v] == "Archived" for v in winners - {champion}), (stages, outcomes)


def test_concurrent_promotions_leave_one_champion(store):
    name = _model_name()
    for version, acc in ACCURACIES.items():
        assert _log_and_register(name, acc)[0].version == version
    for _ in range(2):  # the second round starts from a registry that already has a champion
        outcomes = _promote_all_at_once(store, name)
        _assert_one_champion(name, outcomes)
    rows = registry.leaderboard(name)
    assert [r["aliases"] for r in rows if r["stage"] == "Production"] == [["champion"]]
    champion = next(r["version"] for r in rows if r["stage"] == "Production")
    assert f"| {champion} | Production | @champion |" in MlflowClient().get_registered_model(name).description


# --------------------------------------------------------------------------- trust
def test_a_forged_metric_tag_neither_ranks_nor_promotes(sqlite_store):
    name = _model_name()
    _log_and_register(name, 1.0)
    _log_and_register(name, 0.0)
    assert registry.promote(name, version="1").version == "1"
    MlflowClient().set_model_version_tag(name, "2", "metric.answer_accuracy", "1.0")  # the attack

    rows = registry.leaderboard(name)
    assert [(r["version"], r["metrics"]["answer_accuracy"]) for r in rows] == [("1", 1.0), ("2", 0.0)]
    before = _stages(name)
    out = _run_cli(sqlite_store, "promote", "--model", name, "--version", "2", "--max-regression", "1")
    assert out.returncode == 2
    assert out.stderr == (f"error: refused: {name} v2 is tagged metric.answer_accuracy=1.0 but its run "
                          f"{rows[1]['run_id']} logged answer_accuracy 0 ; the tag was edited (scores are read "
                          f"from the run)\n").replace(" 0 ;", " 0;")
    assert _stages(name) == before


def test_max_regression_must_be_a_number_in_0_1(sqlite_store):
    name = _model_name()
    _log_and_register(name, 1.0)
    _log_and_register(name, 0.0)
    assert registry.promote(name, version="1").version == "1"
    before = _stages(name)
    out = _run_cli(sqlite_store, "promote", "--model", name, "--version", "2", "--max-regression", "nan")
    assert out.returncode == 2
    assert out.stderr == "error: --max-regression must be a number in [0, 1], got nan\n"
    for value in (float("inf"), -0.1, 1.5, True, "0.1"):
        with pytest.raises(TunixError, match=r"--max-regression must be a number in \[0, 1\]"):
            registry.promote(name, version="2", max_regression=value)
    assert _stages(name) == before


HOLD_LOCK = """
import sys, time, mlflow_tunix.registry as r
with r._model_lock(r._client(), sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_promote_waits_with_a_message_and_gives_up_at_wait(sqlite_store, tmp_path):
    name = _model_name()
    _log_and_register(name, 0.5)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, name], env=_cli_env(sqlite_store),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = _run_cli(sqlite_store, "promote", "--model", name, "--version", "1", "--wait", "0.5")
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 2
    waiting, error = out.stderr.splitlines()
    assert waiting == f"{WAITING} {name!r} (up to 0.5 s)"
    assert error.startswith(f"error: gave up after 0.5 s waiting for another process registering or promoting {name!r}")
    assert _stages(name) == ({"1": "Staging"}, None)
    lock_dir = registry.lock_dir()
    assert lock_dir.startswith(str(tmp_path)) and (os.stat(lock_dir).st_mode & 0o777) == 0o700
    assert _run_cli(sqlite_store, "promote", "--model", name, "--version", "1").returncode == 0  # free again


def test_a_lock_dir_others_can_write_is_refused(sqlite_store, tmp_path):
    name = _model_name()
    _log_and_register(name, 0.5)
    os.chmod(registry.lock_dir(), 0o777)
    out = _run_cli(sqlite_store, "promote", "--model", name, "--version", "1")
    assert out.returncode == 2 and "must belong to you and be writable by you only" in out.stderr
    assert _stages(name) == ({"1": "Staging"}, None)
