"""Checkpoints and preemption for the training loop (as Tunix keeps them in ``checkpoint_manager.py``).

:class:`Checkpoints` saves and restores a training state with Orbax, prunes old ones and sets
damaged ones aside; :func:`state_signature` and :func:`arrays_digest` fingerprint what a checkpoint
fits; :class:`StopOnSignal` turns SIGTERM / Ctrl-C into a checkpointed stop at the next step
boundary (:class:`TrainingInterrupted`).
"""

from __future__ import annotations

import hashlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mlflow_tunix.errors import TrainingError
from mlflow_tunix.tracking import one_line


def note(message: str) -> None:
    print(f"[mlflow-tunix] {message}", file=sys.stderr, flush=True)


class Checkpoints:
    """Orbax checkpoints of a :class:`TrainState` in ``directory/<step>/``, the newest ``keep`` kept.

    Each holds the whole state (step, params, optimizer state) and a JSON ``info`` dict: the step,
    the last loss, and the run's key (``train.resume_key``: every setting the weights depend on,
    the state's shapes, a digest of the training tokens), so a checkpoint is never resumed into
    another run. There is no other RNG state: nothing in the
    step draws random numbers. Orbax writes each one into a temporary directory and renames it
    when complete, so a crash mid-save leaves the previous checkpoint as the newest.
    """

    def __init__(self, directory, keep: int):
        import logging

        import orbax.checkpoint as ocp

        absl_logger = logging.getLogger("absl")
        if absl_logger.level == logging.NOTSET:
            # Orbax warns through absl about the leftovers of a killed save, which it then cleans up.
            absl_logger.setLevel(logging.ERROR)
        self._ocp = ocp
        self.directory = Path(directory).expanduser().absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            cleanup_tmp_directories=True,  # half-written saves of a killed process
            create=True,
        ))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state, info: dict) -> None:
        # A host copy: the next step donates (reuses) the state's buffers while Orbax writes in the background.
        host = jax.tree.map(lambda x: np.array(x, copy=True), state)
        self.manager.save(info["step"], force=True, args=self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(host), info=self._ocp.args.JsonSave(info)))

    def restore(self, like, expected: dict) -> tuple[Any, dict] | None:
        """The newest readable checkpoint as (state, info), or None when there is none.

        A checkpoint of another run (``info`` differs from ``expected``) is refused with
        :class:`TrainingError`. A damaged one (a disk that filled up, a file cut short) is moved
        aside to ``damaged-<step>`` and the one before it is tried.
        """
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        for step in reversed(self.steps()):
            try:
                info = dict(self.manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore())).info)
            except Exception as exc:  # Orbax/TensorStore raise many types for a damaged file
                self._set_aside(step, exc)
                continue
            for key, value in expected.items():
                if info.get(key) != value:
                    raise TrainingError(f"{self.directory / str(step)}: written by a run with {key}={info.get(key)!r}, "
                                        f"this one has {value!r}; it cannot be resumed")
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            except Exception as exc:
                self._set_aside(step, exc)
                continue
            return restored.state, info
        return None

    def _set_aside(self, step: int, exc: BaseException) -> None:
        damaged = self.directory / f"damaged-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        (self.directory / str(step)).rename(damaged)  # out of Orbax's sight, kept for a post-mortem
        self.manager.reload()
        note(f"checkpoint step {step} is unreadable ({one_line(exc)[:300]}); moved to {damaged}, "
              "trying the one before")

    def close(self) -> None:
        """Wait for the save in flight (so the newest checkpoint is complete), then release Orbax's threads."""
        self.manager.wait_until_finished()
        self.manager.close()


def state_signature(state) -> str:
    """sha256 of every leaf's path, shape and dtype: the model and optimizer a checkpoint fits."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    text = ";".join(f"{jax.tree_util.keystr(path)}:{tuple(x.shape)}:{x.dtype}" for path, x in leaves)
    return hashlib.sha256(text.encode()).hexdigest()


def arrays_digest(*arrays: np.ndarray) -> str:
    """sha256 of arrays (dtype, shape, bytes): a resumed run must see the very same training tokens."""
    h = hashlib.sha256()
    for array in arrays:
        h.update(f"{array.dtype}{array.shape};".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C stopped training at a step boundary, after checkpointing that step."""

    def __init__(self, step: int, signum: int, checkpoint: str | None):
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (train.checkpoint_every is 0)"
        super().__init__(f"{name}: training stopped after step {step}; {where}")


class StopOnSignal:
    """While training, a first SIGTERM (a preempted machine) or Ctrl-C asks the loop to stop at the
    next step boundary, checkpointed; a second Ctrl-C stops at once. Main thread only (Python
    delivers signals there); elsewhere the default behaviour stays."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        return False
