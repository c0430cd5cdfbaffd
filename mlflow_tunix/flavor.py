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

A LoRA model can instead be saved as its adapters and a reference to its base (``save_model(...,
adapters=result.adapters, base="models:/base/1")``): ``tunix/adapters.safetensors`` replaces the
weights, and MLmodel's ``lora`` section records the base (an MLflow model URI or a local Hugging
Face folder) with the sha256 of its weights. Loading resolves the base, refuses one whose weights
differ, and merges the adapters: the model generates exactly what the merged save does.

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

from mlflow_tunix import hf, lora
from mlflow_tunix.data import parse_answer, parse_reasoning, render_prompt
from mlflow_tunix.errors import ConfigError, InputError, ModelLoadError, short
from mlflow_tunix.generate import GenerationConfig, generate_text, request_error
from mlflow_tunix.model import (
    ModelConfig,
    Transformer,
    build_model,
    check_memory,
    check_param_shapes,
    flat_params,
    param_count,
    params_sha256,
)
from mlflow_tunix.tokenizer import load_tokenizer

FLAVOR_NAME = "mlflow_tunix"
# Bump when the files change meaning; load refuses newer ones. 2: the manifest lists every file of the
# model directory (not only DATA_PATH's) and MLmodel's flavor sections.
FORMAT_VERSION = 2
# 3: the weights are LoRA adapters on a recorded base (MLmodel's ``lora`` section). Only such saves
# are written as 3, so an older mlflow-tunix still reads every merged save and refuses these clearly.
ADAPTERS_FORMAT_VERSION = 3
DATA_PATH = "tunix"  # the flavor's sub-directory inside the MLflow model directory
WEIGHTS_FILE = "model.safetensors"
ADAPTERS_FILE = "adapters.safetensors"  # instead of WEIGHTS_FILE in an adapters save: "<weight>.lora_a/b"
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation.json"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FILE = "manifest.json"

# Loading runs no code from a model directory unless the user opts in (mirrors MLflow 3.18's
# MLFLOW_ALLOW_MODEL_CODE_EXECUTION): load_model(allow_code=True) or this variable set to 1.
ALLOW_CODE_ENV = "MLFLOW_TUNIX_ALLOW_MODEL_CODE"
_OPT_IN = (f"mlflow-tunix runs no code from a model directory; for a model you trust, pass allow_code=True "
           f"to mlflow_tunix.load_model or set {ALLOW_CODE_ENV}=1")
# What MLflow writes into a model directory after the save (none of it is executed): MLflow's
# download of a models:/NAME/VERSION URI adds the name and version (with a local artifact store, into
# the stored directory itself). Never listed in the manifest.
_REGISTERED_MODEL_META = "registered_model_meta"
_MLFLOW_ADDED_FILES = {_REGISTERED_MODEL_META}
# Models saved in format 1 (mlflow-tunix 0.1) keep loading: their manifest covers the data directory, and
# beside it only these files MLflow writes may stand (no code, no other loader: MLmodel is checked for those).
# What format 1 cannot show is an edit of MLmodel's own values; docs/flavor.md says so.
_FORMAT_1_MLFLOW_FILES = {"conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
                          "serving_input_example.json"}
MAX_METADATA_BYTES = 16 << 20  # MLmodel, the manifest and the JSON configs are read whole: bound them

