"""Tests for mlflow_tunix.data: real tunix-rt files, real bad files, real MLflow store."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURES
from mlflow_tunix import data, generators
from mlflow_tunix.data import Example
from mlflow_tunix.errors import ConfigError, DataError



@pytest.fixture
def tunix_rt() -> Path:
    if not (FIXTURES / "dev-reasoning-v2.jsonl").exists():
        pytest.skip(f"tunix-rt fixtures not found at {FIXTURES}")
    return FIXTURES


# ------------------------------------------------------------------------------------------
# Reading the three formats


def test_read_trace_file(tunix_rt):
    examples = data.read_jsonl(tunix_rt / "dev-reasoning-v2.jsonl")
    manifest = json.loads((tunix_rt / "dev-reasoning-v2.manifest.json").read_text())
    assert len(examples) == manifest["trace_count"] == 550
    summary = data.summarize(examples)
    assert summary["categories"] == manifest["stats"]["composition"]
    assert summary["format"] == "train" and summary["with_completion"] == 550

    first = examples[0]  # line 1 of the file, steps rendered in order of "i"
    assert first.id == "dev-reasoning-v2-1"  # tunix-rt traces carry no id: file stem + line
    assert first.prompt == "Reverse the string: 'reason'"
    assert first.completion == (
        "<reasoning>Take each character from end to start of 'reason'\n"
        "Reversed: 'nosaer'</reasoning><answer>nosaer</answer>"
    )
    assert first.answer == "nosaer" and first.category == "synthetic"
    assert first.source == f"{tunix_rt / 'dev-reasoning-v2.jsonl'}:1"
    assert first.meta["task_type"] == "string_reverse"
    for ex in examples:
        assert data.is_well_formed(ex.completion)
        assert data.parse_answer(ex.completion) == ex.answer
    assert len({ex.id for ex in examples}) == 550


def test_read_eval_items(tunix_rt):
    v2 = data.read_jsonl(tunix_rt / "eval_v2.jsonl")
    assert len(v2) == 100
    assert all(ex.completion is None and ex.category for ex in v2)
    assert v2[0] == Example("eval-v2-001", "What is 15 + 27?", None, "42", "arithmetic")
    assert v2[0].meta == {"difficulty": "easy", "section": "core"}
    assert {ex.meta["section"] for ex in v2} == {"core", "trace_sensitive", "edge_case"}
    summary = data.summarize(v2)
    assert summary["format"] == "eval" and summary["with_completion"] == 0
    assert summary["categories"]["arithmetic"] == 35 and sum(summary["categories"].values()) == 100

    v1 = data.read_jsonl(tunix_rt / "eval_v1.jsonl")
    assert len(v1) == 25 and v1[0].id == "eval-001" and "section" not in v1[0].meta


def test_read_completion_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(
        '{"prompt": "2+2?", "completion": "<reasoning>2+2=4</reasoning><answer> 4 </answer>"}\n'
        "\n"  # blank lines are skipped but still counted
        '{"prompt": "Capital of France?", "completion": " Paris ", "id": "q2", "category": "geo"}\n',
        encoding="utf-8",
    )
    a, b = data.read_jsonl(path)
    assert a == Example("sft-1", "2+2?", "<reasoning>2+2=4</reasoning><answer> 4 </answer>", "4")
    assert b == Example("q2", "Capital of France?", "<reasoning></reasoning><answer>Paris</answer>", "Paris", "geo")
    assert b.source == f"{path}:3"


def test_trace_details(tmp_path):
    path = tmp_path / "t.jsonl"
    records = [
        # steps out of order are sorted by "i"; a numeric answer is kept as its str()
        {"prompt": "p1", "steps": [{"i": 1, "content": "b"}, {"i": 0, "content": "a"}], "final_answer": 7},
        {"prompt": "p2", "steps": [], "final_answer": "x", "meta": {"id": 12, "category": "c"}},
    ]
    data.write_jsonl(records, path)
    one, two = data.read_jsonl(path)
    assert one.completion == "<reasoning>a\nb</reasoning><answer>7</answer>" and one.answer == "7"
    assert one.category is None and one.meta == {}
    assert two.id == "12" and two.category == "c"
    assert two.completion == "<reasoning></reasoning><answer>x</answer>"


def test_utf8_bom_and_crlf(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "caf\xc3\xa9?", "expected_answer": "ok"}\r\n')
    [ex] = data.read_jsonl(path)
    assert ex.prompt == "café?"


def test_write_jsonl_round_trip(tmp_path):
    records = generators.generate("high-card", 20, seed=5)
    data.write_jsonl(records, tmp_path / "sub" / "hc.jsonl")
    from_file = data.read_jsonl(tmp_path / "sub" / "hc.jsonl")
    in_memory = data.examples_from_records(records, "generator:high-card")
    assert from_file == in_memory  # equality ignores source and meta
    assert from_file[0].source != in_memory[0].source
    assert in_memory[3].source == "generator:high-card#4"
    assert data.digest(from_file) == data.digest(in_memory)


# ------------------------------------------------------------------------------------------
# Errors: one line, "file:line: message", path as the caller gave it

TRACE = '{"prompt": "p", "steps": [{"i": 0, "content": "s"}], "final_answer": "a"}'
EVAL = '{"id": "%s", "prompt": "p", "expected_answer": "a"}'

BAD_FILES = [
    (TRACE + "\n" + '{"prompt": "p", "steps": []}', "train.jsonl:2: 'final_answer' is missing"),
    (TRACE + "\n\n" + '{"prompt": "p", "steps": [], "final_answer": "a"', "train.jsonl:3: invalid JSON: Expecting ',' delimiter (column 49)"),
    ("[1, 2]", "train.jsonl:1: record must be a JSON object, got list"),
    ('{"question": "p"}', "train.jsonl:1: cannot tell the record's format"),
    ('{"prompt": "", "steps": [], "final_answer": "a"}', "train.jsonl:1: 'prompt' is empty"),
    ('{"prompt": 3, "steps": [], "final_answer": "a"}', "train.jsonl:1: 'prompt' must be a string, got int"),
    ('{"steps": [], "final_answer": "a"}', "train.jsonl:1: 'prompt' is missing"),
    ('{"prompt": "p", "steps": "s", "final_answer": "a"}', "train.jsonl:1: 'steps' must be a list, got string"),
    ('{"prompt": "p", "steps": ["s"], "final_answer": "a"}', "train.jsonl:1: 'steps[0]' must be an object, got string"),
    ('{"prompt": "p", "steps": [{"i": 0}], "final_answer": "a"}', "train.jsonl:1: 'steps[0].content' is missing"),
    ('{"prompt": "p", "steps": [{"content": 1}], "final_answer": "a"}', "train.jsonl:1: 'steps[0].content' must be a string, got int"),
    ('{"prompt": "p", "steps": [{"i": "0", "content": "s"}], "final_answer": "a"}', "train.jsonl:1: 'steps[0].i' must be an integer, got string"),
    ('{"prompt": "p", "steps": [{"content": "<answer>"}], "final_answer": "a"}', "train.jsonl:1: 'steps[0].content' contains the tag '<answer>'"),
    ('{"prompt": "p", "steps": [], "final_answer": true}', "train.jsonl:1: 'final_answer' must be a string or a number, got bool"),
    ('{"prompt": "p", "steps": [], "final_answer": ["a"]}', "train.jsonl:1: 'final_answer' must be a string or a number, got list"),
    ('{"prompt": "p", "steps": [], "final_answer": " "}', "train.jsonl:1: 'final_answer' is empty"),
    ('{"prompt": "p", "steps": [], "final_answer": "a", "meta": []}', "train.jsonl:1: 'meta' must be an object, got list"),
    ('{"prompt": "p", "steps": [], "final_answer": "a", "meta": {"category": 1.5}}', "train.jsonl:1: 'meta.category' must be a string, got float"),
    (TRACE + "\n" + EVAL % "x", "train.jsonl:2: record is in eval format but the file is in trace format (line 1)"),
    ((EVAL % "x") + "\n" + (EVAL % "y") + "\n" + (EVAL % "x"), "train.jsonl:3: duplicate id 'x' (also on line 1)"),
    ('{"id": "x", "prompt": "p"}', "train.jsonl:1: cannot tell the record's format"),
    ('{"id": "x", "prompt": "p", "expected_answer": null}', "train.jsonl:1: 'expected_answer' must be a string or a number, got null"),
    ('{"id": ["x"], "prompt": "p", "expected_answer": "a"}', "train.jsonl:1: 'id' must be a string, got list"),
    ('{"prompt": "p", "completion": "<answer>a"}', "train.jsonl:1: 'completion' has an <answer> tag but no closed"),
    ('{"prompt": "p", "completion": 5}', "train.jsonl:1: 'completion' must be a string, got int"),
]


@pytest.mark.parametrize("text, message", BAD_FILES)
def test_bad_records(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    Path("train.jsonl").write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as err:
        data.read_jsonl("train.jsonl")  # relative path stays relative in the message
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
    assert err.value.path == "train.jsonl"


def test_file_level_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^nope\.jsonl: file not found$"):
        data.read_jsonl("nope.jsonl")
    Path("empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"^empty\.jsonl: no records"):
        data.read_jsonl("empty.jsonl")
    Path("blank.jsonl").write_bytes(b"\n  \n\t\n")
    with pytest.raises(DataError, match=r"^blank\.jsonl: no records"):
        data.read_jsonl("blank.jsonl")
    Path("dir.jsonl").mkdir()
    with pytest.raises(DataError, match=r"^dir\.jsonl: is a directory"):
        data.read_jsonl("dir.jsonl")
    Path("latin1.jsonl").write_bytes((EVAL % "x").encode() + b'\n{"id": "y", "prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"^latin1\.jsonl:2: not valid UTF-8 \(invalid continuation byte at byte 26\)$"):
        data.read_jsonl("latin1.jsonl")


def test_records_errors_name_the_source():
    records = [json.loads(EVAL % "a"), {"id": "b", "prompt": "p", "expected_answer": {}}]
    with pytest.raises(DataError, match=r"^generator:x:2: 'expected_answer' must be a string or a number, got object$"):
        data.examples_from_records(records, "generator:x")
    with pytest.raises(DataError, match=r"^mem: no records"):
        data.examples_from_records([], "mem")


@settings(derandomize=True, max_examples=50, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_read_or_data_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(blob)
    try:
        examples = data.read_jsonl(path)
    except DataError as e:
        assert str(e).startswith(str(path))
    else:
        assert examples and all(isinstance(ex, Example) for ex in examples)


@settings(derandomize=True, max_examples=50, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["prompt", "steps", "final_answer", "meta", "id",
                                                 "completion", "expected_answer", "category"]),
                                st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                                             lambda kids: st.lists(kids, max_size=3)
                                             | st.dictionaries(st.sampled_from(["i", "content", "id", "category"]), kids, max_size=3),
                                             max_leaves=6),
                                max_size=6),
                max_size=4))
def test_any_json_records_read_or_data_error(tmp_path_factory, records):
    # Random but JSON-valid records reach the field checks, which bytes rarely do.
    path = tmp_path_factory.mktemp("fuzz") / "r.jsonl"
    data.write_jsonl(records, path)
    try:
        examples = data.read_jsonl(path)
    except DataError:
        return
    for ex in examples:
        assert ex.completion is None or data.parse_answer(ex.completion) == ex.answer


# ------------------------------------------------------------------------------------------
# Rendering and parsing


def test_render_and_parse():
    text = data.render_completion(["4+7+0=11", "3+6+1=10"], "101")
    assert text == "<reasoning>4+7+0=11\n3+6+1=10</reasoning><answer>101</answer>"
    assert data.parse_answer(text) == "101"
    assert data.parse_reasoning(text) == "4+7+0=11\n3+6+1=10"
    assert data.render_completion([], "x") == "<reasoning></reasoning><answer>x</answer>"
    assert data.parse_answer("junk <answer> 5 </answer> <answer>6</answer>") == "5"
    assert data.parse_answer("<answer>5") is None  # not closed: the model stopped early
    assert data.parse_answer("no tags") is None
    assert data.parse_reasoning("<reasoning>abc") is None

    assert data.render_prompt("Hi?") == "Hi?\n"
    assert data.render_prompt("{x}", "gemma") == "<start_of_turn>user\n{x}<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(ConfigError, match="'chatml'.*plain, gemma"):
        data.render_prompt("Hi?", "chatml")


@pytest.mark.parametrize(
    "text, ok",
    [
        ("<reasoning>r</reasoning><answer>a</answer>", True),
        ("  \n<reasoning></reasoning><answer>a</answer>\n ", True),
        ("<reasoning>line1\nline2</reasoning><answer>a b</answer>", True),
        ("<reasoning>r</reasoning><answer> </answer>", False),
        ("<reasoning>r</reasoning> <answer>a</answer>", False),
        ("<reasoning>r</reasoning><answer>a</answer>tail", False),
        ("<reasoning>r</reasoning><answer>a</answer><answer>b</answer>", False),
        ("<reasoning>r<reasoning>s</reasoning><answer>a</answer>", False),
        ("<answer>a</answer>", False),
        ("<reasoning>r</reasoning><answer>a", False),
        ("", False),
    ],
)
def test_is_well_formed(text, ok):
    assert data.is_well_formed(text) is ok


def test_answers_match():
    assert data.answers_match("  Paris ", "paris")
    assert data.answers_match("42", "42")
    assert not data.answers_match("42.0", "42")
    assert not data.answers_match(None, "42")
    assert not data.answers_match("", "42")


# ------------------------------------------------------------------------------------------
# Generators


@pytest.mark.parametrize("name", sorted(generators.GENERATORS))
def test_generators_are_deterministic(name):
    a = generators.generate(name, 40, seed=7)
    assert a == generators.generate(name, 40, seed=7)
    assert a != generators.generate(name, 40, seed=8)
    assert len(a) == 40
    assert [r["meta"]["index"] for r in a] == list(range(40))
    assert all(r["meta"]["generator"] == name and r["meta"]["seed"] == 7 for r in a)
    examples = data.examples_from_records(a, f"generator:{name}")  # valid trace records
    assert all(data.is_well_formed(ex.completion) for ex in examples)
    assert [ex.category for ex in examples] == [r["meta"]["category"] for r in a]


@pytest.mark.parametrize(
    "a, b, steps",
    [
        (1234, 567, ["4+7+0=11", "3+6+1=10", "2+5+1=8", "1+0+0=1"]),
        (999, 1, ["9+1+0=10", "9+0+1=10", "9+0+1=10"]),  # the last sum carries into a new digit
        (5, 5, ["5+5+0=10"]),
        (0, 0, ["0+0+0=0"]),
        (38, 4096, ["8+6+0=14", "3+9+1=13", "0+0+1=1", "0+4+0=4"]),  # shorter operand first
    ],
)
def test_addition_steps_by_hand(a, b, steps):
    assert generators.addition_steps(a, b) == steps


def _check_addition_record(r):
    """Re-derive everything from the prompt with Python arithmetic and string reading."""
    a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", r["prompt"]).groups())
    assert r["final_answer"] == str(a + b)
    steps = [s["content"] for s in r["steps"]]
    assert len(steps) == max(len(str(a)), len(str(b)))
    carry, digits = 0, []
    for k, step in enumerate(steps):
        x, y, c, s = map(int, re.fullmatch(r"(\d)\+(\d)\+([01])=(\d+)", step).groups())
        assert (x, y, c) == ((a // 10**k) % 10, (b // 10**k) % 10, carry)
        assert s == x + y + c
        carry = s // 10
        digits.append(str(s) if k == len(steps) - 1 else str(s % 10))
    assert "".join(reversed(digits)) == str(a + b)  # the answer can be read off the steps
    return a, b


def test_addition_records():
    records = generators.generate("addition", 500, seed=3)
    pairs = [_check_addition_record(r) for r in records]
    assert len(set(pairs)) == 500
    for (a, b), r in zip(pairs, records):
        assert all(1 <= len(str(x)) <= 4 for x in (a, b))  # str() has no leading zeros
        assert r["meta"]["category"] == f"{max(len(str(a)), len(str(b)))}-digit"
    lengths = {(len(str(a)), len(str(b))) for a, b in pairs}
    assert (1, 4) in lengths and (4, 1) in lengths  # lengths are drawn independently
    assert len(generators.generate("addition", seed=0)) == 1000


def test_addition_options():
    small = generators.generate("addition", 100, seed=1, digits=(1, 1))
    assert {_check_addition_record(r) for r in small} == {(a, b) for a in range(10) for b in range(10)}
    three = generators.generate("addition", 30, seed=1, digits=3, trace=False)
    for r in three:
        a, b = map(int, re.findall(r"\d+", r["prompt"]))
        assert 100 <= a <= 999 and 100 <= b <= 999 and r["steps"] == [] and r["final_answer"] == str(a + b)
    with pytest.raises(ConfigError, match="allows only 100 distinct pairs"):
        generators.generate("addition", 101, digits=(1, 1))
    with pytest.raises(ConfigError, match="digits must be"):
        generators.generate("addition", 5, digits=(3, 2))
    with pytest.raises(ConfigError, match=r"unknown option 'carry' for generator 'addition' \(allowed: digits, trace\)"):
        generators.generate("addition", 5, carry=True)
    with pytest.raises(ConfigError, match=r"unknown generator 'mult' \(allowed: addition, golden-v2, high-card, reasoning\)"):
        generators.generate("mult")
    with pytest.raises(ConfigError, match="n must be a positive integer"):
        generators.generate("addition", 0)


def test_golden_v2():
    records = generators.generate("golden-v2", seed=42)
    assert len(records) == 100
    examples = data.examples_from_records(records, "generator:golden-v2")
    assert data.summarize(examples)["categories"] == {"arithmetic": 50, "repeat": 50}
    for r in records[:50]:
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", r["prompt"]).groups())
        assert 1 <= a <= 100 and 1 <= b <= 100 and r["final_answer"] == str(a + b)
        assert r["steps"][0]["content"] == f"Calculating {a} + {b} = {a + b}"
    for r in records[50:]:
        w, k = re.fullmatch(r"Repeat '(\w+)' (\d) times", r["prompt"]).groups()
        assert w in generators.GOLDEN_WORDS and 2 <= int(k) <= 5
        assert r["final_answer"].split(" ") == [w] * int(k)
    odd = generators.generate("golden-v2", 7, seed=1)
    assert [r["meta"]["category"] for r in odd] == ["arithmetic"] * 3 + ["repeat"] * 4


def _winner_by_rules(prompt):
    """An independent judge: compare the hands' sorted rank values as tuples."""
    m = re.fullmatch(r"High card: (\w+) has (.+); (\w+) has (.+)\. Who wins\?", prompt)
    first, hand1, second, hand2 = m.groups()
    value = {r: v for v, r in enumerate("2 3 4 5 6 7 8 9 10 J Q K A".split(), start=2)}
    cards = hand1.split() + hand2.split()
    assert len(cards) == 6 and len(set(cards)) == 6 and all(c[-1] in "SHDC" for c in cards)
    v1 = sorted((value[c[:-1]] for c in hand1.split()), reverse=True)
    v2 = sorted((value[c[:-1]] for c in hand2.split()), reverse=True)
    assert first != second
    return first if v1 > v2 else second if v2 > v1 else "Tie"


