"""The one small interface every stage logs through.

The trainer calls ``tracker.log_scalar(name, value, step)`` (and ``flush``/``sync``/``close``) and never
learn where their figures end up. :class:`MlflowTracker` is the backend used by the pipeline; it
buffers scalars and sends them in batches from a background thread so the training loop never
waits on the tracking server. :class:`NullTracker` drops everything (library use, tests of a
single stage).

A tracking server can go away mid-run. The tracker then retries each batch a few times with
backoff, and what it still cannot send is appended to a local JSONL file (``spill_path``) and
announced once, at :meth:`MlflowTracker.close`, with the command that re-sends it
(:func:`resend_metrics`, ``mlflow-tunix resend-metrics``). Training is never interrupted for it.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

from mlflow_tunix.errors import DataError


class Tracker(Protocol):
    """What the trainer calls (the shape of a Tunix metrics-logger backend, plus ``sync``)."""

    def log_scalar(self, name: str, value: float, step: int) -> None: ...

    def flush(self) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Keeps the last value of each scalar in ``self.last`` and sends nothing anywhere."""

    def __init__(self):
        self.last: dict[str, float] = {}
        self.history: dict[str, list[tuple[int, float]]] = {}

    def log_scalar(self, name, value, step):
        self.last[name] = float(value)
        self.history.setdefault(name, []).append((int(step), float(value)))

    def flush(self):
        pass

    def sync(self):
        pass

    def close(self):
        pass


# --------------------------------------------------------------------------- is the server there?
def server_reachable(tracking_uri: str, timeout: float = 5.0) -> bool:
    """False when an http(s) tracking server does not answer at all (refused, timed out).

    Any HTTP answer counts as reachable, even an error: only a silent server is "gone". Local
    stores (sqlite, files) are always reachable. One quick request, no retries: MLflow's own
    client retries a dead server for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES), which is what
    we avoid by asking first.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        requests.get(tracking_uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException:
        return False
    return True


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means the tracking server did not answer."""
    import requests

    markers = ("Max retries exceeded", "Connection refused", "Failed to establish a new connection",
               "Connection aborted", "RemoteDisconnected", "Read timed out")
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError)):
            return True
        if any(marker in str(exc) for marker in markers):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# --------------------------------------------------------------------------- the MLflow backend
class _QuietSenderRetries(logging.Filter):
    """Drops urllib3's "Retrying ..." warnings raised in the tracker's sender thread: against a dead
    server there is one per retry, mid-training; close() reports the outcome once instead."""

    def filter(self, record):
        return not (record.threadName == SENDER_THREAD and record.getMessage().startswith("Retrying"))


SENDER_THREAD = "mlflow-tunix-metrics"