# The prediction options a request may set (the signature's ParamSchema), and their MLflow types.
REQUEST_PARAMS = {"max_new_tokens": "long", "temperature": "double", "top_k": "long", "seed": "long"}
# One request may not ask for more than this many generations: a server answers within a bounded
# time and memory; bigger jobs belong in batch scoring, split into requests.
MAX_PROMPTS_PER_REQUEST = 256
# A prompt longer than this is refused before it is tokenized (tokenizing a megabyte costs seconds,
# and it could never fit a context: a token is at least one character).
MAX_PROMPT_CHARS = 65536
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
        # No input schema: MLflow would cast request values to its type before predict sees them ([123]
        # becomes ["123"]) and keep only the first column of a DataFrame. Without one, the input arrives
        # as sent and _prompts_from is the one judge of it.
        inputs=None,
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
    """Every file below ``directory`` (relative POSIX paths); a symlink or special file is refused.

    A symlinked directory would not be scanned by a plain walk, and a link can point anywhere:
    a model directory holds regular files only.
    """
    found = []
    for parent, dirs, files in os.walk(directory, followlinks=False):
        for name in dirs + files:
            path = Path(parent) / name
            if path.is_symlink():
                raise ModelLoadError(f"{path}: a symbolic link; a model directory holds regular files only")
            if name in files and not path.is_file():
                raise ModelLoadError(f"{path}: not a regular file; a model directory holds regular files only")
            if name in files:
                found.append(path.relative_to(directory).as_posix())
    return sorted(found)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_data_dir(data_dir: Path, module: Transformer, tokenizer, generation: GenerationConfig,
                    adapters: lora.Adapters | None = None) -> None:
    """Write the weights (or only the adapters), configs and tokenizer (the manifest comes last, see
    _write_manifest)."""
    import safetensors.numpy

    data_dir.mkdir()
    if adapters is None:
        weights = {name: np.ascontiguousarray(array) for name, array in flat_params(module).items()}
        safetensors.numpy.save_file(weights, str(data_dir / WEIGHTS_FILE), metadata={"format": "np"})
    else:
        tensors = {f"{name}.lora_{k}": np.ascontiguousarray(np.asarray(ab[k]))
                   for name, ab in adapters.weights.items() for k in ("a", "b")}
        safetensors.numpy.save_file(tensors, str(data_dir / ADAPTERS_FILE), metadata={"format": "np"})
    _write_json(data_dir / CONFIG_FILE, dataclasses.asdict(module.config))
    _write_json(data_dir / GENERATION_FILE, dataclasses.asdict(generation))
    tokenizer.save_pretrained(str(data_dir / TOKENIZER_DIR))


def _trusted_fields(flavors: dict) -> dict:
    """MLmodel's flavor sections as the manifest records them: everything but the manifest's own hash."""
    sections = {name: {k: v for k, v in conf.items() if k != "manifest_sha256"} for name, conf in flavors.items()}
    return json.loads(json.dumps(sections, sort_keys=True, default=str))


def _write_manifest(root: Path, flavors: dict) -> str:
    """List sha256 and size of every file of the model directory (all but MLmodel, written after it)
    and MLmodel's flavor sections; return the manifest's sha256 (MLmodel records it)."""
    manifest_path = root / DATA_PATH / MANIFEST_FILE
    files = {
        name: {"sha256": _sha256(root / name), "bytes": (root / name).stat().st_size}
        for name in _files_under(root)
        if name != MLMODEL_FILE_NAME and name not in _MLFLOW_ADDED_FILES
    }
    _write_json(manifest_path, {"format_version": FORMAT_VERSION, "files": files, "mlmodel": _trusted_fields(flavors)})
    return _sha256(manifest_path)


def _base_reference(base) -> dict:
    """``{"uri", "kind"}`` of a LoRA base: ``mlflow`` (a model URI, or a local MLflow model directory)
    or ``hf`` (a local Hugging Face folder). Folders become absolute paths; an ``@alias`` is pinned to
    the version it names now (an alias moves, a version does not)."""
    text = str(base)
    folder = Path(text).expanduser()
    if folder.is_dir():
        return {"uri": str(folder.resolve()), "kind": "mlflow" if (folder / MLMODEL_FILE_NAME).is_file() else "hf"}
    if text.startswith("models:/") and "@" in text:
        from mlflow import MlflowClient

        name, _, alias = text[len("models:/"):].partition("@")
        try:
            text = f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"
        except MlflowException as exc:
            raise ModelLoadError(f"base: {text}: {' '.join(exc.message.split())[:200]}") from None
    if "://" in text or text.startswith(("models:/", "runs:/")):
        return {"uri": text, "kind": "mlflow"}
    raise ModelLoadError(f"base: {text}: no such folder, and not an MLflow model URI (models:/..., runs:/...)")


