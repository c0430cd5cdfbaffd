"""The `reasoning` project: tunix-rt's dev-reasoning-v2 families from our generators.

Each family's answers are checked against an answer computed here, independently, the way tunix-rt
computes and formats it (``str(round(x, 2))``, "$", " km"); each scratchpad is executed by a small
checker that verifies every written equation and that the steps lead to the answer. Then the project
itself runs end to end on a tiny model, and tunix-rt's own file is scored per family.
"""

from __future__ import annotations

import re

import pytest
from mlflow.tracking import MlflowClient

from conftest import FIXTURES

from mlflow_tunix import data, generators
from mlflow_tunix.errors import ConfigError

FAMILIES = sorted(generators.REASONING_FAMILIES)
FIXTURE = FIXTURES / "dev-reasoning-v2.jsonl"


@pytest.fixture(scope="module")
def records():
    return generators.generate("reasoning", n=6000, seed=11)


def by_family(records, family):
    chosen = [r for r in records if r["meta"]["category"] == family]
    assert len(chosen) > 200, family
    return chosen


def numbers(prompt):
    return [int(x) for x in re.findall(r"\d+", prompt)]


def steps_of(record):
    return [s["content"] for s in record["steps"]]


# ------------------------------------------------------------------ the scratchpad checker
EQUATION = re.compile(r"(\d+)([*+/-])(\d+)(?:([+-])(\d+))?=(-?\d+)(?: r(\d+))?")


def check_equations(line: str) -> None:
    """Every "x*d+c=v", "x+y+c=s", "x-y-b=v" (x may carry a borrowed 10) and "x/n=q rR" holds."""
    for x, op, y, op2, z, v, r in EQUATION.findall(line):
        x, y, v = int(x), int(y), int(v)
        if op == "/":
            assert x // y == v and (r == "" or x % y == int(r)), line  # "x/n=q rR" or "x/n=q x-m=R"
            continue
        value = {"*": x * y, "+": x + y, "-": x - y}[op]
        if op2:
            value = value + int(z) if op2 == "+" else value - int(z)
        assert value == v, line


def column_result(line: str) -> int:
    """The number a column line assembles: its written "=N" must equal the columns read as digits
    (the last column's value in full, the others' last digits, right to left)."""
    cols = [int(v) for v in re.findall(r"=(\d+)(?= |$)", line.split(": ", 1)[1])[:-1]]
    assembled = int(str(cols[-1]) + "".join(str(c % 10) for c in reversed(cols[:-1])))
    written = int(line.rsplit("=", 1)[1])
    assert assembled == written, line
    return written


def check_comparison(line: str) -> bool:
    """A subtraction's first line "a?b: 7=7 2<5 so a<b so -(b-a)": the digit pairs are a's and b's
    (zero-padded) from the left up to the first that differ, each sign right, and the verdict
    follows from them. Returns whether it says a < b."""
    head, rest = line.split(": ", 1)
    a, b = head.split("?")
    width = max(len(a), len(b))
    pairs = rest.split(" so ")[0].split()
    for k, pair in enumerate(pairs):
        x, sign, y = pair
        assert (x, y) == (a.zfill(width)[k], b.zfill(width)[k]), line
        assert sign == ("=" if x == y else "<" if x < y else ">"), line
        assert sign == "=" or k == len(pairs) - 1, line  # it stops at the first pair that differs
    assert pairs[-1][1] != "=" or len(pairs) == width, line
    less = pairs[-1][1] == "<"
    assert less == (int(a) < int(b))
    assert rest.endswith(f"so {a}<{b} so -({b}-{a})" if less else f"so {a}>={b}"), line
    return less


def arithmetic_value(steps) -> int:
    """Execute an arithmetic scratchpad: check each line, return the number it ends on (signed)."""
    for line in steps:
        check_equations(line)
    value = column_result(steps[-1])
    if "?" in steps[0] and check_comparison(steps[0]):
        value = -value
    return value


