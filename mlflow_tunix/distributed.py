"""Data parallel training: one JAX process per CPU core (or per host), joined by ``jax.distributed``.

Why processes and not devices: on a 2-core CPU, one process on both cores reaches ~1.7x one core
(XLA's intra-op threads), two forced host devices in one process gain nothing, and two processes
each pinned to its own core reach ~2x (docs/scaling.md has the figures). So on CPU the trainer runs
one process per core, the same multi-process SPMD program as multi-host; on GPU/TPU one process
uses its local devices.

The program is the same in every process: a ``Mesh`` of all devices of all processes with one axis
``data``; the training state replicated, the batch sharded on its first axis; one jitted step in
which XLA all-reduces the gradients (over gloo on CPU). Every process builds the same (seed, step)
batch and hands its own rows to the global array, so the loss history is that of one process.

How the processes find each other (the launcher sets these; on several hosts, set them yourself):

    MLFLOW_TUNIX_COORDINATOR   host:port of process 0 (every process connects to it)
    MLFLOW_TUNIX_NUM_PROCESSES how many processes in all
    MLFLOW_TUNIX_PROCESS_ID    this process's id, 0 .. N-1 (0 owns MLflow and the model)
    MLFLOW_TUNIX_CORE          optional: pin this process to that CPU core
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ENV_COORDINATOR = "MLFLOW_TUNIX_COORDINATOR"
ENV_NUM_PROCESSES = "MLFLOW_TUNIX_NUM_PROCESSES"
ENV_PROCESS_ID = "MLFLOW_TUNIX_PROCESS_ID"
ENV_CORE = "MLFLOW_TUNIX_CORE"
AXIS = "data"
# A worker that stops answering is declared dead after this long (jax's default is 100 s): the
# others then fail instead of waiting for it.
HEARTBEAT_SECONDS = 10


def pin_to_core(core: int) -> None:
    """Pin every thread of this process (and so every thread they start) to ``core``."""
    for tid in os.listdir("/proc/self/task"):  # sched_setaffinity(pid) moves one thread only
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), {core})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_from_env() -> bool:
    """Join the process group the environment describes (once; before any JAX computation).
    False when the environment describes none (a single process)."""
    if not os.environ.get(ENV_COORDINATOR):
        return False
    if jax.distributed.is_initialized():
        return True
    if os.environ.get(ENV_CORE):
        pin_to_core(int(os.environ[ENV_CORE]))
    jax.distributed.initialize(os.environ[ENV_COORDINATOR], int(os.environ[ENV_NUM_PROCESSES]),
                               int(os.environ[ENV_PROCESS_ID]), heartbeat_timeout_seconds=HEARTBEAT_SECONDS)
    return True


def process_index() -> int:
    return jax.process_index()


def is_main() -> bool:
    """Process 0 logs to MLflow, writes the model and registers it; the others only compute."""
    return jax.process_index() == 0


def share(value: dict | None) -> dict:
    """Process 0's ``value`` (JSON-ready) in every process (the others pass None): how the workers
    learn what process 0 decided, such as the run's folder."""
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    padded = np.zeros(size, np.uint8)
    padded[: len(data)] = data
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))).decode())


def gather(value) -> list:
    """Every process's ``value`` (JSON-ready), in process order, in every process."""
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:size]).decode()) for row, size in zip(everyone, sizes)]


def my_part(items: list) -> list:
    """This process's contiguous share of ``items`` (the shares differ by at most one)."""
    k, n = jax.process_index(), jax.process_count()
    return items[k * len(items) // n : (k + 1) * len(items) // n]


ENV_RUN_ID_FILE = "MLFLOW_TUNIX_RUN_ID_FILE"


def announce_run(run_id: str) -> None:
    """Tell the launcher which MLflow run process 0 works in (it marks the run FAILED if a worker dies)."""
    path = os.environ.get(ENV_RUN_ID_FILE)
    if path and is_main():
        with open(path, "w") as f:
            f.write(run_id)


class DataParallel:
    """The mesh of all devices and how the state and the batches are laid on it."""

    def __init__(self):
        self.mesh = Mesh(np.array(jax.devices()), (AXIS,))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.sharded = NamedSharding(self.mesh, PartitionSpec(AXIS))
        self.n_devices = self.mesh.size
        self.n_processes = jax.process_count()

    @property
    def active(self) -> bool:
        return self.n_devices > 1

    def check_batch(self, batch_size: int, what: str = "train.batch_size") -> None:
        from mlflow_tunix.errors import ConfigError

        if batch_size % self.n_devices:
            raise ConfigError(f"{what}: {batch_size} does not split over {self.n_devices} data-parallel devices; "
                              f"use a multiple of {self.n_devices}")

    def replicate(self, tree) -> Any:
        """The same value on every device (every process passes the same value)."""
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree)

    def shard_rows(self, batch: dict) -> dict:
        """The global batch (the same in every process) as arrays split on their first axis: each
        process hands over only its own rows."""
        out = {}
        for name, array in batch.items():
            rows = len(array) // self.n_processes
            i = jax.process_index()
            out[name] = jax.make_array_from_process_local_data(self.sharded, array[i * rows : (i + 1) * rows],
                                                               array.shape)
        return out

    def gather(self, tree) -> Any:
        """A replicated result as host arrays (each process has all of it)."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


# --------------------------------------------------------------------------- launching local processes
def processes_for(setting, platform: str | None = None) -> int:
    """``train.processes``: ``auto`` = one per core this process may use on CPU, 1 on GPU/TPU (there
    one process drives all local devices); a number = that many."""
    if setting in (None, "auto"):
        platform = platform or jax.default_backend()
        return len(os.sched_getaffinity(0)) if platform == "cpu" else 1
    return int(setting)


class WorkerDied(RuntimeError):
    """A process of the group ended with an error (or a signal); the others were stopped."""

    def __init__(self, process: int, n: int, code: int):
        self.process, self.code = process, code
        super().__init__(f"data-parallel process {process} of {n} exited with code {code}"
                         + (" (killed by a signal)" if code < 0 else ""))


def launch(argv: list[str], n: int, *, env: dict | None = None, cores: list[int] | None = None,
           poll: float = 0.2) -> list[int]:
    """Run ``argv`` as ``n`` processes of one group on this machine (process i pinned to core i when
    there are enough cores) and wait for all of them. When one fails, the others are stopped and
    :class:`WorkerDied` names it; Ctrl-C or SIGTERM stop them all (KeyboardInterrupt). Returns the
    exit codes (all 0)."""
    import subprocess
    import time

    import signal
    import threading

    def stop(signum, frame):
        raise KeyboardInterrupt(signum)

    if threading.current_thread() is threading.main_thread():  # SIGTERM too ends here, stopping the group
        signal.signal(signal.SIGTERM, stop)
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    base = {**os.environ, **(env or {}), ENV_COORDINATOR: f"127.0.0.1:{free_port()}", ENV_NUM_PROCESSES: str(n)}
    procs = []
    for i in range(n):
        proc_env = {**base, ENV_PROCESS_ID: str(i)}
        if len(cores) >= n:
            proc_env[ENV_CORE] = str(cores[i])
        # Their own session: a Ctrl-C in the terminal reaches the launcher only, which stops them all at
        # once (processes stopped one by one at different steps would wait for each other forever).
        procs.append(subprocess.Popen(argv, env=proc_env, start_new_session=True))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                raise WorkerDied(i, n, code)
            if all(c == 0 for c in codes):
                return codes
            time.sleep(poll)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