def _lora_section(module: Transformer, adapters: lora.Adapters, base) -> dict:
    """MLmodel's ``lora`` section for an adapters save: the LoRA config and the base with its sha256,
    once base + adapters is checked to give exactly ``module``'s weights."""
    weights = flat_params(module)
    ref = {**_base_reference(base), "dtype": str(weights["embed"].dtype)}
    base_module = _resolve_base(ref, module.config, "base", allow_code=None)
    _check_adapters(adapters, base_module, f"base {ref['uri']}")
    merged = flat_params(lora.apply(base_module, adapters))
    differing = sorted(set(weights) ^ set(merged)) or [
        n for n in sorted(weights) if weights[n].dtype != merged[n].dtype or weights[n].tobytes() != merged[n].tobytes()]
    if differing:
        raise ConfigError(f"adapters: on the base {ref['uri']} they do not give this model's weights ({differing[0]} "
                          f"differs); pass the model trained from that base with its adapters")
    c = adapters.config
    return {"rank": c.rank, "alpha": float(c.alpha), "targets": list(c.targets),
            "adapter_param_count": adapters.param_count(),
            "base": {**ref, "params_sha256": params_sha256(base_module)}}


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
    adapters: lora.Adapters | None = None,
    base: str | None = None,
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
        adapters: With ``base``: save the LoRA adapters (``TrainResult.adapters`` of a ``train.lora``
            run) instead of the weights; ``model`` is the merged model they give on ``base``.
        base: The model the adapters were trained on: an MLflow model URI (``models:/NAME/VERSION``;
            an ``@alias`` is pinned to its current version; ``runs:/...``) or a local folder (an
            MLflow model directory or a Hugging Face checkpoint, recorded as an absolute path).
            It is loaded now: the sha256 of its weights is recorded, and the save is refused unless
            base + adapters gives exactly ``model``'s weights.
        kwargs: Accepted for ``mlflow.models.Model.log``; unknown names are logged and ignored.
    """
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    module, tokenizer, generation = _parts(model, tokenizer, generation_config)
    if (adapters is None) != (base is None):
        raise TypeError("save_model() takes adapters= and base= together (the LoRA adapters and the model they "
                        "were trained on); with neither it saves the model's own weights")
    lora_section = _lora_section(module, adapters, base) if adapters is not None else None
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
            adapters=adapters, lora_section=lora_section,
        )
        if path.exists():
            path.rmdir()  # the empty directory the caller prepared
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _save_into(root: Path, module, tokenizer, generation, *, conda_env, code_paths, mlflow_model, signature,
               input_example, pip_requirements, extra_pip_requirements, metadata, adapters=None,
               lora_section=None) -> None:
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

    _write_data_dir(root / DATA_PATH, module, tokenizer, generation, adapters if lora_section else None)

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
        format_version=FORMAT_VERSION if lora_section is None else ADAPTERS_FORMAT_VERSION,
        data=DATA_PATH,
        model_family=module.config.family,
        model_config=dataclasses.asdict(module.config),
        param_count=param_count(module),
        jax_version=jax.__version__,
        flax_version=flax.__version__,
        code=code_dir_subpath,
    )
    if lora_section is not None:
        mlflow_model.flavors[FLAVOR_NAME]["lora"] = lora_section
    # Last, so it covers every other file and the flavor sections just written.
    mlflow_model.flavors[FLAVOR_NAME]["manifest_sha256"] = _write_manifest(root, mlflow_model.flavors)
    if size := get_total_file_size(str(root)):
        mlflow_model.model_size_bytes = size
    mlflow_model.save(str(root / MLMODEL_FILE_NAME))


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
    adapters: lora.Adapters | None = None,
    base: str | None = None,
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
        adapters: With ``base``: log only the LoRA adapters and a reference to their base (see
            :func:`save_model`); loading resolves the base and merges them.
        base: The model the adapters were trained on (see :func:`save_model`).
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
        adapters=adapters,
        base=base,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------
# Loading


def _code_allowed(allow_code: bool | None) -> bool:
    if allow_code is None:
        return os.environ.get(ALLOW_CODE_ENV, "").strip().lower() in ("1", "true", "yes")
    return bool(allow_code)


def _read_small(path: Path, limit: int = MAX_METADATA_BYTES) -> bytes:
    """The bytes of a metadata file (MLmodel, manifest, a config), refused when not a regular file or too big."""
    if path.is_symlink() or not path.is_file():
        missing = not path.exists() and not path.is_symlink()
        raise ModelLoadError(f"{path}: " + ("missing; the model is incomplete" if missing else "not a regular file"))
    size = path.stat().st_size
    if size > limit:
        raise ModelLoadError(f"{path}: {size} bytes; a metadata file holds at most {limit}")
    return path.read_bytes()


def _inside(model_dir: Path, relative, where: str) -> Path:
    """``model_dir / relative``, refused unless ``relative`` is a plain relative path below it."""
    parts = Path(relative).parts if isinstance(relative, str) else ()
    if not parts or Path(relative).is_absolute() or ".." in parts or "\\" in relative:
        raise ModelLoadError(f"{where}: {short(relative)} points outside the model directory")
    return model_dir / relative


def _check_mlmodel(model_dir: Path, allow_code: bool) -> dict:
    """MLmodel's flavor sections, once they hold no code and no loader but ours (unless allowed)
    and their data paths stay inside ``model_dir``."""
    mlmodel = model_dir / MLMODEL_FILE_NAME
    if not mlmodel.exists():
        raise ModelLoadError(f"{mlmodel}: missing; this is not an MLflow model directory")
    _read_small(mlmodel)
    try:
        flavors = Model.load(str(mlmodel)).flavors
    except Exception as exc:  # YAML errors, a non-mapping MLmodel, ...
        raise ModelLoadError(f"{mlmodel}: unreadable ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(flavors, dict) or FLAVOR_NAME not in flavors:
        raise ModelLoadError(f"{mlmodel}: no {FLAVOR_NAME!r} flavor (this model has: {', '.join(map(str, flavors or {}))})")
    sections = {FLAVOR_NAME: flavors[FLAVOR_NAME], pyfunc.FLAVOR_NAME: flavors.get(pyfunc.FLAVOR_NAME) or {}}
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise ModelLoadError(f"{mlmodel}: flavor {name!r} is not a mapping")
        if section.get("code") and not allow_code:
            raise ModelLoadError(f"{mlmodel}: flavor {name!r} ships code ({short(section['code'])}, from code_paths); "
                                 f"{_OPT_IN}")
        if "data" in section:
            _inside(model_dir, section["data"], f"{mlmodel}: {name}.data")
    loader = sections[pyfunc.FLAVOR_NAME].get("loader_module", __name__)
    if loader != __name__ and not allow_code:
        raise ModelLoadError(f"{mlmodel}: loader_module is {short(loader)}, not {__name__}; {_OPT_IN}")
    return flavors


def _parse_json(raw: bytes, path: Path):
    """JSON with a duplicate key refused (two values for one key is an edit, not a save)."""

    def unique(pairs):
        keys = [k for k, _ in pairs]
        for key in keys:
            if keys.count(key) > 1:
                raise ValueError(f"duplicate key {short(key)}")
        return dict(pairs)

    try:
        return json.loads(raw, object_pairs_hook=unique)
    except (ValueError, RecursionError) as exc:  # RecursionError: a deeply nested document
        raise ModelLoadError(f"{path}: not valid JSON ({str(exc)[:200] or type(exc).__name__})") from None


def _check_files(model_dir: Path, flavors: dict, allow_code: bool) -> None:
    """The manifest is the one MLmodel names, agrees with MLmodel's flavor sections, and every file
    of the model directory is listed with its size and sha256 (MLmodel itself excepted)."""
    conf = flavors[FLAVOR_NAME]
    data_rel = conf.get("data", DATA_PATH)
    manifest_path = _inside(model_dir, data_rel, "data") / MANIFEST_FILE
    raw = _read_small(manifest_path)
    expected = conf.get("manifest_sha256")
    if not isinstance(expected, str):
        raise ModelLoadError(f"{model_dir / MLMODEL_FILE_NAME}: no manifest_sha256; the model directory cannot be checked")
    if hashlib.sha256(raw).hexdigest() != expected:
        raise ModelLoadError(f"{manifest_path}: altered (its sha256 differs from the one in MLmodel)")
    manifest = _parse_json(raw, manifest_path)
    try:
        files = manifest["files"]
        listed = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ModelLoadError(f"{manifest_path}: unreadable manifest ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not listed:
        raise ModelLoadError(f"{manifest_path}: lists no files")
    whole_directory = conf.get("format_version", FORMAT_VERSION) >= 2
    if whole_directory:
        if manifest.get("mlmodel") != _trusted_fields(flavors):
            raise ModelLoadError(f"{model_dir / MLMODEL_FILE_NAME}: its flavor sections differ from the ones "
                                 f"{manifest_path} records (MLmodel was edited)")
    else:  # format 1 (only with allow_code): names relative to the data directory
        listed = {f"{data_rel}/{name}": entry for name, entry in listed.items()}

    for name, (size, sha256) in sorted(listed.items()):
        path = _inside(model_dir, name, f"{manifest_path}: entry")
        if name in _MLFLOW_ADDED_FILES:
            continue  # rewritten by MLflow at every download from the registry (a local store: in place)
        if path.is_symlink() or not path.is_file():
            raise ModelLoadError(f"{path}: " + ("missing; the model is incomplete" if not path.exists() else "not a regular file"))
        actual = path.stat().st_size
        if actual != size:
            raise ModelLoadError(f"{path}: truncated or altered ({actual} bytes, expected {size})")
        if _sha256(path) != sha256:
            raise ModelLoadError(f"{path}: altered (sha256 differs from {MANIFEST_FILE})")
    known = set(listed) | {MLMODEL_FILE_NAME, f"{data_rel}/{MANIFEST_FILE}", *_MLFLOW_ADDED_FILES}
    if not whole_directory:  # format 1 listed the data directory only: beside it, only what MLflow itself writes
        known |= _FORMAT_1_MLFLOW_FILES
    for name in _files_under(model_dir):  # also refuses symlinks and special files anywhere
        if name not in known and not allow_code:
            raise ModelLoadError(f"{model_dir / name}: not listed in {MANIFEST_FILE}; refusing a model with unknown files")


def _verified(model_dir: Path, allow_code: bool | None) -> dict:
    """Check a local model directory before anything in it is used; return MLmodel's flavor sections."""
    allow = _code_allowed(allow_code)
    flavors = _check_mlmodel(model_dir, allow)
    saved_format = flavors[FLAVOR_NAME].get("format_version", FORMAT_VERSION)
    newest = ADAPTERS_FORMAT_VERSION
    if not isinstance(saved_format, int) or isinstance(saved_format, bool) or saved_format > newest:
        raise ModelLoadError(
            f"{model_dir}: saved in format version {short(saved_format)}, newer than this mlflow-tunix "
            f"reads ({newest}); upgrade mlflow-tunix"
        )
    _check_files(model_dir, flavors, allow)
    return flavors

