"""A plain (non-editable) install works: build a wheel, install it into a fresh venv, and run the
default project from an empty folder, as a user who ran `pip install mlflow-tunix` would.

The new venv borrows this venv's dependencies (jax, mlflow, ...) so nothing is downloaded; it also
sees this venv's editable install of mlflow-tunix (its import finder), so the test shows that the
installed wheel, not the source tree, is what runs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO

# What the wheel is built from: the files pyproject.toml names, copied so the build leaves no
# build/ or *.egg-info in the checkout (and no stale build/ there leaks into the wheel).
SOURCES = ("pyproject.toml", "README.md", "mlflow_tunix", "projects")


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{args[:4]} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _build_wheel(root: Path) -> Path:
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    # Without build isolation nothing is fetched, but this venv's setuptools must build wheels itself
    # (>= 70.1, or the `wheel` package); Python 3.11's venv ships 65.5, so else let pip isolate the build.
    can_build_here = any(importlib.util.find_spec(m) for m in ("setuptools.command.bdist_wheel", "wheel"))
    isolation = ["--no-build-isolation"] if can_build_here else []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", root / "dist", src])
    (wheel,) = (root / "dist").glob("mlflow_tunix-*.whl")
    return wheel


def _new_venv(root: Path, wheel: Path) -> Path:
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    python = venv / "bin" / "python"
    # --system-site-packages reaches the base interpreter's packages, not this venv's: add this venv's
    # site-packages as a site dir (processing its .pth files, the editable install's among them).
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(purelib) / "borrowed-test-venv.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages()))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel])
    return venv


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    return _new_venv(root, _build_wheel(root))


def _user_env(venv: Path, tracking_uri: str) -> dict:
    """A user's shell with the new venv activated: no PYTHONPATH, no other MLflow settings."""
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and (not k.startswith("MLFLOW_") or k.startswith("MLFLOW_TUNIX_"))}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_TUNIX_SYSTEM_METRICS="0",
               PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]))
    return env


def _editable_finder_active() -> bool:
    return any(getattr(f, "__module__", "").startswith("__editable__") for f in sys.meta_path)


PROBE = """
import sys, mlflow_tunix, mlflow_tunix.projects as p
print(mlflow_tunix.__file__)
print(p.directory())
print(any(getattr(f, "__module__", "").startswith("__editable__") for f in sys.meta_path))
"""


def test_wheel_install_runs_the_default_project_from_an_empty_folder(venv, tracking_uri, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _user_env(venv, tracking_uri)

    module_file, projects_dir, finder = _run([venv / "bin" / "python", "-c", PROBE], cwd=empty, env=env).stdout.split()
    assert Path(module_file).is_relative_to(venv) and Path(projects_dir).is_relative_to(venv), (module_file, projects_dir)
    assert (Path(projects_dir) / "addition" / "config.yaml").is_file()
    # The source tree's editable finder is there too (where this venv has one), and loses.
    assert finder == str(_editable_finder_active())

    proc = subprocess.run([venv / "bin" / "mlflow-tunix", "run", "--config", "addition", "--steps", "20", "--no-progress"],
                          cwd=empty, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "20"
    assert run.data.metrics["n_eval"] == 500  # the project's held-out set, read from the installed config
    assert [v.run_id for v in client.search_model_versions("name='tunix-addition'")] == [run.info.run_id]


def test_projects_command_lists_each_shipped_project_with_its_description(venv, tracking_uri, tmp_path):
    proc = _run([venv / "bin" / "mlflow-tunix", "projects"], cwd=tmp_path, env=_user_env(venv, tracking_uri))
    lines = proc.stdout.splitlines()
    shipped = sorted(p.parent.name for p in (REPO / "projects").glob("*/config.yaml"))
    assert "addition" in shipped
    listed = {line.split()[0]: line.split(None, 1)[1] for line in lines[:len(shipped)]}
    assert sorted(listed) == shipped
    for name in shipped:  # each description as a YAML parser reads it
        assert listed[name] == yaml.safe_load((REPO / "projects" / name / "config.yaml").read_text())["description"]
    assert listed["addition"].startswith("Addition of 1-4-digit numbers")
    assert lines[-1].startswith("(config files in ") and str(venv) in lines[-1]
