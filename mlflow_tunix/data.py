"""Reasoning-trace datasets: read, check, render, split, fingerprint (generators: ``generators.py``).

The first stage of the pipeline. A dataset is a list of :class:`Example`; each example holds the
raw question (``prompt``), the training target rendered as
``<reasoning>...</reasoning><answer>...</answer>`` (``completion``, None for eval items) and the
expected final ``answer``.

Three JSONL formats are read (the format is fixed by a file's first record):

* trace      ``{trace_version, prompt, steps: [{i, type, content}], final_answer, meta}`` (tunix-rt)
* completion ``{prompt, completion, id?, category?}``
* eval item  ``{id, prompt, expected_answer, category?, difficulty?, section?}`` (tunix-rt)

Anything wrong with a file raises :class:`~mlflow_tunix.errors.DataError` naming ``file:line``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from mlflow_tunix.errors import ConfigError, DataError, short

TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
TEMPLATES = {
    "plain": "{prompt}\n",
    "gemma": "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n",
    "chat": None,  # the tokenizer's own chat template (a checkpoint's: model.init_from)
}
TEMPLATE_SPECIAL_TOKENS = ("<start_of_turn>", "<end_of_turn>")


@dataclass(frozen=True)
class Example:
    """One dataset item. ``completion`` is None for eval items (there is nothing to train on)."""

    id: str
    prompt: str  # the raw question; the chat template is applied later, by render_prompt
    completion: str | None  # "<reasoning>...</reasoning><answer>...</answer>"
    answer: str  # the expected final answer
    category: str | None = None
    # Provenance, left out of == and hash: the content fields above decide identity (as in
    # digest()), and a dict-valued field would make Examples unhashable.
    source: str = field(default="", compare=False)  # "train.jsonl:17" or "generator:addition#17"
    meta: Mapping = field(default_factory=dict, compare=False)  # tunix-rt meta, difficulty, section


# --------------------------------------------------------------------------------------------
# Rendering and parsing the <reasoning>/<answer> format


def render_completion(steps: Sequence[str], answer: str) -> str:
    """The training target: the steps one per line inside <reasoning>, then the <answer>."""
    return "<reasoning>" + "\n".join(steps) + "</reasoning><answer>" + answer + "</answer>"


def check_template(name: str, key: str = "template") -> None:
    """The one check of a prompt template's name; ``key`` is the config key it came from."""
    if name not in TEMPLATES:
        raise ConfigError(f"{key}: {name!r} is not one of {', '.join(TEMPLATES)}")


def render_prompt(prompt: str, template: str = "plain", tokenizer=None) -> str:
    """The text the model sees before its completion (``chat``: as the tokenizer's chat template
    renders one user turn, ready for the assistant's answer)."""
    check_template(template)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError("template 'chat': the tokenizer has no chat template (it comes with a checkpoint: "
                              "model.init_from)")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return TEMPLATES[template].format(prompt=prompt)


