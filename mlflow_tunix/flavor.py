"""The ``mlflow_tunix`` MLflow flavor: save, log and load Flax NNX reasoning models, pickle-free.

Laid out like MLflow's built-in flavors (``mlflow.pytorch``, ``mlflow.onnx``)::

    import mlflow
    import mlflow_tunix

    with mlflow.start_run():
        info = mlflow_tunix.log_model(model, name="adder", tokenizer=tokenizer, registered_model_name="adder")
    tunix_model = mlflow_tunix.load_model(info.model_uri)     # a TunixModel
    tunix_model.generate(["What is 2+3?"])                     # [{completion, answer, reasoning}]
    pyfunc_model = mlflow.pyfunc.load_model(info.model_uri)    # also: mlflow models serve -m ...
    pyfunc_model.predict({"prompt": ["What is 2+3?"]}, params={"max_new_tokens": 32})

What a saved model holds (the MLflow model directory)::

    MLmodel, requirements.txt, conda.yaml, python_env.yaml   MLflow's own files
    tunix/model.safetensors      the weights, one tensor per dotted parameter name
    tunix/config.json            the ModelConfig
    tunix/generation.json        the GenerationConfig: the defaults of every prediction
    tunix/tokenizer/             tokenizer.save_pretrained (JSON files)
    tunix/manifest.json          sha256 and size of every file above, checked on load

Nothing is pickled, so loading a model never executes code stored in it: weights are safetensors,
everything else is JSON. A file that is missing, truncated, altered or unexpected makes the load
fail with :class:`~mlflow_tunix.errors.ModelLoadError` naming the file. A save is written to a temporary
directory next to ``path`` and renamed into place, so a failed save leaves no partial model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import flax
import jax
import numpy as np
import pandas as pd
import yaml

from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelInputExample, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _mlflow_conda_env,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import get_total_file_size, write_to
from mlflow.utils.model_utils import _add_code_from_conf_to_system_path, _validate_and_copy_code_paths
from mlflow.utils.requirements_utils import _get_pinned_requirement

from mlflow_tunix.data import parse_answer, parse_reasoning, render_prompt
from mlflow_tunix.errors import ConfigError, InputError, ModelLoadError
from mlflow_tunix.generate import GenerationConfig, generate_text, request_error
from mlflow_tunix.model import ModelConfig, Transformer, build_model, flat_params, param_count
from mlflow_tunix.tokenizer import load_tokenizer

FLAVOR_NAME = "mlflow_tunix"
FORMAT_VERSION = 1  # bump when the files under DATA_PATH change meaning; load refuses newer ones
DATA_PATH = "tunix"  # the flavor's sub-directory inside the MLflow model directory
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation.json"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FILE = "manifest.json"

# The prediction options a request may set (the signature's ParamSchema), and their MLflow types.
REQUEST_PARAMS = {"max_new_tokens": "long", "temperature": "double", "top_k": "long", "seed": "long"}
# One request may not ask for more than this many generations: a server answers within a bounded
# time and memory; bigger jobs belong in batch scoring, split into requests.
MAX_PROMPTS_PER_REQUEST = 256
OUTPUT_COLUMNS = ("completion", "answer", "reasoning")

# Family names models were saved with before the families were named after Hugging Face's
# (mlflow-tunix 0.1 saved the Llama architecture as "tunix-gpt").
_RENAMED_FAMILIES = {"tunix-gpt": "llama"}

# Keyword arguments that mlflow.models.Model.log may forward to save_model and that we ignore.
_MLFLOW_PASSTHROUGH_KWARGS = {"validate_serving_input", "uv_project_path", "serialization_format"}

_logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Requirements


def _own_requirement() -> str:
    """``mlflow-tunix==<version>``: MLflow does not add a flavor's own package by itself."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"mlflow-tunix=={version('mlflow-tunix')}"
    except PackageNotFoundError:  # a source checkout on PYTHONPATH: fall back to the module's version
        import mlflow_tunix

        own_version = getattr(mlflow_tunix, "__version__", None)
        return f"mlflow-tunix=={own_version}" if own_version else "mlflow-tunix"


