"""The scorer that ranks the leaderboard and gates promotion: `evaluate.score` and the answer parsing
under it (`data.parse_answer`, `data.is_well_formed`, `data.answers_match`).

Every case asserts the value a user would read in MLflow, worked out by hand. The correctness rule
is tunix-rt's, exactly: the parsed answer equals the expected one after ``strip().lower()``; no
number parsing, no casefolding, no collapsing of inner spaces.
"""

from __future__ import annotations

import pytest

from mlflow_tunix.data import Example, answers_match, is_well_formed, parse_answer
from mlflow_tunix.evaluate import metric_key, score


def _item(answer: str, category: str | None = None, i: int = 0) -> Example:
    return Example(id=f"q{i}", prompt=f"question {i}", completion=None, answer=answer, category=category)


def _says(answer: str, reasoning: str = "r") -> str:
    """A well-formed completion answering ``answer``."""
    return f"<reasoning>{reasoning}</reasoning><answer>{answer}</answer>"


# --------------------------------------------------------------------------- parsing the answer
@pytest.mark.parametrize("text, answer", [
    ("<reasoning>2+2=4</reasoning><answer>4</answer>", "4"),
    ("<answer>\n  4 \t</answer>", "4"),  # stripped, without a reasoning block too
    ("<answer>4 2</answer>", "4 2"),  # inner space kept
    ("<answer>5</answer><answer>6</answer>", "5"),  # duplicated: the first closed one
    ("</answer><answer>7</answer>", "7"),  # a stray closing tag before it is ignored
    ("<answer><answer>8</answer></answer>", "<answer>8"),  # nested: up to the first </answer>
    ("<answer>9<answer>", None),  # opened twice, never closed
    ("<answer>5", None),  # unclosed: the model stopped early
    ("<ANSWER>5</ANSWER>", None),  # tags are case-sensitive
    ("< answer>5</answer>", None),
    ("5", None),
    ("", None),
    ("<answer></answer>", ""),  # present but empty
    ("<answer>   </answer>", ""),
    ("<answer>École 北京 ٣</answer>", "École 北京 ٣"),  # unicode passes through untouched
    ("<answer>\u00a0Paris\u3000</answer>", "Paris"),  # str.strip() strips unicode spaces too
])
def test_parse_answer(text, answer):
    assert parse_answer(text) == answer


@pytest.mark.parametrize("text, ok", [
    ("<reasoning>éà 北京</reasoning><answer>ß</answer>", True),
    ("<reasoning>r</reasoning><answer>a</answer>\n", True),
    ("<reasoning>r</reasoning>\n<answer>a</answer>", False),  # nothing between the two blocks
    ("<reasoning>r</reasoning><answer></answer>", False),  # empty answer
    ("<reasoning>r</reasoning><answer>\u3000</answer>", False),  # blank in unicode
    ("<reasoning>r<answer>x</answer></reasoning><answer>a</answer>", False),  # a tag inside reasoning
    ("<reasoning>r</reasoning><answer>a<answer>b</answer>", False),  # nested answer
    ("<reasoning>r</reasoning><reasoning>s</reasoning><answer>a</answer>", False),  # duplicated reasoning
    ("<reasoning>r</reasoning></reasoning><answer>a</answer>", False),
    ("<REASONING>r</REASONING><ANSWER>a</ANSWER>", False),
    ("<answer>a</answer><reasoning>r</reasoning>", False),  # wrong order
    ("text <reasoning>r</reasoning><answer>a</answer>", False),
])
def test_is_well_formed_edge_cases(text, ok):
    assert is_well_formed(text) is ok


@pytest.mark.parametrize("predicted, expected, match", [
    (" Paris ", "paris", True),
    ("PARIS", "Paris", True),
    ("4", " 4\n", True),  # both sides stripped
    ("4.0", "4", False),  # no number parsing
    ("04", "4", False),
    ("1,000", "1000", False),
    ("4 2", "42", False),  # inner spaces count
    ("new  york", "new york", False),
    ("École", "école", True),  # lower() is unicode-aware
    ("STRASSE", "straße", False),  # lower(), not casefold(): these differ only under casefold
    ("İstanbul", "istanbul", False),  # 'İ'.lower() is 'i' + a combining dot
    ("x\u200b", "x", False),  # a zero-width space is not whitespace
    ("\u00a0x\u3000", "x", True),  # unicode spaces are
    ("", "4", False),
    (None, "4", False),  # no answer never matches
    (None, "", False),
])
def test_answers_match_is_strip_lower_only(predicted, expected, match):
    assert answers_match(predicted, expected) is match
    if predicted is not None:  # the rule, spelled out: agrees with strip().lower() on every case
        assert match == (predicted.strip().lower() == expected.strip().lower())


