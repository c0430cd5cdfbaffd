"""Compiled programs saved whole, so that a new process runs them without tracing or lowering.

JAX's persistent compilation cache (``pipeline.setup_jax``) keeps XLA's code, but finds it by the
lowered program: a new process first traces the train step (~780 nested traces of jax.numpy
functions) and lowers it, ~0.2-0.5 s of a warm first step. ``saved_jit`` saves the compiled
executable itself next to that cache (``jax.experimental.serialize_executable``), keyed on what the
program is built from *without tracing it*: the caller's key (the model's graph, the config), the
arguments' tree, shapes and dtypes, the caller's source files, the versions of jax, jaxlib, flax and
optax, the backend and its devices, the CPU's flags, ``XLA_FLAGS`` and JAX's config. A later process
with the same key deserializes the executable and runs it.

Written here, not taken from a library: JAX has the pieces (the serialized executable) but no cache of
them keyed without tracing; Orbax and jax.export keep traced programs, which still have to be lowered.

What is read back, and the trust it needs:
- The saved functions take and return builtin containers (lists, tuples, dicts with string keys) of
  arrays, so their tree structures are saved as protos, not pickled.
- The executable's description is a pickle that JAX writes (shardings, avals, the XLA executable as
  bytes). It is read with an unpickler that resolves only JAX's and jaxlib's own classes and numpy's
  dtype; any other name is refused, and the program is traced and compiled again.
- The executable is machine code, as every entry of JAX's persistent cache is: the cache directory
  must be as trusted as JAX's (it is the user's own, ``~/.cache/mlflow-tunix/jax``; never a model's
  directory). A file that is truncated, from another writer or refused is deleted, and the program
  compiled (and saved) again.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import importlib.metadata
import io
import os
import pickle
import struct
import threading
import types
from pathlib import Path
from typing import Callable, Sequence

import jax
from jax.experimental import serialize_executable
from jax.tree_util import PyTreeDef, default_registry

_MAGIC = b"mlflow-tunix saved executable 1\n"
# Saved executables kept per name (train-step, eval-loss, decode): the most recently used (see _prune).
KEEP = 32
# Programs this process loaded from saved executables (not traced), by name: "train-step", "decode", ...
LOADED: collections.Counter = collections.Counter()
_PACKAGES = ("jax", "jaxlib", "flax", "optax")


class SavedJit:
    """``jax.jit(fn, **jit_kwargs)`` whose compiled programs are saved to, and loaded from, JAX's
    persistent cache directory (when one is set; without one they are only compiled). Each argument
    shape is compiled or loaded once, whichever thread asks first.

    ``fn``'s arguments and results must be builtin containers of arrays. ``key`` must name everything
    ``fn`` closes over that changes its program (e.g. the model's graph and the optimizer's config);
    ``modules`` are the modules whose code it runs: their files' bytes and their constants (upper-case
    names bound to numbers, strings or tuples, read when a program is compiled or loaded) are part of the key.
    """

    def __init__(self, fn: Callable, *, name: str, key: str, modules: Sequence[types.ModuleType], **jit_kwargs):
        self._jit = jax.jit(fn, **jit_kwargs)
        self._name, self._key, self._modules = name, key, tuple(modules)
        self._compiled: dict = {}  # (tree, avals) -> jax.stages.Compiled
        self._compiling = threading.Lock()  # calls from several threads compile (or load) a program once

    def __call__(self, *args):
        leaves, tree = jax.tree.flatten(args)
        signature = (tree, tuple((leaf.shape, leaf.dtype, getattr(leaf, "weak_type", False)) for leaf in leaves))
        compiled = self._compiled.get(signature)
        if compiled is None:
            with self._compiling:
                compiled = self._compiled.get(signature)
                if compiled is None:
                    compiled = self._compiled[signature] = self._load_or_compile(args, signature)
        return compiled(*args)

    def _load_or_compile(self, args, signature):
        cache_dir = jax.config.jax_compilation_cache_dir
        # Not in a group of processes (jax.distributed): their programs are bound to each process's devices,
        # and one process loading another's would wait for devices it does not have (the group hangs).
        if not cache_dir or jax.process_count() > 1:
            return self._jit.lower(*args).compile()
        files = tuple(module.__file__ for module in self._modules)
        parts = (_static_digest(self._key, files), repr(_constants(self._modules)).encode(), repr(signature).encode())
        digest = hashlib.sha256(b"\0".join(parts)).hexdigest()
        path = Path(cache_dir) / f"mlflow-tunix-{self._name}-{digest[:32]}.xla"
        try:
            compiled = _load(path.read_bytes(), signature[0])
            LOADED[self._name] += 1
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: the last to be pruned
            return compiled
        except FileNotFoundError:
            pass
        except Exception:  # truncated, another writer's, a refused name: dropped (saved again below), compiled
            with contextlib.suppress(OSError):
                path.unlink()
        hits = _cache_hits()
        compiled = self._jit.lower(*args).compile()
        # An executable JAX took from its persistent cache serializes without part of its code (its first
        # run then fails: "Function ... not found"): only what XLA compiled here is saved. (Such a program,
        # e.g. after an edit of the sources that left it as it was, keeps the persistent cache's warm path.)
        if _cache_hits() == hits:
            with contextlib.suppress(Exception):  # a read-only directory or an executable JAX cannot serialize
                _save(path, compiled)
                _prune(Path(cache_dir), self._name)
        return compiled


def saved_jit(fn: Callable, *, name: str, key: str, modules: Sequence[types.ModuleType], **jit_kwargs) -> SavedJit:
    return SavedJit(fn, name=name, key=key, modules=modules, **jit_kwargs)


def _save(path: Path, compiled) -> None:
    blob, in_tree, out_tree = serialize_executable.serialize(compiled)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(_pack([in_tree.serialize_using_proto(), out_tree.serialize_using_proto(), blob]))
    os.replace(tmp, path)  # atomic: a concurrent reader sees all of it or nothing


def _prune(cache_dir: Path, name: str, keep: int = KEEP) -> None:
    """Only the ``keep`` most recently used executables of ``name`` stay (each change of the sources, the
    config or a shape makes another: the folder would grow without end)."""
    saved = sorted(cache_dir.glob(f"mlflow-tunix-{name}-*.xla"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in saved[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()


def _pack(parts: list[bytes]) -> bytes:
    """The file: a magic line, then the argument tree, the result tree and the executable, each after its length."""
    return _MAGIC + b"".join(struct.pack("<Q", len(part)) + part for part in parts)


def _unpack(data: bytes) -> list[bytes]:
    if not data.startswith(_MAGIC):
        raise ValueError("not a saved executable")
    parts, at = [], len(_MAGIC)
    for _ in range(3):
        (n,) = struct.unpack_from("<Q", data, at)
        parts.append(data[at + 8 : at + 8 + n])
        at += 8 + n
    if at != len(data):
        raise ValueError("truncated")
    return parts


def _load(data: bytes, tree: PyTreeDef):
    """The executable saved in ``data`` for arguments of structure ``tree``, loaded (raises if it is not one)."""
    in_proto, out_proto, blob = _unpack(data)
    in_tree = PyTreeDef.deserialize_using_proto(default_registry, in_proto)
    # The call's own structure wraps the arguments as (args, kwargs).
    if in_tree != jax.tree.structure((jax.tree.unflatten(tree, [0] * tree.num_leaves), {})):
        raise ValueError("saved for other arguments")
    out_tree = PyTreeDef.deserialize_using_proto(default_registry, out_proto)
    backend = jax.devices()[0].client
    unloaded, args_info_flat, no_kwargs = _JaxOnlyUnpickler(io.BytesIO(blob), backend).load()
    return jax.stages.Compiled(unloaded.load(), [], in_tree.unflatten(args_info_flat), out_tree, no_kwargs=no_kwargs)


class _JaxOnlyUnpickler(serialize_executable._JaxPjrtUnpickler):
    """JAX's unpickler for executables, resolving only classes JAX and jaxlib define (and numpy's dtype)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("numpy", "dtype"):
            return super().find_class(module, name)
        if module.partition(".")[0] in ("jax", "jaxlib") and name.isidentifier():  # no dotted paths
            found = super().find_class(module, name)
            defined_in = getattr(found, "__module__", "") or ""
            if defined_in.partition(".")[0] in ("jax", "jaxlib") and callable(found):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not a JAX type")