def test_high_card_answers():
    records = generators.generate("high-card", 3000, seed=0)
    categories = set()
    for r in records:
        assert r["final_answer"] == _winner_by_rules(r["prompt"])
        steps = [s["content"] for s in r["steps"]]
        assert steps[-1] == ("Tie" if r["final_answer"] == "Tie" else f"{r['final_answer']} wins")
        decided = r["meta"]["category"]
        categories.add(decided)
        n_compared = 3 if decided == "tie" else int(decided.rsplit("-", 1)[1])
        assert len(steps) == 2 + n_compared + 1  # two hands, the comparisons, the verdict
    assert {"decided-by-card-1", "decided-by-card-2", "decided-by-card-3"} <= categories


def test_high_card_steps_by_hand():
    steps, answer, category = generators.high_card_steps(
        "Alice", [("3", "S"), ("K", "H"), ("9", "D")], "Bob", [("2", "C"), ("7", "S"), ("K", "D")]
    )
    assert steps == ["Alice: K(13) 9(9) 3(3)", "Bob: K(13) 7(7) 2(2)", "13 = 13", "9 > 7", "Alice wins"]
    assert (answer, category) == ("Alice", "decided-by-card-2")
    steps, answer, category = generators.high_card_steps(
        "Carol", [("A", "S"), ("10", "H"), ("2", "D")], "Dave", [("A", "C"), ("10", "S"), ("2", "S")]
    )
    assert steps[0] == "Carol: A(14) 10(10) 2(2)" and steps[2:] == ["14 = 14", "10 = 10", "2 = 2", "Tie"]
    assert (answer, category) == ("Tie", "tie")
    steps, answer, _ = generators.high_card_steps("Bob", [("4", "S"), ("2", "H"), ("3", "D")], "Dave", [("5", "C"), ("2", "S"), ("3", "S")])
    assert steps[2:] == ["4 < 5", "Dave wins"] and answer == "Dave"