# ------------------------------------------------------------------ answers, family by family
def test_distance(records):
    for r in by_family(records, "distance"):
        s, t = numbers(r["prompt"])
        unit = "miles" if "mph" in r["prompt"] else "km"
        assert r["final_answer"] == f"{s * t} {unit}"
        assert f"{arithmetic_value(steps_of(r))} {unit}" == r["final_answer"]


def test_percent(records):
    for r in by_family(records, "percent"):
        p, b = numbers(r["prompt"])
        assert r["final_answer"] == str(round(p / 100 * b, 2)), r["prompt"]  # tunix-rt's float formatting
        steps = steps_of(r)
        product = arithmetic_value(steps[:-1])
        assert steps[-1] == f"{product}/100={r['final_answer']}"
        assert float(r["final_answer"]) * 100 == pytest.approx(product)


def test_unit_cost(records):
    for r in by_family(records, "unit_cost"):
        n, t = numbers(r["prompt"])
        assert r["final_answer"] == f"${round(t / n, 2)}", r["prompt"]
        steps = steps_of(r)
        assert steps[0] == f"{n}: " + " ".join(f"{k}:{k * n}" for k in range(1, 10))  # n's multiples
        check_equations(steps[1])
        columns = re.findall(r"(\d+)/\d+=(\d+) (\d+)-(\d+)=(\d+)", steps[1])
        assert all(x == y and int(m) == int(q) * n for x, q, y, m, _ in columns), steps[1]  # x - q*n
        quotient = int("".join(q for _, q, _, _, _ in columns))  # the quotient digits, in order
        assert steps[2].startswith(f"={quotient // 1000}.{quotient % 1000:03d} r")
        rounded = steps[-1].rsplit("=", 1)[-1] if "+0.01=" in steps[-1] else steps[-1].split(": ")[1]
        assert "$" + str(float(rounded)) == r["final_answer"]


@pytest.mark.parametrize("family, op", [("add_steps", "+"), ("subtract_steps", "-"), ("multiply_steps", "*"),
                                        ("arithmetic", None)])
def test_two_number_arithmetic(records, family, op):
    for r in by_family(records, family):
        a, b = numbers(r["prompt"])[:2]
        if r["prompt"].startswith("Subtract"):  # "Subtract b from a"
            a, b = b, a
        symbol = op or re.search(r"\d+ ([-+*]) \d+", r["prompt"]).group(1)
        expected = {"+": a + b, "-": a - b, "*": a * b}[symbol]
        assert r["final_answer"] == str(expected)
        assert arithmetic_value(steps_of(r)) == expected, steps_of(r)


def test_logic(records):
    chosen = by_family(records, "logic")
    assert {r["final_answer"] for r in chosen} == {"Yes", "No"}
    for r in chosen:
        cls = re.search(r"[Aa]ll (\w+) are", r["prompt"]).group(1)
        said = re.search(r"which is a (\w+)", r["prompt"]).group(1)
        assert r["final_answer"] == ("Yes" if said == cls[:-1] else "No")
        left, right, verdict = steps_of(r)[0].split()
        assert (left, right) == (said, cls[:-1] + ":")
        assert verdict == ("same" if r["final_answer"] == "Yes" else "different")
    # the cut letter is not always an "s" (tunix-rt's "fish" -> "fis")
    cut = [re.search(r"[Aa]ll (\w+) are", r["prompt"]).group(1)[-1] for r in chosen]
    assert cut.count("s") < 0.9 * len(cut)


def quoted(prompt):
    return re.search(r"'([a-z]+)'", prompt).group(1)


def test_string_reverse(records):
    for r in by_family(records, "string_reverse"):
        w = quoted(r["prompt"])
        assert r["final_answer"] == w[::-1]
        forward, backward = steps_of(r)
        assert forward == " ".join(f"{i}{c}" for i, c in enumerate(w, 1))
        assert backward.split() == forward.split()[::-1]
        assert "".join(tok.lstrip("0123456789") for tok in backward.split()) == r["final_answer"]