def get_default_pip_requirements() -> list[str]:
    """
    Returns:
        The pip requirements of a model saved by this flavor: ``mlflow-tunix`` itself and the
        installed versions of jax, flax, optax, safetensors, tokenizers and transformers, pinned.
        :func:`save_model` and :func:`log_model` write at least these.
    """
    pinned = ["jax", "flax", "optax", "safetensors", "tokenizers", "transformers"]
    return [_own_requirement(), *(_get_pinned_requirement(name) for name in pinned)]


def get_default_conda_env():
    """
    Returns:
        The default Conda environment for models saved by this flavor.
    """
    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


# --------------------------------------------------------------------------------------------
# The loaded model


@dataclass
class TunixModel:
    """A loaded model: the NNX module, its tokenizer and its generation defaults.

    ``generate`` applies the prompt template itself, so it takes the raw questions.
    """

    module: Transformer
    tokenizer: Any
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)

    @property
    def config(self) -> ModelConfig:
        return self.module.config

    def generate(self, prompts: Sequence[str], **overrides) -> list[dict]:
        """One ``{"completion", "answer", "reasoning"}`` dict per prompt.

        Args:
            prompts: The raw questions (a single string is taken as one prompt).
            overrides: Any :class:`~mlflow_tunix.generate.GenerationConfig` field for this call
                only, e.g. ``max_new_tokens=32, temperature=0.7, seed=1``. Out-of-range values
                raise :class:`~mlflow_tunix.errors.InputError`.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        config = _generation_with(self.generation, overrides, self.config.max_seq_len)
        texts = generate_text(
            self.module, self.tokenizer, [render_prompt(p, config.prompt_template, self.tokenizer) for p in prompts], config
        )
        return [{"completion": t, "answer": parse_answer(t), "reasoning": parse_reasoning(t)} for t in texts]


def _as_int(name: str, value) -> int:
    # Accept 16, np.int64(16) and 16.0 (JSON clients send numbers loosely), refuse 16.5 and "16".
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise InputError(f"{name} must be an integer, got {value!r}")


def _generation_with(base: GenerationConfig, overrides: dict, max_seq_len: int) -> GenerationConfig:
    """``base`` with ``overrides`` applied: JSON values coerced here, checked by GenerationConfig
    itself, and max_new_tokens against this model's context (InputError names the bad one)."""
    known = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InputError(f"unknown generation option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    values = {**dataclasses.asdict(base), **{k: v for k, v in overrides.items() if v is not None}}
    for name in ("max_new_tokens", "top_k", "seed", "batch_size"):
        values[name] = _as_int(name, values[name])
    temperature = values["temperature"]
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, (int, float, np.number)):
        raise InputError(f"temperature must be a number, got {temperature!r}")
    values["temperature"] = float(temperature)
    if not 1 <= values["max_new_tokens"] < max_seq_len:
        raise InputError(
            f"max_new_tokens must be between 1 and {max_seq_len - 1} (the model's context is "
            f"{max_seq_len} tokens, prompt included), got {values['max_new_tokens']}"
        )
    try:
        return GenerationConfig(**values)
    except ConfigError as exc:
        raise request_error(exc) from None


# --------------------------------------------------------------------------------------------
# Saving


def _default_signature(generation: GenerationConfig) -> ModelSignature:
    """Prompts in (one string column, so a string, a list or a ``prompt`` column all fit), the
    three text columns out, and the request options with the model's own defaults."""
    params = ParamSchema([ParamSpec(name, kind, getattr(generation, name)) for name, kind in REQUEST_PARAMS.items()])
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema(
            [
                ColSpec("string", "completion"),
                ColSpec("string", "answer", required=False),  # None when no closed <answer> tag
                ColSpec("string", "reasoning", required=False),
            ]
        ),
        params=params,
    )


