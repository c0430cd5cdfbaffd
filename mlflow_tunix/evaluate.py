"""Evaluation by generation: decode an answer for every held-out prompt and score it.

Metrics (tunix-rt's rule for correctness: the parsed ``<answer>`` equals the expected answer after
``strip().lower()``):

* ``answer_accuracy``  share of items answered right;
* ``format_rate``      share of outputs that are exactly ``<reasoning>…</reasoning><answer>…</answer>``;
* ``mean_new_tokens``  mean generated length (reasoning costs tokens: this shows how many);
* ``accuracy/<category>`` the per-category scorecard, where items have categories (the finest the
  item's meta gives: tunix-rt's task_type or template, see ``data.family``).

Every item becomes one row of the eval table, so two runs can be compared row by row.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from mlflow_tunix.data import Example, answers_match, family, is_well_formed, parse_answer, render_prompt
from mlflow_tunix.generate import GenerationConfig, generate_text

@dataclass
class EvalResult:
    metrics: dict[str, float]
    rows: list[dict]  # one per item: id, category, prompt, expected, answer, correct, well_formed, new_tokens, generated


def metric_key(category: str) -> str:
    """MLflow metric names allow letters, digits and _-./ and spaces; keep categories readable."""
    safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in str(category))
    return f"accuracy/{safe}"


def score(examples: Sequence[Example], completions: Sequence[str], new_tokens: Sequence[int] | None = None) -> EvalResult:
    """Score generated ``completions`` against ``examples`` (same order)."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    rows, by_category = [], defaultdict(list)
    for i, (ex, text) in enumerate(zip(examples, completions)):
        answer = parse_answer(text)
        correct = answers_match(answer, ex.answer)
        category = family(ex)
        rows.append({
            "id": ex.id,
            "category": category or "",
            "prompt": ex.prompt,
            "expected": ex.answer,
            "answer": answer if answer is not None else "",
            "correct": bool(correct),
            "well_formed": bool(is_well_formed(text)),
            "new_tokens": int(new_tokens[i]) if new_tokens is not None else -1,
            "generated": text,
        })
        if category:
            by_category[category].append(correct)
    n = max(len(rows), 1)
    metrics = {
        "answer_accuracy": sum(r["correct"] for r in rows) / n,
        "format_rate": sum(r["well_formed"] for r in rows) / n,
        "n_eval": float(len(rows)),
    }
    if new_tokens is not None:
        metrics["mean_new_tokens"] = float(sum(new_tokens)) / n
    for category, results in sorted(by_category.items()):
        key, n = metric_key(category), 1
        while key in metrics:  # two categories that read alike once sanitised ("a b", "a/b") keep both scores
            n += 1
            key = f"{metric_key(category)}-{n}"
        metrics[key] = sum(results) / len(results)
    return EvalResult(metrics, rows)


def evaluate(model, tokenizer, examples: Sequence[Example], generation: GenerationConfig, *,
             progress: bool = True) -> EvalResult:
    """Generate a completion for every example with greedy (or configured) KV-cache decoding and score it."""
    prompts = [render_prompt(ex.prompt, generation.prompt_template, tokenizer) for ex in examples]
    completions = generate_text(model, tokenizer, prompts, generation, progress=progress)
    new_tokens = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
    return score(examples, completions, new_tokens)