_HITS = threading.local()


def _count_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _HITS.n = getattr(_HITS, "n", 0) + 1


def _cache_hits() -> int:
    """How many programs this thread has taken from JAX's persistent cache (JAX records it as an event)."""
    return getattr(_HITS, "n", 0)


jax.monitoring.register_event_listener(_count_hit)


@functools.lru_cache(maxsize=64)
def _static_digest(key: str, files: tuple[str, ...]) -> bytes:
    """The key's parts that do not depend on the call's arguments, hashed once per process."""
    h = hashlib.sha256()
    devices = jax.devices()
    for part in (
        key, [importlib.metadata.version(p) for p in _PACKAGES], devices[0].client.platform,
        devices[0].client.platform_version, [d.device_kind for d in devices], jax.process_count(),
        _cpu_flags(), os.environ.get("XLA_FLAGS", ""), sorted((k, repr(v)) for k, v in jax.config.values.items()),
    ):
        h.update(repr(part).encode() + b"\0")
    for file in files:
        h.update(Path(file).read_bytes())
    return h.digest()


def _constants(modules) -> list:
    """The modules' constants as they are now (a constant such as a block size is read when tracing)."""
    return [sorted((name, repr(value)) for name, value in vars(module).items()
                   if name.isupper() and isinstance(value, (int, float, str, tuple))) for module in modules]


@functools.cache
def _cpu_flags() -> str:
    """The host CPU's feature flags (XLA compiles for them), or '' where /proc/cpuinfo is absent."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return ""
