"""The model registry is the leaderboard.

Every evaluated model becomes a version of a registered model, tagged with its eval metrics
(``metric.<name>``) and the digests of the data it was trained and evaluated on. :func:`leaderboard`
ranks the versions; :func:`promote` moves one to Production and the ``champion`` alias, behind a
regression gate. The registered model's description -- the first thing its MLflow page shows -- is
the leaderboard as a markdown table, rewritten at every registration and promotion.

Stages are deprecated in MLflow (since 2.9) but still the column the UI shows, so we keep both:
the Production version and the ``champion`` alias always name the same version. MLflow cannot move
a stage and an alias in one transaction, so registrations and promotions of one model take an
inter-process lock (see :func:`_model_lock`) and end by reconciling the two.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import io
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Mapping

from mlflow_tunix.errors import TunixError

STAGING, PRODUCTION, ARCHIVED = "Staging", "Production", "Archived"
CHAMPION = "champion"
DEFAULT_METRIC = "answer_accuracy"

METRIC_TAG_PREFIX = "metric."
RUN_MODEL_TAG = "mlflow_tunix.registered_model"
RUN_VERSION_TAG = "mlflow_tunix.registered_version"
# Registered-model tag: the metric the last promotion gated on; the description is ranked by it.
LEADERBOARD_METRIC_TAG = "mlflow_tunix.leaderboard_metric"
# Text of the description above this heading is the user's and survives rewrites.
DESCRIPTION_HEADING = "### Leaderboard"
DESCRIPTION_MAX_CHARS = 5000
DEFAULT_LOCK_WAIT = 600.0  # seconds a registration or promotion waits for another one of the same model  # registered_models.description is VARCHAR(5000) in MLflow's SQL schema


@dataclass
class Registration:
    name: str
    version: str
    created: bool  # False when an existing version with the same params sha256 was reused


@dataclass
class Promotion:
    name: str
    version: str
    previous: str | None  # the former champion version, now Archived
    message: str  # one line: what moved where


# --------------------------------------------------------------------------- client plumbing
class _PatientClient:
    """An MlflowClient whose calls retry sqlite's 'database is locked' a few times with backoff.

    Several processes writing one sqlite file (parallel `mlflow-tunix` runs, or a server with
    several workers) can outlast sqlite's busy timeout; the failed transaction was rolled back,
    so trying again is safe.
    """

    ATTEMPTS = 6

    def __init__(self, client):
        self.client = client

    def __getattr__(self, attr):
        method = getattr(self.client, attr)
        if not callable(method):
            return method

        def patient(*args, **kwargs):
            for attempt in range(self.ATTEMPTS):
                try:
                    return method(*args, **kwargs)
                except Exception as exc:
                    if "database is locked" not in str(exc) or attempt == self.ATTEMPTS - 1:
                        raise
                    time.sleep(0.2 * 2**attempt * (1 + random.random()))

        return patient


def _client(client=None) -> _PatientClient:
    if isinstance(client, _PatientClient):
        return client
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    return _PatientClient(client)


def _is(exc, code: str) -> bool:
    return getattr(exc, "error_code", None) == code


def _quoted(value: str) -> str:
    """A string literal for an MLflow search filter, which has no escape for quotes."""
    if "'" in value:
        raise TunixError(f"{value!r} contains a single quote, which MLflow's search filters cannot match")
    return f"'{value}'"


def _all_versions(client, name: str) -> list:
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = {_quoted(name)}", page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def _set_stage(client, name: str, version: str, stage: str) -> None:
    # Stages are deprecated (FutureWarning on every call) but still what the UI shows; we keep them
    # in step with the alias on purpose, so the warning is noise for our users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(name, version, stage)


def _registry_uri(client) -> str:
    uri = getattr(client, "_registry_uri", None) or client.tracking_uri  # MlflowClient keeps it private
    if uri.startswith("sqlite:///"):  # one database file, however the path was spelled
        uri = "sqlite:///" + os.path.realpath(uri[len("sqlite:///") :])
    return uri


def lock_dir() -> str:
    """Where the registry locks live: ``$XDG_CACHE_HOME/mlflow-tunix/locks`` (default ``~/.cache/...``),
    a directory only this user can write (0700), so no other local user can hold or swap a lock."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "mlflow-tunix", "locks")
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise TunixError(f"{path}: the registry lock directory must belong to you and be writable by you only "
                         f"(chmod 700 {path})")
    return path


