"""The one small interface every stage logs through.

Stages call ``tracker.log_scalar(name, value, step)`` (and the few other methods below) and never
learn where their figures end up. :class:`MlflowTracker` is the backend used by the pipeline; it
buffers scalars and sends them in asynchronous batches so the training loop never waits on the
tracking server. :class:`NullTracker` drops everything (library use, tests of a single stage).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Mapping, Protocol


class Tracker(Protocol):
    def log_scalar(self, name: str, value: float, step: int) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Keeps the last value of each scalar in ``self.last`` and sends nothing anywhere."""

    def __init__(self):
        self.last: dict[str, float] = {}
        self.history: dict[str, list[tuple[int, float]]] = {}

    def log_scalar(self, name, value, step):
        self.last[name] = float(value)
        self.history.setdefault(name, []).append((int(step), float(value)))

    def log_params(self, params):
        pass

    def set_tags(self, tags):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class MlflowTracker(NullTracker):
    """Sends scalars to one MLflow run in batches (``log_batch(..., synchronous=False)``)."""

    MAX_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call

    def __init__(self, run_id: str, *, client=None, flush_every: int = 200):
        super().__init__()
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = client or MlflowClient()
        self.flush_every = flush_every
        self._pending: list = []
        self._futures: list = []

    def log_scalar(self, name, value, step):
        from mlflow.entities import Metric

        super().log_scalar(name, value, step)
        value = float(value)
        if not math.isfinite(value):  # MLflow stores NaN, but a chart with one is useless: keep it visible
            value = float("nan")
        self._pending.append(Metric(name, value, int(time.time() * 1000), int(step)))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def flush(self):
        while self._pending:
            chunk, self._pending = self._pending[: self.MAX_BATCH], self._pending[self.MAX_BATCH :]
            self._futures.append(self.client.log_batch(self.run_id, metrics=chunk, synchronous=False))

    def close(self):
        self.flush()
        for future in self._futures:
            if future is not None:
                try:
                    future.wait()
                except Exception as exc:  # surfaced once, not as a traceback mid-step
                    print(f"warning: some metrics could not be sent to MLflow: {exc}", file=sys.stderr)
        self._futures.clear()