def _between(text: str, open_tag: str, close_tag: str) -> str | None:
    start = text.find(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    if end < 0:
        return None  # an unclosed tag means the model stopped early: no answer
    return text[start:end].strip()


def parse_answer(text: str) -> str | None:
    """The stripped content of the first closed <answer>...</answer>, else None."""
    return _between(text, "<answer>", "</answer>")


def parse_reasoning(text: str) -> str | None:
    """The stripped content of the first closed <reasoning>...</reasoning>, else None."""
    return _between(text, "<reasoning>", "</reasoning>")


_WELL_FORMED = re.compile(r"\s*<reasoning>(.*)</reasoning><answer>(.*)</answer>\s*", re.DOTALL)


def is_well_formed(text: str) -> bool:
    """True if text is exactly one <reasoning>X</reasoning><answer>Y</answer> (Y not blank),
    with only whitespace around it."""
    m = _WELL_FORMED.fullmatch(text)
    if m is None:
        return False
    reasoning, answer = m.groups()
    # The greedy groups would swallow extra tags ("...</answer><answer>..."): forbid any inside.
    if any(tag in reasoning or tag in answer for tag in TAGS):
        return False
    return answer.strip() != ""


# tunix-rt's dev-reasoning-v2 marks its six word-problem templates only by number (meta.template_id,
# category "reasoning"); its other items name their task (meta.task_type). These are the names the
# `reasoning` generator gives the same families.
TUNIX_RT_TEMPLATES = {0: "distance", 1: "percent", 2: "unit_cost", 3: "add_steps", 4: "subtract_steps",
                      5: "multiply_steps"}


def family(ex: "Example") -> str | None:
    """The finest category an item's meta gives: tunix-rt's task_type or named template, else its category."""
    task = ex.meta.get("task_type")
    if isinstance(task, str) and task:
        return task
    template = ex.meta.get("template_id")
    if ex.category == "reasoning" and template in TUNIX_RT_TEMPLATES:
        return TUNIX_RT_TEMPLATES[template]
    return ex.category


def answers_match(predicted: str | None, expected: str) -> bool:
    """tunix-rt's rule: equal after strip().lower(). No answer never matches."""
    if predicted is None:
        return False
    return predicted.strip().lower() == str(expected).strip().lower()


# --------------------------------------------------------------------------------------------
# Reading and checking records

def _type_name(value) -> str:
    return "null" if value is None else {dict: "object", list: "list", str: "string"}.get(
        type(value), type(value).__name__
    )


def _record_format(record: dict) -> str | None:
    """Which of the three formats a record is in, by the keys only that format has."""
    if "final_answer" in record or "steps" in record or "trace_version" in record:
        return "trace"
    if "expected_answer" in record:
        return "eval"
    if "completion" in record:
        return "completion"
    return None


class _Checker:
    """Field checks for one record; raises DataError naming the file and line."""

    def __init__(self, path, line: int):
        self.path, self.line = path, line

    def fail(self, message: str):
        raise DataError(self.path, self.line, message)

    def text(self, record: dict, key: str, *, label: str | None = None, nonblank=True) -> str:
        label = label or key
        if key not in record:
            self.fail(f"'{label}' is missing")
        value = record[key]
        if not isinstance(value, str):
            self.fail(f"'{label}' must be a string, got {_type_name(value)}")
        if nonblank and not value.strip():
            self.fail(f"'{label}' is empty")
        return value

    def answer(self, record: dict, key: str) -> str:
        """A final answer: a string, or a number (kept as its str()). Never blank."""
        if key not in record:
            self.fail(f"'{key}' is missing")
        value = record[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                self.fail(f"'{key}' must be a string or a number, got {value}")
            value = str(value)
        if not isinstance(value, str):
            self.fail(f"'{key}' must be a string or a number, got {_type_name(value)}")
        if not value.strip():
            self.fail(f"'{key}' is empty")
        for tag in TAGS:
            if tag in value:
                self.fail(f"'{key}' contains the tag {tag!r}")
        return value.strip()

    def optional_name(self, mapping: Mapping, key: str, label: str) -> str | None:
        """An optional id or category: a string or an integer (ids are often numbers)."""
        value = mapping.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            self.fail(f"'{label}' must be a string, got {_type_name(value)}")
        return value

    def steps(self, record: dict) -> list[str]:
        if "steps" not in record:
            self.fail("'steps' is missing")
        steps = record["steps"]
        if not isinstance(steps, list):
            self.fail(f"'steps' must be a list, got {_type_name(steps)}")
        keyed = []
        for k, step in enumerate(steps):
            if not isinstance(step, dict):
                self.fail(f"'steps[{k}]' must be an object, got {_type_name(step)}")
            content = self.text(step, "content", label=f"steps[{k}].content", nonblank=False)
            for tag in TAGS:
                if tag in content:
                    self.fail(f"'steps[{k}].content' contains the tag {tag!r}")
            i = step.get("i", k)  # tunix-rt numbers its steps; without "i" keep file order
            if not isinstance(i, int) or isinstance(i, bool):
                self.fail(f"'steps[{k}].i' must be an integer, got {_type_name(i)}")
            keyed.append((i, k, content))
        return [content for _, _, content in sorted(keyed)]


def _stem(source) -> str:
    name = Path(str(source)).name
    return name[: -len(".jsonl")] if name.endswith(".jsonl") else name


def _example(record, fmt: str, check: _Checker, fallback_id: str, where: str) -> Example:
    """Turn one checked record of format ``fmt`` into an Example."""
    prompt = check.text(record, "prompt")
    if fmt == "trace":
        steps = check.steps(record)
        answer = check.answer(record, "final_answer")
        meta = record.get("meta", {})
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            check.fail(f"'meta' must be an object, got {_type_name(meta)}")
        return Example(
            id=check.optional_name(meta, "id", "meta.id") or fallback_id,
            prompt=prompt,
            completion=render_completion(steps, answer),
            answer=answer,
            category=check.optional_name(meta, "category", "meta.category"),
            source=where,
            meta=dict(meta),
        )
    if fmt == "completion":
        completion = check.text(record, "completion")
        if "<answer>" in completion:
            answer = parse_answer(completion)
            if not answer:
                check.fail("'completion' has an <answer> tag but no closed, non-empty answer")
        else:  # a bare answer: give it the tags (with empty reasoning) so targets look alike
            answer = completion.strip()
            completion = render_completion([], answer)
        return Example(
            id=check.optional_name(record, "id", "id") or fallback_id,
            prompt=prompt,
            completion=completion,
            answer=answer,
            category=check.optional_name(record, "category", "category"),
            source=where,
        )
    # eval item
    answer = check.answer(record, "expected_answer")
    return Example(
        id=check.optional_name(record, "id", "id") or fallback_id,
        prompt=prompt,
        completion=None,
        answer=answer,
        category=check.optional_name(record, "category", "category"),
        source=where,
        meta={k: record[k] for k in ("difficulty", "section") if k in record},
    )


def _examples(numbered: Iterable[tuple[int, object]], path, sep: str) -> list[Example]:
    """Check numbered records (all in the first record's format, ids unique) into Examples."""
    stem = _stem(path)
    examples: list[Example] = []
    first: tuple[str, int] | None = None  # (format, line) of the first record
    seen: dict[str, int] = {}
    for line, record in numbered:
        check = _Checker(path, line)
        if not isinstance(record, dict):
            check.fail(f"record must be a JSON object, got {_type_name(record)}")
        fmt = _record_format(record)
        if fmt is None:
            check.fail(
                "cannot tell the record's format: expected a trace ('final_answer'), "
                "a 'completion' or an eval item ('expected_answer')"
            )
        if first is None:
            first = (fmt, line)
        elif fmt != first[0]:
            check.fail(f"record is in {fmt} format but the file is in {first[0]} format (line {first[1]})")
        ex = _example(record, fmt, check, f"{stem}-{line}", f"{path}{sep}{line}")
        if ex.id in seen:
            check.fail(f"duplicate id {ex.id!r} (also on line {seen[ex.id]})")
        seen[ex.id] = line
        examples.append(ex)
    if first is None:
        raise DataError(path, None, "no records (the file is empty)")
    return examples


# Readers refuse what would cost without end: a line longer than this (a record is a question and
# its worked answer: kilobytes), and anything but a regular file (/dev/zero, a FIFO).
MAX_LINE_BYTES = 1 << 20


def _unique_keys(pairs):
    """json object_pairs_hook: a key given twice is refused (which value was meant is not knowable)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {short(key, 40)}")
        obj[key] = value
    return obj


def _numbered_records(path, data: bytes):
    """Yield (line number, parsed JSON) for each non-blank line of a JSONL file's bytes."""
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        data = data[3:]
    for line, raw in enumerate(data.split(b"\n"), start=1):
        if len(raw) > MAX_LINE_BYTES:
            raise DataError(path, line, f"line of {len(raw)} bytes; at most {MAX_LINE_BYTES} are allowed")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(path, line, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise DataError(path, line, f"invalid JSON: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer too long, nesting too deep, a duplicate key
            raise DataError(path, line, f"invalid JSON: {str(e)[:200] or type(e).__name__}") from None
        # JSON's \ud800 escape decodes to a lone surrogate: a str that cannot be written as UTF-8 (raw
        # bytes cannot hold one: decode above refuses them), so only a line with an escape is checked.
        if "\\u" in text and _has_surrogate(record):
            raise DataError(path, line, "a string holds a lone surrogate (a \\ud800-\\udfff escape without its "
                                        "pair): not valid Unicode")
        yield line, record


def _has_surrogate(value) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_jsonl(path) -> list[Example]:
    """Read and check a dataset file (trace, completion or eval-item JSONL): a regular file, lines of at most
    MAX_LINE_BYTES. ``data validate`` and every training or eval run read files through this one function."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise DataError(path, None, "is a directory, not a JSONL file")
        if not stat.S_ISREG(info.st_mode):
            raise DataError(path, None, "not a regular file (a device, FIFO or socket); give a JSONL file")
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except OSError as e:
        raise DataError(path, None, f"cannot read the file ({e.strerror})") from None
    return _examples(_numbered_records(path, data), path, ":")


def examples_from_records(records: Iterable[dict], source: str) -> list[Example]:
    """Check in-memory records as read_jsonl checks a file's lines (records numbered from 1);
    each Example's source is ``f"{source}#{number}"``."""
    return _examples(enumerate(records, start=1), source, "#")


def write_jsonl(records: Iterable[dict], path) -> None:
    """Write records one JSON object per line (UTF-8, non-ASCII kept readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# Looking at, splitting and fingerprinting a dataset


def summarize(examples: Sequence[Example]) -> dict:
    """Counts and sizes for a run's params / a dataset card.

    ``format`` is "train" (all items have a completion), "eval" (none has) or "mixed".
    Items without a category are counted under "uncategorized".
    """
    n = len(examples)
    completions = [ex.completion for ex in examples if ex.completion is not None]
    categories: dict[str, int] = {}
    for ex in examples:
        name = ex.category if ex.category is not None else "uncategorized"
        categories[name] = categories.get(name, 0) + 1
    if completions and len(completions) == n:
        fmt = "train"
    elif not completions:
        fmt = "eval"
    else:
        fmt = "mixed"
    return {
        "examples": n,
        "format": fmt,
        "with_completion": len(completions),
        "categories": dict(sorted(categories.items())),
        "mean_prompt_chars": round(sum(len(ex.prompt) for ex in examples) / n, 1) if n else 0.0,
        "mean_completion_chars": (
            round(sum(len(c) for c in completions) / len(completions), 1) if completions else 0.0
        ),
    }


def split(
    examples: Sequence[Example], eval_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """A seeded train/eval split; eval gets max(1, round(n * eval_fraction)) items.

    Both parts keep the input order, so the same (examples, fraction, seed) always gives the
    same two lists.
    """
    n = len(examples)
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    if n < 2:
        raise ConfigError(f"cannot split {n} example(s): need at least 2")
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))  # keep at least one to train on
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evals = [ex for i, ex in enumerate(examples) if i in held]
    return train, evals


def digest(examples: Sequence[Example]) -> str:
    """sha256 (64 hex chars) of the content, in order: (id, prompt, completion, answer, category)."""
    rows = [[ex.id, ex.prompt, ex.completion, ex.answer, ex.category] for ex in examples]
    canonical = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def drop_overlap(train: Sequence[Example], held_out: Sequence[Example]) -> tuple[list[Example], int]:
    """Remove train items whose prompt (stripped) is also a held-out prompt, so the eval set
    measures generalisation and not recall. Returns (kept, number dropped)."""
    held = {ex.prompt.strip() for ex in held_out}
    kept = [ex for ex in train if ex.prompt.strip() not in held]
    return kept, len(train) - len(kept)