@contextlib.contextmanager
def _model_lock(client, name: str, wait: float | None = DEFAULT_LOCK_WAIT):
    """Hold an exclusive lock on (registry URI, model name) across processes *on this machine*.

    Moving a stage and an alias is several MLflow calls, and two promotions interleaving them can
    leave two Production versions or an alias on an archived one. The lock is ``flock`` on a file
    in :func:`lock_dir`, so it serializes every `mlflow-tunix` process of this user (whether the
    registry is a sqlite file or a tracking server), but not processes of other users or machines
    sharing a tracking server: MLflow has no registry lock of its own. For that case every
    promotion ends with a reconcile (one Production version, alias on it), which repairs the
    state left by a lost race without guaranteeing which of two simultaneous promotions wins.

    A held lock is waited for with a message, at most ``wait`` seconds (None: no limit).
    """
    key = hashlib.sha256(f"{_registry_uri(client.client)}\n{name}".encode()).hexdigest()[:16]
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the final reconcile still applies
        yield
        return
    path = os.path.join(lock_dir(), f"registry-{key}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            limit = "no limit" if wait is None else f"up to {wait:g} s"
            print(f"[mlflow-tunix] waiting for another process registering or promoting {name!r} ({limit})",
                  file=sys.stderr, flush=True)
            deadline = None if wait is None else time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TunixError(f"gave up after {wait:g} s waiting for another process registering or "
                                         f"promoting {name!r} (lock {path}); nothing changed") from None
                    time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# --------------------------------------------------------------------------- register
def register(name: str, model_uri: str, *, run_id: str, metrics: Mapping[str, float], eval_digest: str,
             eval_dataset: str, train_digest: str, params_sha256: str, project: str, client=None) -> Registration:
    """Register ``model_uri`` as a new version of ``name`` in Staging, tagged with its eval metrics.

    ``model_uri`` is what ``log_model`` returned (``models:/m-...``) or ``runs:/<run_id>/<name>``.
    A version already tagged with the same ``params_sha256`` is the same model: it is returned
    (``created=False``) instead of registering a duplicate. Either way the run is tagged with the
    version and the registered model's description (the leaderboard) is rewritten.
    """
    client = _client(client)
    tags = {f"{METRIC_TAG_PREFIX}{k}": str(float(v)) for k, v in metrics.items()}
    tags.update(eval_dataset=eval_dataset, eval_digest=eval_digest, train_digest=train_digest,
                params_sha256=params_sha256, project=project, run_id=run_id)
    tags = {k: str(v) for k, v in tags.items()}

    with _model_lock(client, name):
        _ensure_registered_model(client, name)
        same = client.search_model_versions(
            f"name = {_quoted(name)} AND tags.params_sha256 = {_quoted(params_sha256)}")
        if same:
            version, created = str(min(int(mv.version) for mv in same)), False
        else:
            source, model_id = _source(client, model_uri)
            # Over REST, MLflow logs "Waiting up to 300 seconds..." (INFO) for every version it creates,
            # though an OSS server creates it at once: keep our output to what the user asked for.
            waiting_log = logging.getLogger("mlflow.store.model_registry.abstract_store")
            level = waiting_log.level
            waiting_log.setLevel(logging.WARNING)
            try:
                mv = client.create_model_version(name, source, run_id=run_id, tags=tags, model_id=model_id)
            finally:
                waiting_log.setLevel(level)
            version, created = str(mv.version), True
            _set_stage(client, name, version, STAGING)
            if model_id:
                _link_logged_model(client, model_id, name, version)
        client.set_tag(run_id, RUN_MODEL_TAG, name)
        client.set_tag(run_id, RUN_VERSION_TAG, version)
        _rewrite_description(client, name)
    return Registration(name=name, version=version, created=created)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:  # already there (or created a moment ago by another process)
        if not (_is(exc, "RESOURCE_ALREADY_EXISTS") or _is(exc, "ALREADY_EXISTS")):
            raise


def _source(client, model_uri: str) -> tuple[str, str | None]:
    """(source, logged model id) for create_model_version, resolved as mlflow.register_model does.

    MLflow 3 stores ``log_model(name=...)`` output as a LoggedModel, not under the run's
    artifacts, so ``runs:/<run>/<name>`` is registered through the LoggedModel it names.
    """
    if model_uri.startswith("models:/"):
        rest = model_uri[len("models:/") :].strip("/")
        return model_uri, (rest if "/" not in rest and "@" not in rest else None)
    if model_uri.startswith("runs:/"):
        run_id, _, artifact_path = model_uri[len("runs:/") :].partition("/")
        experiment_id = client.get_run(run_id).info.experiment_id
        for logged in client.search_logged_models(
                experiment_ids=[experiment_id], filter_string=f"name = {_quoted(artifact_path.strip('/'))}"):
            if logged.source_run_id == run_id:
                return f"models:/{logged.model_id}", logged.model_id
    return model_uri, None


def _link_logged_model(client, model_id: str, name: str, version: str) -> None:
    """Record the version on the LoggedModel (the `mlflow.modelVersions` tag) so the UI links both ways."""
    from mlflow.exceptions import MlflowException

    key = "mlflow.modelVersions"
    try:
        linked = json.loads(client.get_logged_model(model_id).tags.get(key) or "[]")
        client.set_logged_model_tags(model_id, {key: json.dumps(linked + [{"name": name, "version": version}])})
    except MlflowException:
        pass  # a missing link is cosmetic; the version itself is registered


# --------------------------------------------------------------------------- leaderboard
def leaderboard(name: str, *, metric: str = DEFAULT_METRIC, eval_digest: str | None = None, stage: str | None = None,
                top: int | None = None, client=None) -> list[dict]:
    """The versions of ``name`` ranked by ``metric``, higher first.

    Versions without the metric come last; ties go to the older version. Each row holds rank,
    version, stage, aliases, metrics, run_id, created (ISO-8601 UTC), eval_digest and eval_dataset.
    Filtering by ``eval_digest`` or ``stage`` happens before ranking, ``top`` after.
    """
    from mlflow.exceptions import MlflowException

    client = _client(client)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if _is(exc, "RESOURCE_DOES_NOT_EXIST"):
            raise TunixError(f"no registered model named {name!r}") from None
        raise
    # search_model_versions leaves aliases out; the registered model has them all in one call.
    aliases: dict[str, list[str]] = {}
    for alias, version in sorted(model.aliases.items()):
        aliases.setdefault(str(version), []).append(alias)

    rows = [_row(mv, aliases.get(str(mv.version), []), _logged_metrics(client, mv))
            for mv in _all_versions(client, name)]
    if eval_digest is not None:
        rows = [r for r in rows if r["eval_digest"] == eval_digest]
    if stage is not None:
        rows = [r for r in rows if r["stage"] == stage]
    rows.sort(key=lambda r: (metric not in r["metrics"], -r["metrics"].get(metric, 0.0), int(r["version"])))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows[:top] if top else rows


def _logged_metrics(client, mv) -> dict[str, float]:
    """The metrics the version's source run logged (the version's run_id is set at creation; tags can be edited)."""
    from mlflow.exceptions import MlflowException

    if not mv.run_id:
        return {}
    try:
        return dict(client.get_run(mv.run_id).data.metrics)
    except MlflowException:  # the run was deleted: its version has no scores
        return {}


def _row(mv, aliases: list[str], logged: Mapping[str, float]) -> dict:
    """One leaderboard row. Scores are the source run's metrics; the ``metric.<name>`` tags only say which
    metrics are eval scores. A tag that disagrees with its run is recorded in ``mismatches``."""
    metrics, mismatches = {}, {}
    for key, value in mv.tags.items():
        if not key.startswith(METRIC_TAG_PREFIX):
            continue
        name = key[len(METRIC_TAG_PREFIX) :]
        number = logged.get(name)
        if number is None or not math.isfinite(number):  # NaN would rank anywhere and break the json output
            continue
        metrics[name] = number
        try:
            tagged = float(value)
        except ValueError:
            tagged = math.nan
        if not math.isclose(tagged, number, rel_tol=1e-9, abs_tol=1e-12):
            mismatches[name] = value[:40]
    created = datetime.datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=datetime.timezone.utc)
    return {
        "rank": None,
        "version": str(mv.version),
        "stage": mv.current_stage or "None",
        "aliases": aliases,
        "metrics": dict(sorted(metrics.items())),
        "run_id": mv.run_id or mv.tags.get("run_id") or "",
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "eval_digest": mv.tags.get("eval_digest"),
        "eval_dataset": mv.tags.get("eval_dataset"),
        "mismatches": mismatches,
    }


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _other_metrics(row: dict, metric: str) -> str:
    return ", ".join(f"{k}={_number(v)}" for k, v in row["metrics"].items() if k != metric)