def _read_dataclass(cls, path: Path):
    values = _parse_json(_read_small(path), path)
    if not isinstance(values, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(values).__name__}")
    if cls is ModelConfig and values.get("family") in _RENAMED_FAMILIES:
        values["family"] = _RENAMED_FAMILIES[values["family"]]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ModelLoadError(f"{path}: unknown key {short(unknown[0])} (this mlflow-tunix knows: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def _resolve_base(ref: dict, config: ModelConfig, where: str, allow_code: bool | None) -> Transformer:
    """The module a LoRA base reference points to (a recorded base: the one place a load reads
    outside its model directory). Its own checks apply: an MLflow model is verified like any other."""
    uri = ref["uri"]
    if ref["kind"] == "hf":
        if not Path(uri).is_dir():
            raise ModelLoadError(f"{where}: its LoRA base, the Hugging Face folder {uri}, is missing; put that folder "
                                 f"back or pass its new place as base= to mlflow_tunix.load_model")
        return hf.load_checkpoint(uri, dtype=ref.get("dtype", "float32"), max_seq_len=config.max_seq_len).model
    try:
        local = Path(_download_artifact_from_uri(artifact_uri=uri))
    except (MlflowException, OSError) as exc:
        message = exc.message if isinstance(exc, MlflowException) else str(exc)
        raise ModelLoadError(f"{where}: its LoRA base {uri} cannot be found ({' '.join(message.split())[:200]}); "
                             f"use the tracking server it was logged to, or give where it is now as base=") from None
    flavors = _verified(local, allow_code)
    if "lora" in flavors[FLAVOR_NAME]:
        raise ModelLoadError(f"{where}: its LoRA base {uri} is itself saved as adapters; a base must hold its weights")
    return _load_from_data_dir(local / flavors[FLAVOR_NAME].get("data", DATA_PATH), flavors[FLAVOR_NAME]).module


def _check_adapters(adapters: lora.Adapters, base_module: Transformer, where: str) -> None:
    """The adapters are the ones the LoRA config puts on the base: same names and shapes."""
    expected = lora.target_shapes(base_module, adapters.config)
    for name in sorted(set(expected) | set(adapters.weights)):
        if name not in adapters.weights or name not in expected:
            raise ModelLoadError(f"{where}: adapter for {name!r} " + ("missing" if name in expected else "unexpected"))
        shapes = tuple(tuple(adapters.weights[name][k].shape) for k in ("a", "b"))
        if shapes != expected[name]:
            raise ModelLoadError(f"{where}: adapter for {name!r} has shapes {shapes}, expected {expected[name]}")


def _adapters_weights(data_dir: Path, config: ModelConfig, section, allow_code, base_override) -> dict:
    """The merged weights of an adapters save: its base resolved and checked against the recorded
    sha256, its adapters read and added (the arithmetic of training's final merge)."""
    import safetensors.numpy

    mlmodel = data_dir.parent / MLMODEL_FILE_NAME
    try:
        lcfg = lora.LoraConfig(rank=section["rank"], alpha=section["alpha"], targets=tuple(section["targets"]))
        recorded = section["base"]
        expected = str(recorded["params_sha256"])
        ref = {"uri": str(recorded["uri"]), "kind": recorded["kind"], "dtype": str(recorded.get("dtype", "float32"))}
        if ref["kind"] not in ("mlflow", "hf"):
            raise ValueError(f"base kind {ref['kind']!r}")
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ModelLoadError(f"{mlmodel}: unreadable {FLAVOR_NAME}.lora section ({str(exc)[:200]})") from None
    if base_override is not None:
        ref = {**_base_reference(base_override), "dtype": ref["dtype"]}
    where = str(data_dir.parent)
    base_module = _resolve_base(ref, config, where, allow_code)
    actual = params_sha256(base_module)
    if actual != expected:
        raise ModelLoadError(f"{where}: the LoRA base {ref['uri']} has weights sha256 {actual[:12]}..., not the "
                             f"{expected[:12]}... the adapters were trained on; provide that base (base= to load_model)")
    path = data_dir / ADAPTERS_FILE
    try:
        tensors = safetensors.numpy.load_file(str(path))
    except Exception as exc:  # a malformed file (the manifest checked its bytes, so only a bad save)
        raise ModelLoadError(f"{path}: unreadable safetensors file ({str(exc)[:200]})") from None
    weights: dict = {}
    for key, value in tensors.items():
        name, _, part = key.rpartition(".lora_")
        if part not in ("a", "b") or not name:
            raise ModelLoadError(f"{path}: unexpected tensor {key!r}")
        weights.setdefault(name, {})[part] = value
    adapters = lora.Adapters(lcfg, weights)
    if any(set(ab) != {"a", "b"} for ab in weights.values()):
        raise ModelLoadError(f"{path}: an adapter lacks its lora_a or lora_b tensor")
    _check_adapters(adapters, base_module, str(path))
    return flat_params(lora.apply(base_module, adapters))


def _load_from_data_dir(data_dir: Path, conf: dict | None = None, allow_code: bool | None = None,
                        base_override=None) -> TunixModel:
    """Build the model from a data directory that _verified has checked (``conf``: its flavor section)."""
    import safetensors
    import safetensors.numpy

    config = _read_dataclass(ModelConfig, data_dir / CONFIG_FILE)
    generation = _read_dataclass(GenerationConfig, data_dir / GENERATION_FILE)
    section = (conf or {}).get("lora")
    weights_path = data_dir / (WEIGHTS_FILE if section is None else ADAPTERS_FILE)
    try:  # before anything is allocated: the machine can hold it, and the header matches the config
        check_memory(config)
        if section is None:
            with safetensors.safe_open(str(weights_path), framework="numpy") as f:
                header = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            check_param_shapes(config, header)
            weights = safetensors.numpy.load_file(str(weights_path))
    except (ConfigError, ModelLoadError) as exc:
        raise ModelLoadError(f"{weights_path}: {exc}") from None
    except Exception as exc:  # safetensors raises its own SafetensorError on a malformed header
        raise ModelLoadError(f"{weights_path}: unreadable safetensors file ({str(exc)[:200]})") from None
    if section is not None:
        weights = _adapters_weights(data_dir, config, section, allow_code, base_override)
    try:
        module = build_model(config, params=weights)
    except (ConfigError, ModelLoadError) as exc:
        raise ModelLoadError(f"{weights_path}: {exc}") from exc
    tokenizer = load_tokenizer(data_dir / TOKENIZER_DIR)
    return TunixModel(module=module, tokenizer=tokenizer, generation=generation)


def _registered_version(model_uri: str, local_path: Path) -> tuple[str, str] | None:
    """(name, version) when the model was loaded through the registry, else None.

    MLflow writes ``registered_model_meta`` into every directory it downloads from a ``models:/NAME/V``
    or ``models:/NAME@alias`` URI (after download: the artifact store cannot forge it).
    """
    meta = local_path / _REGISTERED_MODEL_META
    if not str(model_uri).startswith("models:/") or not meta.is_file() or meta.is_symlink():
        return None
    try:
        values = yaml.safe_load(_read_small(meta))
        name, version = values.get("model_name"), values.get("model_version")
    except (yaml.YAMLError, AttributeError):
        return None
    # A LoggedModel (models:/m-...) is downloaded with a meta file naming no version.
    return (str(name), str(version)) if name is not None and version is not None else None


def _check_registered(name: str, version: str, module: Transformer) -> None:
    """The weights are the ones the version was registered with (its ``params_sha256`` tag)."""
    from mlflow import MlflowClient

    try:
        tags = MlflowClient().get_model_version(name, version).tags
    except MlflowException as exc:
        raise ModelLoadError(f"models:/{name}/{version}: {exc.message[:200]}") from None
    registered = tags.get("params_sha256")
    if registered is None:
        return  # registered by other means than mlflow-tunix: nothing to compare with
    actual = params_sha256(module)
    if actual != registered:
        raise ModelLoadError(
            f"models:/{name}/{version}: the weights' sha256 {actual[:12]}... differs from the version's "
            f"params_sha256 tag {registered[:12]}...; the model files changed after registration")


def load_model(model_uri, dst_path=None, *, allow_code: bool | None = None, base=None) -> TunixModel:
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
        allow_code: Load a model that ships code (``code_paths``), names another loader module, or
            holds files its manifest does not list, and put its code on ``sys.path``. Only for a
            model you trust. Default: the ``MLFLOW_TUNIX_ALLOW_MODEL_CODE`` environment variable
            (``1``), else False.
        base: For a model saved as LoRA adapters: load its base from here instead of the recorded
            place (a moved Hugging Face folder, another copy of the base model). Its weights must
            still have the recorded sha256.

    Returns:
        A :class:`TunixModel`. A missing, truncated, altered or unexpected file, code in the model,
        or (for a registered version) weights other than the registered ones raise
        :class:`~mlflow_tunix.errors.ModelLoadError` naming the file.
    """
    try:
        local_path = Path(_download_artifact_from_uri(artifact_uri=str(model_uri), output_path=dst_path))
    except (MlflowException, OSError) as exc:  # an unknown run, model, version or alias; a missing path
        message = exc.message if isinstance(exc, MlflowException) else str(exc)
        raise ModelLoadError(f"{model_uri}: {' '.join(message.split())[:300]}") from None
    flavors = _verified(local_path, allow_code)
    conf = flavors[FLAVOR_NAME]
    if _code_allowed(allow_code):
        _add_code_from_conf_to_system_path(str(local_path), conf)
    loaded = _load_from_data_dir(local_path / conf.get("data", DATA_PATH), conf, allow_code, base)
    if registered := _registered_version(str(model_uri), local_path):
        _check_registered(*registered, loaded.module)
    return loaded


def _drop_model_code(model_dir: Path) -> list[str]:
    """Take back what MLflow did before calling _load_pyfunc: it put the model's ``code`` directory
    on ``sys.path``. Returns the modules already imported from inside the model directory."""
    inside = str(model_dir.resolve())
    sys.path[:] = [p for p in sys.path if not (p and os.path.realpath(p).startswith(inside + os.sep))]
    return sorted(name for name, module in list(sys.modules.items())
                  if (getattr(module, "__file__", None) or "").startswith(inside + os.sep))


def _load_pyfunc(path):
    """
    Load the ``python_function`` implementation; called by ``mlflow.pyfunc.load_model``.

    MLflow has already put the model's ``code`` directory (if MLmodel names one) on ``sys.path``
    when it calls this; the first thing done here is to check the directory and take it off again,
    so code shipped in the model can not shadow a module imported from here on (see docs/flavor.md).

    Args:
        path: The flavor's data directory (``<model>/tunix``).
    """
    data_dir = Path(path)
    model_dir = data_dir.parent
    allow = _code_allowed(None)
    if not allow:
        imported = _drop_model_code(model_dir)
        if imported:
            raise ModelLoadError(f"{model_dir}: MLflow imported code from the model directory before mlflow-tunix "
                                 f"could refuse it ({', '.join(imported[:5])}); {_OPT_IN}")
    flavors = _verified(model_dir, allow)
    conf = flavors[FLAVOR_NAME]
    if data_dir.resolve() != (model_dir / conf.get("data", DATA_PATH)).resolve():
        raise ModelLoadError(f"{model_dir / MLMODEL_FILE_NAME}: python_function.data and {FLAVOR_NAME}.data differ")
    loaded = _load_from_data_dir(data_dir, conf, allow)
    if registered := _registered_version("models:/", model_dir):
        _check_registered(*registered, loaded.module)
    return _TunixPyfuncModel(loaded)


# --------------------------------------------------------------------------------------------
# The pyfunc


class _InvalidRequest(InputError, MlflowException):
    """An InputError that MLflow's scoring server answers with HTTP 400 and this message.

    (The server turns an MlflowException into its error code's HTTP status, and any other
    exception into a 400 that hides the message.)
    """

    def __init__(self, message: str):
        self._own = message
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    # MLflow's scoring server rewrites the message to "Failed to predict data '<the whole request>'.
    # Error: <ours>": a megabyte request would come back in the 400. Keep a short prefix of it.
    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        own = getattr(self, "_own", value)
        self._message = value if len(value) <= len(own) + 200 else f"{value[:120]}... {own}"


def _columns(data: pd.DataFrame) -> str:
    names = [str(c)[:40] for c in list(data.columns)[:20]]
    return ", ".join(names) + (f", ... ({len(data.columns)} columns)" if len(data.columns) > 20 else "") or "none"


def _prompts_from(data) -> list[str]:
    """The prompts in a pyfunc input: a DataFrame with a ``prompt`` column (or with exactly one column,
    whatever its name, as MLflow's own clients send a list), a list of strings, a string, or
    ``{"prompt": str | [str]}``."""
    if isinstance(data, str):
        prompts = [data]
    elif isinstance(data, dict):
        if "prompt" not in data:
            raise InputError(f"the request has no 'prompt' key (got keys: {', '.join(str(k)[:40] for k in list(data)[:20]) or 'none'})")
        value = data["prompt"]
        prompts = [value] if isinstance(value, str) else list(np.asarray(value, dtype=object).reshape(-1))
    elif isinstance(data, pd.DataFrame):
        if "prompt" in data.columns:
            prompts = data["prompt"].tolist()
        elif len(data.columns) == 1:  # a list or a one-column table: the prompts, whatever the column's name
            prompts = data.iloc[:, 0].tolist()
        else:
            raise InputError(f"the input has no 'prompt' column (got columns: {_columns(data)}); "
                             f"with several columns, the prompts must be in one named 'prompt'")
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
            raise InputError(f"prompt {i} must be a string, got {type(prompt).__name__} {short(prompt, 40)}")
        if not prompt.strip():
            raise InputError(f"prompt {i} is blank")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"prompt {i} has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed "
                             f"(no model's context holds more)")
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
            data: A DataFrame with a ``prompt`` column (or exactly one column, whatever its name),
                a list of strings, a string, or ``{"prompt": str | [str]}``; at most 256 prompts.
            params: ``max_new_tokens``, ``temperature``, ``top_k``, ``seed`` for this request.

        Returns:
            A DataFrame with ``completion``, ``answer`` and ``reasoning`` (None when the tag is
            missing) per prompt. A bad request raises InputError (HTTP 400 when served).
        """
        try:
            results = self.model.generate(_prompts_from(data), **(params or {}))
        except InputError as exc:
            raise _InvalidRequest(str(exc)) from exc
        return _results_frame(results)


def _results_frame(results: list[dict]) -> pd.DataFrame:
    # Object columns: pandas 3 infers a string dtype whose missing value is NaN, and NaN is not JSON
    # (a served answer would read `"answer": NaN`); an object column keeps None, served as null.
    return pd.DataFrame({c: pd.Series([r[c] for r in results], dtype=object) for c in OUTPUT_COLUMNS})