# ------------------------------------------------------------------------------------------
# Split, digest, overlap


def _examples(n):
    return data.examples_from_records(generators.generate("addition", n, seed=11), "generator:addition")


def test_split():
    examples = _examples(95)
    train, evals = data.split(examples, 0.1, seed=4)
    assert (len(train), len(evals)) == (85, 10)  # round(9.5) == 10
    assert (train, evals) == data.split(examples, 0.1, seed=4)
    assert evals != data.split(examples, 0.1, seed=5)[1]
    assert {ex.id for ex in train}.isdisjoint(ex.id for ex in evals)
    assert sorted(ex.id for ex in train + evals) == sorted(ex.id for ex in examples)
    assert [ex.id for ex in train] == [ex.id for ex in examples if ex in set(train)]  # input order kept
    assert [len(p) for p in data.split(examples[:3], 0.01)] == [2, 1]  # at least one eval item
    with pytest.raises(ConfigError, match="eval_fraction"):
        data.split(examples, 1.0)
    with pytest.raises(ConfigError, match="at least 2"):
        data.split(examples[:1])


def test_digest(tunix_rt):
    examples = data.read_jsonl(tunix_rt / "eval_v2.jsonl")
    d = data.digest(examples)
    assert re.fullmatch(r"[0-9a-f]{64}", d)
    # Pinned: the digest is a contract (runs compare it); change it only on purpose.
    assert d == "a064cddeea6d86ab" + d[16:]
    assert data.digest(data.read_jsonl(tunix_rt / "eval_v2.jsonl")) == d
    changed = list(examples)
    changed[50] = replace(changed[50], answer=changed[50].answer + " ")
    assert data.digest(changed) != d
    assert data.digest(examples[::-1]) != d
    recategorized = [replace(examples[0], category=None)] + examples[1:]
    assert data.digest(recategorized) != d
    # source and meta are provenance, not content
    moved = [replace(ex, source="elsewhere", meta={}) for ex in examples]
    assert data.digest(moved) == d


