"""`mlflow-tunix sweep` on Ray Tune, as a user runs it: a 4-trial sweep of the tiny project on a local
Ray (2 trials at once), and a sweep on a real `ray start --head` cluster writing to a real `mlflow
server` backed by PostgreSQL. Everything is checked through MlflowClient.

Needs `ray[tune]` (in the dev extra) and, for the cluster test, Debian's `postgresql` (initdb,
pg_ctl) and psycopg2; the cluster test skips without PostgreSQL, unless MLFLOW_TUNIX_REQUIRE_SWEEP_TESTS=1
(CI) turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, cli_env, free_port, mlflow_server_process, run_cli, stop_process_group

try:
    import ray.tune  # noqa: F401
except ImportError:
    if os.environ.get("MLFLOW_TUNIX_REQUIRE_SWEEP_TESTS") == "1":
        raise
    pytest.skip("the sweep needs the [sweep] extra (ray[tune])", allow_module_level=True)

from mlflow_tunix.sweep import BEST_RUN_TAG, STOPPED_BY_TAG, TRIAL_TAG  # noqa: E402

STEPS = 40
# Grid order is trial order: two good learning rates run first (2 at once), so the two later trials
# reach ASHA's first rung after them; the last one (1e-5) learns nothing by then and is stopped.
SPACE = "train.learning_rate: {grid: [0.01, 0.003, 0.005, 0.00001]}\n"
SWEEP_ARGS = ["--set", f"train.steps={STEPS}", "--set", "train.log_every=5", "--set", "train.eval_every=0"]


def _children(client, parent):
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.info.run_id: r for r in runs}


def _parent(client, experiment_ids=None):
    runs = client.search_runs(experiment_ids or [e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.mlflow_tunix.sweep = 'true'")
    assert len(runs) == 1
    return runs[0]


def _trials_table(run_id, tmp_path):
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="sweep/trials.json",
                                               dst_path=str(tmp_path / "trials"))
    table = json.loads(Path(path).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def test_local_sweep_nests_trials_stops_one_and_registers_the_best(tracking_uri, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    proc = run_cli(["sweep", "--config", TINY, "--space", space, "--max-concurrent", 2, "--register-best",
                    *SWEEP_ARGS], tracking_uri)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient(tracking_uri)
    parent = _parent(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.scheduler"] == "asha"
    assert json.loads(parent.data.params["sweep.space"]) == {"train.learning_rate": {"grid": [0.01, 0.003, 0.005, 1e-05]}}

    children = _children(client, parent)
    assert len(children) == 4
    statuses = {r.data.params["train.learning_rate"]: r.info.status for r in children.values()}
    assert set(statuses.values()) <= {"FINISHED", "KILLED"}, statuses  # never left RUNNING
    assert statuses["1e-05"] == "KILLED", statuses
    for run in children.values():
        assert run.data.tags[TRIAL_TAG]
        assert run.data.tags["mlflow_tunix.pinned_core"] in ("0", "1")  # each trial on a core of its own
        losses = client.get_metric_history(run.info.run_id, "loss")
        if run.info.status == "KILLED":
            assert run.data.tags[STOPPED_BY_TAG].startswith("stopped by the asha scheduler at step ")
            assert "answer_accuracy" not in run.data.metrics
            assert "mlflow_tunix.error" not in run.data.tags  # stopped, not crashed
            assert len(losses) < STEPS  # stopped early, not at the end
        else:
            assert STOPPED_BY_TAG not in run.data.tags
            assert len(losses) == STEPS and "answer_accuracy" in run.data.metrics

    finished = [r for r in children.values() if r.info.status == "FINISHED"]
    best = max(finished, key=lambda r: r.data.metrics["answer_accuracy"])  # (ties: the first, as the sweep)
    assert parent.data.tags[BEST_RUN_TAG] in {r.info.run_id for r in finished}
    chosen = children[parent.data.tags[BEST_RUN_TAG]]
    assert chosen.data.metrics["answer_accuracy"] == best.data.metrics["answer_accuracy"]
    assert parent.data.params["best.train.learning_rate"] == chosen.data.params["train.learning_rate"]
    assert parent.data.metrics["best/answer_accuracy"] == chosen.data.metrics["answer_accuracy"]
    assert parent.data.metrics["best/final_loss"] == chosen.data.metrics["final_loss"]

    rows = _trials_table(parent.info.run_id, tmp_path)
    assert {r["run_id"]: r["status"] for r in rows} == {k: r.info.status for k, r in children.items()}
    for row in rows:
        run = children[row["run_id"]]
        assert row["train.learning_rate"] == run.data.params["train.learning_rate"]
        assert row["seconds"] > 0 and row["link"].endswith(f"/runs/{row['run_id']}")

    versions = client.search_model_versions("name='tunix-tiny'")
    assert [v.run_id for v in versions] == [chosen.info.run_id]


class _Tracker:  # the tracker TuneReporter wraps; only what it passes on is looked at
    def __init__(self):
        self.logged = []

    def log_scalar(self, name, value, step):
        self.logged.append((name, step))


def test_asha_never_judges_a_trial_on_its_last_loss_only_after_its_evaluation():
    """CI once saw a KILLED trial with all its losses and no evaluation: ASHA has a rung at `steps`,
    and a slower trial that reached the first rungs first met it second on its last loss. The real
    scheduler is fed what TuneReporter reports, for the good trial first at every rung."""
    from ray.tune.experiment import Trial

    from mlflow_tunix.sweep import TuneReporter, _scheduler

    class Cfg:
        class train:
            steps = STEPS

    scheduler = _scheduler("asha", Cfg)
    good, slow = Trial("__fake", trial_id="good", stub=True), Trial("__fake", trial_id="slow", stub=True)
    decisions = {"good": [], "slow": []}
    reporters, trackers = {}, {}
    for trial in (good, slow):
        scheduler.on_trial_add(None, trial)
        trackers[trial.trial_id] = _Tracker()
        reporters[trial.trial_id] = TuneReporter(trackers[trial.trial_id], f"run-{trial.trial_id}", STEPS, report=(
            lambda result, trial=trial: decisions[trial.trial_id].append(
                (result["step"], scheduler.on_trial_result(None, trial, result)))))
    for step in range(STEPS):
        # the slower-learning trial reaches the first rungs first, the good one the last
        order = ("slow", "good") if step < 3 * STEPS // 4 else ("good", "slow")
        for trial_id in order:
            reporters[trial_id].log_scalar("loss", (3.0 if trial_id == "slow" else 2.0) - step / 100, step)
    assert [name for name, _ in trackers["slow"].logged] == ["loss"] * STEPS  # every loss reaches MLflow
    assert [d for d in decisions["slow"] if d[1] != "CONTINUE"] == []
    assert [step for step, _ in decisions["slow"]] == list(range(1, STEPS))  # judged on every loss but the last


def test_a_bad_space_is_refused_before_anything_starts(tracking_uri, tmp_path):
    from mlflow_tunix.errors import ConfigError
    from mlflow_tunix.sweep import load_space

    cases = {
        "train.learnin_rate: {choice: [0.1]}\n": "train.learnin_rate=0.1: train.learnin_rate: unknown key",
        "train.steps: {choice: [10, -3]}\n": "train.steps=-3: train.steps",
        "train.learning_rate: {normal: [0, 1]}\n": "train.learning_rate: unknown kind 'normal'",
        "train.learning_rate: {loguniform: [0, 0.1]}\n": "train.learning_rate: loguniform needs low > 0",
        "train.learning_rate: {uniform: [0.1]}\n": "train.learning_rate: uniform takes [low, high]",
    }
    space = tmp_path / "space.yaml"
    for text, message in cases.items():
        space.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_space(space, str(TINY))
        assert f"{space}: {message}" in str(info.value), str(info.value)
    space.write_text("train.learnin_rate: {choice: [0.1]}\n")
    proc = run_cli(["sweep", "--config", TINY, "--space", space], tracking_uri)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {space}: train.learnin_rate=0.1:")
    assert not MlflowClient(tracking_uri).search_runs(["0"])  # nothing started


# --------------------------------------------------------------------------- a team's setup
def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _need_postgres():
    missing = [n for n in ("initdb", "pg_ctl") if _pg_bin(n) is None]
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        missing.append("psycopg2")
    if missing:
        reason = f"PostgreSQL not available ({', '.join(missing)} missing)"
        if os.environ.get("MLFLOW_TUNIX_REQUIRE_SWEEP_TESTS") == "1":
            raise RuntimeError(f"MLFLOW_TUNIX_REQUIRE_SWEEP_TESTS=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture
def postgres_uri():
    """A throwaway PostgreSQL on 127.0.0.1 (initdb in a temp dir). PostgreSQL refuses to run as root:
    as root (CI) it runs as `nobody`, in a folder nobody owns."""
    _need_postgres()
    data = Path(tempfile.mkdtemp(prefix="mlflow-tunix-pg-"))
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(data, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    port = free_port()
    subprocess.run([*as_user, _pg_bin("initdb"), "-D", str(data / "db"), "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    start = [*as_user, _pg_bin("pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"), "-w", "start",
             "-o", f"-h 127.0.0.1 -p {port} -k {data}"]
    subprocess.run(start, check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def ray_cluster(tmp_path):
    """A real single-node Ray cluster (`ray start --head --block`) on 127.0.0.1."""
    temp = tempfile.mkdtemp(prefix="rt-")  # Ray's socket paths must stay under 107 characters
    port = free_port()
    env = cli_env("", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("MLFLOW_TRACKING_URI")
    log = open(tmp_path / "ray.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "false", "--temp-dir", temp, "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        while True:  # until the cluster answers (or `ray start` dies)
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}:\n{(tmp_path / 'ray.log').read_text()[-3000:]}")
            probe = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address", address],
                                   env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            time.sleep(1)
        yield address
    finally:
        # `ray start --block` drains and stops its processes on SIGTERM (~4 s); a SIGTERM to the whole
        # group would kill the GCS first and leave it waiting for it (~35 s). Then kill what is left.
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        stop_process_group(proc, grace=0)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_sweep_on_a_ray_cluster_into_a_postgres_backed_server(postgres_uri, ray_cluster, tmp_path):
    """The multi-writer setup of a team: trials on a running Ray cluster, all writing to one `mlflow
    server` on PostgreSQL. One trial crashes (its sequence length does not fit the data): it is FAILED
    and the sweep goes on; the best trial is registered and the leaderboard over the server lists it."""
    space = tmp_path / "space.yaml"
    space.write_text("model.max_seq_len: {grid: [64, 30]}\n")
    with mlflow_server_process(tmp_path, backend_store_uri=postgres_uri) as url:
        proc = run_cli(["sweep", "--config", TINY, "--space", space, "--ray-address", ray_cluster,
                        "--register-best", *SWEEP_ARGS], url)
        assert proc.returncode == 0, proc.stderr[-4000:]
        mlflow.set_tracking_uri(url)
        client = MlflowClient(url)
        parent = _parent(client)
        assert parent.data.params["sweep.ray_address"] == ray_cluster
        children = _children(client, parent)
        statuses = {r.data.params.get("model.max_seq_len"): r.info.status for r in children.values()}
        assert statuses == {"64": "FINISHED", "30": "FAILED"}
        failed = next(r for r in children.values() if r.info.status == "FAILED")
        assert "model.max_seq_len" in failed.data.tags["mlflow_tunix.error"]
        best = parent.data.tags[BEST_RUN_TAG]
        assert children[best].data.params["model.max_seq_len"] == "64"
        board = run_cli(["leaderboard", "--model", "tunix-tiny", "--format", "json"], url)
        assert board.returncode == 0, board.stderr[-2000:]
        assert [row["run_id"] for row in json.loads(board.stdout)] == [best]
