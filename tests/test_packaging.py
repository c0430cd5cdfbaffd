"""The promises the repository makes about itself: README commands, CI, dependency lists, layout."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import yaml

from conftest import REPO


def _readme_commands():
    return re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_opens_with_the_two_set_up_and_go_commands():
    first, second = _readme_commands()[:2]
    assert first.strip().endswith("pip install -e . && mlflow run . --env-manager local")
    assert second.strip().endswith("pip install -e '.[dev]' && python -m pytest -q")


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    ci = (REPO / ".ci" / "run").read_text()
    test_command = _readme_commands()[1].split("&&")[-1].strip()
    assert "python3 -m venv" in ci and "pip install --quiet -e '.[dev]'" in ci
    assert ci.strip().splitlines()[-1].strip() == test_command


def test_conda_env_lists_the_same_dependencies_as_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(d for d in pip_deps if d != "-e .") == sorted(deps)
    assert "mlflow>=3.17,<3.18" in deps


STAGES = ["data", "tokenizer", "model", "hf", "train", "generate", "evaluate", "flavor", "registry"]


def test_a_stage_never_imports_a_later_one():
    for i, stage in enumerate(STAGES):
        tree = ast.parse((REPO / "mlflow_tunix" / f"{stage}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlflow_tunix"):
                imported.add(node.module.split(".")[1] if "." in node.module else node.names[0].name)
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mlflow_tunix.")}
        later = imported & set(STAGES[i + 1:])
        assert not later, f"{stage}.py imports later stage(s) {sorted(later)}"


def test_every_project_config_loads():
    from mlflow_tunix.config import load_project, project_names

    names = project_names()
    assert {"addition", "addition-direct", "golden-v2", "high-card", "dev-reasoning"} <= set(names)
    for name in names:
        cfg = load_project(name, train_data=str(REPO / "README.md") if name == "dev-reasoning" else None)
        assert cfg.name == name


def test_no_run_output_is_tracked():
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert not [p for p in tracked if p.startswith(("mlruns/", "mlartifacts/")) or p.endswith((".db", ".pkl"))]


def test_ci_runs_the_tunix_tests_in_a_second_venv_where_they_may_not_skip():
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install --quiet -e '.[dev,tunix]'" in ci
    assert "MLFLOW_TUNIX_REQUIRE_TUNIX_TESTS=1" in ci and "tests/test_tunix.py" in ci
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("google-tunix") for d in extras["tunix"])


FAULTS_PER_CALL = r"""
import json, resource
import jax, jax.numpy as jnp
x, w = jnp.linspace(0.0, 1.0, 4096), jnp.ones((4096, 64))
f = jax.jit(lambda x: jnp.sin(x[:, None] * x[None, :]) @ w @ w.T[:, :8])  # a 64 MB temporary per call
for _ in range(3):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5))
"""


def test_the_program_reruns_itself_with_a_malloc_that_keeps_xla_buffers():
    """cli.entry re-executes `mlflow-tunix` once with glibc tunables under which XLA's per-call
    temporaries are reused instead of mapped and faulted in afresh each step (36 k page faults per
    step of the default project otherwise); opt out with MLFLOW_TUNIX_MALLOC=0; a user's own
    glibc.malloc tunables are kept."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from mlflow_tunix import cli

    assert cli.malloc_environment({"MLFLOW_TUNIX_MALLOC": "0"}) is None
    assert cli.malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's own
    env = cli.malloc_environment({"GLIBC_TUNABLES": "glibc.rtld.nns=2", "A": "b"})
    if env is not None:  # Linux with glibc >= 2.35 (the CI machines here)
        ours = env["GLIBC_TUNABLES"].removeprefix("glibc.rtld.nns=2:")
        assert env == {"GLIBC_TUNABLES": f"glibc.rtld.nns=2:{ours}", "A": "b"}
        assert ours.startswith(cli.MALLOC_TUNABLES[0]) and cli.malloc_environment({})["GLIBC_TUNABLES"] == ours
        # what it is for: a jitted call's big temporary costs page faults on every call with glibc's
        # defaults (~17 k here), next to none with ours (~20)
        faults = {}
        for name, tunables in (("default", ""), ("ours", ours)):
            run_env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            run_env |= {"GLIBC_TUNABLES": tunables} if tunables else {}
            out = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL], env=run_env, capture_output=True,
                                 text=True, check=True).stdout
            faults[name] = json.loads(out.strip().splitlines()[-1])
        assert faults["default"] > 5000 and faults["ours"] < 200, faults
    # the re-run keeps the program's name (and so its usage lines) both ways it is started
    script = shutil.which("mlflow-tunix", path=str(Path(sys.executable).parent))
    out = subprocess.run([script, "run", "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("Usage: mlflow-tunix run [OPTIONS]")
    out = subprocess.run([sys.executable, "-m", "mlflow_tunix.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("Usage: python -m mlflow_tunix.cli [OPTIONS] COMMAND")
