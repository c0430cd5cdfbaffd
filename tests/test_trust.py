"""Trust: a model directory runs no code unasked, and what a model directory or the registry holds is
checked before it is used. Each test does what an attacker with write access to a model directory (or
to a version's tags) would do, and asserts the refusal: one line naming the problem, nothing run.

One tiny model for the module; forged copies of it per test.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from mlflow.models import Model

from mlflow_tunix import flavor
from mlflow_tunix.errors import ModelLoadError
from mlflow_tunix.generate import GenerationConfig

from conftest import REPO, cli_env, tiny_model_and_tokenizer

GENERATION = GenerationConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_model_and_tokenizer()
    return flavor.TunixModel(model, tokenizer, GENERATION)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("trust") / "model"
    flavor.save_model(tiny, path)
    return path


def copy_of(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def forge(model_dir: Path, edit_mlmodel=None) -> None:
    """What an attacker with write access does after an edit: regenerate the manifest and the hash in MLmodel."""
    mlmodel = Model.load(str(model_dir / "MLmodel"))
    if edit_mlmodel:
        edit_mlmodel(mlmodel.flavors)
    (model_dir / "tunix" / "manifest.json").unlink()
    mlmodel.flavors["mlflow_tunix"].pop("manifest_sha256", None)
    mlmodel.flavors["mlflow_tunix"]["manifest_sha256"] = flavor._write_manifest(model_dir, mlmodel.flavors)
    mlmodel.save(str(model_dir / "MLmodel"))


def snapshot(model_dir: Path) -> dict:
    return {p.relative_to(model_dir).as_posix(): p.read_bytes() for p in sorted(model_dir.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Code in the model directory


def with_payload(model_dir: Path, marker: Path) -> None:
    """`code: code` in MLmodel and a `code/safetensors/__init__.py` that shadows safetensors, imported by
    the load after MLflow has put `code/` on sys.path. The manifest is regenerated to include it."""
    payload = model_dir / "code" / "safetensors"
    payload.mkdir(parents=True)
    (payload / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('payload ran')\n")

    def add_code(flavors):
        flavors["python_function"]["code"] = "code"
        flavors["mlflow_tunix"]["code"] = "code"

    forge(model_dir, add_code)


LOAD_BOTH = textwrap.dedent("""
    import sys, mlflow, mlflow_tunix
    from mlflow_tunix.errors import ModelLoadError
    for load in (mlflow_tunix.load_model, mlflow.pyfunc.load_model):
        try:
            load(sys.argv[1])
            print("loaded")
        except ModelLoadError as exc:
            print("refused:", exc)
    print("safetensors imported:", "safetensors" in sys.modules)