def format_leaderboard(rows: list[dict], *, fmt: str = "table", metric: str = DEFAULT_METRIC) -> str:
    """Rows as ``table`` (aligned text), ``json`` (a list of objects) or ``csv`` (one column per metric)."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        names = sorted({k for r in rows for k in r["metrics"]} - {metric})
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["rank", "version", "stage", "aliases", metric, *names, "run_id", "created", "eval_digest"])
        for r in rows:
            writer.writerow([r["rank"], r["version"], r["stage"], ";".join(r["aliases"]),
                             r["metrics"].get(metric, ""), *(r["metrics"].get(n, "") for n in names),
                             r["run_id"], r["created"], r["eval_digest"] or ""])
        return out.getvalue().rstrip("\n")
    if fmt != "table":
        raise TunixError(f"unknown leaderboard format {fmt!r}; use table, json or csv")
    if not rows:
        return "no versions match"
    header = ["rank", "version", "stage", "aliases", metric, "run_id", "created", "other metrics"]
    table = [header] + [
        [str(r["rank"]), r["version"], r["stage"], " ".join(f"@{a}" for a in r["aliases"]),
         _number(r["metrics"].get(metric)), r["run_id"], r["created"], _other_metrics(r, metric)]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    numeric = {0, 1, 4}  # right-align numbers so their digits line up
    lines = ["  ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(line, widths))).rstrip() for line in table]
    return "\n".join(lines)


def render_description(rows: list[dict], metric: str) -> str:
    """The leaderboard as markdown, for the registered model's description (its MLflow page)."""
    head = [
        DESCRIPTION_HEADING,
        "",
        f"Ranked by `{metric}` (higher is better; ties: older version first). Rewritten by mlflow-tunix "
        f"at every registration and promotion; `mlflow-tunix leaderboard --model <name>` prints the same.",
        "",
        f"| rank | version | stage | aliases | {metric} | other metrics | run id |",
        "|---:|---:|---|---|---:|---|---|",
    ]
    text = "\n".join(head)
    for i, r in enumerate(rows):
        line = (f"\n| {r['rank']} | {r['version']} | {r['stage']} | {' '.join('@' + a for a in r['aliases'])} "
                f"| {_number(r['metrics'].get(metric))} | {_other_metrics(r, metric)} | {_run_link(r['run_id'])} |")
        more = f"\n\n{len(rows) - i} more versions: see `mlflow-tunix leaderboard`."
        if len(text) + len(line) + len(more) > DESCRIPTION_MAX_CHARS - 500:  # room for the user's own text
            return text + more
        text += line
    return text