def test_string_sort(records):
    for r in by_family(records, "string_sort"):
        letters = re.search(r"[A-Z]{3,}", r["prompt"]).group(0)
        assert r["final_answer"] == "".join(sorted(letters))
        scan, ordered = steps_of(r)
        # the scan: every letter of the alphabet in order, "-" when absent, else a running number
        # once per occurrence
        entries = [(tok[0], tok[1:]) for tok in scan.split()]
        assert sorted(set(letter for letter, _ in entries)) == list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        assert [letter for letter, _ in entries] == sorted(letter for letter, _ in entries)
        found = [(letter, mark) for letter, mark in entries if mark != "-"]
        assert [int(mark) for _, mark in found] == list(range(1, len(letters) + 1))
        for letter in set(letter for letter, _ in entries):
            assert sum(1 for x, _ in found if x == letter) == letters.count(letter)
            assert ((letter, "-") in entries) == (letter not in letters)
        assert ordered == " ".join(f"{mark}{letter}" for letter, mark in found)
        assert "".join(tok.lstrip("0123456789") for tok in ordered.split()) == r["final_answer"]


def test_text_repeat(records):
    for r in by_family(records, "text_repeat"):
        w, k = quoted(r["prompt"]), numbers(r["prompt"])[0]
        assert r["final_answer"] == " ".join([w] * k)
        spelled, copies = steps_of(r)
        assert spelled == " ".join(f"{i}{c}" for i, c in enumerate(w, 1))
        assert copies.split() == [f"{i}:{w}" for i in range(1, k + 1)]


def test_uppercase(records):
    for r in by_family(records, "uppercase"):
        w = quoted(r["prompt"])
        assert r["final_answer"] == w.upper()
        pairs = [pair.split(":") for pair in steps_of(r)[0].split()]
        assert [low for low, _ in pairs] == [f"{i}{c}" for i, c in enumerate(w, 1)]
        assert "".join(up for _, up in pairs) == r["final_answer"]


def test_word_count(records):
    chosen = by_family(records, "word_count")
    assert {r["final_answer"] for r in chosen} >= {"0", "1", "2", "3"}
    for r in chosen:
        w, sentence = re.search(r"'(\w+)'[^\"]*\"([^\"]*)\"", r["prompt"]).groups()
        assert r["final_answer"] == str(sentence.split().count(w))
        marks = steps_of(r)[0].split()
        assert [m.rsplit(":", 1)[0] for m in marks] == sentence.split()
        assert marks[-1].rsplit(":", 1)[1] == r["final_answer"]


def test_the_mix_is_seeded_unique_and_weighted():
    a = generators.generate("reasoning", n=400, seed=3, families={"percent": 3, "uppercase": 1})
    assert a == generators.generate("reasoning", n=400, seed=3, families={"percent": 3, "uppercase": 1})
    assert len({r["prompt"] for r in a}) == 400
    n_percent = sum(r["meta"]["category"] == "percent" for r in a)
    assert 250 < n_percent < 350 and {r["meta"]["category"] for r in a} == {"percent", "uppercase"}
    with pytest.raises(ConfigError, match="unknown family 'percentage'"):
        generators.generate("reasoning", n=10, families=["percentage"])
    with pytest.raises(ConfigError, match="families.logic must be a weight > 0"):
        generators.generate("reasoning", n=10, families={"logic": 0})


