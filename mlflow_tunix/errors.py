"""The errors mlflow-tunix raises for bad input.

Each is raised where the problem is known, carries the file/line/key that caused it, and is
shown to the user once, as one line, at the CLI boundary (``mlflow_tunix.cli``).
"""

from __future__ import annotations

import reprlib

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple = 3, 6, 6, 6


def short(value, limit: int = 80) -> str:
    """A repr of ``value`` of at most about ``limit`` characters, for error messages.

    A message never prints a whole user value: a megabyte prompt or a YAML alias bomb would
    become a megabyte (or an endless) message. reprlib bounds nesting before building the text.
    """
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class TunixError(Exception):
    """Base class: a problem the user can fix (bad data, bad config, bad request)."""


class DataError(TunixError):
    """A dataset file is unreadable or malformed. The message starts with ``file:line:``."""

    def __init__(self, path, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ConfigError(TunixError):
    """A project config or an override names an unknown key or holds a bad value."""


class ModelLoadError(TunixError):
    """A saved model is incomplete, altered or of an unknown format."""


class InputError(TunixError):
    """A prediction request is malformed or asks for values out of range."""


class TrainingError(TunixError):
    """Training cannot go on (for example: the loss became NaN)."""


class ResumableError(TunixError):
    """The job stopped, but run ``run_id`` can be continued with ``--resume`` (its checkpoints are kept).

    ``then`` says when to continue ("Fix it, then", "When the server is back,"); the CLI adds the
    command to the message, since only it knows its own name.
    """

    def __init__(self, message: str, run_id: str, then: str = "Fix it, then", note: str = ""):
        self.run_id, self.then, self.note = run_id, then, note
        super().__init__(message)
