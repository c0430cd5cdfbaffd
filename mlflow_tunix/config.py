"""Project configs: one YAML file per experiment, ``projects/<name>/config.yaml`` (shipped as package data).

A project names its data (files or seeded generators), tokenizer, model, training and generation
settings. Each section maps onto the config dataclass of the stage that owns it (``ModelConfig`` in
model.py, ``TrainConfig`` in train.py, ...). Loading is strict: an unknown key, a wrong type or an
out-of-range value is refused with the key's dotted name, before any MLflow run starts.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mlflow_tunix import generators
from mlflow_tunix.data import check_template
from mlflow_tunix.errors import ConfigError, short
from mlflow_tunix.generate import GenerationConfig
from mlflow_tunix.model import ModelConfig, check_memory
from mlflow_tunix.tokenizer import TokenizerConfig
from mlflow_tunix.train import TrainConfig

from mlflow_tunix import projects

CONFIG_FILE = projects.CONFIG_FILE


@dataclass(frozen=True)
class DataSource:
    """One part of a dataset: a JSONL file, or a seeded generator (``mlflow_tunix.generators.GENERATORS``)."""

    path: str | None = None
    generator: str | None = None
    n: int | None = None
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.path:
            return self.path
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"generator:{self.generator}(n={self.n},seed={self.seed}{',' + opts if opts else ''})"


@dataclass(frozen=True)
class DataConfig:
    train: tuple[DataSource, ...] = ()
    eval: tuple[DataSource, ...] = ()  # empty: a seeded split of train is held out
    # Further held-out sets scored after the main one, each under its own metric prefix
    # (e.g. {"5-digit": [...]} -> "5-digit/answer_accuracy"): probes such as length generalization.
    extra_eval: Mapping[str, tuple[DataSource, ...]] = field(default_factory=dict)
    eval_fraction: float = 0.1
    split_seed: int = 0
    template: str = "plain"  # prompt template (plain | gemma); the generation config follows it

    def __post_init__(self):
        check_template(self.template, "data.template")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction: must be between 0 and 1, got {self.eval_fraction}")
        named = [("train", self.train), ("eval", self.eval)]
        named += [(f"extra_eval.{name}", sources) for name, sources in self.extra_eval.items()]
        for part, sources in named:
            for i, src in enumerate(sources):
                key = f"data.{part}[{i}]"
                if bool(src.path) == bool(src.generator):
                    raise ConfigError(f"{key}: give exactly one of path or generator")
                if src.generator and src.generator not in generators.GENERATORS:
                    raise ConfigError(f"{key}.generator: {src.generator!r} is not one of "
                                      f"{', '.join(generators.GENERATORS)}")


@dataclass(frozen=True)
class ProjectConfig:
    name: str
    description: str = ""
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    generation: GenerationConfig = GenerationConfig()
    registered_model_name: str | None = None  # default: tunix-<name>
    base_dir: str = "."  # where relative data paths are resolved (the config file's folder)

    def __post_init__(self):
        # Checked before any work (a bad name used to be refused only at registration, after training).
        name, key = self.model_name, "registered_model_name" if self.registered_model_name else "name"
        if not isinstance(name, str) or not name.strip() or len(name) > 256 or name != name.strip() \
                or any(c in name for c in "'/:") or not name.isprintable():
            raise ConfigError(f"{key}: {short(name)} is not a usable registered-model name (1-256 printable "
                              f"characters, no quote ('), slash (/) or colon (:), no surrounding spaces)")
        # One prompt template for training and generation. Set either key (data.template is the
        # documented one) and the other follows; two different non-default values contradict.
        data_t, gen_t, default = self.data.template, self.generation.prompt_template, DataConfig.template
        if data_t != gen_t:
            if data_t != default and gen_t != default:
                raise _template_conflict(data_t, gen_t)
            template = gen_t if data_t == default else data_t
            object.__setattr__(self, "data", dataclasses.replace(self.data, template=template))
            object.__setattr__(self, "generation", dataclasses.replace(self.generation, prompt_template=template))

    @property
    def model_name(self) -> str:
        return self.registered_model_name or f"tunix-{self.name}"


def _template_conflict(data_template, generation_template) -> ConfigError:
    return ConfigError(f"data.template ({data_template!r}) and generation.prompt_template ({generation_template!r}) "
                       "disagree; set data.template only (generation follows it)")


# --------------------------------------------------------------------------- strict conversion
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key)
    if origin is tuple:
        if isinstance(value, Mapping) and dataclasses.is_dataclass(args[0]):
            value = [value]  # a single source may be written without the list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {short(value)}")
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {short(value)}")
        if len(args) == 2 and args[1] is not Any:
            return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return {str(k): (tuple(v) if isinstance(v, list) else v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {short(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {short(value)}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _bad(key, "an integer", value)
            except ValueError:
                _bad(key, "an integer", value)
        if not isinstance(value, int):
            _bad(key, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, bool):
            _bad(key, "a number", value)
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int too large for a float
            _bad(key, "a number", value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            _bad(key, "a string", value)
        return str(value)
    return value


def _bad(key, expected, value):
    raise ConfigError(f"{key}: expected {expected}, got {short(value)}")


def from_dict(cls, values, key: str = ""):
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types by dotted key."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{key or cls.__name__}: expected a mapping, got {short(values)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        dotted = f"{key}.{k}" if key else str(k)
        if k not in names:
            raise ConfigError(f"{dotted}: unknown key; allowed: {', '.join(names)}")
        kwargs[k] = _convert(v, hints[k], dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{key or cls.__name__}: {exc}") from None


def to_flat_dict(obj, prefix: str = "") -> dict[str, Any]:
    """``{"train.steps": 2000, ...}``: the resolved config as MLflow params."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value, key + "."))
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                out.update(to_flat_dict(item, f"{key}.{i}."))
        elif isinstance(value, Mapping) and any(isinstance(v, tuple) and v and dataclasses.is_dataclass(v[0])
                                                for v in value.values()):
            for name, items in value.items():
                for i, item in enumerate(items):
                    out.update(to_flat_dict(item, f"{key}.{name}.{i}."))
        else:
            out[key] = value
    return out


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