# ------------------------------------------------------------------ tunix-rt's file
@pytest.mark.skipif(not FIXTURE.is_file(), reason="tunix-rt fixtures not present")
def test_tunix_rt_items_get_their_family_from_meta_and_match_the_generator_formats():
    items = data.read_jsonl(FIXTURE)
    counts = {}
    for ex in items:
        counts[data.family(ex)] = counts.get(data.family(ex), 0) + 1
    assert set(counts) == set(FAMILIES) | {"edge_case"}
    assert counts["edge_case"] == 20 and sum(counts.values()) == 550
    # Our formatting rules reproduce every one of their answers of the number-word-problem kinds.
    for ex in items:
        fam = data.family(ex)
        if fam == "percent":
            p, b = numbers(ex.prompt)
            assert generators._two_decimals(p * b) == ex.answer
        elif fam == "unit_cost":
            n, t = numbers(ex.prompt)
            assert "$" + generators._two_decimals(generators.division_steps(t, n)[1]) == ex.answer


# ------------------------------------------------------------------ the tokenizer's spelling option
def test_single_char_letters_spell_every_word():
    from mlflow_tunix.tokenizer import TokenizerConfig, train_tokenizer

    texts = ["Reverse the string: 'elderberry' " * 3, "Convert 'cherry' to uppercase"] * 50
    merged = train_tokenizer(texts, TokenizerConfig(vocab_size=300))
    spelled = train_tokenizer(texts, TokenizerConfig(vocab_size=300, single_char_letters=True))
    assert len(merged.tokenize(" elderberry")) < 5
    assert [t.lstrip("Ġ") for t in spelled.tokenize(" elderberry") if t != "Ġ"] == list("elderberry")
    assert spelled.decode(spelled("Reverse 'Tunix' 42")["input_ids"]) == "Reverse 'Tunix' 42"
    with pytest.raises(ConfigError, match="tokenizer.single_char_letters: must be true or false"):
        TokenizerConfig(single_char_letters="yes")


# ------------------------------------------------------------------ the project, end to end
TINY_REASONING = {
    "data.train": [{"generator": "reasoning", "n": 800, "seed": 1}],
    # two items of each family, so every family's metric exists whatever the generator's draws
    "data.eval": [{"generator": "reasoning", "n": 2, "seed": 2, "options": {"families": [f]}} for f in FAMILIES],
    "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.d_ff": 64, "model.max_seq_len": 320,
    "train.steps": 40, "train.batch_size": 16, "train.learning_rate": 0.01, "train.eval_every": 0,
    "train.checkpoint_every": 0, "generation.max_new_tokens": 16,
}


def test_reasoning_project_trains_and_scores_every_family(tracking_uri):
    from mlflow_tunix.config import load_project
    from mlflow_tunix.pipeline import run_main

    cfg = load_project("reasoning", TINY_REASONING)
    assert cfg.tokenizer.single_char_letters
    result = run_main(cfg, register=False, progress=False)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["tokenizer.single_char_letters"] == "True"
    metrics = run.data.metrics
    assert {f"accuracy/{f}" for f in FAMILIES} <= set(metrics)
    losses = MlflowClient(tracking_uri).get_metric_history(result.run_id, "loss")
    assert losses[-1].value < losses[0].value * 0.7  # it learned something of the scratchpads' shape


# ------------------------------------------------------------------ length-grouped batches (train.group_by_length)
def test_grouped_batches_cover_each_epoch_once_with_similar_lengths():
    import numpy as np

    from mlflow_tunix.train import BatchSampler

    lengths = np.random.default_rng(0).integers(20, 220, size=3200)
    grouped = BatchSampler(3200, 32, seed=4, lengths=lengths)
    plain = BatchSampler(3200, 32, seed=4)
    epoch = [grouped.indices(step) for step in range(100)]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(3200))  # every example once per epoch
    spread = np.mean([np.ptp(lengths[idx]) for idx in epoch])
    assert spread < 0.2 * np.mean([np.ptp(lengths[plain.indices(step)]) for step in range(100)])
    again = BatchSampler(3200, 32, seed=4, lengths=lengths)  # a function of (seed, step): resumable
    assert all((again.indices(s) == epoch[s]).all() for s in (57, 3, 99))
    assert not (grouped.indices(100) == epoch[0]).all()  # the next epoch is another order