def _run_link(run_id: str) -> str:
    """The run id as a link the MLflow UI follows from the model's page (its /runs/<id> route finds
    the run's experiment itself)."""
    return f"[{run_id}](#/runs/{run_id})" if run_id else ""


def _rewrite_description(client, name: str) -> None:
    model = client.get_registered_model(name)
    metric = model.tags.get(LEADERBOARD_METRIC_TAG, DEFAULT_METRIC)
    own = (model.description or "").split(DESCRIPTION_HEADING)[0].rstrip()
    table = render_description(leaderboard(name, metric=metric, client=client), metric)
    client.update_registered_model(name, description=f"{own}\n\n{table}" if own else table)


# --------------------------------------------------------------------------- promote
def promote(name: str, *, version: str | None = None, best: bool = False, metric: str = DEFAULT_METRIC,
            max_regression: float = 0.05, wait: float | None = DEFAULT_LOCK_WAIT, client=None) -> Promotion:
    """Move a version (``version``, or with ``best`` the top of the leaderboard) to Production and @champion.

    Refused (TunixError) when the challenger was evaluated on another eval set than the champion,
    or its ``metric`` is below the champion's by more than ``max_regression`` (relative). The former
    Production version is archived. Promoting the champion again changes nothing. A version whose
    ``metric.<name>`` tag differs from what its run logged is refused, naming both. Waits at most
    ``wait`` seconds for another registration or promotion of the same model.
    """
    if (version is None) == (not best):
        raise TunixError("give exactly one of version or best=True")
    if isinstance(max_regression, bool) or not isinstance(max_regression, (int, float)) \
            or not 0.0 <= max_regression <= 1.0:  # also refuses NaN, which would switch the gate off
        raise TunixError(f"--max-regression must be a number in [0, 1], got {str(max_regression)[:40]}")
    if wait is not None and not (isinstance(wait, (int, float)) and 0 <= wait < math.inf):
        raise TunixError(f"--wait must be a number of seconds >= 0, got {str(wait)[:40]}")
    client = _client(client)
    with _model_lock(client, name, wait):
        rows = leaderboard(name, metric=metric, client=client)
        if best:
            if not rows or metric not in rows[0]["metrics"]:
                raise TunixError(f"no version of {name!r} has the metric {metric!r} "
                                 f"(version tag {METRIC_TAG_PREFIX}{metric})")
            challenger = rows[0]
        else:
            challenger = next((r for r in rows if r["version"] == str(version)), None)
            if challenger is None:
                known = ", ".join(sorted((r["version"] for r in rows), key=int)) or "none"
                raise TunixError(f"{name!r} has no version {version!r} (versions: {known})")
        _check_tags(name, challenger, metric)
        champion = _champion(rows)
        if champion is not None and champion is not challenger:
            _gate(name, challenger, champion, metric, max_regression)

        unchanged = challenger["stage"] == PRODUCTION and CHAMPION in challenger["aliases"] and not any(
            r["stage"] == PRODUCTION for r in rows if r is not challenger)
        v = challenger["version"]
        if unchanged:
            return Promotion(name, v, None, f"{name} v{v} is already in Production and @{CHAMPION}; nothing changed")

        if challenger["stage"] != PRODUCTION:
            _set_stage(client, name, v, PRODUCTION)
        client.set_registered_model_alias(name, CHAMPION, v)
        archived = _reconcile(client, name, v)
        client.set_registered_model_tag(name, LEADERBOARD_METRIC_TAG, metric)
        _rewrite_description(client, name)

    figures = {r["version"]: r["metrics"].get(metric) for r in rows}
    message = f"promoted {name} v{v} ({metric} {_number(figures[v])}) to {PRODUCTION} and @{CHAMPION}"
    if archived:
        message += "; archived " + ", ".join(f"v{a} ({_number(figures.get(a))})" for a in archived)
    previous = champion["version"] if champion is not None and champion is not challenger else None
    return Promotion(name, v, previous, message)