def test_drop_overlap(tunix_rt):
    held = data.read_jsonl(tunix_rt / "eval_v2.jsonl")[:3]
    train = _examples(5) + [
        Example("t1", "  " + held[0].prompt + "\n", "<reasoning></reasoning><answer>42</answer>", "42"),
        Example("t2", held[2].prompt.lower(), "<reasoning></reasoning><answer>56</answer>", "56"),
    ]
    kept, dropped = data.drop_overlap(train, held)
    assert dropped == 1 and [ex.id for ex in kept] == [ex.id for ex in train if ex.id != "t1"]
    assert data.drop_overlap(train, []) == (train, 0)


# ------------------------------------------------------------------------------------------
# MLflow


def test_to_mlflow_dataset_logged(tunix_rt, tmp_path):
    from mlflow_tunix import runs

    import mlflow

    eval_path = tunix_rt / "eval_v2.jsonl"
    evals = data.read_jsonl(eval_path)
    train = _examples(30)
    train_ds = runs.to_mlflow_dataset(train, "addition", "generator:addition?n=30&seed=11")
    eval_ds = runs.to_mlflow_dataset(evals, "eval_v2", str(eval_path))
    assert list(train_ds.df.columns) == ["id", "prompt", "completion", "answer", "category"]
    assert train_ds.df["answer"].tolist() == [ex.answer for ex in train]
    assert eval_ds.df["completion"].isna().all()

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        mlflow.set_experiment("data-test")
        with mlflow.start_run() as run:
            mlflow.log_input(train_ds, context="train")
            mlflow.log_input(eval_ds, context="eval")
        inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    finally:
        mlflow.set_tracking_uri(None)
    logged = {i.dataset.name: i for i in inputs}
    assert set(logged) == {"addition", "eval_v2"}
    assert logged["addition"].dataset.digest == data.digest(train)[:16]
    assert logged["eval_v2"].dataset.digest == data.digest(evals)[:16]
    assert {t.key: t.value for t in logged["addition"].tags}["mlflow.data.context"] == "train"
    assert {t.key: t.value for t in logged["eval_v2"].tags}["mlflow.data.context"] == "eval"
    assert logged["eval_v2"].dataset.source_type == "local"
    assert json.loads(logged["eval_v2"].dataset.source) == {"uri": str(eval_path)}
    assert logged["addition"].dataset.source_type == "code"
    assert "generator:addition?n=30&seed=11" in logged["addition"].dataset.source
    assert json.loads(logged["eval_v2"].dataset.profile)["num_rows"] == 100


def test_import_is_light():
    code = "import sys, mlflow_tunix.data; print(sorted({'mlflow', 'pandas', 'jax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
