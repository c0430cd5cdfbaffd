"""LoRA models saved as adapters + a reference to their base (``train.lora.save: adapters``,
``save_model(..., adapters=, base=)``): they load, serve and generate exactly as the merged save does,
and a base that moved or changed is refused in one line."""

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import yaml
from mlflow import MlflowClient

from mlflow_tunix import flavor
from mlflow_tunix.errors import ConfigError, ModelLoadError
from mlflow_tunix.generate import GenerationConfig
from mlflow_tunix.hf import load_checkpoint
from mlflow_tunix.lora import LoraConfig
from mlflow_tunix.model import flat_params, params_sha256
from mlflow_tunix.train import TokenizedData, TrainConfig, train

from conftest import REPO, assert_same_weights, model_server_process

FIXTURE = REPO / "tests" / "fixtures" / "hf" / "llama"
PROJECT = REPO / "tests" / "projects" / "tiny-init" / "config.yaml"
PROMPTS = ["What is 12 + 7?", "What is 3 + 45?", "9 + 9 = ?"]
GENERATION = GenerationConfig(max_new_tokens=12, prompt_template="plain")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A copy of the Llama fixture folder (the base), and a LoRA run on it: (folder, checkpoint, result)."""
    base = tmp_path_factory.mktemp("base") / "llama"
    shutil.copytree(FIXTURE, base)
    ckpt = load_checkpoint(base)
    rng = np.random.RandomState(0)
    data = TokenizedData(rng.randint(0, 128, (64, 24)).astype(np.int32), np.ones((64, 24), np.float32))
    config = TrainConfig(steps=15, batch_size=16, learning_rate=3e-2, warmup_steps=1, checkpoint_every=0,
                         lora=LoraConfig(rank=8, alpha=16))
    return base, ckpt, train(ckpt.model, data, config, progress=False)


def _cli(args):
    """The real CLI in this process (click's runner): no second interpreter and jax import."""
    from click.testing import CliRunner

    from mlflow_tunix.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _save_both(tmp_path, ckpt, result, base):
    merged, adapters = tmp_path / "merged", tmp_path / "adapters"
    flavor.save_model(result.model, merged, tokenizer=ckpt.tokenizer, generation_config=GENERATION)
    flavor.save_model(result.model, adapters, tokenizer=ckpt.tokenizer, generation_config=GENERATION,
                      adapters=result.adapters, base=str(base))
    return merged, adapters


def test_the_adapters_form_loads_and_generates_exactly_what_the_merged_form_does(lora_run, tmp_path):
    base, ckpt, result = lora_run
    merged_dir, adapters_dir = _save_both(tmp_path, ckpt, result, base)

    assert not (adapters_dir / "tunix" / "model.safetensors").exists()
    section = yaml.safe_load((adapters_dir / "MLmodel").read_text())["flavors"]["mlflow_tunix"]
    assert section["format_version"] == flavor.ADAPTERS_FORMAT_VERSION
    assert section["lora"]["base"] == {"uri": str(base.resolve()), "kind": "hf", "dtype": "float32",
                                       "params_sha256": params_sha256(ckpt.model)}
    assert (section["lora"]["rank"], section["lora"]["adapter_param_count"]) == (8, result.trained_params)
    assert (adapters_dir / "tunix" / "adapters.safetensors").stat().st_size < (
        merged_dir / "tunix" / "model.safetensors").stat().st_size

    from_merged, from_adapters = flavor.load_model(merged_dir), flavor.load_model(adapters_dir)
    assert_same_weights(flat_params(from_merged.module), flat_params(from_adapters.module))
    assert flat_params(from_adapters.module)["blocks.0.attn.wq"].tobytes() != flat_params(ckpt.model)["blocks.0.attn.wq"].tobytes()
    expected = [r["completion"] for r in from_merged.generate(PROMPTS)]
    assert [r["completion"] for r in from_adapters.generate(PROMPTS)] == expected
    # The pyfunc (what mlflow models serve runs) resolves the base the same way.
    served = mlflow.pyfunc.load_model(str(adapters_dir)).predict(PROMPTS)
    assert served["completion"].tolist() == expected


def test_a_moved_or_different_base_is_refused_in_one_line(lora_run, tmp_path):
    base, ckpt, result = lora_run
    _, adapters_dir = _save_both(tmp_path, ckpt, result, base)
    moved = tmp_path / "moved"
    shutil.move(base, moved)
    try:
        with pytest.raises(ModelLoadError, match=r"its LoRA base, the Hugging Face folder .*llama, is missing; put "
                                                 r"that folder back or pass its new place as base="):
            flavor.load_model(adapters_dir)
        # base= names the new place; the digest still decides.
        assert_same_weights(flat_params(flavor.load_model(adapters_dir, base=moved).module), flat_params(result.model))

        other = tmp_path / "other"
        shutil.copytree(moved, other)
        import safetensors.numpy

        tensors = safetensors.numpy.load_file(str(other / "model.safetensors"))
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
        safetensors.numpy.save_file(tensors, str(other / "model.safetensors"))
        with pytest.raises(ModelLoadError, match=r"the LoRA base .*other has weights sha256 [0-9a-f]{12}\.\.\., not the "
                                                 r"[0-9a-f]{12}\.\.\. the adapters were trained on"):
            flavor.load_model(adapters_dir, base=other)
    finally:
        shutil.move(moved, base)

    # Saving checks base + adapters gives the model: the untrained base with these adapters does not.
    with pytest.raises(ConfigError, match=r"adapters: on the base .* they do not give this model's weights"):
        flavor.save_model(ckpt.model, tmp_path / "wrong", tokenizer=ckpt.tokenizer, adapters=result.adapters, base=str(base))
    with pytest.raises(TypeError, match="adapters= and base= together"):
        flavor.save_model(result.model, tmp_path / "half", tokenizer=ckpt.tokenizer, adapters=result.adapters)
    # An edited lora section (another base recorded) is caught by the manifest like any other edit.
    mlmodel = adapters_dir / "MLmodel"
    mlmodel.write_text(mlmodel.read_text().replace(str(base.resolve()), str(tmp_path / "other")))
    with pytest.raises(ModelLoadError, match="MLmodel was edited"):
        flavor.load_model(adapters_dir)


def test_an_mlflow_model_base_is_pinned_to_its_version_and_may_not_be_adapters(tracking_uri, lora_run, tmp_path):
    _, ckpt, result = lora_run
    flavor.log_model(ckpt.model, name="base", tokenizer=ckpt.tokenizer, registered_model_name="base")
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias("base", "champion", "1")
    adapters_dir = tmp_path / "adapters"
    flavor.save_model(result.model, adapters_dir, tokenizer=ckpt.tokenizer, generation_config=GENERATION,
                      adapters=result.adapters, base="models:/base@champion")
    recorded = yaml.safe_load((adapters_dir / "MLmodel").read_text())["flavors"]["mlflow_tunix"]["lora"]["base"]
    assert (recorded["kind"], recorded["uri"]) == ("mlflow", "models:/base/1")  # an alias moves; a version does not
    assert_same_weights(flat_params(flavor.load_model(adapters_dir).module), flat_params(result.model))

    # A base must hold its weights: an adapters model is refused as a base (no chains, no cycles).
    flavor.log_model(result.model, name="ad", tokenizer=ckpt.tokenizer, registered_model_name="ad",
                     adapters=result.adapters, base="models:/base/1")
    with pytest.raises(ModelLoadError, match=r"its LoRA base models:/ad/1 is itself saved as adapters"):
        flavor.save_model(result.model, tmp_path / "chained", tokenizer=ckpt.tokenizer,
                          adapters=result.adapters, base="models:/ad/1")
    with pytest.raises(ModelLoadError, match=r"its LoRA base models:/nope/1 cannot be found"):
        flavor.load_model(adapters_dir, base="models:/nope/1")


def test_a_lora_run_with_save_adapters_logs_registers_and_serves(tracking_uri, tmp_path, lora_run):
    base = lora_run[0]
    proc = _cli(["run", "--config", PROJECT, "--init-from", base, "--steps", "20", "--no-progress",
                 "--set", "train.lora={rank: 8, alpha: 16, save: adapters}", "--registered-model-name", "ft"])
    assert proc.exit_code == 0, proc.output[-3000:]
    client = MlflowClient(tracking_uri)
    (version,) = client.search_model_versions("name='ft'")
    uri = f"models:/ft/{version.version}"
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    assert sorted(p.name for p in (local / "tunix").iterdir()) == [
        "adapters.safetensors", "config.json", "generation.json", "manifest.json", "tokenizer"]
    # The registry's params_sha256 tag (the merged weights) matches what the load rebuilds.
    logged = flavor.load_model(uri)
    assert params_sha256(logged.module) == version.tags["params_sha256"]
    expected = logged.generate(["What is 12 + 7?"])[0]["completion"]

    with model_server_process(uri, tracking_uri, tmp_path) as url:
        reply = requests.post(f"{url}/invocations", json={"inputs": ["What is 12 + 7?"]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"][0]["completion"] == expected

    # Without its base, the CLI says so in one line.
    hidden = tmp_path / "hidden"
    shutil.move(base, hidden)
    try:
        proc = _cli(["export", uri, "--out", tmp_path / "hf-out"])
    finally:
        shutil.move(hidden, base)
    assert proc.exit_code == 2
    (line,) = [line for line in proc.output.splitlines() if line.strip()]
    assert line.startswith("error: ") and "its LoRA base, the Hugging Face folder" in line, proc.output


def test_save_adapters_needs_a_checkpoint_to_refer_to():
    from mlflow_tunix.config import load_project

    with pytest.raises(ConfigError, match=r"train.lora.save: 'adapters' .*set model.init_from"):
        load_project(str(REPO / "tests" / "projects" / "tiny" / "config.yaml"),
                     {"train.lora": {"save": "adapters"}})
    with pytest.raises(ConfigError, match=r"train.lora.save: must be one of merged, adapters, got 'both'"):
        load_project(str(PROJECT), {"train.lora": {"save": "both"}})
