"""The projects that ship with mlflow-tunix: one folder each, holding its ``config.yaml``.

This folder is package data (installed as ``mlflow_tunix.projects``; see pyproject.toml), found
through ``importlib.resources``, so ``--config addition`` works from a wheel as from a clone.
Kept free of heavy imports: the CLI's ``--help`` lists the projects from here.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONFIG_FILE = "config.yaml"


def directory() -> Path:
    return Path(str(files(__name__)))


def names() -> list[str]:
    return sorted(p.parent.name for p in directory().glob(f"*/{CONFIG_FILE}"))


def description(name: str) -> str:
    """The project's one-line ``description:`` (read without a YAML parser, to stay light)."""
    for line in (directory() / name / CONFIG_FILE).read_text(encoding="utf-8").splitlines():
        if line.startswith("description:"):
            return line.partition(":")[2].strip()
    return ""