def _champion(rows: list[dict]) -> dict | None:
    """The version holding @champion, else (alias lost) the newest Production version."""
    for r in rows:
        if CHAMPION in r["aliases"]:
            return r
    production = [r for r in rows if r["stage"] == PRODUCTION]
    return max(production, key=lambda r: int(r["version"])) if production else None


def _check_tags(name: str, row: dict, metric: str) -> None:
    if metric in row["mismatches"]:
        raise TunixError(
            f"refused: {name} v{row['version']} is tagged {METRIC_TAG_PREFIX}{metric}={row['mismatches'][metric]} "
            f"but its run {row['run_id']} logged {metric} {_number(row['metrics'][metric])}; the tag was edited "
            f"(scores are read from the run)")


def _gate(name: str, challenger: dict, champion: dict, metric: str, max_regression: float) -> None:
    c, p = challenger["version"], champion["version"]
    _check_tags(name, champion, metric)
    if challenger["eval_digest"] != champion["eval_digest"]:
        raise TunixError(
            f"refused: {name} v{c} was evaluated on eval set {_digest(challenger)} but champion v{p} on "
            f"{_digest(champion)}; {metric} figures on different eval sets are not comparable")
    new, old = challenger["metrics"].get(metric), champion["metrics"].get(metric)
    if new is None:
        raise TunixError(f"refused: {name} v{c} has no {metric} (version tag {METRIC_TAG_PREFIX}{metric}) "
                         f"to compare with champion v{p}")
    if old is None:
        return  # nothing to regress from: the champion was registered without this metric
    floor = old - abs(old) * max_regression
    if new < floor:
        drop = old - new
        relative = f" ({drop / abs(old):.1%})" if old else ""
        raise TunixError(
            f"refused: {name} v{c} {metric} {_number(new)} is {_number(drop)}{relative} below champion "
            f"v{p} {_number(old)}; --max-regression {max_regression:g} allows at least {_number(floor)}")


def _digest(row: dict) -> str:
    digest = (row["eval_digest"] or "none")[:12]
    return f"{digest} ({row['eval_dataset']})" if row.get("eval_dataset") else digest


def _reconcile(client, name: str, champion: str) -> list[str]:
    """Leave one story in the registry: only ``champion`` in Production, and @champion on it.

    Re-reads the registry rather than trusting what this process did, so it also repairs a
    promotion that raced ours from another machine. Returns the versions it archived.
    """
    archived = []
    for mv in sorted(_all_versions(client, name), key=lambda mv: int(mv.version)):
        if mv.current_stage == PRODUCTION and str(mv.version) != champion:
            _set_stage(client, name, str(mv.version), ARCHIVED)
            archived.append(str(mv.version))
    if str(client.get_registered_model(name).aliases.get(CHAMPION)) != champion:
        client.set_registered_model_alias(name, CHAMPION, champion)
    return archived