""")


def load_in_fresh_process(model_dir: Path, **env) -> subprocess.CompletedProcess:
    # A fresh interpreter: safetensors is not imported yet, so a shadowing payload would run.
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TUNIX_ALLOW_MODEL_CODE"}
    full_env.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-c", LOAD_BOTH, str(model_dir)], env=full_env, capture_output=True, text=True)


def test_code_in_the_model_never_runs_unless_allowed(saved, tmp_path):
    model_dir, marker = copy_of(saved, tmp_path), tmp_path / "marker"
    with_payload(model_dir, marker)
    before = snapshot(model_dir)

    out = load_in_fresh_process(model_dir)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused:") and "ships code ('code', from code_paths)" in lines[0], out.stdout + out.stderr
    assert lines[1].startswith("refused:") and "ships code" in lines[1], out.stdout + out.stderr
    assert "allow_code=True" in lines[0] and "MLFLOW_TUNIX_ALLOW_MODEL_CODE=1" in lines[0]
    assert not marker.exists()
    assert snapshot(model_dir) == before

    # The same directory with the opt-in: the payload is real, and does run.
    out = load_in_fresh_process(model_dir, MLFLOW_TUNIX_ALLOW_MODEL_CODE="1")
    assert marker.read_text() == "payload ran", out.stdout + out.stderr


def test_cli_evaluate_refuses_a_model_with_code(saved, tmp_path, tracking_uri):
    model_dir, marker = copy_of(saved, tmp_path), tmp_path / "marker"
    with_payload(model_dir, marker)
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1+2?", "completion": "<answer>3</answer>"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "mlflow_tunix.cli", "evaluate", "--model-uri", str(model_dir),
                          "--eval-data", str(data), "--no-progress"],
                         env=cli_env(tracking_uri), capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and "ships code" in out.stderr
    assert not marker.exists()


def test_a_foreign_loader_module_is_refused(saved, tmp_path):
    model_dir = copy_of(saved, tmp_path)
    forge(model_dir, lambda f: f["python_function"].update(loader_module="evil_loader"))
    with pytest.raises(ModelLoadError, match="loader_module is 'evil_loader', not mlflow_tunix.flavor"):
        flavor.load_model(model_dir)


@pytest.mark.parametrize("where", ["root", "tunix"])
def test_an_unlisted_file_anywhere_is_refused(saved, tmp_path, where):
    model_dir = copy_of(saved, tmp_path)
    extra = (model_dir if where == "root" else model_dir / "tunix") / "extra.py"
    extra.write_text("print('hi')\n")
    with pytest.raises(ModelLoadError, match=r"extra\.py: not listed in manifest\.json"):
        flavor.load_model(model_dir)
    with pytest.raises(ModelLoadError, match=r"extra\.py: not listed in manifest\.json"):
        mlflow.pyfunc.load_model(str(model_dir))


def test_symlinks_are_refused(saved, tmp_path):
    model_dir = copy_of(saved, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.pkl").write_bytes(b"not scanned through the link")
    (model_dir / "tunix" / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelLoadError, match=r"tunix/linked: a symbolic link"):
        flavor.load_model(model_dir)


@pytest.mark.parametrize("data", ["../elsewhere", "/etc", "tunix/../../x"])
def test_mlmodel_data_paths_stay_inside(saved, tmp_path, data):
    model_dir = copy_of(saved, tmp_path)
    forge(model_dir, lambda f: f["python_function"].update(data=data))
    with pytest.raises(ModelLoadError, match="python_function.data: .* points outside the model directory"):
        flavor.load_model(model_dir)


def test_an_edited_mlmodel_is_refused(saved, tmp_path):
    model_dir = copy_of(saved, tmp_path)
    mlmodel = model_dir / "MLmodel"
    mlmodel.write_text(mlmodel.read_text().replace("model_family: llama", "model_family: other"))
    with pytest.raises(ModelLoadError, match="flavor sections differ from the ones .*manifest.json records"):
        flavor.load_model(model_dir)


@pytest.mark.parametrize("content", [b"{}", b'{"files": {}}', b"[" * 100_000 + b"]" * 100_000,
                                     b'{"files": {"a": 1}, "files": {}}'])
def test_empty_nested_or_duplicate_key_manifests_are_one_line_errors(saved, tmp_path, content):
    model_dir = copy_of(saved, tmp_path)
    manifest = model_dir / "tunix" / "manifest.json"
    manifest.write_bytes(content)
    import hashlib

    mlmodel = model_dir / "MLmodel"
    conf = Model.load(str(mlmodel))
    conf.flavors["mlflow_tunix"]["manifest_sha256"] = hashlib.sha256(content).hexdigest()
    conf.save(str(mlmodel))
    with pytest.raises(ModelLoadError, match=r"manifest\.json: (lists no files|unreadable manifest|not valid JSON)") as err:
        flavor.load_model(model_dir)
    assert len(str(err.value)) < 400


# --------------------------------------------------------------------------------------------
# The registry's params_sha256: a file changed after registration


def test_weights_changed_after_registration_are_refused(tiny, tracking_uri, tmp_path):
    from mlflow_tunix import registry
    from mlflow_tunix.model import params_sha256

    mlflow.set_experiment("trust")
    with mlflow.start_run() as run:
        info = flavor.log_model(tiny, name="m")
    registry.register("trusted", info.model_uri, run_id=run.info.run_id, metrics={"answer_accuracy": 0.5},
                      eval_digest="e", eval_dataset="eval", train_digest="t",
                      params_sha256=params_sha256(tiny.module), project="tiny")
    assert flavor.load_model("models:/trusted/1").generate(["What is 1+2?"])  # honest: loads

    # Swap the weights in the artifact store and regenerate the manifest, as an attacker with write access would.
    location = Path(mlflow.MlflowClient().get_logged_model(info.model_id).artifact_location.replace("file://", ""))
    weights = location / "tunix" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    forge(location)

    flavor.load_model(str(location))  # the directory alone is consistent: integrity is not authenticity
    mlflow.MlflowClient().set_registered_model_alias("trusted", "champion", "1")
    for uri in ("models:/trusted/1", "models:/trusted@champion"):
        for load in (flavor.load_model, mlflow.pyfunc.load_model):
            with pytest.raises(ModelLoadError, match=r"models:/trusted/1: the weights' sha256 \w+\.\.\. differs "
                                                     r"from the version's params_sha256 tag \w+\.\.\."):
                load(uri)