def _parts(model, tokenizer, generation_config) -> tuple[Transformer, Any, GenerationConfig]:
    """The module, tokenizer and generation defaults to save, from save_model's arguments."""
    if isinstance(model, TunixModel):
        return model.module, tokenizer or model.tokenizer, generation_config or model.generation
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a mlflow_tunix Transformer or TunixModel, got {type(model).__name__}")
    if tokenizer is None:
        raise TypeError("save_model() needs tokenizer= when model is a Transformer (the model cannot generate without it)")
    if generation_config is None:
        # GenerationConfig's 64 new tokens would fill a small model's whole context: leave at
        # least half of it for the prompt.
        default = GenerationConfig()
        generation_config = dataclasses.replace(
            default, max_new_tokens=min(default.max_new_tokens, model.config.max_seq_len // 2)
        )
    return model, tokenizer, generation_config


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_under(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_data_dir(data_dir: Path, module: Transformer, tokenizer, generation: GenerationConfig) -> str:
    """Write weights, configs, tokenizer and manifest; return the manifest's sha256."""
    import safetensors.numpy

    data_dir.mkdir()
    weights = {name: np.ascontiguousarray(array) for name, array in flat_params(module).items()}
    safetensors.numpy.save_file(weights, str(data_dir / WEIGHTS_FILE), metadata={"format": "np"})
    _write_json(data_dir / CONFIG_FILE, dataclasses.asdict(module.config))
    _write_json(data_dir / GENERATION_FILE, dataclasses.asdict(generation))
    tokenizer.save_pretrained(str(data_dir / TOKENIZER_DIR))

    files = {
        name: {"sha256": _sha256(data_dir / name), "bytes": (data_dir / name).stat().st_size}
        for name in _files_under(data_dir)
    }
    _write_json(data_dir / MANIFEST_FILE, {"format_version": FORMAT_VERSION, "files": files})
    return _sha256(data_dir / MANIFEST_FILE)


def save_model(
    model,
    path,
    *,
    tokenizer=None,
    generation_config: GenerationConfig | None = None,
    conda_env=None,
    code_paths: list[str] | None = None,
    mlflow_model: Model | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    **kwargs,
) -> None:
    """
    Save a model to a path on the local file system, as an MLflow model with this flavor and
    the ``python_function`` flavor.

    Args:
        model: A :class:`~mlflow_tunix.model.Transformer`, or a :class:`TunixModel` as returned
            by :func:`load_model` (its tokenizer and generation defaults are then the defaults).
        path: Local path where the model is saved. It must not exist, or be an empty directory.
        tokenizer: The model's tokenizer (a transformers ``PreTrainedTokenizerFast``). Required
            when ``model`` is a Transformer.
        generation_config: The :class:`~mlflow_tunix.generate.GenerationConfig` every prediction
            starts from (and the defaults of the signature's parameters). Default:
            ``GenerationConfig()`` with ``max_new_tokens`` at most half the model's context.
        conda_env: A Conda environment (dict or path to a YAML file). Default: the
            ``pip_requirements`` below in a Conda environment.
        code_paths: Local files or directories copied into the model and put on ``sys.path``
            when it is loaded.
        mlflow_model: The :class:`mlflow.models.Model` this flavor is added to (``log_model``
            passes its own).
        signature: A :class:`mlflow.models.ModelSignature`. Default: one string input column,
            ``completion``/``answer``/``reasoning`` output columns, and the parameters
            ``max_new_tokens``, ``temperature``, ``top_k``, ``seed`` with the generation
            defaults. ``False`` saves no signature.
        input_example: An example request, e.g. ``{"prompt": ["What is 2+3?"]}``.
        pip_requirements: Replaces the default pip requirements
            (:func:`get_default_pip_requirements`).
        extra_pip_requirements: Added to the default pip requirements.
        metadata: A dict stored in the MLmodel file.
        kwargs: Accepted for ``mlflow.models.Model.log``; unknown names are logged and ignored.
    """
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    module, tokenizer, generation = _parts(model, tokenizer, generation_config)
    try:  # refuse to save defaults that no request could use
        _generation_with(generation, {}, module.config.max_seq_len)
    except InputError as exc:
        raise ConfigError(f"generation_config: {exc}") from exc
    if len(tokenizer) > module.config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is {module.config.vocab_size}"
        )
    unknown = sorted(set(kwargs) - _MLFLOW_PASSTHROUGH_KWARGS)
    if unknown:
        _logger.warning("mlflow_tunix.save_model ignores unknown arguments: %s", ", ".join(unknown))

    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise MlflowException(f"Path '{path}' already exists and is not empty", error_code=RESOURCE_ALREADY_EXISTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written next to `path` (same file system, so the final rename is atomic) and
    # only renamed into place once complete.
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _save_into(
            staging, module, tokenizer, generation,
            conda_env=conda_env, code_paths=code_paths, mlflow_model=mlflow_model, signature=signature,
            input_example=input_example, pip_requirements=pip_requirements,
            extra_pip_requirements=extra_pip_requirements, metadata=metadata,
        )
        if path.exists():
            path.rmdir()  # the empty directory the caller prepared
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _save_into(root: Path, module, tokenizer, generation, *, conda_env, code_paths, mlflow_model, signature,
               input_example, pip_requirements, extra_pip_requirements, metadata) -> None:
    code_dir_subpath = _validate_and_copy_code_paths(code_paths, str(root))
    if mlflow_model is None:
        mlflow_model = Model()
    _save_example(mlflow_model, input_example, str(root))
    if signature is None:
        signature = _default_signature(generation)
    if signature is not False:
        mlflow_model.signature = signature
    if metadata is not None:
        mlflow_model.metadata = metadata

    manifest_sha256 = _write_data_dir(root / DATA_PATH, module, tokenizer, generation)

    pyfunc.add_to_model(
        mlflow_model,
        loader_module=__name__,
        data=DATA_PATH,
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
        code=code_dir_subpath,
    )
    mlflow_model.add_flavor(
        FLAVOR_NAME,
        mlflow_tunix_version=_own_requirement().partition("==")[2] or None,
        format_version=FORMAT_VERSION,
        data=DATA_PATH,
        model_family=module.config.family,
        model_config=dataclasses.asdict(module.config),
        param_count=param_count(module),
        jax_version=jax.__version__,
        flax_version=flax.__version__,
        manifest_sha256=manifest_sha256,
        code=code_dir_subpath,
    )
    if size := get_total_file_size(str(root)):
        mlflow_model.model_size_bytes = size
    mlflow_model.save(str(root / MLMODEL_FILE_NAME))

    if conda_env is None:
        default_reqs = get_default_pip_requirements() if pip_requirements is None else None
        conda_env, pip_requirements, pip_constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_requirements, pip_constraints = _process_conda_env(conda_env)
    with open(root / _CONDA_ENV_FILE_NAME, "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if pip_constraints:
        write_to(str(root / _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(str(root / _REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    _PythonEnv.current().to_yaml(str(root / _PYTHON_ENV_FILE_NAME))


def log_model(
    model,
    name: str | None = None,
    *,
    tokenizer=None,
    generation_config: GenerationConfig | None = None,
    registered_model_name: str | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    await_registration_for=DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    conda_env=None,
    code_paths: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    model_type: str | None = None,
    step: int = 0,
    model_id: str | None = None,
    **kwargs,
):
    """
    Log a model as an MLflow LoggedModel (``models:/m-...``) of the active run (one is started
    if none is active), and optionally register it.

    Args:
        model: A :class:`~mlflow_tunix.model.Transformer` or a :class:`TunixModel`.
        name: The model's name.
        tokenizer: The model's tokenizer; required when ``model`` is a Transformer.
        generation_config: The generation defaults (see :func:`save_model`).
        registered_model_name: If given, register the model as a new version of this
            registered model (created if it does not exist).
        signature: See :func:`save_model`.
        input_example: An example request, checked against the saved model when logged.
        await_registration_for: Seconds to wait for the model version to become ``READY``;
            0 or None to skip waiting.
        pip_requirements: See :func:`save_model`.
        extra_pip_requirements: See :func:`save_model`.
        conda_env: See :func:`save_model`.
        code_paths: See :func:`save_model`.
        metadata: A dict stored in the MLmodel file.
        params: Parameters recorded on the LoggedModel.
        tags: Tags set on the LoggedModel (and the model version, when registered).
        model_type: A free-form model type recorded on the LoggedModel.
        step: The training step the model corresponds to (links the run's metrics at that step).
        model_id: Log into this existing LoggedModel instead of creating one.
        kwargs: Passed on to :meth:`mlflow.models.Model.log`.

    Returns:
        A :class:`mlflow.models.model.ModelInfo`; ``model_uri`` is ``models:/<model_id>``.
    """
    return Model.log(
        artifact_path=None,
        name=name,
        flavor=sys.modules[__name__],
        model=model,
        tokenizer=tokenizer,
        generation_config=generation_config,
        registered_model_name=registered_model_name,
        signature=signature,
        input_example=input_example,
        await_registration_for=await_registration_for,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        conda_env=conda_env,
        code_paths=code_paths,
        metadata=metadata,
        params=params,
        tags=tags,
        model_type=model_type,
        step=step,
        model_id=model_id,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------
# Loading


def _flavor_conf(model_dir: Path) -> dict:
    mlmodel = model_dir / MLMODEL_FILE_NAME
    if not mlmodel.is_file():
        raise ModelLoadError(f"{mlmodel}: missing; this is not an MLflow model directory")
    flavors = Model.load(str(model_dir)).flavors
    if FLAVOR_NAME not in flavors:
        raise ModelLoadError(f"{mlmodel}: no {FLAVOR_NAME!r} flavor (this model has: {', '.join(flavors)})")
    return flavors[FLAVOR_NAME]


def _check_files(data_dir: Path, manifest_sha256: str | None) -> None:
    """Every file listed in the manifest is there, with its size and sha256; nothing else is."""
    manifest_path = data_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ModelLoadError(f"{manifest_path}: missing; the model is incomplete")
    if manifest_sha256 is not None and _sha256(manifest_path) != manifest_sha256:
        raise ModelLoadError(f"{manifest_path}: altered (its sha256 differs from the one in MLmodel)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
        listed = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{manifest_path}: unreadable manifest ({exc})") from exc

    for name, (size, sha256) in sorted(listed.items()):
        path = data_dir / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise ModelLoadError(f"{manifest_path}: entry {name!r} points outside the model directory")
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing; the model is incomplete")
        actual = path.stat().st_size
        if actual != size:
            raise ModelLoadError(f"{path}: truncated or altered ({actual} bytes, expected {size})")
        if _sha256(path) != sha256:
            raise ModelLoadError(f"{path}: altered (sha256 differs from {MANIFEST_FILE})")
    for name in _files_under(data_dir):
        if name != MANIFEST_FILE and name not in listed:
            raise ModelLoadError(f"{data_dir / name}: not listed in {MANIFEST_FILE}; refusing a model with unknown files")


def _read_dataclass(cls, path: Path):
    try:
        values = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if cls is ModelConfig and isinstance(values, dict) and values.get("family") in _RENAMED_FAMILIES:
        values["family"] = _RENAMED_FAMILIES[values["family"]]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ModelLoadError(f"{path}: unknown key {unknown[0]!r} (this mlflow-tunix knows: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def _load_from_data_dir(data_dir: Path, flavor_conf: dict) -> TunixModel:
    import safetensors.numpy

    saved_format = flavor_conf.get("format_version", FORMAT_VERSION)
    if not isinstance(saved_format, int) or saved_format > FORMAT_VERSION:
        raise ModelLoadError(
            f"{data_dir}: saved in format version {saved_format!r}, newer than this mlflow-tunix "
            f"reads ({FORMAT_VERSION}); upgrade mlflow-tunix"
        )
    _check_files(data_dir, flavor_conf.get("manifest_sha256"))

    config = _read_dataclass(ModelConfig, data_dir / CONFIG_FILE)
    generation = _read_dataclass(GenerationConfig, data_dir / GENERATION_FILE)
    try:
        weights = safetensors.numpy.load_file(str(data_dir / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own SafetensorError on a malformed header
        raise ModelLoadError(f"{data_dir / WEIGHTS_FILE}: unreadable safetensors file ({exc})") from exc
    try:
        module = build_model(config, params=weights)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{data_dir / WEIGHTS_FILE}: {exc}") from exc
    tokenizer = load_tokenizer(data_dir / TOKENIZER_DIR)
    return TunixModel(module=module, tokenizer=tokenizer, generation=generation)


def load_model(model_uri, dst_path=None) -> TunixModel:
    """
    Load a model saved or logged by this flavor.

    Args:
        model_uri: The location of the MLflow model, for example:

            - ``/Users/me/path/to/local/model``
            - ``runs:/<mlflow_run_id>/<name>``
            - ``models:/<model_id>`` (a LoggedModel, ``models:/m-...``)
            - ``models:/<registered_model_name>/<version>``
            - ``models:/<registered_model_name>@<alias>``

        dst_path: A local directory (it must exist) to download the model into. Default: a new
            temporary directory.

    Returns:
        A :class:`TunixModel`. A missing, truncated, altered or unexpected file raises
        :class:`~mlflow_tunix.errors.ModelLoadError` naming it.
    """
    try:
        local_path = Path(_download_artifact_from_uri(artifact_uri=str(model_uri), output_path=dst_path))
    except (MlflowException, OSError) as exc:  # an unknown run, model, version or alias; a missing path
        message = exc.message if isinstance(exc, MlflowException) else str(exc)
        raise ModelLoadError(f"{model_uri}: {message}") from None
    flavor_conf = _flavor_conf(local_path)
    _add_code_from_conf_to_system_path(str(local_path), flavor_conf)
    return _load_from_data_dir(local_path / flavor_conf.get("data", DATA_PATH), flavor_conf)


def _load_pyfunc(path):
    """
    Load the ``python_function`` implementation; called by ``mlflow.pyfunc.load_model``.

    Args:
        path: The flavor's data directory (``<model>/tunix``).
    """
    data_dir = Path(path)
    # pyfunc hands over only the data directory; the MLmodel next to it holds the manifest's hash.
    flavor_conf = _flavor_conf(data_dir.parent) if (data_dir.parent / MLMODEL_FILE_NAME).is_file() else {}
    return _TunixPyfuncModel(_load_from_data_dir(data_dir, flavor_conf))


# --------------------------------------------------------------------------------------------
# The pyfunc


class _InvalidRequest(InputError, MlflowException):
    """An InputError that MLflow's scoring server answers with HTTP 400 and this message.

    (The server turns an MlflowException into its error code's HTTP status, and any other
    exception into a 400 that hides the message.)
    """

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _prompts_from(data) -> list[str]:
    """The prompts in a pyfunc input: a DataFrame with a ``prompt`` column, a list of strings,
    a string, or ``{"prompt": str | [str]}``."""
    if isinstance(data, str):
        prompts = [data]
    elif isinstance(data, dict):
        if "prompt" not in data:
            raise InputError(f"the request has no 'prompt' key (got keys: {', '.join(map(str, data)) or 'none'})")
        value = data["prompt"]
        prompts = [value] if isinstance(value, str) else list(np.asarray(value, dtype=object).reshape(-1))
    elif isinstance(data, pd.DataFrame):
        if "prompt" in data.columns:
            prompts = data["prompt"].tolist()
        elif list(data.columns) == [0]:  # what MLflow makes of a plain string or list of strings
            prompts = data[0].tolist()
        else:
            raise InputError(
                f"the input has no 'prompt' column (got columns: {', '.join(map(str, data.columns)) or 'none'})"
            )
        # MLflow turns {"prompt": [a, b]} into ONE row whose cell is the list: unpack it.
        if prompts and all(isinstance(p, (list, tuple, np.ndarray)) for p in prompts):
            prompts = [q for p in prompts for q in np.asarray(p, dtype=object).reshape(-1)]
    elif isinstance(data, pd.Series):
        prompts = data.tolist()
    elif isinstance(data, (list, tuple, np.ndarray)):
        prompts = list(np.asarray(data, dtype=object).reshape(-1)) if isinstance(data, np.ndarray) else list(data)
    else:
        raise InputError(f"unsupported input type {type(data).__name__}; send a prompt column, a list of strings or a string")

    if not prompts:
        raise InputError("no prompts in the request")
    if len(prompts) > MAX_PROMPTS_PER_REQUEST:
        raise InputError(
            f"{len(prompts)} prompts in one request; at most {MAX_PROMPTS_PER_REQUEST} are allowed, split the request"
        )
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InputError(f"prompt {i} must be a string, got {type(prompt).__name__} {prompt!r}")
        if not prompt.strip():
            raise InputError(f"prompt {i} is blank")
    return prompts


class _TunixPyfuncModel:
    """The ``python_function`` face of a :class:`TunixModel`."""

    def __init__(self, model: TunixModel):
        self.model = model

    def get_raw_model(self) -> TunixModel:
        return self.model

    def predict(self, data, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """
        Args:
            data: A DataFrame with a ``prompt`` column, a list of strings, a string, or
                ``{"prompt": str | [str]}``; at most 256 prompts.
            params: ``max_new_tokens``, ``temperature``, ``top_k``, ``seed`` for this request.

        Returns:
            A DataFrame with ``completion``, ``answer`` and ``reasoning`` (None when the tag is
            missing) per prompt. A bad request raises InputError (HTTP 400 when served).
        """
        try:
            results = self.model.generate(_prompts_from(data), **(params or {}))
        except InputError as exc:
            raise _InvalidRequest(str(exc)) from exc
        return pd.DataFrame(results, columns=list(OUTPUT_COLUMNS))