class MlflowTracker(NullTracker):
    """Sends scalars to one MLflow run in batches, from one background thread, in order.

    Args:
        run_id: The run to log to.
        client: An ``MlflowClient`` (default: one for the current tracking URI).
        flush_every: Scalars buffered before a batch is handed to the sender.
        skip_logged: Drop points whose (name, step) the run already has: a resumed run
            recomputes some steps, and a metric history must hold one point per step.
        spill_path: Where points that could not be sent are kept (JSONL).
    """

    MAX_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
    ATTEMPTS = 4  # tries per batch; then the server is taken for gone and the rest is spilled
    BACKOFF = 0.5  # seconds before the second try, doubled after each
    PATIENCE = 5.0  # seconds a wait on a stuck send lasts before the server is asked if it is there

    def __init__(self, run_id: str, *, client=None, flush_every: int = 200, skip_logged: bool = False,
                 spill_path=None):
        super().__init__()
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = client or MlflowClient()
        self.flush_every = flush_every
        self.spill_path = Path(spill_path) if spill_path else default_spill_path(run_id)
        self.spilled = 0  # points written to spill_path
        self.skipped = 0  # points not sent because the run already had them (skip_logged)
        self.lost: str | None = None  # why the server was given up on, once it was
        self._logged: dict[str, set[int]] | None = {} if skip_logged else None
        self._pending: list = []  # buffered here until flush()
        self._queue: queue.Queue = queue.Queue()  # chunks for the sender thread
        self._outstanding: dict[int, list] = {}  # id -> chunk handed over and not yet stored
        self._cv = threading.Condition()  # guards _outstanding, the spill file and the counters
        self._sender: threading.Thread | None = None
        self._closed = False

    def log_scalar(self, name, value, step):
        from mlflow.entities import Metric

        super().log_scalar(name, value, step)
        value = float(value)
        if not math.isfinite(value):  # MLflow stores NaN, but a chart with one is useless: keep it visible
            value = float("nan")
        point = Metric(name, value, int(time.time() * 1000), int(step))
        if self._logged is not None:
            steps = self._steps_logged(name)
            if steps is None:  # cannot tell now: keep it locally; re-sending skips what the run has
                self._spill([point], f"the tracking server {self.client.tracking_uri} does not answer")
                return
            if point.step in steps:
                self.skipped += 1
                return
        self._pending.append(point)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def _steps_logged(self, name: str) -> set[int] | None:
        """The steps the run already has a point of ``name`` at (asked once per name), or None if
        the server cannot say right now."""
        if name not in self._logged:
            if not server_reachable(self.client.tracking_uri):
                return None
            try:
                self._logged[name] = logged_steps(self.client, self.run_id, name)
            except Exception:
                return None
        return self._logged[name]

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def flush(self):
        """Hand the buffered scalars to the sender thread (returns at once)."""
        while self._pending:
            chunk, self._pending = self._pending[: self.MAX_BATCH], self._pending[self.MAX_BATCH :]
            if self._closed or self.lost:  # no sender any more, or no server: keep the points
                self._spill(chunk, self.lost or "logged after the tracker was closed")
                continue
            if self._sender is None:
                # A daemon: a send stuck in MLflow's retries against a dead server must not keep the
                # process alive at exit (its points are spilled by _wait).
                self._sender = threading.Thread(target=self._send_loop, name=SENDER_THREAD, daemon=True)
                self._sender.start()
                _install_quiet_retries()
            with self._cv:
                self._outstanding[id(chunk)] = chunk
            self._queue.put(chunk)

    def sync(self):
        """Block until every point logged so far is stored: in MLflow, or in ``spill_path``. The
        trainer calls it before each checkpoint, so a checkpoint never gets ahead of the metrics."""
        self.flush()
        self._wait()

    # ---- the sender thread
    def _send_loop(self):
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            try:
                sent = self._send(chunk)
            except BaseException:  # never let a point vanish with the thread
                sent = False
            with self._cv:
                still_ours = self._outstanding.pop(id(chunk), None) is not None
                if not sent and still_ours:  # (not ours: _wait gave up on it and spilled it already)
                    self._spill(chunk, self.lost or "not sent")
                self._cv.notify_all()

    def _send(self, chunk) -> bool:
        delay, reason = self.BACKOFF, ""
        for attempt in range(self.ATTEMPTS):
            if self.lost:  # given up on: do not wait for the server again in this run
                return False
            if attempt:
                time.sleep(delay)
                delay *= 2
            if not server_reachable(self.client.tracking_uri):
                reason = f"the tracking server {self.client.tracking_uri} does not answer"
                continue
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
                return True
            except Exception as exc:
                reason = one_line(exc)[:500]
        self.lost = self.lost or reason
        return False

    def _wait(self):
        """Until the sender has stored every chunk handed over; if a send is stuck (MLflow retries a
        dead server for minutes) and the server is gone, spill what is outstanding and stop waiting."""
        with self._cv:
            while self._outstanding:
                if not self.lost and (self._cv.wait(self.PATIENCE) or not self._outstanding
                                      or server_reachable(self.client.tracking_uri)):
                    continue  # progress, or slow but there
                # Given up on (now or earlier; the sender may still be stuck in a send): keep the rest.
                self.lost = self.lost or f"the tracking server {self.client.tracking_uri} does not answer"
                for chunk in list(self._outstanding.values()):
                    self._spill(chunk, self.lost)
                self._outstanding.clear()

    def _spill(self, chunk, reason: str):
        with self._cv:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spill_path, "a", encoding="utf-8") as f:
                for m in chunk:
                    f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")
            self.spilled += len(chunk)
            self.lost = self.lost or reason

    # ---- the end
    def close(self):
        """Send what is left and wait for it. Points that could not be sent stay in ``spill_path``
        and one message says how to re-send them; nothing is raised."""
        self.flush()
        self._wait()
        self._closed = True
        if self._sender is not None:
            self._queue.put(None)  # the thread ends when it gets here (at once, unless stuck)
            self._sender = None
        if self.spilled and server_reachable(self.client.tracking_uri):
            try:  # it may be back by now
                resend_metrics(self.spill_path, self.run_id, client=self.client)
                self.spill_path.unlink()
                self.spilled, self.lost = 0, None
            except Exception as exc:
                self.lost = self.lost or one_line(exc)[:500]
        if self.spilled:
            print(unsent_message(self.spilled, self.spill_path, self.run_id, self.lost), file=sys.stderr, flush=True)


def _install_quiet_retries():
    pool_logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _QuietSenderRetries) for f in pool_logger.filters):
        pool_logger.addFilter(_QuietSenderRetries())


def unsent_message(n: int, path, run_id: str, reason: str | None) -> str:
    return (f"warning: {n} metric points could not be sent to MLflow ({reason or 'unknown reason'}); "
            f"they are kept in {path}. Re-send them with: mlflow-tunix resend-metrics {path} --run-id {run_id}")


def default_spill_path(run_id: str) -> Path:
    return Path.home() / ".cache" / "mlflow-tunix" / "unsent" / f"{run_id}.jsonl"


# --------------------------------------------------------------------------- re-sending
def read_spilled(path) -> list:
    """The metric points in a spill file. A last line cut short by a crash is ignored; any other
    bad line raises :class:`DataError` naming it."""
    from mlflow.entities import Metric

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(path, None, f"cannot read: {exc.strerror or exc}") from None
    points = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            points.append(Metric(str(record["key"]), float(record["value"]), int(record["timestamp"]),
                                 int(record["step"])))
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):  # written while the process died
                break
            raise DataError(path, number, f"not a metric point ({type(exc).__name__}: {exc})") from None
    return points


def resend_metrics(path, run_id: str, *, client=None) -> tuple[int, int]:
    """Log the points in spill file ``path`` to run ``run_id``; returns (sent, already there).

    Points whose (key, step) the run already has are skipped, so re-sending twice is harmless.
    """
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    points = read_spilled(path)
    have: dict[str, set[int]] = {}
    fresh = []
    for m in points:
        if m.key not in have:
            have[m.key] = logged_steps(client, run_id, m.key)
        if m.step not in have[m.key]:
            have[m.key].add(m.step)
            fresh.append(m)
    for i in range(0, len(fresh), MlflowTracker.MAX_BATCH):
        client.log_batch(run_id, metrics=fresh[i : i + MlflowTracker.MAX_BATCH])
    return len(fresh), len(points) - len(fresh)


def logged_steps(client, run_id: str, key: str) -> set[int]:
    """The steps at which run ``run_id`` already has a point of metric ``key``."""
    return {m.step for m in client.get_metric_history(run_id, key)}


def one_line(exc: BaseException) -> str:
    """An exception as one line of text (for messages and tags)."""
    return " ".join(str(exc).split()) or type(exc).__name__