# --------------------------------------------------------------------------- score
def test_score_rows_and_metrics_by_hand():
    examples = [_item("4", "1-digit", 0), _item("12", "2-digit", 1), _item("Paris", "word", 2),
                _item("7", "1-digit", 3), _item("99", "2-digit", 4)]
    completions = [
        _says("4"),  # right, well formed
        "<reasoning>r</reasoning><answer>12</answer><answer>13</answer>",  # right (first answer) but not well formed
        _says("  paris "),  # right after strip().lower()
        "<reasoning>r</reasoning><answer>7",  # unclosed: no answer, wrong
        _says("98"),  # well formed, wrong
    ]
    result = score(examples, completions, new_tokens=[10, 20, 30, 40, 50])
    assert result.metrics == {
        "answer_accuracy": 3 / 5,
        "format_rate": 3 / 5,  # items 0, 2 (spaces inside the tags are allowed) and 4
        "n_eval": 5.0,
        "mean_new_tokens": 30.0,
        "accuracy/1-digit": 1 / 2,
        "accuracy/2-digit": 1 / 2,
        "accuracy/word": 1.0,
    }
    assert [r["correct"] for r in result.rows] == [True, True, True, False, False]
    assert [r["well_formed"] for r in result.rows] == [True, False, True, False, True]
    assert [r["answer"] for r in result.rows] == ["4", "12", "paris", "", "98"]  # stripped, "" for none
    assert result.rows[3] == {
        "id": "q3", "category": "1-digit", "prompt": "question 3", "expected": "7", "answer": "",
        "correct": False, "well_formed": False, "new_tokens": 40, "generated": completions[3],
    }


def test_format_is_scored_apart_from_correctness():
    examples = [_item("5", i=i) for i in range(4)]
    completions = [_says("5"), "<answer>5</answer>", _says("6"), "5"]
    metrics = score(examples, completions).metrics
    assert metrics["answer_accuracy"] == 2 / 4  # a right answer without reasoning still counts
    assert metrics["format_rate"] == 2 / 4  # a wrong answer in the right format still counts
    assert "mean_new_tokens" not in metrics  # not measured, not reported
    assert [r["new_tokens"] for r in score(examples, completions).rows] == [-1] * 4


def test_items_without_a_category_have_no_category_metric():
    examples = [_item("1", "a", 0), _item("2", None, 1), _item("3", "", 2), _item("4", "a", 3)]
    result = score(examples, [_says("1"), _says("2"), _says("3"), _says("0")])
    assert {k: v for k, v in result.metrics.items() if k.startswith("accuracy/")} == {"accuracy/a": 0.5}
    assert result.metrics["answer_accuracy"] == 3 / 4  # uncategorised items still count overall
    assert [r["category"] for r in result.rows] == ["a", "", "", "a"]


@pytest.mark.parametrize("category, key", [
    ("2-digit", "accuracy/2-digit"),
    ("trace_sensitive", "accuracy/trace_sensitive"),
    ("v1.2", "accuracy/v1.2"),
    ("a b", "accuracy/a_b"),
    ("math/add", "accuracy/math_add"),  # no extra level of nesting in the metric name
    ("x:y?*", "accuracy/x_y__"),
    ("école", "accuracy/école"),  # unicode letters are kept readable
    (7, "accuracy/7"),
])
def test_metric_key_sanitises_categories(category, key):
    from mlflow.utils.validation import _validate_metric_name

    assert metric_key(category) == key
    _validate_metric_name(key)  # MLflow's own check accepts it


def test_per_category_metrics_use_the_sanitised_key():
    examples = [_item("1", "math/add", 0), _item("2", "math/add", 1), _item("3", "a b", 2)]
    metrics = score(examples, [_says("1"), _says("0"), _says("3")]).metrics
    assert metrics["accuracy/math_add"] == 0.5 and metrics["accuracy/a_b"] == 1.0


def test_categories_that_sanitise_alike_keep_both_scores():
    examples = [_item("1", "a b", 0), _item("2", "a/b", 1)]
    metrics = score(examples, [_says("1"), _says("0")]).metrics
    per_category = {k: v for k, v in metrics.items() if k.startswith("accuracy/")}
    # Sorted by category name: "a b" < "a/b", so "a b" keeps the plain key.
    assert per_category == {"accuracy/a_b": 1.0, "accuracy/a_b-2": 0.0}


def test_unicode_and_case_through_score():
    examples = [_item("École", "fr", 0), _item("straße", "de", 1), _item("ДА", "ru", 2)]
    completions = [_says(" école "), _says("STRASSE"), _says("да")]
    result = score(examples, completions, new_tokens=[3, 4, 5])
    assert [r["correct"] for r in result.rows] == [True, False, True]
    assert result.metrics["accuracy/fr"] == 1.0 and result.metrics["accuracy/de"] == 0.0
    assert result.metrics["mean_new_tokens"] == 4.0


def test_empty_answers_are_wrong_and_ill_formed():
    result = score([_item("0")], ["<reasoning>r</reasoning><answer> </answer>"], new_tokens=[0])
    assert result.rows[0]["answer"] == "" and result.rows[0]["correct"] is False
    assert result.metrics["answer_accuracy"] == 0.0 and result.metrics["format_rate"] == 0.0
    assert result.metrics["mean_new_tokens"] == 0.0


def test_mean_new_tokens_is_the_mean_over_all_items():
    examples = [_item("1", i=i) for i in range(3)]
    result = score(examples, [_says("1")] * 3, new_tokens=[1, 2, 6])
    assert result.metrics["mean_new_tokens"] == 3.0
    assert [r["new_tokens"] for r in result.rows] == [1, 2, 6]


def test_no_items_scores_zero_without_dividing_by_zero():
    assert score([], []).metrics == {"answer_accuracy": 0.0, "format_rate": 0.0, "n_eval": 0.0}


def test_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="2 examples but 1 completions"):
        score([_item("1"), _item("2")], [_says("1")])
