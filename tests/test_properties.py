"""Property-based tests: whatever a user feeds the readers and parsers, the answer is a result or
the documented one-line error (DataError, ConfigError, InputError), never another exception.

Fixed seed (derandomize) and a bounded number of examples, so CI runs the same cases every time.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY
from mlflow_tunix import data
from mlflow_tunix.config import ProjectConfig, from_dict, load_project, to_flat_dict
from mlflow_tunix.errors import ConfigError, DataError, InputError, TunixError
from mlflow_tunix.tracking import read_spilled

FUZZ = settings(derandomize=True, max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON-ish values, including the awkward ones: huge and negative numbers, NaN/inf, unicode, nesting.
scalars = (st.none() | st.booleans() | st.integers(min_value=-10**30, max_value=10**30)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                         max_size=3), max_leaves=8)


# --------------------------------------------------------------------------- the dataset reader
def _trace(answer="5"):
    return {"trace_version": "1.0", "prompt": "What is 2+3?", "final_answer": answer, "meta": {"id": "a"},
            "steps": [{"i": 0, "type": "compute", "content": "2+3=5"}]}


@st.composite
def mutated_records(draw):
    """A valid record of one of the three formats with one field replaced, dropped or added."""
    record = draw(st.sampled_from([
        _trace(),
        {"prompt": "p", "completion": "<reasoning>r</reasoning><answer>1</answer>"},
        {"id": "e1", "prompt": "What is 1+1?", "expected_answer": "2", "category": "add"},
    ]))
    record = json.loads(json.dumps(record))
    action = draw(st.sampled_from(["replace", "drop", "add", "step"]))
    key = draw(st.sampled_from(sorted(record)))
    if action == "replace":
        record[key] = draw(values)
    elif action == "drop":
        del record[key]
    elif action == "add":
        record[draw(st.text(max_size=8))] = draw(values)
    elif "steps" in record:
        record["steps"] = draw(st.lists(st.dictionaries(st.sampled_from(["i", "type", "content", "x"]), values,
                                                        max_size=4), max_size=3) | values)
    return record


@FUZZ
@given(st.lists(mutated_records(), min_size=1, max_size=4))
def test_dataset_reader_returns_examples_or_a_data_error(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("reader") / "d.jsonl"
    # allow_nan: JSON files in the wild do hold NaN/Infinity (Python writes them).
    path.write_text("\n".join(json.dumps(r, allow_nan=True) for r in records) + "\n", encoding="utf-8")
    try:
        examples = data.read_jsonl(path)
    except DataError as exc:
        assert str(exc).startswith(str(path)), str(exc)  # names the file (and line)
        return
    assert len(examples) == len(records)
    for ex in examples:
        assert isinstance(ex.prompt, str) and ex.prompt.strip()
        assert ex.completion is None or isinstance(ex.completion, str)


# --------------------------------------------------------------------------- the config loader
KNOWN_KEYS = sorted(k for k in to_flat_dict(load_project(str(TINY))) if not k.startswith("data."))
SECTIONS = ["train", "model", "tokenizer", "generation", "data", "name", "registered_model_name"]


@st.composite
def override_keys(draw):
    kind = draw(st.sampled_from(["known", "section", "random"]))
    if kind == "known":
        return draw(st.sampled_from(KNOWN_KEYS))
    if kind == "section":
        return draw(st.sampled_from(SECTIONS)) + "." + draw(st.text(min_size=0, max_size=8))
    return draw(st.text(max_size=15))


@FUZZ
@given(st.dictionaries(override_keys(), values, min_size=1, max_size=4))
def test_config_overrides_load_or_raise_config_error(overrides):
    try:
        cfg = load_project(str(TINY), overrides)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip()
        return
    assert isinstance(cfg, ProjectConfig)
    # A config that loads is usable: its numbers are in range and its params can be logged.
    assert cfg.train.steps >= 1 and cfg.train.batch_size >= 1 and cfg.train.learning_rate > 0
    assert math.isfinite(cfg.train.learning_rate)
    assert all(isinstance(k, str) for k in to_flat_dict(cfg))


@FUZZ
@given(st.dictionaries(st.sampled_from(["name", "train", "model", "data", "generation", "tokenizer", "x"]),
                       values, max_size=4))
def test_config_from_any_mapping_builds_or_raises_config_error(raw):
    try:
        cfg = from_dict(ProjectConfig, raw)
    except ConfigError as exc:
        # One line that starts with the key at fault: a section of the input (dotted, as in
        # "train.steps: ..." or "data.train[0]: ..."), or the config itself for a missing field.
        message = str(exc)
        assert message and "\n" not in message.strip(), message
        key = message.split(": ")[0]
        assert key == "ProjectConfig" or key.split(".")[0].split("[")[0] in raw, (message, sorted(raw))
        return
    assert isinstance(cfg, ProjectConfig)
    assert cfg.name == str(raw["name"])  # the one required field, as given (a number as its str())
    assert all(isinstance(k, str) for k in to_flat_dict(cfg))


# --------------------------------------------------------------------------- the pyfunc input parser
flavor = pytest.importorskip("mlflow_tunix.flavor")

prompt_like = st.text(max_size=10) | scalars
inputs = st.one_of(
    prompt_like,
    st.lists(prompt_like, max_size=5),
    st.dictionaries(st.sampled_from(["prompt", "inputs", "x"]), prompt_like | st.lists(prompt_like, max_size=4),
                    max_size=2),
    st.lists(prompt_like, max_size=4).map(lambda xs: pd.DataFrame({"prompt": pd.Series(xs, dtype=object)})),
    st.lists(prompt_like, max_size=4).map(lambda xs: pd.Series(xs, dtype=object)),
    st.lists(prompt_like, max_size=4).map(lambda xs: np.array(xs, dtype=object)),
    st.lists(st.lists(st.text(max_size=5), max_size=3), min_size=1, max_size=3).map(
        lambda rows: pd.DataFrame({"prompt": pd.Series(rows, dtype=object)})),
)


@FUZZ
@given(inputs)
def test_pyfunc_input_parser_returns_prompts_or_input_error(payload):
    try:
        prompts = flavor._prompts_from(payload)
    except InputError as exc:
        assert str(exc)
        return
    assert prompts and all(isinstance(p, str) and p.strip() for p in prompts)
    assert len(prompts) <= flavor.MAX_PROMPTS_PER_REQUEST


@FUZZ
@given(st.dictionaries(st.sampled_from(["max_new_tokens", "temperature", "top_k", "seed", "batch_size",
                                        "prompt_template", "bogus"]), scalars, max_size=4))
def test_request_params_give_a_generation_config_or_input_error(overrides):
    from mlflow_tunix.generate import GenerationConfig

    base = GenerationConfig(max_new_tokens=16)
    try:
        config = flavor._generation_with(base, overrides, max_seq_len=64)
    except InputError:
        return
    assert 1 <= config.max_new_tokens < 64 and config.temperature >= 0 and config.top_k >= 0


# --------------------------------------------------------------------------- the unsent-metrics file
@FUZZ
@given(st.lists(st.one_of(
    st.builds(lambda k, v, t, s: json.dumps({"key": k, "value": v, "timestamp": t, "step": s}),
              st.text(max_size=6), st.floats(allow_nan=True), st.integers(0, 2**40), st.integers(0, 10**6)),
    st.text(max_size=30),
), max_size=5))
def test_spill_file_reader_returns_points_or_data_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("spill") / "unsent.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        points = read_spilled(path)
    except TunixError as exc:
        assert isinstance(exc, DataError) and str(exc).startswith(str(path))
        return
    assert all(isinstance(p.step, int) and isinstance(p.key, str) for p in points)


# --------------------------------------------------------------------------- numbers a float cannot hold
def test_a_number_too_big_for_a_float_is_a_config_error():
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_project(str(TINY), {"train.learning_rate": 10**400})


def test_an_infinite_temperature_is_refused_before_training():
    with pytest.raises(ConfigError, match="generation.temperature"):
        load_project(str(TINY), {"generation.temperature": float("inf")})


# --------------------------------------------------------------------------- raw JSONL text (issue 11)
# Lines as a user or an attacker writes them: escapes (lone surrogates), duplicate keys, deep nesting.
json_lines = st.one_of(
    st.builds(json.dumps, mutated_records()),
    st.builds(lambda k, a, b: f'{{"{k}": {json.dumps(a)}, "{k}": {json.dumps(b)}, "completion": "x"}}',
              st.sampled_from(["prompt", "completion", "x"]), st.text(max_size=4), st.text(max_size=4)),
    st.builds(lambda cp, tail: f'{{"prompt": "What is \\u{cp:04x}{tail}?", "completion": "<answer>1</answer>"}}',
              st.integers(0xD7F0, 0xE010), st.sampled_from(["", "\\udc00", "\\ud800", "a"])),
    st.builds(lambda n: "[" * n + "]" * n, st.integers(1, 3000)),
    st.text(max_size=40),
)


@FUZZ
@given(st.lists(json_lines, min_size=1, max_size=4))
def test_any_jsonl_text_reads_as_writable_examples_or_one_data_error(tmp_path_factory, lines):
    """Whatever read_jsonl accepts, training can use: every string encodes as UTF-8 (a lone surrogate
    used to pass `data validate` and crash `run`). Everything else is one DataError naming the line."""
    path = tmp_path_factory.mktemp("raw") / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        examples = data.read_jsonl(path)
    except DataError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc) and len(str(exc)) < 500
        return
    for ex in examples:
        ex.prompt.encode("utf-8")
        if ex.completion is not None:
            ex.completion.encode("utf-8")


# --------------------------------------------------------------------------- bounds (issue 11)
sizes = st.integers(-3, 300) | st.integers(10**5, 10**12) | st.floats(allow_nan=True) | st.text(max_size=5)


@FUZZ
@given(st.dictionaries(st.sampled_from(["model.d_model", "model.n_layers", "model.n_heads", "model.d_ff",
                                        "model.vocab_size", "model.max_seq_len", "train.steps", "train.batch_size",
                                        "train.seed"]), sizes, min_size=1, max_size=3))
def test_a_config_that_loads_is_within_the_ceilings_and_the_machine(overrides):
    from mlflow_tunix.model import MAX_SIZES, available_memory, memory_estimate
    from mlflow_tunix.train import MAX_STEPS

    try:
        cfg = load_project(str(TINY), overrides)
    except ConfigError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
        return
    m = cfg.model
    assert all(1 <= getattr(m, name) <= ceiling for name, ceiling in MAX_SIZES.items())
    assert 1 <= cfg.train.steps <= MAX_STEPS and 0 <= cfg.train.seed < 2**32
    # (at the data's own length pipeline.prepare checks again: the tiny project's examples are short)
    assert memory_estimate(m, batch_size=cfg.train.batch_size, training=True, seq_len=1) <= (available_memory() or math.inf)


@FUZZ
@given(st.sampled_from(["addition", "golden-v2", "high-card"]),
       st.integers(-2, 30) | st.integers(10**6 + 1, 10**30) | st.none(),
       st.none() | st.tuples(st.integers(-2, 8), st.integers(-2, 8)) | st.tuples(st.integers(0, 3), st.integers(101, 10**6)))
def test_generators_make_records_or_one_config_error(name, n, digits):
    from mlflow_tunix import generators

    options = {"digits": digits} if digits is not None and name == "addition" else {}
    try:
        records = generators.generate(name, n=n, **options)
    except ConfigError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 300
        return
    assert len(records) == (n if n is not None else len(records))


@FUZZ
@given(values)
def test_error_values_print_short(value):
    from mlflow_tunix.errors import short

    assert len(short(value)) <= 83


# --------------------------------------------------------------------------- the model-directory reader
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from conftest import tiny_model_and_tokenizer

    model, tokenizer = tiny_model_and_tokenizer()
    path = tmp_path_factory.mktemp("fuzz-model") / "model"
    flavor.save_model(model, path, tokenizer=tokenizer)
    return path


manifests = st.one_of(
    st.binary(max_size=60),
    st.builds(lambda v: json.dumps(v).encode(), values),
    st.builds(lambda files: json.dumps({"format_version": 2, "files": files}).encode(),
              st.dictionaries(st.sampled_from(["../x", "/etc/passwd", "tunix/config.json", "MLmodel", "", "a\\b"]),
                              values, max_size=3)),
    st.builds(lambda n: (b"[" * n + b"]" * n), st.integers(1, 5000)),
)


@FUZZ
@given(manifests)
def test_any_manifest_is_refused_with_one_model_load_error(saved_model, content):
    """A manifest MLmodel vouches for (its sha256 updated, as an attacker would) but not written by a save."""
    import hashlib

    from mlflow.models import Model

    from mlflow_tunix.errors import ModelLoadError

    manifest, mlmodel = saved_model / "tunix" / "manifest.json", saved_model / "MLmodel"
    original = manifest.read_bytes(), mlmodel.read_bytes()
    try:
        manifest.write_bytes(content)
        conf = Model.load(str(mlmodel))
        conf.flavors["mlflow_tunix"]["manifest_sha256"] = hashlib.sha256(content).hexdigest()
        conf.save(str(mlmodel))
        with pytest.raises(ModelLoadError) as err:
            flavor._verified(saved_model, allow_code=False)
        assert "\n" not in str(err.value) and len(str(err.value)) < 600
    finally:
        manifest.write_bytes(original[0])
        mlmodel.write_bytes(original[1])