# --------------------------------------------------------------------------- loading
def project_names() -> list[str]:
    return projects.names()


def resolve_path(config: str) -> Path:
    """``addition`` -> the shipped project's config.yaml; a path to a YAML file or a project folder as given."""
    candidate = Path(config)
    if candidate.is_dir():
        candidate = candidate / CONFIG_FILE
    if candidate.is_file():
        return candidate
    named = projects.directory() / config / CONFIG_FILE
    if named.is_file():
        return named
    raise ConfigError(f"config: no project named {config!r} and no such file; projects: {', '.join(project_names())}")


MAX_CONFIG_BYTES = 1 << 20  # a project config is a page of YAML
MAX_YAML_ALIASES = 100  # anchors are handy for repeated data sources; an alias bomb needs many more


def _read_yaml(path: Path):
    """The YAML document in ``path``: a regular file of at most MAX_CONFIG_BYTES with at most MAX_YAML_ALIASES
    aliases (``*name``), so a "billion laughs" document is refused before it is expanded anywhere."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise ConfigError(f"{path}: more than {MAX_YAML_ALIASES} YAML aliases (*name); refusing it")
            return super().compose_node(parent, index)

    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes; a project config holds at most {MAX_CONFIG_BYTES}")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=BoundedLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())[:300]}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def load_project(config: str, overrides: Mapping[str, Any] | None = None, *, train_data: str | None = None,
                 eval_data: str | None = None) -> ProjectConfig:
    """Load a project by name or path, apply dotted ``overrides`` (``{"train.steps": 100}``) and data
    files (see :func:`with_data_files`), validate."""

    path = resolve_path(config)
    raw = _read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw.setdefault("name", path.parent.name)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {part} is not a section")
        node[leaf] = value
    raw["base_dir"] = str(path.parent.resolve())
    data_t = raw.get("data", {}).get("template") if isinstance(raw.get("data"), dict) else None
    gen_t = raw.get("generation", {}).get("prompt_template") if isinstance(raw.get("generation"), dict) else None
    if data_t is not None and gen_t is not None and data_t != gen_t:
        raise _template_conflict(data_t, gen_t)
    cfg = with_data_files(from_dict(ProjectConfig, raw), train_data, eval_data)
    validate(cfg)
    return cfg


def with_data_files(cfg: ProjectConfig, train_data: str | None, eval_data: str | None) -> ProjectConfig:
    """Replace the project's data by files (train_data alone: a seeded split holds out the eval set)."""
    data = cfg.data
    if train_data:
        data = dataclasses.replace(data, train=(DataSource(path=str(Path(train_data).absolute())),), eval=())
    if eval_data:
        data = dataclasses.replace(data, eval=(DataSource(path=str(Path(eval_data).absolute())),))
    return dataclasses.replace(cfg, data=data)


def validate(cfg: ProjectConfig) -> None:
    """What spans two stages, or needs the data files in place (given on the command line after the
    project is built). Each config checks its own values when built (``__post_init__``); what needs
    the data itself (batch vs dataset size, sequence length) is checked by ``pipeline.prepare``."""
    if not cfg.data.train:
        raise ConfigError("data.train: no training data: give a file (train_data) or a generator")
    g, m = cfg.generation, cfg.model
    if cfg.data.template == "chat" and not m.init_from:
        raise ConfigError("data.template: 'chat' renders prompts with a checkpoint's chat template; set model.init_from")
    if cfg.train.lora is not None and cfg.train.lora.save == "adapters" and not m.init_from:
        raise ConfigError("train.lora.save: 'adapters' logs the adapters with a reference to their base checkpoint; "
                          "set model.init_from (or save: merged)")
    if g.max_new_tokens >= m.max_seq_len:
        raise ConfigError(f"generation.max_new_tokens: {g.max_new_tokens} leaves no room for a prompt in "
                          f"model.max_seq_len={m.max_seq_len}")
    # Before any run starts: a model that cannot train in this machine's memory is one line, not a swap storm.
    # Here the weights, optimizer state and a batch of single positions; pipeline.prepare checks again at the
    # training data's own length (batches are as long as the longest example, rarely max_seq_len: the
    # reasoning project's 2048 would have asked for 20 GiB for batches of 224 positions).
    check_memory(m, batch_size=cfg.train.batch_size, training=True, seq_len=1)
