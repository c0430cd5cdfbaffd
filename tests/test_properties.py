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
